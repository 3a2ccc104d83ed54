//! The world's steps: each input (a heartbeat, an exit the provider saw, a tick's schedule and
//! autoscale passes, a wave's release) planned as data, with no I/O. A step returns what to
//! store ([`Change::commits`], one commit, events with their change) and what memory takes
//! once that is stored ([`Change::staged`], through [`World::accept`]); the shell (the
//! server's engine, the simulation) carries it out in that order, so a failed commit leaves
//! memory as the store has it.

use drover_model::api::{Heartbeat, HeartbeatReply};
use drover_model::record::{GroupRecord, InstanceRecord};
use drover_model::{EventKind, NewEvent};

use super::{absorb_heartbeat, World};
use crate::schedule::ScheduleMemory;
use crate::{AutoscaleState, Health};

/// One record a step stores.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// Insert or replace the group's record.
    Group(GroupRecord),
    /// Insert or replace the instance's record.
    Instance(InstanceRecord),
    RemoveInstance(String),
    /// A named counter (the schedule rules' memory, [`super::memory_counters`]).
    Counter {
        name: String,
        value: u64,
    },
    /// Insert or replace a one-off scheduled change (by its id).
    Schedule(drover_model::api::ScheduledScale),
    Event(NewEvent),
}

/// What memory takes once a step's records are stored ([`World::accept`]).
#[derive(Clone, Debug, Default)]
pub struct Staged {
    pub records: Vec<GroupRecord>,
    pub memory: Vec<(String, ScheduleMemory)>,
    pub autoscale: Vec<(String, AutoscaleState)>,
}

impl Staged {
    /// One group's new record.
    pub fn record(record: GroupRecord) -> Staged {
        Staged {
            records: vec![record],
            ..Staged::default()
        }
    }
}

/// A step's change: store `commits` (in one commit), then [`World::accept`] `staged`.
#[derive(Clone, Debug, Default)]
pub struct Change {
    pub commits: Vec<Record>,
    pub staged: Staged,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.commits.is_empty()
            && self.staged.records.is_empty()
            && self.staged.memory.is_empty()
            && self.staged.autoscale.is_empty()
    }

    /// Set a group's desired count (by `reason`), with its `scaled` event.
    pub fn set_desired(&mut self, record: &GroupRecord, from: u32, to: u32, reason: &str) {
        let mut record = record.clone();
        record.desired = to;
        record.desired_reason = reason.to_string();
        self.commits.push(Record::Group(record.clone()));
        self.commits.push(Record::Event(
            NewEvent::new(
                EventKind::Scaled,
                format!("desired {from} -> {to} ({reason})"),
            )
            .group(&record.group),
        ));
        self.staged.records.push(record);
    }

    /// Store the schedule rules' memory of `group` (its counters), and keep it.
    pub fn remember(&mut self, group: &str, memory: ScheduleMemory) {
        self.commits.extend(
            super::memory_counters(group, &memory)
                .into_iter()
                .map(|(name, value)| Record::Counter { name, value }),
        );
        self.staged.memory.push((group.to_string(), memory));
    }
}

/// A heartbeat the world refuses: it names an instance of another group than its token's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OtherGroup;

/// What a heartbeat did ([`World::heartbeat`]).
#[derive(Clone, Debug, PartialEq)]
pub struct HeartbeatStep {
    pub reply: HeartbeatReply,
    /// Events to record (never waited for), in the order of the changes, within the
    /// instance's budget ([`super::EventBudget`]).
    pub events: Vec<NewEvent>,
    /// Its health changed: the controller looks again now.
    pub wake: bool,
}

impl World {
    /// Absorb a heartbeat of an instance of `hb.group`: an unknown instance is told so (its
    /// agent leaves); a late or duplicate one (`seq` not above the last) changes nothing; any
    /// other updates the instance's soft state ([`absorb_heartbeat`]), and its turning
    /// healthy ends its group's launch backoff.
    pub fn heartbeat(&mut self, hb: Heartbeat, now: u64) -> Result<HeartbeatStep, OtherGroup> {
        let Some(inst) = self.instances.get(&hb.instance) else {
            return Ok(HeartbeatStep {
                reply: HeartbeatReply {
                    known: false,
                    leave_soon: Some(false),
                },
                events: Vec::new(),
                wake: false,
            });
        };
        if inst.record.group != hb.group {
            return Err(OtherGroup);
        }
        let reply = HeartbeatReply {
            known: true,
            leave_soon: Some(self.leave_soon(inst)),
        };
        if hb.seq != 0 && hb.seq <= inst.soft.last_seq {
            return Ok(HeartbeatStep {
                reply,
                events: Vec::new(),
                wake: false,
            });
        }
        let mut inst = self
            .instances
            .get_mut(&hb.instance)
            .expect("looked up above");
        let (events, changed) = absorb_heartbeat(&mut inst, hb, now);
        let i: &mut super::Instance = &mut inst;
        let events = i
            .soft
            .budget
            .admit(events, now, &i.record.group, &i.record.id);
        let turned_healthy = (changed && matches!(i.soft.health, Health::Healthy { .. }))
            .then(|| i.record.group.clone());
        // Its view follows here (and its group is reconciled if the change matters).
        drop(inst);
        if let Some(group) = turned_healthy {
            self.launch_backoff.remove(&group);
        }
        Ok(HeartbeatStep {
            reply,
            events,
            wake: changed,
        })
    }

    /// The provider saw `instance` end: not alive, health unknown. Whether it was known.
    pub fn exited(&mut self, instance: &str) -> bool {
        let Some(mut i) = self.instances.get_mut(instance) else {
            return false;
        };
        i.alive = false;
        i.soft.health = Health::Unknown;
        true
    }

