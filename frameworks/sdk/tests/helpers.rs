//! `TaskBuilder` and `OfferResources`: pure helpers, no master needed.

use std::time::Duration;

use corral_sdk::pb::{self, resource::Value};
use corral_sdk::{OfferResources, RangeSet, Resources, TaskBuilder, TaskId};

fn offer(resources: &str) -> pb::Offer {
    pb::Offer {
        id: "o1".into(),
        framework_id: "fw-1".into(),
        agent_id: "agent-1".into(),
        hostname: "host-1".into(),
        resources: Resources::parse(resources)
            .expect("valid resources")
            .to_proto(),
        ..Default::default()
    }
}

fn task_id(id: &str) -> TaskId {
    TaskId::parse(id, "task_id").expect("valid id")
}

fn scalar(task: &pb::TaskInfo, name: &str) -> Option<f64> {
    task.resources
        .iter()
        .find_map(|r| match (&r.value, r.name == name) {
            (Some(Value::Scalar(v)), true) => Some(*v),
            _ => None,
        })
}

#[test]
fn task_builder_fills_in_every_field_and_places_the_task_on_the_offer_agent() {
    let task = TaskBuilder::new(task_id("hello-0"))
        .name("hello")
        .shell("echo hello from $CORRAL_TASK_ID")
        .env("GREETING", "hi")
        .cpus(0.1)
        .mem(32.0)
        .disk(64.0)
        .kill_grace(Duration::from_millis(2500))
        .label("team", "infra")
        .build_for(&offer("cpus:1;mem:128"));

    assert_eq!(task.task_id, "hello-0");
    assert_eq!(task.name, "hello");
    assert_eq!(task.agent_id, "agent-1");
    let command = task.command.as_ref().expect("command");
    assert!(command.shell);
    assert_eq!(command.value, "echo hello from $CORRAL_TASK_ID");
    assert!(command.arguments.is_empty());
    assert_eq!(command.environment["GREETING"], "hi");
    assert_eq!(scalar(&task, "cpus"), Some(0.1));
    assert_eq!(scalar(&task, "mem"), Some(32.0));
    assert_eq!(scalar(&task, "disk"), Some(64.0));
    assert_eq!(task.kill_grace_period_seconds, Some(2.5));
    assert_eq!(task.labels["team"], "infra");
}

#[test]
fn task_builder_defaults_the_name_to_the_id_and_leaves_unset_resources_out() {
    let task = TaskBuilder::new(task_id("t1"))
        .command(["/bin/echo", "a", "b"])
        .mem(16.0)
        .build_for(&offer("mem:16"));
    assert_eq!(task.name, "t1");
    let command = task.command.as_ref().expect("command");
    assert!(!command.shell);
    assert_eq!(command.value, "/bin/echo");
    assert_eq!(command.arguments, ["/bin/echo", "a", "b"]);
    assert_eq!(scalar(&task, "mem"), Some(16.0));
    assert_eq!(scalar(&task, "cpus"), None);
    assert!(task.kill_grace_period_seconds.is_none());
}

#[test]
fn task_builder_resources_round_trip_exactly() {
    let want = Resources::parse("cpus:0.3;mem:48;ports:[31000-31001]").expect("valid");
    let builder = TaskBuilder::new(task_id("t1"))
        .shell("true")
        .resources(&want);
    assert_eq!(builder.try_resources().expect("valid"), want);
    let task = builder.build_for(&offer("cpus:1"));
    assert_eq!(
        Resources::from_proto(&task.resources, "task.resources").expect("valid"),
        want
    );
}

#[test]
fn task_builder_reports_amounts_the_master_would_refuse() {
    let err = TaskBuilder::new(task_id("t1"))
        .cpus(-1.0)
        .try_resources()
        .expect_err("negative cpus");
    assert_eq!(err.field, "task.resources.cpus");
}

#[test]
fn carving_takes_exact_amounts_until_the_offer_is_used_up() {
    let mut left = OfferResources::from_offer(&offer("cpus:0.3;mem:100")).expect("valid offer");
    assert_eq!(left.offer_id().as_str(), "o1");
    assert_eq!(left.agent_id().as_str(), "agent-1");
    let per_task = Resources::parse("cpus:0.1;mem:32").expect("valid");
    let mut fitted = 0;
    while fitted < 10 && left.try_take(&per_task) {
        fitted += 1;
    }
    // 0.1 three times is exactly 0.3: no float drift leaves a sliver short.
    assert_eq!(fitted, 3);
    assert_eq!(left.remaining(), &Resources::parse("mem:4").expect("valid"));
}

#[test]
fn carving_what_does_not_fit_takes_nothing() {
    let mut left = OfferResources::from_offer(&offer("cpus:1;mem:16")).expect("valid offer");
    let before = left.remaining().clone();
    let too_big = Resources::parse("cpus:0.5;mem:32").expect("valid");
    assert!(!left.fits(&too_big));
    assert!(!left.try_take(&too_big));
    assert_eq!(left.remaining(), &before);
}

#[test]
fn take_ports_takes_the_lowest_ports_across_ranges() {
    let mut left =
        OfferResources::from_offer(&offer("ports:[31000-31001,31005-31010]")).expect("valid offer");
    let taken = left.take_ports(4).expect("enough ports");
    assert_eq!(
        taken,
        RangeSet::from_ranges([(31000, 31001), (31005, 31006)])
    );
    assert_eq!(
        left.remaining().ports,
        RangeSet::from_ranges([(31007, 31010)])
    );
    assert_eq!(left.take_ports(5), None, "only 4 left");
    assert_eq!(
        left.remaining().ports.count(),
        4,
        "a failed take takes nothing"
    );
    assert_eq!(left.take_ports(0), Some(RangeSet::new()));
}

#[test]
fn invalid_offers_are_rejected_with_the_field_named() {
    let mut bad = offer("cpus:1");
    bad.resources.push(pb::Resource {
        name: "mem".into(),
        value: Some(Value::Scalar(f64::NAN)),
    });
    let err = OfferResources::from_offer(&bad).expect_err("NaN mem");
    assert_eq!(err.field, "offer.resources.mem");

    let mut bad = offer("cpus:1");
    bad.agent_id = String::new();
    let err = OfferResources::from_offer(&bad).expect_err("no agent id");
    assert_eq!(err.field, "offer.agent_id");
}
