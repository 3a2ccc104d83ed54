//! A simulated agent's side of drover's agent API (feature `agent`), for what speaks for
//! instances no real agent runs on (the load tool, the AWS test against moto): heartbeat
//! bodies, the heartbeat and its answer, the permit long-poll, the drain's connection count
//! and the end of a `sim` instance. One request per call: loops, timing and the HTTP clients
//! stay with the caller (the load tool shares a client among 500 agents and builds its URLs
//! once).

use std::time::Duration;

use drover_model::api::{
    AgentPhase, ComponentReport, ComponentState, ConnectionsReply, Heartbeat, HeartbeatReply,
    PermitReply,
};
use reqwest::{Client, RequestBuilder, StatusCode};

/// A permit long-poll that has not answered this long after its `wait_ms` has failed.
pub const POLL_GRACE: Duration = Duration::from_secs(5);

/// The agent API's URLs on one server, built once.
#[derive(Clone, Debug)]
pub struct Urls {
    pub heartbeat: String,
    pub permit: String,
    pub connections: String,
    pub exit: String,
}

impl Urls {
    /// The URLs under `server` (`http://HOST:PORT`, a trailing `/` or not).
    pub fn new(server: &str) -> Urls {
        let base = server.trim_end_matches('/');
        Urls {
            heartbeat: format!("{base}/v1/agent/heartbeat"),
            permit: format!("{base}/v1/agent/permit"),
            connections: format!("{base}/v1/agent/connections"),
            exit: format!("{base}/v1/agent/exit"),
        }
    }
}

/// The `Authorization` value of a token (an agent token, a join token): `Bearer TOKEN`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An instance, as its heartbeats name it.
#[derive(Clone, Copy, Debug)]
pub struct Instance<'a> {
    pub id: &'a str,
    pub group: &'a str,
    pub generation: u64,
    /// Its IP address.
    pub addr: &'a str,
}

/// A component's report with its state only: no pid, restart, exit, message or output.
pub fn component(name: &str, version: &str, state: ComponentState) -> ComponentReport {
    ComponentReport {
        name: name.to_string(),
        version: version.to_string(),
        state,
        pid: None,
        restarts: 0,
        last_exit: None,
        message: None,
        last_output: None,
    }
}

/// Heartbeat number `seq` of `instance`: no utilization measured, no drain reported.
pub fn heartbeat(
    instance: Instance<'_>,
    phase: AgentPhase,
    seq: u64,
    components: Vec<ComponentReport>,
) -> Heartbeat {
    Heartbeat {
        instance: instance.id.to_string(),
        group: instance.group.to_string(),
        generation: instance.generation,
        addr: instance.addr.to_string(),
        phase,
        seq,
        components,
        utilization: Default::default(),
        drained: None,
    }
}

/// A request of the agent API that did not get the answer it wanted.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Not delivered, or no whole answer: connection, timeout, a body cut short.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    /// The server answered with an error status.
    #[error("answered {status}: {body}")]
    Refused { status: StatusCode, body: String },
    /// A 2xx answer that is not what the endpoint returns.
    #[error("unreadable answer: {0}")]
    Body(#[from] serde_json::Error),
}

impl ApiError {
    /// The server answered (an error status or an unreadable body): the request got there.
    pub fn answered(&self) -> bool {
        !matches!(self, ApiError::Http(_))
    }

