//! Artifacts: fetch a `.tar.gz` (local path, `file://` or http(s) URL), check its sha256, and
//! unpack it into a component's directory, refusing entries that could land outside it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use drover_model::fleet::Artifact;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::AgentError;

/// How long one artifact download may take, from connect to the last byte.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Fetch `artifact`, verify its sha256 and unpack it into `dest` (created if absent).
///
/// An http(s) artifact is streamed to `scratch` (removed afterwards); a local one is read in place.
/// Nothing is unpacked unless the checksum matches and every entry is safe.
pub async fn fetch_and_unpack(
    client: &reqwest::Client,
    artifact: &Artifact,
    dest: &Path,
    scratch: &Path,
) -> Result<(), AgentError> {
    let url = artifact.url.clone();
    let expected = artifact.sha256.trim().to_ascii_lowercase();
    let (file, actual, downloaded) = if is_http(&url) {
        let actual = download(client, &url, scratch).await?;
        (scratch.to_path_buf(), actual, true)
    } else {
        let path = local_path(&url);
        let p = path.clone();
        let u = url.clone();
        let actual = tokio::task::spawn_blocking(move || hash_file(&p))
            .await
            .map_err(|e| fetch_err(&u, e))?
            .map_err(|e| fetch_err(&u, format!("{}: {e}", path.display())))?;
        (path, actual, false)
    };
    let result = if actual != expected {
        Err(AgentError::ChecksumMismatch {
            url: url.clone(),
            expected,
            actual,
        })
    } else {
        let dest = dest.to_path_buf();
        let f = file.clone();
        let u = url.clone();
        tokio::task::spawn_blocking(move || unpack(&f, &dest, &u))
            .await
            .map_err(|e| fetch_err(&url, e))?
    };
    if downloaded {
        let _ = tokio::fs::remove_file(&file).await;
    }
    result
}

fn fetch_err(url: &str, reason: impl std::fmt::Display) -> AgentError {
    AgentError::Fetch {
        url: url.to_string(),
        reason: reason.to_string(),
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// `file:///a/b` and `/a/b` both name the file `/a/b`.
fn local_path(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("file://").unwrap_or(url))
}

/// Stream `url` into `to`, returning the hex sha256 of what was written.
async fn download(client: &reqwest::Client, url: &str, to: &Path) -> Result<String, AgentError> {
    let mut resp = client
        .get(url)
        .timeout(DOWNLOAD_TIMEOUT)
        .send()
        .await
        .map_err(|e| fetch_err(url, e))?;
    if !resp.status().is_success() {
        return Err(fetch_err(url, format!("server answered {}", resp.status())));
    }
    let mut file = tokio::fs::File::create(to)
        .await
        .map_err(|e| fetch_err(url, format!("{}: {e}", to.display())))?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fetch_err(url, e))? {
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| fetch_err(url, format!("{}: {e}", to.display())))?;
    }
    file.flush()
        .await
        .map_err(|e| fetch_err(url, format!("{}: {e}", to.display())))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Hex sha256 of a file's content.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn open_archive(
    file: &Path,
) -> std::io::Result<tar::Archive<flate2::read::GzDecoder<BufReader<File>>>> {
    Ok(tar::Archive::new(flate2::read::GzDecoder::new(
        BufReader::new(File::open(file)?),
    )))
}

/// Bounds on what one artifact may unpack to: a small archive must not fill the disk
/// (a "gzip bomb") or its inodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Total size of the files it holds, in bytes.
    pub max_bytes: u64,
    /// Number of entries (files, directories, links).
    pub max_entries: u64,
}

impl UnpackLimits {
    /// 2 GiB in at most 100,000 entries.
    pub const DEFAULT: UnpackLimits = UnpackLimits {
        max_bytes: 2 << 30,
        max_entries: 100_000,
    };
}

impl Default for UnpackLimits {
    fn default() -> UnpackLimits {
        UnpackLimits::DEFAULT
    }
}

/// Unpack the `.tar.gz` at `file` into `dest`: a first pass checks every entry, a second writes.
pub fn unpack(file: &Path, dest: &Path, url: &str) -> Result<(), AgentError> {
    unpack_with_limits(file, dest, url, UnpackLimits::DEFAULT)
}

