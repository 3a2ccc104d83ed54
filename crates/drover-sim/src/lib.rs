//! drover-sim: runs drover's controllers at fleet scale on a virtual clock, with simulated
//! agents and a simulated provider, injected faults and invariants checked at every step.
//!
//! Everything is deterministic: the same seed and the same scenario give the same sequence of
//! decisions (see [`Stats::decision_hash`]). There is no I/O, no thread and no real time here,
//! so thousands of instances and minutes of virtual time run in well under a second.
//!
//! ```
//! use drover_sim::{group_spec, Sim};
//! use drover_model::{fleet::Rollout, Dur};
//!
//! let mut sim = Sim::new(7);
//! let rollout = Rollout {
//!     max_surge: 2,
//!     healthy_deadline: Dur::from_secs(600),
//!     ..Rollout::default()
//! };
//! sim.add_group(group_spec("web/eu", 10, rollout));
//! sim.deploy("web/eu");
//! let took = sim.run_until(|s| s.converged("web/eu"), 600_000).expect("converges");
//! assert!(took > 0);
//! assert_eq!(sim.stats().rollouts_done.len(), 1);
//! ```

pub mod rng;
pub mod sim;

pub use rng::SplitMix64;
pub use sim::{
    deploy, group_spec, FailMode, Fault, GroupStatus, RolloutEvent, Sim, SimConfig, Stats,
};
