//! Carving tasks out of one offer with exact arithmetic.

use corral_proto::pb;
use corral_proto::{AgentId, OfferId, RangeSet, ResourceError, Resources};

/// What is left of one offer while a scheduler packs tasks into it.
///
/// ```
/// # use corral_sdk::{OfferResources, Resources};
/// # fn demo(offer: &corral_sdk::pb::Offer) -> Result<(), corral_sdk::ResourceError> {
/// let mut left = OfferResources::from_offer(offer)?;
/// let per_task = Resources::parse("cpus:0.1;mem:32")?;
/// let mut fitted = 0;
/// while fitted < 10 && left.try_take(&per_task) {
///     fitted += 1;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct OfferResources {
    offer_id: OfferId,
    agent_id: AgentId,
    remaining: Resources,
}

impl OfferResources {
    /// Validates the offer's ids and resources (errors name `offer.*`).
    pub fn from_offer(offer: &pb::Offer) -> Result<Self, ResourceError> {
        let id_error = |e: corral_proto::IdError| ResourceError {
            field: e.field,
            reason: e.reason.to_string(),
        };
        Ok(Self {
            offer_id: OfferId::parse(&offer.id, "offer.id").map_err(id_error)?,
            agent_id: AgentId::parse(&offer.agent_id, "offer.agent_id").map_err(id_error)?,
            remaining: Resources::from_proto(&offer.resources, "offer.resources")?,
        })
    }

    pub fn offer_id(&self) -> &OfferId {
        &self.offer_id
    }

    pub fn agent_id(&self) -> &AgentId {
        &self.agent_id
    }

    /// What has not been taken yet.
    pub fn remaining(&self) -> &Resources {
        &self.remaining
    }

    /// True when `want` fits in what is left.
    pub fn fits(&self, want: &Resources) -> bool {
        self.remaining.contains(want)
    }

    /// Takes `want` if it fits entirely; otherwise takes nothing.
    pub fn try_take(&mut self, want: &Resources) -> bool {
        match self.remaining.checked_sub(want) {
            Some(rest) => {
                self.remaining = rest;
                true
            }
            None => false,
        }
    }

    /// Takes the `n` lowest remaining ports (possibly from several ranges),
    /// or nothing when fewer than `n` are left.
    pub fn take_ports(&mut self, n: u64) -> Option<RangeSet> {
        if self.remaining.ports.count() < n {
            return None;
        }
        let mut taken = RangeSet::new();
        let mut needed = n;
        for &(begin, end) in self.remaining.ports.ranges() {
            if needed == 0 {
                break;
            }
            let len = end - begin + 1;
            let take = len.min(needed);
            taken.insert(begin, begin + take - 1);
            needed -= take;
        }
        self.remaining.ports.remove(&taken);
        Some(taken)
    }
}

/// Why `need` fits none of `offered`, one `needs NAME WANT, largest offer had
/// HAVE` per scalar that no offer has enough of (empty: some offer has
/// enough of each). For a framework's "why is this not placed" message.
pub fn shortfall(need: &Resources, offered: &[Resources]) -> Vec<String> {
    let mut short = Vec::new();
    for (name, want) in need.scalars() {
        let best = offered
            .iter()
            .filter_map(|r| r.scalar(name))
            .max()
            .unwrap_or_default();
        if want > best {
            short.push(format!(
                "needs {name} {}, largest offer had {}",
                want.as_f64(),
                best.as_f64()
            ));
        }
    }
    short
}
