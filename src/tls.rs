//! TLS termination for listeners with a `[listeners.tls]` table: loading each
//! certificate chain and key (when the config is loaded, so `rampart check` and a
//! reload verify them, and a reload picks up renewed files), choosing a certificate
//! by the client's SNI from the DNS names the certificate itself covers (as HAProxy
//! does with `crt`), and the rustls server config: protocol versions, ALPN and
//! session resumption.
//!
//! The handshake itself runs in `listener::serve_tls`, under `client_header_timeout`.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::crypto::hash::HashAlgorithm;
use rustls::crypto::tls13::{Hkdf, HkdfUsingHmac};
use rustls::crypto::{CipherSuiteCommon, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedCipherSuite, Tls13CipherSuite};

/// The first byte of every TLS connection: a handshake record.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Oldest protocol version a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

impl MinVersion {
    pub fn parse(s: &str) -> Option<MinVersion> {
        match s {
            "1.2" => Some(MinVersion::Tls12),
            "1.3" => Some(MinVersion::Tls13),
            _ => None,
        }
    }

    /// The versions offered, newest first: listeners and backends alike.
    pub fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static FROM_1_2: [&rustls::SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];
        static FROM_1_3: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        match self {
            MinVersion::Tls12 => &FROM_1_2,
            MinVersion::Tls13 => &FROM_1_3,
        }
    }
}

/// One certificate as configured: the chain (leaf first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One loaded certificate, as the log, `check`, `/status` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    pub files: CertFiles,
    /// The DNS names its leaf covers (subjectAltName), lower-cased.
    pub names: Vec<String>,
    /// The leaf's notAfter, in Unix seconds (`None` if it could not be read).
    pub not_after: Option<i64>,
}

/// A listener's loaded TLS settings, ready to accept with.
pub struct TlsSettings {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// In the configured order (`is_default`).
    pub certificates: Vec<Certificate>,
    /// No default certificate: a client whose SNI no certificate covers (or that sends
    /// none) fails the handshake, as HAProxy's `strict-sni`.
    pub strict_sni: bool,
    /// Clients must present a certificate a CA in this file signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: a client may also present none (`client_verify =
    /// "optional"`); one it presents must still verify.
    pub client_optional: bool,
    /// Backends get the client's certificate in `X-Forwarded-Client-Cert`.
    pub forward_client_cert: bool,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("certificates", &self.certificates)
            .field("strict_sni", &self.strict_sni)
            .field("client_ca", &self.client_ca)
            .field("client_optional", &self.client_optional)
            .field("forward_client_cert", &self.forward_client_cert)
            .finish()
    }
}

/// aws-lc through rustls, with the TLS 1.3 key schedule's HKDF replaced by rustls's
/// own over aws-lc's HMAC (`HkdfUsingHmac`), which keys the HMAC once per secret.
/// aws-lc-rs's HKDF extracts the secret again on every expand and keys a fresh HMAC
/// each time: in a `perf` profile of resumed handshakes (wrk, `Connection: close`,
/// SHA-384 suite) SHA-512 blocks took 24% of rampart's CPU.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            for suite in &mut p.cipher_suites {
                if let SupportedCipherSuite::Tls13(t) = *suite {
                    let hkdf: &'static dyn Hkdf = match t.common.hash_provider.algorithm() {
                        HashAlgorithm::SHA256 => &HKDF_SHA256,
                        HashAlgorithm::SHA384 => &HKDF_SHA384,
                        _ => continue,
                    };
                    // Leaked once per process: cipher suites are `&'static`.
                    *suite = SupportedCipherSuite::Tls13(Box::leak(Box::new(Tls13CipherSuite {
                        common: CipherSuiteCommon {
                            suite: t.common.suite,
                            hash_provider: t.common.hash_provider,
                            confidentiality_limit: t.common.confidentiality_limit,
                        },
                        hkdf_provider: hkdf,
                        aead_alg: t.aead_alg,
                        quic: t.quic,
                    })));
                }
            }
            Arc::new(p)
        })
        .clone()
}

