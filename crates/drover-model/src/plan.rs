//! Plans: the resolved, immutable description an instance boots from.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::duration::Dur;
use crate::fleet::{
    Artifact, CustomMetric, Fleet, HealthCheck, LogConfig, RestartPolicy, Runtime, Service,
};
use crate::ids::GroupId;
use crate::subst;

/// What one group's instances run, pinned for the life of each instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub fleet: String,
    pub service: String,
    pub region: String,
    /// Increases by one each time the group's plan content changes.
    pub generation: u64,
    /// The fleet revision this generation was made from.
    pub revision: u64,
    pub components: Vec<PlanComponent>,
}

/// One component with its version substituted in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanComponent {
    pub name: String,
    pub runtime: Runtime,
    pub version: String,
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: IndexMap<String, String>,
    #[serde(default)]
    pub ports: IndexMap<String, u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<Artifact>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub custom_metrics: IndexMap<String, CustomMetric>,
    pub restart: RestartPolicy,
    pub stop_grace: Dur,
    pub stop_signal: String,
    /// Sent to the component when its instance starts draining (see the fleet file's field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_signal: Option<String>,
    /// `docker` components: the image and the container's settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerSpec>,
    /// Services it talks to (its service's `uses` and its own, sorted): its agent gives it
    /// their peers in `$DROVER_PEERS` and over DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uses: Vec<String>,
    /// `process` components: the rotation of the agent's log files (`max-size`, `max-file`);
    /// `None`: the defaults (10m x 3). Docker components' is in `docker.log`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogConfig>,
}

impl PlanComponent {
    /// How much of its output the flight recorder keeps: its `log.options.flight-size`
    /// (`docker.log` for a container), else 64 KiB.
    pub fn flight_bytes(&self) -> usize {
        crate::logs::flight_bytes(self.log.as_ref().or(self.docker.as_ref().map(|d| &d.log)))
    }
}

/// How a `docker` component's container is made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DockerSpec {
    /// The reference with the version in it, e.g. `127.0.0.1:5000/web:v2`.
    pub image: String,
    /// `repository@sha256:…`: what the agent runs, resolved by the server when the plan was
    /// made, so every instance of the plan runs the same bytes. `None`: not resolved (the agent
    /// then runs `image` as it finds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// The port inside the container of every named port (the same number unless overridden).
    #[serde(default)]
    pub container_ports: IndexMap<String, u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    #[serde(default)]
    pub log: LogConfig,
    /// `bridge`, `host` or a network's name.
    #[serde(default = "default_network")]
    pub network: String,
}

fn default_network() -> String {
    "bridge".to_string()
}

impl DockerSpec {
    /// What to run: the pinned reference if resolved, else the image as written.
    pub fn reference(&self) -> &str {
        self.pinned.as_deref().unwrap_or(&self.image)
    }
}

impl Plan {
    pub fn group(&self) -> GroupId {
        GroupId::new(&self.service, &self.region)
    }

    /// Whether two plans run the same thing (generation and revision aside). Image pins are
    /// left out: a plan made from the same file pins what the current one pinned.
    pub fn same_content(&self, other: &Plan) -> bool {
        let unpinned = |p: &Plan| -> Vec<PlanComponent> {
            p.components
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    if let Some(d) = c.docker.as_mut() {
                        d.pinned = None;
                    }
                    c
                })
                .collect()
        };
        if self.components.iter().all(|c| c.docker.is_none()) {
            return self.components == other.components;
        }
        unpinned(self) == unpinned(other)
    }

    /// `app=v1, sidecar=v3`: the versions, for tables and events.
    pub fn versions(&self) -> String {
        self.components
            .iter()
            .map(|c| format!("{}={}", c.name, c.version))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The plan content of `service` in `region` (generation and revision still to be set).
pub fn plan_for(fleet: &Fleet, service_name: &str, svc: &Service, region: &str) -> Plan {
    let components = svc
        .components
        .iter()
        .map(|(name, c)| {
            let version = c.version.clone();
            let v =
                |t: &str| subst::render_partial(t, |n| (n == "version").then(|| version.clone()));
            PlanComponent {
                name: name.clone(),
                runtime: c.runtime,
                version: c.version.clone(),
                command: v(c.command.as_deref().unwrap_or_default()),
                args: c.args.iter().map(|a| v(a)).collect(),
                env: c
                    .env
                    .iter()
                    .map(|(k, x)| (k.clone(), v(x)))
                    // Secret values are literal: escaped so the agent's substitution keeps them.
                    .chain(
                        c.secret_env
                            .iter()
                            .map(|(k, x)| (k.clone(), crate::secret::escape_braces(x))),
                    )
                    .collect(),
                ports: c.ports.clone(),
                artifact: c.artifact.as_ref().map(|a| Artifact {
                    url: v(&a.url),
                    sha256: a.sha256.to_ascii_lowercase(),
                }),
                health: c.health.clone(),
                custom_metrics: c.custom_metrics.clone(),
                restart: c.restart.clone(),
                stop_grace: c.stop_grace,
                stop_signal: c.stop_signal.clone(),
                drain_signal: c.drain_signal.clone(),
                uses: {
                    let mut u: Vec<String> = svc.uses.iter().chain(&c.uses).cloned().collect();
                    u.sort();
                    u.dedup();
                    u
                },
                docker: (c.runtime == Runtime::Docker).then(|| DockerSpec {
                    image: crate::image::with_version(
                        c.image.as_deref().unwrap_or_default(),
                        &c.version,
                    ),
                    pinned: None,
                    entrypoint: c
                        .entrypoint
                        .as_ref()
                        .map(|e| e.iter().map(|a| v(a)).collect()),
                    container_ports: c
                        .ports
                        .iter()
                        .map(|(n, p)| (n.clone(), *c.container_ports.get(n).unwrap_or(p)))
                        .collect(),
                    volumes: c.volumes.iter().map(|x| v(x)).collect(),
                    cpus: c.cpus,
                    memory: c.memory.as_deref().and_then(crate::image::parse_memory),
                    log: c.log.clone().unwrap_or_default(),
                    network: c.network.clone().unwrap_or_else(default_network),
                }),
                log: (c.runtime == Runtime::Process)
                    .then(|| c.log.clone())
                    .flatten(),
            }
        })
        .collect();
    Plan {
        fleet: fleet.fleet.name.clone(),
        service: service_name.to_string(),
        region: region.to_string(),
        generation: 0,
        revision: 0,
        components,
    }
}
