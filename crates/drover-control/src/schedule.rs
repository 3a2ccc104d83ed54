//! Scheduled capacity: the rules that raise a group's bounds ahead of demand, from the fleet
//! file's `[[services.NAME.schedule]]` and one-off scheduled changes (`drover scale web 50
//! --at ...`), given `now` (ms since the epoch). No I/O, no clock of its own.
//!
//! The rules, in order (docs/autoscaling.md says the same to users):
//! 1. A schedule is *active* from each firing of its cron (read in its time zone) for its
//!    duration; a one-off from its start to its end, unless cancelled.
//! 2. While any is active, the group's bounds are the highest of the file's capacity and of
//!    every active schedule: the highest `min` wins, and so does the highest `max` (never
//!    below that `min`). The active schedule with the highest `min` is the *cause*.
//! 3. When a schedule begins, the desired count rises to its `desired` (else its `min`) if it
//!    is lower, clamped to the bounds; the autoscaler goes on from there ([`step`]).
//! 4. While it holds, the count stays within the raised bounds; autoscaling moves within them,
//!    and a manual count is kept, clamped to them ([`manual`]).
//! 5. When the last one ends, the bounds drop back. A group with autoscaling scales in
//!    through its usual stabilization; one without goes back to the count it had before the
//!    schedule raised it (or to the count a person set meanwhile), within the bounds.

use std::collections::BTreeMap;

use drover_model::api::{ScheduleWindow, ScheduledScale};
use drover_model::cron::{format_in, format_until, parse_tz, CronTz, Tz};
use drover_model::fleet::Schedule;

use crate::ScaleDecision;

/// The schedules of one group, and the capacity range of its service that they raise.
#[derive(Clone, Debug)]
pub struct Schedules<'a> {
    pub service: &'a str,
    pub region: &'a str,
    /// The fleet file's `capacity.min` and `capacity.max`.
    pub base_min: u32,
    pub base_max: u32,
    /// The service's `[[schedule]]` tables, in file order (`web#0`, `web#1`, ...).
    pub file: &'a [Schedule],
    /// One-off scheduled changes (any service's: those of other services or regions, and
    /// cancelled ones, are skipped).
    pub once: &'a [ScheduledScale],
}

/// A group's bounds at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
    /// The active window with the highest min (the first of equals): what the bounds are
    /// raised by. None: no schedule is active, the bounds are the file's.
    pub cause: Option<ScheduleWindow>,
    /// Every active window, file schedules first, then one-offs by id.
    pub active: Vec<ScheduleWindow>,
    /// The next window to begin after now.
    pub next: Option<ScheduleWindow>,
}

impl Bounds {
    /// What raised the bounds, for reasons: `min 20, max 40 from schedule web#0 (...)`.
    pub fn by(&self) -> Option<String> {
        let c = self.cause.as_ref()?;
        Some(format!(
            "{}..{} from {} until {}",
            self.min,
            self.max,
            c.what,
            until(c)
        ))
    }
}

fn tz_of(w: &ScheduleWindow) -> Tz {
    parse_tz(&w.timezone).unwrap_or(Tz::UTC)
}

fn until(w: &ScheduleWindow) -> String {
    format_until(w.end_ms, w.start_ms, tz_of(w))
}

/// The id of the `index`-th schedule of `service` in the file: `web#0`.
pub fn file_id(service: &str, index: usize) -> String {
    format!("{service}#{index}")
}

/// The window of a file schedule that begins at `start_ms`.
fn file_window(service: &str, index: usize, s: &Schedule, start_ms: u64) -> ScheduleWindow {
    let id = file_id(service, index);
    ScheduleWindow {
        what: format!("schedule {id} ({} {})", s.cron.trim(), s.timezone),
        id,
        start_ms,
        end_ms: start_ms.saturating_add(s.duration.as_millis()),
        min: s.min,
        desired: s.desired,
        max: s.max,
        timezone: s.timezone.clone(),
    }
}

