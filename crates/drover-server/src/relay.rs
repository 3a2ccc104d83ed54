//! Logs, exec and the flight recorder, relayed over the agents' own connections.
//!
//! A person's `GET /v1/logs` or `POST /v1/exec` becomes one task per instance, queued for its
//! agent's long-poll (`GET /v1/agent/tasks`); the agent streams the result back as the body
//! of `POST /v1/agent/tasks/ID`, which is forwarded frame by frame (every text scrubbed of the
//! fleet's secret values) to the person's response. When the person goes, the agent's upload
//! is closed, which ends the task on the instance. Nothing reaches an instance from outside.
//!
//! The flight recorder keeps what agents send when a component dies or an instance leaves
//! (`POST /v1/agent/flight`): one file per record in `DATA/flight/`; and, per component of
//! each instance, its tail as the agent keeps sending it while it runs (`POST
//! /v1/agent/tail`: `...~tail.json`, the new lines appended, the newest `FLIGHT_BYTES` kept),
//! which is all there is of an agent killed without warning. At most [`FLIGHT_TOTAL`] bytes in
//! all and [`FLIGHT_RETENTION`] old, the oldest removed first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_model::logs::{AgentTask, ExecInput, FlightRecord, Frame, LogLine};
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
    /// By task id, for an interactive exec: the person's input on its way to the agent.
    inputs: HashMap<u64, Input>,
}

struct Input {
    /// The token that started the session: only it may send input.
    owner: String,
    instance: String,
    tx: mpsc::Sender<ExecInput>,
    /// Taken by the agent's `GET /v1/agent/tasks/ID/input`.
    rx: Option<mpsc::Receiver<ExecInput>>,
}

/// Input messages waiting for the agent, per session.
const INPUT_QUEUE: usize = 64;

struct Open {
    instance: String,
    /// Handed to the agent's upload when it comes (so the session sees the end of the upload
    /// as the end of its frames).
    tx: Option<mpsc::Sender<Frame>>,
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
        inner.inputs.remove(&self.id);
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
                tx: Some(tx),
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

    /// Let session `id` take input from `owner` (the token that started it).
    pub fn open_input(&self, id: u64, owner: &str, instance: &str) {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        self.lock().inputs.insert(
            id,
            Input {
                owner: owner.to_string(),
                instance: instance.to_string(),
                tx,
                rx: Some(rx),
            },
        );
    }

    /// Where `owner`'s input to session `id` goes, if it is open and theirs.
    pub fn input_sender(&self, id: u64, owner: &str) -> Option<mpsc::Sender<ExecInput>> {
        let inner = self.lock();
        inner
            .inputs
            .get(&id)
            .filter(|i| i.owner == owner)
            .map(|i| i.tx.clone())
    }

    /// The input of session `id` for its agent (once), if it is open and for `instance`.
    pub fn take_input(&self, id: u64, instance: &str) -> Option<mpsc::Receiver<ExecInput>> {
        let mut inner = self.lock();
        inner
            .inputs
            .get_mut(&id)
            .filter(|i| i.instance == instance)
            .and_then(|i| i.rx.take())
    }

    /// Where the frames of task `id` go, if it is open, for `instance` and not uploaded to
    /// yet: the session's frames end when this sender is dropped (the upload ended).
    pub fn sink(&self, id: u64, instance: &str) -> Option<mpsc::Sender<Frame>> {
        let mut inner = self.lock();
        inner
            .open
            .get_mut(&id)
            .filter(|o| o.instance == instance)
            .and_then(|o| o.tx.take())
    }
}

/// The flight recorder's files.
pub struct Flights {
    dir: PathBuf,
    /// Held while a file is written; the time of the last pruning of the directory.
    lock: Mutex<u64>,
}

/// A tail's file is pruned with the others at most this often (tails come every second).
const TAIL_PRUNE_EVERY_MS: u64 = 10_000;

/// The reason a tail record gives.
pub const TAIL_REASON: &str =
    "its output as its agent last sent it (the agent sent no final record: killed, or its machine lost)";

