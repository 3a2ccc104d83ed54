//! Plans: the resolved, immutable description an instance boots from.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use crate::duration::Dur;
use crate::fleet::{Artifact, CustomMetric, Fleet, HealthCheck, RestartPolicy, Runtime, Service};
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
}

impl Plan {
    pub fn group(&self) -> GroupId {
        GroupId::new(&self.service, &self.region)
    }

    /// Whether two plans run the same thing (generation and revision aside).
    pub fn same_content(&self, other: &Plan) -> bool {
        self.components == other.components
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
                env: c.env.iter().map(|(k, x)| (k.clone(), v(x))).collect(),
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
