//! The boot document: what an instance that no provider starts with arguments (an EC2
//! instance) boots from. It is the user-data of the group's launch template, so a new or
//! replacement instance knows its server, group, token and plan with the server down.

use serde::{Deserialize, Serialize};

use crate::Plan;

/// The first line of every boot document: tells it apart from a cloud-init script.
pub const MAGIC: &str = "#drover-boot v1";

/// Everything `drover agent --aws` needs besides what instance metadata tells (its id and
/// address).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootDoc {
    /// Base URL of the server, e.g. `https://drover.internal:7878`.
    pub server: String,
    /// The group, e.g. `web/us-east-1`.
    pub group: String,
    /// The group's agent (join) token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The server's CA (PEM) and the sha256 of its DER encoding (pinned), when it serves TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_sha256: Option<String>,
    pub heartbeat_interval_ms: u64,
    /// The AWS region the instance runs in (for its own Auto Scaling calls).
    pub aws_region: String,
    /// When leaving on a permit, whether the group's desired capacity drops with the instance
    /// (the controller launches any replacement itself) or the Auto Scaling group launches the
    /// replacement. Only a fallback: the permit's own `decrement` (`PermitReply`) decides when
    /// the server sends it. The server sets it to `max_surge > 0`.
    pub decrement_on_leave: bool,
    /// The plan generation this document boots.
    pub generation: u64,
    /// The plan; absent when it did not fit, then the agent asks the server for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the user-data is not a drover boot document (its first line is not {MAGIC:?})")]
    NotBoot,
    #[error("the boot document is not valid: {0}")]
    Invalid(#[from] serde_json::Error),
}

impl BootDoc {
    /// The user-data text: the magic line, then the document as JSON.
    pub fn encode(&self) -> String {
        format!(
            "{MAGIC}\n{}\n",
            serde_json::to_string(self).expect("a boot document serializes")
        )
    }

    pub fn decode(text: &str) -> Result<BootDoc, BootError> {
        let rest = text.strip_prefix(MAGIC).ok_or(BootError::NotBoot)?;
        Ok(serde_json::from_str(rest.trim())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_document_round_trips_and_others_are_refused() {
        let d = BootDoc {
            server: "http://10.0.0.5:7878".into(),
            group: "web/us-east-1".into(),
            token: Some("drv_agent_x".into()),
            ca_pem: None,
            ca_sha256: None,
            heartbeat_interval_ms: 2000,
            aws_region: "us-east-1".into(),
            decrement_on_leave: true,
            generation: 3,
            plan: None,
        };
        let text = d.encode();
        assert!(text.starts_with(MAGIC));
        assert_eq!(BootDoc::decode(&text).unwrap(), d);
        assert!(matches!(
            BootDoc::decode("#!/bin/bash\necho hi"),
            Err(BootError::NotBoot)
        ));
        assert!(matches!(
            BootDoc::decode(&format!("{MAGIC}\n{{\"server\": 1}}")),
            Err(BootError::Invalid(_))
        ));
    }
}
