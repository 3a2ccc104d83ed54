//! The leave path: permit long-poll, drain, graceful stop, `Outcome::Left` — and static stability
//! (nothing but a granted permit makes the agent leave). A tiny in-test server answers the permit
//! and connections endpoints and takes heartbeats, recording everything it received.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_agent::{run, AgentConfig, AgentError, Outcome};
use drover_model::api::{AgentPhase, ComponentState, Heartbeat, PermitReply};
use drover_model::{Dur, PlanComponent};
use drover_test_support::wait_until_async;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const MS: Duration = Duration::from_millis(1);
const INSTANCE: &str = "i-000007";

mod common;

/// A component that says `bye` when it gets SIGTERM (so a graceful stop shows).
fn polite(name: &str) -> PlanComponent {
    PlanComponent {
        stop_grace: Dur::from_secs(2),
        ..common::sh(
            name,
            "trap 'echo bye >> said; exit 0' TERM; echo $$ >> pids; while :; do sleep 0.05; done",
        )
    }
}

fn config(dir: &Path, server: String) -> AgentConfig {
    AgentConfig {
        instance: INSTANCE.into(),
        ..common::config(
            dir,
            Some(server),
            vec![polite("app"), polite("sidecar")],
            Duration::from_millis(200),
        )
    }
}

struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Outcome, AgentError>>,
}

fn start(cfg: AgentConfig) -> Agent {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run(cfg, async move {
        let _ = rx.await;
    }));
    Agent {
        stop: Some(tx),
        task,
    }
}

impl Agent {
    /// Wait for `run` to return on its own.
    async fn outcome(&mut self, within: Duration) -> Outcome {
        tokio::time::timeout(within, &mut self.task)
            .await
            .expect("the agent returns")
            .unwrap()
            .unwrap()
    }

