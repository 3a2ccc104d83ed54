//! Fleet file validation: every example parses, and each kind of mistake is located and explained.

use std::path::Path;

use drover_model::{parse_fleet, FleetErrors};

const GOOD: &str = r#"[fleet]
name = "hello"

[regions.local]
provider = "local"

[services.web]
regions = ["local"]
capacity = { min = 2, desired = 3, max = 6 }
ingress = { listen = "127.0.0.1:8080", port = "http" }

[services.web.components.app]
runtime = "process"
version = "v1"
command = "{drover}"
args = ["demo-server", "--listen", "{addr}:{port.http}"]
ports = { http = 8080 }
health = { type = "http", port = "http", path = "/healthz" }
"#;

fn errors(text: &str) -> FleetErrors {
    parse_fleet(text, "drover.toml").expect_err("should be refused")
}

/// Replace the first occurrence of `from` in the good file.
fn bad(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "test bug: {from:?} not in GOOD");
    GOOD.replacen(from, to, 1)
}

fn one(text: &str) -> drover_model::FleetError {
    let e = errors(text);
    assert_eq!(e.0.len(), 1, "expected exactly one error, got: {e}");
    e.0.into_iter().next().unwrap()
}

#[test]
fn every_example_fleet_file_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    for entry in walk(&root) {
        if entry.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&entry).unwrap();
            if let Err(e) = parse_fleet(&text, &entry.display().to_string()) {
                panic!("{e}");
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 1,
        "no example fleet files found under {}",
        root.display()
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn good_file_parses_with_defaults() {
    let f = parse_fleet(GOOD, "drover.toml").unwrap();
    let web = &f.services["web"];
    assert_eq!(web.capacity.desired, 3);
    assert_eq!(web.rollout.max_surge, 1);
    assert_eq!(web.rollout.max_unavailable, 0);
    assert_eq!(web.rollout.min_healthy_time.to_string(), "5s");
    assert_eq!(web.rollout.healthy_deadline.to_string(), "1m");
    assert!(web.rollout.auto_revert);
    assert_eq!(web.rollout.drain_timeout.to_string(), "10s");
    let app = &web.components["app"];
    assert_eq!(app.health.as_ref().unwrap().unhealthy_threshold, 3);
}

#[test]
fn unknown_key_is_located() {
    let e = one(&bad(
        "version = \"v1\"",
        "version = \"v1\"\nverison = \"v2\"",
    ));
    assert_eq!((e.line, e.column), (15, 1), "{e}");
    assert!(e.message.contains("unknown field `verison`"), "{e}");
    assert!(e.message.contains("`version`"), "lists allowed keys: {e}");
    assert_eq!(e.field, "services.web.components.app.verison");
}

#[test]
fn capacity_out_of_order() {
    let e = one(&bad("min = 2, desired = 3", "min = 4, desired = 3"));
    assert_eq!(e.field, "services.web.capacity.min");
    assert_eq!(e.line, 9);
    assert!(e.message.contains("min <= desired <= max"), "{e}");
    let e = one(&bad("desired = 3, max = 6", "desired = 7, max = 6"));
    assert_eq!(e.field, "services.web.capacity.desired");
    assert!(e.to_string().starts_with("drover.toml:9:"), "{e}");
}

#[test]
fn duplicate_ports() {
    let text = format!(
        "{GOOD}\n[services.web.components.side]\nruntime = \"process\"\nversion = \"1\"\ncommand = \"/bin/true\"\nports = {{ admin = 8080 }}\n"
    );
    let e = one(&text);
    assert_eq!(e.field, "services.web.components.side.ports.admin");
    assert!(e.message.contains("already used by app.http"), "{e}");
    assert_eq!(e.line, 24);
}

#[test]
fn unknown_region() {
    let e = one(&bad(
        "regions = [\"local\"]",
        "regions = [\"local\", \"moon\"]",
    ));
    assert_eq!(e.field, "services.web.regions.1");
    assert!(e.message.contains("unknown region \"moon\""), "{e}");
    assert!(
        e.message.contains("\"local\""),
        "names the declared ones: {e}"
    );
    assert_eq!((e.line, e.column), (8, 21));
}

#[test]
fn bad_duration() {
    let e = one(&bad(
        "path = \"/healthz\"",
        "path = \"/healthz\", interval = \"5 minutes\"",
    ));
    assert!(e.message.contains("invalid duration \"5 minutes\""), "{e}");
    assert!(e.message.contains("30s"), "says what is allowed: {e}");
    assert_eq!(e.line, 18);
}

#[test]
fn missing_command() {
    let e = one(&bad("command = \"{drover}\"\n", ""));
    assert_eq!(e.field, "services.web.components.app");
    assert!(e.message.contains("needs a command"), "{e}");
}

#[test]
fn bad_sha256() {
    let e = one(&bad(
        "ports = { http = 8080 }",
        "ports = { http = 8080 }\nartifact = { url = \"app.tar.gz\", sha256 = \"abc\" }",
    ));
    assert_eq!(e.field, "services.web.components.app.artifact.sha256");
    assert!(e.message.contains("64 hex digits"), "{e}");
}

#[test]
fn health_port_must_exist_and_placeholders_known() {
    let e = one(&bad("port = \"http\", path", "port = \"admin\", path"));
    assert_eq!(e.field, "services.web.components.app.health.port");
    assert!(e.message.contains("\"http\""), "{e}");
    let e = one(&bad("{addr}:{port.http}", "{adr}:{port.http}"));
    assert_eq!(e.field, "services.web.components.app.args.2");
    assert!(e.message.contains("unknown placeholder {adr}"), "{e}");
}

#[test]
fn ingress_checks() {
    let e = one(&bad(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"localhost\"",
    ));
    assert_eq!(e.field, "services.web.ingress.listen");
    let e = one(&bad("port = \"http\" }\n", "port = \"grpc\" }\n"));
    assert_eq!(e.field, "services.web.ingress.port");
    // The balancing policy: the allowed values are named, at the value's place.
    let f = parse_fleet(
        &bad(
            "port = \"http\" }\n",
            "port = \"http\", balance = \"least_connections\" }\n",
        ),
        "drover.toml",
    )
    .unwrap();
    assert_eq!(
        f.services["web"].ingress.as_ref().unwrap().balance,
        drover_model::api::Balance::LeastConnections
    );
    let e = one(&bad(
        "port = \"http\" }\n",
        "port = \"http\", balance = \"random\" }\n",
    ));
    assert_eq!((e.line, e.column), (10, 65), "{e}");
    assert!(
        e.message.contains("round_robin") && e.message.contains("least_connections"),
        "{e}"
    );
}

#[test]
fn wrong_type_and_syntax_are_located() {
    let e = one(&bad("min = 2", "min = \"two\""));
    assert_eq!(e.line, 9);
    assert!(e.message.contains("invalid type"), "{e}");
    let e = one(&bad("[services.web]", "[services.web"));
    assert_eq!(e.line, 7);
}

#[test]
fn several_errors_reported_together_in_file_order() {
    let text = bad("min = 2", "min = 9").replace("version = \"v1\"", "version = \"\"");
    let e = errors(&text);
    assert_eq!(e.0.len(), 2, "{e}");
    assert!(e.0[0].line < e.0[1].line);
}

const DOCKER: &str = r#"[fleet]
name = "hello"

[regions.local]
provider = "local"

[services.web]
regions = ["local"]
capacity = { min = 1, desired = 1, max = 2 }

[services.web.components.app]
runtime = "docker"
version = "v1"
image = "127.0.0.1:5000/drover-demo"
command = "demo-server"
args = ["--listen", "0.0.0.0:{port.http}"]
ports = { http = 8080 }
container_ports = { http = 80 }
volumes = ["{dir}/data:/data", "cache:/cache:ro"]
cpus = 0.5
memory = "64m"
log = { driver = "json-file", options = { max-size = "1m" } }
stop_signal = "SIGINT"
"#;

fn docker_bad(from: &str, to: &str) -> drover_model::FleetError {
    assert!(DOCKER.contains(from), "test bug: {from:?} not in DOCKER");
    one(&DOCKER.replacen(from, to, 1))
}

#[test]
fn docker_component_plans_with_its_settings() {
    let fleet = parse_fleet(DOCKER, "drover.toml").unwrap();
    let svc = &fleet.services["web"];
    let plan = drover_model::plan::plan_for(&fleet, "web", svc, "local");
    let d = plan.components[0].docker.as_ref().unwrap();
    // No tag in the image: the version is the tag.
    assert_eq!(d.image, "127.0.0.1:5000/drover-demo:v1");
    assert_eq!(d.pinned, None);
    assert_eq!(d.reference(), "127.0.0.1:5000/drover-demo:v1");
    assert_eq!(d.container_ports["http"], 80);
    assert_eq!(d.memory, Some(64 << 20));
    assert_eq!(d.cpus, Some(0.5));
    assert_eq!(d.network, "bridge");
    assert_eq!(d.log.options["max-size"], "1m");
    assert_eq!(d.volumes, ["{dir}/data:/data", "cache:/cache:ro"]);

    // `{version}` inside the reference.
    let text = DOCKER.replace(
        "image = \"127.0.0.1:5000/drover-demo\"",
        "image = \"127.0.0.1:5000/drover-demo:{version}-slim\"",
    );
    let fleet = parse_fleet(&text, "drover.toml").unwrap();
    let plan = drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "local");
    let d = plan.components[0].docker.as_ref().unwrap();
    assert_eq!(d.image, "127.0.0.1:5000/drover-demo:v1-slim");

    // A pin does not make a different plan; another image does.
    let mut pinned = plan.clone();
    pinned.components[0].docker.as_mut().unwrap().pinned = Some(format!(
        "127.0.0.1:5000/drover-demo@sha256:{}",
        "a".repeat(64)
    ));
    assert!(pinned.same_content(&plan));
    let mut other = plan.clone();
    other.components[0].docker.as_mut().unwrap().image = "x:2".into();
    assert!(!other.same_content(&plan));
}

