//! The simulated agents: heartbeats at a fixed interval (spread evenly), a permit long-poll
//! while the server's heartbeat answer says a permit may come soon (`leave_soon`, as the real
//! agent does), leaving on a permit, and faults on demand (fail, silent, crash).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use drover_model::api::{AgentPhase, ComponentReport, ComponentState, Heartbeat, Utilization};
use drover_test_support::agent;
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::procfs;
use crate::stats::{epoch_ms, summarize, Summary};
use crate::tasks::{Left, Tasks, SHUTDOWN_WITHIN};

/// Agent modes.
const NORMAL: u8 = 0;
const FAILING: u8 = 1;
const SILENT: u8 = 2;
const CRASHED: u8 = 3;
const DRAINING: u8 = 4;
const STOPPING: u8 = 5;
const GONE: u8 = 6;
const FORGOTTEN: u8 = 7;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Heartbeat for the instances the server lists in `GET /v1/status` (and, with
    /// --follow-new, those it launches: the instances of its `sim` regions).
    Fleet,
    /// Heartbeat for made-up ids the server does not know: it answers `{"known":false}` at once,
    /// so this measures HTTP + JSON + one map lookup only, not the heartbeat path.
    Unknown,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:7878")]
    pub server: String,
    #[arg(long, value_enum, default_value = "fleet")]
    pub mode: Mode,
    /// Admin (or read) token for status, events, plans, deploys and creating the agents'
    /// tokens [default: DROVER_TOKEN, else DATA_DIR/admin.token with --data-dir]. Agents use
    /// an agent token per group, created with it at start (`POST /v1/tokens`).
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// `unknown` mode: how many agents.
    #[arg(long, default_value_t = 1000)]
    pub instances: usize,
    /// `unknown` mode: spread over this many groups (`sK/rK`).
    #[arg(long, default_value_t = 10)]
    pub groups: usize,
    /// Heartbeat interval of every agent; agents are spread evenly over it.
    #[arg(long, default_value = "5s")]
    pub interval: drover_model::Dur,
    /// Spread the agents' first heartbeats over this (default: the interval), then settle
    /// into the interval, evenly spread. A server that just started (or adopted seeded
    /// instances) declares silent any instance not heard from within its `silent_after` (5 s).
    #[arg(long)]
    pub ramp: Option<drover_model::Dur>,
    /// After a failed heartbeat (server down, timeout), try again after this long rather
    /// than waiting for the next interval (the real agent's interval is 1 s).
    #[arg(long, default_value = "1s")]
    pub retry: drover_model::Dur,
    /// Timeout of one heartbeat (the real agent uses 1 s; longer here to see the tail).
    #[arg(long, default_value = "5s")]
    pub hb_timeout: drover_model::Dur,
    /// Long-poll for permits: on = while the server's heartbeat answer says a permit may come
    /// soon (`leave_soon`, the real agent's protocol); always = all the time, whatever the
    /// answer (agents before that hint); auto = on in fleet mode, off in unknown mode (the
    /// server answers 404 for unknown instances).
    #[arg(long, value_enum, default_value = "auto")]
    pub permits: OnOff,
    /// `wait_ms` of each permit long-poll (the real agent: 20000).
    #[arg(long, default_value_t = 20_000)]
    pub permit_wait_ms: u64,
    /// Not measured: time for every agent to send its first heartbeats.
    #[arg(long, default_value = "15s")]
    pub warmup: drover_model::Dur,
    /// Measured window after the warm-up.
    #[arg(long, default_value = "60s")]
    pub duration: drover_model::Dur,
    /// Sample this process's CPU (utime+stime) and RSS every second.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Or read the server's pid from this file, every second (follows a restarted server).
    #[arg(long)]
    pub server_pid_file: Option<PathBuf>,
    /// GET /v1/status this often (from a separate thread) and time it; 0 = never.
    #[arg(long, default_value = "5s")]
    pub status_every: drover_model::Dur,
    /// The query of those polls (e.g. `instances=none`: summaries, as `drover status` and
    /// the dashboard ask; empty: every instance listed).
    #[arg(long, default_value = "")]
    pub status_query: String,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The server's data directory, for its admin token (DATA/admin.token).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Scheduled faults, `AT:KIND:COUNT` with KIND fail|heal|silent|crash, AT from the
    /// start of the agents, e.g. `30s:fail:10`.
    #[arg(long)]
    pub fault: Vec<String>,
    /// Listen here for fault commands, one per line: `fail N`, `heal N`, `silent N`,
    /// `crash N`, `stats`.
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// Keep the agents running after the report until SIGINT/SIGTERM (so the server does
    /// not see them go silent while the caller measures more: restart, deploy).
    #[arg(long)]
    pub linger: bool,
    /// Agents first report `booting` (components starting: no event, no store write) and
    /// turn healthy at this many per second over the whole fleet, in start order. Without
    /// it, every agent reports healthy from its first heartbeat (what agents do after a
    /// server restart).
    #[arg(long)]
    pub boot_rate: Option<f64>,
    /// Fleet mode with --follow-new: wait until the server reports this many healthy
    /// instances before the warm-up starts (e.g. after `apply` asked it to launch them).
    #[arg(long)]
    pub wait_healthy: Option<usize>,
    /// With --wait-healthy: how often to read the status.
    #[arg(long, default_value = "2s")]
    pub follow_every: drover_model::Dur,
    /// At most this many heartbeat requests in flight (and so connections for them); a
    /// heartbeat waiting for a slot counts that wait in its latency. Only matters when the
    /// server stalls: in steady state a handful are in flight.
    #[arg(long, default_value_t = 2000)]
    pub max_inflight: usize,
    /// Agents per HTTP client (connection pool). Each client connects from its own loopback
    /// source address (127.0.0.10, .11, ...): with one pool and one source address, 10,000
    /// connections make the kernel's ephemeral-port search and the pool's waiter list
    /// quadratic, and the load tool, not the server, becomes the bottleneck.
    #[arg(long, default_value_t = 500)]
    pub agents_per_client: usize,
    /// Print one line a second: heartbeats sent, errors, latency p50/p99/max of that second,
    /// long-polls open, server CPU and RSS.
    #[arg(long)]
    pub progress: bool,
    /// Fleet mode: follow the server's `launched` events (GET /v1/events?follow=true) and
    /// start an agent for each new instance at once (the instances of `sim` regions; leave
    /// off when new instances are real `drover agent`s).
    #[arg(long)]
    pub follow_new: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    Auto,
    On,
    Always,
    Off,
}

/// What one simulated agent reports.
#[derive(Clone, Debug)]
struct Spec {
    id: String,
    group: String,
    generation: u64,
    addr: String,
    components: Vec<(String, String)>,
    /// Deterministic per-instance variety (utilization, pids).
    salt: u64,
    /// Which of the HTTP clients it uses.
    client: usize,
}

struct Ctl {
    mode: AtomicU8,
    seq: AtomicU64,
    wake: Notify,
    /// The server's hint in its last heartbeat answer: hold the permit long-poll open.
    poll_permit: tokio::sync::watch::Sender<bool>,
    /// Reports booting until this instant.
    healthy_at: Option<Instant>,
    /// Ends the agent's tasks (cancelled by the shutdown).
    stop: CancellationToken,
}

