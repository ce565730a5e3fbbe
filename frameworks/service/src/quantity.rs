//! Kubernetes resource quantities (`500m`, `0.5`, `128Mi`, `1Gi`, `100M`,
//! `1e3`), parsed exactly and converted to Corral's fixed-point [`Amount`]s.
//!
//! The grammar is Kubernetes' (`k8s.io/apimachinery/pkg/api/resource`,
//! `quantity.go`):
//!
//! ```text
//! quantity  ::= sign? number suffix
//! number    ::= digits | digits '.' digits? | '.' digits
//! suffix    ::= binarySI | decimalSI | ('e' | 'E') sign? digits
//! binarySI  ::= Ki | Mi | Gi | Ti | Pi | Ei
//! decimalSI ::= n | u | m | '' | k | M | G | T | P | E
//! ```
//!
//! A quantity is held as `significand × 10^pow10 × 2^pow2` in integers, so
//! `0.1` and `100m` are the same value and no float ever rounds a request.
//! CPU converts to exact thousandths (finer than `1m` is refused, where
//! Kubernetes would silently round up); memory converts from bytes to MiB
//! thousandths, rounded up so a container never gets less than it asked.

use corral_proto::Amount;
use corral_proto::resources::MAX_SCALAR;

/// Most significant digits accepted; 30 is far beyond any real request and
/// keeps every product below `u128::MAX`.
const MAX_DIGITS: usize = 30;
/// Largest decimal exponent magnitude (after normalisation); a quantity of
/// `1e40` bytes or `1e-40` cores is a typo, not a request.
const MAX_EXPONENT: i32 = 40;
/// Longest text looked at; a longer one cannot be a sane quantity.
const MAX_TEXT_LEN: usize = 64;

/// Why a quantity was refused. The caller adds the field:
/// `spec.containers[0].resources.requests.cpu: '1.2.3' is not a quantity`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("'{0}' is not a quantity (examples: 500m, 0.5, 2, 128Mi, 1Gi, 100M, 1e3)")]
    Syntax(String),
    #[error("'{0}' must not be negative")]
    Negative(String),
    #[error("'{0}' is out of range")]
    OutOfRange(String),
    #[error("'{0}' is finer than 1m (0.001)")]
    TooPrecise(String),
}

/// An exact, non-negative Kubernetes quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    /// No trailing decimal zeros (they are moved into `pow10`), so equal
    /// values written differently compare equal when both are decimal.
    significand: u128,
    pow10: i32,
    pow2: u32,
}