#[test]
fn docker_needs_an_image_and_refuses_bad_references() {
    let e = docker_bad("image = \"127.0.0.1:5000/drover-demo\"\n", "");
    assert_eq!(e.field, "services.web.components.app");
    assert!(e.message.contains("needs an image"), "{e}");
    let e = docker_bad(
        "image = \"127.0.0.1:5000/drover-demo\"",
        "image = \"127.0.0.1:5000/Drover-Demo\"",
    );
    assert_eq!(e.field, "services.web.components.app.image");
    assert_eq!((e.line, e.column), (14, 9));
    assert!(e.message.contains("not a valid image reference"), "{e}");
    let e = docker_bad(
        "image = \"127.0.0.1:5000/drover-demo\"",
        "image = \"127.0.0.1:5000/drover-demo:{addr}\"",
    );
    assert!(e.message.contains("only placeholder"), "{e}");
    // The version becomes the tag: it must be a valid one.
    let e = docker_bad("version = \"v1\"", "version = \"v1+build\"");
    assert_eq!(e.field, "services.web.components.app.version");
    assert!(e.message.contains("not a valid tag"), "{e}");
}

#[test]
fn docker_settings_are_checked() {
    let e = docker_bad("cpus = 0.5", "cpus = 0");
    assert_eq!(e.field, "services.web.components.app.cpus");
    assert_eq!(e.line, 20);
    let e = docker_bad("memory = \"64m\"", "memory = \"lots\"");
    assert_eq!(e.field, "services.web.components.app.memory");
    assert!(e.message.contains("not a memory size"), "{e}");
    let e = docker_bad("memory = \"64m\"", "memory = \"1m\"");
    assert!(e.message.contains("minimum of 6m"), "{e}");
    let e = docker_bad("\"cache:/cache:ro\"", "\"cache:cache\"");
    assert_eq!(e.field, "services.web.components.app.volumes.1");
    assert!(
        e.message.contains("absolute path inside the container"),
        "{e}"
    );
    let e = docker_bad("\"cache:/cache:ro\"", "\"cache:/cache:rx\"");
    assert!(e.message.contains("\"ro\" or \"rw\""), "{e}");
    let e = docker_bad("\"cache:/cache:ro\"", "\"cache:/data\"");
    assert!(e.message.contains("mounted twice"), "{e}");
    let e = docker_bad(
        "container_ports = { http = 80 }",
        "container_ports = { grpc = 80 }",
    );
    assert_eq!(e.field, "services.web.components.app.container_ports.grpc");
    let e = docker_bad(
        "log = { driver = \"json-file\"",
        "log = { driver = \"json file\"",
    );
    assert_eq!(e.field, "services.web.components.app.log.driver");
    let e = docker_bad("cpus = 0.5", "cpus = 0.5\nnetwork = \"none\"");
    assert_eq!(e.field, "services.web.components.app.network");
    let e = docker_bad("cpus = 0.5", "cpus = 0.5\nnetwork = \"host\"");
    assert_eq!(e.field, "services.web.components.app.container_ports");
    let e = docker_bad(
        "memory = \"64m\"",
        "memory = \"64m\"\nartifact = { url = \"a.tar.gz\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }",
    );
    assert_eq!(e.field, "services.web.components.app.artifact");
}

