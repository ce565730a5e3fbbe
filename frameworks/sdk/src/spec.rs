//! Rules the frameworks' spec layers share (the batch framework's jobs,
//! the service framework's services), so a duration or a name means the
//! same thing in both.

use std::time::Duration;

/// Longest job or service name: names are part of every task id and
/// metric label.
pub const MAX_NAME_LEN: usize = 63;
/// Longest duration any spec field accepts (one year).
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// `500ms`, `2s`, `1.5m`, `1h`, `7d`, or plain seconds (`30`), at most a
/// year; the error says what was wrong.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 500ms, 2s, 1m or 1h"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => return Err(format!("unknown unit '{other}' in '{text}'")),
    };
    if !seconds.is_finite() || seconds > MAX_SECONDS {
        return Err(format!("'{text}' is longer than a year"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A job or service name: 1 to [`MAX_NAME_LEN`] letters, digits, `-` and
/// `_`. The error is the reason, for the caller to put after the field.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "'{name}' may only contain letters, digits, '-' and '_'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_stop_at_a_year() {
        let ok = [
            ("500ms", 0.5),
            ("2s", 2.0),
            ("30", 30.0),
            ("1.5m", 90.0),
            ("1h", 3600.0),
            ("7d", 604_800.0),
        ];
        for (text, secs) in ok {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs_f64(secs)),
                "{text}"
            );
        }
        for bad in ["", "soon", "1w", "-3s", "400d", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_short_and_plain() {
        assert_eq!(check_name("web_2-a"), Ok(()));
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(64)).is_err());
        assert!(check_name("a/b").unwrap_err().contains("'a/b'"));
        assert!(check_name("a.b").is_err());
    }
}
