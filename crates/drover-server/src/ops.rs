//! The API of logs, exec and the flight recorder: `GET /v1/logs` (read), `POST /v1/exec`
//! (admin), and the agents' side, `GET /v1/agent/tasks`, `POST /v1/agent/tasks/{id}`,
//! `POST /v1/agent/flight` and `POST /v1/agent/tail`. The relaying itself is in `relay.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_model::logs::{
    AgentTask, ExecInput, ExecRequest, FlightRecord, Frame, LogLine, LogsQuery, Stream, TailBatch,
};
use drover_model::secret::Scrubber;
use drover_model::{EventKind, NewEvent};
use futures::StreamExt;
use serde::Deserialize;

use crate::api::{check_instance, hold_poll, scrubber, RawBody};
use crate::auth::{check_group, BoundInstance, Caller};
use crate::engine::{now_ms, Engine};
use crate::guard::{Guards, Kind};
use crate::relay::{Flights, Relay, Session, TAKE_TIMEOUT};
use crate::ServerError;

/// How long a `drover logs` without `-f` waits for the slowest instance.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest line accepted in a task's upload.
const MAX_FRAME: usize = 64 << 10;
/// Longest exec command accepted (all its arguments), in bytes.
const MAX_COMMAND: usize = 16 << 10;

/// What the handlers share: the tasks in flight and the flight recorder's files.
pub struct Ops {
    pub relay: Relay,
    pub flights: Flights,
}

impl Ops {
    pub fn new(data_dir: &std::path::Path) -> Ops {
        Ops {
            relay: Relay::default(),
            flights: Flights::new(data_dir),
        }
    }
}

/// An instance the server can ask: (id, group, generation).
type Live = (String, String, u64);

/// The service's instances matching the query that an agent may answer for, and whether the
/// service is known at all.
fn live_instances(
    e: &Engine,
    service: &str,
    region: Option<&str>,
    instance: Option<&str>,
    generation: Option<u64>,
) -> (Vec<Live>, bool) {
    let st = e.state();
    let known = st
        .groups
        .keys()
        .any(|g| drover_model::GroupId::service_of(g) == service)
        || st
            .revision
            .as_ref()
            .is_some_and(|r| r.fleet.services.contains_key(service));
    let live = st
        .instances
        .values()
        .filter(|i| {
            let (s, r) = (
                drover_model::GroupId::service_of(&i.record.group),
                drover_model::GroupId::region_of(&i.record.group),
            );
            s == service
                && i.alive
                && region.is_none_or(|x| x == r)
                && instance.is_none_or(|x| x == i.record.id)
                && generation.is_none_or(|g| g == i.record.generation)
        })
        .map(|i| {
            (
                i.record.id.clone(),
                i.record.group.clone(),
                i.record.generation,
            )
        })
        .collect();
    (live, known)
}

fn scrub_frame(sc: &Scrubber, f: &mut Frame) {
    match f {
        Frame::Line(l) => sc.scrub_in_place(&mut l.line),
        Frame::Output { data, .. } => sc.scrub_in_place(data),
        Frame::Error { message, .. } | Frame::Note { message } => sc.scrub_in_place(message),
        Frame::Exit { how, .. } => sc.scrub_in_place(how),
        Frame::Idle | Frame::Session { .. } => {}
    }
}

fn ndjson(f: &Frame) -> Result<Bytes, std::convert::Infallible> {
    Ok(Bytes::from(frame_bytes(f)))
}

fn frame_bytes(f: &Frame) -> Vec<u8> {
    let mut v = serde_json::to_vec(f).unwrap_or_default();
    v.push(b'\n');
    v
}

fn stream_response(body: Body) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Wait until the agent took the task; else an error frame saying so.
async fn taken(s: &Session) -> Result<(), Frame> {
    tokio::time::timeout(TAKE_TIMEOUT, s.taken())
        .await
        .map_err(|_| Frame::Error {
            instance: Some(s.instance.clone()),
            message: format!(
                "instance {}'s agent did not take the request within {}s: it is stopping, cannot reach this server, or is older than it",
                s.instance,
                TAKE_TIMEOUT.as_secs()
            ),
        })
}