impl Ctl {
    fn mode(&self) -> u8 {
        self.mode.load(Relaxed)
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    known_false: AtomicU64,
    non2xx: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    /// For discovery and the like.
    client: reqwest::Client,
    /// `Bearer ADMIN` for status, events, plans (None: a server without tokens).
    admin: Option<String>,
    /// `Bearer AGENT` per group, created on first use.
    agent_auth: tokio::sync::Mutex<HashMap<String, Option<String>>>,
    /// The agents' clients, one per `agents_per_client` agents.
    clients: Vec<reqwest::Client>,
    /// Heartbeats in flight per client, at most [`IDLE_PER_CLIENT`]: a client never opens a
    /// connection it will not keep, so a stall queues heartbeats here rather than making
    /// connections the pool then closes (their connects and closes cost the tool and the
    /// server more than the heartbeats did, and a stall became a collapse).
    hb_slots: Vec<tokio::sync::Semaphore>,
    per_client: usize,
    base: String,
    urls: agent::Urls,
    hb_timeout: Duration,
    permit_wait_ms: u64,
    /// Long-poll for permits whatever the heartbeat answers say (`--permits always`).
    permit_always: bool,
    measuring: AtomicBool,
    lat: Mutex<Vec<u32>>,
    /// Latencies of the current second, for --progress.
    sec: Mutex<Vec<u32>>,
    /// Counters inside the measured window, and over the whole run.
    win: Counters,
    all: Counters,
    retry: Duration,
    inflight: tokio::sync::Semaphore,
    polls_open: AtomicI64,
    poll_errors: AtomicU64,
    permits: AtomicU64,
    left: AtomicU64,
    /// Agents that left keeping their group's capacity (their permit said `decrement: false`:
    /// on AWS the Auto Scaling group would launch their replacement).
    kept_capacity: AtomicU64,
    first_permit_epoch_ms: AtomicU64,
    agents: Mutex<Vec<(Spec, Arc<Ctl>)>>,
    boot_rate: Option<f64>,
    boot_t0: Instant,
    ramp: Duration,
    /// Fleet mode: an agent whose heartbeat the server answers `known: false` stops (the
    /// server forgot its instance; a real agent would have been terminated).
    stop_when_unknown: bool,
    forgotten: AtomicU64,
    known: Mutex<HashSet<String>>,
    status: Mutex<Vec<(u32, usize, usize)>>,
    status_errors: AtomicU64,
    /// Healthy instances in the last status read by --follow-new.
    healthy_seen: AtomicU64,
    /// Every task and thread of the run.
    tasks: Tasks,
}

#[derive(Serialize, Default)]
struct Report {
    mode: Option<Mode>,
    agents: usize,
    groups: usize,
    interval_ms: u64,
    heartbeats_per_s_target: f64,
    window_s: f64,
    heartbeats_per_s: f64,
    heartbeats_sent: u64,
    heartbeats_ok: u64,
    known_false: u64,
    non2xx: u64,
    errors: u64,
    heartbeat_latency: Summary,
    status_latency: Summary,
    status_bytes: usize,
    status_instances: usize,
    status_errors: u64,
    permit_polls_open: i64,
    permit_poll_errors: u64,
    server_cpu_pct_mean: Option<f64>,
    server_cpu_pct_max: Option<f64>,
    server_rss_mib_end: Option<f64>,
    server_rss_mib_max: Option<f64>,
    server_hwm_mib: Option<f64>,
    server_threads: Option<u64>,
    server_fds: Option<u64>,
    sim_cpu_pct_mean: f64,
    sim_rss_mib: f64,
    permits: u64,
    left: u64,
    /// Of `left`: those whose permit kept their group's capacity (`decrement: false`).
    left_keeping_capacity: u64,
    forgotten: u64,
    started_epoch_ms: u64,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let fleet = Fleet::start(&args).await?;
    let result = match fleet.measure(&args).await {
        Ok(()) if args.linger => fleet.linger().await,
        r => r,
    };
    let left = fleet.shutdown().await;
    if !left.is_empty() {
        eprintln!(
            "warning: still running {SHUTDOWN_WITHIN:?} after the shutdown: {} tasks, threads {:?}",
            left.tasks, left.threads
        );
    }
    result
}

/// A run's agents and the tasks and threads around them: started, measured, shut down.
pub struct Fleet {
    sh: Arc<Shared>,
    samples: Arc<Mutex<Vec<Sample>>>,
    n_groups: usize,
    period: Duration,
    /// The first round and the boots are over (the wait for healthy instances starts).
    round_done: Instant,
    started_epoch_ms: u64,
    /// The control listener's address (`--control`; its port when asked for port 0).
    #[cfg_attr(not(test), allow(dead_code))]
    control: Option<SocketAddr>,
}

impl Fleet {
    /// Starts the agents (fleet mode: those of the instances the server lists), the faults, the
    /// control listener, the follower of launches, and the status and sampling threads.
    pub async fn start(args: &RunArgs) -> anyhow::Result<Fleet> {
        let (nofile, _) = procfs::raise_nofile();
        let base = args.server.trim_end_matches('/').to_string();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .build()?;
        let admin = crate::probes::admin_auth(args.token.clone(), args.data_dir.as_deref());
        let specs = match args.mode {
            Mode::Unknown => (0..args.instances)
                .map(|i| {
                    let g = i % args.groups.max(1);
                    Spec {
                        id: format!("x-{:06}", i + 1),
                        group: format!("s{g}/r{g}"),
                        generation: 1,
                        addr: drover_model::ids::loopback_addr(99, i as u64 + 1).to_string(),
                        components: default_components(g),
                        salt: mix(i as u64),
                        client: 0,
                    }
                })
                .collect::<Vec<_>>(),
            Mode::Fleet => {
                discover(
                    &client,
                    admin.as_deref(),
                    &base,
                    &HashSet::new(),
                    &mut BTreeMap::new(),
                )
                .await?
            }
        };
        if specs.is_empty() && !(args.follow_new && args.mode == Mode::Fleet) {
            bail!(
                "no instance to simulate (fleet mode: does GET {base}/v1/status list instances?)"
            );
        }
        let n = specs.len();
        // What can fail, before anything starts.
        let faults = args
            .fault
            .iter()
            .map(|f| parse_fault(f))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let listener = match args.control {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("control listener on {addr}"))?,
            ),
            None => None,
        };
        let control_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let permits_on = match args.permits {
            OnOff::On | OnOff::Always => true,
            OnOff::Off => false,
            OnOff::Auto => args.mode == Mode::Fleet,
        };
        if permits_on && nofile < n as u64 + 512 {
            eprintln!(
                "warning: open-file limit {nofile} is below {n} long-polls + margin; raise `ulimit -n`"
            );
        }
        let groups: HashSet<&str> = specs.iter().map(|s| s.group.as_str()).collect();
        let n_groups = groups.len();
        // + room for --follow-new
        let n_clients = n
            .max(args.wait_healthy.unwrap_or(0))
            .div_ceil(args.agents_per_client.max(1))
            .max(1)
            + 8;
        let sh = Arc::new(Shared {
            client: client.clone(),
            admin: admin.clone(),
            agent_auth: tokio::sync::Mutex::new(HashMap::new()),
            clients: (0..n_clients)
                .map(agent_client)
                .collect::<anyhow::Result<Vec<_>>>()?,
            hb_slots: (0..n_clients)
                .map(|_| tokio::sync::Semaphore::new(IDLE_PER_CLIENT))
                .collect(),
            per_client: args.agents_per_client.max(1),
            urls: agent::Urls::new(&base),
            base: base.clone(),
            hb_timeout: args.hb_timeout.0,
            permit_wait_ms: args.permit_wait_ms,
            permit_always: args.permits == OnOff::Always,
            measuring: AtomicBool::new(false),
            lat: Mutex::new(Vec::with_capacity(1 << 16)),
            sec: Mutex::new(Vec::new()),
            win: Counters::default(),
            all: Counters::default(),
            retry: args.retry.0,
            inflight: tokio::sync::Semaphore::new(args.max_inflight.max(1)),
            polls_open: AtomicI64::new(0),
            poll_errors: AtomicU64::new(0),
            permits: AtomicU64::new(0),
            left: AtomicU64::new(0),
            kept_capacity: AtomicU64::new(0),
            first_permit_epoch_ms: AtomicU64::new(0),
            agents: Mutex::new(Vec::new()),
            boot_rate: args.boot_rate.filter(|r| *r > 0.0),
            boot_t0: Instant::now() + Duration::from_millis(200),
            ramp: args
                .ramp
                .map(|r| r.0)
                .unwrap_or(args.interval.0.max(Duration::from_millis(10))),
            stop_when_unknown: args.mode == Mode::Fleet,
            forgotten: AtomicU64::new(0),
            known: Mutex::new(specs.iter().map(|s| s.id.clone()).collect()),
            status: Mutex::new(Vec::new()),
            status_errors: AtomicU64::new(0),
            healthy_seen: AtomicU64::new(0),
            tasks: Tasks::default(),
        });
        let period = args.interval.0.max(Duration::from_millis(10));
        let ramp = sh.ramp;
        // Booting agents turn healthy at boot_rate after the first round; measure after that.
        let boot = sh
            .boot_rate
            .map(|r| Duration::from_secs_f64(n as f64 / r))
            .unwrap_or_default();
        let t0 = sh.boot_t0;
        let started_epoch_ms = epoch_ms() + 200;
        for (i, spec) in specs.into_iter().enumerate() {
            let f = i as f64 / n as f64;
            start_agent(
                &sh,
                spec,
                t0 + ramp.mul_f64(f),
                t0 + ramp + period.mul_f64(f),
                period,
                permits_on,
            );
        }
        eprintln!(
            "{n} agents in {n_groups} groups, one heartbeat each per {} ({:.0}/s), permits {}; first round over {:?}, booting {:?}, warm-up {}, window {}",
            args.interval,
            n as f64 / period.as_secs_f64(),
            match (permits_on, args.permits == OnOff::Always) {
                (false, _) => "off",
                (true, false) => "long-polled while the server hints leave_soon",
                (true, true) => "long-polled all the time",
            },
            ramp,
            boot,
            args.warmup,
            args.duration
        );

