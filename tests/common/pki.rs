//! A test PKI: a CA made fresh per test (rcgen), and certificates it signs,
//! written to a temporary directory (no committed key can expire).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A test CA and a directory to write certificates and keys into.
pub struct Pki {
    pub ca: rcgen::Certificate,
    ca_key: KeyPair,
    pub dir: PathBuf,
}

/// A certificate written to disk.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Pki {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rampart-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "rampart test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key, dir }
    }

    /// A certificate for `names` (DNS names or IP addresses; a name with `://` is a
    /// URI, as a SPIFFE ID), signed by the CA, written as `FILE.crt`/`FILE.key`.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        self.leaf_until(file, names, None)
    }

    /// The same, expiring at `not_after` (Unix seconds) if given.
    pub fn leaf_until(&self, file: &str, names: &[&str], not_after: Option<u64>) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let (uris, hosts): (Vec<&str>, Vec<&str>) = names.iter().partition(|n| n.contains("://"));
        let mut params = CertificateParams::new(hosts.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        if let Some(t) = not_after {
            params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(t);
        }
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
            der: cert.der().clone(),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }

    /// The CA certificate, written as `ca.pem`.
    pub fn ca_file(&self) -> PathBuf {
        let path = self.dir.join("ca.pem");
        std::fs::write(&path, self.ca.pem()).unwrap();
        path
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Leaf {
    /// A TLS server config serving this certificate; with `clients`, it requires a
    /// client certificate that CA signed.
    pub fn server_config(&self, clients: Option<&Pki>) -> rustls::ServerConfig {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match clients {
            Some(pki) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(pki.roots()), provider())
                    .build()
                    .unwrap(),
            ),
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::from_pem_file(&self.key).unwrap();
        builder.with_single_cert(vec![self.der.clone()], key).unwrap()
    }
}
