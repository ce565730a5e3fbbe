use super::*;

const T0: f64 = 1_767_225_600.0; // 2026-01-01T00:00:00Z

fn job(name: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_string(),
        shell: "true".to_string(),
        cpus: 0.1,
        mem_mib: 16.0,
        ..Default::default()
    }
}

fn offer(id: &str, agent: &str, cpus: f64, mem: f64) -> pb::Offer {
    pb::Offer {
        id: id.to_string(),
        agent_id: agent.to_string(),
        resources: Resources::parse(&format!("cpus:{cpus};mem:{mem}"))
            .unwrap()
            .to_proto(),
        ..Default::default()
    }
}

fn status(task_id: &str, state: pb::TaskState) -> pb::TaskStatus {
    pb::TaskStatus {
        task_id: task_id.to_string(),
        state: state as i32,
        agent_id: "a1".to_string(),
        ..Default::default()
    }
}

fn failed(task_id: &str, exit: i32) -> pb::TaskStatus {
    pb::TaskStatus {
        reason: pb::Reason::CommandFailed as i32,
        message: format!("command exited with status {exit}"),
        exit_code: Some(exit),
        ..status(task_id, pb::TaskState::TaskFailed)
    }
}

fn launched_ids(plan: &Plan) -> Vec<String> {
    plan.launches
        .iter()
        .flat_map(|(_, tasks)| tasks.iter().map(|t| t.task_id.clone()))
        .collect()
}

fn state(jobs: &Jobs, name: &str) -> pb::JobState {
    pb::JobState::try_from(jobs.summary(name).unwrap().state).unwrap()
}

/// Offers a big agent until nothing is pending, finishing every launched
/// task with `finish(task_id)`; returns how often each index ran.
fn run_to_completion(
    jobs: &mut Jobs,
    now: &mut f64,
    mut finish: impl FnMut(&str) -> pb::TaskStatus,
) -> BTreeMap<String, u32> {
    let mut ran = BTreeMap::new();
    for round in 0..10_000 {
        *now += 0.5;
        jobs.tick(*now);
        let plan = jobs.place(&[offer(&format!("o{round}"), "a1", 2.0, 1024.0)], *now);
        for id in launched_ids(&plan) {
            let (name, run, index, _) = parse_task_id(&id).unwrap();
            *ran.entry(format!("{name}.{run}.{index}")).or_default() += 1;
            jobs.update(&status(&id, pb::TaskState::TaskRunning), *now);
            let end = finish(&id);
            jobs.update(&end, *now);
        }
        if !jobs.has_pending() && jobs.next_wakeup().is_none() {
            break;
        }
    }
    ran
}

#[test]
fn an_array_job_runs_each_index_exactly_once() {
    let mut jobs = Jobs::new();
    let mut now = T0;
    jobs.submit(
        pb::JobSpec {
            count: 50,
            ..job("array")
        },
        now,
    )
    .unwrap();
    assert_eq!(state(&jobs, "array"), pb::JobState::Pending);
    let ran = run_to_completion(&mut jobs, &mut now, |id| {
        status(id, pb::TaskState::TaskFinished)
    });
    assert_eq!(ran.len(), 50);
    assert!(ran.values().all(|&n| n == 1), "{ran:?}");
    assert_eq!(state(&jobs, "array"), pb::JobState::Succeeded);
    let counts = jobs.summary("array").unwrap().counts.unwrap();
    assert_eq!(counts.succeeded, 50);
}

#[test]
fn tasks_get_their_index_count_and_deadline() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            count: 3,
            deadline_seconds: 2.0,
            ..job("env")
        },
        T0,
    )
    .unwrap();
    let plan = jobs.place(&[offer("o1", "a1", 2.0, 1024.0)], T0);
    let tasks = &plan.launches[0].1;
    assert_eq!(tasks.len(), 3);
    for (i, t) in tasks.iter().enumerate() {
        let env = &t.command.as_ref().unwrap().environment;
        assert_eq!(env[ENV_INDEX], i.to_string());
        assert_eq!(env[ENV_COUNT], "3");
        assert_eq!(t.agent_id, "a1");
        assert_eq!(t.max_completion_time_seconds, Some(2.0));
        assert_eq!(t.task_id, format!("env.1.{i}.1"));
    }
}

