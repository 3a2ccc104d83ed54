//! The `docker` runtime: each component is a container of the local Docker Engine, driven through
//! its API (bollard; the API version is negotiated, since engines in the wild are older than
//! bollard's default).
//!
//! - **Supervision** comes from the engine's event stream (`die`, `oom`, `health_status`, ...):
//!   an event only wakes the component's supervisor, which then inspects its container; the
//!   inspection is the truth (so replayed, duplicated or missed events change nothing), and a
//!   slow poll backs the stream up. Containers have no restart policy: the agent restarts them
//!   with its own backoff, and restarts an unhealthy one, which Docker never does.
//! - **Ownership**: every container carries labels (fleet, service, region, instance, component,
//!   generation, version, the instance directory and a hash of its settings). A restarted agent
//!   adopts the running containers whose settings match instead of starting duplicates; a
//!   stopping agent removes its containers. The agent holds `DIR/agent.lock` (flock) while it
//!   runs: a container whose instance directory has no live lock holder was left by an agent
//!   that crashed, and any agent on the machine removes it after a grace period.
//! - **Static stability**: an image already present is never pulled again, so a restart works
//!   with the registry down; when the engine restarts, the event stream is re-established and
//!   every container is inspected again (reconciled), then restarted as needed.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecOptions};
use bollard::models::{
    ContainerCreateBody, ContainerState, ContainerSummaryStateEnum, HealthConfig, HealthStatusEnum,
    HostConfig, HostConfigLogConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, KillContainerOptionsBuilder,
    ListContainersOptions, RemoveContainerOptions, StopContainerOptions,
};
use bollard::Docker;
use drover_creds::Sources;
use drover_model::api::ComponentState;
use drover_model::image::ImageRef;
use drover_model::{Plan, PlanComponent};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, OnceCell};

use crate::component::Instance;
use crate::{AgentError, Ctx};

/// Label keys on every container the agent makes.
pub const LABEL_FLEET: &str = "drover.fleet";
pub const LABEL_SERVICE: &str = "drover.service";
pub const LABEL_REGION: &str = "drover.region";
pub const LABEL_INSTANCE: &str = "drover.instance";
pub const LABEL_COMPONENT: &str = "drover.component";
pub const LABEL_GENERATION: &str = "drover.generation";
pub const LABEL_VERSION: &str = "drover.version";
/// The instance directory: who owns the container (its agent holds `DIR/agent.lock`).
pub const LABEL_DIR: &str = "drover.dir";
/// A hash of everything the container was made from: a container is adopted only if it matches.
pub const LABEL_SPEC: &str = "drover.spec";

/// The file a running agent holds an exclusive `flock` on.
pub const LOCK_FILE: &str = "agent.lock";
/// How long a container must have had no live agent before another agent removes it.
const ORPHAN_GRACE: Duration = Duration::from_secs(10);
/// How often containers are checked for a live agent.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// A container is inspected at least this often even when no event comes.
const SAFETY_POLL: Duration = Duration::from_secs(10);
/// Timeout of one engine request (a stop waits for the grace period within it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a `die` by SIGKILL under a memory limit waits for the `oom` event that tells it was
/// the OOM killer.
const OOM_GRACE: Duration = Duration::from_millis(30);
/// How often pull progress is logged and reported.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What wakes a component's supervisor: an event about one container, or "look at everything"
/// (the event stream was (re)established, e.g. after an engine restart).
#[derive(Clone, Debug)]
pub(crate) enum Wake {
    All,
    Container(ContainerEvent),
}

/// One engine event about a container.
#[derive(Clone, Debug)]
pub(crate) struct ContainerEvent {
    pub id: String,
    /// `die`, `oom`, `start`, `health_status: unhealthy`, ...
    pub action: String,
    /// When it happened, in the engine's clock (ns since the Unix epoch).
    pub time_ns: i64,
    /// `die` only.
    pub exit_code: Option<i64>,
}

