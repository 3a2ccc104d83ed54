//! The `drover` binary: the CLI, `up`, `server`, `agent` and `demo-server`.

mod access;
mod agent_cli;
mod client;
mod demo;
#[cfg(feature = "aws")]
mod ec2;
mod exit;
mod lb;
mod progress;
mod render;
mod store;
mod terminal;
mod up;

/// mimalloc, not glibc's malloc: a server answering 10,000 heartbeats a second spent a sixth of
/// its CPU in glibc's free lists (`unlink_chunk`, `malloc_consolidate`; docs/benchmarks.md).
/// Built without transparent huge pages (the workspace's `no_thp`): with them, a server of
/// 10,000 instances held 73 MiB instead of 53.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use agent_cli::{init_logs, shutdown_signal, AgentArgs};
use clap::{Parser, Subcommand};
use drover_model::Dur;

const AFTER_HELP: &str = "\
Exit codes: 0 success, 1 refused or failed, 2 bad usage, 3 server unreachable.

Quick start:
  drover up examples/hello/drover.toml     # run the example fleet on this machine
  curl 127.0.0.1:8080/                     # answered by each instance in turn
  drover status                            # in another terminal";

/// drover runs services on fleets of machines, without Kubernetes.
///
/// Each service is an instance group per region; an agent on every instance runs the
/// group's components and respawns them; changing a version replaces instances.
#[derive(Parser, Debug)]
#[command(name = "drover", version, about, long_about, after_help = AFTER_HELP)]
struct Cli {
    /// The server's API URL [default: DATA_DIR/server.url, else http://127.0.0.1:7878].
    #[arg(long, global = true, env = "DROVER_SERVER")]
    server: Option<String>,
    /// The API token [default: DATA_DIR/admin.token, when --server is the server of DATA_DIR].
    /// Prefer DROVER_TOKEN or the file: a flag shows in `ps`.
    #[arg(long, global = true, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA that signed the server's certificate (PEM) [default: DATA_DIR/ca.pem for https].
    #[arg(long, global = true, env = "DROVER_CA")]
    ca: Option<PathBuf>,
    /// Do not verify the server's certificate (prints a warning).
    #[arg(long, global = true)]
    insecure: bool,
    /// The data directory: where `up` and `server` keep the store, instances, logs, the admin
    /// token and the CA, and where the CLI finds them.
    #[arg(
        long,
        global = true,
        env = "DROVER_DATA_DIR",
        default_value = ".drover"
    )]
    data_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run everything on this machine in the foreground: server, local instances, balancer.
    ///
    /// Applies FILE, keeps every group at its desired count with `drover agent` processes
    /// on their own loopback addresses, balances each ingress, and shows a live status table.
    /// Ctrl-C (or SIGTERM) stops it all and leaves no process behind.
    Up {
        /// The fleet file, e.g. examples/hello/drover.toml.
        file: PathBuf,
        /// Where the API listens.
        #[arg(long, default_value = "127.0.0.1:7878")]
        listen: SocketAddr,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        timing: TimingArgs,
        /// Let FILE win over what deploy, rollback, scale or autoscaling set in an earlier
        /// run (by default those stay, and are listed).
        #[arg(long)]
        force_file: bool,
    },
    /// Run the control plane: HTTP API, store, controllers and providers.
    ///
    /// On first start it writes an admin token to DATA_DIR/admin.token (0600). The API is
    /// served over TLS when --tls or --tls-cert is given, or when it listens on an address
    /// other than loopback (see docs/security.md). It starts the balancer of `local`
    /// ingresses as a process of its own (`drover lb`, DATA_DIR/lb), or adopts the one that
    /// runs; the balancer and the instances keep running when the server stops or dies.
    Server {
        #[arg(long, default_value = "127.0.0.1:7878")]
        listen: SocketAddr,
        #[command(flatten)]
        tls: TlsArgs,
        /// The URL instances on a cloud reach this server at (written into their launch
        /// templates), e.g. https://drover.internal:7878. Default: the listen address.
        /// With several servers on etcd it is also the URL the other servers forward calls
        /// to while this one leads (shown by GET /v1/health and `drover status`).
        #[arg(long, alias = "advertise", env = "DROVER_ADVERTISE_URL")]
        advertise_url: Option<String>,
        /// Every server of the control plane (comma separated URLs), as instances and the
        /// balancer reach them: they are given the whole list and move to another server
        /// when one stops answering. Default: this server's URL alone.
        #[arg(long, env = "DROVER_SERVERS", value_delimiter = ',')]
        servers: Vec<String>,
        /// How often cloud regions' groups are read (instances gone or launched).
        #[arg(long, default_value = "5s")]
        cloud_poll: Dur,
        /// Do not start a balancer: run `drover lb` yourself (e.g. under systemd, with an
        /// `lb` token), pointed at this server.
        #[arg(long)]
        no_lb: bool,
        /// Where the fleet's state is kept: sqlite:PATH, or etcd://HOST:PORT,HOST:PORT,...
        /// [/PREFIX] (user and password from DROVER_ETCD_USER / DROVER_ETCD_PASSWORD or
        /// etcd://USER:PASSWORD@...). Default: the SQLite file drover.db in the data
        /// directory. See docs/store.md.
        #[arg(long, env = "DROVER_STORE")]
        store: Option<String>,
        #[command(flatten)]
        etcd: store::EtcdArgs,
        #[command(flatten)]
        timing: TimingArgs,
    },
    /// Move a fleet's state between stores (`drover store copy --from sqlite:PATH --to etcd://...`).
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Create, list and revoke API tokens (needs an admin token).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run an instance's agent (started by providers, not by people).
    Agent(AgentArgs),
    /// Run the balancer of `local` regions' ingresses (`drover server` starts one).
    ///
    /// It follows the ingresses and targets of the servers it is given, keeps serving on its
    /// last targets and its own health checks while none answers (across its restarts too),
    /// and reports its open connections so drains know when an instance is idle. Started
    /// while another runs with the same --dir, it takes that one's listening sockets over
    /// and the old one finishes its connections and exits: an upgrade drops nothing. Needs
    /// an `lb` token (`drover token create --scope lb`); see docs/lb.md.
    Lb(lb::LbArgs),
    /// A small HTTP server for trying drover: `/` names its version and instance, `/healthz` answers checks.
    DemoServer(demo::DemoArgs),
    /// Validate FILE and store it as a new revision; prints the changes it applied.
    ///
    /// A three-way merge: a field changes only where the file changed it since it was last
    /// applied. What `deploy`, `rollback`, `scale`, autoscaling or `destroy` set since stays,
    /// and is listed with who set it; --force-file makes the file win.
    Apply {
        file: PathBuf,
        /// Show what would change without storing anything.
        #[arg(long)]
        dry_run: bool,
        /// Let the file win over what commands set since it was last applied (versions
        /// from deploy or rollback, counts from scale or autoscaling, services removed by
        /// destroy). Without it those live values stay and are listed.
        #[arg(long)]
        force_file: bool,
    },
    /// Show what applying FILE would change (same as `apply --dry-run`).
    Plan {
        file: PathBuf,
        /// Let the file win over what commands set since it was last applied (versions
        /// from deploy or rollback, counts from scale or autoscaling, services removed by
        /// destroy). Without it those live values stay and are listed.
        #[arg(long)]
        force_file: bool,
    },
    /// Make VERSION the preferred version of COMPONENT of SERVICE: every instance is replaced.
    ///
    /// A new plan generation is made for each group of the service; the rollout replaces
    /// instances within max_surge / max_unavailable, and reverts by itself if the new version
    /// does not turn healthy within healthy_deadline (auto_revert). With rollout.waves, the
    /// regions go wave by wave.
    ///
    /// With --region (repeatable), only those regions' groups get the version; the service's
    /// other groups keep theirs, held by hand (status: `held`), until a deploy names them or
    /// names no region (the same version then carries on to them, wave by wave).
    Deploy {
        service: String,
        component: String,
        version: String,
        /// Only this region (repeatable; default: every region of the service).
        #[arg(long = "region", value_name = "REGION")]
        regions: Vec<String>,
        /// Follow the rollout with a progress bar until it is done or fails (exit 1 if it fails).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this long (exit 1); the rollout goes on.
        #[arg(long, default_value = "30m")]
        timeout: Dur,
        /// Show what would change without storing anything.
        #[arg(long)]
        dry_run: bool,
    },
    /// Go back to the versions SERVICE ran in the latest earlier revision that differs.
    Rollback {
        service: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "30m")]
        timeout: Dur,
        #[arg(long)]
        dry_run: bool,
    },
    /// Act on a service's rollout under way: pause, resume, promote or abort it.
    ///
    /// A paused rollout hands out no permit and launches nothing new (it keeps the group at
    /// its desired count), and stays paused across server restarts; `resume` (or `promote`)
    /// lets it go on. `abort` stops it and goes back to the group's last good generation.
    Rollout {
        /// pause, resume, promote or abort.
        action: RolloutVerb,
        service: String,
        /// Only this region's group (default: every region of the service).
        #[arg(long)]
        region: Option<String>,
    },
    /// Set the desired count of SERVICE's groups; autoscaling (if any) goes on from it.
    ///
    /// The count must be within the service's capacity min..max (while a schedule raises
    /// them, it is kept but clamped to the raised bounds). Extra instances leave through the
    /// same drain path as a deploy (stale ones first, then the newest).
    ///
    /// With --at and --for (or --until), the change is scheduled instead: from then on, for
    /// that long, the groups have at least COUNT instances (min and desired raised to COUNT,
    /// max too if lower); autoscaling goes on within those bounds; afterwards they drop back.
    /// Stored, so it survives restarts; see `drover schedule list`.
    Scale {
        service: String,
        /// The new desired count.
        count: u32,
        /// Only this region's group (default: every region of the service).
        #[arg(long)]
        region: Option<String>,
        /// When the scheduled change begins, e.g. "2026-12-24 18:00" (in --timezone).
        #[arg(long)]
        at: Option<String>,
        /// How long it holds, e.g. 3h (instead of --until).
        #[arg(long = "for", value_name = "DURATION", conflicts_with = "until")]
        for_: Option<Dur>,
        /// When it ends, e.g. "2026-12-24 21:00" (in --timezone).
        #[arg(long)]
        until: Option<String>,
        /// The IANA time zone --at and --until are read in (default UTC), e.g. Europe/London.
        #[arg(long, default_value = "UTC")]
        timezone: String,
    },
    /// Scheduled capacity: list the schedules (fleet file and one-off), cancel a one-off.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Remove SERVICE (or, without it, every service) from the fleet, and what drover made
    /// for it.
    ///
    /// A new revision without the service is stored; its instances leave by the drain path;
    /// then its provider removes its groups: on AWS the Auto Scaling groups, launch
    /// templates, load balancers and target groups drover created for it, and nothing that
    /// does not carry drover's tags for this fleet. Apply the fleet file again to bring it back.
    Destroy {
        service: Option<String>,
        /// Show what would change without storing anything.
        #[arg(long)]
        dry_run: bool,
        /// Wait until the provider reports the groups' resources removed (exit 1 on timeout).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "10m")]
        timeout: Dur,
    },
    /// Show every group (generation, health, rollout, scaling) and, for a fleet of at most
    /// 100 instances, every instance; `drover status GROUP` lists one group's instances a page
    /// at a time, `--all` every instance of the fleet.
    Status {
        /// A group (`service/region`, or a service with one region): its instances, a page at
        /// a time.
        group: Option<String>,
        #[arg(long, default_value_t = 1)]
        page: usize,
        #[arg(long, default_value_t = 100)]
        per_page: usize,
        /// Every instance of the fleet (one large answer for a large fleet).
        #[arg(long, conflicts_with = "group")]
        all: bool,
    },
    /// Show the event log: everything that happened, in order.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long, short)]
        follow: bool,
        /// Only events after this sequence number (then the oldest first, from there).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// The latest N, like `tail` (default: 10000; with --after: the first N after it).
        /// With --follow: those first, then new ones as they happen.
        #[arg(long)]
        limit: Option<usize>,
        /// Only events of the last this long, e.g. 10m or 2h.
        #[arg(long)]
        since: Option<Dur>,
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        instance: Option<String>,
        /// One of: applied, plan_changed, scaled, launched, healthy, unhealthy, respawned,
        /// silent, lost, terminating, terminated, permit, drained, targets, rollout, server,
        /// provider.
        #[arg(long)]
        kind: Option<String>,
    },
    /// Show what a service's components print, merged across its instances in time order.
    ///
    /// Each line is prefixed with its instance and component. The output is fetched by the
    /// server over the agents' own connections (nothing needs to reach the instances) and
    /// values of `secret_env` are replaced. Of an instance that is gone, --instance ID or
    /// --generation N show what the flight recorder kept (its last 64 KiB per component).
    /// Without --tail or --since: the last 100 lines of each component. See docs/operate.md.
    Logs {
        service: String,
        /// Only this component (default: all).
        component: Option<String>,
        #[arg(long = "component", conflicts_with = "component")]
        component_flag: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// Only this instance (running, or gone: then what the flight recorder kept).
        #[arg(long)]
        instance: Option<String>,
        /// Only instances of this plan generation (with gone ones' flight records).
        #[arg(long)]
        generation: Option<u64>,
        /// Keep printing new lines as they come.
        #[arg(long, short)]
        follow: bool,
        /// Only lines of the last this long, e.g. 10m.
        #[arg(long)]
        since: Option<Dur>,
        /// Only the last N lines of each component.
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Run a command in a component's environment on one instance; exits with its exit code.
    ///
    /// `drover exec web -- printenv DROVER_VERSION`, `drover exec i-000003 app -- ls`. A
    /// process component's command runs with its environment and working directory, a
    /// Docker component's inside its container. Needs an admin or exec token; every session
    /// is an event (who, where, what, how it ended). `-it` for an interactive shell:
    /// `drover exec -it web -- /bin/sh`.
    Exec {
        /// Pass this process's stdin to the command.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Give the command a terminal (a pty; the engine's tty for a container); with -i on
        /// a terminal, this one is raw while the command runs and its size follows.
        #[arg(short = 't', long)]
        tty: bool,
        /// A service (its first running instance, or --instance), or an instance id.
        target: String,
        /// The component (default: the plan's first).
        component: Option<String>,
        #[arg(long)]
        instance: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a one-time login link to the web dashboard (it works once, within 60 seconds).
    ///
    /// The dashboard session gets the scope of the token this command runs with: an admin
    /// token's session can deploy, scale and roll back from the page; a read token's can only
    /// look. The dashboard also takes a token pasted on its login page. See docs/ui.md.
    Ui {
        /// Open the link in the default browser (xdg-open, or open on macOS).
        #[arg(long)]
        open: bool,
    },
    /// List every applied revision of the fleet file.
    History,
    /// Check a fleet file without contacting the server.
    Validate { file: PathBuf },
}

/// Heartbeats and silence.
#[derive(clap::Args, Debug, Clone)]
pub struct TimingArgs {
    /// How often the server's instances send heartbeats.
    #[arg(long, default_value = "1s")]
    pub heartbeat_interval: Dur,
    /// An instance not heard from for this long leaves rotation and is replaced (after a
    /// server start: counted from when the API answers). At least 3 heartbeat intervals
    /// [default: 5s, or 3 heartbeat intervals if that is more].
    #[arg(long)]
    pub silent_after: Option<Dur>,
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Where `local` instances get their directories [default: DATA_DIR.instances, beside
    /// the data directory: nothing an instance reads is in it].
    #[arg(long, env = "DROVER_INSTANCES_DIR")]
    pub instances_dir: Option<PathBuf>,
}

/// How long events are kept (revisions, plans and the rest are kept for good).
#[derive(clap::Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Keep at most this many events, the newest (older ones are deleted every minute).
    #[arg(long, default_value_t = drover_server::EVENTS_KEEP)]
    pub events_keep: u64,
    /// Delete events older than this (720h: 30 days), e.g. 168h, 90m.
    #[arg(long, default_value = "720h")]
    pub events_max_age: Dur,
}

#[derive(clap::Args, Debug, Clone)]
struct TlsArgs {
    /// Serve the API over TLS with a CA and certificate made in DATA_DIR (ca.pem is what
    /// clients trust; agents pin it).
    #[arg(long)]
    tls: bool,
    /// Serve the API over TLS with this certificate chain (PEM) ...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ... and this private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA agents pin when --tls-cert is given (default: the chain's last certificate).
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Plain HTTP even on a non-loopback address (e.g. behind a proxy that terminates TLS).
    #[arg(long, conflicts_with_all = ["tls", "tls_cert"])]
    no_tls: bool,
}

impl TlsArgs {
    fn mode(&self, listen: SocketAddr) -> drover_server::tls::TlsMode {
        use drover_server::tls::TlsMode;
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => TlsMode::Files {
                cert: cert.clone(),
                key: key.clone(),
                ca: self.tls_ca.clone(),
            },
            _ if self.tls => TlsMode::Generate,
            _ if self.no_tls || listen.ip().is_loopback() => TlsMode::Off,
            _ => TlsMode::Generate,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RolloutVerb {
    Pause,
    Resume,
    Promote,
    Abort,
}

#[derive(Subcommand, Debug)]
enum ScheduleCommand {
    /// Every schedule: those of the fleet file (web#0, ...) with their next firings, and the
    /// one-off changes of `drover scale --at` (with their ids), active, waiting, done or
    /// cancelled.
    List,
    /// Cancel a one-off scheduled change by its id; if it holds now, the bounds drop back.
    Cancel { id: String },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a token and print it: it is shown this once, and never again.
    Create {
        /// admin (change desired state, manage tokens), read (status, events, history, logs),
        /// exec (what read may, and `drover exec`), agent (one group's instances; new
        /// instances of the group get it) or lb (a balancer process).
        #[arg(long)]
        scope: String,
        /// A label shown by `token list`.
        #[arg(long)]
        name: Option<String>,
        /// For --scope agent: the group (`service/region`).
        #[arg(long)]
        group: Option<String>,
    },
    /// List every token (never their secrets).
    List,
    /// Revoke a token by its id (`t-000003`): it is refused from now on.
    Revoke { id: String },
}

fn main() -> ExitCode {
    let cli: Cli = match exit::parse() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let code = match cli.command {
        Command::Agent(args) => {
            let server = (!args.standalone).then(|| {
                cli.server
                    .clone()
                    .unwrap_or_else(|| access::DEFAULT_SERVER.to_string())
            });
            run_agent(args, server)
        }
        Command::DemoServer(args) => demo::run(args),
        Command::Lb(args) => match args.resolve(cli.server, cli.token, cli.ca, &cli.data_dir) {
            Ok(a) => lb::run(a),
            Err(e) => {
                eprintln!("error: {e:#}");
                exit::FAILED
            }
        },
        Command::Validate { ref file } => validate(file, cli.json),
        Command::Store(cmd) => store::run(cmd, cli.json),
        _ => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::from(exit::FAILED);
                }
            };
            rt.block_on(dispatch(cli))
        }
    };
    ExitCode::from(code)
}

