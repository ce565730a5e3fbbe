//! Exact resource arithmetic.
//!
//! Scalars travel as doubles (like Mesos) but are held as [`Amount`]s: whole
//! thousandths in a `u64`, so adding and subtracting offers and tasks never
//! drifts. Mesos rounds scalars to three decimals for the same reason
//! (`Value::Scalar` arithmetic in `src/common/values.cpp`).
//!
//! Every value from outside goes through [`Resources::from_proto`] or
//! [`Resources::parse`], which reject negative, NaN, infinite and absurd
//! amounts with an error that names the field.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::pb::{self, resource::Value};

/// Largest scalar accepted, in units (1 EiB of memory in MiB is ~1.1e12).
pub const MAX_SCALAR: f64 = 1e12;
/// Highest port number.
pub const MAX_PORT: u64 = 65_535;
/// Most ranges accepted in one `ports` resource, so a hostile request cannot
/// make the master do quadratic work.
pub const MAX_RANGES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ResourceError {
    /// Dotted path of the offending field, e.g. `task.resources.cpus`.
    pub field: String,
    pub reason: String,
}

impl ResourceError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A non-negative scalar amount in thousandths of a unit.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Amount(u64);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub const fn from_milli(milli: u64) -> Self {
        Self(milli)
    }

    pub const fn from_units(units: u64) -> Self {
        Self(units * 1000)
    }

    pub const fn milli(self) -> u64 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Converts a wire value, rounding to the nearest thousandth.
    pub fn from_f64(value: f64, field: &str) -> Result<Self, ResourceError> {
        if !value.is_finite() {
            return Err(ResourceError::new(field, "must be finite"));
        }
        if value < 0.0 {
            return Err(ResourceError::new(field, "must be >= 0"));
        }
        if value > MAX_SCALAR {
            return Err(ResourceError::new(
                field,
                format!("must be at most {MAX_SCALAR:e}"),
            ));
        }
        Ok(Self((value * 1000.0).round() as u64))
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }

    pub fn saturating_sub(self, other: Amount) -> Amount {
        Amount(self.0.saturating_sub(other.0))
    }
}

impl std::ops::Add for Amount {
    type Output = Amount;
    fn add(self, rhs: Amount) -> Amount {
        Amount(self.0.saturating_add(rhs.0))
    }
}

impl std::ops::AddAssign for Amount {
    fn add_assign(&mut self, rhs: Amount) {
        self.0 = self.0.saturating_add(rhs.0);
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / 1000, self.0 % 1000);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let s = format!("{whole}.{frac:03}");
            f.write_str(s.trim_end_matches('0'))
        }
    }
}

/// A set of inclusive `u64` ranges, kept sorted and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a set from possibly overlapping, unsorted ranges.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut set = Self::new();
        for (b, e) in ranges {
            set.insert(b, e);
        }
        set
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of values in the set.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|(b, e)| e - b + 1).sum()
    }

    /// Adds `[begin, end]`, merging with neighbours and overlaps.
    pub fn insert(&mut self, begin: u64, end: u64) {
        debug_assert!(begin <= end);
        let (mut b, mut e) = (begin, end);
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut placed = false;
        for &(rb, re) in &self.0 {
            if re.saturating_add(1) < b {
                out.push((rb, re));
            } else if e.saturating_add(1) < rb {
                if !placed {
                    out.push((b, e));
                    placed = true;
                }
                out.push((rb, re));
            } else {
                b = b.min(rb);
                e = e.max(re);
            }
        }
        if !placed {
            out.push((b, e));
        }
        self.0 = out;
    }

    pub fn union(&mut self, other: &RangeSet) {
        for &(b, e) in &other.0 {
            self.insert(b, e);
        }
    }

    /// True when every value of `other` is in `self`.
    pub fn contains(&self, other: &RangeSet) -> bool {
        other
            .0
            .iter()
            .all(|&(b, e)| self.0.iter().any(|&(rb, re)| rb <= b && e <= re))
    }

    /// Removes every value of `other` (values not present are ignored).
    pub fn remove(&mut self, other: &RangeSet) {
        let mut cur = std::mem::take(&mut self.0);
        for &(b, e) in &other.0 {
            let mut next = Vec::with_capacity(cur.len() + 1);
            for (rb, re) in cur {
                if re < b || e < rb {
                    next.push((rb, re));
                    continue;
                }
                if rb < b {
                    next.push((rb, b - 1));
                }
                if e < re {
                    next.push((e + 1, re));
                }
            }
            cur = next;
        }
        self.0 = cur;
    }
}

