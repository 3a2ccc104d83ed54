//! The Prometheus text exposition of listener and target counters.

use std::fmt::Write;

use crate::stats::{ListenerStats, TargetStats};

type Listen = fn(&ListenerStats) -> u64;
type Targ = fn(&TargetStats) -> u64;

/// Listener-wide families: name, type, help, value.
const LISTENER: &[(&str, &str, &str, Listen)] = &[
    (
        "drover_lb_connections_total",
        "counter",
        "Client connections accepted, including those refused over the limit.",
        |s| s.accepted,
    ),
    (
        "drover_lb_active_connections",
        "gauge",
        "Client connections open now (connecting or proxying).",
        |s| s.active as u64,
    ),
    (
        "drover_lb_refused_over_limit_total",
        "counter",
        "Client connections closed at once because max_connections were open.",
        |s| s.refused_over_limit,
    ),
    (
        "drover_lb_unrouted_total",
        "counter",
        "Client connections closed because no target was up or every connect failed.",
        |s| s.unrouted,
    ),
    (
        "drover_lb_connect_failures_total",
        "counter",
        "Failed connection attempts to targets (refused, unreachable or timed out).",
        |s| s.connect_failures,
    ),
];

/// Per-target families: name, type, help, value.
const TARGET: &[(&str, &str, &str, Targ)] = &[
    (
        "drover_lb_target_connections_total",
        "counter",
        "Proxied connections established to the target.",
        |t| t.total,
    ),
    (
        "drover_lb_target_active_connections",
        "gauge",
        "Proxied connections open now to the target.",
        |t| t.active as u64,
    ),
    (
        "drover_lb_target_connect_failures_total",
        "counter",
        "Failed connection attempts to the target.",
        |t| t.connect_failures,
    ),
    (
        "drover_lb_target_up",
        "gauge",
        "1 if the target passes its health checks (always 1 without checks), 0 if down.",
        |t| u64::from(t.up),
    ),
    (
        "drover_lb_target_in_rotation",
        "gauge",
        "1 if the target is in the target set, 0 while a removed target drains.",
        |t| u64::from(t.in_rotation),
    ),
    (
        "drover_lb_target_health_checks_failed_total",
        "counter",
        "Active health checks of the target that failed.",
        |t| t.checks_failed,
    ),
];