/// The agent's connection to the Docker Engine, made on first use, and its background tasks
/// (the event stream and the sweep of orphaned containers), which end with it.
pub(crate) struct Engine {
    dir: PathBuf,
    client: OnceCell<Docker>,
    wake: broadcast::Sender<Wake>,
    lock: Mutex<Option<File>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

impl Engine {
    /// No I/O until a docker component needs the engine.
    pub fn new(dir: &Path) -> Engine {
        Engine {
            // The same form as the instance's directory in labels.
            dir: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()),
            client: OnceCell::new(),
            wake: broadcast::channel(256).0,
            lock: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Wake> {
        self.wake.subscribe()
    }

    fn dir_label(&self) -> String {
        self.dir.display().to_string()
    }

    /// The negotiated client. The first successful call also takes the instance lock and starts
    /// the event stream and the sweeper; a failed call is retried by the next.
    pub async fn client(&self) -> Result<Docker, AgentError> {
        self.client
            .get_or_try_init(|| async {
                self.take_lock().await?;
                let docker = Docker::connect_with_local_defaults()
                    .map_err(|e| AgentError::Engine(format!("cannot connect: {e}")))?
                    .with_timeout(REQUEST_TIMEOUT);
                let docker = docker.negotiate_version().await.map_err(|e| {
                    AgentError::Engine(format!("cannot reach the Docker Engine: {e}"))
                })?;
                let v = docker.client_version();
                tracing::info!(
                    api = %format!("{}.{}", v.major_version, v.minor_version),
                    "connected to the Docker Engine"
                );
                let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
                tasks.push(tokio::spawn(watch_events(
                    docker.clone(),
                    self.dir_label(),
                    self.wake.clone(),
                )));
                tasks.push(tokio::spawn(sweep_orphans(
                    docker.clone(),
                    self.dir_label(),
                )));
                Ok(docker)
            })
            .await
            .cloned()
    }

    /// `flock(DIR/agent.lock)`: proof, to the agents of other instances, that this instance's
    /// containers have a live owner. Waits a little: a sweeper may be testing it.
    async fn take_lock(&self) -> Result<(), AgentError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| AgentError::Dir {
                path: path.clone(),
                source,
            })?;
        for _ in 0..40 {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                *self.lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(AgentError::Engine(format!(
            "{} is locked: another agent runs this instance",
            path.display()
        )))
    }
}

/// Forward the engine's events about this instance's containers as wake-ups; re-establish the
/// stream whenever it breaks (engine restart), then wake everyone to reconcile.
async fn watch_events(docker: Docker, dir: String, wake: broadcast::Sender<Wake>) {
    let mut delay = Duration::from_millis(50);
    // Since when the engine is away, and whether that was said.
    let mut down_since: Option<Instant> = None;
    let mut warned = false;
    loop {
        if let Err(e) = docker.ping().await {
            if !warned {
                tracing::warn!(error = %e, "the Docker Engine does not answer; containers are left as they are, retrying");
                warned = true;
            }
            down_since.get_or_insert_with(Instant::now);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
            continue;
        }
        if let Some(t) = down_since.take() {
            tracing::info!(
                down_ms = t.elapsed().as_millis() as u64,
                "the Docker Engine answers again; reconciling containers"
            );
        }
        warned = false;
        delay = Duration::from_millis(50);
        // A little history: events between the ping and the subscription are replayed
        // (duplicates are harmless, every wake-up is checked by an inspection).
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs().saturating_sub(2))
            .unwrap_or(0);
        let filters: HashMap<String, Vec<String>> = [
            ("type".to_string(), vec!["container".to_string()]),
            ("label".to_string(), vec![format!("{LABEL_DIR}={dir}")]),
        ]
        .into_iter()
        .collect();
        let mut stream = docker.events(Some(EventsOptions {
            since: Some(since.to_string()),
            until: None,
            filters: Some(filters),
        }));
        let _ = wake.send(Wake::All);
        loop {
            match stream.next().await {
                Some(Ok(ev)) => {
                    let action = ev.action.unwrap_or_default();
                    let time_ns = ev
                        .time_nano
                        .or(ev.time.map(|t| t.saturating_mul(1_000_000_000)))
                        .unwrap_or(0);
                    if let Some(actor) = ev.actor {
                        let Some(id) = actor.id else { continue };
                        let exit_code = actor
                            .attributes
                            .as_ref()
                            .and_then(|a| a.get("exitCode"))
                            .and_then(|c| c.parse().ok());
                        tracing::debug!(%action, container = %short(&id), "engine event");
                        let _ = wake.send(Wake::Container(ContainerEvent {
                            id,
                            action,
                            time_ns,
                            exit_code,
                        }));
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the engine's event stream failed; reconnecting");
                    break;
                }
                None => {
                    tracing::warn!("the engine's event stream ended; reconnecting");
                    break;
                }
            }
        }
        down_since = Some(Instant::now());
    }
}

/// Remove containers whose instance has no live agent (a crashed agent's) after ORPHAN_GRACE.
async fn sweep_orphans(docker: Docker, own_dir: String) {
    let mut dead_since: HashMap<String, Instant> = HashMap::new();
    loop {
        let filters: HashMap<String, Vec<String>> =
            [("label".to_string(), vec![LABEL_DIR.to_string()])]
                .into_iter()
                .collect();
        let listed = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await;
        if let Ok(list) = listed {
            let mut seen = HashSet::new();
            for c in list {
                let (Some(id), Some(labels)) = (c.id, c.labels) else {
                    continue;
                };
                let Some(dir) = labels.get(LABEL_DIR) else {
                    continue;
                };
                if *dir == own_dir || !orphaned(Path::new(dir)) {
                    continue;
                }
                seen.insert(id.clone());
                let first = *dead_since.entry(id.clone()).or_insert_with(Instant::now);
                if first.elapsed() < ORPHAN_GRACE {
                    continue;
                }
                let instance = labels.get(LABEL_INSTANCE).cloned().unwrap_or_default();
                let component = labels.get(LABEL_COMPONENT).cloned().unwrap_or_default();
                match remove(&docker, &id).await {
                    Ok(()) => tracing::info!(
                        container = %short(&id), %instance, %component, dir = %dir,
                        "removed a container left by an agent that is gone"
                    ),
                    Err(e) => {
                        tracing::warn!(container = %short(&id), error = %e, "cannot remove an orphaned container")
                    }
                }
                dead_since.remove(&id);
            }
            dead_since.retain(|id, _| seen.contains(id));
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// Whether the containers labelled with agent directory `dir` are orphans: its lock file can
/// be opened and nobody holds it, or the directory is gone altogether. A lock file that
/// exists but cannot be opened (another user's, another installation's) says nothing: those
/// containers are left alone.
pub fn orphaned(dir: &Path) -> bool {
    match File::open(dir.join(LOCK_FILE)) {
        Ok(_) => !agent_alive(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => !dir.exists(),
        Err(_) => false,
    }
}

/// Whether an agent holds `dir/agent.lock`.
pub fn agent_alive(dir: &Path) -> bool {
    let Ok(f) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; released at once (and on close).
    unsafe {
        if libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 {
            libc::flock(f.as_raw_fd(), libc::LOCK_UN);
            false
        } else {
            true
        }
    }
}

/// Remove a container, running or not, with its anonymous volumes.
pub(crate) async fn remove(docker: &Docker, id: &str) -> Result<(), DockerError> {
    match docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            }),
        )
        .await
    {
        Err(e) if status(&e) == Some(404) => Ok(()),
        r => r,
    }
}

fn status(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// One component's container across its runs: its id once known, and whether its image is here.
pub(crate) struct Slot {
    pub id: Option<String>,
    image_ready: bool,
}

impl Slot {
    pub fn new() -> Slot {
        Slot {
            id: None,
            image_ready: false,
        }
    }

    /// Remove the container (the agent is stopping; the instance goes away).
    pub async fn remove(&mut self, ctx: &Ctx, comp: &PlanComponent) {
        let Some(id) = self.id.take() else { return };
        let Some(docker) = ctx.docker.client.get() else {
            return;
        };
        match remove(docker, &id).await {
            Ok(()) => {
                tracing::info!(component = %comp.name, container = %short(&id), "container removed")
            }
            Err(e) => {
                tracing::warn!(component = %comp.name, container = %short(&id), error = %e, "cannot remove the container")
            }
        }
    }
}

/// Everything a container is made from, rendered for this instance.
pub(crate) struct Spec {
    pub name: String,
    pub image: String,
    pub hash: String,
    pub body: ContainerCreateBody,
}

/// The container for `comp` on `inst`.
pub(crate) fn spec(inst: &Instance, plan: &Plan, comp: &PlanComponent) -> Result<Spec, AgentError> {
    let d = comp.docker.as_ref().ok_or_else(|| AgentError::Container {
        component: comp.name.clone(),
        reason: "the plan has no image for this docker component".into(),
    })?;
    let image = d.reference().to_string();
    // The hash covers the plan component and the instance: what the container is made from.
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(comp).unwrap_or_default());
    h.update(
        format!(
            "\n{}\n{}\n{}\n{}",
            inst.instance,
            inst.addr,
            inst.generation,
            inst.dir.display()
        )
        .as_bytes(),
    );
    let hash = hex::encode(&h.finalize()[..8]);
    let dir_hash = hex::encode(&Sha256::digest(inst.dir.display().to_string().as_bytes())[..4]);
    let name = format!("drover-{}-{}-{dir_hash}", inst.instance, comp.name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();

    let env: Vec<String> = inst
        .env(comp)?
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut cmd: Vec<String> = Vec::new();
    if !comp.command.is_empty() {
        cmd.push(inst.render(comp, &comp.command)?);
    }
    for a in &comp.args {
        cmd.push(inst.render(comp, a)?);
    }
    let entrypoint = match &d.entrypoint {
        Some(e) => Some(
            e.iter()
                .map(|a| inst.render(comp, a))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    let host_network = d.network == "host";
    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    // With the host's network the component binds the instance's address itself.
    for (pname, host_port) in comp.ports.iter().filter(|_| !host_network) {
        let inside = d.container_ports.get(pname).copied().unwrap_or(*host_port);
        let key = format!("{inside}/tcp");
        exposed.push(key.clone());
        bindings
            .entry(key)
            .or_default()
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some(inst.addr.to_string()),
                host_port: Some(host_port.to_string()),
            });
    }
    let mut binds = Vec::new();
    for v in &d.volumes {
        let v = inst.render(comp, v)?;
        let source = v.split(':').next().unwrap_or_default();
        if source.starts_with('/') {
            // Docker would make a missing directory too (owned by root); make it ours.
            let _ = std::fs::create_dir_all(source);
        }
        binds.push(v);
    }
    let labels: HashMap<String, String> = [
        (LABEL_FLEET, plan.fleet.clone()),
        (LABEL_SERVICE, plan.service.clone()),
        (LABEL_REGION, plan.region.clone()),
        (LABEL_INSTANCE, inst.instance.clone()),
        (LABEL_COMPONENT, comp.name.clone()),
        (LABEL_GENERATION, inst.generation.to_string()),
        (LABEL_VERSION, comp.version.clone()),
        (LABEL_DIR, inst.dir.display().to_string()),
        (LABEL_SPEC, hash.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let body = ContainerCreateBody {
        image: Some(image.clone()),
        env: Some(env),
        cmd: (!cmd.is_empty()).then_some(cmd),
        entrypoint,
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        labels: Some(labels),
        stop_signal: Some(comp.stop_signal.clone()),
        stop_timeout: Some(grace_secs(comp.stop_grace.0)),
        // drover's own health check replaces the image's HEALTHCHECK.
        healthcheck: comp.health.as_ref().map(|_| HealthConfig {
            test: Some(vec!["NONE".to_string()]),
            ..Default::default()
        }),
        host_config: Some(HostConfig {
            network_mode: Some(d.network.clone()),
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            binds: (!binds.is_empty()).then_some(binds),
            memory: d.memory.map(|m| m as i64),
            // No swap beyond the limit: the limit is the size.
            memory_swap: d.memory.map(|m| m as i64),
            nano_cpus: d.cpus.map(|c| (c * 1e9) as i64),
            log_config: Some(HostConfigLogConfig {
                typ: Some(d.log.driver.clone()),
                config: Some(
                    d.log
                        .options
                        .iter()
                        // drover's own option (the flight recorder's size), not the engine's.
                        .filter(|(k, _)| k.as_str() != drover_model::logs::FLIGHT_SIZE_OPTION)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
            }),
            // The agent restarts containers itself, with its own backoff.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Spec {
        name,
        image,
        hash,
        body,
    })
}

fn grace_secs(d: Duration) -> i64 {
    d.as_millis().div_ceil(1000) as i64
}

/// Credentials for the registry of `reference`, as Docker finds them
/// (`drover_creds`: the environment, the Docker config, its credential
/// helpers). Credentials that are configured but cannot be had are logged, and the pull is
/// tried without them.
pub(crate) fn credentials(reference: &str) -> Option<DockerCredentials> {
    let r = ImageRef::parse(reference).ok()?;
    let registry = r.registry_name().to_string();
    let (username, password) = match Sources::from_env().credentials(&registry) {
        Ok(c) => c?,
        Err(e) => {
            tracing::warn!(registry = %registry, "no registry credentials: {e}");
            return None;
        }
    };
    Some(DockerCredentials {
        username: Some(username),
        password: Some(password),
        serveraddress: Some(registry),
        ..Default::default()
    })
}

/// Make sure the image is here: an image already present is used as it is (no registry
/// needed); otherwise it is pulled, with progress in the logs and the component's report.
pub(crate) async fn ensure_image(
    ctx: &Ctx,
    idx: usize,
    slot: &mut Slot,
    docker: &Docker,
    image: &str,
) -> Result<(), AgentError> {
    if slot.image_ready {
        return Ok(());
    }
    let comp = &ctx.plan.components[idx];
    if docker.inspect_image(image).await.is_ok() {
        slot.image_ready = true;
        return Ok(());
    }
    ctx.update(idx, |c| {
        c.state = ComponentState::Fetching;
        c.message = Some(format!("pulling {image}"));
    });
    tracing::info!(component = %comp.name, %image, "pulling image");
    let started = Instant::now();
    // A credential helper is a program: run it off the agent's one thread.
    let creds = {
        let image = image.to_string();
        tokio::task::spawn_blocking(move || credentials(&image))
            .await
            .unwrap_or(None)
    };
    let mut stream = docker.create_image(
        Some(CreateImageOptions {
            from_image: Some(image.to_string()),
            ..Default::default()
        }),
        None,
        creds,
    );
    // layer id -> (bytes done, bytes total, finished)
    let mut layers: HashMap<String, (i64, i64, bool)> = HashMap::new();
    let mut last = Instant::now();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| AgentError::Image {
            image: image.to_string(),
            reason: e.to_string(),
        })?;
        if let (Some(id), Some(status)) = (info.id, info.status.as_deref()) {
            let e = layers.entry(id).or_insert((0, 0, false));
            if let Some(p) = &info.progress_detail {
                if status.starts_with("Downloading") {
                    e.0 = p.current.unwrap_or(e.0);
                    e.1 = p.total.unwrap_or(e.1);
                }
            }
            if matches!(
                status,
                "Download complete" | "Pull complete" | "Already exists"
            ) {
                e.2 = true;
                e.0 = e.1;
            }
        }
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            let msg = progress(image, &layers);
            tracing::info!(component = %comp.name, "{msg}");
            ctx.update(idx, |c| c.message = Some(msg));
        }
    }
    let done: i64 = layers.values().map(|l| l.1).sum();
    tracing::info!(
        component = %comp.name,
        %image,
        layers = layers.len(),
        mb = format!("{:.1}", done as f64 / 1e6),
        took_ms = started.elapsed().as_millis() as u64,
        "image pulled"
    );
    ctx.update(idx, |c| c.message = None);
    slot.image_ready = true;
    Ok(())
}

fn progress(image: &str, layers: &HashMap<String, (i64, i64, bool)>) -> String {
    let finished = layers.values().filter(|l| l.2).count();
    let (cur, tot) = layers
        .values()
        .fold((0i64, 0i64), |(c, t), l| (c + l.0, t + l.1));
    format!(
        "pulling {image}: {finished} of {} layers, {:.1} of {:.1} MB",
        layers.len(),
        cur as f64 / 1e6,
        tot as f64 / 1e6
    )
}

/// One run of a component's container.
pub(crate) struct Run {
    docker: Docker,
    pub id: String,
    pub pid: u32,
    /// Health comes from the image's HEALTHCHECK (the component has no check of its own).
    pub image_health: bool,
    /// The container was running already (adopted), not started by this run.
    pub adopted: bool,
    last_health: Option<HealthStatusEnum>,
    memory: Option<u64>,
    check_now: bool,
    /// When the container's current run started (engine clock, ns): older events are not about
    /// this run.
    started_ns: i64,
    /// An `oom` event came during this run.
    oom: bool,
    /// Subscribed before the container was started: no event of this run is missed.
    wake: broadcast::Receiver<Wake>,
}

/// What a running container did.
pub(crate) enum RunEvent {
    Exited(String),
    Healthy,
    Unhealthy(String),
}

/// Start the component's container (again): the one from the previous run if there is one,
/// else an adoptable one (running, same settings), else a new one.
pub(crate) async fn start(
    ctx: &Ctx,
    idx: usize,
    slot: &mut Slot,
    docker: &Docker,
    spec: &Spec,
) -> Result<Run, AgentError> {
    let comp = &ctx.plan.components[idx];
    let err = |what: &str, e: DockerError| AgentError::Container {
        component: comp.name.clone(),
        reason: format!("{what}: {e}"),
    };
    let wake = ctx.docker.subscribe();
    let mut adopted = false;
    if slot.id.is_none() {
        let filters: HashMap<String, Vec<String>> = [(
            "label".to_string(),
            vec![
                format!("{LABEL_DIR}={}", ctx.instance.dir.display()),
                format!("{LABEL_COMPONENT}={}", comp.name),
            ],
        )]
        .into_iter()
        .collect();
        let found = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| err("cannot list containers", e))?;
        for c in found {
            let Some(id) = c.id else { continue };
            let same = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SPEC))
                .is_some_and(|h| *h == spec.hash);
            let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
            if same && slot.id.is_none() {
                if running {
                    tracing::info!(component = %comp.name, container = %short(&id), "adopting the running container");
                    adopted = true;
                }
                slot.id = Some(id);
            } else {
                tracing::info!(component = %comp.name, container = %short(&id), "removing a container with other settings");
                remove(docker, &id)
                    .await
                    .map_err(|e| err("cannot remove an old container", e))?;
            }
        }
    }
    if !adopted {
        if let Some(id) = slot.id.clone() {
            match docker.start_container(&id, None).await {
                Ok(()) => {}
                Err(e) if status(&e) == Some(304) => adopted = true,
                Err(e) if status(&e) == Some(404) => slot.id = None,
                Err(e) => return Err(err("cannot start the container", e)),
            }
        }
    }
    if slot.id.is_none() {
        let create = |name: String| {
            docker.create_container(
                Some(CreateContainerOptions {
                    name: Some(name),
                    ..Default::default()
                }),
                spec.body.clone(),
            )
        };
        let created = match create(spec.name.clone()).await {
            Err(e) if status(&e) == Some(409) => {
                // A leftover with our name and other labels: ours to replace.
                remove(docker, &spec.name)
                    .await
                    .map_err(|e| err("cannot remove a leftover container", e))?;
                create(spec.name.clone()).await
            }
            r => r,
        }
        .map_err(|e| err("cannot create the container", e))?;
        for w in created.warnings {
            tracing::warn!(component = %comp.name, warning = %w, "engine warning");
        }
        tracing::info!(component = %comp.name, container = %short(&created.id), image = %spec.image, "container created");
        let id = created.id;
        slot.id = Some(id.clone());
        docker
            .start_container(&id, None)
            .await
            .map_err(|e| err("cannot start the container", e))?;
    }
    let id = slot.id.clone().unwrap_or_default();
    let info = docker
        .inspect_container(&id, None)
        .await
        .map_err(|e| err("cannot inspect the container", e))?;
    if !adopted {
        refresh_neighbors(&info);
    }
    let state = info.state.unwrap_or_default();
    let started_ns = state
        .started_at
        .as_deref()
        .and_then(parse_rfc3339_ns)
        .unwrap_or(0);
    Ok(Run {
        started_ns,
        oom: false,
        docker: docker.clone(),
        pid: state.pid.unwrap_or(0).max(0) as u32,
        image_health: comp.health.is_none() && state.health.is_some(),
        adopted,
        last_health: None,
        memory: comp.docker.as_ref().and_then(|d| d.memory),
        check_now: true,
        wake,
        id,
    })
}

/// After a (re)start on a bridge network: the host's ARP entry for the container, so that
/// clients retrying through a published port reach it at once (see `neigh`).
fn refresh_neighbors(info: &bollard::models::ContainerInspectResponse) {
    let Some(nets) = info
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
    else {
        return;
    };
    for ep in nets.values() {
        let ip = ep.ip_address.as_deref().and_then(|a| a.parse().ok());
        let gw = ep.gateway.as_deref().and_then(|a| a.parse().ok());
        let mac = ep.mac_address.as_deref().and_then(crate::neigh::parse_mac);
        if let (Some(ip), Some(gw), Some(mac)) = (ip, gw, mac) {
            if let Err(e) = crate::neigh::refresh(gw, ip, mac) {
                tracing::debug!(%ip, error = %e, "cannot refresh the neighbor entry");
            }
        }
    }
}

impl Run {
    /// The next thing that happens to the container: an exit, or (image HEALTHCHECK only) a
    /// change of health. Every wake-up is checked against an inspection.
    pub async fn next(&mut self) -> RunEvent {
        loop {
            if !std::mem::take(&mut self.check_now) {
                match tokio::time::timeout(SAFETY_POLL, self.wake.recv()).await {
                    Ok(Ok(Wake::Container(ev))) => {
                        // Events of other containers, or of an earlier run of this one.
                        if ev.id != self.id || ev.time_ns < self.started_ns {
                            continue;
                        }
                        match ev.action.as_str() {
                            "oom" => {
                                self.oom = true;
                                continue;
                            }
                            // The hot path of a respawn: no inspection, the event says it all
                            // (unless it may be an OOM kill whose `oom` event is still coming).
                            "die" => {
                                let code = ev.exit_code.unwrap_or(-1);
                                // A SIGKILL under a memory limit may be the OOM killer's, whose
                                // `oom` event can trail the `die` by a little: wait that little
                                // (not an inspection, which the busy engine answers late).
                                if !self.oom && code == 137 && self.memory.is_some() {
                                    self.oom = self.oom_follows().await;
                                }
                                let state = ContainerState {
                                    exit_code: Some(code),
                                    oom_killed: Some(self.oom),
                                    ..Default::default()
                                };
                                return RunEvent::Exited(describe(&state, self.memory));
                            }
                            "destroy" => {
                                return RunEvent::Exited("the container was removed".into())
                            }
                            a if a.starts_with("health_status") => {}
                            _ => continue,
                        }
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        tokio::time::sleep(SAFETY_POLL).await
                    }
                    // Resync, lagged behind, or the safety poll: look.
                    _ => {}
                }
            }
            let info = match self.docker.inspect_container(&self.id, None).await {
                Ok(i) => i,
                Err(e) if status(&e) == Some(404) => {
                    return RunEvent::Exited("the container was removed".into())
                }
                // The engine is away: nothing changes until it answers again.
                Err(_) => continue,
            };
            let state = info.state.unwrap_or_default();
            if !state.running.unwrap_or(false) {
                return RunEvent::Exited(describe(&state, self.memory));
            }
            let pid = state.pid.unwrap_or(0).max(0) as u32;
            if pid != self.pid && self.pid != 0 {
                return RunEvent::Exited(format!(
                    "restarted outside drover (pid {} -> {pid})",
                    self.pid
                ));
            }
            if self.image_health {
                let h = state.health.as_ref().and_then(|h| h.status);
                if h != self.last_health {
                    self.last_health = h;
                    match h {
                        Some(HealthStatusEnum::HEALTHY) => return RunEvent::Healthy,
                        Some(HealthStatusEnum::UNHEALTHY) => {
                            let why = state
                                .health
                                .as_ref()
                                .and_then(|h| h.log.as_ref())
                                .and_then(|l| l.last())
                                .map(|r| {
                                    format!(
                                        "HEALTHCHECK exit {}: {}",
                                        r.exit_code.unwrap_or(-1),
                                        r.output.as_deref().unwrap_or("").trim()
                                    )
                                })
                                .unwrap_or_else(|| "HEALTHCHECK failed".into());
                            return RunEvent::Unhealthy(why);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// Whether an `oom` event for this run comes within OOM_GRACE.
    async fn oom_follows(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + OOM_GRACE;
        loop {
            match tokio::time::timeout_at(deadline, self.wake.recv()).await {
                Ok(Ok(Wake::Container(ev)))
                    if ev.id == self.id && ev.action == "oom" && ev.time_ns >= self.started_ns =>
                {
                    return true
                }
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                _ => return false,
            }
        }
    }

    /// The engine and the container, to send it a signal from elsewhere (its drain signal).
    pub fn handle(&self) -> (Docker, String) {
        (self.docker.clone(), self.id.clone())
    }

    /// Stop the container: its stop signal, up to `grace`, then SIGKILL (the engine does the
    /// waiting). Returns how it ended.
    pub async fn stop(&mut self, grace: Duration) -> String {
        let r = self
            .docker
            .stop_container(
                &self.id,
                Some(StopContainerOptions {
                    t: Some(grace_secs(grace) as i32),
                    signal: None,
                }),
            )
            .await;
        if let Err(e) = r {
            if status(&e) != Some(304) {
                tracing::warn!(container = %short(&self.id), error = %e, "cannot stop the container");
            }
        }
        match self.docker.inspect_container(&self.id, None).await {
            Ok(i) => describe(&i.state.unwrap_or_default(), self.memory),
            Err(e) => format!("unknown ({e})"),
        }
    }
}

/// The last lines a container printed, stdout and stderr interleaved as the engine logged
/// them (its logs API: the `json-file`, `local` and `journald` drivers), capped as a process
/// component's are; `None` when the engine has none or does not answer within 5 s (a busy
/// engine takes seconds; the restart waits for it, so the restart's event carries them).
pub(crate) async fn last_output(docker: &Docker, id: &str) -> Option<String> {
    use futures::StreamExt;
    let opts = bollard::query_parameters::LogsOptionsBuilder::default()
        .stdout(true)
        .stderr(true)
        .tail("200")
        .build();
    let read = async {
        let mut buf: Vec<u8> = Vec::new();
        let mut logs = docker.logs(id, Some(opts));
        while let Some(chunk) = logs.next().await {
            match chunk {
                Ok(out) => buf.extend_from_slice(&out.into_bytes()),
                Err(e) => {
                    tracing::debug!(container = %short(id), error = %e, "no logs from the engine");
                    break;
                }
            }
        }
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()?;
    crate::supervisor::capped_output(&buf, false)
}

/// Send `signal` (e.g. `SIGUSR1`) to a container's main process (its PID 1), as
/// `docker kill --signal` does.
pub(crate) async fn kill(docker: &Docker, id: &str, signal: &str) -> Result<(), String> {
    let opts = KillContainerOptionsBuilder::default()
        .signal(signal)
        .build();
    docker
        .kill_container(id, Some(opts))
        .await
        .map_err(|e| e.to_string())
}

/// Nanoseconds since the Unix epoch of an RFC 3339 UTC time as the engine writes it
/// (`2026-11-25T18:33:03.112863123Z`).
pub(crate) fn parse_rfc3339_ns(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>());
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let digits: String = frac.chars().take(9).collect();
    let nanos = digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // `None` out of i64 range (the engine writes year 1 for "never").
    (days * 86_400 + hh * 3_600 + mm * 60 + ss)
        .checked_mul(1_000_000_000)?
        .checked_add(nanos)
}

/// `exit status 0`, `signal 9 (exit status 137)`, `out of memory: OOM-killed at its 64.0 MiB
/// limit (exit status 137)`.
pub(crate) fn describe(state: &ContainerState, memory: Option<u64>) -> String {
    let code = state.exit_code.unwrap_or(-1);
    let mut s = if state.oom_killed == Some(true) {
        format!(
            "out of memory: OOM-killed{} (exit status {code})",
            memory
                .map(|m| format!(" at its {:.1} MiB limit", m as f64 / (1 << 20) as f64))
                .unwrap_or_default()
        )
    } else if (129..160).contains(&code) {
        format!("signal {} (exit status {code})", code - 128)
    } else {
        format!("exit status {code}")
    };
    if let Some(e) = state.error.as_deref().filter(|e| !e.is_empty()) {
        s.push_str(&format!(" ({e})"));
    }
    s
}

/// A health check command run inside the container (`docker exec`).
#[derive(Clone)]
pub(crate) struct Exec {
    pub docker: Docker,
    pub container: String,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("container", &self.container)
            .field("cmd", &self.cmd)
            .finish()
    }
}

impl PartialEq for Exec {
    fn eq(&self, o: &Exec) -> bool {
        self.container == o.container && self.cmd == o.cmd && self.env == o.env
    }
}

impl Exec {
    /// Run the command in the container; exit status 0 within `timeout` is healthy.
    pub async fn run(&self, timeout: Duration) -> Result<(), String> {
        let prog = self.cmd.first().cloned().unwrap_or_default();
        let fut = async {
            let created = self
                .docker
                .create_exec(
                    &self.container,
                    CreateExecOptions {
                        cmd: Some(self.cmd.clone()),
                        env: Some(self.env.clone()),
                        attach_stdout: Some(false),
                        attach_stderr: Some(false),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| format!("exec {prog} in the container: {e}"))?;
            self.docker
                .start_exec(
                    &created.id,
                    Some(StartExecOptions {
                        detach: true,
                        ..Default::default()
                    }),
                )
                .await
                .map_err(|e| format!("exec {prog} in the container: {e}"))?;
            let mut wait = Duration::from_millis(5);
            loop {
                let i = self
                    .docker
                    .inspect_exec(&created.id)
                    .await
                    .map_err(|e| format!("exec {prog} in the container: {e}"))?;
                if i.running != Some(true) {
                    return match i.exit_code {
                        Some(0) => Ok(()),
                        Some(c) => Err(format!("exec {prog} in the container: exit status {c}")),
                        None => Err(format!("exec {prog} in the container: no exit status")),
                    };
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(100));
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "exec {prog} in the container: no exit within {}ms",
                timeout.as_millis()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_container_exits() {
        let st = |code, oom| ContainerState {
            exit_code: Some(code),
            oom_killed: Some(oom),
            ..Default::default()
        };
        assert_eq!(describe(&st(0, false), None), "exit status 0");
        assert_eq!(
            describe(&st(137, false), None),
            "signal 9 (exit status 137)"
        );
        assert_eq!(
            describe(&st(137, true), Some(64 << 20)),
            "out of memory: OOM-killed at its 64.0 MiB limit (exit status 137)"
        );
    }

    #[test]
    fn parses_engine_times() {
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ns("2026-11-25T18:33:03.112863123Z"),
            Some(1_795_631_583_112_863_123)
        );
        assert_eq!(
            parse_rfc3339_ns("2000-02-29T12:00:00.5Z"),
            Some(951_825_600_500_000_000)
        );
        assert_eq!(parse_rfc3339_ns("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_ns("garbage"), None);
    }

    /// Issue 20, item 10: containers whose agent directory's lock cannot be opened are not
    /// swept; those of a free lock, or of a directory that is gone, are.
    #[test]
    fn only_provable_orphans_are_swept() {
        let d = tempfile::tempdir().unwrap();
        // Not a directory: its lock file cannot be opened (ENOTDIR), and it exists.
        let file = d.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        assert!(!orphaned(&file));
        // Gone altogether.
        assert!(orphaned(&d.path().join("gone")));
        // A directory without a lock file: an agent may be starting there.
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(!orphaned(&empty));
        // A free lock.
        std::fs::write(empty.join(LOCK_FILE), b"").unwrap();
        assert!(orphaned(&empty));
    }

    #[test]
    fn lock_tells_live_agents() {
        let d = tempfile::tempdir().unwrap();
        assert!(!agent_alive(d.path()), "no lock file: no agent");
        let e = Engine::new(d.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(e.take_lock()).unwrap();
        assert!(agent_alive(d.path()));
        let other = Engine::new(d.path());
        assert!(rt.block_on(other.take_lock()).is_err());
        drop(e);
        assert!(!agent_alive(d.path()), "the lock goes with its holder");
    }
}
