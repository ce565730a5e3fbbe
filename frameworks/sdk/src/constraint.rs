//! Placement constraints on agent attributes, checked against offers:
//! `zone == a`, `rack != r3`, `isolation == container`, `level == 3`.
//!
//! Agents advertise attributes (`corral agent --attributes "rack:r1;zone:a"`)
//! plus `isolation` (`container`, or `none` for an agent started with
//! `--isolation=none`), and every offer carries them. A framework that must
//! not run on plain processes requires `isolation == container`.

use std::fmt;
use std::str::FromStr;

use corral_proto::attributes::value_text;
use corral_proto::pb;

/// The attribute every agent advertises to say how it isolates tasks.
pub const ISOLATION_ATTRIBUTE: &str = "isolation";

#[derive(Debug, Clone, PartialEq)]
pub enum Operator {
    Eq,
    Ne,
}

/// One constraint on an agent attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub attribute: String,
    pub operator: Operator,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("constraint '{text}': {reason}")]
pub struct ConstraintError {
    pub text: String,
    pub reason: &'static str,
}

impl Constraint {
    pub fn eq(attribute: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            attribute: attribute.into(),
            operator: Operator::Eq,
            value: value.into(),
        }
    }

    /// Only agents that run tasks as isolated containers.
    pub fn isolated() -> Self {
        Self::eq(ISOLATION_ATTRIBUTE, "container")
    }

    /// True when the offer's agent satisfies the constraint. An attribute the
    /// agent does not have never equals anything (and so is always `!=`).
    pub fn matches(&self, offer: &pb::Offer) -> bool {
        let value = offer
            .attributes
            .iter()
            .find(|a| a.name == self.attribute)
            .map(value_text);
        let equal = value.is_some_and(|v| same_value(&v, &self.value));
        match self.operator {
            Operator::Eq => equal,
            Operator::Ne => !equal,
        }
    }
}

/// Text compares exactly; numbers compare as numbers (`3` == `3.0`).
fn same_value(have: &str, want: &str) -> bool {
    match (have.parse::<f64>(), want.parse::<f64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => have == want,
    }
}

/// True when every constraint matches.
pub fn all_match(constraints: &[Constraint], offer: &pb::Offer) -> bool {
    constraints.iter().all(|c| c.matches(offer))
}

impl FromStr for Constraint {
    type Err = ConstraintError;

    /// `ATTRIBUTE == VALUE` or `ATTRIBUTE != VALUE`; the value may be quoted.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason| ConstraintError {
            text: text.to_string(),
            reason,
        };
        let (attribute, operator, value) = if let Some((a, v)) = text.split_once("==") {
            (a, Operator::Eq, v)
        } else if let Some((a, v)) = text.split_once("!=") {
            (a, Operator::Ne, v)
        } else {
            return Err(err("expected ATTRIBUTE == VALUE or ATTRIBUTE != VALUE"));
        };
        let attribute = attribute.trim();
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if attribute.is_empty() || attribute.contains(char::is_whitespace) {
            return Err(err("the attribute name must be one word"));
        }
        if value.is_empty() {
            return Err(err("the value must not be empty"));
        }
        Ok(Self {
            attribute: attribute.to_string(),
            operator,
            value: value.to_string(),
        })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.operator {
            Operator::Eq => "==",
            Operator::Ne => "!=",
        };
        write!(f, "{} {op} {}", self.attribute, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(attrs: &str) -> pb::Offer {
        pb::Offer {
            attributes: corral_proto::attributes::parse(attrs).unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn equality_and_inequality_on_text_and_numbers() {
        let o = offer("zone:a;level:3;isolation:container");
        assert!("zone == a".parse::<Constraint>().unwrap().matches(&o));
        assert!("zone == \"a\"".parse::<Constraint>().unwrap().matches(&o));
        assert!(!"zone == b".parse::<Constraint>().unwrap().matches(&o));
        assert!("zone != b".parse::<Constraint>().unwrap().matches(&o));
        assert!("level == 3.0".parse::<Constraint>().unwrap().matches(&o));
        assert!(Constraint::isolated().matches(&o));
        assert!(!Constraint::isolated().matches(&offer("isolation:none")));
    }

    #[test]
    fn a_missing_attribute_never_equals() {
        let o = offer("zone:a");
        assert!(!"rack == r1".parse::<Constraint>().unwrap().matches(&o));
        assert!("rack != r1".parse::<Constraint>().unwrap().matches(&o));
    }

    #[test]
    fn malformed_constraints_are_rejected() {
        for bad in ["zone", "zone ==", "== a", "my zone == a"] {
            assert!(bad.parse::<Constraint>().is_err(), "{bad}");
        }
    }
}
