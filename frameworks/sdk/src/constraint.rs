//! Placement constraints on agent attributes, checked against offers:
//! `zone == a`, `rack != r3`, `isolation == container`, `level == 3`,
//! `rack like r-[12]`, `rack unlike r-9.*`, `hostname unique`,
//! `zone max_per 2`.
//!
//! Agents advertise attributes (`corral agent --attributes "rack:r1;zone:a"`)
//! plus `isolation` (`container`, or `none` for an agent started with
//! `--isolation=none`), and every offer carries them. A framework that must
//! not run on plain processes requires `isolation == container`. The
//! attribute name `hostname` means the offer's `hostname` field, as in
//! Marathon, so `hostname unique` needs no attribute on the agents.
//!
//! The operators follow Marathon's (`UNIQUE`, `LIKE`, `UNLIKE`, `MAX_PER`;
//! keywords are case-insensitive):
//!
//! | text | admits an offer when |
//! |---|---|
//! | `A == V` | the agent's `A` equals `V` (numbers compare as numbers) |
//! | `A != V` | it does not, or the agent has no `A` |
//! | `A like RE` | `A`'s value matches the regular expression `RE` as a whole |
//! | `A unlike RE` | it does not, or the agent has no `A` |
//! | `A unique` | no instance placed so far has the offer's value of `A` |
//! | `A max_per N` | fewer than `N` instances placed so far have the offer's value of `A` |
//!
//! `unique` and `max_per` depend on where the other instances of the same
//! service run, which one offer does not tell: they are answered by
//! [`Constraint::admits`], given the [`Placement`]s of the instances already
//! placed. The other four look at the offer alone. An agent without the
//! attribute only satisfies `!=` and `unlike` (Marathon's rule for missing
//! attributes); in particular it is never admitted by `unique` or `max_per`,
//! which could not count it against anything.

use std::fmt;
use std::str::FromStr;

use corral_proto::attributes::value_text;
use corral_proto::pb;
use regex::{Regex, RegexBuilder};

/// The attribute every agent advertises to say how it isolates tasks.
pub const ISOLATION_ATTRIBUTE: &str = "isolation";
/// The attribute name that means the offer's hostname, not an attribute.
pub const HOSTNAME_ATTRIBUTE: &str = "hostname";
/// Longest regular expression accepted: constraints come from users, and a
/// pattern is compiled for every spec that carries it.
const MAX_PATTERN_LEN: usize = 1024;
/// Compiled-size cap for a pattern (the `regex` crate's own default is
/// 10 MiB, far more than any attribute pattern needs).
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// What a constraint asks of the attribute. The operand of `like`/`unlike`
/// and `max_per` is carried here, parsed; [`Constraint::value`] keeps the
/// text as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Operator {
    Eq,
    Ne,
    /// The value matches the pattern as a whole.
    Like(Pattern),
    /// The value does not match the pattern, or the agent has no value.
    Unlike(Pattern),
    /// At most one instance per distinct value.
    Unique,
    /// At most this many instances per distinct value; at least 1.
    MaxPer(u32),
}

/// A regular expression that must match a whole attribute value (Marathon's
/// `LIKE` is a full match: `r-[12]` does not admit `r-10`).
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

impl Pattern {
    /// Compiles `source`, anchored at both ends.
    pub fn new(source: &str) -> Result<Self, String> {
        if source.len() > MAX_PATTERN_LEN {
            return Err(format!(
                "the regular expression must be at most {MAX_PATTERN_LEN} bytes"
            ));
        }
        let regex = RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(PATTERN_SIZE_LIMIT)
            .build()
            .map_err(|e| match e {
                regex::Error::Syntax(text) => format!(
                    "'{source}' is not a regular expression: {}",
                    // The syntax error is several lines with a caret under
                    // the anchored pattern; its last line says what is wrong.
                    text.lines()
                        .last()
                        .unwrap_or("syntax error")
                        .trim()
                        .trim_start_matches("error: ")
                ),
                regex::Error::CompiledTooBig(_) => {
                    format!("the regular expression '{source}' is too large")
                }
                other => format!("'{source}' is not a regular expression: {other}"),
            })?;
        Ok(Self {
            source: source.to_string(),
            regex,
        })
    }

