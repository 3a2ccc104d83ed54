//! Logs, exec and the flight recorder, relayed over the agents' own connections.
//!
//! A person's `GET /v1/logs` or `POST /v1/exec` becomes one task per instance, queued for its
//! agent's long-poll (`GET /v1/agent/tasks`); the agent streams the result back as the body
//! of `POST /v1/agent/tasks/ID`, which is forwarded frame by frame (every text scrubbed of the
//! fleet's secret values) to the person's response. When the person goes, the agent's upload
//! is closed, which ends the task on the instance. Nothing reaches an instance from outside.
//!
//! The flight recorder keeps what agents send when a component dies or an instance leaves
//! (`POST /v1/agent/flight`): one file per record in `DATA/flight/`, at most
//! [`FLIGHT_TOTAL`] bytes in all and [`FLIGHT_RETENTION`] old, the oldest removed first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_model::logs::{AgentTask, FlightRecord, Frame};
use tokio::sync::{mpsc, Notify};

/// How long an agent has to take a task before the person is told it did not.
pub const TAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes the flight recorder keeps on the server in all.
pub const FLIGHT_TOTAL: u64 = 64 << 20;
/// How long a flight record is kept.
pub const FLIGHT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest flight record accepted (its lines' text, JSON-encoded).
pub const FLIGHT_MAX: usize = 256 << 10;
/// Tasks queued for one instance at most (more: 429).
const QUEUE_MAX: usize = 64;

/// Tasks waiting for their agents, and the open sessions their uploads go to.
#[derive(Clone, Default)]
pub struct Relay {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    queues: HashMap<String, VecDeque<AgentTask>>,
    wakers: HashMap<String, Arc<Notify>>,
    /// By task id: the instance it is for, where its frames go, whether it was taken.
    open: HashMap<u64, Open>,
}

struct Open {
    instance: String,
    tx: mpsc::Sender<Frame>,
    taken: Arc<Notify>,
    was_taken: bool,
}

/// One task's side at the server: its frames, until its agent's upload ends. Dropping it
/// withdraws the task (still queued) or closes the upload (under way).
pub struct Session {
    pub id: u64,
    pub instance: String,
    pub rx: mpsc::Receiver<Frame>,
    taken: Arc<Notify>,
    relay: Relay,
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut inner = self.relay.lock();
        inner.open.remove(&self.id);
        if let Some(q) = inner.queues.get_mut(&self.instance) {
            q.retain(|t| t.id() != self.id);
            if q.is_empty() {
                inner.queues.remove(&self.instance);
            }
        }
    }
}

impl Session {
    /// Resolves once the agent took the task (never, if it does not: bound it with a timeout).
    pub async fn taken(&self) {
        loop {
            let n = self.taken.notified();
            if self
                .relay
                .lock()
                .open
                .get(&self.id)
                .is_none_or(|o| o.was_taken)
            {
                return;
            }
            n.await;
        }
    }
}

impl Relay {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a task for `instance`'s agent (`make` gets its id); None when too many wait.
    pub fn dispatch(&self, instance: &str, make: impl FnOnce(u64) -> AgentTask) -> Option<Session> {
        let mut inner = self.lock();
        if inner
            .queues
            .get(instance)
            .is_some_and(|q| q.len() >= QUEUE_MAX)
        {
            return None;
        }
        inner.next += 1;
        let id = inner.next;
        let (tx, rx) = mpsc::channel(256);
        let taken = Arc::new(Notify::new());
        inner.open.insert(
            id,
            Open {
                instance: instance.to_string(),
                tx,
                taken: taken.clone(),
                was_taken: false,
            },
        );
        inner
            .queues
            .entry(instance.to_string())
            .or_default()
            .push_back(make(id));
        if let Some(w) = inner.wakers.get(instance) {
            w.notify_waiters();
        }
        Some(Session {
            id,
            instance: instance.to_string(),
            rx,
            taken,
            relay: self.clone(),
        })
    }

