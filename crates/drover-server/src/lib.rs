//! drover's control plane: the HTTP API, the store, the controllers, the providers and the
//! built-in balancer, wired together. Only the server writes desired state.

pub mod api;
pub mod apply;
pub mod artifact;
pub mod auth;
pub mod balancer;
pub mod canary;
pub mod cloud;
pub mod engine;
pub mod follower;
pub mod guard;
pub mod ha;
pub mod lbproc;
pub mod ops;
pub mod peers;
pub mod registry;
pub mod relay;
pub mod rollout;
pub mod state;
pub mod status;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls;
pub mod ui;
pub mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_control::Timing;
use drover_model::api::{ApplyRequest, ApplyResponse};
use drover_model::fleet::ProviderKind;
use drover_provider::{LocalConfig, LocalProvider, Provider};
use drover_store::{SqliteStore, Store};
use tokio_util::sync::CancellationToken;

pub use engine::Engine;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    InvalidFleet(#[from] drover_model::FleetErrors),
    /// A request that does not parse, or says something the server cannot take (400): free
    /// text, for what no variant below names.
    #[error("{0}")]
    BadRequest(String),
    /// A number in a path or a query that is not one (400), e.g. `revision "x"`.
    #[error("{what} {value:?} is not a number")]
    NotANumber { what: &'static str, value: String },
    /// An agent's report names a group or generation that is not the one its instance was
    /// launched with (400); `what` says which facts are compared.
    #[error("instance {instance}: the {what} is not the one it was launched with")]
    GenerationMismatch {
        instance: String,
        what: &'static str,
    },
    /// A one-off schedule id that is not a number (400): a fleet file's schedule ends with
    /// the file.
    #[error(
        "{0:?} is not the id of a one-off schedule (a number, as `drover schedule list` shows); a schedule of the fleet file (like web#0) ends when you remove it from the file and apply it"
    )]
    NotOneOffSchedule(String),
    #[error("{0}")]
    NotFound(String),
    /// A service the current revision does not have (404). `known`: the services, named in
    /// the message; none: it points at `drover status`.
    #[error("no service {service:?}; {}", known_services(known.as_deref()))]
    NoService {
        service: String,
        known: Option<Vec<String>>,
    },
    /// A component its service does not have (404).
    #[error(
        "service {service} has no component {component:?}; its components: {}",
        names(known)
    )]
    NoComponent {
        service: String,
        component: String,
        known: Vec<String>,
    },
    /// A region its service does not run in (404).
    #[error(
        "service {service} does not run in region {region:?}; its regions: {}",
        names(known)
    )]
    NoRegion {
        service: String,
        region: String,
        known: Vec<String>,
    },
    /// An instance the server does not know (404).
    #[error("no instance {0}")]
    NoInstance(String),
    /// A group the fleet does not have (404).
    #[error("no group {0}; `drover status` lists the groups")]
    NoGroup(String),
    /// A revision never stored (404).
    #[error("no revision {0}; `drover history` lists them")]
    NoRevision(u64),
    /// A one-off schedule never made (404).
    #[error("no schedule {0}; see `drover schedule list`")]
    NoSchedule(u64),
    /// A token id never made (404).
    #[error("no token {0}; `drover token list` shows them")]
    NoToken(String),
    #[error("{0}")]
    Conflict(String),
    /// A change that needs a fleet before any was applied (409). `to`: what there is nothing
    /// to do (`destroy`, `roll back`); none: apply one first.
    #[error("nothing applied yet: {}", nothing_to(*to))]
    NothingApplied { to: Option<&'static str> },
    /// A rollback with no earlier revision to go to (409).
    #[error("no earlier revision runs other versions of {service}; `drover history` lists them")]
    NothingToRollBack { service: String },
    /// A person's pause, resume, promote or abort (`action`) of a service (in `region`)
    /// with no rollout open (409).
    #[error(
        "no rollout under way for {service}{}: nothing to {action}; `drover status` shows the rollouts",
        region.as_deref().map(|r| format!(" in region {r}")).unwrap_or_default()
    )]
    RolloutNotOpen {
        service: String,
        region: Option<String>,
        action: &'static str,
    },
    /// Cancelling a one-off schedule cancelled before (409) ...
    #[error("schedule {0} is cancelled already")]
    ScheduleCancelled(u64),
    /// ... or over (409).
    #[error("schedule {0} has ended already")]
    ScheduleEnded(u64),
    /// Revoking the only admin token not revoked (409).
    #[error(
        "{0} is the last admin token: create another (`drover token create --scope admin`) before revoking it"
    )]
    LastAdminToken(String),
    /// An ingress address another program holds (409): the change is refused.
    #[error(
        "cannot open the ingress of {group} on {addr}: {source}; is another program (or another drover) listening there? Change `ingress.listen` or stop that program"
    )]
    IngressInUse {
        group: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Another server holds the data directory (409).
    #[error(
        "another drover server (pid {pid}) uses the data directory {}: stop it first, or use another --data-dir",
        dir.display()
    )]
    DataDirInUse { pid: String, dir: PathBuf },
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A request body over the API's limit (413).
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The caller holds its limit of long-lived requests (429).
    #[error("{0}")]
    TooManyRequests(String),
    /// ... of follow streams (429) ...
    #[error("this token holds {limit} follow streams already; close one first")]
    TooManyFollows { limit: usize },
    /// ... or of long-polls (429).
    #[error("this token holds {limit} long-polls already; wait for one to answer")]
    TooManyPolls { limit: usize },
    /// Not known who calls (401), in free text (a dashboard session that ended, a login
    /// that is not a token); the token errors are the variants below.
    #[error("{0}")]
    Unauthorized(String),
    /// No `Authorization` header (401).
    #[error(
        "this endpoint needs a token: send `Authorization: Bearer TOKEN` (the CLI reads DATA_DIR/admin.token, DROVER_TOKEN or --token); see docs/security.md"
    )]
    TokenNeeded,
    /// An `Authorization` header that is not a bearer token (401).
    #[error("the Authorization header must be `Bearer TOKEN`")]
    NotBearer,
    /// An instance token that does not check out, or one on a token that is not an agent
    /// token (401): nothing more is said.
    #[error("unknown token")]
    UnknownToken,
    /// A token this server never made (401).
    #[error(
        "unknown token: it was never created on this server (`drover token list` shows the tokens)"
    )]
    TokenNotCreated,
    /// A revoked token (401) ...
    #[error("token {id} was revoked; create a new one with `drover token create`")]
    TokenRevoked { id: String },
    /// ... or a dashboard session opened with one (401).
    #[error("token {id} that this session was opened with was revoked; log in again with another")]
    SessionTokenRevoked { id: String },
    /// A valid token that may not do this (403), in free text (exec turned off, a change
    /// through a session without its CSRF token); scopes and groups are the variants below.
    #[error("{0}")]
    Forbidden(String),
    /// A call whose scope the token lacks (403): `needs` says what it needs, `caller` who
    /// the token is.
    #[error("{method} {path} {needs}; {caller}")]
    NotAllowed {
        method: String,
        path: String,
        needs: &'static str,
        caller: String,
    },
    /// An agent token acting for another group (403): `what` it named.
    #[error("{what} belongs to group {group}; {caller}")]
    OtherGroup {
        what: String,
        group: String,
        caller: String,
    },
    /// A token acting for an instance it does not speak for (403): another group's, another
    /// instance's (an instance token), or one heard with its own token. Nothing more is said.
    #[error("this token may not act for that instance")]
    NotThisInstance,
    #[error("store: {0}")]
    Store(#[from] drover_store::StoreError),
    #[error("provider: {0}")]
    Provider(#[from] drover_provider::ProviderError),
    /// Not known now; asking again later may succeed (503).
    #[error("{0}")]
    Unavailable(String),
    /// A leader whose lease ran out (503): it hands out nothing more.
    #[error(
        "this server no longer leads (its lease ran out); ask the leader (GET /v1/health names it)"
    )]
    LeaseLost,
    /// A server that does not lead, asked to change desired state in-process (503).
    #[error("this server does not lead; apply through the leader")]
    NotLeading,
    #[error("{0}")]
    Internal(String),
    /// A store read on a blocking thread that did not come back (500).
    #[error("store read: {0}")]
    StoreRead(#[source] tokio::task::JoinError),
    /// A flight recorder's write on a blocking thread that did not come back (500).
    #[error("flight recorder: {0}")]
    FlightRecorder(#[source] tokio::task::JoinError),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// What [`ServerError::NoService`] says after the name.
fn known_services(known: Option<&[String]>) -> String {
    match known {
        Some(k) => format!("services: {}", names(k)),
        None => "`drover status` lists them".into(),
    }
}

/// What [`ServerError::NothingApplied`] says after `nothing applied yet: `.
fn nothing_to(to: Option<&str>) -> String {
    match to {
        Some(what) => format!("there is nothing to {what}"),
        None => "run `drover apply FILE` first".into(),
    }
}

/// Names for a message: `a, b`, or `none`.
pub(crate) fn names(known: &[String]) -> String {
    if known.is_empty() {
        "none".into()
    } else {
        known.join(", ")
    }
}

/// How to run a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Holds `drover.db`, the admin token, keys (`0700`): nothing an instance reads.
    pub data_dir: PathBuf,
    /// Where the `local` provider makes instance directories; `None`: beside the data
    /// directory, `DATA.instances` ([`ServerConfig::instances_dir`]).
    pub instances_dir: Option<PathBuf>,
    /// Where desired and observed state are kept; `None`: the SQLite file `drover.db` in
    /// `data_dir`.
    pub store: Option<drover_store::StoreSpec>,
    /// Where the API listens (port 0: any free port).
    pub listen: SocketAddr,
    /// The binary agents are started from (`drover agent`).
    pub drover_bin: PathBuf,
    /// The lean agent binary the `local` provider starts instead of `drover agent`; by
    /// default `drover-agent` next to `drover_bin`, when it is there.
    pub agent_bin: Option<PathBuf>,
    pub heartbeat_interval: Duration,
    /// An instance not heard from for this long leaves rotation and is replaced. At least
    /// [`MIN_SILENT_INTERVALS`] heartbeat intervals: a smaller value is raised to that.
    pub silent_after: Duration,
    /// Controller period (it also runs at once on any health change).
    pub tick: Duration,
    /// The server owns its instances' lives (`drover up`): they stop when it stops or dies.
    /// Otherwise (`drover server`) instances outlive the server and are adopted on restart.
    pub own_instances: bool,
    /// Plain HTTP, or HTTPS with given or generated certificates.
    pub tls: tls::TlsMode,
    /// The server's URL as instances on a cloud reach it (their boot document); default:
    /// the URL it listens on.
    pub advertise_url: Option<String>,
    /// How often cloud providers read their groups (instances gone or launched).
    pub cloud_poll: Duration,
    /// Start (or adopt) a balancer process (`drover lb`) for the ingresses of `local`
    /// regions; off when balancers are run apart (`drover server --no-lb`).
    pub spawn_lb: bool,
    /// Event retention: the newest this many events are kept ([`EVENTS_KEEP`])...
    pub events_keep: u64,
    /// ... and none older than this ([`EVENTS_MAX_AGE`]).
    pub events_max_age: Duration,
    /// Every server of the control plane, as agents and balancers reach them (`--servers`):
    /// given to instances and the balancer process, which move from one to another when one
    /// stops answering. Empty: this server's URL alone.
    pub servers: Vec<String>,
}

/// Events kept by default: the newest 100,000 (tens of MB in the store at most).
pub const EVENTS_KEEP: u64 = 100_000;
/// Events older than this are deleted by default: 30 days.
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often event retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// `silent_after` is at least this many heartbeat intervals: one late or lost heartbeat (or
/// two) never replaces an instance.
pub const MIN_SILENT_INTERVALS: u32 = 3;

impl ServerConfig {
    /// `silent_after` as used: at least [`MIN_SILENT_INTERVALS`] heartbeat intervals.
    pub fn effective_silent_after(&self) -> Duration {
        self.silent_after
            .max(self.heartbeat_interval * MIN_SILENT_INTERVALS)
    }

    /// Where the `local` provider makes instance directories: `instances_dir`, else
    /// `DATA.instances` beside the data directory.
    pub fn instances_dir(&self) -> PathBuf {
        self.instances_dir
            .clone()
            .unwrap_or_else(|| drover_provider::local::default_instances_dir(&self.data_dir))
    }

    pub fn new(data_dir: PathBuf, listen: SocketAddr, drover_bin: PathBuf) -> ServerConfig {
        let agent_bin = drover_bin
            .parent()
            .map(|d| d.join("drover-agent"))
            .filter(|p| p.is_file());
        ServerConfig {
            data_dir,
            instances_dir: None,
            store: None,
            listen,
            drover_bin,
            agent_bin,
            heartbeat_interval: Duration::from_secs(1),
            silent_after: Duration::from_secs(5),
            tick: Duration::from_millis(250),
            own_instances: false,
            tls: tls::TlsMode::Off,
            advertise_url: None,
            cloud_poll: Duration::from_secs(5),
            spawn_lb: true,
            events_keep: EVENTS_KEEP,
            events_max_age: EVENTS_MAX_AGE,
            servers: Vec::new(),
        }
    }
}

/// Event retention, every [`PRUNE_EVERY`] until `stop`: events beyond the newest `keep`, and
/// those older than `max_age`, are deleted (revisions and everything else stay); each pass
/// that deletes any says so in one event.
async fn prune_events(engine: Arc<Engine>, keep: u64, max_age: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
        let store = engine.store.clone();
        let before = engine::now_ms().saturating_sub(max_age.as_millis() as u64);
        match tokio::task::spawn_blocking(move || store.prune_events(keep, before)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => engine.record(vec![drover_model::NewEvent::new(
                drover_model::EventKind::Server,
                format!(
                    "event retention: deleted {n} events (keeping the newest {keep}, none older than {})",
                    drover_model::Dur(max_age)
                ),
            )]),
            Ok(Err(e)) => tracing::warn!("event retention: {e}"),
            Err(e) => tracing::warn!("event retention: {e}"),
        }
    }
}

