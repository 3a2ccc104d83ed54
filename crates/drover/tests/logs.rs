//! End to end: `drover logs` (merged and prefixed across instances, follow, since, tail,
//! rotation bounded, secrets redacted, the flight recorder of a component that died and of an
//! instance that is gone) and `drover exec` (output, exit code, admin only, an event).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "s3cr3t-hunter2-value";

fn fleet(ingress: u16, block: u8) -> String {
    format!(
        r#"
[fleet]
name = "logs"

[regions.local]
provider = "local"
subnet = "127.{block}.0.0/16"

[services.web]
regions = ["local"]
capacity = {{ min = 1, desired = 3, max = 4 }}
ingress = {{ listen = "127.0.0.1:{ingress}", component = "app", port = "http" }}

[services.web.rollout]
min_healthy_time = "0s"
drain_timeout = "2s"

[services.web.components.app]
runtime = "process"
version = "v1"
command = "{{drover}}"
args = ["demo-server", "--listen", "{{addr}}:{{port.http}}", "--message", "hi"]
ports = {{ http = 8080 }}
health = {{ type = "http", port = "http", path = "/healthz", interval = "200ms", timeout = "200ms", healthy_threshold = 1, unhealthy_threshold = 3 }}
stop_grace = "1s"

[services.web.components.side]
runtime = "process"
version = "v1"
command = "/bin/sh"
args = ["-c", "trap 'echo bye $DROVER_INSTANCE; exit 0' TERM; echo started $DROVER_INSTANCE; echo token is $API_TOKEN; echo oops >&2; while true; do if [ -f poke ]; then rm -f poke; echo poked $DROVER_INSTANCE; fi; if [ -f crash ]; then rm -f crash; echo fatal: crashing now >&2; exit 3; fi; sleep 0.05; done"]
secret_env = {{ API_TOKEN = "{SECRET}" }}
restart = {{ initial_delay = "100ms", max_delay = "1s", reset_after = "1m" }}
stop_grace = "1s"

[services.web.components.chatty]
runtime = "process"
version = "v1"
command = "/bin/sh"
args = ["-c", "i=0; while [ $i -lt 6000 ]; do echo chatty line $i with some padding to fill the file faster; i=$((i+1)); done; exec sleep 1000"]
log = {{ options = {{ max-size = "64k", max-file = "2" }} }}
stop_grace = "1s"
"#
    )
}