impl RangeSet {
    /// The wire form: a ranges resource named `name`.
    pub fn to_resource(&self, name: &str) -> pb::Resource {
        pb::Resource {
            name: name.to_string(),
            value: Some(Value::Ranges(pb::Ranges {
                range: self
                    .0
                    .iter()
                    .map(|&(begin, end)| pb::Range { begin, end })
                    .collect(),
            })),
        }
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, (b, e)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{b}-{e}")?;
        }
        f.write_str("]")
    }
}

/// The resources Corral knows: four scalars and the `ports` ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: Amount,
    /// MiB.
    pub mem: Amount,
    /// MiB.
    pub disk: Amount,
    pub gpus: Amount,
    pub ports: RangeSet,
}

/// The scalar resource names, in display order.
pub const SCALARS: [&str; 4] = ["cpus", "mem", "disk", "gpus"];

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.cpus.is_zero()
            && self.mem.is_zero()
            && self.disk.is_zero()
            && self.gpus.is_zero()
            && self.ports.is_empty()
    }

    /// The scalar named `name` (one of [`SCALARS`]).
    pub fn scalar(&self, name: &str) -> Option<Amount> {
        match name {
            "cpus" => Some(self.cpus),
            "mem" => Some(self.mem),
            "disk" => Some(self.disk),
            "gpus" => Some(self.gpus),
            _ => None,
        }
    }

    fn scalar_mut(&mut self, name: &str) -> Option<&mut Amount> {
        match name {
            "cpus" => Some(&mut self.cpus),
            "mem" => Some(&mut self.mem),
            "disk" => Some(&mut self.disk),
            "gpus" => Some(&mut self.gpus),
            _ => None,
        }
    }

    /// The scalars as `(name, amount)` pairs.
    pub fn scalars(&self) -> [(&'static str, Amount); 4] {
        [
            ("cpus", self.cpus),
            ("mem", self.mem),
            ("disk", self.disk),
            ("gpus", self.gpus),
        ]
    }

    /// True when `self` has at least `other` of everything.
    pub fn contains(&self, other: &Resources) -> bool {
        self.cpus >= other.cpus
            && self.mem >= other.mem
            && self.disk >= other.disk
            && self.gpus >= other.gpus
            && self.ports.contains(&other.ports)
    }

    pub fn add(&mut self, other: &Resources) {
        self.cpus += other.cpus;
        self.mem += other.mem;
        self.disk += other.disk;
        self.gpus += other.gpus;
        self.ports.union(&other.ports);
    }

    /// `self - other`, or `None` when `self` does not contain `other`.
    pub fn checked_sub(&self, other: &Resources) -> Option<Resources> {
        if !self.contains(other) {
            return None;
        }
        let mut ports = self.ports.clone();
        ports.remove(&other.ports);
        Some(Resources {
            cpus: self.cpus.saturating_sub(other.cpus),
            mem: self.mem.saturating_sub(other.mem),
            disk: self.disk.saturating_sub(other.disk),
            gpus: self.gpus.saturating_sub(other.gpus),
            ports,
        })
    }

    /// Removes what `self` and `other` have in common (never underflows).
    pub fn saturating_sub(&mut self, other: &Resources) {
        self.cpus = self.cpus.saturating_sub(other.cpus);
        self.mem = self.mem.saturating_sub(other.mem);
        self.disk = self.disk.saturating_sub(other.disk);
        self.gpus = self.gpus.saturating_sub(other.gpus);
        self.ports.remove(&other.ports);
    }

    /// The largest fraction of `total` that `self` holds over the scalars
    /// (the dominant share of DRF). Scalars with a zero total are skipped.
    pub fn dominant_share(&self, total: &Resources) -> f64 {
        self.scalars()
            .iter()
            .zip(total.scalars().iter())
            .filter(|(_, (_, t))| !t.is_zero())
            .map(|((_, a), (_, t))| a.milli() as f64 / t.milli() as f64)
            .fold(0.0, f64::max)
    }

    /// Converts and validates wire resources. `field` is the path of the
    /// list, e.g. `task.resources`; errors name `task.resources.cpus`.
    /// Repeated names are summed (scalars) or merged (ranges).
    pub fn from_proto(list: &[pb::Resource], field: &str) -> Result<Self, ResourceError> {
        let mut out = Resources::default();
        for (i, r) in list.iter().enumerate() {
            let name = r.name.as_str();
            let path = if name.is_empty() {
                format!("{field}[{i}].name")
            } else {
                format!("{field}.{name}")
            };
            match (&r.value, name) {
                (_, "") => return Err(ResourceError::new(path, "must not be empty")),
                (Some(Value::Scalar(v)), n) if SCALARS.contains(&n) => {
                    let amount = Amount::from_f64(*v, &path)?;
                    if let Some(slot) = out.scalar_mut(n) {
                        *slot += amount;
                    }
                }
                (Some(Value::Ranges(rs)), "ports") => {
                    if rs.range.len() > MAX_RANGES {
                        return Err(ResourceError::new(
                            path,
                            format!("at most {MAX_RANGES} ranges"),
                        ));
                    }
                    for range in &rs.range {
                        check_range(range.begin, range.end, &path)?;
                        out.ports.insert(range.begin, range.end);
                    }
                }
                (None, _) => return Err(ResourceError::new(path, "has no value")),
                (Some(Value::Scalar(_)), "ports") => {
                    return Err(ResourceError::new(path, "must be ranges, not a scalar"));
                }
                (Some(Value::Ranges(_)), n) if SCALARS.contains(&n) => {
                    return Err(ResourceError::new(path, "must be a scalar, not ranges"));
                }
                (Some(_), n) => {
                    return Err(ResourceError::new(
                        path,
                        format!("unknown resource '{n}' (known: cpus, mem, disk, gpus, ports)"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The wire form; zero scalars and empty ranges are left out.
    pub fn to_proto(&self) -> Vec<pb::Resource> {
        let mut out: Vec<pb::Resource> = self
            .scalars()
            .iter()
            .filter(|(_, a)| !a.is_zero())
            .map(|(n, a)| pb::Resource {
                name: (*n).to_string(),
                value: Some(Value::Scalar(a.as_f64())),
            })
            .collect();
        if !self.ports.is_empty() {
            out.push(self.ports.to_resource("ports"));
        }
        out
    }

    /// Parses the flag form `cpus:4;mem:8192;disk:10000;ports:[31000-32000]`.
    pub fn parse(text: &str) -> Result<Self, ResourceError> {
        let mut out = Resources::default();
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once(':').ok_or_else(|| {
                ResourceError::new("resources", format!("'{part}' is not NAME:VALUE"))
            })?;
            let (name, value) = (name.trim(), value.trim());
            let path = format!("resources.{name}");
            if name == "ports" {
                let inner = value
                    .strip_prefix('[')
                    .and_then(|v| v.strip_suffix(']'))
                    .ok_or_else(|| {
                        ResourceError::new(&path, "must look like [31000-32000,33000-33100]")
                    })?;
                for range in inner.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                    let (b, e) = range.split_once('-').unwrap_or((range, range));
                    let parse = |s: &str| {
                        s.trim().parse::<u64>().map_err(|_| {
                            ResourceError::new(&path, format!("'{range}' is not BEGIN-END"))
                        })
                    };
                    let (b, e) = (parse(b)?, parse(e)?);
                    check_range(b, e, &path)?;
                    out.ports.insert(b, e);
                }
            } else if SCALARS.contains(&name) {
                let v: f64 = value
                    .parse()
                    .map_err(|_| ResourceError::new(&path, format!("'{value}' is not a number")))?;
                let amount = Amount::from_f64(v, &path)?;
                if let Some(slot) = out.scalar_mut(name) {
                    *slot = amount;
                }
            } else {
                return Err(ResourceError::new(
                    path,
                    format!("unknown resource '{name}' (known: cpus, mem, disk, gpus, ports)"),
                ));
            }
        }
        Ok(out)
    }
}

fn check_range(begin: u64, end: u64, path: &str) -> Result<(), ResourceError> {
    if begin > end {
        return Err(ResourceError::new(
            path,
            format!("range {begin}-{end} has begin > end"),
        ));
    }
    if end > MAX_PORT {
        return Err(ResourceError::new(
            path,
            format!("range {begin}-{end} goes past {MAX_PORT}"),
        ));
    }
    Ok(())
}

impl fmt::Display for Resources {
    /// The same text form [`Resources::parse`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .scalars()
            .iter()
            .filter(|(_, a)| !a.is_zero())
            .map(|(n, a)| format!("{n}:{a}"))
            .collect();
        if !self.ports.is_empty() {
            parts.push(format!("ports:{}", self.ports));
        }
        f.write_str(&parts.join(";"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scalar(name: &str, v: f64) -> pb::Resource {
        pb::Resource {
            name: name.into(),
            value: Some(Value::Scalar(v)),
        }
    }

    #[test]
    fn flag_form_round_trips() {
        let r = Resources::parse("cpus:4;mem:8192;disk:10000;ports:[31000-32000]").unwrap();
        assert_eq!(r.cpus, Amount::from_units(4));
        assert_eq!(r.ports.count(), 1001);
        assert_eq!(
            r.to_string(),
            "cpus:4;mem:8192;disk:10000;ports:[31000-32000]"
        );
        assert_eq!(Resources::parse(&r.to_string()).unwrap(), r);
    }

    #[test]
    fn invalid_amounts_name_the_field() {
        for (v, why) in [
            (f64::NAN, "must be finite"),
            (f64::INFINITY, "must be finite"),
            (-1.0, "must be >= 0"),
            (1e13, "must be at most"),
        ] {
            let err = Resources::from_proto(&[scalar("cpus", v)], "task.resources").unwrap_err();
            assert_eq!(err.field, "task.resources.cpus");
            assert!(err.reason.starts_with(why), "{err}");
        }
        let err = Resources::from_proto(&[scalar("bogus", 1.0)], "task.resources").unwrap_err();
        assert!(err.to_string().contains("unknown resource 'bogus'"));
        let bad_range = pb::Resource {
            name: "ports".into(),
            value: Some(Value::Ranges(pb::Ranges {
                range: vec![pb::Range { begin: 5, end: 2 }],
            })),
        };
        assert!(Resources::from_proto(&[bad_range], "offer").is_err());
    }

    #[test]
    fn thousandths_do_not_drift() {
        let mut total = Resources::default();
        let tenth = Resources::from_proto(&[scalar("cpus", 0.1)], "r").unwrap();
        for _ in 0..10 {
            total.add(&tenth);
        }
        assert_eq!(total.cpus, Amount::from_units(1));
        assert_eq!(Amount::from_milli(1500).to_string(), "1.5");
    }

    #[test]
    fn dominant_share_is_the_largest_fraction() {
        let total = Resources::parse("cpus:10;mem:100").unwrap();
        let used = Resources::parse("cpus:1;mem:50").unwrap();
        assert!((used.dominant_share(&total) - 0.5).abs() < 1e-12);
    }

    fn ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0u64..200, 0u64..20).prop_map(|(b, l)| (b, b + l)), 0..8)
    }

    proptest! {
        #[test]
        fn rangeset_matches_a_bitset(a in ranges(), b in ranges()) {
            let bits = |rs: &[(u64, u64)]| {
                let mut v = vec![false; 256];
                for &(s, e) in rs { for x in s..=e { v[x as usize] = true; } }
                v
            };
            let (ba, bb) = (bits(&a), bits(&b));
            let sa = RangeSet::from_ranges(a.clone());
            let sb = RangeSet::from_ranges(b.clone());
            prop_assert_eq!(bits(sa.ranges()), ba.clone());
            let mut diff = sa.clone();
            diff.remove(&sb);
            let want: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x && !*y).collect();
            prop_assert_eq!(bits(diff.ranges()), want);
            let contains = bb.iter().zip(&ba).all(|(y, x)| !*y || *x);
            prop_assert_eq!(sa.contains(&sb), contains);
            // Normal form: sorted, disjoint, not adjacent.
            for w in sa.ranges().windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0);
            }
        }

        #[test]
        fn add_then_sub_is_identity(a in 0u64..1_000_000, b in 0u64..1_000_000) {
            let x = Resources { cpus: Amount::from_milli(a), mem: Amount::from_milli(b), ..Default::default() };
            let y = Resources { cpus: Amount::from_milli(b), mem: Amount::from_milli(a), ..Default::default() };
            let mut s = x.clone();
            s.add(&y);
            prop_assert_eq!(s.checked_sub(&y), Some(x));
        }
    }
}