/// The window of a one-off.
pub fn once_window(o: &ScheduledScale) -> ScheduleWindow {
    let tz = parse_tz(&o.timezone).unwrap_or(Tz::UTC);
    let dur = drover_model::Dur::from_millis(o.end_ms.saturating_sub(o.start_ms));
    ScheduleWindow {
        id: o.id.to_string(),
        what: format!(
            "schedule {} (scale {} to {} at {} for {dur})",
            o.id,
            o.service,
            o.desired,
            format_in(o.start_ms, tz)
        ),
        start_ms: o.start_ms,
        end_ms: o.end_ms,
        min: Some(o.desired),
        desired: Some(o.desired),
        max: Some(o.desired),
        timezone: o.timezone.clone(),
    }
}

/// The next `n` windows of one file schedule that begin after `after_ms` (what `plan` shows).
/// Empty when the schedule does not parse (validation refuses it before).
pub fn next_firings(
    service: &str,
    index: usize,
    s: &Schedule,
    after_ms: u64,
    n: usize,
) -> Vec<ScheduleWindow> {
    let Ok(cron) = CronTz::parse(&s.cron, &s.timezone) else {
        return Vec::new();
    };
    cron.next_firings(after_ms, n)
        .into_iter()
        .map(|t| file_window(service, index, s, t))
        .collect()
}

impl Schedules<'_> {
    fn once_here(&self) -> impl Iterator<Item = &ScheduledScale> {
        self.once.iter().filter(|o| {
            o.service == self.service
                && o.cancelled_ms.is_none()
                && o.region.as_deref().is_none_or(|r| r == self.region)
        })
    }

    /// The bounds at `now`, what raises them, and the next window.
    pub fn bounds(&self, now: u64) -> Bounds {
        let mut active = Vec::new();
        let mut next: Option<ScheduleWindow> = None;
        let mut consider_next = |w: ScheduleWindow| {
            if next.as_ref().is_none_or(|n| w.start_ms < n.start_ms) {
                next = Some(w);
            }
        };
        for (i, s) in self.file.iter().enumerate() {
            let Ok(cron) = CronTz::parse(&s.cron, &s.timezone) else {
                continue;
            };
            // Every window has the same length, so the latest firing ends last.
            if let Some(start) = cron.last_at_or_before(now) {
                let w = file_window(self.service, i, s, start);
                if now < w.end_ms {
                    active.push(w);
                }
            }
            if let Some(start) = cron.next_after(now) {
                consider_next(file_window(self.service, i, s, start));
            }
        }
        for o in self.once_here() {
            let w = once_window(o);
            if w.start_ms <= now && now < w.end_ms {
                active.push(w);
            } else if w.start_ms > now {
                consider_next(w);
            }
        }
        let mut min = self.base_min;
        let mut max = self.base_max;
        let mut cause: Option<&ScheduleWindow> = None;
        for w in &active {
            if let Some(m) = w.min {
                if m > min || (cause.is_none() && m >= min) {
                    min = m.max(min);
                    cause = Some(w);
                }
            }
            max = max.max(w.max.unwrap_or(0));
        }
        let cause = cause.or(active.first()).cloned();
        Bounds {
            min,
            max: max.max(min),
            cause,
            active,
            next,
        }
    }

    /// Every window that begins after `after_ms`, the next `n` of all the group's schedules.
    pub fn upcoming(&self, after_ms: u64, n: usize) -> Vec<ScheduleWindow> {
        let mut all: Vec<ScheduleWindow> = self
            .file
            .iter()
            .enumerate()
            .flat_map(|(i, s)| next_firings(self.service, i, s, after_ms, n))
            .chain(
                self.once_here()
                    .map(once_window)
                    .filter(|w| w.start_ms > after_ms),
            )
            .collect();
        all.sort_by(|a, b| (a.start_ms, &a.id).cmp(&(b.start_ms, &b.id)));
        all.truncate(n);
        all
    }
}

/// What the schedule rules remember of a group, so that each window begins and ends once
/// (across server restarts: the server stores it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScheduleMemory {
    /// Schedule id -> start of the last window seen beginning.
    pub began: BTreeMap<String, u64>,
    /// Schedule id -> start of the last window seen ending.
    pub ended: BTreeMap<String, u64>,
    /// The desired count before the first of the active windows raised it, or the one a
    /// person set while they hold (groups without autoscaling go back to it at the end).
    pub restore: Option<u32>,
}