static HKDF_SHA256: HkdfUsingHmac<'static> = HkdfUsingHmac(&Hmac(aws_lc_rs::hmac::HMAC_SHA256));
static HKDF_SHA384: HkdfUsingHmac<'static> = HkdfUsingHmac(&Hmac(aws_lc_rs::hmac::HMAC_SHA384));

/// aws-lc's HMAC as rustls's `Hmac`.
struct Hmac(aws_lc_rs::hmac::Algorithm);

impl rustls::crypto::hmac::Hmac for Hmac {
    fn with_key(&self, key: &[u8]) -> Box<dyn rustls::crypto::hmac::Key> {
        Box::new(HmacKey(aws_lc_rs::hmac::Key::new(self.0, key)))
    }

    fn hash_output_len(&self) -> usize {
        self.0.digest_algorithm().output_len()
    }
}

/// A key set once: each tag starts from a copy of its keyed state.
struct HmacKey(aws_lc_rs::hmac::Key);

impl rustls::crypto::hmac::Key for HmacKey {
    fn sign_concat(&self, first: &[u8], middle: &[&[u8]], last: &[u8]) -> rustls::crypto::hmac::Tag {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.0);
        ctx.update(first);
        for m in middle {
            ctx.update(m);
        }
        ctx.update(last);
        rustls::crypto::hmac::Tag::new(ctx.sign().as_ref())
    }

    fn tag_len(&self) -> usize {
        self.0.algorithm().digest_algorithm().output_len()
    }
}

/// Reads one certificate chain and its key, checks that they belong together, and
/// returns them with what the leaf says of itself. Errors say which file and why.
pub fn load_certificate(files: CertFiles, provider: &CryptoProvider) -> Result<(CertifiedKey, Certificate), String> {
    crate::config::note_input(&files.cert);
    crate::config::note_input(&files.key);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {}", files.cert.display(), pem_error(e)))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in the file", files.cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| format!("{}: {}", files.key.display(), pem_error(e)))?;
    let names = match webpki::EndEntityCert::try_from(&chain[0]) {
        Ok(leaf) => leaf.valid_dns_names().map(|n| n.to_ascii_lowercase()).collect(),
        Err(e) => {
            return Err(format!(
                "{}: not a valid X.509 certificate: {e:?}",
                files.cert.display()
            ))
        }
    };
    let not_after = not_after(&chain[0]);
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{} does not belong to the certificate in {}",
            files.key.display(),
            files.cert.display()
        ),
        e => format!("{}: {e}", files.key.display()),
    })?;
    Ok((
        key,
        Certificate {
            files,
            names,
            not_after,
        },
    ))
}

pub fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => format!("cannot read: {e}"),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind in the file".to_string(),
        e => format!("invalid PEM: {e:?}"),
    }
}

