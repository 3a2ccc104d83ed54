//! drover on AWS, end to end against moto (EC2, Auto Scaling, ELBv2 on loopback): the real
//! `drover server` (built with `--features aws`) drives real SDK calls; simulated agents
//! speak for the moto instances (moto runs no machines): they read their instance's
//! user-data (the boot document), heartbeat with the group's token, follow permits, and
//! leave through TerminateInstanceInAutoScalingGroup as `drover agent --aws` does, lowering
//! the group's capacity or not as the permit says. One group runs the real agent.
//!
//! Needs moto (PyPI `moto[server]`); skips with a reason without it, fails under
//! DROVER_CI=1.
#![cfg(feature = "aws")]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{free_port, http, register_api, BIN};
use drover_aws::sdk_autoscaling::types as asgt;
use drover_aws::sdk_ec2::types as ec2t;
use drover_aws::sdk_elbv2::types as elbt;
use drover_aws::Clients;
use drover_model::api::{AgentPhase, ComponentState, FleetStatus};
use drover_model::boot::BootDoc;
use drover_test_support::agent as api;
use drover_test_support::fake_http::{Answer, FakeHttp};
use drover_test_support::wait_until_or;

const FLEET: &str = "shop";
/// drover region → AWS region.
const REGIONS: [(&str, &str); 2] = [("use1", "us-east-1"), ("euw1", "eu-west-1")];

struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    fn start(dir: &Path) -> Option<Moto> {
        let found = Command::new("python3")
            .args(["-c", "import moto.server, werkzeug"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            let why = "moto's server is not installed (pip install 'moto[server]')";
            if std::env::var("DROVER_CI").is_ok_and(|v| v == "1") {
                panic!("{why}; DROVER_CI=1 makes this test mandatory");
            }
            eprintln!("skipping: {why}");
            return None;
        }
        let port = free_port();
        // moto's own server, with a fix for one of its bugs (see the script).
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/aws_support/moto_server.py");
        let child = Command::new("python3")
            .arg(script)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::fs::File::create(dir.join("moto.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("moto.err")).unwrap())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Server {
    child: Child,
    api: SocketAddr,
    dir: std::path::PathBuf,
}

impl Server {
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(BIN)
            .args(args)
            .env("DROVER_SERVER", format!("http://{}", self.api))
            .env("DROVER_DATA_DIR", self.dir.join("data"))
            .env_remove("DROVER_TOKEN")
            .current_dir(&self.dir)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn status(&self) -> FleetStatus {
        let (code, body) = http(self.api, "GET", "/v1/status", None).unwrap();
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn events(&self) -> String {
        let (_, body) = http(self.api, "GET", "/v1/events?limit=10000", None).unwrap();
        let events: Vec<drover_model::Event> = serde_json::from_str(&body).unwrap_or_default();
        events
            .iter()
            .map(|e| {
                format!(
                    "{} {} {} {}",
                    e.kind.as_str(),
                    e.group.as_deref().unwrap_or("-"),
                    e.instance.as_deref().unwrap_or("-"),
                    e.message
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the simulated agents saw, for the assertions.
#[derive(Default)]
struct Seen {
    /// Instances that left on a permit (simulated agents), and whether they lowered the
    /// desired capacity (the permit's `decrement`).
    left: Vec<(String, bool)>,
    started: BTreeSet<String>,
    /// Real `drover agent --aws` processes (for the `jobs` group), by instance.
    real: Vec<(String, Child)>,
}

/// One simulated agent per instance of drover's groups: it reads its instance's user-data,
/// reports healthy (unhealthy when its plan runs version "broken"), follows its permit, then
/// terminates its instance through the Auto Scaling API.
async fn run_agents(
    clients: Vec<(String, Clients)>,
    server: String,
    moto: String,
    work: std::path::PathBuf,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let http = reqwest::Client::new();
    // The simulated agents, ended when the run is.
    let mut agents = tokio::task::JoinSet::new();
    // The real agents' metadata services, stopped when the run ends (the agents are gone).
    let mut metadata = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for (region, c) in &clients {
            let Ok(groups) = drover_aws::group::describe_fleet(c, FLEET, region).await else {
                continue;
            };
            for g in groups {
                for i in g.instances.iter().filter(|i| !i.leaving()) {
                    if seen.lock().unwrap().started.contains(&i.id) {
                        continue;
                    }
                    let boot = boot_of(c, &i.id).await;
                    assert_eq!(boot.server, server, "the boot document names the server");
                    // What IMDS's local-ipv4 would say.
                    let facts = drover_aws::group::instances(c, std::slice::from_ref(&i.id)).await;
                    let Some(addr) = facts.as_ref().ok().and_then(|f| f.get(&i.id)?.addr) else {
                        eprintln!("{}: no address: {facts:?}", i.id);
                        continue;
                    };
                    eprintln!(
                        "{}: simulated agent starts ({addr}, generation {})",
                        i.id, boot.generation
                    );
                    seen.lock().unwrap().started.insert(i.id.clone());
                    if boot.group.starts_with("jobs/") {
                        // The real agent, as on EC2: metadata from (a stand-in for) IMDSv2,
                        // Auto Scaling calls to moto.
                        let meta =
                            imds(i.id.clone(), addr.to_string(), user_data_of(c, &i.id).await)
                                .await;
                        let dir = work.join(format!("agent-{}", i.id));
                        let child = Command::new(BIN)
                            .args(["agent", "--aws", "--imds-endpoint"])
                            .arg(meta.url())
                            .arg("--dir")
                            .arg(&dir)
                            .env("AWS_ENDPOINT_URL", &moto)
                            .env_remove("AWS_EC2_METADATA_DISABLED")
                            .stdout(Stdio::null())
                            .stderr(
                                std::fs::File::create(format!("{}.err", dir.display())).unwrap(),
                            )
                            .spawn()
                            .unwrap();
                        seen.lock().unwrap().real.push((i.id.clone(), child));
                        metadata.push(meta);
                        continue;
                    }
                    agents.spawn(agent(
                        i.id.clone(),
                        addr.to_string(),
                        boot,
                        c.clone(),
                        http.clone(),
                        seen.clone(),
                    ));
                }
            }
        }
        // An agent that panicked fails the test here.
        while let Some(done) = agents.try_join_next() {
            if let Err(e) = done {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agents.shutdown().await;
    for meta in metadata {
        meta.stop().await;
    }
}

async fn agent(
    id: String,
    addr: String,
    boot: BootDoc,
    c: Clients,
    http: reqwest::Client,
    seen: Arc<Mutex<Seen>>,
) {
    let plan = boot.plan.clone().expect("the plan is in the user-data");
    let version = plan.components[0].version.clone();
    let token = boot
        .token
        .clone()
        .expect("the boot document carries the join token");
    let instance = api::Instance {
        id: &id,
        group: &boot.group,
        generation: plan.generation,
        addr: &addr,
    };
    let state = if version == "broken" {
        ComponentState::Unhealthy
    } else {
        ComponentState::Healthy
    };
    let beat = |seq: u64, phase: AgentPhase| {
        let app = api::component(&plan.components[0].name, &version, state);
        api::heartbeat(instance, phase, seq, vec![app])
    };
    let (urls, auth) = (api::Urls::new(&boot.server), api::bearer(&token));
    let auth = Some(auth.as_str());
    let within = Duration::from_secs(10);
    let mut seq = 0;
    // Until the server has recorded the launch, the instance is unknown to it.
    let mut known = false;
    let decrement = loop {
        seq += 1;
        let hb = beat(seq, AgentPhase::Running);
        match api::send_heartbeat(&http, &urls, auth, &hb, within).await {
            Ok(reply) => known |= reply.is_some_and(|r| r.known),
            Err(e) => eprintln!("{id}: heartbeat: {e}"),
        }
        if !known {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        match api::poll_permit(&http, &urls, auth, &id, 300).await {
            // As `drover agent --aws`: the permit says, else the boot document.
            Ok(p) if p.permit => break p.decrement.unwrap_or(boot.decrement_on_leave),
            Err(e) if e.is_not_found() => return, // forgotten
            _ => {}
        }
    };
    // Leave path: draining until the load balancer holds nothing, then stop and go.
    seq += 1;
    let hb = beat(seq, AgentPhase::Draining);
    let _ = api::send_heartbeat(&http, &urls, auth, &hb, within).await;
    for _ in 0..50 {
        let open = api::open_connections(&http, &urls, auth, &id, within).await;
        if open.is_ok_and(|n| n == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Err(e) = drover_aws::instance::leave(&c, &id, decrement).await {
        eprintln!("{id}: leaving: {e}");
        return;
    }
    seen.lock().unwrap().left.push((id.clone(), decrement));
}

/// The boot document in an instance's user-data (what IMDS would give its agent).
async fn boot_of(c: &Clients, id: &str) -> BootDoc {
    BootDoc::decode(&user_data_of(c, id).await).expect("user-data is a boot document")
}

/// An instance's user-data, as text.
async fn user_data_of(c: &Clients, id: &str) -> String {
    let attr = c
        .ec2
        .describe_instance_attribute()
        .instance_id(id)
        .attribute(ec2t::InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let b64 = attr.user_data().and_then(|u| u.value()).expect("user-data");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

/// A stand-in for the instance metadata service (IMDSv2: a session token first, then each
/// value with it; nothing without it) of one moto instance. Its owner stops it.
async fn imds(instance: String, addr: String, user_data: String) -> FakeHttp {
    const TOKEN: &str = "imds-session-token";
    const TTL: &str = "x-aws-ec2-metadata-token-ttl-seconds";
    FakeHttp::start(move |r| {
        let answer = |status: u16, ttl: &str, body: &str| Answer::Full {
            status,
            headers: vec![
                ("content-type".into(), "text/plain; charset=utf-8".into()),
                (TTL.into(), ttl.into()),
            ],
            body: body.into(),
        };
        let ok = |body: &str| answer(200, "21600", body);
        let token = r.header("x-aws-ec2-metadata-token");
        match (r.method.as_str(), r.path.as_str()) {
            // The session token, and (as IMDS does) its lifetime in a header.
            ("PUT", "/latest/api/token") if r.header(TTL).is_some() => ok(TOKEN),
            ("GET", _) if token != Some(TOKEN) => answer(401, "0", ""),
            ("GET", "/latest/meta-data/instance-id") => ok(&instance),
            ("GET", "/latest/meta-data/local-ipv4") => ok(&addr),
            ("GET", "/latest/user-data") => ok(&user_data),
            _ => answer(404, "0", ""),
        }
    })
    .await
}

struct RegionSetup {
    subnets: Vec<String>,
    sg: String,
    ami: String,
}

async fn setup_region(c: &Clients) -> RegionSetup {
    let subnets: Vec<String> = c
        .ec2
        .describe_subnets()
        .send()
        .await
        .unwrap()
        .subnets()
        .iter()
        .filter_map(|s| s.subnet_id().map(str::to_string))
        .take(2)
        .collect();
    assert_eq!(subnets.len(), 2, "moto's default VPC has subnets");
    let sg = c
        .ec2
        .describe_security_groups()
        .send()
        .await
        .unwrap()
        .security_groups()
        .iter()
        .find_map(|g| g.group_id().map(str::to_string))
        .unwrap();
    let ami = c
        .ec2
        .describe_images()
        .send()
        .await
        .unwrap()
        .images()
        .iter()
        .find_map(|i| i.image_id().map(str::to_string))
        .unwrap();
    RegionSetup { subnets, sg, ami }
}

/// Resources of another team in the same account: destroy must leave them alone.
async fn foreign(c: &Clients, s: &RegionSetup) {
    let lt = c
        .ec2
        .create_launch_template()
        .launch_template_name("other-team-lt")
        .launch_template_data(
            ec2t::RequestLaunchTemplateData::builder()
                .image_id(&s.ami)
                .instance_type(ec2t::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let lt_id = lt
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_string();
    c.asg
        .create_auto_scaling_group()
        .auto_scaling_group_name("other-team-asg")
        .launch_template(
            asgt::LaunchTemplateSpecification::builder()
                .launch_template_id(lt_id)
                .version("1")
                .build(),
        )
        .min_size(1)
        .max_size(2)
        .desired_capacity(1)
        .vpc_zone_identifier(s.subnets[0].clone())
        .tags(
            asgt::Tag::builder()
                .key("team")
                .value("other")
                .resource_id("other-team-asg")
                .resource_type("auto-scaling-group")
                .propagate_at_launch(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    c.elb
        .create_load_balancer()
        .name("other-team-nlb")
        .r#type(elbt::LoadBalancerTypeEnum::Network)
        .set_subnets(Some(s.subnets.clone()))
        .send()
        .await
        .unwrap();
}

fn fleet_file(setups: &BTreeMap<&str, RegionSetup>, endpoint: &str) -> String {
    let mut text = format!("[fleet]\nname = \"{FLEET}\"\n\n");
    for (name, aws) in REGIONS {
        let s = &setups[name];
        text.push_str(&format!(
            "[regions.{name}]\nprovider = \"aws\"\naws_region = \"{aws}\"\nendpoint = \"{endpoint}\"\nsubnets = [\"{}\", \"{}\"]\nsecurity_groups = [\"{}\"]\nami = \"{}\"\ninstance_profile = \"drover-agent\"\n\n",
            s.subnets[0], s.subnets[1], s.sg, s.ami
        ));
    }
    text.push_str(
        r#"[services.web]
regions = ["use1", "euw1"]
capacity = { min = 2, desired = 3, max = 6 }
ingress = { listen = "0.0.0.0:80", component = "app", port = "http" }
instance_type = "t3.small"

[services.web.rollout]
max_surge = 1
max_unavailable = 0
min_healthy_time = "1s"
healthy_deadline = "8s"
auto_revert = true
drain_timeout = "2s"

[services.web.components.app]
runtime = "process"
version = "v1"
command = "{drover}"
args = ["demo-server", "--listen", "{addr}:{port.http}"]
ports = { http = 8080 }
health = { type = "http", port = "http", path = "/healthz", interval = "10s", healthy_threshold = 3, unhealthy_threshold = 2 }

[services.jobs]
regions = ["use1"]
capacity = { min = 1, desired = 2, max = 4 }
instance_type = "c7g.large"

# No surge: one instance at a time leaves, keeping the Auto Scaling group's capacity, and
# the group launches its replacement as it goes.
[services.jobs.rollout]
max_surge = 0
max_unavailable = 1
min_healthy_time = "1s"
healthy_deadline = "30s"

[services.jobs.components.worker]
runtime = "process"
version = "1.0"
command = "/bin/sleep"
args = ["infinity"]
"#,
    );
    text
}

/// In-rotation instances per group, and each group's generation.
fn healthy(s: &FleetStatus) -> BTreeMap<String, (usize, u64)> {
    s.groups
        .iter()
        .map(|g| {
            (
                g.group.clone(),
                (
                    g.instances
                        .iter()
                        .filter(|i| i.in_rotation && i.generation == g.generation)
                        .count(),
                    g.generation,
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_auto_scaling_groups_and_ingresses_are_nlbs_in_two_regions() {
    let dir = tempfile::tempdir().unwrap();
    let Some(moto) = Moto::start(dir.path()) else {
        return;
    };
    // moto takes any credentials; nothing must come from this machine's AWS config.
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ] {
        std::env::set_var(k, v);
    }
    let mut clients = Vec::new();
    let mut setups = BTreeMap::new();
    for (name, aws) in REGIONS {
        let c = Clients::connect(aws, Some(&moto.url)).await;
        let s = setup_region(&c).await;
        foreign(&c, &s).await;
        setups.insert(name, s);
        clients.push((name.to_string(), c));
    }
    let by_region: HashMap<String, Clients> = clients.iter().cloned().collect();

    // The server, with a fast reading of the groups.
    let port = free_port();
    let api: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("drover.toml");
    std::fs::write(&file, fleet_file(&setups, &moto.url)).unwrap();
    let child = Command::new(BIN)
        .args([
            "server",
            "--listen",
            &api.to_string(),
            "--cloud-poll",
            "300ms",
            // AWS ingresses are NLBs: no balancer process.
            "--no-lb",
        ])
        .arg("--data-dir")
        .arg(&data)
        .stdout(std::fs::File::create(dir.path().join("server.out")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("server.err")).unwrap())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        api,
        dir: dir.path().to_path_buf(),
    };
    register_api(api, data.clone());
    wait_until_or(
        Duration::from_secs(20),
        "the server",
        || data.join("admin.token").exists() && http(api, "GET", "/v1/health", None).is_ok(),
        || std::fs::read_to_string(dir.path().join("server.err")).unwrap_or_default(),
    );
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let agents = tokio::spawn(run_agents(
        clients.clone(),
        format!("http://{api}"),
        moto.url.clone(),
        dir.path().to_path_buf(),
        seen.clone(),
        stop.clone(),
    ));
    let diag = || {
        format!(
            "events:\n{}\nserver log tail:\n{}",
            server.events(),
            std::fs::read_to_string(dir.path().join("server.err"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        )
    };

    // ---- apply: groups, templates and load balancers appear, with sizes and tags.
    let (code, out, err) =
        tokio::task::block_in_place(|| server.cli(&["apply", file.to_str().unwrap()]));
    assert_eq!(code, 0, "apply: {out}{err}");
    tokio::task::block_in_place(|| {
        wait_until_or(
            Duration::from_secs(90),
            "3 + 3 web and 2 jobs instances healthy",
            || {
                let h = healthy(&server.status());
                h.get("web/use1").map(|x| x.0) == Some(3)
                    && h.get("web/euw1").map(|x| x.0) == Some(3)
                    && h.get("jobs/use1").map(|x| x.0) == Some(2)
            },
            diag,
        )
    });
    for (region, c) in &clients {
        let groups = drover_aws::group::describe_fleet(c, FLEET, region)
            .await
            .unwrap();
        let names: BTreeMap<String, (u32, u32, usize)> = groups
            .iter()
            .map(|g| {
                (
                    g.name.clone(),
                    (
                        g.desired,
                        g.max,
                        g.instances.iter().filter(|i| !i.leaving()).count(),
                    ),
                )
            })
            .collect();
        let web = format!("drover-{FLEET}-web-{region}");
        // max = capacity.max + 2 x surge + max_unavailable (surge and draining instances).
        assert_eq!(names.get(&web), Some(&(3, 8, 3)), "{region}: {names:?}");
        if region == "use1" {
            assert_eq!(
                names.get("drover-shop-jobs-use1"),
                Some(&(2, 5, 2)),
                "{names:?}"
            );
        } else {
            assert_eq!(names.len(), 1, "{names:?}");
        }
        // Every instance carries drover's tags (propagated from its group).
        let ids: Vec<String> = groups
            .iter()
            .flat_map(|g| g.instances.iter().map(|i| i.id.clone()))
            .collect();
        let facts = drover_aws::group::instances(c, &ids).await.unwrap();
        for (id, f) in &facts {
            let o = f
                .owner
                .as_ref()
                .unwrap_or_else(|| panic!("{id} has no drover tags"));
            assert_eq!(f.generation, Some(1), "{id} is tagged with its generation");
            assert_eq!(
                (o.fleet.as_str(), o.region.as_str()),
                (FLEET, region.as_str())
            );
        }
        // The launch template: drover's tags, the service's instance type, IMDSv2 only.
        let v = c
            .ec2
            .describe_launch_template_versions()
            .launch_template_name(&web)
            .send()
            .await
            .unwrap();
        let data = v.launch_template_versions()[0]
            .launch_template_data()
            .unwrap();
        assert_eq!(data.instance_type().map(|t| t.as_str()), Some("t3.small"));
        assert_eq!(
            data.iam_instance_profile().and_then(|p| p.name()),
            Some("drover-agent")
        );
        // The load balancer and its target group, derived from the service.
        let lb = c
            .elb
            .describe_load_balancers()
            .send()
            .await
            .unwrap()
            .load_balancers()
            .iter()
            .filter(|l| {
                l.load_balancer_name()
                    .is_some_and(|n| n.starts_with("d-web-"))
            })
            .cloned()
            .collect::<Vec<_>>();
        assert_eq!(lb.len(), 1, "one NLB for web in {region}");
        assert_eq!(lb[0].r#type(), Some(&elbt::LoadBalancerTypeEnum::Network));
        let tg = c
            .elb
            .describe_target_groups()
            .load_balancer_arn(lb[0].load_balancer_arn().unwrap())
            .send()
            .await
            .unwrap();
        let tg = &tg.target_groups()[0];
        assert_eq!(tg.protocol(), Some(&elbt::ProtocolEnum::Tcp));
        assert_eq!(tg.port(), Some(8080));
        assert_eq!(tg.health_check_path(), Some("/healthz"));
        assert_eq!(tg.health_check_interval_seconds(), Some(10));
        assert_eq!(tg.healthy_threshold_count(), Some(3));
        assert_eq!(tg.unhealthy_threshold_count(), Some(2));
        let attrs = c
            .elb
            .describe_target_group_attributes()
            .target_group_arn(tg.target_group_arn().unwrap())
            .send()
            .await
            .unwrap();
        assert!(
            attrs
                .attributes()
                .iter()
                .any(|a| a.key() == Some("deregistration_delay.timeout_seconds")
                    && a.value() == Some("2")),
            "deregistration delay = drain_timeout"
        );
        let web_asg = groups.iter().find(|g| g.name == web).unwrap();
        assert_eq!(
            web_asg.target_groups,
            vec![tg.target_group_arn().unwrap().to_string()],
            "the target group is attached to the Auto Scaling group"
        );
    }

    // ---- scale: SetDesiredCapacity.
    let (code, out, err) =
        tokio::task::block_in_place(|| server.cli(&["scale", "web", "4", "--region", "use1"]));
    assert_eq!(code, 0, "scale: {out}{err}");
    tokio::task::block_in_place(|| {
        wait_until_or(
            Duration::from_secs(30),
            "web/use1 at 4",
            || healthy(&server.status()).get("web/use1").map(|x| x.0) == Some(4),
            diag,
        )
    });
    let g = drover_aws::group::describe(&by_region["use1"], Some("drover-shop-web-use1"))
        .await
        .unwrap();
    assert_eq!(g[0].desired, 4);

    // ---- deploy: a new launch template version; stale instances replaced within budget.
    let max_seen = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (clients, max_seen, sampling) = (clients.clone(), max_seen.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                for (region, c) in &clients {
                    if let Ok(gs) = drover_aws::group::describe_fleet(c, FLEET, region).await {
                        for g in gs {
                            let n = g.instances.iter().filter(|i| !i.leaving()).count();
                            let mut m = max_seen.lock().unwrap();
                            let e = m.entry(g.name.clone()).or_default();
                            *e = (*e).max(n);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut min_in_rotation = BTreeMap::<String, usize>::new();
    let deploy = {
        let api = server.api;
        let dir = server.dir.clone();
        std::thread::spawn(move || {
            Command::new(BIN)
                .args(["deploy", "web", "app", "v2", "--wait", "--timeout", "2m"])
                .env("DROVER_SERVER", format!("http://{api}"))
                .env("DROVER_DATA_DIR", dir.join("data"))
                .output()
                .unwrap()
        })
    };
    while !deploy.is_finished() {
        let s = tokio::task::block_in_place(|| server.status());
        for g in s.groups.iter().filter(|g| g.service == "web") {
            let n = g.instances.iter().filter(|i| i.in_rotation).count();
            let e = min_in_rotation.entry(g.group.clone()).or_insert(n);
            *e = (*e).min(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = deploy.join().unwrap();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.await.unwrap();
    assert!(
        out.status.success(),
        "deploy --wait: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        diag()
    );
    assert_eq!(
        min_in_rotation.get("web/use1"),
        Some(&4),
        "max_unavailable = 0: never fewer than desired in rotation"
    );
    assert_eq!(min_in_rotation.get("web/euw1"), Some(&3));
    {
        let m = max_seen.lock().unwrap();
        // desired + max_surge new instances, plus the one stale instance draining on its
        // permit (max_surge + max_unavailable permits at a time).
        assert!(m["drover-shop-web-use1"] <= 4 + 1 + 1, "budget: {m:?}");
        assert!(m["drover-shop-web-euw1"] <= 3 + 1 + 1, "budget: {m:?}");
    }
    for (region, c) in &clients {
        let name = format!("drover-{FLEET}-web-{region}");
        let lt = c
            .ec2
            .describe_launch_templates()
            .launch_template_names(&name)
            .send()
            .await
            .unwrap();
        assert_eq!(
            lt.launch_templates()[0].default_version_number(),
            Some(2),
            "generation 2 is a new launch template version"
        );
        // The rollout is done when no active instance is stale; the last stale one may
        // still be draining: wait until the group holds just its desired instances.
        let want = if region == "use1" { 4 } else { 3 };
        let t0 = Instant::now();
        let g = loop {
            let g = drover_aws::group::describe(c, Some(&name)).await.unwrap();
            if g[0].instances.iter().filter(|i| !i.leaving()).count() == want {
                break g;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{:?}",
                g[0].instances
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // What each instance booted from (moto reports the template's default version for
        // every instance, so its user-data is the evidence).
        for i in g[0].instances.iter().filter(|i| !i.leaving()) {
            assert_eq!(
                boot_of(c, &i.id).await.generation,
                2,
                "{} boots generation 2 ({:?})\n{}",
                i.id,
                g[0].instances,
                diag()
            );
        }
    }
    // Each simulated agent notes its leave right after its call returns.
    let t0 = Instant::now();
    while seen.lock().unwrap().left.len() < 7 && t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let s = seen.lock().unwrap();
        eprintln!("surge rollout: leavers (instance, decrement): {:?}", s.left);
        assert_eq!(
            s.left.len(),
            7,
            "4 + 3 stale instances left: {:?}\n{}",
            s.left,
            diag()
        );
        assert!(
            s.left.iter().all(|(_, dec)| *dec),
            "surge rollouts lower capacity"
        );
    }

    // ---- a broken version: the rollout fails and reverts by itself.
    let (code, out, err) = tokio::task::block_in_place(|| {
        server.cli(&[
            "deploy",
            "web",
            "app",
            "broken",
            "--wait",
            "--timeout",
            "2m",
        ])
    });
    assert_eq!(code, 1, "a failing rollout exits 1: {out}{err}");
    tokio::task::block_in_place(|| {
        wait_until_or(
            Duration::from_secs(60),
            "web back on v2 everywhere",
            || {
                let s = server.status();
                s.groups.iter().filter(|g| g.service == "web").all(|g| {
                    g.versions.contains("v2")
                        && g.generation == 4
                        && g.instances.iter().filter(|i| i.in_rotation).count()
                            == g.desired as usize
                        && g.instances.iter().all(|i| i.generation == 4)
                })
            },
            diag,
        )
    });
    assert!(server.events().contains("automatic revert"), "{}", diag());
    for (region, c) in &clients {
        let lt = c
            .ec2
            .describe_launch_templates()
            .launch_template_names(format!("drover-{FLEET}-web-{region}"))
            .send()
            .await
            .unwrap();
        assert_eq!(lt.launch_templates()[0].default_version_number(), Some(4));
    }

    // ---- a rollout without surge (max_surge = 0, max_unavailable = 1) on real agents: one
    // instance at a time gets its permit and terminates keeping the group's capacity; the
    // Auto Scaling group launches its replacement from the new template version, and the
    // controller's launch claims that instance: the capacity never moves.
    let jobs_asg = "drover-shop-jobs-use1";
    let stale: BTreeSet<String> = server
        .status()
        .groups
        .iter()
        .filter(|g| g.group == "jobs/use1")
        .flat_map(|g| g.instances.iter().map(|i| i.id.clone()))
        .collect();
    assert_eq!(stale.len(), 2, "{stale:?}");
    // (least, most) desired capacity, most live instances.
    let asg_seen = Arc::new(Mutex::new((u32::MAX, 0u32, 0usize)));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (c, asg_seen, sampling) = (
            by_region["use1"].clone(),
            asg_seen.clone(),
            sampling.clone(),
        );
        tokio::spawn(async move {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(g) = drover_aws::group::describe(&c, Some(jobs_asg)).await {
                    if let Some(g) = g.first() {
                        let live = g.instances.iter().filter(|i| !i.leaving()).count();
                        let mut m = asg_seen.lock().unwrap();
                        *m = (m.0.min(g.desired), m.1.max(g.desired), m.2.max(live));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (code, out, err) = tokio::task::block_in_place(|| {
        server.cli(&[
            "deploy",
            "jobs",
            "worker",
            "1.1",
            "--wait",
            "--timeout",
            "2m",
        ])
    });
    assert_eq!(code, 0, "deploy jobs: {out}{err}\n{}", diag());
    // The last stale instance may still be draining when the rollout is done; its
    // replacement is claimed once it is gone.
    let t0 = Instant::now();
    let live = loop {
        let g = drover_aws::group::describe(&by_region["use1"], Some(jobs_asg))
            .await
            .unwrap();
        let live: BTreeSet<String> = g[0]
            .instances
            .iter()
            .filter(|i| !i.leaving())
            .map(|i| i.id.clone())
            .collect();
        let known: BTreeSet<String> = server
            .status()
            .groups
            .iter()
            .filter(|g| g.group == "jobs/use1")
            .flat_map(|g| g.instances.iter().map(|i| i.id.clone()))
            .collect();
        if live.len() == 2 && live == known {
            break live;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the group's instances are the server's: {live:?} vs {known:?}\n{}",
            diag()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.await.unwrap();
    let (least, most, most_live) = *asg_seen.lock().unwrap();
    eprintln!(
        "rollout without surge: desired capacity {least}..{most}, at most {most_live} live; {stale:?} replaced by {live:?}"
    );
    assert_eq!(
        (least, most),
        (2, 2),
        "no surge on AWS: the desired capacity stays at the group's desired count (no leaver \
         lowers it, no launch raises it)\n{}",
        diag()
    );
    assert!(
        most_live <= 2,
        "never more than 2 live instances: {most_live}"
    );
    for id in &live {
        assert!(!stale.contains(id));
        assert_eq!(boot_of(&by_region["use1"], id).await.generation, 2);
    }
    let events = server.events();
    for id in &live {
        assert!(
            events.contains(&format!("[{id}]")),
            "{id} was claimed by a launch\n{events}"
        );
    }
    // The stale instances' real agents left on their permits, keeping the capacity.
    let left: Vec<(String, Child)> = {
        let mut s = seen.lock().unwrap();
        let (left, rest) = std::mem::take(&mut s.real)
            .into_iter()
            .partition(|(id, _)| stale.contains(id));
        s.real = rest;
        left
    };
    assert_eq!(left.len(), 2, "the stale jobs instances ran real agents");
    for (id, child) in left {
        let log = agent_left(dir.path(), &id, child).await;
        assert!(
            log.contains(
                "terminating this instance (its Auto Scaling group launches the replacement)"
            ),
            "agent of {id} left with ShouldDecrementDesiredCapacity = false:\n{log}"
        );
    }
    let server_log = std::fs::read_to_string(dir.path().join("server.err")).unwrap_or_default();
    assert!(
        !server_log.contains("no launch claimed"),
        "nothing orphaned: {}",
        server_log
            .lines()
            .filter(|l| l.contains("no launch claimed"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // ---- destroy one service: only its group goes.
    let (code, out, err) = tokio::task::block_in_place(|| {
        server.cli(&["destroy", "jobs", "--wait", "--timeout", "1m"])
    });
    assert_eq!(code, 0, "destroy jobs: {out}{err}\n{}", diag());
    // The real agents of jobs drained, stopped, terminated their own instances (lowering the
    // capacity: their group left the fleet), and exited 0. Every instance the group started
    // was claimed by a launch.
    let real: Vec<(String, Child)> = std::mem::take(&mut seen.lock().unwrap().real);
    let events = server.events();
    let never_known: Vec<&String> = real
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !events.contains(&format!("[{id}]")))
        .collect();
    assert!(
        never_known.is_empty(),
        "instances no launch claimed: {never_known:?}\n{events}"
    );
    // An instance the server terminated itself (e.g. replaced as silent) would stop with
    // its machine; its stand-in agent is stopped here.
    let (real, terminated): (Vec<_>, Vec<_>) = real
        .into_iter()
        .partition(|(id, _)| !events.contains(&format!("terminating jobs/use1 {id} terminating:")));
    for (_, mut child) in terminated {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(real.len() >= 2, "jobs ran on real agents: {}", real.len());
    for (id, child) in real {
        let log = agent_left(dir.path(), &id, child).await;
        assert!(
            log.contains("terminating this instance (lowering its group's desired capacity)"),
            "agent of {id} left through its Auto Scaling group, lowering its capacity:\n{log}"
        );
    }
    let left = drover_aws::group::describe_fleet(&by_region["use1"], FLEET, "use1")
        .await
        .unwrap();
    assert_eq!(
        left.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
        vec!["drover-shop-web-use1"]
    );

    // ---- destroy everything: all of drover's resources gone, nobody else's touched.
    let (code, out, err) =
        tokio::task::block_in_place(|| server.cli(&["destroy", "--wait", "--timeout", "1m"]));
    assert_eq!(code, 0, "destroy: {out}{err}\n{}", diag());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    agents.await.unwrap();
    for (region, c) in &clients {
        let asgs = drover_aws::group::describe(c, None).await.unwrap();
        assert!(asgs.is_empty(), "{region}: drover groups left: {asgs:?}");
        let all_asgs = c.asg.describe_auto_scaling_groups().send().await.unwrap();
        let names: Vec<&str> = all_asgs
            .auto_scaling_groups()
            .iter()
            .filter_map(|g| g.auto_scaling_group_name())
            .collect();
        assert_eq!(names, vec!["other-team-asg"], "{region}");
        let lts = c.ec2.describe_launch_templates().send().await.unwrap();
        let names: Vec<&str> = lts
            .launch_templates()
            .iter()
            .filter_map(|t| t.launch_template_name())
            .collect();
        assert_eq!(names, vec!["other-team-lt"], "{region}");
        let lbs = c.elb.describe_load_balancers().send().await.unwrap();
        let names: Vec<&str> = lbs
            .load_balancers()
            .iter()
            .filter_map(|l| l.load_balancer_name())
            .collect();
        assert_eq!(names, vec!["other-team-nlb"], "{region}");
        let tgs = c.elb.describe_target_groups().send().await.unwrap();
        assert!(
            tgs.target_groups().is_empty(),
            "{region}: {:?}",
            tgs.target_groups()
        );
    }
    let events = server.events();
    assert!(
        events.contains("web/euw1 removed: Auto Scaling group drover-shop-web-euw1"),
        "{events}"
    );
}

/// Wait (30 s at most) for a real agent to leave and exit 0; its log.
async fn agent_left(dir: &std::path::Path, id: &str, mut child: std::process::Child) -> String {
    let log_file = dir.join(format!("agent-{id}.err"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            panic!("the agent of {id} did not leave:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    assert!(status.success(), "agent of {id}: {status}\n{log}");
    log
}
