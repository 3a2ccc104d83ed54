//! What the Docker tests need, made by the tests themselves: the engine (skipped, with the reason
//! printed, when there is none, unless DROVER_CI=1), a registry on loopback (Debian's
//! `docker-registry`), and small images (`FROM scratch` + a static busybox, or any files) built
//! through the Engine API and pushed to that registry. Every image and container a test makes is
//! named `drover-test-*` and removed by its [`Cleanup`], even when the test fails.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::{
    BuildImageOptions, ListContainersOptions, PushImageOptions, RemoveContainerOptions,
    RemoveImageOptions, TagImageOptions,
};
use bollard::Docker;
use futures::StreamExt;

/// Tests that find no engine (or no registry) skip, unless this is set to 1: then they fail.
pub fn ci() -> bool {
    std::env::var("DROVER_CI").is_ok_and(|v| v == "1")
}

/// Skip the test (print why), or fail it under CI.
pub fn skip(test: &str, why: &str) {
    assert!(!ci(), "{test}: DROVER_CI=1 and {why}");
    eprintln!("SKIPPED {test}: {why} (set DROVER_CI=1 to make this a failure)");
}

/// The engine, the registry program and a static busybox, or why not.
pub async fn prerequisites() -> Result<Docker, String> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| format!("no Docker Engine: {e}"))?
        .negotiate_version()
        .await
        .map_err(|e| format!("no Docker Engine answers: {e}"))?;
    docker
        .ping()
        .await
        .map_err(|e| format!("the Docker Engine does not answer: {e}"))?;
    if !Path::new(REGISTRY_BIN).exists() {
        return Err(format!(
            "no {REGISTRY_BIN} (Debian: apt-get install -y docker-registry)"
        ));
    }
    busybox().ok_or("no static busybox (Debian: apt-get install -y busybox-static)")?;
    Ok(docker)
}

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A static busybox binary.
pub fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            p.exists()
                && Command::new("ldd")
                    .arg(p)
                    .output()
                    .map(|o| {
                        let s = format!(
                            "{}{}",
                            String::from_utf8_lossy(&o.stdout),
                            String::from_utf8_lossy(&o.stderr)
                        );
                        s.contains("not a dynamic") || s.contains("statically linked")
                    })
                    .unwrap_or(false)
        })
}

