//! The access log: one line per answered request. Owns the line format, each worker's
//! buffer (`LogBuf`), and the process's `Sink` (a file, or standard output) that the
//! buffers are written to.
//!
//! Why not a `tracing` event per request: formatting one through `tracing-subscriber`
//! (field by field, through `fmt`) and writing it with its own system call added 5-7
//! µs of CPU to a 16 µs request. Here a worker formats the line straight into its
//! buffer and writes the buffer when it holds `FLUSH_BYTES` or is `FLUSH_AFTER` old,
//! as nginx's `access_log ... buffer=64k flush=1s` does: about 1,500 instructions a
//! request (nginx's buffered log: 2,050), below the noise in CPU time (README,
//! "Benchmarks"). The sink's lock is taken once per buffer written, never per request.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Version};
use tokio::sync::Notify;

use crate::codec::push_decimal;
use crate::config::AccessLog;
use crate::state::Shared;

/// A worker writes its buffer once it holds this much...
pub const FLUSH_BYTES: usize = 64 * 1024;
/// ...or this long after its first unwritten line.
pub const FLUSH_AFTER: Duration = Duration::from_secs(1);

/// Where the lines go. Shared by all workers; replaced or reopened on reload.
#[derive(Debug)]
pub struct Sink {
    target: AccessLog,
    out: Mutex<Out>,
}

#[derive(Debug)]
enum Out {
    Stdout,
    File(File),
}

impl Sink {
    /// Opens the sink `target` names; `None` when the log is off.
    pub fn open(target: &AccessLog) -> io::Result<Option<Sink>> {
        let out = match target {
            AccessLog::Off => return Ok(None),
            AccessLog::Stdout => Out::Stdout,
            AccessLog::File(path) => Out::File(open_file(path)?),
        };
        Ok(Some(Sink {
            target: target.clone(),
            out: Mutex::new(out),
        }))
    }

    pub fn target(&self) -> &AccessLog {
        &self.target
    }

    /// Opens the file again by its name, for log rotation: after `mv access.log
    /// access.log.1`, lines go to a new `access.log`. On failure the old file stays.
    pub fn reopen(&self) -> io::Result<()> {
        if let AccessLog::File(path) = &self.target {
            let file = open_file(path)?;
            *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Out::File(file);
        }
        Ok(())
    }

    /// Writes whole lines in one call, so workers' batches never interleave mid-line.
    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        match &*out {
            Out::Stdout => {
                let mut s = io::stdout().lock();
                s.write_all(bytes)?;
                s.flush()
            }
            Out::File(f) => {
                let mut f: &File = f;
                f.write_all(bytes)
            }
        }
    }
}

fn open_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// One answered request, as the access log records it.
pub struct Entry<'a> {
    /// The client's address, rendered (`ConnInfo::peer_ip`).
    pub client: &'a [u8],
    pub method: &'a Method,
    /// The request target as received (path and query).
    pub target: &'a str,
    pub version: Version,
    pub status: u16,
    /// From the request's start to its response head.
    pub elapsed: Duration,
    pub pool: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    pub request_id: &'a [u8],
}

/// A worker's unwritten lines.
#[derive(Default)]
pub struct LogBuf {
    buf: RefCell<Vec<u8>>,
    /// The second the cached date-time prefix is for, and the prefix
    /// (`2026-11-25T00:12:17.`).
    stamp: Cell<(u64, [u8; 20])>,
    /// Signalled when a line goes into an empty buffer: the flusher starts its wait.
    pending: Notify,
}

impl LogBuf {
    /// Appends `e`'s line; writes the buffer if it is full.
    pub fn record(&self, shared: &Shared, e: &Entry<'_>) {
        let full = {
            let mut buf = self.buf.borrow_mut();
            if buf.is_empty() {
                self.pending.notify_one();
            }
            self.format(&mut buf, e, SystemTime::now());
            buf.len() >= FLUSH_BYTES
        };
        if full {
            self.flush(shared);
        }
    }

