//! Id newtypes, validated on entry.
//!
//! An id becomes part of paths (`<work-dir>/sandboxes/<framework>/<task>/`),
//! metric labels and log lines, so the rules are strict: non-empty, at most
//! 255 bytes, no `/`, no NUL or other control characters, not `.` or `..`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest id accepted, in bytes (a path component on Linux is at most 255).
pub const MAX_ID_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct IdError {
    pub field: String,
    pub reason: &'static str,
}

/// Checks the id rules; `field` names the offending field in the error.
pub fn validate_id(value: &str, field: &str) -> Result<(), IdError> {
    let reason = if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > MAX_ID_LEN {
        Some("must be at most 255 bytes")
    } else if value == "." || value == ".." {
        Some("must not be '.' or '..'")
    } else if value.contains('/') {
        Some("must not contain '/'")
    } else if value.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(IdError {
            field: field.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `value`; `field` names it in the error.
            pub fn parse(value: &str, field: &str) -> Result<Self, IdError> {
                validate_id(value, field)?;
                Ok(Self(value.to_string()))
            }

            /// For ids this process generates itself (always valid).
            pub fn generated(value: String) -> Self {
                debug_assert!(validate_id(&value, "generated").is_ok());
                Self(value)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// An agent, assigned by the master at first registration.
    AgentId
);
id_type!(
    /// A framework, assigned by the master at first subscription.
    FrameworkId
);
id_type!(
    /// A task, chosen by its framework; unique within the framework.
    TaskId
);
id_type!(
    /// An offer, assigned by the master.
    OfferId
);
id_type!(
    /// A persistent volume, chosen by its framework; unique within the
    /// framework. Names the volume's directory on its agent.
    VolumeId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_path_are_rejected() {
        for bad in ["", ".", "..", "a/b", "a\0b", "tab\t", &"x".repeat(256)] {
            let err = TaskId::parse(bad, "task.task_id").unwrap_err();
            assert_eq!(err.field, "task.task_id");
        }
        assert!(TaskId::parse("task-1.a_b", "t").is_ok());
        assert!(TaskId::parse(&"x".repeat(255), "t").is_ok());
    }

    #[test]
    fn error_names_the_field() {
        let err = AgentId::parse("", "kill.agent_id").unwrap_err();
        assert_eq!(err.to_string(), "kill.agent_id: must not be empty");
    }
}
