//! Human durations (`500ms`, `30s`, `5m`, `1h30m`) as they appear in fleet files and on the CLI.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written the way people write them: `500ms`, `30s`, `5m`, `1h`, `1m30s`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason}; write a number and a unit, e.g. 500ms, 30s, 5m, 1h (units: ms, s, m, h)")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

impl Dur {
    pub const fn from_millis(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub fn as_millis(&self) -> u64 {
        self.0.as_millis() as u64
    }
}

impl From<Dur> for Duration {
    fn from(d: Dur) -> Duration {
        d.0
    }
}

impl FromStr for Dur {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Dur, DurationError> {
        let err = |reason| DurationError {
            input: input.to_string(),
            reason,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        if s == "0" {
            return Ok(Dur(Duration::ZERO));
        }
        let mut total: u128 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
            if digits == 0 {
                return Err(err("expected a number"));
            }
            let n: u128 = rest[..digits]
                .parse()
                .map_err(|_| err("the number is too large"))?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let ms_per_unit: u128 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "" => return Err(err("a unit is missing")),
                _ => return Err(err("unknown unit")),
            };
            total = total
                .checked_add(n.checked_mul(ms_per_unit).ok_or_else(|| err("too large"))?)
                .ok_or_else(|| err("too large"))?;
        }
        if total > u64::MAX as u128 {
            return Err(err("too large"));
        }
        Ok(Dur(Duration::from_millis(total as u64)))
    }
}

/// A measured time, short: `9ms` and `340ms` under a second, `1.4s` from there on.
pub fn short(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return write!(f, "0s");
        }
        let (h, rem) = (ms / 3_600_000, ms % 3_600_000);
        let (m, rem) = (rem / 60_000, rem % 60_000);
        let (s, ms) = (rem / 1000, rem % 1000);
        if h > 0 {
            write!(f, "{h}h")?;
        }
        if m > 0 {
            write!(f, "{m}m")?;
        }
        if s > 0 {
            write!(f, "{s}s")?;
        }
        if ms > 0 {
            write!(f, "{ms}ms")?;
        }
        Ok(())
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_measures() {
        assert_eq!(super::short(0), "0ms");
        assert_eq!(super::short(9), "9ms");
        assert_eq!(super::short(999), "999ms");
        assert_eq!(super::short(1_000), "1.0s");
        assert_eq!(super::short(12_345), "12.3s");
    }

    #[test]
    fn parses_common_forms() {
        assert_eq!("500ms".parse::<Dur>().unwrap(), Dur::from_millis(500));
        assert_eq!("30s".parse::<Dur>().unwrap(), Dur::from_secs(30));
        assert_eq!("5m".parse::<Dur>().unwrap(), Dur::from_secs(300));
        assert_eq!("1h30m".parse::<Dur>().unwrap(), Dur::from_secs(5400));
        assert_eq!(
            "1m30s250ms".parse::<Dur>().unwrap(),
            Dur::from_millis(90_250)
        );
        assert_eq!("0".parse::<Dur>().unwrap(), Dur::from_millis(0));
    }

    #[test]
    fn refuses_bad_forms_with_reason() {
        for bad in ["", "30", "5 minutes", "s", "3d", "-1s", "1.5s"] {
            let e = bad.parse::<Dur>().unwrap_err();
            assert!(e.to_string().contains("500ms"), "{e}");
        }
        assert_eq!("30".parse::<Dur>().unwrap_err().reason, "a unit is missing");
        assert_eq!("3d".parse::<Dur>().unwrap_err().reason, "unknown unit");
    }

    #[test]
    fn display_round_trips() {
        for s in ["500ms", "30s", "5m", "1h30m", "1m30s250ms", "0s"] {
            let d: Dur = s.parse().unwrap();
            assert_eq!(d.to_string(), s);
            assert_eq!(d.to_string().parse::<Dur>().unwrap(), d);
        }
    }
}