/// Connections the kernel queues for the API before the server accepts them (capped by
/// `net.core.somaxconn`). After a server restart every agent reconnects within a second or
/// so; with tokio's default (1024) the queue overflows at a few thousand agents, dropped
/// connections are retried with the kernel's exponential backoff (1 s, 3 s, 7 s...), and
/// recovery takes that much longer.
pub const API_BACKLOG: u32 = 16_384;

/// The API's listening socket, with [`API_BACKLOG`].
fn bind_api(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(API_BACKLOG)
}

/// Take `DATA/server.lock` (an exclusive `flock`, released when the process ends, however
/// it ends), or say which process holds it. `shared`: a shared lock, which other servers of
/// the same etcd control plane may hold too (but not a SQLite server).
pub fn lock_data_dir(dir: &std::path::Path, shared: bool) -> Result<std::fs::File, ServerError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = dir.join("server.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| ServerError::Io(path.display().to_string(), e))?;
    // SAFETY: flock on a file descriptor this function owns.
    let mode = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    if unsafe { libc::flock(f.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        return Err(ServerError::DataDirInUse {
            pid: holder.trim().to_string(),
            dir: dir.to_path_buf(),
        });
    }
    if !shared {
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = write!(f, "{}", std::process::id());
    }
    Ok(f)
}

/// A running server.
pub struct Server {
    /// Its role, and the engine of the term it leads (always, without an election).
    pub node: Arc<ha::Node>,
    pub addr: SocketAddr,
    /// `https` when the API is served over TLS.
    pub scheme: &'static str,
    /// The CA clients should trust (when the API is served over TLS).
    pub ca_file: Option<PathBuf>,
    /// The admin token file written on first start, if this start wrote it.
    pub admin_token_file: Option<PathBuf>,
    /// The dashboard's sessions, login links and history.
    pub ui: Arc<ui::Ui>,
    stop: CancellationToken,
    /// The API, and the campaign for the lead (several servers on etcd).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The one term of a server without an election (SQLite): it leads from start to stop.
    single: Option<Term>,
    shared: Arc<Shared>,
    /// The data directory's lock (`DATA/server.lock`), held while the server runs.
    _data_lock: std::fs::File,
}

/// What every term of leadership starts from.
pub(crate) struct Shared {
    cfg: ServerConfig,
    store: Arc<dyn Store>,
    /// The URLs agents and balancers are given: every server's (`--servers`), else this one's.
    client_urls: String,
    ca_pin: Option<drover_provider::CaPin>,
    ca_file: Option<PathBuf>,
    silent_after: Duration,
    addr: SocketAddr,
    /// Cancelled when the server stops (each term has a child token of its own).
    stop: CancellationToken,
    /// The dashboard's sessions and login links (this server's; a follower forwards the
    /// dashboard to the leader).
    ui: Arc<ui::Ui>,
    /// Limits on long-lived requests.
    guards: Arc<guard::Guards>,
}

/// One term of leadership: an engine from the store, its controller loop and balancer
/// process supervision.
pub(crate) struct Term {
    pub(crate) engine: Arc<Engine>,
    /// The API over this term's engine.
    pub(crate) router: axum::Router,
    admin_token_file: Option<PathBuf>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Supervises the balancer process; it stops that process only if tied to the server.
    lb_task: Option<tokio::task::JoinHandle<()>>,
}

impl Shared {
    /// Start leading: a fresh engine from the store (as after a restart: health from
    /// heartbeats, silence counted from now), tokens, ingresses, the controller loop and the
    /// balancer process. With `authority`, the engine acts only while it holds.
    pub(crate) async fn start_term(
        &self,
        authority: Option<Arc<ha::Authority>>,
        since_ms: u64,
    ) -> Result<Term, ServerError> {
        let cfg = &self.cfg;
        let mut credentials = drover_provider::Credentials::default();
        credentials.ca = self.ca_pin.clone();
        let auth = Arc::new(auth::Auth::load(&*self.store, &cfg.data_dir, credentials)?);
        let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
        let engine = Arc::new(Engine::new_shared(
            self.store.clone(),
            Timing {
                silent_after_ms: self.silent_after.as_millis() as u64,
                leave_within_ms: drover_control::group::leave_within_ms(
                    state::DEFAULT_DRAIN_MS,
                    state::DEFAULT_STOP_GRACE_MS,
                ),
            },
            ProviderFactory {
                cfg: cfg.clone(),
                server_url: self.client_urls.clone(),
                sim: drover_provider::SimProvider::new(exits_tx.clone()),
                exits: exits_tx,
                auth: auth.clone(),
            },
        )?);
        if let Some(a) = authority {
            engine.set_authority(a);
        }
        let admin_token_file = auth.ensure_admin(&engine, &cfg.data_dir).await?;
        let lb_token_file = auth.ensure_lb(&engine, &cfg.data_dir).await?;
        if let Some(f) = &admin_token_file {
            tracing::info!(file = %f.display(), "wrote the first admin token");
        }
        // Groups from an earlier run (or an older drover) get their agent tokens back.
        let groups: Vec<String> = engine.state().groups.keys().cloned().collect();
        auth.ensure_agent_tokens(&engine, groups.iter().map(String::as_str))
            .await?;
        engine.reap_unrecorded().await;
        engine.open_ingresses();
        let message = if cfg.store.as_ref().is_some_and(|s| s.is_etcd()) {
            format!(
                "server {} leads (since {since_ms}, on {}, data directory {})",
                self.addr,
                self.client_urls,
                cfg.data_dir.display()
            )
        } else {
            format!(
                "server started on {} (data directory {})",
                self.addr,
                cfg.data_dir.display()
            )
        };
        engine.record(vec![drover_model::NewEvent::new(
            drover_model::EventKind::Server,
            message,
        )]);
        engine.flush().await;
        let stop = self.stop.child_token();
        let router = api::router(engine.clone(), self.ui.clone(), self.guards.clone());
        // The API answers for this engine from here on: silence counts from now.
        engine.api_ready();
        let lb_task = cfg.spawn_lb.then(|| {
            let spawn = lbproc::LbSpawn {
                drover_bin: cfg.drover_bin.clone(),
                dir: cfg.data_dir.join("lb"),
                server_url: self.client_urls.clone(),
                token_file: lb_token_file.clone(),
                ca_file: self.ca_file.clone(),
                tied: cfg.own_instances,
            };
            if cfg.own_instances && lbproc::reap_leftover(&spawn.dir) {
                tracing::warn!("killed a balancer left by an earlier run");
            }
            tokio::spawn(lbproc::supervise(engine.clone(), spawn, stop.clone()))
        });
        let tasks = vec![
            tokio::spawn(ui::history::run(
                engine.clone(),
                self.ui.clone(),
                stop.clone(),
            )),
            tokio::spawn(prune_events(
                engine.clone(),
                cfg.events_keep,
                cfg.events_max_age,
                stop.clone(),
            )),
            tokio::spawn(engine.clone().run(cfg.tick, exits_rx, stop.clone())),
        ];
        Ok(Term {
            engine,
            router,
            admin_token_file,
            stop,
            tasks,
            lb_task,
        })
    }

    /// End a term: the controllers and the balancer's supervision stop (the balancer process
    /// and the instances keep running unless the server owns them). `stopping`: the server
    /// stops, with this grace for the instances it owns (else it lost the lead, and its store
    /// no longer takes its writes).
    pub(crate) async fn end_term(&self, term: Term, stopping: Option<Duration>) {
        term.stop.cancel();
        for t in term.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let own = self.cfg.own_instances;
        if let Some(grace) = stopping {
            term.engine.shutdown(grace, own).await;
        }
        if let Some(t) = term.lb_task {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        if stopping.is_some() {
            term.engine.record(vec![drover_model::NewEvent::new(
                drover_model::EventKind::Server,
                if own {
                    "server stopped; every instance it started was stopped"
                } else {
                    "server stopped; instances keep running and will be adopted on restart"
                },
            )]);
            term.engine.flush().await;
        }
    }
}

impl Server {
    /// Open the store, bind the API, and lead (SQLite) or campaign for the lead (etcd).
    pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| ServerError::Io(cfg.data_dir.display().to_string(), e))?;
        // The data directory holds tokens, keys and secrets: its owner's only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| {
                    ServerError::Io(
                        format!(
                            "cannot make the data directory {} private (mode 0700)",
                            cfg.data_dir.display()
                        ),
                        e,
                    )
                })?;
        }
        // One server per data directory on SQLite: a second one would launch and replace
        // the first one's instances, and write the same store. On etcd, several servers may
        // share one (on one machine, for the `local` provider's instances and the balancer):
        // only the elected leader acts on them. A shared lock keeps a SQLite server out.
        let elected = cfg.store.as_ref().is_some_and(|s| s.is_etcd());
        let data_lock = lock_data_dir(&cfg.data_dir, elected)?;
        #[cfg(feature = "etcd")]
        let mut etcd: Option<Arc<drover_store::EtcdStore>> = None;
        let store: Arc<dyn Store> = match &cfg.store {
            None => Arc::new(SqliteStore::open(&cfg.data_dir.join("drover.db"))?),
            #[cfg(feature = "etcd")]
            Some(drover_store::StoreSpec::Etcd(ecfg)) => {
                let ecfg = ecfg.clone();
                let shown = cfg
                    .store
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let e = tokio::task::spawn_blocking(move || drover_store::EtcdStore::open(&ecfg))
                    .await
                    .map_err(|e| ServerError::Internal(format!("opening the store: {e}")))??;
                tracing::info!(store = %shown, "store opened");
                let e = Arc::new(e);
                etcd = Some(e.clone());
                e
            }
            Some(spec) => {
                let spec = spec.clone();
                let shown = spec.to_string();
                let store = tokio::task::spawn_blocking(move || spec.open())
                    .await
                    .map_err(|e| ServerError::Internal(format!("opening the store: {e}")))??;
                tracing::info!(store = %shown, "store opened");
                Arc::from(store)
            }
        };
        let api = bind_api(cfg.listen).map_err(|e| {
            ServerError::Io(
                format!(
                    "cannot listen on {} for the API (is another drover running? use --listen)",
                    cfg.listen
                ),
                e,
            )
        })?;
        let addr = api
            .local_addr()
            .map_err(|e| ServerError::Io("API address".into(), e))?;
        let advertised: Vec<String> = cfg.advertise_url.iter().cloned().collect();
        let tls = tls::setup(&cfg.tls, &*store, &cfg.data_dir, addr, &advertised)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server_url = format!("{scheme}://{}", tls::client_host(addr));
        let advertised = cfg
            .advertise_url
            .clone()
            .unwrap_or_else(|| server_url.clone());
        let client_urls = if cfg.servers.is_empty() {
            advertised.clone()
        } else {
            cfg.servers.join(",")
        };
        let _ = std::fs::write(cfg.data_dir.join("server.url"), &client_urls);
        let ca_pin = tls.as_ref().map(|t| drover_provider::CaPin {
            file: t.ca_file.clone(),
            sha256: t.ca_sha256.clone(),
        });
        if cfg.own_instances {
            // Kill agents an earlier run may have left before anything new starts.
            let reaped = drover_provider::local::reap_leftovers(&cfg.instances_dir());
            if reaped > 0 {
                tracing::warn!(reaped, "killed agents left by an earlier run");
            }
        }
        let silent_after = cfg.effective_silent_after();
        if silent_after != cfg.silent_after {
            tracing::warn!(
                "silent_after raised from {} to {} ({MIN_SILENT_INTERVALS} heartbeat intervals of {})",
                drover_model::Dur(cfg.silent_after),
                drover_model::Dur(silent_after),
                drover_model::Dur(cfg.heartbeat_interval)
            );
        }
        let ca_file = tls.as_ref().map(|t| t.ca_file.clone());
        let me = drover_model::api::ServerView {
            id: server_id(addr),
            url: advertised,
            since_ms: None,
        };
        let reads = if elected {
            Some(Arc::new(follower::Reads::new(
                store.clone(),
                &cfg.data_dir,
            )?))
        } else {
            None
        };
        let node = Arc::new(ha::Node::new(
            me,
            if elected { "etcd" } else { "sqlite" },
            ca_file.as_deref(),
            reads,
        )?);
        let stop = CancellationToken::new();
        let ui = Arc::new(ui::Ui::new(addr.port(), scheme == "https"));
        let shared = Arc::new(Shared {
            ui: ui.clone(),
            guards: Arc::new(guard::Guards::default()),
            cfg: cfg.clone(),
            store,
            client_urls,
            ca_pin,
            ca_file: ca_file.clone(),
            silent_after,
            addr,
            stop: stop.clone(),
        });
        // Without an election (SQLite) this server leads from the start.
        let mut single = None;
        let mut admin_token_file = None;
        if !elected {
            let term = shared.start_term(None, engine::now_ms()).await?;
            admin_token_file = term.admin_token_file.clone();
            node.lead(term.engine.clone(), term.router.clone(), engine::now_ms());
            single = Some(term);
        }
        let mut tasks = Vec::new();
        let app = ha::router(node.clone());
        let s = stop.clone();
        let conns = shared.guards.connections.clone();
        match tls {
            None => tasks.push(tokio::spawn(async move {
                guard::serve(guard::Capped::new(api, conns), app, async move {
                    s.cancelled().await
                })
                .await
            })),
            Some(t) => {
                let listener = tls::TlsListener::new(api, t.acceptor)
                    .map_err(|e| ServerError::Io("API address".into(), e))?;
                tasks.push(tokio::spawn(async move {
                    guard::serve(guard::Capped::new(listener, conns), app, async move {
                        s.cancelled().await
                    })
                    .await
                }));
            }
        }
        if let Some(engine) = node.engine() {
            // The API answers from here on: silence counts from now, not from the store's read.
            engine.api_ready();
        }
        #[cfg(feature = "etcd")]
        if let Some(etcd) = etcd {
            tasks.push(tokio::spawn(ha::campaign(
                node.clone(),
                etcd,
                shared.clone(),
                stop.clone(),
            )));
        }
        Ok(Server {
            node,
            addr,
            scheme,
            ca_file,
            admin_token_file,
            ui,
            stop,
            tasks,
            single,
            shared,
            _data_lock: data_lock,
        })
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, tls::client_host(self.addr))
    }

    /// The engine of the term this server leads (always there without an election).
    pub fn engine(&self) -> Option<Arc<Engine>> {
        self.node.engine()
    }

    /// Apply a fleet file in-process (what `drover up` does first).
    pub async fn apply(&self, req: ApplyRequest) -> Result<ApplyResponse, ServerError> {
        match self.engine() {
            Some(e) => e.apply(req).await,
            None => Err(ServerError::NotLeading),
        }
    }

    /// Stop the controllers and the API, then (if it owns them) every instance, then the
    /// listeners. A leader on etcd gives the lead up, so another server leads at once.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
        if let Some(term) = self.single {
            self.shared.end_term(term, Some(grace)).await;
        }
    }
}