    /// The agent's long-poll: the tasks queued for `instance`, waiting up to `wait` for one.
    pub async fn take(&self, instance: &str, wait: Duration) -> Vec<AgentTask> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let waker = {
                let mut inner = self.lock();
                let tasks: Vec<AgentTask> = inner
                    .queues
                    .remove(instance)
                    .map(Vec::from)
                    .unwrap_or_default();
                if !tasks.is_empty() {
                    for t in &tasks {
                        if let Some(o) = inner.open.get_mut(&t.id()) {
                            o.was_taken = true;
                            o.taken.notify_waiters();
                        }
                    }
                    return tasks;
                }
                inner
                    .wakers
                    .entry(instance.to_string())
                    .or_insert_with(|| Arc::new(Notify::new()))
                    .clone()
            };
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Queued between the check and `enable`: look again at once.
            if self.lock().queues.contains_key(instance) {
                continue;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let mut inner = self.lock();
                if Arc::strong_count(&waker) <= 2 {
                    inner.wakers.remove(instance);
                }
                return Vec::new();
            }
        }
    }

    /// Where the frames of task `id` go, if it is open and for `instance`.
    pub fn sink(&self, id: u64, instance: &str) -> Option<mpsc::Sender<Frame>> {
        let inner = self.lock();
        inner
            .open
            .get(&id)
            .filter(|o| o.instance == instance)
            .map(|o| o.tx.clone())
    }
}

/// The flight recorder's files.
pub struct Flights {
    dir: PathBuf,
    lock: Mutex<()>,
}

/// Whether a name may be part of a file name (ids, component names: validated already, but
/// this is what a hostile agent sends).
fn safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Flights {
    pub fn new(data_dir: &Path) -> Flights {
        Flights {
            dir: data_dir.join("flight"),
            lock: Mutex::new(()),
        }
    }

    /// Keep `rec` (already scrubbed and bounded), then drop what is over the bounds.
    pub fn keep(&self, rec: &FlightRecord, now_ms: u64) -> std::io::Result<()> {
        let (service, region) = rec.group.split_once('/').unwrap_or((&rec.group, ""));
        if ![service, region, &rec.instance, &rec.component]
            .iter()
            .all(|s| safe(s))
        {
            return Err(std::io::Error::other(
                "a name in the record is not a valid id",
            ));
        }
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(&self.dir)?;
        let name = format!(
            "{service}~{region}~{}~{}~{}~{}.json",
            rec.generation, rec.instance, rec.component, rec.at_ms
        );
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(rec).unwrap_or_default())?;
        std::fs::rename(&tmp, self.dir.join(&name))?;
        self.prune(now_ms);
        Ok(())
    }

    /// Remove records past the retention, then the oldest until the total fits.
    fn prune(&self, now_ms: u64) {
        let mut all = self.list();
        all.sort_by_key(|(m, _, _)| m.at_ms);
        let cutoff = now_ms.saturating_sub(FLIGHT_RETENTION.as_millis() as u64);
        let mut total: u64 = all.iter().map(|(_, _, len)| len).sum();
        for (m, path, len) in &all {
            if m.at_ms < cutoff || total > FLIGHT_TOTAL {
                let _ = std::fs::remove_file(path);
                total = total.saturating_sub(*len);
            }
        }
    }

    fn list(&self) -> Vec<(Meta, PathBuf, u64)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let meta = Meta::parse(&name)?;
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                Some((meta, e.path(), len))
            })
            .collect()
    }

    /// The records of `service` (in `region`, of `instance`, of `generation`, when given),
    /// oldest first.
    pub fn find(
        &self,
        service: &str,
        region: Option<&str>,
        instance: Option<&str>,
        generation: Option<u64>,
    ) -> Vec<FlightRecord> {
        let mut found: Vec<(Meta, PathBuf)> = self
            .list()
            .into_iter()
            .filter(|(m, _, _)| {
                m.service == service
                    && region.is_none_or(|r| m.region == r)
                    && instance.is_none_or(|i| m.instance == i)
                    && generation.is_none_or(|g| m.generation == g)
            })
            .map(|(m, p, _)| (m, p))
            .collect();
        found.sort_by_key(|(m, _)| m.at_ms);
        found
            .into_iter()
            .filter_map(|(_, p)| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
            .collect()
    }
}

