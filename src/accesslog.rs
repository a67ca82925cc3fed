//! The access log: one line per request, written when its response has ended. Owns
//! the line formats (`LogFormat`: the `rampart`, `combined` and `json` presets and
//! templates of `$variables`), the record of a request in progress (`Pending`, which
//! writes its line when dropped), each worker's buffer (`LogBuf`), and the process's
//! `Sink` (a file, or standard output) that the buffers are written to.
//!
//! Why not a `tracing` event per request: formatting one through `tracing-subscriber`
//! (field by field, through `fmt`) and writing it with its own system call added 5-7
//! µs of CPU to a 16 µs request. Here a worker formats the line straight into its
//! buffer and writes the buffer when it holds `FLUSH_BYTES` or is `FLUSH_AFTER` old,
//! as nginx's `access_log ... buffer=64k flush=1s` does (README, "Benchmarks"). The
//! sink's lock is taken once per buffer written, never per request.
//!
//! Why the line is written from a `Drop`: a request ends in many places (its response
//! body read to the end, a client that goes away mid-body or before the head, a
//! backend that breaks off), and each must give one line. The record rides with the
//! request, then inside the response body (`RespBody::Logged`), and whichever way it
//! is dropped, the line says how the request ended (`$termination`).

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::HeaderName;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use crate::body::{InBody, RespBody};
use crate::codec::push_decimal;
use crate::config::AccessLog;
use crate::proxy::ConnInfo;
use crate::rawfields::RawRequest;
use crate::state::{Pool, Shared};
use crate::worker::WorkerCtx;

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

// ---- formats --------------------------------------------------------------------------

/// The default: every field rampart knows about a request, space-separated.
const RAMPART: &str = "$time_iso8601 $remote_addr \"$request\" $status $body_bytes_sent $request_time \
                       $upstream_header_time $pool $upstream_addr $upstream_attempts $termination $request_id";
/// nginx's and Apache's `combined`, which log analysers read as it is.
const COMBINED: &str =
    "$remote_addr - $remote_user [$time_local] \"$request\" $status $body_bytes_sent \"$http_referer\" \"$http_user_agent\"";
/// One JSON object per line; each variable is a JSON value (a string, a number, or
/// `null` when it has none), so the template holds no quotes around them.
const JSON: &str = "{\"time\":$time_iso8601,\"remote_addr\":$remote_addr,\"request_method\":$request_method,\
                    \"request_uri\":$request_uri,\"server_protocol\":$server_protocol,\"host\":$host,\
                    \"status\":$status,\"body_bytes_sent\":$body_bytes_sent,\"request_time\":$request_time,\
                    \"upstream_header_time\":$upstream_header_time,\"pool\":$pool,\"upstream_addr\":$upstream_addr,\
                    \"upstream_attempts\":$upstream_attempts,\"termination\":$termination,\"request_id\":$request_id,\
                    \"http_referer\":$http_referer,\"http_user_agent\":$http_user_agent}";

/// The variables a format may use, for `rampart check`'s message.
const VARIABLES: &[(&str, Var)] = &[
    ("remote_addr", Var::RemoteAddr),
    ("remote_port", Var::RemotePort),
    ("scheme", Var::Scheme),
    ("server_port", Var::ServerPort),
    ("ssl_protocol", Var::SslProtocol),
    ("ssl_cipher", Var::SslCipher),
    ("time_iso8601", Var::TimeIso8601),
    ("time_local", Var::TimeLocal),
    ("msec", Var::Msec),
    ("request", Var::Request),
    ("request_method", Var::RequestMethod),
    ("request_uri", Var::RequestUri),
    ("server_protocol", Var::ServerProtocol),
    ("host", Var::Host),
    ("status", Var::Status),
    ("body_bytes_sent", Var::BodyBytesSent),
    ("request_time", Var::RequestTime),
    ("upstream_header_time", Var::UpstreamHeaderTime),
    ("upstream_addr", Var::UpstreamAddr),
    ("upstream_attempts", Var::UpstreamAttempts),
    ("pool", Var::Pool),
    ("termination", Var::Termination),
    ("request_id", Var::RequestId),
    ("uri", Var::Uri),
    ("args", Var::Args),
    ("query_string", Var::Args),
    ("is_args", Var::IsArgs),
    ("upstream_status", Var::UpstreamStatus),
    ("upstream_response_time", Var::UpstreamResponseTime),
    ("upstream_connect_time", Var::UpstreamConnectTime),
    ("connection", Var::Connection),
    ("connection_requests", Var::ConnectionRequests),
    ("pid", Var::Pid),
    ("hostname", Var::Hostname),
    ("request_length", Var::RequestLength),
    ("bytes_sent", Var::BytesSent),
    ("server_name", Var::ServerName),
    ("request_completion", Var::RequestCompletion),
    ("upstream_response_length", Var::UpstreamResponseLength),
    ("gzip_ratio", Var::GzipRatio),
    ("upstream_cache_status", Var::UpstreamCacheStatus),
    ("ssl_server_name", Var::SslServerName),
    ("ssl_client_s_dn", Var::SslClientSDn),
    ("ssl_client_verify", Var::SslClientVerify),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    RemoteAddr,
    RemotePort,
    /// `http` or `https`.
    Scheme,
    /// The port the client connected to.
    ServerPort,
    /// What a TLS connection negotiated; `-` (JSON `null`) over plain HTTP.
    SslProtocol,
    SslCipher,
    TimeIso8601,
    TimeLocal,
    Msec,
    Request,
    RequestMethod,
    RequestUri,
    ServerProtocol,
    Host,
    Status,
    BodyBytesSent,
    RequestTime,
    UpstreamHeaderTime,
    UpstreamAddr,
    UpstreamAttempts,
    Pool,
    Termination,
    RequestId,
    /// The target's path (`$uri`) and query (`$args`, `$query_string`), as received;
    /// `$is_args` is `?` when there is a query.
    Uri,
    Args,
    IsArgs,
    /// The status of the backend's response; `-` when rampart answered itself.
    UpstreamStatus,
    /// From the request's start to the end of the backend's response body.
    UpstreamResponseTime,
    /// The answering try's connect: 0 on a connection reused.
    UpstreamConnectTime,
    /// The connection's serial number, and the requests it has begun, this one
    /// included.
    Connection,
    ConnectionRequests,
    Pid,
    Hostname,
    /// The request's head (as received on rampart's HTTP/1.1 path; as HTTP/1.1 would
    /// carry it otherwise) and the body bytes read.
    RequestLength,
    /// The response head (as written on rampart's HTTP/1.1 path; as HTTP/1.1 would
    /// carry it otherwise) and `$body_bytes_sent`.
    BytesSent,
    /// The matched route's `host`, as configured.
    ServerName,
    /// `OK` when the response was sent whole, else empty.
    RequestCompletion,
    /// The backend's body bytes passed on (before compression).
    UpstreamResponseLength,
    /// The body's bytes before compression over those after, `-` uncompressed.
    GzipRatio,
    /// Always `-`: rampart keeps no cache. Accepted so nginx formats that name it run.
    UpstreamCacheStatus,
    /// The SNI, client certificate subject and verification of a TLS connection.
    SslServerName,
    SslClientSDn,
    SslClientVerify,
    /// `$http_NAME`: the request's first `NAME` field; an index into `LogFormat::headers`.
    Header(usize),
    /// `$sent_http_NAME`: the response's first `NAME` field; an index into
    /// `LogFormat::sent_headers`.
    SentHeader(usize),
    /// `$remote_user`: the user named by the request's `Authorization: Basic`, checked
    /// or not, as nginx logs it; the index of `Authorization` in `LogFormat::headers`.
    RemoteUser(usize),
}

