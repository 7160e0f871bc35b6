//! Regression tests for defects an independent review reproduced against the server (issue 11),
//! each named after what broke, black-box over real TCP: a double takeover that repeated bytes,
//! an in-place rewrite near the end of a body that completed a spliced body, a replaced file
//! that kept its ETag and digest, a request head cut by a shutdown that got no answer; and the
//! three suspicions the review listed, confirmed and fixed or ruled out.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};
use support::server::{connect, get, get_with, pattern, read_response, request, Root, TestServer};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// A connection whose receive buffer (and so its advertised window) is fixed before connect.
fn connect_rcvbuf(addr: SocketAddr, bytes: usize) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(bytes).unwrap();
    sock.connect(&addr.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Reads a response head byte by byte; `None` if the connection ends first.
fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8(head).unwrap())
}

fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Where a response's body starts in the file: 0 for a 200, the first byte of its range for
/// a 206.
fn body_start(head: &str) -> u64 {
    if head.starts_with("HTTP/1.1 200") {
        return 0;
    }
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    let range = field(head, "content-range").unwrap();
    range["bytes ".len()..]
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Reads until EOF or an error, `chunk` bytes at a time with `pause` between reads.
fn read_all(s: &mut TcpStream, chunk: usize, pause: Duration) -> (Vec<u8>, Option<ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return (out, Some(e.kind())),
        }
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
}

/// Polls `cond` every 10 ms until it holds; fails after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bytes the server's socket for the connection from `client` has received but not read, from
/// `/proc/net/tcp` (`rx_queue`); `None` while the connection is not listed.
fn unread_by_server(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    fn hex(a: SocketAddr) -> String {
        let std::net::IpAddr::V4(ip) = a.ip() else {
            panic!("IPv4 only")
        };
        format!("{:08X}:{:04X}", u32::from_le_bytes(ip.octets()), a.port())
    }
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()) {
            let (_, rx) = f.get(4)?.split_once(':')?;
            u64::from_str_radix(rx, 16).ok()
        } else {
            None
        }
    })
}

fn recorded(srv: &TestServer, id: &str, rel: &str) -> Option<u64> {
    let key = srv
        .service
        .session_key(id, std::path::Path::new(rel))
        .unwrap();
    srv.service
        .sessions()
        .store()
        .table()
        .get(&key)
        .map(|r| r.offset)
}

/// Issue 11, 1: client A downloads slowly; B asks for the same session without `Range`, and C
/// a moment later. C aborted B while B waited for A; B's ownership then woke C at once, so C
/// never waited for A, and B had already begun a new epoch that made A's final record stale:
/// C started about 128 KiB before A's byte count, every time. Now every response that got a
/// head starts exactly where the previous sender's bytes ended.
#[test]
fn a_takeover_during_a_takeover_starts_where_the_last_sender_stopped() {
    const LEN: usize = 64 * MIB;
    let root = Root::new();
    let data = pattern(LEN, 31);
    root.file("big.bin", &data);
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/big.bin");

    let mut a = connect_rcvbuf(srv.addr, 256 * KIB);
    a.write_all(get(&target).as_bytes()).unwrap();
    let reader_a = std::thread::spawn(move || {
        let head = read_head(&mut a).expect("A's head");
        let (body, _) = read_all(&mut a, 16 * KIB, Duration::from_millis(2));
        (body_start(&head), body)
    });
    wait_until("A is well into the file", Duration::from_secs(30), || {
        recorded(&srv, &id, "big.bin").is_some_and(|o| o > 4 * MIB as u64)
    });
    let mut b = connect(srv.addr);
    b.write_all(get(&target).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(1));
    let mut c = connect(srv.addr);
    c.write_all(get(&target).as_bytes()).unwrap();
    let fetch = |mut s: TcpStream| {
        std::thread::spawn(move || {
            let head = read_head(&mut s)?;
            let (body, _) = read_all(&mut s, 256 * KIB, Duration::ZERO);
            Some((body_start(&head), body))
        })
    };
    let (reader_b, reader_c) = (fetch(b), fetch(c));
    let mut parts = vec![reader_a.join().unwrap()];
    parts.extend(reader_b.join().unwrap());
    parts.extend(reader_c.join().unwrap());
    parts.sort_by_key(|(start, body)| (*start, body.len()));
    // Laid end to end, as a client that appends them would: no repeat, no gap, the whole file.
    let mut have = 0u64;
    for (start, body) in &parts {
        assert_eq!(
            *start,
            have,
            "a response started at {start} but the bytes before it end at {have} \
             (starts and lengths: {:?})",
            parts.iter().map(|(s, b)| (*s, b.len())).collect::<Vec<_>>()
        );
        assert!(
            data[*start as usize..].starts_with(body),
            "wrong bytes at {start}"
        );
        have += body.len() as u64;
    }
    assert_eq!(have, LEN as u64, "the last taker reads to the end");
}

