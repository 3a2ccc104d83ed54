//! Service discovery's book, with no I/O and no clock of its own: for each group, its
//! instances in rotation (healthy, not leaving) with their ports, under one version that
//! grows with every change, and what each consumer's agent applied. The drain gate: a
//! leaving instance's drain is confirmed only once every consumer (an instance whose
//! components `use` its service, in its region) that polls applied a version without it,
//! [`DNS_TTL_MS`] ago or more, so that no component still holds it from the agent's DNS
//! answer. The server keeps the book behind its long-poll (`drover-server`'s `peers`).

use std::collections::{BTreeMap, HashMap, HashSet};

use drover_model::api::PeerAddr;

/// The TTL of the agents' DNS answers: a peer set is in use at most this long after an agent
/// applied the next one.
pub const DNS_TTL_MS: u64 = 1_000;

/// An agent that has not polled for this long is not waited for (it may be cut off from the
/// server; its instance keeps what it had).
pub const POLL_FRESH_MS: u64 = 40_000;

/// What one consumer's agent applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ack {
    version: u64,
    /// When it first reported `version`.
    since_ms: u64,
    /// Its last poll.
    polled_ms: u64,
}

/// The peer sets and who has applied them.
#[derive(Clone, Debug, Default)]
pub struct PeerBook {
    version: u64,
    /// Per group (`service/region`): its instances in rotation.
    sets: BTreeMap<String, Vec<PeerAddr>>,
    /// A leaving instance: the first version with it in no peer set.
    left_at: HashMap<String, u64>,
    /// Per instance whose components use others: what its agent applied.
    acks: HashMap<String, Ack>,
}

impl PeerBook {
    /// The version now (it grows with every change of a set).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// `group`'s instances in rotation now. Whether it changed (the version grew).
    pub fn set(&mut self, group: &str, mut peers: Vec<PeerAddr>) -> bool {
        peers.sort();
        if self.sets.get(group).is_some_and(|before| *before == peers) {
            return false;
        }
        let next = self.version + 1;
        // Linear in the set's size (a group of 5,000 changes every pass while a restart's
        // instances come back).
        let now: HashSet<&str> = peers.iter().map(|p| p.instance.as_str()).collect();
        let gone: Vec<String> = self
            .sets
            .get(group)
            .into_iter()
            .flatten()
            .filter(|b| !now.contains(b.instance.as_str()))
            .map(|b| b.instance.clone())
            .collect();
        for id in gone {
            self.left_at.insert(id, next);
        }
        self.sets.insert(group.to_string(), peers);
        self.version = next;
        true
    }

    /// An instance leaves now (its permit): out of its group's set at once. Whether it was
    /// in it (the version grew).
    pub fn remove(&mut self, group: &str, instance: &str) -> bool {
        let next = self.version + 1;
        let Some(set) = self.sets.get_mut(group) else {
            return false;
        };
        let before = set.len();
        set.retain(|p| p.instance != instance);
        if set.len() == before {
            return false;
        }
        self.left_at.insert(instance.to_string(), next);
        self.version = next;
        true
    }

    /// An instance is gone for good.
    pub fn forget(&mut self, instance: &str) {
        self.left_at.remove(instance);
        self.acks.remove(instance);
    }

    /// A group is gone. Whether it had a set (the version grew).
    pub fn remove_group(&mut self, group: &str) -> bool {
        if self.sets.remove(group).is_none() {
            return false;
        }
        self.version += 1;
        true
    }

    /// An agent's poll at `now_ms`: it applied `version`.
    pub fn ack(&mut self, instance: &str, version: u64, now_ms: u64) {
        match self.acks.get_mut(instance) {
            Some(a) if a.version == version => a.polled_ms = now_ms,
            Some(a) => {
                *a = Ack {
                    version,
                    since_ms: now_ms,
                    polled_ms: now_ms,
                }
            }
            None => {
                self.acks.insert(
                    instance.to_string(),
                    Ack {
                        version,
                        since_ms: now_ms,
                        polled_ms: now_ms,
                    },
                );
            }
        }
    }

