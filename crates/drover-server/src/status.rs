//! `GET /v1/status`, read without holding the state lock for long: one pass under the lock
//! for the counts (and the ids when every instance is listed), then the instances a chunk of
//! [`CHUNK`] at a time, each chunk under the lock on its own, so a heartbeat waits at most
//! one chunk. Summaries (`instances=none`, the dashboard's fleet page) and pages of one group
//! never list the fleet.

use drover_model::api::FleetStatus;

use crate::engine::{now_ms, Engine};
use crate::state::{instance_status, Listing, StateCounts};

/// Instances read per hold of the state lock.
pub const CHUNK: usize = 1024;

/// The fleet's status with the instances `listing` asks for.
pub fn fleet_status(e: &Engine, listing: &Listing) -> FleetStatus {
    let silent = e.timing.silent_after_ms;
    let mut status = match listing {
        Listing::All | Listing::Ids => {
            let (mut status, ids) = e.state().status_of(now_ms(), silent, &Listing::Ids);
            for (g, ids) in status.groups.iter_mut().zip(ids) {
                g.instances.reserve(ids.len());
                for chunk in ids.chunks(CHUNK) {
                    let st = e.state();
                    let now = now_ms();
                    for (id, in_rotation) in chunk {
                        // Gone since the counts were read: not listed.
                        if let Some(i) = st.instances.get(id) {
                            g.instances
                                .push(instance_status(i, *in_rotation, now, silent));
                        }
                    }
                }
            }
            status
        }
        other => e.state().status_of(now_ms(), silent, other).0,
    };
    status.balancers = e.balancers.status();
    status
}

/// Every group without its instances, and each group's instances by state (the dashboard's
/// fleet page): one pass under the state lock that builds no instance's status.
pub fn summaries(e: &Engine) -> (FleetStatus, Vec<StateCounts>) {
    let (status, _, counts) =
        e.state()
            .status_counted(now_ms(), e.timing.silent_after_ms, &Listing::None);
    (status, counts)
}

/// One group's summary and its instances by state, with the instances of `page` (from 1,
/// `per_page` a page, by id) listed: no other group's instance is read past its counts.
/// `None` when there is no such group.
pub fn group_page(
    e: &Engine,
    group: &str,
    page: usize,
    per_page: usize,
) -> Option<(drover_model::api::GroupStatus, StateCounts)> {
    let listing = Listing::Page {
        group: group.to_string(),
        page,
        per_page,
    };
    let (status, _, counts) =
        e.state()
            .status_counted(now_ms(), e.timing.silent_after_ms, &listing);
    status
        .groups
        .into_iter()
        .zip(counts)
        .find(|(g, _)| g.group == group)
}