/// The file of `rec` in the recorder's directory, `SERVICE~REGION~GEN~INSTANCE~COMPONENT~LAST.json`
/// (`LAST`: the record's time, or `tail`), once every name in it is a valid id.
fn file_name(rec: &FlightRecord, last: &str) -> std::io::Result<String> {
    let (service, region) = (
        drover_model::GroupId::service_of(&rec.group),
        drover_model::GroupId::region_of(&rec.group),
    );
    if ![service, region, &rec.instance, &rec.component]
        .iter()
        .all(|s| safe(s))
    {
        return Err(std::io::Error::other(
            "a name in the record is not a valid id",
        ));
    }
    Ok(format!(
        "{service}~{region}~{}~{}~{}~{last}.json",
        rec.generation, rec.instance, rec.component
    ))
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
            lock: Mutex::new(0),
        }
    }

    /// Keep `rec` (already scrubbed and bounded), then drop what is over the bounds.
    pub fn keep(&self, rec: &FlightRecord, now_ms: u64) -> std::io::Result<()> {
        let name = file_name(rec, &rec.at_ms.to_string())?;
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(&self.dir)?;
        self.write(&name, rec)?;
        self.prune(now_ms);
        *g = now_ms;
        Ok(())
    }

    fn write(&self, name: &str, rec: &FlightRecord) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(rec).unwrap_or_default())?;
        std::fs::rename(&tmp, self.dir.join(name))
    }

    /// Add `lines` (already scrubbed and bounded) to the tail kept of `rec`'s component
    /// (`reset`: in place of it), the newest `FLIGHT_BYTES_MAX` kept. `rec` names the component
    /// and carries no lines.
    pub fn append_tail(
        &self,
        rec: &FlightRecord,
        reset: bool,
        lines: Vec<LogLine>,
        now_ms: u64,
    ) -> std::io::Result<()> {
        let name = file_name(rec, "tail")?;
        let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(&self.dir)?;
        let mut kept: FlightRecord = if reset {
            rec.clone()
        } else {
            std::fs::read(self.dir.join(&name))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_else(|| rec.clone())
        };
        kept.at_ms = now_ms;
        kept.reason = TAIL_REASON.to_string();
        kept.lines.extend(lines);
        // The agent cuts to the component's own size; this is the bound of any.
        let cut = drover_model::logs::flight_cut(
            &kept.lines,
            drover_model::logs::FLIGHT_BYTES_MAX,
            |l| l.line.len(),
        );
        kept.lines.drain(..cut);
        self.write(&name, &kept)?;
        if now_ms.saturating_sub(*g) >= TAIL_PRUNE_EVERY_MS {
            self.prune(now_ms);
            *g = now_ms;
        }
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
                let mut meta = Meta::parse(&name)?;
                let md = e.metadata().ok();
                if meta.tail {
                    // A tail's time is its last append's.
                    meta.at_ms = md
                        .as_ref()
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64);
                }
                let len = md.map(|m| m.len()).unwrap_or(0);
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
        let found: Vec<(Meta, PathBuf)> = self
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
        let mut recs: Vec<FlightRecord> = found
            .into_iter()
            .filter_map(|(_, p)| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
            .collect();
        // By the records' own times (a tail's: its last append).
        recs.sort_by_key(|r| r.at_ms);
        recs
    }
}

/// What a record's file name says.
struct Meta {
    service: String,
    region: String,
    generation: u64,
    instance: String,
    at_ms: u64,
    /// A component's tail as its agent keeps sending it (its time: the file's).
    tail: bool,
}

impl Meta {
    fn parse(name: &str) -> Option<Meta> {
        let stem = name.strip_suffix(".json")?;
        let parts: Vec<&str> = stem.split('~').collect();
        let [service, region, generation, instance, _component, at] = parts[..] else {
            return None;
        };
        let tail = at == "tail";
        Some(Meta {
            service: service.into(),
            region: region.into(),
            generation: generation.parse().ok()?,
            instance: instance.into(),
            at_ms: if tail { 0 } else { at.parse().ok()? },
            tail,
        })
    }
}

