//! Logs, exec and the flight recorder over the agent's own connections: the agent long-polls
//! `GET /v1/agent/tasks` (so nothing needs to reach the instance: it works behind NAT), runs
//! each task it is handed — send a component's output (history, then new lines with
//! `follow`), run a command in a component's environment — and streams the result back as
//! the body of `POST /v1/agent/tasks/ID`, one JSON frame a line. The upload ends when the task
//! is done, or when the server closes it (the person went away), which stops the task.
//! The flight recorder: when a component dies, the last lines of its output go to
//! `POST /v1/agent/flight`; and while the agent runs, the new lines of every component's
//! tail go to `POST /v1/agent/tail` (at most once a second, at most the component's flight
//! size, `log.options.flight-size`, 64 KiB by default), so the server's copy outlives an
//! agent killed without warning.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use drover_model::fleet::Runtime;
use drover_model::logs::{
    AgentTask, ExecInput, FlightRecord, Frame, LogLine, Stream, TailBatch, TailPart, TasksReply,
    WinSize,
};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::logfile;
use crate::report::{error_chain, Servers, Throttle};
use crate::Ctx;

/// How long one task long-poll is held by the server.
const POLL_WAIT: Duration = Duration::from_secs(25);
/// Client-side bound of one long-poll.
const POLL_TIMEOUT: Duration = Duration::from_secs(35);
/// Pause after a failed poll.
const RETRY: Duration = Duration::from_secs(1);
/// Most tasks running at once; more are answered with an error.
const MAX_TASKS: usize = 16;
/// How long a flight record upload may take.
const FLIGHT_TIMEOUT: Duration = Duration::from_secs(2);
/// Flight records waiting to be sent (more are dropped, with a log line).
pub(crate) const FLIGHT_QUEUE: usize = 32;
/// How often the new lines of the components' tails go to the server (at most).
const TAIL_EVERY: Duration = Duration::from_millis(drover_model::logs::TAIL_EVERY_MS);
/// How long a tail batch upload may take.
const TAIL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long reading a container's new lines from the engine may take.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(2);

/// The agent's connection for logs and exec.
#[derive(Clone)]
pub(crate) struct Link {
    pub client: reqwest::Client,
    pub servers: Servers,
}

/// Poll for tasks and run them, and send flight records as they come, until dropped.
pub(crate) async fn run(ctx: Arc<Ctx>, link: Link, mut flights: mpsc::Receiver<FlightRecord>) {
    let mut running = futures::stream::FuturesUnordered::new();
    // Shared with each poll's future, which counts its failure (if it fails).
    let throttle = Arc::new(std::sync::Mutex::new(Throttle::default()));
    let poll = |throttle: &Arc<std::sync::Mutex<Throttle>>| {
        let (server, url) = link.servers.url("/v1/agent/tasks");
        let req = link
            .client
            .get(url)
            .query(&[
                ("instance", ctx.instance.instance.as_str()),
                ("wait_ms", &POLL_WAIT.as_millis().to_string()),
            ])
            .timeout(POLL_TIMEOUT)
            .send();
        let servers = link.servers.clone();
        let throttle = throttle.clone();
        async move {
            let answer = async {
                let resp = req.await.map_err(|e| {
                    servers.failed(server);
                    error_chain(&e)
                })?;
                if !resp.status().is_success() {
                    if Servers::try_another(resp.status()) {
                        servers.failed(server);
                    }
                    return Err(format!("status {}", resp.status()));
                }
                let bytes = resp.bytes().await.map_err(|e| error_chain(&e))?;
                serde_json::from_slice::<TasksReply>(&bytes)
                    .map_err(|e| format!("unreadable answer: {e}"))
            }
            .await;
            match answer {
                Ok(r) => Ok(r.tasks),
                Err(problem) => {
                    let held = throttle.lock().unwrap_or_else(|e| e.into_inner()).failed();
                    if let Some(held_back) = held {
                        tracing::warn!(%problem, held_back, "cannot poll the server for logs and exec tasks (logged at most once a minute)");
                    }
                    tokio::time::sleep(RETRY).await;
                    Err(())
                }
            }
        }
    };
    let mut next = Box::pin(poll(&throttle));
    let mut uploads = futures::stream::FuturesUnordered::new();
    let tails = keep_tails(&ctx, &link);
    tokio::pin!(tails);
    loop {
        tokio::select! {
            got = &mut next => {
                if let Ok(tasks) = got {
                        throttle.lock().unwrap_or_else(|e| e.into_inner()).recovered();
                        for task in tasks {
                            if running.len() >= MAX_TASKS {
                                running.push(Box::pin(refuse(link.clone(), ctx.clone(), task)) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);
                            } else {
                                running.push(Box::pin(handle(ctx.clone(), link.clone(), task)));
                            }
                        }
                }
                next = Box::pin(poll(&throttle));
            }
            Some(()) = running.next(), if !running.is_empty() => {}
            Some(rec) = flights.recv() => uploads.push(send_flight(link.clone(), rec)),
            Some(()) = uploads.next(), if !uploads.is_empty() => {}
            _ = &mut tails => {}
        }
    }
}

