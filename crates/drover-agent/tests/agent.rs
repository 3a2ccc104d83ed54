//! End-to-end tests of the agent with real processes (`/bin/sh`, `sleep`) and a tiny in-test
//! heartbeat listener.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_agent::{run, AgentConfig, AgentError, Outcome};
use drover_model::api::{AgentPhase, ComponentState, Heartbeat};
use drover_model::fleet::{Artifact, HealthCheck, HealthKind};
use drover_model::{Dur, PlanComponent};
use drover_test_support::wait_until_async;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const MS: Duration = Duration::from_millis(1);

mod common;
use common::sh;

fn config(dir: &Path, server: Option<String>, components: Vec<PlanComponent>) -> AgentConfig {
    common::config(dir, server, components, Duration::from_millis(100))
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
    /// Ask the agent to stop; returns how long it took.
    async fn stop(mut self) -> Duration {
        let t = Instant::now();
        let _ = self.stop.take().unwrap().send(());
        let outcome = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("agent stops")
            .unwrap()
            .unwrap();
        assert_eq!(outcome, Outcome::Shutdown);
        t.elapsed()
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

/// Numbers, one per line, in `path` (missing file: none).
fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A heartbeat listener: every POSTed heartbeat comes out of the receiver. Permit long-polls are
/// held until the agent drops them (no permit is ever granted here; see tests/leave.rs).
async fn heartbeat_server() -> (String, mpsc::UnboundedReceiver<Heartbeat>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(serve_heartbeat(s, tx.clone()));
        }
    });
    (url, rx)
}

async fn serve_heartbeat(mut s: TcpStream, tx: mpsc::UnboundedSender<Heartbeat>) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let (head_end, len) = loop {
        let n = s.read(&mut tmp).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
            if head.starts_with("get /v1/agent/permit?") {
                // Until the agent hangs up.
                while s.read(&mut tmp).await.unwrap_or(0) > 0 {}
                return;
            }
            assert!(head.starts_with("post /v1/agent/heartbeat "), "{head}");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("content-length");
            break (pos + 4, len);
        }
    };
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let hb: Heartbeat = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
    let _ = tx.send(hb);
    let _ = s
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 14\r\nconnection: close\r\n\r\n{\"known\":true}")
        .await;
}

async fn next_heartbeat(
    rx: &mut mpsc::UnboundedReceiver<Heartbeat>,
    within: Duration,
    what: &str,
    pred: impl Fn(&Heartbeat) -> bool,
) -> Heartbeat {
    let mut last = None;
    let found = tokio::time::timeout(within, async {
        loop {
            let hb = rx.recv().await.expect("heartbeat server alive");
            if pred(&hb) {
                return hb;
            }
            last = Some(hb);
        }
    })
    .await;
    found.unwrap_or_else(|_| {
        panic!("timed out waiting for a heartbeat where {what}; last one: {last:#?}")
    })
}

/// (kind, nanoseconds) events a component script appended with `date +%s%N`.
fn read_events(path: &Path) -> Vec<(String, u128)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, t) = l.split_once(' ')?;
            Some((k.to_string(), t.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn exited_component_is_respawned_at_once_then_with_delay() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut hbs) = heartbeat_server().await;
    let c = sh(
        "flaky",
        "echo \"start $(date +%s%N)\" >> events; sleep 0.1; echo \"exit $(date +%s%N)\" >> events; exit 1",
    );
    let agent = start(config(dir.path(), Some(url), vec![c]));
    let events_file = dir.path().join("flaky/events");
    let ev = wait_until_async(Duration::from_secs(4), "three starts", || {
        let ev = read_events(&events_file);
        (ev.iter().filter(|(k, _)| k == "start").count() >= 3).then_some(ev)
    })
    .await;
    let hb = next_heartbeat(
        &mut hbs,
        Duration::from_secs(2),
        "flaky restarted twice",
        |h| h.components[0].restarts >= 2,
    )
    .await;
    agent.stop().await;

    let kinds: Vec<&str> = ev.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(&kinds[..5], ["start", "exit", "start", "exit", "start"]);
    let gap = |a: usize, b: usize| Duration::from_nanos((ev[b].1 - ev[a].1) as u64);
    let first = gap(1, 2);
    let second = gap(3, 4);
    eprintln!("exit→respawn: first {first:?}, second {second:?}");
    // First restart immediate (well under the 500 ms budget), second after initial_delay (300 ms).
    assert!(
        first < Duration::from_millis(150),
        "first restart took {first:?}"
    );
    assert!(second >= 300 * MS, "second restart after {second:?}");
    assert!(second < 700 * MS, "second restart after {second:?}");
    assert_eq!(hb.components[0].last_exit.as_deref(), Some("exit status 1"));
}

