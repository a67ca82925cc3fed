//! TLS to backends, for pools with a `[pools.NAME.tls]` table: the rustls client
//! config (whom to trust, whether to verify, the client certificate for backends
//! that require one, protocol versions), loaded with the config so `rampart check`
//! and a reload report bad files; the name each backend is verified against; and
//! the handshake on a new backend connection (`connect`), for requests and health
//! checks alike.
//!
//! Connections are pooled and reused as plain ones are (`upstream::ConnPool`), and
//! rustls resumes sessions to each backend from its in-memory cache, so a full
//! handshake happens once per new connection at most.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::netio::UpIo;
use crate::tls::{CertFiles, Certificate, MinVersion};

/// Where a pool's trusted CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The system's store (`/etc/ssl/certs/ca-certificates.crt` on Debian;
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR` override it, as for OpenSSL).
    System,
    /// A PEM bundle named by `ca`.
    File(PathBuf),
    /// `verify = false`: any certificate, as nginx's default `proxy_ssl_verify off`
    /// and HAProxy's `verify none`. The handshake's signatures are still checked.
    None,
}

/// A pool's TLS settings, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTlsSpec {
    pub trust: Trust,
    /// The name every backend is verified against (and sent as SNI), instead of the
    /// host each backend is written with.
    pub server_name: Option<String>,
    pub client_cert: Option<CertFiles>,
    pub min_version: MinVersion,
    /// The pool speaks HTTP/2: ALPN offers `h2` alone.
    pub h2: bool,
}

/// A pool's loaded TLS settings, ready to connect with.
pub struct BackendTls {
    pub spec: BackendTlsSpec,
    connector: tokio_rustls::TlsConnector,
    /// How many CA certificates are trusted (0 with `verify = false`).
    pub roots: usize,
    /// The client certificate, as `check`, the log and `/status` show it.
    pub client_cert: Option<Certificate>,
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("spec", &self.spec)
            .field("roots", &self.roots)
            .finish()
    }
}

/// A setting that could not be loaded: the field it belongs to (under the pool's
/// `tls` table) and why.
pub type LoadError = (&'static str, String);

impl BackendTls {
    /// Loads the trust store and client certificate; every problem is reported,
    /// each with its field.
    pub fn load(spec: BackendTlsSpec) -> Result<BackendTls, Vec<LoadError>> {
        let provider = crate::tls::provider();
        let mut errors = Vec::new();
        let roots = match &spec.trust {
            Trust::None => Ok(None),
            Trust::File(path) => load_roots_file(path).map(Some),
            Trust::System => load_system_roots().map(Some),
        }
        .unwrap_or_else(|e| {
            errors.push(("ca", e));
            None
        });
        let client = match &spec.client_cert {
            None => None,
            Some(files) => match crate::tls::load_certificate(files.clone(), &provider) {
                Ok(pair) => Some(pair),
                Err(e) => {
                    errors.push(("cert", e));
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(spec.min_version.versions())
            .map_err(|e| vec![("min_version", e.to_string())])?;
        let trusted = roots.as_ref().map_or(0, |r| r.len());
        let builder = match roots {
            Some(roots) => builder.with_root_certificates(roots),
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
        };
        let (mut config, client_cert) = match client {
            Some((key, cert)) => (
                builder.with_client_cert_resolver(Arc::new(ClientCert(Arc::new(key)))),
                Some(cert),
            ),
            None => (builder.with_no_client_auth(), None),
        };
        // The pool's one protocol, so a server that offers both picks it; an h2 pool
        // offers h2 alone, as HAProxy's `alpn h2` (a backend that cannot speak it
        // fails the handshake rather than answering HTTP/1.1 to an HTTP/2 preface).
        config.alpn_protocols = vec![if spec.h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        Ok(BackendTls {
            spec,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            roots: trusted,
            client_cert,
        })
    }

    /// One line for `rampart check` and the log.
    pub fn describe(&self, now: i64) -> String {
        let trust = match &self.spec.trust {
            Trust::System => format!("verified against the system's {} CA certificates", self.roots),
            Trust::File(p) => format!("verified against {} ({} CA certificates)", p.display(), self.roots),
            Trust::None => "NOT verified (verify = false)".to_string(),
        };
        let name = match &self.spec.server_name {
            Some(n) => format!(" as {n}"),
            None => String::new(),
        };
        let cert = match &self.client_cert {
            Some(c) => format!(
                "; client certificate {}: {}",
                c.files.cert.display(),
                crate::tls::expiry_text(c.not_after, now)
            ),
            None => String::new(),
        };
        format!("TLS to backends, {trust}{name}{cert}")
    }
}

/// The name to verify backend `written` ("host:port", as in `backends`) against:
/// `server_name` when set, else its host. An IP address is verified against the
/// certificate's IP addresses, and sends no SNI.
pub fn server_name(written: &str, server_name: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = match server_name {
        Some(n) => n,
        None => {
            let host = written.rsplit_once(':').map_or(written, |(h, _)| h);
            host.trim_start_matches('[').trim_end_matches(']')
        }
    };
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a DNS name or IP address a certificate can be verified against"))
}

/// A PEM bundle of CA certificates (a pool's `ca`, a listener's `client_ca`).
pub fn load_roots_file(path: &Path) -> Result<RootCertStore, String> {
    crate::config::note_input(path);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {}", path.display(), crate::tls::pem_error(e)))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in the file", path.display()));
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{}: none of its {ignored} certificate(s) is a usable CA certificate",
            path.display()
        ));
    }
    Ok(roots)
}

fn load_system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let why = match found.errors.first() {
            Some(e) => format!(": {e}"),
            None => String::new(),
        };
        return Err(format!(
            "no CA certificates found in the system's trust store{why}; install ca-certificates, \
             or name a bundle with ca = \"FILE\""
        ));
    }
    Ok(roots)
}

/// Opens a connection to a backend: TCP, then the TLS handshake for a pool that has
/// one, both within `timeout` (as nginx's `proxy_connect_timeout` covers its SSL
/// handshake).
pub async fn connect(
    addr: SocketAddr,
    tls: Option<(&BackendTls, &ServerName<'static>)>,
    timeout: Duration,
) -> Result<UpIo, ProxyError> {
    let open = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ProxyError::Connect { backend: addr, source })?;
        // Small requests and responses must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        match tls {
            None => Ok(UpIo::Plain(stream)),
            Some((tls, name)) => match tls.connector.connect(name.clone(), stream).await {
                Ok(s) => Ok(UpIo::Tls(Box::new(s))),
                Err(source) => Err(ProxyError::BackendTls { backend: addr, source }),
            },
        }
    };
    tokio::time::timeout(timeout, open)
        .await
        .unwrap_or(Err(ProxyError::ConnectTimeout { backend: addr }))
}

/// The client certificate, offered whenever a backend asks for one.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `verify = false`: any certificate for any name, but the handshake must still be
/// signed by the certificate's key, so the connection is at least encrypted to
/// whoever holds it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_verified_is_the_backends_host_unless_server_name_is_set() {
        let dns = |s: &str| ServerName::try_from(s.to_string()).unwrap();
        assert_eq!(server_name("api.internal:8443", None).unwrap(), dns("api.internal"));
        assert_eq!(server_name("10.0.0.5:443", None).unwrap(), dns("10.0.0.5"));
        assert!(matches!(
            server_name("10.0.0.5:443", None).unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("[::1]:443", None).unwrap(),
            ServerName::IpAddress(_)
        ));
        assert_eq!(
            server_name("10.0.0.5:443", Some("api.example.com")).unwrap(),
            dns("api.example.com")
        );
        let e = server_name("not a name:443", None).unwrap_err();
        assert!(e.contains("\"not a name\""), "{e}");
    }
}