        // Faults on a schedule, and on command.
        for (at, kind, count) in faults {
            let sh2 = sh.clone();
            sh.tasks.spawn(async move {
                tokio::time::sleep_until(t0 + at).await;
                let done = inject(&sh2, &kind, count);
                eprintln!("fault at +{:.1}s: {kind} {done}", at.as_secs_f64());
            });
        }
        if let Some(listener) = listener {
            sh.tasks.spawn(control(listener, sh.clone()));
        }
        if args.follow_new && args.mode == Mode::Fleet {
            sh.tasks
                .spawn(follow_launches(sh.clone(), period, permits_on));
        }

        let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
        if let Err(e) = start_threads(&sh, args, &samples) {
            sh.tasks.shutdown().await;
            return Err(anyhow::Error::from(e).context("start a thread"));
        }
        Ok(Fleet {
            sh,
            samples,
            n_groups,
            period,
            round_done: t0 + ramp + boot,
            started_epoch_ms,
            control: control_addr,
        })
    }

    /// Waits for the first round (and --wait-healthy), the warm-up and the window, then prints
    /// the report (and writes it, --json).
    pub async fn measure(&self, args: &RunArgs) -> anyhow::Result<()> {
        let (sh, n_groups, period) = (&self.sh, self.n_groups, self.period);
        tokio::time::sleep_until(self.round_done).await;
        if let Some(want) = args.wait_healthy {
            let since = Instant::now();
            loop {
                let healthy = async {
                    let s: drover_model::api::FleetStatus = with_auth(
                        sh.client
                            .get(format!("{}/v1/status?instances=none", sh.base)),
                        sh.admin.as_deref(),
                    )
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await?
                    .json()
                    .await?;
                    Ok::<usize, reqwest::Error>(s.groups.iter().map(|g| g.healthy as usize).sum())
                }
                .await
                .unwrap_or(0);
                sh.healthy_seen.store(healthy as u64, Relaxed);
                if healthy >= want {
                    break;
                }
                tokio::time::sleep(args.follow_every.0).await;
            }
            eprintln!(
                "{want} instances healthy after {:.1} s more; warm-up {}",
                since.elapsed().as_secs_f64(),
                args.warmup
            );
        }
        tokio::time::sleep(args.warmup.0).await;
        let me = std::process::id();
        let spid = ServerPid(args.server_pid, args.server_pid_file.clone());
        let cpu0 = (
            procfs::cpu_ticks(me),
            spid.get().and_then(procfs::cpu_ticks),
        );
        let w0 = Instant::now();
        sh.measuring.store(true, Relaxed);
        tokio::time::sleep(args.duration.0).await;
        sh.measuring.store(false, Relaxed);
        let window = w0.elapsed().as_secs_f64();
        let cpu1 = (
            procfs::cpu_ticks(me),
            spid.get().and_then(procfs::cpu_ticks),
        );
        let tck = procfs::clk_tck() as f64;
        let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / tck / window * 100.0),
            _ => None,
        };

        let lat = std::mem::take(&mut *sh.lat.lock().unwrap());
        let status = std::mem::take(&mut *sh.status.lock().unwrap());
        let samples = self.samples.lock().unwrap().clone();
        let in_win: Vec<&Sample> = samples.iter().filter(|s| s.measuring).collect();
        let mib = |k: u64| k as f64 / 1024.0;
        let (agents_now, groups_now) = {
            let a = sh.agents.lock().unwrap();
            let g: HashSet<&str> = a.iter().map(|(s, _)| s.group.as_str()).collect();
            (a.len(), g.len())
        };
        let report = Report {
            mode: Some(args.mode),
            agents: agents_now,
            groups: groups_now.max(n_groups),
            interval_ms: period.as_millis() as u64,
            heartbeats_per_s_target: agents_now as f64 / period.as_secs_f64(),
            window_s: window,
            heartbeats_per_s: sh.win.sent.load(Relaxed) as f64 / window,
            heartbeats_sent: sh.win.sent.load(Relaxed),
            heartbeats_ok: sh.win.ok.load(Relaxed),
            known_false: sh.win.known_false.load(Relaxed),
            non2xx: sh.win.non2xx.load(Relaxed),
            errors: sh.win.errors.load(Relaxed),
            heartbeat_latency: summarize(lat),
            status_bytes: status.last().map(|s| s.1).unwrap_or(0),
            status_instances: status.last().map(|s| s.2).unwrap_or(0),
            status_latency: summarize(status.iter().map(|s| s.0).collect()),
            status_errors: sh.status_errors.load(Relaxed),
            permit_polls_open: sh.polls_open.load(Relaxed),
            permit_poll_errors: sh.poll_errors.load(Relaxed),
            server_cpu_pct_mean: pct(cpu0.1, cpu1.1),
            server_cpu_pct_max: in_win
                .iter()
                .filter_map(|s| s.server_cpu_pct)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
            server_rss_mib_end: in_win.last().and_then(|s| s.server_rss_kib).map(mib),
            server_rss_mib_max: in_win
                .iter()
                .filter_map(|s| s.server_rss_kib)
                .max()
                .map(mib),
            server_hwm_mib: in_win.last().and_then(|s| s.server_hwm_kib).map(mib),
            server_threads: in_win.last().and_then(|s| s.server_threads),
            server_fds: in_win.last().and_then(|s| s.server_fds),
            sim_cpu_pct_mean: pct(cpu0.0, cpu1.0).unwrap_or(0.0),
            sim_rss_mib: procfs::mem_kib(me).map(|m| mib(m.0)).unwrap_or(0.0),
            permits: sh.permits.load(Relaxed),
            left: sh.left.load(Relaxed),
            left_keeping_capacity: sh.kept_capacity.load(Relaxed),
            forgotten: sh.forgotten.load(Relaxed),
            started_epoch_ms: self.started_epoch_ms,
        };
        print_report(&report);
        if let Some(p) = &args.json {
            std::fs::write(p, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("write {}", p.display()))?;
        }
        Ok(())
    }

    /// --linger: the agents keep reporting until SIGINT or SIGTERM.
    async fn linger(&self) -> anyhow::Result<()> {
        let sh = &self.sh;
        eprintln!("lingering: agents keep reporting until SIGINT/SIGTERM");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!(
            "stopping: {} heartbeats sent in all ({} errors), {} permits received, {} agents left, {} forgotten by the server",
            sh.all.sent.load(Relaxed),
            sh.all.errors.load(Relaxed),
            sh.permits.load(Relaxed),
            sh.left.load(Relaxed),
            sh.forgotten.load(Relaxed)
        );
        Ok(())
    }

    /// Stops every task and thread of the run (see [`Tasks::shutdown`]).
    pub async fn shutdown(&self) -> Left {
        self.sh.tasks.shutdown().await
    }
}

