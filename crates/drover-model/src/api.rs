//! Types on the wire: requests and answers of the server's HTTP/JSON API, and the agent protocol.

use serde::{Deserialize, Serialize};

use crate::diff::Change;
use crate::fleet::Fleet;
use crate::validate::FleetError;

/// Every 4xx/5xx answer of the API carries this body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable machine-readable code: `invalid_fleet`, `bad_request`, `not_found`, `conflict`, `internal`.
    pub code: String,
    /// What is wrong and what to do about it.
    pub message: String,
    /// For `invalid_fleet`: every problem with its location.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FleetError>,
}

/// `POST /v1/apply`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// Name used in error messages (the file's path as the user gave it).
    pub file: String,
    /// The fleet file's text.
    pub toml: String,
    /// Only compute what would change.
    #[serde(default)]
    pub dry_run: bool,
    /// The file wins everywhere, also over what commands (deploy, rollback, scale,
    /// autoscaling, destroy) set since the file was last applied.
    #[serde(default)]
    pub force_file: bool,
}

/// Where the applied file and the live state disagree on a field the file did not change
/// since it was last applied (a three-way merge): the live value is kept, unless the apply
/// was forced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// e.g. `services.web.components.app.version`, or `services.web.capacity.desired (web/local)`.
    pub field: String,
    /// What the file says (`(absent)` when it does not have it).
    pub file: String,
    /// What runs now.
    pub live: String,
    /// Who set the live value, e.g. `deploy web app v2 (revision 2)` or `autoscale: ...`.
    pub set_by: String,
    /// The live value stays (`false`: the file won, `force_file`).
    pub kept: bool,
}

/// What the last file a person applied said, kept with each revision: the base of the
/// three-way merge of the next apply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LastApplied {
    /// The fleet file's text as last applied.
    pub toml: String,
    /// Fields whose live value a command set since, and which (`drift.set_by`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub set_by: std::collections::BTreeMap<String, String>,
}

/// The answer of apply: the diff it applied (or would apply).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The current revision after the call (unchanged when nothing changed or dry_run).
    pub revision: u64,
    /// Whether a new revision was stored.
    pub applied: bool,
    pub changes: Vec<Change>,
    /// Groups that get a new plan generation, e.g. `web/local: generation 1 -> 2 (app=v2)`.
    #[serde(default)]
    pub plan_changes: Vec<String>,
    /// What the rollouts will do, per group that gets a new generation.
    #[serde(default)]
    pub rollouts: Vec<RolloutPlan>,
    /// Where the file and the live state disagree on what the file did not change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<Drift>,
    /// Schedules the file adds or changes, with their next firings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleFirings>,
}

/// How a new generation will replace a group's instances.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutPlan {
    pub group: String,
    pub from_generation: u64,
    pub to_generation: u64,
    /// Instances to replace now.
    pub replaced: u32,
    /// Replacement batches, given max_surge and max_unavailable.
    pub batches: u32,
    /// Estimated duration in ms: batches x (boot + min_healthy_time), plus the canary's
    /// boot and bake.
    pub estimated_ms: u64,
    /// Its wave (1 = the first; 0: no waves). A group of a later wave starts once the waves
    /// before it are done and `wave_bake` has passed.
    #[serde(default)]
    pub wave: u32,
    /// The change waits for the group's wave (`to_generation` is the one it will get).
    #[serde(default)]
    pub held: bool,
}

/// One stored fleet revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub number: u64,
    pub applied_at_ms: u64,
    pub file: String,
    pub summary: String,
    /// The live fleet file: the last applied file with what commands changed since.
    pub toml: String,
    pub fleet: Fleet,
    /// The base of the next apply's three-way merge; absent in revisions stored before it
    /// existed (then `toml` is taken as the last applied file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_applied: Option<LastApplied>,
}

/// A revision without its body, for `drover history`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RevisionSummary {
    pub number: u64,
    pub applied_at_ms: u64,
    pub file: String,
    pub summary: String,
}

