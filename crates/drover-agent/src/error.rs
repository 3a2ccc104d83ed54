//! What can go wrong in the agent, each with the thing it concerns and what to check.

use std::path::PathBuf;

/// Errors of the agent. Component-level ones (artifact, start) do not stop the agent: the
/// component is reported `failed` with the message and retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create directory {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("artifact {url}: cannot fetch: {reason}")]
    Fetch { url: String, reason: String },
    #[error(
        "artifact {url}: sha256 mismatch: expected {expected}, got {actual}; refusing to unpack it"
    )]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("artifact {url}: refusing unsafe entry {entry:?}: {reason}")]
    UnsafeEntry {
        url: String,
        entry: String,
        reason: &'static str,
    },
    #[error("artifact {url}: cannot unpack: {source}")]
    Unpack {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("component {component}: {source}")]
    Placeholder {
        component: String,
        #[source]
        source: drover_model::subst::SubstError,
    },
    #[error("component {component}: cannot start {command:?}: {source}")]
    Spawn {
        component: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("component {component}: runtime {runtime:?} is not supported by this agent; use runtime = \"process\"")]
    UnsupportedRuntime { component: String, runtime: String },
    #[error("component {component}: invalid health check: {reason}")]
    HealthCheck { component: String, reason: String },
    #[error("cannot build the http client: {0}")]
    HttpClient(String),
    #[error("Docker Engine: {0}")]
    Engine(String),
    #[error("image {image}: cannot pull: {reason}")]
    Image { image: String, reason: String },
    #[error("component {component}: {reason}")]
    Container { component: String, reason: String },
}
