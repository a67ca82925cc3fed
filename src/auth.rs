//! Who may pass a route. `basic_auth`: HTTP Basic authentication, as nginx's
//! `auth_basic`, HAProxy's `http_auth` and Traefik's `basicAuth`: the user file
//! (htpasswd, as Apache's `htpasswd` and `openssl passwd` write it), the check of a
//! request's `Authorization`, and a per-worker cache of credentials already checked,
//! so a slow password hash (bcrypt) is computed once per client and worker, not per
//! request. `forward_auth`: the request is first put to an auth service (Traefik's
//! ForwardAuth, nginx's `auth_request`, Envoy's HTTP `ext_authz`), whose 2xx lets it
//! pass and whose other answers go to the client.
//!
//! Hashes understood: bcrypt (`$2y$`, `$2b$`, `$2a$`), SHA-crypt (`$5$`, `$6$`),
//! MD5-crypt (`$apr1$`, htpasswd's default, and `$1$`), `{SHA}`, `{SSHA}` and
//! `{PLAIN}`. DES crypt is refused: it reads only a password's first 8 bytes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::cell::Cell;
use std::rc::Rc;

use aws_lc_rs::digest;
use base64::Engine as _;
use http::{header, HeaderName, HeaderValue, Method};

use crate::codec::UpHead;
use crate::config::ForwardAuth;
use crate::error::ProxyError;
use crate::forward::Forwarded;
use crate::state::Snapshot;
use crate::worker::WorkerCtx;

/// The stored hash of one user's password.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stored {
    Bcrypt(String),
    ShaCrypt(String),
    /// `$apr1$` (`apr1` true) or `$1$`: the salt and the 22-character digest.
    Md5Crypt {
        apr1: bool,
        salt: Vec<u8>,
        digest: Vec<u8>,
    },
    Sha1([u8; 20]),
    /// `{SSHA}`: SHA-1 of the password then the salt.
    SaltedSha1 {
        digest: [u8; 20],
        salt: Vec<u8>,
    },
    Plain(Vec<u8>),
}

/// A route's `basic_auth`: its realm and the users of its file, read at load.
#[derive(Debug)]
pub struct BasicAuth {
    /// The file as the config names it, for messages.
    pub file: PathBuf,
    /// `WWW-Authenticate` for a 401: `Basic realm="...", charset="UTF-8"`.
    pub challenge: HeaderValue,
    users: HashMap<Box<[u8]>, Stored>,
    /// Unique per load, so a reload (a changed file) never hits an older check.
    id: u64,
}

/// Two loads are the same when they say the same (the cache key aside).
impl PartialEq for BasicAuth {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file && self.challenge == other.challenge && self.users == other.users
    }
}

static LOADS: AtomicU64 = AtomicU64::new(1);

/// Credentials checked on this worker: a SHA-256 of the load's id and the
/// `Authorization` value (the password itself is never kept), to the verdict.
/// Failures are kept too, so a client that retries a wrong password costs one hash.
const CACHE_ENTRIES: usize = 4096;

thread_local! {
    static CHECKED: RefCell<HashMap<[u8; 32], bool>> = RefCell::new(HashMap::new());
}

