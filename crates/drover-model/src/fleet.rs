//! The fleet file (`drover.toml`) as typed data: regions, services, components, policies.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::duration::Dur;

/// Everything one fleet file declares.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    pub fleet: FleetMeta,
    #[serde(default)]
    pub regions: IndexMap<String, Region>,
    #[serde(default)]
    pub services: IndexMap<String, Service>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetMeta {
    pub name: String,
}

/// Where instances live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub provider: ProviderKind,
    /// `local` and `sim`: the loopback block instance addresses come from (default
    /// `127.1.0.0/16`; a `sim` instance's address is only recorded, never bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// `aws` only: the AWS region (default: the region's own name, e.g. `us-east-1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_region: Option<String>,
    /// `aws` only: the subnets the Auto Scaling groups and load balancers span.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    /// `aws` only: security groups of the instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// `aws` only: the AMI instances boot (one with the drover agent; see docs/aws.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami: Option<String>,
    /// `aws` only: the IAM instance profile (name) of the instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_profile: Option<String>,
    /// `aws` only: another endpoint for every AWS API (e.g. a moto server in tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `local` only: the user every instance's agent (and so its components) runs as, a
    /// name (`"nobody"`) or `UID[:GID]`; the server must run as root. Default: the server's
    /// own user (see docs/security.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
}

impl Region {
    /// The AWS region of an `aws` region: `aws_region`, else the region's name.
    pub fn aws_region_or<'a>(&'a self, name: &'a str) -> &'a str {
        self.aws_region.as_deref().unwrap_or(name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Local,
    Docker,
    Aws,
    /// Launches are recorded, no process starts: an external load tool reports for the
    /// instances (see docs/benchmarks.md, `drover-fleetsim`).
    Sim,
}

impl ProviderKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Docker => "docker",
            ProviderKind::Aws => "aws",
            ProviderKind::Sim => "sim",
        }
    }
}

/// A role (e.g. `frontend`): components, a capacity range, an ingress and a rollout policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub regions: Vec<String>,
    pub capacity: Capacity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Ingress>,
    #[serde(default)]
    pub rollout: Rollout,
    /// Target tracking on a utilization metric, between capacity.min and capacity.max.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
    /// Capacity raised ahead of demand: from each firing of a cron pattern, for a while
    /// (`[[services.NAME.schedule]]`; see docs/autoscaling.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<Schedule>,
    /// An instance that reports unhealthy (or nothing) for this long after booting is replaced.
    #[serde(default = "default_replace_unhealthy_after")]
    pub replace_unhealthy_after: Dur,
    /// `aws` regions: the EC2 instance type of the service's instances (default `t3.micro`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Services its components talk to: each gets their instances in its region (healthy, in
    /// rotation, not leaving) in `$DROVER_PEERS` and from the agent's DNS responder
    /// (`NAME.drover.`). See docs/operate.md.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uses: Vec<String>,
    /// `false`: `drover exec` is refused on its instances (default: allowed, to admins).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub exec: bool,
    pub components: IndexMap<String, Component>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn default_replace_unhealthy_after() -> Dur {
    Dur::from_secs(30)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub min: u32,
    pub desired: u32,
    pub max: u32,
}

/// One TCP listener in front of the group, forwarding to one named component port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ingress {
    /// `ip:port` the balancer listens on.
    pub listen: String,
    /// Component whose port receives the traffic; may be omitted when one component has `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// Name of the component port traffic is forwarded to.
    pub port: String,
    /// Per region, another `ip:port` than `listen` (several `local` regions of one service
    /// each need their own), e.g. `{ b = "127.0.0.1:8081" }`.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub listen_in: IndexMap<String, String>,
    /// How the built-in balancer (`local` regions) picks an instance for a new connection:
    /// `round_robin` (the default) or `least_connections`.
    #[serde(default, skip_serializing_if = "crate::api::Balance::is_default")]
    pub balance: crate::api::Balance,
}

/// How a version change replaces instances.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rollout {
    pub max_surge: u32,
    pub max_unavailable: u32,
    pub min_healthy_time: Dur,
    pub healthy_deadline: Dur,
    pub auto_revert: bool,
    pub drain_timeout: Dur,
    /// A new instance whose component exits this many times before it was ever healthy
    /// fails the rollout at once (0: only `healthy_deadline` does).
    pub fail_after_exits: u32,
    /// First a few new instances beside the old ones for `bake`, then an analysis.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// How the canary is judged (with a canary only).
    #[serde(skip_serializing_if = "Analysis::is_default")]
    pub analysis: Analysis,
    /// Regions in waves, e.g. `[["eu-west-1"], ["us-east-1", "us-west-2"], ["*"]]`: a change
    /// reaches the groups of a wave once every group of the earlier waves has finished its
    /// rollout and `wave_bake` has passed. `"*"`: every region not named before.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Vec<String>>,
    /// How long a finished wave runs before the next one starts.
    pub wave_bake: Dur,
}

