//! drover's controllers: deterministic functions of (desired state, observed state, clock) to
//! actions. They do no I/O; the server carries out their decisions, the simulator replays them.

pub mod analysis;
pub mod autoscale;
pub mod backoff;
pub mod change;
pub mod discovery;
pub mod effects;
pub mod group;
pub mod rollout;
pub mod schedule;
pub mod waves;
pub mod world;

pub use autoscale::{AutoscaleInput, AutoscaleState, ScaleDecision};
pub use backoff::LaunchBackoff;
pub use group::{
    reconcile, suspects_itself, Action, CanaryGate, Decision, GroupSpec, Health, InstanceView,
    Phase, Timing, SUSPECT_MIN_SILENT, SUSPECT_SHARE_PERCENT,
};
pub use schedule::{Bounds, ScheduleMemory, ScheduleStep, Schedules};
