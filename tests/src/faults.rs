//! Fault injection between an agent and the master: drop, delay or
//! duplicate chosen messages (the agent's `link_faults` hook), so a
//! scenario happens exactly, instead of by timing. Cutting and stalling
//! whole connections is [`crate::Proxy`]'s job.
//!
//! ```ignore
//! let faults = FaultPlan::new();
//! // The first RUNNING update of task "t" never reaches the master.
//! faults.rule_to_master(1, Fault::Drop, move |m| is_update(m, "t", TaskState::TaskRunning));
//! config.link_faults = Some(faults.clone());
//! ```

use std::sync::{Arc, Mutex};

use corral_agent::{Fault, LinkFaults};
use corral_proto::pb::{self, agent_message, master_message};

type Matcher<M> = Box<dyn Fn(&M) -> bool + Send + Sync>;

struct Rule<M> {
    matches: Matcher<M>,
    fault: Fault,
    /// How many more messages it applies to.
    left: usize,
    /// How many it applied to.
    hits: usize,
}

impl<M> Rule<M> {
    fn new(n: usize, fault: Fault, matches: impl Fn(&M) -> bool + Send + Sync + 'static) -> Self {
        Self {
            matches: Box::new(matches),
            fault,
            left: n,
            hits: 0,
        }
    }
}

#[derive(Default)]
struct Rules {
    to_master: Vec<Rule<pb::AgentMessage>>,
    from_master: Vec<Rule<pb::MasterMessage>>,
}

/// Rules, each for the next `n` matching messages in one direction; the
/// first rule that matches a message decides its fate.
#[derive(Clone, Default)]
pub struct FaultPlan(Arc<Mutex<Rules>>);

impl std::fmt::Debug for FaultPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FaultPlan")
    }
}

fn decide<M>(rules: &mut [Rule<M>], message: &M) -> Fault {
    for rule in rules.iter_mut() {
        if rule.left > 0 && (rule.matches)(message) {
            rule.left -= 1;
            rule.hits += 1;
            return rule.fault;
        }
    }
    Fault::Pass
}

impl FaultPlan {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `fault` to the next `n` messages from the agent that match.
    pub fn rule_to_master(
        &self,
        n: usize,
        fault: Fault,
        matches: impl Fn(&pb::AgentMessage) -> bool + Send + Sync + 'static,
    ) {
        self.rules().to_master.push(Rule::new(n, fault, matches));
    }

    /// Applies `fault` to the next `n` messages to the agent that match.
    pub fn rule_to_agent(
        &self,
        n: usize,
        fault: Fault,
        matches: impl Fn(&pb::MasterMessage) -> bool + Send + Sync + 'static,
    ) {
        self.rules().from_master.push(Rule::new(n, fault, matches));
    }

    /// How many messages each rule applied to, rules to the master first,
    /// in the order they were added.
    pub fn hits(&self) -> Vec<usize> {
        let rules = self.rules();
        rules
            .to_master
            .iter()
            .map(|r| r.hits)
            .chain(rules.from_master.iter().map(|r| r.hits))
            .collect()
    }
}

impl LinkFaults for FaultPlan {
    fn agent_to_master(&self, message: &pb::AgentMessage) -> Fault {
        decide(&mut self.rules().to_master, message)
    }

    fn master_to_agent(&self, message: &pb::MasterMessage) -> Fault {
        decide(&mut self.rules().from_master, message)
    }
}

/// A status update of `task_id` in `state`, from the agent.
pub fn is_update(message: &pb::AgentMessage, task_id: &str, state: pb::TaskState) -> bool {
    matches!(&message.message, Some(agent_message::Message::StatusUpdate(u))
        if u.status.as_ref().is_some_and(|s| s.task_id == task_id && s.state() == state))
}

/// A `TaskEnded` notice of `task_id`, from the agent.
pub fn is_task_ended(message: &pb::AgentMessage, task_id: &str) -> bool {
    matches!(&message.message, Some(agent_message::Message::TaskEnded(e)) if e.task_id == task_id)
}

/// An acknowledgement of an update of `task_id`, to the agent.
pub fn is_ack(message: &pb::MasterMessage, task_id: &str) -> bool {
    matches!(&message.message, Some(master_message::Message::Acknowledgement(a)) if a.task_id == task_id)
}

/// A kill of `task_id`, to the agent.
pub fn is_kill(message: &pb::MasterMessage, task_id: &str) -> bool {
    matches!(&message.message, Some(master_message::Message::KillTask(k)) if k.task_id == task_id)
}