/// One component's tail as the server has it: where reading goes on, and the lines read but
/// not sent yet (at most `limit` bytes of text, the component's flight size: the oldest go
/// first, and then the server's copy is replaced rather than continued).
#[derive(Default)]
struct Tail {
    limit: usize,
    started: bool,
    cursor: logfile::Cursor,
    /// For a container: the engine's time (ns) of the newest line taken, and how many of the
    /// lines taken had that time (the engine's `since` is in whole seconds).
    last_ns: Option<(i64, usize)>,
    pending: VecDeque<logfile::Line>,
    bytes: usize,
    reset: bool,
}

impl Tail {
    fn push(&mut self, lines: impl IntoIterator<Item = logfile::Line>) {
        for l in lines {
            self.bytes += l.2.len() + 1;
            self.pending.push_back(l);
        }
        while self.bytes > self.limit {
            let Some(l) = self.pending.pop_front() else {
                break;
            };
            self.bytes -= l.2.len() + 1;
            self.reset = true;
        }
    }
}

/// Keep the server's copy of every component's tail current: every `TAIL_EVERY`, the new
/// lines of each (the first batch: the last of its flight size each) in one request, and only
/// when there are some. What the server did not take is sent with the next batch. Never ends.
async fn keep_tails(ctx: &Ctx, link: &Link) {
    let mut tails: Vec<Tail> = ctx
        .plan
        .components
        .iter()
        .map(|c| Tail {
            limit: c.flight_bytes(),
            reset: true,
            ..Default::default()
        })
        .collect();
    let mut throttle = Throttle::default();
    loop {
        tokio::time::sleep(TAIL_EVERY).await;
        for (idx, t) in tails.iter_mut().enumerate() {
            gather_tail(ctx, idx, t).await;
        }
        if tails.iter().all(|t| t.pending.is_empty()) {
            continue;
        }
        let batch = TailBatch {
            instance: ctx.instance.instance.clone(),
            group: ctx.instance.group.clone(),
            generation: ctx.plan.generation,
            components: tails
                .iter()
                .enumerate()
                .filter(|(_, t)| !t.pending.is_empty())
                .map(|(idx, t)| TailPart {
                    component: ctx.plan.components[idx].name.clone(),
                    reset: t.reset,
                    lines: t.pending.iter().map(|l| log_line(ctx, idx, l)).collect(),
                })
                .collect(),
        };
        let (server, url) = link.servers.url("/v1/agent/tail");
        let sent = match link
            .client
            .post(url)
            .json(&batch)
            .timeout(TAIL_TIMEOUT)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                if Servers::try_another(r.status()) {
                    link.servers.failed(server);
                }
                Err(format!("status {}", r.status()))
            }
            Err(e) => {
                if e.is_connect() {
                    link.servers.failed(server);
                }
                Err(error_chain(&e))
            }
        };
        match sent {
            Ok(()) => {
                throttle.recovered();
                for t in &mut tails {
                    if !t.pending.is_empty() {
                        t.pending.clear();
                        t.bytes = 0;
                        t.reset = false;
                    }
                }
            }
            Err(problem) => {
                if let Some(held_back) = throttle.failed() {
                    tracing::warn!(%problem, held_back, "cannot send the components' new output to the flight recorder; kept for the next try (logged at most once a minute)");
                }
            }
        }
    }
}

/// Read component `idx`'s new lines into its tail.
async fn gather_tail(ctx: &Ctx, idx: usize, t: &mut Tail) {
    let comp = &ctx.plan.components[idx];
    match comp.runtime {
        Runtime::Process => {
            let path = ctx.instance.log_file(comp);
            let (started, mut cursor, limit) = (t.started, t.cursor, t.limit);
            let (lines, cursor) = tokio::task::spawn_blocking(move || {
                if started {
                    let lines = logfile::read_new(&path, &mut cursor);
                    (lines, cursor)
                } else {
                    logfile::last_lines_and_cursor(&path, limit)
                }
            })
            .await
            .unwrap_or_default();
            t.started = true;
            t.cursor = cursor;
            t.push(lines);
        }
        Runtime::Docker => {
            let Some(id) = ctx.container(idx) else { return };
            let Ok(docker) = ctx.docker.client().await else {
                return;
            };
            let mut b = bollard::query_parameters::LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .timestamps(true);
            b = match t.last_ns {
                None => b.tail("1000"),
                Some((ns, _)) => b.since((ns / 1_000_000_000) as i32),
            };
            let read = async {
                let mut stream = docker.logs(&id, Some(b.build()));
                let mut out = Vec::new();
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(o) => out.extend(engine_lines_ns(o)),
                        Err(_) => break,
                    }
                }
                out
            };
            let Ok(lines) = tokio::time::timeout(ENGINE_TIMEOUT, read).await else {
                return;
            };
            let (mut last, mut at_last) = t.last_ns.unwrap_or((i64::MIN, 0));
            let mut skip = at_last;
            let mut new = Vec::new();
            for (ns, stream, text) in lines {
                if ns < last {
                    continue;
                }
                if ns == last {
                    if skip > 0 {
                        skip -= 1;
                        continue;
                    }
                    at_last += 1;
                } else {
                    (last, at_last, skip) = (ns, 1, 0);
                }
                new.push(((ns / 1_000_000).max(0) as u64, stream, text));
            }
            if last != i64::MIN {
                t.last_ns = Some((last, at_last));
            }
            t.push(new);
        }
    }
}