fn instances(up: &Up) -> Vec<String> {
    let mut ids: Vec<String> = up
        .status()
        .unwrap()
        .groups
        .iter()
        .flat_map(|g| &g.instances)
        .map(|i| i.id.clone())
        .collect();
    ids.sort();
    ids
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn logs_follow_since_tail_rotation_secrets_flight_recorder_and_exec() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ingress) = (free_port(), free_port());
    let up = Up::start(dir.path(), &fleet(ingress, subnet()), api, ingress);
    up.wait_healthy(3, Duration::from_secs(60));
    let ids = instances(&up);
    assert_eq!(ids.len(), 3, "{ids:?}");

    // Every instance's lines, prefixed with instance and component; the secret never shows.
    wait_for(
        "every side component's start",
        Duration::from_secs(10),
        || {
            let (_, out, _) = up.cli(&["logs", "web", "side"]);
            ids.iter()
                .all(|i| out.contains(&format!("{i} side | started {i}")))
        },
    );
    let (code, out, err) = up.cli(&["logs", "web", "side"]);
    assert_eq!(code, 0, "{out}\n{err}");
    for i in &ids {
        assert!(
            out.contains(&format!("{i} side | token is (secret)")),
            "{out}"
        );
        assert!(out.contains(&format!("{i} side | oops")), "{out}");
    }
    assert!(!out.contains(SECRET), "the secret leaked: {out}");
    assert!(
        !out.contains("chatty"),
        "only the component asked for: {out}"
    );

    // --tail: the last line of each instance's component.
    let (code, out, _) = up.cli(&["logs", "web", "side", "--tail", "1"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");
    // (stdout and stderr are separate pipes: either may be read last)
    for i in &ids {
        assert_eq!(out.matches(&format!("{i} side | ")).count(), 1, "{out}");
    }
    assert!(!out.contains("started"), "{out}");

    // --json: one object per line.
    let (_, out, _) = up.cli(&["logs", "web", "side", "--tail", "1", "--json"]);
    let first: drover_model::logs::LogLine =
        serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(first.component, "side");
    assert!(ids.contains(&first.instance));

    // --since: nothing older.
    std::thread::sleep(Duration::from_millis(1500));
    let (code, out, _) = up.cli(&["logs", "web", "side", "--since", "1s"]);
    assert_eq!(code, 0);
    assert!(!out.contains("started"), "older than 1s: {out}");

    // -f: a new line within a second.
    let mut follow = Command::new(BIN)
        .args(["logs", "web", "side", "-f", "--tail", "0"])
        .env("DROVER_SERVER", up.server())
        .env("DROVER_DATA_DIR", up.dir.join("data"))
        .env_remove("DROVER_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = {
        let out = follow.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        (rx, reader)
    };
    std::thread::sleep(Duration::from_millis(1000));
    let target = &ids[1];
    let poked = up.dir.join("data.instances").join(target).join("side/poke");
    let t0 = Instant::now();
    std::fs::write(&poked, "").unwrap();
    let want = format!("{target} side | poked {target}");
    loop {
        let l = lines
            .0
            .recv_timeout(Duration::from_secs(5))
            .expect("no line followed");
        if l == want {
            break;
        }
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "followed after {took:?}");
    let _ = follow.kill();
    let _ = follow.wait();
    let _ = lines.1.join();

    // Rotation: the chatty component wrote ~400 KB; its files stay within 2 x 64 KiB.
    wait_for("chatty's output", Duration::from_secs(20), || {
        let (_, out, _) = up.cli(&["logs", "web", "chatty", "--tail", "1"]);
        out.lines()
            .filter(|l| l.contains("chatty line 5999"))
            .count()
            == 3
    });
    for i in &ids {
        let idir = up.dir.join("data.instances").join(i);
        let mut total = 0;
        for e in std::fs::read_dir(&idir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("chatty.log") {
                total += e.metadata().unwrap().len();
            }
        }
        assert!(
            total > 64 << 10 && total <= 2 * (64 << 10),
            "{i}: {total} bytes"
        );
    }

    // exec: output, the exit code passed through, secrets redacted, an event each.
    let (code, out, err) = up.cli(&["exec", "web", "--", "printenv", "DROVER_VERSION"]);
    assert_eq!((code, out.as_str()), (0, "v1\n"), "{err}");
    let (code, _, _) = up.cli(&["exec", "web", "--", "false"]);
    assert_eq!(code, 1);
    let (code, out, _) = up.cli(&[
        "exec",
        &ids[2],
        "side",
        "--",
        "/bin/sh",
        "-c",
        "pwd; echo $API_TOKEN; exit 7",
    ]);
    assert_eq!(code, 7);
    assert!(out.contains(&format!("{}/side", ids[2])), "{out}");
    assert!(out.contains("(secret)") && !out.contains(SECRET), "{out}");
    let (_, events, _) = up.cli(&["events", "--kind", "exec", "--json"]);
    assert!(
        events.contains("printenv DROVER_VERSION") && events.contains("exit code 0"),
        "{events}"
    );
    assert!(events.contains("exit code 7"), "{events}");
    // -i: this process's input goes to the command's stdin; its end closes it.
    let mut piped = Command::new(BIN)
        .args([
            "exec",
            "-i",
            &ids[2],
            "side",
            "--",
            "/bin/sh",
            "-c",
            "read a; echo got $a; cat; exit 4",
        ])
        .env("DROVER_SERVER", up.server())
        .env("DROVER_DATA_DIR", up.dir.join("data"))
        .env_remove("DROVER_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut w = piped.stdin.take().unwrap();
        w.write_all(b"hello\nthe rest\n").unwrap();
    }
    let o = piped.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "got hello\nthe rest\n");

    // -it on a terminal: the command gets a pty of the terminal's size, follows its resizes,
    // and its exit code comes back.
    it_on_a_terminal(&up, &[&ids[1], "side"]);

    // A read token may read logs, not exec.
    let (code, token, err) = up.cli(&["token", "create", "--scope", "read"]);
    assert_eq!(code, 0, "{err}");
    let as_reader = |args: &[&str]| {
        let o = Command::new(BIN)
            .args(args)
            .env("DROVER_SERVER", up.server())
            .env("DROVER_TOKEN", token.trim())
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, _, err) = as_reader(&["exec", "web", "--", "true"]);
    assert_eq!(code, 1);
    assert!(err.contains("needs an admin or exec token"), "{err}");
    let (code, out, _) = as_reader(&["logs", "web", "side", "--tail", "1"]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 3, "{out}");
    // An exec token may: its session's events say who.
    let (code, exec_token, err) = up.cli(&["token", "create", "--scope", "exec"]);
    assert_eq!(code, 0, "{err}");
    let o = Command::new(BIN)
        .args(["exec", "web", "--", "printenv", "DROVER_INSTANCE"])
        .env("DROVER_SERVER", up.server())
        .env("DROVER_TOKEN", exec_token.trim())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("i-"),
        "{o:?}"
    );
    let (_, events, _) = up.cli(&["events", "--kind", "exec", "--json"]);
    assert!(
        events.contains("(exec) on") && events.contains("printenv DROVER_INSTANCE"),
        "{events}"
    );

    // The flight recorder: a component that dies leaves its last lines in an event.
    let crash = up
        .dir
        .join("data.instances")
        .join(&ids[0])
        .join("side/crash");
    std::fs::write(&crash, "").unwrap();
    wait_for(
        "the flight recorder's event",
        Duration::from_secs(10),
        || {
            let (_, ev, _) = up.cli(&["events", "--kind", "output", "--json"]);
            ev.contains("fatal: crashing now") && ev.contains(&ids[0])
        },
    );
    let (_, ev, _) = up.cli(&["events", "--kind", "output", "--json"]);
    assert!(!ev.contains(SECRET), "{ev}");

    // An instance that is gone: its last lines are still there. And a follower sees what it
    // printed as it left (its agent relays until its components are stopped).
    let mut follow = Command::new(BIN)
        .args(["logs", "web", "side", "-f", "--tail", "0"])
        .env("DROVER_SERVER", up.server())
        .env("DROVER_DATA_DIR", up.dir.join("data"))
        .env_remove("DROVER_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let followed = {
        let out = follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .any(|l| l.contains("| bye "))
        })
    };
    std::thread::sleep(Duration::from_millis(1000));
    let (code, _, err) = up.cli(&["scale", "web", "2"]);
    assert_eq!(code, 0, "{err}");
    let mut gone = String::new();
    wait_for("an instance gone", Duration::from_secs(30), || {
        let now = instances(&up);
        match ids.iter().find(|i| !now.contains(i)) {
            Some(g) => {
                gone = g.clone();
                true
            }
            None => false,
        }
    });
    wait_for(
        "the leaving instance's last line, followed",
        Duration::from_secs(10),
        || followed.is_finished(),
    );
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        followed.join().unwrap(),
        "the follow stream never had the leaving instance's last line"
    );
    let (code, out, err) = up.cli(&["logs", "web", "--instance", &gone, "side"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("flight recorder"), "{err}");
    assert!(out.contains(&format!("{gone} side | bye {gone}")), "{out}");
    assert!(
        out.contains(&format!("{gone} side | started {gone}")),
        "{out}"
    );
    assert!(!out.contains(SECRET), "{out}");
}