/// `GET /v1/logs`: the output of a service's components, merged across instances in time
/// order, as NDJSON frames; `follow`: then new lines as they come.
pub async fn logs(
    State(e): State<Arc<Engine>>,
    Extension(ops): Extension<Arc<Ops>>,
    Extension(caller): Extension<Caller>,
    Extension(guards): Extension<Arc<Guards>>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!(
            "{}; parameters: service, component, region, instance, generation, since (a duration, e.g. 10m), tail, follow",
            r.body_text()
        ))
    })?;
    let (live, known) = live_instances(
        &e,
        &q.service,
        q.region.as_deref(),
        q.instance.as_deref(),
        q.generation,
    );
    // Instances that are gone: what the flight recorder kept of them.
    let asks_gone = q.instance.is_some() || q.generation.is_some();
    let recs = if asks_gone {
        let ops2 = ops.clone();
        let (svc, reg, inst, generation) = (
            q.service.clone(),
            q.region.clone(),
            q.instance.clone(),
            q.generation,
        );
        let live_ids: Vec<String> = live.iter().map(|l| l.0.clone()).collect();
        tokio::task::spawn_blocking(move || {
            ops2.flights
                .find(&svc, reg.as_deref(), inst.as_deref(), generation)
                .into_iter()
                .filter(|r| !live_ids.contains(&r.instance))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default()
    } else {
        Vec::new()
    };
    if !known && recs.is_empty() {
        return Err(ServerError::NoService {
            service: q.service.clone(),
            known: None,
        });
    }
    if live.is_empty() && recs.is_empty() {
        let which = match (&q.instance, q.generation) {
            (Some(i), _) => format!(
                "instance {i} of service {} is not running and the flight recorder kept nothing of it",
                q.service
            ),
            (None, Some(g)) => format!(
                "no instance of generation {g} of service {} runs and the flight recorder kept nothing of one",
                q.service
            ),
            _ => format!("service {} has no instance running", q.service),
        };
        return Err(ServerError::NotFound(which));
    }
    let held = if q.follow {
        Some(
            guards
                .hold(Kind::Follow, &caller.id)
                .ok_or(ServerError::TooManyFollows {
                    limit: crate::guard::FOLLOWS_PER_CALLER,
                })?,
        )
    } else {
        None
    };
    let since_ms = q
        .since
        .map(|d| now_ms().saturating_sub(d.as_millis()))
        .unwrap_or(0);
    let mut sessions = Vec::new();
    let mut errors = Vec::new();
    for (id, _, _) in &live {
        let task = |tid| AgentTask::Logs {
            id: tid,
            component: q.component.clone(),
            since_ms,
            tail: q.tail,
            follow: q.follow,
        };
        match ops.relay.dispatch(id, task) {
            Some(s) => sessions.push(s),
            None => errors.push(Frame::Error {
                instance: Some(id.clone()),
                message: format!("instance {id} has too many requests waiting; try again"),
            }),
        }
    }
    // History: every instance's until it is sent (or, following, until its marker).
    let history = futures::future::join_all(sessions.iter_mut().map(|s| async {
        let mut lines = Vec::new();
        let mut errs = Vec::new();
        if let Err(f) = taken(s).await {
            errs.push(f);
            return (lines, errs, false);
        }
        let read = async {
            while let Some(f) = s.rx.recv().await {
                match f {
                    Frame::Line(l) => lines.push(l),
                    Frame::Idle if q.follow => return true,
                    Frame::Idle => {}
                    other => errs.push(other),
                }
            }
            false
        };
        let open = tokio::time::timeout(READ_TIMEOUT, read)
            .await
            .unwrap_or(false);
        (lines, errs, open)
    }))
    .await;
    let mut merged: Vec<LogLine> = Vec::new();
    let mut notes: Vec<Frame> = Vec::new();
    for ((instance, component), (reason, lines)) in crate::relay::merged(&recs) {
        if q.component.as_ref().is_some_and(|c| *c != component) {
            continue;
        }
        let mut kept: Vec<LogLine> = lines.into_iter().filter(|l| l.at_ms >= since_ms).collect();
        if let Some(t) = q.tail {
            kept.drain(..kept.len().saturating_sub(t));
        }
        notes.push(Frame::Note {
            message: format!(
                "{instance} {component}: instance gone; the flight recorder's last {} lines ({reason})",
                kept.len(),
            ),
        });
        merged.extend(kept);
    }
    let mut still_open = Vec::new();
    for ((lines, errs, open), s) in history.into_iter().zip(sessions) {
        merged.extend(lines);
        errors.extend(errs);
        if open {
            still_open.push(s);
        }
    }
    merged.sort_by_key(|l| l.at_ms);
    let sc = scrubber(&e);
    let mut first: Vec<Frame> = notes;
    first.extend(merged.into_iter().map(Frame::Line));
    first.extend(errors);
    for f in &mut first {
        scrub_frame(&sc, f);
    }
    let head = futures::stream::iter(first.into_iter().map(|f| ndjson(&f)));
    if !q.follow {
        return Ok(stream_response(Body::from_stream(head)));
    }
    let live = futures::stream::select_all(still_open.into_iter().map(|s| {
        futures::stream::unfold(s, |mut s| async move {
            let f = s.rx.recv().await?;
            Some((f, s))
        })
        .boxed()
    }));
    let tail = live_frames(live, sc.clone(), IDLE_RELAY_GAP).map(move |b| {
        let _held = &held;
        b
    });
    Ok(stream_response(Body::from_stream(head.chain(tail))))
}

/// How long a logs follow or an exec session lets go without sending anything while its
/// agents say they are idle (each sends `idle` every 10 s): an `idle` frame goes on when
/// nothing went for this long, so a quiet follow or command is not closed as an idle
/// connection (90 s), and however many instances it follows, it sends at most one per gap.
const IDLE_RELAY_GAP: Duration = Duration::from_secs(5);

/// The live part of a logs follow as sent: each frame scrubbed, and the agents' `idle`
/// frames passed on when nothing was sent for `gap`.
fn live_frames(
    live: impl futures::Stream<Item = Frame>,
    sc: Scrubber,
    gap: Duration,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let mut gate = IdleGate::new(gap);
    live.filter_map(move |mut f| {
        let out = gate.pass(&f).then(|| {
            scrub_frame(&sc, &mut f);
            ndjson(&f)
        });
        futures::future::ready(out)
    })
}

/// Lets an agent's `idle` frame through only when nothing went to the client for `gap` (a
/// keep-alive, not a frame per agent every 10 s).
struct IdleGate {
    gap: Duration,
    last_sent: Instant,
}

impl IdleGate {
    fn new(gap: Duration) -> IdleGate {
        IdleGate {
            gap,
            last_sent: Instant::now(),
        }
    }

    /// Whether `f` goes on to the client; if it does, it counts as sent now.
    fn pass(&mut self, f: &Frame) -> bool {
        if matches!(f, Frame::Idle) && self.last_sent.elapsed() < self.gap {
            return false;
        }
        self.last_sent = Instant::now();
        true
    }
}

/// Records the end of an exec session once, however it ends (the person going included).
struct ExecAudit {
    engine: Arc<Engine>,
    group: String,
    instance: String,
    what: String,
    started: Instant,
    done: bool,
}

impl ExecAudit {
    fn end(&mut self, how: &str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.engine.record(vec![NewEvent::new(
            EventKind::Exec,
            format!(
                "{} ended: {how} after {:.1}s",
                self.what,
                self.started.elapsed().as_secs_f64()
            ),
        )
        .group(&self.group)
        .instance(&self.instance)]);
    }
}

impl Drop for ExecAudit {
    fn drop(&mut self) {
        self.end("the client went away (the command was stopped)");
    }
}

/// `POST /v1/exec`: run a command in a component's environment on one instance; its output
/// as NDJSON frames, ending with its exit. Every session is an event, at its start and end.
pub async fn exec(
    State(e): State<Arc<Engine>>,
    Extension(ops): Extension<Arc<Ops>>,
    Extension(caller): Extension<Caller>,
    body: RawBody,
) -> Result<Response, ServerError> {
    let mut req: ExecRequest = crate::api::decode(body)?;
    if req.service.is_empty() {
        // `drover exec INSTANCE`: its service.
        let inst = req.instance.clone().unwrap_or_default();
        let st = e.state();
        match st.instances.get(&inst) {
            Some(i) => {
                req.service = drover_model::GroupId::service_of(&i.record.group).into();
            }
            None => {
                return Err(ServerError::NotFound(format!(
                    "no instance {inst:?} runs; `drover status` lists them"
                )))
            }
        }
    }
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(ServerError::BadRequest(
            "exec needs a command, e.g. [\"printenv\", \"DROVER_VERSION\"]".into(),
        ));
    }
    if req.command.iter().map(|a| a.len() + 1).sum::<usize>() > MAX_COMMAND {
        return Err(ServerError::BadRequest(format!(
            "the command is longer than {MAX_COMMAND} bytes"
        )));
    }
    let service = e
        .state()
        .revision
        .as_ref()
        .and_then(|r| r.fleet.services.get(&req.service))
        .cloned();
    let Some(service) = service else {
        return Err(ServerError::NoService {
            service: req.service.clone(),
            known: None,
        });
    };
    if !service.exec {
        return Err(ServerError::Forbidden(format!(
            "exec is turned off for service {} (exec = false in the fleet file)",
            req.service
        )));
    }
    let (mut live, _) = live_instances(
        &e,
        &req.service,
        req.region.as_deref(),
        req.instance.as_deref(),
        None,
    );
    live.sort();
    let Some((instance, group, _)) = live.into_iter().next() else {
        return Err(ServerError::NotFound(match &req.instance {
            Some(i) => format!("instance {i} of service {} is not running", req.service),
            None => format!("service {} has no instance running", req.service),
        }));
    };
    let component = match &req.component {
        Some(c) => {
            if !service.components.contains_key(c) {
                let names: Vec<&String> = service.components.keys().collect();
                return Err(ServerError::NotFound(format!(
                    "service {} has no component {c:?}; it has {}",
                    req.service,
                    names
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            c.clone()
        }
        None => e
            .state()
            .groups
            .get(&group)
            .and_then(|g| g.plan.components.first())
            .map(|c| c.name.clone())
            .unwrap_or_default(),
    };
    let sc = scrubber(&e);
    let shown = sc
        .scrub(&shell_words(&req.command))
        .chars()
        .take(1000)
        .collect::<String>();
    let what = format!(
        "exec by {} ({}) on {instance} {component}: {shown}",
        caller.id, caller.scope
    );
    e.record(vec![NewEvent::new(
        EventKind::Exec,
        format!("{what}: started"),
    )
    .group(&group)
    .instance(&instance)]);
    let mut audit = ExecAudit {
        engine: e.clone(),
        group,
        instance: instance.clone(),
        what,
        started: Instant::now(),
        done: false,
    };
    let Some(session) = ops.relay.dispatch(&instance, |id| AgentTask::Exec {
        id,
        component: Some(component.clone()),
        command: req.command.clone(),
        tty: req.tty,
        stdin: req.stdin,
        size: req.size,
    }) else {
        audit.end("refused: too many requests waiting for the instance");
        return Err(ServerError::TooManyRequests(format!(
            "instance {instance} has too many requests waiting; try again"
        )));
    };
    // The person's input: only from this token, to this session's agent.
    let first = req.stdin.then(|| {
        ops.relay.open_input(session.id, &caller.id, &instance);
        frame_bytes(&Frame::Session { id: session.id })
    });
    if let Err(Frame::Error { message, .. }) = taken(&session).await {
        audit.end("the agent did not take it");
        return Err(ServerError::Unavailable(message));
    }
    let frames = exec_frames(session, audit, sc, IDLE_RELAY_GAP);
    let head =
        futures::stream::iter(first.map(|b| Ok::<_, std::convert::Infallible>(Bytes::from(b))));
    Ok(stream_response(Body::from_stream(head.chain(frames))))
}

/// An exec session's frames as the client gets them, ending with the command's exit (or an
/// error): secrets scrubbed across output chunks (a possible start of one waits for the
/// next), the agent's `idle` frames passed on when nothing went for `gap` (a command that
/// prints nothing would leave the answer silent, and the connection is closed as idle).
fn exec_frames(
    session: Session,
    audit: ExecAudit,
    sc: Scrubber,
    gap: Duration,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    struct Exec {
        s: Session,
        audit: ExecAudit,
        ended: bool,
        held: [String; 2],
        gate: IdleGate,
    }
    let held_of = |st: Stream| match st {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    };
    let state = Exec {
        s: session,
        audit,
        ended: false,
        held: Default::default(),
        gate: IdleGate::new(gap),
    };
    futures::stream::unfold(state, move |mut x| {
        let sc = sc.clone();
        async move {
            if x.ended {
                return None;
            }
            // What is still held goes out before the end.
            let flush = |x: &mut Exec, out: &mut Vec<u8>| {
                for st in [Stream::Stdout, Stream::Stderr] {
                    let data = sc.finish(&mut x.held[held_of(st)]);
                    if !data.is_empty() {
                        out.extend_from_slice(&frame_bytes(&Frame::Output { stream: st, data }));
                    }
                }
            };
            let mut out = Vec::new();
            loop {
                let Some(mut f) = x.s.rx.recv().await else {
                    x.audit.end("no exit code (the agent's upload broke off)");
                    flush(&mut x, &mut out);
                    let f = Frame::Error {
                        instance: Some(x.s.instance.clone()),
                        message: "the session ended without the command's exit code".into(),
                    };
                    out.extend_from_slice(&frame_bytes(&f));
                    x.ended = true;
                    return Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), x));
                };
                if let Frame::Output { stream, data } = &mut f {
                    *data = sc.scrub_piece(&mut x.held[held_of(*stream)], data);
                    if data.is_empty() {
                        continue;
                    }
                } else {
                    scrub_frame(&sc, &mut f);
                }
                if !x.gate.pass(&f) {
                    continue;
                }
                let end = match &f {
                    Frame::Exit { code, how } => {
                        x.audit.end(&format!("exit code {code} ({how})"));
                        true
                    }
                    Frame::Error { message, .. } => {
                        x.audit.end(&format!("failed: {message}"));
                        true
                    }
                    _ => false,
                };
                if end {
                    flush(&mut x, &mut out);
                    x.ended = true;
                }
                out.extend_from_slice(&frame_bytes(&f));
                return Some((Ok(Bytes::from(out)), x));
            }
        }
    })
}

/// Longest input message accepted (a line of `POST /v1/exec/ID/input`).
const MAX_INPUT: usize = 64 << 10;

/// `POST /v1/exec/{id}/input`: the person's input to an interactive exec (`ExecInput`, one
/// JSON object a line), from the token that started it; forwarded to its agent in order.
pub async fn exec_input(
    Extension(ops): Extension<Arc<Ops>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ServerError> {
    let id: u64 = id.parse().map_err(|_| ServerError::NotANumber {
        what: "session",
        value: id.clone(),
    })?;
    let Some(tx) = ops.relay.input_sender(id, &caller.id) else {
        return Err(ServerError::NotFound(format!(
            "no interactive exec session {id} of this token is open"
        )));
    };
    let mut data = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = data.next().await {
        let chunk =
            chunk.map_err(|e| ServerError::BadRequest(format!("the input broke off: {e}")))?;
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let input: ExecInput = serde_json::from_slice(&line).map_err(|e| {
                ServerError::BadRequest(format!(
                    "an input line is not an exec input ({{\"type\":\"data\",\"data\":\"...\"}}, resize, eof): {e}"
                ))
            })?;
            if tx.send(input).await.is_err() {
                return Err(ServerError::NotFound(format!("session {id} has ended")));
            }
        }
        if buf.len() > MAX_INPUT {
            return Err(ServerError::BadRequest(format!(
                "an input line is longer than {MAX_INPUT} bytes"
            )));
        }
    }
    Ok(Json(serde_json::json!({})).into_response())
}

/// `GET /v1/agent/tasks/{id}/input`: an interactive exec's input for its agent, NDJSON as it
/// comes, until the session ends; an empty line when there was none for a while.
pub async fn agent_input(
    State(e): State<Arc<Engine>>,
    Extension(ops): Extension<Arc<Ops>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    Extension(guards): Extension<Arc<Guards>>,
    Path(id): Path<String>,
    query: Result<Query<InstanceParam>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let (id, q) = agent_task(&e, &caller, &bound, &id, query)?;
    let Some(rx) = ops.relay.take_input(id, &q.instance) else {
        return Err(ServerError::NotFound(format!(
            "no interactive task {id} open for instance {}",
            q.instance
        )));
    };
    let body = input_lines(rx, guards.connections.keep_alive());
    Ok(stream_response(Body::from_stream(body)))
}

/// A session's input as its agent reads it: a line per input, and an empty line (agents skip
/// lines that are not an input) when none came for `keep_alive`, so that a person who types
/// nothing for a while does not leave the download silent: the idle timeout (90 s) would
/// close it, and the command's input with it (a shell would exit).
fn input_lines(
    rx: tokio::sync::mpsc::Receiver<ExecInput>,
    keep_alive: Duration,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    futures::stream::unfold(rx, move |mut rx| async move {
        let v = match tokio::time::timeout(keep_alive, rx.recv()).await {
            Ok(Some(input)) => {
                let mut v = serde_json::to_vec(&input).unwrap_or_default();
                v.push(b'\n');
                v
            }
            Ok(None) => return None,
            Err(_) => b"\n".to_vec(),
        };
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(v)), rx))
    })
}