/// State of one component, as its agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentState {
    /// Fetching its artifact.
    Fetching,
    /// Started, health not yet established.
    Starting,
    /// Running and healthy (or running with no health check).
    Healthy,
    /// Running but failing its health check.
    Unhealthy,
    /// Exited; waiting for the backoff delay before the next start.
    Backoff,
    /// Cannot be started (e.g. its artifact cannot be fetched); retried with backoff.
    Failed,
    /// Stopped on purpose (the instance is leaving).
    Stopped,
}

/// One component in a heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComponentReport {
    pub name: String,
    pub version: String,
    pub state: ComponentState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The last lines the component printed before its last exit (at most
    /// [`LAST_OUTPUT_MAX`] bytes; `secret_env` values are scrubbed by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_output: Option<String>,
}

/// Most bytes of a component's last output an agent sends.
pub const LAST_OUTPUT_MAX: usize = 2048;

/// The heartbeat's limits, shared by fleet validation (a valid fleet's agents always fit), the
/// agent (which truncates what it sends) and the server (which clamps what it receives).
pub mod limits {
    /// Most components a service (and so a heartbeat) may have.
    pub const COMPONENTS: usize = 256;
    /// Longest component version, in bytes.
    pub const VERSION: usize = 256;
    /// Longest component name, in bytes.
    pub const COMPONENT_NAME: usize = 128;
    /// Most distinct custom metrics an instance may report.
    pub const CUSTOM_METRICS: usize = 64;
    /// Longest custom metric name, in bytes.
    pub const METRIC_NAME: usize = 128;
    /// Longest free text (message, last_exit, last_output) per component, in bytes.
    pub const TEXT: usize = 4096;
}

/// `s` cut to at most `max` bytes, on a character boundary, with `…` marking the cut.
pub fn truncate_text(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    const MARK: &str = "\u{2026}";
    let mut end = max.saturating_sub(MARK.len());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(MARK);
}

impl Heartbeat {
    /// Bring the free-form parts within [`limits`]: texts truncated, extra custom metrics (by
    /// name order) dropped. What identifies the instance and its components is left alone (the
    /// server refuses those when out of bounds). Both the agent, before sending, and the server,
    /// on receipt, call it: an over-long message is cut, never a reason to refuse a heartbeat.
    pub fn clamp(&mut self) {
        for c in &mut self.components {
            for t in [&mut c.message, &mut c.last_exit, &mut c.last_output]
                .into_iter()
                .flatten()
            {
                truncate_text(t, limits::TEXT);
            }
        }
        let custom = &mut self.utilization.custom;
        custom.retain(|k, v| !k.is_empty() && k.len() <= limits::METRIC_NAME && v.is_finite());
        while custom.len() > limits::CUSTOM_METRICS {
            custom.pop_last();
        }
    }
}

/// What the instance as a whole is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentPhase {
    Booting,
    Running,
    Draining,
    Stopping,
}

/// Resource use of the instance's components.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Utilization {
    /// CPU used by the components, in cores (1.0 = one core busy).
    pub cpu: f64,
    /// Resident memory of the components, in bytes.
    pub memory_bytes: u64,
    /// Resident memory of the agent itself, in bytes.
    pub agent_rss_bytes: u64,
    /// The components' custom metrics by name (see `custom_metrics` in the fleet file).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub custom: std::collections::BTreeMap<String, f64>,
}

/// `POST /v1/agent/heartbeat`: sent every interval, and at once when a component changes state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub instance: String,
    pub group: String,
    pub generation: u64,
    pub addr: String,
    pub phase: AgentPhase,
    /// Increases with every heartbeat of this agent process; lets the server drop stale ones.
    pub seq: u64,
    pub components: Vec<ComponentReport>,
    pub utilization: Utilization,
    /// Once the agent, leaving on a permit, has drained: how the drain went (in every
    /// heartbeat from then on; the server records it once, as a `drained` event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<DrainReport>,
}

/// How an agent's drain on its permit ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainReport {
    /// From the permit to the end of the drain.
    pub took_ms: u64,
    /// Open connections at the last check (None: they could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<u64>,
    /// The drain timeout ran out before the connections were seen to reach zero.
    pub timed_out: bool,
    /// The components that were sent their drain signal, e.g. `app (SIGUSR1)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signalled: Vec<String>,
}