/// Builds a listener's TLS settings from its certificates (the first one is the
/// default, unless `strict_sni`: for clients that send no SNI or a name no
/// certificate covers), and, with `client_ca` (its file and the CAs loaded from it),
/// a client certificate, required unless `client_optional`. Errors carry the index
/// of the certificate they are about.
pub fn settings(
    certificates: Vec<CertFiles>,
    min_version: MinVersion,
    http2: bool,
    strict_sni: bool,
    client_ca: Option<(PathBuf, rustls::RootCertStore)>,
    client_optional: bool,
    forward_client_cert: bool,
) -> Result<TlsSettings, Vec<(Option<usize>, String)>> {
    let provider = provider();
    let mut errors = Vec::new();
    let mut resolver = CertResolver {
        strict: strict_sni,
        ..CertResolver::default()
    };
    let mut loaded = Vec::new();
    for (i, files) in certificates.into_iter().enumerate() {
        match load_certificate(files, &provider) {
            Ok((key, cert)) => {
                if (i > 0 || strict_sni) && cert.names.is_empty() {
                    errors.push((
                        Some(i),
                        format!(
                            "{} names no DNS host (subjectAltName), so SNI can never choose it; {}",
                            cert.files.cert.display(),
                            if strict_sni {
                                "with strict_sni there is no default certificate either"
                            } else {
                                "only the first certificate serves clients by default"
                            }
                        ),
                    ));
                }
                resolver.add(Arc::new(key), &cert.names);
                loaded.push(cert);
            }
            Err(e) => errors.push((Some(i), e)),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(min_version.versions())
        .map_err(|e| vec![(None, e.to_string())])?;
    let (builder, client_ca) = match client_ca {
        None => (builder.with_no_client_auth(), None),
        Some((file, roots)) => {
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if client_optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| vec![(None, format!("client_ca {}: {e}", file.display()))])?;
            (builder.with_client_cert_verifier(verifier), Some(file))
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    // Stateless resumption (as nginx enables by default): the keys rotate every 6 h
    // and live in memory only, so a restart or reload costs one full handshake.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| vec![(None, e.to_string())])?;
    Ok(TlsSettings {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        certificates: loaded,
        strict_sni,
        client_ca,
        client_optional,
        forward_client_cert,
    })
}

impl TlsSettings {
    /// What clients must present, with `client_ca`: for `rampart check` and the log.
    pub fn describe_clients(&self) -> Option<String> {
        let ca = self.client_ca.as_ref()?;
        Some(if self.client_optional {
            format!(
                "clients may present a certificate; one presented must be signed by a CA in {}",
                ca.display()
            )
        } else {
            format!("clients must present a certificate signed by a CA in {}", ca.display())
        })
    }

    /// Whether certificate `i` also serves clients whose SNI no certificate covers:
    /// the first, unless `strict_sni`.
    pub fn is_default(&self, i: usize) -> bool {
        i == 0 && !self.strict_sni
    }

    /// One line per certificate, for `rampart check` and the log: its file, the names
    /// it serves, and when it expires (relative to `now`, Unix seconds).
    pub fn describe(&self, now: i64) -> Vec<String> {
        self.certificates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let names = if c.names.is_empty() {
                    "no DNS names".to_string()
                } else {
                    c.names.join(", ")
                };
                let default = if self.is_default(i) { ", the default" } else { "" };
                format!(
                    "{} ({names}{default}): {}",
                    c.files.cert.display(),
                    expiry_text(c.not_after, now)
                )
            })
            .collect()
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Within this long of expiry a certificate is warned about at start and reload.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

/// Where a certificate is used: served by a listener, or presented to a pool's
/// backends (`[pools.NAME.tls]`'s client certificate).
#[derive(Debug, Clone, Copy)]
pub enum CertUse<'a> {
    Listener(std::net::SocketAddr),
    Pool(&'a str),
}

impl CertUse<'_> {
    /// The label name and value for `/metrics`, the key and value for `/status`.
    pub fn label(&self) -> (&'static str, String) {
        match self {
            CertUse::Listener(a) => ("listener", a.to_string()),
            CertUse::Pool(p) => ("pool", p.to_string()),
        }
    }
}

/// Every certificate the config loaded, with where it is used and, for a
/// listener's, whether it is the default (`TlsSettings::is_default`).
pub fn certificates(config: &crate::config::Config) -> Vec<(CertUse<'_>, &Certificate, Option<bool>)> {
    let mut out = Vec::new();
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        for (i, c) in tls.certificates.iter().enumerate() {
            out.push((CertUse::Listener(l.bind), c, Some(tls.is_default(i))));
        }
    }
    for p in &config.pools {
        for c in p.tls.iter().flat_map(|t| &t.client_cert) {
            out.push((CertUse::Pool(&p.name), c, None));
        }
    }
    out
}

/// Logs the config's TLS as it takes effect: which certificate serves which names,
/// each pool's TLS to its backends, and a warning for any certificate expired or
/// within 14 days of it (Let's Encrypt renews at 30 days left, so a warning means
/// renewal has failed).
pub fn log_certificates(config: &crate::config::Config) {
    let now = unix_now();
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        if let Some(line) = tls.describe_clients() {
            tracing::info!(bind = %l.bind, "TLS {line}");
        }
        for (cert, line) in tls.certificates.iter().zip(tls.describe(now)) {
            if expires_soon(cert, now) {
                tracing::warn!(bind = %l.bind, "TLS certificate {line}: renew it and reload");
            } else {
                tracing::info!(bind = %l.bind, "TLS certificate {line}");
            }
        }
    }
    for p in &config.pools {
        let Some(tls) = &p.tls else { continue };
        let line = tls.describe(now);
        if tls.client_cert.as_ref().is_some_and(|c| expires_soon(c, now)) {
            tracing::warn!(pool = %p.name, "{line}: renew the client certificate and reload");
        } else {
            tracing::info!(pool = %p.name, "{line}");
        }
    }
}

