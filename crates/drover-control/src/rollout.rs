//! A group's rollout record through its life: begun when a new generation becomes
//! preferred, then done, or failed (and, with `auto_revert`, reverted). The server stores the
//! record; the simulation keeps the same one; both change it only here.

use drover_model::record::RolloutRecord;

use crate::group::GroupSpec;

/// The record of a rollout to a new generation preferred from `now`. `prev` is the group's
/// record and generation before (none for a new group). `revert`: an automatic revert, which
/// goes back from generation `reverted_from` (0 for a group reverted along with the one that
/// failed, e.g. an earlier wave's region).
pub fn begin(
    prev: Option<(&RolloutRecord, u64)>,
    now: u64,
    revert: bool,
    reverted_from: u64,
) -> RolloutRecord {
    RolloutRecord {
        since_ms: now,
        open: true,
        // A superseded, unfinished rollout did not make its generation good; with no good
        // one before it (a new group), it is the best there is.
        good_generation: prev
            .map(|(r, generation)| {
                // A rollout still open, or one that failed, did not make its generation
                // good: the earlier good one stays (a revert's rollout must not count the
                // broken generation it leaves as good).
                if (r.open || r.failed_generation == generation) && r.good_generation > 0 {
                    r.good_generation
                } else {
                    generation
                }
            })
            .unwrap_or(0),
        reverted_from,
        failed_generation: prev.map(|(r, _)| r.failed_generation).unwrap_or(0),
        failure: prev.and_then(|(r, _)| r.failure.clone()),
        // A new rollout starts unpaused, with its canary stage ahead; an automatic revert
        // goes back to what ran healthy: no canary stage.
        paused: false,
        resumed_ms: 0,
        canary_baking_ms: 0,
        canary_passed: revert,
        analysis: None,
        wave_pending: false,
        held: false,
        done_ms: 0,
    }
}

/// The rollout to `generation` is done at `now`: it is the group's good generation. Returns
/// what the event says (`versions`: what it runs, e.g. `app=v2`).
pub fn done(r: &mut RolloutRecord, generation: u64, versions: &str, now: u64) -> String {
    r.open = false;
    r.good_generation = generation;
    r.done_ms = now;
    let secs = now.saturating_sub(r.since_ms) as f64 / 1000.0;
    if r.reverted_from > 0 {
        format!(
            "revert of generation {} to generation {generation} ({versions}) done in {secs:.1}s",
            r.reverted_from
        )
    } else {
        format!("rollout to generation {generation} ({versions}) done in {secs:.1}s")
    }
}

/// What follows a failed rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// `auto_revert`: a new generation with the content of generation `to`.
    Revert { to: u64 },
    /// The group stays on the failed generation until a person acts.
    Stay,
}

/// The rollout to `generation` failed for `reason`. Returns what follows, and what the event
/// says.
pub fn failed(
    r: &mut RolloutRecord,
    generation: u64,
    reason: &str,
    auto_revert: bool,
) -> (AfterFailure, String) {
    r.open = false;
    r.paused = false;
    r.failed_generation = generation;
    r.failure = Some(reason.to_string());
    let good = r.good_generation;
    let (after, next) = if auto_revert && good > 0 {
        (
            AfterFailure::Revert { to: good },
            format!("; auto_revert: going back to generation {good}"),
        )
    } else if good == 0 {
        (
            AfterFailure::Stay,
            "; no earlier good generation to go back to".to_string(),
        )
    } else {
        (
            AfterFailure::Stay,
            "; auto_revert is off: fix the version or `drover rollback`".to_string(),
        )
    };
    (
        after,
        format!("rollout to generation {generation} failed: {reason}{next}"),
    )
}

/// What a person's action on an open rollout did ([`control`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Controlled {
    /// The answer for the group (`paused`, `already paused`, `aborted; going back to ...`).
    pub result: String,
    /// The `rollout` event, when the record changed (store the record with it).
    pub event: Option<String>,
    /// An abort with an earlier good generation: revert to it ([`revert_to`]).
    pub revert_to: Option<u64>,
}

