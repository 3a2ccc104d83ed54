//! A standalone drover-lb listener for benchmarks (`bench/lb.sh`): fixed targets from the
//! command line, round-robin unless told otherwise, runs until SIGINT or SIGTERM.
//!
//! ```text
//! lb_bench --listen 127.0.0.1:8000 [--threads 1] [--policy rr|lc] [--max-connections N]
//!          [--health tcp|http:/path] [--stats] 127.0.0.1:9001 127.0.0.1:9002 ...
//! ```
//!
//! `--threads` is the number of tokio worker threads (like HAProxy's `nbthread`). With
//! `--stats` the listener's counters are printed as Prometheus text on exit.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use drover_lb::{
    prometheus, HealthCheckConfig, HealthCheckKind, Listener, ListenerConfig, Policy, Target,
};
use tokio::sync::watch;

struct Args {
    listen: SocketAddr,
    threads: usize,
    policy: Policy,
    max_connections: usize,
    health: Option<HealthCheckKind>,
    stats: bool,
    targets: Vec<SocketAddr>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
        threads: 1,
        policy: Policy::RoundRobin,
        max_connections: 10_000,
        health: None,
        stats: false,
        targets: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--listen" => {
                args.listen = value("--listen")?
                    .parse()
                    .map_err(|e| format!("--listen: {e}"))?
            }
            "--threads" => {
                args.threads = value("--threads")?
                    .parse()
                    .map_err(|e| format!("--threads: {e}"))?
            }
            "--max-connections" => {
                args.max_connections = value("--max-connections")?
                    .parse()
                    .map_err(|e| format!("--max-connections: {e}"))?
            }
            "--policy" => {
                args.policy = match value("--policy")?.as_str() {
                    "rr" => Policy::RoundRobin,
                    "lc" => Policy::LeastConnections,
                    other => return Err(format!("--policy: {other:?} is not rr or lc")),
                }
            }
            "--health" => {
                let v = value("--health")?;
                args.health = Some(match v.strip_prefix("http:") {
                    Some(path) => HealthCheckKind::Http {
                        path: path.to_string(),
                    },
                    None if v == "tcp" => HealthCheckKind::Tcp,
                    None => return Err(format!("--health: {v:?} is not tcp or http:/path")),
                });
            }
            "--stats" => args.stats = true,
            "-h" | "--help" => return Err(String::new()),
            t => args
                .targets
                .push(t.parse().map_err(|e| format!("target {t:?}: {e}"))?),
        }
    }
    if args.threads == 0 {
        return Err("--threads must be at least 1".to_string());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("lb_bench: {e}");
            }
            eprintln!(
                "usage: lb_bench --listen ADDR [--threads N] [--policy rr|lc] \
                 [--max-connections N] [--health tcp|http:/path] [--stats] TARGET..."
            );
            return ExitCode::from(2);
        }
    };
    // One thread: tokio's single-threaded scheduler, an event loop like HAProxy's with
    // `nbthread 1`; more: the work-stealing one with that many workers.
    let mut builder = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.threads);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let targets: Vec<Target> = args
        .targets
        .iter()
        .enumerate()
        .map(|(i, addr)| Target::new(format!("t{}", i + 1), *addr))
        .collect();
    let (_tx, rx) = watch::channel(targets);
    let cfg = ListenerConfig {
        name: "bench".to_string(),
        listen: args.listen,
        policy: args.policy,
        max_connections: args.max_connections,
        health: args.health.map(|kind| HealthCheckConfig {
            kind,
            ..Default::default()
        }),
        shutdown_grace: Duration::from_millis(100),
        ..Default::default()
    };
    let lb = match Listener::bind(cfg, rx).await {
        Ok(lb) => lb,
        Err(e) => {
            eprintln!("lb_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("lb_bench: listening on {}", lb.local_addr());
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lb_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if args.stats {
        print!("{}", prometheus(&[lb.stats()]));
    }
    lb.shutdown().await;
    ExitCode::SUCCESS
}
