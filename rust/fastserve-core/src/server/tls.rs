//! TLS for the HTTP and gRPC front ends (rustls with the ring provider), optionally with client
//! certificates (mTLS). Handshakes run in per-connection tasks under a timeout, never in an accept loop.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish the TLS handshake before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// PEM files: the server's certificate chain and key, and optionally the CA that client
/// certificates must chain to (set: clients without a valid certificate are refused).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A startup error: unreadable, empty or mismatched certificate material.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// Acceptors for both front ends; they differ only in the ALPN protocols offered.
#[derive(Clone)]
pub struct Tls {
    pub http: TlsAcceptor,
    pub grpc: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError(format!("cannot read {what} '{}': {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{what} '{}' is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{what} '{}' holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs(&files.cert, "TLS certificate")?;
        let key_pem = std::fs::read(&files.key)
            .map_err(|e| TlsError(format!("cannot read TLS key '{}': {e}", files.key.display())))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| TlsError(format!("TLS key '{}' holds no usable PEM private key: {e}", files.key.display())))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS setup failed: {e}")))?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in certs(ca, "TLS client CA")? {
                    roots
                        .add(cert)
                        .map_err(|e| TlsError(format!("TLS client CA '{}' is not usable: {e}", ca.display())))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError(format!("TLS client CA '{}' is not usable: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(chain, key).map_err(|e| {
            TlsError(format!(
                "TLS certificate '{}' and key '{}' do not form a usable pair: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
        let with_alpn = |protocols: &[&[u8]]| {
            let mut c = config.clone();
            c.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            TlsAcceptor::from(Arc::new(c))
        };
        Ok(Self { http: with_alpn(&[b"h2", b"http/1.1"]), grpc: with_alpn(&[b"h2"]) })
    }
}

/// Runs the server side of a handshake, bounded by [`HANDSHAKE_TIMEOUT`].
pub async fn handshake(acceptor: &TlsAcceptor, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}