/// How a format writes its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Text: bytes that could split or forge a field as `\xHH`, `-` for a value that
    /// does not exist.
    Text,
    /// The `json` preset: each value a JSON value (a quoted string, a number, `null`).
    Json,
    /// A template with `access_log_escape = "json"`: values escaped for the inside of
    /// the template's JSON strings, nothing for a value that does not exist (nginx's
    /// `escape=json`).
    JsonEscaped,
}

#[derive(Debug)]
enum Part {
    Text(Box<[u8]>),
    /// Text of up to 4 bytes (most separators), written with one 4-byte store.
    Short([u8; 4], u8),
    Var(Var),
}

impl Part {
    fn text(t: Vec<u8>) -> Part {
        match t.len() {
            n @ 1..=4 => {
                let mut short = [0u8; 4];
                short[..n].copy_from_slice(&t);
                Part::Short(short, n as u8)
            }
            _ => Part::Text(t.into()),
        }
    }
}

/// A compiled `server.access_log_format`, with `server.access_log_filter`: what a
/// line holds and which requests get one. Equal when written the same.
#[derive(Debug)]
pub struct LogFormat {
    source: String,
    parts: Vec<Part>,
    /// How values are written: as text, as JSON values (the `json` preset), or
    /// escaped for the inside of a template's JSON strings.
    style: Style,
    /// The request fields `$http_NAME` variables read, captured as the request starts.
    headers: Vec<HeaderName>,
    /// The response fields `$sent_http_NAME` variables read, captured with its head.
    sent_headers: Vec<HeaderName>,
    /// Whether `$host` is used, so the request's host is kept.
    host: bool,
    /// Whether `$upstream_response_time` is used, so the end of the response body is
    /// timed.
    body_end: bool,
    /// Whether `$request_length` is used, so the request's head is measured and its
    /// streamed body counted.
    request_length: bool,
    /// Whether `$bytes_sent` is used, so the response head is measured.
    bytes_sent: bool,
    /// Whether `$server_name` is used, so the record keeps the config its route is in.
    server_name: bool,
    /// `server.access_log_filter`: only the requests it wants get a line (`None`: all).
    pub filter: Option<LogFilter>,
}

impl PartialEq for LogFormat {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source && self.style == other.style && self.filter == other.filter
    }
}

/// `access_log_filter = { min_status = 400, slower_than = "1s" }`: HAProxy's
/// `option dontlog-normal`, Envoy's status and duration filters. A request gets a
/// line when its status is `min_status` or above, or it took `slower_than` or longer,
/// or it was retried (or hedged), or its response did not end whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFilter {
    pub min_status: Option<u16>,
    pub slower_than: Option<Duration>,
}

impl LogFilter {
    fn wants(&self, status: u16, took: Duration, tries: u8, termination: &str) -> bool {
        self.min_status.is_some_and(|m| status >= m)
            || self.slower_than.is_some_and(|t| took >= t)
            || tries > 1
            || matches!(termination, CLIENT_ABORTED | UPSTREAM_BODY_FAILED | TUNNEL_ERROR)
    }
}

impl Eq for LogFormat {}

impl Default for LogFormat {
    fn default() -> Self {
        LogFormat::parse("rampart").unwrap_or_else(|_| unreachable!("the rampart preset parses"))
    }
}

impl LogFormat {
    /// `"rampart"`, `"combined"`, `"json"`, or a template of text and `$variables`
    /// (nginx's `log_format`). The error says what is wrong, for `rampart check`.
    pub fn parse(spec: &str) -> Result<LogFormat, String> {
        let (template, style) = match spec {
            "rampart" => (RAMPART, Style::Text),
            "combined" => (COMBINED, Style::Text),
            "json" => (JSON, Style::Json),
            t if t.contains('$') => (t, Style::Text),
            _ => {
                return Err(format!(
                    "must be \"rampart\", \"combined\", \"json\" or a template with $variables, got {spec:?}"
                ))
            }
        };
        if let Some(c) = template.chars().find(|c| c.is_control()) {
            return Err(format!(
                "must not hold control characters (found {c:?}): a line is one line"
            ));
        }
        let mut format = LogFormat {
            source: spec.to_string(),
            parts: Vec::new(),
            style,
            headers: Vec::new(),
            sent_headers: Vec::new(),
            host: false,
            body_end: false,
            request_length: false,
            bytes_sent: false,
            server_name: false,
            filter: None,
        };
        let mut text = Vec::new();
        let mut rest = template;
        while let Some(at) = rest.find('$') {
            text.extend_from_slice(&rest.as_bytes()[..at]);
            rest = &rest[at + 1..];
            let name = if let Some(braced) = rest.strip_prefix('{') {
                let Some(end) = braced.find('}') else {
                    return Err(format!("\"${{\" with no closing \"}}\" in {template:?}"));
                };
                rest = &braced[end + 1..];
                &braced[..end]
            } else {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..end];
                rest = &rest[end..];
                name
            };
            if name.is_empty() {
                return Err(format!(
                    "a \"$\" must start a variable name (\"$status\", \"${{status}}\") in {template:?}"
                ));
            }
            let var = format.variable(name)?;
            if !text.is_empty() {
                format.parts.push(Part::text(std::mem::take(&mut text)));
            }
            format.parts.push(Part::Var(var));
        }
        text.extend_from_slice(rest.as_bytes());
        if !text.is_empty() {
            format.parts.push(Part::text(text));
        }
        Ok(format)
    }

    fn variable(&mut self, name: &str) -> Result<Var, String> {
        if let Some(field) = name.strip_prefix("http_") {
            return Ok(Var::Header(index_of(&mut self.headers, field_name(name, field)?)));
        }
        if let Some(field) = name.strip_prefix("sent_http_") {
            return Ok(Var::SentHeader(index_of(
                &mut self.sent_headers,
                field_name(name, field)?,
            )));
        }
        if name == "remote_user" {
            return Ok(Var::RemoteUser(index_of(
                &mut self.headers,
                http::header::AUTHORIZATION,
            )));
        }
        match VARIABLES.iter().find(|(n, _)| *n == name) {
            Some(&(_, v)) => {
                self.host |= v == Var::Host;
                self.body_end |= v == Var::UpstreamResponseTime;
                self.request_length |= v == Var::RequestLength;
                self.bytes_sent |= v == Var::BytesSent;
                self.server_name |= v == Var::ServerName;
                Ok(v)
            }
            None => {
                let known: Vec<String> = VARIABLES.iter().map(|(n, _)| format!("${n}")).collect();
                Err(format!(
                    "unknown variable ${name}; known: {}, $remote_user, $http_NAME for any request field \
                     and $sent_http_NAME for any response field",
                    known.join(", ")
                ))
            }
        }
    }

    /// `access_log_escape = "json"` (nginx's `log_format ... escape=json`): a
    /// template's values are written for the inside of its JSON strings (`\"`,
    /// `\u0001`), and a value that does not exist as nothing, so a template of the
    /// form `{"ua":"$http_user_agent"}` gives a line that parses whatever the client
    /// sent. The presets already write what they need.
    pub fn escape_json(&mut self) -> Result<(), String> {
        match self.source.as_str() {
            "rampart" | "combined" | "json" => Err(format!(
                "\"json\" applies to a template of access_log_format; the {:?} preset escapes its own values",
                self.source
            )),
            _ => {
                self.style = Style::JsonEscaped;
                Ok(())
            }
        }
    }

    /// The spec as written, for messages.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The field `$http_NAME` or `$sent_http_NAME` names (`var`): `_` for `-`, any case.
fn field_name(var: &str, field: &str) -> Result<HeaderName, String> {
    let field = field.replace('_', "-").to_ascii_lowercase();
    HeaderName::from_bytes(field.as_bytes()).map_err(|_| format!("${var}: {field:?} is not a header field name"))
}

