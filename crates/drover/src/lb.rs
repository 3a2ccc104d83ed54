//! `drover lb`: the balancer process of `local` regions. It follows the ingresses and targets
//! of one or more servers (a long-poll of `/v1/lb/config`), reports its open connections
//! (`/v1/lb/report`), and keeps serving on its last targets and its own health checks while
//! no server answers, across its own restarts too (`DIR/state.json`). A new process started
//! with the same `--dir` takes the listening sockets over from the running one (`DIR/lb.sock`,
//! see `drover_lb::handoff`), which then finishes its open connections and exits: an upgrade
//! drops no connection.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use drover_lb::{HealthCheckConfig, HealthCheckKind, Listener, ListenerConfig, Policy, Target};
use drover_model::api::{Balance, LbConfig, LbListener, LbReport, LbTarget};
use drover_model::Dur;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::exit;

#[derive(clap::Args, Debug, Clone)]
pub struct LbArgs {
    /// The drover server(s) to follow, comma separated (tried in turn), e.g.
    /// http://127.0.0.1:7878. Default: --server, DROVER_SERVER, or DATA_DIR/server.url.
    #[arg(long = "servers", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// A file holding an `lb` token (`drover token create --scope lb`). Default: --token or
    /// DROVER_TOKEN, else DATA_DIR/lb.token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Its own directory: the last config (state.json), its pid (lb.pid) and the socket a
    /// successor takes the listeners over from (lb.sock). Default: DATA_DIR/lb.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// How long open connections may go on after SIGTERM, or after handing the listeners to
    /// a successor, before they are cut.
    #[arg(long, default_value = "5m")]
    pub drain_timeout: Dur,
}

/// What `drover lb` runs with, resolved.
pub struct LbConfigArgs {
    pub servers: Vec<String>,
    pub token: Option<String>,
    /// Where the token came from: re-read when a server refuses it.
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub dir: PathBuf,
    pub drain_timeout: Duration,
}

impl LbArgs {
    /// Fill in what was not given from the global flags and the data directory.
    pub fn resolve(
        self,
        server: Option<String>,
        token: Option<String>,
        ca: Option<PathBuf>,
        data_dir: &Path,
    ) -> anyhow::Result<LbConfigArgs> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let servers: Vec<String> = if !self.servers.is_empty() {
            self.servers
        } else {
            let local = match &server {
                Some(_) => None,
                None => crate::access::local_server_url(data_dir)?,
            };
            vec![server
                .or(local)
                .unwrap_or_else(|| crate::access::DEFAULT_SERVER.to_string())]
        };
        let (token, token_file) = match (&self.token_file, token.filter(|t| !t.trim().is_empty())) {
            (Some(f), _) => (
                Some(read(f).with_context(|| {
                    format!("cannot read a token from {} (--token-file)", f.display())
                })?),
                Some(f.clone()),
            ),
            (None, Some(t)) => (Some(t), None),
            (None, None) => {
                let f = data_dir.join(drover_server::auth::LB_TOKEN_FILE);
                (read(&f), Some(f))
            }
        };
        let ca = ca.or_else(|| {
            let p = data_dir.join("ca.pem");
            (servers.iter().any(|s| s.starts_with("https://")) && p.exists()).then_some(p)
        });
        Ok(LbConfigArgs {
            servers: servers
                .into_iter()
                .map(|s| s.trim_end_matches('/').to_string())
                .collect(),
            token,
            token_file,
            ca,
            dir: self.dir.unwrap_or_else(|| data_dir.join("lb")),
            drain_timeout: self.drain_timeout.0,
        })
    }
}

/// How long the server may hold one config long-poll.
const POLL_WAIT: Duration = Duration::from_secs(25);
/// A report is sent at least this often (the server takes a balancer as gone after 3 s).
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// How often open connections are read for a report.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Pause after a failed request to a server.
const RETRY: Duration = Duration::from_millis(500);
/// Longest wait for a predecessor or successor in a handover.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: LbConfigArgs) -> u8 {
    crate::init_logs(std::io::stderr);
    // One thread, as the balancer benchmark runs it: the accept and copy paths are cheap
    // enough that a second core is left to the backends.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::FAILED;
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            exit::FAILED
        }
    }
}

/// The last config, as applied (the targets it serves), kept across restarts.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
struct Saved {
    config: LbConfig,
}

