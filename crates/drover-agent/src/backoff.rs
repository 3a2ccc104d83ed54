//! Respawn backoff: the first restart is immediate, then `initial_delay` doubling up to `max_delay`;
//! a component that ran `reset_after` without exiting starts over. Pure and deterministic.

use std::time::Duration;

use drover_model::fleet::RestartPolicy;

/// How long to wait before each respawn of one component.
///
/// Feed it how long each run lasted; it answers with the delay before the next start:
/// `0, initial, 2·initial, 4·initial, …, max, max, …`, back to `0` after a run of at least
/// `reset_after`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    /// Restarts since the last reset.
    count: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            reset_after,
            count: 0,
        }
    }

    /// The backoff a component's restart policy describes.
    pub fn from_policy(p: &RestartPolicy) -> Backoff {
        Backoff::new(p.initial_delay.0, p.max_delay.0, p.reset_after.0)
    }

    /// The delay before the next start, after a run that lasted `ran_for`.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.count = 0;
        }
        let delay = match self.count {
            0 => Duration::ZERO,
            n => {
                // initial · 2^(n-1), saturating, capped.
                let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
                self.initial
                    .checked_mul(factor)
                    .unwrap_or(self.max)
                    .min(self.max)
            }
        };
        self.count = self.count.saturating_add(1);
        delay
    }

    /// Restarts since the last reset.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Forget past restarts: the next restart is immediate again.
    pub fn reset(&mut self) {
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn b() -> Backoff {
        Backoff::new(200 * MS, 1000 * MS, Duration::from_secs(60))
    }

    #[test]
    fn first_restart_is_immediate() {
        let mut b = b();
        assert_eq!(b.next_delay(MS), Duration::ZERO);
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn doubles_then_caps() {
        let mut b = b();
        let delays: Vec<_> = (0..7).map(|_| b.next_delay(10 * MS)).collect();
        assert_eq!(
            delays,
            vec![
                Duration::ZERO,
                200 * MS,
                400 * MS,
                800 * MS,
                1000 * MS,
                1000 * MS,
                1000 * MS
            ]
        );
    }

    #[test]
    fn cap_holds_for_very_many_restarts() {
        let mut b = b();
        for _ in 0..200 {
            assert!(b.next_delay(MS) <= 1000 * MS);
        }
        assert_eq!(b.next_delay(MS), 1000 * MS);
    }

    #[test]
    fn long_run_resets_count() {
        let mut b = b();
        for _ in 0..4 {
            b.next_delay(MS);
        }
        // Ran long enough: the count resets, the restart is immediate, then doubling again.
        assert_eq!(b.next_delay(Duration::from_secs(60)), Duration::ZERO);
        assert_eq!(b.next_delay(MS), 200 * MS);
        // A run just short of reset_after does not reset.
        assert_eq!(b.next_delay(Duration::from_secs(59)), 400 * MS);
    }

    #[test]
    fn explicit_reset_and_policy() {
        let mut b = Backoff::from_policy(&RestartPolicy::default());
        b.next_delay(MS);
        assert_eq!(b.next_delay(MS), 200 * MS);
        b.reset();
        assert_eq!(b.next_delay(MS), Duration::ZERO);
    }

    #[test]
    fn zero_initial_delay_never_waits() {
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO, Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(b.next_delay(MS), Duration::ZERO);
        }
    }
}
