//! gRPC's health checking protocol (`grpc.health.v1.Health/Check`), the check a
//! pool with `health_check = { type = "grpc" }` sends over HTTP/2 (`health`): the
//! request message, the fields gRPC wants, and the verdict read from the answer.
//! A backend passes only when the call ends with `grpc-status: 0` and the message
//! says `SERVING`, as Envoy's `grpc_health_check` judges it.
//!
//! The two messages are a string and an enum in protobuf's wire format, written and
//! read here by hand: a protobuf crate and generated code would be far more than
//! the dozen bytes they are.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::BodyExt;

/// The method every gRPC health service serves.
pub const PATH: &str = "/grpc.health.v1.Health/Check";

/// The answer read past this many bytes is not a health check's.
const ANSWER_LIMIT: usize = 64 * 1024;

/// `HealthCheckRequest { string service = 1; }` in a gRPC frame (not compressed,
/// then its length, big-endian). The empty service, the server as a whole, is an
/// empty message.
pub fn request(service: &str) -> Bytes {
    let mut msg = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(msg.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    Bytes::from(frame)
}

/// The fields a gRPC call carries beyond `:method POST` and its path; `timeout` (the
/// check's) goes as `grpc-timeout`, the call's deadline, which the server's handler
/// sees and a proxy in between enforces, as any gRPC client with a deadline sends it
/// (`grpc_health_probe -rpc-timeout`).
pub fn add_fields(headers: &mut HeaderMap, timeout: std::time::Duration) {
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    headers.insert("grpc-timeout", grpc_timeout(timeout));
}

/// A `grpc-timeout` value: at most 8 digits and a unit; milliseconds when they fit
/// (the check's timeout is rarely above a few seconds), else whole seconds, rounded
/// up so the server never gets less time than the check allows.
fn grpc_timeout(d: std::time::Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ms = d.as_millis().max(1);
    let text = if ms <= MAX {
        format!("{ms}m")
    } else {
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        format!("{}S", secs.min(MAX as u64))
    };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("99999999S"))
}

/// Whether the answer says the service is `SERVING`; else why not, for the log.
pub async fn verdict(resp: Response<hyper::body::Incoming>) -> Result<(), String> {
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}: not a gRPC answer", resp.status().as_u16()));
    }
    // A call that fails at once may end in its head ("Trailers-Only").
    if let Some(status) = grpc_status(resp.headers()) {
        return match status {
            Ok(0) => Err("grpc-status 0 with no message".into()),
            other => Err(failed(other, resp.headers())),
        };
    }
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let trailers = loop {
        match body.frame().await {
            None => break None,
            Some(Err(e)) => return Err(format!("body: {e}")),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    if data.len() + d.len() > ANSWER_LIMIT {
                        return Err(format!("answer longer than {ANSWER_LIMIT} bytes"));
                    }
                    data.extend_from_slice(&d);
                }
                Err(frame) => break frame.into_trailers().ok(),
            },
        }
    };
    let Some(trailers) = trailers else {
        return Err("no grpc-status: the call ended without trailers".into());
    };
    match grpc_status(&trailers) {
        Some(Ok(0)) => {}
        Some(other) => return Err(failed(other, &trailers)),
        None => return Err("no grpc-status in the trailers".into()),
    }
    match serving_status(&data)? {
        1 => Ok(()),
        n => Err(format!("status {}", status_name(n))),
    }
}

fn grpc_status(fields: &HeaderMap) -> Option<Result<u32, String>> {
    let v = fields.get("grpc-status")?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{v:?}")),
    )
}

fn failed(status: Result<u32, String>, fields: &HeaderMap) -> String {
    let code = match status {
        Ok(n) => format!("{n} ({})", code_name(n)),
        Err(raw) => raw,
    };
    match fields.get("grpc-message").and_then(|m| m.to_str().ok()) {
        Some(m) => format!("grpc-status {code}: {}", m.chars().take(200).collect::<String>()),
        None => format!("grpc-status {code}"),
    }
}