/// The header of a handover: the listeners' names in the order of their sockets, and the
/// config the old process serves.
#[derive(Serialize, Deserialize)]
struct Handover {
    names: Vec<String>,
    config: LbConfig,
}

async fn serve(args: LbConfigArgs) -> anyhow::Result<()> {
    if args.servers.is_empty() {
        anyhow::bail!("no server to follow: pass --servers URL[,URL...]");
    }
    private_dir(&args.dir)?;
    let http = http_client(args.ca.as_deref())?;
    let bearer = Arc::new(Bearer {
        file: args.token_file.clone(),
        token: std::sync::RwLock::new(args.token.clone()),
    });
    let me = format!(
        "{}:{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
        std::process::id()
    );
    let sock_path = args.dir.join("lb.sock");
    let mut ingresses = Ingresses::new(args.drain_timeout);

    // A running balancer with this directory hands its listeners over; else the last
    // config is served at once, before any server answers.
    let predecessor = match take_over(&sock_path).await {
        Ok(Some((handover, fds, stream))) => {
            let n = fds.len();
            ingresses.adopt(&handover, fds).await;
            tracing::info!(
                listeners = n,
                "took the listeners over from the running balancer"
            );
            Some(stream)
        }
        Ok(None) => {
            if let Some(saved) = load(&args.dir) {
                tracing::info!(
                    listeners = saved.config.listeners.len(),
                    "serving the last config until a server answers"
                );
                ingresses.apply(&saved.config, true).await;
            }
            None
        }
        Err(e) => {
            tracing::warn!("cannot take over from the running balancer: {e:#}; binding anew");
            if let Some(saved) = load(&args.dir) {
                ingresses.apply(&saved.config, true).await;
            }
            None
        }
    };
    if let Some(stream) = predecessor {
        // Ready: the old process stops accepting and says bye; then its socket is ours.
        let done = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut w = &stream;
            w.write_all(b"ready\n")?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok(())
        })
        .await;
        if let Ok(Err(e)) = done {
            tracing::warn!("the old balancer did not confirm the handover: {e}");
        }
    }
    let _ = std::fs::remove_file(&sock_path);
    let handover_listener = tokio::net::UnixListener::bind(&sock_path)
        .with_context(|| format!("cannot listen on {}", sock_path.display()))?;
    std::fs::write(args.dir.join("lb.pid"), std::process::id().to_string())
        .with_context(|| format!("cannot write {}", args.dir.join("lb.pid").display()))?;
    save(&args.dir, &ingresses.effective());

    let current = Arc::new(AtomicUsize::new(0));
    let servers = Arc::new(args.servers.clone());
    let (config_tx, mut config_rx) = mpsc::channel::<LbConfig>(4);
    let (report_tx, report_rx) = watch::channel(ingresses.report(&me, true));
    let stop_sync = tokio_util::sync::CancellationToken::new();
    let sync = tokio::spawn(follow(
        http.clone(),
        bearer.clone(),
        servers.clone(),
        current.clone(),
        ingresses.applied_key(),
        config_tx,
        stop_sync.clone(),
    ));
    let reporter = tokio::spawn(report(http, bearer, servers, current, report_rx));
    let mut sample = tokio::time::interval(SAMPLE_EVERY);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut accepting = true;
    let mut last_draining = Vec::new();
    let signal = crate::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            Some(cfg) = config_rx.recv(), if accepting => {
                let replace = cfg.rebuilt;
                ingresses.apply(&cfg, replace).await;
                save(&args.dir, &ingresses.effective());
                report_tx.send_replace(ingresses.report(&me, accepting));
            }
            conn = handover_listener.accept(), if accepting => {
                let Ok((conn, _)) = conn else { continue };
                match hand_over(conn, &ingresses).await {
                    Ok(()) => {
                        tracing::info!("handed the listeners to a new balancer; finishing open connections");
                        accepting = false;
                        stop_sync.cancel();
                        ingresses.retire_all();
                        report_tx.send_replace(ingresses.report(&me, accepting));
                    }
                    Err(e) => tracing::warn!("handover failed, still serving: {e:#}"),
                }
            }
            _ = sample.tick() => {
                ingresses.prune();
                if !accepting && ingresses.retiring.is_empty() {
                    break;
                }
                let (new, draining) = ingresses.snapshot(&me, accepting);
                report_tx.send_if_modified(|r| {
                    // What a drain waits on is sent at once; the other counts and counters
                    // change all the time and ride along with the next periodic report.
                    let changed = draining != last_draining || new.version != r.version
                        || new.errors != r.errors || new.accepting != r.accepting;
                    *r = new;
                    changed
                });
                last_draining = draining;
            }
            _ = &mut signal, if accepting => {
                tracing::info!("stopping: no new connections; open ones get {}", Dur(args.drain_timeout));
                accepting = false;
                stop_sync.cancel();
                ingresses.retire_all();
            }
        }
    }
    // The last report says nothing is left, so no drain waits on this process.
    report_tx.send_replace(ingresses.report(&me, false));
    tokio::time::sleep(Duration::from_millis(50)).await;
    reporter.abort();
    let _ = reporter.await;
    let _ = sync.await;
    if accepting_path_is_ours(&args.dir) {
        let _ = std::fs::remove_file(args.dir.join("lb.pid"));
    }
    tracing::info!("stopped");
    Ok(())
}