impl Rollout {
    /// The wave of `region` (0 = the first); 0 without waves, or for a region in none.
    pub fn wave_of(&self, region: &str) -> usize {
        self.waves
            .iter()
            .position(|w| w.iter().any(|r| r == region))
            .or_else(|| self.waves.iter().position(|w| w.iter().any(|r| r == "*")))
            .unwrap_or(0)
    }
}

/// `rollout.canary`: how many new instances serve beside the old ones, and for how long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// This many canary instances (default 1 without `percent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
    /// Or this share of the group's desired count, rounded up (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// How long the canaries serve before they are judged.
    #[serde(default = "default_bake")]
    pub bake: Dur,
}

fn default_bake() -> Dur {
    Dur::from_secs(300)
}

impl Canary {
    /// Canary instances for a group of `desired`: at least 1, at most `desired`.
    pub fn size(&self, desired: u32) -> u32 {
        let n = match (self.instances, self.percent) {
            (Some(n), _) => n,
            (None, Some(p)) => (desired * p).div_ceil(100),
            (None, None) => 1,
        };
        n.clamp(1, desired.max(1))
    }
}

/// `rollout.analysis`: what the canary is compared with its baseline on, beyond the
/// built-in checks (restarts, health, the balancer's connect failures), and what a failed
/// analysis does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Analysis {
    pub mode: AnalysisMode,
    pub metrics: Vec<AnalysisMetric>,
}

impl Analysis {
    pub fn is_default(&self) -> bool {
        *self == Analysis::default()
    }
}

/// What a failed analysis does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnalysisMode {
    /// Fail the rollout (and revert, with `auto_revert`).
    #[default]
    Auto,
    /// Pause the rollout and wait for a person (`drover rollout promote` or `abort`).
    Advise,
}

/// One custom metric the canary is judged on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisMetric {
    /// A custom metric of the service's components (`custom_metrics`).
    pub metric: String,
    /// Which way is better.
    pub direction: Direction,
    /// The canary fails when its mean is beyond the baseline's mean times this (lower), or
    /// divided by it (higher).
    #[serde(default = "default_max_ratio")]
    pub max_ratio: f64,
    /// An absolute allowance on top of the ratio (a baseline at 0 would fail any canary).
    #[serde(default)]
    pub tolerance: f64,
}

fn default_max_ratio() -> f64 {
    1.5
}

/// Which way a metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Lower,
    Higher,
}

impl Default for Rollout {
    fn default() -> Rollout {
        Rollout {
            max_surge: 1,
            max_unavailable: 0,
            min_healthy_time: Dur::from_secs(5),
            healthy_deadline: Dur::from_secs(60),
            auto_revert: true,
            drain_timeout: Dur::from_secs(10),
            fail_after_exits: 3,
            canary: None,
            analysis: Analysis::default(),
            waves: Vec::new(),
            wave_bake: Dur::from_secs(600),
        }
    }
}

/// Target tracking: desired = ceil(desired x observed / target), clamped to min..max; fast
/// out, slow in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    /// `cpu` (cores busy per instance, 1.0 = one core), or `custom:NAME` (a component's
    /// `custom_metrics.NAME`).
    pub metric: String,
    /// The per-instance value to hold the metric at.
    pub target: f64,
    /// After a scale-out, wait this long before the next one.
    #[serde(default = "default_scale_out_cooldown")]
    pub scale_out_cooldown: Dur,
    /// Scale in only to the highest count recommended over this window.
    #[serde(default = "default_scale_in_stabilization")]
    pub scale_in_stabilization: Dur,
    /// No change while observed/target is within 1 +- tolerance.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// An instance counts in the metric only once healthy for this long.
    #[serde(default = "default_warmup")]
    pub warmup: Dur,
}

fn default_scale_out_cooldown() -> Dur {
    Dur::from_secs(30)
}
fn default_scale_in_stabilization() -> Dur {
    Dur::from_secs(300)
}
fn default_tolerance() -> f64 {
    0.1
}
fn default_warmup() -> Dur {
    Dur::from_secs(10)
}

impl Autoscale {
    /// The custom metric's name, for `custom:NAME`.
    pub fn custom_name(&self) -> Option<&str> {
        self.metric.strip_prefix("custom:")
    }
}

/// A scheduled raise of a service's capacity: from every firing of `cron` (read in
/// `timezone`), for `duration`, the group's min, desired and max are at least these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Five-field cron: minute hour day-of-month month day-of-week, e.g. `0 17 * * SAT`.
    pub cron: String,
    /// The IANA time zone the pattern is read in (default `UTC`).
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// How long the raised bounds hold after each firing.
    pub duration: Dur,
    /// The floor while it holds (autoscaling never goes below it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    /// The count it sets when it fires (if the group has fewer); autoscaling goes on from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<u32>,
    /// The ceiling while it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

