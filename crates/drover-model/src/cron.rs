//! Five-field cron patterns in an IANA time zone (`0 17 * * SAT` in `Europe/London`), and
//! wall-clock times as people type them (`2026-12-24 18:00`): pure, the clock is an argument.
//!
//! Daylight-saving changes follow the usual cron rule (croner's, as Vixie cron's): a time
//! that does not exist (the hour skipped in spring) fires at the first instant after the
//! gap; a time that exists twice (the hour repeated in autumn) fires once, at the first of
//! the two; patterns of every minute or hour (`*/15 * * * *`) fire in both.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
pub use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// Why a cron pattern, a time zone or a time was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CronError(pub String);

/// A parsed five-field cron pattern and the time zone it is read in.
#[derive(Clone, Debug)]
pub struct CronTz {
    cron: Cron,
    tz: Tz,
    text: String,
}

/// The time zone by its IANA name (`Europe/London`, `America/New_York`, `UTC`).
pub fn parse_tz(name: &str) -> Result<Tz, CronError> {
    Tz::from_str(name).map_err(|_| {
        CronError(format!(
            "unknown time zone {name:?}; use an IANA name, e.g. \"UTC\", \"Europe/London\", \"America/New_York\""
        ))
    })
}

fn ms_to_utc(ms: u64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms as i64)
        .single()
        .unwrap_or_default()
}

fn to_ms<T: TimeZone>(t: &DateTime<T>) -> Option<u64> {
    u64::try_from(t.timestamp_millis()).ok()
}

/// The earliest time [`CronTz::fires`] looks from, and how far: 400 years hold every
/// combination of month, day and weekday the Gregorian calendar has.
const EVER_FROM_MS: u64 = 946_684_800_000; // 2000-01-01T00:00:00Z
const EVER_YEARS: i32 = 400;

impl CronTz {
    /// Parse `cron` (minute hour day-of-month month day-of-week; names like `SAT`, `JAN`
    /// allowed) read in the IANA time zone `tz`.
    pub fn parse(cron: &str, tz: &str) -> Result<CronTz, CronError> {
        let tz = parse_tz(tz)?;
        let fields = cron.split_whitespace().count();
        if fields != 5 && !cron.trim_start().starts_with('@') {
            return Err(CronError(format!(
                "{cron:?} has {fields} field(s); write five: minute hour day-of-month month day-of-week, e.g. \"0 17 * * SAT\""
            )));
        }
        let parsed = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(cron)
            .map_err(|e| {
                CronError(format!(
                    "{cron:?} is not a cron pattern ({e}); write minute hour day-of-month month day-of-week, e.g. \"0 17 * * SAT\""
                ))
            })?;
        Ok(CronTz {
            cron: parsed,
            tz,
            text: cron.trim().to_string(),
        })
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// Whether the pattern ever matches a date (`0 0 30 2 *` never does).
    pub fn fires(&self) -> bool {
        let from = ms_to_utc(EVER_FROM_MS).with_timezone(&self.tz);
        match self.cron.find_next_occurrence(&from, true) {
            Ok(t) => {
                use chrono::Datelike;
                t.year() < 2000 + EVER_YEARS
            }
            Err(_) => false,
        }
    }

    /// The first firing strictly after `after_ms`.
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        let from = ms_to_utc(after_ms).with_timezone(&self.tz);
        let t = self.cron.find_next_occurrence(&from, false).ok()?;
        to_ms(&t)
    }

    /// The last firing at or before `at_ms`.
    pub fn last_at_or_before(&self, at_ms: u64) -> Option<u64> {
        let at = ms_to_utc(at_ms).with_timezone(&self.tz);
        let t = self.cron.find_previous_occurrence(&at, true).ok()?;
        to_ms(&t)
    }

    /// The next `n` firings strictly after `after_ms`.
    pub fn next_firings(&self, after_ms: u64, n: usize) -> Vec<u64> {
        let mut out = Vec::with_capacity(n);
        let mut t = after_ms;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

impl fmt::Display for CronTz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.text, self.tz.name())
    }
}

/// `ms` as a wall-clock time in `tz`, e.g. `Sat 2026-10-31 17:00 GMT`.
/// Seconds are shown only when there are some: `Sat 2026-10-31 17:00:05 GMT`.
pub fn format_in(ms: u64, tz: Tz) -> String {
    let t = ms_to_utc(ms).with_timezone(&tz);
    let f = if has_seconds(ms) {
        "%a %Y-%m-%d %H:%M:%S %Z"
    } else {
        "%a %Y-%m-%d %H:%M %Z"
    };
    t.format(f).to_string()
}

/// Whether a time is not on a whole minute.
fn has_seconds(ms: u64) -> bool {
    ms.rem_euclid(60_000) != 0
}