    /// The expression as written (without the anchors).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_full_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

/// Two patterns are the same constraint when they were written the same.
impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// One constraint on an agent attribute (or on `hostname`).
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub attribute: String,
    pub operator: Operator,
    /// The operand as written: the value of `==`/`!=`, the regular
    /// expression of `like`/`unlike`, `N` of `max_per`, empty for `unique`.
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("constraint '{text}': {reason}")]
pub struct ConstraintError {
    pub text: String,
    pub reason: String,
}

/// Where one instance has been placed, as far as constraints care: its
/// agent's hostname and attributes. Build it from the offer the instance
/// was launched from, or from the agent's info.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub hostname: &'a str,
    pub attributes: &'a [pb::Attribute],
}

impl<'a> Placement<'a> {
    pub fn new(hostname: &'a str, attributes: &'a [pb::Attribute]) -> Self {
        Self {
            hostname,
            attributes,
        }
    }

    /// The value constraints see for `attribute`: the hostname for
    /// `hostname`, else the attribute's text (scalars as numbers).
    fn value(&self, attribute: &str) -> Option<String> {
        if attribute == HOSTNAME_ATTRIBUTE {
            return (!self.hostname.is_empty()).then(|| self.hostname.to_string());
        }
        self.attributes
            .iter()
            .find(|a| a.name == attribute)
            .map(value_text)
    }
}

impl<'a> From<&'a pb::Offer> for Placement<'a> {
    fn from(offer: &'a pb::Offer) -> Self {
        Self::new(&offer.hostname, &offer.attributes)
    }
}

impl<'a> From<&'a pb::AgentInfo> for Placement<'a> {
    fn from(agent: &'a pb::AgentInfo) -> Self {
        Self::new(&agent.hostname, &agent.attributes)
    }
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

    /// At most one instance per value of `attribute`.
    pub fn unique(attribute: impl Into<String>) -> Self {
        Self {
            attribute: attribute.into(),
            operator: Operator::Unique,
            value: String::new(),
        }
    }

    /// True when the answer depends on where other instances run
    /// (`unique`, `max_per`), so [`Constraint::admits`] needs the
    /// placements. A framework that launches single, unrelated tasks can
    /// refuse such constraints up front instead of answering them as if
    /// nothing had been placed.
    pub fn depends_on_placements(&self) -> bool {
        matches!(self.operator, Operator::Unique | Operator::MaxPer(_))
    }

    /// True when the offer's agent satisfies the constraint, given where
    /// the other instances of the same service already run: `placed` holds
    /// one entry per instance (two instances on one agent are two entries),
    /// including instances launched earlier from the same batch of offers.
    /// Only `unique` and `max_per` look at `placed`.
    pub fn admits(&self, offer: &pb::Offer, placed: &[Placement<'_>]) -> bool {
        let value = Placement::from(offer).value(&self.attribute);
        match (&self.operator, value) {
            (Operator::Eq, Some(v)) => same_value(&v, &self.value),
            (Operator::Ne, Some(v)) => !same_value(&v, &self.value),
            (Operator::Like(p), Some(v)) => p.is_full_match(&v),
            (Operator::Unlike(p), Some(v)) => !p.is_full_match(&v),
            (Operator::Unique, Some(v)) => !placed.iter().any(|p| self.placed_at(p, &v)),
            (Operator::MaxPer(max), Some(v)) => {
                // Counting stops at `max`, so a long list costs no more
                // than it must.
                let at = placed
                    .iter()
                    .filter(|p| self.placed_at(p, &v))
                    .take(*max as usize)
                    .count();
                at < *max as usize
            }
            (Operator::Ne | Operator::Unlike(_), None) => true,
            (Operator::Eq | Operator::Like(_) | Operator::Unique | Operator::MaxPer(_), None) => {
                false
            }
        }
    }

    fn placed_at(&self, placement: &Placement<'_>, value: &str) -> bool {
        placement
            .value(&self.attribute)
            .is_some_and(|v| same_value(&v, value))
    }

    /// True when the offer's agent satisfies the constraint on its own:
    /// [`Constraint::admits`] with nothing placed yet. Right for a single
    /// task; a framework placing several instances of one thing must call
    /// `admits` for `unique` and `max_per` to mean anything.
    pub fn matches(&self, offer: &pb::Offer) -> bool {
        self.admits(offer, &[])
    }
}