#[tokio::test]
async fn sigkilled_component_is_respawned() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut hbs) = heartbeat_server().await;
    let agent = start(config(
        dir.path(),
        Some(url),
        vec![sh("app", "echo $$ >> pids; exec sleep 30")],
    ));
    let pids = dir.path().join("app/pids");
    let first = wait_until_async(Duration::from_secs(2), "first pid", || {
        read_pids(&pids).first().copied()
    })
    .await;
    let t = Instant::now();
    // SAFETY: a process this test's agent started.
    unsafe { libc::kill(first, libc::SIGKILL) };
    let second = wait_until_async(Duration::from_millis(500), "respawn within 500 ms", || {
        read_pids(&pids).get(1).copied()
    })
    .await;
    eprintln!("SIGKILL→new pid seen: {:?}", t.elapsed());
    assert_ne!(first, second);
    assert!(alive(second));
    let hb = next_heartbeat(&mut hbs, Duration::from_secs(2), "app respawned", |h| {
        h.components[0].pid == Some(second as u32)
            && h.components[0].state == ComponentState::Healthy
    })
    .await;
    assert_eq!(hb.components[0].restarts, 1);
    assert_eq!(hb.components[0].last_exit.as_deref(), Some("signal 9"));
    agent.stop().await;
    assert!(gone(second));
}

