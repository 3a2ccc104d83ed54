//! drover-agent: the per-instance agent — boot (fetch, unpack, start in plan order), supervise
//! (respawn with backoff, health checks), report (heartbeats with status and utilization) and
//! leave (on the server's permit: drain, stop gracefully, exit).
//!
//! Invariants:
//! - the agent acts only on positive evidence: an unreachable server is logged (at most once a
//!   minute) and changes nothing it supervises; only a permit granted by the server (`200`,
//!   `permit: true`) makes it leave;
//! - every component runs in its own process group and dies with the agent (`PR_SET_PDEATHSIG`),
//!   so nothing outlives it; a stop is the plan's signal, the grace period, then SIGKILL;
//! - it runs on a tokio current-thread runtime (processes are spawned from the runtime thread,
//!   never from `spawn_blocking`, since the death signal follows the spawning thread).

pub mod artifact;
pub mod backoff;
mod component;
mod docker;
mod error;
mod health;
mod leave;
mod logfile;
mod metrics;
mod neigh;
mod peers;
pub use peers::lookup;
mod process;
mod relay;
mod report;
mod runtime;
mod supervisor;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_model::api::{AgentPhase, ComponentReport, ComponentState, DrainReport, Heartbeat};
use drover_model::Plan;
use tokio::sync::{oneshot, watch};

pub use backoff::Backoff;
pub use error::AgentError;

use component::Instance;
use leave::Leave;
use report::{Reporter, Sampler};

/// How long a state change waits for others before it is reported.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Timeout of one heartbeat request.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
/// Timeout of the last heartbeat, sent while the agent stops.
const LAST_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);

/// What one agent runs and where it reports; built by `drover agent` from its arguments.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Instance id, e.g. `i-000003`.
    pub instance: String,
    /// Group, e.g. `web/local`.
    pub group: String,
    /// The instance's own address (e.g. `127.1.0.3`): components bind there.
    pub addr: IpAddr,
    /// Base URL of the server, e.g. `http://127.0.0.1:7878`, or of every server of the
    /// control plane, comma separated (the agent moves to the next when one does not answer);
    /// `None`: no reporting.
    pub server: Option<String>,
    pub plan: Plan,
    /// The instance's own directory (created if absent).
    pub dir: PathBuf,
    /// The value of `{drover}`.
    pub drover_bin: PathBuf,
    /// How often to send a heartbeat (2 s by default); state changes are also sent at once.
    pub heartbeat_interval: Duration,
}

impl AgentConfig {
    /// The default heartbeat interval.
    pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
}

/// Why [`run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The `shutdown` future resolved (e.g. SIGTERM): everything was stopped.
    Shutdown,
    /// The server granted a permit: the agent drained, stopped everything and reported
    /// `stopping`. For the `local` provider the agent process exiting is its instance terminating.
    Left {
        /// The permit's reason, e.g. `stale generation 3 < 4`.
        reason: String,
        /// The permit's word on the instance's capacity, for an agent that terminates its own
        /// instance (`drover agent --aws`): `Some(true)`, its group's desired capacity drops
        /// with it; `Some(false)`, the group keeps it and launches the replacement; `None`,
        /// the server did not say (an older server): keep to the launch configuration.
        decrement: Option<bool>,
    },
}

