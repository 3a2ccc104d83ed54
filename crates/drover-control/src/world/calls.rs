//! API calls that change desired state without a new revision, planned against the world:
//! `drover scale` (a count per group, within the file's range and a schedule's bounds), a
//! one-off scheduled change and its cancelling, and the list of schedules.

use drover_model::api::{ScaleRequest, ScaledGroup, ScheduleRequest, ScheduledScale};
use drover_model::{EventKind, NewEvent};

use super::{Change, Record, World};
use crate::schedule;

/// Why a one-off schedule cannot be cancelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelRefused {
    NoSchedule,
    Cancelled,
    Ended,
}

impl World {
    /// `drover scale`: the count for each group of `svc` (only `req.region`'s when given),
    /// refused outside the file's range, kept but clamped while a schedule raises the bounds
    /// ([`schedule::manual`]); the autoscaler goes on from the new count. `Err`: why the
    /// count is refused.
    pub fn plan_scale(
        &self,
        svc: &drover_model::fleet::Service,
        req: &ScaleRequest,
        now: u64,
    ) -> Result<(Change, Vec<ScaledGroup>), String> {
        let mut counts = Vec::new();
        for region in &svc.regions {
            if req.region.as_ref().is_some_and(|r| r != region) {
                continue;
            }
            let gid = drover_model::GroupId::new(&req.service, region).0;
            let Some(g) = self.groups.get(&gid) else {
                continue;
            };
            let bounds = self.bounds(g, now);
            let mut memory = self.schedule_memory.get(&gid).cloned().unwrap_or_default();
            let (to, note) = schedule::manual(req.desired, &req.service, &bounds, &mut memory)?;
            counts.push((gid, to, note, memory));
        }
        let mut change = Change::default();
        let mut scaled = Vec::new();
        for (gid, to, note, memory) in counts {
            if self.schedule_memory.get(&gid) != Some(&memory) {
                change.remember(&gid, memory);
            }
            let mut record = self.groups[&gid].record.clone();
            let from = record.desired;
            record.desired = to;
            record.desired_reason = match &note {
                Some(n) => format!("manual: drover scale ({n})"),
                None => "manual: drover scale".into(),
            };
            change.commits.push(Record::Group(record.clone()));
            change.staged.records.push(record);
            change.commits.push(Record::Event(
                NewEvent::new(
                    EventKind::Scaled,
                    format!(
                        "desired {from} -> {to} (manual: drover scale{}; autoscaling goes on from here)",
                        note.map(|n| format!(", {n}")).unwrap_or_default()
                    ),
                )
                .group(&gid),
            ));
            let mut scaler = self.autoscale.get(&gid).cloned().unwrap_or_default();
            scaler.manual(now, to);
            change.staged.autoscale.push((gid.clone(), scaler));
            scaled.push(ScaledGroup {
                group: gid,
                from,
                to,
            });
        }
        Ok((change, scaled))
    }

    /// A one-off scheduled change (`drover scale web 50 --at ... --for 3h`) of a service the
    /// caller checked: it must end after it starts and after now, and hold a count of 1 to
    /// [`drover_model::validate::MAX_GROUP_SIZE`]. The change and its records; once stored,
    /// [`World::keep_schedule`]. `Err`: what is wrong with the request.
    pub fn plan_schedule_once(
        &self,
        req: &ScheduleRequest,
        now: u64,
    ) -> Result<(ScheduledScale, Vec<Record>), String> {
        let tz_name = req.timezone.clone().unwrap_or_else(|| "UTC".into());
        let tz = drover_model::cron::parse_tz(&tz_name).map_err(|e| e.0)?;
        if req.end_ms <= req.start_ms {
            return Err(
                "the end must be after the start; give --for DURATION (e.g. 3h) or a later --until"
                    .into(),
            );
        }
        if req.end_ms <= now {
            return Err(format!(
                "it would end at {}, which is past; choose a later time",
                drover_model::cron::format_in(req.end_ms, tz)
            ));
        }
        let limit = drover_model::validate::MAX_GROUP_SIZE;
        if req.desired > limit || req.desired == 0 {
            return Err(format!(
                "{} is not a count a schedule can hold: use 1 to {limit}",
                req.desired
            ));
        }
        let once = ScheduledScale {
            id: self.once.iter().map(|o| o.id).max().unwrap_or(0) + 1,
            service: req.service.clone(),
            region: req.region.clone(),
            desired: req.desired,
            start_ms: req.start_ms,
            end_ms: req.end_ms,
            timezone: tz_name,
            created_ms: now,
            cancelled_ms: None,
        };
        let w = schedule::once_window(&once);
        let event = NewEvent::new(
            EventKind::Schedule,
            format!(
                "{} scheduled: min and desired {} from {} until {}",
                w.what,
                once.desired,
                drover_model::cron::format_in(once.start_ms, tz),
                drover_model::cron::format_in(once.end_ms, tz)
            ),
        );
        let records = vec![Record::Schedule(once.clone()), Record::Event(event)];
        Ok((once, records))
    }