/// A tiny HTTP server answering 200 while `ok` is true, 500 otherwise.
async fn health_server(ok: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let ok = ok.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let answer: &[u8] = if ok.load(Ordering::SeqCst) {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn http_health_check_turns_healthy_then_unhealthy_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut hbs) = heartbeat_server().await;
    let ok = Arc::new(AtomicBool::new(true));
    let port = health_server(ok.clone()).await;
    let mut c = sh("web", "echo $$ >> pids; exec sleep 30");
    c.ports.insert("http".into(), port);
    c.health = Some(HealthCheck {
        kind: HealthKind::Http,
        port: Some("http".into()),
        path: Some("/healthz".into()),
        command: vec![],
        interval: Dur::from_millis(100),
        timeout: Dur::from_millis(300),
        healthy_threshold: 1,
        unhealthy_threshold: 3,
    });
    let agent = start(config(dir.path(), Some(url), vec![c]));
    let hb = next_heartbeat(&mut hbs, Duration::from_secs(2), "web starting", |h| {
        h.components[0].pid.is_some()
    })
    .await;
    assert_eq!(hb.components[0].state, ComponentState::Starting);
    let hb = next_heartbeat(&mut hbs, Duration::from_secs(2), "web healthy", |h| {
        h.components[0].state == ComponentState::Healthy
    })
    .await;
    assert_eq!(hb.phase, AgentPhase::Running);
    let first = hb.components[0].pid.unwrap();

    ok.store(false, Ordering::SeqCst);
    let t = Instant::now();
    // Unhealthy after three failures at a 100 ms interval; having been healthy, it is restarted at
    // once (the Unhealthy state may last too little to be reported on its own).
    let hb = next_heartbeat(&mut hbs, Duration::from_secs(2), "web restarted", |h| {
        h.components[0].restarts >= 1
    })
    .await;
    let after = t.elapsed();
    assert!(after >= 180 * MS, "restarted after {after:?}");
    let c = &hb.components[0];
    assert_eq!(c.last_exit.as_deref(), Some("signal 15"));
    let msg = c.message.as_deref().unwrap_or("");
    assert!(
        msg.contains("health check") && msg.contains("status 500"),
        "{hb:?}"
    );
    assert!(gone(first as i32));
    let pids = dir.path().join("web/pids");
    let second = wait_until_async(Duration::from_millis(500), "second pid", || {
        read_pids(&pids).get(1).copied()
    })
    .await;
    assert_ne!(second as u32, first);

    // The new run never turned healthy: it is reported Unhealthy, then restarted once its
    // threshold window (interval × (1 + 3) = 400 ms) has passed.
    let hb = next_heartbeat(&mut hbs, Duration::from_secs(2), "web unhealthy", |h| {
        h.components[0].state == ComponentState::Unhealthy
    })
    .await;
    assert!(
        hb.components[0]
            .message
            .as_deref()
            .unwrap_or("")
            .contains("500"),
        "{hb:?}"
    );
    next_heartbeat(
        &mut hbs,
        Duration::from_secs(2),
        "web restarted again",
        |h| h.components[0].restarts >= 2,
    )
    .await;
    assert!(gone(second));

    // Healthy again once the server answers 200.
    ok.store(true, Ordering::SeqCst);
    next_heartbeat(&mut hbs, Duration::from_secs(2), "web healthy again", |h| {
        h.components[0].state == ComponentState::Healthy
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn graceful_stop_then_sigkill_after_grace_and_nothing_left() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut hbs) = heartbeat_server().await;
    let mut polite = sh(
        "polite",
        "trap 'echo bye >> said; exit 0' TERM; echo $$ >> pids; while :; do sleep 0.05; done",
    );
    polite.stop_grace = Dur::from_secs(3);
    let mut stubborn = sh("stubborn", "trap '' TERM; echo $$ >> pids; exec sleep 30");
    stubborn.stop_grace = Dur::from_millis(400);
    let agent = start(config(dir.path(), Some(url), vec![polite, stubborn]));
    let p1 = wait_until_async(Duration::from_secs(2), "polite pid", || {
        read_pids(&dir.path().join("polite/pids")).first().copied()
    })
    .await;
    let p2 = wait_until_async(Duration::from_secs(2), "stubborn pid", || {
        read_pids(&dir.path().join("stubborn/pids"))
            .first()
            .copied()
    })
    .await;
    // Let both shells install their traps.
    next_heartbeat(&mut hbs, Duration::from_secs(2), "both running", |h| {
        h.phase == AgentPhase::Running && h.components.iter().all(|c| c.pid.is_some())
    })
    .await;
    tokio::time::sleep(100 * MS).await;
    let took = agent.stop().await;
    eprintln!("stop took {took:?}");
    assert!(took >= 400 * MS, "the stubborn one got its grace: {took:?}");
    assert!(
        took < 2 * Duration::from_secs(1),
        "the polite one did not wait its 3 s grace: {took:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("polite/said"))
            .unwrap()
            .trim(),
        "bye"
    );
    assert!(gone(p1), "polite {p1} left behind");
    assert!(gone(p2), "stubborn {p2} left behind");
    let last = next_heartbeat(
        &mut hbs,
        Duration::from_secs(1),
        "the last heartbeat",
        |h| {
            h.phase == AgentPhase::Stopping
                && h.components
                    .iter()
                    .all(|c| c.state == ComponentState::Stopped)
        },
    )
    .await;
    assert_eq!(
        last.components[0].last_exit.as_deref(),
        Some("exit status 0")
    );
    assert_eq!(last.components[1].last_exit.as_deref(), Some("signal 9"));
    assert!(last.components.iter().all(|c| c.pid.is_none()));
}

#[tokio::test]
async fn heartbeat_carries_identity_state_and_utilization() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut hbs) = heartbeat_server().await;
    let mut app = sh("app", "exec sleep 30");
    app.version = "v7".into();
    let agent = start(config(
        dir.path(),
        Some(url),
        vec![app, sh("sidecar", "exec sleep 30")],
    ));
    let first = next_heartbeat(&mut hbs, Duration::from_secs(2), "any", |_| true).await;
    let hb = next_heartbeat(&mut hbs, Duration::from_secs(2), "running", |h| {
        h.phase == AgentPhase::Running
            && h.components
                .iter()
                .all(|c| c.state == ComponentState::Healthy)
    })
    .await;
    assert!(hb.seq > first.seq);
    assert_eq!(hb.instance, "i-000003");
    assert_eq!(hb.group, "web/local");
    assert_eq!(hb.generation, 4);
    assert_eq!(hb.addr, "127.0.0.1");
    assert!(hb.healthy());
    let names: Vec<_> = hb
        .components
        .iter()
        .map(|c| (c.name.as_str(), c.version.as_str()))
        .collect();
    assert_eq!(names, [("app", "v7"), ("sidecar", "v1")]);
    assert!(hb
        .components
        .iter()
        .all(|c| c.pid.is_some() && c.restarts == 0));
    // Periodic beats keep coming, with utilization measured.
    let later = next_heartbeat(&mut hbs, Duration::from_secs(1), "a periodic beat", |h| {
        h.seq > hb.seq
    })
    .await;
    assert!(
        later.utilization.memory_bytes > 0,
        "{:?}",
        later.utilization
    );
    assert!(
        later.utilization.agent_rss_bytes > 0,
        "{:?}",
        later.utilization
    );
    assert!(
        later.utilization.cpu >= 0.0 && later.utilization.cpu < 1.0,
        "{:?}",
        later.utilization
    );
    agent.stop().await;
}

