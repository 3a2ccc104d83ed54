//! An exec session whose command prints nothing still says something: the agent's upload
//! carries idle frames (the server's API closes a connection silent for 90 s), against a
//! tiny in-test server that hands the agent one exec task and reads its upload as it comes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_agent::{run, AgentConfig};
use drover_model::logs::{AgentTask, Frame, TasksReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

mod common;

fn config(dir: &Path, server: String) -> AgentConfig {
    common::config(
        dir,
        Some(server),
        vec![common::sh("app", "exec sleep 60")],
        Duration::from_millis(500),
    )
}

/// The server's side: heartbeats and the like answered `{}`-ish, the first task poll once
/// `ready` exists (the component's directory, where the command runs: a task handed before
/// the agent made it fails to spawn) answered with `task`, later ones held; the frames of the
/// task's upload come out of the receiver with the time each came.
async fn server(
    task: AgentTask,
    ready: PathBuf,
) -> (String, mpsc::UnboundedReceiver<(Instant, Frame)>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let task = Arc::new(Mutex::new(Some(task)));
    let ready = Arc::new(ready);
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(serve(s, task.clone(), ready.clone(), tx.clone()));
        }
    });
    (url, rx)
}

/// One request per connection (the agent's pool opens another when this one is closed).
async fn serve(
    mut s: TcpStream,
    task: Arc<Mutex<Option<AgentTask>>>,
    ready: Arc<PathBuf>,
    tx: mpsc::UnboundedSender<(Instant, Frame)>,
) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let (head, mut rest) = loop {
        let n = s.read(&mut tmp).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
            break (head, buf[pos + 4..].to_vec());
        }
    };
    let answer = |body: &str| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    if head.starts_with("post /v1/agent/tasks/") {
        // Chunked NDJSON: a frame a line, as they come (chunk framing skipped over).
        loop {
            while let Some(pos) = rest.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = rest.drain(..=pos).collect();
                if let Ok(f) = serde_json::from_slice::<Frame>(&line) {
                    let _ = tx.send((Instant::now(), f));
                }
            }
            let n = s.read(&mut tmp).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            rest.extend_from_slice(&tmp[..n]);
        }
    }
    if head.starts_with("get /v1/agent/tasks?") {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let task = task.lock().unwrap().take();
        match task {
            Some(t) => {
                let body = serde_json::to_string(&TasksReply { tasks: vec![t] }).unwrap();
                let _ = s.write_all(answer(&body).as_bytes()).await;
            }
            // Until the agent hangs up.
            None => while s.read(&mut tmp).await.unwrap_or(0) > 0 {},
        }
        return;
    }
    if head.starts_with("get ") {
        // Permits, peers: held.
        while s.read(&mut tmp).await.unwrap_or(0) > 0 {}
        return;
    }
    let body = if head.starts_with("post /v1/agent/heartbeat ") {
        "{\"known\":true}"
    } else {
        "{}"
    };
    let _ = s.write_all(answer(body).as_bytes()).await;
}

/// `drover exec web -- sleep 12`: nothing printed, yet the upload carries idle frames every
/// 10 s or so (before: none until the exit, and the server cut the silent upload at 90 s).
#[tokio::test]
async fn a_quiet_exec_session_sends_idle_frames() {
    let dir = tempfile::tempdir().unwrap();
    let task = AgentTask::Exec {
        id: 1,
        component: None,
        command: vec!["sleep".into(), "12".into()],
        tty: false,
        stdin: false,
        size: None,
    };
    let (url, mut frames) = server(task, dir.path().join("app")).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run(config(dir.path(), url), async move {
        let _ = stopped.await;
    }));
    let mut got = Vec::new();
    let t0 = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some((at, f)) = frames.recv().await {
            let exit = matches!(f, Frame::Exit { .. });
            got.push((at.duration_since(t0), f));
            if exit {
                return;
            }
        }
    })
    .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    assert!(ended.is_ok(), "no exit within 30 s: {got:?}");
    let idle: Vec<Duration> = got
        .iter()
        .filter(|(_, f)| *f == Frame::Idle)
        .map(|(at, _)| *at)
        .collect();
    assert!(
        !idle.is_empty(),
        "no idle frame while the command was quiet: {got:?}"
    );
    assert!(
        idle[0] < Duration::from_secs(11),
        "the first idle frame came after {:?}",
        idle[0]
    );
    let Some((_, Frame::Exit { code, .. })) = got.last() else {
        panic!("the session ended without its exit: {got:?}");
    };
    assert_eq!(*code, 0, "{got:?}");
}
