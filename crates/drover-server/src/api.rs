//! The HTTP/JSON API (axum): apply, revisions, status, events (with follow), agent endpoints.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use drover_model::api::{
    limits, ApiError, ApplyRequest, ConnectionsReply, DeployRequest, Heartbeat, RollbackRequest,
};
use drover_model::EventKind;
use drover_store::EventFilter;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::auth::{check_group, BoundInstance, Caller};
use crate::engine::Engine;
use crate::guard::{Guards, Held, Kind};
use crate::ServerError;

/// Largest request body accepted (a fleet file of thousands of services fits).
pub const MAX_BODY: usize = 2 * 1024 * 1024;

/// Deepest nesting of arrays and objects accepted in a JSON body (real requests need 4).
pub const MAX_JSON_DEPTH: usize = 32;

/// Most events one `GET /v1/events` answers with (`limit` is capped to it; 0 is it).
pub const MAX_EVENTS_PAGE: usize = 10_000;

/// A store read, on a blocking thread: never on the async workers that answer heartbeats.
pub(crate) async fn read<T, F>(e: &Engine, f: F) -> Result<T, ServerError>
where
    T: Send + 'static,
    F: FnOnce(&dyn drover_store::Store) -> Result<T, drover_store::StoreError> + Send + 'static,
{
    let store = e.store.clone();
    tokio::task::spawn_blocking(move || f(&*store))
        .await
        .map_err(ServerError::StoreRead)?
        .map_err(ServerError::from)
}