/// Where `name` is among `fields` (those captured for the line), added if new.
fn index_of(fields: &mut Vec<HeaderName>, name: HeaderName) -> usize {
    match fields.iter().position(|x| *x == name) {
        Some(i) => i,
        None => {
            fields.push(name);
            fields.len() - 1
        }
    }
}

// ---- one request ------------------------------------------------------------------------

/// How a request ended, for `$termination` when rampart itself did not answer with an
/// error (that one's kind is logged instead).
const COMPLETE: &str = "-";
/// The client closed (or stalled past `send_timeout`) before the response was sent
/// whole; before its head, the status logged is 499, as nginx logs it.
const CLIENT_ABORTED: &str = "client_aborted";
/// The backend's body broke off (a reset, or no bytes for `read_timeout`).
const UPSTREAM_BODY_FAILED: &str = "upstream_body_failed";
/// A tunnel (WebSocket) ended with an error on either side.
pub const TUNNEL_ERROR: &str = "tunnel_error";

/// A request on its way, for its log line. Created as the request starts (only when
/// the log is on), filled in as it is answered, then carried in the response body
/// (`RespBody::Logged`). Its line is written when it is dropped.
pub struct Pending {
    ctx: Rc<WorkerCtx>,
    rec: Record,
    body: RespBody,
}

/// What a line is made of.
struct Record {
    conn: Rc<ConnInfo>,
    format: Arc<LogFormat>,
    start: Instant,
    method: Method,
    target: Option<PathAndQuery>,
    version: Version,
    request_id: HeaderValue,
    host: Option<HeaderValue>,
    /// Requests the connection had begun when this one began, this one included (0:
    /// not known).
    conn_requests: u64,
    /// When the response body ended, with `LogFormat::body_end`.
    body_end: Option<Instant>,
    /// `$http_NAME` values, in `format.headers` order.
    fields: Box<[Option<HeaderValue>]>,
    /// `$sent_http_NAME` values, in `format.sent_headers` order: empty until the
    /// response head is ready.
    sent_fields: Box<[Option<HeaderValue>]>,
    /// With `LogFormat::request_length`: the request head's bytes and its body's read
    /// whole with it; `body_in` counts a streamed body's as they are read.
    head_in: u64,
    body_in: Option<Rc<Cell<u64>>>,
    /// With `LogFormat::bytes_sent`: the response head's bytes, and on rampart's
    /// HTTP/1.1 path its chunked framing.
    head_out: u64,
    /// With `LogFormat::server_name`: the config the request was routed in.
    snap: Option<Arc<crate::state::Snapshot>>,
    /// `None` until the response head is ready.
    answer: Option<Answered>,
    sent: u64,
    body_failed: bool,
    /// How a tunnel ended (`tunnel_ended`), which wins over what the body shows.
    ended: Option<&'static str>,
    /// hyper refused the request head (`unparsed`): no method, target or protocol.
    unparsed: bool,
    /// Its route has `access_log = false` (`discard`): no line.
    discarded: bool,
}

/// The first value of response field `name`: a `Content-Length` not written in the
/// head is the body's exact size, which the client side will write.
fn sent_field(
    response: &http::Response<RespBody>,
    raw: Option<&crate::rawfields::RawFields>,
    name: &HeaderName,
) -> Option<HeaderValue> {
    response
        .headers()
        .get(name)
        .cloned()
        .or_else(|| raw.and_then(|r| r.find(name)))
        .or_else(|| {
            (name == http::header::CONTENT_LENGTH)
                .then(|| response.body().size_hint().exact().map(HeaderValue::from))
                .flatten()
        })
}

/// What is known once the response head is ready.
pub struct Answered {
    pub status: u16,
    pub pool: Option<Arc<Pool>>,
    pub backend: Option<SocketAddr>,
    /// From the request's start to the backend's response head.
    pub head_time: Duration,
    /// The answering try's connect (0: a connection reused).
    pub connect_time: Duration,
    pub tries: u8,
    /// The kind of the error rampart answered with (`ProxyError::kind`).
    pub error: Option<&'static str>,
    /// The route it took, an index into the snapshot's routes.
    pub route: Option<usize>,
}

