//! Socket helpers: reading a tokio socket into hyper's buffer (`idle::ParkIo`), and
//! the kernel's round-trip estimate for a connection (`upstream::Conn`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::rt::ReadBufCursor;
use tokio::io::AsyncRead;
use tokio::net::TcpStream;

/// Reads from `stream` into hyper's cursor; returns how many bytes arrived (0 is EOF).
pub fn poll_read_into(
    stream: &mut TcpStream,
    cx: &mut Context<'_>,
    mut buf: ReadBufCursor<'_>,
) -> Poll<io::Result<usize>> {
    // SAFETY: as in hyper-util's `TokioIo`: tokio's `ReadBuf` only writes into the
    // uninitialised tail and reports how much it filled; we advance by exactly that.
    let n = unsafe {
        let mut tbuf = tokio::io::ReadBuf::uninit(buf.as_mut());
        match Pin::new(stream).poll_read(cx, &mut tbuf) {
            Poll::Ready(Ok(())) => tbuf.filled().len(),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    };
    // SAFETY: `n` bytes were just initialised by the read above.
    unsafe { buf.advance(n) };
    Poll::Ready(Ok(n))
}

/// The kernel's smoothed round-trip time estimate for `stream` (`TCP_INFO`), if any.
#[cfg(target_os = "linux")]
pub fn smoothed_rtt(stream: &TcpStream) -> Option<std::time::Duration> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers, valid when zeroed; the kernel fills at most
    // `len` bytes of it and reports how many.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| std::time::Duration::from_micros(info.tcpi_rtt as u64))
}

#[cfg(not(target_os = "linux"))]
pub fn smoothed_rtt(_stream: &TcpStream) -> Option<std::time::Duration> {
    None
}
