//! Providers: where instances come from. One trait; `local` (child processes on loopback
//! addresses) and `sim` (launches recorded, no process: for load tests) always, `aws` (EC2 Auto Scaling groups and Network Load Balancers) behind the
//! cargo feature `aws`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;

#[cfg(feature = "aws")]
pub mod aws;
pub mod local;
pub mod sim;
mod tasks;

pub use local::{LocalConfig, LocalProvider};
pub use sim::{SimProvider, SimRegion};

/// What an instance needs to talk to the server, besides its plan: its group's agent token
/// and the server's CA, pinned by fingerprint. Part of the launch configuration. The server
/// keeps the token map current (a new group, a rotated token); clones share it.
#[derive(Clone, Default)]
pub struct Credentials {
    /// Per group: the agent token's id and secret.
    tokens: std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, (String, String)>>>,
    /// The server's CA certificate, when the API is served over TLS.
    pub ca: Option<CaPin>,
}

/// The CA an agent trusts, and the sha256 of its DER encoding it must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPin {
    /// A PEM file (the local provider passes its path; a cloud provider would inline it).
    pub file: PathBuf,
    /// Lowercase hex sha256 of the certificate's DER bytes.
    pub sha256: String,
}

impl Credentials {
    /// The group's agent token (for launch configurations shared by a whole group, such as
    /// an AWS launch template's boot document).
    pub fn token(&self, group: &str) -> Option<String> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .map(|(_, t)| t.clone())
    }

    /// The token instance `instance` of `group` is launched with: good for that instance
    /// only ([`drover_model::token::instance_token`]).
    pub fn instance_token(&self, group: &str, instance: &str) -> Option<String> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .map(|(id, t)| drover_model::token::instance_token(t, id, instance))
    }

    pub fn set_token(&self, group: &str, id: &str, token: String) {
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group.to_string(), (id.to_string(), token));
    }

    pub fn remove_token(&self, group: &str) {
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(group);
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<String> = self
            .tokens
            .read()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Credentials")
            .field("token_groups", &groups)
            .field("ca", &self.ca)
            .finish()
    }
}

/// Launch one instance of a group, booting from `plan`.
#[derive(Clone, Debug)]
pub struct LaunchRequest {
    pub instance: String,
    /// The instance's sequence number (unique for the life of the data directory).
    pub seq: u64,
    pub group: String,
    pub plan: drover_model::Plan,
}

/// A launched instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launched {
    /// The provider's own handle (a pid, an EC2 instance id).
    pub provider_id: String,
    pub addr: IpAddr,
    /// The id the instance knows itself by, when the provider names instances (on EC2 the
    /// agent reads its instance id from metadata); `None`: the requested id.
    pub instance: Option<String>,
    /// Launched with a token of its own ([`Credentials::instance_token`]): its group's
    /// token must never speak for it.
    pub own_token: bool,
}

/// A group as its provider must make it exist: its launch configuration (the plan) and, for a
/// provider with a balancer of its own (an NLB on AWS), its ingress.
#[derive(Clone, Debug)]
pub struct GroupSetup {
    pub fleet: String,
    /// `service/region`.
    pub group: String,
    pub service: String,
    pub region: String,
    pub plan: drover_model::Plan,
    /// The service's `instance_type`.
    pub instance_type: Option<String>,
    /// The most instances the group may have at once: capacity.max, the rollout's surge, and
    /// the instances still draining on their permits.
    pub max_size: u32,
    pub ingress: Option<IngressPlan>,
    /// Whether an instance leaving on a permit lowers the group's capacity (the controller
    /// launches the replacement itself) or the provider replaces it, when its permit does not
    /// say (the permit's `decrement` decides per leaver).
    pub decrement_on_leave: bool,
}

/// The ingress of a group, for a provider's own balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressPlan {
    pub listen_port: u16,
    pub target_port: u16,
    /// The ingress component's check: HTTP on this path, or TCP when `None`.
    pub http_path: Option<String>,
    pub interval: Duration,
    pub rise: u32,
    pub fall: u32,
    /// How long a leaving target keeps its connections (the rollout's drain timeout).
    pub drain: Duration,
}

/// An instance the provider saw end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub instance: String,
    pub status: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("launch failed: {0}")]
    Launch(String),
    /// The provider's cloud refused or failed a call.
    #[error("{0}")]
    Cloud(String),
}

/// Makes groups' instances exist and go away.
pub trait Provider: Send + Sync {
    fn kind(&self) -> &'static str;
    fn launch(&self, req: LaunchRequest) -> BoxFuture<'_, Result<Launched, ProviderError>>;
    /// Ask the instance to stop (gracefully, then forcibly after `grace`). Returns at once.
    fn terminate(
        &self,
        instance: &str,
        grace: Duration,
    ) -> BoxFuture<'_, Result<(), ProviderError>>;
    /// Whether the provider still sees the instance.
    fn alive(&self, instance: &str) -> bool;
    /// After a server restart: take back a still-running instance. False if it is gone.
    fn adopt(&self, instance: &str) -> bool;
    /// After a server restart: the running instances this provider launched that are not in
    /// `known` (the store's records), each taken back as [`Provider::adopt`] does so it can
    /// be terminated. A server that stopped between a launch and its record leaves one;
    /// nothing else would ever stop it. Providers whose cloud reports its instances itself
    /// (an Auto Scaling group) have none.
    fn unrecorded(&self, _known: &std::collections::BTreeSet<String>) -> Vec<String> {
        Vec::new()
    }
    /// Stop every instance this provider started, waiting up to `grace`.
    fn shutdown(&self, grace: Duration) -> BoxFuture<'_, ()>;
    /// Stop the provider's background tasks and wait for them: afterwards nothing of the
    /// provider runs. Its instances are left as they are.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

    /// Make the group exist at the provider with `spec` as its launch configuration, before
    /// any instance of a new generation launches or any stale instance gets a permit.
    /// Idempotent and cheap when nothing changed. Returns what it created or changed, one
    /// line each (recorded as events).
    fn prepare(&self, _spec: GroupSetup) -> BoxFuture<'_, Result<Vec<String>, ProviderError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Remove what the provider made for groups of this region that are not in `keep` and
    /// have no instances left. Returns what it removed, one line each.
    fn sweep(
        &self,
        _keep: std::collections::BTreeSet<String>,
    ) -> BoxFuture<'_, Result<Vec<String>, ProviderError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Whether the provider balances the groups' ingresses itself (an NLB on AWS): then the
    /// server opens no listener for them.
    fn balances(&self) -> bool {
        false
    }

    /// Leave path: take the instance out of the provider's balancer; connections in flight
    /// drain for the ingress's drain time. Returns at once.
    fn deregister(&self, _instance: &str) {}

    /// Connections the provider's balancer still drains for the instance (`None`: the
    /// provider has no balancer; the server's own balancer answers).
    fn draining(&self, _instance: &str) -> Option<u64> {
        None
    }
}