fn expires_soon(cert: &Certificate, now: i64) -> bool {
    cert.not_after.is_some_and(|t| t - now <= EXPIRY_WARNING_SECS)
}

/// "expires 2027-03-01 (in 85 days)", or "EXPIRED on ... (12 days ago)".
pub fn expiry_text(not_after: Option<i64>, now: i64) -> String {
    let Some(t) = not_after else {
        return "expiry unreadable".to_string();
    };
    let date = httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64));
    let days = (t - now).div_euclid(86_400);
    if t <= now {
        format!("EXPIRED {date} ({} days ago)", -days)
    } else {
        format!("expires {date} (in {days} days)")
    }
}

/// The notAfter of an X.509 certificate, in Unix seconds: `Certificate` is a
/// SEQUENCE whose first element, `TBSCertificate`, holds an optional `[0]` version,
/// the serial, the signature algorithm, the issuer and then `validity` (RFC 5280
/// §4.1). webpki parses it but does not expose it.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    let (tag, validity, _) = der_element(tbs_from(cert, 3)?)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after) = der_element(validity)?; // notBefore
    let (tag, time, _) = der_element(after)?;
    let text = std::str::from_utf8(time).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        // UTCTime: YY, 1950-2049 (RFC 5280 §4.1.2.5.1).
        0x17 => {
            let yy: i64 = text.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |r: std::ops::Range<usize>| rest.get(r).and_then(|s| s.parse::<i64>().ok());
    let (month, day) = (field(0..2)?, field(2..4)?);
    let (hour, min, sec) = (field(4..6)?, field(6..8)?, field(8..10)?);
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

/// The `X-Forwarded-Client-Cert` value for a client's certificate, in Envoy's
/// format: `Hash=` the SHA-256 of its DER in hex, `Subject="..."` its subject as an
/// RFC 4514 string, and one `DNS=` per DNS name in its subjectAltName.
/// What a TLS connection negotiated, for the header rules' `$ssl_*` variables: made
/// once per connection.
#[derive(Debug)]
pub struct TlsFacts {
    /// `TLSv1.2` or `TLSv1.3`, as nginx's `$ssl_protocol`.
    pub protocol: &'static str,
    /// The suite's IANA name as rustls reports it (`TLS13_AES_128_GCM_SHA256`).
    pub cipher: &'static str,
    /// The SNI the client sent.
    pub server_name: Option<http::HeaderValue>,
    /// The client certificate's subject, RFC 4514 (nginx's `$ssl_client_s_dn`).
    pub client_subject: Option<http::HeaderValue>,
    /// `SUCCESS` when the client presented a certificate (it verified, or the
    /// handshake would have failed), else `NONE`, as nginx's `$ssl_client_verify`.
    pub client_verify: &'static str,
}

impl TlsFacts {
    pub fn of(conn: &rustls::ServerConnection) -> TlsFacts {
        let protocol = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "",
        };
        let cipher = conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("");
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        TlsFacts {
            protocol,
            cipher,
            server_name: conn.server_name().and_then(|n| http::HeaderValue::from_str(n).ok()),
            client_subject: leaf
                .and_then(|c| subject_dn(c))
                .and_then(|dn| http::HeaderValue::from_str(&dn).ok()),
            client_verify: if leaf.is_some() { "SUCCESS" } else { "NONE" },
        }
    }
}

