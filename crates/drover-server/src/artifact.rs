//! Checks, before a plan is stored, that every new artifact can be fetched and matches its
//! sha256, so a deploy of a missing or corrupt artifact fails before any instance is touched.
//!
//! Fetches are bounded ([`FETCH_TIMEOUT`], [`MAX_ARTIFACT_BYTES`], hashed as they stream, never
//! held in memory) and done before the write lock is taken ([`prefetch`]): a slow artifact
//! host holds up the apply that names it, not rollouts, permits and replacements. What was
//! verified is remembered by (url, sha256), so the check under the lock finds it done.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use drover_model::fleet::Artifact;
use drover_model::{Fleet, Plan};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::ServerError;

/// Longest a fetch of one artifact may take, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest artifact fetched (a path such as `/dev/zero` ends here, not in memory).
pub const MAX_ARTIFACT_BYTES: u64 = 2 << 30;

/// (url, sha256) pairs fetched and found to match; bounded.
static VERIFIED: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);
const VERIFIED_MAX: usize = 4096;

fn is_verified(a: &Artifact) -> bool {
    let v = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    v.as_ref()
        .is_some_and(|s| s.contains(&(a.url.clone(), a.sha256.to_ascii_lowercase())))
}

fn remember(a: &Artifact) {
    let mut v = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    let s = v.get_or_insert_with(HashSet::new);
    if s.len() >= VERIFIED_MAX {
        s.clear();
    }
    s.insert((a.url.clone(), a.sha256.to_ascii_lowercase()));
}

/// Fetch and check, before the write lock, every artifact the plans of `fleet` would have,
/// so that the apply's own check finds them verified. Errors are left for that check (it
/// says which component and version); this only warms it.
pub async fn prefetch(fleet: &Fleet) {
    let mut seen = HashSet::new();
    for (name, svc) in &fleet.services {
        for region in &svc.regions {
            let plan = drover_model::plan::plan_for(fleet, name, svc, region);
            for c in plan.components {
                if let Some(a) = c.artifact {
                    if seen.insert((a.url.clone(), a.sha256.clone())) && !is_verified(&a) {
                        let _ = verify(&a, FETCH_TIMEOUT, MAX_ARTIFACT_BYTES).await;
                    }
                }
            }
        }
    }
}

/// Fetch and hash each artifact of `new` that `old` did not already have.
pub async fn check_new_artifacts(old: Option<&Plan>, new: &Plan) -> Result<(), ServerError> {
    for c in &new.components {
        let Some(a) = &c.artifact else { continue };
        let known = old.is_some_and(|o| {
            o.components
                .iter()
                .any(|oc| oc.artifact.as_ref() == Some(a))
        });
        if known || is_verified(a) {
            continue;
        }
        verify(a, FETCH_TIMEOUT, MAX_ARTIFACT_BYTES)
            .await
            .map_err(|why| {
                ServerError::Conflict(format!(
                    "component {} version {}: artifact {} {why}; nothing was changed",
                    c.name, c.version, a.url
                ))
            })?;
    }
    Ok(())
}

/// Fetch `a` within `timeout` and `cap` bytes, and compare its sha256.
async fn verify(a: &Artifact, timeout: Duration, cap: u64) -> Result<(), String> {
    let actual = match tokio::time::timeout(timeout, hash(a, cap)).await {
        Ok(r) => r.map_err(|why| format!("cannot be fetched: {why}"))?,
        Err(_) => {
            return Err(format!(
                "cannot be fetched: no complete answer within {}",
                drover_model::Dur(timeout)
            ))
        }
    };
    if !actual.eq_ignore_ascii_case(&a.sha256) {
        return Err(format!(
            "has sha256 {actual}, but the fleet file says {}",
            a.sha256
        ));
    }
    remember(a);
    Ok(())
}

async fn hash(a: &Artifact, cap: u64) -> Result<String, String> {
    let mut h = Sha256::new();
    let mut total = 0u64;
    let mut add = |chunk: &[u8]| {
        total += chunk.len() as u64;
        if total > cap {
            return Err(format!("it is larger than {cap} bytes"));
        }
        h.update(chunk);
        Ok(())
    };
    if a.url.starts_with("http://") || a.url.starts_with("https://") {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        let mut resp = client.get(&a.url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("the server answered {}", resp.status()));
        }
        if resp.content_length().is_some_and(|n| n > cap) {
            return Err(format!("it is larger than {cap} bytes"));
        }
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            add(&chunk)?;
        }
    } else {
        let path = a.url.strip_prefix("file://").unwrap_or(&a.url).to_string();
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).await.map_err(|e| format!("{path}: {e}"))?;
            if n == 0 {
                break;
            }
            add(&buf[..n])?;
        }
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(url: String, sha256: &str) -> Artifact {
        Artifact {
            url,
            sha256: sha256.into(),
        }
    }

    /// A host that accepts and never answers costs the timeout, not for ever; `/dev/zero` is
    /// cut at the cap, not read into memory; a matching file is remembered as verified.
    #[tokio::test]
    async fn fetches_are_bounded_in_time_and_size() {
        let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/a.tar.gz", hang.local_addr().unwrap());
        let a = artifact(url, &"0".repeat(64));
        let t = std::time::Instant::now();
        let err = verify(&a, Duration::from_millis(300), 1 << 20)
            .await
            .unwrap_err();
        assert!(err.contains("no complete answer within"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

        let zero = artifact("/dev/zero".into(), &"0".repeat(64));
        let err = verify(&zero, Duration::from_secs(30), 1 << 20)
            .await
            .unwrap_err();
        assert!(err.contains("larger than 1048576 bytes"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar.gz");
        std::fs::write(&path, b"hello").unwrap();
        let sha = hex::encode(Sha256::digest(b"hello"));
        let ok = artifact(path.display().to_string(), &sha);
        assert!(!is_verified(&ok));
        verify(&ok, Duration::from_secs(5), 1 << 20).await.unwrap();
        assert!(is_verified(&ok));
        // Once verified, the check under the lock does not fetch again (the file is gone).
        std::fs::remove_file(&path).unwrap();
        assert!(is_verified(&ok));
    }
}
