//! Artifacts: fetch a `.tar.gz` (local path, `file://` or http(s) URL), check its sha256, and
//! unpack it into a component's directory, refusing entries that could land outside it.
//!
//! A fetch reads at most [`MAX_DOWNLOAD_BYTES`] (counted as it streams, before the hash is
//! known). Unpacking writes into a fresh private directory next to the destination, renamed
//! into place once every entry is written: every entry is checked again as it is written
//! (the archive may change between the two passes), every directory is opened without
//! following a symlink, every file is created new (`O_EXCL | O_NOFOLLOW`), so a symlink
//! planted while unpacking is refused, never followed.

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

/// The most an artifact may weigh (compressed), as the server's own fetch allows: 2 GiB. A
/// download (or a local file) past it is refused as it streams, before its hash is known.
pub const MAX_DOWNLOAD_BYTES: u64 = 2 << 30;

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
    fetch_and_unpack_capped(client, artifact, dest, scratch, MAX_DOWNLOAD_BYTES).await
}

/// [`fetch_and_unpack`], reading at most `max_bytes` of the artifact itself.
pub async fn fetch_and_unpack_capped(
    client: &reqwest::Client,
    artifact: &Artifact,
    dest: &Path,
    scratch: &Path,
    max_bytes: u64,
) -> Result<(), AgentError> {
    let url = artifact.url.clone();
    let expected = artifact.sha256.trim().to_ascii_lowercase();
    let (file, actual, downloaded) = if is_http(&url) {
        let actual = match download(client, &url, scratch, max_bytes).await {
            Ok(a) => a,
            Err(e) => {
                let _ = tokio::fs::remove_file(scratch).await;
                return Err(e);
            }
        };
        (scratch.to_path_buf(), actual, true)
    } else {
        let path = local_path(&url);
        let p = path.clone();
        let u = url.clone();
        let actual = tokio::task::spawn_blocking(move || hash_file_capped(&p, max_bytes))
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

fn too_large(url: &str, max_bytes: u64) -> AgentError {
    fetch_err(
        url,
        format!("it is larger than the artifact size limit ({max_bytes} bytes)"),
    )
}

/// Stream `url` into `to` (at most `max_bytes`), returning the hex sha256 of what was written.
async fn download(
    client: &reqwest::Client,
    url: &str,
    to: &Path,
    max_bytes: u64,
) -> Result<String, AgentError> {
    let mut resp = client
        .get(url)
        .timeout(DOWNLOAD_TIMEOUT)
        .send()
        .await
        .map_err(|e| fetch_err(url, e))?;
    if !resp.status().is_success() {
        return Err(fetch_err(url, format!("server answered {}", resp.status())));
    }
    if resp.content_length().is_some_and(|n| n > max_bytes) {
        return Err(too_large(url, max_bytes));
    }
    let mut file = tokio::fs::File::create(to)
        .await
        .map_err(|e| fetch_err(url, format!("{}: {e}", to.display())))?;
    let mut hasher = Sha256::new();
    let mut read: u64 = 0;
    while let Some(chunk) = resp.chunk().await.map_err(|e| fetch_err(url, e))? {
        read = read.saturating_add(chunk.len() as u64);
        if read > max_bytes {
            return Err(too_large(url, max_bytes));
        }
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
    hash_file_capped(path, u64::MAX)
}

/// Hex sha256 of a file's content, an error past `max_bytes` (`/dev/zero` ends).
fn hash_file_capped(path: &Path, max_bytes: u64) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = [0u8; 16 * 1024];
    let mut read: u64 = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read = read.saturating_add(n as u64);
        if read > max_bytes {
            return Err(std::io::Error::other(format!(
                "it is larger than the artifact size limit ({max_bytes} bytes)"
            )));
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
    unpack_with_hook(file, dest, url, limits, &mut |_| {})
}

/// [`unpack_with_limits`], calling `between(dir)` after the checking pass and before the
/// writing pass, with the directory the writing pass fills: for tests that change the
/// archive or plant links between the two.
#[doc(hidden)]
pub fn unpack_with_hook(
    file: &Path,
    dest: &Path,
    url: &str,
    limits: UnpackLimits,
    between: &mut dyn FnMut(&Path),
) -> Result<(), AgentError> {
    let io = |source| AgentError::Unpack {
        url: url.to_string(),
        source,
    };
    let unsafe_entry = |(entry, reason)| AgentError::UnsafeEntry {
        url: url.to_string(),
        entry,
        reason,
    };
    let mut check = open_archive(file).map_err(io)?;
    let mut total = Totals::default();
    let mut links = Symlinks::default();
    for entry in check.entries().map_err(io)? {
        let entry = entry.map_err(io)?;
        check_entry(&entry, &mut links).map_err(unsafe_entry)?;
        total.add(&entry, limits).map_err(unsafe_entry)?;
    }
    let staging = fresh_dir(dest).map_err(|source| AgentError::Dir {
        path: dest.to_path_buf(),
        source,
    })?;
    between(&staging);
    let written = write_pass(file, &staging, url, limits);
    let placed = written.and_then(|()| {
        into_place(&staging, dest).map_err(|source| AgentError::Dir {
            path: dest.to_path_buf(),
            source,
        })
    });
    if placed.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    placed
}

/// A new directory only this process's user can enter, next to `dest` (same file system):
/// `.NAME.unpack-PID-N`.
fn fresh_dir(dest: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".{name}.unpack-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Replace `dest` (whatever was there: an earlier, partial unpack) by `staging`.
fn into_place(staging: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o755))?;
    match std::fs::symlink_metadata(dest) {
        // remove_dir_all does not follow symlinks.
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dest)?,
        Ok(_) => std::fs::remove_file(dest)?,
        Err(_) => {}
    }
    std::fs::rename(staging, dest)
}

/// The writing pass: each entry checked again (the file is read twice and may have changed)
/// and written under `root` without following any symlink.
fn write_pass(file: &Path, root: &Path, url: &str, limits: UnpackLimits) -> Result<(), AgentError> {
    let io = |source| AgentError::Unpack {
        url: url.to_string(),
        source,
    };
    let unsafe_entry = |(entry, reason)| AgentError::UnsafeEntry {
        url: url.to_string(),
        entry,
        reason,
    };
    let root = at::open_root(root).map_err(io)?;
    let mut ar = open_archive(file).map_err(io)?;
    let mut total = Totals::default();
    let mut links = Symlinks::default();
    for entry in ar.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        check_entry(&entry, &mut links).map_err(unsafe_entry)?;
        total.add(&entry, limits).map_err(unsafe_entry)?;
        let name = entry.path().map_err(io)?.display().to_string();
        match at::write_entry(&root, &mut entry) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(AgentError::UnsafeEntry {
                    url: url.to_string(),
                    entry: name,
                    reason: "it would be written through a symlink",
                })
            }
            Err(e) => return Err(io(e)),
        }
    }
    Ok(())
}