/// What a record's file name says.
struct Meta {
    service: String,
    region: String,
    generation: u64,
    instance: String,
    at_ms: u64,
}

impl Meta {
    fn parse(name: &str) -> Option<Meta> {
        let stem = name.strip_suffix(".json")?;
        let parts: Vec<&str> = stem.split('~').collect();
        let [service, region, generation, instance, _component, at] = parts[..] else {
            return None;
        };
        Some(Meta {
            service: service.into(),
            region: region.into(),
            generation: generation.parse().ok()?,
            instance: instance.into(),
            at_ms: at.parse().ok()?,
        })
    }
}

/// The newest records per (instance, component), for a summary line.
pub fn latest(recs: &[FlightRecord]) -> BTreeMap<(String, String), &FlightRecord> {
    let mut out = BTreeMap::new();
    for r in recs {
        out.insert((r.instance.clone(), r.component.clone()), r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::logs::{LogLine, Stream};

    fn rec(instance: &str, at_ms: u64, text: &str) -> FlightRecord {
        FlightRecord {
            instance: instance.into(),
            group: "web/local".into(),
            generation: 2,
            component: "app".into(),
            reason: "exited (exit status 1)".into(),
            at_ms,
            lines: vec![LogLine {
                at_ms,
                instance: instance.into(),
                component: "app".into(),
                stream: Stream::Stderr,
                line: text.into(),
            }],
        }
    }

    #[test]
    fn flight_records_are_found_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let f = Flights::new(dir.path());
        let now = 10 * FLIGHT_RETENTION.as_millis() as u64;
        f.keep(&rec("i-000001", now - 1000, "boom"), now).unwrap();
        f.keep(&rec("i-000002", now - 500, "bang"), now).unwrap();
        assert_eq!(f.find("web", None, Some("i-000002"), None).len(), 1);
        assert_eq!(f.find("web", Some("local"), None, Some(2)).len(), 2);
        assert!(f.find("web", None, None, Some(3)).is_empty());
        assert!(f.find("api", None, None, None).is_empty());
        // Past the retention: removed at the next write.
        f.keep(&rec("i-000003", 1, "old"), now).unwrap();
        assert!(f.find("web", None, Some("i-000003"), None).is_empty());
        // A hostile name is refused.
        assert!(f.keep(&rec("../../etc", now, "x"), now).is_err());
    }

    #[tokio::test]
    async fn a_task_reaches_its_agent_and_its_frames_the_session() {
        let relay = Relay::default();
        let waiting = {
            let relay = relay.clone();
            tokio::spawn(async move { relay.take("i-000001", Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut s = relay
            .dispatch("i-000001", |id| AgentTask::Exec {
                id,
                component: None,
                command: vec!["true".into()],
            })
            .unwrap();
        let got = waiting.await.unwrap();
        assert_eq!(got.len(), 1);
        tokio::time::timeout(Duration::from_secs(1), s.taken())
            .await
            .unwrap();
        assert!(relay.sink(s.id, "i-000002").is_none(), "another instance's");
        let tx = relay.sink(s.id, "i-000001").unwrap();
        tx.send(Frame::Idle).await.unwrap();
        assert_eq!(s.rx.recv().await, Some(Frame::Idle));
        let id = s.id;
        drop(s);
        assert!(relay.sink(id, "i-000001").is_none());
        // A task withdrawn before it was taken is not handed out.
        let s = relay
            .dispatch("i-000001", |id| AgentTask::Exec {
                id,
                component: None,
                command: vec!["true".into()],
            })
            .unwrap();
        drop(s);
        assert!(relay
            .take("i-000001", Duration::from_millis(10))
            .await
            .is_empty());
    }
}