#[test]
fn offers_are_packed_by_priority_then_submission_order() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            count: 3,
            ..job("low")
        },
        T0,
    )
    .unwrap();
    jobs.submit(
        pb::JobSpec {
            count: 2,
            priority: 5,
            ..job("high")
        },
        T0,
    )
    .unwrap();
    // Room for 4 tasks of 0.1 cpus: both `high` first, then two of `low`.
    let plan = jobs.place(&[offer("o1", "a1", 0.4, 1024.0)], T0);
    assert_eq!(
        launched_ids(&plan),
        ["high.1.0.1", "high.1.1.1", "low.1.0.1", "low.1.1.1"]
    );
    assert!(plan.declines.is_empty());
    // Nothing fits in a tiny offer: it is declined; so is one whose
    // resources cannot be read.
    let mut broken = offer("o3", "a1", 1.0, 1024.0);
    broken.resources[0].value = Some(pb::resource::Value::Scalar(f64::NAN));
    let plan = jobs.place(&[offer("o2", "a1", 0.05, 1024.0), broken], T0);
    assert!(plan.launches.is_empty());
    assert_eq!(plan.declines.len(), 2);
}

#[test]
fn unplaceable_tasks_say_why() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            mem_mib: 4096.0,
            ..job("big")
        },
        T0,
    )
    .unwrap();
    jobs.place(&[offer("o1", "a1", 2.0, 2048.0)], T0);
    let status = jobs.status("big", true).unwrap();
    assert_eq!(status.message, "needs mem 4096, largest offer had 2048");

    jobs.submit(
        pb::JobSpec {
            constraints: vec!["zone == a".into()],
            ..job("zoned")
        },
        T0,
    )
    .unwrap();
    jobs.place(&[offer("o2", "a1", 2.0, 2048.0)], T0);
    assert!(
        jobs.status("zoned", true)
            .unwrap()
            .message
            .contains("zone == a"),
        "{:?}",
        jobs.status("zoned", true).unwrap().message
    );
}

#[test]
fn a_failing_task_is_retried_with_backoff_then_fails_the_job() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            retries: 2,
            retry_backoff_seconds: 10.0,
            ..job("flaky")
        },
        T0,
    )
    .unwrap();
    let o = || [offer("o", "a1", 2.0, 1024.0)];
    let mut launch_times = Vec::new();
    let mut now = T0;
    for _ in 0..200 {
        jobs.tick(now);
        let plan = jobs.place(&o(), now);
        for id in launched_ids(&plan) {
            launch_times.push(now);
            jobs.update(&failed(&id, 3), now);
        }
        now += 1.0;
    }
    // First attempt at once, then after 10 s and 20 s (doubling).
    assert_eq!(launch_times, [T0, T0 + 10.0, T0 + 30.0]);
    assert_eq!(state(&jobs, "flaky"), pb::JobState::Failed);
    let status = jobs.status("flaky", true).unwrap();
    assert_eq!(
        status.message,
        "index 0 failed after 3 attempts: TASK_FAILED (COMMAND_FAILED): command exited with status 3"
    );
    assert_eq!(status.runs[0].tasks[0].attempts.len(), 3);
    assert_eq!(status.runs[0].tasks[0].attempts[2].exit_code, Some(3));
}

#[test]
fn one_index_out_of_retries_kills_the_rest_of_the_run() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            count: 3,
            ..job("ff")
        },
        T0,
    )
    .unwrap();
    let plan = jobs.place(&[offer("o", "a1", 2.0, 1024.0)], T0);
    let ids = launched_ids(&plan);
    let effects = jobs.update(&failed(&ids[0], 1), T0);
    let killed: Vec<String> = effects
        .iter()
        .map(|Effect::Kill { task_id, .. }| task_id.to_string())
        .collect();
    assert_eq!(killed, [ids[1].clone(), ids[2].clone()]);
    assert_eq!(state(&jobs, "ff"), pb::JobState::Failed);
    jobs.update(&status(&ids[1], pb::TaskState::TaskKilled), T0);
    let counts = jobs.summary("ff").unwrap().counts.unwrap();
    assert_eq!((counts.failed, counts.cancelled, counts.running), (1, 1, 1));
}