    /// Take a stored step's memory ([`Change::staged`]).
    pub fn accept(&mut self, staged: Staged) {
        for record in staged.records {
            if let Some(g) = self.groups.get_mut(&record.group) {
                g.record = record;
            }
        }
        for (gid, memory) in staged.memory {
            self.schedule_memory.insert(gid, memory);
        }
        for (gid, scaler) in staged.autoscale {
            self.autoscale.insert(gid, scaler);
        }
    }

    /// The schedule rules of every group that has schedules
    /// ([`crate::schedule::step`]): their memory stored when it changed, an event for each
    /// window that began or ended, and the counts they set (the autoscaler goes on from a
    /// count a schedule set).
    pub fn schedule_step(&self, now: u64) -> Change {
        let mut change = Change::default();
        for (gid, g) in &self.groups {
            if !self.has_schedules(g) {
                continue;
            }
            let autoscaled = self.service(g).is_some_and(|s| s.autoscale.is_some());
            let mut memory = self.schedule_memory.get(gid).cloned().unwrap_or_default();
            let r = crate::schedule::step(
                now,
                &self.schedules(g),
                g.record.desired,
                autoscaled,
                &mut memory,
            );
            for note in r.notes {
                change.commits.push(Record::Event(
                    NewEvent::new(EventKind::Schedule, note).group(gid),
                ));
            }
            if r.remembered {
                change.remember(gid, memory);
            } else {
                change.staged.memory.push((gid.clone(), memory));
            }
            if let Some(d) = r.decision {
                if r.sets_count {
                    let mut scaler = self.autoscale.get(gid).cloned().unwrap_or_default();
                    scaler.manual(now, d.to);
                    change.staged.autoscale.push((gid.clone(), scaler));
                }
                change.set_desired(&g.record, d.from, d.to, &d.reason);
            }
        }
        change
    }

    /// The autoscaler of every group that has a policy ([`AutoscaleState::decide`]), on the
    /// samples that count ([`World::samples`]) and the bounds of now ([`World::bounds`]).
    pub fn autoscale_step(&self, now: u64) -> Change {
        let mut change = Change::default();
        for (gid, g) in &self.groups {
            let Some(policy) = self.service(g).and_then(|s| s.autoscale.as_ref()) else {
                continue;
            };
            let bounds = self.bounds(g, now);
            let by = bounds.by();
            let (samples, oldest_sample_ms) = self.samples(g, policy, now);
            let mut scaler = self.autoscale.get(gid).cloned().unwrap_or_default();
            let decision = scaler.decide(
                now,
                &crate::AutoscaleInput {
                    group: gid,
                    policy,
                    desired: g.record.desired,
                    min: bounds.min,
                    max: bounds.max,
                    bounds_by: by.as_deref(),
                    rollout_in_progress: g.record.rollout.open,
                    samples: &samples,
                    oldest_sample_ms,
                },
            );
            if let Some(d) = decision {
                change.set_desired(&g.record, d.from, d.to, &d.reason);
            }
            change.staged.autoscale.push((gid.clone(), scaler));
        }
        change
    }

    /// The waves to release now: per service with waves whose earlier waves are done
    /// ([`crate::waves::release`]), the wave and its groups. A service deployed by hand to
    /// some regions (a group held) waits for a person.
    pub fn wave_releases(&self, now: u64) -> Vec<(usize, Vec<String>)> {
        let Some(fleet) = self.fleet() else {
            return Vec::new();
        };
        let group_of = |service: &str, region: &str| {
            self.groups
                .get(&drover_model::GroupId::new(service, region).0)
        };
        fleet
            .services
            .iter()
            .filter(|(_, s)| !s.rollout.waves.is_empty())
            .filter(|(name, s)| {
                !s.regions
                    .iter()
                    .any(|r| group_of(name, r).is_some_and(|g| g.record.rollout.held))
            })
            .filter_map(|(name, s)| {
                let groups: Vec<crate::waves::WaveGroup> = s
                    .regions
                    .iter()
                    .filter_map(|r| {
                        let g = group_of(name, r)?;
                        let ro = &g.record.rollout;
                        Some(crate::waves::WaveGroup {
                            group: g.record.group.clone(),
                            wave: s.rollout.wave_of(r),
                            pending: ro.wave_pending,
                            open: ro.open,
                            failed: ro.failed_generation >= g.record.generation,
                            done_ms: ro.done_ms,
                        })
                    })
                    .collect();
                crate::waves::release(&groups, s.rollout.wave_bake.as_millis(), now)
            })
            .collect()
    }
}

/// What the balancers and service discovery are given for one group ([`World::publish`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Publication {
    pub group: String,
    /// Its peers (the instances in rotation, with every named port of the plan); none when
    /// the group is gone from the fleet.
    pub peers: Option<Vec<drover_model::api::PeerAddr>>,
    /// Its ingress's targets and the instances leaving (only a group with an ingress).
    pub balancer: Option<(Vec<drover_model::api::LbTarget>, Vec<String>)>,
}

impl World {
    /// Whether some group of `group`'s region has components that use its service.
    pub fn is_used(&self, group: &str) -> bool {
        self.users_of(group).next().is_some()
    }