/// Writing entries relative to a directory's descriptor (`openat` and kin), never following a
/// symlink: a directory on the way is opened `O_NOFOLLOW` (a symlink there is `ELOOP`), a
/// file is created anew (`O_CREAT | O_EXCL | O_NOFOLLOW`, whatever had its name unlinked
/// first, never written through).
mod at {
    use std::ffi::{CString, OsStr};
    use std::io::{Error, ErrorKind, Read, Result};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Component, Path};

    fn cstr(name: &OsStr) -> Result<CString> {
        CString::new(name.as_bytes())
            .map_err(|_| Error::new(ErrorKind::InvalidInput, "a NUL byte in a name"))
    }

    fn check(r: libc::c_int) -> Result<libc::c_int> {
        if r < 0 {
            Err(Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    pub fn open_root(dir: &Path) -> Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir)?;
        Ok(OwnedFd::from(f))
    }

    fn openat(dir: &OwnedFd, name: &OsStr, flags: libc::c_int, mode: u32) -> Result<OwnedFd> {
        let c = cstr(name)?;
        // SAFETY: a valid descriptor and NUL-terminated name; the result is a new descriptor.
        let fd = check(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        })?;
        // SAFETY: fd was just returned by openat and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Open the directory `name` in `dir`; a symlink there is `ELOOP` (Linux says `ENOTDIR`
    /// for `O_DIRECTORY | O_NOFOLLOW`: told apart from a file by `fstatat`).
    fn open_dir(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd> {
        let r = openat(
            dir,
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        );
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) && is_symlink(dir, name) => {
                Err(Error::from_raw_os_error(libc::ELOOP))
            }
            r => r,
        }
    }

    fn is_symlink(dir: &OwnedFd, name: &OsStr) -> bool {
        let Ok(c) = cstr(name) else {
            return false;
        };
        // SAFETY: a zeroed stat is a valid out-buffer for fstatat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on a valid descriptor, name and buffer.
        let r = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        r == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFLNK
    }

    fn mkdirat(dir: &OwnedFd, name: &OsStr, mode: u32) -> Result<()> {
        let c = cstr(name)?;
        // SAFETY: plain syscall on a valid descriptor and name.
        check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) }).map(drop)
    }

    fn unlinkat(dir: &OwnedFd, name: &OsStr) -> Result<()> {
        let c = cstr(name)?;
        // SAFETY: plain syscall; removes the name itself (a symlink, not its target).
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) }).map(drop)
    }

    /// Run `make`; when the name is taken, unlink it (never follow it) and run `make` again.
    fn anew<T>(dir: &OwnedFd, name: &OsStr, mut make: impl FnMut() -> Result<T>) -> Result<T> {
        match make() {
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                unlinkat(dir, name)?;
                make()
            }
            r => r,
        }
    }

    /// Open (creating what is missing, 0755) the directories `parts` under `root`.
    fn walk(root: &OwnedFd, parts: &[&OsStr], create: bool) -> Result<OwnedFd> {
        let mut cur = root.try_clone()?;
        for p in parts {
            cur = match open_dir(&cur, p) {
                Err(e) if create && e.kind() == ErrorKind::NotFound => {
                    match mkdirat(&cur, p, 0o755) {
                        Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
                        _ => open_dir(&cur, p)?,
                    }
                }
                r => r?,
            };
        }
        Ok(cur)
    }

    fn parts(path: &Path) -> Vec<&OsStr> {
        path.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n),
                _ => None,
            })
            .collect()
    }

    pub fn write_entry<R: Read>(root: &OwnedFd, entry: &mut tar::Entry<R>) -> Result<()> {
        use tar::EntryType as T;
        let path = entry.path()?.into_owned();
        let all = parts(&path);
        let Some((name, dirs)) = all.split_last() else {
            return Ok(()); // "./": the root itself
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let kind = entry.header().entry_type();
        match kind {
            T::Directory => {
                let dir = walk(root, dirs, true)?;
                match mkdirat(&dir, name, mode | 0o700) {
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        open_dir(&dir, name).map(drop)
                    }
                    r => r,
                }
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                let dir = walk(root, dirs, true)?;
                let fd = anew(&dir, name, || {
                    openat(
                        &dir,
                        name,
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                        0o600,
                    )
                })?;
                let mut f = std::fs::File::from(fd);
                std::io::copy(entry, &mut f)?;
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(mode))
            }
            T::Symlink => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| Error::new(ErrorKind::InvalidData, "a link without a target"))?
                    .into_owned();
                let dir = walk(root, dirs, true)?;
                let t = cstr(target.as_os_str())?;
                let n = cstr(name)?;
                anew(&dir, name, || {
                    // SAFETY: plain syscall on a valid descriptor and names.
                    check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) })
                        .map(drop)
                })
            }
            T::Link => {
                let target = entry
                    .link_name()?
                    .ok_or_else(|| Error::new(ErrorKind::InvalidData, "a link without a target"))?
                    .into_owned();
                let tparts = parts(&target);
                let Some((tname, tdirs)) = tparts.split_last() else {
                    return Err(Error::new(ErrorKind::InvalidData, "a link to the root"));
                };
                let from = walk(root, tdirs, false)?;
                let dir = walk(root, dirs, true)?;
                let t = cstr(tname)?;
                let n = cstr(name)?;
                anew(&dir, name, || {
                    // SAFETY: plain syscall; flags 0: a symlink is linked, not followed.
                    check(unsafe {
                        libc::linkat(from.as_raw_fd(), t.as_ptr(), dir.as_raw_fd(), n.as_ptr(), 0)
                    })
                    .map(drop)
                })
            }
            // Headers of other entries (pax, GNU long names): nothing to write.
            _ => Ok(()),
        }
    }
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

