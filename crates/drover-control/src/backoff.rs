//! Launch backoff: instances that end before ever turning healthy slow down the next
//! launches of their group (500 ms doubling to 30 s), so a broken version does not turn into
//! a launch storm; a healthy instance clears it. Soft state: a server restart forgets it.

use crate::group::{Action, InstanceView, Phase};

/// The first delay, doubled with each failure in a row ...
pub const FIRST_DELAY_MS: u64 = 500;
/// ... up to this.
pub const MAX_DELAY_MS: u64 = 30_000;

/// One group's backoff.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchBackoff {
    /// Instances in a row that ended before turning healthy.
    pub failures: u32,
    /// No launch before this time ([`crate::GroupSpec::launch_not_before_ms`]).
    pub not_before_ms: u64,
}

impl LaunchBackoff {
    /// One more instance ended before turning healthy, at `now`: returns the failures in a
    /// row.
    pub fn failed(&mut self, now: u64) -> u32 {
        self.failures += 1;
        self.not_before_ms = now + delay_ms(self.failures);
        self.failures
    }
}

/// Delay before the next launch after `failures` instances in a row ended unhealthy.
pub fn delay_ms(failures: u32) -> u64 {
    if failures == 0 {
        return 0;
    }
    (FIRST_DELAY_MS << (failures - 1).min(10)).min(MAX_DELAY_MS)
}

/// Whether carrying out `action` on `instance` ends a failed launch, which backs off the
/// group's next launches: the instance never turned healthy, and it is not one known only
/// from the store since a server restart (it may have run healthy for days: its end says
/// nothing about its version). A `Forget` counts only for an instance still active (one
/// leaving on a permit, or terminated, was asked to go); a `Terminate` always (what the
/// controller terminates is broken, or overstayed its permit).
pub fn ends_failed_launch(action: &Action, instance: &InstanceView) -> bool {
    let counts = match action {
        Action::Forget { .. } => instance.phase == Phase::Active,
        Action::Terminate { .. } => true,
        _ => false,
    };
    counts && !instance.ever_healthy && !instance.restored
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_to_thirty_seconds_and_a_failure_pushes_launches_back() {
        let delays: Vec<u64> = (0..9).map(delay_ms).collect();
        assert_eq!(
            delays,
            [0, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
        );
        assert_eq!(delay_ms(u32::MAX), MAX_DELAY_MS);
        let mut b = LaunchBackoff::default();
        assert_eq!(b.failed(10_000), 1);
        assert_eq!(b.not_before_ms, 10_500);
        assert_eq!(b.failed(11_000), 2);
        assert_eq!(b.not_before_ms, 12_000);
    }
}
