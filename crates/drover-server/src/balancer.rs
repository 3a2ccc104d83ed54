//! What the balancer processes (`drover lb`) are told and what they tell: the ingresses and
//! their targets as one versioned config that balancers long-poll, and their reports (open
//! connections per instance), from which the leave path learns that a draining instance
//! holds no connection.
//!
//! Invariants:
//! - every change of the config bumps its version and wakes the long-polls;
//! - an instance that left rotation is reported drained (0 open connections) only by
//!   balancers that applied a config without it: until every accepting balancer that
//!   reported lately has, the answer is "not confirmed", never 0;
//! - until the engine's view is rebuilt after a start ([`Balancers::set_rebuilt`]), the
//!   config says so, and balancers keep the targets they have (a restarted server never
//!   empties a listener).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_model::api::{
    Balance, BalancerStatus, LbConfig, LbHealth, LbListener, LbReport, LbTarget,
};
use tokio::sync::watch;

/// A report older than this no longer counts: that balancer is taken as gone.
pub const REPORT_FRESH: Duration = Duration::from_secs(3);
/// Balancers not heard from for this long are dropped from status.
const REPORT_FORGET: Duration = Duration::from_secs(60);

/// Why open connections to an instance cannot be told yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotConfirmed(pub String);

struct Seen {
    at: Instant,
    report: LbReport,
}

#[derive(Default)]
struct View {
    version: u64,
    rebuilt: bool,
    listeners: BTreeMap<String, LbListener>,
    /// The config version with which each instance last left a listener's targets.
    left_at: HashMap<String, u64>,
    reports: HashMap<String, Seen>,
}

impl View {
    fn bump(&mut self, tx: &watch::Sender<u64>) {
        self.version += 1;
        tx.send_replace(self.version);
    }
}

/// The config balancers follow and what they last reported.
pub struct Balancers {
    epoch: String,
    view: Mutex<View>,
    version_tx: watch::Sender<u64>,
}

impl Default for Balancers {
    fn default() -> Self {
        Self::new()
    }
}

/// A new run's epoch: the clock in nanoseconds and the pid, so that no two runs (restarts, a
/// new leader's terms) share one. Versions are compared only within an epoch.
pub(crate) fn new_epoch() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", nanos, std::process::id())
}

impl Balancers {
    pub fn new() -> Balancers {
        Balancers {
            epoch: new_epoch(),
            view: Mutex::new(View::default()),
            version_tx: watch::channel(0).0,
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This run of the server, as balancers see it.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Add or change a listener; its targets are kept.
    /// Returns whether the listener is new (it has no target yet).
    pub fn set_listener(
        &self,
        group: &str,
        listen: SocketAddr,
        balance: Balance,
        health: Option<LbHealth>,
    ) -> bool {
        let mut v = self.view();
        let listen = listen.to_string();
        let mut created = false;
        let changed = match v.listeners.get_mut(group) {
            Some(l) if l.listen == listen && l.balance == balance && l.health == health => false,
            Some(l) => {
                l.listen = listen;
                l.balance = balance;
                l.health = health;
                true
            }
            None => {
                created = true;
                v.listeners.insert(
                    group.to_string(),
                    LbListener {
                        name: group.to_string(),
                        listen,
                        balance,
                        health,
                        targets: Vec::new(),
                        leaving: Vec::new(),
                    },
                );
                true
            }
        };
        if changed {
            v.bump(&self.version_tx);
        }
        created
    }

    /// Where the listener of `group` listens, if it has one.
    pub fn listen_addr(&self, group: &str) -> Option<String> {
        self.view().listeners.get(group).map(|l| l.listen.clone())
    }

    /// Whether any listener (of another group too) listens on `addr`.
    pub fn listens_on(&self, addr: SocketAddr) -> bool {
        let addr = addr.to_string();
        self.view().listeners.values().any(|l| l.listen == addr)
    }

    pub fn remove_listener(&self, group: &str) {
        let mut v = self.view();
        if v.listeners.remove(group).is_some() {
            v.bump(&self.version_tx);
        }
    }

    /// The targets of `group`'s listener and the instances leaving it; a no-op when
    /// unchanged or when the group has no listener.
    pub fn set_targets(&self, group: &str, mut targets: Vec<LbTarget>, mut leaving: Vec<String>) {
        targets.sort();
        leaving.sort();
        let mut v = self.view();
        let version = v.version + 1;
        let Some(l) = v.listeners.get_mut(group) else {
            return;
        };
        if l.targets == targets && l.leaving == leaving {
            return;
        }
        // Linear in the group's size: a pairwise search is quadratic in a group of thousands.
        let now: std::collections::HashSet<&str> = targets.iter().map(|t| t.id.as_str()).collect();
        let gone: Vec<String> = l
            .targets
            .iter()
            .filter(|t| !now.contains(t.id.as_str()))
            .map(|t| t.id.clone())
            .collect();
        drop(now);
        l.targets = targets;
        l.leaving = leaving;
        for id in gone {
            v.left_at.insert(id, version);
        }
        v.bump(&self.version_tx);
    }

    /// Take one instance out of rotation now (a permit), and mark it as leaving.
    pub fn remove_target(&self, group: &str, instance: &str) {
        let mut v = self.view();
        let version = v.version + 1;
        let Some(l) = v.listeners.get_mut(group) else {
            return;
        };
        let before = l.targets.len();
        l.targets.retain(|t| t.id != instance);
        let was_leaving = l.leaving.iter().any(|x| x == instance);
        if !was_leaving {
            l.leaving.push(instance.to_string());
            l.leaving.sort();
        }
        if l.targets.len() != before || !was_leaving {
            v.left_at.insert(instance.to_string(), version);
            v.bump(&self.version_tx);
        }
    }

    /// An instance is gone for good: forget when it left.
    pub fn forget_instance(&self, instance: &str) {
        self.view().left_at.remove(instance);
    }

    /// The engine's view is rebuilt after its start: from now on the targets are complete.
    pub fn set_rebuilt(&self) {
        let mut v = self.view();
        if !v.rebuilt {
            v.rebuilt = true;
            v.bump(&self.version_tx);
        }
    }

    pub fn rebuilt(&self) -> bool {
        self.view().rebuilt
    }

    pub fn config(&self) -> LbConfig {
        let v = self.view();
        LbConfig {
            epoch: self.epoch.clone(),
            version: v.version,
            rebuilt: v.rebuilt,
            listeners: v.listeners.values().cloned().collect(),
        }
    }

    /// The config once it is newer than (`epoch`, `version`), or after `wait`.
    pub async fn wait_config(&self, epoch: &str, version: u64, wait: Duration) -> LbConfig {
        let mut rx = self.version_tx.subscribe();
        if epoch == self.epoch {
            let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v > version)).await;
        }
        self.config()
    }

