//! Several servers, one leader: the server's role, the lead on an etcd lease, and what a
//! server that does not lead does with the calls it gets.
//!
//! - Only the leader runs an [`Engine`]: controllers, providers, permits, schedules, canary,
//!   the balancer process. Each term of leadership starts a fresh engine from the store, as a
//!   restarted server does (health rebuilt from heartbeats, silence counted from when the term
//!   began), and ends it when the lease is lost: nothing of a past term acts again.
//! - The lead is the etcd key `PREFIX/leader`, held by a lease of [`LEASE_TTL`] renewed every
//!   third of it. Taking it fences the store (every commit compares the key's
//!   `create_revision`), and the engine acts only while [`Authority::holds`]: a deposed or
//!   paused leader neither commits nor hands out a permit.
//! - A follower answers `GET /v1/health` and the reads of the store ([`crate::follower`])
//!   itself, and forwards every other call to the leader (a reverse proxy: same method, path,
//!   headers, body; the leader's answer as it is), so agents, balancers and the CLI may talk
//!   to any server. With no leader known it answers `503 no_leader`, saying why.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use drover_model::api::{ApiError, Health, ServerView};
use tower::ServiceExt;

use crate::engine::Engine;

/// The lease of the lead: another server leads within about this long (plus one poll) after
/// the leader dies.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// The pause before another try after a failed lease renewal.
#[cfg(feature = "etcd")]
const RENEW_RETRY: Duration = Duration::from_millis(100);
/// How often a server that does not lead reads who leads.
pub const POLL: Duration = Duration::from_millis(100);
/// The header a forwarded call carries (the forwarding server's id): a server that does not
/// lead never forwards such a call again.
pub const FORWARDED: &str = "x-drover-forwarded-by";

/// Until when this server may act as leader: the lease as this side surely holds it.
pub struct Authority {
    until: Mutex<Instant>,
}

impl Authority {
    pub fn new(until: Instant) -> Authority {
        Authority {
            until: Mutex::new(until),
        }
    }

    /// The lease surely holds now.
    pub fn holds(&self) -> bool {
        Instant::now() < *self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn until(&self) -> Instant {
        *self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn extend(&self, until: Instant) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = until;
    }

    /// Take the authority away at once.
    pub fn revoke(&self) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

/// This server's role and what it knows of the others.
pub struct Node {
    pub me: ServerView,
    store: &'static str,
    state: Mutex<NodeState>,
    proxy: reqwest::Client,
    /// The reads this server answers itself while it does not lead (several servers only).
    reads: Option<Arc<crate::follower::Reads>>,
}

#[derive(Default)]
struct NodeState {
    /// The engine and API of the term this server leads, if it leads.
    term: Option<(Arc<Engine>, Router)>,
    leader: Option<ServerView>,
    problem: Option<String>,
}

impl Node {
    pub fn new(
        me: ServerView,
        store: &'static str,
        ca_file: Option<&std::path::Path>,
        reads: Option<Arc<crate::follower::Reads>>,
    ) -> Result<Node, crate::ServerError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| crate::ServerError::Io(ca.display().to_string(), e))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                crate::ServerError::Internal(format!("the CA {}: {e}", ca.display()))
            })?;
            b = b.add_root_certificate(cert);
        }
        let proxy = b
            .build()
            .map_err(|e| crate::ServerError::Internal(format!("the forwarding client: {e}")))?;
        Ok(Node {
            me,
            store,
            state: Mutex::new(NodeState::default()),
            proxy,
            reads,
        })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine of the term this server leads.
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.st().term.as_ref().map(|(e, _)| e.clone())
    }

    fn router(&self) -> Option<Router> {
        self.st().term.as_ref().map(|(_, r)| r.clone())
    }

    /// This server leads from now on, with this engine.
    pub(crate) fn lead(&self, engine: Arc<Engine>, router: Router, since_ms: u64) {
        let mut st = self.st();
        st.term = Some((engine, router));
        st.leader = Some(ServerView {
            since_ms: Some(since_ms),
            ..self.me.clone()
        });
        st.problem = None;
    }

    /// This server no longer leads; it answers as a follower from now on.
    pub fn step_down(&self, why: &str) -> Option<Arc<Engine>> {
        let mut st = self.st();
        st.leader = None;
        st.problem = Some(why.to_string());
        st.term.take().map(|(e, _)| e)
    }

    /// Another server leads (or nobody, with the reason).
    pub fn follow(&self, leader: Option<ServerView>, problem: Option<String>) {
        let mut st = self.st();
        st.leader = leader;
        st.problem = problem;
    }

    pub fn health(&self) -> Health {
        let st = self.st();
        let role = if st.term.is_some() {
            "leader"
        } else if st.leader.is_some() {
            "follower"
        } else {
            "candidate"
        };
        Health {
            ok: true,
            role: role.into(),
            server: Some(self.me.clone()),
            leader: st.leader.clone(),
            store: self.store.into(),
            problem: if st.leader.is_none() {
                st.problem.clone()
            } else {
                None
            },
        }
    }
}