/// This run's id: the API address and the process id (unique among the servers of one
/// control plane, readable in `GET /v1/health`).
fn server_id(addr: SocketAddr) -> String {
    format!("{}-{}", addr, std::process::id())
}

/// Makes providers for regions that appear in a newly applied revision.
pub struct ProviderFactory {
    cfg: ServerConfig,
    server_url: String,
    exits: tokio::sync::mpsc::UnboundedSender<drover_provider::Exit>,
    /// The instances of every `sim` region (`POST /v1/agent/exit` ends them).
    pub(crate) sim: drover_provider::SimProvider,
    /// Tokens; its credentials (agent tokens, CA pin) are part of every launch configuration.
    pub(crate) auth: Arc<auth::Auth>,
}

impl ProviderFactory {
    /// A factory for engines in tests: `local` providers in `data_dir`, no tokens.
    #[cfg(test)]
    pub(crate) fn for_tests(data_dir: &std::path::Path) -> ProviderFactory {
        let store = drover_store::SqliteStore::open_in_memory().expect("in-memory store");
        ProviderFactory {
            cfg: ServerConfig::new(
                data_dir.to_path_buf(),
                "127.0.0.1:0".parse().expect("address"),
                "/bin/false".into(),
            ),
            server_url: "http://127.0.0.1:9".into(),
            exits: tokio::sync::mpsc::unbounded_channel().0,
            sim: drover_provider::SimProvider::new(tokio::sync::mpsc::unbounded_channel().0),
            auth: Arc::new(
                auth::Auth::load(&store, data_dir, Default::default()).expect("test auth"),
            ),
        }
    }