/// A registry (Debian's `docker-registry`, the CNCF distribution) on 127.0.0.1, with its own
/// storage; stopped (SIGKILL to its pid) when dropped.
pub struct Registry {
    pub addr: String,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("drover-test-registry-")
            .tempdir()
            .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let mut r = Registry {
            addr,
            child: None,
            dir,
        };
        r.restart();
        r
    }

    /// Start it again (same address, same storage) after [`Registry::stop`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the registry is running");
        let log = std::fs::File::create(self.dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_status(&self.addr, "/v2/") != Some(200) {
            assert!(
                Instant::now() < deadline,
                "the registry did not answer on {}: {}",
                self.addr,
                std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The outage: SIGKILL to the registry (our own child, by pid).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `sha256:…` of `repo:tag`, asked the way a server would (HEAD on the manifest).
    pub fn digest(&self, repo: &str, tag: &str) -> String {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "HEAD /v2/{repo}/manifests/{tag} HTTP/1.0\r\nHost: {}\r\nAccept: application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut head = String::new();
        s.read_to_string(&mut head).unwrap();
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("docker-content-digest")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no digest for {repo}:{tag}: {head}"))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Status code of a GET on 127.0.0.1, or None.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(100)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let line = std::str::from_utf8(&buf[..n]).ok()?;
    line.get(9..12)?.parse().ok()
}

/// The body of a GET, or None.
pub fn http_body(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1000))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    if !out.starts_with("HTTP/1.") || out.get(9..12) != Some("200") {
        return None;
    }
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// A tar archive of `files` (path in the archive, contents, mode); a mode of 0 makes a
/// symbolic link whose target is the contents.
pub fn tar(files: &[(&str, Vec<u8>, u32)]) -> Vec<u8> {
    let mut b = ::tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = ::tar::Header::new_gnu();
        h.set_mtime(0);
        if *mode == 0 {
            h.set_entry_type(::tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            let target = String::from_utf8(data.clone()).unwrap();
            b.append_link(&mut h, path, target).unwrap();
        } else {
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_cksum();
            b.append_data(&mut h, path, &data[..]).unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// Busybox applets the tests use, linked to /bin/busybox.
const APPLETS: &[&str] = &[
    "sh", "httpd", "sleep", "test", "touch", "rm", "mkdir", "echo", "cat", "true", "false", "kill",
    "nc", "wget", "date", "ls", "stty",
];

/// Build `tag` from a Dockerfile and files, through the Engine API (the classic builder).
pub async fn build(docker: &Docker, tag: &str, dockerfile: &str, files: &[(&str, Vec<u8>, u32)]) {
    let mut all: Vec<(&str, Vec<u8>, u32)> =
        vec![("Dockerfile", dockerfile.as_bytes().to_vec(), 0o644)];
    all.extend(files.iter().map(|(p, d, m)| (*p, d.clone(), *m)));
    let body = bollard::body_full(tar(&all).into());
    let mut s = docker.build_image(
        BuildImageOptions {
            dockerfile: "Dockerfile".into(),
            t: Some(tag.into()),
            rm: true,
            forcerm: true,
            ..Default::default()
        },
        None,
        Some(body),
    );
    let mut log = String::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(i) => {
                if let Some(e) = i.error_detail.and_then(|e| e.message) {
                    panic!("building {tag}: {e}\n{log}");
                }
                log.push_str(&i.stream.unwrap_or_default());
            }
            Err(e) => panic!("building {tag}: {e}\n{log}"),
        }
    }
}

/// Tag `image` as `reference` (`host:port/repo:tag`) and push it.
pub async fn push(docker: &Docker, image: &str, reference: &str) {
    let (repo, tag) = reference.rsplit_once(':').unwrap();
    docker
        .tag_image(
            image,
            Some(TagImageOptions {
                repo: Some(repo.into()),
                tag: Some(tag.into()),
            }),
        )
        .await
        .unwrap();
    let mut s = docker.push_image(
        repo,
        Some(PushImageOptions {
            tag: Some(tag.into()),
            ..Default::default()
        }),
        None,
    );
    while let Some(item) = s.next().await {
        if let Err(e) = item {
            panic!("pushing {reference}: {e}");
        }
    }
}

/// Remove every local name and the data of `image` (force), if it is here.
pub async fn remove_image(docker: &Docker, image: &str) {
    let _ = docker
        .remove_image(
            image,
            Some(RemoveImageOptions {
                force: true,
                ..Default::default()
            }),
            None,
        )
        .await;
}

/// A busybox image (`FROM scratch`, busybox as /bin/busybox and sh, `extra` Dockerfile lines)
/// pushed to `registry` as `REGISTRY/NAME:TAG`, and removed locally so that a run must pull it.
/// A label unique to this call keeps its image id apart from every other test's.
/// Returns (reference, pinned reference).
pub async fn busybox_image(
    docker: &Docker,
    registry: &Registry,
    cleanup: &mut Cleanup,
    name: &str,
    tag: &str,
    extra: &str,
) -> (String, String) {
    assert!(name.starts_with("drover-test-"));
    let bb = std::fs::read(busybox().unwrap()).unwrap();
    let local = format!("{name}:{tag}");
    let unique = format!("{}-{:?}", std::process::id(), Instant::now());
    let mut files = vec![("rootfs/bin/busybox".to_string(), bb, 0o755)];
    for a in APPLETS {
        files.push((format!("rootfs/bin/{a}"), b"busybox".to_vec(), 0));
    }
    let files: Vec<(&str, Vec<u8>, u32)> = files
        .iter()
        .map(|(p, d, m)| (p.as_str(), d.clone(), *m))
        .collect();
    build(
        docker,
        &local,
        &format!("FROM scratch\nCOPY rootfs/ /\nLABEL drover.test=\"{unique}\"\n{extra}\n"),
        &files,
    )
    .await;
    let reference = format!("{}/{name}:{tag}", registry.addr);
    cleanup.images.push(local.clone());
    cleanup.images.push(reference.clone());
    push(docker, &local, &reference).await;
    let digest = registry.digest(name, tag);
    let pinned = format!("{}/{name}@{digest}", registry.addr);
    cleanup.images.push(pinned.clone());
    remove_image(docker, &local).await;
    remove_image(docker, &reference).await;
    (reference, pinned)
}

/// Containers whose instance directory is under one of `dirs`, and images, removed when dropped
/// (also on panic).
#[derive(Default)]
pub struct Cleanup {
    pub images: Vec<String>,
    pub dirs: Vec<PathBuf>,
}

impl Cleanup {
    /// Remove, at the end, every container of an instance directory under `d`.
    pub fn dir(&mut self, d: &Path) {
        self.dirs
            .push(std::fs::canonicalize(d).unwrap_or(d.to_path_buf()));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let images = std::mem::take(&mut self.images);
        let dirs = std::mem::take(&mut self.dirs);
        // A runtime of its own on a thread of its own: we may be inside a runtime, or panicking.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(docker) = Docker::connect_with_local_defaults() else {
                    return;
                };
                let Ok(docker) = docker.negotiate_version().await else {
                    return;
                };
                for d in dirs {
                    for id in containers_under(&docker, &d).await {
                        let _ = docker
                            .remove_container(
                                &id,
                                Some(RemoveContainerOptions {
                                    force: true,
                                    v: true,
                                    link: false,
                                }),
                            )
                            .await;
                    }
                }
                for i in images {
                    remove_image(&docker, &i).await;
                }
            });
        })
        .join();
    }
}

