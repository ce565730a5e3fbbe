//! `corral agents`, `corral frameworks`, `corral tasks`: tables from the
//! master's `/state`, or the raw JSON with `--json`.

use anyhow::{Context, Result};
use clap::Args;
use corral_master::state::{ResourcesJson, StateSnapshot, TaskState};

use crate::DEFAULT_MASTER;

#[derive(Args)]
pub struct ViewArgs {
    /// Master to ask: HOST:PORT, or several separated by commas (a standby
    /// redirects to the leader; a master that does not answer is skipped).
    #[arg(long, default_value = DEFAULT_MASTER, env = "CORRAL_MASTER")]
    master: String,
    /// Print JSON (for scripts) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct TaskArgs {
    #[command(flatten)]
    view: ViewArgs,
    /// Include completed tasks.
    #[arg(long)]
    all: bool,
}

/// The leader's `/state`, from the first of `masters` (comma-separated)
/// that answers; a standby redirects to the leader.
pub async fn fetch_state(masters: &str) -> Result<StateSnapshot> {
    let list = corral_proto::leader::parse_masters(masters)
        .map_err(|e| anyhow::anyhow!("--master: {e}"))?;
    let mut last = None;
    for master in &list {
        match fetch_state_from(master).await {
            Ok(state) => return Ok(state),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("--master: no master given")))
}

async fn fetch_state_from(master: &str) -> Result<StateSnapshot> {
    let url = format!("http://{master}/state");
    let response = reqwest::get(&url)
        .await
        .with_context(|| {
            format!(
                "cannot reach the master at {master} (is it running? set --master or CORRAL_MASTER)"
            )
        })?
        .error_for_status()
        .with_context(|| format!("GET {url}"))?;
    response
        .json::<StateSnapshot>()
        .await
        .with_context(|| format!("GET {url}: unexpected answer"))
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows as left-aligned columns.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(header, rows));
}

/// Rows as left-aligned columns, two spaces apart, one line each.
pub(crate) fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                // Padding counts characters, not bytes, as the widths do.
                let pad = widths[i].saturating_sub(cell.chars().count());
                text.push_str(cell);
                text.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
    out
}

pub(crate) fn fmt_num(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn used_of(used: f64, total: f64) -> String {
    format!("{}/{}", fmt_num(used), fmt_num(total))
}

fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

pub async fn agents(args: ViewArgs) -> Result<()> {
    let state = fetch_state(&args.master).await?;
    if args.json {
        return print_json(&state.agents);
    }
    let rows: Vec<Vec<String>> = state
        .agents
        .iter()
        .map(|a| {
            let (u, t): (&ResourcesJson, &ResourcesJson) = (&a.used_resources, &a.resources);
            vec![
                a.id.clone(),
                a.hostname.clone(),
                a.address.clone(),
                a.state.clone(),
                used_of(u.cpus, t.cpus),
                used_of(u.mem, t.mem),
                used_of(u.disk, t.disk),
                a.tasks.to_string(),
                a.attributes
                    .iter()
                    .map(|(k, v)| format!("{k}:{v}"))
                    .collect::<Vec<_>>()
                    .join(";"),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "HOSTNAME",
            "ADDRESS",
            "STATE",
            "CPUS",
            "MEM",
            "DISK",
            "TASKS",
            "ATTRIBUTES",
        ],
        &rows,
    );
    Ok(())
}

pub async fn volumes(args: ViewArgs) -> Result<()> {
    let state = fetch_state(&args.master).await?;
    if args.json {
        return print_json(&state.volumes);
    }
    let rows: Vec<Vec<String>> = state
        .volumes
        .iter()
        .map(|v| {
            vec![
                v.id.clone(),
                short(&v.framework_id),
                short(&v.agent_id),
                fmt_num(v.disk_mib),
                v.in_use_by.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print_table(&["ID", "FRAMEWORK", "AGENT", "DISK", "IN USE BY"], &rows);
    Ok(())
}

pub async fn frameworks(args: ViewArgs) -> Result<()> {
    let state = fetch_state(&args.master).await?;
    if args.json {
        return print_json(&state.frameworks);
    }
    let rows: Vec<Vec<String>> = state
        .frameworks
        .iter()
        .map(|f| {
            vec![
                f.id.clone(),
                f.name.clone(),
                f.role.clone(),
                f.state.clone(),
                if f.suppressed { "yes" } else { "no" }.to_string(),
                f.tasks.to_string(),
                f.offers.to_string(),
                format!("{:.3}", f.dominant_share),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "ROLE",
            "STATE",
            "SUPPRESSED",
            "TASKS",
            "OFFERS",
            "SHARE",
        ],
        &rows,
    );
    Ok(())
}

pub async fn tasks(args: TaskArgs) -> Result<()> {
    let state = fetch_state(&args.view.master).await?;
    let mut tasks: Vec<&TaskState> = state.tasks.iter().collect();
    if args.all {
        tasks.extend(state.completed_tasks.iter());
    }
    if args.view.json {
        return print_json(&tasks);
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                short(&t.framework_id),
                short(&t.agent_id),
                t.state.clone(),
                fmt_num(t.resources.cpus),
                fmt_num(t.resources.mem),
                t.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                if t.reason.is_empty() {
                    t.message.clone()
                } else {
                    format!("{}: {}", t.reason, t.message)
                },
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "NAME",
            "FRAMEWORK",
            "AGENT",
            "STATE",
            "CPUS",
            "MEM",
            "EXIT",
            "REASON",
        ],
        &rows,
    );
    Ok(())
}