/// What [`step`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleStep {
    pub bounds: Bounds,
    /// Windows that began or ended, each a `schedule` event's message.
    pub notes: Vec<String>,
    /// A new desired count, and why (naming the schedule).
    pub decision: Option<ScaleDecision>,
    /// The decision sets a count the autoscaler goes on from (a window began).
    pub sets_count: bool,
    /// `memory` changed (the server stores it).
    pub remembered: bool,
}

fn raised(w: &ScheduleWindow, base_min: u32, base_max: u32) -> String {
    let mut parts = Vec::new();
    if let Some(m) = w.min.filter(|m| *m > base_min) {
        parts.push(format!("min to {m}"));
    }
    if let Some(d) = w.desired {
        parts.push(format!("desired to {d}"));
    }
    if let Some(m) = w.max.filter(|m| *m > base_max) {
        parts.push(format!("max to {m}"));
    }
    if parts.is_empty() {
        "raised nothing above the file's capacity".to_string()
    } else {
        format!("raised {}", parts.join(", "))
    }
}

/// One pass of the rules for a group whose desired count is `desired`: note the windows that
/// began or ended since the last pass, and move the count where the rules say. Deterministic
/// in its inputs, `now` and `memory`.
pub fn step(
    now: u64,
    schedules: &Schedules<'_>,
    desired: u32,
    autoscaled: bool,
    memory: &mut ScheduleMemory,
) -> ScheduleStep {
    let b = schedules.bounds(now);
    let mut notes = Vec::new();
    let mut remembered = false;
    // Ended: a window seen beginning that is no longer active (over, cancelled, or removed
    // from the file).
    let mut ended: Vec<String> = Vec::new();
    for (id, start) in &memory.began {
        if memory.ended.get(id) == Some(start) || b.active.iter().any(|w| &w.id == id) {
            continue;
        }
        ended.push(id.clone());
    }
    for id in &ended {
        let start = memory.began[id];
        memory.ended.insert(id.clone(), start);
        remembered = true;
        let now_held = match &b.cause {
            Some(_) => format!("bounds {}", b.by().unwrap_or_default()),
            None => format!(
                "min back to {}, max back to {} (the fleet file's)",
                b.min, b.max
            ),
        };
        notes.push(format!("schedule {id} ended: {now_held}"));
    }
    // Began: an active window not seen beginning yet.
    let mut start_to: Option<(u32, &ScheduleWindow)> = None;
    for w in &b.active {
        if memory.began.get(&w.id) == Some(&w.start_ms) {
            continue;
        }
        memory.began.insert(w.id.clone(), w.start_ms);
        remembered = true;
        notes.push(format!(
            "{} {} until {}",
            w.what,
            raised(w, schedules.base_min, schedules.base_max),
            until(w)
        ));
        if let Some(n) = w.desired.or(w.min) {
            if start_to.is_none_or(|(m, _)| n > m) {
                start_to = Some((n, w));
            }
        }
    }
    let mut decision = None;
    let mut sets_count = false;
    let clamp = |n: u32| n.clamp(b.min, b.max);
    if let Some((n, w)) = start_to {
        let to = clamp(n.max(desired));
        if to != desired {
            if memory.restore.is_none() {
                memory.restore = Some(desired);
                remembered = true;
            }
            decision = Some(ScaleDecision {
                from: desired,
                to,
                reason: format!(
                    "{} began: desired {to} until {}; autoscaling goes on from here within {}..{}",
                    w.what,
                    until(w),
                    b.min,
                    b.max
                ),
            });
            sets_count = true;
        }
    } else if !ended.is_empty() && memory.restore.is_some() {
        let what = ended.join(", ");
        if b.active.is_empty() {
            let r = memory.restore.take().unwrap_or(desired);
            remembered = true;
            if !autoscaled && clamp(r) != desired {
                decision = Some(ScaleDecision {
                    from: desired,
                    to: clamp(r),
                    reason: format!("schedule {what} ended: back to the count before it"),
                });
                sets_count = true;
            }
        } else if !autoscaled {
            let still = b.active.iter().filter_map(|w| w.desired.or(w.min)).max();
            let to = clamp(memory.restore.unwrap_or(desired).max(still.unwrap_or(0)));
            if to < desired {
                decision = Some(ScaleDecision {
                    from: desired,
                    to,
                    reason: format!(
                        "schedule {what} ended: down to what the schedules still active ask for ({})",
                        b.by().unwrap_or_default()
                    ),
                });
                sets_count = true;
            }
        }
    }
    let current = decision.as_ref().map_or(desired, |d| d.to);
    if clamp(current) != current {
        let to = clamp(current);
        let reason = match (&b.cause, ended.is_empty()) {
            (Some(_), _) => format!(
                "{current} is outside the raised bounds {}",
                b.by().unwrap_or_default()
            ),
            (None, false) => format!(
                "schedule {} ended: {current} is above the fleet file's max {}",
                ended.join(", "),
                b.max
            ),
            (None, true) => format!(
                "{current} is outside the fleet file's min..max {}..{}",
                b.min, b.max
            ),
        };
        decision = Some(ScaleDecision {
            from: desired,
            to,
            reason,
        });
    }
    if decision.as_ref().is_some_and(|d| d.from == d.to) {
        decision = None;
    }
    ScheduleStep {
        bounds: b,
        notes,
        decision,
        sets_count,
        remembered,
    }
}

