//! Scheduled capacity over a virtual week and a bit (Sat 24 Oct to Mon 2 Nov 2026), across
//! both autumn daylight-saving changes: Europe/London on Sun 25 Oct (02:00 BST -> 01:00 GMT)
//! and America/New_York on Sun 1 Nov (02:00 EDT -> 01:00 EST). The sim runs the server's
//! schedule pass with the very function the server calls (`drover_control::schedule::step`),
//! and every firing and every desired count is checked against a table worked out by hand
//! (times in UTC).

use drover_control::schedule::{Bounds, ScheduleMemory};
use drover_model::api::ScheduledScale;
use drover_model::cron::{parse_time, Tz};
use drover_model::fleet::{Autoscale, Rollout, Schedule};
use drover_model::Dur;
use drover_sim::{group_spec, LoadModel, ScaledBy, Sim, SimConfig};

fn t(s: &str) -> u64 {
    parse_time(s, Tz::UTC).unwrap()
}

fn sched(
    cron: &str,
    tz: &str,
    hours: u64,
    min: Option<u32>,
    desired: Option<u32>,
    max: Option<u32>,
) -> Schedule {
    Schedule {
        cron: cron.into(),
        timezone: tz.into(),
        duration: Dur::from_secs(hours * 3600),
        min,
        desired,
        max,
    }
}

