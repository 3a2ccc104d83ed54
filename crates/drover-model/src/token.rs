//! API tokens: scopes and the wire types of `/v1/tokens`.
//!
//! A token is a random secret shown once, when it is created; the server keeps only its
//! sha256. Its scope says what it may do:
//! - `admin`: everything, including changing desired state and managing tokens;
//! - `read`: status, events, revisions, plans, metrics;
//! - `agent`: bound to one group; heartbeats, permits and connection counts for that group's
//!   instances, and that group's plans;
//! - `lb`: a balancer process (`drover lb`): read the ingresses and their targets, and
//!   report its connection counts; nothing else.

use serde::{Deserialize, Serialize};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    Admin,
    Read,
    Agent,
    Lb,
}

impl TokenScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenScope::Admin => "admin",
            TokenScope::Read => "read",
            TokenScope::Agent => "agent",
            TokenScope::Lb => "lb",
        }
    }

    pub fn parse(s: &str) -> Option<TokenScope> {
        match s {
            "admin" => Some(TokenScope::Admin),
            "read" => Some(TokenScope::Read),
            "agent" => Some(TokenScope::Agent),
            "lb" => Some(TokenScope::Lb),
            _ => None,
        }
    }
}

impl std::fmt::Display for TokenScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token as listed by `GET /v1/tokens`: never its secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// e.g. `t-000003`.
    pub id: String,
    pub name: String,
    pub scope: TokenScope,
    /// The group an `agent` token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub created_at_ms: u64,
    /// Set once the token is revoked; a revoked token is refused (401).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<u64>,
}

/// `POST /v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTokenRequest {
    pub scope: TokenScope,
    /// A label for people (`drover token list` shows it); default: the scope.
    #[serde(default)]
    pub name: Option<String>,
    /// For `agent` tokens: the group (`service/region`). The newest agent token of a group is
    /// the one new instances are launched with.
    #[serde(default)]
    pub group: Option<String>,
}

/// The answer to `POST /v1/tokens`: the only time the secret is ever shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTokenResponse {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The bearer token: send it as `Authorization: Bearer TOKEN`.
    pub token: String,
}