    /// The groups of `group`'s region whose components use its service.
    fn users_of<'a>(&'a self, group: &str) -> impl Iterator<Item = &'a String> + 'a {
        let gid = drover_model::GroupId(group.to_string());
        let (service, region) = (gid.service().to_string(), gid.region().to_string());
        self.groups
            .iter()
            .filter(move |(_, g)| {
                g.plan.region == region
                    && g.plan.components.iter().any(|c| c.uses.contains(&service))
            })
            .map(|(k, _)| k)
    }

    /// Publish the instances in rotation, per group, as a pass decided them: a group whose
    /// targets, leaving instances and generation are all as last published is given nothing
    /// (a pass costs what changed); a change of the targets is a `targets` event.
    pub fn publish(
        &mut self,
        targets: std::collections::BTreeMap<String, Vec<String>>,
    ) -> (Vec<Publication>, Vec<NewEvent>) {
        let mut out = Vec::new();
        let mut events = Vec::new();
        for (group, ids) in targets {
            // Its leaving instances, from its kept views.
            let leaving: Vec<String> = self
                .instances
                .group_views(&group)
                .filter(|v| v.phase != crate::Phase::Active)
                .map(|v| v.id.clone())
                .collect();
            let generation = self.groups.get(&group).map_or(0, |g| g.record.generation);
            let unchanged = self.targets.get(&group) == Some(&ids)
                && self
                    .published
                    .get(&group)
                    .is_some_and(|(l, g)| *l == leaving && *g == generation);
            if unchanged {
                continue;
            }
            self.published
                .insert(group.clone(), (leaving.clone(), generation));
            let addr_of = |id: &str| self.instances.get(id).map(|i| i.record.addr.as_str());
            let g = self.groups.get(&group);
            // Service discovery: the same instances, with every named port of the plan; only
            // for a service some group of its region uses (nobody else asks for its peers, and
            // an apply publishes every group again, [`World::take_applied`]).
            let peers = g.filter(|_| self.is_used(&group)).map(|g| {
                let ports: std::collections::BTreeMap<String, u16> = g
                    .plan
                    .components
                    .iter()
                    .flat_map(|c| c.ports.iter().map(|(n, p)| (n.clone(), *p)))
                    .collect();
                ids.iter()
                    .filter_map(|id| {
                        Some(drover_model::api::PeerAddr {
                            instance: id.clone(),
                            addr: addr_of(id)?.to_string(),
                            ports: ports.clone(),
                        })
                    })
                    .collect()
            });
            let balancer = g.and_then(|g| g.ingress.map(|(_, p)| p)).map(|port| {
                let list = ids
                    .iter()
                    .filter_map(|id| {
                        let ip: std::net::IpAddr = addr_of(id)?.parse().ok()?;
                        Some(drover_model::api::LbTarget {
                            id: id.clone(),
                            addr: std::net::SocketAddr::new(ip, port).to_string(),
                        })
                    })
                    .collect();
                (list, leaving)
            });
            out.push(Publication {
                group: group.clone(),
                peers,
                balancer,
            });
            if self.targets.get(&group) == Some(&ids) {
                continue;
            }
            let message = targets_message(self.targets.get(&group), &ids);
            events.push(NewEvent::new(EventKind::Targets, message).group(&group));
            self.targets.insert(group, ids);
        }
        (out, events)
    }
}

/// After a server restart, how much longer than `silent_after` restored instances have to
/// report, from when the API answers.
pub const RESTART_GRACE_MS: u64 = 10_000;

/// The soft state of an instance the world has not heard from yet.
pub fn fresh_soft(now: u64) -> super::Soft {
    super::Soft {
        watched_since_ms: now,
        last_seen_ms: now,
        health: Health::Unknown,
        ever_healthy: false,
        last_seq: 0,
        components: Vec::new(),
        utilization: Default::default(),
        reporting: false,
        restored: false,
        drained: false,
        window: None,
        budget: Default::default(),
        bound: false,
    }
}

/// A launch the world has numbered ([`World::begin_launch`]), for the provider to carry out.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchTicket {
    pub group: String,
    pub generation: u64,
    /// Its number (stored before the launch: an id is never reused, even after a crash).
    pub seq: u64,
    /// The id it asks for (a provider that names its instances gives another).
    pub instance: String,
    /// The plan of its generation when it is the group's current one; none for an older
    /// generation (the last good one, while a rollout has not proven itself), whose plan is
    /// the one stored, immutable.
    pub plan: Option<drover_model::Plan>,
}

/// What the provider says of a launch it made.
#[derive(Clone, Debug, PartialEq)]
pub struct Launched {
    /// The id the agent reports with.
    pub id: String,
    pub addr: std::net::IpAddr,
    pub provider_id: String,
    pub own_token: bool,
}