#[test]
fn dependencies_order_jobs_and_a_failure_fails_dependants() {
    let mut jobs = Jobs::new();
    let mut now = T0;
    jobs.submit(job("first"), now).unwrap();
    jobs.submit(
        pb::JobSpec {
            after: vec!["first".into()],
            ..job("second")
        },
        now,
    )
    .unwrap();
    jobs.submit(
        pb::JobSpec {
            after: vec!["second".into()],
            ..job("third")
        },
        now,
    )
    .unwrap();
    assert_eq!(state(&jobs, "second"), pb::JobState::Waiting);
    let mut order = Vec::new();
    run_to_completion(&mut jobs, &mut now, |id| {
        order.push(parse_task_id(id).unwrap().0.to_string());
        status(id, pb::TaskState::TaskFinished)
    });
    assert_eq!(order, ["first", "second", "third"]);

    jobs.submit(job("breaks"), now).unwrap();
    jobs.submit(
        pb::JobSpec {
            after: vec!["breaks".into()],
            ..job("child")
        },
        now,
    )
    .unwrap();
    jobs.submit(
        pb::JobSpec {
            after: vec!["child".into()],
            ..job("grandchild")
        },
        now,
    )
    .unwrap();
    run_to_completion(&mut jobs, &mut now, |id| failed(id, 1));
    assert_eq!(state(&jobs, "breaks"), pb::JobState::Failed);
    assert_eq!(state(&jobs, "child"), pb::JobState::Failed);
    assert_eq!(state(&jobs, "grandchild"), pb::JobState::Failed);
    assert_eq!(
        jobs.status("child", true).unwrap().message,
        "dependency breaks did not succeed"
    );
    // A dependant submitted after its dependency failed fails at once.
    jobs.submit(
        pb::JobSpec {
            after: vec!["breaks".into()],
            ..job("late")
        },
        now,
    )
    .unwrap();
    assert_eq!(state(&jobs, "late"), pb::JobState::Failed);
}

#[test]
fn submission_refuses_unknown_dependencies_and_duplicate_names() {
    let mut jobs = Jobs::new();
    let e = jobs
        .submit(
            pb::JobSpec {
                after: vec!["ghost".into()],
                ..job("x")
            },
            T0,
        )
        .unwrap_err();
    assert_eq!(e.to_string(), "job.after[0]: no job named ghost");
    jobs.submit(job("x"), T0).unwrap();
    assert_eq!(
        jobs.submit(job("x"), T0).unwrap_err(),
        JobsError::Exists("x".into())
    );
    let generated = jobs
        .submit(
            pb::JobSpec {
                name: String::new(),
                ..job("")
            },
            T0,
        )
        .unwrap();
    assert!(generated.starts_with("job-"), "{generated}");
}

#[test]
fn a_cron_job_fires_at_its_times() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            schedule: "*/10 * * * *".into(),
            ..job("cron")
        },
        T0 + 1.0,
    )
    .unwrap();
    assert_eq!(state(&jobs, "cron"), pb::JobState::Scheduled);
    assert_eq!(jobs.next_wakeup(), Some(T0 + 600.0));
    let mut fired = Vec::new();
    let mut now = T0;
    while now <= T0 + 3600.0 {
        jobs.tick(now);
        for id in launched_ids(&jobs.place(&[offer("o", "a1", 2.0, 1024.0)], now)) {
            fired.push(now - T0);
            jobs.update(&status(&id, pb::TaskState::TaskFinished), now);
        }
        now += 30.0;
    }
    assert_eq!(fired, [600.0, 1200.0, 1800.0, 2400.0, 3000.0, 3600.0]);
    assert_eq!(jobs.summary("cron").unwrap().runs, 6);
    assert_eq!(state(&jobs, "cron"), pb::JobState::Scheduled);
}

