//! Task state helpers shared by master, agent and frameworks.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::pb::{Reason, TaskState};

/// True for states a task never leaves (Mesos `protobuf::isTerminalState`).
/// UNREACHABLE and UNKNOWN are not terminal: the task may come back.
pub fn is_terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::TaskFinished
            | TaskState::TaskFailed
            | TaskState::TaskKilled
            | TaskState::TaskError
            | TaskState::TaskLost
            | TaskState::TaskDropped
            | TaskState::TaskGone
            | TaskState::TaskGoneByOperator
    )
}

/// `TASK_RUNNING`, as the protobuf names it; used in CLI output and metric labels.
pub fn state_name(state: TaskState) -> &'static str {
    state.as_str_name()
}

/// `INVALID_OFFERS` for `REASON_INVALID_OFFERS`; empty for unspecified.
pub fn reason_name(reason: Reason) -> &'static str {
    match reason {
        Reason::Unspecified => "",
        other => {
            let name = other.as_str_name();
            name.strip_prefix("REASON_").unwrap_or(name)
        }
    }
}

/// Seconds since the Unix epoch, as carried in `TaskStatus.timestamp`.
pub fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_is_not_terminal_but_lost_is() {
        assert!(!is_terminal(TaskState::TaskUnreachable));
        assert!(!is_terminal(TaskState::TaskRunning));
        assert!(is_terminal(TaskState::TaskLost));
        assert!(is_terminal(TaskState::TaskFinished));
    }

    #[test]
    fn names_match_the_documented_spelling() {
        assert_eq!(state_name(TaskState::TaskRunning), "TASK_RUNNING");
        assert_eq!(reason_name(Reason::InvalidOffers), "INVALID_OFFERS");
        assert_eq!(reason_name(Reason::Unspecified), "");
    }
}