impl World {
    /// Restore the world as stored: the revision, each group with its plan (a group without
    /// its plan is skipped), the instances (soft state rebuilt from heartbeats; until then,
    /// silent only [`RESTART_GRACE_MS`] after now, and `alive` as their provider adopts
    /// them), and the counters.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        revision: Option<drover_model::api::Revision>,
        groups: Vec<super::Group>,
        instances: impl IntoIterator<Item = (InstanceRecord, bool)>,
        counters: &std::collections::BTreeMap<String, u64>,
        once: Vec<drover_model::api::ScheduledScale>,
        silent_after_ms: u64,
        now: u64,
    ) -> World {
        let mut world = World {
            revision,
            instance_seq: counters.get("instance_seq").copied().unwrap_or(0),
            once,
            schedule_memory: super::memory_from_counters(counters),
            ..World::default()
        };
        world.instances.set_silent_after(silent_after_ms);
        for g in groups {
            world.groups.insert(g.record.group.clone(), g);
        }
        for (rec, alive) in instances {
            world.instances.insert(
                rec.id.clone(),
                super::Instance {
                    soft: super::Soft {
                        restored: true,
                        // The silence budget starts after a grace: every agent must get
                        // through to a server that is still catching up.
                        last_seen_ms: now + RESTART_GRACE_MS,
                        ..fresh_soft(now)
                    },
                    alive,
                    record: rec,
                },
            );
        }
        world
    }

    /// Number a launch of `group` on `generation` (none: the group is gone, or `generation`
    /// is above its own).
    pub fn begin_launch(&mut self, group: &str, generation: u64) -> Option<LaunchTicket> {
        let g = self.groups.get(group)?;
        if g.record.generation < generation {
            return None;
        }
        let plan = (g.record.generation == generation).then(|| g.plan.clone());
        self.instance_seq += 1;
        Some(LaunchTicket {
            group: group.to_string(),
            generation,
            seq: self.instance_seq,
            instance: drover_model::ids::instance_id(self.instance_seq),
            plan,
        })
    }

    /// The records of a launch the provider made (the instance, and its `launched` event);
    /// once stored, [`World::adopt`] takes the instance.
    pub fn launched(
        ticket: &LaunchTicket,
        plan: &drover_model::Plan,
        launched: &Launched,
        now: u64,
    ) -> (InstanceRecord, Vec<Record>) {
        let rec = InstanceRecord {
            id: launched.id.clone(),
            group: ticket.group.clone(),
            generation: ticket.generation,
            addr: launched.addr.to_string(),
            provider_id: launched.provider_id.clone(),
            launched_at_ms: now,
            lifecycle: drover_model::record::Lifecycle::Active,
            permit_at_ms: None,
            own_token: launched.own_token,
        };
        let event = NewEvent::new(
            EventKind::Launched,
            format!(
                "launched at {} on generation {} ({}) [{}]",
                launched.addr,
                ticket.generation,
                plan.versions(),
                launched.provider_id
            ),
        )
        .group(&ticket.group)
        .instance(&launched.id);
        (
            rec.clone(),
            vec![Record::Instance(rec), Record::Event(event)],
        )
    }

    /// The event of a launch the provider refused.
    pub fn launch_refused(ticket: &LaunchTicket, why: &str) -> NewEvent {
        NewEvent::new(
            EventKind::Launched,
            format!("launch of {} failed: {why}", ticket.instance),
        )
        .group(&ticket.group)
    }

    /// The event of a launch the provider made whose record the store refused: nobody would
    /// adopt the instance (until a restart reaps it) and the next pass would launch another,
    /// so it is terminated now; `stopped` is how that went.
    pub fn launch_unrecorded(
        ticket: &LaunchTicket,
        launched: &Launched,
        why: &str,
        stopped: Result<(), &str>,
    ) -> NewEvent {
        let id = &launched.id;
        let message = match stopped {
            Ok(()) => format!(
                "{id} was launched but the store refused its record ({why}): terminating it"
            ),
            Err(e) => format!(
                "{id} was launched but the store refused its record ({why}); terminating it failed: {e}"
            ),
        };
        NewEvent::new(EventKind::Terminating, message)
            .group(&ticket.group)
            .instance(id)
    }

    /// Take a stored launch: not reporting yet, watched from now.
    pub fn adopt(&mut self, rec: InstanceRecord, alive: bool, now: u64) {
        self.instances.insert(
            rec.id.clone(),
            super::Instance {
                record: rec,
                soft: fresh_soft(now),
                alive,
            },
        );
    }

    /// How long a leaver of `group` may drain: its service's `drain_timeout`.
    pub fn drain_timeout_ms(&self, group: &str) -> u64 {
        self.fleet()
            .and_then(|f| f.services.get(drover_model::GroupId::service_of(group)))
            .map(|s| s.rollout.drain_timeout.as_millis())
            .unwrap_or(super::DEFAULT_DRAIN_MS)
    }

    /// How long an instance of `group` may take to stop once asked: its plan's longest
    /// `stop_grace`.
    pub fn stop_grace_ms(&self, group: &str) -> u64 {
        self.groups
            .get(group)
            .map(|g| super::longest_stop_grace(&g.plan).as_millis() as u64)
            .unwrap_or(super::DEFAULT_STOP_GRACE_MS)
    }

    /// The permit an instance's long-poll answers with now: none while it is active;
    /// otherwise whether it lowers its group's capacity as it goes
    /// ([`World::leaver_decrements`]), and its drain timeout. Outer `None`: no such instance.
    pub fn permit_of(&self, instance: &str) -> Option<Option<(bool, u64)>> {
        let i = self.instances.get(instance)?;
        if i.record.lifecycle == drover_model::record::Lifecycle::Active {
            return Some(None);
        }
        Some(Some((
            self.leaver_decrements(i),
            self.drain_timeout_ms(&i.record.group),
        )))
    }
}

impl World {
    /// Take a stored change of desired state ([`crate::change::plan`]): its groups (new
    /// generations, holds, counts) and, when it stored a revision, that revision, whose
    /// file-set counts restart the autoscaler's window (`file_scaled`).
    pub fn take_applied(
        &mut self,
        revision: Option<drover_model::api::Revision>,
        groups: std::collections::BTreeMap<String, super::Group>,
        file_scaled: &[(String, u32)],
        now: u64,
    ) {
        self.groups = groups;
        // Every group is published again at the next pass: who uses whom may have changed.
        self.published.clear();
        if let Some(rev) = revision {
            self.revision = Some(rev);
            for (g, d) in file_scaled {
                self.autoscale.entry(g.clone()).or_default().manual(now, *d);
            }
        }
    }
}

impl World {
    /// The API answers from `now` on: the silence of every instance restored from the store
    /// (and not heard from yet) counts from now, plus [`RESTART_GRACE_MS`], not from when the
    /// store was read.
    pub fn api_ready(&mut self, now: u64) {
        self.instances.for_each_mut(|i| {
            if i.soft.restored {
                i.soft.watched_since_ms = now;
                i.soft.last_seen_ms = now + RESTART_GRACE_MS;
            }
        });
    }