/// State shared by the supervisors and the reporter.
pub(crate) struct Ctx {
    pub instance: Instance,
    pub plan: Plan,
    pub client: reqwest::Client,
    components: Mutex<Vec<ComponentReport>>,
    phase: Mutex<AgentPhase>,
    /// Bumped on every change of a component's report.
    changed: watch::Sender<()>,
    /// The server's hint from its last heartbeat answer: a permit may come soon, so hold the
    /// permit long-poll open (false until the first answer says otherwise).
    poll_permit: watch::Sender<bool>,
    /// The last heartbeat's sequence number and the utilization sampler.
    beats: Mutex<(u64, Sampler)>,
    /// The Docker Engine, connected when a `docker` component first needs it.
    docker: docker::Engine,
    /// Per component with a `drain_signal`: where it goes while the component runs.
    drain_targets: Mutex<Vec<Option<runtime::DrainTarget>>>,
    /// How the drain on a permit went, once it is over (reported in every heartbeat after).
    drained: Mutex<Option<DrainReport>>,
    /// Per `docker` component: its container (the last run's), for logs and exec.
    containers: Mutex<Vec<Option<String>>>,
    /// Where flight records go (to the server, by the relay); none without a server.
    flights: Option<tokio::sync::mpsc::Sender<drover_model::logs::FlightRecord>>,
    /// Per `docker` component: its last lines, read just before its container was removed
    /// (the final flight record is made after the stop, when the engine has them no more).
    last_words: Mutex<Vec<Vec<logfile::Line>>>,
    /// `drover logs -f` sessions following this instance now: a stop waits for one more read
    /// of the components' files when there are some.
    pub follows: std::sync::atomic::AtomicUsize,
}

impl Ctx {
    /// Change component `idx`'s report; the reporter is woken if anything changed.
    pub fn update(&self, idx: usize, f: impl FnOnce(&mut ComponentReport)) {
        let mut comps = self.components.lock().unwrap_or_else(|e| e.into_inner());
        let before = comps[idx].clone();
        f(&mut comps[idx]);
        if comps[idx] != before {
            drop(comps);
            self.changed.send_replace(());
        }
    }

    /// Component `idx`'s container (the last run's).
    pub fn set_container(&self, idx: usize, id: &str) {
        let mut c = self.containers.lock().unwrap_or_else(|e| e.into_inner());
        c[idx] = Some(id.to_string());
    }

    /// Keep component `idx`'s last lines for its final flight record.
    pub fn set_last_words(&self, idx: usize, lines: Vec<logfile::Line>) {
        let mut w = self.last_words.lock().unwrap_or_else(|e| e.into_inner());
        w[idx] = lines;
    }

    pub fn last_words(&self, idx: usize) -> Vec<logfile::Line> {
        self.last_words
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(idx)
            .cloned()
            .unwrap_or_default()
    }

    pub fn container(&self, idx: usize) -> Option<String> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(idx)
            .cloned()
            .flatten()
    }

    /// The flight recorder: component `idx` died (`reason`); its last lines go to the server.
    pub async fn record_flight(&self, idx: usize, reason: String) {
        let Some(tx) = &self.flights else {
            return;
        };
        let rec = relay::flight_record(self, idx, reason).await;
        if tx.try_send(rec).is_err() {
            tracing::warn!(component = %self.plan.components[idx].name, "flight records queue up (the server is slow or away): this one is dropped");
        }
    }

    /// Where component `idx`'s drain signal goes now (None: it is not running).
    pub fn set_drain_target(&self, idx: usize, target: Option<runtime::DrainTarget>) {
        let mut t = self.drain_targets.lock().unwrap_or_else(|e| e.into_inner());
        t[idx] = target;
    }

    /// The drain has started: send every running component that has a `drain_signal` its
    /// signal. Returns the components signalled, e.g. `app (SIGUSR1)`. A component that is not
    /// running now (restarting) is not signalled, nor is a run started later.
    async fn signal_drain(&self) -> Vec<String> {
        let targets = self
            .drain_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut signalled = Vec::new();
        for (comp, target) in self.plan.components.iter().zip(targets) {
            let Some(signal) = comp.drain_signal.as_deref() else {
                continue;
            };
            let Some(target) = target else {
                tracing::info!(component = %comp.name, "not running as the drain starts: no drain signal");
                continue;
            };
            match target.signal(signal).await {
                Ok(()) => {
                    tracing::info!(component = %comp.name, %signal, "drain signal sent");
                    signalled.push(format!("{} ({signal})", comp.name));
                }
                Err(problem) => {
                    tracing::warn!(component = %comp.name, %signal, %problem, "cannot send the drain signal")
                }
            }
        }
        signalled
    }

    /// Set the phase and wake the reporter; `from`: only if the phase is that one now.
    fn set_phase(&self, from: Option<AgentPhase>, phase: AgentPhase, wake: bool) {
        let mut cur = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if from.is_some_and(|f| f != *cur) {
            return;
        }
        *cur = phase;
        drop(cur);
        if wake {
            self.changed.send_replace(());
        }
    }

    /// The next heartbeat: current phase and components, next sequence number, utilization.
    fn heartbeat(&self) -> Heartbeat {
        let mut beats = self.beats.lock().unwrap_or_else(|e| e.into_inner());
        beats.0 += 1;
        let (seq, sampler) = &mut *beats;
        let phase = *self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let components = self
            .components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pids: Vec<u32> = components.iter().filter_map(|c| c.pid).collect();
        let mut hb = Heartbeat {
            instance: self.instance.instance.clone(),
            group: self.instance.group.clone(),
            generation: self.plan.generation,
            addr: self.instance.addr.to_string(),
            phase,
            seq: *seq,
            components,
            utilization: sampler.sample(&pids),
            drained: self
                .drained
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        // Within the limits the server accepts: long messages are cut here.
        hb.clamp();
        hb
    }
}

