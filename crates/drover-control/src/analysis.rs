//! Canary analysis: the canary instances against the baseline (the group's old instances)
//! over the same bake window, on what drover sees without setup: restarts and exits, health
//! transitions, the balancer's connect failures per target, and the custom metrics a rollout
//! names. A pure function of the two sets of windows: the server gathers them, this decides.

use std::collections::BTreeMap;

use drover_model::fleet::{Analysis, Direction};

/// What one instance did over the bake window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    pub instance: String,
    /// Component restarts (each after an exit or a failed health check).
    pub restarts: u32,
    /// Times it turned unhealthy.
    pub unhealthy: u32,
    /// The balancer's connections to it, and its failed connects.
    pub connections: u64,
    pub connect_failures: u64,
    /// The mean of each custom metric over its heartbeats in the window.
    pub metrics: BTreeMap<String, f64>,
}

/// The outcome, with the numbers it rests on.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub pass: bool,
    /// One line per check: `restarts per instance: canary 2.00, baseline 0.00 (fails above 1.00)`.
    pub lines: Vec<String>,
}

impl Verdict {
    /// The lines, with the failed checks first, as one message.
    pub fn describe(&self) -> String {
        self.lines.join("; ")
    }
}

/// A built-in check fails when the canary's value exceeds the baseline's times this ratio
/// plus this allowance (restarts, health transitions: one more per instance than twice the
/// baseline's).
const BUILTIN_RATIO: f64 = 2.0;
const EVENTS_ALLOWANCE: f64 = 1.0;
/// Connect failures: the canary's failure share may exceed twice the baseline's by 1 point.
const FAILURE_SHARE_ALLOWANCE: f64 = 0.01;

fn per_instance(ws: &[Window], f: impl Fn(&Window) -> f64) -> f64 {
    if ws.is_empty() {
        return 0.0;
    }
    ws.iter().map(f).sum::<f64>() / ws.len() as f64
}

fn failure_share(ws: &[Window]) -> f64 {
    let (c, f) = ws.iter().fold((0u64, 0u64), |(c, f), w| {
        (
            c + w.connections + w.connect_failures,
            f + w.connect_failures,
        )
    });
    if c == 0 {
        0.0
    } else {
        f as f64 / c as f64
    }
}

