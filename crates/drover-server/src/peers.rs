//! Service discovery's server side: for each group, its instances in rotation (healthy, not
//! leaving) with their ports, under one version that grows with every change. The agents of
//! instances whose components `use` a service long-poll it (`GET /v1/agent/peers`) and send
//! back the version they applied; a leaving instance's drain is confirmed only once every
//! such agent applied a version without it, [`DNS_TTL`] ago or more (so that no component
//! still holds it from the agent's DNS answer). Like the balancers' acknowledgement of a
//! removal, this is what lets a leaving instance stop without dropping its peers' requests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use drover_model::api::{PeerAddr, PeersReply};
use tokio::sync::watch;

/// The TTL of the agents' DNS answers: a peer set is in use at most this long after an agent
/// applied the next one.
pub const DNS_TTL: Duration = Duration::from_secs(1);

/// An agent that has not polled for this long is not waited for (it may be cut off from the
/// server; its instance keeps what it had).
const POLL_FRESH: Duration = Duration::from_secs(40);

#[derive(Default)]
struct View {
    version: u64,
    /// Per group (`service/region`): its instances in rotation.
    sets: BTreeMap<String, Vec<PeerAddr>>,
    /// A leaving instance: the first version with it in no peer set.
    left_at: HashMap<String, u64>,
    /// Per instance whose components use others: what its agent applied.
    acks: HashMap<String, Ack>,
}

struct Ack {
    version: u64,
    /// When it first reported `version`.
    since: Instant,
    /// Its last poll.
    polled: Instant,
}

/// The peer sets and who has applied them.
pub struct Peers {
    view: Mutex<View>,
    version_tx: watch::Sender<u64>,
    epoch: String,
}

impl Default for Peers {
    fn default() -> Self {
        Peers::new()
    }
}

impl Peers {
    pub fn new() -> Peers {
        Peers {
            view: Mutex::new(View::default()),
            version_tx: watch::Sender::new(0),
            epoch: crate::balancer::new_epoch(),
        }
    }

