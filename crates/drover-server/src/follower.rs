//! The reads a server that does not lead answers itself, from the store: revisions, events
//! (not followed), plans and the token list. Everything else (status, metrics, logs, event
//! streams, the dashboard, every change and agent report) is the leader's, and forwarded.
//!
//! Only calls with a bearer token are answered here (the dashboard's, by session cookie, go
//! to the leader, where the sessions are). Each read authenticates against the tokens as
//! stored at that moment (read again per call), so a token revoked on the leader is refused
//! here at once, and answers with the same body the leader would give (the same scrubbing of
//! secret values). The answer carries `x-drover-served-by: ID`, this server's id.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::Json;
use drover_store::Store;

use crate::auth::{Auth, Caller};
use crate::ServerError;

/// The header that names the server that answered a read itself.
pub const SERVED_BY: &str = "x-drover-served-by";

/// What a follower needs to answer reads: the store and the tokens in it.
pub struct Reads {
    store: Arc<dyn Store>,
    auth: Auth,
}

/// The reads a follower answers itself.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    Revisions,
    Revision(String),
    Events,
    Plan(String, String, String),
    Tokens,
}

fn read_of(method: &Method, path: &str, query: Option<&str>) -> Option<Read> {
    if method != Method::GET {
        return None;
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "revisions"] => Some(Read::Revisions),
        ["v1", "revisions", n] => Some(Read::Revision(n.to_string())),
        // A follow stream waits on the leader's live events: forwarded.
        ["v1", "events"] if !follows(query) => Some(Read::Events),
        ["v1", "plans", s, r, g] => Some(Read::Plan(s.to_string(), r.to_string(), g.to_string())),
        ["v1", "tokens"] => Some(Read::Tokens),
        _ => None,
    }
}

/// Whether an events query asks to follow (`follow=true`, `follow=1`).
fn follows(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .any(|(k, v)| k == "follow" && v != "false" && v != "0")
    })
}

impl Reads {
    pub fn new(store: Arc<dyn Store>, data_dir: &std::path::Path) -> Result<Reads, ServerError> {
        let auth = Auth::load(&*store, data_dir, Default::default())?;
        Ok(Reads { store, auth })
    }

    /// Whether this is a read a follower answers itself: one with a bearer token. A call
    /// without (the dashboard's, by its session cookie) is the leader's: sessions live there.
    pub fn serves(&self, req: &Request) -> bool {
        req.headers().contains_key(header::AUTHORIZATION)
            && read_of(req.method(), req.uri().path(), req.uri().query()).is_some()
    }

    /// Answer a read (one [`Reads::serves`] accepted), off the async workers.
    pub async fn answer(self: &Arc<Self>, me: &str, req: Request) -> Response {
        let reads = self.clone();
        let answered = tokio::task::spawn_blocking(move || reads.answer_blocking(req)).await;
        let mut resp = match answered {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => e.into_response(),
            Err(e) => ServerError::Internal(format!("a follower's read: {e}")).into_response(),
        };
        if let Ok(v) = HeaderValue::from_str(me) {
            resp.headers_mut().insert(SERVED_BY, v);
        }
        resp
    }

    fn answer_blocking(&self, req: Request) -> Result<Response, ServerError> {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let Some(read) = read_of(&method, &path, req.uri().query()) else {
            return Err(ServerError::Internal(format!(
                "{method} {path} is not a read a follower answers"
            )));
        };
        // Tokens as stored now: one the leader just made or revoked counts at once.
        self.auth.refresh(&*self.store)?;
        let caller = self.caller(&req)?;
        crate::auth::allow(crate::auth::need(&method, &path), &caller, &method, &path)?;
        let store = &*self.store;
        Ok(match read {
            Read::Revisions => {
                let sc = self.scrubber()?;
                Json(crate::api::scrub_summaries(store.revisions()?, &sc)).into_response()
            }
            Read::Revision(n) => {
                let n = crate::api::revision_number(&n)?;
                Json(crate::api::revision_served(n, store.revision(n)?)?).into_response()
            }
            Read::Events => {
                let q = crate::api::events_query(axum::extract::Query::try_from_uri(req.uri()))?;
                let filter = crate::api::events_filter(&q)?;
                let sc = self.scrubber()?;
                let mut evs = store.events(&filter)?;
                for ev in &mut evs {
                    sc.scrub_in_place(&mut ev.message);
                }
                Json(evs).into_response()
            }
            Read::Plan(s, r, g) => {
                Json(crate::api::plan_served(store, &caller, &s, &r, &g)?).into_response()
            }
            Read::Tokens => Json(self.auth.list()).into_response(),
        })
    }

    /// The caller, by bearer token.
    fn caller(&self, req: &Request) -> Result<Caller, ServerError> {
        self.auth
            .authenticate(req.headers().get(header::AUTHORIZATION))
    }

    /// Replaces the current fleet's secret values in free text (the latest revision's).
    fn scrubber(&self) -> Result<drover_model::secret::Scrubber, ServerError> {
        let last = self.store.revisions()?.last().map(|r| r.number);
        let fleet = match last {
            Some(n) => self.store.revision(n)?.map(|r| r.fleet),
            None => None,
        };
        Ok(drover_model::secret::Scrubber::for_fleet(fleet.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_of_the_store_are_answered_by_a_follower() {
        let get = Method::GET;
        assert_eq!(read_of(&get, "/v1/revisions", None), Some(Read::Revisions));
        assert_eq!(
            read_of(&get, "/v1/revisions/3", None),
            Some(Read::Revision("3".into()))
        );
        assert_eq!(
            read_of(&get, "/v1/events", Some("limit=5&newest=true")),
            Some(Read::Events)
        );
        assert_eq!(
            read_of(&get, "/v1/events", Some("follow=false")),
            Some(Read::Events)
        );
        assert_eq!(read_of(&get, "/v1/events", Some("follow=true")), None);
        assert_eq!(read_of(&get, "/v1/events", Some("kind=x&follow=1")), None);
        assert_eq!(
            read_of(&get, "/v1/plans/web/local/2", None),
            Some(Read::Plan("web".into(), "local".into(), "2".into()))
        );
        assert_eq!(read_of(&get, "/v1/tokens", None), Some(Read::Tokens));
        for path in [
            "/v1/status",
            "/metrics",
            "/v1/logs",
            "/ui/",
            "/v1/agent/peers",
        ] {
            assert_eq!(read_of(&get, path, None), None, "{path}");
        }
        assert_eq!(read_of(&Method::POST, "/v1/tokens", None), None);
        assert_eq!(read_of(&Method::DELETE, "/v1/tokens/t-000001", None), None);
    }
}
