//! `drover-fleetsim`: a load tool for the control plane at fleet scale. It runs thousands of
//! simulated agents in one process against a real `drover server` over HTTP (heartbeats,
//! permit long-polls, leaving, faults), samples the server's CPU and RSS, and times status,
//! restarts and deploys. The server runs a fleet of `provider = "sim"` regions: it records
//! launches and starts nothing, and this tool's agents report for what it launched (learnt
//! from its `launched` events). See `bench/fleet.sh` and docs/benchmarks.md.

/// The same allocator as the server's: glibc's free lists were a fifth of this tool's CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod agents;
mod fleetfile;
mod probes;
mod procfs;
mod stats;
mod tasks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "drover-fleetsim", version, about)]
struct Cli {
    /// Worker threads of the agents' runtime (the server under test shares the machine; at
    /// 50,000 agents one thread is not enough).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run N simulated agents against a server and report heartbeat/status latency and the
    /// server's CPU and RSS.
    Run(Box<agents::RunArgs>),
    /// Print the benchmark's fleet file: one service `sK` per region `rK`.
    FleetFile {
        #[arg(long, default_value_t = 10)]
        groups: usize,
        /// Initial desired count per group (0 to apply before seeding).
        #[arg(long, default_value_t = 0)]
        desired: u32,
        /// Capacity max per group.
        #[arg(long, default_value_t = 1000)]
        max: u32,
        /// rollout.max_unavailable of every service.
        #[arg(long, default_value_t = 10)]
        max_unavailable: u32,
        /// Loopback block 127.B.0.0/16 the sim provider records addresses from.
        #[arg(long, default_value_t = 77)]
        subnet: u8,
    },
    /// Poll status until COUNT instances report and are healthy (restart recovery).
    WaitHealthy {
        #[command(flatten)]
        auth: AuthArgs,
        #[arg(long, default_value = "http://127.0.0.1:7878")]
        server: String,
        #[arg(long)]
        count: usize,
        /// Count time from this instant (ms since the epoch), e.g. the server's start.
        #[arg(long)]
        since_epoch_ms: Option<u64>,
        #[arg(long, default_value = "120s")]
        timeout: drover_model::Dur,
        #[arg(long, default_value = "250ms")]
        poll: drover_model::Dur,
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// GET /v1/status N times and print the latency.
    StatusLatency {
        #[command(flatten)]
        auth: AuthArgs,
        #[arg(long, default_value = "http://127.0.0.1:7878")]
        server: String,
        #[arg(long, default_value_t = 10)]
        n: usize,
    },
    /// POST a deploy and time its first plan_changed / permit / launched events.
    DeployProbe {
        #[command(flatten)]
        auth: AuthArgs,
        #[arg(long, default_value = "http://127.0.0.1:7878")]
        server: String,
        service: String,
        component: String,
        version: String,
        #[arg(long, default_value = "30s")]
        timeout: drover_model::Dur,
    },
}

/// The admin (or read) token of the probes.
#[derive(clap::Args, Debug)]
struct AuthArgs {
    /// [default: DROVER_TOKEN, else DATA_DIR/admin.token]
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The server's data directory, for its admin.token.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl AuthArgs {
    fn auth(&self) -> Option<String> {
        probes::admin_auth(self.token.clone(), self.data_dir.as_deref())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let result = match cli.command {
        Command::FleetFile {
            groups,
            desired,
            max,
            max_unavailable,
            subnet,
        } => {
            print!(
                "{}",
                fleetfile::fleet_file(groups, desired, max, max_unavailable, subnet)
            );
            Ok(())
        }
        other => {
            let rt = if cli.threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(cli.threads)
                    .enable_all()
                    .build()
            };
            let rt = match rt {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
                match other {
                    Command::Run(args) => agents::run(*args).await,
                    Command::WaitHealthy {
                        auth,
                        server,
                        count,
                        since_epoch_ms,
                        timeout,
                        poll,
                        server_pid,
                    } => probes::wait_healthy(
                        auth.auth(),
                        &server,
                        count,
                        since_epoch_ms,
                        timeout.0,
                        poll.0,
                        server_pid,
                    )
                    .await
                    .map(|v| println!("{v}")),
                    Command::StatusLatency { auth, server, n } => {
                        probes::status_latency(auth.auth(), &server, n)
                            .await
                            .map(|v| println!("{v}"))
                    }
                    Command::DeployProbe {
                        auth,
                        server,
                        service,
                        component,
                        version,
                        timeout,
                    } => probes::deploy_probe(
                        auth.auth(),
                        &server,
                        &service,
                        &component,
                        &version,
                        timeout.0,
                    )
                    .await
                    .map(|v| println!("{v}")),
                    _ => unreachable!(),
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