/// A person's action on the open rollout to `generation` (`drover rollout pause|resume|
/// promote|abort`): the record as it changes, what to answer and say. A pause holds across
/// restarts because it lives in the record; a promote ends the canary stage (only where the
/// service has a canary, else it resumes); an abort fails the rollout and goes back to the
/// last good generation, if any.
pub fn control(
    r: &mut RolloutRecord,
    generation: u64,
    action: drover_model::api::RolloutAction,
    has_canary: bool,
    now: u64,
) -> Controlled {
    use drover_model::api::RolloutAction;
    let verb = match action {
        RolloutAction::Pause => "pause",
        RolloutAction::Resume => "resume",
        RolloutAction::Promote => "promote",
        RolloutAction::Abort => "abort",
    };
    let answer = |result: &str, event: Option<String>| Controlled {
        result: result.to_string(),
        event,
        revert_to: None,
    };
    match action {
        RolloutAction::Pause if r.paused => answer("already paused", None),
        RolloutAction::Pause => {
            r.paused = true;
            answer(
                "paused",
                Some(format!(
                    "rollout to generation {generation} paused (drover rollout pause): no permit and nothing new launched until `drover rollout resume`"
                )),
            )
        }
        RolloutAction::Promote if !r.paused && !r.canary_passed && has_canary => {
            r.canary_passed = true;
            answer(
                "promoted",
                Some(format!(
                    "rollout to generation {generation} promoted (drover rollout promote): the canary stage ends, the rollout goes on"
                )),
            )
        }
        RolloutAction::Resume | RolloutAction::Promote if !r.paused => {
            answer("not paused: it goes on already", None)
        }
        RolloutAction::Resume | RolloutAction::Promote => {
            r.paused = false;
            r.resumed_ms = now;
            if action == RolloutAction::Promote {
                r.canary_passed = true;
            }
            answer(
                "resumed",
                Some(format!(
                    "rollout to generation {generation} resumed (drover rollout {verb})"
                )),
            )
        }
        RolloutAction::Abort => {
            r.open = false;
            r.paused = false;
            r.failed_generation = generation;
            let why = "aborted by a person (drover rollout abort)";
            r.failure = Some(why.to_string());
            let good = r.good_generation;
            let revert_to = (good > 0 && good != generation).then_some(good);
            let next = match revert_to {
                Some(good) => format!("; going back to generation {good}"),
                None => "; no earlier good generation to go back to".to_string(),
            };
            Controlled {
                result: format!("aborted{next}"),
                event: Some(format!(
                    "rollout to generation {generation} failed: {why}{next}"
                )),
                revert_to,
            }
        }
    }
}

/// What an automatic revert puts back ([`revert_to`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevertTo {
    pub service: String,
    /// The revision that planned the good generation: its components are taken back whole
    /// from it (a broken change may be more than a version: an artifact's sha256 that goes
    /// with it, arguments, environment).
    pub revision: u64,
    /// The good generation's components and their versions (what to take back, and the
    /// versions to set when that revision is no longer stored).
    pub versions: Vec<(String, String)>,
}

/// What an automatic revert to `good` (the plan of [`AfterFailure::Revert`]'s generation)
/// puts back: every component of that plan, as the revision that planned it had them. The
/// shells carry it out: the server on the fleet file's text, the simulation on the fleet.
pub fn revert_to(good: &drover_model::Plan) -> RevertTo {
    RevertTo {
        service: good.service.clone(),
        revision: good.revision,
        versions: good
            .components
            .iter()
            .map(|c| (c.name.clone(), c.version.clone()))
            .collect(),
    }
}

