//! TLS for the API (rustls): a certificate and key given by the operator, or a CA and a
//! server certificate the server makes itself in its data directory.
//!
//! Generated files (`DATA/`): `ca.pem` (public: what clients and agents trust), `ca.key`
//! (0600: only the server reads it), `server.pem` and `server.key` (0600). The CA is made
//! once and kept; the server certificate is made again from it on every start, so its names
//! always cover the address the server listens on. Agents pin the CA by the sha256 of its
//! DER encoding, which travels in their launch configuration.

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

/// Names the generated server certificate is valid for: loopback, this host's name, and the
/// address the API listens on.
fn server_names(listen: SocketAddr) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
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

/// Make (or load) the CA in `data_dir` and a fresh server certificate signed by it.
/// Returns (CA PEM, server chain PEM, server key PEM).
pub fn generate(
    data_dir: &Path,
    listen: SocketAddr,
) -> Result<(String, String, String), ServerError> {
    let ca_pem_path = data_dir.join("ca.pem");
    let ca_key_path = data_dir.join("ca.key");
    let (ca_pem, ca_key) = match (
        std::fs::read_to_string(&ca_pem_path),
        std::fs::read_to_string(&ca_key_path),
    ) {
        (Ok(pem), Ok(key)) => {
            let key =
                rcgen::KeyPair::from_pem(&key).map_err(|e| io_err(ca_key_path.display(), e))?;
            (pem, key)
        }
        _ => {
            let key = rcgen::KeyPair::generate().map_err(|e| io_err("CA key", e))?;
            let cert = ca_params()?
                .self_signed(&key)
                .map_err(|e| io_err("CA certificate", e))?;
            write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
            std::fs::write(&ca_pem_path, cert.pem())
                .map_err(|e| ServerError::Io(ca_pem_path.display().to_string(), e))?;
            tracing::info!(ca = %ca_pem_path.display(), "made a new CA for the API");
            (cert.pem(), key)
        }
    };
    let issuer = rcgen::Issuer::new(ca_params()?, &ca_key);
    let mut params = rcgen::CertificateParams::new(server_names(listen))
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
    data_dir: &Path,
    listen: SocketAddr,
) -> Result<Option<Tls>, ServerError> {
    let (ca_file, chain_pem, key_pem) = match mode {
        TlsMode::Off => return Ok(None),
        TlsMode::Generate => {
            let (_, chain, key) = generate(data_dir, listen)?;
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
        let (ca, chain, _) = generate(dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let c = certs(ca.as_bytes(), "ca").unwrap();
        assert_eq!(pem_encode(&c[0]).trim(), ca.trim());
        assert_eq!(certs(chain.as_bytes(), "chain").unwrap().len(), 2);
        // The CA is kept: a second start signs with the same one.
        let (ca2, _, _) = generate(dir.path(), "127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(ca, ca2);
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
}
