//! The CLI's HTTP client of the server API, and what each command prints.

use std::path::Path;

use anyhow::Context;
use drover_model::api::{
    ApiError, ApplyRequest, ApplyResponse, DeployRequest, FleetStatus, RevisionSummary,
    RollbackRequest,
};
use drover_model::Event;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::exit;
use crate::render;
use crate::terminal;

/// The server could not be reached at this URL.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot reach the drover server at {}", self.0)
    }
}

impl std::error::Error for Unreachable {}

/// `url` on another server (same path and query).
fn rebase(url: &reqwest::Url, base: &str) -> anyhow::Result<reqwest::Url> {
    let mut path = url.path().to_string();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    reqwest::Url::parse(&format!("{base}{path}"))
        .with_context(|| format!("{base} is not a server URL"))
}

/// Another server may answer what this one could not: it did not answer, or it has no leader
/// to forward to (`no_leader`, `leader_unreachable`).
fn moves_on(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Unreachable>().is_some()
        || e.downcast_ref::<Refused>().is_some_and(|r| {
            matches!(
                r.0.code.as_str(),
                "no_leader" | "leader_unreachable" | "not_leader"
            )
        })
}

pub struct Client {
    /// Every server given (`--server URL[,URL...]`); calls go to `current` and move on to the
    /// next when one does not answer or has no leader to forward to.
    servers: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    http: reqwest::Client,
    json: bool,
}

pub struct EventArgs {
    pub follow: bool,
    pub after: u64,
    pub limit: Option<usize>,
    pub since: Option<drover_model::Dur>,
    pub group: Option<String>,
    pub instance: Option<String>,
    pub kind: Option<String>,
}

impl Client {
    /// A client with the token and CA of `access` on every request.
    pub fn with_access(access: &crate::access::Access, json: bool) -> anyhow::Result<Client> {
        let servers: Vec<String> = access
            .server
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        anyhow::ensure!(
            !servers.is_empty(),
            "--server needs a URL (or several, comma separated)"
        );
        Ok(Client {
            servers,
            current: Default::default(),
            http: access.client()?,
            json,
        })
    }