/// What the records (oldest first) keep of each (instance, component): the newest record's
/// lines, preceded by those of older records (a crash's, the tail's) from before its first
/// line, so no line shows twice; with the newest record's reason.
pub fn merged(recs: &[FlightRecord]) -> BTreeMap<(String, String), (String, Vec<LogLine>)> {
    let mut by: BTreeMap<(String, String), Vec<&FlightRecord>> = BTreeMap::new();
    for r in recs {
        by.entry((r.instance.clone(), r.component.clone()))
            .or_default()
            .push(r);
    }
    by.into_iter()
        .map(|(k, rs)| {
            let mut lines: Vec<LogLine> = Vec::new();
            for r in rs.iter().rev() {
                let first = lines.first().map_or(u64::MAX, |l| l.at_ms);
                let older: Vec<LogLine> = r
                    .lines
                    .iter()
                    .filter(|l| l.at_ms < first)
                    .cloned()
                    .collect();
                lines.splice(0..0, older);
            }
            let reason = rs.last().map(|r| r.reason.clone()).unwrap_or_default();
            (k, (reason, lines))
        })
        .collect()
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
        assert!(f
            .append_tail(&rec("../../etc", now, "x"), false, Vec::new(), now)
            .is_err());
    }

    fn line(at_ms: u64, text: &str) -> LogLine {
        LogLine {
            at_ms,
            instance: "i-000009".into(),
            component: "app".into(),
            stream: Stream::Stdout,
            line: text.into(),
        }
    }

    #[test]
    fn a_tail_grows_by_appends_within_its_bound_and_merges_with_records() {
        let dir = tempfile::tempdir().unwrap();
        let f = Flights::new(dir.path());
        let now = 10 * FLIGHT_RETENTION.as_millis() as u64;
        let mut head = rec("i-000009", now, "");
        head.lines.clear();
        f.append_tail(&head, true, vec![line(1, "one"), line(2, "two")], now)
            .unwrap();
        f.append_tail(&head, false, vec![line(3, "three")], now + 1)
            .unwrap();
        let found = f.find("web", None, Some("i-000009"), None);
        assert_eq!(found.len(), 1);
        let texts: Vec<&str> = found[0].lines.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three"]);
        assert_eq!(found[0].reason, TAIL_REASON);
        // A reset replaces it.
        f.append_tail(&head, true, vec![line(4, "four")], now + 2)
            .unwrap();
        let found = f.find("web", None, Some("i-000009"), None);
        assert_eq!(found[0].lines.len(), 1);
        // Bounded: the newest FLIGHT_BYTES_MAX of text.
        let big = "x".repeat(20_000);
        for k in 0..100 {
            f.append_tail(&head, false, vec![line(10 + k, &big)], now + 3)
                .unwrap();
        }
        let found = f.find("web", None, Some("i-000009"), None);
        let text: usize = found[0].lines.iter().map(|l| l.line.len() + 1).sum();
        assert!(text <= drover_model::logs::FLIGHT_BYTES_MAX, "{text}");
        assert!(
            text > drover_model::logs::FLIGHT_BYTES_MAX - 20_001,
            "{text}"
        );
        assert_eq!(found[0].lines.last().unwrap().at_ms, 109);
        // Merged with a final record: each line once, the final record's reason.
        let mut fin = rec("i-000009", now + 5, "");
        fin.lines = vec![line(108, &big), line(109, &big), line(110, "bye")];
        fin.reason = "the instance left".into();
        f.keep(&fin, now + 5).unwrap();
        let all = f.find("web", None, Some("i-000009"), None);
        assert_eq!(all.len(), 2);
        let m = merged(&all);
        let (reason, lines) = &m[&("i-000009".to_string(), "app".to_string())];
        assert_eq!(reason, "the instance left");
        let ats: Vec<u64> = lines.iter().map(|l| l.at_ms).collect();
        let mut want: Vec<u64> = (10 + 100 - found[0].lines.len() as u64..110).collect();
        want.push(110);
        assert_eq!(ats, want);
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
                tty: false,
                stdin: false,
                size: None,
            })
            .unwrap();
        let got = waiting.await.unwrap();
        assert_eq!(got.len(), 1);
        tokio::time::timeout(Duration::from_secs(1), s.taken())
            .await
            .unwrap();
        assert!(relay.sink(s.id, "i-000002").is_none(), "another instance's");
        let tx = relay.sink(s.id, "i-000001").unwrap();
        assert!(relay.sink(s.id, "i-000001").is_none(), "one upload a task");
        tx.send(Frame::Idle).await.unwrap();
        assert_eq!(s.rx.recv().await, Some(Frame::Idle));
        // The upload's end is the end of the session's frames (no wait for a timeout).
        drop(tx);
        assert_eq!(s.rx.recv().await, None);
        let id = s.id;
        drop(s);
        assert!(relay.sink(id, "i-000001").is_none());
        // Input: only from its owner, to its own instance's agent, once.
        let s = relay
            .dispatch("i-000001", |id| AgentTask::Exec {
                id,
                component: None,
                command: vec!["cat".into()],
                tty: true,
                stdin: true,
                size: None,
            })
            .unwrap();
        relay.open_input(s.id, "t-000001", "i-000001");
        assert!(
            relay.input_sender(s.id, "t-000002").is_none(),
            "another token's"
        );
        assert!(
            relay.take_input(s.id, "i-000002").is_none(),
            "another instance's"
        );
        let mut rx = relay.take_input(s.id, "i-000001").unwrap();
        assert!(relay.take_input(s.id, "i-000001").is_none(), "once");
        let tx = relay.input_sender(s.id, "t-000001").unwrap();
        tx.send(ExecInput::Eof).await.unwrap();
        assert_eq!(rx.recv().await, Some(ExecInput::Eof));
        let id = s.id;
        drop(s);
        assert!(
            relay.input_sender(id, "t-000001").is_none(),
            "gone with its session"
        );
        drop(tx);
        assert_eq!(rx.recv().await, None);
        // A task withdrawn before it was taken is not handed out.
        let s = relay
            .dispatch("i-000001", |id| AgentTask::Exec {
                id,
                component: None,
                command: vec!["true".into()],
                tty: false,
                stdin: false,
                size: None,
            })
            .unwrap();
        drop(s);
        assert!(relay
            .take("i-000001", Duration::from_millis(10))
            .await
            .is_empty());
    }
}
