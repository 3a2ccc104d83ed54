//! Hostile artifacts: every kind of tarball that could write outside the component directory,
//! or fill the disk, is refused before anything is written.

use std::path::Path;

use drover_agent::artifact::{
    fetch_and_unpack_capped, unpack, unpack_with_hook, unpack_with_limits, UnpackLimits,
};
use drover_agent::AgentError;

/// A `.tar.gz` of raw entries: (name, type, link target, data). Names are written raw so that
/// `..` and absolute names can be built.
fn targz(entries: &[(&str, tar::EntryType, Option<&str>, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            let raw = &mut h.as_old_mut().linkname;
            raw[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(*kind);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn try_unpack(bytes: &[u8], limits: UnpackLimits) -> (tempfile::TempDir, Result<(), AgentError>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.tar.gz");
    std::fs::write(&file, bytes).unwrap();
    let dest = dir.path().join("box/dest");
    let r = unpack_with_limits(&file, &dest, "test.tar.gz", limits);
    (dir, r)
}

/// Refused with `reason` in the message, and nothing written: not the decoy file inside,
/// nothing next to the destination.
fn refused(bytes: &[u8], limits: UnpackLimits, reason: &str) {
    let (dir, r) = try_unpack(bytes, limits);
    let e = r.expect_err("a hostile archive must be refused");
    assert!(matches!(e, AgentError::UnsafeEntry { .. }), "{e}");
    assert!(e.to_string().contains(reason), "{e}");
    assert!(
        !dir.path().join("box/dest/decoy").exists(),
        "nothing is written when any entry is refused"
    );
    let outside: Vec<_> = std::fs::read_dir(dir.path().join("box"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        outside.iter().all(|n| n == "dest"),
        "written outside: {outside:?}"
    );
}

use tar::EntryType as T;

#[test]
fn dot_dot_paths_are_refused() {
    for name in ["../escape", "a/../../escape", "a/b/../../../escape"] {
        let t = targz(&[
            ("decoy", T::Regular, None, b"x"),
            (name, T::Regular, None, b"gotcha"),
        ]);
        refused(&t, UnpackLimits::DEFAULT, "'..'");
    }
}

#[test]
fn absolute_paths_are_refused() {
    let t = targz(&[
        ("decoy", T::Regular, None, b"x"),
        ("/tmp/drover-hostile-abs", T::Regular, None, b"gotcha"),
    ]);
    refused(&t, UnpackLimits::DEFAULT, "absolute");
    assert!(!Path::new("/tmp/drover-hostile-abs").exists());
}

#[test]
fn symlinks_that_escape_are_refused() {
    for (name, target, why) in [
        ("link", "..", "outside"),
        ("sub/link", "../../outside", "outside"),
        ("link", "/etc", "absolute"),
        ("a/b/link", "../../../x", "outside"),
    ] {
        let t = targz(&[
            ("decoy", T::Regular, None, b"x"),
            (name, T::Symlink, Some(target), b""),
        ]);
        refused(&t, UnpackLimits::DEFAULT, why);
    }
}

#[test]
fn nothing_is_written_through_a_symlink() {
    // `d/up -> ..` stays inside (it points at the archive root), so it is a valid link; but
    // nothing is written through a symlink, not even one that stays inside.
    let t = targz(&[
        ("decoy", T::Regular, None, b"x"),
        ("d/up", T::Symlink, Some(".."), b""),
        ("d/up/inside", T::Regular, None, b"ok"),
    ]);
    refused(&t, UnpackLimits::DEFAULT, "through a symlink");
    let t = targz(&[
        ("decoy", T::Regular, None, b"x"),
        ("real", T::Regular, None, b"x"),
        ("d/up", T::Symlink, Some(".."), b""),
        ("hl", T::Link, Some("d/up/real"), b""),
    ]);
    refused(&t, UnpackLimits::DEFAULT, "through a symlink");
    // A link that stays inside, and a regular tree, unpack.
    let t = targz(&[
        ("bin/app", T::Regular, None, b"app"),
        ("current", T::Symlink, Some("bin"), b""),
        ("app2", T::Link, Some("bin/app"), b""),
    ]);
    let (dir, r) = try_unpack(&t, UnpackLimits::DEFAULT);
    r.unwrap();
    let dest = dir.path().join("box/dest");
    assert_eq!(std::fs::read(dest.join("current/app")).unwrap(), b"app");
    assert_eq!(std::fs::read(dest.join("app2")).unwrap(), b"app");
}

/// Unpack `first`, calling `between(file, dir)` between the checking and the writing pass.
fn unpack_changed(
    first: &[u8],
    between: &mut dyn FnMut(&Path, &Path),
) -> (tempfile::TempDir, Result<(), AgentError>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.tar.gz");
    std::fs::write(&file, first).unwrap();
    let dest = dir.path().join("box/dest");
    let r = unpack_with_hook(
        &file,
        &dest,
        "test.tar.gz",
        UnpackLimits::DEFAULT,
        &mut |d| between(&file, d),
    );
    (dir, r)
}

#[test]
fn an_archive_changed_between_the_passes_is_checked_again() {
    // A local artifact is read in place: swapped after its first pass, the second pass must
    // not write what the first never saw.
    let good = targz(&[("decoy", T::Regular, None, b"x")]);
    for (hostile, why) in [
        (
            targz(&[
                ("decoy", T::Regular, None, b"x"),
                ("fifo", T::Fifo, None, b""),
            ]),
            "special file",
        ),
        (
            targz(&[
                ("decoy", T::Regular, None, b"x"),
                ("etc", T::Symlink, Some("/etc"), b""),
            ]),
            "absolute",
        ),
    ] {
        let (dir, r) = unpack_changed(&good, &mut |file, _| {
            std::fs::write(file, &hostile).unwrap()
        });
        let e = r.expect_err("the changed archive must be refused");
        assert!(e.to_string().contains(why), "{e}");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("box"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[test]
fn a_symlink_planted_between_the_passes_is_not_followed() {
    let outside = tempfile::tempdir().unwrap();
    let t = targz(&[
        ("f", T::Regular, None, b"mine"),
        ("sub/x", T::Regular, None, b"gotcha"),
    ]);
    let o = outside.path().to_path_buf();
    let (dir, r) = unpack_changed(&t, &mut |_, d| {
        // What a process racing the agent could plant in the directory being written.
        std::os::unix::fs::symlink(o.join("target"), d.join("f")).unwrap();
        std::os::unix::fs::symlink(&o, d.join("sub")).unwrap();
    });
    let e = r.expect_err("writing through a planted symlink must be refused");
    assert!(e.to_string().contains("through a symlink"), "{e}");
    let there: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(there.is_empty(), "written outside: {there:?}");
    assert!(!dir.path().join("box/dest").exists());
}

#[test]
fn an_unpack_replaces_what_an_earlier_one_left() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    std::fs::create_dir_all(dest.join("old")).unwrap();
    std::fs::write(dest.join("old/file"), b"stale").unwrap();
    let file = dir.path().join("a.tar.gz");
    std::fs::write(&file, targz(&[("bin/app", T::Regular, None, b"new")])).unwrap();
    unpack(&file, &dest, "test.tar.gz").unwrap();
    assert_eq!(std::fs::read(dest.join("bin/app")).unwrap(), b"new");
    assert!(!dest.join("old").exists());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("unpack")), "{names:?}");
}

fn artifact(url: &str) -> drover_model::fleet::Artifact {
    drover_model::fleet::Artifact {
        url: url.to_string(),
        sha256: "0".repeat(64),
    }
}

#[tokio::test]
async fn a_local_artifact_is_read_up_to_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        fetch_and_unpack_capped(
            &reqwest::Client::new(),
            &artifact("/dev/zero"),
            &dir.path().join("dest"),
            &dir.path().join("scratch"),
            1 << 20,
        ),
    )
    .await
    .expect("reading /dev/zero must stop at the limit");
    let e = r.unwrap_err();
    assert!(e.to_string().contains("size limit"), "{e}");
}

/// An http server on 127.0.0.1 that answers every request with `head` and then `body_len`
/// bytes of zeros (`None`: zeros until the client goes).
async fn zeros(head: &'static str, body_len: Option<u64>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/a.tar.gz", l.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![0u8; 64 * 1024];
                let mut sent = 0u64;
                while body_len.map_or(true, |n| sent < n) {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len() as u64;
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn a_download_stops_at_the_size_limit() {
    // No length given, and no end: stopped once past the limit, the partial file removed.
    let url = zeros("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", None).await;
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        fetch_and_unpack_capped(
            &reqwest::Client::new(),
            &artifact(&url),
            &dir.path().join("dest"),
            &scratch,
            1 << 20,
        ),
    )
    .await
    .expect("an endless download must stop at the limit");
    let e = r.unwrap_err();
    assert!(e.to_string().contains("size limit"), "{e}");
    assert!(!scratch.exists(), "the partial download is removed");
    // A declared length past the limit is refused before any byte is read.
    let url = zeros(
        "HTTP/1.1 200 OK\r\nContent-Length: 10000000000\r\nConnection: close\r\n\r\n",
        Some(0),
    )
    .await;
    let e = fetch_and_unpack_capped(
        &reqwest::Client::new(),
        &artifact(&url),
        &dir.path().join("dest"),
        &scratch,
        1 << 20,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("size limit"), "{e}");
    assert_eq!(drover_agent::artifact::MAX_DOWNLOAD_BYTES, 2 << 30);
}

#[test]
fn hard_links_that_escape_are_refused() {
    for target in ["../../etc/passwd", "/etc/passwd"] {
        let t = targz(&[
            ("decoy", T::Regular, None, b"x"),
            ("hl", T::Link, Some(target), b""),
        ]);
        refused(&t, UnpackLimits::DEFAULT, "hard link");
    }
}

#[test]
fn devices_and_fifos_are_refused() {
    for kind in [T::Char, T::Block, T::Fifo] {
        let t = targz(&[("decoy", T::Regular, None, b"x"), ("dev", kind, None, b"")]);
        refused(&t, UnpackLimits::DEFAULT, "special file");
    }
}

#[test]
fn archives_that_unpack_past_the_size_limit_are_refused() {
    // 8 MiB of zeros compress to a few KiB: small to fetch, big once unpacked.
    let zeros = vec![0u8; 8 << 20];
    let t = targz(&[
        ("decoy", T::Regular, None, b"x"),
        ("bomb", T::Regular, None, &zeros),
    ]);
    assert!(t.len() < 64 * 1024, "compressed: {}", t.len());
    let limits = UnpackLimits {
        max_bytes: 4 << 20,
        max_entries: 100,
    };
    refused(&t, limits, "size limit");
    // Within the limit, the same archive unpacks.
    let (dir, r) = try_unpack(
        &t,
        UnpackLimits {
            max_bytes: 16 << 20,
            max_entries: 100,
        },
    );
    r.unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("box/dest/bomb"))
            .unwrap()
            .len(),
        8 << 20
    );
}

#[test]
fn archives_with_too_many_entries_are_refused() {
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let mut entries: Vec<(&str, T, Option<&str>, &[u8])> = vec![("decoy", T::Regular, None, b"x")];
    entries.extend(
        names
            .iter()
            .map(|n| (n.as_str(), T::Regular, None, &b"y"[..])),
    );
    let t = targz(&entries);
    refused(
        &t,
        UnpackLimits {
            max_bytes: 1 << 20,
            max_entries: 20,
        },
        "more entries",
    );
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for (i, bytes) in [
        &b""[..],
        b"not a tarball at all",
        &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 1, 2, 3],
    ]
    .iter()
    .enumerate()
    {
        let file = dir.path().join(format!("g{i}.tar.gz"));
        std::fs::write(&file, bytes).unwrap();
        let r = unpack(&file, &dir.path().join(format!("d{i}")), "garbage");
        // An empty stream is an empty archive; anything else that is not gzip is an error.
        if i > 0 {
            assert!(r.is_err(), "{i}");
        }
    }
}

#[test]
fn the_default_limit_is_two_gib_in_100k_entries() {
    assert_eq!(UnpackLimits::default().max_bytes, 2 * 1024 * 1024 * 1024);
    assert_eq!(UnpackLimits::default().max_entries, 100_000);
}
