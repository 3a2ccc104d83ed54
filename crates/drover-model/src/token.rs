//! API tokens: scopes and the wire types of `/v1/tokens`.
//!
//! A token is a random secret shown once, when it is created; the server keeps only its
//! sha256. Its scope says what it may do:
//! - `admin`: everything, including changing desired state and managing tokens;
//! - `read`: status, events, revisions, plans, metrics, logs;
//! - `exec`: what `read` may, and `drover exec` (commands on instances): for whoever needs a
//!   shell on instances without changing desired state or tokens;
//! - `agent`: bound to one group; heartbeats, permits and connection counts for that group's
//!   instances, and that group's plans;
//! - `lb`: a balancer process (`drover lb`): read the ingresses and their targets, and
//!   report its connection counts; nothing else.
//!
//! An instance launched by the `local` provider gets no group token: it gets an *instance
//! token*, [`instance_token`], derived from its group's agent token and its own id, that
//! speaks for that one instance only.

use serde::{Deserialize, Serialize};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    Admin,
    Read,
    Agent,
    Lb,
    Exec,
}

impl TokenScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenScope::Admin => "admin",
            TokenScope::Read => "read",
            TokenScope::Agent => "agent",
            TokenScope::Lb => "lb",
            TokenScope::Exec => "exec",
        }
    }

    pub fn parse(s: &str) -> Option<TokenScope> {
        match s {
            "admin" => Some(TokenScope::Admin),
            "read" => Some(TokenScope::Read),
            "agent" => Some(TokenScope::Agent),
            "lb" => Some(TokenScope::Lb),
            "exec" => Some(TokenScope::Exec),
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

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for i in 0..64 {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

const INSTANCE_PREFIX: &str = "drover_instance.";

/// The token of one instance: `drover_instance.INSTANCE.TOKEN_ID.MAC`, where MAC is the
/// HMAC-SHA256, keyed by its group's agent token (`group_secret`, of id `token_id`), of the
/// instance id. Whoever holds it can act for that instance only; revoking the group's token
/// revokes it too.
pub fn instance_token(group_secret: &str, token_id: &str, instance: &str) -> String {
    let mac = hmac_sha256(
        group_secret.as_bytes(),
        format!("drover instance token {instance}").as_bytes(),
    );
    format!(
        "{INSTANCE_PREFIX}{instance}.{token_id}.{}",
        hex::encode(mac)
    )
}

/// The instance id and group token id an instance token claims (not yet verified: recompute
/// it with [`instance_token`] and compare).
pub fn parse_instance_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(INSTANCE_PREFIX)?;
    let mut parts = rest.split('.');
    let (instance, id, mac) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || instance.is_empty() || id.is_empty() || mac.len() != 64 {
        return None;
    }
    Some((instance, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn an_instance_token_names_its_instance_and_differs_per_instance() {
        let a = instance_token("drover_agent_x", "t-000002", "i-000001");
        let b = instance_token("drover_agent_x", "t-000002", "i-000002");
        assert_ne!(a, b);
        assert_eq!(parse_instance_token(&a), Some(("i-000001", "t-000002")));
        assert_ne!(a, instance_token("drover_agent_y", "t-000002", "i-000001"));
        assert_eq!(parse_instance_token("drover_agent_x"), None);
        assert_eq!(parse_instance_token("drover_instance.i.t.short"), None);
    }
}
