//! Following the leading master: the list of masters a client was given,
//! the leader hint a standby answers with, and the epoch fence that keeps a
//! deposed leader from acting.
//!
//! Agents, frameworks (the SDK) and the CLI take `--master h1:5050,h2:5050`.
//! They try the masters in turn; a standby answers UNAVAILABLE with the
//! leader's address in the [`LEADER_METADATA`] response header, and the
//! client goes there next. Every message from a master carries the leader's
//! epoch; [`EpochFence`] remembers the highest one seen per registry and
//! refuses anything lower.

/// Response metadata in which a standby names the leader (`host:port`).
pub const LEADER_METADATA: &str = "corral-leader";

/// Clients send HTTP/2 pings to a master that has sent nothing for this
/// long, and drop the connection when one goes unanswered for
/// [`KEEP_ALIVE_TIMEOUT`]. A frozen master (a paused process, a hung host)
/// accepts connections in the kernel but never answers: this notices it,
/// even before it would have said `Registered` or `Subscribed`.
pub const KEEP_ALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
pub const KEEP_ALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Parses `h1:5050,h2:5050` (spaces allowed, an `http://` prefix kept).
/// Errors name what is wrong; duplicates are dropped.
pub fn parse_masters(text: &str) -> Result<Vec<String>, String> {
    let mut masters: Vec<String> = Vec::new();
    for (i, part) in text.split(',').enumerate() {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("master {}: empty address in {text:?}", i + 1));
        }
        if part.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("master {}: {part:?} contains whitespace", i + 1));
        }
        if !masters.iter().any(|m| m == part) {
            masters.push(part.to_string());
        }
    }
    Ok(masters)
}

/// The leader a standby named in `status`, if any.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    let value = status.metadata().get(LEADER_METADATA)?.to_str().ok()?;
    let value = value.trim();
    (!value.is_empty()).then(|| value.to_string())
}

/// The masters a client may talk to, and which to try next: the leader a
/// standby named, else the next one in the list, round robin.
#[derive(Debug, Clone)]
pub struct MasterList {
    masters: Vec<String>,
    next: usize,
    hint: Option<String>,
    /// Standby answers in a row.
    redirects: usize,
}

impl MasterList {
    /// `masters` must not be empty (see [`parse_masters`]).
    pub fn new(masters: Vec<String>) -> Self {
        assert!(!masters.is_empty(), "a master list needs a master");
        Self {
            masters,
            next: 0,
            hint: None,
            redirects: 0,
        }
    }

    /// Where to connect now. A hint is used once: if the named leader does
    /// not answer either, the list is tried again.
    pub fn next_target(&mut self) -> String {
        if let Some(hint) = self.hint.take() {
            return hint;
        }
        let target = self.masters[self.next % self.masters.len()].clone();
        self.next = (self.next + 1) % self.masters.len();
        target
    }

    /// A standby answered, naming the leader if it knows one (tried next).
    /// True: try again at once. After two rounds of the list without
    /// reaching a leader, false: back off, so standbys that name each
    /// other (or a leader nobody reaches) cannot make a busy loop.
    pub fn not_leader(&mut self, leader: Option<String>) -> bool {
        if leader.is_some() {
            self.hint = leader;
        }
        self.redirects += 1;
        if self.redirects > 2 * self.masters.len() {
            self.redirects = 0;
            return false;
        }
        true
    }

    /// An attempt ended some other way (a master answered, or none did):
    /// the count of standby answers in a row starts over.
    pub fn reached(&mut self) {
        self.redirects = 0;
    }

    /// The connection to `target` worked: a client that loses it tries
    /// that master again first (a master restart keeps its address).
    pub fn connected(&mut self, target: &str) {
        self.redirects = 0;
        match self.masters.iter().position(|m| m == target) {
            Some(i) => self.next = i,
            None => self.hint = Some(target.to_string()),
        }
    }
}

