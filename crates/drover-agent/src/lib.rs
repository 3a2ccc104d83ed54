//! drover-agent: the per-instance agent — boot (fetch, unpack, start in plan order), supervise
//! (respawn with backoff, health checks) and report (heartbeats with status and utilization).
//!
//! Invariants:
//! - the agent acts only on positive evidence: an unreachable server is logged (at most once a
//!   minute) and changes nothing it supervises;
//! - every component runs in its own process group and dies with the agent (`PR_SET_PDEATHSIG`),
//!   so nothing outlives it; a stop is the plan's signal, the grace period, then SIGKILL;
//! - it runs on a tokio current-thread runtime (processes are spawned from the runtime thread,
//!   never from `spawn_blocking`, since the death signal follows the spawning thread).

pub mod artifact;
pub mod backoff;
mod component;
mod error;
mod health;
mod process;
mod report;
mod supervisor;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_model::api::{AgentPhase, ComponentReport, ComponentState, Heartbeat};
use drover_model::Plan;
use tokio::sync::{oneshot, watch};

pub use backoff::Backoff;
pub use error::AgentError;

use component::Instance;
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
    /// Base URL of the server, e.g. `http://127.0.0.1:7878`; `None`: no reporting.
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

/// State shared by the supervisors and the reporter.
pub(crate) struct Ctx {
    pub instance: Instance,
    pub plan: Plan,
    pub client: reqwest::Client,
    components: Mutex<Vec<ComponentReport>>,
    phase: Mutex<AgentPhase>,
    /// Bumped on every change of a component's report.
    changed: watch::Sender<()>,
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

    fn set_phase(&self, phase: AgentPhase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
        self.changed.send_replace(());
    }

    fn heartbeat(&self, seq: u64, sampler: &mut Sampler) -> Heartbeat {
        let phase = *self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let components = self
            .components
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let pids: Vec<u32> = components.iter().filter_map(|c| c.pid).collect();
        Heartbeat {
            instance: self.instance.instance.clone(),
            group: self.instance.group.clone(),
            generation: self.plan.generation,
            addr: self.instance.addr.to_string(),
            phase,
            seq,
            components,
            utilization: sampler.sample(&pids),
        }
    }
}

/// Run the agent: boot every component in plan order, supervise them and report, until
/// `shutdown` resolves; then stop every component gracefully, send a last heartbeat and return.
///
/// Meant for a current-thread runtime built with `enable_all` (timers, I/O and the signal driver
/// that reaps children); it spawns one task per component and needs no other thread.
///
/// Errors only when the agent cannot start at all (its directory, its http client); a component
/// that cannot be fetched or started is reported `failed` and retried with backoff.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|source| AgentError::Dir {
        path: cfg.dir.clone(),
        source,
    })?;
    let dir = std::fs::canonicalize(&cfg.dir).unwrap_or(cfg.dir.clone());
    let client = reqwest::Client::builder()
        .connect_timeout(HEARTBEAT_TIMEOUT)
        .pool_max_idle_per_host(1)
        .build()
        .map_err(|e| AgentError::HttpClient(e.to_string()))?;
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
        })
        .collect();
    let ctx = Arc::new(Ctx {
        instance: Instance {
            instance: cfg.instance.clone(),
            group: cfg.group.clone(),
            addr: cfg.addr,
            dir,
            drover_bin: cfg.drover_bin.clone(),
            generation: cfg.plan.generation,
        },
        plan: cfg.plan,
        client: client.clone(),
        components: Mutex::new(components),
        phase: Mutex::new(AgentPhase::Booting),
        changed: watch::Sender::new(()),
    });
    let mut reporter = cfg.server.as_deref().map(|s| Reporter::new(client, s));
    let mut sampler = Sampler::new();
    let mut seq = 0u64;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(ctx.plan.components.len());
    tracing::info!(
        instance = %cfg.instance,
        group = %cfg.group,
        generation = ctx.plan.generation,
        versions = %ctx.plan.versions(),
        "agent starting"
    );

    {
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
            ctx.set_phase(AgentPhase::Running);
            tracing::info!("all components started");
        };
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
                seq += 1;
                let hb = ctx.heartbeat(seq, &mut sampler);
                reporter.send(&hb, HEARTBEAT_TIMEOUT).await;
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = async { tokio::join!(boot, report) } => {}
        }
    }

    tracing::info!("stopping components");
    ctx.set_phase(AgentPhase::Stopping);
    let _ = stop_tx.send(true);
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "a component supervisor failed");
        }
    }
    for idx in 0..ctx.plan.components.len() {
        ctx.update(idx, |c| {
            c.state = ComponentState::Stopped;
            c.pid = None;
        });
    }
    if let Some(reporter) = reporter.as_mut() {
        let hb = ctx.heartbeat(seq + 1, &mut sampler);
        reporter.send(&hb, LAST_HEARTBEAT_TIMEOUT).await;
    }
    tracing::info!("agent stopped");
    Ok(())
}