/// Ids of the containers (running or not) whose `drover.dir` is under `prefix`.
pub async fn containers_under(docker: &Docker, prefix: &Path) -> Vec<String> {
    let prefix = std::fs::canonicalize(prefix).unwrap_or(prefix.to_path_buf());
    let filters = [("label".to_string(), vec!["drover.dir".to_string()])]
        .into_iter()
        .collect();
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            c.labels
                .as_ref()
                .and_then(|l| l.get("drover.dir"))
                .is_some_and(|d| Path::new(d).starts_with(&prefix))
        })
        .filter_map(|c| c.id)
        .collect()
}

/// Ids of the containers (running or not) whose `drover.dir` label is `dir`.
pub async fn containers_of(docker: &Docker, dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap_or(dir.to_path_buf());
    let filters = [(
        "label".to_string(),
        vec![format!("drover.dir={}", dir.display())],
    )]
    .into_iter()
    .collect();
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

pub async fn inspect(docker: &Docker, id: &str) -> ContainerInspectResponse {
    docker.inspect_container(id, None).await.unwrap()
}

/// The host pid of a running container's main process.
pub async fn main_pid(docker: &Docker, id: &str) -> i32 {
    let i = inspect(docker, id).await;
    i.state.and_then(|s| s.pid).unwrap_or(0) as i32
}

/// A loopback address nobody else uses in this test run: 127.61.X.Y from the pid and a counter.
pub fn instance_addr() -> std::net::IpAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let p = std::process::id();
    format!("127.61.{}.{}", (p % 250) + 1, (n % 250) + 1)
        .parse()
        .unwrap()
}