    /// Writes what the buffer holds to the current sink. Lines are dropped, with a
    /// warning, if the sink fails (a full disk must not stop the proxy) or is gone (the
    /// log was turned off by a reload).
    pub fn flush(&self, shared: &Shared) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        if let Some(sink) = shared.access_log.load().as_ref() {
            if let Err(e) = sink.write(&buf) {
                let lines = buf.iter().filter(|&&b| b == b'\n').count();
                ::metrics::counter!(crate::metrics::ACCESS_LOG_DROPPED).increment(lines as u64);
                tracing::warn!(error = %e, lines, log = %sink.target(), "access log write failed; lines dropped");
            }
        }
        buf.clear();
        if buf.capacity() > 2 * FLUSH_BYTES {
            buf.shrink_to(FLUSH_BYTES);
        }
    }

    /// Writes the buffer `FLUSH_AFTER` after each first unwritten line, for the life
    /// of the worker. An idle worker waits without a timer.
    pub async fn run_flusher(&self, shared: &Shared) {
        loop {
            self.pending.notified().await;
            tokio::time::sleep(FLUSH_AFTER).await;
            self.flush(shared);
        }
    }

    /// `2026-11-25T00:12:17.561Z 127.0.0.1 "GET /a?b=1 HTTP/1.1" 200 0.412 app 10.0.0.5:8080 <request id>`
    fn format(&self, out: &mut Vec<u8>, e: &Entry<'_>, now: SystemTime) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (secs, millis) = (since.as_secs(), since.subsec_millis());
        let (at, mut prefix) = self.stamp.get();
        if at != secs || prefix[0] == 0 {
            prefix = date_time_prefix(secs);
            self.stamp.set((secs, prefix));
        }
        out.extend_from_slice(&prefix);
        push_padded(out, millis as u64, 3);
        out.extend_from_slice(b"Z ");
        out.extend_from_slice(e.client);
        out.extend_from_slice(b" \"");
        out.extend_from_slice(e.method.as_str().as_bytes());
        out.push(b' ');
        push_escaped(out, e.target.as_bytes());
        out.extend_from_slice(match e.version {
            Version::HTTP_09 => b" HTTP/0.9\" ",
            Version::HTTP_10 => b" HTTP/1.0\" ",
            Version::HTTP_2 => b" HTTP/2.0\" ",
            Version::HTTP_3 => b" HTTP/3.0\" ",
            _ => b" HTTP/1.1\" ",
        });
        push_decimal(out, e.status as u64);
        out.push(b' ');
        let micros = e.elapsed.as_micros().min(u64::MAX as u128) as u64;
        push_decimal(out, micros / 1000);
        out.push(b'.');
        push_padded(out, micros % 1000, 3);
        out.push(b' ');
        out.extend_from_slice(e.pool.unwrap_or("-").as_bytes());
        out.push(b' ');
        match e.backend {
            Some(SocketAddr::V4(a)) => {
                for (i, o) in a.ip().octets().iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    push_decimal(out, *o as u64);
                }
                out.push(b':');
                push_decimal(out, a.port() as u64);
            }
            Some(a) => {
                let _ = write!(out, "{a}");
            }
            None => out.push(b'-'),
        }
        out.push(b' ');
        if e.request_id.is_empty() {
            out.push(b'-');
        } else {
            push_escaped(out, e.request_id);
        }
        out.push(b'\n');
    }
}