    /// Ask the agent to stop; its outcome.
    async fn shut_down(mut self) -> Outcome {
        let _ = self.stop.take().unwrap().send(());
        self.outcome(Duration::from_secs(10)).await
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn gone(pid: i32) -> bool {
    // SAFETY: as above.
    let r = unsafe { libc::kill(pid, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The pids of both components, once both started.
async fn both_pids(dir: &Path) -> [i32; 2] {
    wait_until_async(Duration::from_secs(3), "both components started", || {
        let a = read_pids(&dir.join("app/pids")).first().copied()?;
        let b = read_pids(&dir.join("sidecar/pids")).first().copied()?;
        Some([a, b])
    })
    .await
}

/// How the fake server answers permit polls.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PermitMode {
    /// Long-poll: answer when a permit is granted, or `permit: false` after `wait_ms` (capped
    /// at `hold`).
    LongPoll,
    /// 404, with a body that would read as a permit.
    NotFound,
    /// 200 with unreadable bodies, or a permit-looking body with a 500.
    Garbage,
}

#[derive(Clone, Debug)]
enum Event {
    PermitAsked {
        query: String,
    },
    PermitAnswered {
        permit: bool,
    },
    /// The agent closed a held long-poll (the server had not answered it).
    PollClosed,
    Connections,
    Heartbeat(Box<Heartbeat>),
}

struct Fake {
    url: String,
    mode: Mutex<PermitMode>,
    /// Longest hold of one permit long-poll.
    hold: Mutex<Duration>,
    /// Some: granted.
    permit: watch::Sender<Option<PermitReply>>,
    polls_held: AtomicUsize,
    open: AtomicU64,
    connections_fail: AtomicBool,
    garbage_served: AtomicUsize,
    /// `leave_soon` in heartbeat answers (None: left out, as a server before the hint).
    leave_soon: Mutex<Option<bool>>,
    log: Mutex<Vec<(Instant, Event)>>,
}

impl Fake {
    async fn start() -> Arc<Fake> {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Arc::new(Fake {
            url: format!("http://{}", l.local_addr().unwrap()),
            mode: Mutex::new(PermitMode::LongPoll),
            hold: Mutex::new(Duration::from_secs(20)),
            permit: watch::Sender::new(None),
            polls_held: AtomicUsize::new(0),
            open: AtomicU64::new(0),
            connections_fail: AtomicBool::new(false),
            garbage_served: AtomicUsize::new(0),
            leave_soon: Mutex::new(None),
            log: Mutex::new(Vec::new()),
        });
        let f = fake.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                tokio::spawn(f.clone().serve(s));
            }
        });
        fake
    }

    fn record(&self, e: Event) {
        self.log.lock().unwrap().push((Instant::now(), e));
    }

    fn events(&self) -> Vec<(Instant, Event)> {
        self.log.lock().unwrap().clone()
    }

    fn heartbeats(&self) -> Vec<(Instant, Heartbeat)> {
        self.events()
            .into_iter()
            .filter_map(|(t, e)| match e {
                Event::Heartbeat(h) => Some((t, *h)),
                _ => None,
            })
            .collect()
    }

    fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| pred(e))
            .count()
    }

    fn first(&self, pred: impl Fn(&Event) -> bool) -> Option<Instant> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|(_, e)| pred(e))
            .map(|(t, _)| *t)
    }

    fn grant(&self, drain_timeout: Duration) -> Instant {
        let t = Instant::now();
        self.permit.send_replace(Some(PermitReply {
            permit: true,
            drain_timeout_ms: drain_timeout.as_millis() as u64,
            reason: Some("stale: generation 4 < 5".into()),
            decrement: Some(false),
        }));
        t
    }

    async fn serve(self: Arc<Fake>, mut s: TcpStream) {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 4096];
        let (head, head_end) = loop {
            let n = s.read(&mut tmp).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&tmp[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break (String::from_utf8_lossy(&buf[..pos]).into_owned(), pos + 4);
            }
        };
        let line = head.lines().next().unwrap_or("").to_string();
        let target = line.split(' ').nth(1).unwrap_or("").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let (status, body): (&str, String) = match (line.split(' ').next(), path) {
            (Some("POST"), "/v1/agent/heartbeat") => {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .expect("content-length");
                while buf.len() < head_end + len {
                    let n = s.read(&mut tmp).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
                let hb: Heartbeat = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
                self.record(Event::Heartbeat(Box::new(hb)));
                match *self.leave_soon.lock().unwrap() {
                    None => ("200 OK", r#"{"known":true}"#.into()),
                    Some(l) => ("200 OK", format!(r#"{{"known":true,"leave_soon":{l}}}"#)),
                }
            }
            (Some("GET"), "/v1/agent/permit") => {
                self.record(Event::PermitAsked {
                    query: query.to_string(),
                });
                let mode = *self.mode.lock().unwrap();
                match mode {
                    PermitMode::NotFound => (
                        "404 Not Found",
                        r#"{"permit":true,"drain_timeout_ms":0,"code":"not_found","message":"no such instance"}"#.into(),
                    ),
                    PermitMode::Garbage => {
                        let bodies = [
                            ("200 OK", "<html>proxy error</html>"),
                            ("200 OK", r#"{"permit":true,"drain_ti"#),
                            ("200 OK", r#"{"permit":"yes","drain_timeout_ms":0}"#),
                            ("500 Internal Server Error", r#"{"permit":true,"drain_timeout_ms":0}"#),
                        ];
                        let i = self.garbage_served.fetch_add(1, Ordering::SeqCst);
                        let (st, b) = bodies[i % bodies.len()];
                        (st, b.to_string())
                    }
                    PermitMode::LongPoll => {
                        let wait_ms: u64 = query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("wait_ms="))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let hold = Duration::from_millis(wait_ms).min(*self.hold.lock().unwrap());
                        let mut rx = self.permit.subscribe();
                        self.polls_held.fetch_add(1, Ordering::SeqCst);
                        let wait = async {
                            tokio::time::timeout(hold, rx.wait_for(|p| p.is_some()))
                                .await
                                .ok()
                                .and_then(|r| r.ok().map(|p| p.clone().unwrap()))
                        };
                        let granted = tokio::select! {
                            g = wait => g,
                            // The agent sends nothing more on this connection: a read that
                            // ends means it closed the long-poll.
                            _ = s.read(&mut tmp) => {
                                self.polls_held.fetch_sub(1, Ordering::SeqCst);
                                self.record(Event::PollClosed);
                                return;
                            }
                        };
                        self.polls_held.fetch_sub(1, Ordering::SeqCst);
                        let reply = granted.unwrap_or_default();
                        self.record(Event::PermitAnswered {
                            permit: reply.permit,
                        });
                        ("200 OK", serde_json::to_string(&reply).unwrap())
                    }
                }
            }
            (Some("GET"), "/v1/agent/connections") => {
                assert_eq!(query, format!("instance={INSTANCE}"));
                self.record(Event::Connections);
                if self.connections_fail.load(Ordering::SeqCst) {
                    ("503 Service Unavailable", "{}".into())
                } else {
                    let open = self.open.load(Ordering::SeqCst);
                    ("200 OK", format!(r#"{{"open":{open}}}"#))
                }
            }
            _ => panic!("unexpected request {line}"),
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(reply.as_bytes()).await;
    }
}

/// Both components running and reported so.
async fn running(fake: &Fake) {
    wait_until_async(Duration::from_secs(3), "a running heartbeat", || {
        fake.heartbeats()
            .iter()
            .any(|(_, h)| {
                h.phase == AgentPhase::Running
                    && h.components
                        .iter()
                        .all(|c| c.state == ComponentState::Healthy)
            })
            .then_some(())
    })
    .await;
}

/// After a leave: both components got SIGTERM (said bye) and are gone; the last heartbeat is
/// `stopping` with everything stopped, preceded by a `draining` one.
fn assert_left_gracefully(fake: &Fake, dir: &Path, pids: [i32; 2]) {
    for (name, pid) in ["app", "sidecar"].iter().zip(pids) {
        assert!(gone(pid), "{name} ({pid}) left behind");
        assert_eq!(
            std::fs::read_to_string(dir.join(name).join("said"))
                .unwrap_or_default()
                .trim(),
            "bye",
            "{name} was stopped with its stop signal"
        );
    }
    let hbs = fake.heartbeats();
    let (_, last) = hbs.last().expect("heartbeats");
    assert_eq!(last.phase, AgentPhase::Stopping, "{last:#?}");
    assert!(last
        .components
        .iter()
        .all(|c| c.state == ComponentState::Stopped && c.pid.is_none()));
    assert!(
        last.components
            .iter()
            .all(|c| c.last_exit.as_deref() == Some("exit status 0")),
        "{last:#?}"
    );
    let draining = hbs
        .iter()
        .position(|(_, h)| h.phase == AgentPhase::Draining)
        .expect("a draining heartbeat");
    assert!(hbs[draining..]
        .iter()
        .all(|(_, h)| matches!(h.phase, AgentPhase::Draining | AgentPhase::Stopping)));
    // Every beat has its own number (two may race on the wire), the last one the highest.
    let mut seqs: Vec<u64> = hbs.iter().map(|(_, h)| h.seq).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), hbs.len(), "{hbs:#?}");
    assert_eq!(seqs.last(), Some(&last.seq));
}

#[tokio::test]
async fn permit_during_a_long_poll_reaches_the_agent_at_once_and_it_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    let mut agent = start(config(dir.path(), fake.url.clone()));
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    // A long-poll is under way (held by the server for up to 20 s).
    wait_until_async(Duration::from_secs(2), "a held permit poll", || {
        (fake.polls_held.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    tokio::time::sleep(300 * MS).await;
    assert_eq!(fake.polls_held.load(Ordering::SeqCst), 1);

    let granted = fake.grant(Duration::from_secs(5));
    let outcome = agent.outcome(Duration::from_secs(5)).await;
    assert_eq!(
        outcome,
        Outcome::Left {
            reason: "stale: generation 4 < 5".into(),
            decrement: Some(false),
        }
    );
    let to_drain = fake.first(|e| matches!(e, Event::Connections)).unwrap() - granted;
    let to_draining = fake
        .heartbeats()
        .iter()
        .find(|(_, h)| h.phase == AgentPhase::Draining)
        .unwrap()
        .0
        - granted;
    eprintln!("permit granted → first connections check {to_drain:?}, → draining heartbeat {to_draining:?}");
    assert!(to_drain < 200 * MS, "{to_drain:?}");
    assert!(to_draining < 200 * MS, "{to_draining:?}");
    let query = fake
        .events()
        .into_iter()
        .find_map(|(_, e)| match e {
            Event::PermitAsked { query } => Some(query),
            _ => None,
        })
        .unwrap();
    assert_eq!(query, format!("instance={INSTANCE}&wait_ms=20000"));
    assert_left_gracefully(&fake, dir.path(), pids);
}

#[tokio::test]
async fn long_poll_is_reissued_at_once_and_a_permit_between_polls_is_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    // The server answers `permit: false` every 80 ms.
    *fake.hold.lock().unwrap() = 80 * MS;
    let mut agent = start(config(dir.path(), fake.url.clone()));
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    wait_until_async(Duration::from_secs(3), "six permit polls", || {
        (fake.count(|e| matches!(e, Event::PermitAsked { .. })) >= 6).then_some(())
    })
    .await;
    // Each `permit: false` answer is followed at once by the next poll.
    let ev = fake.events();
    let mut gaps = Vec::new();
    for (i, (t, e)) in ev.iter().enumerate() {
        if let Event::PermitAnswered { permit: false } = e {
            if let Some((next, _)) = ev[i + 1..]
                .iter()
                .find(|(_, e)| matches!(e, Event::PermitAsked { .. }))
            {
                gaps.push(*next - *t);
            }
        }
    }
    eprintln!("answer → next poll: {gaps:?}");
    assert!(gaps.len() >= 4, "{gaps:?}");
    assert!(gaps.iter().all(|g| *g < 50 * MS), "{gaps:?}");

    // Granted 40 ms into a cycle (wherever that falls against the agent's polls).
    tokio::time::sleep(40 * MS).await;
    let granted = fake.grant(Duration::from_secs(5));
    assert!(matches!(
        agent.outcome(Duration::from_secs(5)).await,
        Outcome::Left { .. }
    ));
    let took = fake.first(|e| matches!(e, Event::Connections)).unwrap() - granted;
    eprintln!("permit granted → first connections check {took:?}");
    assert!(took < 200 * MS, "{took:?}");
    assert_left_gracefully(&fake, dir.path(), pids);
}

#[tokio::test]
async fn drain_waits_while_connections_are_open() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    fake.open.store(3, Ordering::SeqCst);
    let mut agent = start(config(dir.path(), fake.url.clone()));
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    let granted = fake.grant(Duration::from_secs(10));
    wait_until_async(Duration::from_secs(1), "the drain started", || {
        fake.first(|e| matches!(e, Event::Connections))
    })
    .await;
    tokio::time::sleep(500 * MS).await;
    // Still draining: components run, checked about every 100 ms.
    assert!(pids.iter().all(|p| alive(*p)));
    assert!(!agent.task.is_finished());
    let checks = fake.count(|e| matches!(e, Event::Connections));
    assert!((3..=8).contains(&checks), "{checks} checks in 500 ms");
    let last = fake.heartbeats().last().unwrap().1.clone();
    assert_eq!(last.phase, AgentPhase::Draining);

    fake.open.store(0, Ordering::SeqCst);
    let closed = Instant::now();
    assert!(matches!(
        agent.outcome(Duration::from_secs(5)).await,
        Outcome::Left { .. }
    ));
    let after = closed.elapsed();
    eprintln!(
        "left {after:?} after the connections closed ({:?} after the permit)",
        granted.elapsed()
    );
    assert!(after < 600 * MS, "{after:?}");
    assert_left_gracefully(&fake, dir.path(), pids);
}

#[tokio::test]
async fn drain_gives_up_after_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    fake.open.store(2, Ordering::SeqCst);
    let mut agent = start(config(dir.path(), fake.url.clone()));
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    let granted = fake.grant(600 * MS);
    assert!(matches!(
        agent.outcome(Duration::from_secs(5)).await,
        Outcome::Left { .. }
    ));
    let took = granted.elapsed();
    eprintln!("stuck connections: left after {took:?}");
    assert!(took >= 600 * MS && took < 1500 * MS, "{took:?}");
    assert!(fake.count(|e| matches!(e, Event::Connections)) >= 5);
    assert_left_gracefully(&fake, dir.path(), pids);
}

#[tokio::test]
async fn failing_connections_endpoint_waits_out_the_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    fake.connections_fail.store(true, Ordering::SeqCst);
    let mut agent = start(config(dir.path(), fake.url.clone()));
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    let granted = fake.grant(600 * MS);
    assert!(matches!(
        agent.outcome(Duration::from_secs(5)).await,
        Outcome::Left { .. }
    ));
    let took = granted.elapsed();
    eprintln!("connections unknown: left after {took:?}");
    assert!(took >= 600 * MS && took < 1500 * MS, "{took:?}");
    assert_left_gracefully(&fake, dir.path(), pids);
}

#[tokio::test]
async fn shutdown_during_a_drain_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    fake.open.store(1, Ordering::SeqCst);
    let agent = start(config(dir.path(), fake.url.clone()));
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    fake.grant(Duration::from_secs(30));
    wait_until_async(Duration::from_secs(1), "the drain started", || {
        fake.first(|e| matches!(e, Event::Connections))
    })
    .await;
    let t = Instant::now();
    assert_eq!(agent.shut_down().await, Outcome::Shutdown);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(pids.iter().all(|p| gone(*p)));
}

/// Runs the agent against a server that never grants a permit in a proper way: after a few
/// poll cycles it still runs the same processes, and stops only when asked.
async fn stays_put(fake: Option<&Fake>, server: String) {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(config(dir.path(), server));
    let pids = both_pids(dir.path()).await;
    // Failed polls are retried every second: this spans three or four of them.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert!(!agent.task.is_finished(), "the agent left");
    for (name, pid) in ["app", "sidecar"].iter().zip(pids) {
        assert!(alive(pid), "{name} stopped");
        assert_eq!(read_pids(&dir.path().join(name).join("pids")), [pid]);
        assert!(!dir.path().join(name).join("said").exists());
    }
    if let Some(fake) = fake {
        let polls = fake.count(|e| matches!(e, Event::PermitAsked { .. }));
        assert!((3..=6).contains(&polls), "{polls} polls");
        assert_eq!(fake.count(|e| matches!(e, Event::Connections)), 0);
        assert!(fake
            .heartbeats()
            .iter()
            .all(|(_, h)| matches!(h.phase, AgentPhase::Booting | AgentPhase::Running)));
    }
    assert_eq!(agent.shut_down().await, Outcome::Shutdown);
    assert!(pids.iter().all(|p| gone(*p)));
}

#[tokio::test]
async fn not_found_does_not_make_the_agent_leave() {
    let fake = Fake::start().await;
    *fake.mode.lock().unwrap() = PermitMode::NotFound;
    stays_put(Some(&fake), fake.url.clone()).await;
}

#[tokio::test]
async fn garbage_does_not_make_the_agent_leave() {
    let fake = Fake::start().await;
    *fake.mode.lock().unwrap() = PermitMode::Garbage;
    stays_put(Some(&fake), fake.url.clone()).await;
    assert!(fake.garbage_served.load(Ordering::SeqCst) >= 3);
}

#[tokio::test]
async fn refused_connections_do_not_make_the_agent_leave() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    stays_put(None, closed).await;
}

/// The agent after a heartbeat whose answer holds `leave_soon: false` (a current instance):
/// it holds no permit long-poll, and a permit it does not know of yet reaches it once an answer
/// says `leave_soon: true`, within about a heartbeat interval.
#[tokio::test]
async fn without_the_hint_no_long_poll_is_held_and_the_hint_brings_the_permit() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    *fake.leave_soon.lock().unwrap() = Some(false);
    let mut agent = start(config(dir.path(), fake.url.clone()));
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    // Five heartbeat intervals (200 ms): not one permit poll.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.count(|e| matches!(e, Event::PermitAsked { .. })), 0);
    assert_eq!(fake.polls_held.load(Ordering::SeqCst), 0);
    // A permit the agent does not ask for does not make it leave...
    fake.grant(Duration::from_secs(5));
    tokio::time::sleep(500 * MS).await;
    assert!(!agent.task.is_finished());
    assert!(pids.iter().all(|p| alive(*p)));
    // ... until the server hints that a permit may come: the next heartbeat's answer.
    let hinted = Instant::now();
    *fake.leave_soon.lock().unwrap() = Some(true);
    assert!(matches!(
        agent.outcome(Duration::from_secs(5)).await,
        Outcome::Left { .. }
    ));
    let asked = fake
        .first(|e| matches!(e, Event::PermitAsked { .. }))
        .unwrap()
        - hinted;
    let drained = fake.first(|e| matches!(e, Event::Connections)).unwrap() - hinted;
    eprintln!("hint → permit poll {asked:?}, → first connections check {drained:?}");
    // One heartbeat interval (200 ms) plus slack.
    assert!(asked < 400 * MS, "{asked:?}");
    assert!(drained < 500 * MS, "{drained:?}");
    assert_left_gracefully(&fake, dir.path(), pids);
}