/// [`unpack`] with explicit limits. Nothing is written unless every entry is safe and the
/// whole archive fits within `limits`.
pub fn unpack_with_limits(
    file: &Path,
    dest: &Path,
    url: &str,
    limits: UnpackLimits,
) -> Result<(), AgentError> {
    let io = |source| AgentError::Unpack {
        url: url.to_string(),
        source,
    };
    let mut check = open_archive(file).map_err(io)?;
    let mut total = Totals::default();
    for entry in check.entries().map_err(io)? {
        let entry = entry.map_err(io)?;
        let unsafe_entry = |(entry, reason)| AgentError::UnsafeEntry {
            url: url.to_string(),
            entry,
            reason,
        };
        check_entry(&entry).map_err(unsafe_entry)?;
        total.add(&entry, limits).map_err(unsafe_entry)?;
    }
    std::fs::create_dir_all(dest).map_err(|source| AgentError::Dir {
        path: dest.to_path_buf(),
        source,
    })?;
    let mut ar = open_archive(file).map_err(io)?;
    ar.set_overwrite(true);
    // Counted again while writing: the file is read twice and must not grow in between.
    let mut total = Totals::default();
    for entry in ar.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        total
            .add(&entry, limits)
            .map_err(|(entry, reason)| AgentError::UnsafeEntry {
                url: url.to_string(),
                entry,
                reason,
            })?;
        let name = entry.path().map_err(io)?.display().to_string();
        if !entry.unpack_in(dest).map_err(io)? {
            return Err(AgentError::UnsafeEntry {
                url: url.to_string(),
                entry: name,
                reason: "it would be written outside the component directory",
            });
        }
    }
    Ok(())
}

/// Running totals of an archive's entries against its [`UnpackLimits`].
#[derive(Default)]
struct Totals {
    bytes: u64,
    entries: u64,
}

impl Totals {
    fn add<R: Read>(
        &mut self,
        entry: &tar::Entry<R>,
        limits: UnpackLimits,
    ) -> Result<(), (String, &'static str)> {
        let name = || {
            entry
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        self.entries += 1;
        if self.entries > limits.max_entries {
            return Err((
                name(),
                "the archive holds more entries than the artifact limit",
            ));
        }
        // A sparse file's real size may exceed the bytes stored for it: count the larger.
        let size = entry.size().max(entry.header().size().unwrap_or(0));
        self.bytes = self.bytes.saturating_add(size);
        if self.bytes > limits.max_bytes {
            return Err((
                name(),
                "the archive would unpack past the artifact size limit",
            ));
        }
        Ok(())
    }
}

/// `Err((entry name, reason))` for an entry that must not be unpacked.
fn check_entry<R: Read>(entry: &tar::Entry<R>) -> Result<(), (String, &'static str)> {
    let path = entry
        .path()
        .map_err(|_| (String::from("?"), "its name is not valid"))?
        .into_owned();
    let name = path.display().to_string();
    let bad = |reason| (name.clone(), reason);
    check_relative(&path).map_err(bad)?;
    use tar::EntryType as T;
    match entry.header().entry_type() {
        T::Regular | T::Continuous | T::Directory | T::GNUSparse => Ok(()),
        T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => Ok(()),
        T::Symlink => {
            let target = entry
                .link_name()
                .map_err(|_| bad("its link target is not valid"))?
                .ok_or_else(|| bad("it is a link without a target"))?;
            // A symlink resolves relative to the directory that holds it.
            let mut depth: Vec<&std::ffi::OsStr> = Vec::new();
            if let Some(parent) = path.parent() {
                for c in parent.components() {
                    if let Component::Normal(n) = c {
                        depth.push(n);
                    }
                }
            }
            for c in target.components() {
                match c {
                    Component::Normal(n) => depth.push(n),
                    Component::CurDir => {}
                    Component::ParentDir => {
                        if depth.pop().is_none() {
                            return Err(bad("it is a link pointing outside the archive"));
                        }
                    }
                    Component::RootDir | Component::Prefix(_) => {
                        return Err(bad("it is a link to an absolute path"))
                    }
                }
            }
            Ok(())
        }
        T::Link => {
            let target = entry
                .link_name()
                .map_err(|_| bad("its link target is not valid"))?
                .ok_or_else(|| bad("it is a link without a target"))?;
            check_relative(&target)
                .map_err(|_| bad("it is a hard link pointing outside the archive"))
        }
        _ => Err(bad("it is a device, fifo or other special file")),
    }
}

fn check_relative(path: &Path) -> Result<(), &'static str> {
    if path.as_os_str().is_empty() {
        return Err("its name is empty");
    }
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err("its path contains '..'"),
            Component::RootDir | Component::Prefix(_) => return Err("its path is absolute"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert!(check_relative(Path::new("bin/app")).is_ok());
        assert!(check_relative(Path::new("./bin/app")).is_ok());
        assert_eq!(
            check_relative(Path::new("../escape")),
            Err("its path contains '..'")
        );
        assert_eq!(
            check_relative(Path::new("a/../../b")),
            Err("its path contains '..'")
        );
        assert_eq!(
            check_relative(Path::new("/etc/passwd")),
            Err("its path is absolute")
        );
    }

    #[test]
    fn file_urls_and_paths() {
        assert_eq!(local_path("file:///tmp/a.tgz"), PathBuf::from("/tmp/a.tgz"));
        assert_eq!(local_path("/tmp/a.tgz"), PathBuf::from("/tmp/a.tgz"));
        assert!(is_http("https://x/y") && is_http("http://x") && !is_http("/x"));
    }
}