impl Pending {
    /// Starts the record of `req`, whose fields are `raw` when they came as written,
    /// else in its map. `host` is the first `Host` value.
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        ctx: &Rc<WorkerCtx>,
        conn: &Rc<ConnInfo>,
        format: &Arc<LogFormat>,
        req: &Request<InBody>,
        raw: Option<&RawRequest>,
        host: Option<&HeaderValue>,
        request_id: &HeaderValue,
        start: Instant,
    ) -> Box<Pending> {
        let fields = format
            .headers
            .iter()
            .map(|name| match raw {
                Some(r) => crate::rawfields::find(&r.block, name),
                None => req.headers().get(name).cloned(),
            })
            .collect();
        // The target's authority (HTTP/2, absolute-form) is the host, as routing reads it.
        let host = match (format.host, req.uri().authority()) {
            (false, _) => None,
            (true, Some(a)) => HeaderValue::from_str(a.as_str()).ok(),
            (true, None) => host.cloned(),
        };
        let (head_in, body_in) = match format.request_length {
            false => (0, None),
            true => request_size(req, raw),
        };
        // Built in its box: on the stack first, it was copied in.
        std::pin::Pin::into_inner(crate::alloc::boxed(|| Pending {
            ctx: ctx.clone(),
            body: RespBody::empty(),
            rec: Record {
                conn: conn.clone(),
                format: format.clone(),
                start,
                method: req.method().clone(),
                target: req.uri().path_and_query().cloned(),
                version: req.version(),
                request_id: request_id.clone(),
                host,
                conn_requests: conn.life.as_ref().map_or(0, |l| l.begun()),
                body_end: None,
                fields,
                sent_fields: Box::new([]),
                head_in,
                body_in,
                head_out: 0,
                snap: None,
                answer: None,
                sent: 0,
                body_failed: false,
                ended: None,
                unparsed: false,
                discarded: false,
            },
        }))
    }

    /// With `$request_length`, the counter of a body that streams from the client
    /// (`body::StreamBody` adds to it as it reads).
    pub fn body_counter(&self) -> Option<Rc<Cell<u64>>> {
        self.rec.body_in.clone()
    }

    /// No line for this request: its route has `access_log = false` (nginx's
    /// `access_log off` in a `location`).
    pub fn discard(mut self: Box<Self>) {
        self.rec.discarded = true;
    }

    /// A line for a request whose head hyper refused and answered itself (`status`:
    /// 400, 414 or 431), as nginx logs them: `$request` and its parts are `-`.
    #[cold]
    pub fn unparsed(ctx: &Rc<WorkerCtx>, conn: &Rc<ConnInfo>, status: u16, kind: &'static str) {
        let snap = ctx.shared.snapshot.load();
        if matches!(snap.config.server.access_log, crate::config::AccessLog::Off) {
            return;
        }
        let format = snap.config.server.access_log_format.clone();
        let fields = vec![None; format.headers.len()].into_boxed_slice();
        drop(Box::new(Pending {
            ctx: ctx.clone(),
            body: RespBody::empty(),
            rec: Record {
                conn: conn.clone(),
                format,
                start: crate::clock::now(),
                method: Method::GET,
                target: None,
                version: Version::HTTP_11,
                request_id: ctx.ids.next(),
                host: None,
                // Refused before it was counted (`idle::Lifetime::another`).
                conn_requests: conn.life.as_ref().map_or(0, |l| l.begun() + 1),
                body_end: None,
                fields,
                sent_fields: Box::new([]),
                head_in: 0,
                body_in: None,
                head_out: 0,
                snap: None,
                answer: Some(Answered {
                    status,
                    pool: None,
                    backend: None,
                    head_time: Duration::ZERO,
                    connect_time: Duration::ZERO,
                    tries: 0,
                    error: Some(kind),
                    route: None,
                }),
                sent: 0,
                body_failed: false,
                ended: None,
                unparsed: true,
                discarded: false,
            },
        }));
    }

    /// The response head is ready: what it says, and the fields `$sent_http_NAME`
    /// reads (`sent_field`: the map first, where rampart's own are, then `raw`, the
    /// backend's as written).
    pub fn head_ready(
        mut self: Box<Self>,
        a: Answered,
        response: &http::Response<RespBody>,
        raw: Option<&crate::rawfields::RawFields>,
        snap: &Arc<crate::state::Snapshot>,
        // rampart's HTTP/1.1 path writes the head, and tells its size (`head_written`).
        h1_writer: bool,
    ) -> Box<Self> {
        self.rec.answer = Some(a);
        if self.rec.format.bytes_sent && !h1_writer {
            // hyper's and HTTP/2's heads are measured as that path would write them.
            self.rec.head_out = crate::h1::head_len(response, raw, &self.rec.request_id);
        }
        if self.rec.format.server_name {
            self.rec.snap = Some(snap.clone());
        }
        if !self.rec.format.sent_headers.is_empty() {
            self.rec.sent_fields = self
                .rec
                .format
                .sent_headers
                .iter()
                .map(|n| sent_field(response, raw, n))
                .collect();
        }
        self
    }

    /// rampart's HTTP/1.1 path wrote a head of `n` bytes for this response.
    pub fn head_written(&mut self, n: usize) {
        self.rec.head_out = n as u64;
    }

    /// rampart's HTTP/1.1 path wrote `n` bytes of chunked framing (counted in nginx's
    /// `$bytes_sent`, not in `$body_bytes_sent`).
    pub fn framing_written(&mut self, n: usize) {
        self.rec.head_out += n as u64;
    }

    /// The response's body, whose end ends the request (unless a tunnel follows: then
    /// the tunnel's end does, `tunnel_ended`, as nginx logs a WebSocket when it closes).
    pub fn into_body(mut self: Box<Self>, body: RespBody) -> RespBody {
        self.body = body;
        RespBody::Logged(self)
    }

    /// The tunnel closed: `to_client` bytes went to the client through it; `how` is
    /// `$termination` (`-`, `tunnel_idle_timeout`, `tunnel_error`, `client_aborted`).
    pub fn tunnel_ended(mut self: Box<Self>, to_client: u64, how: &'static str) {
        self.rec.sent = to_client;
        self.rec.ended = Some(how);
    }

    /// `RespBody::Logged`'s frames: the inner body's, counted.
    #[inline(never)]
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let res = Pin::new(&mut self.body).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.rec.sent += d.len() as u64;
                }
                if self.rec.format.body_end && self.body.is_end_stream() {
                    self.rec.body_end = Some(crate::clock::now());
                }
            }
            Poll::Ready(Some(Err(_))) => self.rec.body_failed = true,
            Poll::Ready(None) if self.rec.format.body_end && self.rec.body_end.is_none() => {
                self.rec.body_end = Some(crate::clock::now())
            }
            _ => {}
        }
        res
    }

    #[inline(never)]
    pub fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    #[inline(never)]
    pub fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.rec.discarded {
            return;
        }
        let ended = crate::clock::now();
        let rec = &self.rec;
        let termination = match (rec.ended, &rec.answer) {
            (Some(how), _) => how,
            (None, None) => CLIENT_ABORTED,
            (None, Some(_)) if rec.body_failed => UPSTREAM_BODY_FAILED,
            (None, Some(Answered { error: Some(kind), .. })) => kind,
            (None, Some(_)) if self.body.is_end_stream() => COMPLETE,
            (None, Some(_)) => CLIENT_ABORTED,
        };
        let took = ended.saturating_duration_since(rec.start);
        if let Some(filter) = &rec.format.filter {
            let (status, tries) = rec.answer.as_ref().map_or((499, 0), |a| (a.status, a.tries));
            if !filter.wants(status, took, tries, termination) {
                return;
            }
        }
        let ctx = self.ctx.clone();
        let body_in_out = self.body.compressed_bytes();
        ctx.access_log.record(&ctx.shared, |out, stamp, addrs| {
            render(out, rec, stamp, addrs, took, termination, body_in_out)
        });
    }
}

