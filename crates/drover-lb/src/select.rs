//! Target selection: a pure function of the candidates' state and a cursor, so each policy
//! is tested without sockets.

use crate::config::Policy;

/// What selection needs to know about one target, in target-set order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Open (or being opened) connections to this target.
    pub active: usize,
    /// Its last connect failed recently: avoided while any unpenalized candidate remains.
    pub penalized: bool,
    /// Never chosen: already tried for this client connection, or no longer in rotation.
    pub excluded: bool,
}

/// Index of the target to connect to, or `None` when every candidate is excluded.
///
/// `cursor` advances by one per client connection; the scan starts at `cursor % len`, so
/// round-robin walks the targets in turn and least-connections breaks ties in turn.
/// Penalized candidates are chosen only when no unpenalized, unexcluded one is left.
pub fn select_target(policy: Policy, candidates: &[Candidate], cursor: usize) -> Option<usize> {
    select_by(policy, candidates.len(), cursor, |i| candidates[i])
}

/// [`select_target`] over `len` candidates produced on demand (possibly more than once
/// each), so the hot path reads the targets' counters in place instead of collecting them.
pub(crate) fn select_by(
    policy: Policy,
    len: usize,
    cursor: usize,
    candidate: impl Fn(usize) -> Candidate,
) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let start = cursor % len;
    let order = (0..len).map(|k| {
        let i = start + k;
        if i >= len {
            i - len
        } else {
            i
        }
    });
    match policy {
        Policy::RoundRobin => {
            let mut first_penalized = None;
            for i in order {
                let c = candidate(i);
                if c.excluded {
                    continue;
                }
                if !c.penalized {
                    return Some(i);
                }
                first_penalized.get_or_insert(i);
            }
            first_penalized
        }
        Policy::LeastConnections => {
            // The fewest open among fresh candidates; among penalized ones only if no
            // fresh one is left. Strict `<` keeps the first of equal minima: the one
            // nearest the cursor.
            let mut any_fresh = false;
            let mut best: Option<(usize, usize)> = None;
            let mut best_penalized: Option<(usize, usize)> = None;
            for i in order {
                let c = candidate(i);
                if c.excluded {
                    continue;
                }
                let slot = if c.penalized {
                    &mut best_penalized
                } else {
                    any_fresh = true;
                    &mut best
                };
                match slot {
                    Some((_, active)) if *active <= c.active => {}
                    _ => *slot = Some((i, c.active)),
                }
            }
            if any_fresh { best } else { best_penalized }.map(|(i, _)| i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idle(n: usize) -> Vec<Candidate> {
        vec![Candidate::default(); n]
    }

    #[test]
    fn empty_or_all_excluded_selects_nothing() {
        assert_eq!(select_target(Policy::RoundRobin, &[], 0), None);
        assert_eq!(select_target(Policy::LeastConnections, &[], 7), None);
        let all_out = vec![
            Candidate {
                excluded: true,
                ..Default::default()
            };
            3
        ];
        assert_eq!(select_target(Policy::RoundRobin, &all_out, 0), None);
        assert_eq!(select_target(Policy::LeastConnections, &all_out, 0), None);
    }

    #[test]
    fn round_robin_walks_targets_in_turn() {
        let c = idle(3);
        let picks: Vec<_> = (0..9)
            .map(|cursor| select_target(Policy::RoundRobin, &c, cursor))
            .collect();
        let want: Vec<_> = [0, 1, 2, 0, 1, 2, 0, 1, 2].into_iter().map(Some).collect();
        assert_eq!(picks, want);
    }

    #[test]
    fn round_robin_ignores_active_counts() {
        let mut c = idle(2);
        c[0].active = 100;
        assert_eq!(select_target(Policy::RoundRobin, &c, 0), Some(0));
    }

    #[test]
    fn excluded_targets_are_skipped_to_the_next() {
        let mut c = idle(3);
        c[1].excluded = true;
        assert_eq!(select_target(Policy::RoundRobin, &c, 1), Some(2));
        c[2].excluded = true;
        assert_eq!(select_target(Policy::RoundRobin, &c, 1), Some(0));
    }

    #[test]
    fn penalized_targets_are_avoided_unless_only_they_remain() {
        let mut c = idle(3);
        c[0].penalized = true;
        assert_eq!(select_target(Policy::RoundRobin, &c, 0), Some(1));
        assert_eq!(select_target(Policy::LeastConnections, &c, 0), Some(1));
        c[1].excluded = true;
        c[2].excluded = true;
        assert_eq!(select_target(Policy::RoundRobin, &c, 0), Some(0));
        c[1].excluded = false;
        c[1].penalized = true;
        // Both left are penalized: take them anyway, in turn.
        assert_eq!(select_target(Policy::RoundRobin, &c, 1), Some(1));
    }

    #[test]
    fn penalized_target_with_fewest_connections_loses_to_a_healthy_one() {
        let mut c = idle(2);
        c[0].penalized = true;
        c[1].active = 50;
        assert_eq!(select_target(Policy::LeastConnections, &c, 0), Some(1));
    }

    #[test]
    fn least_connections_picks_the_fewest() {
        let c = [3, 1, 2]
            .into_iter()
            .map(|active| Candidate {
                active,
                ..Default::default()
            })
            .collect::<Vec<_>>();
        for cursor in 0..6 {
            assert_eq!(select_target(Policy::LeastConnections, &c, cursor), Some(1));
        }
    }

    #[test]
    fn least_connections_breaks_ties_round_robin() {
        let mut c = idle(3);
        c[1].active = 5;
        assert_eq!(select_target(Policy::LeastConnections, &c, 0), Some(0));
        assert_eq!(select_target(Policy::LeastConnections, &c, 1), Some(2));
        assert_eq!(select_target(Policy::LeastConnections, &c, 2), Some(2));
        assert_eq!(select_target(Policy::LeastConnections, &c, 3), Some(0));
    }

    #[test]
    fn cursor_wraps_without_overflow() {
        let c = idle(3);
        assert_eq!(
            select_target(Policy::RoundRobin, &c, usize::MAX),
            Some(usize::MAX % 3)
        );
    }
}