#[test]
fn forbid_skips_a_firing_while_a_run_is_active_and_replace_cancels_it() {
    let mut jobs = Jobs::new();
    for (name, policy) in [
        ("forbid", pb::ConcurrencyPolicy::Forbid),
        ("replace", pb::ConcurrencyPolicy::Replace),
        ("allow", pb::ConcurrencyPolicy::Allow),
    ] {
        jobs.submit(
            pb::JobSpec {
                schedule: "* * * * *".into(),
                concurrency: policy as i32,
                ..job(name)
            },
            T0,
        )
        .unwrap();
    }
    // Each job's first run starts and never ends.
    jobs.tick(T0 + 60.0);
    let first = launched_ids(&jobs.place(&[offer("o1", "a1", 2.0, 1024.0)], T0 + 60.0));
    assert_eq!(first.len(), 3);
    for id in &first {
        jobs.update(&status(id, pb::TaskState::TaskRunning), T0 + 60.0);
    }
    let effects = jobs.tick(T0 + 120.0);
    let second = launched_ids(&jobs.place(&[offer("o2", "a1", 2.0, 1024.0)], T0 + 120.0));
    assert_eq!(second, ["replace.2.0.1", "allow.2.0.1"]);
    assert_eq!(jobs.status("forbid", true).unwrap().skipped_runs, 1);
    assert_eq!(
        effects,
        [Effect::Kill {
            task_id: TaskId::parse("replace.1.0.1", "t").unwrap(),
            agent_id: Some(AgentId::parse("a1", "a").unwrap()),
        }]
    );
    let runs = jobs.status("replace", true).unwrap().runs;
    assert_eq!(runs[0].state, pb::JobState::Cancelled as i32);
    assert_eq!(runs[0].message, "replaced by a newer run");
}

#[test]
fn cancel_kills_running_tasks_and_stops_pending_ones() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            count: 4,
            ..job("c")
        },
        T0,
    )
    .unwrap();
    jobs.submit(
        pb::JobSpec {
            after: vec!["c".into()],
            ..job("after-c")
        },
        T0,
    )
    .unwrap();
    let ids = launched_ids(&jobs.place(&[offer("o", "a1", 0.2, 1024.0)], T0));
    assert_eq!(ids.len(), 2);
    let effects = jobs.cancel("c", T0).unwrap();
    assert_eq!(effects.len(), 2);
    assert!(!jobs.has_pending());
    for id in &ids {
        jobs.update(&status(id, pb::TaskState::TaskKilled), T0);
    }
    assert_eq!(state(&jobs, "c"), pb::JobState::Cancelled);
    assert_eq!(jobs.summary("c").unwrap().counts.unwrap().cancelled, 4);
    assert_eq!(state(&jobs, "after-c"), pb::JobState::Failed);
    assert_eq!(
        jobs.cancel("nope", T0),
        Err(JobsError::NotFound("nope".into()))
    );
}

#[test]
fn updates_are_idempotent_and_strays_are_killed() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            retries: 1,
            ..job("i")
        },
        T0,
    )
    .unwrap();
    let ids = launched_ids(&jobs.place(&[offer("o", "a1", 2.0, 1024.0)], T0));
    jobs.take_changes();
    jobs.update(&status(&ids[0], pb::TaskState::TaskFinished), T0);
    assert!(!jobs.take_changes().is_empty());
    // The same final update again (a resend, or reconciliation) changes nothing.
    jobs.update(&status(&ids[0], pb::TaskState::TaskFinished), T0);
    jobs.update(&failed(&ids[0], 1), T0);
    assert!(jobs.take_changes().is_empty());
    assert_eq!(state(&jobs, "i"), pb::JobState::Succeeded);
    // A running task nobody knows about is killed.
    let effects = jobs.update(&status("ghost.1.0.1", pb::TaskState::TaskRunning), T0);
    assert_eq!(effects.len(), 1);
    assert!(
        jobs.update(&status("not-ours", pb::TaskState::TaskRunning), T0)
            .is_empty()
    );
}

#[test]
fn a_launch_that_never_ran_is_relaunched_without_using_a_retry() {
    let mut jobs = Jobs::new();
    jobs.submit(job("u"), T0).unwrap();
    let ids = launched_ids(&jobs.place(&[offer("o", "a1", 2.0, 1024.0)], T0));
    jobs.update(&status(&ids[0], pb::TaskState::TaskUnknown), T0);
    assert!(jobs.has_pending());
    let again = launched_ids(&jobs.place(&[offer("o2", "a1", 2.0, 1024.0)], T0));
    assert_eq!(again, ["u.1.0.2"]);
    jobs.update(&status(&again[0], pb::TaskState::TaskFinished), T0);
    assert_eq!(state(&jobs, "u"), pb::JobState::Succeeded);
}

