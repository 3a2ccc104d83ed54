//! The HTTP/JSON API (axum): apply, revisions, status, events (with follow), agent endpoints.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_model::api::{
    ApiError, ApplyRequest, ConnectionsReply, DeployRequest, Heartbeat, RollbackRequest,
};
use drover_model::EventKind;
use drover_store::EventFilter;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::engine::Engine;
use crate::ServerError;

/// Largest request body accepted (a fleet file of thousands of services fits).
pub const MAX_BODY: usize = 2 * 1024 * 1024;

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        )
        .route("/v1/apply", post(apply))
        .route("/v1/revisions", get(revisions))
        .route("/v1/revisions/{number}", get(revision))
        .route("/v1/status", get(status))
        .route("/v1/events", get(events))
        .route("/v1/deploy", post(deploy))
        .route("/v1/rollback", post(rollback))
        .route("/v1/scale", post(scale))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/permit", get(permit))
        .route("/v1/agent/connections", get(connections))
        .route("/v1/plans/{service}/{region}/{generation}", get(plan))
        .route("/metrics", get(metrics))
        .fallback(|| async { ServerError::NotFound("no such endpoint; see docs/api.md".into()) })
        .method_not_allowed_fallback(|| async {
            ServerError::MethodNotAllowed(
                "this endpoint does not take that method; see docs/api.md".into(),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(engine)
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ServerError::InvalidFleet(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_fleet"),
            ServerError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ServerError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ServerError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ServerError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ServerError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let errors = match &self {
            ServerError::InvalidFleet(e) => e.0.clone(),
            _ => Vec::new(),
        };
        let body = ApiError {
            code: code.to_string(),
            message: self.to_string(),
            errors,
        };
        (status, Json(body)).into_response()
    }
}

type Body2 = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// Decode a JSON body with an error that says what is wrong and where.
fn decode<T: DeserializeOwned>(body: Body2) -> Result<T, ServerError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServerError::TooLarge(format!(
                "request body is larger than the limit of {} bytes",
                MAX_BODY
            ))
        } else {
            ServerError::BadRequest(r.body_text())
        }
    })?;
    let body = &body;
    serde_json::from_slice(body).map_err(|e| {
        ServerError::BadRequest(format!(
            "invalid JSON body at line {} column {}: {e}; see docs/api.md",
            e.line(),
            e.column()
        ))
    })
}

async fn apply(State(e): State<Arc<Engine>>, body: Body2) -> Result<Response, ServerError> {
    let req: ApplyRequest = decode(body)?;
    let resp = e.apply(req).await?;
    Ok(Json(resp).into_response())
}

async fn deploy(State(e): State<Arc<Engine>>, body: Body2) -> Result<Response, ServerError> {
    let req: DeployRequest = decode(body)?;
    Ok(Json(e.deploy(req).await?).into_response())
}

async fn scale(State(e): State<Arc<Engine>>, body: Body2) -> Result<Response, ServerError> {
    let req: drover_model::api::ScaleRequest = decode(body)?;
    Ok(Json(e.scale(req).await?).into_response())
}

