//! Cron schedules in a time zone: when a scheduled job fires next.
//!
//! Pure: "now" is always an argument, so tests step a clock through days and
//! daylight-saving changes without waiting. Parsing and evaluation come from
//! `croner` (Vixie-cron semantics: day-of-month and day-of-week are OR-ed when
//! both are restricted; 5 fields, or 6 with seconds first); time zones from
//! `chrono-tz` (the IANA database compiled in).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;

use crate::spec::SpecError;

/// A validated cron expression and the zone it is read in.
#[derive(Clone)]
pub struct Schedule {
    cron: Cron,
    zone: Tz,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({} in {})", self.cron.pattern, self.zone)
    }
}

impl Schedule {
    /// `expression` in `timezone` (IANA name; empty means UTC).
    pub fn parse(expression: &str, timezone: &str) -> Result<Self, SpecError> {
        let fields = expression.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(SpecError::new(
                "job.schedule",
                format!(
                    "'{expression}' has {fields} fields; expected 5 (min hour dom month dow) or 6 (seconds first)"
                ),
            ));
        }
        let cron = Cron::from_str(expression)
            .map_err(|e| SpecError::new("job.schedule", format!("'{expression}': {e}")))?;
        let zone = if timezone.is_empty() {
            Tz::UTC
        } else {
            timezone.parse::<Tz>().map_err(|_| {
                SpecError::new(
                    "job.timezone",
                    format!("'{timezone}' is not an IANA time zone like Europe/Berlin"),
                )
            })?
        };
        // An expression that never matches (`0 0 30 2 *`) would make a job
        // that silently never runs.
        let probe = Utc::now().with_timezone(&zone);
        if cron.find_next_occurrence(&probe, false).is_err() {
            return Err(SpecError::new(
                "job.schedule",
                format!("'{expression}' never fires"),
            ));
        }
        Ok(Self { cron, zone })
    }

    /// The first firing strictly after `after`; None if there is none
    /// (cannot happen for an expression that passed `parse`, short of the
    /// calendar running out).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.zone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn every_five_minutes_in_utc() {
        let s = Schedule::parse("*/5 * * * *", "").unwrap();
        assert_eq!(
            s.next_after(utc(2026, 1, 1, 10, 2)),
            Some(utc(2026, 1, 1, 10, 5))
        );
        assert_eq!(
            s.next_after(utc(2026, 1, 1, 10, 5)),
            Some(utc(2026, 1, 1, 10, 10))
        );
    }

    #[test]
    fn the_time_zone_shifts_the_firing_and_follows_daylight_saving() {
        let s = Schedule::parse("0 9 * * *", "Europe/Berlin").unwrap();
        // Winter: CET = UTC+1.
        assert_eq!(
            s.next_after(utc(2026, 1, 10, 0, 0)),
            Some(utc(2026, 1, 10, 8, 0))
        );
        // Summer: CEST = UTC+2.
        assert_eq!(
            s.next_after(utc(2026, 7, 10, 0, 0)),
            Some(utc(2026, 7, 10, 7, 0))
        );
    }

    #[test]
    fn six_fields_put_seconds_first() {
        let s = Schedule::parse("30 * * * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(utc(2026, 1, 1, 0, 0)),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 30).unwrap())
        );
    }

    #[test]
    fn bad_expressions_and_zones_are_refused() {
        for bad in ["", "* * *", "61 * * * *", "* * * * * * * *", "a b c d e"] {
            let e = Schedule::parse(bad, "").unwrap_err();
            assert_eq!(e.field, "job.schedule", "{bad}");
        }
        assert_eq!(
            Schedule::parse("0 0 30 2 *", "").unwrap_err().field,
            "job.schedule"
        );
        assert_eq!(
            Schedule::parse("* * * * *", "Mars/Olympus")
                .unwrap_err()
                .field,
            "job.timezone"
        );
    }
}