    /// Whether the view is rebuilt after a restart: every restored instance whose agent is
    /// alive has reported, or [`RESTART_GRACE_MS`] passed since the API began to answer at
    /// `ready_ms` (0: not yet). From then on the balancers may take the targets as complete.
    pub fn rebuilt(&self, now: u64, ready_ms: u64) -> bool {
        if ready_ms == 0 {
            return false;
        }
        now >= ready_ms + RESTART_GRACE_MS
            || !self.instances.values().any(|i| i.soft.restored && i.alive)
    }
}

impl World {
    /// What an instance action changes ([`crate::effects::of`], from the instance as the
    /// world knows it now).
    pub fn effects_of(&self, action: &crate::Action, now: u64) -> Vec<crate::effects::Effect> {
        let named = match action {
            crate::Action::Forget { instance, .. }
            | crate::Action::Terminate { instance, .. }
            | crate::Action::Permit { instance, .. } => {
                self.instances.get(instance).map(super::view)
            }
            _ => None,
        };
        crate::effects::of(action, named.as_ref(), now)
    }

    /// The records of `effects` to store (new phases, removals, events, in order) and the
    /// instance records memory takes once they are stored ([`World::set_instances`]). A
    /// failed launch backs off its group's launches now (soft state, never stored).
    pub fn stage_effects(
        &mut self,
        effects: &[crate::effects::Effect],
        now: u64,
    ) -> (Vec<Record>, Vec<InstanceRecord>) {
        use crate::effects::Effect;
        let mut commits = Vec::new();
        let mut records = Vec::new();
        for e in effects {
            match e {
                Effect::SetPhase {
                    instance,
                    phase,
                    permit_at_ms,
                } => {
                    let Some(i) = self.instances.get(instance) else {
                        continue;
                    };
                    let mut rec = i.record.clone();
                    rec.lifecycle = super::lifecycle_of(*phase);
                    rec.permit_at_ms = *permit_at_ms;
                    commits.push(Record::Instance(rec.clone()));
                    records.push(rec);
                }
                Effect::Remove { instance } => {
                    commits.push(Record::RemoveInstance(instance.clone()))
                }
                Effect::Event {
                    kind,
                    group,
                    instance,
                    message,
                } => commits.push(Record::Event(
                    NewEvent::new(*kind, message.clone())
                        .group(group)
                        .instance(instance),
                )),
                Effect::LaunchFailed { group } => {
                    self.launch_failed(group, now);
                }
                Effect::OutOfRotation { .. }
                | Effect::WakePermitPoll { .. }
                | Effect::ProviderTerminate { .. }
                | Effect::Launch { .. } => {}
            }
        }
        (commits, records)
    }

    /// Take stored instance records ([`World::stage_effects`]).
    pub fn set_instances(&mut self, records: Vec<InstanceRecord>) {
        for rec in records {
            if let Some(mut i) = self.instances.get_mut(&rec.id) {
                i.record = rec;
            }
        }
    }
}

impl World {
    /// A rollout to `generation` is done ([`crate::rollout::done`]): the group's record and
    /// its `rollout` event.
    pub fn rollout_done(&self, group: &str, generation: u64, now: u64) -> Option<Change> {
        let g = self.groups.get(group)?;
        let mut record = g.record.clone();
        let what = crate::rollout::done(&mut record.rollout, generation, &g.plan.versions(), now);
        Some(Change {
            commits: vec![
                Record::Group(record.clone()),
                Record::Event(NewEvent::new(EventKind::Rollout, what).group(group)),
            ],
            staged: Staged::record(record),
        })
    }

    /// A rollout to `generation` failed ([`crate::rollout::failed`], going back with the
    /// service's `auto_revert`): the group's record and its `rollout` event, which names
    /// `instance` (the new one whose output tells why) and where its last lines are; and
    /// what comes after (a revert to carry out, or nothing).
    pub fn rollout_failed(
        &self,
        group: &str,
        generation: u64,
        reason: &str,
        instance: Option<&str>,
    ) -> Option<(Change, crate::rollout::AfterFailure)> {
        let g = self.groups.get(group)?;
        let service = drover_model::GroupId::service_of(group);
        let auto_revert = self
            .fleet()
            .and_then(|f| f.services.get(service))
            .is_some_and(|s| s.rollout.auto_revert);
        let mut record = g.record.clone();
        let (after, what) =
            crate::rollout::failed(&mut record.rollout, generation, reason, auto_revert);
        let event = match instance {
            Some(i) => NewEvent::new(
                EventKind::Rollout,
                format!(
                    "{what}\nthe last lines of {i}: `drover logs {service} --instance {i}` (the flight recorder keeps them once it is gone)"
                ),
            )
            .instance(i),
            None => NewEvent::new(EventKind::Rollout, what),
        };
        Some((
            Change {
                commits: vec![
                    Record::Group(record.clone()),
                    Record::Event(event.group(group)),
                ],
                staged: Staged::record(record),
            },
            after,
        ))
    }
}

impl World {
    /// The instances whose components use `group`'s service, in its region (the consumers
    /// discovery's drain gate waits for, [`crate::discovery::PeerBook::dropped_by`]).
    pub fn peer_consumers(&self, group: &str) -> Vec<String> {
        self.users_of(group)
            .flat_map(|g| self.instances.group_views(g))
            .filter(|v| v.alive)
            .map(|v| v.id.clone())
            .collect()
    }

