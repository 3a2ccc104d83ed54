//! The `sim` provider: a launch is recorded, no process starts. A launched instance is alive
//! until the server terminates it or its (simulated) agent says it ended
//! ([`SimProvider::exit`], `POST /v1/agent/exit`); it reports nothing by itself, an external
//! load tool (`drover-fleetsim`) heartbeats for it with its group's agent token.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::{Exit, LaunchRequest, Launched, Provider, ProviderError};

/// Recorded instances, shared by every `sim` region of one server (clones share them).
#[derive(Clone)]
pub struct SimProvider {
    exits: mpsc::UnboundedSender<Exit>,
    /// Instances launched (or adopted) and not yet ended.
    alive: Arc<Mutex<HashSet<String>>>,
}

impl SimProvider {
    /// A provider whose instances' ends are sent on `exits`.
    pub fn new(exits: mpsc::UnboundedSender<Exit>) -> SimProvider {
        SimProvider {
            exits,
            alive: Arc::default(),
        }
    }

    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.alive.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The instance's agent says it ended (what a process exit is to the `local` provider).
    /// False when this provider holds no such instance.
    pub fn exit(&self, instance: &str, status: &str) -> bool {
        if !self.set().remove(instance) {
            return false;
        }
        let _ = self.exits.send(Exit {
            instance: instance.to_string(),
            status: status.to_string(),
        });
        true
    }

    /// How many instances are alive.
    pub fn len(&self) -> usize {
        self.set().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The address recorded for instance number `seq` of a region with loopback block `block`.
pub fn sim_addr(block: u8, seq: u64) -> IpAddr {
    IpAddr::V4(drover_model::ids::loopback_addr(block, seq))
}

/// One region's view of the shared [`SimProvider`]: its addresses come from its own block.
pub struct SimRegion {
    pub sim: SimProvider,
    /// Second octet of the loopback block (127.B.0.0/16) addresses are recorded from.
    pub block: u8,
}

impl Provider for SimRegion {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Launched, ProviderError>> {
        self.sim.set().insert(req.instance.clone());
        let launched = Launched {
            provider_id: format!("sim:{}", req.seq),
            addr: sim_addr(self.block, req.seq),
            instance: None,
            // Simulated agents speak with their group's token.
            own_token: false,
        };
        Box::pin(async move { Ok(launched) })
    }

    fn terminate(
        &self,
        instance: &str,
        _grace: Duration,
    ) -> BoxFuture<'_, Result<(), ProviderError>> {
        self.sim.exit(instance, "terminated (sim)");
        Box::pin(async { Ok(()) })
    }

    fn alive(&self, instance: &str) -> bool {
        self.sim.set().contains(instance)
    }

    /// After a server restart every recorded instance is taken back: nothing of it could
    /// have died with the server.
    fn adopt(&self, instance: &str) -> bool {
        self.sim.set().insert(instance.to_string());
        true
    }

    fn shutdown(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        let ended: Vec<String> = self.sim.set().iter().cloned().collect();
        for id in ended {
            self.sim.exit(&id, "stopped with the server (sim)");
        }
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(seq: u64) -> LaunchRequest {
        let text = drover_test_support::fleets::web("sim", &["r"])
            .name("f")
            .capacity(0, 1, 1)
            .command("{drover}")
            .toml();
        let fleet = drover_model::parse_fleet(&text, "f.toml").unwrap();
        LaunchRequest {
            instance: drover_model::ids::instance_id(seq),
            seq,
            group: "web/r".into(),
            plan: drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "r"),
        }
    }

    #[tokio::test]
    async fn a_launch_is_alive_until_terminated_or_ended_and_each_end_is_reported_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sim = SimProvider::new(tx);
        let r = SimRegion {
            sim: sim.clone(),
            block: 77,
        };
        let a = r.launch(req(1)).await.unwrap();
        assert_eq!(a.addr.to_string(), "127.77.0.1");
        assert_eq!(a.provider_id, "sim:1");
        r.launch(req(2)).await.unwrap();
        assert!(r.alive("i-000001") && r.alive("i-000002"));
        assert_eq!(sim.len(), 2);
        assert!(rx.try_recv().is_err(), "a launch reports nothing");

        r.terminate("i-000001", Duration::ZERO).await.unwrap();
        assert!(!r.alive("i-000001"));
        assert_eq!(rx.try_recv().unwrap().instance, "i-000001");
        // The agent saying it ended, after the server terminated it: no second report.
        assert!(!sim.exit("i-000001", "exited"));
        assert!(rx.try_recv().is_err());

        assert!(sim.exit("i-000002", "left on its permit"));
        let e = rx.try_recv().unwrap();
        assert_eq!(
            (e.instance.as_str(), e.status.as_str()),
            ("i-000002", "left on its permit")
        );
        assert!(sim.is_empty());
        assert!(!sim.exit("i-000009", "never launched"));
    }

    #[tokio::test]
    async fn after_a_restart_recorded_instances_are_adopted() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = SimRegion {
            sim: SimProvider::new(tx),
            block: 1,
        };
        assert!(r.adopt("i-000042"));
        assert!(r.alive("i-000042"));
        r.shutdown(Duration::ZERO).await;
        assert_eq!(rx.try_recv().unwrap().instance, "i-000042");
        assert!(!r.alive("i-000042"));
    }
}