fn log_line(ctx: &Ctx, idx: usize, (at_ms, stream, text): &logfile::Line) -> LogLine {
    LogLine {
        at_ms: *at_ms,
        instance: ctx.instance.instance.clone(),
        component: ctx.plan.components[idx].name.clone(),
        stream: *stream,
        line: text.clone(),
    }
}

/// Too many tasks at once: say so.
async fn refuse(link: Link, ctx: Arc<Ctx>, task: AgentTask) {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx
        .send(Frame::Error {
            instance: Some(ctx.instance.instance.clone()),
            message: format!(
                "the agent runs {MAX_TASKS} logs or exec sessions already; try again when one ends"
            ),
        })
        .await;
    drop(tx);
    upload(&link, &ctx, task.id(), rx).await;
}

/// Run one task, its frames uploaded as they come; stops when the server closes the upload.
async fn handle(ctx: Arc<Ctx>, link: Link, task: AgentTask) {
    let (tx, rx) = mpsc::channel(256);
    let id = task.id();
    let produce = async {
        match task {
            AgentTask::Logs {
                component,
                since_ms,
                tail,
                follow,
                ..
            } => logs(&ctx, component.as_deref(), since_ms, tail, follow, &tx).await,
            AgentTask::Exec {
                component,
                command,
                tty,
                stdin,
                size,
                ..
            } => {
                let how = How { tty, stdin, size };
                let run = exec(&ctx, &link, id, component.as_deref(), &command, how, &tx);
                // A command that prints nothing leaves this upload, and the person's answer,
                // silent: idle frames keep both from the server's idle timeout (90 s).
                tokio::select! {
                    _ = run => {}
                    _ = idle_frames(&tx) => {}
                }
            }
        }
        drop(tx);
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = upload(&link, &ctx, id, rx) => {}
        _ = produce => {}
    }
}

/// How often a task with nothing to say sends [`Frame::Idle`]: well within the server's idle
/// timeout (90 s), which closes a connection silent both ways.
const IDLE_EVERY: Duration = Duration::from_secs(10);

/// Sends [`Frame::Idle`] every [`IDLE_EVERY`]; ends when the upload has.
async fn idle_frames(tx: &mpsc::Sender<Frame>) {
    loop {
        tokio::time::sleep(IDLE_EVERY).await;
        if tx.send(Frame::Idle).await.is_err() {
            return;
        }
    }
}

/// POST the frames of task `id` as they come; returns when the upload ends either way.
async fn upload(link: &Link, ctx: &Ctx, id: u64, rx: mpsc::Receiver<Frame>) {
    let body = futures::stream::unfold(rx, |mut rx| async move {
        let f = rx.recv().await?;
        let mut v = serde_json::to_vec(&f).unwrap_or_default();
        v.push(b'\n');
        Some((Ok::<_, std::io::Error>(v), rx))
    });
    let (server, url) = link.servers.url(&format!("/v1/agent/tasks/{id}"));
    let r = link
        .client
        .post(url)
        .query(&[("instance", ctx.instance.instance.as_str())])
        .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    match r {
        Ok(resp) if resp.status().is_success() => {}
        Ok(resp) => tracing::debug!(task = id, status = %resp.status(), "task upload refused"),
        Err(e) => {
            if e.is_connect() {
                link.servers.failed(server);
            }
            tracing::debug!(task = id, error = %error_chain(&e), "task upload ended")
        }
    }
}

/// The components a task is about (all, or the one named), or an error frame's text.
fn components(ctx: &Ctx, name: Option<&str>) -> Result<Vec<usize>, String> {
    match name {
        None => Ok((0..ctx.plan.components.len()).collect()),
        Some(n) => ctx
            .plan
            .components
            .iter()
            .position(|c| c.name == n)
            .map(|i| vec![i])
            .ok_or_else(|| {
                let names: Vec<&str> = ctx
                    .plan
                    .components
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect();
                format!(
                    "instance {} has no component {n:?}; it has {}",
                    ctx.instance.instance,
                    names.join(", ")
                )
            }),
    }
}

fn line(ctx: &Ctx, idx: usize, (at_ms, stream, text): logfile::Line) -> Frame {
    Frame::Line(LogLine {
        at_ms,
        instance: ctx.instance.instance.clone(),
        component: ctx.plan.components[idx].name.clone(),
        stream,
        line: text,
    })
}