/// Compare `canary` with `baseline`. Every check must pass; a custom metric no canary
/// reported fails (it cannot be judged), one no baseline instance reported is compared with 0.
pub fn verdict(canary: &[Window], baseline: &[Window], analysis: &Analysis) -> Verdict {
    let mut lines = Vec::new();
    let mut pass = true;
    let check = |lines: &mut Vec<String>, name: String, c: f64, b: f64, limit: f64, ok: bool| {
        lines.push(format!(
            "{name}: canary {c:.3}, baseline {b:.3} ({} {limit:.3}){}",
            if ok { "limit" } else { "over" },
            if ok { "" } else { " FAILED" }
        ));
        ok
    };
    let (c, b) = (
        per_instance(canary, |w| w.restarts as f64),
        per_instance(baseline, |w| w.restarts as f64),
    );
    let limit = b * BUILTIN_RATIO + EVENTS_ALLOWANCE;
    pass &= check(
        &mut lines,
        "restarts per instance".into(),
        c,
        b,
        limit,
        c <= limit,
    );
    let (c, b) = (
        per_instance(canary, |w| w.unhealthy as f64),
        per_instance(baseline, |w| w.unhealthy as f64),
    );
    let limit = b * BUILTIN_RATIO + EVENTS_ALLOWANCE;
    pass &= check(
        &mut lines,
        "turned unhealthy per instance".into(),
        c,
        b,
        limit,
        c <= limit,
    );
    // A canary that served nothing while the baseline served cannot be judged on what it
    // served: its metrics say nothing (clients that keep their connections open never reach
    // a new instance behind an L4 balancer).
    let served = |ws: &[Window]| ws.iter().map(|w| w.connections).sum::<u64>();
    let (cs, bs) = (served(canary), served(baseline));
    if cs == 0 && bs > 0 {
        pass = false;
        lines.push(format!(
            "balancer connections: canary 0, baseline {bs}: the canary served no connection, \
             so nothing can be judged on it (clients keep their connections to the old \
             instances: bake longer, or analysis.mode = \"advise\") FAILED"
        ));
    }
    let (c, b) = (failure_share(canary), failure_share(baseline));
    let limit = b * BUILTIN_RATIO + FAILURE_SHARE_ALLOWANCE;
    pass &= check(
        &mut lines,
        "balancer connect failures share".into(),
        c,
        b,
        limit,
        c <= limit,
    );
    for m in &analysis.metrics {
        let reported: Vec<f64> = canary
            .iter()
            .filter_map(|w| w.metrics.get(&m.metric).copied())
            .collect();
        if reported.is_empty() {
            pass = false;
            lines.push(format!(
                "{}: no canary reported it FAILED (is it in the component's custom_metrics?)",
                m.metric
            ));
            continue;
        }
        let c = reported.iter().sum::<f64>() / reported.len() as f64;
        let base: Vec<f64> = baseline
            .iter()
            .filter_map(|w| w.metrics.get(&m.metric).copied())
            .collect();
        let b = if base.is_empty() {
            0.0
        } else {
            base.iter().sum::<f64>() / base.len() as f64
        };
        let (limit, ok) = match m.direction {
            Direction::Lower => {
                let l = b * m.max_ratio + m.tolerance;
                (l, c <= l)
            }
            Direction::Higher => {
                let l = b / m.max_ratio - m.tolerance;
                (l, c >= l)
            }
        };
        pass &= check(&mut lines, m.metric.clone(), c, b, limit, ok);
    }
    lines.sort_by_key(|l| !l.ends_with("FAILED"));
    Verdict { pass, lines }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_model::fleet::{AnalysisMetric, AnalysisMode};

    fn w(id: &str, restarts: u32, error_rate: Option<f64>) -> Window {
        Window {
            instance: id.into(),
            restarts,
            connections: 1000,
            metrics: error_rate
                .map(|e| [("error_rate".to_string(), e)].into_iter().collect())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    fn analysis() -> Analysis {
        Analysis {
            mode: AnalysisMode::Auto,
            metrics: vec![AnalysisMetric {
                metric: "error_rate".into(),
                direction: Direction::Lower,
                max_ratio: 1.5,
                tolerance: 0.01,
            }],
        }
    }

    #[test]
    fn a_canary_like_its_baseline_passes() {
        let base = [w("a", 0, Some(0.01)), w("b", 0, Some(0.012))];
        let v = verdict(&[w("c", 0, Some(0.013))], &base, &analysis());
        assert!(v.pass, "{}", v.describe());
        assert!(
            v.describe().contains("error_rate: canary 0.013"),
            "{}",
            v.describe()
        );
    }

    #[test]
    fn a_canary_that_errors_or_restarts_more_fails_with_its_numbers() {
        let base = [w("a", 0, Some(0.0)), w("b", 0, Some(0.0))];
        let v = verdict(&[w("c", 0, Some(0.2))], &base, &analysis());
        assert!(!v.pass);
        assert!(
            v.lines[0].starts_with("error_rate: canary 0.200, baseline 0.000 (over 0.010) FAILED"),
            "{:?}",
            v.lines
        );
        let v = verdict(&[w("c", 3, Some(0.0))], &base, &analysis());
        assert!(!v.pass);
        assert!(
            v.lines[0].starts_with("restarts per instance"),
            "{:?}",
            v.lines
        );
        // A metric no canary reports cannot pass.
        let v = verdict(&[w("c", 0, None)], &base, &analysis());
        assert!(!v.pass);
        // Connect failures: a share well above the baseline's.
        let mut bad = w("c", 0, Some(0.0));
        bad.connect_failures = 100;
        let v = verdict(&[bad], &base, &analysis());
        assert!(!v.pass, "{:?}", v.lines);
    }

    #[test]
    fn higher_is_better_metrics_fail_below_the_ratio() {
        let mut a = analysis();
        a.metrics[0].direction = Direction::Higher;
        a.metrics[0].metric = "throughput".into();
        a.metrics[0].tolerance = 0.0;
        let m = |v: f64| [("throughput".to_string(), v)].into_iter().collect();
        let base = [Window {
            metrics: m(100.0),
            ..Default::default()
        }];
        let slow = [Window {
            metrics: m(50.0),
            ..Default::default()
        }];
        let fine = [Window {
            metrics: m(80.0),
            ..Default::default()
        }];
        assert!(!verdict(&slow, &base, &a).pass);
        assert!(verdict(&fine, &base, &a).pass);
    }

    #[test]
    fn a_canary_that_served_no_connection_is_not_passed() {
        let mut c = w("i-c", 0, Some(0.0));
        c.connections = 0;
        let v = verdict(&[c], &[w("i-b", 0, Some(0.0))], &analysis());
        assert!(!v.pass, "{v:?}");
        assert!(
            v.lines[0].contains("the canary served no connection"),
            "{v:?}"
        );
        // Without a balancer (no connections anywhere) the other checks decide.
        let mut c = w("i-c", 0, Some(0.0));
        let mut b = w("i-b", 0, Some(0.0));
        c.connections = 0;
        b.connections = 0;
        assert!(verdict(&[c], &[b], &analysis()).pass);
    }
}
