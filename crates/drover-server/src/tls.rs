//! TLS for the API (rustls): a certificate and key given by the operator, or a CA kept in the
//! store and a server certificate each server makes from it.
//!
//! The generated CA (certificate and key) is made once and kept in the store
//! ([`CA_SECRET`]), so every server on one store has the same CA: agents, balancers, the CLI
//! and the servers forwarding to each other trust one CA whichever server they reach. Each
//! server signs a certificate of its own from it on every start, so its names always cover
//! the address it listens on and the one it advertises. Files (`DATA/`): `ca.pem` (public:
//! what clients trust), `server.pem` and `server.key` (0600). Agents pin the CA by the sha256
//! of its DER encoding, which travels in their launch configuration.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use drover_store::Store;

use crate::ServerError;

/// How the API is served.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP.
    #[default]
    Off,
    /// HTTPS with a CA and certificate made (once) in the data directory.
    Generate,
    /// HTTPS with the operator's certificate chain and key (PEM). Agents pin `ca` when given,
    /// else the last certificate of the chain.
    Files {
        cert: PathBuf,
        key: PathBuf,
        ca: Option<PathBuf>,
    },
}

/// A ready TLS setup: the acceptor, and the CA agents and clients trust.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// PEM file of the CA that agents pin.
    pub ca_file: PathBuf,
    /// Lowercase hex sha256 of the CA certificate's DER bytes.
    pub ca_sha256: String,
}

fn io_err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> ServerError {
    ServerError::Internal(format!("TLS: {what}: {e}"))
}

/// The CA's fixed identity: the same parameters sign again with the kept key.
fn ca_params() -> Result<rcgen::CertificateParams, ServerError> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| io_err("CA parameters", e))?;
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "drover API CA");
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "drover");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

/// The name, in the store, of the generated CA (JSON of [`StoredCa`]).
pub const CA_SECRET: &str = "api-ca";

/// The generated CA as the store keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredCa {
    cert_pem: String,
    key_pem: String,
}

