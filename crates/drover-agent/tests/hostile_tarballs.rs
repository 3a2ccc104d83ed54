//! Hostile artifacts: every kind of tarball that could write outside the component directory,
//! or fill the disk, is refused before anything is written.

use std::path::Path;

use drover_agent::artifact::{unpack, unpack_with_limits, UnpackLimits};
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
fn a_file_written_through_a_symlink_cannot_escape() {
    // `d/up -> ..` stays inside (it points at the archive root), so it is accepted, and a file
    // written through it lands inside too.
    let t = targz(&[
        ("d/up", T::Symlink, Some(".."), b""),
        ("d/up/inside", T::Regular, None, b"ok"),
    ]);
    let (dir, r) = try_unpack(&t, UnpackLimits::DEFAULT);
    r.unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("box/dest/inside")).unwrap(),
        b"ok"
    );
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