#[tokio::test]
async fn unreachable_server_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut cfg = config(
        dir.path(),
        Some(closed),
        vec![sh("app", "echo $$ >> pids; exec sleep 30")],
    );
    cfg.heartbeat_interval = 20 * MS;
    let agent = start(cfg);
    let pids = dir.path().join("app/pids");
    let pid = wait_until_async(Duration::from_secs(2), "pid", || {
        read_pids(&pids).first().copied()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(alive(pid));
    assert_eq!(
        read_pids(&pids),
        [pid],
        "no restarts while the server is down"
    );
    agent.stop().await;
    assert!(gone(pid));
}

fn targz(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        // Written raw so that unsafe names like `../escape` can be built too.
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::File::create(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path.to_path_buf()
}

const HELLO: &[u8] = b"#!/bin/sh\necho $$ >> pids\nexec sleep 30\n";

#[tokio::test]
async fn artifact_checked_unpacked_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut hbs) = heartbeat_server().await;
    let bytes = targz(&[("bin/hello", HELLO, 0o755), ("README", b"hi", 0o644)]);
    let file = write(&dir.path().join("hello.tar.gz"), &bytes);
    let mut good = sh("hello", "");
    good.command = "bin/hello".into();
    good.args = vec![];
    good.artifact = Some(Artifact {
        url: format!("file://{}", file.display()),
        sha256: sha256(&bytes),
    });
    let mut bad = good.clone();
    bad.name = "bad".into();
    bad.artifact = Some(Artifact {
        url: file.display().to_string(),
        sha256: "ab".repeat(32),
    });
    let inst = dir.path().join("inst");
    let agent = start(config(&inst, Some(url), vec![good, bad]));
    let pid = wait_until_async(Duration::from_secs(3), "hello from the artifact", || {
        read_pids(&inst.join("hello/pids")).first().copied()
    })
    .await;
    assert_eq!(std::fs::read(inst.join("hello/README")).unwrap(), b"hi");
    let hb = next_heartbeat(&mut hbs, Duration::from_secs(2), "bad failed", |h| {
        h.components[1].state == ComponentState::Failed
    })
    .await;
    assert_eq!(hb.components[0].pid, Some(pid as u32));
    let msg = hb.components[1].message.clone().unwrap();
    assert!(
        msg.contains(&"ab".repeat(32)) && msg.contains(&sha256(&bytes)),
        "{msg}"
    );
    assert!(
        !inst.join("bad/bin/hello").exists(),
        "nothing unpacked on mismatch"
    );
    agent.stop().await;
    assert!(gone(pid));
}

