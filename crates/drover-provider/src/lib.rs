//! Providers: where instances come from. One trait; `local` (child processes on loopback
//! addresses) now, `docker` and `aws` behind cargo features later.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;

pub mod local;

pub use local::{LocalConfig, LocalProvider};

/// What an instance needs to talk to the server, besides its plan: its group's agent token
/// and the server's CA, pinned by fingerprint. Part of the launch configuration. The server
/// keeps the token map current (a new group, a rotated token); clones share it.
#[derive(Clone, Default)]
pub struct Credentials {
    tokens: std::sync::Arc<std::sync::RwLock<std::collections::HashMap<String, String>>>,
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
    /// The token new instances of `group` are launched with.
    pub fn token(&self, group: &str) -> Option<String> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .cloned()
    }

    pub fn set_token(&self, group: &str, token: String) {
        self.tokens
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group.to_string(), token);
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
    /// Stop every instance this provider started, waiting up to `grace`.
    fn shutdown(&self, grace: Duration) -> BoxFuture<'_, ()>;
}