impl DrainReport {
    /// `drained in 340ms: no open connection left (drain signal: app (SIGUSR1))`.
    pub fn describe(&self) -> String {
        let took = crate::duration::short(self.took_ms);
        let how = match (self.timed_out, self.open) {
            (false, _) => format!("drained in {took}: no open connection left"),
            (true, Some(n)) => format!(
                "drain timeout reached after {took} with {n} connection{} open; stopping anyway",
                if n == 1 { "" } else { "s" }
            ),
            (true, None) => format!(
                "drain timeout reached after {took} (open connections could not be read); stopping anyway"
            ),
        };
        if self.signalled.is_empty() {
            format!("{how} (no component has a drain_signal)")
        } else {
            format!("{how} (drain signal: {})", self.signalled.join(", "))
        }
    }
}

impl Heartbeat {
    /// An instance is healthy when it runs and every component is healthy.
    pub fn healthy(&self) -> bool {
        self.phase == AgentPhase::Running
            && !self.components.is_empty()
            && self
                .components
                .iter()
                .all(|c| c.state == ComponentState::Healthy)
    }
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The server knows this instance (false: it was never launched by this server or is gone).
    pub known: bool,
    /// Whether the instance may get a permit soon (it is stale, or its group is leaving, or it
    /// already holds one): only then does its agent hold the permit long-poll
    /// (`GET /v1/agent/permit`) open. `None` (a server older than this field) means "always
    /// long-poll", the earlier protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave_soon: Option<bool>,
}

impl HeartbeatReply {
    /// Whether the agent should hold the permit long-poll open after this answer.
    pub fn wants_permit_poll(&self) -> bool {
        self.leave_soon.unwrap_or(true)
    }
}

/// One instance of a used service, as its peers see it (`GET /v1/agent/peers`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerAddr {
    pub instance: String,
    /// Its IP address.
    pub addr: String,
    /// Its named ports (every component's), e.g. `{"http": 8080}`.
    pub ports: std::collections::BTreeMap<String, u16>,
}

/// `GET /v1/agent/peers`: the instances (healthy, in rotation, not leaving) of each service
/// the instance's components use, in its region. `version` grows with every change anywhere;
/// the agent sends back the last one it applied, which is how the server knows a leaving
/// instance is out of its peer sets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeersReply {
    /// This run of the server (a new leader or a restart starts a new one): a version is
    /// only comparable within one epoch.
    #[serde(default)]
    pub epoch: String,
    pub version: u64,
    pub services: std::collections::BTreeMap<String, Vec<PeerAddr>>,
}

/// What the server thinks of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Launched; no heartbeat yet.
    Launching,
    /// Reporting, not yet healthy.
    Booting,
    Healthy,
    Unhealthy,
    /// Stopped reporting.
    Silent,
    /// Leaving: drained, then terminated.
    Draining,
    /// Asked to terminate.
    Terminating,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: String,
    pub group: String,
    pub addr: String,
    pub generation: u64,
    pub state: InstanceState,
    pub launched_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_ms: Option<u64>,
    #[serde(default)]
    pub components: Vec<ComponentReport>,
    #[serde(default)]
    pub utilization: Utilization,
    /// Whether the balancer sends it new connections.
    pub in_rotation: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: String,
    pub service: String,
    pub region: String,
    pub provider: String,
    pub generation: u64,
    pub versions: String,
    pub min: u32,
    pub desired: u32,
    pub max: u32,
    pub healthy: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<String>,
    pub rollout: RolloutStatus,
    /// Who or what set the desired count, and why.
    pub desired_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleStatus>,
    /// The group's schedules (fleet file and one-off): the active one and the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<GroupSchedule>,
    pub instances: Vec<InstanceStatus>,
}

/// One window of a schedule: from a firing (or a one-off's start) to its end, the bounds it
/// raises.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleWindow {
    /// `web#0` (the first `[[services.web.schedule]]` of the file) or `7` (a one-off).
    pub id: String,
    /// What it is, e.g. `schedule web#0 (0 17 * * SAT Europe/London)`.
    pub what: String,
    pub start_ms: u64,
    pub end_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// The IANA time zone its times are shown in.
    pub timezone: String,
}