/// Run the agent: boot every component in plan order, supervise them and report, until
/// `shutdown` resolves ([`Outcome::Shutdown`]) or, with a server, until the server grants this
/// instance a permit ([`Outcome::Left`]); then stop every component gracefully, send a last
/// heartbeat (phase `stopping`) and return.
///
/// With a server, the agent long-polls `GET /v1/agent/permit` while the server's answer to its
/// last heartbeat says a permit may come soon (`leave_soon`; always, with a server that does
/// not send the hint), and holds no long-poll otherwise. On a permit it reports
/// `draining` at once, waits until `GET /v1/agent/connections` shows no open connection (or the
/// permit's drain timeout has passed), then stops as on shutdown. Nothing but a permit makes it
/// leave: an unreachable or misbehaving server changes nothing.
///
/// Meant for a current-thread runtime built with `enable_all` (timers, I/O and the signal driver
/// that reaps children); it spawns one task per component and needs no other thread.
///
/// Errors only when the agent cannot start at all (its directory, its http client); a component
/// that cannot be fetched or started is reported `failed` and retried with backoff.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Outcome, AgentError> {
    run_with_auth(cfg, AgentAuth::default(), shutdown).await
}

/// How the agent proves who it is to the server, and how it knows the server: part of its
/// launch configuration.
#[derive(Clone, Default)]
pub struct AgentAuth {
    /// The group's agent token, sent as `Authorization: Bearer` to the server only (never to
    /// artifact URLs).
    pub token: Option<String>,
    /// The server's CA certificate (DER): with it, the server's certificate must chain to this
    /// one certificate and no other root is trusted. Set by [`AgentAuth::pin_ca`], which checks
    /// its fingerprint.
    pub ca_der: Option<Vec<u8>>,
}

impl std::fmt::Debug for AgentAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentAuth")
            .field("token", &self.token.as_ref().map(|_| "(hidden)"))
            .field("ca_der", &self.ca_der.as_ref().map(|p| p.len()))
            .finish()
    }
}

impl AgentAuth {
    /// Trust the first certificate of `pem` as the server's CA, only if the sha256 of its DER
    /// bytes is `sha256` (hex): the pin from the launch configuration. That certificate alone
    /// is trusted: any other certificate in the file is ignored (the pin covers what is
    /// trusted, and the server pins the first certificate of its CA file).
    pub fn pin_ca(&mut self, pem: Vec<u8>, sha256: &str) -> Result<(), AgentError> {
        let der = pem_first_der(&pem).ok_or_else(|| {
            AgentError::HttpClient("the server CA file holds no PEM certificate".into())
        })?;
        use sha2::Digest;
        let got = hex::encode(sha2::Sha256::digest(&der));
        if !got.eq_ignore_ascii_case(sha256.trim()) {
            return Err(AgentError::HttpClient(format!(
                "the server CA's sha256 is {got}, not the pinned {}: refusing to trust it",
                sha256.trim()
            )));
        }
        self.ca_der = Some(der);
        Ok(())
    }

