//! The controller passes of one tick, in their order: the rule both the server's engine and
//! the simulation follow between a tick's autoscale pass and its publishing of targets.
//!
//! A tick reconciles, carries out the decision, and reconciles again while a pass lets
//! instances go (a permit, a termination, a loss frees surge room: their replacements launch
//! now rather than a tick later), at most [`FULL_PASSES`] times. A pass that frees no room is
//! followed by one more reconcile whose only use is its targets (of the groups the actions
//! changed); the last full pass's actions wait for the next tick. The targets published are
//! each group's from its last pass in the tick.

use std::collections::BTreeMap;

use crate::group::{Action, Decision};

/// Most full reconciles in one tick; the actions of all but the last are carried out.
pub const FULL_PASSES: u32 = 3;

/// Where a tick is in its passes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Next {
    /// A full pass, numbered from 0.
    Full(u32),
    /// A last reconcile for its targets only.
    TargetsOnly,
    Done,
}

/// One tick's passes: ask [`TickPasses::wants_pass`], reconcile, give the decision to
/// [`TickPasses::take`], carry out what it returns; then publish [`TickPasses::targets`].
#[derive(Debug)]
pub struct TickPasses {
    next: Next,
    targets: BTreeMap<String, Vec<String>>,
}

/// What to do with one pass's decision ([`TickPasses::take`]).
#[derive(Debug, Default, PartialEq)]
pub struct PassStep {
    /// Carry these out now, in order.
    pub actions: Vec<Action>,
    /// The first pass only: the groups where the server suspects itself, for
    /// [`super::World::note_suspicion`].
    pub suspect: Option<Vec<String>>,
}

impl Default for TickPasses {
    fn default() -> Self {
        TickPasses {
            next: Next::Full(0),
            targets: BTreeMap::new(),
        }
    }
}

impl TickPasses {
    /// Whether the tick reconciles again.
    pub fn wants_pass(&self) -> bool {
        self.next != Next::Done
    }

    /// Take the decision of the reconcile just made: its targets are kept (a later pass's
    /// override an earlier one's, group by group), and what is to be carried out now is
    /// returned.
    pub fn take(&mut self, decision: Decision) -> PassStep {
        let frees_room = decision.frees_room();
        let Decision {
            actions,
            targets,
            suspect,
        } = decision;
        self.targets.extend(targets);
        match std::mem::replace(&mut self.next, Next::Done) {
            Next::Full(n) => {
                let suspect = (n == 0).then_some(suspect);
                if n + 1 == FULL_PASSES {
                    // The last full pass: its actions wait for the next tick.
                    return PassStep {
                        actions: Vec::new(),
                        suspect,
                    };
                }
                self.next = if frees_room {
                    Next::Full(n + 1)
                } else {
                    Next::TargetsOnly
                };
                PassStep { actions, suspect }
            }
            Next::TargetsOnly | Next::Done => PassStep::default(),
        }
    }

    /// Each group's targets from its last pass in the tick.
    pub fn targets(self) -> BTreeMap<String, Vec<String>> {
        self.targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(actions: Vec<Action>, targets: &[&str]) -> Decision {
        Decision {
            actions,
            targets: [(
                "web/a".to_string(),
                targets.iter().map(|s| s.to_string()).collect(),
            )]
            .into_iter()
            .collect(),
            suspect: vec!["web/a".into()],
        }
    }

    fn permit(id: &str) -> Action {
        Action::Permit {
            instance: id.into(),
            reason: "test".into(),
        }
    }

    fn launch() -> Action {
        Action::Launch {
            group: "web/a".into(),
            generation: 1,
        }
    }

    #[test]
    fn a_pass_that_frees_no_room_is_followed_by_one_for_its_targets_only() {
        let mut p = TickPasses::default();
        assert!(p.wants_pass());
        let first = p.take(decision(vec![launch()], &["i-1"]));
        assert_eq!(first.actions.len(), 1, "the launch is carried out");
        assert_eq!(first.suspect, Some(vec!["web/a".to_string()]));
        assert!(
            p.wants_pass(),
            "a reconcile for the targets after the launch"
        );
        let last = p.take(decision(vec![launch()], &["i-1", "i-2"]));
        assert_eq!(
            last,
            PassStep::default(),
            "its actions wait for the next tick"
        );
        assert!(!p.wants_pass());
        assert_eq!(p.targets()["web/a"], ["i-1", "i-2"]);
    }

    #[test]
    fn passes_that_free_room_go_on_up_to_three_and_the_third_does_not_act() {
        let mut p = TickPasses::default();
        let mut acted = 0;
        let mut passes = 0;
        while p.wants_pass() {
            passes += 1;
            let step = p.take(decision(vec![permit(&format!("i-{passes}"))], &[]));
            assert_eq!(
                step.suspect.is_some(),
                passes == 1,
                "suspects: the first pass"
            );
            acted += step.actions.len();
        }
        assert_eq!((passes, acted), (FULL_PASSES as usize, 2));
    }
}