    /// The set of `group` now.
    pub fn set_of(&self, group: &str) -> &[PeerAddr] {
        self.sets.get(group).map_or(&[], |s| s.as_slice())
    }

    /// Whether every agent of `consumers` has dropped `instance`, [`DNS_TTL_MS`] ago or
    /// more, at `now_ms`. Agents that never polled, or not in the last [`POLL_FRESH_MS`],
    /// are not waited for. `Err`: who has not, in words.
    pub fn dropped_by(
        &self,
        instance: &str,
        consumers: &[String],
        now_ms: u64,
    ) -> Result<(), String> {
        let Some(&left) = self.left_at.get(instance) else {
            return Ok(());
        };
        let behind: Vec<&str> = consumers
            .iter()
            .filter(|c| {
                self.acks.get(c.as_str()).is_some_and(|a| {
                    now_ms.saturating_sub(a.polled_ms) < POLL_FRESH_MS
                        && (a.version < left || now_ms.saturating_sub(a.since_ms) < DNS_TTL_MS)
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
    fn a_leaver_is_confirmed_once_every_fresh_consumer_applied_a_set_without_it_a_ttl_ago() {
        let mut b = PeerBook::default();
        assert!(b.set("core/a", vec![peer("i-2"), peer("i-1")]));
        let with = b.version();
        b.ack("i-f1", with, 0);
        b.ack("i-f2", with, 0);
        b.ack("i-stale", with, 0);
        let consumers: Vec<String> = ["i-f1", "i-f2", "i-new", "i-stale"]
            .map(String::from)
            .to_vec();
        assert!(
            b.dropped_by("i-1", &consumers, 100).is_ok(),
            "i-1 never left"
        );
        // i-1 gets its permit.
        assert!(b.remove("core/a", "i-1"));
        assert_eq!(b.set_of("core/a"), &[peer("i-2")]);
        let without = b.version();
        assert!(without > with);
        let e = b.dropped_by("i-1", &consumers, 200).unwrap_err();
        assert!(e.contains("i-f1, i-f2, i-stale"), "{e}");
        // One applied it; i-new never polled (not waited for).
        b.ack("i-f1", without, 1_000);
        b.ack("i-f2", with, 1_000);
        let e = b
            .dropped_by("i-1", &consumers, 1_000 + DNS_TTL_MS)
            .unwrap_err();
        assert!(e.contains("i-f2, i-stale") && !e.contains("i-f1"), "{e}");
        b.ack("i-f2", without, 2_000);
        // Both applied it, but the DNS TTL has not passed since the second did.
        assert!(b
            .dropped_by("i-1", &consumers, 2_000 + DNS_TTL_MS - 1)
            .is_err());
        // i-stale last polled at 0: past POLL_FRESH_MS it is not waited for.
        assert!(b.dropped_by("i-1", &consumers, POLL_FRESH_MS - 1).is_err());
        assert!(b.dropped_by("i-1", &consumers, POLL_FRESH_MS).is_ok());
        // The same set again changes nothing; a gone instance is forgotten.
        assert!(!b.set("core/a", vec![peer("i-2")]));
        assert_eq!(b.version(), without);
        b.forget("i-1");
        b.ack("i-f2", with, POLL_FRESH_MS);
        assert!(b.dropped_by("i-1", &consumers, POLL_FRESH_MS).is_ok());
    }

    #[test]
    fn an_instance_dropped_from_a_new_set_counts_as_left_from_that_version() {
        let mut b = PeerBook::default();
        b.set("core/a", vec![peer("i-1"), peer("i-2")]);
        let v1 = b.version();
        b.ack("c", v1, 0);
        b.set("core/a", vec![peer("i-2")]);
        let consumers = vec!["c".to_string()];
        assert!(b.dropped_by("i-1", &consumers, 10).is_err());
        b.ack("c", b.version(), 10);
        assert!(b.dropped_by("i-1", &consumers, 10 + DNS_TTL_MS).is_ok());
        assert!(b.remove_group("core/a"));
        assert!(b.set_of("core/a").is_empty());
    }
}