async fn rollback(State(e): State<Arc<Engine>>, body: Body2) -> Result<Response, ServerError> {
    let req: RollbackRequest = decode(body)?;
    Ok(Json(e.rollback(req).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermitQuery {
    instance: String,
    #[serde(default)]
    wait_ms: u64,
}

/// The agent's long-poll for its permit; answers at once when one is granted.
async fn permit(
    State(e): State<Arc<Engine>>,
    query: Result<Query<PermitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!("{}; parameters: instance, wait_ms", r.body_text()))
    })?;
    let wait = std::time::Duration::from_millis(q.wait_ms.min(60_000));
    Ok(Json(e.wait_permit(&q.instance, wait).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceQuery {
    instance: String,
}

async fn connections(
    State(e): State<Arc<Engine>>,
    query: Result<Query<InstanceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query
        .map_err(|r| ServerError::BadRequest(format!("{}; parameters: instance", r.body_text())))?;
    Ok(Json(ConnectionsReply {
        open: e.connections(&q.instance)?,
    })
    .into_response())
}

async fn revisions(State(e): State<Arc<Engine>>) -> Result<Response, ServerError> {
    Ok(Json(e.store.revisions()?).into_response())
}

async fn revision(
    State(e): State<Arc<Engine>>,
    Path(number): Path<String>,
) -> Result<Response, ServerError> {
    let n: u64 = number
        .parse()
        .map_err(|_| ServerError::BadRequest(format!("revision {number:?} is not a number")))?;
    match e.store.revision(n)? {
        Some(r) => Ok(Json(r).into_response()),
        None => Err(ServerError::NotFound(format!(
            "no revision {n}; `drover history` lists them"
        ))),
    }
}

async fn status(State(e): State<Arc<Engine>>) -> Json<drover_model::api::FleetStatus> {
    Json(e.status())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    group: Option<String>,
    instance: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    follow: bool,
}

async fn events(
    State(e): State<Arc<Engine>>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!(
            "{}; allowed parameters: after, limit, group, instance, kind, follow",
            r.body_text()
        ))
    })?;
    let kind = match &q.kind {
        Some(k) => Some(EventKind::parse(k).ok_or_else(|| {
            ServerError::BadRequest(format!(
                "unknown event kind {k:?}; see `drover events --help` for the kinds"
            ))
        })?),
        None => None,
    };
    let filter = EventFilter {
        after_seq: q.after,
        limit: q
            .limit
            .unwrap_or(if q.follow { 1000 } else { 10_000 })
            .min(100_000),
        group: q.group.clone(),
        instance: q.instance.clone(),
        kind,
    };
    if !q.follow {
        return Ok(Json(e.store.events(&filter)?).into_response());
    }
    // Follow: subscribe first, then send what is stored, then stream new ones (deduplicated by seq).
    let mut rx = e.events_tx.subscribe();
    // Every stored event after `after` (page by page), then the live ones.
    let mut stored = Vec::new();
    let mut page = EventFilter {
        limit: 1000,
        ..filter.clone()
    };
    loop {
        let got = e.store.events(&page)?;
        let n = got.len();
        if let Some(last) = got.last() {
            page.after_seq = last.seq;
        }
        stored.extend(got);
        if n < page.limit || stored.len() >= 1_000_000 {
            break;
        }
    }
    let mut last = stored.last().map(|ev| ev.seq).unwrap_or(q.after);
    let backlog = futures::stream::iter(stored.into_iter().map(line));
    let live = async_stream(move |tx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => {
                    if ev.seq <= last {
                        continue;
                    }
                    last = ev.seq;
                    let keep = filter
                        .group
                        .as_ref()
                        .is_none_or(|g| ev.group.as_ref() == Some(g))
                        && filter
                            .instance
                            .as_ref()
                            .is_none_or(|i| ev.instance.as_ref() == Some(i))
                        && filter.kind.is_none_or(|k| ev.kind == k);
                    if keep && tx.send(line(ev)).await.is_err() {
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    });
    let body = Body::from_stream(backlog.chain(live));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

fn line(ev: drover_model::Event) -> Result<Bytes, Infallible> {
    let mut v = serde_json::to_vec(&ev).unwrap_or_default();
    v.push(b'\n');
    Ok(Bytes::from(v))
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) })
}

async fn heartbeat(State(e): State<Arc<Engine>>, body: Body2) -> Result<Response, ServerError> {
    let hb: Heartbeat = decode(body)?;
    if hb.instance.is_empty() || hb.instance.len() > 64 || hb.components.len() > 256 {
        return Err(ServerError::BadRequest(
            "heartbeat needs an instance id (at most 64 characters) and at most 256 components"
                .into(),
        ));
    }
    Ok(Json(e.heartbeat(hb)?).into_response())
}

async fn plan(
    State(e): State<Arc<Engine>>,
    Path((service, region, generation)): Path<(String, String, String)>,
) -> Result<Response, ServerError> {
    let g: u64 = generation.parse().map_err(|_| {
        ServerError::BadRequest(format!("generation {generation:?} is not a number"))
    })?;
    let group = drover_model::GroupId::new(&service, &region).0;
    match e.plan(&group, g)? {
        Some(p) => Ok(Json(p).into_response()),
        None => Err(ServerError::NotFound(format!(
            "no plan generation {g} for group {group}"
        ))),
    }
}

/// Prometheus text: per listener and per target counters of the built-in balancer.
async fn metrics(State(e): State<Arc<Engine>>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    let stats = e.balancer_stats();
    let _ = writeln!(out, "# TYPE drover_lb_connections_total counter");
    for s in &stats {
        let _ = writeln!(
            out,
            "drover_lb_connections_total{{listener=\"{}\"}} {}",
            s.name, s.accepted
        );
    }
    let _ = writeln!(out, "# TYPE drover_lb_active_connections gauge");
    for s in &stats {
        let _ = writeln!(
            out,
            "drover_lb_active_connections{{listener=\"{}\"}} {}",
            s.name, s.active
        );
        for t in &s.targets {
            let _ = writeln!(
                out,
                "drover_lb_active_connections{{listener=\"{}\",target=\"{}\"}} {}",
                s.name, t.id, t.active
            );
        }
    }
    let _ = writeln!(out, "# TYPE drover_lb_connect_failures_total counter");
    for s in &stats {
        for t in &s.targets {
            let _ = writeln!(
                out,
                "drover_lb_connect_failures_total{{listener=\"{}\",target=\"{}\"}} {}",
                s.name, t.id, t.connect_failures
            );
        }
    }
    let _ = writeln!(out, "# TYPE drover_lb_bytes_total counter");
    for s in &stats {
        let _ = writeln!(
            out,
            "drover_lb_bytes_total{{listener=\"{}\",direction=\"in\"}} {}",
            s.name, s.bytes_in
        );
        let _ = writeln!(
            out,
            "drover_lb_bytes_total{{listener=\"{}\",direction=\"out\"}} {}",
            s.name, s.bytes_out
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