#[tokio::test]
async fn artifact_refusals_and_http_download() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let scratch = dir.path().join("scratch");
    let fetch = |url: String, sha: String, dest: PathBuf| {
        let client = client.clone();
        let scratch = scratch.clone();
        async move {
            drover_agent::artifact::fetch_and_unpack(
                &client,
                &Artifact { url, sha256: sha },
                &dest,
                &scratch,
            )
            .await
        }
    };

    // Mismatch: refused, both hashes named.
    let bytes = targz(&[("bin/hello", HELLO, 0o755)]);
    let file = write(&dir.path().join("a.tar.gz"), &bytes);
    let wrong = "0".repeat(64);
    let e = fetch(
        file.display().to_string(),
        wrong.clone(),
        dir.path().join("x"),
    )
    .await
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, AgentError::ChecksumMismatch { .. }), "{msg}");
    assert!(
        msg.contains(&wrong) && msg.contains(&sha256(&bytes)),
        "{msg}"
    );
    assert!(!dir.path().join("x/bin/hello").exists());

    // `../escape`: refused, nothing written outside (nor inside).
    let evil = targz(&[("ok", b"fine", 0o644), ("../escape", b"gotcha", 0o644)]);
    let file = write(&dir.path().join("evil.tar.gz"), &evil);
    let dest = dir.path().join("evil/dest");
    let e = fetch(file.display().to_string(), sha256(&evil), dest.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::UnsafeEntry { .. }), "{e}");
    assert!(e.to_string().contains("../escape"), "{e}");
    assert!(!dir.path().join("evil/escape").exists());
    assert!(!dest.join("ok").exists());

    // Absolute names and links pointing outside: refused too.
    let abs = targz(&[("/tmp/drover-agent-abs", b"x", 0o644)]);
    let file = write(&dir.path().join("abs.tar.gz"), &abs);
    let e = fetch(
        file.display().to_string(),
        sha256(&abs),
        dir.path().join("abs"),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("absolute"), "{e}");
    let link = {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "sub/link", "../../outside").unwrap();
        b.into_inner().unwrap().finish().unwrap()
    };
    let file = write(&dir.path().join("link.tar.gz"), &link);
    let e = fetch(
        file.display().to_string(),
        sha256(&link),
        dir.path().join("link"),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("link pointing outside"), "{e}");

    // Over http, streamed and checked.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let served = bytes.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let body = served.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    let dest = dir.path().join("http");
    fetch(
        format!("http://{addr}/a.tar.gz"),
        sha256(&bytes),
        dest.clone(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(dest.join("bin/hello")).unwrap(), HELLO);
    assert!(!scratch.exists(), "the download is removed after unpacking");
}

/// `R`, `S`, `Z`… of a process, or None once it is gone.
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[test]
fn components_die_with_the_agent_thread() {
    // The agent's thread goes away without stopping anything (as on SIGKILL of the agent): its
    // runtime is leaked, so nothing is dropped or killed by the agent itself.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        None,
        vec![sh("app", "echo $$ >> pids; exec sleep 30")],
    );
    let pids = dir.path().join("app/pids");
    let pid = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pid = rt.block_on(async {
            tokio::spawn(run(cfg, std::future::pending()));
            wait_until_async(Duration::from_secs(2), "pid", || {
                read_pids(&pids).first().copied()
            })
            .await
        });
        std::mem::forget(rt);
        pid
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        // Killed: a zombie (nobody is left to reap it) or gone.
        match proc_state(pid) {
            None | Some('Z') => break,
            Some(s) => assert!(
                Instant::now() < deadline,
                "component {pid} still {s} after its agent died"
            ),
        }
        std::thread::sleep(5 * MS);
    }
}