/// Names the generated server certificate is valid for: loopback, this host's name, the
/// address the API listens on, and the hosts of `advertised` (the URL other servers and
/// agents are given).
fn server_names(listen: SocketAddr, advertised: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    for url in advertised {
        if let Some(host) = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
        {
            names.push(host);
        }
    }
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h.is_ascii() {
            names.push(h.to_string());
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Write `data` to `path`, readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ServerError::Io(tmp.display().to_string(), e))?;
    let _ = f.set_permissions(std::fs::Permissions::from_mode(0o600));
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| ServerError::Io(tmp.display().to_string(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| ServerError::Io(path.display().to_string(), e))
}

/// The CA from the store, made and stored on the first start (from `DATA/ca.pem` and
/// `DATA/ca.key` when an older drover left them there; the key file is then removed).
/// Returns (CA PEM, CA key).
fn stored_ca(store: &dyn Store, data_dir: &Path) -> Result<(String, rcgen::KeyPair), ServerError> {
    let ca_pem_path = data_dir.join("ca.pem");
    let ca_key_path = data_dir.join("ca.key");
    let old = match (
        std::fs::read_to_string(&ca_pem_path),
        std::fs::read_to_string(&ca_key_path),
    ) {
        (Ok(cert_pem), Ok(key_pem)) => Some(StoredCa { cert_pem, key_pem }),
        _ => None,
    };
    let candidate = match &old {
        Some(ca) => serde_json::to_vec(ca).map_err(|e| io_err("CA", e))?,
        None => {
            let key = rcgen::KeyPair::generate().map_err(|e| io_err("CA key", e))?;
            let cert = ca_params()?
                .self_signed(&key)
                .map_err(|e| io_err("CA certificate", e))?;
            serde_json::to_vec(&StoredCa {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            })
            .map_err(|e| io_err("CA", e))?
        }
    };
    let stored = store.keep_secret(CA_SECRET, &candidate)?;
    if stored == candidate {
        tracing::info!("the API's CA is in the store (shared by every server on it)");
    }
    let ca: StoredCa = serde_json::from_slice(&stored)
        .map_err(|e| io_err(format!("the store's {CA_SECRET}"), e))?;
    let key = rcgen::KeyPair::from_pem(&ca.key_pem)
        .map_err(|e| io_err(format!("the store's {CA_SECRET} key"), e))?;
    if old.is_some_and(|o| o.key_pem == ca.key_pem) {
        // The store holds it now: no second copy of the key on this disk.
        let _ = std::fs::remove_file(&ca_key_path);
    }
    if std::fs::read_to_string(&ca_pem_path).ok().as_deref() != Some(ca.cert_pem.as_str()) {
        std::fs::write(&ca_pem_path, &ca.cert_pem)
            .map_err(|e| ServerError::Io(ca_pem_path.display().to_string(), e))?;
    }
    Ok((ca.cert_pem, key))
}

/// The store's CA (made once) and a fresh server certificate signed by it, for `listen`
/// and the `advertised` URLs. Returns (CA PEM, server chain PEM, server key PEM).
pub fn generate(
    store: &dyn Store,
    data_dir: &Path,
    listen: SocketAddr,
    advertised: &[String],
) -> Result<(String, String, String), ServerError> {
    let (ca_pem, ca_key) = stored_ca(store, data_dir)?;
    let issuer = rcgen::Issuer::new(ca_params()?, &ca_key);
    let mut params = rcgen::CertificateParams::new(server_names(listen, advertised))
        .map_err(|e| io_err("server certificate names", e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "drover API");
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().map_err(|e| io_err("server key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| io_err("server certificate", e))?;
    let chain = format!("{}{}", cert.pem(), ca_pem);
    let key_pem = key.serialize_pem();
    write_private(&data_dir.join("server.key"), key_pem.as_bytes())?;
    std::fs::write(data_dir.join("server.pem"), &chain)
        .map_err(|e| ServerError::Io("server.pem".into(), e))?;
    Ok((ca_pem, chain, key_pem))
}

/// The certificates of a PEM text, in order.
pub fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| io_err(what, e))?;
    if certs.is_empty() {
        return Err(io_err(what, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// Lowercase hex sha256 of a certificate's DER bytes: the pin.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// The rustls provider drover uses (ring), whatever else is compiled in.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Prepare TLS for `mode`; `None` for plain HTTP.
pub fn setup(
    mode: &TlsMode,
    store: &dyn Store,
    data_dir: &Path,
    listen: SocketAddr,
    advertised: &[String],
) -> Result<Option<Tls>, ServerError> {
    let (ca_file, chain_pem, key_pem) = match mode {
        TlsMode::Off => return Ok(None),
        TlsMode::Generate => {
            let (_, chain, key) = generate(store, data_dir, listen, advertised)?;
            (
                data_dir.join("ca.pem"),
                chain.into_bytes(),
                key.into_bytes(),
            )
        }
        TlsMode::Files { cert, key, ca } => {
            let chain =
                std::fs::read(cert).map_err(|e| ServerError::Io(cert.display().to_string(), e))?;
            let key_pem =
                std::fs::read(key).map_err(|e| ServerError::Io(key.display().to_string(), e))?;
            let ca_file = match ca {
                Some(ca) => ca.clone(),
                None => {
                    // The last certificate of the chain is what agents pin.
                    let last = certs(&chain, &cert.display().to_string())?
                        .pop()
                        .expect("certs() is never empty");
                    let path = data_dir.join("ca.pem");
                    let pem = pem_encode(&last);
                    std::fs::write(&path, pem)
                        .map_err(|e| ServerError::Io(path.display().to_string(), e))?;
                    path
                }
            };
            (ca_file, chain, key_pem)
        }
    };
    let chain = certs(&chain_pem, "server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| io_err("server key", e))?;
    let ca_pem =
        std::fs::read(&ca_file).map_err(|e| ServerError::Io(ca_file.display().to_string(), e))?;
    let ca = certs(&ca_pem, &ca_file.display().to_string())?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| io_err("protocol versions", e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| io_err("certificate and key", e))?;
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_file,
        ca_sha256: fingerprint(&ca[0]),
    }))
}

/// PEM text of one certificate.
pub fn pem_encode(cert: &CertificateDer<'_>) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in cert.as_ref().chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (chunk.get(1).copied().unwrap_or(0) as u32) << 8
            | chunk.get(2).copied().unwrap_or(0) as u32;
        for i in 0..4 {
            if i <= n {
                b64.push(B64[(v >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A listener that hands axum only connections whose TLS handshake succeeded. Handshakes run
/// in their own tasks, so a slow or silent client holds up nobody else.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, acceptor: tokio_rustls::TlsAcceptor) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let accept_task = tokio::spawn(async move {
            // Handshakes under way: owned by this task, aborted with it.
            let mut handshakes = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    accepted = tcp.accept() => accepted,
                    Some(_) = handshakes.join_next() => continue,
                };
                let (stream, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!("API accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            rx,
            local,
            accept_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The host agents and local clients use to reach an API bound to `addr`.
pub fn client_host(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = drover_store::SqliteStore::open_in_memory().unwrap();
        let listen = "127.0.0.1:0".parse().unwrap();
        let (ca, chain, _) = generate(&store, dir.path(), listen, &[]).unwrap();
        let c = certs(ca.as_bytes(), "ca").unwrap();
        assert_eq!(pem_encode(&c[0]).trim(), ca.trim());
        assert_eq!(certs(chain.as_bytes(), "chain").unwrap().len(), 2);
        // The CA is kept: a second start signs with the same one.
        let (ca2, _, _) = generate(&store, dir.path(), listen, &[]).unwrap();
        assert_eq!(ca, ca2);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The CA's key is in the store, not on this disk.
        assert!(!dir.path().join("ca.key").exists());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            ca
        );
    }

    /// Two servers with data directories of their own on one store: the same CA, each its
    /// own certificate, naming the host it advertises.
    #[test]
    fn servers_on_one_store_share_the_ca_and_name_their_advertised_host() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = drover_store::SqliteStore::open_in_memory().unwrap();
        let listen = "0.0.0.0:7878".parse().unwrap();
        let (ca_a, chain_a, _) = generate(&store, a.path(), listen, &[]).unwrap();
        let adv = ["https://cp-2.example.internal:7878".to_string()];
        let (ca_b, chain_b, _) = generate(&store, b.path(), listen, &adv).unwrap();
        assert_eq!(ca_a, ca_b);
        assert_ne!(chain_a, chain_b);
        let leaf = certs(chain_b.as_bytes(), "chain").unwrap().remove(0);
        let text = String::from_utf8_lossy(leaf.as_ref()).into_owned();
        assert!(text.contains("cp-2.example.internal"));
        assert!(
            !String::from_utf8_lossy(certs(chain_a.as_bytes(), "chain").unwrap()[0].as_ref())
                .contains("cp-2.example.internal")
        );
    }

    /// An older drover's CA files are taken into the store, and the key file removed.
    #[test]
    fn an_older_ca_in_the_data_directory_moves_into_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = ca_params().unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("ca.key"), key.serialize_pem()).unwrap();
        let store = drover_store::SqliteStore::open_in_memory().unwrap();
        let listen = "127.0.0.1:0".parse().unwrap();
        let (ca, _, _) = generate(&store, dir.path(), listen, &[]).unwrap();
        assert_eq!(ca, cert.pem());
        assert!(!dir.path().join("ca.key").exists());
        let kept: StoredCa =
            serde_json::from_slice(&store.keep_secret(CA_SECRET, b"other").unwrap()).unwrap();
        assert_eq!(kept.key_pem, key.serialize_pem());
    }
}
