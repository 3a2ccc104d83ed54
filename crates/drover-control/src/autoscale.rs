//! The autoscaler: target tracking on a per-instance metric. Fast out (a cooldown between
//! scale-outs), slow in (only to the highest count recommended over the stabilization window),
//! frozen in during a rollout, silent without data, and continuing from a manual count.

use std::collections::VecDeque;

use drover_model::fleet::Autoscale;

use crate::group::{Health, Phase};

/// What the autoscaler must know about a group at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleInput<'a> {
    pub group: &'a str,
    pub policy: &'a Autoscale,
    pub desired: u32,
    /// The bounds now: the fleet file's capacity, or raised by a schedule
    /// ([`crate::schedule::Schedules::bounds`]).
    pub min: u32,
    pub max: u32,
    /// What raised `min`/`max`, when a schedule did ([`crate::schedule::Bounds::by`]): the
    /// decisions it shapes say so.
    pub bounds_by: Option<&'a str>,
    /// A rollout is replacing instances: no scale-in now.
    pub rollout_in_progress: bool,
    /// The metric of each instance that counts (healthy, past warm-up, reporting it).
    pub samples: &'a [f64],
    /// When the oldest of those samples was reported.
    pub oldest_sample_ms: u64,
}

/// What one instance offers the autoscaler: where it is, its health, and the value of the
/// policy's metric in its last report.
#[derive(Clone, Copy, Debug)]
pub struct Offer {
    pub alive: bool,
    pub phase: Phase,
    pub health: Health,
    pub last_seen_ms: u64,
    pub value: Option<f64>,
}

/// The samples the autoscaler decides on, and when the oldest of them was reported (0: none).
/// An instance counts when it is alive, active (not leaving), healthy for at least the
/// policy's warm-up, and its value is finite and not negative.
pub fn samples(
    now: u64,
    policy: &Autoscale,
    offers: impl IntoIterator<Item = Offer>,
) -> (Vec<f64>, u64) {
    let warmup = policy.warmup.as_millis();
    let mut values = Vec::new();
    let mut oldest = None::<u64>;
    for o in offers {
        if !o.alive || o.phase != Phase::Active {
            continue;
        }
        let Health::Healthy { since_ms } = o.health else {
            continue;
        };
        if now.saturating_sub(since_ms) < warmup {
            continue;
        }
        if let Some(v) = o.value.filter(|v| v.is_finite() && *v >= 0.0) {
            values.push(v);
            oldest = Some(oldest.map_or(o.last_seen_ms, |t| t.min(o.last_seen_ms)));
        }
    }
    (values, oldest.unwrap_or(0))
}

/// The autoscaler's memory of one group. Soft: after a server restart it starts empty, which
/// only delays scale-in (the window must fill again).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AutoscaleState {
    /// The recommendations (time, count) within the stabilization window that may still be
    /// its highest: each is higher than every later one, so the first is the window's highest
    /// and the memory stays small (it is cloned at every pass).
    window: VecDeque<(u64, u32)>,
    /// Since when recommendations have been recorded without a gap.
    observing_since_ms: Option<u64>,
    /// The last change of the desired count (by the autoscaler or a person).
    last_change_ms: Option<u64>,
    /// The last scale-out (or manual count): the scale-out cooldown counts from here.
    last_out_ms: Option<u64>,
    /// The last observation, for status.
    pub last_observed: Option<f64>,
    pub last_recommended: Option<u32>,
}

/// A change of the desired count, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleDecision {
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

impl AutoscaleState {
    /// A person (or a fleet file) set the count: autoscaling goes on from there. Older
    /// recommendations no longer apply, and the next scale-out waits for the cooldown.
    pub fn manual(&mut self, now: u64, desired: u32) {
        self.window.clear();
        self.window.push_back((now, desired));
        self.observing_since_ms = Some(now);
        self.last_change_ms = Some(now);
        self.last_out_ms = Some(now);
    }