    fn base(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed) % self.servers.len();
        &self.servers[i]
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Send a request to the current server; when it does not answer (or answers 502/503
    /// without a leader to forward to), to the next, until each was tried once.
    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let request = req.build().context("cannot build the request")?;
        let n = self.servers.len();
        let first = self.current.load(std::sync::atomic::Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let Some(mut attempt) = request.try_clone() else {
                return self.send_to(&self.servers[first], request).await;
            };
            if k > 0 {
                let url = rebase(attempt.url(), &self.servers[i])?;
                *attempt.url_mut() = url;
            }
            match self.send_to(&self.servers[i], attempt).await {
                Err(e) if n > 1 && moves_on(&e) => {
                    self.current
                        .store((i + 1) % n, std::sync::atomic::Ordering::Relaxed);
                    last = Some(e);
                }
                other => {
                    self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    return other;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no server given")))
    }

    async fn send_to(
        &self,
        base: &str,
        request: reqwest::Request,
    ) -> anyhow::Result<reqwest::Response> {
        let resp = self.http.execute(request).await.map_err(|e| {
            let chain = {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(x) = src {
                    s.push_str(&format!(": {x}"));
                    src = x.source();
                }
                s
            };
            let lower = chain.to_ascii_lowercase();
            if lower.contains("certificate") || lower.contains("handshake") {
                anyhow::anyhow!(
                    "cannot verify the TLS certificate of the drover server at {}: {chain}\n  pass the server's CA with --ca FILE (DATA_DIR/ca.pem of the server) or DROVER_CA, or --insecure to skip verification",
                    base
                )
            } else if e.is_connect() || e.is_timeout() {
                anyhow::Error::new(Unreachable(base.to_string()))
            } else {
                anyhow::Error::new(e).context("request failed")
            }
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<ApiError>(&body) {
            Ok(err) => Err(anyhow::Error::new(Refused(err))),
            Err(_) => anyhow::bail!(
                "server answered {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        resp.json()
            .await
            .context("the server's answer is not what this CLI expects")
    }

    pub async fn apply(&self, file: &Path, dry_run: bool, force_file: bool) -> anyhow::Result<u8> {
        let toml = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let req = ApplyRequest {
            file: file.display().to_string(),
            toml,
            dry_run,
            force_file,
        };
        let resp = self
            .send(self.http.post(self.url("/v1/apply")).json(&req))
            .await;
        let resp: ApplyResponse = match resp {
            Ok(r) => r.json().await?,
            Err(e) => return self.refused(e),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&resp)?);
        } else {
            render::apply(&resp, dry_run);
        }
        Ok(exit::OK)
    }

    /// Print a refusal with every located problem; exit code 1.
    fn refused(&self, e: anyhow::Error) -> anyhow::Result<u8> {
        match e.downcast::<Refused>() {
            Ok(Refused(err)) => {
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&err)?);
                } else if err.errors.is_empty() {
                    eprintln!("error: {}", err.message);
                } else {
                    for fe in &err.errors {
                        eprintln!("{fe}");
                    }
                    eprintln!("{} problem(s) found; nothing was changed", err.errors.len());
                }
                Ok(exit::FAILED)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn deploy(
        &self,
        service: &str,
        component: &str,
        version: &str,
        regions: &[String],
        dry_run: bool,
        wait: Option<std::time::Duration>,
    ) -> anyhow::Result<u8> {
        let req = DeployRequest {
            service: service.into(),
            component: component.into(),
            version: version.into(),
            dry_run,
            regions: regions.to_vec(),
        };
        let what = format!("{service} {component} {version}");
        self.change("/v1/deploy", &req, service, &what, dry_run, wait)
            .await
    }

    pub async fn rollback(
        &self,
        service: &str,
        dry_run: bool,
        wait: Option<std::time::Duration>,
    ) -> anyhow::Result<u8> {
        let req = RollbackRequest {
            service: service.into(),
            dry_run,
        };
        let what = format!("rollback of {service}");
        self.change("/v1/rollback", &req, service, &what, dry_run, wait)
            .await
    }

    /// POST a change, print it, and with `wait` follow the rollout of `service`.
    async fn change<T: serde::Serialize>(
        &self,
        path: &str,
        req: &T,
        service: &str,
        what: &str,
        dry_run: bool,
        wait: Option<std::time::Duration>,
    ) -> anyhow::Result<u8> {
        let resp: ApplyResponse = match self.send(self.http.post(self.url(path)).json(req)).await {
            Ok(r) => r.json().await?,
            Err(e) => return self.refused(e),
        };
        if self.json && wait.is_none() {
            println!("{}", serde_json::to_string_pretty(&resp)?);
            return Ok(exit::OK);
        }
        if !self.json {
            render::apply(&resp, dry_run);
        }
        match wait {
            // Nothing new (the version is already preferred): follow the rollout still in
            // progress, if any, to its end all the same.
            Some(timeout) if resp.applied || !dry_run => {
                crate::progress::follow(self, service, what, timeout, self.json, resp.applied).await
            }
            _ => Ok(exit::OK),
        }
    }

    pub async fn scale(
        &self,
        service: &str,
        desired: u32,
        region: Option<String>,
    ) -> anyhow::Result<u8> {
        let req = drover_model::api::ScaleRequest {
            service: service.into(),
            region,
            desired,
        };
        let resp: drover_model::api::ScaleResponse = match self
            .send(self.http.post(self.url("/v1/scale")).json(&req))
            .await
        {
            Ok(r) => r.json().await?,
            Err(e) => return self.refused(e),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&resp)?);
        } else {
            for g in &resp.groups {
                println!("{}: desired {} -> {}", g.group, g.from, g.to);
            }
        }
        Ok(exit::OK)
    }

    pub async fn rollout(
        &self,
        service: &str,
        region: Option<String>,
        action: drover_model::api::RolloutAction,
    ) -> anyhow::Result<u8> {
        let req = drover_model::api::RolloutActionRequest {
            service: service.into(),
            region,
            action,
        };
        self.call(
            self.http.post(self.url("/v1/rollout")).json(&req),
            |r: &drover_model::api::RolloutActionResponse| {
                r.groups
                    .iter()
                    .map(|g| format!("{}: generation {}: {}", g.group, g.generation, g.result))
                    .collect::<Vec<_>>()
                    .join("\n")
            },
        )
        .await
    }

    pub async fn fleet_status(&self) -> anyhow::Result<FleetStatus> {
        self.get("/v1/status").await
    }

    /// Every event of one instance, in order.
    pub async fn instance_events(&self, instance: &str) -> anyhow::Result<Vec<Event>> {
        let q = [("instance", instance)];
        let resp = self
            .send(self.http.get(self.url("/v1/events")).query(&q))
            .await?;
        Ok(resp.json().await?)
    }

    pub async fn rollout_events(&self, group: &str) -> anyhow::Result<Vec<Event>> {
        let q = [("kind", "rollout"), ("group", group)];
        let resp = self
            .send(self.http.get(self.url("/v1/events")).query(&q))
            .await?;
        Ok(resp.json().await?)
    }

    /// `drover destroy`: remove SERVICE (or every service); with `wait`, until every removed
    /// group's instances are gone and its provider reported its resources removed.
    pub async fn destroy(
        &self,
        service: Option<String>,
        dry_run: bool,
        wait: Option<std::time::Duration>,
    ) -> anyhow::Result<u8> {
        let before: FleetStatus = match self.get("/v1/status").await {
            Ok(s) => s,
            Err(e) => return self.refused(e),
        };
        let groups: Vec<drover_model::api::GroupStatus> = before
            .groups
            .into_iter()
            .filter(|g| match &service {
                Some(s) => *s == g.service,
                None => true,
            })
            .collect();
        let after = self.last_event_seq().await?;
        let req = drover_model::api::DestroyRequest {
            service: service.clone(),
            dry_run,
        };
        let resp: ApplyResponse = match self
            .send(self.http.post(self.url("/v1/destroy")).json(&req))
            .await
        {
            Ok(r) => r.json().await?,
            Err(e) => return self.refused(e),
        };
        if self.json && wait.is_none() {
            println!("{}", serde_json::to_string_pretty(&resp)?);
            return Ok(exit::OK);
        }
        if !self.json {
            render::apply(&resp, dry_run);
        }
        let Some(timeout) = wait.filter(|_| resp.applied) else {
            return Ok(exit::OK);
        };
        // Groups whose provider keeps resources report "<group> removed: ..."; every group's
        // instances report "terminated".
        let deadline = std::time::Instant::now() + timeout;
        let mut pending: std::collections::BTreeSet<String> = groups
            .iter()
            .filter(|g| g.provider == "aws")
            .map(|g| g.group.clone())
            .collect();
        let mut seen = after;
        while !pending.is_empty() {
            let q = [
                ("kind", "provider".to_string()),
                ("after", seen.to_string()),
            ];
            let events: Vec<Event> = self
                .send(self.http.get(self.url("/v1/events")).query(&q))
                .await?
                .json()
                .await?;
            for e in &events {
                seen = seen.max(e.seq);
                if let Some((g, _)) = e.message.split_once(" removed: ") {
                    if pending.remove(g) && !self.json {
                        println!("{}", crate::render::printable(&e.message));
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                eprintln!(
                    "error: still removing {} after {}; see `drover events --kind provider`",
                    pending.iter().cloned().collect::<Vec<_>>().join(", "),
                    drover_model::Dur(timeout)
                );
                return Ok(exit::FAILED);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&resp)?);
        } else {
            println!("destroyed");
        }
        Ok(exit::OK)
    }

    /// The newest event's sequence number (0 when there is none).
    async fn last_event_seq(&self) -> anyhow::Result<u64> {
        let mut after = 0;
        loop {
            let q = [("after", after.to_string()), ("limit", "10000".to_string())];
            let events: Vec<Event> = self
                .send(self.http.get(self.url("/v1/events")).query(&q))
                .await?
                .json()
                .await?;
            match events.last() {
                Some(e) if events.len() == 10000 => after = e.seq,
                Some(e) => return Ok(e.seq),
                None => return Ok(after),
            }
        }
    }

    /// Summaries by default (`GET /v1/status?instances=none`); a small fleet's instances, one
    /// group's page of instances, or with `all` every instance.
    pub async fn status(&self, a: StatusArgs) -> anyhow::Result<u8> {
        let path = match &a.group {
            Some(g) => {
                let group = if g.contains('/') {
                    g.clone()
                } else {
                    // A service with one region.
                    let summary: FleetStatus = match self.get("/v1/status?instances=none").await {
                        Ok(s) => s,
                        Err(e) => return self.refused(e),
                    };
                    let mine: Vec<&str> = summary
                        .groups
                        .iter()
                        .filter(|x| x.service == *g)
                        .map(|x| x.group.as_str())
                        .collect();
                    match mine.as_slice() {
                        [one] => one.to_string(),
                        [] => anyhow::bail!("no service {g:?}; `drover status` lists the groups"),
                        many => anyhow::bail!(
                            "service {g:?} runs in {} regions; name one group: {}",
                            many.len(),
                            many.join(", ")
                        ),
                    }
                };
                format!(
                    "/v1/status?group={}&page={}&per_page={}",
                    url_escape(&group),
                    a.page.max(1),
                    a.per_page.clamp(1, 1000)
                )
            }
            None if a.all => "/v1/status".to_string(),
            None => "/v1/status?instances=none".to_string(),
        };
        let mut s: FleetStatus = match self.get(&path).await {
            Ok(s) => s,
            Err(e) => return self.refused(e),
        };
        let total: u32 = s
            .groups
            .iter()
            .map(|g| g.rollout.current + g.rollout.stale)
            .sum();
        if a.group.is_none() && !a.all && total <= SMALL_FLEET {
            // A small fleet: every instance, as before.
            s = match self.get("/v1/status").await {
                Ok(s) => s,
                Err(e) => return self.refused(e),
            };
        }
        let listing = match &a.group {
            Some(_) => render::Listing::Page {
                page: a.page.max(1),
                per_page: a.per_page.clamp(1, 1000),
            },
            None if a.all || total <= SMALL_FLEET => render::Listing::All,
            None => render::Listing::Summary,
        };
        // The server that answered: its role, and who leads.
        s.control_plane = self.get("/v1/health").await.ok();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", render::status(&s, listing));
        }
        Ok(exit::OK)
    }

    pub async fn history(&self) -> anyhow::Result<u8> {
        let revs: Vec<RevisionSummary> = match self.get("/v1/revisions").await {
            Ok(r) => r,
            Err(e) => return self.refused(e),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&revs)?);
        } else {
            println!("{}", render::history(&revs));
        }
        Ok(exit::OK)
    }

    pub async fn events(&self, a: EventArgs) -> anyhow::Result<u8> {
        let mut q: Vec<(&str, String)> = vec![("after", a.after.to_string())];
        if let Some(l) = a.limit {
            q.push(("limit", l.to_string()));
        }
        // Like `tail`: the latest ones, unless reading on from a sequence number.
        if a.after == 0 && (a.limit.is_some() || !a.follow) {
            q.push(("newest", "true".into()));
        }
        if let Some(s) = a.since {
            q.push(("since", s.to_string()));
        }
        if let Some(g) = &a.group {
            q.push(("group", g.clone()));
        }
        if let Some(i) = &a.instance {
            q.push(("instance", i.clone()));
        }
        if let Some(k) = &a.kind {
            q.push(("kind", k.clone()));
        }
        if a.follow {
            q.push(("follow", "true".into()));
        }
        let resp = match self
            .send(self.http.get(self.url("/v1/events")).query(&q))
            .await
        {
            Ok(r) => r,
            Err(e) => return self.refused(e),
        };
        if !a.follow {
            let events: Vec<Event> = resp.json().await?;
            if self.json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                println!("{}", render::events(&events));
            }
            return Ok(exit::OK);
        }
        // Follow: one JSON object per line.
        let mut stream = resp.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.context("the event stream broke")?;
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                if let Some(out) = followed_line(&line, self.json) {
                    println!("{out}");
                }
            }
        }
        Ok(exit::OK)
    }
}