/// A group's schedules as `status` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSchedule {
    /// The window that holds the bounds now (the highest min of those active), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ScheduleWindow>,
    /// The next window to begin, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<ScheduleWindow>,
    /// The service's own capacity range (the file's), which `min`/`max` of the group raise.
    pub base_min: u32,
    pub base_max: u32,
}

/// A one-off scheduled change of a service's count, as stored (`drover scale web 50 --at
/// "2026-12-24 18:00" --for 3h`): from `start_ms` to `end_ms` its groups have at least
/// `desired` instances (min and desired raised to it, max too if it is lower).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledScale {
    pub id: u64,
    pub service: String,
    /// Only this region's group (default: every region of the service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub desired: u32,
    pub start_ms: u64,
    pub end_ms: u64,
    /// The IANA time zone the person wrote the time in (how it is shown).
    pub timezone: String,
    pub created_ms: u64,
    /// When it was cancelled (`drover schedule cancel ID`); a cancelled one never applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_ms: Option<u64>,
}

/// `POST /v1/schedules`: schedule a one-off change of a service's count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub desired: u32,
    pub start_ms: u64,
    pub end_ms: u64,
    /// How its times are shown (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// One schedule as `drover schedule list` shows it: of the fleet file, or a one-off.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleEntry {
    /// `web#0` (fleet file) or `7` (one-off: what `drover schedule cancel` takes).
    pub id: String,
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `file` or `once`.
    pub source: String,
    pub what: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// `active`, `waiting`, `done` or `cancelled`.
    pub state: String,
    /// The window that holds now, if it is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<ScheduleWindow>,
    /// The next windows to begin (up to 3).
    #[serde(default)]
    pub next: Vec<ScheduleWindow>,
}

/// `GET /v1/schedules`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleEntry>,
}

/// What `plan`/`apply` shows of a schedule the file adds or changes: its next firings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleFirings {
    pub id: String,
    pub what: String,
    /// The next windows (up to 5).
    pub next: Vec<ScheduleWindow>,
}

/// What the autoscaler sees for a group.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    pub metric: String,
    pub target: f64,
    /// Mean over the instances measured; None when no instance reports it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<f64>,
    /// Instances whose metric counts (healthy and past warm-up).
    pub measured: u32,
    /// The count the metric alone asks for (before cooldown and stabilization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended: Option<u32>,
}

/// `POST /v1/scale`: set a group's desired count; autoscaling goes on from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub service: String,
    /// Only this region's group (default: every region of the service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub desired: u32,
}

/// The answer of scale: each group changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScaleResponse {
    pub groups: Vec<ScaledGroup>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScaledGroup {
    pub group: String,
    pub from: u32,
    pub to: u32,
}

/// Where a group's rollout stands.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RolloutStatus {
    /// A rollout to the current generation is under way.
    pub in_progress: bool,
    /// When the current generation became preferred (ms).
    pub since_ms: u64,
    /// The last generation every instance ran healthy.
    pub good_generation: u64,
    /// The last generation whose rollout failed (0: none).
    pub failed_generation: u64,
    /// Why it failed: what the instance's component said (exit status, last lines printed),
    /// or that no instance turned healthy within `healthy_deadline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The current generation reverted this one (0: not a revert).
    pub reverted_from: u64,
    /// Instances on the current generation / on older ones.
    pub current: u32,
    pub stale: u32,
    /// Instances on the current generation that are healthy.
    pub current_healthy: u32,
    /// Paused by a person (`drover rollout pause`).
    #[serde(default)]
    pub paused: bool,
    /// `canary`, `baking`, `rolling`, `paused`, `failed` or `done`.
    #[serde(default)]
    pub phase: String,
    /// The last canary analysis: `passed: ...` or `failed: ...`, with its numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<String>,
    /// The group's wave (1 = the first; 0: the service has no waves).
    #[serde(default)]
    pub wave: u32,
    /// The fleet's last change waits for this group's wave (phase `waiting`).
    #[serde(default)]
    pub wave_pending: bool,
    /// Held by hand: the last change was deployed to other regions only (phase `held`).
    #[serde(default)]
    pub held: bool,
}

