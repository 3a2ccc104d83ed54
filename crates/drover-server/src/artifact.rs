//! Checks, before a plan is stored, that every new artifact can be fetched and matches its
//! sha256, so a deploy of a missing or corrupt artifact fails before any instance is touched.
//!
//! Fetches are bounded ([`FETCH_TIMEOUT`], [`MAX_ARTIFACT_BYTES`], hashed as they stream, never
//! held in memory) and done before the write lock is taken ([`prefetch`]): a slow artifact
//! host holds up the apply that names it, not rollouts, permits and replacements. What a
//! fetch found is remembered by (url, sha256) ([`Checked`]): a match for good, a failure for
//! [`FAILURE_FRESH`], so the check under the lock answers from the prefetch and fetches
//! nothing again. An artifact some stored plan already names (the group's current plan,
//! another group's, one of the group's last [`HISTORY`] generations) was checked when that
//! plan was stored: a rollback, an automatic revert or a later wave, after a restart too,
//! needs no artifact host.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use drover_model::fleet::Artifact;
use drover_model::{Fleet, Plan};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::engine::Engine;
use crate::state::Group;
use crate::ServerError;

/// Longest a fetch of one artifact may take, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest artifact fetched (a path such as `/dev/zero` ends here, not in memory).
pub const MAX_ARTIFACT_BYTES: u64 = 2 << 30;
/// How long a failed fetch is the answer of the check under the lock (the prefetch of the
/// same change found it; the next change fetches again before the lock).
pub const FAILURE_FRESH: Duration = Duration::from_secs(60);
/// How many earlier generations of a group are searched for an artifact it already had.
const HISTORY: u64 = 64;
/// Most fetch results remembered.
const CHECKED_MAX: usize = 4096;

/// What a fetch found: a match, or why not.
type Found = Result<(), String>;

/// Fetch results by (url, sha256), with when they were found; and the bounds of a fetch.
pub(crate) struct Checked {
    timeout: Duration,
    cap: u64,
    failure_fresh: Duration,
    found: Mutex<HashMap<(String, String), (Instant, Found)>>,
}

impl Default for Checked {
    fn default() -> Checked {
        Checked::new(FETCH_TIMEOUT, MAX_ARTIFACT_BYTES, FAILURE_FRESH)
    }
}

fn key(a: &Artifact) -> (String, String) {
    (a.url.clone(), a.sha256.to_ascii_lowercase())
}