    /// (service, group in the instance's region) of every service `instance`'s plan uses;
    /// none: no such instance.
    pub fn used_services(&self, instance: &str) -> Option<Vec<(String, String)>> {
        let i = self.instances.get(instance)?;
        let region = drover_model::GroupId(i.record.group.clone())
            .region()
            .to_string();
        let mut used: Vec<String> = self
            .groups
            .get(&i.record.group)
            .map(|g| {
                g.plan
                    .components
                    .iter()
                    .flat_map(|c| c.uses.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        used.sort();
        used.dedup();
        Some(
            used.into_iter()
                .map(|s| {
                    let g = drover_model::GroupId::new(&s, &region).0;
                    (s, g)
                })
                .collect(),
        )
    }
}

impl World {
    /// The self-suspicion guard's events as a pass names the groups it holds
    /// ([`crate::suspects_itself`]): one when a group comes under it, one when it is heard
    /// from again. The world remembers what it last said.
    pub fn note_suspicion(&mut self, now_suspect: &[String]) -> Vec<NewEvent> {
        let now: std::collections::BTreeSet<String> = now_suspect.iter().cloned().collect();
        if self.suspicion_said == now {
            return Vec::new();
        }
        let mut events = Vec::new();
        for g in now.difference(&self.suspicion_said) {
            events.push(
                NewEvent::new(
                    EventKind::Server,
                    format!(
                        "at least {}% of the group's instances (and {} or more) went silent at once: the server suspects itself and replaces none of them until it hears from them again",
                        crate::SUSPECT_SHARE_PERCENT,
                        crate::SUSPECT_MIN_SILENT
                    ),
                )
                .group(g),
            );
        }
        for g in self.suspicion_said.difference(&now) {
            events.push(
                NewEvent::new(
                    EventKind::Server,
                    "heard from the group again: silent instances are replaced as usual",
                )
                .group(g),
            );
        }
        self.suspicion_said = now;
        events
    }
}

/// Most instances a `targets` event names one by one; a larger set is told by its count and
/// what changed ([`targets_message`]).
const TARGETS_LISTED: usize = 16;

/// A `targets` event's wording: the instances in rotation; for a set larger than
/// [`TARGETS_LISTED`], their count and the instances that came and went since `before`, at
/// most [`TARGETS_LISTED`] of each (a group of 5,000 changes its set in every pass of a
/// restart wave, and a list of every id was 40 KB made and cut each time).
fn targets_message(before: Option<&Vec<String>>, ids: &[String]) -> String {
    if ids.is_empty() {
        return "no instance in rotation".to_string();
    }
    if ids.len() <= TARGETS_LISTED {
        return format!("in rotation: {}", ids.join(", "));
    }
    // Both sorted, as a pass gives them (`group::reconcile`): one merge walk.
    let before: &[String] = before.map_or(&[], |b| b.as_slice());
    let (mut came, mut went) = (Vec::new(), Vec::new());
    let (mut a, mut b) = (before.iter().peekable(), ids.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x == y => {
                a.next();
                b.next();
            }
            (Some(x), Some(y)) if x < y => went.extend(a.next().map(String::as_str)),
            (Some(_), Some(_)) | (None, Some(_)) => came.extend(b.next().map(String::as_str)),
            (Some(_), None) => went.extend(a.next().map(String::as_str)),
            (None, None) => break,
        }
    }
    let some = |sign: char, list: &[&str]| {
        let mut s = format!("{sign}{}", list.len());
        if !list.is_empty() {
            s.push_str(": ");
            s.push_str(&list[..list.len().min(TARGETS_LISTED)].join(", "));
            if list.len() > TARGETS_LISTED {
                s.push_str(&format!(" and {} more", list.len() - TARGETS_LISTED));
            }
        }
        s
    };
    format!(
        "in rotation: {} instances ({}; {})",
        ids.len(),
        some('+', &came),
        some('-', &went)
    )
}

#[cfg(test)]
mod tests {
    use super::super::CancelRefused;
    use super::*;
    use drover_model::api::{AgentPhase, ComponentReport, ComponentState, Revision};
    use drover_model::record::{Lifecycle, RolloutRecord};

    /// `web` in region `a` (sim): capacity 1, 2, 4, a drain of 7 s, port `http` 8080.
    fn fleet_text() -> String {
        drover_test_support::fleets::web("sim", &["a"])
            .capacity(1, 2, 4)
            .service(r#"rollout = { drain_timeout = "7s" }"#)
            .app("ports = { http = 8080 }")
            .toml()
    }

    fn rec(id: &str, lifecycle: Lifecycle) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            group: "web/a".into(),
            generation: 1,
            addr: "127.9.0.1".into(),
            provider_id: "sim".into(),
            launched_at_ms: 1,
            lifecycle,
            permit_at_ms: None,
            own_token: false,
        }
    }

    /// `web/a` on generation 1 with i-1 (alive) and i-2 (draining), restored at 1,000.
    fn world() -> World {
        let text = fleet_text();
        let fleet = drover_model::parse_fleet(&text, "drover.toml").unwrap();
        let mut plan = drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "a");
        plan.generation = 1;
        let group = super::super::Group {
            record: GroupRecord {
                group: "web/a".into(),
                desired: 2,
                desired_reason: "apply".into(),
                generation: 1,
                rollout: RolloutRecord::default(),
            },
            plan,
            provider: "sim".into(),
            ingress: Some(("127.0.0.1:9000".parse().unwrap(), 8080)),
        };
        let revision = Revision {
            number: 1,
            applied_at_ms: 0,
            file: "drover.toml".into(),
            summary: String::new(),
            toml: text,
            fleet,
            last_applied: None,
        };
        World::restore(
            Some(revision),
            vec![group],
            [
                (rec("i-1", Lifecycle::Active), true),
                (rec("i-2", Lifecycle::Draining), false),
            ],
            &[("instance_seq".to_string(), 2)].into_iter().collect(),
            Vec::new(),
            10_000,
            1_000,
        )
    }