fn error(ctx: &Ctx, message: String) -> Frame {
    Frame::Error {
        instance: Some(ctx.instance.instance.clone()),
        message,
    }
}

/// Send the components' kept output (merged in time order), then, with `follow`, new lines.
async fn logs(
    ctx: &Ctx,
    component: Option<&str>,
    since_ms: u64,
    tail: Option<usize>,
    follow: bool,
    tx: &mpsc::Sender<Frame>,
) {
    let idxs = match components(ctx, component) {
        Ok(i) => i,
        Err(m) => {
            let _ = tx.send(error(ctx, m)).await;
            return;
        }
    };
    // History: every component's, merged by time.
    let mut history: Vec<(usize, logfile::Line)> = Vec::new();
    let mut cursors = Vec::new();
    for &idx in &idxs {
        let comp = &ctx.plan.components[idx];
        match comp.runtime {
            Runtime::Process => {
                let path = ctx.instance.log_file(comp);
                let (lines, cursor) =
                    tokio::task::spawn_blocking(move || logfile::read(&path, since_ms, tail))
                        .await
                        .unwrap_or_default();
                history.extend(lines.into_iter().map(|l| (idx, l)));
                cursors.push((idx, cursor));
            }
            Runtime::Docker => match container_lines(ctx, idx, since_ms, tail).await {
                Ok(lines) => history.extend(lines.into_iter().map(|l| (idx, l))),
                Err(m) => {
                    let _ = tx.send(error(ctx, m)).await;
                }
            },
        }
    }
    history.sort_by_key(|(_, l)| l.0);
    for (idx, l) in history {
        if tx.send(line(ctx, idx, l)).await.is_err() {
            return;
        }
    }
    if !follow {
        return;
    }
    // The history is sent: the server merges every instance's before it streams new lines.
    if tx.send(Frame::Idle).await.is_err() {
        return;
    }
    // Counted while it follows (a stopping agent waits for one more read when some do).
    struct Following<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Following<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    ctx.follows
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _following = Following(&ctx.follows);
    // New lines: process logs polled, containers' from the engine's follow stream.
    let files = async {
        if cursors.is_empty() {
            return std::future::pending::<()>().await;
        }
        loop {
            tokio::time::sleep(logfile::FOLLOW_POLL).await;
            let mut batch = Vec::new();
            for (idx, cursor) in cursors.iter_mut() {
                let path = ctx.instance.log_file(&ctx.plan.components[*idx]);
                let mut c = *cursor;
                let (lines, c) = tokio::task::spawn_blocking(move || {
                    let lines = logfile::read_new(&path, &mut c);
                    (lines, c)
                })
                .await
                .unwrap_or_default();
                *cursor = c;
                batch.extend(lines.into_iter().map(|l| (*idx, l)));
            }
            batch.sort_by_key(|(_, l)| l.0);
            for (idx, l) in batch {
                if tx.send(line(ctx, idx, l)).await.is_err() {
                    return;
                }
            }
        }
    };
    let containers = futures::future::join_all(
        idxs.iter()
            .filter(|i| ctx.plan.components[**i].runtime == Runtime::Docker)
            .map(|&idx| follow_container(ctx, idx, tx)),
    );
    tokio::select! {
        _ = files => {}
        _ = async { containers.await; std::future::pending::<()>().await } => {}
        _ = idle_frames(tx) => {}
        _ = tx.closed() => {}
    }
}

/// The container of a Docker component (its last run's), or why there is none.
fn container(ctx: &Ctx, idx: usize) -> Result<String, String> {
    ctx.container(idx).ok_or_else(|| {
        format!(
            "component {} of instance {} has no container yet",
            ctx.plan.components[idx].name, ctx.instance.instance
        )
    })
}

/// A container's kept output through the engine's logs API (with the engine's timestamps).
async fn container_lines(
    ctx: &Ctx,
    idx: usize,
    since_ms: u64,
    tail: Option<usize>,
) -> Result<Vec<logfile::Line>, String> {
    let id = container(ctx, idx)?;
    let docker = ctx.docker.client().await.map_err(|e| e.to_string())?;
    let mut b = bollard::query_parameters::LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .since((since_ms / 1000) as i32);
    b = b.tail(&tail.map_or("all".to_string(), |t| t.to_string()));
    let mut stream = docker.logs(&id, Some(b.build()));
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(o) => out.extend(engine_lines(o).into_iter().filter(|l| l.0 >= since_ms)),
            Err(e) => {
                return Err(format!(
                    "the engine's logs of {}: {e}",
                    &id[..id.len().min(12)]
                ))
            }
        }
    }
    Ok(out)
}

