//! Persistent volume slots (Marathon's resident instances, a StatefulSet's
//! volume claims): where a persistent service's instances may run, which
//! volumes a launch creates, and destroying them once the service is gone.
//! Part of the pure core: the same rules (no I/O, "now" as an argument).

use super::*;

/// One persistent volume of a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotVolume {
    /// The spec's claim it is for.
    pub claim: String,
    /// `CLAIM-SERVICE-SLOT`: unique in the framework.
    pub id: String,
    /// MiB.
    pub size: Amount,
}

impl SlotVolume {
    pub(super) fn new_volume(&self) -> Result<NewVolume, corral_proto::IdError> {
        Ok(NewVolume {
            id: VolumeId::parse(&self.id, "volume_id")?,
            size: self.size,
        })
    }
}

/// A set of persistent volumes, one per claim of the service's pod, on one
/// agent: where one instance of a persistent service runs. Stored one
/// record each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub number: u32,
    pub agent_id: String,
    pub hostname: String,
    /// The agent's attributes as `(name, text)` when the slot was made:
    /// where the data lives, for operators (constraints are checked then
    /// and count the slot's instance afterwards).
    pub attributes: Vec<(String, String)>,
    pub volumes: Vec<SlotVolume>,
    /// The volumes are known to exist (an offer listed them, or a pod on
    /// them reached the agent). Until then a launch on the slot creates the
    /// ones its offer does not list, and a launch the master refused takes
    /// the slot with it.
    pub created: bool,
}

impl Slot {
    /// The slot's volumes `offer` does not list (as free volumes of the
    /// framework on its agent).
    pub(super) fn unlisted(&self, offer: &pb::Offer) -> Vec<&SlotVolume> {
        self.volumes
            .iter()
            .filter(|v| !offer.volumes.iter().any(|o| o.id == v.id))
            .collect()
    }
}

/// A failed volume destroy waiting for its retry (kept in memory only: after
/// a restart every destroy is simply tried again).
#[derive(Debug, Clone, Default)]
pub(super) struct Retry {
    pub(super) in_flight: bool,
    pub(super) failures: u32,
    pub(super) next_at: f64,
}

/// The persistent volumes a template's pod claims, `(claim, size)` in the
/// spec's order; empty for a task or a pod without any.
pub(super) fn claims(template: &Template) -> Vec<(String, Amount)> {
    let Template::Pod(pod) = template else {
        return Vec::new();
    };
    pod.volumes
        .iter()
        .filter_map(|v| match &v.source {
            VolumeSource::Persistent { claim, size } => Some((claim.clone(), *size)),
            _ => None,
        })
        .collect()
}

/// A new version must claim the volumes the service's slots hold: the data
/// lives in them, and a slot of other volumes would be a different service.
pub(super) fn check_claims(entry: &Entry, service: &Service) -> Result<(), CoreError> {
    let Some(slot) = entry.slots.values().next() else {
        return Ok(());
    };
    let mut have: Vec<(String, Amount)> = slot
        .volumes
        .iter()
        .map(|v| (v.claim.clone(), v.size))
        .collect();
    let mut want = claims(&service.template);
    have.sort();
    want.sort();
    if have == want {
        return Ok(());
    }
    let text: Vec<String> = have
        .iter()
        .map(|(claim, size)| format!("{claim} ({size} MiB)"))
        .collect();
    Err(CoreError::Invalid(SpecError::new(
        "service.pod.volumes",
        format!(
            "the persistent volumes cannot change while the service has them ({}): \
             delete the service to drop them and their data",
            text.join(", ")
        ),
    )))
}

/// `need` plus the disk of the volumes to create.
pub(super) fn with_disk(need: &Resources, create: &[NewVolume]) -> Resources {
    let mut total = need.clone();
    for v in create {
        total.disk += v.size;
    }
    total
}

pub(super) fn creates(volumes: &[&SlotVolume]) -> Result<Vec<NewVolume>, corral_proto::IdError> {
    volumes.iter().map(|v| v.new_volume()).collect()
}

