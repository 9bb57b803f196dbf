//! Durations as people write them (`500ms`, `10s`, `2m`): the syntax of every `--timeout` flag
//! and of the control API's per-image `timeout`, parsed in one place.

use std::time::Duration;

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The number part is missing or not a number.
    #[error("`{0}` is not a duration like 500ms or 10s")]
    NotANumber(String),
    /// The unit is not one of ours.
    #[error("unknown time unit `{0}` (use us, ms, s, m or h)")]
    UnknownUnit(String),
    /// The number is negative, infinite or too large for a duration.
    #[error("`{text}` is out of range")]
    OutOfRange {
        /// The text given.
        text: String,
        /// Why it does not fit.
        #[source]
        source: std::time::TryFromFloatSecsError,
    },
}

/// Parses `500ms`, `10s`, `1.5m`, `250us`, …; a bare number is seconds.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(mu2_vmm::duration::parse("500ms"), Ok(Duration::from_millis(500)));
/// ```
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| DurationError::NotANumber(s.to_string()))?;
    let scale = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(DurationError::UnknownUnit(unit.to_string())),
    };
    Duration::try_from_secs_f64(value * scale)
        .map_err(|source| DurationError::OutOfRange { text: s.to_string(), source })
}

/// A duration in the syntax [`parse`] reads back: whole milliseconds when it has no finer
/// part (`2000ms`), else microseconds.
pub fn format(d: Duration) -> String {
    if d.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_refuses_the_rest() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert!(parse("soon").is_err());
        assert!(parse("5 days").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("1e400s").is_err());
    }

    #[test]
    fn formats_what_it_parses() {
        for d in [Duration::from_secs(2), Duration::from_millis(1), Duration::from_micros(1500)] {
            assert_eq!(parse(&format(d)), Ok(d), "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(2)), "2000ms");
    }
}