pub fn client_cert_field(leaf: &CertificateDer<'_>) -> Option<http::HeaderValue> {
    use std::fmt::Write;
    let mut out = String::with_capacity(160);
    out.push_str("Hash=");
    for b in aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf).as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    if let Some(dn) = subject_dn(leaf) {
        // RFC 4514 has escaped `"` and `\` already, so the quotes hold.
        let _ = write!(out, ";Subject=\"{dn}\"");
    }
    for uri in uri_sans(leaf) {
        // Quoted when it holds a separator, as Envoy does; one that cannot be quoted
        // safely is left out.
        if uri.bytes().any(|b| matches!(b, b',' | b';' | b'=')) {
            let _ = write!(out, ";URI=\"{uri}\"");
        } else {
            let _ = write!(out, ";URI={uri}");
        }
    }
    if let Ok(ee) = webpki::EndEntityCert::try_from(leaf) {
        for name in ee.valid_dns_names() {
            let _ = write!(out, ";DNS={name}");
        }
    }
    http::HeaderValue::from_str(&out).ok()
}

/// The URIs among a certificate's subject alternative names (SPIFFE IDs in a mesh),
/// those of printable ASCII without `"` or `\`. webpki checks them but does not
/// expose them.
pub fn uri_sans(cert: &[u8]) -> Vec<&str> {
    const SAN: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17
    let mut out = Vec::new();
    // After the subject's public key: the optional unique IDs, then [3] extensions.
    let Some(mut rest) = tbs_from(cert, 6) else {
        return out;
    };
    while let Some((tag, body, next)) = der_element(rest) {
        rest = next;
        if tag != 0xa3 {
            continue;
        }
        let Some((_, mut exts, _)) = der_element(body) else {
            return out;
        };
        while let Some((_, ext, next)) = der_element(exts) {
            exts = next;
            let Some((0x06, oid, mut fields)) = der_element(ext) else {
                continue;
            };
            if oid != SAN {
                continue;
            }
            // `critical` (a BOOLEAN) may come first; then the OCTET STRING.
            while let Some((tag, value, more)) = der_element(fields) {
                fields = more;
                if tag != 0x04 {
                    continue;
                }
                let Some((_, mut names, _)) = der_element(value) else {
                    break;
                };
                while let Some((tag, name, more)) = der_element(names) {
                    names = more;
                    // [6] uniformResourceIdentifier, IMPLICIT IA5String.
                    if tag == 0x86 && name.iter().all(|&b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
                        if let Ok(uri) = std::str::from_utf8(name) {
                            out.push(uri);
                        }
                    }
                }
            }
        }
    }
    out
}

/// A certificate's subject as an RFC 4514 string (`CN=a,O=Example\, Inc.,C=NZ`: the
/// last RDN first), in ASCII: other bytes are written as `\XX`.
pub fn subject_dn(cert: &[u8]) -> Option<String> {
    let (tag, mut name, _) = der_element(tbs_from(cert, 4)?)?;
    if tag != 0x30 {
        return None;
    }
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (tag, mut set, rest) = der_element(name)?;
        name = rest;
        if tag != 0x31 {
            return None;
        }
        let mut atvs = Vec::new();
        while !set.is_empty() {
            let (_, atv, rest) = der_element(set)?;
            set = rest;
            let (tag, oid, value) = der_element(atv)?;
            if tag != 0x06 {
                return None;
            }
            let (tag, text, after) = der_element(value)?;
            let value = match tag {
                // UTF8String, PrintableString, TeletexString, IA5String.
                0x0c | 0x13 | 0x14 | 0x16 => escape_dn_value(text),
                // Anything else as `#` and its DER, hex (RFC 4514 §2.4).
                _ => {
                    let der = &value[..value.len() - after.len()];
                    der.iter().fold("#".to_string(), |mut s, b| {
                        s.push_str(&format!("{b:02x}"));
                        s
                    })
                }
            };
            atvs.push(format!("{}={value}", attribute_name(oid)));
        }
        rdns.push(atvs.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// RFC 4514's short name for an attribute type, or its OID in dotted decimal.
fn attribute_name(oid: &[u8]) -> String {
    const DC: &[u8] = &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19];
    const UID: &[u8] = &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01];
    let short = match oid {
        [0x55, 0x04, 0x03] => "CN",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x09] => "STREET",
        [0x55, 0x04, 0x0a] => "O",
        [0x55, 0x04, 0x0b] => "OU",
        o if o == DC => "DC",
        o if o == UID => "UID",
        _ => "",
    };
    if !short.is_empty() {
        return short.to_string();
    }
    let mut parts = Vec::new();
    let mut n: u64 = 0;
    for (i, &b) in oid.iter().enumerate() {
        n = (n << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (n / 40).min(2);
                parts.push(first.to_string());
                parts.push((n - first * 40).to_string());
            } else {
                parts.push(n.to_string());
            }
            n = 0;
        } else if i + 1 == oid.len() {
            break;
        }
    }
    parts.join(".")
}

