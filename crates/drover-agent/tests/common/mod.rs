//! What the agent's end-to-end tests share: a `/bin/sh` component and an agent's settings
//! for instance `i-000003` of `web/local` (generation 4, revision 9).

use std::path::Path;
use std::time::Duration;

use drover_agent::AgentConfig;
use drover_model::fleet::{RestartPolicy, Runtime};
use drover_model::{Dur, Plan, PlanComponent};

/// A process component that runs `script` with `/bin/sh -c`: restarts after 300 ms (at most
/// 2 s apart), 1 s to stop on SIGTERM.
pub fn sh(name: &str, script: &str) -> PlanComponent {
    PlanComponent {
        name: name.into(),
        runtime: Runtime::Process,
        version: "v1".into(),
        command: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: Default::default(),
        ports: Default::default(),
        artifact: None,
        health: None,
        restart: RestartPolicy {
            initial_delay: Dur::from_millis(300),
            max_delay: Dur::from_secs(2),
            reset_after: Dur::from_secs(60),
        },
        stop_grace: Dur::from_secs(1),
        stop_signal: "SIGTERM".into(),
        drain_signal: None,
        docker: None,
        uses: Vec::new(),
        log: None,
        custom_metrics: Default::default(),
    }
}

/// The agent of instance `i-000003` in `dir`, heartbeating every `heartbeat` to `server`.
pub fn config(
    dir: &Path,
    server: Option<String>,
    components: Vec<PlanComponent>,
    heartbeat: Duration,
) -> AgentConfig {
    AgentConfig {
        instance: "i-000003".into(),
        group: "web/local".into(),
        addr: "127.0.0.1".parse().unwrap(),
        server,
        plan: Plan {
            fleet: "test".into(),
            service: "web".into(),
            region: "local".into(),
            generation: 4,
            revision: 9,
            components,
        },
        dir: dir.to_path_buf(),
        drover_bin: "/bin/true".into(),
        heartbeat_interval: heartbeat,
    }
}
