//! The web dashboard at `/ui/`: its pages and assets (compiled into the binary), login by
//! one-time link or token, cookie sessions with CSRF tokens, and the summary and paged group
//! endpoints it reads (`/v1/ui/...`, usable with a bearer token too).
//!
//! Everything else the page shows or does goes through the ordinary API (`/v1/events` as
//! server-sent events, `/v1/revisions`, `/v1/deploy`, ...), authenticated by the session
//! cookie in [`crate::auth::layer`]: a read session is refused every change there (403),
//! whatever the page shows.

pub mod history;
pub mod session;

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use drover_model::api::{GroupStatus, InstanceState};
use drover_model::token::TokenScope;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::engine::{now_ms, Engine};
use crate::ServerError;
use session::{LinkError, SessionRef, Sessions};

/// A batch's time before any has finished (the fleet file's estimate uses the same).
const BOOT_MS: u64 = 3_000;

/// The header the page sends its session's CSRF token in, on every request that changes
/// something.
pub const CSRF_HEADER: &str = "x-drover-csrf";

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The dashboard's state: sessions, links, and the last hour of each group's counts.
pub struct Ui {
    pub sessions: Sessions,
    pub history: history::History,
    /// The session cookie's name: one per API port, so that two servers on one host keep
    /// their sessions apart (cookies ignore ports).
    cookie: String,
    /// Cookies marked `Secure` (the API is served over TLS).
    secure: bool,
}

impl Ui {
    pub fn new(port: u16, secure: bool) -> Ui {
        Ui {
            sessions: Sessions::default(),
            history: history::History::default(),
            cookie: format!("drover_session_{port}"),
            secure,
        }
    }

    fn session_secret<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == self.cookie)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn set_cookie(&self, sid: &str) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}={sid}; Path=/; HttpOnly; SameSite=Strict{secure}",
            self.cookie
        ))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    fn clear_cookie(&self) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            self.cookie
        ))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Whether a request carries this server's session cookie (and no bearer token).
pub fn has_session(req: &Request) -> bool {
    req.extensions()
        .get::<Arc<Ui>>()
        .is_some_and(|ui| ui.session_secret(req.headers()).is_some())
}

/// The caller behind a request's session cookie: its token still valid, and, for a request
/// that changes something, the session's CSRF token in [`CSRF_HEADER`] and no cross-site
/// origin. Hands the [`SessionRef`] to the handler.
pub fn session_caller(engine: &Engine, req: &mut Request) -> Result<Caller, ServerError> {
    let Some(ui) = req.extensions().get::<Arc<Ui>>().cloned() else {
        return Err(ServerError::Unauthorized("no session".into()));
    };
    let sid = ui.session_secret(req.headers()).unwrap_or_default();
    let Some((r, s)) = ui.sessions.get(sid) else {
        return Err(ServerError::Unauthorized(
            "your dashboard session has ended (it expired, you logged out, or the server restarted: sessions live in the server's memory); log in again at /ui/".into(),
        ));
    };
    let info = engine.auth().by_id(&s.token_id);
    match info {
        Some(t) if t.revoked_at_ms.is_none() => {}
        _ => {
            ui.sessions.remove(&r);
            return Err(ServerError::SessionTokenRevoked {
                id: s.token_id.clone(),
            });
        }
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let cross = req
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v != "same-origin" && v != "none");
        let given = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if cross || !session::same(given, &r.csrf) {
            return Err(ServerError::Forbidden(format!(
                "{} {}: a change through a dashboard session needs its CSRF token in the {CSRF_HEADER} header, from the same origin (did you log in again in another tab? reload the page)",
                req.method(),
                req.uri().path()
            )));
        }
    }
    req.extensions_mut().insert(r);
    Ok(Caller {
        id: s.token_id,
        scope: s.scope,
        group: None,
    })
}

/// The dashboard's routes (the `/ui/` pages need no token; `/v1/ui/...` a read one).
pub fn routes() -> Router<Arc<Engine>> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        .route("/ui/login", get(login_link).post(login_form))
        .route("/ui/assets/{name}", get(asset))
        .route("/v1/ui/login-links", post(create_link))
        .route("/v1/ui/session", get(session_info))
        .route("/v1/ui/logout", post(logout))
        .route("/v1/ui/summary", get(summary))
        .route("/v1/ui/groups/{service}/{region}", get(group_page))
}