fn config() -> SimConfig {
    SimConfig {
        step_ms: 15_000,
        heartbeat_ms: 5_000,
        silent_after_ms: 30_000,
        ..SimConfig::default()
    }
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

/// (time, id, began?) of each schedule event.
fn firings(sim: &Sim, group: &str) -> Vec<(u64, String, bool)> {
    sim.schedule_notes(group)
        .iter()
        .map(|(at, msg)| {
            let id = msg
                .strip_prefix("schedule ")
                .and_then(|m| m.split([' ', ':']).next())
                .unwrap_or("?")
                .to_string();
            (*at, id, !msg.contains(" ended"))
        })
        .collect()
}

fn table(rows: &[(&str, &str, bool)]) -> Vec<(u64, String, bool)> {
    rows.iter()
        .map(|(at, id, began)| (t(at), id.to_string(), *began))
        .collect()
}

fn series(rows: &[(&str, u32)]) -> Vec<(u64, u32)> {
    rows.iter().map(|(at, n)| (t(at), *n)).collect()
}

#[test]
fn a_virtual_week_across_both_daylight_saving_changes() {
    let mut sim = Sim::with_config(21, config());
    sim.set_clock(t("2026-10-24 00:00"));

    // web/london: no autoscaling, capacity 3..10.
    sim.add_group(group_spec("web/london", 3, Rollout::default()));
    sim.set_schedules(
        "web/london",
        "web",
        3,
        10,
        vec![
            // web#0: the Saturday match, 17:00 London time for 4 h.
            sched(
                "0 17 * * SAT",
                "Europe/London",
                4,
                Some(20),
                Some(30),
                Some(40),
            ),
            // web#1: the nightly batch at 01:30 London time for 1 h; on 25 Oct 01:30 happens
            // twice (BST, then GMT): it fires once, at the first.
            sched("30 1 * * *", "Europe/London", 1, Some(5), None, None),
        ],
    );
    // One-off 1: `drover scale web 35 --at "2026-10-31 18:00" --for 1h`, inside web#0.
    sim.schedule_once(
        "web/london",
        ScheduledScale {
            id: 1,
            service: "web".into(),
            region: None,
            desired: 35,
            start_ms: t("2026-10-31 18:00"),
            end_ms: t("2026-10-31 19:00"),
            timezone: "UTC".into(),
            created_ms: 0,
            cancelled_ms: None,
        },
    );

    // api/ny: no autoscaling, capacity 2..8.
    sim.add_group(group_spec("api/ny", 2, Rollout::default()));
    sim.set_schedules(
        "api/ny",
        "api",
        2,
        8,
        vec![
            // api#0: office hours, 09:00 New York time for 8 h on weekdays (min only).
            sched(
                "0 9 * * MON-FRI",
                "America/New_York",
                8,
                Some(6),
                None,
                None,
            ),
            // api#1: Sundays 01:30 New York time; on 1 Nov it happens twice: once, the first.
            sched("30 1 * * SUN", "America/New_York", 1, Some(4), None, None),
        ],
    );

    // shop/london: target tracking, capacity 2..10, a load 4 instances carry at target.
    sim.add_group(group_spec("shop/london", 4, Rollout::default()));
    sim.set_autoscale("shop/london", policy(), 2, 10);
    sim.set_load(
        "shop/london",
        LoadModel::constant(100.0, 4.0 * 0.5 * 100.0 * 0.99),
    );
    sim.set_schedules(
        "shop/london",
        "shop",
        2,
        10,
        vec![sched(
            "0 17 * * SAT",
            "Europe/London",
            4,
            Some(8),
            None,
            Some(20),
        )],
    );
    // A person scales shop to 12 during the second Saturday, then to 3 (clamped to 8).
    sim.scale("shop/london", 12, t("2026-10-31 18:00")).unwrap();
    sim.scale("shop/london", 3, t("2026-10-31 18:30")).unwrap();

    let end = t("2026-11-02 23:00");
    sim.run_for(end - sim.now());

    // ---- web/london: every firing.
    let mut expect = vec![
        // Sat 24 Oct (BST, UTC+1): 01:30 BST = 00:30Z; 17:00 BST = 16:00Z.
        ("2026-10-24 00:30", "web#1", true),
        ("2026-10-24 01:30", "web#1", false),
        ("2026-10-24 16:00", "web#0", true),
        ("2026-10-24 20:00", "web#0", false),
        // Sun 25 Oct: 01:30 BST = 00:30Z; the second 01:30 (GMT, 01:30Z) does not fire.
        ("2026-10-25 00:30", "web#1", true),
        ("2026-10-25 01:30", "web#1", false),
    ];
    // 26 Oct .. 2 Nov (GMT): 01:30Z.
    let nights = [
        "2026-10-26",
        "2026-10-27",
        "2026-10-28",
        "2026-10-29",
        "2026-10-30",
        "2026-10-31",
        "2026-11-01",
        "2026-11-02",
    ];
    let mut rows: Vec<(String, &str, bool)> = expect
        .drain(..)
        .map(|(a, b, c)| (a.to_string(), b, c))
        .collect();
    for d in nights {
        rows.push((format!("{d} 01:30"), "web#1", true));
        rows.push((format!("{d} 02:30"), "web#1", false));
        if d == "2026-10-31" {
            // Sat 31 Oct (GMT): 17:00Z to 21:00Z, with the one-off 18:00Z-19:00Z inside.
            rows.push(("2026-10-31 17:00".into(), "web#0", true));
            rows.push(("2026-10-31 18:00".into(), "1", true));
            rows.push(("2026-10-31 19:00".into(), "1", false));
            rows.push(("2026-10-31 21:00".into(), "web#0", false));
        }
    }
    let want: Vec<(u64, String, bool)> = rows
        .iter()
        .map(|(a, b, c)| (t(a), b.to_string(), *c))
        .collect();
    assert_eq!(firings(&sim, "web/london"), want, "web/london firings");

    // ---- web/london: every desired count (3 outside schedules; 5 in the nightly window;
    // 30 from web#0; 35 while the one-off's min 35 is the highest; 30 again once it ended).
    let mut counts: Vec<(String, u32)> = vec![
        ("2026-10-24 00:00".into(), 3),
        ("2026-10-24 00:30".into(), 5),
        ("2026-10-24 01:30".into(), 3),
        ("2026-10-24 16:00".into(), 30),
        ("2026-10-24 20:00".into(), 3),
        ("2026-10-25 00:30".into(), 5),
        ("2026-10-25 01:30".into(), 3),
    ];
    for d in nights {
        counts.push((format!("{d} 01:30"), 5));
        counts.push((format!("{d} 02:30"), 3));
        if d == "2026-10-31" {
            counts.push(("2026-10-31 17:00".into(), 30));
            counts.push(("2026-10-31 18:00".into(), 35));
            counts.push(("2026-10-31 19:00".into(), 30));
            counts.push(("2026-10-31 21:00".into(), 3));
        }
    }
    let want: Vec<(u64, u32)> = counts.iter().map(|(a, n)| (t(a), *n)).collect();
    assert_eq!(
        sim.desired_series("web/london"),
        want.as_slice(),
        "web/london counts"
    );
    // Every change says which schedule caused it.
    for e in sim.scale_events("web/london") {
        assert_eq!(e.by, ScaledBy::Schedule);
        assert!(e.reason.contains("schedule "), "{}", e.reason);
    }
    let at_30 = sim
        .scale_events("web/london")
        .iter()
        .find(|e| e.at_ms == t("2026-10-31 17:00"))
        .unwrap();
    assert!(
        at_30.reason.contains(
            "schedule web#0 (0 17 * * SAT Europe/London) began: desired 30 until 21:00 GMT"
        ),
        "{}",
        at_30.reason
    );
    let raised = &sim.schedule_notes("web/london")[2].1;
    assert_eq!(
        raised,
        "schedule web#0 (0 17 * * SAT Europe/London) raised min to 20, desired to 30, max to 40 until 21:00 BST"
    );

    // ---- api/ny: office hours Mon 26 - Fri 30 Oct at 09:00 EDT = 13:00Z, Mon 2 Nov at
    // 09:00 EST = 14:00Z; Sundays 01:30 EDT = 05:30Z (on 1 Nov, the first of the two).
    let mut rows = table(&[
        ("2026-10-25 05:30", "api#1", true),
        ("2026-10-25 06:30", "api#1", false),
    ]);
    let mut counts = series(&[
        ("2026-10-24 00:00", 2),
        ("2026-10-25 05:30", 4),
        ("2026-10-25 06:30", 2),
    ]);
    for d in [
        "2026-10-26",
        "2026-10-27",
        "2026-10-28",
        "2026-10-29",
        "2026-10-30",
    ] {
        rows.extend(table(&[
            (&format!("{d} 13:00"), "api#0", true),
            (&format!("{d} 21:00"), "api#0", false),
        ]));
        counts.extend(series(&[
            (&format!("{d} 13:00"), 6),
            (&format!("{d} 21:00"), 2),
        ]));
    }
    rows.extend(table(&[
        ("2026-11-01 05:30", "api#1", true),
        ("2026-11-01 06:30", "api#1", false),
        ("2026-11-02 14:00", "api#0", true),
        ("2026-11-02 22:00", "api#0", false),
    ]));
    counts.extend(series(&[
        ("2026-11-01 05:30", 4),
        ("2026-11-01 06:30", 2),
        ("2026-11-02 14:00", 6),
        ("2026-11-02 22:00", 2),
    ]));
    assert_eq!(firings(&sim, "api/ny"), rows, "api/ny firings");
    assert_eq!(
        sim.desired_series("api/ny"),
        counts.as_slice(),
        "api/ny counts"
    );

    // ---- shop/london: autoscaling stays in charge within the raised bounds. The load asks
    // for 4. shop#0 raises min to 8 at 16:00Z (24 Oct) and 17:00Z (31 Oct); when it ends the
    // floor drops and scale-in waits for the 5 min stabilization window. On 31 Oct, 12 set by
    // a person at 18:00 is kept, and the autoscaler goes on from it: back to the raised floor
    // 8 once 12 (recorded at 18:00:00) has left the 5 min window, at the first step after
    // 18:05:00 (18:05:15); 3 at 18:30 is clamped to 8 (no change). After each end, the last
    // recommendation of 8 was at 20:59:45 (19:59:45 on the 24th): gone at 21:05:00 (20:05:00).
    assert_eq!(
        firings(&sim, "shop/london"),
        table(&[
            ("2026-10-24 16:00", "shop#0", true),
            ("2026-10-24 20:00", "shop#0", false),
            ("2026-10-31 17:00", "shop#0", true),
            ("2026-10-31 21:00", "shop#0", false),
        ])
    );
    assert_eq!(
        sim.desired_series("shop/london"),
        series(&[
            ("2026-10-24 00:00", 4),
            ("2026-10-24 16:00", 8),
            ("2026-10-24 20:05", 4),
            ("2026-10-31 17:00", 8),
            ("2026-10-31 18:00", 12),
            ("2026-10-31 18:05:15", 8),
            ("2026-10-31 21:05", 4),
        ])
        .as_slice(),
        "shop/london counts: {:#?}",
        sim.scale_events("shop/london")
    );
    let ev = sim.scale_events("shop/london");
    let by: Vec<ScaledBy> = ev.iter().map(|e| e.by).collect();
    assert_eq!(
        by,
        [
            ScaledBy::Schedule,
            ScaledBy::Autoscaler,
            ScaledBy::Schedule,
            ScaledBy::Manual,
            ScaledBy::Autoscaler,
            ScaledBy::Manual,
            ScaledBy::Autoscaler,
        ],
        "{ev:#?}"
    );
    assert!(
        ev[4].reason.contains("bounds 8..20 from schedule shop#0"),
        "{}",
        ev[4].reason
    );
    assert_eq!(
        (ev[5].from, ev[5].to),
        (8, 8),
        "3 clamped to the raised min 8"
    );
}

#[test]
fn a_server_restart_does_not_fire_a_window_twice() {
    let mut sim = Sim::with_config(3, config());
    sim.set_clock(t("2026-10-31 16:00"));
    sim.add_group(group_spec("web/london", 3, Rollout::default()));
    sim.set_schedules(
        "web/london",
        "web",
        3,
        10,
        vec![sched(
            "0 17 * * SAT",
            "Europe/London",
            4,
            Some(4),
            Some(6),
            None,
        )],
    );
    sim.run_for(t("2026-10-31 17:30") - sim.now());
    sim.restart_server();
    sim.run_for(t("2026-10-31 22:00") - sim.now());
    assert_eq!(
        sim.desired_series("web/london"),
        series(&[
            ("2026-10-31 16:00", 3),
            ("2026-10-31 17:00", 6),
            ("2026-10-31 21:00", 3),
        ])
        .as_slice()
    );
    assert_eq!(sim.schedule_notes("web/london").len(), 2);
}

/// The rule the server's `scale` uses: outside schedules the file's range refuses.
#[test]
fn manual_counts_outside_schedules_are_refused() {
    let b = Bounds {
        min: 3,
        max: 10,
        cause: None,
        active: vec![],
        next: None,
    };
    let e = drover_control::schedule::manual(11, "web", &b, &mut ScheduleMemory::default())
        .unwrap_err();
    assert!(e.contains("min..max = 3..10"), "{e}");
}