    fn beat(id: &str, group: &str, seq: u64, state: ComponentState) -> Heartbeat {
        Heartbeat {
            instance: id.into(),
            group: group.into(),
            generation: 1,
            addr: "127.9.0.1".into(),
            phase: AgentPhase::Running,
            seq,
            components: vec![ComponentReport {
                name: "app".into(),
                version: "v1".into(),
                state,
                pid: Some(1),
                restarts: 0,
                last_exit: None,
                message: None,
                last_output: None,
            }],
            utilization: Default::default(),
            drained: None,
        }
    }

    #[test]
    fn a_heartbeat_is_refused_for_another_group_ignored_when_late_and_ends_the_backoff() {
        let mut w = world();
        let unknown = w
            .heartbeat(beat("i-9", "web/a", 1, ComponentState::Healthy), 2_000)
            .unwrap();
        assert!(!unknown.reply.known);
        assert_eq!(
            w.heartbeat(beat("i-1", "api/a", 1, ComponentState::Healthy), 2_000),
            Err(OtherGroup)
        );
        w.launch_failed("web/a", 1_500);
        let first = w
            .heartbeat(beat("i-1", "web/a", 5, ComponentState::Healthy), 2_000)
            .unwrap();
        assert!(first.reply.known);
        assert_eq!(first.reply.leave_soon, Some(false));
        assert!(first.wake, "restored, now healthy: a health change");
        assert!(
            !w.launch_backoff.contains_key("web/a"),
            "turning healthy ends the backoff"
        );
        // The same seq again (late or duplicate): nothing changes.
        let late = w
            .heartbeat(beat("i-1", "web/a", 5, ComponentState::Unhealthy), 2_100)
            .unwrap();
        assert!(!late.wake && late.events.is_empty());
        assert!(matches!(
            w.instances.get("i-1").unwrap().soft.health,
            Health::Healthy { .. }
        ));
        // The next one is absorbed: unhealthy, with its event.
        let next = w
            .heartbeat(beat("i-1", "web/a", 6, ComponentState::Unhealthy), 2_200)
            .unwrap();
        assert!(next.wake);
        assert!(
            next.events[0]
                .message
                .starts_with("unhealthy: app is unhealthy"),
            "{:?}",
            next.events
        );
        // A draining instance is told to leave soon.
        let leaver = w
            .heartbeat(beat("i-2", "web/a", 1, ComponentState::Healthy), 2_200)
            .unwrap();
        assert_eq!(leaver.reply.leave_soon, Some(true));
    }

    #[test]
    fn a_restore_waits_for_its_alive_instances_or_the_grace() {
        let mut w = world();
        assert!(!w.rebuilt(1_000, 0), "the API does not answer yet");
        w.api_ready(5_000);
        assert_eq!(
            w.instances.get("i-1").unwrap().soft.last_seen_ms,
            5_000 + RESTART_GRACE_MS
        );
        assert!(
            !w.rebuilt(5_001, 5_000),
            "i-1 is alive and has not reported"
        );
        assert!(w.rebuilt(5_000 + RESTART_GRACE_MS, 5_000));
        w.heartbeat(beat("i-1", "web/a", 1, ComponentState::Healthy), 6_000)
            .unwrap();
        assert!(w.rebuilt(6_000, 5_000), "every alive instance reported");
        assert!(w.exited("i-1"));
        assert!(!w.instances.get("i-1").unwrap().alive);
        assert!(!w.exited("i-9"));
    }

    #[test]
    fn a_launch_is_numbered_stored_then_adopted() {
        let mut w = world();
        assert_eq!(w.begin_launch("web/a", 2), None, "a generation not planned");
        assert_eq!(w.begin_launch("api/a", 1), None);
        let t = w.begin_launch("web/a", 1).unwrap();
        assert_eq!((t.seq, t.instance.as_str()), (3, "i-000003"));
        assert!(t.plan.is_some(), "its group's current generation");
        let launched = Launched {
            id: t.instance.clone(),
            addr: "127.9.0.3".parse().unwrap(),
            provider_id: "sim-3".into(),
            own_token: true,
        };
        let plan = w.groups["web/a"].plan.clone();
        let (rec, records) = World::launched(&t, &plan, &launched, 3_000);
        assert!(
            !w.instances.contains_key("i-000003"),
            "not before it is stored"
        );
        assert_eq!(records[0], Record::Instance(rec.clone()));
        let Record::Event(e) = &records[1] else {
            panic!("{records:?}")
        };
        assert_eq!(
            e.message,
            "launched at 127.9.0.3 on generation 1 (app=v1) [sim-3]"
        );
        // Had the store refused those records, the instance would be terminated, and the
        // event says so (and why).
        let e = World::launch_unrecorded(&t, &launched, "disk full", Ok(()));
        assert_eq!(
            (e.kind, e.instance.as_deref(), e.group.as_deref()),
            (EventKind::Terminating, Some("i-000003"), Some("web/a"))
        );
        assert_eq!(
            e.message,
            "i-000003 was launched but the store refused its record (disk full): terminating it"
        );
        let e = World::launch_unrecorded(&t, &launched, "disk full", Err("no such process"));
        assert!(
            e.message
                .ends_with("terminating it failed: no such process"),
            "{}",
            e.message
        );
        w.adopt(rec, true, 3_000);
        let i = w.instances.get("i-000003").unwrap();
        assert!(i.alive && !i.soft.reporting && i.record.own_token);
        assert_eq!(w.instances.count_of("web/a"), 3);
    }

    #[test]
    fn a_permit_answers_with_the_drain_timeout_and_the_decrement() {
        let w = world();
        assert_eq!(w.permit_of("i-9"), None);
        assert_eq!(w.permit_of("i-1"), Some(None), "active: no permit");
        assert_eq!(w.permit_of("i-2"), Some(Some((true, 7_000))));
        assert_eq!(w.drain_timeout_ms("gone/a"), super::super::DEFAULT_DRAIN_MS);
    }