/// A command as a person would type it (quoted where needed), for events.
fn shell_words(cmd: &[String]) -> String {
    cmd.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksQuery {
    instance: String,
    #[serde(default)]
    wait_ms: u64,
}

/// `GET /v1/agent/tasks`: an agent's long-poll for logs and exec tasks.
pub async fn agent_tasks(
    State(e): State<Arc<Engine>>,
    Extension(ops): Extension<Arc<Ops>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    Extension(guards): Extension<Arc<Guards>>,
    query: Result<Query<TasksQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!("{}; parameters: instance, wait_ms", r.body_text()))
    })?;
    check_instance(&e, &caller, &bound, &q.instance)?;
    if !e.state().instances.contains_key(&q.instance) {
        return Err(ServerError::NoInstance(q.instance));
    }
    let _held = hold_poll(&guards, &caller, &bound)?;
    let wait = Duration::from_millis(q.wait_ms.min(60_000));
    let tasks = ops.relay.take(&q.instance, wait).await;
    Ok(Json(drover_model::logs::TasksReply { tasks }).into_response())
}

/// An agent's call about its task `id`: the instance it names, which its token may speak
/// for, and the task's number.
fn agent_task(
    e: &Engine,
    caller: &Caller,
    bound: &BoundInstance,
    id: &str,
    query: Result<Query<InstanceParam>, axum::extract::rejection::QueryRejection>,
) -> Result<(u64, InstanceParam), ServerError> {
    let Query(q) = query
        .map_err(|r| ServerError::BadRequest(format!("{}; parameters: instance", r.body_text())))?;
    check_instance(e, caller, bound, &q.instance)?;
    let id: u64 = id.parse().map_err(|_| ServerError::NotANumber {
        what: "task",
        value: id.to_string(),
    })?;
    Ok((id, q))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceParam {
    instance: String,
}

/// `POST /v1/agent/tasks/{id}`: a task's frames, streamed by its agent; ends when the upload
/// does, or closes it when nobody reads any more.
pub async fn agent_upload(
    State(e): State<Arc<Engine>>,
    Extension(ops): Extension<Arc<Ops>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    Path(id): Path<String>,
    query: Result<Query<InstanceParam>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ServerError> {
    let (id, q) = agent_task(&e, &caller, &bound, &id, query)?;
    let Some(tx) = ops.relay.sink(id, &q.instance) else {
        return Err(ServerError::NotFound(format!(
            "no task {id} open for instance {}",
            q.instance
        )));
    };
    let mut data = body.into_data_stream();
    let mut buf: Vec<u8> = Vec::new();
    let pump = async {
        while let Some(chunk) = data.next().await {
            let Ok(chunk) = chunk else { break };
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let Ok(f) = serde_json::from_slice::<Frame>(&line) else {
                    continue;
                };
                if tx.send(f).await.is_err() {
                    return;
                }
            }
            if buf.len() > MAX_FRAME {
                // A line that never ends: drop it.
                buf.clear();
            }
        }
    };
    tokio::select! {
        _ = pump => {}
        _ = tx.closed() => {}
    }
    Ok(Json(serde_json::json!({})).into_response())
}

/// `POST /v1/agent/flight`: the last lines of a component that died, or of an instance that
/// leaves; kept within the recorder's bounds, and an event says so.
pub async fn agent_flight(
    State(e): State<Arc<Engine>>,
    Extension(ops): Extension<Arc<Ops>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    body: RawBody,
) -> Result<Response, ServerError> {
    let mut rec: FlightRecord = crate::api::decode(body)?;
    check_group(
        &caller,
        &rec.group,
        &format!("the record's group {}", rec.group),
    )?;
    check_instance(&e, &caller, &bound, &rec.instance)?;
    if let Some(i) = e.state().instances.get(&rec.instance) {
        if i.record.group != rec.group || i.record.generation != rec.generation {
            return Err(ServerError::GenerationMismatch {
                instance: rec.instance,
                what: "group or generation",
            });
        }
    }
    // Within the bound (the newest lines kept), each line as the agent's own.
    let mut total = 0usize;
    let mut keep = rec.lines.len();
    for (k, l) in rec.lines.iter().enumerate().rev() {
        total += l.line.len() + 64;
        if total > crate::relay::FLIGHT_MAX {
            break;
        }
        keep = k;
    }
    rec.lines.drain(..keep);
    let sc = scrubber(&e);
    sc.scrub_in_place(&mut rec.reason);
    drover_model::api::truncate_text(&mut rec.reason, 1000);
    for l in &mut rec.lines {
        l.instance = rec.instance.clone();
        l.component = rec.component.clone();
        sc.scrub_in_place(&mut l.line);
    }
    let now = now_ms();
    rec.at_ms = now;
    let last: Vec<&str> = rec
        .lines
        .iter()
        .rev()
        .take(5)
        .map(|l| l.line.as_str())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let service = drover_model::GroupId::service_of(&rec.group).to_string();
    let mut message = format!(
        "{} {}: {}; the flight recorder kept its last {} lines (`drover logs {service} --instance {}`)",
        rec.instance,
        rec.component,
        rec.reason,
        rec.lines.len(),
        rec.instance
    );
    if !last.is_empty() {
        message.push_str(":\n");
        message.push_str(&last.join("\n"));
    }
    let (group, instance) = (rec.group.clone(), rec.instance.clone());
    let ops2 = ops.clone();
    tokio::task::spawn_blocking(move || ops2.flights.keep(&rec, now))
        .await
        .map_err(ServerError::FlightRecorder)?
        .map_err(|err| ServerError::BadRequest(format!("flight record not kept: {err}")))?;
    e.record(vec![NewEvent::new(EventKind::Output, message)
        .group(group)
        .instance(instance)]);
    Ok(Json(serde_json::json!({})).into_response())
}

/// `POST /v1/agent/tail`: the new lines of an instance's components since its last batch,
/// added to the flight recorder's copy of each component's tail (no event: this is routine).
pub async fn agent_tail(
    State(e): State<Arc<Engine>>,
    Extension(ops): Extension<Arc<Ops>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    body: RawBody,
) -> Result<Response, ServerError> {
    let batch: TailBatch = crate::api::decode(body)?;
    check_group(
        &caller,
        &batch.group,
        &format!("the batch's group {}", batch.group),
    )?;
    check_instance(&e, &caller, &bound, &batch.instance)?;
    let components: Vec<String> = {
        let st = e.state();
        let Some(i) = st.instances.get(&batch.instance) else {
            return Err(ServerError::NoInstance(batch.instance));
        };
        if i.record.group != batch.group || i.record.generation != batch.generation {
            return Err(ServerError::GenerationMismatch {
                instance: batch.instance,
                what: "group or generation",
            });
        }
        st.groups
            .get(&batch.group)
            .and_then(|g| {
                (g.plan.generation == batch.generation)
                    .then(|| g.plan.components.iter().map(|c| c.name.clone()).collect())
            })
            .unwrap_or_default()
    };
    let sc = scrubber(&e);
    let now = now_ms();
    let ops2 = ops.clone();
    tokio::task::spawn_blocking(move || {
        for mut part in batch.components {
            // A component of its plan only (when the plan at hand is the instance's).
            if !components.is_empty() && !components.contains(&part.component) {
                continue;
            }
            let cut = drover_model::logs::flight_cut(
                &part.lines,
                drover_model::logs::FLIGHT_BYTES_MAX,
                |l| l.line.len(),
            );
            part.lines.drain(..cut);
            for l in &mut part.lines {
                l.instance = batch.instance.clone();
                l.component = part.component.clone();
                drover_model::api::truncate_text(&mut l.line, drover_model::logs::MAX_LINE);
                sc.scrub_in_place(&mut l.line);
            }
            let head = FlightRecord {
                instance: batch.instance.clone(),
                group: batch.group.clone(),
                generation: batch.generation,
                component: part.component,
                reason: String::new(),
                at_ms: now,
                lines: Vec::new(),
            };
            ops2.flights
                .append_tail(&head, part.reset, part.lines, now)
                .map_err(|err| ServerError::BadRequest(format!("tail not kept: {err}")))?;
        }
        Ok::<(), ServerError>(())
    })
    .await
    .map_err(ServerError::FlightRecorder)??;
    Ok(Json(serde_json::json!({})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(frames: Vec<Frame>, gap: Duration) -> Vec<String> {
        let out = futures::executor::block_on(
            live_frames(
                futures::stream::iter(frames),
                Scrubber::for_fleet(None),
                gap,
            )
            .collect::<Vec<_>>(),
        );
        out.into_iter()
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect()
    }

    /// A quiet logs follow passes its agents' `idle` frames on (else the connection is closed
    /// as idle after 90 s), at most one per gap: none right after another frame.
    #[test]
    fn a_quiet_logs_follow_passes_idle_frames_on() {
        let note = || Frame::Note {
            message: "n".into(),
        };
        assert_eq!(
            texts(vec![Frame::Idle, note(), Frame::Idle], Duration::ZERO),
            [
                "{\"type\":\"idle\"}\n",
                "{\"type\":\"note\",\"message\":\"n\"}\n",
                "{\"type\":\"idle\"}\n"
            ]
        );
        // Many instances, or lines going: within the gap, nothing more is needed.
        assert_eq!(
            texts(
                vec![note(), Frame::Idle, Frame::Idle],
                Duration::from_secs(3600)
            ),
            ["{\"type\":\"note\",\"message\":\"n\"}\n"]
        );
    }
    /// An exec session's frames as the client gets them: `frames` as the agent uploads them.
    async fn exec_texts(frames: Vec<Frame>, gap: Duration) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let e = crate::testing::engine(dir.path(), crate::testing::Watched::open(dir.path()));
        let relay = Relay::default();
        let session = relay
            .dispatch("i-000001", |id| AgentTask::Exec {
                id,
                component: None,
                command: vec!["sleep".into(), "120".into()],
                tty: false,
                stdin: false,
                size: None,
            })
            .unwrap();
        let tx = relay.sink(session.id, "i-000001").unwrap();
        for f in frames {
            tx.send(f).await.unwrap();
        }
        let audit = ExecAudit {
            engine: e,
            group: "web/local".into(),
            instance: "i-000001".into(),
            what: "exec".into(),
            started: Instant::now(),
            done: false,
        };
        exec_frames(session, audit, Scrubber::for_fleet(None), gap)
            .map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
            .collect()
            .await
    }

    /// A command that prints nothing: its agent's `idle` frames go on to the client (else the
    /// connection is closed as idle after 90 s), at most one per gap; the exit still ends it.
    #[tokio::test]
    async fn a_quiet_exec_passes_idle_frames_on() {
        let exit = || Frame::Exit {
            code: 0,
            how: "exit status 0".into(),
        };
        let idle = "{\"type\":\"idle\"}\n";
        let exit_line = "{\"type\":\"exit\",\"code\":0,\"how\":\"exit status 0\"}\n";
        assert_eq!(
            exec_texts(vec![Frame::Idle, Frame::Idle, exit()], Duration::ZERO).await,
            [idle, idle, exit_line]
        );
        // Within the gap of the session's start (or of the last frame), none.
        assert_eq!(
            exec_texts(
                vec![Frame::Idle, Frame::Idle, exit()],
                Duration::from_secs(3600)
            )
            .await,
            [exit_line]
        );
    }
    /// The next item of `lines` as text, within 2 s.
    async fn next_line(
        lines: &mut (impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Unpin),
    ) -> Option<String> {
        let b = tokio::time::timeout(Duration::from_secs(2), lines.next())
            .await
            .expect("a line within the keep-alive");
        b.map(|b| String::from_utf8(b.unwrap().to_vec()).unwrap())
    }

    /// An interactive session's input to its agent: an empty line when the person typed
    /// nothing for the keep-alive (else the download is closed as idle after 90 s, and the
    /// command's input with it), the input as it comes, the end with the session.
    #[tokio::test]
    async fn a_quiet_exec_input_sends_keep_alives() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let lines = input_lines(rx, Duration::from_millis(200));
        futures::pin_mut!(lines);
        let mut got = Vec::new();
        got.push(next_line(&mut lines).await);
        tx.send(ExecInput::Data {
            data: "ls\n".into(),
        })
        .await
        .unwrap();
        got.push(next_line(&mut lines).await);
        got.push(next_line(&mut lines).await);
        drop(tx);
        got.push(next_line(&mut lines).await);
        let want = [
            Some("\n"),
            Some("{\"type\":\"data\",\"data\":\"ls\\n\"}\n"),
            Some("\n"),
            None,
        ];
        assert_eq!(got, want.map(|w| w.map(String::from)));
    }
}