/// Writes `p`'s line into `out`.
#[allow(clippy::too_many_arguments)]
fn render(
    out: &mut Vec<u8>,
    p: &Record,
    stamp: &Stamp,
    addrs: &mut AddrTexts,
    took: Duration,
    termination: &str,
    // A compressed body's bytes taken and given (`$gzip_ratio`, `$upstream_response_length`).
    body_in_out: Option<(u64, u64)>,
) {
    let style = p.format.style;
    out.reserve(256);
    let a = p.answer.as_ref();
    // A backend's answer, for the `$upstream_*` variables (`-` for rampart's own).
    let up = a.filter(|a| a.backend.is_some());
    let tls = p.conn.tls_facts.as_deref();
    let value = HeaderValue::as_bytes;
    for part in &p.format.parts {
        let var = match part {
            Part::Text(t) => {
                out.extend_from_slice(t);
                continue;
            }
            Part::Short(t, n) => {
                out.reserve(4);
                let at = out.len();
                // SAFETY: 4 bytes reserved past the length; the first `n` are kept.
                unsafe {
                    out.as_mut_ptr().add(at).cast::<[u8; 4]>().write_unaligned(*t);
                    out.set_len(at + *n as usize);
                }
                continue;
            }
            Part::Var(v) => *v,
        };
        match var {
            Var::RemoteAddr => put_raw(out, style, p.conn.peer_ip.as_bytes()),
            Var::RemotePort => put_num(out, style, Some(p.conn.peer.port() as u64)),
            Var::Scheme => put_raw(out, style, p.conn.proto.as_bytes()),
            Var::ServerPort => put_num(out, style, Some(p.conn.local_port as u64)),
            Var::SslProtocol => put_str(out, style, tls.map(|t| t.protocol.as_bytes()), false),
            Var::SslCipher => put_str(out, style, tls.map(|t| t.cipher.as_bytes()), false),
            Var::TimeIso8601 => {
                quote(out, style);
                out.extend_from_slice(&stamp.iso);
                push_padded(out, stamp.millis as u64, 3);
                out.push(b'Z');
                quote(out, style);
            }
            Var::TimeLocal => put_raw(out, style, &stamp.local),
            Var::Msec => {
                push_decimal(out, stamp.secs);
                out.push(b'.');
                push_padded(out, stamp.millis as u64, 3);
            }
            Var::Request | Var::RequestMethod | Var::RequestUri | Var::ServerProtocol if p.unparsed => {
                put_str(out, style, None, false)
            }
            Var::Request => {
                quote(out, style);
                out.extend_from_slice(p.method.as_str().as_bytes());
                out.push(b' ');
                escape(out, style, target(p).as_bytes(), false);
                out.push(b' ');
                out.extend_from_slice(protocol(p.version));
                quote(out, style);
            }
            Var::RequestMethod => put_raw(out, style, p.method.as_str().as_bytes()),
            Var::RequestUri => put_str(out, style, Some(target(p).as_bytes()), false),
            Var::ServerProtocol => put_raw(out, style, protocol(p.version)),
            Var::Host => match &p.host {
                Some(h) => {
                    let h = std::str::from_utf8(h.as_bytes()).unwrap_or("");
                    let h = crate::router::host_without_port(h).to_ascii_lowercase();
                    put_str(out, style, Some(h.as_bytes()), true)
                }
                None => put_str(out, style, None, true),
            },
            Var::Status => put_num(out, style, Some(a.map_or(499, |a| a.status as u64))),
            Var::BodyBytesSent => put_num(out, style, Some(p.sent)),
            Var::RequestTime => put_secs(out, style, Some(took)),
            Var::UpstreamHeaderTime => put_secs(out, style, up.map(|a| a.head_time)),
            Var::UpstreamAddr => match a.and_then(|a| a.backend) {
                Some(b) => {
                    quote(out, style);
                    addrs.push(out, b);
                    quote(out, style);
                }
                None => put_str(out, style, None, false),
            },
            Var::UpstreamAttempts => put_num(out, style, Some(a.map_or(0, |a| a.tries as u64))),
            Var::Pool => put_str(
                out,
                style,
                a.and_then(|a| a.pool.as_ref()).map(|p| p.name.as_bytes()),
                false,
            ),
            Var::Termination => put_raw(out, style, termination.as_bytes()),
            Var::RequestId => put_str(out, style, Some(p.request_id.as_bytes()), true),
            Var::Uri | Var::Args | Var::IsArgs if p.unparsed => put_str(out, style, None, false),
            Var::Uri => put_str(
                out,
                style,
                Some(p.target.as_ref().map_or("/", |t| t.path()).as_bytes()),
                false,
            ),
            Var::Args => put_str(
                out,
                style,
                p.target.as_ref().and_then(|t| t.query()).map(str::as_bytes),
                false,
            ),
            Var::IsArgs => {
                let query = p.target.as_ref().is_some_and(|t| t.query().is_some());
                put_raw(out, style, if query { b"?" } else { b"" })
            }
            Var::UpstreamStatus => put_num(out, style, up.map(|a| a.status as u64)),
            Var::UpstreamResponseTime => put_secs(
                out,
                style,
                up.map(|_| p.body_end.map_or(took, |e| e.saturating_duration_since(p.start))),
            ),
            Var::UpstreamConnectTime => put_secs(out, style, up.map(|a| a.connect_time)),
            Var::Connection => put_num(out, style, p.conn.life.as_ref().map(|l| l.serial())),
            Var::ConnectionRequests => put_num(out, style, (p.conn_requests > 0).then_some(p.conn_requests)),
            Var::RequestLength => put_num(out, style, Some(p.head_in + p.body_in.as_ref().map_or(0, |c| c.get()))),
            Var::BytesSent => put_num(out, style, Some(p.head_out + p.sent)),
            Var::ServerName => {
                let host = p
                    .snap
                    .as_ref()
                    .zip(a.and_then(|a| a.route))
                    .and_then(|(s, i)| s.routes.get(i))
                    .and_then(|r| r.host.as_ref());
                match host {
                    Some(crate::config::HostMatch::Exact(h)) => put_str(out, style, Some(h.as_bytes()), true),
                    Some(crate::config::HostMatch::Suffix(h)) => {
                        quote(out, style);
                        out.push(b'*');
                        escape(out, style, h.as_bytes(), true);
                        quote(out, style);
                    }
                    None => put_none(out, style),
                }
            }
            Var::RequestCompletion => put_raw(out, style, if termination == COMPLETE { b"OK" } else { b"" }),
            Var::UpstreamResponseLength => put_num(out, style, up.map(|_| body_in_out.map_or(p.sent, |(i, _)| i))),
            Var::GzipRatio => match body_in_out {
                Some((i, o)) if o > 0 => {
                    let hundredths = i * 100 / o;
                    push_decimal(out, hundredths / 100);
                    out.push(b'.');
                    push_padded(out, hundredths % 100, 2);
                }
                _ => put_none(out, style),
            },
            Var::UpstreamCacheStatus => put_none(out, style),
            Var::SslServerName => put_str(out, style, tls.and_then(|t| t.server_name.as_ref()).map(value), true),
            Var::SslClientSDn => put_str(
                out,
                style,
                tls.and_then(|t| t.client_subject.as_ref()).map(value),
                false,
            ),
            Var::SslClientVerify => put_str(out, style, tls.map(|t| t.client_verify.as_bytes()), false),
            Var::Pid => put_num(out, style, Some(pid().into())),
            Var::Hostname => put_str(out, style, Some(hostname().as_bytes()), true),
            Var::Header(i) => put_str(out, style, p.fields[i].as_ref().map(|v| v.as_bytes()), false),
            Var::SentHeader(i) => put_str(
                out,
                style,
                p.sent_fields.get(i).and_then(|v| v.as_ref()).map(|v| v.as_bytes()),
                false,
            ),
            Var::RemoteUser(i) => {
                let user = p.fields[i].as_ref().and_then(|v| crate::auth::user_of(v.as_bytes()));
                // Unquoted in `combined`, so a space in it is escaped.
                put_str(out, style, user.as_deref().filter(|u| !u.is_empty()), true)
            }
        }
    }
    out.push(b'\n');
}

/// `$request_length`'s parts known as the request starts: its head's size (as
/// received: the request line and the field block as written, when rampart's HTTP/1.1
/// path read them; else as HTTP/1.1 would carry them) plus a body read whole with it,
/// and a counter for a body that streams.
fn request_size(req: &Request<InBody>, raw: Option<&RawRequest>) -> (u64, Option<Rc<Cell<u64>>>) {
    let target = match req.uri().path_and_query() {
        Some(pq) if req.version() != Version::HTTP_2 && req.uri().authority().is_none() => pq.as_str().len(),
        _ => req.uri().to_string().len(),
    };
    // "GET /x HTTP/1.1\r\n", then the fields and the empty line.
    let line = req.method().as_str().len() + 1 + target + 1 + 8 + 2;
    let fields = match raw {
        Some(r) => r.block.len(),
        None => req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + 2 + v.len() + 2)
            .sum(),
    };
    let head = (line + fields + 2) as u64;
    match req.body() {
        InBody::Empty => (head, None),
        InBody::Full(b) => (head + b.len() as u64, None),
        InBody::Incoming(i) if i.is_end_stream() => (head, None),
        InBody::Incoming(_) => (head, Some(Rc::new(Cell::new(0)))),
    }
}

/// The process id (`$pid`), read once: glibc makes `getpid` a system call.
fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// This machine's name (`$hostname`), read once.
fn hostname() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|n| n.trim().to_string())
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "localhost".into())
    })
}

fn target(p: &Record) -> &str {
    p.target.as_ref().map_or("/", |t| t.as_str())
}

fn protocol(v: Version) -> &'static [u8] {
    match v {
        Version::HTTP_09 => b"HTTP/0.9",
        Version::HTTP_10 => b"HTTP/1.0",
        Version::HTTP_2 => b"HTTP/2.0",
        Version::HTTP_3 => b"HTTP/3.0",
        _ => b"HTTP/1.1",
    }
}

fn quote(out: &mut Vec<u8>, style: Style) {
    if style == Style::Json {
        out.push(b'"');
    }
}

/// A string value: escaped, quoted in JSON; `-` (JSON `null`) when there is none.
/// `space`: spaces are escaped too, in text, for a value a client chose that is
/// logged unquoted (the request id).
fn put_str(out: &mut Vec<u8>, style: Style, v: Option<&[u8]>, space: bool) {
    match v {
        None => put_none(out, style),
        Some(v) => {
            quote(out, style);
            escape(out, style, v, space);
            quote(out, style);
        }
    }
}

/// A value that does not exist: `-`, JSON's `null`, or nothing inside a template's
/// JSON string (as nginx's `escape=json` writes it).
fn put_none(out: &mut Vec<u8>, style: Style) {
    match style {
        Style::Text => out.push(b'-'),
        Style::Json => out.extend_from_slice(b"null"),
        Style::JsonEscaped => {}
    }
}

