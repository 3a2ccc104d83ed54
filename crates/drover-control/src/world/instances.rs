//! Every instance the world knows, with the group controller's view of each kept up to date
//! as it changes, and the groups whose change matters to their next pass.

use std::collections::BTreeMap;

use super::{view, view_named, Instance};
use crate::InstanceView;

/// Every instance the server knows, by id, with the group controller's view of each kept up
/// to date as it changes: an insert (a launch, a restart's load), a removal (forgotten), and
/// every change through [`Instances::get_mut`] or [`Instances::for_each_mut`] (a heartbeat,
/// an exit, a new lifecycle) refresh that instance's view in place. A change that can change
/// its group's decision ([`crate::group::view_change_matters`]: not a heartbeat
/// that only says "still here") marks the group for the next pass ([`super::World::reconcile_due`]).
/// A pass reads the views of the groups it reconciles; none is built per pass.
#[derive(Default)]
pub struct Instances {
    map: BTreeMap<String, Instance>,
    /// Per group, its instances' views by id (the order `reconcile` reads them in).
    views: BTreeMap<String, BTreeMap<String, InstanceView>>,
    /// Groups with a change since their last pass.
    pub(crate) changed: std::collections::BTreeSet<String>,
    /// `silent_after` (a heartbeat from an instance gone silent matters).
    silent_after_ms: u64,
}

/// An instance borrowed to change it: its view is refreshed when the borrow ends.
pub struct InstanceMut<'a> {
    inst: &'a mut Instance,
    views: &'a mut BTreeMap<String, BTreeMap<String, InstanceView>>,
    changed: &'a mut std::collections::BTreeSet<String>,
    silent_after_ms: u64,
}

impl std::ops::Deref for InstanceMut<'_> {
    type Target = Instance;
    fn deref(&self) -> &Instance {
        self.inst
    }
}

impl std::ops::DerefMut for InstanceMut<'_> {
    fn deref_mut(&mut self) -> &mut Instance {
        self.inst
    }
}

impl Drop for InstanceMut<'_> {
    fn drop(&mut self) {
        refresh(self.inst, self.views, self.changed, self.silent_after_ms);
    }
}

/// Bring `i`'s view up to date; mark its group when the change matters.
fn refresh(
    i: &Instance,
    views: &mut BTreeMap<String, BTreeMap<String, InstanceView>>,
    changed: &mut std::collections::BTreeSet<String>,
    silent_after_ms: u64,
) {
    let timing = crate::Timing {
        silent_after_ms,
        leave_within_ms: 0,
    };
    let matters = match views
        .get_mut(&i.record.group)
        .and_then(|g| g.get_mut(&i.record.id))
    {
        Some(old) => {
            // The names move from the old view to the new one (compared empty on both).
            let id = std::mem::take(&mut old.id);
            let group = std::mem::take(&mut old.group);
            let mut new = view_named(i, String::new(), String::new());
            let m = crate::group::view_change_matters(old, &new, &timing);
            new.id = id;
            new.group = group;
            *old = new;
            m
        }
        None => {
            views
                .entry(i.record.group.clone())
                .or_default()
                .insert(i.record.id.clone(), view(i));
            true
        }
    };
    if matters && !changed.contains(&i.record.group) {
        changed.insert(i.record.group.clone());
    }
}

impl Instances {
    /// `silent_after` of the server (which heartbeats matter to a pass).
    pub fn set_silent_after(&mut self, ms: u64) {
        self.silent_after_ms = ms;
    }

    pub fn get(&self, id: &str) -> Option<&Instance> {
        self.map.get(id)
    }

    /// One instance to change; its view follows when the borrow ends.
    pub fn get_mut(&mut self, id: &str) -> Option<InstanceMut<'_>> {
        let Instances {
            map,
            views,
            changed,
            silent_after_ms,
        } = self;
        map.get_mut(id).map(|inst| InstanceMut {
            inst,
            views,
            changed,
            silent_after_ms: *silent_after_ms,
        })
    }

    /// Change every instance; their views follow.
    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut Instance)) {
        for i in self.map.values_mut() {
            f(i);
            refresh(i, &mut self.views, &mut self.changed, self.silent_after_ms);
        }
    }

    pub fn insert(&mut self, id: String, inst: Instance) -> Option<Instance> {
        let old = self.remove(&id);
        refresh(
            &inst,
            &mut self.views,
            &mut self.changed,
            self.silent_after_ms,
        );
        self.map.insert(id, inst);
        old
    }

    pub fn remove(&mut self, id: &str) -> Option<Instance> {
        let old = self.map.remove(id)?;
        let group = &old.record.group;
        if let Some(g) = self.views.get_mut(group) {
            g.remove(id);
            if g.is_empty() {
                self.views.remove(group);
            }
        }
        self.changed.insert(group.clone());
        Some(old)
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &Instance> {
        self.map.values()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Instance)> {
        self.map.iter()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }

    /// The views of one group's instances, by id.
    pub fn group_views(&self, group: &str) -> impl Iterator<Item = &InstanceView> {
        self.views.get(group).into_iter().flat_map(|g| g.values())
    }

    /// One group's instances, by id (a look-up each: costs the group, not the fleet).
    pub fn of_group<'a>(&'a self, group: &str) -> impl Iterator<Item = &'a Instance> + 'a {
        let map = &self.map;
        self.views
            .get(group)
            .into_iter()
            .flat_map(|g| g.keys())
            .filter_map(move |id| map.get(id))
    }

    /// The groups that have instances (in the fleet or not).
    pub fn groups(&self) -> impl Iterator<Item = &String> {
        self.views.keys()
    }

    /// The number of instances of `group`.
    pub fn count_of(&self, group: &str) -> usize {
        self.views.get(group).map_or(0, |g| g.len())
    }
}

impl std::ops::Index<&str> for Instances {
    type Output = Instance;
    fn index(&self, id: &str) -> &Instance {
        &self.map[id]
    }
}