#[test]
fn docker_only_settings_are_refused_on_processes() {
    let e = one(&bad(
        "ports = { http = 8080 }",
        "ports = { http = 8080 }\nimage = \"nginx\"",
    ));
    assert_eq!(e.field, "services.web.components.app.image");
    assert!(
        e.message.contains("applies only to runtime = \"docker\""),
        "{e}"
    );
    assert!(e.to_string().starts_with("drover.toml:18:9:"), "{e}");
}

const AWS_REGION: &str = r#"[regions.us-east-1]
provider = "aws"
subnets = ["subnet-0a1b2c"]
security_groups = ["sg-0a1b"]
ami = "ami-0abc123"
"#;

fn aws(region: &str, service_extra: &str) -> String {
    GOOD.replace(
        "[regions.local]\nprovider = \"local\"\n",
        &format!("[regions.local]\nprovider = \"local\"\n\n{region}"),
    )
    .replace(
        "regions = [\"local\"]\n",
        &format!("regions = [\"local\", \"us-east-1\"]\n{service_extra}"),
    )
}

#[test]
fn an_aws_region_with_its_fields_is_accepted() {
    let f = parse_fleet(&aws(AWS_REGION, "instance_type = \"t3.small\"\n"), "f.toml").unwrap();
    let r = &f.regions["us-east-1"];
    assert_eq!(r.aws_region_or("us-east-1"), "us-east-1");
    assert_eq!(r.subnets, vec!["subnet-0a1b2c".to_string()]);
    assert_eq!(f.services["web"].instance_type.as_deref(), Some("t3.small"));
}

