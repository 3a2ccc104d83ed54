//! Load and autoscaling in the simulator: a load model that turns a total load L(t) into the
//! metric each instance reports, and the records of what the autoscaler did with it.
//!
//! The model: the group's balancer spreads L(t) evenly over the instances in rotation, so an
//! instance in rotation carries `L(t) / in_rotation`, and reports `share / capacity` (1.0 =
//! fully used), times an optional seeded noise. An instance out of rotation reports 0. Agents
//! report with their heartbeats, so the server's value lags the truth by up to one heartbeat,
//! as it does in `drover server`.

use std::fmt;
use std::sync::Arc;

/// The total load a group receives over (virtual) time, and how it becomes each instance's
/// metric.
#[derive(Clone)]
pub struct LoadModel {
    load: Arc<dyn Fn(u64) -> f64 + Send + Sync>,
    /// The load one instance carries at metric 1.0 (e.g. requests per second at one busy core).
    pub capacity: f64,
    /// Noise common to all instances: each step, L is multiplied by `1 + u`, `u` uniform in
    /// `[-load_noise, +load_noise]` (0.15 = +-15%). A fluctuating load, the worst case for
    /// flapping, since every instance sees it at once.
    pub load_noise: f64,
    /// Noise of each report: each heartbeat's metric is multiplied by `1 + u`, `u` uniform in
    /// `[-instance_noise, +instance_noise]` (measurement noise, uneven balancing).
    pub instance_noise: f64,
}

impl fmt::Debug for LoadModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadModel")
            .field("capacity", &self.capacity)
            .field("load_noise", &self.load_noise)
            .field("instance_noise", &self.instance_noise)
            .finish_non_exhaustive()
    }
}

impl LoadModel {
    /// L(t) given as a function of virtual time in ms.
    pub fn from_fn(capacity: f64, load: impl Fn(u64) -> f64 + Send + Sync + 'static) -> LoadModel {
        assert!(
            capacity.is_finite() && capacity > 0.0,
            "capacity must be > 0"
        );
        LoadModel {
            load: Arc::new(load),
            capacity,
            load_noise: 0.0,
            instance_noise: 0.0,
        }
    }

    /// L(t) as a step function: the value of the last point at or before t (0 before the
    /// first). Points are sorted by time.
    pub fn steps(capacity: f64, mut points: Vec<(u64, f64)>) -> LoadModel {
        points.sort_by_key(|(t, _)| *t);
        LoadModel::from_fn(capacity, move |t| {
            let k = points.partition_point(|(at, _)| *at <= t);
            if k == 0 {
                0.0
            } else {
                points[k - 1].1
            }
        })
    }

    /// A constant load.
    pub fn constant(capacity: f64, load: f64) -> LoadModel {
        LoadModel::from_fn(capacity, move |_| load)
    }

    /// The same model with noise (see the fields).
    pub fn with_noise(mut self, load_noise: f64, instance_noise: f64) -> LoadModel {
        self.load_noise = load_noise;
        self.instance_noise = instance_noise;
        self
    }

    /// L(t), without noise.
    pub fn load_at(&self, t_ms: u64) -> f64 {
        (self.load)(t_ms).max(0.0)
    }
}

/// Who changed a group's desired count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaledBy {
    /// The autoscaler (`AutoscaleState::decide`).
    Autoscaler,
    /// A person (`drover scale`) or a fleet file: `AutoscaleState::manual` is told.
    Manual,
    /// A raw write of the count ([`crate::Sim::set_desired`], [`crate::Fault::SetDesired`]),
    /// which the autoscaler is not told about.
    SetDesired,
    /// A schedule began or ended (`drover_control::schedule::step`).
    Schedule,
}

/// One change of a group's desired count.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleEvent {
    pub at_ms: u64,
    pub from: u32,
    pub to: u32,
    pub by: ScaledBy,
    pub reason: String,
}

/// What the autoscaler saw and did at one step (one per step for every autoscaled group).
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscalePoint {
    pub at_ms: u64,
    /// L(t) without noise.
    pub load: f64,
    /// The true per-instance metric, `L(t) / in_rotation / capacity` without noise (`None`
    /// with nothing in rotation).
    pub per_instance: Option<f64>,
    /// The mean of the samples the autoscaler got (`None`: no data).
    pub observed: Option<f64>,
    /// How many instances' metric counted (Active, healthy for `warmup`, reporting).
    pub measured: usize,
    /// Instances in rotation (the server's view), before this step's actions.
    pub in_rotation: usize,
    /// The count the metric alone asked for at this step.
    pub recommended: Option<u32>,
    /// The desired count after this step's decision.
    pub desired: u32,
    pub rollout_open: bool,
}

/// How many times a series changes direction (up then down, or down then up).
pub fn direction_changes(series: &[(u64, u32)]) -> usize {
    let mut last: Option<std::cmp::Ordering> = None;
    let mut changes = 0;
    for w in series.windows(2) {
        let dir = w[1].1.cmp(&w[0].1);
        if dir == std::cmp::Ordering::Equal {
            continue;
        }
        if last.is_some_and(|l| l != dir) {
            changes += 1;
        }
        last = Some(dir);
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_hold_the_last_value() {
        let m = LoadModel::steps(10.0, vec![(1_000, 5.0), (0, 1.0), (3_000, 2.0)]);
        assert_eq!(m.load_at(0), 1.0);
        assert_eq!(m.load_at(999), 1.0);
        assert_eq!(m.load_at(1_000), 5.0);
        assert_eq!(m.load_at(10_000), 2.0);
        let late = LoadModel::steps(10.0, vec![(500, 5.0)]);
        assert_eq!(late.load_at(0), 0.0);
    }

    #[test]
    fn direction_changes_counts_turns() {
        assert_eq!(direction_changes(&[(0, 4)]), 0);
        assert_eq!(direction_changes(&[(0, 4), (1, 5), (2, 6), (3, 6)]), 0);
        assert_eq!(direction_changes(&[(0, 4), (1, 5), (2, 4)]), 1);
        assert_eq!(
            direction_changes(&[(0, 4), (1, 5), (2, 5), (3, 4), (4, 6)]),
            2
        );
    }
}