impl Quantity {
    pub fn parse(text: &str) -> Result<Self, QuantityError> {
        let syntax = || QuantityError::Syntax(text.to_string());
        if text.is_empty() || text.len() > MAX_TEXT_LEN || text.trim() != text {
            return Err(syntax());
        }
        let (negative, rest) = match text.as_bytes()[0] {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, suffix) = rest.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(syntax());
        }
        let (mut pow10, pow2): (i32, u32) = match suffix {
            "" => (0, 0),
            "n" => (-9, 0),
            "u" => (-6, 0),
            "m" => (-3, 0),
            "k" => (3, 0),
            "M" => (6, 0),
            "G" => (9, 0),
            "T" => (12, 0),
            "P" => (15, 0),
            "E" => (18, 0),
            "Ki" => (0, 10),
            "Mi" => (0, 20),
            "Gi" => (0, 30),
            "Ti" => (0, 40),
            "Pi" => (0, 50),
            "Ei" => (0, 60),
            exponent if exponent.starts_with(['e', 'E']) => {
                let digits = &exponent[1..];
                let unsigned = digits.strip_prefix(['+', '-']).unwrap_or(digits);
                if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax());
                }
                // At most a few digits fit MAX_EXPONENT; more is out of range
                // rather than an i32 overflow.
                let value: i32 = digits
                    .parse()
                    .ok()
                    .filter(|v: &i32| v.abs() <= 1000)
                    .ok_or_else(|| QuantityError::OutOfRange(text.to_string()))?;
                (value, 0)
            }
            _ => return Err(syntax()),
        };
        let all = format!("{whole}{fraction}");
        let significant = all.trim_start_matches('0');
        let digits = significant.trim_end_matches('0');
        if digits.is_empty() {
            return Ok(Self::ZERO);
        }
        if negative {
            return Err(QuantityError::Negative(text.to_string()));
        }
        // Each trailing zero dropped stood for a power of ten; the
        // fraction's length is where the point was.
        let dropped = significant.len() - digits.len();
        if digits.len() > MAX_DIGITS {
            return Err(QuantityError::OutOfRange(text.to_string()));
        }
        pow10 += i32::try_from(dropped).map_err(|_| syntax())?;
        pow10 -= i32::try_from(fraction.len()).map_err(|_| syntax())?;
        if pow10.abs() > MAX_EXPONENT {
            return Err(QuantityError::OutOfRange(text.to_string()));
        }
        let significand = digits.parse::<u128>().map_err(|_| syntax())?;
        Ok(Self {
            significand,
            pow10,
            pow2,
        })
    }

    pub const ZERO: Quantity = Quantity {
        significand: 0,
        pow10: 0,
        pow2: 0,
    };

    pub fn is_zero(&self) -> bool {
        self.significand == 0
    }

    /// `self × 10^mul_pow10 / 2^div_pow2` as `(floor, exact)`; `None` when
    /// the result does not fit a `u128`.
    fn scaled(&self, mul_pow10: i32, div_pow2: u32) -> Option<(u128, bool)> {
        let e = self.pow10 + mul_pow10;
        let mut numerator = self
            .significand
            .checked_mul(10u128.checked_pow(e.max(0).unsigned_abs())?)?;
        let mut denominator = 10u128.checked_pow((-e).max(0).unsigned_abs());
        // Shifts stay below 128: pow2 is at most 60 and div_pow2 is 20.
        if self.pow2 >= div_pow2 {
            numerator = numerator.checked_mul(1u128 << (self.pow2 - div_pow2))?;
        } else {
            denominator = denominator.and_then(|d| d.checked_mul(1u128 << (div_pow2 - self.pow2)));
        }
        match denominator {
            Some(d) => Some((numerator / d, numerator % d == 0)),
            // A denominator beyond u128 over a numerator within it: the
            // value is below one unit of the result.
            None => Some((0, numerator == 0)),
        }
    }
}

/// A CPU quantity as an exact [`Amount`] of cores. Refused when it is not a
/// whole number of millicores (`0.0005`) or beyond the largest amount.
pub fn cpu_amount(text: &str) -> Result<Amount, QuantityError> {
    match Quantity::parse(text)?.scaled(3, 0) {
        Some((milli, true)) => check_max(milli, text),
        Some((_, false)) => Err(QuantityError::TooPrecise(text.to_string())),
        None => Err(QuantityError::OutOfRange(text.to_string())),
    }
}

/// A memory quantity (bytes) as an [`Amount`] of MiB, rounded up to the
/// next thousandth of a MiB (`100M` is 95.367… MiB: 95368 thousandths).
pub fn memory_mib(text: &str) -> Result<Amount, QuantityError> {
    match Quantity::parse(text)?.scaled(3, 20) {
        Some((floor, exact)) => check_max(if exact { floor } else { floor + 1 }, text),
        None => Err(QuantityError::OutOfRange(text.to_string())),
    }
}