    /// Take a balancer's report; returns the listener errors it did not report before
    /// (each worth an event).
    pub fn report(&self, report: LbReport) -> Vec<(String, String)> {
        let now = Instant::now();
        let mut v = self.view();
        v.reports
            .retain(|_, s| now.duration_since(s.at) < REPORT_FORGET);
        let before = v.reports.get(&report.lb).map(|s| &s.report.errors);
        let new: Vec<(String, String)> = report
            .errors
            .iter()
            .filter(|(l, e)| before.and_then(|b| b.get(*l)) != Some(*e))
            .map(|(l, e)| (l.clone(), e.clone()))
            .collect();
        v.reports
            .insert(report.lb.clone(), Seen { at: now, report });
        new
    }

    /// Open connections that balancers hold to `instance` of `group`, summed over the
    /// balancers that reported within [`REPORT_FRESH`]. `Ok(0)` for a group without a
    /// listener.
    pub fn open_connections(&self, group: &str, instance: &str) -> Result<u64, NotConfirmed> {
        let v = self.view();
        if !v.listeners.contains_key(group) {
            return Ok(0);
        }
        let now = Instant::now();
        let fresh: Vec<&LbReport> = v
            .reports
            .values()
            .filter(|s| now.duration_since(s.at) < REPORT_FRESH)
            .map(|s| &s.report)
            .collect();
        if fresh.is_empty() {
            return Err(NotConfirmed(format!(
                "no balancer (drover lb) has reported in the last {}; is one running?",
                drover_model::Dur(REPORT_FRESH)
            )));
        }
        let left = v.left_at.get(instance).copied().unwrap_or(0);
        let behind: Vec<&str> = fresh
            .iter()
            .filter(|r| r.accepting && (r.epoch != self.epoch || r.version < left))
            .map(|r| r.lb.as_str())
            .collect();
        if !behind.is_empty() {
            return Err(NotConfirmed(format!(
                "balancer {} has not yet taken {instance} out of rotation",
                behind.join(", ")
            )));
        }
        Ok(fresh
            .iter()
            .filter_map(|r| r.connections.get(group)?.get(instance))
            .sum())
    }

    /// Connections established to `instance` through `group`'s listener, and connect
    /// failures to it, summed over the balancers that reported lately (cumulative counters).
    pub fn target_counters(&self, group: &str, instance: &str) -> (u64, u64) {
        let mut total = (0, 0);
        for s in self.stats() {
            if s.name != group {
                continue;
            }
            for t in s.targets.iter().filter(|t| t.id == instance) {
                total.0 += t.total;
                total.1 += t.connect_failures;
            }
        }
        total
    }

    /// The listener counters of every balancer that reported lately.
    pub fn stats(&self) -> Vec<drover_lb::ListenerStats> {
        let now = Instant::now();
        self.view()
            .reports
            .values()
            .filter(|s| now.duration_since(s.at) < REPORT_FRESH)
            .flat_map(|s| s.report.stats.iter())
            .filter_map(|j| serde_json::from_value(j.clone()).ok())
            .collect()
    }