#[test]
fn aws_region_mistakes_are_located_and_explained() {
    // No AMI.
    let e = one(&aws(&AWS_REGION.replace("ami = \"ami-0abc123\"\n", ""), ""));
    assert!(e.message.contains("needs the AMI"), "{e}");
    // A region name that is not an AWS region and no aws_region.
    let e = one(&aws(
        &AWS_REGION.replace("[regions.us-east-1]", "[regions.east]"),
        "",
    )
    .replace("\"us-east-1\"]", "\"east\"]"));
    assert!(e.message.contains("not an AWS region name"), "{e}");
    // A malformed subnet id, at its own line and column.
    let text = aws(&AWS_REGION.replace("subnet-0a1b2c", "net-1"), "");
    let e = one(&text);
    assert!(e.message.contains("is not a subnet id"), "{e}");
    let line = text.lines().position(|l| l.contains("net-1")).unwrap() + 1;
    assert_eq!(e.line, line, "{e}");
    // instance_type on a service in no aws region.
    let e = one(&bad(
        "regions = [\"local\"]\n",
        "regions = [\"local\"]\ninstance_type = \"t3.micro\"\n",
    ));
    assert!(
        e.message
            .contains("applies only to services in an aws region"),
        "{e}"
    );
    // A bad instance type.
    let e = one(&aws(AWS_REGION, "instance_type = \"large\"\n"));
    assert!(e.message.contains("not an EC2 instance type"), "{e}");
    // aws fields on a local region.
    let e = one(&bad(
        "provider = \"local\"\n",
        "provider = \"local\"\nami = \"ami-1\"\n",
    ));
    assert!(
        e.message.contains("applies only to provider \"aws\""),
        "{e}"
    );
}