/// The pid file still names this process (no successor wrote its own).
/// Creates the balancer's directory, its owner's only: whoever can connect to its handover
/// socket takes the listeners over.
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| {
        format!(
            "cannot make the balancer's directory {} private (mode 0700): it holds the socket \
             that hands the listeners over; use a directory this user owns (--dir)",
            dir.display()
        )
    })
}

fn accepting_path_is_ours(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("lb.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        == Some(std::process::id())
}

/// The `lb` token, re-read from its file when a server refuses it (the server makes a new one
/// when the one in `DATA_DIR/lb.token` was revoked).
struct Bearer {
    file: Option<PathBuf>,
    token: std::sync::RwLock<Option<String>>,
}

impl Bearer {
    fn on(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &*self.token.read().unwrap_or_else(|e| e.into_inner()) {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// After a 401: take the file's token if it changed.
    fn reload(&self) {
        let Some(f) = &self.file else { return };
        let Ok(text) = std::fs::read_to_string(f) else {
            return;
        };
        let new = Some(text.trim().to_string()).filter(|t| !t.is_empty());
        let mut cur = self.token.write().unwrap_or_else(|e| e.into_inner());
        if new.is_some() && *cur != new {
            tracing::info!(file = %f.display(), "using the new token of the file");
            *cur = new;
        }
    }
}

fn http_client(ca: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(30));
    if let Some(ca) = ca {
        let pem =
            std::fs::read(ca).with_context(|| format!("cannot read the CA {}", ca.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
        // The given CA only: not the public roots as well.
        b = b.tls_built_in_root_certs(false).add_root_certificate(cert);
    }
    b.build().context("cannot build the HTTP client")
}

fn load(dir: &Path) -> Option<Saved> {
    let text = std::fs::read(dir.join("state.json")).ok()?;
    match serde_json::from_slice(&text) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", dir.join("state.json").display());
            None
        }
    }
}

/// Write the state file atomically (a crash leaves the old one or the new one).
fn save(dir: &Path, config: &LbConfig) {
    let tmp = dir.join("state.json.tmp");
    let body = serde_json::to_vec_pretty(&Saved {
        config: config.clone(),
    })
    .unwrap_or_default();
    let ok = std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, dir.join("state.json")));
    if let Err(e) = ok {
        tracing::warn!("cannot save the config to {}: {e}", dir.display());
    }
}

/// Ask a running balancer for its listeners: `None` when none runs there.
async fn take_over(sock: &Path) -> anyhow::Result<Option<(Handover, Vec<OwnedFd>, UnixStream)>> {
    let sock = sock.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let stream = match UnixStream::connect(&sock) {
            Ok(s) => s,
            Err(_) => return Ok(None),
        };
        stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
        stream.set_write_timeout(Some(HANDOVER_TIMEOUT))?;
        (&stream).write_all(b"takeover\n")?;
        let (header, fds) = drover_lb::handoff::recv(&stream)?;
        let handover: Handover =
            serde_json::from_slice(&header).context("unreadable handover header")?;
        if handover.names.len() != fds.len() {
            anyhow::bail!(
                "the running balancer sent {} sockets for {} listeners",
                fds.len(),
                handover.names.len()
            );
        }
        Ok(Some((handover, fds, stream)))
    })
    .await
    .context("handover task")?
}