async fn dispatch(cli: Cli) -> u8 {
    let access = match access::resolve(
        cli.server.clone(),
        cli.token.clone(),
        cli.ca.clone(),
        cli.insecure,
        &cli.data_dir,
    ) {
        Ok(a) => a,
        // A server does not call one: it makes (and closes) its own data directory.
        Err(_) if matches!(cli.command, Command::Up { .. } | Command::Server { .. }) => {
            access::Access {
                server: access::DEFAULT_SERVER.to_string(),
                token: None,
                ca: None,
                insecure: false,
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::FAILED;
        }
    };
    let client = match client::Client::with_access(&access, cli.json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return exit::FAILED;
        }
    };
    let data_dir = cli.data_dir.clone();
    let result = match cli.command {
        Command::Up {
            file,
            listen,
            tls,
            timing,
            force_file,
        } => {
            up::run(
                &file,
                &data_dir,
                listen,
                tls.mode(listen),
                &timing,
                cli.json,
                force_file,
            )
            .await
        }
        Command::Server {
            listen,
            tls,
            advertise_url,
            servers,
            cloud_poll,
            no_lb,
            store,
            etcd,
            timing,
        } => match store::server_store(store.as_deref(), &etcd) {
            Err(e) => Err(e),
            Ok(store) => {
                up::serve(
                    &data_dir,
                    listen,
                    tls.mode(listen),
                    &timing,
                    up::CloudArgs {
                        advertise_url,
                        poll: cloud_poll.0,
                        spawn_lb: !no_lb,
                        store,
                        servers: servers
                            .iter()
                            .map(|s| s.trim().trim_end_matches('/').to_string())
                            .filter(|s| !s.is_empty())
                            .collect(),
                    },
                )
                .await
            }
        },
        Command::Token(t) => match t {
            TokenCommand::Create { scope, name, group } => {
                client.token_create(&scope, name, group).await
            }
            TokenCommand::List => client.token_list().await,
            TokenCommand::Revoke { id } => client.token_revoke(&id).await,
        },
        Command::Apply {
            file,
            dry_run,
            force_file,
        } => client.apply(&file, dry_run, force_file).await,
        Command::Plan { file, force_file } => client.apply(&file, true, force_file).await,
        Command::Deploy {
            service,
            component,
            version,
            regions,
            wait,
            timeout,
            dry_run,
        } => {
            client
                .deploy(
                    &service,
                    &component,
                    &version,
                    &regions,
                    dry_run,
                    wait.then_some(timeout.0),
                )
                .await
        }
        Command::Rollback {
            service,
            wait,
            timeout,
            dry_run,
        } => {
            client
                .rollback(&service, dry_run, wait.then_some(timeout.0))
                .await
        }
        Command::Scale {
            service,
            count,
            region,
            at,
            for_,
            until,
            timezone,
        } => {
            if at.is_none() && for_.is_none() && until.is_none() {
                client.scale(&service, count, region).await
            } else {
                match scheduled_window(at.as_deref(), for_, until.as_deref(), &timezone) {
                    Ok((start_ms, end_ms)) => {
                        let req = drover_model::api::ScheduleRequest {
                            service,
                            region,
                            desired: count,
                            start_ms,
                            end_ms,
                            timezone: Some(timezone),
                        };
                        client.schedule_once(req).await
                    }
                    Err(msg) => {
                        eprintln!("error: {msg}");
                        Ok(exit::USAGE)
                    }
                }
            }
        }
        Command::Schedule(c) => match c {
            ScheduleCommand::List => client.schedule_list().await,
            ScheduleCommand::Cancel { id } => client.schedule_cancel(&id).await,
        },
        Command::Rollout {
            action,
            service,
            region,
        } => {
            let action = match action {
                RolloutVerb::Pause => drover_model::api::RolloutAction::Pause,
                RolloutVerb::Resume => drover_model::api::RolloutAction::Resume,
                RolloutVerb::Promote => drover_model::api::RolloutAction::Promote,
                RolloutVerb::Abort => drover_model::api::RolloutAction::Abort,
            };
            client.rollout(&service, region, action).await
        }
        Command::Destroy {
            service,
            dry_run,
            wait,
            timeout,
        } => {
            client
                .destroy(service, dry_run, wait.then_some(timeout.0))
                .await
        }
        Command::Status {
            group,
            page,
            per_page,
            all,
        } => {
            client
                .status(client::StatusArgs {
                    group,
                    page,
                    per_page,
                    all,
                })
                .await
        }
        Command::Events {
            follow,
            after,
            limit,
            since,
            group,
            instance,
            kind,
        } => {
            client
                .events(client::EventArgs {
                    follow,
                    after,
                    limit,
                    since,
                    group,
                    instance,
                    kind,
                })
                .await
        }
        Command::History => client.history().await,
        Command::Logs {
            service,
            component,
            component_flag,
            region,
            instance,
            generation,
            follow,
            since,
            tail,
        } => {
            let tail = tail.or((since.is_none()).then_some(100));
            client
                .logs(drover_model::logs::LogsQuery {
                    service,
                    component: component.or(component_flag),
                    region,
                    instance,
                    generation,
                    since,
                    tail,
                    follow,
                })
                .await
        }
        Command::Exec {
            interactive,
            tty,
            target,
            component,
            instance,
            region,
            command,
        } => {
            let (service, instance) = if target.starts_with("i-") && instance.is_none() {
                (String::new(), Some(target))
            } else {
                (target, instance)
            };
            client
                .exec(drover_model::logs::ExecRequest {
                    service,
                    region,
                    instance,
                    component,
                    command,
                    tty,
                    stdin: interactive,
                    size: None,
                })
                .await
        }
        Command::Ui { open } => client.ui_link(open).await,
        Command::Agent(_)
        | Command::DemoServer(_)
        | Command::Lb(_)
        | Command::Validate { .. }
        | Command::Store(_) => Ok(exit::OK),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            if let Some(client::Unreachable(url)) = e.downcast_ref::<client::Unreachable>() {
                eprintln!(
                    "error: cannot reach the drover server at {url}\n  is `drover up` or `drover server` running? point to it with --server URL or DROVER_SERVER"
                );
                return exit::UNREACHABLE;
            }
            eprintln!("error: {e:#}");
            exit::FAILED
        }
    }
}