/// An attribute value escaped as RFC 4514 §2.4 asks, and kept to printable ASCII.
fn escape_dn_value(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, &b) in text.iter().enumerate() {
        let edge = (i == 0 && (b == b' ' || b == b'#')) || (i + 1 == text.len() && b == b' ');
        match b {
            b'"' | b'+' | b',' | b';' | b'<' | b'>' | b'\\' | b'=' => {
                out.push('\\');
                out.push(b as char);
            }
            _ if edge => {
                out.push('\\');
                out.push(b as char);
            }
            0x21..=0x7e | b' ' => out.push(b as char),
            _ => out.push_str(&format!("\\{b:02X}")),
        }
    }
    out
}

/// A DER certificate's `TBSCertificate` from its field `n` on, counted from the
/// serial (RFC 5280 §4.1: serial, signature, issuer, validity, subject, ...), past the
/// optional `[0]` version.
fn tbs_from(cert: &[u8], n: usize) -> Option<&[u8]> {
    let (_, cert_body, _) = der_element(cert)?;
    let (_, mut tbs, _) = der_element(cert_body)?;
    let (tag, _, rest) = der_element(tbs)?;
    if tag == 0xa0 {
        tbs = rest; // the explicit version
    }
    for _ in 0..n {
        tbs = der_element(tbs)?.2;
    }
    Some(tbs)
}

/// One DER element of `input`: its tag, its contents, and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Chooses a certificate by SNI: an exact name first, then a wildcard one level up
/// (`*.example.com` covers `a.example.com`, not `example.com` or `a.b.example.com`),
/// then the first certificate (none with `strict`). Where two certificates cover a
/// name, the first wins.
#[derive(Debug, Default)]
struct CertResolver {
    strict: bool,
    keys: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, usize>,
}

impl CertResolver {
    fn add(&mut self, key: Arc<CertifiedKey>, names: &[String]) {
        let i = self.keys.len();
        self.keys.push(key);
        for name in names {
            match name.strip_prefix("*.") {
                Some(parent) => self.wildcard.entry(parent.to_string()).or_insert(i),
                None => self.exact.entry(name.clone()).or_insert(i),
            };
        }
    }

    fn pick(&self, sni: Option<&str>) -> Option<usize> {
        let fallback = (!self.strict).then_some(0);
        let Some(name) = sni else { return fallback };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(&i) = self.exact.get(&name) {
            return Some(i);
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent).copied())
            .or(fallback)
    }
}

