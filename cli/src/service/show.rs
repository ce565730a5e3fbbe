//! `corral service list` and `corral service status`: pure renderers over
//! the API's answers ("now" is an argument), and the two thin commands.

use std::fmt::Write as _;

use anyhow::Result;
use corral_proto::pb;

use super::{Client, NameArgs, Target};
use crate::views::render_table;

/// Seconds since the Unix epoch, as the API's timestamps.
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(crate) async fn list(target: Target) -> Result<()> {
    let mut client = Client::new(&target)?;
    let services = client.list().await?;
    print!("{}", render_list(&services));
    Ok(())
}

pub(crate) async fn status(args: NameArgs) -> Result<()> {
    let mut client = Client::new(&args.target)?;
    let status = client.get(&args.name).await?;
    print!("{}", render_status(&status, now()));
    Ok(())
}

/// `stable`, `rolling out v3 (1/3 new available)`, `rolling back to v2`,
/// `rollout to v3 failed`, `deleting`: one phrase for the list's column.
pub(crate) fn deployment_state(s: &pb::ServiceStatus) -> String {
    if s.deleting {
        return "deleting".to_string();
    }
    match &s.deployment {
        None => "stable".to_string(),
        Some(d) if d.failed => format!("rollout to v{} failed", d.target_version),
        Some(d) if d.rolling_back => format!(
            "rolling back to v{} ({}/{} available)",
            d.target_version, d.new_available, s.instances_wanted
        ),
        Some(d) => format!(
            "rolling out v{} ({}/{} new available)",
            d.target_version, d.new_available, s.instances_wanted
        ),
    }
}

pub(crate) fn render_list(services: &[pb::ServiceStatus]) -> String {
    if services.is_empty() {
        return "no services\n".to_string();
    }
    let rows: Vec<Vec<String>> = services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!(
                    "{}/{}/{}",
                    s.instances_running, s.instances_healthy, s.instances_wanted
                ),
                format!("v{}", s.version),
                deployment_state(s),
            ]
        })
        .collect();
    render_table(
        &["NAME", "RUNNING/HEALTHY/WANTED", "VERSION", "DEPLOYMENT"],
        &rows,
    )
}

fn state_word(state: pb::TaskState) -> &'static str {
    state.as_str_name().trim_start_matches("TASK_")
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

pub(crate) fn render_status(s: &pb::ServiceStatus, now: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "service:    {}", s.name);
    let _ = writeln!(out, "version:    v{}", s.version);
    let _ = writeln!(
        out,
        "instances:  {} running, {} healthy, {} wanted",
        s.instances_running, s.instances_healthy, s.instances_wanted
    );
    let _ = writeln!(out, "deployment: {}", deployment_state(s));
    if let Some(d) = &s.deployment {
        let _ = writeln!(
            out,
            "            from v{}: {} old left, {} new ({} available), {} available in all",
            d.from_version, d.old_instances, d.new_instances, d.new_available, d.available
        );
    }
    if !s.message.is_empty() {
        let _ = writeln!(out, "message:    {}", s.message);
    }
    if !s.unplaced.is_empty() {
        let _ = writeln!(out, "unplaced:   {}", s.unplaced);
    }
    if let Some(until) = s.backoff_until {
        let _ = writeln!(
            out,
            "backoff:    next launch in {:.1}s (failed instances back off)",
            (until - now).max(0.0)
        );
    }
    if s.instances.is_empty() {
        out.push_str("no instances\n");
        return out;
    }
    out.push('\n');
    // Only services with persistent volumes get the column: the table is
    // wide enough already.
    let volumes = s.instances.iter().any(|i| !i.volumes.is_empty());
    let rows: Vec<Vec<String>> = s
        .instances
        .iter()
        .map(|i| {
            let mut row = vec![
                i.id.clone(),
                format!("v{}", i.version),
                if i.hostname.is_empty() {
                    i.agent_id.clone()
                } else {
                    i.hostname.clone()
                },
                state_word(i.state()).to_string(),
                yes_no(i.healthy).to_string(),
                yes_no(i.ready).to_string(),
                if i.pod_ip.is_empty() {
                    "-".to_string()
                } else {
                    i.pod_ip.clone()
                },
                i.restart_count.to_string(),
            ];
            if volumes {
                row.push(if i.volumes.is_empty() {
                    "-".to_string()
                } else {
                    i.volumes.join(",")
                });
            }
            row
        })
        .collect();
    let mut header = vec![
        "INSTANCE", "VERSION", "AGENT", "STATE", "HEALTHY", "READY", "POD IP", "RESTARTS",
    ];
    if volumes {
        header.push("VOLUMES");
    }
    out.push_str(&render_table(&header, &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> pb::ServiceStatus {
        pb::ServiceStatus {
            name: "web".into(),
            version: 3,
            instances_wanted: 3,
            instances_running: 3,
            instances_healthy: 2,
            instances: vec![pb::ServiceInstance {
                id: "web.3.7".into(),
                number: 7,
                version: 3,
                hostname: "node1".into(),
                state: pb::TaskState::TaskRunning.into(),
                healthy: true,
                ready: true,
                pod_ip: "10.88.0.5".into(),
                restart_count: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_list_shows_counts_version_and_deployment() {
        let mut rolling = service();
        rolling.name = "api".into();
        rolling.deployment = Some(pb::ServiceDeployment {
            target_version: 3,
            from_version: 2,
            new_available: 1,
            ..Default::default()
        });
        let text = render_list(&[service(), rolling]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{text}");
        assert!(
            lines[1].contains("3/2/3") && lines[1].contains("stable"),
            "{text}"
        );
        assert!(
            lines[2].contains("rolling out v3 (1/3 new available)"),
            "{text}"
        );
        assert_eq!(render_list(&[]), "no services\n");
    }

    #[test]
    fn status_shows_instances_and_why_a_rollout_was_rolled_back() {
        let mut s = service();
        s.message = "rolled back to version 2: 3 new instances failed".into();
        s.deployment = Some(pb::ServiceDeployment {
            target_version: 2,
            from_version: 3,
            rolling_back: true,
            ..Default::default()
        });
        let text = render_status(&s, 0.0);
        assert!(text.contains("deployment: rolling back to v2"), "{text}");
        assert!(
            text.contains("message:    rolled back to version 2: 3 new instances failed"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.starts_with("web.3.7"))
            .expect("row");
        for cell in ["v3", "node1", "RUNNING", "yes", "10.88.0.5", "1"] {
            assert!(row.contains(cell), "{cell}: {row}");
        }
        assert!(!text.contains("VOLUMES"), "{text}");
    }

    #[test]
    fn status_shows_the_persistent_volumes_of_instances_that_have_them() {
        let mut s = service();
        s.instances[0].volumes = vec!["data-web-0".into(), "logs-web-0".into()];
        let text = render_status(&s, 0.0);
        let header = text
            .lines()
            .find(|l| l.starts_with("INSTANCE"))
            .expect("header");
        assert!(header.ends_with("VOLUMES"), "{text}");
        let row = text
            .lines()
            .find(|l| l.starts_with("web.3.7"))
            .expect("row");
        assert!(row.ends_with("data-web-0,logs-web-0"), "{row}");
    }
}