/// Issue 11, 2: the file was checked for an in-place rewrite only at progress milestones (every
/// 256 KiB): a rewrite while the sender was blocked after the last milestone, or anywhere in a
/// body shorter than one interval, went unnoticed and the client got a complete body with the
/// old version's start and the new version's end. Now a body never completes unless the file
/// is still the version it started with once every byte of the body has been read: the
/// connection is reset before the last byte.
///
/// The body is large, so `TCP_NOTSENT_LOWAT` bounds what the sender can queue ahead of a client
/// that stopped reading (16 KiB unsent, plus a 32 KiB window): when the rewrite happens the
/// sender is provably still before its final check. (Bytes it had already queued are sent from
/// the page cache and can show the new content; the promise is that such a body never ends.)
#[test]
fn an_in_place_rewrite_after_the_last_milestone_never_completes_a_spliced_body() {
    const LEN: usize = 8 * MIB;
    let root = Root::new();
    let path = root.file("live.bin", &vec![b'A'; LEN]);
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let mut s = connect_rcvbuf(srv.addr, 32 * KIB);
    s.write_all(get_with(&format!("/{id}/live.bin"), &["Range: bytes=0-"]).as_bytes())
        .unwrap();
    let head = read_head(&mut s).unwrap();
    assert!(head.starts_with("HTTP/1.1 206"), "{head}");
    // Read up to 100 KiB before the end (past the last 256 KiB milestone), then stop reading
    // until the sender is blocked.
    let mut got = vec![0u8; LEN - 100 * KIB];
    s.read_exact(&mut got).unwrap();
    wait_until("the sender blocks", Duration::from_secs(10), || {
        let a = recorded(&srv, &id, "live.bin");
        std::thread::sleep(Duration::from_millis(100));
        a == recorded(&srv, &id, "live.bin")
    });
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(&vec![b'B'; LEN]).unwrap();
    f.sync_all().unwrap();
    let (rest, error) = read_all(&mut s, 64 * KIB, Duration::ZERO);
    got.extend_from_slice(&rest);
    if got.len() == LEN {
        assert!(
            got.iter().all(|&b| b == b'A'),
            "a complete body spliced from two versions: {} bytes of A, then B",
            got.iter().position(|&b| b != b'A').unwrap_or(0)
        );
    } else {
        assert!(got.len() < LEN);
        assert_eq!(
            error,
            Some(ErrorKind::ConnectionReset),
            "cut short by a reset"
        );
    }
    assert!(
        got.len() < LEN,
        "the rewrite came before the sender's tail: it must be caught"
    );
}

/// Issue 11, 4: a file replaced (by rename) with another of the same length and the same
/// nanosecond mtime, as `cp -p`, `rsync -t` and reproducible builds make, kept its ETag: new
/// clients got the old `Repr-Digest` forever, and an existing session resumed into the new
/// bytes. Now a new file at a path gets a new ETag when this server served another one with
/// the same length and mtime there, and digests belong to the file, not to the path.
#[test]
fn a_file_replaced_with_the_same_length_and_mtime_gets_a_new_etag_and_digest() {
    use sha2::Digest as _;
    let root = Root::new();
    let old = vec![b'1'; MIB];
    let new = vec![b'2'; MIB];
    let path = root.file("f.bin", &old);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let srv = TestServer::start_with(root.path(), |cfg| cfg.file_revalidate = Duration::ZERO);
    let id = srv.mint();
    let target = format!("/{id}/f.bin");
    let head = |target: &str| {
        request(
            srv.addr,
            &format!("HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n"),
        )
    };
    let digest_of = |bytes: &[u8]| {
        use base64::Engine as _;
        format!(
            "sha-256=:{}:",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
        )
    };
    wait_until("the old digest", Duration::from_secs(30), || {
        head(&target).header("repr-digest") == Some(digest_of(&old).as_str())
    });
    // A session part-way through the old version.
    let mut s = connect_rcvbuf(srv.addr, 16 * KIB);
    s.write_all(get(&target).as_bytes()).unwrap();
    read_head(&mut s).unwrap();
    let mut first = vec![0u8; 256 * KIB];
    s.read_exact(&mut first).unwrap();
    wait_until(
        "the session records progress",
        Duration::from_secs(10),
        || recorded(&srv, &id, "f.bin").is_some_and(|o| o > 0),
    );
    let before = head(&target);
    let old_etag = before.header("etag").unwrap().to_owned();
    let offset: u64 = before.header("roam-offset").unwrap().parse().unwrap();
    assert!(offset > 0);
    drop(s);

    let tmp = root.path().join("f.bin.new");
    std::fs::write(&tmp, &new).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&tmp, &path).unwrap();

    let after = head(&target);
    assert_ne!(
        after.header("etag").unwrap(),
        old_etag,
        "the new file needs a new ETag"
    );
    assert_eq!(
        after.header("roam-offset"),
        Some("0"),
        "the session was on the old file: it must start over, not resume into the new one"
    );
    assert_ne!(after.header("repr-digest"), Some(digest_of(&old).as_str()));
    wait_until("the new digest", Duration::from_secs(30), || {
        head(&target).header("repr-digest") == Some(digest_of(&new).as_str())
    });
    // A resume with the old ETag gets the whole new file.
    let r = request(
        srv.addr,
        &get_with(
            &target,
            &[
                &format!("Range: bytes={offset}-"),
                &format!("If-Range: {old_etag}"),
            ],
        ),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body, new);
}