/// Every page: no framing by other sites, no script or style from anywhere else.
fn secure_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The login page: a message (why the user is here) and the token form.
fn login_page(status: StatusCode, title: &str, message: &str) -> Response {
    let body = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>drover · log in</title><link rel="stylesheet" href="/ui/assets/app.css"></head>
<body class="login"><main>
<h1>drover</h1>
<h2 id="login-title">{}</h2>
<p id="login-message">{}</p>
<form method="post" action="/ui/login" id="token-form">
<label for="token">Token (admin or read)</label>
<input id="token" name="token" type="password" autocomplete="off" required autofocus>
<button type="submit">Log in</button>
</form>
<p class="hint">On the server's machine, <code>drover ui</code> prints a login link that works once, within 60 seconds
(<code>drover ui --open</code> opens it). <code>drover token create --scope read</code> makes a token that can look but not act.</p>
</main></body></html>"#,
        escape(title),
        escape(message)
    );
    secure_headers((status, Html(body)).into_response())
}

async fn index(Extension(ui): Extension<Arc<Ui>>, headers: HeaderMap) -> Response {
    let live = ui
        .session_secret(&headers)
        .and_then(|sid| ui.sessions.get(sid))
        .is_some();
    if !live {
        return login_page(
            StatusCode::OK,
            "Log in",
            "Paste a token, or open the link `drover ui` prints.",
        );
    }
    secure_headers(Html(INDEX).into_response())
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    secure_headers(([(header::CONTENT_TYPE, kind)], body).into_response())
}

/// Logged in: the cookie, then a page that moves on to the dashboard by itself (a same-site
/// navigation, so that the SameSite=Strict cookie goes with it even when the link was opened
/// from another site).
fn logged_in(ui: &Ui, sid: &str) -> Response {
    let body = r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="0; url=/ui/"><title>drover · logged in</title>
<link rel="stylesheet" href="/ui/assets/app.css"></head>
<body class="login"><main><h1>drover</h1><p>Logged in. <a href="/ui/">Open the dashboard</a>.</p></main></body></html>"#;
    let mut resp = secure_headers(Html(body).into_response());
    resp.headers_mut()
        .insert(header::SET_COOKIE, ui.set_cookie(sid));
    resp
}

#[derive(Deserialize)]
struct LinkQuery {
    code: Option<String>,
}

/// `GET /ui/login?code=...`: a one-time link from `drover ui`.
async fn login_link(
    Extension(ui): Extension<Arc<Ui>>,
    State(e): State<Arc<Engine>>,
    Query(q): Query<LinkQuery>,
) -> Response {
    let Some(code) = q.code.filter(|c| !c.is_empty() && c.len() <= 128) else {
        return login_page(
            StatusCode::BAD_REQUEST,
            "This login link is incomplete",
            "It has no code. Copy the whole link `drover ui` prints, or log in with a token.",
        );
    };
    let (token_id, scope) = match ui.sessions.take_link(&code) {
        Ok(x) => x,
        Err(LinkError::Expired) => {
            return login_page(
                StatusCode::UNAUTHORIZED,
                "This login link has expired",
                "A link from `drover ui` works once, within 60 seconds. Run `drover ui` again, or log in with a token.",
            )
        }
        Err(LinkError::Unknown) => {
            return login_page(
                StatusCode::UNAUTHORIZED,
                "This login link is not valid",
                "It was used already, or it was never made by this server (a server restart forgets its links). Run `drover ui` again, or log in with a token.",
            )
        }
    };
    if e.auth()
        .by_id(&token_id)
        .is_none_or(|t| t.revoked_at_ms.is_some())
    {
        return login_page(
            StatusCode::UNAUTHORIZED,
            "This login link's token was revoked",
            "Log in with another token.",
        );
    }
    match ui.sessions.create(token_id, scope) {
        Ok(sid) => logged_in(&ui, &sid),
        Err(err) => login_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Cannot log in",
            &err.to_string(),
        ),
    }
}

#[derive(Deserialize)]
struct TokenForm {
    token: String,
}