/// Amounts from quantities obey the same ceiling as amounts from the wire.
fn check_max(milli: u128, text: &str) -> Result<Amount, QuantityError> {
    match u64::try_from(milli) {
        Ok(milli) if milli as f64 <= MAX_SCALAR * 1000.0 => Ok(Amount::from_milli(milli)),
        _ => Err(QuantityError::OutOfRange(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_convert_to_exact_millicores() {
        for (text, milli) in [
            ("500m", 500),
            ("0.5", 500),
            ("1", 1000),
            ("2", 2000),
            ("0.1", 100),
            ("100m", 100),
            (".25", 250),
            ("1.", 1000),
            ("1.500", 1500),
            ("+250m", 250),
            ("1e3", 1_000_000),
            ("1E-3", 1),
            ("0.001", 1),
            ("1k", 1_000_000),
            ("1000000u", 1000),
            ("1000000000n", 1000),
            ("0", 0),
            ("0m", 0),
            ("000.000", 0),
            ("-0", 0),
            ("0.1234e1", 1234),
            ("007", 7000),
        ] {
            assert_eq!(
                cpu_amount(text),
                Ok(Amount::from_milli(milli)),
                "cpu {text}"
            );
        }
        // The same value however it is written.
        assert_eq!(Quantity::parse("0.1"), Quantity::parse("100m"));
        assert_eq!(Quantity::parse("1e3"), Quantity::parse("1k"));
        assert_eq!(Quantity::parse("1.0"), Quantity::parse("1000m"));
    }

    #[test]
    fn memory_quantities_convert_to_mib_rounded_up() {
        for (text, mib_milli) in [
            ("128Mi", 128_000),
            ("1Gi", 1_024_000),
            ("0.5Gi", 512_000),
            ("1.5Mi", 1_500),
            ("1024Ki", 1_000),
            ("1Ki", 1),             // 0.9765625 thousandths, rounded up
            ("1", 1),               // one byte still needs a thousandth
            ("1048576", 1_000),     // 1 MiB in bytes
            ("100M", 95_368),       // 95.367431640625 MiB
            ("1e3", 1),             // 1000 bytes
            ("1G", 953_675),        // 953.67431640625 MiB
            ("1Ti", 1_048_576_000), // exact
            ("0", 0),
        ] {
            assert_eq!(
                memory_mib(text),
                Ok(Amount::from_milli(mib_milli)),
                "memory {text}"
            );
        }
    }

    #[test]
    fn malformed_quantities_are_refused() {
        for text in [
            "", " 1", "1 ", "1.2.3", "abc", "1x", "1ki", "1MI", "m", ".", "-", "1e", "1e+",
            "1e1.5", "1Mi1", "0x10", "1_000", "١", "1e3Mi", "--1",
        ] {
            assert_eq!(
                Quantity::parse(text),
                Err(QuantityError::Syntax(text.to_string())),
                "{text:?}"
            );
        }
    }

    #[test]
    fn negative_huge_and_too_precise_quantities_are_refused() {
        assert_eq!(cpu_amount("-1"), Err(QuantityError::Negative("-1".into())));
        assert_eq!(
            memory_mib("-128Mi"),
            Err(QuantityError::Negative("-128Mi".into()))
        );
        assert!(matches!(
            cpu_amount("0.0005"),
            Err(QuantityError::TooPrecise(_))
        ));
        assert!(matches!(
            cpu_amount("1n"),
            Err(QuantityError::TooPrecise(_))
        ));
        for huge in [
            "1e41",
            "1e999999",
            "1e-41",
            "1234567890123456789012345678901",
        ] {
            assert!(
                matches!(Quantity::parse(huge), Err(QuantityError::OutOfRange(_))),
                "{huge}"
            );
        }
        // Parses, but beyond what any resource may be.
        assert!(matches!(
            cpu_amount("1e13"),
            Err(QuantityError::OutOfRange(_))
        ));
        assert!(matches!(
            memory_mib("16Ei"),
            Err(QuantityError::OutOfRange(_))
        ));
        assert!(matches!(
            memory_mib("9e30"),
            Err(QuantityError::OutOfRange(_))
        ));
    }

    #[test]
    fn errors_quote_the_text() {
        assert_eq!(
            Quantity::parse("1.2.3").unwrap_err().to_string(),
            "'1.2.3' is not a quantity (examples: 500m, 0.5, 2, 128Mi, 1Gi, 100M, 1e3)"
        );
    }
}
