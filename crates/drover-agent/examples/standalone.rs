//! The agent alone in a small binary, for measuring it apart from the `drover` binary's other
//! code: `standalone PLAN.json DIR ADDR INSTANCE`, no server, stops on SIGTERM or SIGINT.
//! (`drover agent --standalone` is the same agent inside the multi-purpose binary.)

use drover_agent::{run, AgentConfig};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: standalone PLAN.json DIR ADDR INSTANCE");
        std::process::exit(2);
    }
    let plan = serde_json::from_str(&std::fs::read_to_string(&a[1]).unwrap()).unwrap();
    let cfg = AgentConfig {
        instance: a[4].clone(),
        group: "web/local".into(),
        addr: a[3].parse().unwrap(),
        server: None,
        plan,
        dir: a[2].clone().into(),
        drover_bin: std::env::current_exe().unwrap(),
        heartbeat_interval: AgentConfig::DEFAULT_HEARTBEAT_INTERVAL,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let out = rt.block_on(run(cfg, async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).unwrap();
        let mut int = signal(SignalKind::interrupt()).unwrap();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }));
    if let Err(e) = out {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
