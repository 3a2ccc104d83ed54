//! Components as Docker containers, end to end against the real engine, with the real binary:
//! images built here and pushed to a registry on loopback, pulled and pinned by digest,
//! supervised through the engine's event stream, respawned, right-sized, adopted, cleaned up.
//!
//! Each test skips (saying why) when the machine has no Docker Engine, no `docker-registry` or no
//! static busybox, unless DROVER_CI=1, where that is a failure. Containers and images are named
//! `drover-test-*` and removed at the end, also when a test fails.

mod common;
mod docker_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bollard::Docker;
use common::{free_port, http, subnet, Up, BIN};
use docker_support as ds;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The engine, or None after printing why the test is skipped (a failure under DROVER_CI=1).
fn engine(test: &str) -> Option<Docker> {
    match rt().block_on(ds::prerequisites()) {
        Ok(d) => Some(d),
        Err(why) => {
            ds::skip(test, &why);
            None
        }
    }
}

use drover_test_support::wait_until as wait_for;

/// The running containers of `up`'s instances: (instance address, container id).
fn containers(docker: &Docker, up: &Up) -> Vec<(String, String)> {
    rt().block_on(async {
        let mut out = Vec::new();
        for id in ds::containers_under(docker, &up.dir).await {
            let i = ds::inspect(docker, &id).await;
            if i.state.as_ref().and_then(|s| s.running) != Some(true) {
                continue;
            }
            let ip = i
                .config
                .and_then(|c| c.env)
                .unwrap_or_default()
                .iter()
                .find_map(|e| e.strip_prefix("DROVER_ADDR=").map(str::to_string))
                .unwrap_or_default();
            out.push((ip, id));
        }
        out.sort();
        out
    })
}