/// Give a successor our listening sockets; `Ok` once it accepts on them (it said ready).
async fn hand_over(conn: tokio::net::UnixStream, ingresses: &Ingresses) -> anyhow::Result<()> {
    let stream = conn.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDOVER_TIMEOUT))?;
    let mut names = Vec::new();
    let mut fds = Vec::new();
    for (name, ing) in &ingresses.map {
        fds.push(ing.listener.clone_socket()?);
        names.push(name.clone());
    }
    let header = serde_json::to_vec(&Handover {
        names,
        config: ingresses.effective(),
    })?;
    let stream = tokio::task::spawn_blocking(move || -> anyhow::Result<UnixStream> {
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        if line.trim() != "takeover" {
            anyhow::bail!("unexpected request {line:?}");
        }
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        drover_lb::handoff::send(&stream, &header, &borrowed)?;
        let mut ready = String::new();
        BufReader::new(&stream).read_line(&mut ready)?;
        if ready.trim() != "ready" {
            anyhow::bail!("the new balancer did not take the listeners ({ready:?})");
        }
        Ok(stream)
    })
    .await??;
    // We stop accepting (the caller retires every listener); then tell the successor.
    tokio::task::spawn_blocking(move || (&stream).write_all(b"bye\n")).await??;
    Ok(())
}