#[test]
fn drain_signal_is_optional_and_reaches_the_plan() {
    let fleet = parse_fleet(GOOD, "drover.toml").unwrap();
    let plan = drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "local");
    assert_eq!(
        plan.components[0].drain_signal, None,
        "no drain signal by default"
    );
    for name in ["SIGUSR1", "USR2", "SIGHUP", "SIGTERM"] {
        let text = bad(
            "ports = { http = 8080 }",
            &format!("ports = {{ http = 8080 }}\ndrain_signal = \"{name}\""),
        );
        let fleet = parse_fleet(&text, "drover.toml").unwrap_or_else(|e| panic!("{name}: {e}"));
        let plan = drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "local");
        assert_eq!(plan.components[0].drain_signal.as_deref(), Some(name));
    }
}

#[test]
fn bad_drain_signal_is_located_and_lists_the_allowed_ones() {
    let text = bad(
        "ports = { http = 8080 }",
        "ports = { http = 8080 }\ndrain_signal = \"SIGDRAIN\"",
    );
    let e = one(&text);
    assert_eq!(e.field, "services.web.components.app.drain_signal");
    assert_eq!((e.line, e.column), (18, 16), "{e}");
    assert!(e.to_string().starts_with("drover.toml:18:16:"), "{e}");
    assert!(e.message.contains("unknown signal \"SIGDRAIN\""), "{e}");
    for allowed in [
        "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM",
    ] {
        assert!(e.message.contains(allowed), "lists {allowed}: {e}");
    }

    // SIGKILL ends the process at once: it is no way to drain.
    let e = one(&bad(
        "ports = { http = 8080 }",
        "ports = { http = 8080 }\ndrain_signal = \"SIGKILL\"",
    ));
    assert_eq!(e.field, "services.web.components.app.drain_signal");
    assert!(e.message.contains("cannot be a drain signal"), "{e}");
    assert!(!e.message.contains("allowed: SIGKILL"), "{e}");

    // The wrong type is located too.
    let e = one(&bad(
        "ports = { http = 8080 }",
        "ports = { http = 8080 }\ndrain_signal = 10",
    ));
    assert_eq!(e.line, 18, "{e}");
}

/// GOOD (18 lines) with two schedules appended: headers on lines 20 and 27.
fn with_schedules(first: &str, second: &str) -> String {
    format!("{GOOD}\n[[services.web.schedule]]\n{first}\n\n[[services.web.schedule]]\n{second}\n")
}

const SAT: &str = "cron = \"0 17 * * SAT\"\ntimezone = \"Europe/London\"\nduration = \"4h\"\nmin = 4\ndesired = 5";

#[test]
fn schedules_parse_with_defaults() {
    let text = with_schedules(
        SAT,
        "cron = \"0 9 * * MON-FRI\"\nduration = \"8h\"\nmin = 3",
    );
    let f = parse_fleet(&text, "drover.toml").unwrap();
    let s = &f.services["web"].schedule;
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].timezone, "Europe/London");
    assert_eq!(s[0].duration.to_string(), "4h");
    assert_eq!((s[0].min, s[0].desired, s[0].max), (Some(4), Some(5), None));
    assert_eq!(s[1].timezone, "UTC", "the default time zone");
}

