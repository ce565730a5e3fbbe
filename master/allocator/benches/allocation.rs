//! One allocation round at the shapes Mesos published for its hierarchical
//! allocator (`HierarchicalAllocator_BENCHMARK_Test`): 2,000 agents with
//! 200 or 2,000 frameworks, agents `cpus:24;mem:4096;disk:4096;ports:[31000-32000]`.
//!
//! - `unfiltered`: nobody declined anything; every agent is given away.
//! - `declined/warm`: every framework declined every agent with a long filter
//!   (the `DeclineOffers` shape) and the allocator has already run a round
//!   since, so each agent's blocked set is cached: the steady state.
//! - `declined/cold`: the same, but the round runs right after all the
//!   declines, so every agent's blocked set is stale and rebuilt (from the
//!   per-group masks the declines maintained).
//! - `declined/expired`: the same filters, but the round runs after they all
//!   expired, so every filter is walked and dropped and every agent is then
//!   given away: the most filter work one round can do.

use std::hint::black_box;
use std::time::Duration;

use corral_allocator::Allocator;
use corral_proto::{AgentId, FrameworkId, Resources};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

const AGENT: &str = "cpus:24;mem:4096;disk:4096;ports:[31000-32000]";
/// Mesos's benchmark refuses for a day so filters never expire mid-run.
const REFUSE: Duration = Duration::from_secs(24 * 3600);

fn agent_resources() -> Resources {
    Resources::parse(AGENT).expect("benchmark agent resources parse")
}

fn agent_id(i: usize) -> AgentId {
    AgentId::generated(format!("agent-{i:05}"))
}

fn framework_id(i: usize) -> FrameworkId {
    FrameworkId::generated(format!("framework-{i:05}"))
}

fn cluster(agents: usize, frameworks: usize) -> Allocator {
    let mut allocator = Allocator::new();
    let total = agent_resources();
    for i in 0..agents {
        allocator.add_agent(agent_id(i), total.clone(), Vec::new());
    }
    for i in 0..frameworks {
        allocator.add_framework(framework_id(i), "*");
    }
    allocator
}

/// Every framework declined every agent's full resources for a day.
fn declined(agents: usize, frameworks: usize) -> Allocator {
    let mut allocator = cluster(agents, frameworks);
    let total = agent_resources();
    let agent_ids: Vec<AgentId> = (0..agents).map(agent_id).collect();
    for f in 0..frameworks {
        let framework = framework_id(f);
        for agent in &agent_ids {
            allocator.recover(&framework, agent, &total, Some(REFUSE), Duration::ZERO);
        }
    }
    allocator
}

fn bench(c: &mut Criterion) {
    let now = Duration::from_secs(1);
    let mut group = c.benchmark_group("round");
    group.sample_size(20);
    for (agents, frameworks) in [(2_000, 200), (2_000, 2_000)] {
        let shape = format!("{agents}x{frameworks}");

        let fresh = cluster(agents, frameworks);
        assert_eq!(fresh.clone().allocate(now).len(), agents);
        group.bench_function(format!("unfiltered/{shape}"), |b| {
            b.iter_batched(
                || fresh.clone(),
                |mut allocator| {
                    let offers = allocator.allocate(black_box(now));
                    // Returned so dropping them is not timed.
                    (allocator, offers)
                },
                BatchSize::PerIteration,
            )
        });
        drop(fresh);

        let cold = declined(agents, frameworks);
        group.bench_function(format!("declined/cold/{shape}"), |b| {
            b.iter_batched(
                || cold.clone(),
                |mut allocator| {
                    let offers = allocator.allocate(black_box(now));
                    (allocator, offers)
                },
                BatchSize::PerIteration,
            )
        });

        let expired_at = REFUSE + Duration::from_secs(1);
        assert_eq!(cold.clone().allocate(expired_at).len(), agents);
        group.bench_function(format!("declined/expired/{shape}"), |b| {
            b.iter_batched(
                || cold.clone(),
                |mut allocator| {
                    let offers = allocator.allocate(black_box(expired_at));
                    (allocator, offers)
                },
                BatchSize::PerIteration,
            )
        });

        let mut warm = cold;
        assert!(warm.allocate(now).is_empty(), "everything is filtered");
        group.bench_function(format!("declined/warm/{shape}"), |b| {
            b.iter(|| warm.allocate(black_box(now)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