/// What `drover logs` prints on stderr for a frame other than a line: a note or an error
/// (agents' text, made printable); nothing for the rest (the server's keep-alives).
fn side_text(f: &drover_model::logs::Frame) -> Option<String> {
    use drover_model::logs::Frame;
    match f {
        Frame::Note { message } => Some(format!("note: {}", render::printable(message))),
        Frame::Error { message, .. } => Some(format!("error: {}", render::printable(message))),
        _ => None,
    }
}

/// What `drover events --follow` prints for one line of the stream: the raw line (`--json`)
/// or the event's row; nothing for the server's keep-alives (empty lines).
fn followed_line(line: &[u8], json: bool) -> Option<String> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\n', '\r']);
    if text.trim().is_empty() {
        return None;
    }
    if json {
        return Some(text.to_string());
    }
    let ev = serde_json::from_str::<Event>(text).ok()?;
    Some(render::event_line(&ev))
}

/// Read NDJSON frames from a response as they come.
async fn frames(
    resp: reqwest::Response,
    mut each: impl FnMut(drover_model::logs::Frame) -> bool,
) -> anyhow::Result<()> {
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.context("the stream from the server broke")?;
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            if let Ok(f) = serde_json::from_slice(&line) {
                if !each(f) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

impl Client {
    pub async fn logs(&self, q: drover_model::logs::LogsQuery) -> anyhow::Result<u8> {
        use drover_model::logs::Frame;
        use std::io::{IsTerminal, Write};
        let resp = match self
            .send(self.http.get(self.url("/v1/logs")).query(&q))
            .await
        {
            Ok(r) => r,
            Err(e) => return self.refused(e),
        };
        let colour = std::io::stdout().is_terminal() && !self.json;
        let mut colours: std::collections::BTreeMap<String, usize> = Default::default();
        let mut failed = false;
        let json = self.json;
        frames(resp, |f| {
            let mut out = std::io::stdout().lock();
            match f {
                Frame::Line(l) if json => {
                    let _ = writeln!(out, "{}", serde_json::to_string(&l).unwrap_or_default());
                }
                Frame::Line(l) => {
                    let prefix = format!("{} {}", l.instance, l.component);
                    if colour {
                        let n = colours.len();
                        let c = *colours.entry(l.instance.clone()).or_insert(n);
                        let _ = writeln!(out, "\x1b[{}m{prefix}\x1b[0m | {}", 31 + c % 6, l.line);
                    } else {
                        let _ = writeln!(out, "{prefix} | {}", l.line);
                    }
                }
                other => {
                    failed |= matches!(other, Frame::Error { .. });
                    if let Some(text) = side_text(&other) {
                        eprintln!("{text}");
                    }
                }
            }
            let _ = out.flush();
            true
        })
        .await?;
        Ok(if failed { exit::FAILED } else { exit::OK })
    }

    /// The last `tail` lines of every component of `instance` (running, or what the flight
    /// recorder kept of it), oldest first.
    pub async fn last_lines(
        &self,
        service: &str,
        instance: &str,
        tail: usize,
    ) -> anyhow::Result<Vec<drover_model::logs::LogLine>> {
        use drover_model::logs::{Frame, LogsQuery};
        let q = LogsQuery {
            service: service.to_string(),
            instance: Some(instance.to_string()),
            tail: Some(tail),
            ..Default::default()
        };
        let resp = self
            .send(self.http.get(self.url("/v1/logs")).query(&q))
            .await?;
        let mut lines = Vec::new();
        frames(resp, |f| {
            if let Frame::Line(l) = f {
                lines.push(l);
            }
            true
        })
        .await?;
        lines.drain(..lines.len().saturating_sub(tail));
        Ok(lines)
    }

    /// Run a command on an instance; the exit code is the command's. With `stdin`, the
    /// person's input goes to it (`POST /v1/exec/ID/input`); with `tty`, on a terminal, this
    /// terminal is raw while it runs and its size changes are passed on.
    pub async fn exec(&self, mut req: drover_model::logs::ExecRequest) -> anyhow::Result<u8> {
        use drover_model::logs::{Frame, Stream};
        use std::io::{IsTerminal, Write};
        if req.tty {
            req.size = terminal::size();
        }
        let resp = match self
            .send(self.http.post(self.url("/v1/exec")).json(&req))
            .await
        {
            Ok(r) => r,
            Err(e) => return self.refused(e),
        };
        // Restored when this returns, however it does.
        let _raw = (req.tty && req.stdin && std::io::stdin().is_terminal())
            .then(terminal::Raw::enter)
            .flatten();
        let (id_tx, id_rx) = tokio::sync::oneshot::channel();
        let mut id_tx = Some(id_tx);
        let mut code = None;
        let output = frames(resp, |f| {
            match f {
                Frame::Session { id } => {
                    if let Some(t) = id_tx.take() {
                        let _ = t.send(id);
                    }
                }
                Frame::Output { stream, data } => {
                    if stream == Stream::Stderr {
                        let mut e = std::io::stderr().lock();
                        let _ = e.write_all(data.as_bytes());
                        let _ = e.flush();
                    } else {
                        let mut o = std::io::stdout().lock();
                        let _ = o.write_all(data.as_bytes());
                        let _ = o.flush();
                    }
                }
                Frame::Exit { code: c, .. } => {
                    code = Some(c);
                    return false;
                }
                Frame::Error { message, .. } => {
                    eprintln!("error: {message}");
                    return false;
                }
                Frame::Note { message } => eprintln!("note: {message}"),
                _ => {}
            }
            true
        });
        let input = async {
            if let Ok(id) = id_rx.await {
                self.exec_input(id, req.tty).await;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = output => r?,
            _ = input => unreachable!("the input never ends"),
        }
        Ok(match code {
            Some(c) => c.clamp(0, 255) as u8,
            None => exit::FAILED,
        })
    }

    /// Send this process's stdin (and, with `tty`, the terminal's size changes) to exec
    /// session `id`, in order, until it ends or the session does.
    async fn exec_input(&self, id: u64, tty: bool) {
        use drover_model::logs::ExecInput;
        use std::io::Read;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<ExecInput>(64);
        // A thread blocked on reading stdin: such a read cannot be cancelled; the thread ends
        // with stdin, or with this process.
        let keys = tx.clone();
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            let mut carry: Vec<u8> = Vec::new();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = keys.blocking_send(ExecInput::Eof);
                        return;
                    }
                    Ok(n) => {
                        carry.extend_from_slice(&buf[..n]);
                        let cut = match std::str::from_utf8(&carry) {
                            Ok(_) => carry.len(),
                            Err(e) if e.error_len().is_none() => e.valid_up_to(),
                            Err(_) => carry.len(),
                        };
                        let data = String::from_utf8_lossy(&carry[..cut]).into_owned();
                        carry.drain(..cut);
                        if !data.is_empty() && keys.blocking_send(ExecInput::Data { data }).is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        let resizes = async {
            let sig = tty
                .then(|| {
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                        .ok()
                })
                .flatten();
            let Some(mut sig) = sig else {
                return std::future::pending::<()>().await;
            };
            while sig.recv().await.is_some() {
                if let Some(s) = terminal::size() {
                    if tx.send(ExecInput::Resize(s)).await.is_err() {
                        break;
                    }
                }
            }
            std::future::pending::<()>().await
        };
        let send = async {
            // What came while the last request was on its way goes in the next one.
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let ended = batch.contains(&ExecInput::Eof);
                let mut body = Vec::new();
                for i in &batch {
                    body.extend(serde_json::to_vec(i).unwrap_or_default());
                    body.push(b'\n');
                }
                let sent = self
                    .send(
                        self.http
                            .post(self.url(&format!("/v1/exec/{id}/input")))
                            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
                            .body(body),
                    )
                    .await;
                if sent.is_err() || ended {
                    break;
                }
            }
        };
        tokio::select! {
            _ = resizes => {}
            _ = send => {}
        }
    }
}

/// The server refused a request; carries its error body.
#[derive(Debug)]
pub struct Refused(pub ApiError);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.message)
    }
}