/// The first room on `slot`'s agent that takes an instance: the pod's
/// resources fit, and its offer lists the slot's volumes (for a slot not
/// known to exist, the ones it does not list are created: their disk must
/// fit too). Else why not.
pub(super) fn slot_room(
    slot: &Slot,
    need: &Resources,
    rooms: &[Room<'_>],
) -> Result<(usize, Vec<NewVolume>, OfferResources), String> {
    let agent = format!("agent {} ({})", slot.agent_id, slot.hostname);
    let mut why = None;
    for (i, room) in rooms.iter().enumerate() {
        if room.offer.agent_id != slot.agent_id {
            continue;
        }
        let unlisted = slot.unlisted(room.offer);
        if slot.created && !unlisted.is_empty() {
            let ids: Vec<&str> = unlisted.iter().map(|v| v.id.as_str()).collect();
            why = Some(format!(
                "{agent} offered without the persistent volumes {} (still in use?)",
                ids.join(", ")
            ));
            continue;
        }
        let create = creates(&unlisted).map_err(|e| format!("slot {}: {e}", slot.number))?;
        let total = with_disk(need, &create);
        let mut left = room.left.clone();
        if left.try_take(&total) {
            return Ok((i, create, left));
        }
        why = Some(format!(
            "{agent}, which holds its persistent volumes, offered too little: {}",
            shortfall(&total, std::slice::from_ref(room.left.remaining())).join("; ")
        ));
    }
    Err(why.unwrap_or_else(|| format!("waiting for {agent}, which holds its persistent volumes")))
}

impl Entry {
    /// Slots no instance that has not ended holds, lowest first.
    pub(super) fn free_slots(&self) -> Vec<u32> {
        let held: BTreeSet<u32> = self
            .instances
            .values()
            .filter(|i| !i.all_ended())
            .filter_map(|i| i.slot)
            .collect();
        self.slots
            .keys()
            .copied()
            .filter(|k| !held.contains(k))
            .collect()
    }
}

impl Services {
    /// Slots whose volumes an offer lists exist: remember it.
    pub(super) fn note_listed_volumes(&mut self, offers: &[pb::Offer]) {
        let mut seen = Vec::new();
        for (name, entry) in &self.entries {
            for (k, slot) in &entry.slots {
                let listed = || {
                    offers
                        .iter()
                        .any(|o| o.agent_id == slot.agent_id && slot.unlisted(o).is_empty())
                };
                if !slot.created && listed() {
                    seen.push((name.clone(), *k));
                }
            }
        }
        for (name, k) in seen {
            self.slot_created(&name, k);
        }
    }

    pub(super) fn slot_created(&mut self, name: &str, k: u32) {
        let Some(slot) = self.entries.get_mut(name).and_then(|e| e.slots.get_mut(&k)) else {
            return;
        };
        if !slot.created {
            slot.created = true;
            self.slot_changed(name, k);
        }
    }

    /// Places up to `want` instances of a service with persistent volumes,
    /// each on a slot (see the module doc); the reason when some could not
    /// be.
    pub(super) fn place_persistent(
        &mut self,
        name: &str,
        want: u32,
        service: &Service,
        claims: &[(String, Amount)],
        rooms: &mut [Room<'_>],
        now: f64,
    ) -> Option<String> {
        let need = template_resources(&service.template);
        for placed in 0..want {
            let not_placed =
                |why: String| Some(format!("{} instance(s) not placed: {why}", want - placed));
            let choice = match self.pick_slot(name, service, &need, claims, rooms) {
                Ok(choice) => choice,
                Err(why) => return not_placed(why),
            };
            let room = &mut rooms[choice.room];
            let at = Placed {
                offer: room.offer,
                host_ports: corral_proto::RangeSet::new(),
                slot: Some(choice.slot),
                create: choice.create,
            };
            match self.launch_instance(name, service, at, now) {
                Ok(launch) => {
                    room.left = choice.left;
                    room.launches.push(launch);
                }
                Err(e) => return not_placed(e.to_string()),
            }
        }
        None
    }

    /// The slot and offer for one more instance of a persistent service: a
    /// free slot on its agent's offer, else a new slot where the
    /// constraints admit it (recorded here). Why not, when neither.
    pub(super) fn pick_slot(
        &mut self,
        name: &str,
        service: &Service,
        need: &Resources,
        claims: &[(String, Amount)],
        rooms: &[Room<'_>],
    ) -> Result<Choice, String> {
        let entry = &self.entries[name];
        let free = entry.free_slots();
        if !free.is_empty() {
            let mut why = None;
            for k in free {
                match slot_room(&entry.slots[&k], need, rooms) {
                    Ok((room, create, left)) => {
                        if create.is_empty() {
                            self.slot_created(name, k);
                        }
                        return Ok(Choice {
                            room,
                            slot: k,
                            create,
                            left,
                        });
                    }
                    Err(w) => {
                        why.get_or_insert(w);
                    }
                }
            }
            return Err(why.unwrap_or_default());
        }
        if entry.slots.len() >= entry.meta.instances as usize {
            return Err(
                "waiting for instances being stopped to release their persistent volumes".into(),
            );
        }
        // The lowest number not in use: a slot forgotten after a refused
        // launch leaves a gap that the next new slot fills.
        let count = u32::try_from(entry.slots.len()).unwrap_or(u32::MAX);
        let number = (0..=count)
            .find(|k| !entry.slots.contains_key(k))
            .unwrap_or(count);
        let volumes: Vec<SlotVolume> = claims
            .iter()
            .map(|(claim, size)| SlotVolume {
                claim: claim.clone(),
                id: format!("{claim}-{name}-{number}"),
                size: *size,
            })
            .collect();
        for v in &volumes {
            VolumeId::parse(&v.id, "volume_id")
                .map_err(|e| format!("cannot name persistent volume {}: {e}", v.id))?;
            let taken = self.entries.iter().find(|(other, e)| {
                other.as_str() != name
                    && e.slots
                        .values()
                        .any(|s| s.volumes.iter().any(|o| o.id == v.id))
            });
            if let Some((other, _)) = taken {
                return Err(format!(
                    "persistent volume id {} is taken by service {other}; rename the claim or the service",
                    v.id
                ));
            }
        }
        let placements = entry.placements();
        let refs: Vec<Placement<'_>> = placements
            .iter()
            .map(|(h, a)| Placement::new(h, a))
            .collect();
        let probe = Slot {
            number,
            agent_id: String::new(),
            hostname: String::new(),
            attributes: Vec::new(),
            volumes,
            created: false,
        };
        // Among the offers that take it, the one already listing most of
        // its volumes (left by a store that was lost, say): their data is
        // found again instead of a create that the master would refuse.
        let mut best: Option<(usize, Vec<NewVolume>, OfferResources)> = None;
        for (i, r) in rooms.iter().enumerate() {
            if !all_admit(&service.constraints, r.offer, &refs) {
                continue;
            }
            let Ok(create) = creates(&probe.unlisted(r.offer)) else {
                continue;
            };
            let mut left = r.left.clone();
            if !left.try_take(&with_disk(need, &create)) {
                continue;
            }
            if best.as_ref().is_none_or(|(_, c, _)| create.len() < c.len()) {
                best = Some((i, create, left));
            }
        }
        let Some((room, create, left)) = best else {
            let total = with_disk(
                need,
                &probe
                    .volumes
                    .iter()
                    .filter_map(|v| v.new_volume().ok())
                    .collect::<Vec<_>>(),
            );
            let offers: Vec<&pb::Offer> = rooms.iter().map(|r| r.offer).collect();
            return Err(unplaced_reason(&placements, service, &total, &offers));
        };
        let offer = rooms[room].offer;
        let slot = Slot {
            agent_id: offer.agent_id.clone(),
            hostname: offer.hostname.clone(),
            attributes: attributes_of(offer),
            created: create.is_empty(),
            ..probe
        };
        if let Some(e) = self.entries.get_mut(name) {
            e.slots.insert(number, slot);
        }
        self.slot_changed(name, number);
        Ok(Choice {
            room,
            slot: number,
            create,
            left,
        })
    }

    /// The volumes of deleted services whose instances all ended that are
    /// due for a destroy (not in flight, past their retry backoff); each is
    /// in flight until [`Services::destroy_done`] reports it.
    pub fn take_destroys(&mut self, now: f64) -> Vec<Destroy> {
        self.now = self.now.max(now);
        let mut out = Vec::new();
        let mut never_made = Vec::new();
        for (name, e) in &mut self.entries {
            if !e.destroying() {
                continue;
            }
            let ids: Vec<String> = e
                .slots
                .values()
                .flat_map(|s| s.volumes.iter().map(|v| v.id.clone()))
                .collect();
            for id in ids {
                let Ok(volume_id) = VolumeId::parse(&id, "volume_id") else {
                    // The master refuses such an id: it never became a volume.
                    never_made.push((name.clone(), id));
                    continue;
                };
                let retry = e.destroys.entry(id).or_default();
                if retry.in_flight || retry.next_at > now {
                    continue;
                }
                retry.in_flight = true;
                out.push(Destroy {
                    service: name.clone(),
                    volume_id,
                });
            }
        }
        for (name, id) in never_made {
            self.destroy_done(&name, &id, Ok(()), now);
        }
        out
    }

    /// A destroy returned: done (the master had it destroyed, or had no such
    /// volume) forgets the volume, its slot once empty, and the service once
    /// nothing is left; a failure is retried after a backoff (1 s doubling
    /// to a minute), the status saying why.
    pub fn destroy_done(
        &mut self,
        service: &str,
        volume_id: &str,
        result: Result<(), String>,
        now: f64,
    ) {
        self.now = self.now.max(now);
        let Some(e) = self.entries.get_mut(service) else {
            return;
        };
        match result {
            Ok(()) => {
                e.destroys.remove(volume_id);
                let touched: Vec<u32> = e
                    .slots
                    .iter_mut()
                    .filter(|(_, s)| s.volumes.iter().any(|v| v.id == volume_id))
                    .map(|(k, s)| {
                        s.volumes.retain(|v| v.id != volume_id);
                        *k
                    })
                    .collect();
                for k in touched {
                    let left = e.slots.get(&k).filter(|s| !s.volumes.is_empty()).cloned();
                    if left.is_none() {
                        e.slots.remove(&k);
                    }
                    self.changes
                        .push(Change::Slot((service.to_string(), k), left));
                }
                self.forget_if_drained(service);
            }
            Err(message) => {
                let retry = e.destroys.entry(volume_id.to_string()).or_default();
                retry.in_flight = false;
                retry.failures = retry.failures.saturating_add(1);
                let exponent = i32::try_from(retry.failures - 1)
                    .unwrap_or(i32::MAX)
                    .min(16);
                let delay = (DESTROY_BACKOFF_SECONDS * 2f64.powi(exponent))
                    .min(DESTROY_BACKOFF_MAX_SECONDS);
                retry.next_at = now + delay;
                e.meta.message = format!(
                    "destroying persistent volume {volume_id} failed: {message}; retrying in {delay}s"
                );
                self.meta_changed(service);
            }
        }
    }

    /// The master removed the framework (it registered anew) and destroyed
    /// its volumes with it: every slot is gone, so instances are placed
    /// afresh and deleted services need destroy nothing more.
    pub fn forget_volumes(&mut self) {
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for name in names {
            let Some(e) = self.entries.get_mut(&name) else {
                continue;
            };
            let slots: Vec<u32> = e.slots.keys().copied().collect();
            e.slots.clear();
            e.destroys.clear();
            let holders: Vec<u32> = e
                .instances
                .values_mut()
                .filter(|i| i.slot.is_some())
                .map(|i| {
                    i.slot = None;
                    i.number
                })
                .collect();
            for k in slots {
                self.changes.push(Change::Slot((name.clone(), k), None));
            }
            for number in holders {
                self.instance_changed(&name, number);
            }
            self.forget_if_drained(&name);
        }
    }

    pub(super) fn slot_changed(&mut self, name: &str, k: u32) {
        if let Some(slot) = self.entries.get(name).and_then(|e| e.slots.get(&k)) {
            self.changes
                .push(Change::Slot((name.to_string(), k), Some(slot.clone())));
        }
    }
}