/// Renders `stats` in the Prometheus text format (version 0.0.4), one family at a time.
///
/// Listener series carry a `listener` label; target series add `target` (the id) and
/// `addr`, which tell apart a removed target still draining from a new one of the same id.
/// Bytes are `drover_lb_bytes_total` and `drover_lb_target_bytes_total` with
/// `direction="in"` (read from clients, sent to targets) or `"out"` (the answers).
pub fn prometheus(stats: &[ListenerStats]) -> String {
    let targets: usize = stats.iter().map(|s| s.targets.len()).sum();
    let mut out = String::with_capacity(1024 + 120 * (8 * stats.len() + 8 * targets));
    for &(name, kind, help, value) in LISTENER {
        header(&mut out, name, kind, help);
        for s in stats {
            series(&mut out, name, s, None, None, value(s));
        }
    }
    for &(name, kind, help, value) in TARGET {
        header(&mut out, name, kind, help);
        for s in stats {
            for t in &s.targets {
                series(&mut out, name, s, Some(t), None, value(t));
            }
        }
    }
    let bytes = "drover_lb_bytes_total";
    header(
        &mut out,
        bytes,
        "counter",
        "Bytes proxied: in from clients, out from targets.",
    );
    for s in stats {
        series(&mut out, bytes, s, None, Some("in"), s.bytes_in);
        series(&mut out, bytes, s, None, Some("out"), s.bytes_out);
    }
    let bytes = "drover_lb_target_bytes_total";
    header(
        &mut out,
        bytes,
        "counter",
        "Bytes proxied through the target, in and out.",
    );
    for s in stats {
        for t in &s.targets {
            series(&mut out, bytes, s, Some(t), Some("in"), t.bytes_in);
            series(&mut out, bytes, s, Some(t), Some("out"), t.bytes_out);
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn series(
    out: &mut String,
    name: &str,
    listener: &ListenerStats,
    target: Option<&TargetStats>,
    direction: Option<&str>,
    value: u64,
) {
    out.push_str(name);
    out.push_str("{listener=\"");
    escape(out, &listener.name);
    if let Some(t) = target {
        out.push_str("\",target=\"");
        escape(out, &t.id);
        let _ = write!(out, "\",addr=\"{}", t.addr);
    }
    if let Some(d) = direction {
        out.push_str("\",direction=\"");
        out.push_str(d);
    }
    let _ = writeln!(out, "\"}} {value}");
}

/// A label value: backslash, double quote and line feed escaped.
fn escape(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: &str, up: bool) -> TargetStats {
        TargetStats {
            id: id.to_string(),
            addr: "127.0.0.1:9001".parse().expect("addr"),
            active: 2,
            total: 7,
            connect_failures: 1,
            bytes_in: 100,
            bytes_out: 2000,
            in_rotation: true,
            connecting: 0,
            penalized: false,
            up,
            checks_failed: 4,
            last_change_unix_ms: None,
            last_check_error: None,
        }
    }

    fn listener() -> ListenerStats {
        ListenerStats {
            name: "web/local".to_string(),
            local_addr: "127.0.0.1:8000".parse().expect("addr"),
            accepted: 12,
            active: 2,
            refused_over_limit: 3,
            connect_failures: 1,
            unrouted: 5,
            bytes_in: 100,
            bytes_out: 2000,
            targets: vec![target("i-1", true), target("i\"2\\", false)],
        }
    }

    #[test]
    fn renders_every_family_once_with_its_series() {
        let text = prometheus(&[listener()]);
        let must = [
            "drover_lb_connections_total{listener=\"web/local\"} 12\n",
            "drover_lb_active_connections{listener=\"web/local\"} 2\n",
            "drover_lb_refused_over_limit_total{listener=\"web/local\"} 3\n",
            "drover_lb_unrouted_total{listener=\"web/local\"} 5\n",
            "drover_lb_connect_failures_total{listener=\"web/local\"} 1\n",
            "drover_lb_bytes_total{listener=\"web/local\",direction=\"in\"} 100\n",
            "drover_lb_bytes_total{listener=\"web/local\",direction=\"out\"} 2000\n",
            "drover_lb_target_up{listener=\"web/local\",target=\"i-1\",addr=\"127.0.0.1:9001\"} 1\n",
            "drover_lb_target_up{listener=\"web/local\",target=\"i\\\"2\\\\\",addr=\"127.0.0.1:9001\"} 0\n",
            "drover_lb_target_connections_total{listener=\"web/local\",target=\"i-1\",addr=\"127.0.0.1:9001\"} 7\n",
            "drover_lb_target_active_connections{listener=\"web/local\",target=\"i-1\",addr=\"127.0.0.1:9001\"} 2\n",
            "drover_lb_target_connect_failures_total{listener=\"web/local\",target=\"i-1\",addr=\"127.0.0.1:9001\"} 1\n",
            "drover_lb_target_health_checks_failed_total{listener=\"web/local\",target=\"i-1\",addr=\"127.0.0.1:9001\"} 4\n",
            "drover_lb_target_in_rotation{listener=\"web/local\",target=\"i-1\",addr=\"127.0.0.1:9001\"} 1\n",
            "drover_lb_target_bytes_total{listener=\"web/local\",target=\"i-1\",addr=\"127.0.0.1:9001\",direction=\"out\"} 2000\n",
        ];
        for line in must {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(types, LISTENER.len() + TARGET.len() + 2);
        // Every sample line is `name{labels} value`, and its family was declared before.
        let mut declared = Vec::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().expect("name").to_string());
            } else if !l.starts_with('#') {
                let name = l.split('{').next().expect("name");
                assert_eq!(declared.last().map(String::as_str), Some(name), "{l}");
                let value = l.rsplit(' ').next().expect("value");
                value.parse::<u64>().expect("integer value");
            }
        }
    }

    #[test]
    fn no_listeners_render_only_headers() {
        let text = prometheus(&[]);
        assert!(text.lines().all(|l| l.starts_with('#')), "{text}");
    }
}