/// What `POST /v1/rollout` does to a service's rollouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutAction {
    /// No permit, nothing new launched, until resumed (kept across server restarts).
    Pause,
    Resume,
    /// Go on at once (a paused rollout resumes).
    Promote,
    /// Stop it and go back to the last good generation.
    Abort,
}

/// `POST /v1/rollout`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutActionRequest {
    pub service: String,
    /// Only this region's group (default: every region of the service).
    #[serde(default)]
    pub region: Option<String>,
    pub action: RolloutAction,
}

/// The answer of `POST /v1/rollout`: the groups it acted on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutActionResponse {
    pub groups: Vec<RolloutActed>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutActed {
    pub group: String,
    pub generation: u64,
    /// What was done, e.g. `paused`, `already paused`, `resumed`, `aborted: going back to generation 1`.
    pub result: String,
}

/// `POST /v1/deploy`: make `version` the preferred version of one component of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeployRequest {
    pub service: String,
    pub component: String,
    pub version: String,
    #[serde(default)]
    pub dry_run: bool,
    /// Only these regions' groups (default: every region, wave by wave). The service's other
    /// groups keep their plan, held by hand, until a deploy names them or names no region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
}

/// `POST /v1/rollback`: go back to the versions of the revision before the current one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub service: String,
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /v1/destroy`: remove a service (or every service) from the fleet. Its instances
/// leave through the drain path; then the provider removes what it made for its groups
/// (on AWS: the Auto Scaling groups, launch templates, load balancers and target groups).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyRequest {
    /// `None`: every service.
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
}

/// `GET /v1/status`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub fleet: Option<String>,
    pub revision: Option<u64>,
    pub groups: Vec<GroupStatus>,
    /// Balancer processes (`drover lb`) that reported in the last minute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub balancers: Vec<BalancerStatus>,
    /// Who leads the control plane and the role of the server asked (`GET /v1/health` of
    /// that server; `drover status` fills it in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<Health>,
}

/// `GET /v1/agent/permit?instance=ID&wait_ms=N`: a long-poll that answers as soon as the
/// instance holds a permit, or with `permit: false` after `wait_ms`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PermitReply {
    pub permit: bool,
    /// How long to wait for open connections to close before stopping anyway.
    pub drain_timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// With a permit: whether the instance's group lowers its capacity as the instance
    /// terminates (`true`: the controller launches any replacement itself), or keeps it so
    /// that the provider launches the replacement (`false`: on AWS, a stale instance of a
    /// group whose rollout has `max_surge = 0`). Only agents that terminate their own
    /// instance through the provider use it (`drover agent --aws`). Absent (a server that
    /// predates it, or no permit): the agent keeps to its boot document's
    /// `decrement_on_leave`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decrement: Option<bool>,
}

/// `GET /v1/agent/connections?instance=ID`: open connections the balancer holds to the instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsReply {
    pub open: u64,
}

/// How a balancer picks the target of a new connection (`ingress.balance`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each new connection goes to the next target in turn.
    #[default]
    RoundRobin,
    /// The target with the fewest open connections (ties in turn).
    LeastConnections,
}

impl Balance {
    pub fn is_default(&self) -> bool {
        *self == Balance::default()
    }
}

/// The balancer's own active check of its targets.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LbHealth {
    /// An HTTP path (`GET`, 2xx/3xx passes); `None`: a TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

/// One instance a listener may forward to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LbTarget {
    /// The instance id.
    pub id: String,
    /// `ip:port`.
    pub addr: String,
}

/// One ingress: where the balancer listens and where it forwards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbListener {
    /// The group (`service/region`).
    pub name: String,
    /// `ip:port` to listen on.
    pub listen: String,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<LbHealth>,
    /// The instances in rotation.
    pub targets: Vec<LbTarget>,
    /// Instances that hold a permit or are terminating: never in rotation, whatever a
    /// balancer kept from before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leaving: Vec<String>,
}

/// `GET /v1/lb/config?epoch=E&version=V&wait_ms=N` (scope `lb`): the ingresses and their
/// targets. A long-poll: it answers at once when the server's epoch is not `E` or its
/// version is above `V`, else when either changes or after `wait_ms`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbConfig {
    /// Names one run of the server; versions count up within it.
    pub epoch: String,
    pub version: u64,
    /// The server has heard from every instance it knew of at its start (or waited out
    /// the grace for those it did not): its targets can be trusted to remove one. Until
    /// then a balancer adds the targets it is given to those it has, and removes only those
    /// in `leaving` (a restarted server must not empty a listener).
    pub rebuilt: bool,
    pub listeners: Vec<LbListener>,
}

/// `POST /v1/lb/report` (scope `lb`): what one balancer process holds now. Sent after it
/// applies a config and at least every second.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LbReport {
    /// Names the balancer process, e.g. `host:pid`.
    pub lb: String,
    /// The epoch and version of the last config it applied (empty, 0: none from this
    /// server yet).
    pub epoch: String,
    pub version: u64,
    /// `false` once it handed its listening sockets to a successor: its counts still count
    /// (its connections drain), its version no longer does.
    pub accepting: bool,
    /// Per listener (group): open connections per instance.
    pub connections: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    /// Listeners it could not open, with why.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub errors: std::collections::BTreeMap<String, String>,
    /// Its counters, rendered by the server's `/metrics` (JSON of `drover_lb::ListenerStats`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stats: Vec<serde_json::Value>,
}

/// A balancer as the server sees it (`GET /v1/status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalancerStatus {
    pub lb: String,
    /// Milliseconds since its last report.
    pub age_ms: u64,
    /// It applied the server's current config.
    pub current: bool,
    pub accepting: bool,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub errors: std::collections::BTreeMap<String, String>,
}