/// `POST /ui/login`: the token form.
async fn login_form(
    Extension(ui): Extension<Arc<Ui>>,
    State(e): State<Arc<Engine>>,
    headers: HeaderMap,
    form: Result<axum::Form<TokenForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    // A form another site posts (login CSRF) is refused.
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site" || v == "same-site")
    {
        return login_page(
            StatusCode::FORBIDDEN,
            "Log in from this page",
            "The form was sent from another site.",
        );
    }
    let Ok(axum::Form(form)) = form else {
        return login_page(StatusCode::BAD_REQUEST, "Log in", "The form needs a token.");
    };
    let value = HeaderValue::from_str(&format!("Bearer {}", form.token.trim()));
    let caller = match value {
        Ok(v) => e.auth().authenticate(Some(&v)),
        Err(_) => Err(ServerError::Unauthorized("that is not a token".into())),
    };
    match caller {
        Ok(c)
            if matches!(
                c.scope,
                TokenScope::Admin | TokenScope::Read | TokenScope::Exec
            ) =>
        {
            match ui.sessions.create(c.id, c.scope) {
                Ok(sid) => logged_in(&ui, &sid),
                Err(err) => login_page(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Cannot log in",
                    &err.to_string(),
                ),
            }
        }
        Ok(c) => login_page(
            StatusCode::FORBIDDEN,
            "This token cannot open the dashboard",
            &format!(
                "{} is {} token; the dashboard takes an admin or read token.",
                c.id,
                if c.scope == TokenScope::Agent {
                    "an agent"
                } else {
                    "a balancer"
                }
            ),
        ),
        Err(err) => login_page(
            StatusCode::UNAUTHORIZED,
            "That token was not accepted",
            &err.to_string(),
        ),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LoginLink {
    /// The path and query to open on the server's address (`/ui/login?code=...`).
    pub path: String,
    pub expires_at_ms: u64,
    /// The scope the session will have (that of the token that asked).
    pub scope: TokenScope,
}

/// `POST /v1/ui/login-links` (`drover ui`): a one-time link for the caller's token.
async fn create_link(
    Extension(ui): Extension<Arc<Ui>>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ServerError> {
    let (code, expires_at_ms) = ui.sessions.new_link(&caller)?;
    Ok((
        StatusCode::CREATED,
        axum::Json(LoginLink {
            path: format!("/ui/login?code={code}"),
            expires_at_ms,
            scope: caller.scope,
        }),
    )
        .into_response())
}

#[derive(Serialize)]
struct SessionInfo {
    token: String,
    scope: TokenScope,
    can_act: bool,
    /// Absent for a bearer token (it needs none).
    #[serde(skip_serializing_if = "Option::is_none")]
    csrf: Option<String>,
}

async fn session_info(
    Extension(caller): Extension<Caller>,
    session: Option<Extension<SessionRef>>,
) -> axum::Json<SessionInfo> {
    axum::Json(SessionInfo {
        token: caller.id,
        scope: caller.scope,
        can_act: caller.scope == TokenScope::Admin,
        csrf: session.map(|Extension(s)| s.csrf),
    })
}

async fn logout(
    Extension(ui): Extension<Arc<Ui>>,
    session: Option<Extension<SessionRef>>,
) -> Response {
    if let Some(Extension(s)) = session {
        ui.sessions.remove(&s);
    }
    let mut resp = axum::Json(serde_json::json!({"logged_out": true})).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, ui.clear_cookie());
    resp
}

/// A rollout as the bar shows it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RolloutBar {
    pub batches: u32,
    pub batch_size: u32,
    /// Batches whose instances all run the new generation healthy.
    pub done: u32,
    /// Time left at the pace so far (or at the fleet file's estimate before the first batch).
    pub eta_ms: u64,
    pub elapsed_ms: u64,
}

/// A group without its instances, with what the fleet page draws.
#[derive(Serialize)]
pub struct GroupSummary {
    /// The group's status, without its instances (`/v1/status` has the same fields).
    #[serde(flatten)]
    pub status: serde_json::Map<String, serde_json::Value>,
    /// Instances by state (`healthy`, `starting`, ...).
    pub states: std::collections::BTreeMap<String, u32>,
    pub instance_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bar: Option<RolloutBar>,
    /// The last hour, oldest first.
    pub history: Vec<history::Sample>,
}

#[derive(Serialize)]
pub struct Summary {
    pub fleet: Option<String>,
    pub revision: Option<u64>,
    pub groups: Vec<GroupSummary>,
    /// The newest event's seq: follow `/v1/events` from here.
    pub last_seq: u64,
    /// The newest events (up to 50), oldest first.
    pub recent: Vec<drover_model::Event>,
    pub now_ms: u64,
}

/// An instance state's name as the API spells it.
fn state_name(s: InstanceState) -> &'static str {
    match s {
        InstanceState::Launching => "launching",
        InstanceState::Booting => "booting",
        InstanceState::Healthy => "healthy",
        InstanceState::Unhealthy => "unhealthy",
        InstanceState::Silent => "silent",
        InstanceState::Draining => "draining",
        InstanceState::Terminating => "terminating",
    }
}