/// A person sets `count` (`drover scale`). Outside schedules, a count outside the file's
/// min..max is refused (`Err`, the message). While a schedule holds, the count is kept,
/// clamped to the raised bounds (`Ok` with the count and a note saying so), and when the
/// schedules end a group without autoscaling goes back to the person's count (within the
/// file's bounds), not to the one from before the schedule.
pub fn manual(
    count: u32,
    service: &str,
    bounds: &Bounds,
    memory: &mut ScheduleMemory,
) -> Result<(u32, Option<String>), String> {
    let Some(by) = bounds.by() else {
        if count < bounds.min || count > bounds.max {
            return Err(format!(
                "{count} is outside {service}'s capacity range min..max = {}..{}; choose a count in that range, or change capacity in the fleet file and apply it",
                bounds.min, bounds.max
            ));
        }
        return Ok((count, None));
    };
    // The person's count is what the group goes back to (within the file's bounds).
    memory.restore = Some(count);
    let to = count.clamp(bounds.min, bounds.max);
    let note = (to != count).then(|| format!("{count} clamped to {to}: bounds {by}"));
    Ok((to, note))
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::cron::parse_time;
    use drover_model::Dur;

    fn t(s: &str) -> u64 {
        parse_time(s, Tz::UTC).unwrap()
    }

    fn sat() -> Schedule {
        Schedule {
            cron: "0 17 * * SAT".into(),
            timezone: "Europe/London".into(),
            duration: Dur::from_secs(4 * 3600),
            min: Some(20),
            desired: Some(30),
            max: Some(40),
        }
    }

    fn once(id: u64, desired: u32, start: &str, end: &str) -> ScheduledScale {
        ScheduledScale {
            id,
            service: "web".into(),
            region: None,
            desired,
            start_ms: t(start),
            end_ms: t(end),
            timezone: "UTC".into(),
            created_ms: 0,
            cancelled_ms: None,
        }
    }

    fn sch<'a>(file: &'a [Schedule], once: &'a [ScheduledScale]) -> Schedules<'a> {
        Schedules {
            service: "web",
            region: "local",
            base_min: 3,
            base_max: 10,
            file,
            once,
        }
    }

    #[test]
    fn bounds_rise_while_a_schedule_holds_and_the_highest_min_wins() {
        let file = [sat()];
        let o = [once(7, 25, "2026-10-31 18:00", "2026-10-31 19:00")];
        let s = sch(&file, &o);
        let before = s.bounds(t("2026-10-31 16:59"));
        assert_eq!((before.min, before.max, before.cause), (3, 10, None));
        assert_eq!(before.next.unwrap().start_ms, t("2026-10-31 17:00"));
        let at = s.bounds(t("2026-10-31 17:00"));
        assert_eq!((at.min, at.max), (20, 40));
        assert_eq!(at.cause.unwrap().id, "web#0");
        let both = s.bounds(t("2026-10-31 18:30"));
        assert_eq!((both.min, both.max), (25, 40), "the one-off's min 25 wins");
        assert_eq!(both.cause.unwrap().id, "7");
        let after = s.bounds(t("2026-10-31 21:00"));
        assert_eq!((after.min, after.max, after.active.len()), (3, 10, 0));
    }

    #[test]
    fn a_window_begins_and_ends_once_and_a_plain_group_goes_back() {
        let file = [sat()];
        let s = sch(&file, &[]);
        let mut m = ScheduleMemory::default();
        let r = step(t("2026-10-31 17:00"), &s, 3, false, &mut m);
        let d = r.decision.unwrap();
        assert_eq!((d.from, d.to), (3, 30));
        assert!(
            d.reason.contains("web#0 (0 17 * * SAT Europe/London)"),
            "{}",
            d.reason
        );
        assert_eq!(r.notes.len(), 1);
        assert!(
            r.notes[0].contains("raised min to 20, desired to 30, max to 40 until 21:00 GMT"),
            "{}",
            r.notes[0]
        );
        assert_eq!(m.restore, Some(3));
        let again = step(t("2026-10-31 17:01"), &s, 30, false, &mut m);
        assert_eq!((again.decision, again.notes.len()), (None, 0));
        let end = step(t("2026-10-31 21:00"), &s, 30, false, &mut m);
        assert_eq!(end.decision.unwrap().to, 3, "{:?}", end.notes);
        assert!(end.notes[0].contains("web#0 ended"));
        assert_eq!(m.restore, None);
    }

    #[test]
    fn an_autoscaled_group_keeps_its_count_at_the_end_within_max() {
        let file = [sat()];
        let s = sch(&file, &[]);
        let mut m = ScheduleMemory::default();
        step(t("2026-10-31 17:00"), &s, 3, true, &mut m);
        let end = step(t("2026-10-31 21:00"), &s, 8, true, &mut m);
        assert_eq!(end.decision, None, "the autoscaler scales in, slowly");
        let mut m = ScheduleMemory::default();
        step(t("2026-10-31 17:00"), &s, 3, true, &mut m);
        let end = step(t("2026-10-31 21:00"), &s, 35, true, &mut m);
        assert_eq!(
            end.decision.unwrap().to,
            10,
            "above the file's max: at once"
        );
    }

    #[test]
    fn a_manual_count_during_a_schedule_is_clamped_and_kept() {
        let file = [sat()];
        let s = sch(&file, &[]);
        let mut m = ScheduleMemory::default();
        step(t("2026-10-31 17:00"), &s, 3, false, &mut m);
        let b = s.bounds(t("2026-10-31 18:00"));
        let (n, note) = manual(5, "web", &b, &mut m).unwrap();
        assert_eq!(n, 20);
        assert_eq!(m.restore, Some(5), "what it goes back to");
        assert!(note.unwrap().contains("web#0"));
        assert_eq!(manual(25, "web", &b, &mut m).unwrap(), (25, None));
        let end = step(t("2026-10-31 21:00"), &s, 25, false, &mut m);
        assert_eq!(
            end.decision.unwrap().to,
            10,
            "kept, within the file's bounds"
        );
        let b = s.bounds(t("2026-10-31 22:00"));
        assert!(manual(11, "web", &b, &mut m).unwrap_err().contains("3..10"));
    }

    #[test]
    fn a_cancelled_one_off_ends() {
        let mut o = [once(1, 6, "2026-10-31 10:00", "2026-10-31 12:00")];
        let mut m = ScheduleMemory::default();
        let r = step(t("2026-10-31 10:00"), &sch(&[], &o), 3, false, &mut m);
        assert_eq!(r.decision.unwrap().to, 6);
        o[0].cancelled_ms = Some(t("2026-10-31 11:00"));
        let r = step(t("2026-10-31 11:00"), &sch(&[], &o), 6, false, &mut m);
        assert_eq!(r.decision.unwrap().to, 3);
        assert!(r.notes[0].contains("schedule 1 ended"));
    }

    #[test]
    fn upcoming_merges_every_schedule_in_time_order() {
        let file = [sat()];
        let o = [once(2, 5, "2026-10-30 09:00", "2026-10-30 10:00")];
        let up = sch(&file, &o).upcoming(t("2026-10-29 00:00"), 3);
        let ids: Vec<&str> = up.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["2", "web#0", "web#0"]);
        assert_eq!(up[2].start_ms, t("2026-11-07 17:00"));
    }
}
