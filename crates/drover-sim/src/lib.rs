//! drover-sim: drives the control plane's own world (`drover_control::world::World`, the state
//! and steps `drover server` holds and calls) at fleet scale on a virtual clock, with
//! simulated agents and providers, injected faults and invariants checked at every step.
//!
//! The simulation keeps only the fake world: agents (boot, health, heartbeats, faults), the
//! providers (a simulated Auto Scaling group), a store, the faults and the clock. Groups are
//! regions of services in a real fleet revision, so `World::spec` derives what the controller
//! reads; heartbeats, exits, the schedule and autoscale passes, controller passes, instance
//! effects, rollout and canary bookkeeping, wave releases and restarts are the world's steps,
//! and deploys, waves and reverts are planned by `drover_control::change::plan`. A rule changed
//! in `drover_control` changes what the simulation checks.
//!
//! Everything is deterministic: the same seed and the same scenario give the same sequence of
//! decisions (see [`Stats::decision_hash`]). There is no I/O, no thread and no real time here,
//! so thousands of instances and minutes of virtual time run in seconds.
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
//!
//! Autoscaling: give a group's service a policy and the group a load; the server's autoscale
//! pass runs every step, and the desired-count series comes out (see `tests/autoscale.rs`).
//!
//! ```
//! use drover_sim::{group_spec, LoadModel, Sim};
//! use drover_model::{fleet::{Autoscale, Rollout}, Dur};
//!
//! let mut sim = Sim::new(7);
//! sim.add_group(group_spec("web/eu", 4, Rollout::default()));
//! let policy = Autoscale {
//!     metric: "cpu".into(),
//!     target: 0.5,
//!     scale_out_cooldown: Dur::from_secs(30),
//!     scale_in_stabilization: Dur::from_secs(300),
//!     tolerance: 0.1,
//!     warmup: Dur::from_secs(10),
//! };
//! sim.set_autoscale("web/eu", policy, 2, 10);
//! // 4 instances of capacity 100 at 0.9 each: target tracking asks for ceil(4 x 0.9 / 0.5) = 8.
//! sim.set_load("web/eu", LoadModel::constant(100.0, 360.0));
//! sim.run_for(120_000);
//! let series = sim.desired_series("web/eu");
//! assert_eq!((series.len(), series[1].1), (2, 8), "one step, 4 -> 8: {series:?}");
//! ```

pub mod load;
pub mod rng;
pub mod sim;

pub use load::{direction_changes, AutoscalePoint, LoadModel, ScaleEvent, ScaledBy};
pub use rng::SplitMix64;
pub use sim::{
    group_spec, FailMode, Fault, GroupStatus, NoisyMetric, RolloutEvent, ServiceSpec, Sim,
    SimConfig, Stats, VerdictRecord, ORPHAN_GRACE_MS,
};