/// A server of the control plane, as the election knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerView {
    /// The server's id (one per process run).
    pub id: String,
    /// The URL it answers on (its `--advertise-url`).
    pub url: String,
    /// When it took the lead (ms since the epoch; leaders only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
}

/// `GET /v1/health`: this server answers, its role, and who leads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    /// `leader`, `follower` (another server leads) or `candidate` (nobody is known to lead).
    #[serde(default)]
    pub role: String,
    /// This server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerView>,
    /// The leader, when one is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<ServerView>,
    /// `sqlite` or `etcd`.
    #[serde(default)]
    pub store: String,
    /// Why nobody leads (the store's last error), when nobody does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[cfg(test)]
mod clamp_tests {
    use super::*;

    fn hb() -> Heartbeat {
        Heartbeat {
            instance: "i".into(),
            group: "web/local".into(),
            generation: 1,
            addr: "127.0.0.1".into(),
            phase: AgentPhase::Running,
            seq: 1,
            components: vec![ComponentReport {
                name: "app".into(),
                version: "v1".into(),
                state: ComponentState::Unhealthy,
                pid: None,
                restarts: 0,
                last_exit: Some("é".repeat(5000)),
                message: Some("x".repeat(limits::TEXT)),
                last_output: Some("y".repeat(1_000_000)),
            }],
            utilization: Utilization::default(),
            drained: None,
        }
    }

    #[test]
    fn clamp_cuts_texts_on_char_boundaries_and_drops_extra_metrics() {
        let mut h = hb();
        for i in 0..100 {
            h.utilization.custom.insert(format!("m{i:03}"), i as f64);
        }
        h.utilization.custom.insert("bad".into(), f64::NAN);
        h.clamp();
        let c = &h.components[0];
        // At the limit: untouched.
        assert_eq!(
            c.message.as_deref(),
            Some("x".repeat(limits::TEXT).as_str())
        );
        let exit = c.last_exit.as_deref().unwrap();
        assert!(
            exit.len() <= limits::TEXT && exit.ends_with('\u{2026}'),
            "{}",
            exit.len()
        );
        assert!(exit
            .trim_end_matches('\u{2026}')
            .chars()
            .all(|ch| ch == 'é'));
        assert!(c.last_output.as_deref().unwrap().len() <= limits::TEXT);
        assert_eq!(h.utilization.custom.len(), limits::CUSTOM_METRICS);
        assert!(!h.utilization.custom.contains_key("bad"));
        assert!(h.utilization.custom.contains_key("m000"));
        assert!(!h.utilization.custom.contains_key("m099"));
    }
}
