//! Checks shared by the delivery tests over plain TCP and over TLS: where the server recorded a
//! session, where a resumed response starts, and byte-exact comparisons.
#![allow(dead_code)]

use super::server::Response;
use roam::service::Service;
use roam::session::SessionKey;
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
/// The store key the server uses for (`id`, `rel`).
pub fn session_key(svc: &Service, id: &str, rel: &str) -> SessionKey {
    svc.session_key(id, Path::new(rel))
        .expect("minted id verifies")
}

/// Recorded offset of a session, if any.
pub fn recorded(svc: &Service, key: &SessionKey) -> Option<u64> {
    svc.sessions().store().table().get(key).map(|p| p.offset)
}

/// Waits until the server's recorded offset for `key` exists and has not moved for 300 ms: the
/// connection sending it is blocked on full buffers.
pub fn wait_until_stalled(svc: &Service, key: &SessionKey) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    let mut since = Instant::now();
    loop {
        let now = recorded(svc, key);
        if now != last {
            last = now;
            since = Instant::now();
        } else if last.is_some() && since.elapsed() >= Duration::from_millis(300) {
            return last.unwrap_or(0);
        }
        assert!(
            Instant::now() < deadline,
            "the sender never stalled (offset {last:?})"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A loopback connection with a fixed, small receive buffer (set before connect, so it also
/// fixes the advertised window): how much the kernel holds for a client that stopped reading
/// is then bounded and the file is large enough that the sender surely blocks mid-file.
pub fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: usize) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
    sock.connect(&addr.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads until EOF or an error; returns what arrived and how it ended (`Ok` for EOF, the
/// error kind otherwise).
pub fn drain(s: &mut TcpStream) -> (Vec<u8>, Result<(), ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (out, Err(e.kind())),
        }
    }
}

/// `Content-Range: bytes S-E/LEN` as (S, E, LEN).
pub fn parse_content_range(value: &str) -> (u64, u64, u64) {
    let rest = value
        .strip_prefix("bytes ")
        .unwrap_or_else(|| panic!("not a byte Content-Range: {value:?}"));
    let (span, len) = rest.split_once('/').expect("Content-Range has /");
    let (s, e) = span.split_once('-').expect("Content-Range has -");
    (
        s.parse().expect("start"),
        e.parse().expect("end"),
        len.parse().expect("length"),
    )
}

/// The start a resumed (no-Range) response declares, with its framing checked: `200` from 0,
/// or `206` with `Content-Range: bytes S-(len-1)/len` and `Roam-Offset: S`.
pub fn resumed_start(resp: &Response, len: u64) -> u64 {
    let offset: u64 = resp
        .header("roam-offset")
        .expect("resumed responses carry Roam-Offset")
        .parse()
        .unwrap();
    let content_length: u64 = resp.header("content-length").unwrap().parse().unwrap();
    match resp.status {
        200 => {
            assert_eq!(offset, 0, "200 must start at 0");
            assert_eq!(content_length, len);
            0
        }
        206 => {
            let (s, e, total) = parse_content_range(resp.header("content-range").unwrap());
            assert_eq!(total, len);
            assert_eq!(e, len - 1, "a resumed response runs to the end");
            assert_eq!(s, offset, "Roam-Offset must equal the Content-Range start");
            assert_eq!(content_length, len - s);
            s
        }
        other => panic!("unexpected status {other} for a resumed download: {resp:?}"),
    }
}

/// Asserts `got == want` without printing megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: {} bytes vs {} expected, first difference at byte {first}",
        got.len(),
        want.len()
    );
}