    /// Cancel the one-off schedule `id` (if it holds now, its bounds drop at the next pass):
    /// the cancelled schedule and its records; once stored, [`World::keep_schedule`].
    pub fn plan_cancel(
        &self,
        id: u64,
        now: u64,
    ) -> Result<(ScheduledScale, Vec<Record>), CancelRefused> {
        let mut once = self
            .once
            .iter()
            .find(|o| o.id == id)
            .cloned()
            .ok_or(CancelRefused::NoSchedule)?;
        if once.cancelled_ms.is_some() {
            return Err(CancelRefused::Cancelled);
        }
        if once.end_ms <= now {
            return Err(CancelRefused::Ended);
        }
        once.cancelled_ms = Some(now);
        let w = schedule::once_window(&once);
        let event = NewEvent::new(EventKind::Schedule, format!("{} cancelled", w.what));
        let records = vec![Record::Schedule(once.clone()), Record::Event(event)];
        Ok((once, records))
    }

    /// Take a stored one-off schedule (new, or replacing the one with its id).
    pub fn keep_schedule(&mut self, once: ScheduledScale) {
        match self.once.iter_mut().find(|o| o.id == once.id) {
            Some(o) => *o = once,
            None => self.once.push(once),
        }
    }

    /// Every schedule: the fleet file's, and the one-offs (ended and cancelled ones too).
    pub fn schedule_list(&self, now: u64) -> drover_model::api::ScheduleList {
        let mut out = Vec::new();
        if let Some(fleet) = self.fleet() {
            for (name, svc) in &fleet.services {
                for (i, s) in svc.schedule.iter().enumerate() {
                    let next = schedule::next_firings(name, i, s, now, 3);
                    let active = drover_model::cron::CronTz::parse(&s.cron, &s.timezone)
                        .ok()
                        .and_then(|c| c.last_at_or_before(now))
                        .filter(|start| now < start + s.duration.as_millis())
                        .and_then(|start| {
                            schedule::next_firings(name, i, s, start.saturating_sub(1), 1)
                                .into_iter()
                                .next()
                        });
                    let w = next.first().or(active.as_ref());
                    out.push(drover_model::api::ScheduleEntry {
                        id: schedule::file_id(name, i),
                        service: name.clone(),
                        region: None,
                        source: "file".into(),
                        what: w.map(|w| w.what.clone()).unwrap_or_default(),
                        min: s.min,
                        desired: s.desired,
                        max: s.max,
                        state: if active.is_some() {
                            "active"
                        } else {
                            "waiting"
                        }
                        .into(),
                        active,
                        next,
                    });
                }
            }
        }
        for o in &self.once {
            let w = schedule::once_window(o);
            let state = if o.cancelled_ms.is_some() {
                "cancelled"
            } else if o.end_ms <= now {
                "done"
            } else if o.start_ms <= now {
                "active"
            } else {
                "waiting"
            };
            out.push(drover_model::api::ScheduleEntry {
                id: o.id.to_string(),
                service: o.service.clone(),
                region: o.region.clone(),
                source: "once".into(),
                what: w.what.clone(),
                min: w.min,
                desired: w.desired,
                max: w.max,
                state: state.into(),
                active: (state == "active").then(|| w.clone()),
                next: if state == "waiting" {
                    vec![w]
                } else {
                    Vec::new()
                },
            });
        }
        drover_model::api::ScheduleList { schedules: out }
    }
}