/// Two instances; `side` says who it is, and what it is poked with.
fn small_fleet(ingress: u16, block: u8) -> String {
    format!(
        r#"
[fleet]
name = "flight"

[regions.local]
provider = "local"
subnet = "127.{block}.0.0/16"

[services.web]
regions = ["local"]
capacity = {{ min = 1, desired = 2, max = 3 }}
ingress = {{ listen = "127.0.0.1:{ingress}", component = "app", port = "http" }}

[services.web.rollout]
min_healthy_time = "0s"
drain_timeout = "1s"

[services.web.components.app]
runtime = "process"
version = "v1"
command = "{{drover}}"
args = ["demo-server", "--listen", "{{addr}}:{{port.http}}", "--message", "hi"]
ports = {{ http = 8080 }}
health = {{ type = "http", port = "http", path = "/healthz", interval = "200ms", timeout = "200ms", healthy_threshold = 1, unhealthy_threshold = 3 }}
stop_grace = "1s"

[services.web.components.side]
runtime = "process"
version = "v1"
command = "/bin/sh"
args = ["-c", "echo started $DROVER_INSTANCE; echo token is $API_TOKEN; trap 'echo bye from $DROVER_INSTANCE; exit 0' TERM; while true; do if [ -f poke ]; then echo poked $DROVER_INSTANCE with $(cat poke); rm -f poke; fi; sleep 0.05; done"]
secret_env = {{ API_TOKEN = "{SECRET}" }}
stop_grace = "1s"
"#
    )
}

