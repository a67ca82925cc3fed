//! The PROXY protocol (HAProxy's; version 1, text, and version 2, binary) on a
//! listener with `proxy_protocol = true`: behind a layer-4 balancer (AWS NLB,
//! HAProxy in TCP mode), each connection starts with a header naming the real
//! client, which then stands for the peer everywhere (`X-Forwarded-For`, the access
//! log, `hash_key = "client_ip"`). A connection without a valid header is closed, as
//! nginx and HAProxy do: on such a listener, a connection that skipped the balancer
//! could otherwise pass for any client.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v1's longest header (`PROXY TCP6` with two full addresses), CRLF included.
const V1_MAX: usize = 107;
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v2 headers larger than this (many TLVs) are refused.
const V2_MAX: usize = 1024;

/// Reads the header off `stream`, leaving the first request's bytes in the socket,
/// within `wait`. Returns the client's address (`peer` for a `LOCAL` or `UNKNOWN`
/// header: the balancer's own connection, a health check), or `None` if the header
/// is missing, malformed or late.
pub async fn read_header(stream: &mut TcpStream, peer: SocketAddr, wait: Duration) -> Option<SocketAddr> {
    match tokio::time::timeout(wait, read(stream, peer)).await {
        Ok(Ok(addr)) => Some(addr),
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "no valid PROXY protocol header; closed");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %peer, "no PROXY protocol header within client_header_timeout; closed");
            None
        }
    }
}

async fn read(stream: &mut TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let mut buf = vec![0u8; V2_MAX];
    // Peeked until the header is whole, then read exactly: what follows is the
    // request, for the protocol detection that comes next.
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(invalid("closed before a PROXY header"));
        }
        match parse(&buf[..n], peer)? {
            Some((len, addr)) => {
                stream.read_exact(&mut buf[..len]).await?;
                return Ok(addr);
            }
            // A header split over segments: wait for the rest (rare; balancers send
            // it in one write). The socket stays readable while bytes are queued, so
            // `peek` would return at once.
            None if n < buf.len() => tokio::time::sleep(Duration::from_millis(1)).await,
            None => return Err(invalid("PROXY header too long")),
        }
    }
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// The header's length and the client address, `None` if `b` holds only part of a
/// header so far, or an error if it cannot be one.
fn parse(b: &[u8], peer: SocketAddr) -> io::Result<Option<(usize, SocketAddr)>> {
    if b.starts_with(b"PROXY ") {
        return parse_v1(b, peer);
    }
    if b"PROXY ".starts_with(b) {
        return Ok(None);
    }
    let n = b.len().min(V2_SIGNATURE.len());
    if b[..n] != V2_SIGNATURE[..n] {
        return Err(invalid("not a PROXY protocol header"));
    }
    if b.len() < 16 {
        return Ok(None);
    }
    parse_v2(b, peer)
}

fn parse_v1(b: &[u8], peer: SocketAddr) -> io::Result<Option<(usize, SocketAddr)>> {
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        return if b.len() < V1_MAX {
            Ok(None)
        } else {
            Err(invalid("PROXY v1 line too long"))
        };
    };
    if end + 2 > V1_MAX {
        return Err(invalid("PROXY v1 line too long"));
    }
    let line = std::str::from_utf8(&b[6..end]).map_err(|_| invalid("PROXY v1 line not ASCII"))?;
    let mut f = line.split(' ');
    let addr = match f.next() {
        Some("UNKNOWN") => peer,
        Some(family @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(_dst), Some(sport), Some(_dport), None) =
                (f.next(), f.next(), f.next(), f.next(), f.next())
            else {
                return Err(invalid("PROXY v1 line has the wrong number of fields"));
            };
            let ip: IpAddr = src.parse().map_err(|_| invalid("PROXY v1 source address"))?;
            if ip.is_ipv4() != (family == "TCP4") {
                return Err(invalid("PROXY v1 address does not match its family"));
            }
            let port: u16 = sport.parse().map_err(|_| invalid("PROXY v1 source port"))?;
            SocketAddr::new(ip, port)
        }
        _ => return Err(invalid("PROXY v1 family")),
    };
    Ok(Some((end + 2, addr)))
}