/// The status timings' thread (--status-every) and the sampling thread.
fn start_threads(
    sh: &Arc<Shared>,
    args: &RunArgs,
    samples: &Arc<Mutex<Vec<Sample>>>,
) -> std::io::Result<()> {
    // Status timings from their own thread and runtime, so a multi-megabyte body does not
    // delay the agents' clocks.
    if !args.status_every.0.is_zero() {
        let sh2 = sh.clone();
        let every = args.status_every.0;
        let query = args.status_query.clone();
        sh.tasks.thread("status", move |stop| {
            status_thread(sh2, every, &query, stop)
        })?;
    }
    // Server and self sampling, once a second. Its own thread: reading /proc of a busy server
    // can block (and must not stop the agents' clocks).
    let samples = samples.clone();
    let pids = ServerPid(args.server_pid, args.server_pid_file.clone());
    let sh2 = sh.clone();
    let progress = args.progress;
    sh.tasks.thread("sampler", move |stop| {
        let sh = sh2;
        let (mut sent0, mut err0) = (0, 0);
        let begin = std::time::Instant::now();
        let mut next = begin;
        loop {
            next += Duration::from_secs(1);
            let wait = next.saturating_duration_since(std::time::Instant::now());
            if crate::tasks::sleep(&stop, wait) {
                return;
            }
            let s = Sample::take(pids.get(), sh.measuring.load(Relaxed));
            let sec = summarize(std::mem::take(&mut *sh.sec.lock().unwrap()));
            if progress {
                let (sent, err) = (sh.all.sent.load(Relaxed), sh.all.errors.load(Relaxed));
                eprintln!(
                    "+{:>4.0}s hb {:>5}/s err {:>4} p50 {:>7.2} p99 {:>8.2} max {:>8.2} ms | polls {:>5} permits {:>4} left {:>4} | server cpu {:>5.1}% rss {:>6.1} MiB",
                    begin.elapsed().as_secs_f64(),
                    sent - sent0,
                    err - err0,
                    sec.p50_ms,
                    sec.p99_ms,
                    sec.max_ms,
                    sh.polls_open.load(Relaxed),
                    sh.permits.load(Relaxed),
                    sh.left.load(Relaxed),
                    s.server_cpu_pct.unwrap_or(0.0),
                    s.server_rss_kib.unwrap_or(0) as f64 / 1024.0
                );
                (sent0, err0) = (sent, err);
            }
            samples.lock().unwrap().push(s);
        }
    })
}

/// The server's pid: given, or read from a file (a restarted server writes a new one).
#[derive(Clone)]
struct ServerPid(Option<u32>, Option<PathBuf>);

impl ServerPid {
    fn get(&self) -> Option<u32> {
        self.0.or_else(|| {
            std::fs::read_to_string(self.1.as_ref()?)
                .ok()?
                .trim()
                .parse()
                .ok()
        })
    }
}

#[derive(Clone, Debug)]
struct Sample {
    measuring: bool,
    server_cpu_pct: Option<f64>,
    server_rss_kib: Option<u64>,
    server_hwm_kib: Option<u64>,
    server_threads: Option<u64>,
    server_fds: Option<u64>,
}

impl Sample {
    fn take(pid: Option<u32>, measuring: bool) -> Sample {
        use std::sync::OnceLock;
        static LAST: OnceLock<Mutex<Option<(std::time::Instant, u64, u32)>>> = OnceLock::new();
        let last = LAST.get_or_init(|| Mutex::new(None));
        let Some(pid) = pid else {
            return Sample {
                measuring,
                server_cpu_pct: None,
                server_rss_kib: None,
                server_hwm_kib: None,
                server_threads: None,
                server_fds: None,
            };
        };
        let now = std::time::Instant::now();
        let ticks = procfs::cpu_ticks(pid);
        let mut l = last.lock().unwrap();
        let cpu = match (*l, ticks) {
            (Some((t, a, p)), Some(b)) if p == pid => {
                let dt = now.duration_since(t).as_secs_f64();
                Some(b.saturating_sub(a) as f64 / procfs::clk_tck() as f64 / dt * 100.0)
            }
            _ => None,
        };
        *l = ticks.map(|t| (now, t, pid));
        let mem = procfs::mem_kib(pid);
        let (threads, fds) = procfs::threads_fds(pid);
        Sample {
            measuring,
            server_cpu_pct: cpu,
            server_rss_kib: mem.map(|m| m.0),
            server_hwm_kib: mem.map(|m| m.1),
            server_threads: Some(threads),
            server_fds: Some(fds),
        }
    }
}

