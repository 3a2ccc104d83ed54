//! How often a repeated failure is logged: the first at once, then at most one line per
//! interval, which says how many were held back since the last. Used by the agent for calls
//! to the server (heartbeats, permit and task polls) and by the balancer for connects to
//! targets, so that a server or a target that is down cannot flood a log. The caller passes
//! the clock (`now`), so the rule is tested without waiting.

use std::time::{Duration, Instant};

/// The state of one kind of failure (one per call site, or per listener).
#[derive(Clone, Debug)]
pub struct LogRate {
    every: Duration,
    last: Option<Instant>,
    held: u64,
    failing: bool,
}

impl LogRate {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> LogRate {
        LogRate {
            every,
            last: None,
            held: 0,
            failing: false,
        }
    }

    /// A failure at `now`: `Some(n)` when it is to be logged, `n` the failures held back since
    /// the last line logged; `None` when it is held back (counted).
    pub fn failed(&mut self, now: Instant) -> Option<u64> {
        self.failing = true;
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }

    /// A success: `Some(n)` when failures had been seen until now (the end of an outage, worth
    /// a line; `n` failures held back since the last line), else `None`.
    pub fn recovered(&mut self) -> Option<u64> {
        std::mem::replace(&mut self.failing, false).then(|| std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_then_one_line_per_interval_with_the_count() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut r = LogRate::new(s(60));
        assert_eq!(r.recovered(), None, "nothing failed");
        assert_eq!(r.failed(t0), Some(0), "the first at once");
        for i in 1..=1000 {
            assert_eq!(r.failed(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(r.failed(t0 + s(59)), None);
        assert_eq!(
            r.failed(t0 + s(60)),
            Some(1001),
            "one line, with the count held back"
        );
        assert_eq!(r.failed(t0 + s(61)), None);
        assert_eq!(
            r.recovered(),
            Some(1),
            "the end of the outage, and what was held back"
        );
        assert_eq!(r.recovered(), None);
        // A new outage within the interval is held back, and counted.
        assert_eq!(r.failed(t0 + s(70)), None);
        assert_eq!(r.failed(t0 + s(121)), Some(1));
    }
}