    /// A 404: the server does not know the instance (it forgot it, or never launched it).
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Refused { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

fn with_auth(rb: RequestBuilder, auth: Option<&str>) -> RequestBuilder {
    match auth {
        Some(a) => rb.header(reqwest::header::AUTHORIZATION, a),
        None => rb,
    }
}

/// Sends `rb` and reads a 2xx answer's body with `read`; an error status is
/// [`ApiError::Refused`].
async fn answer<T>(
    rb: RequestBuilder,
    read: impl FnOnce(&[u8]) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let resp = rb.send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if status.is_success() {
        read(&body)
    } else {
        Err(ApiError::Refused {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    Ok(serde_json::from_slice(body)?)
}

/// `POST /v1/agent/heartbeat` with `auth` (the `Authorization` value, see [`bearer`]). `None`:
/// a 2xx whose body is not a [`HeartbeatReply`].
pub async fn send_heartbeat(
    client: &Client,
    urls: &Urls,
    auth: Option<&str>,
    hb: &Heartbeat,
    timeout: Duration,
) -> Result<Option<HeartbeatReply>, ApiError> {
    let rb = with_auth(client.post(&urls.heartbeat), auth)
        .timeout(timeout)
        .json(hb);
    answer(rb, |b| Ok(serde_json::from_slice(b).ok())).await
}

/// One permit long-poll (`GET /v1/agent/permit`): the server answers within `wait_ms`
/// (`permit: false` when none came), else it fails [`POLL_GRACE`] later.
pub async fn poll_permit(
    client: &Client,
    urls: &Urls,
    auth: Option<&str>,
    instance: &str,
    wait_ms: u64,
) -> Result<PermitReply, ApiError> {
    let rb = with_auth(client.get(&urls.permit), auth)
        .query(&[("instance", instance)])
        .query(&[("wait_ms", wait_ms)])
        .timeout(Duration::from_millis(wait_ms) + POLL_GRACE);
    answer(rb, json).await
}

/// The balancer's open connections to `instance` (`GET /v1/agent/connections`), what a
/// draining agent waits on.
pub async fn open_connections(
    client: &Client,
    urls: &Urls,
    auth: Option<&str>,
    instance: &str,
    timeout: Duration,
) -> Result<u64, ApiError> {
    let rb = with_auth(client.get(&urls.connections), auth)
        .query(&[("instance", instance)])
        .timeout(timeout);
    let reply: ConnectionsReply = answer(rb, json).await?;
    Ok(reply.open)
}

/// `POST /v1/agent/exit`: the instance (of a `sim` region) ended, `status` says why (at most
/// 200 bytes). What a process exit is to the `local` provider. `true`: this call ended it
/// (the answer's `ended`; `false`, it had ended already).
pub async fn report_exit(
    client: &Client,
    urls: &Urls,
    auth: Option<&str>,
    instance: &str,
    status: &str,
    timeout: Duration,
) -> Result<bool, ApiError> {
    #[derive(serde::Deserialize)]
    struct Ended {
        ended: bool,
    }
    let rb = with_auth(client.post(&urls.exit), auth)
        .json(&serde_json::json!({"instance": instance, "status": status}))
        .timeout(timeout);
    let reply: Ended = answer(rb, json).await?;
    Ok(reply.ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_http::{Answer, FakeHttp};

    #[tokio::test]
    async fn each_request_says_what_the_server_answered() {
        let server = FakeHttp::start(|r| match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/v1/agent/heartbeat") if r.header("authorization") == Some("Bearer t") => {
                Answer::Json(200, r#"{"known":true,"leave_soon":false}"#.into())
            }
            ("POST", "/v1/agent/heartbeat") => Answer::Json(401, "no token".into()),
            ("GET", "/v1/agent/permit") if r.query.contains("instance=i-1") => Answer::Json(
                200,
                r#"{"permit":true,"drain_timeout_ms":500,"decrement":false}"#.into(),
            ),
            ("GET", "/v1/agent/connections") => Answer::Json(200, r#"{"open":3}"#.into()),
            ("POST", "/v1/agent/exit") => Answer::Json(200, r#"{"ended":true}"#.into()),
            ("GET", "/v1/agent/permit") if r.query.contains("instance=i-2") => Answer::Hold,
            _ => Answer::Json(404, "no such instance".into()),
        })
        .await;
        let (client, urls) = (Client::new(), Urls::new(&format!("{}/", server.url())));
        let auth = bearer("t");
        let hb = heartbeat(
            Instance {
                id: "i-1",
                group: "web/r1",
                generation: 4,
                addr: "127.0.0.1",
            },
            AgentPhase::Running,
            7,
            vec![component("app", "v2", ComponentState::Healthy)],
        );
        let second = Duration::from_secs(5);
        let reply = send_heartbeat(&client, &urls, Some(&auth), &hb, second).await;
        let reply = reply.unwrap().expect("a reply");
        assert!(reply.known && !reply.wants_permit_poll());
        let sent: Heartbeat = serde_json::from_slice(&server.requests()[0].body).unwrap();
        assert_eq!(sent, hb);
        assert!(hb.healthy());

        let refused = send_heartbeat(&client, &urls, None, &hb, second)
            .await
            .unwrap_err();
        assert!(refused.answered() && !refused.is_not_found(), "{refused}");
        assert_eq!(refused.to_string(), "answered 401 Unauthorized: no token");

        let p = poll_permit(&client, &urls, Some(&auth), "i-1", 20)
            .await
            .unwrap();
        assert_eq!(
            (p.permit, p.drain_timeout_ms, p.decrement),
            (true, 500, Some(false))
        );
        let permit = &server.requests()[2];
        assert_eq!(permit.query, "instance=i-1&wait_ms=20");
        let forgotten = poll_permit(&client, &urls, Some(&auth), "i-9", 20).await;
        assert!(forgotten.unwrap_err().is_not_found());
        // A held long-poll fails once its wait and the grace are over; here the client's own
        // timeout, shorter, ends it first.
        let held = tokio::time::timeout(
            Duration::from_millis(300),
            poll_permit(&client, &urls, None, "i-2", 10),
        )
        .await;
        assert!(held.is_err(), "a held long-poll does not answer");

        let open = open_connections(&client, &urls, Some(&auth), "i-1", second).await;
        assert_eq!(open.unwrap(), 3);
        let ended = report_exit(&client, &urls, Some(&auth), "i-1", "left", second).await;
        assert!(ended.unwrap(), "the answer's `ended`");
        let exit = server.requests().last().unwrap().clone();
        let body: serde_json::Value = serde_json::from_slice(&exit.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"instance": "i-1", "status": "left"})
        );
        assert_eq!(exit.header("Authorization"), Some("Bearer t"));

        let down = Urls::new("http://127.0.0.1:1");
        let err = send_heartbeat(&client, &down, None, &hb, second)
            .await
            .unwrap_err();
        assert!(!err.answered(), "{err}");
    }
}
