//! The agent's idle memory with three components, on the current-thread runtime the binary uses:
//! `cargo run --release -p drover-agent --example idle [SECONDS]`. Prints the agent's RSS.

use std::time::Duration;

use drover_agent::{run, AgentConfig};
use drover_model::fleet::{HealthCheck, HealthKind, RestartPolicy, Runtime};
use drover_model::{Dur, Plan, PlanComponent};

fn component(name: &str, port: u16) -> PlanComponent {
    PlanComponent {
        name: name.into(),
        runtime: Runtime::Process,
        version: "v1".into(),
        command: "sleep".into(),
        args: vec!["600".into()],
        env: Default::default(),
        ports: [("http".to_string(), port)].into_iter().collect(),
        artifact: None,
        health: Some(HealthCheck {
            kind: HealthKind::Tcp,
            port: Some("http".into()),
            path: None,
            command: vec![],
            interval: Dur::from_millis(500),
            timeout: Dur::from_millis(200),
            healthy_threshold: 1,
            unhealthy_threshold: 1_000_000,
        }),
        restart: RestartPolicy::default(),
        stop_grace: Dur::from_secs(1),
        stop_signal: "SIGTERM".into(),
        drain_signal: None,
        docker: None,
        uses: Vec::new(),
        log: None,
        custom_metrics: Default::default(),
    }
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64 / 1024
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig {
        instance: "i-000001".into(),
        group: "bench/local".into(),
        addr: "127.0.0.1".parse().unwrap(),
        // Nobody listens there: heartbeats fail, as they do while the server is down.
        server: Some("http://127.0.0.1:9".into()),
        plan: Plan {
            fleet: "bench".into(),
            service: "bench".into(),
            region: "local".into(),
            generation: 1,
            revision: 1,
            components: vec![component("a", 9), component("b", 9), component("c", 9)],
        },
        dir: dir.path().to_path_buf(),
        drover_bin: "/bin/true".into(),
        heartbeat_interval: AgentConfig::DEFAULT_HEARTBEAT_INTERVAL,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let shutdown = async {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            println!(
                "agent RSS after {secs}s idle with 3 components: {} KiB",
                rss_kib()
            );
        };
        run(cfg, shutdown).await.unwrap();
    });
}