    #[test]
    fn published_targets_say_what_changed_once() {
        let mut w = world();
        let targets = |ids: &[&str]| {
            [(
                "web/a".to_string(),
                ids.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
        };
        let (p, events) = w.publish(targets(&["i-1"]));
        assert_eq!(p.len(), 1);
        assert!(
            p[0].peers.is_none(),
            "no group uses web: no peer set to keep"
        );
        let (lb, leaving) = p[0].balancer.as_ref().unwrap();
        assert_eq!(lb[0].addr, "127.9.0.1:8080");
        assert_eq!(leaving, &vec!["i-2".to_string()]);
        assert_eq!(events[0].message, "in rotation: i-1");
        // The same again: nothing to give, nothing to say.
        let (p, events) = w.publish(targets(&["i-1"]));
        assert!(p.is_empty() && events.is_empty());
        // An apply brings a group whose component uses web: every group is published again,
        // web with its peers and their ports.
        let mut groups = w.groups.clone();
        let mut api = groups["web/a"].clone();
        api.record.group = "api/a".into();
        api.plan.service = "api".into();
        api.plan.components[0].uses = vec!["web".into()];
        groups.insert("api/a".into(), api);
        w.take_applied(None, groups, &[], 0);
        assert!(w.is_used("web/a") && !w.is_used("api/a"));
        let (p, events) = w.publish(targets(&["i-1"]));
        assert!(events.is_empty(), "the targets did not change");
        let peers = p[0].peers.as_ref().expect("web is used now");
        assert_eq!(peers[0].ports["http"], 8080);
        let (_, events) = w.publish(targets(&[]));
        assert_eq!(events[0].message, "no instance in rotation");
    }

    #[test]
    fn a_large_target_set_is_told_by_its_count_and_what_changed() {
        let ids = |r: std::ops::Range<usize>| r.map(|n| format!("i-{n:05}")).collect::<Vec<_>>();
        assert_eq!(
            super::targets_message(None, &ids(0..2)),
            "in rotation: i-00000, i-00001"
        );
        let before = ids(0..5000);
        let mut now = ids(3..5000);
        now.push("i-09999".into());
        assert_eq!(
            super::targets_message(Some(&before), &now),
            "in rotation: 4998 instances (+1: i-09999; -3: i-00000, i-00001, i-00002)"
        );
        let m = super::targets_message(None, &ids(0..5000));
        assert!(
            m.starts_with("in rotation: 5000 instances (+5000: i-00000, "),
            "{m}"
        );
        assert!(m.ends_with(" and 4984 more; -0)"), "{m}");
    }

    #[test]
    fn a_count_by_hand_is_refused_outside_the_range_and_kept_for_the_autoscaler() {
        let w = world();
        let svc = w.fleet().unwrap().services["web"].clone();
        let req = |desired| drover_model::api::ScaleRequest {
            service: "web".into(),
            region: None,
            desired,
        };
        assert!(w.plan_scale(&svc, &req(9), 0).is_err(), "above max = 4");
        let (change, scaled) = w.plan_scale(&svc, &req(3), 0).unwrap();
        assert_eq!((scaled[0].from, scaled[0].to), (2, 3));
        assert_eq!(change.staged.records[0].desired, 3);
        assert_eq!(change.staged.autoscale[0].0, "web/a");
        assert!(change.commits.iter().any(|r| matches!(r,
            Record::Event(e) if e.message.starts_with("desired 2 -> 3 (manual: drover scale"))));
        let mut w = w;
        w.accept(change.staged);
        assert_eq!(w.groups["web/a"].record.desired, 3);
    }

    #[test]
    fn a_one_off_schedule_is_checked_kept_and_cancelled_once() {
        let mut w = world();
        let req = |start_ms, end_ms, desired| drover_model::api::ScheduleRequest {
            service: "web".into(),
            region: None,
            desired,
            start_ms,
            end_ms,
            timezone: None,
        };
        assert!(
            w.plan_schedule_once(&req(10, 5, 2), 0).is_err(),
            "ends before it starts"
        );
        assert!(w.plan_schedule_once(&req(10, 20, 2), 30).is_err(), "past");
        assert!(
            w.plan_schedule_once(&req(10, 20, 0), 0).is_err(),
            "no count"
        );
        let (once, records) = w.plan_schedule_once(&req(10, 20, 3), 0).unwrap();
        assert_eq!(once.id, 1);
        assert_eq!(records[0], Record::Schedule(once.clone()));
        w.keep_schedule(once);
        assert_eq!(w.plan_cancel(2, 5).unwrap_err(), CancelRefused::NoSchedule);
        assert_eq!(w.plan_cancel(1, 20).unwrap_err(), CancelRefused::Ended);
        let (cancelled, _) = w.plan_cancel(1, 5).unwrap();
        w.keep_schedule(cancelled);
        assert_eq!(w.once.len(), 1);
        assert_eq!(w.plan_cancel(1, 6).unwrap_err(), CancelRefused::Cancelled);
        assert_eq!(w.schedule_list(6).schedules[0].state, "cancelled");
    }

    #[test]
    fn suspicion_is_said_once_when_it_begins_and_once_when_it_ends() {
        let mut w = world();
        let g = vec!["web/a".to_string()];
        assert_eq!(w.note_suspicion(&g).len(), 1);
        assert!(w.note_suspicion(&g).is_empty());
        let back = w.note_suspicion(&[]);
        assert!(back[0].message.starts_with("heard from the group again"));
    }
}