    /// This run's epoch: versions of another one say nothing about what an agent applied.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self, v: &mut View) {
        v.version += 1;
        self.version_tx.send_replace(v.version);
    }

    /// `group`'s instances in rotation now; a no-op when unchanged.
    pub fn set(&self, group: &str, mut peers: Vec<PeerAddr>) {
        peers.sort();
        let mut v = self.view();
        if v.sets.get(group).is_some_and(|before| *before == peers) {
            return;
        }
        let next = v.version + 1;
        // Linear in the set's size (a group of 5,000 changes every pass while a restart's
        // instances come back; the pairwise search here was most of the server's CPU then).
        let now: std::collections::HashSet<&str> =
            peers.iter().map(|p| p.instance.as_str()).collect();
        let gone: Vec<String> = v
            .sets
            .get(group)
            .into_iter()
            .flatten()
            .filter(|b| !now.contains(b.instance.as_str()))
            .map(|b| b.instance.clone())
            .collect();
        drop(now);
        for id in gone {
            v.left_at.insert(id, next);
        }
        v.sets.insert(group.to_string(), peers);
        self.bump(&mut v);
    }

    /// An instance leaves now (its permit): out of its group's set at once.
    pub fn remove(&self, group: &str, instance: &str) {
        let mut v = self.view();
        let next = v.version + 1;
        let Some(set) = v.sets.get_mut(group) else {
            return;
        };
        let before = set.len();
        set.retain(|p| p.instance != instance);
        if set.len() != before {
            v.left_at.insert(instance.to_string(), next);
            self.bump(&mut v);
        }
    }

    /// An instance is gone for good.
    pub fn forget(&self, instance: &str) {
        let mut v = self.view();
        v.left_at.remove(instance);
        v.acks.remove(instance);
    }

    /// A group is gone.
    pub fn remove_group(&self, group: &str) {
        let mut v = self.view();
        if v.sets.remove(group).is_some() {
            self.bump(&mut v);
        }
    }

    /// An agent's poll: it applied `version`.
    pub fn ack(&self, instance: &str, version: u64) {
        let now = Instant::now();
        let mut v = self.view();
        match v.acks.get_mut(instance) {
            Some(a) if a.version == version => a.polled = now,
            Some(a) => {
                a.version = version;
                a.since = now;
                a.polled = now;
            }
            None => {
                v.acks.insert(
                    instance.to_string(),
                    Ack {
                        version,
                        since: now,
                        polled: now,
                    },
                );
            }
        }
    }

    /// Until the version is past `version`, or `wait`.
    pub async fn wait(&self, version: u64, wait: Duration) {
        let mut rx = self.version_tx.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v > version)).await;
    }

    /// The sets of `services` (name, group in the caller's region).
    pub fn reply(&self, services: &[(String, String)]) -> PeersReply {
        let v = self.view();
        PeersReply {
            epoch: self.epoch.clone(),
            version: v.version,
            services: services
                .iter()
                .map(|(name, group)| (name.clone(), v.sets.get(group).cloned().unwrap_or_default()))
                .collect(),
        }
    }

    /// Whether every agent of `consumers` (instances whose components use `instance`'s
    /// service, in its region) has dropped `instance`, [`DNS_TTL`] ago or more. Agents that
    /// never polled, or not lately, are not waited for.
    pub fn dropped_by(&self, instance: &str, consumers: &[String]) -> Result<(), String> {
        let v = self.view();
        let Some(&left) = v.left_at.get(instance) else {
            return Ok(());
        };
        let now = Instant::now();
        let behind: Vec<&str> = consumers
            .iter()
            .filter(|c| {
                v.acks.get(c.as_str()).is_some_and(|a| {
                    now.duration_since(a.polled) < POLL_FRESH
                        && (a.version < left || now.duration_since(a.since) < DNS_TTL)
                })
            })
            .map(String::as_str)
            .collect();
        if behind.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the agents of {} have not yet dropped {instance} from their peers (service discovery)",
                behind.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> PeerAddr {
        PeerAddr {
            instance: id.into(),
            addr: "127.1.0.1".into(),
            ports: [("http".to_string(), 8080)].into_iter().collect(),
        }
    }

    #[test]
    fn a_leaver_is_confirmed_once_every_polling_consumer_applied_a_set_without_it() {
        let p = Peers::new();
        p.set("core/a", vec![peer("i-1"), peer("i-2")]);
        let with = p.reply(&[("core".into(), "core/a".into())]);
        assert_eq!(with.services["core"].len(), 2);
        // Two consumers have applied the set with both.
        p.ack("i-f1", with.version);
        p.ack("i-f2", with.version);
        let consumers = vec!["i-f1".to_string(), "i-f2".to_string(), "i-new".to_string()];
        assert!(p.dropped_by("i-1", &consumers).is_ok(), "i-1 never left");
        // i-1 gets its permit.
        p.remove("core/a", "i-1");
        let without = p.reply(&[("core".into(), "core/a".into())]);
        assert_eq!(without.services["core"], vec![peer("i-2")]);
        let e = p.dropped_by("i-1", &consumers).unwrap_err();
        assert!(e.contains("i-f1, i-f2"), "{e}");
        // One applied it; i-new never polled (not waited for).
        p.ack("i-f1", without.version);
        let e = p.dropped_by("i-1", &consumers).unwrap_err();
        assert!(e.contains("i-f2"), "{e}");
        p.ack("i-f2", without.version);
        // Both applied it, but the DNS TTL has not passed since.
        assert!(p.dropped_by("i-1", &consumers).is_err());
        std::thread::sleep(DNS_TTL + Duration::from_millis(50));
        assert!(p.dropped_by("i-1", &consumers).is_ok());
        // The same set again changes nothing.
        let v = without.version;
        p.set("core/a", vec![peer("i-2")]);
        assert_eq!(p.reply(&[]).version, v);
        // Another run (a restart, a new leader) has another epoch: versions do not compare.
        std::thread::sleep(Duration::from_millis(2));
        let q = Peers::new();
        assert_ne!(q.epoch(), p.epoch());
        assert_eq!(p.reply(&[]).epoch, p.epoch());
    }
}