/// The drover binary (stripped) and its shared libraries (`ldd`), `FROM scratch`, entrypoint
/// `/drover`: the demo server as an image, pushed as `REGISTRY/NAME:TAG` for each tag and removed
/// locally. Returns the references.
pub async fn drover_image(
    docker: &Docker,
    registry: &Registry,
    cleanup: &mut Cleanup,
    bin: &Path,
    name: &str,
    tags: &[&str],
) -> Vec<String> {
    assert!(name.starts_with("drover-test-"));
    let tmp = tempfile::tempdir().unwrap();
    let stripped = tmp.path().join("drover");
    std::fs::copy(bin, &stripped).unwrap();
    let _ = Command::new("strip").arg(&stripped).status();
    let mut files = vec![(
        "rootfs/drover".to_string(),
        std::fs::read(&stripped).unwrap(),
        0o755,
    )];
    let ldd = Command::new("ldd").arg(bin).output().unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let Some(lib) = line.split_whitespace().find(|w| w.starts_with('/')) else {
            continue;
        };
        // The real file, under the name the binary asks for.
        let data = std::fs::read(lib).unwrap();
        files.push((format!("rootfs{lib}"), data, 0o755));
    }
    let files: Vec<(&str, Vec<u8>, u32)> = files
        .iter()
        .map(|(p, d, m)| (p.as_str(), d.clone(), *m))
        .collect();
    let local = format!("{name}:build");
    let unique = format!("{}-{:?}", std::process::id(), Instant::now());
    build(
        docker,
        &local,
        &format!("FROM scratch\nCOPY rootfs/ /\nLABEL drover.test=\"{unique}\"\nENTRYPOINT [\"/drover\"]\n"),
        &files,
    )
    .await;
    cleanup.images.push(local.clone());
    let mut refs = Vec::new();
    for tag in tags {
        let reference = format!("{}/{name}:{tag}", registry.addr);
        cleanup.images.push(reference.clone());
        push(docker, &local, &reference).await;
        let digest = registry.digest(name, tag);
        cleanup
            .images
            .push(format!("{}/{name}@{digest}", registry.addr));
        refs.push(reference);
    }
    remove_image(docker, &local).await;
    for r in &refs {
        remove_image(docker, r).await;
    }
    refs
}

/// A unix socket that forwards to another (the engine's), which the test can take down (every
/// connection cut, the socket gone) and bring back: an engine outage as the agent sees it.
pub struct SocketProxy {
    cmd: tokio::sync::mpsc::UnboundedSender<(bool, std::sync::mpsc::Sender<()>)>,
}

impl SocketProxy {
    pub fn start(path: &Path, target: &Path) -> SocketProxy {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(bool, std::sync::mpsc::Sender<()>)>();
        let (path, target) = (path.to_path_buf(), target.to_path_buf());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
                let serve = |tasks: &mut Vec<tokio::task::JoinHandle<()>>| {
                    let _ = std::fs::remove_file(&path);
                    let l = tokio::net::UnixListener::bind(&path).unwrap();
                    let target = target.clone();
                    let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<
                        tokio::task::AbortHandle,
                    >::new(
                    )));
                    let c2 = conns.clone();
                    tasks.push(tokio::spawn(async move {
                        let _keep = ConnsGuard(c2.clone());
                        loop {
                            let Ok((mut a, _)) = l.accept().await else {
                                return;
                            };
                            let target = target.clone();
                            let h = tokio::spawn(async move {
                                if let Ok(mut b) = tokio::net::UnixStream::connect(&target).await {
                                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                                }
                            });
                            c2.lock().unwrap().push(h.abort_handle());
                        }
                    }));
                };
                serve(&mut tasks);
                while let Some((up, ack)) = rx.recv().await {
                    for t in tasks.drain(..) {
                        t.abort();
                        let _ = t.await;
                    }
                    let _ = std::fs::remove_file(&path);
                    if up {
                        serve(&mut tasks);
                    }
                    let _ = ack.send(());
                }
            });
        });
        SocketProxy { cmd: tx }
    }

    fn set(&self, up: bool) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.cmd.send((up, tx)).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
    }

    /// Cut every connection and remove the socket.
    pub fn down(&self) {
        self.set(false);
    }

    /// Listen again.
    pub fn up(&self) {
        self.set(true);
    }
}

/// Aborts the connections of an accept loop when the loop ends (is aborted).
struct ConnsGuard(std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>);

impl Drop for ConnsGuard {
    fn drop(&mut self) {
        for h in self.0.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

/// One Docker test at a time in a test binary: the engine's start of a container is the bulk of
/// every time measured, and slows down under load.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