fn print_report(r: &Report) {
    let l = &r.heartbeat_latency;
    let s = &r.status_latency;
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
    eprintln!(
        "heartbeats: {} agents (at the end), {:.0}/s sent (target {:.0}/s) over {:.0} s; ok {} (known=false {}), non-2xx {}, errors {}",
        r.agents, r.heartbeats_per_s, r.heartbeats_per_s_target, r.window_s, r.heartbeats_ok, r.known_false, r.non2xx, r.errors
    );
    eprintln!(
        "heartbeat latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (n={})",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
    );
    eprintln!(
        "status latency ms: p50 {:.1}  max {:.1}  (n={}, {} bytes, {} instances, {} errors)",
        s.p50_ms, s.max_ms, s.count, r.status_bytes, r.status_instances, r.status_errors
    );
    eprintln!(
        "server: CPU {}% mean, {}% max (of one core); RSS {} MiB end, {} MiB max; threads {:?}, fds {:?}",
        opt(r.server_cpu_pct_mean),
        opt(r.server_cpu_pct_max),
        opt(r.server_rss_mib_end),
        opt(r.server_rss_mib_max),
        r.server_threads,
        r.server_fds
    );
    eprintln!(
        "load tool: CPU {:.1}% mean, RSS {:.1} MiB; permit long-polls open {}, poll errors {}, permits {}, left {} ({} keeping capacity), forgotten {}",
        r.sim_cpu_pct_mean, r.sim_rss_mib, r.permit_polls_open, r.permit_poll_errors, r.permits, r.left, r.left_keeping_capacity, r.forgotten
    );
}

/// An agent whose first heartbeat goes at `first`, then every `period` from `periodic`.
fn start_agent(
    sh: &Arc<Shared>,
    mut spec: Spec,
    first: Instant,
    periodic: Instant,
    period: Duration,
    permits: bool,
) {
    let mut agents = sh.agents.lock().unwrap();
    spec.client = (agents.len() / sh.per_client).min(sh.clients.len() - 1);
    let healthy_at = sh.boot_rate.map(|r| {
        (sh.boot_t0 + sh.ramp + Duration::from_secs_f64(agents.len() as f64 / r))
            .max(Instant::now())
    });
    let ctl = Arc::new(Ctl {
        mode: AtomicU8::new(NORMAL),
        seq: AtomicU64::new(0),
        wake: Notify::new(),
        poll_permit: tokio::sync::watch::Sender::new(sh.permit_always),
        healthy_at,
        stop: sh.tasks.child(),
    });
    agents.push((spec.clone(), ctl.clone()));
    drop(agents);
    if let Some(at) = healthy_at {
        // Report the turn to healthy at once, as a real agent does on a state change.
        let ctl2 = ctl.clone();
        sh.tasks.spawn_until(ctl.stop.clone(), async move {
            tokio::time::sleep_until(at).await;
            ctl2.wake.notify_one();
        });
    }
    let spec = Arc::new(spec);
    {
        let (sh2, spec, ctl2) = (sh.clone(), spec.clone(), ctl.clone());
        sh.tasks.spawn_until(
            ctl.stop.clone(),
            heartbeat_loop(sh2, spec, ctl2, first, periodic, period),
        );
    }
    if permits {
        let (sh2, spec, ctl2) = (sh.clone(), spec.clone(), ctl.clone());
        sh.tasks.spawn_until(ctl.stop.clone(), async move {
            tokio::time::sleep_until(first).await;
            permit_loop(sh2, spec, ctl2).await
        });
    }
}

async fn heartbeat_loop(
    sh: Arc<Shared>,
    spec: Arc<Spec>,
    ctl: Arc<Ctl>,
    first: Instant,
    periodic: Instant,
    period: Duration,
) {
    tokio::time::sleep_until(first).await;
    let auth = agent_auth(&sh, &spec.group).await;
    let mut ok = send_heartbeat(&sh, &spec, &ctl, auth.as_deref()).await;
    let mut tick = tokio::time::interval_at(periodic.max(Instant::now()), period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let retry_at = Instant::now() + sh.retry;
        tokio::select! {
            _ = tick.tick() => {}
            _ = ctl.wake.notified() => {}
            _ = tokio::time::sleep_until(retry_at), if !ok => {}
        }
        match ctl.mode() {
            SILENT => continue,
            CRASHED | GONE => return,
            _ => {}
        }
        ok = send_heartbeat(&sh, &spec, &ctl, auth.as_deref()).await;
        if ok && sh.stop_when_unknown && ctl.mode.load(Relaxed) == FORGOTTEN {
            return;
        }
    }
}

fn build(spec: &Spec, ctl: &Ctl) -> Heartbeat {
    let instance = agent::Instance {
        id: &spec.id,
        group: &spec.group,
        generation: spec.generation,
        addr: &spec.addr,
    };
    let mode = ctl.mode();
    let seq = ctl.seq.fetch_add(1, Relaxed) + 1;
    let booting = ctl.healthy_at.is_some_and(|at| Instant::now() < at);
    let phase = match mode {
        DRAINING => AgentPhase::Draining,
        STOPPING | GONE => AgentPhase::Stopping,
        _ if booting => AgentPhase::Booting,
        _ => AgentPhase::Running,
    };
    let components = spec
        .components
        .iter()
        .enumerate()
        .map(|(i, (name, version))| {
            let (state, message, pid) = match mode {
                FAILING if i == 0 => (
                    ComponentState::Unhealthy,
                    Some(
                        "health check failed: GET /healthz: connection refused (simulated)"
                            .to_string(),
                    ),
                    Some(10_000 + (spec.salt % 50_000) as u32 + i as u32),
                ),
                STOPPING | GONE => (ComponentState::Stopped, None, None),
                _ if booting => (
                    ComponentState::Starting,
                    None,
                    Some(10_000 + (spec.salt % 50_000) as u32 + i as u32),
                ),
                _ => (
                    ComponentState::Healthy,
                    None,
                    Some(10_000 + (spec.salt % 50_000) as u32 + i as u32),
                ),
            };
            ComponentReport {
                pid,
                message,
                ..agent::component(name, version, state)
            }
        })
        .collect();
    let jitter = ((spec.salt ^ seq.wrapping_mul(0x9E37_79B9)) % 1000) as f64 / 1000.0;
    Heartbeat {
        utilization: Utilization {
            cpu: 0.05 + 0.5 * jitter,
            memory_bytes: (40 + spec.salt % 200) * 1024 * 1024,
            agent_rss_bytes: 7 * 1024 * 1024 + (spec.salt % 512) * 1024,
            ..Default::default()
        },
        ..agent::heartbeat(instance, phase, seq, components)
    }
}

/// Send one heartbeat; false when it was not delivered (connection error or timeout).
async fn send_heartbeat(sh: &Shared, spec: &Spec, ctl: &Ctl, auth: Option<&str>) -> bool {
    let hb = build(spec, ctl);
    let measuring = sh.measuring.load(Relaxed);
    let t = std::time::Instant::now();
    let _slot = sh.inflight.acquire().await;
    let _conn = sh.hb_slots[spec.client].acquire().await;
    let r =
        agent::send_heartbeat(&sh.clients[spec.client], &sh.urls, auth, &hb, sh.hb_timeout).await;
    // Ok(known), Err(answered: a non-2xx)
    let result = match r {
        Ok(reply) => {
            let poll = sh.permit_always
                || reply
                    .as_ref()
                    .is_none_or(drover_model::api::HeartbeatReply::wants_permit_poll);
            ctl.poll_permit
                .send_if_modified(|p| std::mem::replace(p, poll) != poll);
            Ok(reply.is_some_and(|r| r.known))
        }
        Err(e) => Err(e.answered()),
    };
    let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
    if result == Ok(false) && sh.stop_when_unknown && ctl.mode() == NORMAL {
        ctl.mode.store(FORGOTTEN, Relaxed);
        sh.forgotten.fetch_add(1, Relaxed);
    }
    let count = |c: &Counters| {
        c.sent.fetch_add(1, Relaxed);
        match result {
            Ok(known) => {
                c.ok.fetch_add(1, Relaxed);
                if !known {
                    c.known_false.fetch_add(1, Relaxed);
                }
            }
            Err(true) => {
                c.non2xx.fetch_add(1, Relaxed);
            }
            Err(false) => {
                c.errors.fetch_add(1, Relaxed);
            }
        }
    };
    count(&sh.all);
    if !matches!(result, Err(false)) {
        sh.sec.lock().unwrap().push(us);
    }
    if measuring {
        count(&sh.win);
        if !matches!(result, Err(false)) {
            sh.lat.lock().unwrap().push(us);
        }
    }
    !matches!(result, Err(false))
}