    /// The client for the server: pinned CA (when given) and the token on every request.
    /// `https`: whether the server is reached over TLS without a pinned CA (then the usual
    /// roots are loaded; otherwise none are, which keeps the agent's memory down).
    pub fn server_client(&self, https: bool) -> Result<reqwest::Client, AgentError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(HEARTBEAT_TIMEOUT)
            // One for the permit long-poll, one for heartbeats and the rest.
            .pool_max_idle_per_host(2);
        if let Some(token) = &self.token {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| AgentError::HttpClient("the agent token is not valid text".into()))?;
            v.set_sensitive(true);
            let mut h = reqwest::header::HeaderMap::new();
            h.insert(reqwest::header::AUTHORIZATION, v);
            b = b.default_headers(h);
        }
        if let Some(der) = &self.ca_der {
            let ca = reqwest::Certificate::from_der(der)
                .map_err(|e| AgentError::HttpClient(format!("the server CA: {e}")))?;
            b = b.tls_built_in_root_certs(false).add_root_certificate(ca);
        } else if !https {
            b = b.tls_built_in_root_certs(false);
        }
        b.build().map_err(|e| AgentError::HttpClient(e.to_string()))
    }
}

/// The DER bytes of the first `CERTIFICATE` block of a PEM text.
fn pem_first_der(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = start + text[start..].find("-----END CERTIFICATE-----")?;
    let b64: String = text[start..end].split_whitespace().collect();
    drover_model::image::base64_decode(&b64)
}