/// A value rampart made, which holds nothing to escape: an address, a method (an HTTP
/// token), a protocol, a date, a termination.
fn put_raw(out: &mut Vec<u8>, style: Style, v: &[u8]) {
    quote(out, style);
    out.extend_from_slice(v);
    quote(out, style);
}

fn put_num(out: &mut Vec<u8>, style: Style, n: Option<u64>) {
    match n {
        Some(n) => push_decimal(out, n),
        None => put_none(out, style),
    }
}

/// Seconds with microseconds (`0.000412`): nginx's times have milliseconds, too coarse
/// for a proxy that adds tens of microseconds.
fn put_secs(out: &mut Vec<u8>, style: Style, d: Option<Duration>) {
    let Some(d) = d else {
        return put_num(out, style, None);
    };
    push_decimal(out, d.as_secs());
    out.push(b'.');
    push_padded(out, d.subsec_micros() as u64, 6);
}

/// Backend addresses as text, for the backends a worker logs most: a pool rarely has
/// more, and rendering one took five numbers (about 300 instructions a line).
#[derive(Default)]
struct AddrTexts(Vec<(SocketAddr, Box<[u8]>)>);

impl AddrTexts {
    const MAX: usize = 16;

    fn push(&mut self, out: &mut Vec<u8>, addr: SocketAddr) {
        if let Some((_, text)) = self.0.iter().find(|(a, _)| *a == addr) {
            out.extend_from_slice(text);
            return;
        }
        let start = out.len();
        push_addr(out, addr);
        if self.0.len() < Self::MAX {
            self.0.push((addr, out[start..].into()));
        }
    }
}

fn push_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            for (i, o) in a.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, *o as u64);
            }
            out.push(b':');
            push_decimal(out, a.port() as u64);
        }
        a => {
            let _ = write!(out, "{a}");
        }
    }
}

fn escape(out: &mut Vec<u8>, style: Style, s: &[u8], space: bool) {
    match style {
        Style::Text => push_escaped(out, s, space),
        Style::Json | Style::JsonEscaped => push_json_escaped(out, s),
    }
}

/// Copies `s`, writing `"`, `\`, controls and bytes past ASCII as `\xHH`, as nginx
/// does, and spaces too when `space`: a line always splits into its fields, and a
/// client cannot forge one.
fn push_escaped(out: &mut Vec<u8>, s: &[u8], space: bool) {
    // Bit 0: plain inside quotes; bit 1: plain anywhere (not a space either).
    const PLAIN: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut b = 0x20;
        while b <= 0x7e {
            if b != b'"' as usize && b != b'\\' as usize {
                t[b] = if b == b' ' as usize { 1 } else { 3 };
            }
            b += 1;
        }
        t
    };
    let need = if space { 2 } else { 1 };
    let plain = |b: u8| PLAIN[b as usize] & need != 0;
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

