//! The agent trusts what it pins, and nothing else: with a CA file of two certificates, the
//! pin covers the first, so only a server whose certificate chains to the first is trusted.

use std::sync::Arc;

use drover_agent::AgentAuth;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca {
    pem: String,
    der: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

/// An https server on 127.0.0.1 with a certificate signed by `ca`, answering `200 ok`.
async fn server(ca: &Ca) -> String {
    let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let chain = vec![
        rustls::pki_types::CertificateDer::from(cert.der().to_vec()),
        rustls::pki_types::CertificateDer::from(ca.der.clone()),
    ];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

fn sha(der: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(der))
}

async fn reaches(auth: &AgentAuth, url: &str) -> bool {
    let client = auth.server_client(true).unwrap();
    client.get(url).send().await.is_ok()
}

#[tokio::test]
async fn only_the_pinned_certificate_of_a_ca_file_is_trusted() {
    let pinned = ca("pinned CA");
    let other = ca("another CA in the same file");
    let file = format!("{}{}", pinned.pem, other.pem).into_bytes();

    let mut auth = AgentAuth::default();
    auth.pin_ca(file.clone(), &sha(&pinned.der)).unwrap();
    // The setup works: a server of the pinned CA is reached.
    assert!(reaches(&auth, &server(&pinned).await).await);
    // A server whose certificate chains to the file's other certificate is not trusted.
    assert!(
        !reaches(&auth, &server(&other).await).await,
        "a certificate the pin does not cover is trusted"
    );
    // And the other certificate's fingerprint is not a pin for this file.
    assert!(AgentAuth::default().pin_ca(file, &sha(&other.der)).is_err());
}
