//! End to end: scheduled capacity. A fleet file schedule that fires 5 s after apply raises
//! the example group from 3 to 5 serving instances and, when it ends, the group goes back to
//! 3, with zero failed requests; a one-off `drover scale --at` set before a server restart
//! still fires after it, and `drover schedule cancel` ends it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use drover_model::cron::{format_seconds, Tz};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// (instances in rotation, instances at all) of the only group.
fn counts(up: &Up) -> Option<(usize, usize)> {
    let s = up.status()?;
    let g = s.groups.first()?;
    Some((
        g.instances.iter().filter(|i| i.in_rotation).count(),
        g.instances.len(),
    ))
}

fn wait_for(up: &Up, what: &str, timeout: Duration, mut ok: impl FnMut(usize, usize) -> bool) {
    let t0 = Instant::now();
    loop {
        if let Some((rot, all)) = counts(up) {
            if ok(rot, all) {
                return;
            }
        }
        assert!(
            t0.elapsed() < timeout,
            "{what}: not within {timeout:?}; status: {:#?}",
            up.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn events(up: &Up, kind: &str) -> Vec<drover_model::Event> {
    let (code, out, err) = up.cli(&["events", "--kind", kind, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn a_schedule_raises_the_group_and_drops_it_back_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let base =
        fleet_text(ing, subnet(), 3).replace("drain_timeout = \"10s\"", "drain_timeout = \"2s\"");
    let up = Up::start(dir.path(), &base, api, ing);
    up.wait_healthy(3, Duration::from_secs(30));
    let stop = Arc::new(AtomicBool::new(false));
    let load = load(up.ingress, 4, true, stop.clone());

    // Apply at second 55 a schedule for the next minute: it fires 5 s after the apply.
    let ms = now_ms();
    let mut fire = (ms / 60_000 + 1) * 60_000;
    if fire - ms < 5_000 {
        fire += 60_000;
    }
    std::thread::sleep(Duration::from_millis(
        fire - 5_000 - now_ms().min(fire - 5_000),
    ));
    let minute = (fire / 60_000) % 60;
    let hour = (fire / 3_600_000) % 24;
    let text = format!(
        "{base}\n[[services.web.schedule]]\ncron = \"{minute} {hour} * * *\"\ntimezone = \"UTC\"\nduration = \"1m\"\nmin = 5\ndesired = 5\n"
    );
    std::fs::write(&up.file, &text).unwrap();
    let (code, out, err) = up.cli(&["apply", "drover.toml"]);
    assert_eq!(code, 0, "{out}{err}");
    let applied_ms = now_ms();
    // apply shows the schedule's next firings, the first being the one 5 s away.
    assert!(out.contains("schedule web#0"), "{out}");
    assert!(
        out.contains(&format!("{hour:02}:{minute:02} UTC")),
        "the next firing: {out}"
    );
    let (code, out, _) = up.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("web/local: next schedule: schedule web#0"),
        "{out}"
    );

    // Raised: 5 serving instances, soon after the firing.
    wait_for(&up, "5 in rotation", Duration::from_secs(40), |rot, _| {
        rot >= 5
    });
    let raised_ms = now_ms();
    assert!(raised_ms >= fire, "raised before the firing");
    let s = up.status().unwrap();
    let g = &s.groups[0];
    assert_eq!(
        (g.min, g.desired, g.max),
        (5, 5, 6),
        "raised bounds in status"
    );
    let active = g
        .schedule
        .as_ref()
        .and_then(|s| s.active.as_ref())
        .expect("active schedule");
    assert_eq!((active.id.as_str(), active.start_ms), ("web#0", fire));
    let (_, out, _) = up.cli(&["status"]);
    assert!(
        out.contains("web/local: schedule active: schedule web#0"),
        "{out}"
    );

    // Ended: back to 3, the extra instances drained away.
    wait_for(&up, "back to 3", Duration::from_secs(100), |rot, all| {
        rot == 3 && all == 3
    });
    let back_ms = now_ms();
    assert!(back_ms >= fire + 60_000, "dropped before the window ended");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let report = load.join().unwrap();
    assert!(report.ok > 100, "{report:?}");
    assert_eq!(report.failed, 0, "failed requests: {:?}", report.errors);

    // The story, naming the schedule.
    let sched = events(&up, "schedule");
    assert_eq!(sched.len(), 2, "{sched:#?}");
    assert!(
        sched[0].message.starts_with("schedule web#0 (")
            && sched[0].message.contains("raised min to 5, desired to 5"),
        "{}",
        sched[0].message
    );
    assert!(
        sched[1].message.starts_with("schedule web#0 ended"),
        "{}",
        sched[1].message
    );
    let scaled: Vec<String> = events(&up, "scaled")
        .into_iter()
        .filter(|e| e.at_ms >= applied_ms)
        .map(|e| e.message)
        .collect();
    assert_eq!(scaled.len(), 2, "{scaled:#?}");
    assert!(
        scaled[0].starts_with("desired 3 -> 5 (schedule web#0"),
        "{}",
        scaled[0]
    );
    assert!(
        scaled[1].starts_with("desired 5 -> 3 (schedule web#0 ended"),
        "{}",
        scaled[1]
    );
    eprintln!(
        "fired {} ms after apply; 5 serving {} ms after the firing; back to 3 serving {} ms after the end; {} requests, 0 failed",
        fire - applied_ms,
        raised_ms - fire,
        back_ms - fire - 60_000,
        report.ok
    );
}

#[test]
fn a_one_off_scale_at_set_before_a_server_restart_fires_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ing) = (free_port(), free_port());
    let text =
        fleet_text(ing, subnet(), 2).replace("drain_timeout = \"10s\"", "drain_timeout = \"1s\"");
    std::fs::write(dir.path().join("drover.toml"), &text).unwrap();
    let _cleanup = KillAgents(dir.path().to_path_buf());
    let mut server = start_server(dir.path(), api);
    let up = Up::for_server(dir.path(), api, ing);
    up.apply_when_up(Duration::from_secs(10));
    up.wait_healthy(2, Duration::from_secs(20));

    // Bad --at: the accepted format and the time zone assumed, exit 2, nothing stored.
    let (code, _, err) = up.cli(&[
        "scale",
        "web",
        "4",
        "--at",
        "24/12/2026 18:00",
        "--for",
        "1h",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("YYYY-MM-DD HH:MM") && err.contains("UTC"),
        "{err}"
    );
    let (code, _, err) = up.cli(&["scale", "web", "4", "--at", "2026-12-24 18:00"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--for"), "{err}");

    // In London time: 10 s from now, for 30 s.
    let london: Tz = "Europe/London".parse().unwrap();
    let start = now_ms() + 10_000;
    let at = format_seconds(start, london);
    let (code, out, err) = up.cli(&[
        "scale",
        "web",
        "4",
        "--at",
        &at,
        "--for",
        "30s",
        "--timezone",
        "Europe/London",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("scheduled 1:"), "{out}");
    let (code, out, _) = up.cli(&["schedule", "list", "--json"]);
    assert_eq!(code, 0);
    let list: drover_model::api::ScheduleList = serde_json::from_str(&out).unwrap();
    assert_eq!(list.schedules.len(), 1);
    assert_eq!(
        (
            list.schedules[0].id.as_str(),
            list.schedules[0].state.as_str()
        ),
        ("1", "waiting")
    );
    assert_eq!(list.schedules[0].next[0].start_ms, start / 1000 * 1000);

    // The server dies and comes back; the one-off is still there and fires.
    unsafe { libc::kill(server.id() as i32, libc::SIGKILL) };
    server.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut server = start_server(dir.path(), api);
    wait_for(&up, "4 in rotation", Duration::from_secs(40), |rot, _| {
        rot >= 4
    });
    assert!(now_ms() >= start / 1000 * 1000, "raised before its time");
    let sched = events(&up, "schedule");
    assert!(
        sched
            .iter()
            .any(|e| e.message.starts_with("schedule 1 (scale web to 4 at ")
                && e.message.contains("raised min to 4, desired to 4 until")),
        "{sched:#?}"
    );
    let (_, out, _) = up.cli(&["schedule", "list"]);
    assert!(out.contains("active"), "{out}");

    // A manual count during it is clamped to the raised floor.
    let (code, out, err) = up.cli(&["scale", "web", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("desired 4 -> 4"), "{out}");

    // Cancelled: the floor drops and the group goes to the count the person asked for (3).
    let (code, out, err) = up.cli(&["schedule", "cancel", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    wait_for(
        &up,
        "back to the person's 3",
        Duration::from_secs(30),
        |rot, all| rot == 3 && all == 3,
    );
    let (code, _, err) = up.cli(&["schedule", "cancel", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cancelled already"), "{err}");
    unsafe { libc::kill(server.id() as i32, libc::SIGKILL) };
    let _ = server.wait();
}
