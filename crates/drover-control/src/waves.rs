//! Waves across regions: which groups of a service may take the change next. A change reaches
//! a wave's groups once every group of the earlier waves has finished its rollout (none open,
//! none failed) and the last of them finished `wave_bake` ago. A failed wave stops every later
//! one. Pure; the server and the simulation call it.

/// What the rule must know of one group of the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaveGroup {
    pub group: String,
    /// 0 = the first wave.
    pub wave: usize,
    /// The fleet's change has not reached it yet (its plan is held).
    pub pending: bool,
    /// Its rollout is under way.
    pub open: bool,
    /// Its last rollout failed (and nothing good came after).
    pub failed: bool,
    /// When its last rollout finished (ms; 0: unknown or long ago).
    pub done_ms: u64,
}

/// The groups to release now, and their wave; `None` when none may go yet.
pub fn release(groups: &[WaveGroup], wave_bake_ms: u64, now: u64) -> Option<(usize, Vec<String>)> {
    let next = groups.iter().filter(|g| g.pending).map(|g| g.wave).min()?;
    let earlier: Vec<&WaveGroup> = groups.iter().filter(|g| g.wave < next).collect();
    if earlier.iter().any(|g| g.open || g.failed || g.pending) {
        return None;
    }
    let finished = earlier.iter().map(|g| g.done_ms).max().unwrap_or(0);
    if now < finished.saturating_add(wave_bake_ms) {
        return None;
    }
    let mut out: Vec<String> = groups
        .iter()
        .filter(|g| g.pending && g.wave == next)
        .map(|g| g.group.clone())
        .collect();
    out.sort();
    Some((next, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(
        group: &str,
        wave: usize,
        pending: bool,
        open: bool,
        failed: bool,
        done_ms: u64,
    ) -> WaveGroup {
        WaveGroup {
            group: group.into(),
            wave,
            pending,
            open,
            failed,
            done_ms,
        }
    }

    #[test]
    fn a_wave_goes_once_the_earlier_ones_are_done_and_baked() {
        let mut groups = vec![
            g("web/a", 0, false, true, false, 0),
            g("web/b", 1, true, false, false, 0),
            g("web/c", 1, true, false, false, 0),
            g("web/d", 2, true, false, false, 0),
        ];
        assert_eq!(
            release(&groups, 10_000, 100_000),
            None,
            "wave 1 still rolls out"
        );
        groups[0].open = false;
        groups[0].done_ms = 95_000;
        assert_eq!(release(&groups, 10_000, 100_000), None, "baking");
        assert_eq!(
            release(&groups, 10_000, 105_000),
            Some((1, vec!["web/b".to_string(), "web/c".to_string()]))
        );
        // Wave 3 waits for both of wave 2.
        groups[1].pending = false;
        groups[1].open = true;
        groups[2].pending = false;
        groups[2].done_ms = 120_000;
        assert_eq!(release(&groups, 10_000, 200_000), None);
        groups[1].open = false;
        groups[1].done_ms = 130_000;
        assert_eq!(release(&groups, 10_000, 139_999), None);
        assert_eq!(
            release(&groups, 10_000, 140_000),
            Some((2, vec!["web/d".to_string()]))
        );
    }

    #[test]
    fn a_failed_wave_stops_every_later_one() {
        let groups = vec![
            g("web/a", 0, false, false, true, 50_000),
            g("web/b", 1, true, false, false, 0),
        ];
        assert_eq!(release(&groups, 0, 1_000_000), None);
        // Nothing pending: nothing to release.
        assert_eq!(
            release(&[g("web/a", 0, false, false, false, 0)], 0, 5),
            None
        );
    }
}