/// Follow the servers' config: a long-poll, from the first server that answers.
async fn follow(
    http: reqwest::Client,
    bearer: Arc<Bearer>,
    servers: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    mut known: (String, u64),
    tx: mpsc::Sender<LbConfig>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut log = drover_model::lograte::LogRate::new(Duration::from_secs(60));
    loop {
        let i = current.load(Ordering::Relaxed) % servers.len();
        let url = format!("{}/v1/lb/config", servers[i].trim_end_matches('/'));
        let req = bearer
            .on(http.get(&url))
            .query(&[
                ("epoch", known.0.clone()),
                ("version", known.1.to_string()),
                ("wait_ms", POLL_WAIT.as_millis().to_string()),
            ])
            .timeout(POLL_WAIT + Duration::from_secs(5))
            .send();
        let answer = tokio::select! {
            _ = stop.cancelled() => return,
            r = req => r,
        };
        let result: Result<LbConfig, String> = match answer {
            Ok(resp) if resp.status().is_success() => resp
                .json()
                .await
                .map_err(|e| format!("unreadable config: {e}")),
            Ok(resp) => {
                let status = resp.status();
                if status == reqwest::StatusCode::UNAUTHORIZED {
                    bearer.reload();
                }
                let body = resp.text().await.unwrap_or_default();
                Err(format!("{url} answered {status}: {}", body.trim()))
            }
            Err(e) => Err(format!("{url}: {e}")),
        };
        match result {
            Ok(cfg) => {
                if let Some(held_back) = log.recovered() {
                    tracing::info!(%url, held_back, "the server answers again");
                }
                if (cfg.epoch.clone(), cfg.version) != known {
                    known = (cfg.epoch.clone(), cfg.version);
                    if tx.send(cfg).await.is_err() {
                        return;
                    }
                }
            }
            Err(problem) => {
                if let Some(held_back) = log.failed(std::time::Instant::now()) {
                    tracing::warn!(
                        held_back,
                        "cannot read the config: {problem}; serving the last targets (logged at most once a minute)"
                    );
                }
                current.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// Send the latest report when it changes, and at least every [`REPORT_EVERY`].
async fn report(
    http: reqwest::Client,
    bearer: Arc<Bearer>,
    servers: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
    mut rx: watch::Receiver<LbReport>,
) {
    loop {
        let body = rx.borrow_and_update().clone();
        let i = current.load(Ordering::Relaxed) % servers.len();
        let url = format!("{}/v1/lb/report", servers[i].trim_end_matches('/'));
        let sent = bearer
            .on(http.post(&url))
            .json(&body)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                if r.status() == reqwest::StatusCode::UNAUTHORIZED {
                    bearer.reload();
                }
                tracing::debug!(%url, status = %r.status(), "report refused");
            }
            Err(e) => tracing::debug!(%url, "report failed: {e}"),
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
}

/// One open listener and what it was opened with.
struct Ingress {
    listener: Listener,
    targets: watch::Sender<Vec<Target>>,
    spec: LbListener,
}

/// The listeners of this process.
struct Ingresses {
    map: BTreeMap<String, Ingress>,
    /// Listeners replaced or stopped, finishing their connections (counted in reports).
    retiring: Vec<(String, Listener, tokio::task::JoinHandle<()>)>,
    applied: Option<(String, u64, bool)>,
    errors: BTreeMap<String, String>,
    drain_timeout: Duration,
}

impl Ingresses {
    fn new(drain_timeout: Duration) -> Ingresses {
        Ingresses {
            map: BTreeMap::new(),
            retiring: Vec::new(),
            applied: None,
            errors: BTreeMap::new(),
            drain_timeout,
        }
    }

    fn applied_key(&self) -> (String, u64) {
        self.applied
            .as_ref()
            .map(|(e, v, _)| (e.clone(), *v))
            .unwrap_or_default()
    }

    /// Start on the sockets a predecessor handed over, with its targets.
    async fn adopt(&mut self, handover: &Handover, fds: Vec<OwnedFd>) {
        let by_name: BTreeMap<&str, &LbListener> = handover
            .config
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l))
            .collect();
        for (name, fd) in handover.names.iter().zip(fds) {
            let Some(spec) = by_name.get(name.as_str()) else {
                continue;
            };
            let socket = std::net::TcpListener::from(fd);
            let targets = targets_of(spec);
            let (tx, rx) = watch::channel(targets);
            match Listener::adopt(listener_config(spec, self.drain_timeout), socket, rx) {
                Ok(listener) => {
                    self.map.insert(
                        name.clone(),
                        Ingress {
                            listener,
                            targets: tx,
                            spec: (*spec).clone(),
                        },
                    );
                }
                Err(e) => {
                    self.errors.insert(name.clone(), e.to_string());
                }
            }
        }
        self.applied = Some((
            handover.config.epoch.clone(),
            handover.config.version,
            handover.config.rebuilt,
        ));
        // Listeners of the config that came without a socket are bound anew.
        let mut rest = handover.config.clone();
        rest.listeners.retain(|l| !self.map.contains_key(&l.name));
        if !rest.listeners.is_empty() {
            self.apply(&rest, false).await;
            self.applied = Some((
                handover.config.epoch.clone(),
                handover.config.version,
                handover.config.rebuilt,
            ));
        }
    }

    /// Bring the listeners to `cfg`. With `replace`, targets are exactly the config's and
    /// listeners it does not name close; otherwise (a server whose view is not rebuilt yet)
    /// targets are added to those kept, only `leaving` ones go, and no listener closes.
    async fn apply(&mut self, cfg: &LbConfig, replace: bool) {
        for spec in &cfg.listeners {
            let mut wanted = targets_of(spec);
            if let Some(cur) = self.map.get(&spec.name) {
                if !replace {
                    let kept = cur.targets.borrow().clone();
                    for t in kept {
                        if !wanted.iter().any(|w| w.id == t.id) {
                            wanted.push(t);
                        }
                    }
                    wanted.retain(|t| !spec.leaving.contains(&t.id));
                    wanted.sort_by(|a, b| a.id.cmp(&b.id));
                }
            }
            let same_spec = self.map.get(&spec.name).is_some_and(|cur| {
                cur.spec.listen == spec.listen
                    && cur.spec.balance == spec.balance
                    && cur.spec.health == spec.health
            });
            if same_spec {
                let cur = self.map.get_mut(&spec.name).expect("checked");
                cur.targets.send_if_modified(|t| {
                    let changed = *t != wanted;
                    *t = wanted.clone();
                    changed
                });
                cur.spec = spec.clone();
                continue;
            }
            let (tx, rx) = watch::channel(wanted);
            let lcfg = listener_config(spec, self.drain_timeout);
            // The same address: the new listener takes the very socket (no gap, no queue
            // lost); a new address is bound before the old one closes.
            let opened = match self.map.get(&spec.name) {
                Some(cur) if cur.spec.listen == spec.listen => cur
                    .listener
                    .clone_socket()
                    .map_err(|e| e.to_string())
                    .and_then(|fd| {
                        Listener::adopt(lcfg, std::net::TcpListener::from(fd), rx)
                            .map_err(|e| e.to_string())
                    }),
                _ => Listener::bind(lcfg, rx).await.map_err(|e| e.to_string()),
            };
            match opened {
                Ok(listener) => {
                    self.errors.remove(&spec.name);
                    let old = self.map.insert(
                        spec.name.clone(),
                        Ingress {
                            listener,
                            targets: tx,
                            spec: spec.clone(),
                        },
                    );
                    if let Some(old) = old {
                        self.retire(spec.name.clone(), old.listener);
                    }
                }
                Err(e) => {
                    tracing::error!(listener = %spec.name, "cannot open the ingress: {e}");
                    self.errors.insert(spec.name.clone(), e);
                }
            }
        }
        if replace {
            let gone: Vec<String> = self
                .map
                .keys()
                .filter(|n| !cfg.listeners.iter().any(|l| &l.name == *n))
                .cloned()
                .collect();
            for name in gone {
                if let Some(old) = self.map.remove(&name) {
                    tracing::info!(listener = %name, "ingress removed");
                    self.retire(name, old.listener);
                }
            }
            self.errors
                .retain(|n, _| cfg.listeners.iter().any(|l| &l.name == n));
        }
        self.applied = Some((cfg.epoch.clone(), cfg.version, cfg.rebuilt));
    }

    fn retire(&mut self, name: String, listener: Listener) {
        let grace = self.drain_timeout;
        let l = listener.clone();
        let task = tokio::spawn(async move { l.shutdown_within(grace).await });
        self.retiring.push((name, listener, task));
    }

    fn retire_all(&mut self) {
        let all = std::mem::take(&mut self.map);
        for (name, ing) in all {
            self.retire(name, ing.listener);
        }
    }

    fn prune(&mut self) {
        self.retiring.retain(|(_, _, t)| !t.is_finished());
    }

    /// The config as served: every listener with the targets it has now.
    fn effective(&self) -> LbConfig {
        let (epoch, version, rebuilt) = self.applied.clone().unwrap_or_default();
        LbConfig {
            epoch,
            version,
            rebuilt,
            listeners: self
                .map
                .values()
                .map(|i| LbListener {
                    targets: i
                        .targets
                        .borrow()
                        .iter()
                        .map(|t| LbTarget {
                            id: t.id.clone(),
                            addr: t.addr.to_string(),
                        })
                        .collect(),
                    leaving: Vec::new(),
                    ..i.spec.clone()
                })
                .collect(),
        }
    }

    fn report(&self, me: &str, accepting: bool) -> LbReport {
        self.snapshot(me, accepting).0
    }

    /// The report, and the open connections of every target out of rotation (what drains
    /// wait on).
    fn snapshot(&self, me: &str, accepting: bool) -> (LbReport, Vec<(String, String, u64)>) {
        let (epoch, version) = self.applied_key();
        let mut draining = Vec::new();
        let mut connections: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut stats = Vec::new();
        let all = self
            .map
            .iter()
            .map(|(n, i)| (n, &i.listener))
            .chain(self.retiring.iter().map(|(n, l, _)| (n, l)));
        let live = self.map.len();
        for (n, (name, listener)) in all.enumerate() {
            let s = listener.stats();
            let per = connections.entry(name.clone()).or_default();
            for t in &s.targets {
                // Attempts under way count: each may still become a connection.
                let open = (t.active + t.connecting) as u64;
                *per.entry(t.id.clone()).or_default() += open;
                if !t.in_rotation || n >= live {
                    draining.push((name.clone(), t.id.clone(), open));
                }
            }
            if let Ok(v) = serde_json::to_value(&s) {
                stats.push(v);
            }
        }
        let report = LbReport {
            lb: me.to_string(),
            epoch,
            version,
            accepting,
            connections,
            errors: self.errors.clone(),
            stats,
        };
        (report, draining)
    }
}

fn targets_of(spec: &LbListener) -> Vec<Target> {
    let mut v: Vec<Target> = spec
        .targets
        .iter()
        .filter_map(|t| {
            Some(Target::new(
                t.id.clone(),
                t.addr.parse::<SocketAddr>().ok()?,
            ))
        })
        .collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

fn listener_config(spec: &LbListener, drain: Duration) -> ListenerConfig {
    ListenerConfig {
        name: spec.name.clone(),
        listen: spec
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
        policy: match spec.balance {
            Balance::RoundRobin => Policy::RoundRobin,
            Balance::LeastConnections => Policy::LeastConnections,
        },
        health: spec.health.as_ref().map(|h| HealthCheckConfig {
            kind: match &h.http_path {
                Some(path) => HealthCheckKind::Http { path: path.clone() },
                None => HealthCheckKind::Tcp,
            },
            interval: Duration::from_millis(h.interval_ms.max(1)),
            timeout: Duration::from_millis(h.timeout_ms.max(1)),
            rise: h.rise.max(1),
            fall: h.fall.max(1),
        }),
        shutdown_grace: drain,
        ..ListenerConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(targets: &[&str], leaving: &[&str]) -> LbListener {
        LbListener {
            name: "web/local".into(),
            listen: "127.0.0.1:0".into(),
            balance: Balance::RoundRobin,
            health: None,
            targets: targets
                .iter()
                .map(|id| LbTarget {
                    id: id.to_string(),
                    addr: "127.1.0.1:8080".into(),
                })
                .collect(),
            leaving: leaving.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn ids(ing: &Ingresses) -> Vec<String> {
        ing.map["web/local"]
            .targets
            .borrow()
            .iter()
            .map(|t| t.id.clone())
            .collect()
    }

    /// The balancer's directory is made its owner's only; when it cannot be, the balancer
    /// does not start, and says which directory, what mode and what to do.
    #[test]
    fn the_directory_is_private_or_the_balancer_does_not_start() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lb");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Not even root may change the mode of /proc/self.
        let err = format!("{:#}", private_dir(Path::new("/proc/self")).unwrap_err());
        assert!(
            err.starts_with("cannot make the balancer's directory /proc/self private (mode 0700)"),
            "{err}"
        );
        assert!(err.contains("--dir"), "{err}");
    }

    /// A server that has not rebuilt its view adds targets and removes only leaving ones; a
    /// rebuilt one sets them exactly.
    #[tokio::test]
    async fn targets_of_an_unrebuilt_server_are_added_not_replaced() {
        let mut ing = Ingresses::new(Duration::from_secs(1));
        let mut cfg = LbConfig {
            epoch: "a".into(),
            version: 1,
            rebuilt: true,
            listeners: vec![spec(&["i-1", "i-2"], &[])],
        };
        ing.apply(&cfg, true).await;
        assert_eq!(ids(&ing), ["i-1", "i-2"]);
        // A restarted server, nothing heard yet: no target, and i-2 leaving.
        cfg = LbConfig {
            epoch: "b".into(),
            version: 1,
            rebuilt: false,
            listeners: vec![spec(&["i-3"], &["i-2"])],
        };
        ing.apply(&cfg, false).await;
        assert_eq!(ids(&ing), ["i-1", "i-3"]);
        // Rebuilt: exactly what it says.
        cfg.version = 2;
        cfg.rebuilt = true;
        cfg.listeners = vec![spec(&["i-3"], &[])];
        ing.apply(&cfg, true).await;
        assert_eq!(ids(&ing), ["i-3"]);
        assert_eq!(ing.applied_key(), ("b".to_string(), 2));
        // A listener the rebuilt config does not name is closed.
        cfg.version = 3;
        cfg.listeners.clear();
        ing.apply(&cfg, true).await;
        assert!(ing.map.is_empty());
        assert_eq!(ing.retiring.len(), 1);
    }

    /// A change of policy on the same address keeps the socket: a client connected (queued)
    /// before the change is served after it.
    #[tokio::test]
    async fn a_changed_listener_keeps_its_socket() {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let baddr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = backend.accept().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(b"hi").await;
                });
            }
        });
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut s = spec(&[], &[]);
        s.listen = format!("127.0.0.1:{port}");
        s.targets = vec![LbTarget {
            id: "i-1".into(),
            addr: baddr.to_string(),
        }];
        let mut cfg = LbConfig {
            epoch: "a".into(),
            version: 1,
            rebuilt: true,
            listeners: vec![s.clone()],
        };
        let mut ing = Ingresses::new(Duration::from_secs(1));
        ing.apply(&cfg, true).await;
        assert!(ing.errors.is_empty(), "{:?}", ing.errors);
        let addr: SocketAddr = s.listen.parse().unwrap();
        cfg.version = 2;
        cfg.listeners[0].balance = Balance::LeastConnections;
        ing.apply(&cfg, true).await;
        assert!(ing.errors.is_empty(), "{:?}", ing.errors);
        assert_eq!(ing.retiring.len(), 1);
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 2];
        use tokio::io::AsyncReadExt;
        tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"hi");
    }
}