/// New output of a container, from now on, until the upload is closed.
async fn follow_container(ctx: &Ctx, idx: usize, tx: &mpsc::Sender<Frame>) {
    let Ok(id) = container(ctx, idx) else {
        return std::future::pending().await;
    };
    let Ok(docker) = ctx.docker.client().await else {
        return std::future::pending().await;
    };
    let opts = bollard::query_parameters::LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .timestamps(true)
        .follow(true)
        .since((logfile::now_ms() / 1000) as i32)
        .build();
    let started = logfile::now_ms();
    let mut stream = docker.logs(&id, Some(opts));
    while let Some(Ok(o)) = stream.next().await {
        for l in engine_lines(o) {
            // `since` is in whole seconds: lines the history already sent are skipped.
            if l.0 < started {
                continue;
            }
            if tx.send(line(ctx, idx, l)).await.is_err() {
                return;
            }
        }
    }
    std::future::pending().await
}

/// Lines of one chunk of the engine's logs (`TIMESTAMP TEXT` with `timestamps`).
fn engine_lines(o: bollard::container::LogOutput) -> Vec<logfile::Line> {
    engine_lines_ns(o)
        .into_iter()
        .map(|(ns, stream, text)| ((ns / 1_000_000).max(0) as u64, stream, text))
        .collect()
}

/// Lines of one chunk of the engine's logs, with the engine's time in ns.
fn engine_lines_ns(o: bollard::container::LogOutput) -> Vec<(i64, Stream, String)> {
    use bollard::container::LogOutput;
    let (stream, bytes) = match o {
        LogOutput::StdErr { message } => (Stream::Stderr, message),
        LogOutput::StdOut { message } | LogOutput::Console { message } => (Stream::Stdout, message),
        LogOutput::StdIn { .. } => return Vec::new(),
    };
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| {
            let (ts, text) = l.split_once(' ').unwrap_or((l, ""));
            match crate::docker::parse_rfc3339_ns(ts) {
                Some(ns) => (ns, stream, text.to_string()),
                None => (logfile::now_ms() as i64 * 1_000_000, stream, l.to_string()),
            }
        })
        .collect()
}

/// How an exec runs: with a terminal, with the person's input, the terminal's first size.
#[derive(Clone, Copy)]
struct How {
    tty: bool,
    stdin: bool,
    size: Option<WinSize>,
}

/// The person's input of task `id` as it comes (`GET /v1/agent/tasks/ID/input`), into `tx`,
/// until the session ends or the input does.
async fn read_input(link: &Link, ctx: &Ctx, id: u64, tx: mpsc::Sender<ExecInput>) {
    for attempt in 0..5 {
        let (_, url) = link.servers.url(&format!("/v1/agent/tasks/{id}/input"));
        let resp = link
            .client
            .get(url)
            .query(&[("instance", ctx.instance.instance.as_str())])
            .send()
            .await;
        match resp {
            Ok(r) if r.status().is_success() => {
                let mut stream = r.bytes_stream();
                let mut buf = Vec::new();
                while let Some(Ok(chunk)) = stream.next().await {
                    buf.extend_from_slice(&chunk);
                    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        if let Ok(i) = serde_json::from_slice::<ExecInput>(&line) {
                            if tx.send(i).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                return;
            }
            // The server opens the input as it hands out the task: a moment, at most.
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND && attempt < 4 => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(r) => {
                tracing::debug!(task = id, status = %r.status(), "exec input refused");
                return;
            }
            Err(e) => {
                tracing::debug!(task = id, error = %error_chain(&e), "exec input ended");
                return;
            }
        }
    }
}

/// Run `command` in component `name`'s environment; its output as frames, then its exit.
async fn exec(
    ctx: &Ctx,
    link: &Link,
    id: u64,
    name: Option<&str>,
    command: &[String],
    how: How,
    tx: &mpsc::Sender<Frame>,
) {
    let idx = match components(ctx, name) {
        Ok(i) => i[0],
        Err(m) => {
            let _ = tx.send(error(ctx, m)).await;
            return;
        }
    };
    let Some(program) = command.first() else {
        let _ = tx.send(error(ctx, "exec needs a command".into())).await;
        return;
    };
    let comp = &ctx.plan.components[idx];
    let mut env = match ctx.instance.env(comp) {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(error(ctx, e.to_string())).await;
            return;
        }
    };
    if how.tty && !env.iter().any(|(k, _)| k == "TERM") {
        env.push(("TERM".into(), "xterm".into()));
    }
    // The input, as it comes; without `stdin` there is none (an end at once).
    let (in_tx, in_rx) = mpsc::channel(64);
    let input = async {
        if how.stdin {
            read_input(link, ctx, id, in_tx).await;
        } else {
            drop(in_tx);
        }
        std::future::pending::<()>().await
    };
    let run = async {
        match (comp.runtime, how.tty) {
            (Runtime::Process, false) => {
                exec_process(ctx, idx, program, &command[1..], env, in_rx, tx).await
            }
            (Runtime::Process, true) => {
                exec_pty(ctx, idx, program, &command[1..], env, how.size, in_rx, tx).await
            }
            (Runtime::Docker, _) => exec_container(ctx, idx, command, env, how, in_rx, tx).await,
        }
    };
    let end = tokio::select! {
        end = run => end,
        _ = input => unreachable!("the input future never ends"),
    };
    let _ = tx
        .send(match end {
            Ok((code, how)) => Frame::Exit { code, how },
            Err(m) => error(ctx, m),
        })
        .await;
}

/// The whole characters at the front of `carry` (a split one waits for its rest), taken out.
fn whole_chars(carry: &mut Vec<u8>) -> String {
    let cut = match std::str::from_utf8(carry) {
        Ok(_) => carry.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => carry.len(),
    };
    let data = String::from_utf8_lossy(&carry[..cut]).into_owned();
    carry.drain(..cut);
    data
}

/// The whole process group goes when this is dropped (the person went, or the run is over).
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        crate::process::signal_group(self.0, libc::SIGKILL);
    }
}