/// `--at`, `--for`, `--until` and `--timezone` of `drover scale` as (start, end) in ms.
/// Without --at it begins now.
fn scheduled_window(
    at: Option<&str>,
    for_: Option<Dur>,
    until: Option<&str>,
    timezone: &str,
) -> Result<(u64, u64), String> {
    use drover_model::cron::{parse_time, parse_tz};
    let tz = parse_tz(timezone).map_err(|e| format!("--timezone: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let start = match at {
        Some(t) => parse_time(t, tz).map_err(|e| format!("--at: {e}"))?,
        None => now,
    };
    let end = match (for_, until) {
        (Some(d), _) => start.saturating_add(d.as_millis()),
        (None, Some(t)) => parse_time(t, tz).map_err(|e| format!("--until: {e}"))?,
        (None, None) => return Err(
            "--at needs --for DURATION (e.g. --for 3h) or --until TIME: how long the count holds"
                .into(),
        ),
    };
    if end <= start {
        return Err(format!(
            "the end ({}) is not after the start ({}); give a positive --for or a later --until",
            drover_model::cron::format_in(end, tz),
            drover_model::cron::format_in(start, tz)
        ));
    }
    Ok((start, end))
}

fn validate(file: &std::path::Path, json: bool) -> u8 {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return exit::FAILED;
        }
    };
    match drover_model::parse_fleet(&text, &file.display().to_string()) {
        Ok(fleet) => {
            let groups: usize = fleet.services.values().map(|s| s.regions.len()).sum();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"ok": true, "fleet": fleet.fleet.name, "services": fleet.services.len(), "groups": groups})
                );
            } else {
                println!(
                    "{}: ok (fleet {}, {} service(s), {} group(s))",
                    file.display(),
                    fleet.fleet.name,
                    fleet.services.len(),
                    groups
                );
            }
            exit::OK
        }
        Err(errors) => {
            if json {
                println!("{}", serde_json::json!({"ok": false, "errors": errors.0}));
            } else {
                eprintln!("{errors}");
                eprintln!("{} problem(s) found; nothing was changed", errors.0.len());
            }
            exit::FAILED
        }
    }
}

