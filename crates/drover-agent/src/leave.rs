//! Leave: long-poll the server for a permit, then drain (wait until the balancer holds no open
//! connection to this instance, at most the permit's drain timeout).
//!
//! Static stability: only a `200` answer whose body says `permit: true` starts a leave. An
//! unreachable server, a 404 (the server does not know this instance), any other status or an
//! unreadable body is logged (at most once a minute) and retried; the agent keeps running.

use std::time::{Duration, Instant};

use drover_model::api::{ConnectionsReply, PermitReply};
use reqwest::StatusCode;
use serde_json::from_slice;

use crate::report::{error_chain, Servers, Throttle};

/// How long the server may hold one permit long-poll.
pub(crate) const PERMIT_WAIT: Duration = Duration::from_secs(20);
/// Timeout of one permit request: the long-poll plus a margin.
const PERMIT_TIMEOUT: Duration = Duration::from_secs(25);
/// Pause after a failed permit request.
const RETRY: Duration = Duration::from_secs(1);
/// Shortest cycle of the long-poll: a server that answers `permit: false` at once cannot make
/// the agent spin (and a permit granted meanwhile is late by at most this).
const MIN_POLL: Duration = Duration::from_millis(50);
/// How often open connections are checked while draining.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// Timeout of one connections request.
const CONNECTIONS_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest reply body read from the server (both replies are a few dozen bytes).
const MAX_REPLY: usize = 16 * 1024;

/// The server's leave for this instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Permit {
    pub drain_timeout: Duration,
    pub reason: String,
    /// Whether the instance's capacity goes with it (see `PermitReply::decrement`).
    pub decrement: Option<bool>,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Drained {
    /// Open connections at the last successful check (None: never read).
    pub open: Option<u64>,
    pub took: Duration,
    /// The drain timeout ran out before the connections were seen to reach zero.
    pub timed_out: bool,
}

/// Talks to the server's permit and connections endpoints for one instance.
#[derive(Debug)]
pub(crate) struct Leave {
    client: reqwest::Client,
    servers: Servers,
    permit_url: String,
    connections_url: String,
    instance: String,
}

impl Leave {
    pub fn new(client: reqwest::Client, servers: Servers, instance: &str) -> Leave {
        Leave {
            client,
            permit_url: servers.url("/v1/agent/permit").1,
            connections_url: servers.url("/v1/agent/connections").1,
            servers,
            instance: instance.to_string(),
        }
    }

    /// A call to `path` on the current server; a server that does not answer, or says to ask
    /// another, makes the next call go to the next server.
    async fn call(
        &self,
        path: &str,
        query: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<reqwest::Response, String> {
        let (i, url) = self.servers.url(path);
        let sent = self
            .client
            .get(&url)
            .query(&[("instance", self.instance.as_str())])
            .query(query)
            .timeout(timeout)
            .send()
            .await;
        match sent {
            Err(e) => {
                self.servers.failed(i);
                Err(error_chain(&e))
            }
            Ok(r) => {
                if Servers::try_another(r.status()) {
                    self.servers.failed(i);
                }
                Ok(r)
            }
        }
    }

    /// Long-poll until the server grants a permit; never returns otherwise. Each `permit: false`
    /// answer is followed at once by the next poll, so a permit arrives as soon as it is granted.
    pub async fn wait_for_permit(&self) -> Permit {
        let mut throttle = Throttle::default();
        let wait_ms = PERMIT_WAIT.as_millis().to_string();
        loop {
            let started = Instant::now();
            match self.poll_permit(&wait_ms).await {
                Ok(answer) => {
                    if let Some(held_back) = throttle.recovered() {
                        tracing::info!(url = %self.permit_url, held_back, "permit polls reach the server again");
                    }
                    if let Some(permit) = answer {
                        return permit;
                    }
                    let spent = started.elapsed();
                    if spent < MIN_POLL {
                        tokio::time::sleep(MIN_POLL - spent).await;
                    }
                }
                Err(problem) => {
                    if let Some(held_back) = throttle.failed() {
                        tracing::warn!(url = %self.permit_url, %problem, held_back, "cannot poll the server for a permit; components keep running (logged at most once a minute)");
                    } else {
                        tracing::debug!(url = %self.permit_url, %problem, "permit poll failed");
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// One long-poll: Some only on a 200 whose body reads `permit: true`.
    async fn poll_permit(&self, wait_ms: &str) -> Result<Option<Permit>, String> {
        let resp = self
            .call("/v1/agent/permit", &[("wait_ms", wait_ms)], PERMIT_TIMEOUT)
            .await?;
        let reply: PermitReply =
            from_slice(&read_body(resp).await?).map_err(|e| format!("unreadable answer: {e}"))?;
        Ok(reply.permit.then(|| Permit {
            drain_timeout: Duration::from_millis(reply.drain_timeout_ms),
            reason: reply
                .reason
                .filter(|r| !r.trim().is_empty())
                .unwrap_or_else(|| "permit granted".to_string()),
            decrement: reply.decrement,
        }))
    }

    /// Open connections the balancer holds to this instance.
    async fn connections(&self) -> Result<u64, String> {
        let resp = self
            .call("/v1/agent/connections", &[], CONNECTIONS_TIMEOUT)
            .await?;
        let reply: ConnectionsReply =
            from_slice(&read_body(resp).await?).map_err(|e| format!("unreadable answer: {e}"))?;
        Ok(reply.open)
    }

    /// Check open connections every 100 ms until none is left or `timeout` has passed. A failed
    /// check counts as "still open": without evidence the agent waits out the full timeout.
    pub async fn drain(&self, timeout: Duration) -> Drained {
        let started = Instant::now();
        let mut open = None;
        let mut throttle = Throttle::default();
        let poll = async {
            let mut tick = tokio::time::interval(DRAIN_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match self.connections().await {
                    Ok(n) => {
                        throttle.recovered();
                        if open != Some(n) {
                            tracing::debug!(open = n, "connections still open");
                        }
                        open = Some(n);
                        if n == 0 {
                            return;
                        }
                    }
                    Err(problem) => {
                        if let Some(held_back) = throttle.failed() {
                            tracing::warn!(url = %self.connections_url, %problem, held_back, "cannot read open connections; waiting out the drain timeout unless they are seen to close");
                        }
                    }
                }
            }
        };
        let timed_out = tokio::time::timeout(timeout, poll).await.is_err();
        Drained {
            open,
            took: started.elapsed(),
            timed_out,
        }
    }
}

/// The body of a 200 answer; any other status or an oversized body is an error.
async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let status = resp.status();
    if status == StatusCode::NOT_FOUND {
        return Err("the server does not know this instance (404)".to_string());
    }
    if status != StatusCode::OK {
        return Err(format!("server answered {status}"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
        if body.len() + chunk.len() > MAX_REPLY {
            return Err(format!("answer longer than {MAX_REPLY} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