fn bar(e: &Engine, g: &GroupStatus, now: u64) -> Option<RolloutBar> {
    if !g.rollout.in_progress {
        return None;
    }
    let st = e.state();
    let svc = st.revision.as_ref()?.fleet.services.get(&g.service)?;
    let step = (svc.rollout.max_surge + svc.rollout.max_unavailable).max(1);
    let batches = g.desired.div_ceil(step).max(1);
    let done = (g.rollout.current_healthy / step).min(batches);
    let elapsed_ms = now.saturating_sub(g.rollout.since_ms);
    let per_batch = if done > 0 {
        elapsed_ms / done as u64
    } else {
        BOOT_MS + svc.rollout.min_healthy_time.as_millis()
    };
    let eta_ms = per_batch * (batches - done) as u64;
    Some(RolloutBar {
        batches,
        batch_size: step,
        done,
        eta_ms: if done == 0 {
            eta_ms.saturating_sub(elapsed_ms)
        } else {
            eta_ms
        },
        elapsed_ms,
    })
}

fn summarize(
    e: &Engine,
    ui: &Ui,
    mut g: GroupStatus,
    counts: &crate::state::StateCounts,
    now: u64,
) -> GroupSummary {
    let states = counts
        .nonzero()
        .map(|(s, n)| (state_name(s).to_string(), n))
        .collect();
    g.instances = Vec::new();
    let mut status = match serde_json::to_value(&g) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    status.remove("instances");
    GroupSummary {
        bar: bar(e, &g, now),
        history: ui.history.of(&g.group),
        states,
        instance_count: counts.total() as usize,
        status,
    }
}

fn scrub_instances(e: &Engine, instances: &mut [drover_model::api::InstanceStatus]) {
    let sc =
        drover_model::secret::Scrubber::for_fleet(e.state().revision.as_ref().map(|r| &r.fleet));
    if sc.is_empty() {
        return;
    }
    for c in instances.iter_mut().flat_map(|i| i.components.iter_mut()) {
        for t in [&mut c.message, &mut c.last_exit].into_iter().flatten() {
            sc.scrub_in_place(t);
        }
    }
}

/// `GET /v1/ui/summary`: every group without its instances (the fleet page); no instance's
/// status is built, so its cost grows with the groups, plus one counting pass over the
/// instances.
async fn summary(State(e): State<Arc<Engine>>, Extension(ui): Extension<Arc<Ui>>) -> Response {
    let (s, counts) = crate::status::summaries(&e);
    let now = now_ms();
    let (last_seq, recent) = ui.history.recent();
    let groups = s
        .groups
        .into_iter()
        .zip(&counts)
        .map(|(g, c)| summarize(&e, &ui, g, c, now))
        .collect();
    axum::Json(Summary {
        fleet: s.fleet,
        revision: s.revision,
        groups,
        last_seq,
        recent,
        now_ms: now,
    })
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    #[serde(default)]
    page: Option<usize>,
    #[serde(default)]
    per_page: Option<usize>,
    /// Only instances whose id, address or state contains this.
    #[serde(default)]
    q: Option<String>,
}

#[derive(Serialize)]
struct GroupPage {
    #[serde(flatten)]
    group: GroupSummary,
    instances: Vec<drover_model::api::InstanceStatus>,
    page: usize,
    per_page: usize,
    /// Instances matching the filter (all pages).
    matching: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    plan: Option<serde_json::Value>,
    /// The group's rollout and canary events, newest last (up to 30).
    rollout_events: Vec<drover_model::Event>,
    now_ms: u64,
}