impl std::error::Error for Refused {}

impl Client {
    pub async fn token_create(
        &self,
        scope: &str,
        name: Option<String>,
        group: Option<String>,
    ) -> anyhow::Result<u8> {
        let Some(scope) = drover_model::token::TokenScope::parse(scope) else {
            eprintln!("error: --scope must be admin, read, exec, agent or lb, not {scope:?}");
            return Ok(exit::USAGE);
        };
        let req = drover_model::token::CreateTokenRequest { scope, name, group };
        let made: drover_model::token::CreateTokenResponse = match self
            .send(self.http.post(self.url("/v1/tokens")).json(&req))
            .await
        {
            Ok(r) => r.json().await?,
            Err(e) => return self.refused(e),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&made)?);
        } else {
            eprintln!(
                "created {} ({}, {:?}); it is shown this once and never again:",
                made.info.id, made.info.scope, made.info.name
            );
            println!("{}", made.token);
        }
        Ok(exit::OK)
    }

    /// Send `req` and print its answer: as JSON with `--json`, else as `human` renders it
    /// (a refusal is printed and exits 1).
    async fn call<T: DeserializeOwned + serde::Serialize>(
        &self,
        req: reqwest::RequestBuilder,
        human: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<u8> {
        let answer: T = match self.send(req).await {
            Ok(r) => r.json().await?,
            Err(e) => return self.refused(e),
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&answer)?);
        } else {
            println!("{}", human(&answer));
        }
        Ok(exit::OK)
    }

    pub async fn token_list(&self) -> anyhow::Result<u8> {
        self.call(
            self.http.get(self.url("/v1/tokens")),
            |t: &Vec<drover_model::token::TokenInfo>| render::tokens(t),
        )
        .await
    }

    pub async fn token_revoke(&self, id: &str) -> anyhow::Result<u8> {
        self.call(
            self.http.delete(self.url(&format!("/v1/tokens/{id}"))),
            |i: &drover_model::token::TokenInfo| {
                format!("revoked {} ({}, {:?})", i.id, i.scope, i.name)
            },
        )
        .await
    }

    pub async fn schedule_once(
        &self,
        req: drover_model::api::ScheduleRequest,
    ) -> anyhow::Result<u8> {
        self.call(
            self.http.post(self.url("/v1/schedules")).json(&req),
            render::scheduled,
        )
        .await
    }

    pub async fn schedule_list(&self) -> anyhow::Result<u8> {
        self.call(self.http.get(self.url("/v1/schedules")), render::schedules)
            .await
    }

    pub async fn schedule_cancel(&self, id: &str) -> anyhow::Result<u8> {
        self.call(
            self.http.delete(self.url(&format!("/v1/schedules/{id}"))),
            |o: &drover_model::api::ScheduledScale| {
                format!(
                    "cancelled schedule {} (scale {} to {})",
                    o.id, o.service, o.desired
                )
            },
        )
        .await
    }

    /// `drover ui`: a one-time dashboard login link for this token.
    pub async fn ui_link(&self, open: bool) -> anyhow::Result<u8> {
        let resp = self
            .send(self.http.post(self.url("/v1/ui/login-links")))
            .await;
        let link: drover_server::ui::LoginLink = match resp {
            Ok(r) => r.json().await?,
            Err(e) => return self.refused(e),
        };
        let url = self.url(&link.path);
        if self.json {
            println!(
                "{}",
                serde_json::json!({"url": url, "expires_at_ms": link.expires_at_ms, "scope": link.scope})
            );
        } else {
            println!("{url}");
            eprintln!(
                "  {} session; the link works once, until {} (60 s)",
                match link.scope {
                    drover_model::token::TokenScope::Admin => "an admin",
                    _ => "a read-only",
                },
                render::time(link.expires_at_ms)
            );
        }
        if open {
            let opener = if cfg!(target_os = "macos") {
                "open"
            } else {
                "xdg-open"
            };
            match std::process::Command::new(opener).arg(&url).status() {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("{opener} {s}: open the link above by hand"),
                Err(e) => eprintln!("cannot run {opener}: {e}; open the link above by hand"),
            }
        }
        Ok(exit::OK)
    }
}