/// `HealthCheckResponse { ServingStatus status = 1; }` out of one gRPC frame.
/// A message without the field has proto3's default, 0 (`UNKNOWN`).
fn serving_status(data: &[u8]) -> Result<u64, String> {
    let [flag, l0, l1, l2, l3, msg @ ..] = data else {
        return Err(format!("a message of {} bytes, shorter than a gRPC frame", data.len()));
    };
    if *flag != 0 {
        return Err("a compressed message (rampart asks for none)".into());
    }
    let len = u32::from_be_bytes([*l0, *l1, *l2, *l3]) as usize;
    let msg = msg.get(..len).ok_or("a gRPC frame cut short")?;
    let mut status = 0;
    let mut at = msg;
    while !at.is_empty() {
        let key = varint(&mut at)?;
        match key & 7 {
            0 => {
                let v = varint(&mut at)?;
                if key >> 3 == 1 {
                    status = v; // the last one wins, as protobuf reads it
                }
            }
            1 => at = at.get(8..).ok_or("a message cut short")?,
            2 => {
                let n = usize::try_from(varint(&mut at)?).map_err(|_| "a field too long")?;
                at = at.get(n..).ok_or("a message cut short")?;
            }
            5 => at = at.get(4..).ok_or("a message cut short")?,
            t => return Err(format!("not a HealthCheckResponse (wire type {t})")),
        }
    }
    Ok(status)
}

fn varint(at: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = at.split_first().ok_or("a message cut short")?;
        *at = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a varint longer than 10 bytes".into())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn status_name(n: u64) -> String {
    match n {
        0 => "UNKNOWN".into(),
        2 => "NOT_SERVING".into(),
        3 => "SERVICE_UNKNOWN (the server has no such service)".into(),
        n => n.to_string(),
    }
}

fn code_name(n: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(n as usize).copied().unwrap_or("not a gRPC code")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_timeout_goes_as_grpc_timeout_in_8_digits_at_most() {
        let t = |ms: u64| grpc_timeout(std::time::Duration::from_millis(ms));
        assert_eq!(t(500), "500m");
        assert_eq!(t(2_000), "2000m");
        assert_eq!(t(0), "1m");
        assert_eq!(t(99_999_999), "99999999m");
        assert_eq!(t(100_000_000), "100000S");
        assert_eq!(t(100_000_001), "100001S");
    }

    #[test]
    fn the_request_is_a_framed_message_naming_the_service() {
        assert_eq!(&request("")[..], b"\0\0\0\0\0");
        assert_eq!(&request("a.B")[..], b"\0\0\0\0\x05\x0a\x03a.B");
        // A name of 200 bytes takes a two-byte length.
        let long = "x".repeat(200);
        let r = request(&long);
        assert_eq!(&r[..8], b"\0\0\0\0\xcb\x0a\xc8\x01");
        assert_eq!(r.len(), 5 + 3 + 200);
    }

    #[test]
    fn the_serving_status_is_read_past_fields_it_does_not_know() {
        assert_eq!(serving_status(b"\0\0\0\0\x02\x08\x01"), Ok(1));
        assert_eq!(serving_status(b"\0\0\0\0\x00"), Ok(0), "no field: UNKNOWN");
        // An unknown string field, a fixed64 and a fixed32 before the status.
        let msg = b"\x12\x02hi\x19\x01\x02\x03\x04\x05\x06\x07\x08\x25\x01\x02\x03\x04\x08\x02";
        let mut framed = vec![0, 0, 0, 0, msg.len() as u8];
        framed.extend_from_slice(msg);
        assert_eq!(serving_status(&framed), Ok(2));
        assert!(serving_status(b"\0\0\0")
            .unwrap_err()
            .contains("shorter than a gRPC frame"));
        assert!(serving_status(b"\x01\0\0\0\x02\x08\x01")
            .unwrap_err()
            .contains("compressed"));
        assert!(serving_status(b"\0\0\0\0\x09\x08\x01")
            .unwrap_err()
            .contains("cut short"));
        assert!(serving_status(b"\0\0\0\0\x01\x0b").unwrap_err().contains("wire type 3"));
        assert!(serving_status(b"\0\0\0\0\x02\x08\x81")
            .unwrap_err()
            .contains("cut short"));
    }
}