impl BasicAuth {
    /// Reads the user file `full` (shown as `shown` in messages); each problem is a
    /// line of the file, by number, never the hash itself.
    pub fn load(realm: &str, full: &Path, shown: &Path) -> Result<BasicAuth, Vec<String>> {
        crate::config::note_input(full);
        let text = std::fs::read(full).map_err(|e| vec![format!("cannot read {}: {e}", full.display())])?;
        let mut users: HashMap<Box<[u8]>, Stored> = HashMap::new();
        let mut first_line: HashMap<Box<[u8]>, usize> = HashMap::new();
        let mut problems = Vec::new();
        for (n, line) in text.split(|&b| b == b'\n').enumerate() {
            let n = n + 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() || line.starts_with(b"#") {
                continue;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                problems.push(format!("{} line {n}: expected user:hash", shown.display()));
                continue;
            };
            let (user, rest) = (&line[..colon], &line[colon + 1..]);
            // As nginx reads it: the hash ends at the next ':' (a comment may follow).
            let hash = rest.split(|&b| b == b':').next().unwrap_or(rest);
            if user.is_empty() {
                problems.push(format!("{} line {n}: empty user name", shown.display()));
                continue;
            }
            match parse_hash(hash) {
                Ok(stored) => {
                    if let Some(first) = first_line.get(user) {
                        problems.push(format!(
                            "{} line {n}: user {:?} is already on line {first}",
                            shown.display(),
                            String::from_utf8_lossy(user)
                        ));
                        continue;
                    }
                    first_line.insert(user.into(), n);
                    users.insert(user.into(), stored);
                }
                Err(why) => problems.push(format!(
                    "{} line {n} (user {:?}): {why}",
                    shown.display(),
                    String::from_utf8_lossy(user)
                )),
            }
        }
        if users.is_empty() && problems.is_empty() {
            problems.push(format!(
                "{} holds no users, so every request would be refused",
                shown.display()
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let challenge = HeaderValue::from_str(&format!(
            "Basic realm=\"{}\", charset=\"UTF-8\"",
            realm.replace('\\', "\\\\").replace('"', "\\\"")
        ))
        .map_err(|_| vec![format!("realm {realm:?} cannot go in a header field")])?;
        Ok(BasicAuth {
            file: shown.to_path_buf(),
            challenge,
            users,
            id: LOADS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Whether the request's `Authorization` values name a user of the file with the
    /// right password. Exactly one value is read; two are refused.
    pub fn admits<'a>(&self, mut values: impl Iterator<Item = &'a [u8]>) -> bool {
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        let mut key_input = digest::Context::new(&digest::SHA256);
        key_input.update(&self.id.to_le_bytes());
        key_input.update(value);
        let mut key = [0u8; 32];
        key.copy_from_slice(key_input.finish().as_ref());
        if let Some(known) = CHECKED.with(|c| c.borrow().get(&key).copied()) {
            return known;
        }
        let verdict = self.verify(value);
        CHECKED.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= CACHE_ENTRIES {
                c.clear();
            }
            c.insert(key, verdict);
        });
        verdict
    }

    fn verify(&self, value: &[u8]) -> bool {
        let Some((user, password)) = credentials(value) else {
            return false;
        };
        match self.users.get(user.as_slice()) {
            Some(stored) => password_matches(stored, &password),
            None => false,
        }
    }
}

/// The user and password of a `Basic` `Authorization` value (RFC 7617): the scheme
/// in any case, then base64 of `user:password`.
fn credentials(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let space = value.iter().position(|&b| b == b' ')?;
    if !value[..space].eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let token = value[space..].trim_ascii();
    let decoded = base64::engine::general_purpose::STANDARD.decode(token).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// The user named by a `Basic` `Authorization` value, checked or not: nginx's
/// `$remote_user`, for the access log.
pub fn user_of(value: &[u8]) -> Option<Vec<u8>> {
    credentials(value).map(|(user, _)| user)
}

fn parse_hash(hash: &[u8]) -> Result<Stored, String> {
    let Ok(text) = std::str::from_utf8(hash) else {
        return Err("the hash is not text".into());
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    if text.starts_with("$2y$") || text.starts_with("$2b$") || text.starts_with("$2a$") {
        let parts: bcrypt::HashParts = text.parse().map_err(|e| format!("not a valid bcrypt hash: {e}"))?;
        // A check runs on the worker's thread, as nginx's does: at cost 13 that is
        // about 0.4 s (51 ms at 10 on the bench machine), every connection of the
        // worker waiting.
        if parts.get_cost() > 12 {
            return Err(format!(
                "bcrypt cost {} would hold a worker for 0.4 s or more a check (each step doubles it); \
                 rehash with `htpasswd -B -C 10` or less",
                parts.get_cost()
            ));
        }
        return Ok(Stored::Bcrypt(text.to_string()));
    }
    if text.starts_with("$5$") || text.starts_with("$6$") {
        return sha_crypt_shape(text).map(|()| Stored::ShaCrypt(text.to_string()));
    }
    for (magic, apr1) in [("$apr1$", true), ("$1$", false)] {
        if let Some(rest) = text.strip_prefix(magic) {
            let Some((salt, digest)) = rest.split_once('$') else {
                return Err(format!("a {magic} hash needs {magic}salt$digest"));
            };
            if salt.len() > 8 || digest.len() != 22 || !digest.bytes().all(is_crypt64) {
                return Err(format!("not a valid {magic} hash"));
            }
            return Ok(Stored::Md5Crypt {
                apr1,
                salt: salt.as_bytes().to_vec(),
                digest: digest.as_bytes().to_vec(),
            });
        }
    }
    if let Some(rest) = text.strip_prefix("{SHA}") {
        let bytes = b64
            .decode(rest)
            .map_err(|_| "a {SHA} hash must be base64".to_string())?;
        let digest: [u8; 20] = bytes
            .try_into()
            .map_err(|_| "a {SHA} hash must be 20 bytes of SHA-1".to_string())?;
        return Ok(Stored::Sha1(digest));
    }
    if let Some(rest) = text.strip_prefix("{SSHA}") {
        let bytes = b64
            .decode(rest)
            .map_err(|_| "a {SSHA} hash must be base64".to_string())?;
        if bytes.len() <= 20 {
            return Err("a {SSHA} hash must be SHA-1 then a salt".into());
        }
        let mut digest = [0u8; 20];
        digest.copy_from_slice(&bytes[..20]);
        return Ok(Stored::SaltedSha1 {
            digest,
            salt: bytes[20..].to_vec(),
        });
    }
    if let Some(rest) = text.strip_prefix("{PLAIN}") {
        return Ok(Stored::Plain(rest.as_bytes().to_vec()));
    }
    if text.len() == 13 && text.bytes().all(is_crypt64) {
        return Err("DES crypt (htpasswd -d) reads only 8 bytes of a password; use bcrypt (htpasswd -B)".into());
    }
    Err("unknown hash format; use bcrypt (htpasswd -B), $apr1$, $5$, $6$, {SHA} or {SSHA}".into())
}

/// `$5$[rounds=N$]salt$digest`, with a digest of the right length.
fn sha_crypt_shape(text: &str) -> Result<(), String> {
    let want = if text.starts_with("$5$") { 43 } else { 86 };
    let mut fields = text[3..].split('$').collect::<Vec<_>>();
    if fields.first().is_some_and(|f| f.starts_with("rounds=")) {
        let rounds = fields.remove(0)["rounds=".len()..].parse::<u32>().ok();
        if !rounds.is_some_and(|r| (1000..=999_999_999).contains(&r)) {
            return Err("SHA-crypt rounds must be between 1000 and 999999999".into());
        }
    }
    match fields.as_slice() {
        [salt, digest] if salt.len() <= 16 && digest.len() == want && digest.bytes().all(is_crypt64) => Ok(()),
        _ => Err(format!("not a valid {} hash", &text[..3])),
    }
}

fn is_crypt64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'/'
}

fn password_matches(stored: &Stored, password: &[u8]) -> bool {
    use sha_crypt::PasswordVerifier as _;
    match stored {
        Stored::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
        Stored::ShaCrypt(hash) => sha_crypt::ShaCrypt::default()
            .verify_password(password, hash.as_str())
            .is_ok(),
        Stored::Md5Crypt { apr1, salt, digest } => {
            let magic: &[u8] = if *apr1 { b"$apr1$" } else { b"$1$" };
            same(&md5_crypt(password, magic, salt), digest)
        }
        Stored::Sha1(want) => same(
            digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, password).as_ref(),
            want,
        ),
        Stored::SaltedSha1 { digest: want, salt } => {
            let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
            ctx.update(password);
            ctx.update(salt);
            same(ctx.finish().as_ref(), want)
        }
        Stored::Plain(want) => same(password, want),
    }
}

/// Compared in constant time, so the time taken says nothing of how much matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    #[allow(deprecated)]
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// MD5-crypt (Poul-Henning Kamp's, as FreeBSD and glibc compute `$1$`); Apache's
/// `$apr1$` is the same with its own magic. Returns the 22-character digest.
fn md5_crypt(password: &[u8], magic: &[u8], salt: &[u8]) -> Vec<u8> {
    use md5::{Digest, Md5};
    let salt = &salt[..salt.len().min(8)];
    let alternate = Md5::new()
        .chain_update(password)
        .chain_update(salt)
        .chain_update(password)
        .finalize();
    let mut ctx = Md5::new().chain_update(password).chain_update(magic).chain_update(salt);
    let mut left = password.len();
    while left > 0 {
        let n = left.min(16);
        ctx.update(&alternate[..n]);
        left -= n;
    }
    let mut bits = password.len();
    while bits != 0 {
        if bits & 1 == 1 {
            ctx.update([0u8]);
        } else {
            ctx.update(&password[..1]);
        }
        bits >>= 1;
    }
    let mut fin = ctx.finalize();
    for i in 0..1000 {
        let mut round = Md5::new();
        if i & 1 == 1 {
            round.update(password);
        } else {
            round.update(fin);
        }
        if i % 3 != 0 {
            round.update(salt);
        }
        if i % 7 != 0 {
            round.update(password);
        }
        if i & 1 == 1 {
            round.update(fin);
        } else {
            round.update(password);
        }
        fin = round.finalize();
    }
    const ITOA64: &[u8; 64] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let f = |i: usize| u32::from(fin[i]);
    let mut out = Vec::with_capacity(22);
    let mut put = |mut v: u32, n: usize| {
        for _ in 0..n {
            out.push(ITOA64[(v & 0x3f) as usize]);
            v >>= 6;
        }
    };
    for (a, b, c) in [(0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)] {
        put((f(a) << 16) | (f(b) << 8) | f(c), 4);
    }
    put(f(11), 2);
    out
}

// ---- forward auth -----------------------------------------------------------------

/// The request a route's `forward_auth` pool is asked: `GET path`, with the client's
/// fields (its cookies, its `Authorization`) and those rampart adds to every request
/// (`X-Forwarded-For`, `-Proto`, `-Host`, `x-request-id`), plus `X-Forwarded-Method`
/// and `X-Forwarded-Uri`: the method and target the client asked for, under
/// Traefik's names. No body goes.
pub fn forward_auth_head(fa: &ForwardAuth, head: &UpHead, target: &str) -> UpHead {
    let mut auth = UpHead {
        method: Method::GET,
        uri: http::Uri::from(fa.path.clone()),
        // Its answer's fields are read here, or go to a client as a map.
        raw_response: false,
        ..head.clone()
    };
    auth.added.upgrade = false;
    auth.fields_to_map();
    for name in [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::EXPECT,
        header::CONNECTION,
        header::UPGRADE,
    ] {
        auth.headers.remove(name);
    }
    auth.headers.insert(
        HeaderName::from_static("x-forwarded-method"),
        HeaderValue::from_str(head.method.as_str()).unwrap_or(HeaderValue::from_static("GET")),
    );
    if let Ok(v) = HeaderValue::from_str(target) {
        auth.headers.insert(HeaderName::from_static("x-forwarded-uri"), v);
    }
    auth
}

/// What the auth pool said.
pub enum Verdict {
    /// A 2xx: the request goes on.
    Pass(Box<Passed>),
    /// Anything else (401, a redirect to a sign-in page, 403, 5xx): the client gets
    /// it, from this pool.
    Answer(usize, Box<Forwarded>),
}

/// What a 2xx from the auth pool hands on.
pub struct Passed {
    /// The answer's fields the route names, for the backend (`None`: the answer had
    /// none, so the client's own is removed, which it could have forged).
    pub fields: Vec<(HeaderName, Option<HeaderValue>)>,
    /// The answer's `Set-Cookie` fields for the cookies the route names, for the
    /// client: a session the auth service refreshed.
    pub cookies: Vec<HeaderValue>,
}

/// Asks the auth pool of the route `route` about a request, through the pool's own
/// retries, hedging and breakers. A pool that cannot answer (every backend down, a
/// timeout) fails the request as any pool would; the error names that pool.
pub async fn forward_auth(
    ctx: &Rc<WorkerCtx>,
    snap: &Snapshot,
    route: Option<usize>,
    head: Rc<UpHead>,
    tries: &Cell<u8>,
) -> Result<Verdict, (Option<usize>, ProxyError)> {
    let Some(fa) = route.and_then(|i| snap.routes[i].forward_auth.as_deref()) else {
        return Err((None, ProxyError::NoRoute));
    };
    let pool = &snap.pools[fa.pool];
    let req = crate::upstream::UpRequest {
        head,
        body: crate::body::ReqBody::empty(),
    };
    let answer = crate::forward::forward(
        ctx,
        pool,
        req,
        None,
        None,
        crate::forward::TryPolicy::of(&pool.config),
        tries,
    )
    .await
    .map_err(|e| (Some(fa.pool), e))?;
    if !answer.response.status().is_success() {
        return Ok(Verdict::Answer(fa.pool, Box::new(answer)));
    }
    let headers = answer.response.headers();
    let fields = fa
        .response_headers
        .iter()
        .map(|name| (name.clone(), headers.get(name).cloned()))
        .collect();
    let cookies = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| fa.response_cookies.iter().any(|n| sets_cookie(v.as_bytes(), n)))
        .cloned()
        .collect();
    Ok(Verdict::Pass(Box::new(Passed { fields, cookies })))
}

/// Whether a `Set-Cookie` value sets the cookie `name` (`name=...`, the name as
/// written, spaces around it allowed).
fn sets_cookie(value: &[u8], name: &str) -> bool {
    let pair = value.split(|&b| b == b';').next().unwrap_or_default();
    match pair.iter().position(|&b| b == b'=') {
        Some(eq) => pair[..eq].trim_ascii() == name.as_bytes(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_cookie_values_are_told_apart_by_name() {
        assert!(sets_cookie(b"_oauth2_proxy=abc; Path=/; HttpOnly", "_oauth2_proxy"));
        assert!(sets_cookie(b" _oauth2_proxy =abc", "_oauth2_proxy"));
        assert!(!sets_cookie(b"_oauth2_proxy_csrf=x; Path=/", "_oauth2_proxy"));
        assert!(!sets_cookie(b"other=x; _oauth2_proxy=y", "_oauth2_proxy"));
        assert!(!sets_cookie(b"no-equals-sign", "no-equals-sign"));
    }

    fn file(lines: &str) -> Result<BasicAuth, Vec<String>> {
        static FILES: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "rampart-auth-{}-{}",
            std::process::id(),
            FILES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, lines).unwrap();
        let loaded = BasicAuth::load("Admin", &path, Path::new("users"));
        std::fs::remove_file(&path).unwrap();
        loaded
    }

    fn basic(user_pass: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_pass)).into_bytes()
    }

    fn admits(auth: &BasicAuth, user_pass: &str) -> bool {
        auth.verify(&basic(user_pass))
    }

    #[test]
    fn md5_crypt_matches_openssl() {
        // `openssl passwd -apr1 -salt RandSalt password`, `-1 -salt saltsalt 's3cret:x'`,
        // `-apr1 -salt a ''`.
        assert_eq!(
            md5_crypt(b"password", b"$apr1$", b"RandSalt"),
            b"PgCXHRrkpSt4cbyC2C6bm/"
        );
        assert_eq!(md5_crypt(b"s3cret:x", b"$1$", b"saltsalt"), b"17ka7OFDkoYNYoS9MLK8n.");
        assert_eq!(md5_crypt(b"", b"$apr1$", b"a"), b"lsAcX0kKaMIVmrCtUuk5b0");
    }

    #[test]
    fn every_hash_format_checks_its_password() {
        let bcrypt_hash = bcrypt::hash("hunter2", 4).unwrap();
        let auth = file(&format!(
            "# users\r\n\
             apr:$apr1$RandSalt$PgCXHRrkpSt4cbyC2C6bm/\n\
             md5:$1$saltsalt$17ka7OFDkoYNYoS9MLK8n.:a comment\n\
             s256:$5$abcdefgh$XEPmEiAJvPG31m/DaIsyckkv.Sxd.8NrmElXxCKFQr/\n\
             s512:$6$rounds=1000$abcd$HPLbVagy3S7TEVU6Il387VFts/bfNwoGiacTXtRqgResqvTOwwAwe4UN9a8vMozpv34lRn.3NOrO5Jr0zD8my0\n\
             sha:{{SHA}}87u9ZqY9S/F0eUBXjsPQEDUw4h0=\n\
             plain:{{PLAIN}}hunter2\n\
             bc:{bcrypt_hash}\n\
             \n"
        ))
        .unwrap();
        assert!(admits(&auth, "apr:password"));
        assert!(!admits(&auth, "apr:Password"));
        assert!(admits(&auth, "md5:s3cret:x"), "the password may hold ':'");
        assert!(admits(&auth, "s256:hunter2"));
        assert!(!admits(&auth, "s256:hunter3"));
        assert!(admits(&auth, "s512:hunter2"));
        assert!(admits(&auth, "sha:hunter2"));
        assert!(!admits(&auth, "sha:hunter"));
        assert!(admits(&auth, "plain:hunter2"));
        assert!(admits(&auth, "bc:hunter2"));
        assert!(!admits(&auth, "bc:hunter22"));
        assert!(!admits(&auth, "nobody:hunter2"));
        assert!(!admits(&auth, "sha"), "no colon: no password");
        assert!(auth.verify(b"bAsIc  c2hhOmh1bnRlcjI="), "the scheme in any case");
        assert!(!auth.verify(b"Bearer c2hhOmh1bnRlcjI="));
        assert!(!auth.verify(b"Basic !!!"));
    }

    #[test]
    fn a_bad_file_names_each_line() {
        let errs = file("ok:{PLAIN}x\nnocolon\n:{PLAIN}x\nbad:$apr1$salt\ndes:abJnggxhB/yWI\nok:{PLAIN}y\nweird:zzz\n")
            .unwrap_err();
        let want = [
            "users line 2: expected user:hash",
            "users line 3: empty user name",
            "users line 4 (user \"bad\"): a $apr1$ hash needs $apr1$salt$digest",
            "users line 5 (user \"des\"): DES crypt",
            "users line 6: user \"ok\" is already on line 1",
            "users line 7 (user \"weird\"): unknown hash format",
        ];
        assert_eq!(errs.len(), want.len(), "{errs:?}");
        for (e, w) in errs.iter().zip(want) {
            assert!(e.starts_with(w), "{e:?} should start with {w:?}");
        }
        assert!(file("# nobody\n").unwrap_err()[0].contains("holds no users"));
        let slow = bcrypt::hash("x", 4).unwrap().replacen("$04$", "$15$", 1);
        assert!(file(&format!("u:{slow}\n")).unwrap_err()[0].contains("bcrypt cost 15"));
    }

    #[test]
    fn checks_are_cached_per_load() {
        let auth = file("u:{PLAIN}pw\n").unwrap();
        let good = basic("u:pw");
        assert!(auth.admits([good.as_slice()].into_iter()));
        assert!(!auth.admits([basic("u:nope").as_slice()].into_iter()));
        assert!(
            !auth.admits([good.as_slice(), good.as_slice()].into_iter()),
            "two Authorization fields"
        );
        assert!(!auth.admits(std::iter::empty()));
        // The same credentials against another load of another file: checked afresh.
        let other = file("u:{PLAIN}other\n").unwrap();
        assert!(!other.admits([good.as_slice()].into_iter()));
        assert!(auth.admits([good.as_slice()].into_iter()));
    }

    #[test]
    fn the_user_is_read_whether_or_not_it_checks() {
        assert_eq!(user_of(&basic("alice:x")), Some(b"alice".to_vec()));
        assert_eq!(user_of(b"Bearer abc"), None);
    }
}