/// A fleet of at most this many instances: `drover status` lists them all.
const SMALL_FLEET: u32 = 100;

/// What `drover status` lists.
pub struct StatusArgs {
    pub group: Option<String>,
    pub page: usize,
    pub per_page: usize,
    pub all: bool,
}

/// A group id in a query string (`/` and the name characters need no escape; anything else
/// is percent-encoded).
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::logs::Frame;

    /// Issue 20, item 11: agents' notes and errors in `drover logs` reach the terminal
    /// without their escape sequences.
    #[test]
    fn log_notes_and_errors_are_printed_without_control_characters() {
        let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2J\rok";
        let note = side_text(&Frame::Note {
            message: format!("gone {evil}"),
        })
        .unwrap();
        let error = side_text(&Frame::Error {
            instance: Some("i-000001".into()),
            message: format!("broke {evil}"),
        })
        .unwrap();
        for out in [&note, &error] {
            assert!(
                !out.contains('\u{1b}') && !out.contains('\u{7}') && !out.contains('\r'),
                "{out:?}"
            );
        }
        assert!(note.starts_with("note: gone \\u{1b}]0;pwned"), "{note}");
        assert!(error.starts_with("error: broke \\u{1b}]0;pwned"), "{error}");
        assert_eq!(side_text(&Frame::Idle), None);
    }

    /// The event stream's keep-alives (empty lines) print nothing, with `--json` or not;
    /// events print as rows, or as they came.
    #[test]
    fn a_followed_stream_skips_keep_alives() {
        assert_eq!(followed_line(b"\n", false), None);
        assert_eq!(followed_line(b"\n", true), None);
        assert_eq!(followed_line(b"\r\n", true), None);
        let ev = br#"{"seq":3,"at_ms":0,"kind":"healthy","group":"web/local","instance":"i-000001","message":"ok"}"#;
        let mut with_nl = ev.to_vec();
        with_nl.push(b'\n');
        assert_eq!(
            followed_line(&with_nl, true).as_deref(),
            Some(std::str::from_utf8(ev).unwrap())
        );
        let row = followed_line(&with_nl, false).unwrap();
        assert!(row.contains("healthy") && row.ends_with("ok"), "{row}");
    }
}