/// Like [`wait_for`], telling what `up` shows (status, its log, the agents' logs) on timeout.
fn wait_up<T>(up: &Up, within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            let mut agents = String::new();
            if let Ok(entries) = std::fs::read_dir(up.dir.join("data.instances")) {
                for e in entries.flatten() {
                    for log in ["agent.log", "agent.err", "agent.out"] {
                        if let Ok(t) = std::fs::read_to_string(e.path().join(log)) {
                            agents.push_str(&format!("--- {}/{log}\n{t}\n", e.path().display()));
                        }
                    }
                }
            }
            panic!(
                "timed out ({within:?}) waiting for {what}\nstatus: {:#?}\nup.err:\n{}\n{agents}",
                up.status(),
                std::fs::read_to_string(up.dir.join("up.err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn events(up: &Up) -> String {
    let (code, out, err) = up.cli(&["events"]);
    assert_eq!(code, 0, "drover events: {err}");
    out
}

/// SIGKILL the container's main process; how long until `addr` answers 200 again (polled every
/// 2 ms once the process is gone, each try with a short timeout, as a client retrying would).
fn kill_and_time(docker: &Docker, id: &str, addr: &str) -> Duration {
    let pid = rt().block_on(ds::main_pid(docker, id));
    assert!(pid > 0);
    let t0 = Instant::now();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    eprintln!(
        "kill {pid} at {}.{:06} (unix)",
        wall.as_secs(),
        wall.subsec_micros()
    );
    // SAFETY: a pid the engine just gave us, of a container this test made.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    while common::alive(pid) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{pid} outlived SIGKILL"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    while ds::http_status(addr, "/") != Some(200) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{addr} never served again"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed()
}

/// Every agent log of `up`'s instances.
fn agent_logs(up: &Up) -> String {
    let mut out = String::new();
    if let Ok(entries) = std::fs::read_dir(up.dir.join("data.instances")) {
        for e in entries.flatten() {
            if let Ok(t) = std::fs::read_to_string(e.path().join("agent.log")) {
                out.push_str(&format!("--- {}\n{t}\n", e.path().display()));
            }
        }
    }
    out
}

/// The example's fleet file, on this test's registry, ports and loopback block.
fn example_fleet(registry: &str, image: &str, ingress_port: u16, block: u8) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/docker/drover.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let text = text
        .replace(
            "image = \"127.0.0.1:5000/drover-demo\"",
            &format!("image = \"{registry}/{image}\""),
        )
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{ingress_port}"))
        .replace(
            "provider = \"local\"",
            &format!("provider = \"local\"\nsubnet = \"127.{block}.0.0/16\""),
        )
        .replace("desired = 3", "desired = 2")
        .replace("min_healthy_time = \"2s\"", "min_healthy_time = \"1s\"")
        .replace("reset_after = \"1m\"", "reset_after = \"1s\"");
    assert!(text.contains(&format!("{registry}/{image}")));
    text
}

/// The example fleet, end to end: the demo server as a container behind the balancer, its image
/// pulled from the registry and pinned by digest; a killed container serves again within 1 s; a
/// deploy to a missing tag is refused before any instance is touched; a registry outage harms
/// nothing; stopping removes every container.
#[test]
fn docker_example_fleet_end_to_end() {
    let Some(docker) = engine("docker_example_fleet_end_to_end") else {
        return;
    };
    let _serial = ds::serial();
    let mut cleanup = ds::Cleanup::default();
    let mut registry = ds::Registry::start();
    let image = "drover-test-demo";
    rt().block_on(ds::drover_image(
        &docker,
        &registry,
        &mut cleanup,
        Path::new(BIN),
        image,
        &["v1", "v2"],
    ));
    let digest = registry.digest(image, "v1");
    let pinned = format!("{}/{image}@{digest}", registry.addr);

    let dir = tempfile::tempdir().unwrap();
    cleanup.dir(dir.path());
    let (api, ingress) = (free_port(), free_port());
    let text = example_fleet(&registry.addr, image, ingress, subnet());
    let mut up = Up::start(dir.path(), &text, api, ingress);
    wait_up(&up, Duration::from_secs(120), "2 healthy instances", || {
        let s = up.status()?;
        (s.groups
            .first()?
            .instances
            .iter()
            .filter(|i| i.in_rotation)
            .count()
            >= 2)
            .then_some(())
    });

    // Pull and pin: the plan names the digest, every container runs it, labelled.
    let (code, plan) = http(up.api, "GET", "/v1/plans/web/local/1", None).unwrap();
    assert_eq!(code, 200, "{plan}");
    assert!(plan.contains(&pinned), "the plan pins {pinned}: {plan}");
    let running = containers(&docker, &up);
    assert_eq!(running.len(), 2, "{running:?}");
    rt().block_on(async {
        for (_, id) in &running {
            let i = ds::inspect(&docker, id).await;
            let cfg = i.config.unwrap();
            assert_eq!(cfg.image.as_deref(), Some(pinned.as_str()));
            let labels = cfg.labels.unwrap();
            assert_eq!(labels["drover.fleet"], "docker-demo");
            assert_eq!(labels["drover.service"], "web");
            assert_eq!(labels["drover.component"], "app");
            assert_eq!(labels["drover.generation"], "1");
            assert!(labels["drover.instance"].starts_with("i-"));
            let host = i.host_config.unwrap();
            assert_eq!(host.memory, Some(64 << 20), "memory = 64m");
            assert_eq!(host.nano_cpus, Some(500_000_000), "cpus = 0.5");
            assert_eq!(
                host.restart_policy
                    .and_then(|r| r.name)
                    .map(|n| n.to_string()),
                Some("no".to_string()),
                "the agent restarts containers, not Docker"
            );
            assert_eq!(
                host.log_config.and_then(|l| l.typ).as_deref(),
                Some("json-file")
            );
            assert_eq!(host.network_mode.as_deref(), Some("host"));
        }
    });
    let body = common::get(up.ingress).unwrap();
    assert!(body.contains("container on 127."), "{body}");

    // Kill one container's main process: its instance serves again within 1 s.
    let (addr, id) = running[0].clone();
    let instance: std::net::SocketAddr = format!("{addr}:8080").parse().unwrap();
    // The engine's own start of the container is most of it, and slows down when the machine
    // is busy: the best of three kills (each a first restart) must be under 1 s.
    let mut times = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1100)); // > reset_after: an immediate restart
        times.push(kill_and_time(&docker, &id, &instance.to_string()));
        if times.last().unwrap() < &Duration::from_secs(1) {
            break;
        }
    }
    eprintln!("killed container serving again after {times:?}");
    assert!(
        times.iter().any(|t| *t < Duration::from_secs(1)),
        "serving again after {times:?}\n{}",
        agent_logs(&up)
    );
    wait_for(Duration::from_secs(10), "a respawned event", || {
        events(&up).contains("restarted by its agent").then_some(())
    });
    assert!(events(&up).contains("signal 9"), "{}", events(&up));

    // A deploy to a tag the registry does not have is refused; nothing changes.
    let before = containers(&docker, &up);
    let (code, _, err) = up.cli(&["deploy", "web", "app", "v404"]);
    assert_ne!(code, 0);
    assert!(err.contains("not found") && err.contains("v404"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    let s = up.status().unwrap();
    assert_eq!(s.groups[0].generation, 1);
    assert_eq!(containers(&docker, &up), before);

    // Registry outage: running containers are untouched, a restart uses the local image, and a
    // deploy that needs the registry is refused with the reason.
    registry.stop();
    std::thread::sleep(Duration::from_millis(1200)); // > reset_after: an immediate restart
    kill_and_time(&docker, &id, &instance.to_string());
    let (code, _, err) = up.cli(&["deploy", "web", "app", "v2"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach the registry"), "{err}");
    assert_eq!(containers(&docker, &up).len(), 2);
    assert_eq!(up.status().unwrap().groups[0].generation, 1);
    assert!(common::get(up.ingress).is_ok());
    registry.restart();

    // A deploy drains each stale container: the example's drain_signal (SIGUSR1) goes to the
    // container's main process through the engine, and the drain ends at once.
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait", "--timeout", "2m"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, ev, _) = up.cli(&["events", "--kind", "drained", "--json"]);
    let drained: Vec<drover_model::Event> = serde_json::from_str(&ev).unwrap();
    assert_eq!(drained.len(), 2, "{ev}");
    for d in &drained {
        assert!(
            d.message.starts_with("drained in")
                && d.message.contains("drain signal: app (SIGUSR1)"),
            "{}\n{}",
            d.message,
            agent_logs(&up)
        );
    }
    assert!(out.contains("2 stale instance(s) drained in"), "{out}");

    // Stopping removes every container.
    up.signal(libc::SIGTERM);
    assert_eq!(up.wait_exit(Duration::from_secs(60)), Some(0));
    let left = rt().block_on(ds::containers_under(&docker, &up.dir));
    assert!(
        left.is_empty(),
        "containers left after drover up stopped: {left:?}"
    );
}

/// A fleet of busybox containers: an OOM kill and two kinds of unhealthiness, each restarted by
/// the agent and told as events.
fn busybox_fleet(image: &str, ingress_port: u16, block: u8) -> String {
    format!(
        r#"[fleet]
name = "bb"

[regions.local]
provider = "local"
subnet = "127.{block}.0.0/16"

[services.web]
regions = ["local"]
capacity = {{ min = 1, desired = 1, max = 1 }}
ingress = {{ listen = "127.0.0.1:{ingress_port}", component = "web", port = "http" }}
replace_unhealthy_after = "5m"

[services.web.components.web]
runtime = "docker"
version = "v1"
image = "{image}"
command = "sh"
args = ["-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www"]
ports = {{ http = 8080 }}
container_ports = {{ http = 80 }}
health = {{ type = "tcp", port = "http", interval = "200ms", timeout = "150ms" }}

# Fills its memory 3 s after it starts: OOM-killed at its limit.
[services.web.components.hog]
runtime = "docker"
version = "v1"
image = "{image}"
command = "sh"
args = ["-c", "echo hog: filling memory >&2; sleep 3; x=0123456789abcdef; while true; do x=$x$x; done"]
memory = "16m"
# A check of its own that passes while it runs (else the image's HEALTHCHECK, which this one
# fails, would restart it first).
health = {{ type = "exec", command = ["true"], interval = "1s", timeout = "1s" }}
restart = {{ initial_delay = "200ms", max_delay = "1s", reset_after = "1s" }}

# drover's own exec check, run inside the container: fails once /tmp/healthy is gone.
[services.web.components.sick]
runtime = "docker"
version = "v1"
image = "{image}"
command = "sh"
args = ["-c", "touch /tmp/healthy; sleep 3; rm /tmp/healthy; sleep 1000"]
health = {{ type = "exec", command = ["test", "-f", "/tmp/healthy"], interval = "1s", timeout = "1s", unhealthy_threshold = 2 }}
restart = {{ initial_delay = "200ms", max_delay = "1s", reset_after = "1s" }}

# No check of drover's: the image's HEALTHCHECK, seen through the engine's events.
[services.web.components.imagecheck]
runtime = "docker"
version = "v1"
image = "{image}"
command = "sh"
args = ["-c", "touch /tmp/healthy; sleep 4; rm /tmp/healthy; sleep 1000"]
restart = {{ initial_delay = "200ms", max_delay = "1s", reset_after = "1s" }}
"#
    )
}

#[test]
fn oom_kills_and_unhealthy_containers_are_restarted_and_told() {
    let test = "oom_kills_and_unhealthy_containers_are_restarted_and_told";
    let Some(docker) = engine(test) else {
        return;
    };
    let _serial = ds::serial();
    let mut cleanup = ds::Cleanup::default();
    let registry = ds::Registry::start();
    let (reference, _) = rt().block_on(ds::busybox_image(
        &docker,
        &registry,
        &mut cleanup,
        "drover-test-bb-health",
        "v1",
        "HEALTHCHECK --interval=1s --timeout=2s --retries=1 CMD [\"test\", \"-f\", \"/tmp/healthy\"]",
    ));
    let image = reference.rsplit_once(':').unwrap().0.to_string();
    let dir = tempfile::tempdir().unwrap();
    cleanup.dir(dir.path());
    let (api, ingress) = (free_port(), free_port());
    let up = Up::start(
        dir.path(),
        &busybox_fleet(&image, ingress, subnet()),
        api,
        ingress,
    );
    let report = |name: &str| {
        up.status().and_then(|s| {
            s.groups
                .first()?
                .instances
                .first()?
                .components
                .iter()
                .find(|c| c.name == name)
                .cloned()
        })
    };
    let c = wait_up(
        &up,
        Duration::from_secs(90),
        "the OOM kill to be reported",
        || report("hog").filter(|c| c.restarts >= 1),
    );
    let exit = c.last_exit.unwrap_or_default();
    assert!(
        exit.contains("out of memory") && exit.contains("16.0 MiB"),
        "{exit}"
    );
    // What it printed, through the engine's logs API (stderr included).
    let printed = c.last_output.unwrap_or_default();
    assert!(printed.contains("hog: filling memory"), "{printed:?}");
    wait_for(
        Duration::from_secs(30),
        "an event naming the OOM kill",
        || {
            let e = events(&up);
            (e.contains("component hog restarted by its agent") && e.contains("out of memory"))
                .then_some(())
        },
    );

    let c = wait_up(
        &up,
        Duration::from_secs(60),
        "the exec check's restart",
        || report("sick").filter(|c| c.restarts >= 1),
    );
    let msg = c.message.unwrap_or_default();
    assert!(
        msg.contains("health check") && msg.contains("exec test"),
        "{msg}"
    );

    let c = wait_up(
        &up,
        Duration::from_secs(60),
        "the HEALTHCHECK's restart",
        || report("imagecheck").filter(|c| c.restarts >= 1),
    );
    let msg = c.message.unwrap_or_default();
    assert!(msg.contains("HEALTHCHECK"), "{msg}");
    wait_for(Duration::from_secs(30), "events of the restarts", || {
        let e = events(&up);
        (e.contains("component sick restarted by its agent")
            && e.contains("component imagecheck restarted by its agent"))
        .then_some(())
    });
    // The web component was never touched, and its port, published by Docker on the instance's
    // address (bridge network, container_ports), serves. (Through the balancer only while the
    // whole instance is healthy, which its sick components do not let it be for long.)
    assert_eq!(report("web").unwrap().restarts, 0);
    let addr = up.status().unwrap().groups[0].instances[0].addr.clone();
    assert_eq!(
        ds::http_body(&format!("{addr}:8080"), "/").as_deref(),
        Some("ok\n")
    );
}

/// A standalone `drover agent` (no server) for one instance, as its own process.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, instance: &str, addr: &str, plan: &Path, env: &[(&str, &str)]) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.with_extension(format!("{}.log", std::process::id() ^ free_port() as u32));
        let child = Command::new(BIN)
            .args([
                "agent",
                "--instance",
                instance,
                "--group",
                "web/local",
                "--addr",
                addr,
            ])
            .arg("--standalone")
            .arg("--plan-file")
            .arg(plan)
            .arg("--dir")
            .arg(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the agent crashes; its containers stay.
    fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: a graceful stop.
    fn stop(&mut self) {
        // SAFETY: our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "agent did not stop: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.crash();
        }
    }
}

/// A plan with one busybox httpd component on port 8080 of the instance.
fn httpd_plan(dir: &Path, image: &str, pinned: &str) -> PathBuf {
    let plan = serde_json::json!({
        "fleet": "standalone", "service": "web", "region": "local", "generation": 3, "revision": 1,
        "components": [{
            "name": "app", "runtime": "docker", "version": "v1", "command": "sh",
            "args": ["-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 8080 -h /www"],
            "ports": { "http": 8080 },
            "health": { "type": "http", "port": "http", "path": "/", "interval": "200ms" },
            "restart": { "initial_delay": "200ms", "max_delay": "2s", "reset_after": "1s" },
            "stop_grace": "1s", "stop_signal": "SIGTERM",
            "docker": { "image": image, "pinned": pinned }
        }]
    });
    let path = dir.join("plan.json");
    std::fs::write(&path, plan.to_string()).unwrap();
    path
}

fn started_at(docker: &Docker, id: &str) -> String {
    rt().block_on(ds::inspect(docker, id))
        .state
        .and_then(|s| s.started_at)
        .unwrap_or_default()
}

/// A restarted agent adopts its running container (no restart, no duplicate); a crashed
/// agent's container is removed by the agent of another instance; with the registry down, a
/// new instance starts from the image already here.
#[test]
fn restarted_agent_adopts_and_orphans_are_cleaned_up() {
    let test = "restarted_agent_adopts_and_orphans_are_cleaned_up";
    let Some(docker) = engine(test) else {
        return;
    };
    let _serial = ds::serial();
    let mut cleanup = ds::Cleanup::default();
    let mut registry = ds::Registry::start();
    let (reference, pinned) = rt().block_on(ds::busybox_image(
        &docker,
        &registry,
        &mut cleanup,
        "drover-test-bb-adopt",
        "v1",
        "",
    ));
    let root = tempfile::tempdir().unwrap();
    cleanup.dir(root.path());
    let plan = httpd_plan(root.path(), &reference, &pinned);
    let (dir_a, dir_b) = (root.path().join("i-a"), root.path().join("i-b"));
    let (addr_a, addr_b) = (
        ds::instance_addr().to_string(),
        ds::instance_addr().to_string(),
    );
    let serving = |addr: &str| ds::http_status(&format!("{addr}:8080"), "/") == Some(200);

    let mut a = Agent::start(&dir_a, "i-a", &addr_a, &plan, &[]);
    wait_for(Duration::from_secs(60), "instance a to serve", || {
        serving(&addr_a).then_some(())
    });
    let ids = rt().block_on(ds::containers_under(&docker, &dir_a));
    assert_eq!(ids.len(), 1, "{ids:?}");
    let id = ids[0].clone();
    let since = started_at(&docker, &id);

    // The agent crashes; its container keeps serving; a new agent adopts it as it is.
    a.crash();
    assert!(serving(&addr_a));
    let a2 = Agent::start(&dir_a, "i-a", &addr_a, &plan, &[]);
    wait_for(
        Duration::from_secs(20),
        "the container to be adopted",
        || a2.log().contains("running container adopted").then_some(()),
    );
    assert_eq!(
        rt().block_on(ds::containers_under(&docker, &dir_a)),
        vec![id.clone()]
    );
    assert_eq!(started_at(&docker, &id), since, "adopted, not restarted");
    assert!(serving(&addr_a));
    let mut a2 = a2;

    // The registry goes away; instance a's agent crashes for good. Instance b starts from the
    // local image, and its agent removes a's orphaned container.
    registry.stop();
    a2.crash();
    let mut b = Agent::start(&dir_b, "i-b", &addr_b, &plan, &[]);
    wait_for(
        Duration::from_secs(30),
        "instance b to serve without a registry",
        || serving(&addr_b).then_some(()),
    );
    assert!(!b.log().contains("pulling"), "{}", b.log());
    wait_for(
        Duration::from_secs(40),
        "the orphaned container to be removed",
        || {
            rt().block_on(ds::containers_under(&docker, &dir_a))
                .is_empty()
                .then_some(())
        },
    );
    assert!(
        b.log()
            .contains("removed a container left by an agent that is gone"),
        "{}",
        b.log()
    );

    // A graceful stop removes the instance's container.
    b.stop();
    assert!(rt()
        .block_on(ds::containers_under(&docker, &dir_b))
        .is_empty());
}

/// The engine goes away (its socket, through a proxy the test controls) while a container dies:
/// nothing happens until it is back; then the agent reconnects, reconciles and restarts it.
#[test]
fn engine_outage_is_survived() {
    let test = "engine_outage_is_survived";
    let Some(docker) = engine(test) else {
        return;
    };
    let _serial = ds::serial();
    let mut cleanup = ds::Cleanup::default();
    let registry = ds::Registry::start();
    let (reference, pinned) = rt().block_on(ds::busybox_image(
        &docker,
        &registry,
        &mut cleanup,
        "drover-test-bb-outage",
        "v1",
        "",
    ));
    let root = tempfile::tempdir().unwrap();
    cleanup.dir(root.path());
    let plan = httpd_plan(root.path(), &reference, &pinned);
    let sock = root.path().join("engine.sock");
    let proxy = ds::SocketProxy::start(&sock, Path::new("/var/run/docker.sock"));
    let addr = ds::instance_addr().to_string();
    let serving = || ds::http_status(&format!("{addr}:8080"), "/") == Some(200);
    let host = format!("unix://{}", sock.display());
    let dir = root.path().join("i-e");
    let mut agent = Agent::start(&dir, "i-e", &addr, &plan, &[("DOCKER_HOST", &host)]);
    wait_for(Duration::from_secs(60), "the container to serve", || {
        serving().then_some(())
    });
    let id = rt().block_on(ds::containers_under(&docker, &dir))[0].clone();

    proxy.down();
    let pid = rt().block_on(ds::main_pid(&docker, &id));
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    while !agent.log().contains("does not answer") {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the agent did not notice the engine is gone:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(!serving(), "nothing restarts it while the engine is away");

    proxy.up();
    let t0 = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "the container to be restarted",
        || serving().then_some(()),
    );
    eprintln!(
        "serving again {:?} after the engine came back",
        t0.elapsed()
    );
    wait_for(
        Duration::from_secs(10),
        "the event stream to be back",
        || agent.log().contains("answers again").then_some(()),
    );
    // Events flow again: a kill now is seen as the container's exit (its `die` event), not
    // later as a failed health check.
    let pid = rt().block_on(ds::main_pid(&docker, &id));
    std::thread::sleep(Duration::from_millis(1100)); // > reset_after: an immediate restart
    let seen = agent.log().matches("component exited; restarting").count();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for(
        Duration::from_secs(20),
        "the container to serve after a kill",
        || (rt().block_on(ds::main_pid(&docker, &id)) != pid && serving()).then_some(()),
    );
    assert_eq!(
        agent.log().matches("component exited; restarting").count(),
        seen + 1,
        "{}",
        agent.log()
    );
    agent.stop();
    assert!(rt()
        .block_on(ds::containers_under(&docker, &dir))
        .is_empty());
}

/// One container that serves (so the instance turns healthy) and one that prints: who it is,
/// a secret, a line each time /tmp/poke appears, and a last word at its stop.
fn printing_fleet(image: &str, ingress_port: u16, block: u8) -> String {
    format!(
        r#"[fleet]
name = "ops"

[regions.local]
provider = "local"
subnet = "127.{block}.0.0/16"

[services.web]
regions = ["local"]
capacity = {{ min = 1, desired = 1, max = 2 }}
ingress = {{ listen = "127.0.0.1:{ingress_port}", component = "web", port = "http" }}

[services.web.rollout]
min_healthy_time = "0s"
drain_timeout = "1s"

[services.web.components.web]
runtime = "docker"
version = "v1"
image = "{image}"
command = "sh"
args = ["-c", "mkdir -p /www && echo ok > /www/index.html && exec httpd -f -p 80 -h /www"]
ports = {{ http = 8080 }}
container_ports = {{ http = 80 }}
health = {{ type = "tcp", port = "http", interval = "200ms", timeout = "150ms" }}

[services.web.components.app]
runtime = "docker"
version = "v1"
image = "{image}"
command = "sh"
args = ["-c", "mkdir -p /tmp; echo started $DROVER_INSTANCE; echo token is $API_TOKEN; echo oops >&2; trap 'echo bye from $DROVER_INSTANCE; exit 0' TERM; while true; do if [ -f /tmp/poke ]; then rm /tmp/poke; echo poked $DROVER_INSTANCE; fi; sleep 0.1; done"]
secret_env = {{ API_TOKEN = "{DOCKER_SECRET}" }}
stop_grace = "2s"
"#
    )
}

const DOCKER_SECRET: &str = "d0ck3r-s3cr3t-value";

/// `drover exec ARGS` with `input` on its stdin: (exit code, stdout).
fn exec_with_input(up: &Up, args: &[&str], input: &[u8]) -> (i32, String) {
    use std::io::Write;
    let mut c = Command::new(BIN)
        .arg("exec")
        .args(args)
        .env("DROVER_SERVER", up.server())
        .env("DROVER_DATA_DIR", up.dir.join("data"))
        .env_remove("DROVER_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input).unwrap();
    let o = c.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn container_logs_exec_and_flight_records_through_the_engine() {
    let test = "container_logs_exec_and_flight_records_through_the_engine";
    let Some(docker) = engine(test) else {
        return;
    };
    let _serial = ds::serial();
    let mut cleanup = ds::Cleanup::default();
    let registry = ds::Registry::start();
    let mut image = String::new();
    for tag in ["v1", "v2"] {
        let (reference, _) = rt().block_on(ds::busybox_image(
            &docker,
            &registry,
            &mut cleanup,
            "drover-test-bb-ops",
            tag,
            "",
        ));
        image = reference.rsplit_once(':').unwrap().0.to_string();
    }
    let dir = tempfile::tempdir().unwrap();
    cleanup.dir(dir.path());
    let (api, ingress) = (free_port(), free_port());
    let up = Up::start(
        dir.path(),
        &printing_fleet(&image, ingress, subnet()),
        api,
        ingress,
    );
    up.wait_healthy(1, Duration::from_secs(90));
    let first = up.status().unwrap().groups[0].instances[0].id.clone();

    // Logs through the engine's logs API: both streams, prefixed, the secret replaced.
    let out = wait_up(
        &up,
        Duration::from_secs(20),
        "the container's lines",
        || {
            let (_, out, _) = up.cli(&["logs", "web", "app"]);
            out.contains(&format!("{first} app | started {first}"))
                .then_some(out)
        },
    );
    assert!(
        out.contains(&format!("{first} app | token is (secret)")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{first} app | oops")),
        "stderr too: {out}"
    );
    assert!(!out.contains(DOCKER_SECRET), "{out}");

    // Exec inside the container (its environment, the engine's exec), the exit code passed.
    let (code, out, err) = up.cli(&[
        "exec",
        "web",
        "app",
        "--",
        "sh",
        "-c",
        "test -f /.dockerenv && echo inside $DROVER_INSTANCE; echo $API_TOKEN; exit 3",
    ]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains(&format!("inside {first}")), "{out}");
    assert!(
        out.contains("(secret)") && !out.contains(DOCKER_SECRET),
        "{out}"
    );
    // -t: the engine's tty; -i: the input reaches the command, its end closes it.
    let terminal = "if [ -t 0 ] && [ -t 1 ]; then echo a terminal; else echo no terminal; fi";
    let (code, out, err) = up.cli(&["exec", "-t", "web", "app", "--", "sh", "-c", terminal]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("a terminal") && !out.contains("no terminal"),
        "{out}"
    );
    let (_, out, _) = up.cli(&["exec", "web", "app", "--", "sh", "-c", terminal]);
    assert!(out.contains("no terminal"), "without -t: {out}");
    let (code, out) = exec_with_input(&up, &["-i", "web", "app", "--", "cat"], b"hi there\n");
    assert_eq!((code, out.as_str()), (0, "hi there\n"));
    // -it on a terminal: the engine's tty of the terminal's size, resized with it.
    common::it_on_a_terminal(&up, &["web", "app"]);

    // The server's copy of the container's tail follows it (the engine read every second).
    let (code, _, err) = up.cli(&["exec", "web", "app", "--", "touch", "/tmp/poke"]);
    assert_eq!(code, 0, "{err}");
    wait_up(
        &up,
        Duration::from_secs(10),
        "the poke in the server's tail",
        || {
            std::fs::read_dir(up.dir.join("data/flight"))
                .ok()?
                .flatten()
                .any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .contains(&format!("~{first}~app~tail"))
                        && std::fs::read_to_string(e.path())
                            .is_ok_and(|t| t.contains(&format!("poked {first}")))
                })
                .then_some(())
        },
    );

    // Replaced by a deploy: its final record, read before its container was removed, holds its
    // last word; each line once.
    let (code, out, err) = up.cli(&["deploy", "web", "app", "v2", "--wait", "--timeout", "2m"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = up.cli(&["logs", "web", "--instance", &first, "app"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("the instance left"), "{err}");
    for want in [
        format!("{first} app | started {first}"),
        format!("{first} app | poked {first}"),
        format!("{first} app | bye from {first}"),
    ] {
        assert_eq!(out.matches(&want).count(), 1, "{want:?} once in: {out}");
    }
    assert!(!out.contains(DOCKER_SECRET), "{out}");
}