/// `ms` as `YYYY-MM-DD HH:MM:SS` in `tz`: what [`parse_time`] reads back.
pub fn format_seconds(ms: u64, tz: Tz) -> String {
    ms_to_utc(ms)
        .with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// `ms` in `tz`, the time of day only when it is the same day there as `since_ms`:
/// `21:00 GMT`, else as [`format_in`].
pub fn format_until(ms: u64, since_ms: u64, tz: Tz) -> String {
    let a = ms_to_utc(ms).with_timezone(&tz);
    let b = ms_to_utc(since_ms).with_timezone(&tz);
    if a.date_naive() == b.date_naive() {
        a.format(if has_seconds(ms) {
            "%H:%M:%S %Z"
        } else {
            "%H:%M %Z"
        })
        .to_string()
    } else {
        format_in(ms, tz)
    }
}

/// The formats [`parse_time`] accepts, for error messages.
pub const TIME_FORMATS: &str =
    "\"YYYY-MM-DD HH:MM\" or \"YYYY-MM-DD HH:MM:SS\" (also with a T between), or RFC 3339 with an offset (\"2026-12-24T18:00:00Z\")";

/// A wall-clock time as people type it, read in `tz` (unless it carries its own offset), in
/// ms since the epoch. A time that does not exist in `tz` (skipped by a daylight-saving
/// change) is refused; one that exists twice is the first of the two.
pub fn parse_time(text: &str, tz: Tz) -> Result<u64, CronError> {
    let s = text.trim();
    let refuse = |why: &str| {
        CronError(format!(
            "{text:?} is not a time{why}; write {TIME_FORMATS}; without an offset it is read in {} (change it with --timezone)",
            tz.name()
        ))
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return to_ms(&t).ok_or_else(|| refuse(" after 1970"));
    }
    let mut naive = None;
    for f in [
        "%Y-%m-%d %H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
    ] {
        if let Ok(n) = NaiveDateTime::parse_from_str(s, f) {
            naive = Some(n);
            break;
        }
    }
    let naive = naive.ok_or_else(|| refuse(""))?;
    let t = match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t,
        LocalResult::Ambiguous(first, _) => first,
        LocalResult::None => {
            return Err(refuse(&format!(
                " in {}: the clocks skip it (daylight saving)",
                tz.name()
            )))
        }
    };
    to_ms(&t).ok_or_else(|| refuse(" after 1970"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> u64 {
        parse_time(s, Tz::UTC).unwrap()
    }

    #[test]
    fn fires_in_its_time_zone_across_daylight_saving() {
        let c = CronTz::parse("0 17 * * SAT", "Europe/London").unwrap();
        // BST (UTC+1) on 24 Oct 2026, GMT on 31 Oct.
        assert_eq!(
            c.next_firings(utc("2026-10-20 00:00"), 2),
            vec![utc("2026-10-24 16:00"), utc("2026-10-31 17:00")]
        );
        assert_eq!(
            c.last_at_or_before(utc("2026-10-31 17:00")),
            Some(utc("2026-10-31 17:00"))
        );
        assert_eq!(
            c.last_at_or_before(utc("2026-10-31 16:59")),
            Some(utc("2026-10-24 16:00"))
        );
    }

    #[test]
    fn the_repeated_hour_fires_once_and_the_skipped_hour_after_the_gap() {
        let c = CronTz::parse("30 1 * * *", "Europe/London").unwrap();
        // 25 Oct 2026: 01:30 BST (00:30Z), then the clocks go back; 01:30 GMT is not fired.
        assert_eq!(
            c.next_firings(utc("2026-10-24 12:00"), 2),
            vec![utc("2026-10-25 00:30"), utc("2026-10-26 01:30")]
        );
        let c = CronTz::parse("30 2 * * *", "America/New_York").unwrap();
        // 8 Mar 2026: 02:00 EST jumps to 03:00 EDT; 02:30 fires at 03:00 EDT (07:00Z).
        assert_eq!(
            c.next_firings(utc("2026-03-07 12:00"), 2),
            vec![utc("2026-03-08 07:00"), utc("2026-03-09 06:30")]
        );
    }

    #[test]
    fn refuses_what_is_not_five_fields_or_never_fires() {
        assert!(CronTz::parse("0 0 17 * * SAT", "UTC")
            .unwrap_err()
            .0
            .contains("6 field"));
        assert!(CronTz::parse("61 * * * *", "UTC").is_err());
        assert!(CronTz::parse("0 17 * * SAT", "Mars/Olympus")
            .unwrap_err()
            .0
            .contains("IANA"));
        assert!(!CronTz::parse("0 0 30 2 *", "UTC").unwrap().fires());
        assert!(CronTz::parse("0 0 29 2 *", "UTC").unwrap().fires());
    }

    #[test]
    fn parses_times_people_type() {
        assert_eq!(utc("1970-01-01 00:01"), 60_000);
        assert_eq!(utc("1970-01-01T00:00:05"), 5_000);
        assert_eq!(utc("1970-01-01T01:00:00+01:00"), 0);
        assert_eq!(format_seconds(65_000, Tz::UTC), "1970-01-01 00:01:05");
        assert_eq!(
            utc(&format_seconds(1_800_000_001_000, Tz::UTC)),
            1_800_000_001_000
        );
        let london = parse_tz("Europe/London").unwrap();
        assert_eq!(
            parse_time("2026-07-01 18:00", london).unwrap(),
            utc("2026-07-01 17:00")
        );
        let e = parse_time("24/12/2026 18:00", Tz::UTC).unwrap_err().0;
        assert!(e.contains("YYYY-MM-DD HH:MM") && e.contains("UTC"), "{e}");
        let ny = parse_tz("America/New_York").unwrap();
        assert!(parse_time("2026-03-08 02:30", ny)
            .unwrap_err()
            .0
            .contains("skip"));
    }
}