/// `drover agent --aws`.
#[cfg(feature = "aws")]
fn run_ec2_agent(imds: Option<&str>, dir: PathBuf) -> u8 {
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
    rt.block_on(async move {
        let a = match ec2::prepare(imds, dir).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("error: {e:#}");
                return exit::FAILED;
            }
        };
        tracing::info!(instance = %a.cfg.instance, group = %a.cfg.group, "agent on EC2");
        match drover_agent::run_with_auth(a.cfg.clone(), a.auth.clone(), shutdown_signal()).await {
            Ok(drover_agent::Outcome::Left { reason, decrement }) => {
                // The permit says whether the group's capacity goes with this instance; a
                // server that does not say leaves it to the boot document.
                let decrement = decrement.unwrap_or(a.decrement_on_leave);
                tracing::info!(
                    decrement,
                    "left on a permit ({reason}); terminating this instance ({})",
                    if decrement {
                        "lowering its group's desired capacity"
                    } else {
                        "its Auto Scaling group launches the replacement"
                    }
                );
                match ec2::terminate_self(&a, decrement).await {
                    Ok(()) => exit::OK,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        exit::FAILED
                    }
                }
            }
            Ok(drover_agent::Outcome::Shutdown) => exit::OK,
            Err(e) => {
                eprintln!("error: {e}");
                exit::FAILED
            }
        }
    })
}

#[cfg(not(feature = "aws"))]
fn run_ec2_agent(_imds: Option<&str>, _dir: PathBuf) -> u8 {
    eprintln!("error: this drover was built without AWS support; build it with `cargo build --release --features aws`");
    exit::USAGE
}

fn run_agent(args: AgentArgs, server: Option<String>) -> u8 {
    if args.aws {
        agent_cli::init_logs(std::io::stderr);
        return run_ec2_agent(args.imds_endpoint.as_deref(), args.dir.clone());
    }
    match std::env::current_exe() {
        Ok(bin) => agent_cli::run(&args, server, bin),
        Err(e) => {
            eprintln!("error: cannot find the drover binary: {e}");
            exit::FAILED
        }
    }
}