impl ResolvesServerCert for CertResolver {
    /// `None` fails the handshake (a `handshake_failure` alert).
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name()).and_then(|i| self.keys.get(i)).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(names: &[&[&str]]) -> CertResolver {
        let mut r = CertResolver::default();
        for (i, ns) in names.iter().enumerate() {
            let owned: Vec<String> = ns.iter().map(|s| s.to_string()).collect();
            r.add(Arc::new(CertifiedKey::new(vec![], Arc::new(NoKey))), &owned);
            assert_eq!(r.keys.len(), i + 1);
        }
        r
    }

    #[derive(Debug)]
    struct NoKey;
    impl rustls::sign::SigningKey for NoKey {
        fn choose_scheme(&self, _: &[rustls::SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
            None
        }
        fn algorithm(&self) -> rustls::SignatureAlgorithm {
            rustls::SignatureAlgorithm::ED25519
        }
    }

    #[test]
    fn the_subject_is_an_escaped_rfc_4514_string_last_rdn_first() {
        use rcgen::DnType;
        let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string(), "b.test".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CountryName, "NZ");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example, Inc.");
        params.distinguished_name.push(DnType::CommonName, "#1 \"Müller\"+co ");
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 5]), "SN-7");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_dn(cert.der()).unwrap(),
            r#"2.5.4.5=SN-7,CN=\#1 \"M\C3\BCller\"\+co\ ,O=Example\, Inc.,C=NZ"#
        );
        let field = client_cert_field(cert.der()).unwrap();
        let field = field.to_str().unwrap();
        assert!(
            field.starts_with("Hash=") && field[5..].find(';') == Some(64),
            "{field}"
        );
        assert!(field.ends_with(";DNS=a.test;DNS=b.test"), "{field}");
    }

    #[test]
    fn not_after_reads_utc_and_generalized_times() {
        for (y, m, d, want) in [
            (2049, 12, 31, 2_524_521_600 + 3723),
            (2050, 1, 1, 2_524_608_000 + 3723),
            (2027, 3, 1, 1_803_859_200 + 3723),
            (1999, 2, 28, 920_160_000 + 3723),
        ] {
            let mut params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
            params.not_after = rcgen::date_time_ymd(y, m, d) + std::time::Duration::from_secs(3723);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(not_after(cert.der()), Some(want), "{y}-{m}-{d}");
        }
        assert_eq!(not_after(b"not a certificate"), None);
        assert_eq!(not_after(&[0x30, 0x82, 0xff]), None, "a length past the end");
    }

    #[test]
    fn expiry_text_says_how_long_is_left() {
        let t = 1_803_859_200; // 2027-03-01
        assert_eq!(
            expiry_text(Some(t), t - 85 * 86_400),
            "expires Mon, 01 Mar 2027 00:00:00 GMT (in 85 days)"
        );
        assert_eq!(
            expiry_text(Some(t), t + 12 * 86_400),
            "EXPIRED Mon, 01 Mar 2027 00:00:00 GMT (12 days ago)"
        );
        assert_eq!(expiry_text(None, t), "expiry unreadable");
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first_certificate() {
        let mut r = resolver(&[&["default.test"], &["a.test", "*.b.test"], &["x.b.test", "a.test"]]);
        assert_eq!(r.pick(None), Some(0));
        assert_eq!(r.pick(Some("nothing.test")), Some(0));
        assert_eq!(r.pick(Some("a.test")), Some(1), "the first certificate naming it wins");
        assert_eq!(
            r.pick(Some("A.Test.")),
            Some(1),
            "case and a trailing dot do not matter"
        );
        assert_eq!(r.pick(Some("y.b.test")), Some(1));
        assert_eq!(r.pick(Some("x.b.test")), Some(2), "an exact name beats a wildcard");
        assert_eq!(r.pick(Some("b.test")), Some(0), "a wildcard does not cover its parent");
        assert_eq!(r.pick(Some("z.y.b.test")), Some(0), "a wildcard covers one level only");
        // strict_sni: no default.
        r.strict = true;
        assert_eq!(r.pick(None), None);
        assert_eq!(r.pick(Some("nothing.test")), None);
        assert_eq!(r.pick(Some("b.test")), None);
        assert_eq!(r.pick(Some("default.test")), Some(0));
        assert_eq!(r.pick(Some("y.b.test")), Some(1));
    }
}