pub fn router(engine: Arc<Engine>, ui: Arc<crate::ui::Ui>, guards: Arc<Guards>) -> Router {
    Router::new()
        .merge(crate::ui::routes())
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
        .route("/v1/destroy", post(destroy))
        .route("/v1/scale", post(scale))
        .route("/v1/rollout", post(rollout))
        .route("/v1/schedules", get(list_schedules).post(create_schedule))
        .route("/v1/schedules/{id}", axum::routing::delete(cancel_schedule))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/permit", get(permit))
        .route("/v1/agent/connections", get(connections))
        .route("/v1/agent/exit", post(exit))
        .route("/v1/agent/peers", get(peers))
        .route("/v1/logs", get(crate::ops::logs))
        .route("/v1/exec", post(crate::ops::exec))
        .route("/v1/exec/{id}/input", post(crate::ops::exec_input))
        .route("/v1/agent/tasks", get(crate::ops::agent_tasks))
        .route("/v1/agent/tasks/{id}", post(crate::ops::agent_upload))
        .route("/v1/agent/flight", post(crate::ops::agent_flight))
        .route("/v1/agent/tail", post(crate::ops::agent_tail))
        .route("/v1/agent/tasks/{id}/input", get(crate::ops::agent_input))
        .route("/v1/lb/config", get(lb_config))
        .route("/v1/lb/report", post(lb_report))
        .route("/v1/plans/{service}/{region}/{generation}", get(plan))
        .route("/metrics", get(metrics))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .fallback(|| async { ServerError::NotFound("no such endpoint; see docs/api.md".into()) })
        .method_not_allowed_fallback(|| async {
            ServerError::MethodNotAllowed(
                "this endpoint does not take that method; see docs/api.md".into(),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(Extension(guards))
        .layer(Extension(Arc::new(crate::ops::Ops::new(
            &engine.factory.cfg.data_dir,
        ))))
        // Outermost: nobody's body is read before their token is checked.
        .layer(axum::middleware::from_fn_with_state(
            engine.clone(),
            crate::auth::layer,
        ))
        // Outside the auth layer: it finds the dashboard's sessions here.
        .layer(Extension(ui))
        .with_state(engine)
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ServerError::InvalidFleet(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_fleet"),
            ServerError::BadRequest(_)
            | ServerError::NotANumber { .. }
            | ServerError::GenerationMismatch { .. }
            | ServerError::NotOneOffSchedule(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ServerError::NotFound(_)
            | ServerError::NoService { .. }
            | ServerError::NoComponent { .. }
            | ServerError::NoRegion { .. }
            | ServerError::NoInstance(_)
            | ServerError::NoGroup(_)
            | ServerError::NoRevision(_)
            | ServerError::NoSchedule(_)
            | ServerError::NoToken(_) => (StatusCode::NOT_FOUND, "not_found"),
            ServerError::Conflict(_)
            | ServerError::NothingApplied { .. }
            | ServerError::NothingToRollBack { .. }
            | ServerError::RolloutNotOpen { .. }
            | ServerError::ScheduleCancelled(_)
            | ServerError::ScheduleEnded(_)
            | ServerError::LastAdminToken(_)
            | ServerError::IngressInUse { .. }
            | ServerError::DataDirInUse { .. } => (StatusCode::CONFLICT, "conflict"),
            ServerError::MethodNotAllowed(_) => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ServerError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ServerError::TooManyRequests(_)
            | ServerError::TooManyFollows { .. }
            | ServerError::TooManyPolls { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_requests")
            }
            ServerError::Unauthorized(_)
            | ServerError::TokenNeeded
            | ServerError::NotBearer
            | ServerError::UnknownToken
            | ServerError::TokenNotCreated
            | ServerError::TokenRevoked { .. }
            | ServerError::SessionTokenRevoked { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ServerError::Forbidden(_)
            | ServerError::NotAllowed { .. }
            | ServerError::OtherGroup { .. }
            | ServerError::NotThisInstance => (StatusCode::FORBIDDEN, "forbidden"),
            ServerError::Unavailable(_) | ServerError::LeaseLost | ServerError::NotLeading => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            // etcd unreachable or without quorum: what to check is in the message.
            ServerError::Store(e) if e.is_unavailable() => {
                (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
            }
            // A deposed leader's write, refused by the store's fencing: ask the leader.
            ServerError::Store(drover_store::StoreError::Fenced(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_leader")
            }
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

pub(crate) type RawBody = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// Decode a JSON body with an error that says what is wrong and where.
pub(crate) fn decode<T: DeserializeOwned>(body: RawBody) -> Result<T, ServerError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServerError::BodyTooLarge { limit: MAX_BODY }
        } else {
            ServerError::BadRequest(r.body_text())
        }
    })?;
    decode_body(&body)
}

/// Decode a JSON request body: nesting limited to [`MAX_JSON_DEPTH`], errors located. Never
/// panics, whatever the bytes (fuzzed in `tests/fuzz_api.rs`).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ServerError> {
    let depth = json_depth(body);
    if depth > MAX_JSON_DEPTH {
        return Err(ServerError::BadRequest(format!(
            "JSON body nested deeper than {MAX_JSON_DEPTH} levels; see docs/api.md"
        )));
    }
    serde_json::from_slice(body).map_err(|e| {
        ServerError::BadRequest(format!(
            "invalid JSON body at line {} column {}: {e}; see docs/api.md",
            e.line(),
            e.column()
        ))
    })
}

/// The deepest nesting of `[` and `{` in a JSON text (outside strings); no allocation, no
/// recursion, whatever the input.
pub fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

async fn apply(State(e): State<Arc<Engine>>, body: RawBody) -> Result<Response, ServerError> {
    let req: ApplyRequest = decode(body)?;
    // The request's own secrets (even if it does not validate) and the current ones.
    let sc = drover_model::secret::Scrubber::new(
        drover_model::secret::secret_values_in_text(&req.toml)
            .into_iter()
            .chain(scrubber_values(&e)),
    );
    let resp = e.apply(req).await.map_err(|err| scrub_error(err, &sc))?;
    Ok(Json(resp).into_response())
}

fn scrubber_values(e: &Engine) -> Vec<String> {
    let st = e.state();
    st.revision
        .as_ref()
        .map(|r| drover_model::secret::secret_values(&r.fleet))
        .unwrap_or_default()
}

/// An error with every known secret value replaced in its message(s).
fn scrub_error(err: ServerError, sc: &drover_model::secret::Scrubber) -> ServerError {
    let s = |m: String| sc.scrub(&m).into_owned();
    match err {
        ServerError::InvalidFleet(mut errors) => {
            for fe in &mut errors.0 {
                sc.scrub_in_place(&mut fe.message);
                sc.scrub_in_place(&mut fe.field);
            }
            ServerError::InvalidFleet(errors)
        }
        ServerError::BadRequest(m) => ServerError::BadRequest(s(m)),
        ServerError::NotFound(m) => ServerError::NotFound(s(m)),
        ServerError::Conflict(m) => ServerError::Conflict(s(m)),
        ServerError::Internal(m) => ServerError::Internal(s(m)),
        other => other,
    }
}

async fn deploy(State(e): State<Arc<Engine>>, body: RawBody) -> Result<Response, ServerError> {
    let req: DeployRequest = decode(body)?;
    let sc = scrubber(&e);
    Ok(Json(e.deploy(req).await.map_err(|err| scrub_error(err, &sc))?).into_response())
}

async fn scale(State(e): State<Arc<Engine>>, body: RawBody) -> Result<Response, ServerError> {
    let req: drover_model::api::ScaleRequest = decode(body)?;
    Ok(Json(e.scale(req).await?).into_response())
}

async fn create_schedule(
    State(e): State<Arc<Engine>>,
    body: RawBody,
) -> Result<Response, ServerError> {
    let req: drover_model::api::ScheduleRequest = decode(body)?;
    Ok((StatusCode::CREATED, Json(e.schedule_once(req).await?)).into_response())
}

async fn list_schedules(State(e): State<Arc<Engine>>) -> Result<Response, ServerError> {
    Ok(Json(e.list_schedules()).into_response())
}

async fn cancel_schedule(
    State(e): State<Arc<Engine>>,
    Path(id): Path<String>,
) -> Result<Response, ServerError> {
    Ok(Json(e.cancel_schedule(&id).await?).into_response())
}

async fn rollback(State(e): State<Arc<Engine>>, body: RawBody) -> Result<Response, ServerError> {
    let req: RollbackRequest = decode(body)?;
    let sc = scrubber(&e);
    Ok(Json(e.rollback(req).await.map_err(|err| scrub_error(err, &sc))?).into_response())
}

async fn destroy(State(e): State<Arc<Engine>>, body: RawBody) -> Result<Response, ServerError> {
    let req: drover_model::api::DestroyRequest = decode(body)?;
    let sc = scrubber(&e);
    Ok(Json(e.destroy(req).await.map_err(|err| scrub_error(err, &sc))?).into_response())
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
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    Extension(guards): Extension<Arc<Guards>>,
    query: Result<Query<PermitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!("{}; parameters: instance, wait_ms", r.body_text()))
    })?;
    check_instance(&e, &caller, &bound, &q.instance)?;
    let _held = hold_poll(&guards, &caller, &bound)?;
    let wait = std::time::Duration::from_millis(q.wait_ms.min(60_000));
    Ok(Json(e.wait_permit(&q.instance, wait).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersQuery {
    instance: String,
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    version: u64,
    #[serde(default)]
    wait_ms: u64,
}

/// `GET /v1/agent/peers`: service discovery's long-poll; `version` is what the agent applied.
async fn peers(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    Extension(guards): Extension<Arc<Guards>>,
    query: Result<Query<PeersQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!(
            "{}; parameters: instance, epoch, version, wait_ms",
            r.body_text()
        ))
    })?;
    check_instance(&e, &caller, &bound, &q.instance)?;
    let _held = hold_poll(&guards, &caller, &bound)?;
    let wait = std::time::Duration::from_millis(q.wait_ms.min(60_000));
    Ok(Json(e.wait_peers(&q.instance, &q.epoch, q.version, wait).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LbConfigQuery {
    #[serde(default)]
    epoch: String,
    #[serde(default)]
    version: u64,
    #[serde(default)]
    wait_ms: u64,
}

/// `GET /v1/lb/config`: the balancers' long-poll.
async fn lb_config(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Extension(guards): Extension<Arc<Guards>>,
    query: Result<Query<LbConfigQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!(
            "{}; parameters: epoch, version, wait_ms",
            r.body_text()
        ))
    })?;
    let _held = hold_poll(&guards, &caller, &BoundInstance(None))?;
    let wait = std::time::Duration::from_millis(q.wait_ms.min(60_000));
    Ok(Json(e.balancers.wait_config(&q.epoch, q.version, wait).await).into_response())
}

/// `POST /v1/lb/report`: a balancer's connection counts.
async fn lb_report(State(e): State<Arc<Engine>>, body: RawBody) -> Result<Response, ServerError> {
    let report: drover_model::api::LbReport = decode(body)?;
    if report.lb.is_empty() || report.lb.len() > 128 || report.connections.len() > 10_000 {
        return Err(ServerError::BadRequest(
            "a report names its balancer (lb: at most 128 characters) and at most 10000 listeners"
                .into(),
        ));
    }
    let lb = report.lb.clone();
    let errors = e.balancers.report(report);
    e.record(
        errors
            .into_iter()
            .map(|(listener, err)| {
                drover_model::NewEvent::new(
                    drover_model::EventKind::Balancer,
                    format!("balancer {lb} cannot open the ingress: {err}"),
                )
                .group(listener)
            })
            .collect(),
    );
    Ok(Json(serde_json::json!({})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceQuery {
    instance: String,
}

async fn connections(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    query: Result<Query<InstanceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query
        .map_err(|r| ServerError::BadRequest(format!("{}; parameters: instance", r.body_text())))?;
    check_instance(&e, &caller, &bound, &q.instance)?;
    Ok(Json(ConnectionsReply {
        open: e.connections(&q.instance)?,
    })
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitRequest {
    instance: String,
    /// Why it ended, for the logs (at most 200 bytes).
    #[serde(default)]
    status: String,
}

/// `POST /v1/agent/exit`: the agent of an instance of a `sim` region says its instance ended
/// (what a process exit is to the `local` provider). Instances of other providers end when
/// their provider sees them end: 409.
async fn exit(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    body: RawBody,
) -> Result<Response, ServerError> {
    let req: ExitRequest = decode(body)?;
    if req.status.len() > 200 {
        return Err(ServerError::BadRequest(
            "exit: status is at most 200 bytes".into(),
        ));
    }
    check_instance(&e, &caller, &bound, &req.instance)?;
    let region = e
        .state()
        .instances
        .get(&req.instance)
        .map(|i| crate::engine::region_of(&i.record.group).to_string())
        .ok_or_else(|| ServerError::NoInstance(req.instance.clone()))?;
    let kind = e.provider(&region).map(|p| p.kind()).unwrap_or("none");
    if kind != "sim" {
        return Err(ServerError::Conflict(format!(
            "instance {} is in region {region} (provider {kind}): only instances of a \"sim\" region end by POST /v1/agent/exit; its provider sees it end",
            req.instance
        )));
    }
    let status = if req.status.is_empty() {
        "exited (sim)"
    } else {
        req.status.as_str()
    };
    let ended = e.factory.sim.exit(&req.instance, status);
    Ok(Json(serde_json::json!({ "ended": ended })).into_response())
}

/// An agent may act only for instances of its own group, and an instance token only for its
/// own instance; an instance once heard with its instance token is no longer spoken for by the
/// group's token. The refusal says nothing of the instance (its group, its address): an
/// unknown instance is left to the handler, which answers 404.
pub(crate) fn check_instance(
    e: &Engine,
    caller: &Caller,
    bound: &BoundInstance,
    instance: &str,
) -> Result<(), ServerError> {
    if bound.0.as_deref().is_some_and(|b| b != instance) {
        return Err(ServerError::NotThisInstance);
    }
    let st = e.state();
    let Some(i) = st.instances.get(instance) else {
        return Ok(());
    };
    if caller.scope == drover_model::token::TokenScope::Agent
        && caller.group.as_deref() != Some(i.record.group.as_str())
    {
        return Err(ServerError::NotThisInstance);
    }
    if bound.0.is_none() && (i.record.own_token || i.soft.bound) {
        return Err(ServerError::NotThisInstance);
    }
    Ok(())
}

/// A hold on one long-poll for this caller (an instance token: per instance), or 429.
pub(crate) fn hold_poll(
    guards: &Arc<Guards>,
    caller: &Caller,
    bound: &BoundInstance,
) -> Result<Held, ServerError> {
    let (kind, key, limit) = match &bound.0 {
        Some(i) => (
            Kind::InstancePoll,
            format!("{}/{i}", caller.id),
            crate::guard::POLLS_PER_INSTANCE,
        ),
        None => (
            Kind::Poll,
            caller.id.clone(),
            crate::guard::POLLS_PER_CALLER,
        ),
    };
    guards
        .hold(kind, &key)
        .ok_or(ServerError::TooManyPolls { limit })
}

/// Replaces the current fleet's secret values in free text.
pub(crate) fn scrubber(e: &Engine) -> drover_model::secret::Scrubber {
    let st = e.state();
    drover_model::secret::Scrubber::for_fleet(st.revision.as_ref().map(|r| &r.fleet))
}

async fn revisions(State(e): State<Arc<Engine>>) -> Result<Response, ServerError> {
    let sc = scrubber(&e);
    let all = read(&e, |s| s.revisions()).await?;
    Ok(Json(scrub_summaries(all, &sc)).into_response())
}

/// Revision summaries as served: secret values replaced in their text.
pub(crate) fn scrub_summaries(
    mut all: Vec<drover_model::api::RevisionSummary>,
    sc: &drover_model::secret::Scrubber,
) -> Vec<drover_model::api::RevisionSummary> {
    for r in &mut all {
        sc.scrub_in_place(&mut r.summary);
    }
    all
}

/// The number in `/v1/revisions/{number}`.
pub(crate) fn revision_number(number: &str) -> Result<u64, ServerError> {
    number.parse().map_err(|_| ServerError::NotANumber {
        what: "revision",
        value: number.to_string(),
    })
}

async fn revision(
    State(e): State<Arc<Engine>>,
    Path(number): Path<String>,
) -> Result<Response, ServerError> {
    let n = revision_number(&number)?;
    let r = read(&e, move |s| s.revision(n)).await?;
    Ok(Json(revision_served(n, r)?).into_response())
}

/// One revision as served: secrets never leave the server, not in the text, not in the
/// parsed fleet, not in the file as last applied.
pub(crate) fn revision_served(
    n: u64,
    r: Option<drover_model::api::Revision>,
) -> Result<serde_json::Value, ServerError> {
    let Some(mut r) = r else {
        return Err(ServerError::NoRevision(n));
    };
    let sc = drover_model::secret::Scrubber::for_fleet(Some(&r.fleet));
    r.toml = sc
        .scrub(&drover_model::secret::redact_toml(&r.toml))
        .into_owned();
    sc.scrub_in_place(&mut r.summary);
    // The file as last applied (the three-way merge's base) holds secrets too.
    if let Some(l) = r.last_applied.as_mut() {
        let base = drover_model::parse_fleet(&l.toml, &r.file).ok();
        let sb = drover_model::secret::Scrubber::for_fleet(base.as_ref());
        l.toml = sc
            .scrub(&sb.scrub(&drover_model::secret::redact_toml(&l.toml)))
            .into_owned();
    }
    let mut v = serde_json::to_value(&r)
        .map_err(|err| ServerError::Internal(format!("revision {n}: {err}")))?;
    drover_model::secret::redact_json(&mut v);
    Ok(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusQuery {
    /// `all` (the default) or `none` (per-group counts only).
    #[serde(default)]
    instances: Option<String>,
    /// One group's instances, a page at a time (`service/region`).
    group: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

/// `GET /v1/status[?instances=none | ?group=S/R&page=P&per_page=N]`.
async fn status(
    State(e): State<Arc<Engine>>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!(
            "{}; parameters: instances (all, none), group, page, per_page",
            r.body_text()
        ))
    })?;
    let listing = match (q.instances.as_deref(), q.group) {
        (Some("none"), None) => crate::state::Listing::None,
        (None | Some("all"), None) if q.page.is_none() && q.per_page.is_none() => {
            crate::state::Listing::All
        }
        (None | Some("all"), Some(group)) => {
            if !e.state().groups.contains_key(&group) {
                return Err(ServerError::NoGroup(group));
            }
            crate::state::Listing::Page {
                group,
                page: q.page.unwrap_or(1).max(1),
                per_page: q.per_page.unwrap_or(100).clamp(1, 1000),
            }
        }
        _ => {
            return Err(ServerError::BadRequest(
                "status: instances is all or none; page and per_page go with group (e.g. ?group=web/local&page=2)".into(),
            ))
        }
    };
    // Listed, scrubbed and serialized on a blocking thread: at 50,000 instances that is 20 MB
    // and half a second, which on an async worker stalled the heartbeats it shares.
    let body = tokio::task::spawn_blocking(move || {
        let mut s = crate::status::fleet_status(&e, &listing);
        let sc = scrubber(&e);
        if !sc.is_empty() {
            for c in s
                .groups
                .iter_mut()
                .flat_map(|g| g.instances.iter_mut())
                .flat_map(|i| i.components.iter_mut())
            {
                for t in [&mut c.message, &mut c.last_exit].into_iter().flatten() {
                    sc.scrub_in_place(t);
                }
            }
        }
        serde_json::to_vec(&s)
    })
    .await
    .map_err(|err| ServerError::Internal(format!("status: {err}")))?
    .map_err(|err| ServerError::Internal(format!("status: {err}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
    group: Option<String>,
    instance: Option<String>,
    kind: Option<String>,
    #[serde(default)]
    pub(crate) follow: bool,
    /// With a limit (default 10,000): the newest matching events rather than the oldest.
    #[serde(default)]
    newest: bool,
    /// Only events of the last this long, e.g. `10m`.
    since: Option<drover_model::Dur>,
}

async fn events(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Extension(guards): Extension<Arc<Guards>>,
    headers: axum::http::HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let q = events_query(query)?;
    // Server-sent events for browsers (`Accept: text/event-stream`), which come back after a
    // lost connection with the last seq they saw.
    let sse = q.follow
        && headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
    let mut q = q;
    if let Some(seen) = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        q.after = q.after.max(seen);
    }
    let mut filter = events_filter(&q)?;
    if q.follow && filter.newest {
        // The newest `limit` first, then the live ones: start the stream before them.
        let f = filter.clone();
        let tail = read(&e, move |s| s.events(&f)).await?;
        if let Some(first) = tail.first() {
            q.after = q.after.max(first.seq - 1);
            filter.after_seq = q.after;
        }
        filter.newest = false;
    }
    let sc = scrubber(&e);
    if !q.follow {
        let f = filter.clone();
        let mut evs = read(&e, move |s| s.events(&f)).await?;
        for ev in &mut evs {
            sc.scrub_in_place(&mut ev.message);
        }
        return Ok(Json(evs).into_response());
    }
    // Follow: subscribe first, then send what is stored, then stream new ones (deduplicated by seq).
    let held = guards
        .hold(Kind::Follow, &caller.id)
        .ok_or(ServerError::TooManyFollows {
            limit: crate::guard::FOLLOWS_PER_CALLER,
        })?;
    let rx = e.events_tx.subscribe();
    // Every stored event after `after`, read a page at a time as the client takes them (off
    // the async workers), then the live ones; deduplicated by seq where they meet.
    let store = e.store.clone();
    let first = EventFilter {
        limit: 1000,
        ..filter.clone()
    };
    let backlog = futures::stream::unfold(Some(first), move |page| {
        let store = store.clone();
        async move {
            let mut page = page?;
            let f = page.clone();
            let got = match tokio::task::spawn_blocking(move || store.events(&f)).await {
                Ok(Ok(got)) => got,
                Ok(Err(err)) => {
                    tracing::warn!("events follow: reading the stored events: {err}");
                    Vec::new()
                }
                Err(err) => {
                    tracing::warn!("events follow: {err}");
                    Vec::new()
                }
            };
            let full = got.len() >= page.limit;
            if let Some(l) = got.last() {
                page.after_seq = l.seq;
            }
            Some((futures::stream::iter(got), full.then_some(page)))
        }
    })
    .flatten();
    let live = live_events(rx, filter, held, guards.connections.keep_alive());
    let (line, keep_alive) = if sse {
        (sse_line as fn(_) -> _, SSE_KEEP_ALIVE)
    } else {
        (line as fn(_) -> _, NDJSON_KEEP_ALIVE)
    };
    let mut last = q.after;
    let stream = backlog.map(Some).chain(live).filter_map(move |ev| {
        let out = match ev {
            None => Some(Ok(Bytes::from_static(keep_alive))),
            Some(mut ev) => {
                let fresh = ev.seq > last;
                if fresh {
                    last = ev.seq;
                    sc.scrub_in_place(&mut ev.message);
                }
                fresh.then(|| line(ev))
            }
        };
        futures::future::ready(out)
    });
    let body = Body::from_stream(stream);
    let kind = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// What `GET /v1/events` reads, from its parameters.
pub(crate) fn events_filter(q: &EventsQuery) -> Result<EventFilter, ServerError> {
    let kind = match &q.kind {
        Some(k) => Some(EventKind::parse(k).ok_or_else(|| {
            ServerError::BadRequest(format!(
                "unknown event kind {k:?}; see `drover events --help` for the kinds"
            ))
        })?),
        None => None,
    };
    Ok(EventFilter {
        after_seq: q.after,
        // Never unbounded: 0 or anything over the cap is the cap.
        limit: match q.limit {
            None if q.follow => 1000,
            None | Some(0) => MAX_EVENTS_PAGE,
            Some(n) => n.min(MAX_EVENTS_PAGE),
        },
        group: q.group.clone(),
        instance: q.instance.clone(),
        kind,
        since_ms: q
            .since
            .map(|d| crate::engine::now_ms().saturating_sub(d.as_millis()))
            .unwrap_or(0),
        newest: q.newest,
    })
}

/// The parameters of `GET /v1/events`, or what is wrong with them.
pub(crate) fn events_query(
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<EventsQuery, ServerError> {
    query.map(|Query(q)| q).map_err(|r| {
        ServerError::BadRequest(format!(
            "{}; allowed parameters: after, limit, group, instance, kind, follow, newest, since (a duration, e.g. 10m)",
            r.body_text()
        ))
    })
}

/// The live part of a follow stream: events that pass `filter`, and `None` (a keep-alive)
/// whenever none was sent for `keep_alive`, so that a quiet stream is not closed as an idle
/// connection. It ends as soon as the client is gone (the body dropped), whether or not
/// anything matches, or when the server stops sending events; `held` is given back then.
fn live_events(
    mut rx: tokio::sync::broadcast::Receiver<drover_model::Event>,
    filter: EventFilter,
    held: Held,
    keep_alive: std::time::Duration,
) -> impl futures::Stream<Item = Option<drover_model::Event>> {
    async_stream(move |tx| async move {
        let _held = held;
        let quiet = tokio::time::sleep(keep_alive);
        tokio::pin!(quiet);
        loop {
            let got = tokio::select! {
                // Nobody reads any more: stop now, not at the next event that matches.
                _ = tx.closed() => break,
                got = rx.recv() => got,
                () = &mut quiet => {
                    if tx.send(None).await.is_err() {
                        break;
                    }
                    quiet.as_mut().reset(tokio::time::Instant::now() + keep_alive);
                    continue;
                }
            };
            match got {
                Ok(ev) => {
                    let keep = filter
                        .group
                        .as_ref()
                        .is_none_or(|g| ev.group.as_ref() == Some(g))
                        && filter
                            .instance
                            .as_ref()
                            .is_none_or(|i| ev.instance.as_ref() == Some(i))
                        && filter.kind.is_none_or(|k| ev.kind == k);
                    if keep {
                        if tx.send(Some(ev)).await.is_err() {
                            break;
                        }
                        quiet
                            .as_mut()
                            .reset(tokio::time::Instant::now() + keep_alive);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    })
}

/// What a quiet NDJSON follow stream sends now and then: an empty line (readers skip it).
const NDJSON_KEEP_ALIVE: &[u8] = b"\n";
/// What a quiet server-sent-events stream sends now and then: a comment (`EventSource`
/// ignores it).
const SSE_KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

fn line(ev: drover_model::Event) -> Result<Bytes, Infallible> {
    let mut v = serde_json::to_vec(&ev).unwrap_or_default();
    v.push(b'\n');
    Ok(Bytes::from(v))
}

/// One event as a server-sent event: its seq as the id, its JSON as the data.
fn sse_line(ev: drover_model::Event) -> Result<Bytes, Infallible> {
    let json = serde_json::to_string(&ev).unwrap_or_default();
    Ok(Bytes::from(format!("id: {}\ndata: {json}\n\n", ev.seq)))
}

/// A stream fed by the future `f` makes through a small channel. The future runs inside the
/// stream, polled with it (no task of its own): the response body owns it, and it ends when
/// the client goes away.
fn async_stream<T, F, Fut>(f: F) -> impl futures::Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let producer = futures::stream::once(f(tx)).filter_map(|()| async { None::<T> });
    let items =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    futures::stream::select(producer, items)
}

/// `POST /v1/rollout`: pause, resume, promote or abort a service's rollouts.
async fn rollout(State(e): State<Arc<Engine>>, body: RawBody) -> Result<Response, ServerError> {
    let req: drover_model::api::RolloutActionRequest = decode(body)?;
    Ok(Json(e.rollout_action(req).await?).into_response())
}

async fn heartbeat(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Extension(bound): Extension<BoundInstance>,
    body: RawBody,
) -> Result<Response, ServerError> {
    let hb: Heartbeat = decode(body)?;
    if hb.instance.is_empty() || hb.instance.len() > 64 || hb.components.len() > limits::COMPONENTS
    {
        return Err(ServerError::BadRequest(format!(
            "heartbeat needs an instance id (at most 64 characters) and at most {} components",
            limits::COMPONENTS
        )));
    }
    check_group(
        &caller,
        &hb.group,
        &format!("the heartbeat's group {}", hb.group),
    )?;
    check_instance(&e, &caller, &bound, &hb.instance)?;
    let mut hb = hb;
    admit_heartbeat(&e, &mut hb)?;
    if bound.0.is_some() {
        // From now on only this instance's own token speaks for it; whatever the group's
        // token said before (a sequence number to jam it, say) is forgotten.
        if let Some(mut i) = e.state().instances.get_mut(&hb.instance) {
            if !i.soft.bound {
                i.soft.bound = true;
                i.soft.last_seq = 0;
            }
        }
    }
    // A component's message may quote its own secret: scrubbed before it reaches the state,
    // the events and the logs.
    if hb
        .components
        .iter()
        .any(|c| c.message.is_some() || c.last_exit.is_some() || c.last_output.is_some())
    {
        let sc = scrubber(&e);
        for c in &mut hb.components {
            for t in [&mut c.message, &mut c.last_exit, &mut c.last_output]
                .into_iter()
                .flatten()
            {
                sc.scrub_in_place(t);
            }
        }
    }
    Ok(Json(e.heartbeat(hb)?).into_response())
}

/// Limits and consistency of a heartbeat. Free text and custom metrics are clamped to
/// [`limits`] (cut, never a reason to refuse: a valid fleet's agents are always heard). What
/// identifies the instance is checked, so that a malformed one changes nothing: every name
/// bounded, numbers finite, and the generation and address those the server launched the
/// instance with.
pub fn admit_heartbeat(e: &Engine, hb: &mut Heartbeat) -> Result<(), ServerError> {
    hb.clamp();
    let bad = |m: String| Err(ServerError::BadRequest(format!("heartbeat: {m}")));
    if hb.group.len() > 200 || hb.addr.len() > 64 {
        return bad("group or address too long".into());
    }
    if hb.addr.parse::<std::net::IpAddr>().is_err() {
        return bad(format!("address {:?} is not an IP address", hb.addr));
    }
    for c in &hb.components {
        if c.name.is_empty()
            || c.name.len() > limits::COMPONENT_NAME
            || c.version.len() > limits::VERSION
        {
            return bad(format!(
                "a component name is empty or over {} bytes, or its version over {}",
                limits::COMPONENT_NAME,
                limits::VERSION
            ));
        }
    }
    let u = &hb.utilization;
    if !u.cpu.is_finite() || u.cpu < 0.0 {
        return bad("utilization.cpu must be a finite number >= 0".into());
    }
    let st = e.state();
    if let Some(i) = st.instances.get(&hb.instance) {
        // What it was launched with is not told: the real agent knows it.
        let wrong_generation = i.record.generation != hb.generation;
        let wrong_addr = !i.record.addr.is_empty() && i.record.addr != hb.addr;
        if i.record.group == hb.group && (wrong_generation || wrong_addr) {
            return bad(format!(
                "instance {}: the generation or address is not the one it was launched with",
                hb.instance
            ));
        }
    }
    Ok(())
}

async fn plan(
    State(e): State<Arc<Engine>>,
    Extension(caller): Extension<Caller>,
    Path((service, region, generation)): Path<(String, String, String)>,
) -> Result<Response, ServerError> {
    let store = e.store.clone();
    let p = tokio::task::spawn_blocking(move || {
        plan_served(&*store, &caller, &service, &region, &generation)
    })
    .await
    .map_err(ServerError::StoreRead)??;
    Ok(Json(p).into_response())
}

/// `GET /v1/plans/{service}/{region}/{generation}`, from the store: an agent reads its own
/// group's plans only, and secret env values are the instance's business only.
pub(crate) fn plan_served(
    store: &dyn drover_store::Store,
    caller: &Caller,
    service: &str,
    region: &str,
    generation: &str,
) -> Result<drover_model::Plan, ServerError> {
    let g: u64 = generation.parse().map_err(|_| ServerError::NotANumber {
        what: "generation",
        value: generation.to_string(),
    })?;
    let group = drover_model::GroupId::new(service, region).0;
    check_group(caller, &group, &format!("plan {group}"))?;
    match store.plan(&group, g)? {
        Some(mut p) => {
            let fleet = store.revision(p.revision)?.map(|r| r.fleet);
            drover_model::secret::redact_plan(&mut p, fleet.as_ref());
            Ok(p)
        }
        None => Err(ServerError::NotFound(format!(
            "no plan generation {g} for group {group}"
        ))),
    }
}

/// Prometheus text: per listener and per target counters of the built-in balancer, and the
/// permit long-polls agents hold open.
async fn metrics(
    State(e): State<Arc<Engine>>,
    Extension(guards): Extension<Arc<Guards>>,
) -> Response {
    let mut out = drover_lb::prometheus(&e.balancer_stats());
    out.push_str(&format!(
        "# HELP drover_event_follows Event follow streams open now.\n# TYPE drover_event_follows gauge\ndrover_event_follows {}\n",
        guards.follows()
    ));
    out.push_str(&format!(
        "# HELP drover_api_connections API connections open now.\n# TYPE drover_api_connections gauge\ndrover_api_connections {}\n# HELP drover_api_connections_refused_total API connections closed at once: over the cap (in all, or from one address).\n# TYPE drover_api_connections_refused_total counter\ndrover_api_connections_refused_total {}\n",
        guards.connections.open(),
        guards.connections.refused()
    ));
    out.push_str(&format!(
        "# HELP drover_permit_long_polls Permit long-polls agents hold open now.\n# TYPE drover_permit_long_polls gauge\ndrover_permit_long_polls {}\n",
        e.permit_polls()
    ));
    out.push_str(&format!(
        "# HELP drover_controller_passes_total Controller passes since the server started.\n# TYPE drover_controller_passes_total counter\ndrover_controller_passes_total {}\n",
        e.passes()
    ));
    out.push_str(&format!(
        "# HELP drover_controller_instances_reconciled_total Instance views read by controller passes (a pass reads only the groups that changed or whose deadline came).\n# TYPE drover_controller_instances_reconciled_total counter\ndrover_controller_instances_reconciled_total {}\n",
        e.reconciled()
    ));
    out.push_str(&e.writer_stats().prometheus());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn list_tokens(State(e): State<Arc<Engine>>) -> Json<Vec<drover_model::token::TokenInfo>> {
    Json(e.auth().list())
}

async fn create_token(
    State(e): State<Arc<Engine>>,
    body: RawBody,
) -> Result<Response, ServerError> {
    let req: drover_model::token::CreateTokenRequest = decode(body)?;
    if let Some(g) = &req.group {
        if !e.state().groups.contains_key(g) {
            return Err(ServerError::NotFound(format!(
                "no group {g:?}; `drover status` lists the groups"
            )));
        }
    }
    let made = e.auth().create(&e, req.scope, req.name, req.group).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

async fn revoke_token(
    State(e): State<Arc<Engine>>,
    Path(id): Path<String>,
) -> Result<Response, ServerError> {
    Ok(Json(e.auth().revoke(&e, &id).await?).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::{Event, EventKind};
    use std::time::Duration;

    fn event(seq: u64, kind: EventKind) -> Event {
        Event {
            seq,
            at_ms: seq,
            kind,
            group: Some("web/local".into()),
            instance: None,
            message: format!("event {seq}"),
        }
    }

    /// A follow whose filter never matches ends its task once its client is gone, while
    /// events that do not match keep coming (before, it ran until one matched: never).
    #[tokio::test]
    async fn a_follow_that_never_matches_ends_when_its_client_goes() {
        let guards = Arc::new(Guards::default());
        let (tx, _) = tokio::sync::broadcast::channel(64);
        let filter = EventFilter {
            kind: Some(EventKind::Drained),
            ..Default::default()
        };
        let held = guards.hold(Kind::Follow, "t").unwrap();
        let mut stream = Box::pin(live_events(
            tx.subscribe(),
            filter,
            held,
            Duration::from_secs(3600),
        ));
        // One matching event arrives; then the client reads no more and goes.
        tx.send(event(1, EventKind::Drained)).unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.message, "event 1");
        assert_eq!(guards.follows(), 1);
        drop(stream);
        for seq in 2..200 {
            let _ = tx.send(event(seq, EventKind::Healthy));
            tokio::time::sleep(Duration::from_millis(5)).await;
            if guards.follows() == 0 {
                break;
            }
        }
        assert_eq!(guards.follows(), 0, "the follow's task outlived its client");
        // And its receiver is gone: nobody is subscribed any more.
        assert_eq!(tx.receiver_count(), 0);
    }

    fn query(q: &str) -> Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection> {
        let uri: axum::http::Uri = format!("/v1/events?{q}").parse().unwrap();
        Query::try_from_uri(&uri)
    }

    /// A read never asks the store for more than 10,000 events: `limit=0`, a huge limit and
    /// no limit are capped (issue 20, item 1); a follow reads 1,000 at a time.
    #[test]
    fn the_events_limit_is_capped() {
        let limit = |q: &str| {
            events_filter(&events_query(query(q)).unwrap())
                .unwrap()
                .limit
        };
        assert_eq!(limit("limit=0"), MAX_EVENTS_PAGE);
        assert_eq!(limit("limit=1000000"), MAX_EVENTS_PAGE);
        assert_eq!(limit(""), MAX_EVENTS_PAGE);
        assert_eq!(limit("limit=5"), 5);
        assert_eq!(limit("follow=true"), 1000);
        assert_eq!(limit("follow=true&limit=0"), MAX_EVENTS_PAGE);
        assert_eq!(
            limit("follow=true&newest=true&limit=1000000"),
            MAX_EVENTS_PAGE
        );
        assert_eq!(MAX_EVENTS_PAGE, 10_000);
    }

    /// A follow from seq 0 over 2,500 stored events reads them 1,000 at a time, each page
    /// only once the client has taken the one before (issue 20, item 1), and sends each once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follow_backlog_is_read_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::testing::Watched::open(dir.path());
        let writes = (1..=2500)
            .map(|i| {
                drover_store::Write::Event(drover_model::NewEvent::new(
                    EventKind::Healthy,
                    format!("event {i}"),
                ))
            })
            .collect();
        drover_store::Store::commit(&*store, writes, 1).unwrap();
        let e = crate::testing::engine(dir.path(), store.clone());
        store.take();
        let caller = Caller {
            id: "t-1".into(),
            scope: drover_model::token::TokenScope::Read,
            group: None,
        };
        let resp = events(
            State(e),
            Extension(caller),
            Extension(Arc::new(Guards::default())),
            axum::http::HeaderMap::new(),
            query("follow=true"),
        )
        .await
        .unwrap();
        let mut body = resp.into_body().into_data_stream();
        let mut seqs = Vec::new();
        let mut pages_read = Vec::new();
        while seqs.len() < 2500 {
            let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
                .await
                .expect("the backlog stalled")
                .unwrap()
                .unwrap();
            for l in chunk.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                seqs.push(serde_json::from_slice::<Event>(l).unwrap().seq);
            }
            let reads = store.take();
            pages_read.extend(reads.iter().map(|r| (seqs.len(), r.what, r.limit)));
        }
        assert_eq!(seqs, (1..=2500).collect::<Vec<u64>>());
        // Each page read when the last event of the one before was taken: before the first,
        // after the 1,000th and after the 2,000th.
        let want = [0, 1000, 2000].map(|n| (n + 1, "events", Some(1000)));
        assert_eq!(pages_read, want, "(events taken, read, limit)");
    }

    /// `GET /v1/events` alone, as the server serves it: on the capped listener with `limits`,
    /// for a read token.
    async fn serve_events(
        e: Arc<Engine>,
        limits: crate::guard::ConnLimits,
    ) -> std::net::SocketAddr {
        let guards = Arc::new(Guards::with_limits(limits));
        let conns = guards.connections.clone();
        let app = Router::new()
            .route("/v1/events", get(events))
            .layer(Extension(guards))
            .layer(Extension(Caller {
                id: "t-1".into(),
                scope: drover_model::token::TokenScope::Read,
                group: None,
            }))
            .with_state(e);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(crate::guard::Capped::new(l, conns), app).await });
        addr
    }

    /// Opens a follow stream (`accept`: NDJSON or server-sent events) and reads it for
    /// `hold`: the connection and what came, or why the connection ended before.
    async fn hold_follow(
        addr: std::net::SocketAddr,
        accept: &str,
        hold: Duration,
    ) -> Result<(tokio::net::TcpStream, String), String> {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /v1/events?follow=true HTTP/1.1\r\nhost: drover\r\naccept: {accept}\r\n\r\n"
        );
        c.write_all(req.as_bytes()).await.unwrap();
        let mut got = String::new();
        match read_for(&mut c, hold, &mut got).await {
            Ok(()) => Ok((c, got)),
            Err(why) => Err(format!("{accept}: {why}: {got:?}")),
        }
    }

    /// Reads `c` into `got` for `hold`; an error if it ends before.
    async fn read_for(
        c: &mut tokio::net::TcpStream,
        hold: Duration,
        got: &mut String,
    ) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let t0 = tokio::time::Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(t0 + hold, c.read(&mut buf)).await {
                Err(_) => return Ok(()),
                Ok(Ok(0)) => return Err(format!("closed after {:?}", t0.elapsed())),
                Ok(Ok(n)) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
                Ok(Err(err)) => return Err(format!("{err} after {:?}", t0.elapsed())),
            }
        }
    }

    /// A follow stream with nothing to send is not cut by the connections' idle timeout
    /// (hyper reads the connection while it streams an answer: a silent one timed out): it
    /// sends keep-alives its readers skip (an empty line; a server-sent-events comment), and
    /// events still come after them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_quiet_follow_stream_outlives_the_idle_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let e = crate::testing::engine(dir.path(), crate::testing::Watched::open(dir.path()));
        let limits = crate::guard::ConnLimits {
            first_byte: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            ..Default::default()
        };
        let addr = serve_events(e.clone(), limits).await;
        let hold = Duration::from_secs(3);
        let (ndjson, sse) = tokio::join!(
            hold_follow(addr, "application/x-ndjson", hold),
            hold_follow(addr, "text/event-stream", hold)
        );
        let (mut ndjson, mut sse) = (ndjson.unwrap(), sse.unwrap());
        for got in [&ndjson.1, &sse.1] {
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        }
        // Chunked: a chunk of one byte, the empty line; a comment for server-sent events.
        assert!(ndjson.1.contains("\r\n1\r\n\n\r\n"), "{:?}", ndjson.1);
        assert!(!ndjson.1.contains('{'), "{:?}", ndjson.1);
        assert!(sse.1.contains(": keep-alive\n\n"), "{:?}", sse.1);
        assert!(!sse.1.contains("data:"), "{:?}", sse.1);
        e.events_tx.send(event(7, EventKind::Healthy)).unwrap();
        for (c, got) in [&mut ndjson, &mut sse] {
            read_for(c, Duration::from_millis(500), got).await.unwrap();
            assert!(got.contains("\"message\":\"event 7\""), "{got:?}");
        }
    }

    /// The structured errors say word for word what their free-text forms said (tests,
    /// scripts and people match on the words), with the same status and code.
    #[tokio::test]
    async fn structured_errors_keep_their_words_status_and_code() {
        let s = |v: &str| v.to_string();
        let cases: Vec<(ServerError, &str, u16, &str)> = vec![
            (
                ServerError::NotANumber {
                    what: "revision",
                    value: s("x"),
                },
                "revision \"x\" is not a number",
                400,
                "bad_request",
            ),
            (
                ServerError::GenerationMismatch {
                    instance: s("i-000001"),
                    what: "group or generation",
                },
                "instance i-000001: the group or generation is not the one it was launched with",
                400,
                "bad_request",
            ),
            (
                ServerError::NotOneOffSchedule(s("web#0")),
                "\"web#0\" is not the id of a one-off schedule (a number, as `drover schedule list` shows); a schedule of the fleet file (like web#0) ends when you remove it from the file and apply it",
                400,
                "bad_request",
            ),
            (
                ServerError::NoService {
                    service: s("api"),
                    known: Some(vec![s("web"), s("core")]),
                },
                "no service \"api\"; services: web, core",
                404,
                "not_found",
            ),
            (
                ServerError::NoService {
                    service: s("api"),
                    known: None,
                },
                "no service \"api\"; `drover status` lists them",
                404,
                "not_found",
            ),
            (
                ServerError::NoGroup(s("web/x")),
                "no group web/x; `drover status` lists the groups",
                404,
                "not_found",
            ),
            (
                ServerError::NoRevision(7),
                "no revision 7; `drover history` lists them",
                404,
                "not_found",
            ),
            (
                ServerError::NoSchedule(3),
                "no schedule 3; see `drover schedule list`",
                404,
                "not_found",
            ),
            (
                ServerError::NoToken(s("t-9")),
                "no token t-9; `drover token list` shows them",
                404,
                "not_found",
            ),
            (
                ServerError::NothingApplied { to: None },
                "nothing applied yet: run `drover apply FILE` first",
                409,
                "conflict",
            ),
            (
                ServerError::NothingApplied {
                    to: Some("roll back"),
                },
                "nothing applied yet: there is nothing to roll back",
                409,
                "conflict",
            ),
            (
                ServerError::NothingToRollBack { service: s("web") },
                "no earlier revision runs other versions of web; `drover history` lists them",
                409,
                "conflict",
            ),
            (
                ServerError::RolloutNotOpen {
                    service: s("web"),
                    region: None,
                    action: "pause",
                },
                "no rollout under way for web: nothing to pause; `drover status` shows the rollouts",
                409,
                "conflict",
            ),
            (
                ServerError::RolloutNotOpen {
                    service: s("web"),
                    region: Some(s("b")),
                    action: "abort",
                },
                "no rollout under way for web in region b: nothing to abort; `drover status` shows the rollouts",
                409,
                "conflict",
            ),
            (
                ServerError::ScheduleCancelled(3),
                "schedule 3 is cancelled already",
                409,
                "conflict",
            ),
            (
                ServerError::ScheduleEnded(3),
                "schedule 3 has ended already",
                409,
                "conflict",
            ),
            (
                ServerError::LastAdminToken(s("t-1")),
                "t-1 is the last admin token: create another (`drover token create --scope admin`) before revoking it",
                409,
                "conflict",
            ),
            (
                ServerError::IngressInUse {
                    group: s("web/a"),
                    addr: "127.0.0.1:8080".parse().unwrap(),
                    source: std::io::Error::other("in use"),
                },
                "cannot open the ingress of web/a on 127.0.0.1:8080: in use; is another program (or another drover) listening there? Change `ingress.listen` or stop that program",
                409,
                "conflict",
            ),
            (
                ServerError::DataDirInUse {
                    pid: s("42"),
                    dir: "/var/lib/drover".into(),
                },
                "another drover server (pid 42) uses the data directory /var/lib/drover: stop it first, or use another --data-dir",
                409,
                "conflict",
            ),
            (
                ServerError::BodyTooLarge { limit: 10 },
                "request body is larger than the limit of 10 bytes",
                413,
                "too_large",
            ),
            (
                ServerError::TooManyFollows { limit: 16 },
                "this token holds 16 follow streams already; close one first",
                429,
                "too_many_requests",
            ),
            (
                ServerError::TooManyPolls { limit: 8 },
                "this token holds 8 long-polls already; wait for one to answer",
                429,
                "too_many_requests",
            ),
            (
                ServerError::TokenNeeded,
                "this endpoint needs a token: send `Authorization: Bearer TOKEN` (the CLI reads DATA_DIR/admin.token, DROVER_TOKEN or --token); see docs/security.md",
                401,
                "unauthorized",
            ),
            (
                ServerError::NotBearer,
                "the Authorization header must be `Bearer TOKEN`",
                401,
                "unauthorized",
            ),
            (ServerError::UnknownToken, "unknown token", 401, "unauthorized"),
            (
                ServerError::TokenNotCreated,
                "unknown token: it was never created on this server (`drover token list` shows the tokens)",
                401,
                "unauthorized",
            ),
            (
                ServerError::TokenRevoked { id: s("t-2") },
                "token t-2 was revoked; create a new one with `drover token create`",
                401,
                "unauthorized",
            ),
            (
                ServerError::SessionTokenRevoked { id: s("t-2") },
                "token t-2 that this session was opened with was revoked; log in again with another",
                401,
                "unauthorized",
            ),
            (
                ServerError::NotAllowed {
                    method: s("POST"),
                    path: s("/v1/deploy"),
                    needs: "changes desired state or tokens and needs an admin token",
                    caller: s("t-3 is a read token"),
                },
                "POST /v1/deploy changes desired state or tokens and needs an admin token; t-3 is a read token",
                403,
                "forbidden",
            ),
            (
                ServerError::OtherGroup {
                    what: s("plan core/a"),
                    group: s("core/a"),
                    caller: s("t-4 is an agent token of group web/a"),
                },
                "plan core/a belongs to group core/a; t-4 is an agent token of group web/a",
                403,
                "forbidden",
            ),
            (
                ServerError::NotThisInstance,
                "this token may not act for that instance",
                403,
                "forbidden",
            ),
            (
                ServerError::LeaseLost,
                "this server no longer leads (its lease ran out); ask the leader (GET /v1/health names it)",
                503,
                "unavailable",
            ),
            (
                ServerError::NotLeading,
                "this server does not lead; apply through the leader",
                503,
                "unavailable",
            ),
        ];
        let cancelled = || async {
            let task = tokio::spawn(std::future::pending::<()>());
            task.abort();
            task.await.unwrap_err()
        };
        let joined = [
            (
                ServerError::StoreRead(cancelled().await),
                "store read: task ",
            ),
            (
                ServerError::FlightRecorder(cancelled().await),
                "flight recorder: task ",
            ),
        ];
        for (err, message, status, code) in cases {
            assert_eq!(err.to_string(), message);
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status, "{message}");
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            let body: ApiError = serde_json::from_slice(&body).unwrap();
            assert_eq!((body.code.as_str(), body.message.as_str()), (code, message));
        }
        for (err, start) in joined {
            assert!(err.to_string().starts_with(start), "{err}");
            assert_eq!(err.into_response().status().as_u16(), 500);
        }
    }
}