    /// The provider of region `name` of fleet `fleet`; `None` when this build has none for it.
    pub fn make(
        &self,
        fleet: &str,
        name: &str,
        region: &drover_model::fleet::Region,
    ) -> Option<Arc<dyn Provider>> {
        let _ = (fleet, name);
        match region.provider {
            #[cfg(feature = "aws")]
            ProviderKind::Aws => {
                use drover_provider::aws::{Aws, AwsConfig, AwsProvider};
                Some(Arc::new(Aws(AwsProvider::new(
                    AwsConfig {
                        fleet: fleet.to_string(),
                        region: name.to_string(),
                        aws_region: region.aws_region_or(name).to_string(),
                        endpoint: region.endpoint.clone(),
                        subnets: region.subnets.clone(),
                        security_groups: region.security_groups.clone(),
                        ami: region.ami.clone().unwrap_or_default(),
                        instance_profile: region.instance_profile.clone(),
                        server_url: self
                            .cfg
                            .advertise_url
                            .clone()
                            .unwrap_or_else(|| self.server_url.clone()),
                        heartbeat_interval: self.cfg.heartbeat_interval,
                        poll: self.cfg.cloud_poll,
                        orphan_grace: (self.cfg.cloud_poll * 24).max(Duration::from_secs(10)),
                        launch_timeout: Duration::from_secs(120),
                        credentials: self.auth.credentials.clone(),
                    },
                    self.exits.clone(),
                ))))
            }
            ProviderKind::Local => Some(Arc::new(LocalProvider::new(
                LocalConfig {
                    data_dir: self.cfg.data_dir.clone(),
                    instances_dir: self.cfg.instances_dir(),
                    run_as: region.run_as.clone(),
                    drover_bin: self.cfg.drover_bin.clone(),
                    agent_bin: self.cfg.agent_bin.clone(),
                    server_url: self.server_url.clone(),
                    block: region
                        .subnet
                        .as_deref()
                        .and_then(drover_model::ids::parse_loopback_subnet)
                        .unwrap_or(1),
                    heartbeat_interval: self.cfg.heartbeat_interval,
                    tied: self.cfg.own_instances,
                    credentials: self.auth.credentials.clone(),
                },
                self.exits.clone(),
            ))),
            ProviderKind::Sim => Some(Arc::new(drover_provider::SimRegion {
                sim: self.sim.clone(),
                block: region
                    .subnet
                    .as_deref()
                    .and_then(drover_model::ids::parse_loopback_subnet)
                    .unwrap_or(1),
            })),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, item 10: one server per data directory. A second is refused, naming the
    /// first one's pid; once the first is gone (its lock goes with its process) it may start.
    #[test]
    fn a_data_directory_takes_one_server() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_data_dir(dir.path(), false).unwrap();
        let err = lock_data_dir(dir.path(), false).unwrap_err();
        assert!(matches!(err, ServerError::DataDirInUse { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())) && msg.contains("--data-dir"),
            "{msg}"
        );
        drop(first);
        lock_data_dir(dir.path(), false).unwrap();
    }

    /// Servers of one etcd control plane may share a data directory; a SQLite server may not
    /// join them, nor they it.
    #[test]
    fn servers_on_etcd_share_a_data_directory_and_keep_a_sqlite_server_out() {
        let dir = tempfile::tempdir().unwrap();
        let a = lock_data_dir(dir.path(), true).unwrap();
        let b = lock_data_dir(dir.path(), true).unwrap();
        assert!(lock_data_dir(dir.path(), false).is_err());
        drop((a, b));
        let sqlite = lock_data_dir(dir.path(), false).unwrap();
        assert!(lock_data_dir(dir.path(), true).is_err());
        drop(sqlite);
    }

    /// Connections the kernel completes for the API before the server accepts any: more than
    /// tokio's default backlog of 1024 (as many as `net.core.somaxconn` allows).
    #[tokio::test]
    async fn the_api_socket_queues_a_reconnect_storm() {
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let want = somaxconn.min(2000);
        if want <= 1100 {
            eprintln!("net.core.somaxconn is {somaxconn}: nothing to show above 1024");
            return;
        }
        let l = bind_api("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let mut conns = Vec::new();
        for i in 0..want {
            // Never accepted: each completes only if the kernel's queue has room.
            let c = tokio::time::timeout(
                std::time::Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .unwrap_or_else(|_| panic!("connection {i} of {want} was not queued"))
            .unwrap();
            conns.push(c);
        }
        assert_eq!(conns.len(), want);
    }
}