/// `GET /v1/ui/groups/{service}/{region}?page=1&per_page=50&q=`: one group, its instances a
/// page at a time, its current plan and its rollout's events.
async fn group_page(
    State(e): State<Arc<Engine>>,
    Extension(ui): Extension<Arc<Ui>>,
    Path((service, region)): Path<(String, String)>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ServerError> {
    let Query(q) = query.map_err(|r| {
        ServerError::BadRequest(format!("{}; parameters: page, per_page, q", r.body_text()))
    })?;
    let id = drover_model::GroupId::new(&service, &region).0;
    let per_page = q.per_page.unwrap_or(50).clamp(1, 500);
    let page = q.page.unwrap_or(1).max(1);
    let filter =
        q.q.as_deref()
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(str::to_string);
    // Only this group's instances are listed: the page asked for, or, to filter, all of
    // this group's (never the fleet's).
    let (listed_page, listed_per_page) = match filter {
        Some(_) => (1, usize::MAX),
        None => (page, per_page),
    };
    let Some((mut g, counts)) = crate::status::group_page(&e, &id, listed_page, listed_per_page)
    else {
        return Err(ServerError::NoGroup(id));
    };
    let listed = std::mem::take(&mut g.instances);
    let generation = g.generation;
    let now = now_ms();
    // The counts are over every instance, not only this page's.
    let summary = summarize(&e, &ui, g, &counts, now);
    let (mut instances, matching) = match filter {
        Some(f) => {
            let wanted: Vec<_> = listed
                .into_iter()
                .filter(|i| {
                    i.id.contains(&f) || i.addr.contains(&f) || state_name(i.state).contains(&f)
                })
                .collect();
            let matching = wanted.len();
            let page: Vec<_> = wanted
                .into_iter()
                .skip((page - 1) * per_page)
                .take(per_page)
                .collect();
            (page, matching)
        }
        None => (listed, counts.total() as usize),
    };
    scrub_instances(&e, &mut instances);
    // The current plan is in memory, and so is the revision it was (almost always) made from.
    let current = {
        let st = e.state();
        st.groups
            .get(&id)
            .filter(|g| g.record.generation == generation)
            .map(|g| g.plan.clone())
            .map(|p| {
                let fleet = st
                    .revision
                    .as_ref()
                    .filter(|r| r.number == p.revision)
                    .map(|r| r.fleet.clone());
                (p, fleet)
            })
    };
    // Else from the store: on a blocking thread, never on the async workers.
    let found = match current {
        Some((p, Some(fleet))) => Some((p, Some(fleet))),
        Some((p, None)) => Some((p, None)),
        None => {
            let group = id.clone();
            crate::api::read(&e, move |s| s.plan(&group, generation))
                .await?
                .map(|p| (p, None))
        }
    };
    let plan = match found {
        Some((mut p, fleet)) => {
            let fleet = match fleet {
                Some(f) => Some(f),
                None => {
                    let n = p.revision;
                    crate::api::read(&e, move |s| s.revision(n))
                        .await?
                        .map(|r| r.fleet)
                }
            };
            drover_model::secret::redact_plan(&mut p, fleet.as_ref());
            serde_json::to_value(&p).ok()
        }
        None => None,
    };
    let rollout_events = ui.history.rollout_events(&id);
    Ok(axum::Json(GroupPage {
        group: summary,
        instances,
        page,
        per_page,
        matching,
        plan,
        rollout_events,
        now_ms: now,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_store::{GroupRecord, RolloutRecord, Store, Write};

    /// The group page reads the plan's revision from the store (it is not the latest one) on
    /// a blocking thread, never on the async worker that answers it (issue 20, item 1). The
    /// test runs on one thread: the handler's.
    #[tokio::test(flavor = "current_thread")]
    async fn the_group_page_reads_the_store_off_the_async_workers() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::testing::Watched::open(dir.path());
        // `web` in region `local`: one process `app`.
        let text = drover_test_support::fleets::web("local", &["local"]).toml();
        let fleet = drover_model::parse_fleet(&text, "drover.toml").unwrap();
        let mut plan = drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "local");
        plan.generation = 1;
        plan.revision = 1;
        let revision = || Write::Revision {
            file: "drover.toml".into(),
            summary: "test".into(),
            toml: text.clone(),
            fleet: fleet.clone(),
            last_applied: None,
        };
        let group = Write::Group(GroupRecord {
            group: "web/local".into(),
            desired: 1,
            desired_reason: "apply".into(),
            generation: 1,
            rollout: RolloutRecord::default(),
        });
        store
            .commit(vec![revision(), group, Write::Plan(plan)], 1)
            .unwrap();
        // A later revision that left the group's plan as it was.
        store.commit(vec![revision()], 2).unwrap();
        let e = crate::testing::engine(dir.path(), store.clone());
        store.take();
        let query = PageQuery {
            page: None,
            per_page: None,
            q: None,
        };
        let resp = group_page(
            State(e),
            Extension(Arc::new(Ui::new(7878, false))),
            Path(("web".into(), "local".into())),
            Ok(Query(query)),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(page["plan"]["revision"], 1, "{page}");
        let reads = store.take();
        assert!(reads.iter().any(|r| r.what == "revision"), "{reads:?}");
        let here = std::thread::current().id();
        assert!(
            reads.iter().all(|r| r.thread != here),
            "read on the async worker: {reads:?}"
        );
    }
}