/// The API as every server serves it: health here, the rest to this server's engine when it
/// leads, else forwarded to the leader.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .fallback(dispatch)
        .with_state(node)
}

async fn health(State(node): State<Arc<Node>>) -> Json<Health> {
    Json(node.health())
}

fn unavailable(code: &str, message: String) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::RETRY_AFTER, "1")],
        Json(ApiError {
            code: code.into(),
            message,
            errors: Vec::new(),
        }),
    )
        .into_response()
}

/// Headers that belong to one connection, not to the call.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if !hop_by_hop(k) {
            to.append(k.clone(), v.clone());
        }
    }
}

async fn dispatch(State(node): State<Arc<Node>>, req: Request) -> Response {
    if let Some(r) = node.router() {
        return match r.oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
    }
    if let Some(reads) = node.reads.as_ref().filter(|r| r.serves(&req)) {
        return reads.answer(&node.me.id, req).await;
    }
    let health = node.health();
    let Some(leader) = health.leader.filter(|l| l.id != node.me.id) else {
        return unavailable(
            "no_leader",
            format!(
                "no server of the control plane leads now ({}); changes and agent calls wait for a leader: check the other servers (`GET /v1/health`) and the store (`etcdctl endpoint status --cluster`); instances keep running meanwhile",
                health
                    .problem
                    .unwrap_or_else(|| "an election is under way".into())
            ),
        );
    };
    if req.headers().contains_key(FORWARDED) {
        return unavailable(
            "no_leader",
            format!(
                "this server ({}) was sent a forwarded call but does not lead; the leadership just moved: ask again",
                node.me.url
            ),
        );
    }
    forward(&node, &leader, req).await
}

async fn forward(node: &Node, leader: &ServerView, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, crate::api::MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return crate::ServerError::BodyTooLarge {
                limit: crate::api::MAX_BODY,
            }
            .into_response()
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let url = format!("{}{path}", leader.url.trim_end_matches('/'));
    let mut headers = HeaderMap::new();
    copy_headers(&parts.headers, &mut headers);
    if let Ok(v) = node.me.id.parse() {
        headers.insert(FORWARDED, v);
    }
    let sent = node
        .proxy
        .request(parts.method, &url)
        .headers(headers)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let mut out = Response::builder().status(resp.status());
            if let Some(h) = out.headers_mut() {
                copy_headers(resp.headers(), h);
                // The same framing as the leader's answer (a long-poll's too).
                if let Some(len) = resp.headers().get(axum::http::header::CONTENT_LENGTH) {
                    h.insert(axum::http::header::CONTENT_LENGTH, len.clone());
                }
            }
            out.body(Body::from_stream(resp.bytes_stream()))
                .unwrap_or_else(|e| {
                    crate::ServerError::Internal(format!("forwarding: {e}")).into_response()
                })
        }
        Err(e) => unavailable(
            "leader_unreachable",
            format!(
                "this server ({}) does not lead and cannot reach the leader {} at {}: {e}; a new leader is chosen within about {} s of a leader's loss: ask again",
                node.me.url,
                leader.id,
                leader.url,
                LEASE_TTL.as_secs() + 1
            ),
        ),
    }
}