/// A message from a master whose epoch is lower than one already seen from
/// the same registry: it comes from a deposed leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleEpoch {
    pub epoch: u64,
    pub highest: u64,
}

impl std::fmt::Display for StaleEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "leader epoch {} is older than {}, already seen: a deposed leader",
            self.epoch, self.highest
        )
    }
}

/// The highest leader epoch seen, per registry (a fencing token check).
#[derive(Debug, Clone, Default)]
pub struct EpochFence {
    registry_id: String,
    highest: u64,
}

impl EpochFence {
    pub fn new() -> Self {
        Self::default()
    }

    /// A master accepted this client (`Registered`, `Subscribed`). A new
    /// registry (another cluster, or a store recreated from scratch) starts
    /// the fence over; within one registry the epoch must not go back.
    pub fn admit_leader(&mut self, registry_id: &str, epoch: u64) -> Result<(), StaleEpoch> {
        if registry_id != self.registry_id {
            self.registry_id = registry_id.to_string();
            self.highest = epoch;
            return Ok(());
        }
        self.admit(epoch)
    }

    /// Any other message: an epoch below the highest one seen is refused; a
    /// higher one is remembered.
    pub fn admit(&mut self, epoch: u64) -> Result<(), StaleEpoch> {
        if epoch < self.highest {
            return Err(StaleEpoch {
                epoch,
                highest: self.highest,
            });
        }
        self.highest = epoch;
        Ok(())
    }

    pub fn highest(&self) -> u64 {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_lists_parse_and_name_the_bad_entry() {
        assert_eq!(
            parse_masters(" a:1, b:2 ,a:1").unwrap(),
            vec!["a:1".to_string(), "b:2".to_string()]
        );
        let e = parse_masters("a:1,,b:2").unwrap_err();
        assert!(e.contains("master 2: empty"), "{e}");
        assert!(parse_masters("").is_err());
    }

    #[test]
    fn a_hint_is_tried_once_then_the_list_round_robin() {
        let mut l = MasterList::new(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(l.next_target(), "a");
        assert!(l.not_leader(Some("c".into())));
        assert_eq!(l.next_target(), "c");
        assert_eq!(l.next_target(), "b");
        assert_eq!(l.next_target(), "c");
        assert_eq!(l.next_target(), "a");
        l.connected("b");
        assert_eq!(l.next_target(), "b");
        l.connected("elsewhere:1");
        assert_eq!(l.next_target(), "elsewhere:1");
        assert_eq!(l.next_target(), "c");
    }

    #[test]
    fn standby_answers_in_a_row_are_bounded_to_two_rounds_of_the_list() {
        let mut l = MasterList::new(vec!["a".into(), "b".into()]);
        let at_once: Vec<bool> = (0..5).map(|_| l.not_leader(None)).collect();
        assert_eq!(at_once, [true, true, true, true, false]);
        assert!(l.not_leader(None), "counting starts over after a back-off");
        l.reached();
        assert!((0..4).all(|_| l.not_leader(None)));
    }

    #[test]
    fn the_fence_refuses_lower_epochs_of_the_same_registry_only() {
        let mut f = EpochFence::new();
        f.admit_leader("r1", 5).unwrap();
        f.admit(5).unwrap();
        f.admit(7).unwrap();
        assert_eq!(
            f.admit(6),
            Err(StaleEpoch {
                epoch: 6,
                highest: 7
            })
        );
        assert!(f.admit_leader("r1", 6).is_err());
        // A recreated registry starts over.
        f.admit_leader("r2", 1).unwrap();
        assert_eq!(f.highest(), 1);
    }

    #[test]
    fn a_standby_hint_is_read_from_the_metadata() {
        let mut s = tonic::Status::unavailable("not the leader");
        assert_eq!(leader_hint(&s), None);
        s.metadata_mut()
            .insert(LEADER_METADATA, "10.0.0.2:5050".parse().unwrap());
        assert_eq!(leader_hint(&s).as_deref(), Some("10.0.0.2:5050"));
    }
}