/// With the hint the long-poll is held and a permit reaches the agent at once; when the hint
/// goes away (e.g. a rollout reverted, the instance is current again) the long-poll is closed.
#[tokio::test]
async fn the_long_poll_is_held_only_while_the_hint_lasts() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    *fake.leave_soon.lock().unwrap() = Some(true);
    let mut agent = start(config(dir.path(), fake.url.clone()));
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    wait_until_async(Duration::from_secs(2), "a held permit poll", || {
        (fake.polls_held.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    *fake.leave_soon.lock().unwrap() = Some(false);
    wait_until_async(Duration::from_secs(1), "the long-poll closed", || {
        fake.first(|e| matches!(e, Event::PollClosed))
    })
    .await;
    let asked = fake.count(|e| matches!(e, Event::PermitAsked { .. }));
    tokio::time::sleep(600 * MS).await;
    assert_eq!(fake.polls_held.load(Ordering::SeqCst), 0);
    assert_eq!(
        fake.count(|e| matches!(e, Event::PermitAsked { .. })),
        asked,
        "no new poll without the hint"
    );
    // Hinted again: the long-poll is back, and a permit during it is acted on at once.
    *fake.leave_soon.lock().unwrap() = Some(true);
    wait_until_async(Duration::from_secs(1), "a held permit poll again", || {
        (fake.polls_held.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let granted = fake.grant(Duration::from_secs(5));
    assert!(matches!(
        agent.outcome(Duration::from_secs(5)).await,
        Outcome::Left { .. }
    ));
    let took = fake.first(|e| matches!(e, Event::Connections)).unwrap() - granted;
    eprintln!("permit granted during a hinted long-poll → first connections check {took:?}");
    assert!(took < 200 * MS, "{took:?}");
    assert_left_gracefully(&fake, dir.path(), pids);
}

/// A component that notes SIGUSR1 (its drain signal) in `drained` and keeps running, and says
/// `bye` on SIGTERM.
fn drains_on_usr1(name: &str) -> PlanComponent {
    let mut c = polite(name);
    c.args[1] = "trap 'echo drain >> drained' USR1; trap 'echo bye >> said; exit 0' TERM; echo $$ >> pids; while :; do sleep 0.05; done".into();
    c.drain_signal = Some("SIGUSR1".into());
    c
}

#[tokio::test]
async fn the_drain_signal_reaches_each_component_that_has_one_as_the_drain_starts() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    // Connections stay open until the component has had its drain signal.
    fake.open.store(2, Ordering::SeqCst);
    let mut cfg = config(dir.path(), fake.url.clone());
    cfg.plan.components[0] = drains_on_usr1("app");
    let mut agent = start(cfg);
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    tokio::time::sleep(200 * MS).await;
    assert!(
        !dir.path().join("app/drained").exists(),
        "no drain signal before the permit"
    );

    let granted = fake.grant(Duration::from_secs(10));
    let signalled = wait_until_async(Duration::from_secs(2), "app got its drain signal", || {
        dir.path().join("app/drained").exists().then(Instant::now)
    })
    .await;
    eprintln!("permit → drain signal {:?}", signalled - granted);
    assert!(signalled - granted < 300 * MS, "{:?}", signalled - granted);
    // Signalled, not stopped: it keeps serving until the drain ends.
    tokio::time::sleep(300 * MS).await;
    assert!(pids.iter().all(|p| alive(*p)));
    assert!(!agent.task.is_finished());
    assert!(!dir.path().join("sidecar/drained").exists());
    // The component closed its connections: the drain ends at the next check.
    fake.open.store(0, Ordering::SeqCst);
    assert!(matches!(
        agent.outcome(Duration::from_secs(5)).await,
        Outcome::Left { .. }
    ));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("app/drained")).unwrap(),
        "drain\n",
        "exactly one drain signal"
    );
    assert_left_gracefully(&fake, dir.path(), pids);
    // The drain's report is in the heartbeats after it: how long, and who was signalled.
    let hbs = fake.heartbeats();
    let report = hbs
        .iter()
        .find_map(|(_, h)| h.drained.clone())
        .expect("a heartbeat with the drain report");
    assert!(!report.timed_out, "{report:?}");
    assert_eq!(report.open, Some(0));
    assert_eq!(report.signalled, ["app (SIGUSR1)"]);
    assert!(
        (300..3_000).contains(&report.took_ms),
        "drained once the connections closed: {report:?}"
    );
    assert!(
        report.describe().starts_with("drained in "),
        "{}",
        report.describe()
    );
    // Before the drain ended, no heartbeat carried a report.
    assert!(hbs
        .iter()
        .filter(|(_, h)| h.phase != AgentPhase::Stopping)
        .all(|(_, h)| h.drained.is_none()));
    let last = &hbs.last().unwrap().1;
    assert_eq!(last.drained.as_ref(), Some(&report));
}

#[tokio::test]
async fn a_shutdown_without_a_permit_sends_no_drain_signal() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    let mut cfg = config(dir.path(), fake.url.clone());
    cfg.plan.components[0] = drains_on_usr1("app");
    let agent = start(cfg);
    let pids = both_pids(dir.path()).await;
    running(&fake).await;
    assert_eq!(agent.shut_down().await, Outcome::Shutdown);
    assert!(pids.iter().all(|p| gone(*p)));
    assert!(!dir.path().join("app/drained").exists());
    assert!(fake.heartbeats().iter().all(|(_, h)| h.drained.is_none()));
}
