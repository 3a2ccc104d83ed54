//! Providers: where instances come from. One trait; `local` (child processes on loopback
//! addresses) now, `docker` and `aws` behind cargo features later.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;

pub mod local;

pub use local::{LocalConfig, LocalProvider};

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