impl Checked {
    pub(crate) fn new(timeout: Duration, cap: u64, failure_fresh: Duration) -> Checked {
        Checked {
            timeout,
            cap,
            failure_fresh,
            found: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (Instant, Found)>> {
        self.found.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the last fetch of `a` found: a match (for good), a failure (while fresh).
    fn get(&self, a: &Artifact) -> Option<Found> {
        let fresh = self.failure_fresh;
        let mut m = self.map();
        m.retain(|_, (at, r)| r.is_ok() || at.elapsed() < fresh);
        m.get(&key(a)).map(|(_, r)| r.clone())
    }

    fn is_verified(&self, a: &Artifact) -> bool {
        matches!(self.get(a), Some(Ok(())))
    }

    fn put(&self, a: &Artifact, found: Found) {
        let mut m = self.map();
        if m.len() >= CHECKED_MAX {
            m.clear();
        }
        m.insert(key(a), (Instant::now(), found));
    }

    /// Fetch and check `a` within this cache's bounds, and remember what came of it.
    async fn fetch(&self, a: &Artifact) -> Found {
        let found = verify(a, self.timeout, self.cap).await;
        if let Err(why) = &found {
            tracing::warn!(url = %a.url, "artifact check failed: {why}");
        }
        self.put(a, found.clone());
        found
    }
}

/// Fetch and check, before the write lock, every artifact the plans of `fleet` would have
/// that no group runs and no fetch has matched yet (one that failed is fetched again: this
/// is a new change), so that the apply's own check finds what came of it. Errors are left
/// for that check (it says which component and version); this only warms it.
pub(crate) async fn prefetch(engine: &Engine, fleet: &Fleet) {
    let mut wanted: Vec<Artifact> = Vec::new();
    {
        let st = engine.state();
        for (name, svc) in &fleet.services {
            for region in &svc.regions {
                let plan = drover_model::plan::plan_for(fleet, name, svc, region);
                for c in plan.components {
                    let Some(a) = c.artifact else { continue };
                    if !wanted.contains(&a)
                        && !engine.artifacts.is_verified(&a)
                        && !st.groups.values().any(|g| names(&g.plan, &a))
                    {
                        wanted.push(a);
                    }
                }
            }
        }
    }
    for a in wanted {
        let _ = engine.artifacts.fetch(&a).await;
    }
}

/// Whether `plan` names artifact `a`.
fn names(plan: &Plan, a: &Artifact) -> bool {
    plan.components
        .iter()
        .any(|c| c.artifact.as_ref() == Some(a))
}

/// Check each artifact of `new` that no stored plan names: from what the prefetch found, or
/// (nothing found: a change nobody prefetched) by fetching it now, within the bounds.
/// `groups`: the groups as they are before this change.
pub(crate) async fn check_new_artifacts(
    engine: &Engine,
    groups: &BTreeMap<String, Group>,
    new: &Plan,
) -> Result<(), ServerError> {
    let gid = new.group().0;
    let old = groups.get(&gid).map(|g| &g.plan);
    for c in &new.components {
        let Some(a) = &c.artifact else { continue };
        let refused = |why: String| {
            ServerError::Conflict(format!(
                "component {} version {}: artifact {} {why}; nothing was changed",
                c.name, c.version, a.url
            ))
        };
        // Some group runs it: it was checked when that plan was stored.
        if groups.values().any(|g| names(&g.plan, a)) {
            continue;
        }
        match engine.artifacts.get(a) {
            Some(Ok(())) => continue,
            Some(Err(why)) => return Err(refused(why)),
            None => {}
        }
        // The group had it (a rollback or an automatic revert; after a restart too).
        if had(
            engine,
            &gid,
            old.map_or(new.generation, |o| o.generation),
            a,
        )? {
            continue;
        }
        engine.artifacts.fetch(a).await.map_err(refused)?;
    }
    Ok(())
}

/// Whether one of the [`HISTORY`] generations of `group` below `top` names `a`.
fn had(engine: &Engine, group: &str, top: u64, a: &Artifact) -> Result<bool, ServerError> {
    for g in (top.saturating_sub(HISTORY).max(1)..top).rev() {
        if engine.store.plan(group, g)?.is_some_and(|p| names(&p, a)) {
            return Ok(true);
        }
    }
    Ok(false)
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
        let checked = Checked::new(Duration::from_secs(5), 1 << 20, FAILURE_FRESH);
        assert!(!checked.is_verified(&ok));
        checked.fetch(&ok).await.unwrap();
        assert!(checked.is_verified(&ok));
        // Once verified, the check under the lock does not fetch again (the file is gone).
        std::fs::remove_file(&path).unwrap();
        assert!(checked.is_verified(&ok));
    }

    /// A failed fetch is the answer for a while (the check under the lock takes what the
    /// prefetch found, without fetching again), then forgotten: the next change fetches.
    #[tokio::test]
    async fn a_failure_is_remembered_while_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.tar.gz");
        let a = artifact(
            path.display().to_string(),
            &hex::encode(Sha256::digest(b"hello")),
        );
        let checked = Checked::new(Duration::from_secs(5), 1 << 20, Duration::from_millis(300));
        assert_eq!(checked.get(&a), None);
        let err = checked.fetch(&a).await.unwrap_err();
        assert!(err.contains("No such file"), "{err}");
        // The file appears: the failure is still the answer while it is fresh.
        std::fs::write(&path, b"hello").unwrap();
        assert_eq!(checked.get(&a), Some(Err(err)));
        assert!(!checked.is_verified(&a));
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(checked.get(&a), None, "a stale failure is forgotten");
        checked.fetch(&a).await.unwrap();
        assert_eq!(checked.get(&a), Some(Ok(())));
    }
}