    /// Look at the metric and decide. Deterministic in its inputs and `now`.
    pub fn decide(&mut self, now: u64, input: &AutoscaleInput<'_>) -> Option<ScaleDecision> {
        let p = input.policy;
        let current = input.desired;
        if input.samples.is_empty() || current == 0 {
            // No data: no scaling, and the window restarts when data comes back.
            self.window.clear();
            self.observing_since_ms = None;
            self.last_observed = None;
            self.last_recommended = None;
            return None;
        }
        let total: f64 = input.samples.iter().sum();
        let observed = total / input.samples.len() as f64;
        let ratio = observed / p.target;
        // ceil(measured instances x observed / target) = ceil(total / target): instances still
        // booting or warming up carry no weight, so added capacity is never counted twice.
        // (A hair below the ceiling so 16.000000001 stays 16.)
        let recommended = if (ratio - 1.0).abs() <= p.tolerance {
            current
        } else {
            (((total / p.target) - 1e-9).ceil().max(0.0) as u32).clamp(input.min, input.max)
        };
        self.last_observed = Some(observed);
        self.last_recommended = Some(recommended);
        let since = *self.observing_since_ms.get_or_insert(now);
        // One no higher than this never is the highest again (this one outlasts it).
        while self.window.back().is_some_and(|(_, n)| *n <= recommended) {
            self.window.pop_back();
        }
        self.window.push_back((now, recommended));
        let horizon = now.saturating_sub(p.scale_in_stabilization.as_millis());
        while self.window.front().is_some_and(|(t, _)| *t < horizon) {
            self.window.pop_front();
        }
        let metric = &p.metric;
        let why = |dir: &str| {
            let held = match input.bounds_by {
                Some(by) if recommended == input.min || recommended == input.max => {
                    format!("; bounds {by}")
                }
                _ => String::new(),
            };
            format!(
                "autoscale {dir}: {metric} {observed:.2} per instance over {} instance(s), target {:.2}{held}",
                input.samples.len(),
                p.target
            )
        };
        let target = current.clamp(input.min, input.max);
        if target != current {
            // The range changed under us: move into it at once.
            self.last_change_ms = Some(now);
            return Some(ScaleDecision {
                from: current,
                to: target,
                reason: match input.bounds_by {
                    Some(by) => format!("autoscale: {current} is outside the raised bounds {by}"),
                    None => format!(
                        "autoscale: {current} is outside min..max ({}..{})",
                        input.min, input.max
                    ),
                },
            });
        }
        if recommended > current {
            // The cooldown holds off a second scale-out on stale data; it ends early once
            // every measured instance has reported since the last change.
            let cooled = self
                .last_out_ms
                .is_none_or(|t| now.saturating_sub(t) >= p.scale_out_cooldown.as_millis());
            let fresh = self
                .last_change_ms
                .is_none_or(|t| input.oldest_sample_ms > t);
            if cooled || fresh {
                self.last_change_ms = Some(now);
                self.last_out_ms = Some(now);
                return Some(ScaleDecision {
                    from: current,
                    to: recommended,
                    reason: why("out"),
                });
            }
            return None;
        }
        if recommended < current {
            if input.rollout_in_progress {
                return None;
            }
            // The window must be full: no scale-in on a short memory (e.g. just after a restart).
            if now.saturating_sub(since) < p.scale_in_stabilization.as_millis() {
                return None;
            }
            let highest = self.window.front().map_or(current, |(_, n)| *n);
            if highest < current {
                self.last_change_ms = Some(now);
                return Some(ScaleDecision {
                    from: current,
                    to: highest,
                    reason: format!(
                        "{} (highest recommendation over the last {}: {highest})",
                        why("in"),
                        p.scale_in_stabilization
                    ),
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::Dur;

    /// Only alive, active instances healthy past the warm-up (10 s) with a usable value
    /// count; the oldest report among them is the one the autoscaler waits past.
    #[test]
    fn samples_come_from_warm_active_instances_with_usable_values() {
        let now = 100_000;
        let ok = Offer {
            alive: true,
            phase: Phase::Active,
            health: Health::Healthy { since_ms: 50_000 },
            last_seen_ms: 99_000,
            value: Some(0.4),
        };
        let offers = [
            ok,
            Offer {
                last_seen_ms: 98_000,
                value: Some(0.6),
                ..ok
            },
            Offer { alive: false, ..ok },
            Offer {
                phase: Phase::Draining,
                ..ok
            },
            Offer {
                health: Health::Healthy { since_ms: 95_000 },
                ..ok
            },
            Offer {
                health: Health::Unhealthy { since_ms: 1 },
                ..ok
            },
            Offer { value: None, ..ok },
            Offer {
                value: Some(f64::NAN),
                ..ok
            },
            Offer {
                value: Some(-1.0),
                ..ok
            },
        ];
        assert_eq!(samples(now, &policy(), offers), (vec![0.4, 0.6], 98_000));
        assert_eq!(samples(now, &policy(), []), (vec![], 0));
    }

    fn policy() -> Autoscale {
        Autoscale {
            metric: "cpu".into(),
            target: 0.5,
            scale_out_cooldown: Dur::from_secs(30),
            scale_in_stabilization: Dur::from_secs(300),
            tolerance: 0.1,
            warmup: Dur::from_secs(10),
        }
    }

    fn input<'a>(p: &'a Autoscale, desired: u32, samples: &'a [f64]) -> AutoscaleInput<'a> {
        AutoscaleInput {
            group: "web/local",
            policy: p,
            desired,
            min: 2,
            max: 10,
            bounds_by: None,
            rollout_in_progress: false,
            samples,
            oldest_sample_ms: 0,
        }
    }

    #[test]
    fn target_tracking_formula_and_clamp() {
        let p = policy();
        let mut s = AutoscaleState::default();
        let d = s.decide(0, &input(&p, 3, &[0.9, 0.9, 0.9])).unwrap();
        assert_eq!((d.from, d.to), (3, 6), "ceil(3 * 0.9 / 0.5) = 6");
        let mut s = AutoscaleState::default();
        let d = s.decide(0, &input(&p, 3, &[5.0])).unwrap();
        assert_eq!(d.to, 10, "clamped to max");
    }

    #[test]
    fn within_tolerance_nothing_happens() {
        let p = policy();
        let mut s = AutoscaleState::default();
        assert_eq!(s.decide(0, &input(&p, 4, &[0.54, 0.52])), None);
        assert_eq!(s.last_recommended, Some(4));
    }

    #[test]
    fn within_raised_bounds_the_schedule_is_named() {
        let p = policy();
        let mut s = AutoscaleState::default();
        let by = "20..40 from schedule web#0 (0 17 * * SAT Europe/London) until 21:00 GMT";
        let mut i = input(&p, 25, &[0.1; 25]);
        (i.min, i.max, i.bounds_by) = (20, 40, Some(by));
        s.manual(0, 25);
        let d = s.decide(400_000, &i).expect("scale in to the raised floor");
        assert_eq!(d.to, 20, "low load, but not below the raised min");
        assert!(d.reason.contains("schedule web#0"), "{}", d.reason);
        let mut i = input(&p, 3, &[0.5; 3]);
        (i.min, i.max, i.bounds_by) = (20, 40, Some(by));
        let d = s.decide(400_000, &i).unwrap();
        assert_eq!((d.from, d.to), (3, 20));
        assert!(
            d.reason.contains("outside the raised bounds 20..40"),
            "{}",
            d.reason
        );
    }

    /// A scale-in goes to the highest recommendation of the stabilization window, however
    /// the load moves (the window keeps only the recommendations that may still be its
    /// highest).
    #[test]
    fn scale_in_goes_to_the_highest_recommendation_of_the_window() {
        let p = policy();
        let mut s = AutoscaleState::default();
        let mut desired = 10;
        let mut seen: Vec<(u64, u32)> = Vec::new();
        let mut x: u64 = 7;
        let mut ins = 0;
        let mut level = 4.0;
        for k in 0..6_000u64 {
            let now = k * 1_000;
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let u = (x >> 40) as f64 / (1u64 << 24) as f64;
            // A load that moves to a new level (1 to 9 instances' worth at the target) every
            // 200 s, and wanders +-20% around it at every pass.
            if k % 200 == 0 {
                level = 1.0 + 8.0 * u;
            }
            let total = level * p.target * (0.8 + 0.4 * u);
            let samples = vec![total / f64::from(desired); desired as usize];
            let mut i = input(&p, desired, &samples);
            i.max = 20;
            let d = s.decide(now, &i);
            seen.push((now, s.last_recommended.unwrap()));
            if let Some(d) = d {
                if d.to < d.from {
                    let horizon = now.saturating_sub(p.scale_in_stabilization.as_millis());
                    let highest = seen
                        .iter()
                        .filter(|(t, _)| *t >= horizon)
                        .map(|(_, n)| *n)
                        .max()
                        .unwrap();
                    assert_eq!(d.to, highest, "at {now} ms");
                    ins += 1;
                }
                desired = d.to;
            }
        }
        assert!(ins > 3, "{ins} scale-ins");
        assert!(s.window.len() < 50, "{} kept", s.window.len());
    }

    #[test]
    fn no_data_no_scaling() {
        let p = policy();
        let mut s = AutoscaleState::default();
        assert_eq!(s.decide(0, &input(&p, 4, &[])), None);
    }
}