fn exit_of(status: std::process::ExitStatus) -> (i32, String) {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    (code, crate::process::describe(&status))
}

async fn exec_process(
    ctx: &Ctx,
    idx: usize,
    program: &str,
    args: &[String],
    env: Vec<(String, String)>,
    mut input: mpsc::Receiver<ExecInput>,
    tx: &mpsc::Sender<Frame>,
) -> Result<(i32, String), String> {
    use tokio::io::AsyncWriteExt;
    let comp = &ctx.plan.components[idx];
    let cwd = ctx.instance.component_dir(comp);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env)
        .current_dir(&cwd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::process::die_with_agent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program:?} in {}: {e}", cwd.display()))?;
    let _group = Group(child.id().unwrap_or(0));
    let pump = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>, stream: Stream| async move {
        let mut buf = vec![0u8; 8192];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            carry.extend_from_slice(&buf[..n]);
            let data = whole_chars(&mut carry);
            if tx.send(Frame::Output { stream, data }).await.is_err() {
                break;
            }
        }
        if !carry.is_empty() {
            let data = String::from_utf8_lossy(&carry).into_owned();
            let _ = tx.send(Frame::Output { stream, data }).await;
        }
    };
    let out = child
        .stdout
        .take()
        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
    let err = child
        .stderr
        .take()
        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
    let mut stdin = child.stdin.take();
    // The person's input to the command's stdin; closed at its end.
    let feed = async {
        while let Some(i) = input.recv().await {
            match i {
                ExecInput::Data { data } => {
                    let Some(w) = stdin.as_mut() else { continue };
                    if w.write_all(data.as_bytes()).await.is_err() {
                        stdin = None;
                    }
                }
                ExecInput::Eof => break,
                ExecInput::Resize(_) => {}
            }
        }
        drop(stdin.take());
        std::future::pending::<()>().await
    };
    let (_, _, status) = tokio::join!(
        async {
            if let Some(o) = out {
                pump(o, Stream::Stdout).await
            }
        },
        async {
            if let Some(e) = err {
                pump(e, Stream::Stderr).await
            }
        },
        async {
            tokio::select! {
                st = child.wait() => st,
                _ = feed => unreachable!("the feed never ends"),
            }
        }
    );
    let status = status.map_err(|e| format!("waiting for {program:?}: {e}"))?;
    Ok(exit_of(status))
}