async fn permit_loop(sh: Arc<Shared>, spec: Arc<Spec>, ctl: Arc<Ctl>) {
    let auth = agent_auth(&sh, &spec.group).await;
    let mut hint = ctl.poll_permit.subscribe();
    loop {
        match ctl.mode() {
            SILENT => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            CRASHED | GONE | DRAINING | STOPPING | FORGOTTEN => return,
            _ => {}
        }
        if !*hint.borrow_and_update() {
            // No permit expected: no long-poll. Look at the mode again now and then.
            tokio::select! {
                _ = hint.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let started = Instant::now();
        sh.polls_open.fetch_add(1, Relaxed);
        let poll = agent::poll_permit(
            &sh.clients[spec.client],
            &sh.urls,
            auth.as_deref(),
            &spec.id,
            sh.permit_wait_ms,
        );
        // The hint going away closes the long-poll (as the real agent does).
        let answer = tokio::select! {
            a = poll => Some(a),
            _ = hint.wait_for(|p| !*p) => None,
        };
        sh.polls_open.fetch_sub(1, Relaxed);
        let Some(answer) = answer else { continue };
        match answer {
            Ok(p) if p.permit => {
                if matches!(ctl.mode(), CRASHED | SILENT) {
                    return;
                }
                // What the real agent on AWS does with `decrement` (an older server: its
                // boot document's `decrement_on_leave`, which it always set).
                let decrement = p.decrement.unwrap_or(true);
                leave(
                    &sh,
                    &spec,
                    &ctl,
                    p.drain_timeout_ms,
                    decrement,
                    auth.as_deref(),
                )
                .await;
                return;
            }
            Ok(_) => {
                let spent = started.elapsed();
                if spent < Duration::from_millis(50) {
                    tokio::time::sleep(Duration::from_millis(50) - spent).await;
                }
            }
            Err(_) => {
                sh.poll_errors.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// On a permit: report draining, wait for the balancer's connections to reach 0 (at most the
/// drain timeout), report stopping, stop, and end the instance (`POST /v1/agent/exit`).
/// `decrement` is the permit's word on the group's capacity: the sim provider has none, so it
/// is counted and printed (`PERMIT ID EPOCH_MS decrement=BOOL`), not acted on.
async fn leave(
    sh: &Shared,
    spec: &Spec,
    ctl: &Ctl,
    drain_timeout_ms: u64,
    decrement: bool,
    auth: Option<&str>,
) {
    let now = epoch_ms();
    let _ = sh
        .first_permit_epoch_ms
        .compare_exchange(0, now, Relaxed, Relaxed);
    sh.permits.fetch_add(1, Relaxed);
    println!("PERMIT {} {} decrement={decrement}", spec.id, now);
    ctl.mode.store(DRAINING, Relaxed);
    send_heartbeat(sh, spec, ctl, auth).await;
    let deadline = Instant::now() + Duration::from_millis(drain_timeout_ms);
    while Instant::now() < deadline {
        let open = agent::open_connections(
            &sh.clients[spec.client],
            &sh.urls,
            auth,
            &spec.id,
            Duration::from_secs(1),
        )
        .await;
        if open.is_ok_and(|n| n == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ctl.mode.store(STOPPING, Relaxed);
    send_heartbeat(sh, spec, ctl, auth).await;
    ctl.mode.store(GONE, Relaxed);
    ctl.wake.notify_one();
    end_instance(sh, spec, "left on its permit").await;
    sh.left.fetch_add(1, Relaxed);
    if !decrement {
        sh.kept_capacity.fetch_add(1, Relaxed);
    }
}

/// Tell the server the instance ended (`POST /v1/agent/exit`: what a process exit is to the
/// `local` provider; the instances of a `sim` region have no process).
async fn end_instance(sh: &Shared, spec: &Spec, status: &str) {
    let auth = agent_auth(sh, &spec.group).await;
    let r = agent::report_exit(
        &sh.clients[spec.client],
        &sh.urls,
        auth.as_deref(),
        &spec.id,
        status,
        Duration::from_secs(10),
    )
    .await;
    match r {
        Ok(_) => {}
        Err(agent::ApiError::Refused { status, .. }) => {
            eprintln!("exit of {}: POST /v1/agent/exit answered {status}", spec.id)
        }
        Err(e) => eprintln!("exit of {}: {e}", spec.id),
    }
}

/// Add `Authorization: Bearer ...` when there is a token.
pub fn with_auth(rb: reqwest::RequestBuilder, auth: Option<&str>) -> reqwest::RequestBuilder {
    match auth {
        Some(a) => rb.header(reqwest::header::AUTHORIZATION, a),
        None => rb,
    }
}

/// The `Authorization` value of `group`'s agents: an agent token created once per group with
/// the admin token (`POST /v1/tokens`). None when the server has no tokens (404) or there is
/// no admin token.
async fn agent_auth(sh: &Shared, group: &str) -> Option<String> {
    let mut map = sh.agent_auth.lock().await;
    if let Some(a) = map.get(group) {
        return a.clone();
    }
    let made = async {
        let resp = with_auth(
            sh.client.post(format!("{}/v1/tokens", sh.base)),
            sh.admin.as_deref(),
        )
        .json(&serde_json::json!({"scope": "agent", "group": group, "name": "drover-fleetsim"}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .ok()?;
        if !resp.status().is_success() {
            eprintln!(
                "no agent token for {group}: POST /v1/tokens answered {}",
                resp.status()
            );
            return None;
        }
        let v: Value = resp.json().await.ok()?;
        Some(format!("Bearer {}", v["token"].as_str()?))
    }
    .await;
    map.insert(group.to_string(), made.clone());
    made
}

/// Idle connections an agent client keeps. In steady state a client's 500 agents have about
/// one heartbeat in flight; unbounded, every stall left its burst of new connections open
/// (16,384 at 50,000 agents: the server's connection cap, and 400 MiB of its memory), and
/// the next stall found fewer free connections still.
const IDLE_PER_CLIENT: usize = 32;

/// The `i`-th agent client: its own pool, from its own loopback source address.
fn agent_client(i: usize) -> anyhow::Result<reqwest::Client> {
    let src = std::net::Ipv4Addr::new(127, 0, (1 + i / 240) as u8, (10 + i % 240) as u8);
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(IDLE_PER_CLIENT)
        .pool_idle_timeout(Duration::from_secs(90))
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .local_address(std::net::IpAddr::V4(src))
        .build()?)
}

fn parse_fault(s: &str) -> anyhow::Result<(Duration, String, usize)> {
    let parts: Vec<&str> = s.split(':').collect();
    let [at, kind, count] = parts.as_slice() else {
        bail!("fault {s:?}: want AT:KIND:COUNT, e.g. 30s:fail:10");
    };
    let at: drover_model::Dur = at
        .parse()
        .map_err(|e| anyhow::anyhow!("fault {s:?}: {e}"))?;
    if !["fail", "heal", "silent", "crash"].contains(kind) {
        bail!("fault {s:?}: KIND is one of fail, heal, silent, crash");
    }
    Ok((at.0, kind.to_string(), count.parse()?))
}

/// Put `count` agents in a fault mode (spread over the fleet); returns what was done. A crashed
/// agent's instance ends (`POST /v1/agent/exit`, from a task of its own).
fn inject(sh: &Arc<Shared>, kind: &str, count: usize) -> String {
    let agents = sh.agents.lock().unwrap();
    let (from, to) = match kind {
        "fail" => (NORMAL, FAILING),
        "heal" => (FAILING, NORMAL),
        "silent" => (NORMAL, SILENT),
        "crash" => (NORMAL, CRASHED),
        _ => return format!("unknown fault {kind}"),
    };
    let candidates: Vec<&(Spec, Arc<Ctl>)> =
        agents.iter().filter(|(_, c)| c.mode() == from).collect();
    let step = (candidates.len() / count.max(1)).max(1);
    let mut ids = Vec::new();
    for (s, c) in candidates.into_iter().step_by(step).take(count) {
        c.mode.store(to, Relaxed);
        c.wake.notify_one();
        if to == CRASHED {
            let (sh2, spec) = (sh.clone(), s.clone());
            sh.tasks
                .spawn(async move { end_instance(&sh2, &spec, "crashed (simulated)").await });
        }
        ids.push(s.id.clone());
    }
    let shown: Vec<&String> = ids.iter().take(5).collect();
    format!(
        "{} agents ({shown:?}{})",
        ids.len(),
        if ids.len() > 5 { ", ..." } else { "" }
    )
}

async fn control(listener: tokio::net::TcpListener, sh: Arc<Shared>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let sh2 = sh.clone();
        sh.tasks.spawn(async move {
            let sh = sh2;
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut it = line.split_whitespace();
                let reply = match (it.next(), it.next().and_then(|n| n.parse().ok())) {
                    (Some("stats"), _) => format!(
                        "sent {} ok {} errors {} permits {} left {} polls_open {}",
                        sh.all.sent.load(Relaxed),
                        sh.all.ok.load(Relaxed),
                        sh.all.errors.load(Relaxed),
                        sh.permits.load(Relaxed),
                        sh.left.load(Relaxed),
                        sh.polls_open.load(Relaxed)
                    ),
                    (Some(kind), Some(n)) => inject(&sh, kind, n),
                    _ => "commands: fail N | heal N | silent N | crash N | stats".into(),
                };
                if w.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn status_thread(sh: Arc<Shared>, every: Duration, query: &str, stop: CancellationToken) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return,
    };
    let run = async move {
        let client = reqwest::Client::new();
        let url = match query {
            "" => format!("{}/v1/status", sh.base),
            q => format!("{}/v1/status?{q}", sh.base),
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let t = std::time::Instant::now();
            let r = async {
                let resp = with_auth(client.get(&url), sh.admin.as_deref())
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await?;
                resp.error_for_status()?.bytes().await
            }
            .await;
            let us = t.elapsed().as_micros() as u32;
            match r {
                Ok(body) if sh.measuring.load(Relaxed) => {
                    let instances = count_substr(&body, b"\"launched_at_ms\"");
                    sh.status.lock().unwrap().push((us, body.len(), instances));
                }
                Ok(_) => {}
                Err(_) => {
                    sh.status_errors.fetch_add(1, Relaxed);
                }
            }
        }
    };
    rt.block_on(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = run => {}
        }
    });
}

pub fn count_substr(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fn default_components(k: usize) -> Vec<(String, String)> {
    ["app", "sidecar", "logship"]
        .iter()
        .take(k % 3 + 1)
        .map(|c| (c.to_string(), "v1".to_string()))
        .collect()
}

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Start an agent for every instance the server launches, as its `launched` event arrives
/// (the event stream, reconnecting after a server restart).
async fn follow_launches(sh: Arc<Shared>, period: Duration, permits_on: bool) {
    let mut plans: BTreeMap<(String, u64), Vec<(String, String)>> = BTreeMap::new();
    let mut after = 0u64;
    loop {
        let resp = with_auth(
            sh.client.get(format!("{}/v1/events", sh.base)),
            sh.admin.as_deref(),
        )
        .query(&[
            ("follow", "true"),
            ("kind", "launched"),
            ("after", after.to_string().as_str()),
        ])
        .send()
        .await;
        if let Ok(mut resp) = resp {
            let mut buf: Vec<u8> = Vec::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    after = after.max(ev["seq"].as_u64().unwrap_or(0));
                    let (Some(id), Some(group), Some(msg)) = (
                        ev["instance"].as_str(),
                        ev["group"].as_str(),
                        ev["message"].as_str(),
                    ) else {
                        continue; // a failed launch names no instance
                    };
                    // "launched at ADDR on generation G (versions) [provider id]"
                    let Some(rest) = msg.strip_prefix("launched at ") else {
                        continue;
                    };
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let generation = rest
                        .split("generation ")
                        .nth(1)
                        .and_then(|g| g.split_whitespace().next())
                        .and_then(|g| g.parse::<u64>().ok())
                        .unwrap_or(1);
                    if !sh.known.lock().unwrap().insert(id.to_string()) {
                        continue;
                    }
                    let key = (group.to_string(), generation);
                    if !plans.contains_key(&key) {
                        let comps = plan_components(
                            &sh.client,
                            sh.admin.as_deref(),
                            &sh.base,
                            group,
                            generation,
                        )
                        .await;
                        plans.insert(key.clone(), comps);
                    }
                    let seqno: u64 = id.trim_start_matches("i-").parse().unwrap_or(0);
                    let spec = Spec {
                        id: id.to_string(),
                        group: group.to_string(),
                        generation,
                        addr,
                        components: plans[&key].clone(),
                        salt: mix(seqno),
                        client: 0,
                    };
                    // A new instance reports at once (spread over 200 ms), then every period.
                    let first = Instant::now() + Duration::from_millis(spec.salt % 200);
                    start_agent(&sh, spec, first, first + period, period, permits_on);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn plan_components(
    client: &reqwest::Client,
    admin: Option<&str>,
    base: &str,
    group: &str,
    generation: u64,
) -> Vec<(String, String)> {
    let (svc, region) = group.split_once('/').unwrap_or((group, ""));
    let plan: Option<Value> = async {
        with_auth(
            client.get(format!("{base}/v1/plans/{svc}/{region}/{generation}")),
            admin,
        )
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
    }
    .await;
    plan.and_then(|p| {
        p["components"].as_array().map(|cs| {
            cs.iter()
                .map(|c| {
                    (
                        c["name"].as_str().unwrap_or("app").to_string(),
                        c["version"].as_str().unwrap_or("v1").to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
    })
    .unwrap_or_else(|| default_components(0))
}

/// Instances listed by `GET /v1/status` that are not in `known` and not leaving, with their
/// plan's components (`GET /v1/plans/...`, cached in `plans`).
async fn discover(
    client: &reqwest::Client,
    admin: Option<&str>,
    base: &str,
    known: &HashSet<String>,
    plans: &mut BTreeMap<(String, u64), Vec<(String, String)>>,
) -> anyhow::Result<Vec<Spec>> {
    discover_counting(client, admin, base, known, plans, &AtomicU64::new(0)).await
}

/// [`discover`], also storing how many instances the status calls healthy.
async fn discover_counting(
    client: &reqwest::Client,
    admin: Option<&str>,
    base: &str,
    known: &HashSet<String>,
    plans: &mut BTreeMap<(String, u64), Vec<(String, String)>>,
    healthy: &AtomicU64,
) -> anyhow::Result<Vec<Spec>> {
    let status: Value = with_auth(client.get(format!("{base}/v1/status")), admin)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .with_context(|| format!("GET {base}/v1/status"))?
        .error_for_status()?
        .json()
        .await?;
    let mut out = Vec::new();
    let n_healthy = status["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["instances"].as_array().into_iter().flatten())
        .filter(|i| i["state"] == "healthy")
        .count();
    healthy.store(n_healthy as u64, Relaxed);
    for g in status["groups"].as_array().into_iter().flatten() {
        for i in g["instances"].as_array().into_iter().flatten() {
            let id = i["id"].as_str().unwrap_or_default().to_string();
            let state = i["state"].as_str().unwrap_or_default();
            if id.is_empty() || known.contains(&id) || state == "draining" || state == "terminating"
            {
                continue;
            }
            let group = i["group"].as_str().unwrap_or_default().to_string();
            let generation = i["generation"].as_u64().unwrap_or(1);
            let key = (group.clone(), generation);
            if !plans.contains_key(&key) {
                let comps = plan_components(client, admin, base, &group, generation).await;
                plans.insert(key.clone(), comps);
            }
            let seqno: u64 = id.trim_start_matches("i-").parse().unwrap_or(0);
            out.push(Spec {
                components: plans[&key].clone(),
                id,
                group,
                generation,
                addr: i["addr"].as_str().unwrap_or_default().to_string(),
                salt: mix(seqno),
                client: 0,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        let (at, kind, n) = parse_fault("30s:fail:10").unwrap();
        assert_eq!(
            (at, kind.as_str(), n),
            (Duration::from_secs(30), "fail", 10)
        );
        assert!(parse_fault("30s:explode:1").is_err());
        assert!(parse_fault("30s:fail").is_err());
    }

    #[test]
    fn counts_instances_in_a_status_body() {
        let body = br#"{"state":"healthy","launched_at_ms":1},{"state":"healthy"},{"state":"healthy","launched_at_ms":2}"#;
        assert_eq!(
            count_substr(body, b"\"state\":\"healthy\",\"launched_at_ms\""),
            2
        );
    }

    #[test]
    fn a_booting_agent_reports_starting_then_healthy() {
        let spec = Spec {
            id: "i-000001".into(),
            group: "s0/r0".into(),
            generation: 1,
            addr: "127.77.0.1".into(),
            components: default_components(2),
            salt: mix(1),
            client: 0,
        };
        let ctl = Ctl {
            mode: AtomicU8::new(NORMAL),
            seq: AtomicU64::new(0),
            wake: Notify::new(),
            poll_permit: tokio::sync::watch::Sender::new(false),
            healthy_at: Some(Instant::now() + Duration::from_secs(3600)),
            stop: CancellationToken::new(),
        };
        let hb = build(&spec, &ctl);
        assert_eq!(hb.phase, AgentPhase::Booting);
        assert!(!hb.healthy());
        assert_eq!(hb.components.len(), 3);
        let ctl = Ctl {
            healthy_at: None,
            ..ctl
        };
        let hb = build(&spec, &ctl);
        assert!(hb.healthy());
        assert_eq!(hb.seq, 2);
        ctl.mode.store(FAILING, Relaxed);
        assert!(!build(&spec, &ctl).healthy());
    }

    /// The run's CLI, as `drover-fleetsim run` parses it.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_ends_every_task_and_thread_of_a_run() {
        use clap::Parser;
        use drover_test_support::fake_http::{Answer, FakeHttp};
        use drover_test_support::wait_until_async;
        use tokio::io::AsyncReadExt;

        const STATUS: &str = r#"{"groups":[{"instances":[
            {"id":"i-000001","group":"s0/r0","generation":1,"addr":"127.77.0.1","state":"healthy"},
            {"id":"i-000002","group":"s0/r0","generation":1,"addr":"127.77.0.2","state":"healthy"},
            {"id":"i-000003","group":"s0/r0","generation":1,"addr":"127.77.0.3","state":"healthy"}]}]}"#;
        let server = FakeHttp::start(|r| match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/v1/agent/heartbeat") => {
                Answer::Json(200, r#"{"known":true,"leave_soon":true}"#.into())
            }
            ("GET", "/v1/status") => Answer::Json(200, STATUS.into()),
            // The permit long-polls, the launches' stream and a crashed instance's exit: no
            // answer, ever.
            ("GET", "/v1/agent/permit") | ("GET", "/v1/events") | ("POST", "/v1/agent/exit") => {
                Answer::Hold
            }
            _ => Answer::Json(404, "{}".into()),
        })
        .await;
        let url = server.url();
        let args = Cli::parse_from([
            "run",
            "--server",
            url.as_str(),
            "--token",
            "admin",
            "--follow-new",
            "--interval",
            "200ms",
            "--status-every",
            "100ms",
            "--control",
            "127.0.0.1:0",
            // A fault not due yet, and boots not done yet: tasks asleep.
            "--fault",
            "1h:fail:1",
            "--boot-rate",
            "0.001",
        ])
        .run;
        let fleet = Fleet::start(&args).await.unwrap();
        wait_until_async(
            Duration::from_secs(20),
            "3 long-polls and the events",
            || server.held() == 4,
        )
        .await;
        let mut ctl = tokio::net::TcpStream::connect(fleet.control.unwrap())
            .await
            .unwrap();
        ctl.write_all(b"crash 1\n").await.unwrap();
        let mut reply = [0u8; 256];
        let n = ctl.read(&mut reply).await.unwrap();
        assert!(reply[..n].starts_with(b"1 agents"), "{:?}", &reply[..n]);
        wait_until_async(
            Duration::from_secs(20),
            "the crashed instance's exit",
            || server.held() == 5,
        )
        .await;
        let hb = "/v1/agent/heartbeat";
        wait_until_async(
            Duration::from_secs(20),
            "heartbeats and status reads",
            || server.count("POST", hb) >= 6 && server.count("GET", "/v1/status") >= 3,
        )
        .await;
        let tasks = &fleet.sh.tasks;
        // Fault, control listener and connection, follower, exit; 2 agents' heartbeats and
        // boots; 3 long-polls.
        assert!(tasks.len() >= 12, "{} tasks", tasks.len());
        assert_eq!(tasks.threads_running(), 2, "status and sampler");

        let t = std::time::Instant::now();
        assert_eq!(fleet.shutdown().await, Left::default());
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!((tasks.len(), tasks.threads_running()), (0, 0));
        // What the tasks held went with them: the requests, the control connection.
        wait_until_async(Duration::from_secs(5), "no request held", || {
            server.held() == 0
        })
        .await;
        assert_eq!(
            ctl.read(&mut reply).await.unwrap(),
            0,
            "control connection closed"
        );
        let (beats, reads) = (server.count("POST", hb), server.count("GET", "/v1/status"));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            (server.count("POST", hb), server.count("GET", "/v1/status")),
            (beats, reads),
            "nothing runs after the shutdown"
        );
        assert_eq!(fleet.sh.agents.lock().unwrap().len(), 3);
    }
}