/// Whether the server's flight recorder holds a tail of `instance`'s `side` with `text`.
fn tail_holds(up: &Up, instance: &str, text: &str) -> bool {
    let Ok(rd) = std::fs::read_dir(up.dir.join("data/flight")) else {
        return false;
    };
    rd.flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.contains(&format!("~{instance}~side~tail"))
            && std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(text))
    })
}

#[test]
fn the_flight_recorder_keeps_the_tail_of_a_sigkilled_agent_and_of_a_replaced_instance() {
    let dir = tempfile::tempdir().unwrap();
    let (api, ingress) = (free_port(), free_port());
    let up = Up::start(dir.path(), &small_fleet(ingress, subnet()), api, ingress);
    up.wait_healthy(2, Duration::from_secs(60));
    let ids = instances(&up);
    assert_eq!(ids.len(), 2, "{ids:?}");
    let (victim, leaver) = (&ids[0], &ids[1]);
    let poke = |i: &str, with: &str| {
        let p = up.dir.join("data.instances").join(i).join("side/poke");
        std::fs::write(p, with).unwrap();
    };

    // While the agents run, the server's copy of their tails follows what they print.
    poke(victim, "one");
    let t0 = Instant::now();
    wait_for(
        "the victim's tail at the server",
        Duration::from_secs(10),
        || tail_holds(&up, victim, &format!("poked {victim} with one")),
    );
    let took = t0.elapsed();
    eprintln!("a new line reached the server's tail after {took:?}");
    assert!(took < Duration::from_secs(3), "the tail lags: {took:?}");
    assert!(!tail_holds(&up, victim, SECRET), "the tail is scrubbed");

    // SIGKILL of the agent: it sends nothing more; what it sent is all there is.
    let pid: i32 =
        std::fs::read_to_string(up.dir.join("data.instances").join(victim).join("agent.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    assert!(pid > 1);
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    wait_for(
        "the killed instance replaced",
        Duration::from_secs(30),
        || {
            let now = instances(&up);
            !now.contains(victim) && now.len() == 2
        },
    );
    let (code, out, err) = up.cli(&["logs", "web", "--instance", victim, "side"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("flight recorder") && err.contains("killed"),
        "{err}"
    );
    for want in [
        format!("{victim} side | started {victim}"),
        format!("{victim} side | token is (secret)"),
        format!("{victim} side | poked {victim} with one"),
    ] {
        assert_eq!(out.matches(&want).count(), 1, "{want:?} once in: {out}");
    }
    assert!(!out.contains(SECRET), "{out}");

    // A deploy replaces the other: its final record and its tail show each line once, with
    // what it printed as it stopped.
    poke(leaver, "two");
    wait_for("the leaver's line", Duration::from_secs(10), || {
        tail_holds(&up, leaver, &format!("poked {leaver} with two"))
    });
    let (code, out, err) = up.cli(&["deploy", "web", "side", "v2", "--wait", "--timeout", "1m"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!instances(&up).contains(leaver));
    let (code, out, err) = up.cli(&["logs", "web", "--instance", leaver, "side"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("the instance left"), "{err}");
    for want in [
        format!("{leaver} side | started {leaver}"),
        format!("{leaver} side | poked {leaver} with two"),
        format!("{leaver} side | bye from {leaver}"),
    ] {
        assert_eq!(out.matches(&want).count(), 1, "{want:?} once in: {out}");
    }
    // By generation: both gone instances of generation 1.
    let (code, out, err) = up.cli(&["logs", "web", "--generation", "1", "side"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains(&format!("{victim} side | poked")), "{out}");
    assert!(out.contains(&format!("{leaver} side | poked")), "{out}");
}