/// What the group controller reads of the rollout record.
pub fn apply_to_spec(r: &RolloutRecord, spec: &mut GroupSpec) {
    spec.generation_since_ms = r.since_ms;
    spec.rollout_open = r.open;
    spec.good_generation = r.good_generation;
    spec.paused = r.paused;
    spec.resumed_ms = r.resumed_ms;
    if let Some(c) = &mut spec.canary {
        c.baking_since_ms = r.canary_baking_ms;
    }
    if r.canary_passed {
        spec.canary = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_person_pauses_resumes_promotes_and_aborts_an_open_rollout() {
        use drover_model::api::RolloutAction::*;
        let mut r = begin(None, 0, false, 0);
        done(&mut r, 1, "app=v1", 10);
        let mut r = begin(Some((&r, 1)), 20, false, 0);
        let paused = control(&mut r, 2, Pause, false, 30);
        assert!(r.paused && paused.event.is_some() && paused.revert_to.is_none());
        assert_eq!(
            control(&mut r, 2, Pause, false, 31).result,
            "already paused"
        );
        assert!(r.paused);
        // Promote without a canary resumes it.
        let resumed = control(&mut r, 2, Promote, false, 40);
        assert_eq!(resumed.result, "resumed");
        assert!(!r.paused && r.resumed_ms == 40);
        assert_eq!(
            control(&mut r, 2, Resume, false, 41).result,
            "not paused: it goes on already"
        );
        assert!(
            r.canary_passed,
            "a promote that resumed ends the canary stage too"
        );
        // Not paused, in its canary stage: a promote ends the stage.
        let mut canary = r.clone();
        canary.canary_passed = false;
        let promoted = control(&mut canary, 2, Promote, true, 42);
        assert_eq!(promoted.result, "promoted");
        assert!(canary.canary_passed && !canary.paused);
        let aborted = control(&mut r, 2, Abort, true, 50);
        assert_eq!(aborted.revert_to, Some(1));
        assert_eq!(aborted.result, "aborted; going back to generation 1");
        assert!(!r.open && r.failed_generation == 2);
        // No earlier good generation: nothing to go back to.
        let mut first = begin(None, 0, false, 0);
        let nothing = control(&mut first, 1, Abort, false, 5);
        assert_eq!(nothing.revert_to, None);
        assert!(nothing
            .event
            .unwrap()
            .ends_with("no earlier good generation to go back to"));
    }

    /// The revert's own rollout keeps the generation before the failure as the good one: if
    /// the revert fails too, it does not go back to the broken generation.
    #[test]
    fn a_revert_after_a_failure_keeps_the_earlier_good_generation() {
        let mut r = begin(None, 0, false, 0);
        done(&mut r, 1, "app=v1", 10);
        let mut second = begin(Some((&r, 1)), 20, false, 0);
        assert_eq!(second.good_generation, 1);
        let (after, _) = failed(&mut second, 2, "crashes", true);
        assert_eq!(after, AfterFailure::Revert { to: 1 });
        let revert = begin(Some((&second, 2)), 30, true, 2);
        assert_eq!(revert.good_generation, 1, "not the broken generation 2");
    }

    #[test]
    fn a_rollout_begins_is_done_or_fails_and_reverts_to_the_last_good_generation() {
        let first = begin(None, 1_000, false, 0);
        assert!(first.open && first.good_generation == 0 && !first.canary_passed);
        let mut r = first;
        assert_eq!(
            done(&mut r, 1, "app=v1", 3_500),
            "rollout to generation 1 (app=v1) done in 2.5s"
        );
        assert!(!r.open && r.good_generation == 1 && r.done_ms == 3_500);
        // Generation 2, superseded by 3 before it was done: 1 stays the good one.
        let second = begin(Some((&r, 1)), 10_000, false, 0);
        assert_eq!(second.good_generation, 1);
        let third = begin(Some((&second, 2)), 11_000, false, 0);
        assert_eq!(third.good_generation, 1, "2 never finished");
        let mut r = third;
        let (after, msg) = failed(&mut r, 3, "never healthy", true);
        assert_eq!(after, AfterFailure::Revert { to: 1 });
        assert_eq!(
            msg,
            "rollout to generation 3 failed: never healthy; auto_revert: going back to generation 1"
        );
        assert_eq!((r.failed_generation, r.open), (3, false));
        let mut revert = begin(Some((&r, 3)), 20_000, true, 3);
        assert!(revert.canary_passed, "a revert has no canary stage");
        assert_eq!(revert.failed_generation, 3);
        assert_eq!(
            done(&mut revert, 4, "app=v1", 21_000),
            "revert of generation 3 to generation 4 (app=v1) done in 1.0s"
        );
        // Without auto_revert, or without a good generation: it stays.
        let mut r = begin(None, 0, false, 0);
        assert_eq!(failed(&mut r, 1, "x", true).0, AfterFailure::Stay);
        let mut r = begin(Some((&revert, 4)), 0, false, 0);
        let (after, msg) = failed(&mut r, 5, "x", false);
        assert_eq!(after, AfterFailure::Stay);
        assert!(msg.ends_with("auto_revert is off: fix the version or `drover rollback`"));
    }
}