#[test]
fn restore_rebuilds_jobs_from_their_records() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            count: 3,
            retries: 1,
            ..job("r")
        },
        T0,
    )
    .unwrap();
    let ids = launched_ids(&jobs.place(&[offer("o", "a1", 0.2, 1024.0)], T0));
    jobs.update(&status(&ids[0], pb::TaskState::TaskFinished), T0);
    jobs.update(&failed(&ids[1], 1), T0);

    // Replay the change log into "stored" records, as the store would.
    let mut specs = BTreeMap::new();
    let mut metas = BTreeMap::new();
    let mut slots = BTreeMap::new();
    for change in jobs.take_changes() {
        match change {
            Change::Spec(n, s) => {
                specs.insert(n, s);
            }
            Change::Job(n, m) => {
                metas.insert(n, m);
            }
            Change::Slot(k, s) => {
                slots.insert(k, s);
            }
        }
    }
    let records = vec![(
        *specs["r"].clone().unwrap(),
        metas["r"].clone().unwrap(),
        slots
            .into_iter()
            .filter_map(|((_, run, index), s)| s.map(|s| ((run, index), s)))
            .collect(),
    )];
    let mut restored = Jobs::new();
    assert!(restored.restore(records).is_empty());
    assert_eq!(restored.status("r", true), jobs.status("r", true));
    assert_eq!(restored.launched(), jobs.launched());
    assert_eq!(restored.next_wakeup(), jobs.next_wakeup());
    // Index 2 is still pending; index 1 retries after its backoff.
    let plan = restored.place(&[offer("o2", "a1", 2.0, 1024.0)], T0);
    assert_eq!(launched_ids(&plan), ["r.1.2.1"]);
    restored.tick(T0 + 1.0);
    let plan = restored.place(&[offer("o3", "a1", 2.0, 1024.0)], T0 + 1.0);
    assert_eq!(launched_ids(&plan), ["r.1.1.2"]);
}

#[test]
fn cron_history_is_bounded() {
    let mut jobs = Jobs::new();
    jobs.submit(
        pb::JobSpec {
            schedule: "* * * * *".into(),
            ..job("h")
        },
        T0,
    )
    .unwrap();
    for minute in 1..=25 {
        let now = T0 + 60.0 * f64::from(minute);
        jobs.tick(now);
        for id in launched_ids(&jobs.place(&[offer("o", "a1", 2.0, 1024.0)], now)) {
            jobs.update(&status(&id, pb::TaskState::TaskFinished), now);
        }
    }
    let status = jobs.status("h", true).unwrap();
    assert_eq!(status.runs.len(), RUN_HISTORY);
    assert_eq!(status.runs.last().unwrap().run, 25);
    assert_eq!(status.summary.unwrap().runs, 25);
}

#[test]
fn only_finished_jobs_nobody_waits_for_can_be_deleted() {
    let mut jobs = Jobs::new();
    jobs.submit(job("base"), T0).unwrap();
    jobs.submit(
        pb::JobSpec {
            after: vec!["base".into()],
            ..job("child")
        },
        T0,
    )
    .unwrap();
    assert_eq!(
        jobs.delete("base").unwrap_err().to_string(),
        "job base is pending; cancel it first"
    );
    let ids = launched_ids(&jobs.place(&[offer("o", "a1", 2.0, 1024.0)], T0));
    jobs.update(&status(&ids[0], pb::TaskState::TaskFinished), T0);
    // `child` is pending now (its run started), so nothing waits for `base`.
    jobs.cancel("child", T0).unwrap();
    jobs.take_changes();
    jobs.delete("base").unwrap();
    assert!(jobs.summary("base").is_none());
    let deleted = jobs.take_changes();
    assert_eq!(deleted.len(), 3, "one slot, the job record and the spec");
    assert!(deleted.iter().all(|c| matches!(
        c,
        Change::Slot(_, None) | Change::Job(_, None) | Change::Spec(_, None)
    )));
    // The name is free again.
    jobs.submit(job("base"), T0).unwrap();
    assert_eq!(jobs.delete("nope"), Err(JobsError::NotFound("nope".into())));
}