/// Campaign for the lead on etcd until `stop`: follow while another server leads, lead while
/// the lease holds, step down at once when it does not, and campaign again.
#[cfg(feature = "etcd")]
pub(crate) async fn campaign(
    node: Arc<Node>,
    etcd: Arc<drover_store::EtcdStore>,
    shared: Arc<crate::Shared>,
    stop: tokio_util::sync::CancellationToken,
) {
    use drover_store::LeaderInfo;
    let mut logged_problem: Option<String> = None;
    while !stop.is_cancelled() {
        let me = LeaderInfo {
            id: node.me.id.clone(),
            url: node.me.url.clone(),
            since_ms: crate::engine::now_ms(),
        };
        // A leader known from a read older than a lease may be gone: the read is bounded.
        let read = match tokio::time::timeout(LEASE_TTL, etcd.leader()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "etcd did not say who leads within {} s: the cluster has probably lost quorum; check `etcdctl endpoint status --cluster`",
                LEASE_TTL.as_secs()
            )),
        };
        let outcome = match read {
            Ok(Some(l)) if l.leader.id != node.me.id => {
                node.follow(
                    Some(ServerView {
                        id: l.leader.id,
                        url: l.leader.url,
                        since_ms: Some(l.leader.since_ms),
                    }),
                    None,
                );
                logged_problem = None;
                None
            }
            Ok(_) => match etcd.try_lead(&me, LEASE_TTL).await {
                Ok(Some(lease)) => Some(lease),
                Ok(None) => None,
                Err(e) => {
                    node.follow(None, Some(e.to_string()));
                    None
                }
            },
            Err(p) => {
                if logged_problem.as_deref() != Some(p.as_str()) {
                    tracing::warn!("cannot tell who leads: {p}");
                    logged_problem = Some(p.clone());
                }
                node.follow(None, Some(p));
                None
            }
        };
        let Some(lease) = outcome else {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(POLL) => {}
            }
            continue;
        };
        lead_term(&node, &etcd, &shared, lease, me.since_ms, &stop).await;
    }
}

/// One term: start the engine, keep the lease alive, end the term when it is lost (or at
/// `stop`).
#[cfg(feature = "etcd")]
async fn lead_term(
    node: &Arc<Node>,
    etcd: &Arc<drover_store::EtcdStore>,
    shared: &Arc<crate::Shared>,
    mut lease: drover_store::Lease,
    since_ms: u64,
    stop: &tokio_util::sync::CancellationToken,
) {
    let authority = Arc::new(Authority::new(lease.valid_until()));
    let took = Instant::now();
    tracing::info!(
        term = lease.create_revision,
        "this server took the lead; starting"
    );
    let term = match shared.start_term(Some(authority.clone()), since_ms).await {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("cannot start leading: {e}");
            authority.revoke();
            let _ = etcd.resign(lease).await;
            node.follow(None, Some(format!("the last leader could not start: {e}")));
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
    };
    node.lead(term.engine.clone(), term.router.clone(), since_ms);
    tracing::info!(
        term = lease.create_revision,
        "this server leads (its engine started in {} ms)",
        took.elapsed().as_millis()
    );
    // After a failed renewal the next one goes out soon, not a third of a lease later: a
    // keep-alive stream on a member just lost fails once, and a new one reaches another.
    let mut failed = false;
    let why = loop {
        let pause = if failed { RENEW_RETRY } else { lease.ttl() / 3 };
        let renew_at = tokio::time::Instant::now() + pause;
        tokio::select! {
            _ = stop.cancelled() => break None,
            _ = tokio::time::sleep_until(renew_at) => {}
        }
        let deadline = tokio::time::Instant::from_std(lease.valid_until());
        let renewed = tokio::select! {
            r = etcd.keep_alive(&mut lease) => r,
            _ = tokio::time::sleep_until(deadline) => {
                break Some("the lease ran out before etcd renewed it".to_string());
            }
        };
        failed = renewed.is_err();
        match renewed {
            Ok(true) => authority.extend(lease.valid_until()),
            Ok(false) => {
                break Some("etcd says the lease expired (another server may lead)".into())
            }
            Err(e) if !authority.holds() => break Some(format!("the lease ran out: {e}")),
            Err(e) => tracing::warn!("lease keep-alive failed (retrying while it holds): {e}"),
        }
        if !authority.holds() {
            break Some("the lease ran out".into());
        }
    };
    authority.revoke();
    let reason = why.clone().unwrap_or_else(|| "the server stops".into());
    tracing::warn!("this server stops leading: {reason}");
    if let Some(engine) = node.step_down(&reason) {
        drop(engine);
    }
    shared
        .end_term(term, why.is_none().then_some(Duration::from_secs(15)))
        .await;
    let _ = etcd.resign(lease).await;
}