/// The paths of an archive's symlinks, as seen so far (normalised: `./a//b` is `a/b`).
#[derive(Default)]
struct Symlinks(std::collections::HashSet<PathBuf>);

impl Symlinks {
    /// Whether a directory on the way to `path` is one of the archive's symlinks.
    fn on_the_way(&self, path: &Path) -> bool {
        let mut prefix = PathBuf::new();
        let parts: Vec<_> = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        for c in parts.iter().take(parts.len().saturating_sub(1)) {
            prefix.push(c);
            if self.0.contains(&prefix) {
                return true;
            }
        }
        false
    }

    fn record(&mut self, path: &Path, symlink: bool) {
        let p: PathBuf = path
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        if symlink {
            self.0.insert(p);
        } else {
            self.0.remove(&p);
        }
    }
}

/// `Err((entry name, reason))` for an entry that must not be unpacked. Nothing is written
/// through a symlink (the archive's own ones included: `d/link/file` is refused).
fn check_entry<R: Read>(
    entry: &tar::Entry<R>,
    links: &mut Symlinks,
) -> Result<(), (String, &'static str)> {
    let path = entry
        .path()
        .map_err(|_| (String::from("?"), "its name is not valid"))?
        .into_owned();
    let name = path.display().to_string();
    let bad = |reason| (name.clone(), reason);
    check_relative(&path).map_err(bad)?;
    if links.on_the_way(&path) {
        return Err(bad("it would be written through a symlink"));
    }
    use tar::EntryType as T;
    let kind = entry.header().entry_type();
    if !matches!(
        kind,
        T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
    ) {
        links.record(&path, kind == T::Symlink);
    }
    match kind {
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
                .map_err(|_| bad("it is a hard link pointing outside the archive"))?;
            if links.on_the_way(&target) {
                return Err(bad("it is a hard link through a symlink"));
            }
            Ok(())
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
