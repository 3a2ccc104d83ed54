//! The simulated server's store: what the world's steps commit ([`Record`]), the fleet
//! revision and the plans, kept so that a server restart rebuilds the world from what was
//! stored ([`World::restore`]), as the server's start does, and nothing else.

use std::collections::BTreeMap;

use drover_control::world::{Group, Record, World};
use drover_model::api::{Revision, ScheduledScale};
use drover_model::record::{GroupRecord, InstanceRecord};
use drover_model::Plan;

/// Everything stored, as the server's store keeps it (events only counted).
#[derive(Clone, Debug, Default)]
pub(super) struct Store {
    pub(super) revision: Option<Revision>,
    pub(super) groups: BTreeMap<String, GroupRecord>,
    /// Per group, its plans by generation (immutable once stored).
    pub(super) plans: BTreeMap<String, BTreeMap<u64, Plan>>,
    pub(super) instances: BTreeMap<String, InstanceRecord>,
    pub(super) counters: BTreeMap<String, u64>,
    pub(super) once: Vec<ScheduledScale>,
    pub(super) events: u64,
}

impl Store {
    /// One commit.
    pub(super) fn commit(&mut self, records: Vec<Record>) {
        for r in records {
            match r {
                Record::Group(g) => {
                    self.groups.insert(g.group.clone(), g);
                }
                Record::Instance(i) => {
                    self.instances.insert(i.id.clone(), i);
                }
                Record::RemoveInstance(id) => {
                    self.instances.remove(&id);
                }
                Record::Counter { name, value } => {
                    self.counters.insert(name, value);
                }
                Record::Schedule(once) => match self.once.iter_mut().find(|o| o.id == once.id) {
                    Some(o) => *o = once,
                    None => self.once.push(once),
                },
                Record::Event(_) => self.events += 1,
            }
        }
    }

    /// Store a plan; a plan is never replaced by another content.
    pub(super) fn plan(&mut self, plan: Plan) {
        let by_gen = self.plans.entry(plan.group().0).or_default();
        if let Some(old) = by_gen.get(&plan.generation) {
            assert!(
                old.same_content(&plan),
                "plan generation {} of {} stored twice with another content",
                plan.generation,
                plan.group()
            );
            return;
        }
        by_gen.insert(plan.generation, plan);
    }

    pub(super) fn plan_of(&self, group: &str, generation: u64) -> Option<&Plan> {
        self.plans.get(group)?.get(&generation)
    }

    /// The world as a server starting now rebuilds it: `alive` says whether the provider
    /// still has an instance (it adopts it).
    pub(super) fn restore(
        &self,
        alive: impl Fn(&str) -> bool,
        silent_after_ms: u64,
        now: u64,
    ) -> World {
        let provider_of = |rec: &GroupRecord| {
            self.revision
                .as_ref()
                .and_then(|r| {
                    r.fleet
                        .regions
                        .get(drover_model::GroupId::region_of(&rec.group))
                })
                .map(|r| r.provider.as_str().to_string())
                .unwrap_or_default()
        };
        let groups = self
            .groups
            .values()
            .filter_map(|rec| {
                Some(Group {
                    plan: self.plan_of(&rec.group, rec.generation)?.clone(),
                    provider: provider_of(rec),
                    record: rec.clone(),
                    ingress: None,
                })
            })
            .collect();
        let instances = self
            .instances
            .values()
            .map(|rec| (rec.clone(), alive(&rec.id)));
        World::restore(
            self.revision.clone(),
            groups,
            instances,
            &self.counters,
            self.once.clone(),
            silent_after_ms,
            now,
        )
    }
}