/// Issue 11, 5: a request head partly received when the server was told to stop got no answer
/// at all (end of stream), though a head that has started is read to its end and answered
/// with `Connection: close`.
#[test]
fn a_head_partly_received_at_shutdown_is_still_answered() {
    let root = Root::new();
    let srv = TestServer::start(root.path());
    let addr = srv.addr;
    let mut c = connect(addr);
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    // The server must have read the first part before it is told to stop.
    let client = c.local_addr().unwrap();
    wait_until(
        "the server reads the partial head",
        Duration::from_secs(5),
        || unread_by_server(addr, client) == Some(0),
    );
    let stopper = std::thread::spawn(move || srv.stop());
    wait_until("the listener closes", Duration::from_secs(10), || {
        TcpStream::connect(addr).is_err()
    });
    c.write_all(b"\r\n").unwrap();
    let r = read_response(&mut c, false);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.body.len(), 36, "a minted ID");
    stopper.join().unwrap();
}

/// Suspected in issue 11, confirmed: two GETs without `Range` for one session pipelined on one
/// connection. The second read the session's acknowledged offset while the first body was
/// still on its way, and sent those bytes again. A connection delivers in order, so the second
/// now continues where the first body ends (here: the first is the whole file, so `416`).
#[test]
fn pipelined_gets_without_range_never_repeat_bytes() {
    const LEN: usize = 4 * MIB;
    let root = Root::new();
    let data = pattern(LEN, 41);
    root.file("p.bin", &data);
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/p.bin");
    let mut s = connect_rcvbuf(srv.addr, 64 * KIB);
    s.write_all(format!("{}{}", get(&target), get(&target)).as_bytes())
        .unwrap();
    // Read slowly, so the first body is far from acknowledged when it has been written.
    let first = read_head(&mut s).unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let mut body = vec![0u8; LEN];
    for chunk in body.chunks_mut(16 * KIB) {
        s.read_exact(chunk).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    assert_eq!(body, data);
    let second = read_head(&mut s).unwrap();
    assert!(
        second.starts_with("HTTP/1.1 416"),
        "the first body already delivers the whole file; got:\n{second}"
    );
    assert_eq!(
        field(&second, "roam-offset"),
        Some(LEN.to_string().as_str())
    );
}

/// Suspected in issue 11, ruled out: a finished session answers a conditional request with
/// `304`/`412` rather than its `416`. RFC 9110 §13.2.1 has preconditions ignored when the
/// unconditional answer would be an error detected before processing (a redirect, a 404);
/// roam's `416` for a finished session, like a `416` for an unsatisfiable `Range`, is the
/// outcome of performing the request (§13.2.2, step 6), so the preconditions come first, as
/// they do for ranges (the conformance table pins `If-None-Match` before an unsatisfiable
/// range) and as nginx orders them.
#[test]
fn a_finished_session_evaluates_preconditions_before_its_416() {
    let root = Root::new();
    root.file("s.txt", b"small file");
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/s.txt");
    let full = request(srv.addr, &get(&target));
    assert_eq!(
        (full.status, full.body.as_slice()),
        (200, &b"small file"[..])
    );
    let etag = full.header("etag").unwrap().to_owned();
    wait_until("the session is finished", Duration::from_secs(10), || {
        request(srv.addr, &get(&target)).status == 416
    });
    let with = |h: &str| request(srv.addr, &get_with(&target, &[h])).status;
    assert_eq!(with(&format!("If-None-Match: {etag}")), 304);
    assert_eq!(with("If-Match: \"other\""), 412);
    assert_eq!(with(&format!("If-Match: {etag}")), 416);
    assert_eq!(with("If-None-Match: \"other\""), 416);
}

/// Suspected in issue 11, confirmed: a file dated in the future got `Last-Modified` equal to the
/// response's `Date` (RFC 9110 §8.8.2.1), which moves every second, so a date `If-Range` could
/// never match. Such a file has no consistent last-modified date; it now has no
/// `Last-Modified`, and the strong ETag remains the validator.
#[test]
fn a_file_dated_in_the_future_has_no_moving_last_modified() {
    let root = Root::new();
    let path = root.file("future.txt", &pattern(50_000, 5));
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(86_400))
        .unwrap();
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/future.txt");
    let r = request(
        srv.addr,
        &format!("HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("last-modified"), None, "{:?}", r.headers);
    let etag = r.header("etag").unwrap().to_owned();
    // The ETag still resumes; a date (here the response's own Date) never does.
    let by_etag = request(
        srv.addr,
        &get_with(
            &target,
            &["Range: bytes=100-", &format!("If-Range: {etag}")],
        ),
    );
    assert_eq!(by_etag.status, 206);
    let date = r.header("date").unwrap().to_owned();
    let by_date = request(
        srv.addr,
        &get_with(
            &target,
            &["Range: bytes=100-", &format!("If-Range: {date}")],
        ),
    );
    assert_eq!(by_date.status, 200);
}