    /// Balancers heard from in the last minute, for status.
    pub fn status(&self) -> Vec<BalancerStatus> {
        let now = Instant::now();
        let v = self.view();
        let mut out: Vec<BalancerStatus> = v
            .reports
            .values()
            .filter(|s| now.duration_since(s.at) < REPORT_FORGET)
            .map(|s| BalancerStatus {
                lb: s.report.lb.clone(),
                age_ms: now.duration_since(s.at).as_millis() as u64,
                current: s.report.epoch == self.epoch && s.report.version == v.version,
                accepting: s.report.accepting,
                errors: s.report.errors.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.lb.cmp(&b.lb));
        out
    }
}

/// The wire form of the balancer's health check.
pub fn wire_health(h: &drover_lb::HealthCheckConfig) -> LbHealth {
    LbHealth {
        http_path: match &h.kind {
            drover_lb::HealthCheckKind::Http { path } => Some(path.clone()),
            drover_lb::HealthCheckKind::Tcp => None,
        },
        interval_ms: h.interval.as_millis() as u64,
        timeout_ms: h.timeout.as_millis() as u64,
        rise: h.rise,
        fall: h.fall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str) -> LbTarget {
        LbTarget {
            id: id.into(),
            addr: "127.1.0.1:8080".into(),
        }
    }

    fn report(b: &Balancers, lb: &str, version: u64, open: u64) -> LbReport {
        LbReport {
            lb: lb.into(),
            epoch: b.epoch().to_string(),
            version,
            accepting: true,
            connections: [(
                "web/local".to_string(),
                [("i-000001".to_string(), open)].into_iter().collect(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_removed_target_is_drained_only_once_every_balancer_applied_its_removal() {
        let b = Balancers::new();
        b.set_listener(
            "web/local",
            "127.0.0.1:8080".parse().unwrap(),
            Balance::RoundRobin,
            None,
        );
        b.set_targets("web/local", vec![target("i-000001")], vec![]);
        // Nobody reported: not 0, unknown.
        assert!(b.open_connections("web/local", "i-000001").is_err());
        let before = b.config().version;
        b.report(report(&b, "lb-a", before, 0));
        b.report(report(&b, "lb-b", before, 2));
        b.remove_target("web/local", "i-000001");
        let removed = b.config();
        assert!(removed.version > before);
        assert_eq!(removed.listeners[0].targets, vec![]);
        assert_eq!(removed.listeners[0].leaving, vec!["i-000001".to_string()]);
        // Reports from before the removal: not confirmed, even with 0 open.
        let e = b.open_connections("web/local", "i-000001").unwrap_err();
        assert!(e.0.contains("lb-a") && e.0.contains("lb-b"), "{e:?}");
        b.report(report(&b, "lb-a", removed.version, 0));
        assert!(b.open_connections("web/local", "i-000001").is_err());
        b.report(report(&b, "lb-b", removed.version, 2));
        assert_eq!(b.open_connections("web/local", "i-000001"), Ok(2));
        // A balancer that handed its sockets over still counts its connections, not its
        // version.
        let mut old = report(&b, "lb-b", 0, 1);
        old.accepting = false;
        b.report(old);
        assert_eq!(b.open_connections("web/local", "i-000001"), Ok(1));
        // A report of another run of the server does not confirm anything.
        let mut other = report(&b, "lb-c", removed.version, 0);
        other.epoch = "another".into();
        b.report(other);
        assert!(b.open_connections("web/local", "i-000001").is_err());
    }

    #[tokio::test]
    async fn a_long_poll_answers_on_a_change_or_a_new_epoch() {
        let b = std::sync::Arc::new(Balancers::new());
        let v = b.config().version;
        // Another epoch: at once.
        let t0 = Instant::now();
        let c = b.wait_config("old", v, Duration::from_secs(5)).await;
        assert!(t0.elapsed() < Duration::from_secs(1));
        assert_eq!(c.epoch, b.epoch());
        // Same epoch and version: it waits for a change.
        let b2 = b.clone();
        let epoch = b.epoch().to_string();
        let poll =
            tokio::spawn(async move { b2.wait_config(&epoch, v, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!poll.is_finished());
        b.set_listener(
            "web/local",
            "127.0.0.1:8080".parse().unwrap(),
            Balance::LeastConnections,
            None,
        );
        let c = tokio::time::timeout(Duration::from_secs(1), poll)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.version, v + 1);
        assert_eq!(c.listeners[0].balance, Balance::LeastConnections);
        // Unchanged settings change nothing.
        b.set_listener(
            "web/local",
            "127.0.0.1:8080".parse().unwrap(),
            Balance::LeastConnections,
            None,
        );
        assert_eq!(b.config().version, v + 1);
    }
}