/// A pty: (master, slave), the master non-blocking, both closed on exec.
fn open_pty(
    size: Option<WinSize>,
) -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let ws = winsize(size.unwrap_or(WinSize { cols: 80, rows: 24 }));
    let (mut m, mut sl) = (0, 0);
    // SAFETY: openpty writes two fds on success; the pointers are valid for the call.
    let r = unsafe { libc::openpty(&mut m, &mut sl, std::ptr::null_mut(), std::ptr::null(), &ws) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just opened and are owned by nothing else.
    let (m, sl) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(m),
            std::os::fd::OwnedFd::from_raw_fd(sl),
        )
    };
    use std::os::fd::AsRawFd;
    for fd in [m.as_raw_fd(), sl.as_raw_fd()] {
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: as above.
    unsafe {
        let fl = libc::fcntl(m.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(m.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    Ok((m, sl))
}

fn winsize(s: WinSize) -> libc::winsize {
    libc::winsize {
        ws_row: s.rows,
        ws_col: s.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Run a command on a pty of its own (a new session, the pty its controlling terminal): its
/// output as it comes, the person's keys and window sizes passed on.
#[allow(clippy::too_many_arguments)]
async fn exec_pty(
    ctx: &Ctx,
    idx: usize,
    program: &str,
    args: &[String],
    env: Vec<(String, String)>,
    size: Option<WinSize>,
    mut input: mpsc::Receiver<ExecInput>,
    tx: &mpsc::Sender<Frame>,
) -> Result<(i32, String), String> {
    use std::os::fd::AsRawFd;
    use tokio::io::unix::AsyncFd;
    let comp = &ctx.plan.components[idx];
    let cwd = ctx.instance.component_dir(comp);
    let (master, slave) = open_pty(size).map_err(|e| format!("cannot open a pty: {e}"))?;
    let stdio = || {
        slave
            .try_clone()
            .map(std::process::Stdio::from)
            .map_err(|e| format!("cannot open a pty: {e}"))
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env)
        .current_dir(&cwd)
        .stdin(stdio()?)
        .stdout(stdio()?)
        .stderr(stdio()?)
        .kill_on_drop(true);
    // SAFETY: runs in the child before exec; setsid and ioctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    crate::process::die_with_agent(&mut cmd);
    let spawned = cmd.spawn();
    // Our copies of the slave go: the master reads EIO once the command's are closed too.
    drop(cmd);
    drop(slave);
    let mut child =
        spawned.map_err(|e| format!("cannot run {program:?} in {}: {e}", cwd.display()))?;
    // setsid: its pid is its session's and group's id.
    let _group = Group(child.id().unwrap_or(0));
    // SAFETY: the OwnedFd is the master's one owner, and nothing replaces or closes it while
    // the AsyncFd holds it.
    let master = unsafe { AsyncFd::register(master) }
        .map_err(|e| format!("cannot watch the pty: {}", std::io::Error::from(e)))?;
    let out = async {
        let mut buf = vec![0u8; 8192];
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let Ok(mut ready) = master.readable().await else {
                break;
            };
            let r = ready.try_io(|fd| {
                // SAFETY: reads into a buffer of the given length.
                let n = unsafe {
                    libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) if n > 0 => {
                    carry.extend_from_slice(&buf[..n]);
                    let data = whole_chars(&mut carry);
                    if !data.is_empty()
                        && tx
                            .send(Frame::Output {
                                stream: Stream::Stdout,
                                data,
                            })
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
                Err(_would_block) => continue,
                // EIO: every end of the slave is closed.
                _ => break,
            }
        }
        if !carry.is_empty() {
            let data = String::from_utf8_lossy(&carry).into_owned();
            let _ = tx
                .send(Frame::Output {
                    stream: Stream::Stdout,
                    data,
                })
                .await;
        }
    };
    let write_all = |owned: Vec<u8>| {
        let master = &master;
        async move {
            let mut rest: &[u8] = &owned;
            while !rest.is_empty() {
                let Ok(mut ready) = master.writable().await else {
                    return;
                };
                match ready.try_io(|fd| {
                    // SAFETY: writes from a buffer of the given length.
                    let n = unsafe {
                        libc::write(fd.get_ref().as_raw_fd(), rest.as_ptr().cast(), rest.len())
                    };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                }) {
                    Ok(Ok(n)) => rest = &rest[n..],
                    Ok(Err(_)) => return,
                    Err(_would_block) => continue,
                }
            }
        }
    };
    let feed = async {
        while let Some(i) = input.recv().await {
            match i {
                ExecInput::Data { data } => write_all(data.into_bytes()).await,
                ExecInput::Resize(s) => {
                    let ws = winsize(s);
                    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
                    unsafe { libc::ioctl(master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                }
                // The terminal's end-of-file key.
                ExecInput::Eof => write_all(vec![4]).await,
            }
        }
        std::future::pending::<()>().await
    };
    tokio::pin!(out);
    let (status, drained) = tokio::select! {
        st = async {
            tokio::select! {
                st = child.wait() => st,
                _ = feed => unreachable!("the feed never ends"),
            }
        } => (st, false),
        _ = &mut out => (child.wait().await, true),
    };
    if !drained {
        // What it printed last; something it left running may hold the pty: 1 s, then it goes.
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut out).await;
    }
    let status = status.map_err(|e| format!("waiting for {program:?}: {e}"))?;
    Ok(exit_of(status))
}

async fn exec_container(
    ctx: &Ctx,
    idx: usize,
    command: &[String],
    env: Vec<(String, String)>,
    how: How,
    mut input: mpsc::Receiver<ExecInput>,
    tx: &mpsc::Sender<Frame>,
) -> Result<(i32, String), String> {
    use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
    use tokio::io::AsyncWriteExt;
    let id = container(ctx, idx)?;
    let docker = ctx.docker.client().await.map_err(|e| e.to_string())?;
    let what =
        |e: bollard::errors::Error| format!("exec in container {}: {e}", &id[..id.len().min(12)]);
    let created = docker
        .create_exec(
            &id,
            CreateExecOptions {
                cmd: Some(command.to_vec()),
                env: Some(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()),
                attach_stdin: Some(how.stdin),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                tty: Some(how.tty),
                ..Default::default()
            },
        )
        .await
        .map_err(what)?;
    let started = docker
        .start_exec(
            &created.id,
            Some(StartExecOptions {
                detach: false,
                tty: how.tty,
                ..Default::default()
            }),
        )
        .await
        .map_err(what)?;
    let resize = |s: WinSize| {
        let docker = docker.clone();
        let exec = created.id.clone();
        async move {
            let _ = docker
                .resize_exec(
                    &exec,
                    ResizeExecOptions {
                        height: s.rows,
                        width: s.cols,
                    },
                )
                .await;
        }
    };
    if let (true, Some(s)) = (how.tty, how.size) {
        resize(s).await;
    }
    if let StartExecResults::Attached {
        mut output,
        input: mut stdin,
    } = started
    {
        let out = async {
            while let Some(chunk) = output.next().await {
                let Ok(o) = chunk else { break };
                use bollard::container::LogOutput;
                let (stream, bytes) = match o {
                    LogOutput::StdErr { message } => (Stream::Stderr, message),
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        (Stream::Stdout, message)
                    }
                    LogOutput::StdIn { .. } => continue,
                };
                let data = String::from_utf8_lossy(&bytes).into_owned();
                if tx.send(Frame::Output { stream, data }).await.is_err() {
                    return Err("the session was closed".to_string());
                }
            }
            Ok(())
        };
        let feed = async {
            let mut open = how.stdin;
            while let Some(i) = input.recv().await {
                match i {
                    ExecInput::Data { data } if open => {
                        if stdin.write_all(data.as_bytes()).await.is_err() {
                            open = false;
                        }
                        let _ = stdin.flush().await;
                    }
                    ExecInput::Resize(s) if how.tty => resize(s).await,
                    ExecInput::Eof if open => {
                        if how.tty {
                            // The terminal's end-of-file key.
                            let _ = stdin.write_all(&[4]).await;
                            let _ = stdin.flush().await;
                        } else {
                            let _ = stdin.shutdown().await;
                            open = false;
                        }
                    }
                    _ => {}
                }
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = out => r?,
            _ = feed => unreachable!("the feed never ends"),
        }
    }
    // The output ends as the command does; its exit code may lag a moment behind.
    for _ in 0..50 {
        let i = docker.inspect_exec(&created.id).await.map_err(what)?;
        if i.running != Some(true) {
            let code = i.exit_code.unwrap_or(-1) as i32;
            return Ok((code, format!("exit status {code}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("the command's output ended but it still runs".into())
}

/// A container's last lines, at most its flight size of text (none when it has no container
/// or the engine does not answer within 2 s).
pub(crate) async fn container_tail(ctx: &Ctx, idx: usize) -> Vec<logfile::Line> {
    let limit = ctx.plan.components[idx].flight_bytes();
    let lines = (limit / 64).max(1000);
    let mut l = tokio::time::timeout(ENGINE_TIMEOUT, container_lines(ctx, idx, 0, Some(lines)))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let keep = drover_model::logs::flight_cut(&l, limit, |x| x.2.len());
    l.drain(..keep);
    l
}

/// The flight record of component `idx` now: its last lines, at most its flight size.
pub(crate) async fn flight_record(ctx: &Ctx, idx: usize, reason: String) -> FlightRecord {
    let comp = &ctx.plan.components[idx];
    let lines = match comp.runtime {
        Runtime::Process => logfile::last_lines(&ctx.instance.log_file(comp), comp.flight_bytes()),
        Runtime::Docker => {
            let l = container_tail(ctx, idx).await;
            if l.is_empty() {
                // Removed at the stop: the lines read just before.
                ctx.last_words(idx)
            } else {
                l
            }
        }
    };
    FlightRecord {
        instance: ctx.instance.instance.clone(),
        group: ctx.instance.group.clone(),
        generation: ctx.plan.generation,
        component: comp.name.clone(),
        reason,
        at_ms: logfile::now_ms(),
        lines: lines.iter().map(|l| log_line(ctx, idx, l)).collect(),
    }
}

/// POST one flight record (best effort).
pub(crate) async fn send_flight(link: Link, rec: FlightRecord) {
    let (server, url) = link.servers.url("/v1/agent/flight");
    match link
        .client
        .post(url)
        .json(&rec)
        .timeout(FLIGHT_TIMEOUT)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => {
            tracing::warn!(component = %rec.component, status = %r.status(), "the server refused the flight record")
        }
        Err(e) => {
            if e.is_connect() {
                link.servers.failed(server);
            }
            tracing::warn!(component = %rec.component, error = %error_chain(&e), "cannot send the flight record")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tail holds at most its component's flight size: the oldest lines go first, and the
    /// server's copy is then replaced rather than continued.
    #[test]
    fn a_tail_keeps_at_most_its_flight_size() {
        let mut t = Tail {
            limit: 4 << 10,
            ..Default::default()
        };
        t.push((0..10).map(|k| (k, Stream::Stdout, "x".repeat(99))));
        assert_eq!((t.pending.len(), t.bytes, t.reset), (10, 1000, false));
        t.push((10..100).map(|k| (k, Stream::Stdout, "x".repeat(99))));
        assert_eq!(t.pending.len(), 40, "4096 bytes hold 40 lines of 100");
        assert!(t.bytes <= 4 << 10 && t.reset);
        assert_eq!(t.pending.front().unwrap().0, 60, "the newest kept");
    }
}