/// Copies `s`, writing `"`, `\`, spaces, controls and non-ASCII bytes as `\xHH` (as
/// nginx does), so a line always splits into its fields and a client cannot forge one.
fn push_escaped(out: &mut Vec<u8>, s: &[u8]) {
    let plain = |b: u8| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\';
    if s.iter().all(|&b| plain(b)) {
        out.extend_from_slice(s);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s {
        if plain(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'\\', b'x', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
        }
    }
}

/// `n` in `width` digits, zero-padded (`n` < 10^width).
fn push_padded(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for d in out[start..].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` (UTC) for `secs` since the epoch.
fn date_time_prefix(secs: u64) -> [u8; 20] {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let mut v = Vec::with_capacity(20);
    push_padded(&mut v, y.clamp(0, 9999) as u64, 4);
    v.push(b'-');
    push_padded(&mut v, m as u64, 2);
    v.push(b'-');
    push_padded(&mut v, d as u64, 2);
    v.push(b'T');
    push_padded(&mut v, s / 3600, 2);
    v.push(b':');
    push_padded(&mut v, s / 60 % 60, 2);
    v.push(b':');
    push_padded(&mut v, s % 60, 2);
    v.push(b'.');
    let mut out = [0u8; 20];
    out.copy_from_slice(&v);
    out
}

/// (year, month, day) of the proleptic Gregorian calendar for days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(e: &Entry<'_>, now: SystemTime) -> String {
        let b = LogBuf::default();
        let mut out = Vec::new();
        b.format(&mut out, e, now);
        String::from_utf8(out).unwrap()
    }

    fn entry<'a>(target: &'a str, request_id: &'a [u8]) -> Entry<'a> {
        Entry {
            client: b"192.0.2.7",
            method: &Method::GET,
            target,
            version: Version::HTTP_11,
            status: 200,
            elapsed: Duration::from_micros(1_412),
            pool: Some("app"),
            backend: Some("10.0.0.5:8080".parse().unwrap()),
            request_id,
        }
    }

    #[test]
    fn a_line_has_every_field_in_order() {
        // 2026-11-25T00:12:17.561Z
        let now = UNIX_EPOCH + Duration::from_millis(1_795_565_537_561);
        assert_eq!(
            line(&entry("/a?b=1", b"abc123"), now),
            "2026-11-25T00:12:17.561Z 192.0.2.7 \"GET /a?b=1 HTTP/1.1\" 200 1.412 app 10.0.0.5:8080 abc123\n"
        );
        let mut e = entry("/", b"");
        e.pool = None;
        e.backend = Some("[2001:db8::1]:443".parse().unwrap());
        e.version = Version::HTTP_2;
        e.status = 503;
        e.elapsed = Duration::from_micros(7);
        assert_eq!(
            line(&e, UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z 192.0.2.7 \"GET / HTTP/2.0\" 503 0.007 - [2001:db8::1]:443 -\n"
        );
    }

    #[test]
    fn quotes_spaces_and_controls_cannot_forge_a_field_or_a_line() {
        let l = line(&entry("/x\"y\\z", b"id 1\"\n2026 fake"), UNIX_EPOCH);
        assert!(l.contains("\"GET /x\\x22y\\x5Cz HTTP/1.1\""), "{l}");
        assert!(l.ends_with(" id\\x201\\x22\\x0A2026\\x20fake\n"), "{l}");
        assert_eq!(l.matches('\n').count(), 1);
    }

    #[test]
    fn every_byte_outside_printable_ascii_is_escaped() {
        for b in 0..=255u8 {
            let mut out = Vec::new();
            push_escaped(&mut out, &[b]);
            let plain = (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\';
            let want = if plain {
                vec![b]
            } else {
                format!("\\x{b:02X}").into_bytes()
            };
            assert_eq!(out, want, "byte {b:#04x}");
        }
    }

    #[test]
    fn dates_match_the_calendar() {
        for (secs, want) in [
            (0u64, "1970-01-01T00:00:00."),
            (951_782_400, "2000-02-29T00:00:00."),
            (1_709_251_199, "2024-02-29T23:59:59."),
            (4_102_444_800, "2100-01-01T00:00:00."),
            (1_795_565_537, "2026-11-25T00:12:17."),
        ] {
            assert_eq!(std::str::from_utf8(&date_time_prefix(secs)).unwrap(), want, "{secs}");
        }
    }
}