/// Like [`run`], with the launch configuration's credentials for the server.
pub async fn run_with_auth(
    cfg: AgentConfig,
    auth: AgentAuth,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Outcome, AgentError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|source| AgentError::Dir {
        path: cfg.dir.clone(),
        source,
    })?;
    let dir = std::fs::canonicalize(&cfg.dir).unwrap_or(cfg.dir.clone());
    // Artifacts are fetched with a plain client: no token, the usual roots (loaded only when
    // an artifact is fetched over https: parsing them costs memory the agent otherwise saves).
    let https_artifacts = cfg.plan.components.iter().any(|c| {
        c.artifact
            .as_ref()
            .is_some_and(|a| a.url.starts_with("https://"))
    });
    let client = reqwest::Client::builder()
        .connect_timeout(HEARTBEAT_TIMEOUT)
        .pool_max_idle_per_host(2)
        .tls_built_in_root_certs(https_artifacts)
        .build()
        .map_err(|e| AgentError::HttpClient(e.to_string()))?;
    let servers = cfg.server.as_deref().map(report::Servers::parse);
    let server_https = servers.as_ref().is_some_and(report::Servers::https);
    let server_client = auth.server_client(server_https)?;
    let components = cfg
        .plan
        .components
        .iter()
        .map(|c| ComponentReport {
            name: c.name.clone(),
            version: c.version.clone(),
            state: if c.artifact.is_some() {
                ComponentState::Fetching
            } else {
                ComponentState::Starting
            },
            pid: None,
            restarts: 0,
            last_exit: None,
            message: None,
            last_output: None,
        })
        .collect();
    let components_len = cfg.plan.components.len();
    let (flight_tx, flight_rx) = tokio::sync::mpsc::channel(relay::FLIGHT_QUEUE);
    // Service discovery: files and the DNS socket ready before any component starts.
    let discovery = cfg
        .server
        .as_ref()
        .and_then(|_| peers::Discovery::prepare(&cfg.plan, &dir, cfg.addr));
    let peers_env = cfg
        .plan
        .components
        .iter()
        .map(|c| {
            let env = discovery
                .as_ref()
                .map(|d| d.env(&c.name))
                .unwrap_or_default();
            (c.name.clone(), env)
        })
        .filter(|(_, env)| !env.is_empty())
        .collect();
    let ctx = Arc::new(Ctx {
        instance: Instance {
            instance: cfg.instance.clone(),
            group: cfg.group.clone(),
            addr: cfg.addr,
            dir,
            drover_bin: cfg.drover_bin.clone(),
            generation: cfg.plan.generation,
            peers_env,
        },
        plan: cfg.plan,
        client: client.clone(),
        components: Mutex::new(components),
        phase: Mutex::new(AgentPhase::Booting),
        changed: watch::Sender::new(()),
        poll_permit: watch::Sender::new(false),
        beats: Mutex::new((0, Sampler::new())),
        docker: docker::Engine::new(&cfg.dir),
        drain_targets: Mutex::new(vec![None; components_len]),
        drained: Mutex::new(None),
        containers: Mutex::new(vec![None; components_len]),
        flights: servers.as_ref().map(|_| flight_tx.clone()),
        follows: Default::default(),
        last_words: Mutex::new(vec![Vec::new(); components_len]),
    });
    let link = servers.clone().map(|s| relay::Link {
        client: server_client.clone(),
        servers: s,
    });
    let mut reporter = servers
        .clone()
        .map(|s| Reporter::new(server_client.clone(), s));
    let leave = servers.clone().map(|s| {
        (
            Leave::new(server_client.clone(), s.clone(), &cfg.instance),
            s,
        )
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(ctx.plan.components.len());
    tracing::info!(
        instance = %cfg.instance,
        group = %cfg.group,
        generation = ctx.plan.generation,
        versions = %ctx.plan.versions(),
        "agent starting"
    );

    // Log sessions and exec go on through the drain and the stop (a `drover logs -f` sees
    // what the components print as they leave), until the last lines are out.
    let relay = async {
        match link.clone() {
            Some(link) => relay::run(ctx.clone(), link, flight_rx).await,
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(relay);
    let outcome = {
        let boot = async {
            for idx in 0..ctx.plan.components.len() {
                let (tx, rx) = oneshot::channel();
                tasks.push(tokio::spawn(supervisor::supervise(
                    ctx.clone(),
                    idx,
                    stop_rx.clone(),
                    tx,
                )));
                let _ = rx.await;
            }
            // Unless a permit came first: a draining agent stays draining.
            ctx.set_phase(Some(AgentPhase::Booting), AgentPhase::Running, true);
            tracing::info!("all components started");
        };
        let has_custom = ctx
            .plan
            .components
            .iter()
            .any(|c| !c.custom_metrics.is_empty());
        let report = async {
            let Some(reporter) = reporter.as_mut() else {
                return std::future::pending::<()>().await;
            };
            let mut changes = ctx.changed.subscribe();
            let mut tick =
                tokio::time::interval(cfg.heartbeat_interval.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = changes.changed() => tokio::time::sleep(DEBOUNCE).await,
                }
                changes.borrow_and_update();
                tick.reset();
                let custom = if has_custom {
                    metrics::read_all(&ctx.plan, ctx.instance.addr, Duration::from_millis(300))
                        .await
                } else {
                    Default::default()
                };
                let mut hb = ctx.heartbeat();
                hb.utilization.custom = custom;
                hb.clamp();
                // Without an answer the hint stays as it was: nothing changes on no evidence.
                if let Some(reply) = reporter.send(&hb, HEARTBEAT_TIMEOUT).await {
                    let poll = reply.wants_permit_poll();
                    ctx.poll_permit
                        .send_if_modified(|p| std::mem::replace(p, poll) != poll);
                }
            }
        };
        let leaving = async {
            let Some((leave, server)) = leave.as_ref() else {
                return std::future::pending::<leave::Permit>().await;
            };
            // The long-poll is held only while the server says a permit may come soon (a
            // stale instance, one that holds a permit already); an idle agent holds none.
            let mut hint = ctx.poll_permit.subscribe();
            let permit = loop {
                let _ = hint.wait_for(|poll| *poll).await;
                tracing::debug!("a permit may come soon: long-polling for it");
                tokio::select! {
                    permit = leave.wait_for_permit() => break permit,
                    _ = hint.wait_for(|poll| !*poll) => {
                        tracing::debug!("no permit expected any more: long-poll closed");
                    }
                }
            };
            tracing::info!(
                reason = %permit.reason,
                drain_timeout_ms = permit.drain_timeout.as_millis() as u64,
                "permit received; draining"
            );
            // Reported at once (not through the reporter, which may be busy or debouncing),
            // while the drain already runs.
            ctx.set_phase(None, AgentPhase::Draining, false);
            let mut draining = Reporter::new(server_client.clone(), server.clone());
            let hb = ctx.heartbeat();
            let started = std::time::Instant::now();
            // The components learn of the drain (their drain_signal) while the balancer has
            // already taken the instance out: they may close kept-alive connections now.
            let (_, (signalled, drained)) =
                tokio::join!(draining.send(&hb, HEARTBEAT_TIMEOUT), async {
                    let signalled = ctx.signal_drain().await;
                    (
                        signalled,
                        leave
                            .drain(permit.drain_timeout.saturating_sub(started.elapsed()))
                            .await,
                    )
                });
            let open = drained
                .open
                .map_or("unknown".to_string(), |n| n.to_string());
            let report = DrainReport {
                took_ms: started.elapsed().as_millis() as u64,
                open: drained.open,
                timed_out: drained.timed_out,
                signalled,
            };
            let drain_ms = report.took_ms;
            if drained.timed_out {
                tracing::info!(drain_ms, %open, "drain timeout reached; stopping anyway");
            } else {
                tracing::info!(drain_ms, %open, "drained: no open connection left");
            }
            *ctx.drained.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
            permit
        };
        let discover = async {
            match (discovery, servers.clone()) {
                (Some(d), Some(servers)) => {
                    d.run(server_client.clone(), servers, &cfg.instance).await
                }
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = shutdown => Outcome::Shutdown,
            permit = leaving => Outcome::Left {
                reason: permit.reason,
                decrement: permit.decrement,
            },
            // Never completes: the reporter (or, without a server, its stand-in) and discovery
            // run until dropped.
            _ = async { tokio::join!(boot, report, discover, &mut relay) } => Outcome::Shutdown,
        }
    };

    tracing::info!("stopping components");
    ctx.set_phase(None, AgentPhase::Stopping, true);
    let _ = stop_tx.send(true);
    let stopped = async {
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "a component supervisor failed");
            }
        }
    };
    // The drain's report reaches the server as the stop begins (not after the grace period).
    let report_drain = async {
        if let (Some(reporter), true) = (reporter.as_mut(), matches!(outcome, Outcome::Left { .. }))
        {
            let hb = ctx.heartbeat();
            reporter.send(&hb, HEARTBEAT_TIMEOUT).await;
        }
    };
    let stopping = async {
        tokio::join!(stopped, report_drain);
        // A follow session reads the components' files every 200 ms: their last lines out.
        if ctx.follows.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            tokio::time::sleep(logfile::FOLLOW_POLL + Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = stopping => {}
        _ = &mut relay => {}
    }
    // The flight recorder: the last lines of every component of an instance that leaves.
    if let Some(link) = &link {
        let why = match &outcome {
            Outcome::Shutdown => "the agent stopped".to_string(),
            Outcome::Left { reason, .. } => format!("the instance left: {reason}"),
        };
        let mut recs = Vec::new();
        for idx in 0..ctx.plan.components.len() {
            recs.push(relay::send_flight(
                link.clone(),
                relay::flight_record(&ctx, idx, why.clone()).await,
            ));
        }
        futures::future::join_all(recs).await;
    }
    for idx in 0..ctx.plan.components.len() {
        ctx.update(idx, |c| {
            c.state = ComponentState::Stopped;
            c.pid = None;
        });
    }
    if let Some(reporter) = reporter.as_mut() {
        let hb = ctx.heartbeat();
        reporter.send(&hb, LAST_HEARTBEAT_TIMEOUT).await;
    }
    match &outcome {
        Outcome::Shutdown => tracing::info!("agent stopped"),
        Outcome::Left { reason, .. } => {
            tracing::info!(%reason, "agent stopped: the instance left on its permit")
        }
    }
    Ok(outcome)
}