#[test]
fn a_schedule_that_never_fires_is_located_in_its_table() {
    let text = with_schedules(SAT, "cron = \"0 0 30 2 *\"\nduration = \"1h\"\nmin = 3");
    let e = one(&text);
    assert_eq!(e.field, "services.web.schedule.1.cron");
    assert_eq!((e.line, e.column), (28, 8), "{e}");
    assert!(e.message.contains("never fires"), "{e}");
}

#[test]
fn a_schedule_min_above_max_is_refused() {
    let text = with_schedules(SAT, "cron = \"0 9 * * *\"\nduration = \"1h\"\nmin = 7");
    let e = one(&text);
    assert_eq!(e.field, "services.web.schedule.1.min");
    assert_eq!(e.line, 30, "{e}");
    assert!(e.message.contains("above max = 6 (capacity.max)"), "{e}");
    let text = with_schedules(
        SAT,
        "cron = \"0 9 * * *\"\nduration = \"1h\"\nmin = 9\nmax = 8",
    );
    let e = one(&text);
    assert_eq!(e.field, "services.web.schedule.1.min");
    assert!(
        e.message.contains("above max = 8 (the schedule's max)"),
        "{e}"
    );
}

#[test]
fn schedule_mistakes_are_explained() {
    let cases = [
        (
            "cron = \"0 17 * *\"\nduration = \"1h\"\nmin = 3",
            "cron",
            "4 field",
        ),
        (
            "cron = \"0 25 * * *\"\nduration = \"1h\"\nmin = 3",
            "cron",
            "not a cron pattern",
        ),
        (
            "cron = \"0 17 * * *\"\ntimezone = \"London\"\nduration = \"1h\"\nmin = 3",
            "timezone",
            "IANA",
        ),
        (
            "cron = \"0 17 * * *\"\nduration = \"10s\"\nmin = 3",
            "duration",
            "shorter than a minute",
        ),
        (
            "cron = \"0 17 * * *\"\nduration = \"1h\"\nmax = 2",
            "max",
            "only raises",
        ),
        (
            "cron = \"0 17 * * *\"\nduration = \"1h\"\nmin = 4\ndesired = 3",
            "desired",
            "below",
        ),
    ];
    for (second, field, says) in cases {
        let e = one(&with_schedules(SAT, second));
        assert_eq!(e.field, format!("services.web.schedule.1.{field}"), "{e}");
        assert!(e.message.contains(says), "{e}");
        assert!(e.line >= 28, "{e}");
    }
    let e = one(&with_schedules(
        SAT,
        "cron = \"0 17 * * *\"\nduration = \"1h\"",
    ));
    assert_eq!(e.field, "services.web.schedule.1");
    assert_eq!((e.line, e.column), (27, 1), "{e}");
}

#[test]
fn a_canary_must_fit_in_the_surge() {
    let text = GOOD.to_string()
        + "\n[services.web.rollout]\nmax_surge = 1\ncanary = { instances = 2, bake = \"1m\" }\n";
    let e = one(&text);
    assert!(
        e.message.contains(
            "instances = 2 is more than max_surge = 1: canaries serve beside the old instances, within the surge"
        ),
        "{e}"
    );
    assert_eq!((e.line, e.column), (22, 24), "{e}");
    let text = GOOD.to_string()
        + "\n[services.web.rollout]\nmax_surge = 0\nmax_unavailable = 1\ncanary = { instances = 1, bake = \"1m\" }\n";
    let e = one(&text);
    assert!(
        e.message.contains("max_surge = 0: canaries serve beside"),
        "{e}"
    );
    let ok = GOOD.to_string()
        + "\n[services.web.rollout]\nmax_surge = 2\ncanary = { instances = 2, bake = \"1m\" }\n";
    parse_fleet(&ok, "drover.toml").expect("a canary of 2 within a surge of 2");
}