fn default_timezone() -> String {
    "UTC".to_string()
}

/// A number a component serves over HTTP (its body, e.g. `0.73`), read by the agent with
/// every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomMetric {
    /// Named port of the component.
    pub port: String,
    /// Path of the HTTP GET.
    pub path: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Process,
    Docker,
}

/// One process (or container) of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Component {
    pub runtime: Runtime,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub env: IndexMap<String, String>,
    /// Environment variables whose values are secret: passed to the component like `env`
    /// (literally: no `{placeholder}` substitution), redacted in everything the server shows.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub secret_env: IndexMap<String, String>,
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub ports: IndexMap<String, u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// Numbers the component serves over HTTP, reported with heartbeats (for autoscaling).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub custom_metrics: IndexMap<String, CustomMetric>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default = "default_stop_grace")]
    pub stop_grace: Dur,
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// The signal sent to the component's main process (a container's PID 1) when its
    /// instance starts draining on a permit, e.g. `SIGUSR1`: from then on it may close kept-alive
    /// connections, so the drain ends before `drain_timeout`. None (the default): no signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_signal: Option<String>,
    /// `docker`: the image, e.g. `registry:5000/web:{version}`; with neither tag nor digest,
    /// the version is its tag. Pinned to a digest when a plan is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `docker`: replaces the image's ENTRYPOINT (`command` and `args` replace its CMD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `docker`: the port inside the container of a named port, when it differs from the port
    /// published on the instance's address (`ports`).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub container_ports: IndexMap<String, u16>,
    /// `docker`: `SOURCE:TARGET[:ro|rw]`; SOURCE is a host path (absolute, or under `{dir}`)
    /// or a named volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// `docker`: CPU limit in cores (`0.5` = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// `docker`: memory limit (`256m`, `1g`); the container is OOM-killed above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// `docker`: the engine's log driver and its options (default: `json-file`, 10m x 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogConfig>,
    /// `docker`: the container's network: `bridge` (default: `ports` are published on the
    /// instance's address), `host` (the component binds the instance's address itself, as a
    /// process would), or the name of a network the engine has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Services this component talks to, beside its service's `uses`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uses: Vec<String>,
}

/// A container's log driver and options, as `docker run --log-driver/--log-opt` take them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_driver")]
    pub driver: String,
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub options: IndexMap<String, String>,
}

fn default_log_driver() -> String {
    "json-file".to_string()
}

impl Default for LogConfig {
    /// `json-file`, rotated at 10 MB, 3 files kept: bounded disk use on every instance.
    fn default() -> LogConfig {
        LogConfig {
            driver: default_log_driver(),
            options: [
                ("max-size".to_string(), "10m".to_string()),
                ("max-file".to_string(), "3".to_string()),
            ]
            .into_iter()
            .collect(),
        }
    }
}

fn default_stop_grace() -> Dur {
    Dur::from_secs(10)
}

fn default_stop_signal() -> String {
    "SIGTERM".to_string()
}

/// A `.tar.gz` fetched from a path or an http(s) URL, checked against its sha256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub url: String,
    pub sha256: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Tcp,
    Http,
    Exec,
}

/// How the agent decides a component is healthy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: HealthKind,
    /// Named port to probe (tcp, http).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Path of the http GET (http).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Command and arguments (exec); exit status 0 is healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default = "default_interval")]
    pub interval: Dur,
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    #[serde(default = "one")]
    pub healthy_threshold: u32,
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
}

fn default_interval() -> Dur {
    Dur::from_secs(1)
}
fn default_timeout() -> Dur {
    Dur::from_millis(500)
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}

/// Exponential backoff for respawns: the first restart is immediate, then
/// `initial_delay`, doubling up to `max_delay`; after running `reset_after` the count resets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    pub initial_delay: Dur,
    pub max_delay: Dur,
    pub reset_after: Dur,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            initial_delay: Dur::from_millis(200),
            max_delay: Dur::from_secs(30),
            reset_after: Dur::from_secs(60),
        }
    }
}

impl Fleet {
    /// The ingress target of a service: (component name, port name, port number).
    pub fn ingress_target(service: &Service) -> Option<(&str, &str, u16)> {
        let ing = service.ingress.as_ref()?;
        match &ing.component {
            Some(c) => {
                let comp = service.components.get(c)?;
                let port = *comp.ports.get(&ing.port)?;
                Some((c.as_str(), ing.port.as_str(), port))
            }
            None => service.components.iter().find_map(|(name, comp)| {
                comp.ports
                    .get(&ing.port)
                    .map(|p| (name.as_str(), ing.port.as_str(), *p))
            }),
        }
    }
}
