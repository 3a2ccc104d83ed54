//! Service discovery's server side: the core's peer book ([`drover_control::discovery`],
//! which holds the drain gate's rule) behind a lock, on the server's clock, with the
//! long-poll agents wait on (`GET /v1/agent/peers`) and this run's epoch. Like the
//! balancers' acknowledgement of a removal, the gate is what lets a leaving instance stop
//! without dropping its peers' requests.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use drover_control::discovery::PeerBook;
use drover_model::api::{PeerAddr, PeersReply};
use tokio::sync::watch;

use crate::engine::now_ms;

/// The peer sets and who has applied them.
pub struct Peers {
    book: Mutex<PeerBook>,
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
            book: Mutex::new(PeerBook::default()),
            version_tx: watch::Sender::new(0),
            epoch: crate::balancer::new_epoch(),
        }
    }

    /// This run's epoch: versions of another one say nothing about what an agent applied.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    fn book(&self) -> MutexGuard<'_, PeerBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake the long-polls when the book's version grew.
    fn changed(&self, b: &PeerBook, grew: bool) {
        if grew {
            self.version_tx.send_replace(b.version());
        }
    }

    /// `group`'s instances in rotation now; a no-op when unchanged.
    pub fn set(&self, group: &str, peers: Vec<PeerAddr>) {
        let mut b = self.book();
        let grew = b.set(group, peers);
        self.changed(&b, grew);
    }

    /// An instance leaves now (its permit): out of its group's set at once.
    pub fn remove(&self, group: &str, instance: &str) {
        let mut b = self.book();
        let grew = b.remove(group, instance);
        self.changed(&b, grew);
    }

    /// An instance is gone for good.
    pub fn forget(&self, instance: &str) {
        self.book().forget(instance);
    }

    /// A group is gone.
    pub fn remove_group(&self, group: &str) {
        let mut b = self.book();
        let grew = b.remove_group(group);
        self.changed(&b, grew);
    }

    /// An agent's poll: it applied `version`.
    pub fn ack(&self, instance: &str, version: u64) {
        self.book().ack(instance, version, now_ms());
    }

    /// Until the version is past `version`, or `wait`.
    pub async fn wait(&self, version: u64, wait: Duration) {
        let mut rx = self.version_tx.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v > version)).await;
    }

    /// The sets of `services` (name, group in the caller's region).
    pub fn reply(&self, services: &[(String, String)]) -> PeersReply {
        let b = self.book();
        PeersReply {
            epoch: self.epoch.clone(),
            version: b.version(),
            services: services
                .iter()
                .map(|(name, group)| (name.clone(), b.set_of(group).to_vec()))
                .collect(),
        }
    }

    /// Whether every agent of `consumers` has dropped `instance`
    /// ([`PeerBook::dropped_by`], now).
    pub fn dropped_by(&self, instance: &str, consumers: &[String]) -> Result<(), String> {
        self.book().dropped_by(instance, consumers, now_ms())
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

    #[tokio::test]
    async fn a_long_poll_ends_when_a_set_changes_and_not_for_the_same_set() {
        let p = std::sync::Arc::new(Peers::new());
        p.set("core/a", vec![peer("i-1"), peer("i-2")]);
        let with = p.reply(&[("core".into(), "core/a".into())]);
        assert_eq!(with.services["core"].len(), 2);
        assert_eq!(with.epoch, p.epoch());
        // The same set again: the poll waits out its time.
        p.set("core/a", vec![peer("i-2"), peer("i-1")]);
        let t = std::time::Instant::now();
        p.wait(with.version, Duration::from_millis(200)).await;
        assert!(t.elapsed() >= Duration::from_millis(200));
        // A permit takes i-1 out: a held poll ends at once.
        let q = p.clone();
        let poll = tokio::spawn(async move { q.wait(with.version, Duration::from_secs(30)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        p.remove("core/a", "i-1");
        tokio::time::timeout(Duration::from_secs(5), poll)
            .await
            .expect("the poll ended with the change")
            .unwrap();
        let without = p.reply(&[("core".into(), "core/a".into())]);
        assert_eq!(without.services["core"], vec![peer("i-2")]);
        // A consumer that applied the set with i-1 holds its drain.
        p.ack("i-f1", with.version);
        assert!(p.dropped_by("i-1", &["i-f1".to_string()]).is_err());
        // Another run (a restart, a new leader) has another epoch.
        std::thread::sleep(Duration::from_millis(2));
        assert_ne!(Peers::new().epoch(), p.epoch());
    }
}