/// Copies `s` as the inside of a JSON string (RFC 8259 §7). Bytes that are not UTF-8
/// (a field value may hold any) become U+FFFD, so every line parses.
fn push_json_escaped(out: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for c in String::from_utf8_lossy(s).chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let b = c as u8;
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

// ---- a worker's buffer ----------------------------------------------------------------

/// The time of a line, its date parts formatted once per second.
#[derive(Clone, Copy)]
struct Stamp {
    secs: u64,
    millis: u32,
    /// `2026-11-25T00:12:17.`
    iso: [u8; 20],
    /// `25/Nov/2026:00:12:17 +0000`
    local: [u8; 26],
}

/// A worker's unwritten lines.
#[derive(Default)]
pub struct LogBuf {
    buf: RefCell<Vec<u8>>,
    addrs: RefCell<AddrTexts>,
    /// The last line's time; `None` before the first.
    stamp: Cell<Option<Stamp>>,
    /// Signalled when a line goes into an empty buffer: the flusher starts its wait.
    pending: Notify,
}

impl LogBuf {
    /// Appends the line `line` writes; writes the buffer if it is full.
    fn record(&self, shared: &Shared, line: impl FnOnce(&mut Vec<u8>, &Stamp, &mut AddrTexts)) {
        let stamp = self.stamp(SystemTime::now());
        let full = {
            let mut buf = self.buf.borrow_mut();
            if buf.is_empty() {
                self.pending.notify_one();
            }
            line(&mut buf, &stamp, &mut self.addrs.borrow_mut());
            buf.len() >= FLUSH_BYTES
        };
        if full {
            self.flush(shared);
        }
    }

    fn stamp(&self, now: SystemTime) -> Stamp {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (secs, millis) = (since.as_secs(), since.subsec_millis());
        let mut stamp = match self.stamp.get() {
            Some(s) if s.secs == secs => s,
            _ => Stamp {
                secs,
                millis,
                iso: date_time_prefix(secs),
                local: local_time(secs),
            },
        };
        stamp.millis = millis;
        self.stamp.set(Some(stamp));
        stamp
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
}

/// `n` in `width` digits, zero-padded (`n` < 10^width).
fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    crate::codec::push_digits(out, n, width);
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
    push_clock(&mut v, s);
    v.push(b'.');
    let mut out = [0u8; 20];
    out.copy_from_slice(&v);
    out
}

/// `HH:MM:SS` for `s` seconds into a day.
fn push_clock(v: &mut Vec<u8>, s: u64) {
    push_padded(v, s / 3600, 2);
    v.push(b':');
    push_padded(v, s / 60 % 60, 2);
    v.push(b':');
    push_padded(v, s % 60, 2);
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

/// `DD/Mon/YYYY:HH:MM:SS +0000` (nginx's `$time_local`, here always UTC) for `secs`.
fn local_time(secs: u64) -> [u8; 26] {
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
    ];
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let mut v = Vec::with_capacity(26);
    push_padded(&mut v, d as u64, 2);
    v.push(b'/');
    v.extend_from_slice(MONTHS[(m as usize).clamp(1, 12) - 1]);
    v.push(b'/');
    push_padded(&mut v, y.clamp(0, 9999) as u64, 4);
    v.push(b':');
    push_clock(&mut v, s);
    v.extend_from_slice(b" +0000");
    let mut out = [0u8; 26];
    out.copy_from_slice(&v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(spec: &str, target: &str, request_id: &str) -> Record {
        let format = Arc::new(LogFormat::parse(spec).unwrap());
        let fields = format
            .headers
            .iter()
            .map(|h| match h.as_str() {
                "user-agent" => Some(HeaderValue::from_static("curl/8.5.0 (x86_64)")),
                _ => None,
            })
            .collect();
        Record {
            conn: Rc::new(ConnInfo::new("192.0.2.7:50123".parse().unwrap(), false)),
            format,
            start: Instant::now(),
            method: Method::GET,
            target: Some(PathAndQuery::try_from(target).unwrap()),
            version: Version::HTTP_11,
            request_id: HeaderValue::from_bytes(request_id.as_bytes()).unwrap(),
            host: Some(HeaderValue::from_static("Example.COM:8080")),
            conn_requests: 0,
            body_end: None,
            fields,
            sent_fields: Box::new([]),
            head_in: 0,
            body_in: None,
            head_out: 0,
            snap: None,
            answer: Some(Answered {
                status: 200,
                pool: None,
                backend: Some("10.0.0.5:8080".parse().unwrap()),
                head_time: Duration::from_micros(1_412),
                connect_time: Duration::from_micros(250),
                tries: 2,
                error: None,
                route: None,
            }),
            sent: 13,
            body_failed: false,
            ended: None,
            unparsed: false,
            discarded: false,
        }
    }

    fn line(r: &Record, at_millis: u64, termination: &str) -> String {
        let b = LogBuf::default();
        let stamp = b.stamp(UNIX_EPOCH + Duration::from_millis(at_millis));
        let mut out = Vec::new();
        render(
            &mut out,
            r,
            &stamp,
            &mut AddrTexts::default(),
            Duration::from_micros(2_500),
            termination,
            None,
        );
        String::from_utf8(out).unwrap()
    }

    // 2026-11-25T00:12:17.561Z
    const AT: u64 = 1_795_565_537_561;

    #[test]
    fn the_upstream_response_time_ends_with_the_backend_s_body() {
        let spec = "$upstream_status $upstream_response_time $request_time [$uri] [$args] [$is_args] $connection \
                    $upstream_connect_time";
        let mut r = record(spec, "/p/a%20b?q=1&r", "x");
        // Its body ended 1 ms in; the request, 2.5 ms in (the last write).
        r.body_end = Some(r.start + Duration::from_millis(1));
        assert_eq!(
            line(&r, AT, COMPLETE),
            "200 0.001000 0.002500 [/p/a%20b] [q=1&r] [?] - 0.000250\n"
        );
        // Without a body's end seen (a tunnel, a body never polled): the request's end.
        r.body_end = None;
        assert!(line(&r, AT, COMPLETE).starts_with("200 0.002500 0.002500 "));
        // rampart's own answer: no backend, so none of them.
        r.answer.as_mut().unwrap().backend = None;
        let l = line(&r, AT, COMPLETE);
        assert!(l.starts_with("- - 0.002500 ") && l.ends_with(" - -\n"), "{l}");
        // In JSON: null for what does not exist, and `$is_args` an empty string.
        let mut j = record("json", "/", "x");
        let template = LogFormat::parse("{\"s\":$upstream_status,\"a\":$args,\"i\":$is_args}").unwrap();
        j.format = Arc::new(LogFormat {
            style: Style::Json,
            ..template
        });
        j.answer.as_mut().unwrap().backend = None;
        assert_eq!(line(&j, AT, COMPLETE), "{\"s\":null,\"a\":null,\"i\":\"\"}\n");
    }

    #[test]
    fn the_connection_s_scheme_port_and_tls_are_logged() {
        let spec =
            "$scheme $server_port $ssl_protocol $ssl_cipher $ssl_server_name $ssl_client_verify [$ssl_client_s_dn]";
        let mut r = record(spec, "/", "x");
        r.conn = Rc::new(ConnInfo::new("192.0.2.7:50123".parse().unwrap(), false).on_port(8080));
        assert_eq!(line(&r, AT, COMPLETE), "http 8080 - - - - [-]\n");
        let tls = crate::tls::TlsFacts {
            protocol: "TLSv1.3",
            cipher: "TLS13_AES_128_GCM_SHA256",
            server_name: Some(HeaderValue::from_static("api.example.com")),
            client_subject: Some(HeaderValue::from_static("CN=alice,O=Example Org")),
            client_verify: "SUCCESS",
        };
        r.conn = Rc::new(
            ConnInfo::new("192.0.2.7:50123".parse().unwrap(), true)
                .on_port(443)
                .with_tls_facts(tls),
        );
        assert_eq!(
            line(&r, AT, COMPLETE),
            "https 443 TLSv1.3 TLS13_AES_128_GCM_SHA256 api.example.com SUCCESS [CN=alice,O=Example Org]\n"
        );
    }

    #[test]
    fn the_rampart_line_has_every_field_in_order() {
        let r = record("rampart", "/a?b=1", "abc123");
        assert_eq!(
            line(&r, AT, COMPLETE),
            "2026-11-25T00:12:17.561Z 192.0.2.7 \"GET /a?b=1 HTTP/1.1\" 200 13 0.002500 0.001412 - 10.0.0.5:8080 2 - abc123\n"
        );
        let mut r = record("rampart", "/", "");
        r.version = Version::HTTP_2;
        r.answer = Some(Answered {
            status: 503,
            pool: None,
            backend: None,
            head_time: Duration::ZERO,
            connect_time: Duration::ZERO,
            tries: 3,
            error: Some("connect_failed"),
            route: None,
        });
        r.sent = 0;
        assert_eq!(
            line(&r, 0, "connect_failed"),
            "1970-01-01T00:00:00.000Z 192.0.2.7 \"GET / HTTP/2.0\" 503 0 0.002500 - - - 3 connect_failed \n"
        );
        r.answer = None;
        assert!(line(&r, 0, CLIENT_ABORTED).contains(" 499 0 0.002500 - - - 0 client_aborted "));
    }

    #[test]
    fn combined_is_nginx_s_combined() {
        let r = record("combined", "/x", "id");
        assert_eq!(
            line(&r, AT, COMPLETE),
            "192.0.2.7 - - [25/Nov/2026:00:12:17 +0000] \"GET /x HTTP/1.1\" 200 13 \"-\" \"curl/8.5.0 (x86_64)\"\n"
        );
    }

    #[test]
    fn the_filter_keeps_errors_slow_retried_and_cut_requests() {
        let f = LogFilter {
            min_status: Some(400),
            slower_than: Some(Duration::from_millis(500)),
        };
        let fast = Duration::from_millis(2);
        assert!(!f.wants(200, fast, 1, COMPLETE));
        assert!(!f.wants(304, fast, 1, COMPLETE));
        assert!(f.wants(404, fast, 1, "no_route"));
        assert!(f.wants(200, Duration::from_millis(500), 1, COMPLETE), "slow");
        assert!(f.wants(200, fast, 2, COMPLETE), "retried");
        assert!(f.wants(200, fast, 1, CLIENT_ABORTED));
        assert!(f.wants(200, fast, 1, UPSTREAM_BODY_FAILED));
        assert!(f.wants(101, fast, 1, TUNNEL_ERROR));
        assert!(!f.wants(101, fast, 1, "tunnel_idle_timeout"));
        let status_only = LogFilter {
            min_status: Some(500),
            slower_than: None,
        };
        assert!(!status_only.wants(404, Duration::from_secs(60), 1, "no_route"));
        assert!(status_only.wants(503, fast, 1, "no_healthy_backend"));
    }

    #[test]
    fn remote_user_is_the_basic_user() {
        let mut r = record("combined", "/x", "id");
        let at = r
            .format
            .headers
            .iter()
            .position(|h| h == http::header::AUTHORIZATION)
            .unwrap();
        // "alice b:pw": a space in the user is escaped, as the field is unquoted.
        r.fields[at] = Some(HeaderValue::from_static("Basic YWxpY2UgYjpwdw=="));
        assert!(line(&r, AT, COMPLETE).starts_with("192.0.2.7 - alice\\x20b [25/Nov/2026"));
        r.fields[at] = Some(HeaderValue::from_static("Bearer abc"));
        assert!(line(&r, AT, COMPLETE).starts_with("192.0.2.7 - - [25/Nov/2026"));
        let mut j = record("{\"u\":$remote_user}", "/x", "id");
        assert_eq!(line(&j, AT, COMPLETE), "{\"u\":-}\n");
        j.fields[0] = Some(HeaderValue::from_static("Basic YWxpY2U6cHc="));
        assert_eq!(line(&j, AT, COMPLETE), "{\"u\":alice}\n");
    }

    #[test]
    fn json_lines_parse_with_typed_values_and_nulls() {
        let mut r = record("json", "/q?a=%22x%22", "id \"1\"\t");
        r.fields[0] = Some(HeaderValue::from_bytes(b"caf\xc3\xa9 \xff").unwrap());
        let l = line(&r, AT, COMPLETE);
        assert!(l.ends_with("}\n") && l.matches('\n').count() == 1, "{l}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["time"], "2026-11-25T00:12:17.561Z");
        assert_eq!(v["status"], 200);
        assert_eq!(v["body_bytes_sent"], 13);
        assert_eq!(v["request_time"], 0.0025);
        assert_eq!(v["upstream_header_time"], 0.001412);
        assert_eq!(v["upstream_attempts"], 2);
        assert_eq!(v["pool"], serde_json::Value::Null);
        assert_eq!(v["host"], "example.com");
        assert_eq!(v["request_uri"], "/q?a=%22x%22");
        assert_eq!(v["request_id"], "id \"1\"\t");
        assert_eq!(v["termination"], "-");
        assert_eq!(v["http_referer"], "caf\u{e9} \u{fffd}");
        assert_eq!(v["http_user_agent"], "curl/8.5.0 (x86_64)");
    }

    #[test]
    fn templates_take_nginx_variables_and_any_request_field() {
        let f =
            LogFormat::parse("$remote_addr:$remote_port ${status}ok $http_X_Forwarded_For $http_x_forwarded_for $msec")
                .unwrap();
        assert_eq!(
            f.headers,
            [HeaderName::from_static("x-forwarded-for")],
            "one capture per field"
        );
        let mut r = record(
            "$remote_addr:$remote_port ${status}ok [$http_user_agent] $msec $host $termination",
            "/",
            "i",
        );
        r.format = Arc::new(
            LogFormat::parse("$remote_addr:$remote_port ${status}ok [$http_user_agent] $msec $host $termination")
                .unwrap(),
        );
        r.fields = vec![Some(HeaderValue::from_static("a\"b"))].into();
        assert_eq!(
            line(&r, AT, UPSTREAM_BODY_FAILED),
            "192.0.2.7:50123 200ok [a\\x22b] 1795565537.561 example.com upstream_body_failed\n"
        );
    }

    #[test]
    fn a_json_template_with_json_escaping_parses_whatever_the_client_sent() {
        let spec = r#"{"ua":"$http_user_agent","uri":"$request_uri","req":"$request","status":$status,"pool":"$pool","rt":$request_time,"t":"$time_iso8601"}"#;
        let mut r = record(spec, "/q?a=%22x%22", "i");
        let mut f = LogFormat::parse(spec).unwrap();
        f.escape_json().unwrap();
        r.format = Arc::new(f);
        r.fields = vec![Some(HeaderValue::from_bytes(b"a\"b\\c\td \xff").unwrap())].into();
        let l = line(&r, AT, COMPLETE);
        assert_eq!(l.matches('\n').count(), 1, "{l}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["ua"], "a\"b\\c\td \u{fffd}");
        assert_eq!(v["req"], "GET /q?a=%22x%22 HTTP/1.1");
        assert_eq!(v["status"], 200);
        // No pool: nothing, as nginx's `escape=json` writes a value that is not there.
        assert_eq!(v["pool"], "");
        assert_eq!(v["rt"], 0.0025);
        assert_eq!(v["t"], "2026-11-25T00:12:17.561Z");
        // Without it, the same template writes nginx's default escapes: not JSON.
        r.format = Arc::new(LogFormat::parse(spec).unwrap());
        let l = line(&r, AT, COMPLETE);
        assert!(l.contains(r#""ua":"a\x22b\x5Cc\x09d \xFF""#), "{l}");
        assert!(serde_json::from_str::<serde_json::Value>(&l).is_err());
        assert!(LogFormat::parse("json").unwrap().escape_json().is_err());
    }

    #[test]
    fn sent_http_takes_a_response_field_from_the_map_the_backends_fields_or_the_body() {
        let mut r = record("rampart", "/", "i");
        r.format = Arc::new(
            LogFormat::parse("[$sent_http_Content_Type] [$sent_http_content_length] [$sent_http_x_none]").unwrap(),
        );
        assert_eq!(r.format.sent_headers.len(), 3);
        // No head yet (a request hyper refused): none.
        assert_eq!(line(&r, AT, COMPLETE), "[-] [-] [-]\n");
        let mut resp = http::Response::new(RespBody::from(Bytes::from_static(b"hello")));
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r.sent_fields = r
            .format
            .sent_headers
            .iter()
            .map(|n| sent_field(&resp, None, n))
            .collect();
        assert_eq!(line(&r, AT, COMPLETE), "[text/plain] [5] [-]\n");
    }

    #[test]
    fn a_bad_format_says_what_is_wrong() {
        for (spec, want) in [
            ("main", "must be \"rampart\", \"combined\", \"json\" or a template"),
            (
                "$status $geoip_country_code",
                "unknown variable $geoip_country_code; known: $remote_addr",
            ),
            ("$ status", "a \"$\" must start a variable name"),
            ("${status", "with no closing"),
            ("$status\n$pool", "control characters"),
            ("${http_a b}", "is not a header field name"),
            ("${sent_http_a b}", "is not a header field name"),
        ] {
            let e = LogFormat::parse(spec).unwrap_err();
            assert!(e.contains(want), "{spec:?}: {e}");
        }
        assert_eq!(LogFormat::parse("rampart").unwrap(), LogFormat::default());
        assert_ne!(LogFormat::parse("json").unwrap(), LogFormat::default());
    }

    #[test]
    fn quotes_spaces_and_controls_cannot_forge_a_field_or_a_line() {
        // A target cannot hold a quote or a control (`http::Uri` refuses them), but a
        // field value can hold a tab and bytes past ASCII.
        let r = record("rampart", "/x", "id 1\"\t2026 fake\\\u{e9}");
        let l = line(&r, 0, COMPLETE);
        assert!(l.ends_with(" id\\x201\\x22\\x092026\\x20fake\\x5C\\xC3\\xA9\n"), "{l}");
        assert_eq!(l.matches('\n').count(), 1);
    }

    #[test]
    fn every_byte_outside_printable_ascii_is_escaped() {
        for b in 0..=255u8 {
            for space in [false, true] {
                let mut out = Vec::new();
                push_escaped(&mut out, &[b], space);
                let plain = (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\' && !(space && b == b' ');
                let want = if plain {
                    vec![b]
                } else {
                    format!("\\x{b:02X}").into_bytes()
                };
                assert_eq!(out, want, "byte {b:#04x}");
            }
            let mut out = vec![b'"'];
            push_json_escaped(&mut out, &[b]);
            out.push(b'"');
            assert!(serde_json::from_slice::<String>(&out).is_ok(), "byte {b:#04x}");
        }
    }

    #[test]
    fn backend_addresses_are_kept_as_text_for_the_next_line() {
        let mut texts = AddrTexts::default();
        let addrs: Vec<SocketAddr> = (0..20u16)
            .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 8000 + i)))
            .chain(["[2001:db8::1]:443".parse().unwrap()])
            .collect();
        for round in 0..2 {
            for a in &addrs {
                let mut out = b"x".to_vec();
                texts.push(&mut out, *a);
                assert_eq!(out, format!("x{a}").into_bytes(), "round {round}");
            }
        }
        assert_eq!(texts.0.len(), AddrTexts::MAX);
    }

    #[test]
    fn dates_match_the_calendar() {
        for (secs, iso, local) in [
            (0u64, "1970-01-01T00:00:00.", "01/Jan/1970:00:00:00 +0000"),
            (951_782_400, "2000-02-29T00:00:00.", "29/Feb/2000:00:00:00 +0000"),
            (1_709_251_199, "2024-02-29T23:59:59.", "29/Feb/2024:23:59:59 +0000"),
            (4_102_444_800, "2100-01-01T00:00:00.", "01/Jan/2100:00:00:00 +0000"),
            (1_795_565_537, "2026-11-25T00:12:17.", "25/Nov/2026:00:12:17 +0000"),
            (1_796_601_599, "2026-12-06T23:59:59.", "06/Dec/2026:23:59:59 +0000"),
        ] {
            assert_eq!(std::str::from_utf8(&date_time_prefix(secs)).unwrap(), iso, "{secs}");
            assert_eq!(std::str::from_utf8(&local_time(secs)).unwrap(), local, "{secs}");
        }
    }
}