fn parse_v2(b: &[u8], peer: SocketAddr) -> io::Result<Option<(usize, SocketAddr)>> {
    let (ver_cmd, family) = (b[12], b[13]);
    let len = 16 + u16::from_be_bytes([b[14], b[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Err(invalid("PROXY v2 version"));
    }
    if len > V2_MAX {
        return Err(invalid("PROXY v2 header too long"));
    }
    if b.len() < len {
        return Ok(None);
    }
    let a = &b[16..len];
    let addr = match (ver_cmd & 0x0f, family >> 4) {
        // LOCAL: the balancer speaking for itself (a health check).
        (0, _) => peer,
        (1, 1) if a.len() >= 12 => {
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            SocketAddr::new(ip.into(), u16::from_be_bytes([a[8], a[9]]))
        }
        (1, 2) if a.len() >= 36 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&a[..16]);
            SocketAddr::new(Ipv6Addr::from(ip).into(), u16::from_be_bytes([a[32], a[33]]))
        }
        // AF_UNSPEC or a unix socket: nothing to stand for the peer.
        (1, 0 | 3) => peer,
        (1, _) => return Err(invalid("PROXY v2 addresses too short")),
        _ => return Err(invalid("PROXY v2 command")),
    };
    Ok(Some((len, addr)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "10.0.0.9:4000".parse().unwrap()
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h, peer()).unwrap(),
            Some((41, "203.0.113.7:5555".parse().unwrap()))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 443\r\n";
        assert_eq!(
            parse(h, peer()).unwrap(),
            Some((h.len(), "[2001:db8::1]:5555".parse().unwrap()))
        );
        let h = b"PROXY UNKNOWN\r\n";
        assert_eq!(parse(h, peer()).unwrap(), Some((h.len(), peer())));
        assert_eq!(parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 55", peer()).unwrap(), None);
        assert_eq!(parse(b"PRO", peer()).unwrap(), None);
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 2001:db8::1 10.0.0.1 5555 80\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 5555\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 99999 80\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.1 5555 80\r\n",
            &[b'x'; 120][..],
        ] {
            assert!(parse(bad, peer()).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn v2(cmd: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20 | cmd, family]);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[test]
    fn v2_headers() {
        let mut a = vec![203, 0, 113, 7, 10, 0, 0, 1];
        a.extend_from_slice(&5555u16.to_be_bytes());
        a.extend_from_slice(&80u16.to_be_bytes());
        a.extend_from_slice(&[0x03, 0x00, 0x04, 1, 2, 3, 4]); // a CRC32C TLV, skipped
        let h = v2(1, 0x11, &a);
        assert_eq!(
            parse(&h, peer()).unwrap(),
            Some((h.len(), "203.0.113.7:5555".parse().unwrap()))
        );
        // Partial, then whole.
        assert_eq!(parse(&h[..20], peer()).unwrap(), None);
        assert_eq!(parse(&h[..5], peer()).unwrap(), None);

        let mut a: Vec<u8> = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        a.extend_from_slice(&[0; 16]);
        a.extend_from_slice(&5555u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x21, &a);
        assert_eq!(
            parse(&h, peer()).unwrap(),
            Some((h.len(), "[2001:db8::1]:5555".parse().unwrap()))
        );

        let h = v2(0, 0x00, &[]);
        assert_eq!(parse(&h, peer()).unwrap(), Some((16, peer())));

        assert!(parse(&v2(1, 0x11, &[1, 2, 3]), peer()).is_err(), "addresses too short");
        assert!(parse(&v2(7, 0x11, &[0; 12]), peer()).is_err(), "unknown command");
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert!(parse(&wrong_version, peer()).is_err());
    }
}