/// Text compares exactly; numbers compare as numbers (`3` == `3.0`).
fn same_value(have: &str, want: &str) -> bool {
    match (have.parse::<f64>(), want.parse::<f64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => have == want,
    }
}

/// True when every constraint matches the offer on its own (see
/// [`Constraint::matches`]).
pub fn all_match(constraints: &[Constraint], offer: &pb::Offer) -> bool {
    constraints.iter().all(|c| c.matches(offer))
}

/// True when every constraint admits the offer given the instances already
/// placed (see [`Constraint::admits`]).
pub fn all_admit(constraints: &[Constraint], offer: &pb::Offer, placed: &[Placement<'_>]) -> bool {
    constraints.iter().all(|c| c.admits(offer, placed))
}

fn unquote(text: &str) -> &str {
    text.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(text)
}

impl FromStr for Constraint {
    type Err = ConstraintError;

    /// `ATTRIBUTE == VALUE`, `ATTRIBUTE != VALUE`, `ATTRIBUTE like REGEX`,
    /// `ATTRIBUTE unlike REGEX`, `ATTRIBUTE unique` or
    /// `ATTRIBUTE max_per N`; values and patterns may be quoted.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ConstraintError {
            text: text.to_string(),
            reason,
        };
        let trimmed = text.trim();
        // The keyword forms are `WORD KEYWORD [OPERAND]`. Anything else is
        // tried as `==`/`!=`, which need no spaces (`zone==a`).
        let (first, rest) = trimmed
            .split_once(char::is_whitespace)
            .map_or((trimmed, ""), |(a, r)| (a, r.trim_start()));
        let (keyword, operand) = rest
            .split_once(char::is_whitespace)
            .map_or((rest, ""), |(k, o)| (k, o.trim()));
        let keyword = keyword.to_ascii_lowercase();
        let keyword_form = matches!(keyword.as_str(), "unique" | "like" | "unlike" | "max_per");
        if keyword_form {
            check_attribute(first).map_err(|r| err(r.to_string()))?;
        }
        let operand = unquote(operand);
        let (attribute, operator, value) = match keyword.as_str() {
            "unique" => {
                if !operand.is_empty() {
                    return Err(err(format!("unique takes no operand, found '{operand}'")));
                }
                (first, Operator::Unique, "")
            }
            "like" | "unlike" => {
                if operand.is_empty() {
                    return Err(err(format!("{keyword} needs a regular expression")));
                }
                let pattern = Pattern::new(operand).map_err(err)?;
                let operator = if keyword == "like" {
                    Operator::Like(pattern)
                } else {
                    Operator::Unlike(pattern)
                };
                (first, operator, operand)
            }
            "max_per" => {
                let max = operand
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| {
                        err(format!(
                            "max_per needs a whole number >= 1, found '{operand}'"
                        ))
                    })?;
                (first, Operator::MaxPer(max), operand)
            }
            _ => {
                let (attribute, operator, value) = if let Some((a, v)) = trimmed.split_once("==") {
                    (a, Operator::Eq, v)
                } else if let Some((a, v)) = trimmed.split_once("!=") {
                    (a, Operator::Ne, v)
                } else {
                    return Err(err("expected ATTRIBUTE == VALUE, ATTRIBUTE != VALUE, \
                             ATTRIBUTE like REGEX, ATTRIBUTE unlike REGEX, ATTRIBUTE unique \
                             or ATTRIBUTE max_per N"
                        .to_string()));
                };
                let attribute = attribute.trim();
                check_attribute(attribute).map_err(|r| err(r.to_string()))?;
                let value = unquote(value.trim());
                if value.is_empty() {
                    return Err(err("the value must not be empty".to_string()));
                }
                (attribute, operator, value)
            }
        };
        Ok(Self {
            attribute: attribute.to_string(),
            operator,
            value: value.to_string(),
        })
    }
}