/// The fleet file is held to the heartbeat's limits (drover_model::api::limits): a fleet that
/// validates has agents whose heartbeats the server accepts.
#[test]
fn heartbeat_limits_hold_in_validation() {
    use drover_model::api::limits;
    // A version of 257 bytes: refused at its line and column.
    let long = "v".repeat(limits::VERSION + 1);
    let e = one(&bad("version = \"v1\"", &format!("version = \"{long}\"")));
    assert_eq!(e.field, "services.web.components.app.version");
    assert_eq!((e.line, e.column), (14, 11), "{e}");
    assert!(e.message.contains("at most 256"), "{e}");
    // Exactly at the limit is fine.
    let ok = "v".repeat(limits::VERSION);
    parse_fleet(
        &bad("version = \"v1\"", &format!("version = \"{ok}\"")),
        "f",
    )
    .unwrap();

    // 257 components.
    let mut text = GOOD.to_string();
    for i in 0..limits::COMPONENTS {
        text.push_str(&format!(
            "\n[services.web.components.c{i}]\nruntime = \"process\"\nversion = \"1\"\ncommand = \"/bin/true\"\n"
        ));
    }
    let e = one(&text);
    assert_eq!(e.field, "services.web.components");
    assert!(e.message.contains("at most 256"), "{e}");
    assert!(e.line > 0, "{e}");

    // 65 distinct custom metrics over two components.
    let metrics = |port: &str, from: usize, to: usize| {
        (from..to)
            .map(|i| format!("m{i} = {{ port = \"{port}\", path = \"/m\" }}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        "{}custom_metrics = {{ {} }}\n\n[services.web.components.side]\nruntime = \"process\"\nversion = \"1\"\ncommand = \"/bin/true\"\nports = {{ stats = 9090 }}\ncustom_metrics = {{ {} }}\n",
        GOOD,
        metrics("http", 0, 40),
        metrics("stats", 40, limits::CUSTOM_METRICS + 1)
    );
    let e = one(&text);
    assert_eq!(e.field, "services.web.components.side.custom_metrics");
    assert!(e.message.contains("at most 64"), "{e}");
    assert_eq!(e.line, 26, "{e}");
    // 64 are fine.
    let text = format!(
        "{}custom_metrics = {{ {} }}\n",
        GOOD,
        metrics("http", 0, limits::CUSTOM_METRICS)
    );
    parse_fleet(&text, "f").unwrap();
}

#[test]
fn uses_names_services_that_run_where_the_user_runs() {
    let two = GOOD.replace(
        "[services.web]\nregions = [\"local\"]",
        "[regions.far]\nprovider = \"local\"\nsubnet = \"127.60.0.0/16\"\n\n[services.core]\nregions = [\"far\"]\ncapacity = { min = 1, desired = 1, max = 1 }\n\n[services.core.components.app]\nruntime = \"process\"\nversion = \"v1\"\ncommand = \"{drover}\"\n\n[services.web]\nregions = [\"local\"]\nuses = [\"core\", \"nope\"]",
    );
    let e = errors(&two);
    let text = e.to_string();
    assert!(
        text.contains("services.web.uses.0: web runs in \"local\", where core does not run"),
        "{text}"
    );
    assert!(
        text.contains("services.web.uses.1: unknown service \"nope\"; the fleet's services: \"core\", \"web\""),
        "{text}"
    );
    assert!(e.0.iter().all(|x| x.line > 0), "{text}");
    let ok = two
        .replace("regions = [\"far\"]", "regions = [\"local\"]")
        .replace(", \"nope\"", "");
    let fleet = parse_fleet(&ok, "drover.toml").expect("core runs in local too");
    assert_eq!(fleet.services["web"].uses, vec!["core".to_string()]);
}

/// Issue 15: `provider = "sim"` (launches recorded, no process) is a provider like the others,
/// with a loopback subnet of its own; a misspelt provider is refused with the allowed list.
#[test]
fn a_sim_region_validates_and_an_unknown_provider_lists_the_allowed_ones() {
    let f = parse_fleet(
        &bad(
            "provider = \"local\"\n",
            "provider = \"sim\"\nsubnet = \"127.77.0.0/16\"\n",
        ),
        "f.toml",
    )
    .unwrap();
    assert_eq!(
        f.regions["local"].provider,
        drover_model::fleet::ProviderKind::Sim
    );
    assert_eq!(f.regions["local"].provider.as_str(), "sim");
    let e = one(&bad("provider = \"local\"\n", "provider = \"simulated\"\n"));
    assert_eq!(
        (e.line, e.field.as_str()),
        (5, "regions.local.provider"),
        "{e}"
    );
    for allowed in ["`local`", "`aws`", "`sim`"] {
        assert!(e.message.contains(allowed), "{e}");
    }
    // aws fields stay aws-only.
    let e = one(&bad(
        "provider = \"local\"\n",
        "provider = \"sim\"\nami = \"ami-1\"\n",
    ));
    assert!(
        e.message.contains("applies only to provider \"aws\""),
        "{e}"
    );
}

/// The flight recorder's size per component (`log.options.flight-size`): a process's and a
/// container's, from 4k to 1m, located when wrong; the plan carries it to the agent.
#[test]
fn a_components_flight_size_is_validated_and_planned() {
    let text = bad(
        "ports = { http = 8080 }\nhealth",
        "ports = { http = 8080 }\nlog = { options = { flight-size = \"256k\" } }\nhealth",
    );
    let fleet = parse_fleet(&text, "drover.toml").unwrap();
    let plan = drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "local");
    assert_eq!(plan.components[0].flight_bytes(), 256 << 10);
    let plan = drover_model::plan::plan_for(
        &parse_fleet(GOOD, "drover.toml").unwrap(),
        "web",
        &parse_fleet(GOOD, "drover.toml").unwrap().services["web"],
        "local",
    );
    assert_eq!(plan.components[0].flight_bytes(), 64 << 10, "the default");
    let e = one(&bad(
        "ports = { http = 8080 }\nhealth",
        "ports = { http = 8080 }\nlog = { options = { flight-size = \"2m\" } }\nhealth",
    ));
    assert_eq!(
        e.field,
        "services.web.components.app.log.options.flight-size"
    );
    assert!(e.message.contains("from 4k to 1m"), "{}", e.message);
    assert!(e.line > 0 && e.column > 0);
    // A container's: its own option, checked the same way.
    let e = docker_bad("max-size = \"1m\"", "flight-size = \"1k\"");
    assert!(e.message.contains("from 4k to 1m"), "{}", e.message);
    let ok = DOCKER.replacen(
        "max-size = \"1m\"",
        "max-size = \"1m\", flight-size = \"512k\"",
        1,
    );
    let fleet = parse_fleet(&ok, "drover.toml").unwrap();
    let plan = drover_model::plan::plan_for(&fleet, "web", &fleet.services["web"], "local");
    assert_eq!(plan.components[0].flight_bytes(), 512 << 10);
}

/// Issue 20: a `local` region's `run_as` is a user name or `UID[:GID]`, and `local` only.
#[test]
fn run_as_is_a_user_of_a_local_region() {
    for user in ["nobody", "_drover", "svc-1", "65534", "65534:65534"] {
        let f = parse_fleet(
            &bad(
                "provider = \"local\"\n",
                &format!("provider = \"local\"\nrun_as = \"{user}\"\n"),
            ),
            "f.toml",
        )
        .unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(f.regions["local"].run_as.as_deref(), Some(user));
    }
    for user in ["", "Root", "a b", "1:x", "x:1", "-n", "99999999999"] {
        let e = one(&bad(
            "provider = \"local\"\n",
            &format!("provider = \"local\"\nrun_as = \"{user}\"\n"),
        ));
        assert_eq!(e.field, "regions.local.run_as", "{user}: {e}");
        assert!(e.message.contains("is not a user name"), "{e}");
    }
    let e = one(&bad(
        "provider = \"local\"\n",
        "provider = \"sim\"\nrun_as = \"nobody\"\n",
    ));
    assert!(e.message.contains("only to provider \"local\""), "{e}");
}
