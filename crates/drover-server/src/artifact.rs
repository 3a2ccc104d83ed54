//! Checks, before a plan is stored, that every new artifact can be fetched and matches its
//! sha256, so a deploy of a missing or corrupt artifact fails before any instance is touched.

use drover_model::fleet::Artifact;
use drover_model::Plan;
use sha2::{Digest, Sha256};

use crate::ServerError;

/// Fetch and hash each artifact of `new` that `old` did not already have.
pub async fn check_new_artifacts(old: Option<&Plan>, new: &Plan) -> Result<(), ServerError> {
    for c in &new.components {
        let Some(a) = &c.artifact else { continue };
        let known = old.is_some_and(|o| {
            o.components
                .iter()
                .any(|oc| oc.artifact.as_ref() == Some(a))
        });
        if known {
            continue;
        }
        let actual = hash(a).await.map_err(|why| {
            ServerError::Conflict(format!(
                "component {} version {}: artifact {} cannot be fetched: {why}; nothing was changed",
                c.name, c.version, a.url
            ))
        })?;
        if !actual.eq_ignore_ascii_case(&a.sha256) {
            return Err(ServerError::Conflict(format!(
                "component {} version {}: artifact {} has sha256 {actual}, but the fleet file says {}; nothing was changed",
                c.name, c.version, a.url, a.sha256
            )));
        }
    }
    Ok(())
}

async fn hash(a: &Artifact) -> Result<String, String> {
    let mut h = Sha256::new();
    if a.url.starts_with("http://") || a.url.starts_with("https://") {
        let mut resp = reqwest::get(&a.url).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("the server answered {}", resp.status()));
        }
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            h.update(&chunk);
        }
    } else {
        let path = a.url.strip_prefix("file://").unwrap_or(&a.url).to_string();
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        h.update(&bytes);
    }
    Ok(hex::encode(h.finalize()))
}