fn check_attribute(attribute: &str) -> Result<(), &'static str> {
    if attribute.is_empty()
        || attribute.contains(char::is_whitespace)
        || attribute.contains(['=', '!', '"'])
    {
        return Err("the attribute name must be one word");
    }
    Ok(())
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let attribute = &self.attribute;
        match &self.operator {
            Operator::Eq => write!(f, "{attribute} == {}", self.value),
            Operator::Ne => write!(f, "{attribute} != {}", self.value),
            Operator::Like(p) => write!(f, "{attribute} like {}", p.as_str()),
            Operator::Unlike(p) => write!(f, "{attribute} unlike {}", p.as_str()),
            Operator::Unique => write!(f, "{attribute} unique"),
            Operator::MaxPer(n) => write!(f, "{attribute} max_per {n}"),
        }
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

    fn on_host(hostname: &str, attrs: &str) -> pb::Offer {
        pb::Offer {
            hostname: hostname.to_string(),
            ..offer(attrs)
        }
    }

    fn c(text: &str) -> Constraint {
        text.parse().unwrap()
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
        for bad in [
            "zone",
            "zone ==",
            "== a",
            "my zone == a",
            "zone unique a",
            "zone like",
            "zone like \"\"",
            "zone like r-[",
            "zone max_per",
            "zone max_per 0",
            "zone max_per -1",
            "zone max_per two",
            "zone==a unique",
            "unique",
        ] {
            assert!(bad.parse::<Constraint>().is_err(), "{bad}");
        }
        let e = "rack like r-[".parse::<Constraint>().unwrap_err();
        assert!(e.reason.contains("not a regular expression"), "{e}");
    }

    #[test]
    fn keyword_constraints_parse_and_print_back() {
        for (text, printed) in [
            ("hostname unique", "hostname unique"),
            ("hostname UNIQUE", "hostname unique"),
            ("rack like r-[12]", "rack like r-[12]"),
            ("rack LIKE \"r-[12]\"", "rack like r-[12]"),
            ("rack unlike r-9.*", "rack unlike r-9.*"),
            ("zone max_per 2", "zone max_per 2"),
            ("zone MAX_PER 2", "zone max_per 2"),
            ("zone==a", "zone == a"),
        ] {
            assert_eq!(c(text).to_string(), printed, "{text}");
            // What Display prints parses to the same constraint.
            assert_eq!(c(printed), c(text), "{text}");
        }
        assert_eq!(c("zone max_per 2").operator, Operator::MaxPer(2));
        assert_eq!(c("zone max_per 2").value, "2");
        assert_eq!(c("hostname unique"), Constraint::unique("hostname"));
        assert!(c("hostname unique").depends_on_placements());
        assert!(c("zone max_per 2").depends_on_placements());
        assert!(!c("rack like r.*").depends_on_placements());
        assert!(!c("zone == a").depends_on_placements());
    }

    #[test]
    fn like_is_a_full_match_and_unlike_its_negation() {
        let like = c("rack like r-[12]");
        let unlike = c("rack unlike r-[12]");
        for (rack, full) in [
            ("r-1", true),
            ("r-2", true),
            ("r-10", false),
            ("xr-1", false),
        ] {
            let o = offer(&format!("rack:{rack}"));
            assert_eq!(like.matches(&o), full, "like {rack}");
            assert_eq!(unlike.matches(&o), !full, "unlike {rack}");
        }
        // Scalars match on their text form.
        assert!(c("level like [0-9]+").matches(&offer("level:42")));
        // A missing attribute is never like anything, so it is always unlike.
        assert!(!like.matches(&offer("zone:a")));
        assert!(unlike.matches(&offer("zone:a")));
        // An alternation is anchored as a whole, not just its first branch.
        assert!(!c("rack like a|b").matches(&offer("rack:ab")));
        assert!(c("rack like a|b").matches(&offer("rack:b")));
    }

    #[test]
    fn hostname_is_the_offers_hostname() {
        let o = on_host("node-1", "zone:a");
        assert!(c("hostname == node-1").matches(&o));
        assert!(c("hostname like node-[0-9]").matches(&o));
        assert!(!c("hostname == node-2").matches(&o));
        // An offer without a hostname has no value to be unique by.
        assert!(!c("hostname unique").admits(&offer("zone:a"), &[]));
    }

    #[test]
    fn hostname_unique_admits_one_instance_per_host() {
        let unique = c("hostname unique");
        let a = on_host("a", "zone:z1");
        let b = on_host("b", "zone:z1");
        assert!(unique.admits(&a, &[]));
        assert!(unique.admits(&a, &[Placement::from(&b)]));
        assert!(!unique.admits(&a, &[Placement::from(&b), Placement::from(&a)]));
        let agent = pb::AgentInfo {
            hostname: "a".into(),
            ..Default::default()
        };
        assert!(!unique.admits(&a, &[Placement::from(&agent)]));
    }

    #[test]
    fn attribute_unique_counts_values_not_hosts() {
        let unique = c("zone unique");
        let a1 = on_host("a1", "zone:a");
        let a2 = on_host("a2", "zone:a");
        let b1 = on_host("b1", "zone:b");
        let bare = on_host("x", "rack:r1");
        assert!(!unique.admits(&a2, &[Placement::from(&a1)]));
        assert!(unique.admits(&b1, &[Placement::from(&a1)]));
        // Instances on agents without the attribute count for no value...
        assert!(unique.admits(&a1, &[Placement::from(&bare)]));
        // ...and an agent without it cannot be admitted at all.
        assert!(!unique.admits(&bare, &[]));
        // Numeric values compare as numbers.
        let l3 = offer("level:3");
        let placed = [Placement::new("h", l3.attributes.as_slice())];
        assert!(!c("level unique").admits(&offer("level:3.0"), &placed));
    }

    #[test]
    fn max_per_admits_up_to_n_instances_per_value() {
        let max2 = c("zone max_per 2");
        let a1 = on_host("a1", "zone:a");
        let a2 = on_host("a2", "zone:a");
        let b1 = on_host("b1", "zone:b");
        let one_in_a = [Placement::from(&a1)];
        let two_in_a = [Placement::from(&a1), Placement::from(&a2)];
        assert!(max2.admits(&a2, &[]));
        assert!(max2.admits(&a2, &one_in_a));
        assert!(!max2.admits(&a2, &two_in_a));
        assert!(!max2.admits(&a1, &two_in_a));
        assert!(max2.admits(&b1, &two_in_a));
        // Two instances on the same agent are two placements.
        assert!(!max2.admits(&a1, &[Placement::from(&a1), Placement::from(&a1)]));
        assert!(!max2.admits(&offer("rack:r1"), &[]));
    }

    #[test]
    fn all_admit_needs_every_constraint() {
        let constraints = [c("hostname unique"), c("zone == a"), c("rack like r-[12]")];
        let good = on_host("h1", "zone:a;rack:r-1");
        let other_host = on_host("h2", "zone:a;rack:r-2");
        assert!(all_admit(&constraints, &good, &[]));
        assert!(all_admit(
            &constraints,
            &other_host,
            &[Placement::from(&good)]
        ));
        assert!(!all_admit(&constraints, &good, &[Placement::from(&good)]));
        assert!(!all_admit(
            &constraints,
            &on_host("h3", "zone:a;rack:r-3"),
            &[]
        ));
        assert!(all_match(&constraints, &good));
    }
}
