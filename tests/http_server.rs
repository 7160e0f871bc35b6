//! Black-box HTTP tests for roam over real TCP: raw request bytes in, exact status lines, header
//! fields and body bytes out. Each test is named after the behaviour it pins down.
//!
//! The server runs on its own runtime (see `tests/support/server.rs`), so timeouts are real:
//! the tests that need them configure small ones and never assert durations.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::server::*;

const MIB: usize = 1024 * 1024;

const ST_200: &str = "HTTP/1.1 200 OK";
const ST_206: &str = "HTTP/1.1 206 Partial Content";
const ST_400: &str = "HTTP/1.1 400 Bad Request";
const ST_404: &str = "HTTP/1.1 404 Not Found";
const ST_405: &str = "HTTP/1.1 405 Method Not Allowed";
const ST_408: &str = "HTTP/1.1 408 Request Timeout";
const ST_414: &str = "HTTP/1.1 414 URI Too Long";
const ST_416: &str = "HTTP/1.1 416 Range Not Satisfiable";
const ST_431: &str = "HTTP/1.1 431 Request Header Fields Too Large";
const ST_503: &str = "HTTP/1.1 503 Service Unavailable";

const NO_SUCH_FILE: &[u8] = b"not found: no such file\n";

// ---------------------------------------------------------------------------------------------
// Raw HTTP helpers: heads are read byte by byte, so nothing past a head is consumed and a test
// can read exactly as much of a body as it wants.
// ---------------------------------------------------------------------------------------------

/// A response head exactly as received.
#[derive(Debug, Clone)]
struct Head {
    status_line: String,
    /// Fields in order, names as sent.
    fields: Vec<(String, String)>,
}

impl Head {
    /// The only value of `name`; panics if the field is repeated.
    fn get(&self, name: &str) -> Option<&str> {
        let mut found = self
            .fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let first = found.next().map(|(_, v)| v.as_str());
        assert!(found.next().is_none(), "{name} repeated in {self:#?}");
        first
    }

    /// The value of `name`, which must be present.
    fn field(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("no {name} field in {self:#?}"))
    }

    fn content_length(&self) -> u64 {
        self.field("Content-Length")
            .parse()
            .expect("numeric Content-Length")
    }

    fn assert_status(&self, line: &str) {
        assert_eq!(self.status_line, line, "{self:#?}");
    }

    /// `Connection: close` present.
    fn closes(&self) -> bool {
        self.get("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

#[derive(Debug)]
struct Resp {
    head: Head,
    body: Vec<u8>,
}

/// Reads one response head.
fn read_head(s: &mut impl Read) -> Head {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read response head");
        assert_eq!(
            n,
            1,
            "connection closed inside a response head after {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.push(byte[0]);
        assert!(raw.len() < 64 * 1024, "runaway response head");
    }
    parse_head(&raw)
}

fn parse_head(raw: &[u8]) -> Head {
    let text = std::str::from_utf8(raw).expect("ASCII response head");
    let text = text
        .strip_suffix("\r\n\r\n")
        .expect("head ends with CRLFCRLF");
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap().to_owned();
    let fields = lines
        .map(|l| {
            let (n, v) = l.split_once(':').expect("field line has a colon");
            assert_eq!(n, n.trim(), "whitespace around field name {n:?}");
            (n.to_owned(), v.trim().to_owned())
        })
        .collect();
    Head {
        status_line,
        fields,
    }
}

/// Reads one whole response (no body for HEAD).
fn read_resp(s: &mut impl Read, head_only: bool) -> Resp {
    let head = read_head(s);
    let len = if head_only {
        0
    } else {
        head.content_length() as usize
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("read response body");
    Resp { head, body }
}

/// One request on a fresh connection, one response.
fn exchange(addr: SocketAddr, raw: &str) -> Resp {
    let mut s = connect(addr);
    s.write_all(raw.as_bytes()).unwrap();
    read_resp(&mut s, raw.starts_with("HEAD "))
}

fn head_req(target: &str) -> String {
    format!("HEAD {target} HTTP/1.1\r\nHost: test\r\n\r\n")
}

fn send(s: &mut TcpStream, raw: &str) {
    s.write_all(raw.as_bytes()).unwrap();
}

/// Asserts the peer closes the connection in an orderly way without sending anything more.
fn assert_orderly_eof(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "expected EOF, got {n} more bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("expected EOF, got {e}"),
    }
}

/// A connection whose receive buffer is fixed at `rcvbuf` bytes (no autotuning), so a client
/// that stops reading holds a bounded, small part of a large file in its kernel.
fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: usize) -> TcpStream {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
    sock.connect(&addr.into()).expect("connect");
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn read_exactly(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read body bytes");
    v
}

/// `bytes S-E/LEN` → (S, E, LEN).
fn content_range(value: &str) -> (u64, u64, u64) {
    let rest = value
        .strip_prefix("bytes ")
        .unwrap_or_else(|| panic!("Content-Range {value:?}"));
    let (span, len) = rest.split_once('/').unwrap();
    let (s, e) = span.split_once('-').unwrap();
    (s.parse().unwrap(), e.parse().unwrap(), len.parse().unwrap())
}

/// Checks the fields every response under `/{id}/` carries, for a file of `len` bytes at
/// `path` whose body here is `content_length` long.
fn assert_file_fields(head: &Head, path: &Path, content_type: &str, content_length: u64) {
    let date = httpdate::parse_http_date(head.field("Date")).expect("Date is an HTTP-date");
    let now = SystemTime::now();
    assert!(
        date <= now + Duration::from_secs(2) && date + Duration::from_secs(60) >= now,
        "Date {date:?} is not now"
    );
    assert!(head.field("Server").starts_with("roam/"), "{head:#?}");
    assert_eq!(head.field("Content-Type"), content_type);
    assert_eq!(head.content_length(), content_length);
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let secs = mtime.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(
        head.field("Last-Modified"),
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
    );
    let etag = head.field("ETag");
    assert!(
        etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'),
        "strong ETag expected, got {etag:?}"
    );
    assert_eq!(head.field("Accept-Ranges"), "bytes");
    assert_eq!(head.field("Cache-Control"), "no-store");
}

/// Checks a 206 that resumes a no-Range request at `start` for a file of `len` bytes.
fn assert_resumed_206(head: &Head, start: u64, len: u64) {
    head.assert_status(ST_206);
    assert_eq!(
        head.field("Content-Range"),
        format!("bytes {start}-{}/{len}", len - 1)
    );
    assert_eq!(head.field("Roam-Offset"), start.to_string());
    assert_eq!(head.content_length(), len - start);
}

/// Checks the "already complete" answer to a no-Range GET.
fn assert_finished_416(resp: &Resp, len: u64) {
    resp.head.assert_status(ST_416);
    assert_eq!(resp.head.field("Content-Range"), format!("bytes */{len}"));
    assert_eq!(resp.head.content_length(), 0);
    assert!(resp.body.is_empty());
}

/// Checks a short plain-text error answer.
fn assert_error(resp: &Resp, status_line: &str, body: &[u8]) {
    resp.head.assert_status(status_line);
    assert_eq!(
        resp.body,
        body,
        "body {:?}",
        String::from_utf8_lossy(&resp.body)
    );
    assert_eq!(resp.head.field("Content-Type"), "text/plain; charset=utf-8");
    assert_eq!(resp.head.content_length(), body.len() as u64);
    assert_eq!(resp.head.field("Cache-Control"), "no-store");
}

/// Checks a 400 that closes: a short `bad request…` text, then an orderly EOF.
fn assert_bad_request_closes(s: &mut TcpStream) {
    let resp = read_resp(s, false);
    resp.head.assert_status(ST_400);
    assert!(resp.head.closes(), "{:#?}", resp.head);
    assert_eq!(resp.head.field("Content-Type"), "text/plain; charset=utf-8");
    let text = String::from_utf8(resp.body).unwrap();
    assert!(
        text.starts_with("bad request") && text.ends_with('\n') && text.len() < 100,
        "{text:?}"
    );
    assert_orderly_eof(s);
}

/// Reads a response head plus `n` body bytes from a fresh GET of `target` on `s`.
fn start_download(s: &mut TcpStream, target: &str, n: usize) -> (Head, Vec<u8>) {
    send(s, &get(target));
    let head = read_head(s);
    let got = read_exactly(s, n);
    (head, got)
}

/// Waits until a client that stopped reading has a full receive window and every byte its
/// kernel received has been acknowledged (delayed ACKs fire within 200 ms on Linux).
fn let_transfer_stall() {
    std::thread::sleep(Duration::from_millis(600));
}

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

// ---------------------------------------------------------------------------------------------
// Resumption: the seed report's demo and its variants.
// ---------------------------------------------------------------------------------------------

/// The seed report's demo: A reads part of a large file and stops reading; the same client
/// reconnects (B, no Range) and must receive exactly the rest, starting at the byte A's TCP
/// acknowledged.
///
/// B's request takes the session over from A: the server aborts A with an RST and records what
/// A's peer acknowledged. Every acknowledged byte is in A's kernel receive buffer, and Linux
/// lets the client read everything buffered before the reset, so A's bytes plus B's body must
/// be the file exactly, and B's start must equal A's byte count.
///
/// A server that counted written bytes instead of acknowledged bytes fails this test: its
/// offset would include the bytes sitting unacknowledged in its own send queue and in flight,
/// which A never received, so B would start past a gap.
#[test]
fn seed_demo_reconnect_without_range_resumes_at_acknowledged_byte() {
    let root = Root::new();
    let data = pattern(8 * MIB, 1);
    root.file("big.bin", &data);
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/big.bin");

    let mut a = connect_small_rcvbuf(srv.addr, 128 * 1024);
    let (head_a, mut got_a) = start_download(&mut a, &target, MIB);
    head_a.assert_status(ST_200);
    assert_eq!(head_a.field("Roam-Offset"), "0");
    assert_eq!(head_a.get("Content-Range"), None);
    assert_file_fields(
        &head_a,
        &root.path().join("big.bin"),
        "application/octet-stream",
        data.len() as u64,
    );
    // A stops reading: its window fills and the server blocks with data queued.
    let_transfer_stall();

    let mut b = connect(srv.addr);
    send(&mut b, &get(&target));
    let head_b = read_head(&mut b);
    let start = content_range(head_b.field("Content-Range")).0;
    assert_resumed_206(&head_b, start, data.len() as u64);
    assert_file_fields(
        &head_b,
        &root.path().join("big.bin"),
        "application/octet-stream",
        data.len() as u64 - start,
    );
    let body_b = read_exactly(&mut b, (data.len() as u64 - start) as usize);

    // Everything A's kernel accepted (and acknowledged) before the takeover reset.
    got_a.extend(read_to_end_lossy(&mut a));
    assert!(got_a.len() >= MIB);
    assert!(
        (start as usize) < data.len(),
        "A must not have been able to buffer the whole file"
    );
    assert_eq!(
        start,
        got_a.len() as u64,
        "B must start exactly where A's delivered bytes end"
    );
    assert!(
        got_a[..] == data[..got_a.len()],
        "A's bytes are the file's prefix"
    );
    assert!(body_b[..] == data[start as usize..], "B's body is the rest");
    let mut joined = got_a;
    joined.extend_from_slice(&body_b);
    assert!(joined == data, "A + B is the file exactly");
}

/// The client really closes A after reading N bytes, with more unread in its kernel buffer:
/// its kernel resets the connection, and the bytes between N and what it acknowledged die
/// unread. The server cannot know how many the application kept, so the next request without
/// `Range` gets the whole file with `200` (issue 12: before, it resumed at what was
/// acknowledged, leaving a hole in a client that appends). The client that knows what it has
/// still completes its copy exactly by declaring its position with `Range: bytes=N-`.
#[test]
fn closed_connection_with_unread_data_gets_the_whole_file_again() {
    let root = Root::new();
    let data = pattern(8 * MIB, 2);
    root.file("big.bin", &data);
    let len = data.len() as u64;
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/big.bin");

    let n = MIB;
    let mut a = connect_small_rcvbuf(srv.addr, 128 * 1024);
    let (head_a, got_a) = start_download(&mut a, &target, n);
    head_a.assert_status(ST_200);
    let_transfer_stall();
    drop(a); // unread data in the buffer: the kernel resets the connection

    // The reset reaches the server before the next request (on a real network it travels
    // ahead of the new connection's handshake); HEAD, which moves nothing, shows when.
    wait_for_offset_zero(srv.addr, &target);
    let mut b = connect(srv.addr);
    send(&mut b, &get(&target));
    let head_b = read_head(&mut b);
    head_b.assert_status(ST_200);
    let body_b = read_exactly(&mut b, len as usize);
    assert_eq!(head_b.field("Roam-Offset"), "0");
    assert_eq!(head_b.content_length(), len);
    assert!(body_b == data, "the whole file");

    let resp = exchange(
        srv.addr,
        &get_with(&target, &[&format!("Range: bytes={n}-")]),
    );
    resp.head.assert_status(ST_206);
    assert_eq!(
        resp.head.field("Content-Range"),
        format!("bytes {n}-{}/{len}", len - 1)
    );
    assert_file_fields(
        &resp.head,
        &root.path().join("big.bin"),
        "application/octet-stream",
        len - n as u64,
    );
    let mut joined = got_a;
    joined.extend_from_slice(&resp.body);
    assert!(
        joined == data,
        "first N bytes + Range: bytes=N- is the file"
    );
}

/// Polls HEAD (which moves no session) until the session's `Roam-Offset` is 0: the server has
/// seen the previous connection end with a reset from the client.
fn wait_for_offset_zero(addr: SocketAddr, target: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = exchange(addr, &head_req(target));
        if r.head.get("Roam-Offset") == Some("0") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a session whose client reset the connection still resumes: {:#?}",
            r.head
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs curl in `dir`; returns its exit code.
fn curl(dir: &Path, args: &[&str]) -> i32 {
    let out = Command::new("curl")
        .args(["-s", "-S"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run curl");
    out.status.code().unwrap_or(-1)
}

fn curl_stdout(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-s", "-S"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    out.stdout
}

/// The demo with the real curl: an interrupted rate-limited transfer, completed with `-C -`;
/// and an interrupted transfer asked for again without Range: the whole file.
#[test]
fn curl_interrupted_download_completes_with_continue_and_with_server_resume() {
    if Command::new("curl").arg("--version").output().is_err() {
        if is_ci() {
            panic!("curl is required in CI");
        }
        println!("skipping: curl not found");
        return;
    }
    let root = Root::new();
    let data = pattern(20 * MIB, 3);
    let file = root.file("big.bin", &data);
    let len = data.len() as u64;
    let srv = TestServer::start(root.path());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();

    // Mint with curl.
    let id = String::from_utf8(curl_stdout(dir, &[&format!("{}/", srv.url())])).unwrap();
    assert_eq!(id.len(), 36, "{id:?}");
    let url = format!("{}/{id}/big.bin", srv.url());

    // Interrupted: curl gives up after a second (exit 28, "operation timed out").
    let code = curl(dir, &["--limit-rate", "1M", "-m", "1", &url, "-o", "part1"]);
    assert_eq!(code, 28, "interrupted curl should time out");
    let part1 = std::fs::metadata(dir.join("part1")).unwrap().len();
    assert!(part1 > 0 && part1 < len, "part1 holds {part1} bytes");

    // `-C -` asks for `Range: bytes=<size of part1>-` and appends.
    let code = curl(dir, &["-C", "-", &url, "-o", "part1"]);
    assert_eq!(code, 0);
    let cmp = Command::new("cmp")
        .arg(dir.join("part1"))
        .arg(&file)
        .status()
        .expect("run cmp");
    assert!(cmp.success(), "cmp: the completed file differs");
    assert!(std::fs::read(dir.join("part1")).unwrap() == data);

    // Another interrupted transfer, for a second client. curl timed out with bytes unread in
    // its socket (the rate limit slows its reads, not TCP), so its kernel reset the connection:
    // roam does not resume such a session without Range (issue 12). A plain curl gets the
    // whole file with `200`, the status saying "start over".
    let id2 = String::from_utf8(curl_stdout(dir, &[&format!("{}/", srv.url())])).unwrap();
    assert_ne!(id2, id);
    let url2 = format!("{}/{id2}/big.bin", srv.url());
    let code = curl(
        dir,
        &["--limit-rate", "1M", "-m", "1", &url2, "-o", "partA"],
    );
    assert_eq!(code, 28);
    let part_a = std::fs::metadata(dir.join("partA")).unwrap().len();
    assert!(part_a > 0 && part_a < len);
    wait_for_offset_zero(srv.addr, &format!("/{id2}/big.bin"));

    let code = curl(dir, &["-D", "headers", &url2, "-o", "part2"]);
    assert_eq!(code, 0);
    let headers = std::fs::read_to_string(dir.join("headers")).unwrap();
    let head = parse_head(headers.as_bytes());
    head.assert_status(ST_200);
    assert_eq!(head.field("Roam-Offset"), "0");
    assert!(
        std::fs::read(dir.join("part2")).unwrap() == data,
        "the whole file"
    );
}

/// Two clients downloading the same file at once each have their own offset: one's progress,
/// interruption and completion move nothing of the other's.
#[test]
fn two_clients_same_file_have_independent_offsets() {
    let root = Root::new();
    let data = pattern(8 * MIB, 4);
    root.file("shared.bin", &data);
    let len = data.len() as u64;
    let srv = TestServer::start(root.path());
    let (x, y) = (srv.mint(), srv.mint());
    assert_ne!(x, y);
    let tx = format!("/{x}/shared.bin");
    let ty = format!("/{y}/shared.bin");

    // X is mid-download (stalled) while Y downloads the whole file.
    let mut xa = connect_small_rcvbuf(srv.addr, 128 * 1024);
    let (head, mut got_x) = start_download(&mut xa, &tx, MIB);
    head.assert_status(ST_200);
    let mut ya = connect(srv.addr);
    let (head, got_y) = start_download(&mut ya, &ty, data.len());
    head.assert_status(ST_200);
    assert_eq!(head.field("Roam-Offset"), "0");
    assert!(got_y == data, "Y gets the whole file from byte 0");
    drop(ya);
    let_transfer_stall();

    // X resumes where X stopped, not where Y ended (which would be a 416).
    let mut xb = connect(srv.addr);
    send(&mut xb, &get(&tx));
    let head = read_head(&mut xb);
    let s = content_range(head.field("Content-Range")).0;
    assert_resumed_206(&head, s, len);
    let body = read_exactly(&mut xb, (len - s) as usize);
    got_x.extend(read_to_end_lossy(&mut xa));
    assert_eq!(s, got_x.len() as u64);
    got_x.extend_from_slice(&body);
    assert!(got_x == data, "X's pieces are the whole file");

    // Interrupting and finishing X did not move Y's offset: Y is still complete.
    assert_finished_416(&exchange(srv.addr, &get(&ty)), len);
    // And a third client starts from 0.
    let z = srv.mint();
    let resp = exchange(srv.addr, &get(&format!("/{z}/shared.bin")));
    resp.head.assert_status(ST_200);
    assert!(resp.body == data);
}

/// One client with several files in progress at once keeps one offset per file; taking one
/// file's session over does not disturb the other file's connection.
#[test]
fn one_client_several_files_in_progress_have_separate_offsets() {
    let root = Root::new();
    let f1 = pattern(8 * MIB, 5);
    let f2 = pattern(6 * MIB, 6);
    let f3 = pattern(100_000, 7);
    root.file("one.bin", &f1);
    root.file("dir/two.bin", &f2);
    root.file("three.bin", &f3);
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let (t1, t2, t3) = (
        format!("/{id}/one.bin"),
        format!("/{id}/dir/two.bin"),
        format!("/{id}/three.bin"),
    );

    let mut c1 = connect_small_rcvbuf(srv.addr, 128 * 1024);
    let (h1, mut got1) = start_download(&mut c1, &t1, MIB);
    h1.assert_status(ST_200);
    let mut c2 = connect_small_rcvbuf(srv.addr, 128 * 1024);
    let (h2, mut got2) = start_download(&mut c2, &t2, 2 * MIB);
    h2.assert_status(ST_200);
    let_transfer_stall();

    // Resume file one on a new connection: only file one's old connection is taken over.
    let mut c1b = connect(srv.addr);
    send(&mut c1b, &get(&t1));
    let h = read_head(&mut c1b);
    let s1 = content_range(h.field("Content-Range")).0;
    assert_resumed_206(&h, s1, f1.len() as u64);
    let rest1 = read_exactly(&mut c1b, f1.len() - s1 as usize);
    got1.extend(read_to_end_lossy(&mut c1));
    assert_eq!(s1, got1.len() as u64);
    got1.extend_from_slice(&rest1);
    assert!(got1 == f1);

    // File two's connection was left alone: it delivers the rest of its 200 to the end.
    got2.extend(read_exactly(&mut c2, f2.len() - 2 * MIB));
    assert!(got2 == f2, "file two's stream was not disturbed");
    // Its response ended cleanly on a live connection: the next request on it is answered.
    send(&mut c2, &get(&t2));
    assert_finished_416(&read_resp(&mut c2, false), f2.len() as u64);

    // File three was never started: it begins at 0.
    let resp = exchange(srv.addr, &get(&t3));
    resp.head.assert_status(ST_200);
    assert_eq!(resp.head.field("Roam-Offset"), "0");
    assert!(resp.body == f3);
    // File one is complete too.
    assert_finished_416(&exchange(srv.addr, &get(&t1)), f1.len() as u64);
}

/// After everything was received, a no-Range GET answers 416 `bytes */LEN` with an empty body:
/// never the file again, never 404. Checked on the same connection, on a new one, and twice.
#[test]
fn finished_download_gets_416_never_the_file_again() {
    let root = Root::new();
    let data = pattern(300_000, 8);
    root.file("done.bin", &data);
    let len = data.len() as u64;
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/done.bin");

    let mut c = connect(srv.addr);
    send(&mut c, &get(&target));
    let first = read_resp(&mut c, false);
    first.head.assert_status(ST_200);
    assert!(first.body == data);
    // Same connection: the request itself carries the acknowledgement of the whole body.
    send(&mut c, &get(&target));
    let again = read_resp(&mut c, false);
    assert_finished_416(&again, len);
    assert_eq!(again.head.get("Connection"), None, "kept alive");
    assert_eq!(again.head.field("ETag"), first.head.field("ETag"));
    drop(c);

    // New connections, later: still complete.
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..2 {
        let resp = exchange(srv.addr, &get(&target));
        assert_finished_416(&resp, len);
        assert_eq!(resp.head.field("Accept-Ranges"), "bytes");
        assert_eq!(resp.head.field("Cache-Control"), "no-store");
    }
    // A HEAD agrees.
    let resp = exchange(srv.addr, &head_req(&target));
    assert_finished_416(&resp, len);
}

/// `--no-implicit-resume`: a request without Range is a plain GET (200, the whole file) whether
/// the session is partial or complete, and Range still resumes exactly.
#[test]
fn without_implicit_resume_requests_without_range_get_the_whole_file() {
    let root = Root::new();
    let data = pattern(4 << 20, 21);
    root.file("plain.bin", &data);
    let srv = TestServer::start_with(root.path(), |cfg| cfg.implicit_resume = false);
    let id = srv.mint();
    let target = format!("/{id}/plain.bin");

    // A partial download, then a new request without Range: the whole file again, with 200.
    let mut c = connect(srv.addr);
    send(&mut c, &get(&target));
    let head = read_head(&mut c);
    head.assert_status(ST_200);
    let _ = read_exactly(&mut c, 100_000);
    drop(c);
    std::thread::sleep(Duration::from_millis(50));
    let whole = exchange(srv.addr, &get(&target));
    whole.head.assert_status(ST_200);
    assert_eq!(whole.head.get("Content-Range"), None);
    assert!(whole.body == data);
    // Complete now: still a 200 with the file, never a 416 the client did not ask for.
    std::thread::sleep(Duration::from_millis(50));
    let again = exchange(srv.addr, &get(&target));
    again.head.assert_status(ST_200);
    assert!(again.body == data);
    // Range resumes as always.
    let tail = exchange(
        srv.addr,
        &format!("GET {target} HTTP/1.1\r\nHost: t\r\nRange: bytes=4000000-\r\n\r\n"),
    );
    tail.head.assert_status(ST_206);
    assert!(tail.body == data[4_000_000..]);
}

/// A 0-byte file: the first GET is a 200 with `Content-Length: 0`, the next a 416 `bytes */0`.
#[test]
fn empty_file_is_200_then_416() {
    let root = Root::new();
    let path = root.file("empty.txt", b"");
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/empty.txt");

    let mut c = connect(srv.addr);
    send(&mut c, &get(&target));
    let first = read_resp(&mut c, false);
    first.head.assert_status(ST_200);
    assert_file_fields(&first.head, &path, "text/plain", 0);
    assert_eq!(first.head.field("Roam-Offset"), "0");
    assert!(first.body.is_empty());
    send(&mut c, &get(&target));
    assert_finished_416(&read_resp(&mut c, false), 0);
    drop(c);
    assert_finished_416(&exchange(srv.addr, &get(&target)), 0);
}

/// Offsets past 4 GiB: a sparse 5 GiB file with a known MiB at 4.5 GiB.
#[test]
fn file_larger_than_4_gib_serves_ranges_and_lengths_past_32_bits() {
    const FIVE_GIB: u64 = 5 * 1024 * 1024 * 1024;
    const AT: u64 = 4_831_838_208; // 4.5 GiB
    let root = Root::new();
    let path = root.path().join("huge.bin");
    let marker = pattern(MIB, 9);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(FIVE_GIB).unwrap();
        f.write_all_at(&marker, AT).unwrap();
    }
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/huge.bin");

    // A no-Range HEAD from a fresh session: the whole length, no body.
    let mut h = connect(srv.addr);
    send(&mut h, &head_req(&target));
    let head = read_head(&mut h);
    head.assert_status(ST_200);
    assert_file_fields(&head, &path, "application/octet-stream", FIVE_GIB);
    assert_eq!(head.field("Content-Length"), "5368709120");
    assert_eq!(head.field("Roam-Offset"), "0");
    drop(h);

    let mut c = connect(srv.addr);
    send(
        &mut c,
        &get_with(&target, &[&format!("Range: bytes={AT}-")]),
    );
    let head = read_head(&mut c);
    head.assert_status(ST_206);
    assert_eq!(
        head.field("Content-Range"),
        "bytes 4831838208-5368709119/5368709120"
    );
    assert_file_fields(&head, &path, "application/octet-stream", FIVE_GIB - AT);
    let first = read_exactly(&mut c, MIB);
    assert!(first == marker, "the bytes at 4.5 GiB are the marker");
    // 511 MiB left unread. Serving the file started its background Repr-Digest of all 5 GiB;
    // stopping the server cancels it (see
    // `shutdown_is_not_held_up_by_the_background_digest_of_a_large_file`).
    drop(c);
    drop(srv);
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 connection behaviour.
// ---------------------------------------------------------------------------------------------

/// `GET /` mints a fresh lowercase UUID as uncacheable plain text.
#[test]
fn mint_returns_fresh_uncacheable_uuid() {
    let root = Root::new();
    let srv = TestServer::start(root.path());
    let a = exchange(srv.addr, &get("/"));
    a.head.assert_status(ST_200);
    assert_eq!(a.head.field("Content-Type"), "text/plain; charset=utf-8");
    assert_eq!(a.head.field("Content-Length"), "36");
    assert_eq!(a.head.field("Cache-Control"), "no-store");
    assert!(a.head.field("Server").starts_with("roam/"));
    httpdate::parse_http_date(a.head.field("Date")).unwrap();
    let id = String::from_utf8(a.body).unwrap();
    assert!(
        id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        }),
        "{id:?}"
    );
    let b = String::from_utf8(exchange(srv.addr, &get("/")).body).unwrap();
    assert_ne!(id, b, "each mint is a new ID");
}

/// Several requests on one connection, each answered, the connection kept open between them.
#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let root = Root::new();
    let a = pattern(5000, 10);
    let b = pattern(7000, 11);
    root.file("a.bin", &a);
    root.file("b.bin", &b);
    let srv = TestServer::start(root.path());
    let mut c = connect(srv.addr);

    send(&mut c, &get("/"));
    let mint = read_resp(&mut c, false);
    mint.head.assert_status(ST_200);
    assert_eq!(mint.head.get("Connection"), None);
    let id = String::from_utf8(mint.body).unwrap();

    send(&mut c, &get(&format!("/{id}/a.bin")));
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_200);
    assert_eq!(r.head.get("Connection"), None);
    assert!(r.body == a);

    send(&mut c, &get(&format!("/{id}/missing.bin")));
    let r = read_resp(&mut c, false);
    assert_error(&r, ST_404, NO_SUCH_FILE);
    assert_eq!(r.head.get("Connection"), None);

    send(
        &mut c,
        &get_with(&format!("/{id}/b.bin"), &["Range: bytes=10-19"]),
    );
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_206);
    assert_eq!(r.head.field("Content-Range"), "bytes 10-19/7000");
    assert!(r.body[..] == b[10..20]);

    send(&mut c, &get(&format!("/{id}/b.bin")));
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_200);
    assert!(r.body == b);

    send(&mut c, &get(&format!("/{id}/a.bin")));
    assert_finished_416(&read_resp(&mut c, false), 5000);

    // The client ends it: `Connection: close` is honoured.
    send(
        &mut c,
        &get_with(&format!("/{id}/b.bin"), &["Connection: close"]),
    );
    let r = read_resp(&mut c, false);
    assert_finished_416(&r, 7000);
    assert!(r.head.closes());
    assert_orderly_eof(&mut c);
}

/// Three requests written at once get three responses, in order.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let root = Root::new();
    let a = pattern(200_000, 12);
    let b = b"second file\n".to_vec();
    root.file("a.bin", &a);
    root.file("b.txt", &b);
    let srv = TestServer::start(root.path());
    let id = srv.mint();

    let mut c = connect(srv.addr);
    let batch = format!(
        "{}{}{}",
        get(&format!("/{id}/a.bin")),
        get(&format!("/{id}/nope.txt")),
        get(&format!("/{id}/b.txt"))
    );
    send(&mut c, &batch);
    let r1 = read_resp(&mut c, false);
    r1.head.assert_status(ST_200);
    assert!(r1.body == a);
    let r2 = read_resp(&mut c, false);
    assert_error(&r2, ST_404, NO_SUCH_FILE);
    let r3 = read_resp(&mut c, false);
    r3.head.assert_status(ST_200);
    assert_eq!(r3.head.field("Content-Type"), "text/plain");
    assert!(r3.body == b);

    // Pipelined HEAD then GET: the HEAD's head is followed directly by the GET's response.
    let c_target = format!("/{}/b.txt", srv.mint());
    send(
        &mut c,
        &format!("{}{}", head_req(&c_target), get(&c_target)),
    );
    let h = read_resp(&mut c, true);
    h.head.assert_status(ST_200);
    let g = read_resp(&mut c, false);
    g.head.assert_status(ST_200);
    assert!(g.body == b);
}

/// HTTP/1.0 without keep-alive gets its answer and then the connection closes; with
/// `Connection: keep-alive` it stays open.
#[test]
fn http10_closes_unless_keep_alive() {
    let root = Root::new();
    let data = pattern(10_000, 13);
    root.file("f.bin", &data);
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/f.bin");

    let mut c = connect(srv.addr);
    send(&mut c, &format!("GET {target} HTTP/1.0\r\n\r\n"));
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_200);
    assert!(r.head.closes(), "{:#?}", r.head);
    assert!(r.body == data);
    assert_orderly_eof(&mut c);

    let mut c = connect(srv.addr);
    send(
        &mut c,
        "GET / HTTP/1.0\r\nHost: test\r\nConnection: keep-alive\r\n\r\n",
    );
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_200);
    assert_eq!(r.head.field("Connection"), "keep-alive");
    send(&mut c, "HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = read_resp(&mut c, true);
    r.head.assert_status(ST_200);
    assert_eq!(r.head.content_length(), 36);
    assert_eq!(r.head.field("Connection"), "keep-alive");
    send(&mut c, "GET / HTTP/1.0\r\n\r\n");
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_200);
    assert!(r.head.closes());
    assert_orderly_eof(&mut c);
}

/// HEAD answers with GET's head, `Content-Length` included, and no body.
#[test]
fn head_answers_get_headers_without_body() {
    let root = Root::new();
    let data = pattern(123_457, 14);
    let path = root.file("page.html", &data);
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/page.html");

    let mut c = connect(srv.addr);
    // HEAD then GET pipelined: had the HEAD carried a body, the GET's status line would not
    // come next.
    send(&mut c, &format!("{}{}", head_req(&target), get(&target)));
    let h = read_head(&mut c);
    let g = read_resp(&mut c, false);
    h.assert_status(ST_200);
    g.head.assert_status(ST_200);
    assert!(g.body == data);
    assert_file_fields(&h, &path, "text/html", data.len() as u64);
    for name in [
        "Server",
        "Content-Type",
        "Content-Length",
        "Last-Modified",
        "ETag",
        "Accept-Ranges",
        "Cache-Control",
        "Roam-Offset",
    ] {
        assert_eq!(h.get(name), g.head.get(name), "{name}");
    }
    assert_eq!(h.get("Content-Range"), None);
    // RFC 9110 §14.2: HEAD ignores Range and reports the session (complete after the GET).
    send(
        &mut c,
        &format!("HEAD {target} HTTP/1.1\r\nHost: t\r\nRange: bytes=100-199\r\n\r\n"),
    );
    let h = read_head(&mut c);
    assert!(h.status_line.starts_with("HTTP/1.1 416 "), "{h:?}");
    assert_eq!(h.field("Content-Range"), "bytes */123457");
    // Nothing followed the HEAD answers: the connection still parses the next response.
    send(&mut c, &get("/"));
    read_resp(&mut c, false).head.assert_status(ST_200);
}

/// HEAD reports the session's offset without taking it: it neither aborts the connection that
/// is downloading nor moves where a GET starts.
#[test]
fn head_does_not_move_the_session() {
    let root = Root::new();
    let data = pattern(8 * MIB, 15);
    root.file("big.bin", &data);
    let len = data.len() as u64;
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/big.bin");

    // Before any GET: HEAD says a GET would start at 0, and repeating it changes nothing.
    for _ in 0..2 {
        let h = exchange(srv.addr, &head_req(&target));
        h.head.assert_status(ST_200);
        assert_eq!(h.head.field("Roam-Offset"), "0");
        assert_eq!(h.head.content_length(), len);
        assert!(h.body.is_empty());
    }

    // A download in progress, stalled.
    let mut a = connect_small_rcvbuf(srv.addr, 128 * 1024);
    let (head, mut got) = start_download(&mut a, &target, MIB);
    head.assert_status(ST_200);
    assert_eq!(head.field("Roam-Offset"), "0");
    let_transfer_stall();

    // HEAD meanwhile: a 206 head for where a resume would start, and no takeover.
    let h = exchange(srv.addr, &head_req(&target));
    h.head.assert_status(ST_206);
    let s = content_range(h.head.field("Content-Range")).0;
    assert_resumed_206(&h.head, s, len);
    assert!(s < len);

    // A continues undisturbed to the end of the file.
    got.extend(read_exactly(&mut a, data.len() - MIB));
    assert!(got == data, "the HEAD did not interrupt the download");
    // Same connection, next request: complete.
    send(&mut a, &get(&target));
    assert_finished_416(&read_resp(&mut a, false), len);
}

/// Methods other than GET and HEAD get 405 with `Allow`; the connection survives unless the
/// request had a body.
#[test]
fn other_methods_get_405_with_allow() {
    let root = Root::new();
    root.file("f.txt", b"x");
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/f.txt");

    let mut c = connect(srv.addr);
    for method in ["DELETE", "PUT", "OPTIONS", "PATCH", "POST", "TRACE"] {
        send(
            &mut c,
            &format!("{method} {target} HTTP/1.1\r\nHost: test\r\n\r\n"),
        );
        let r = read_resp(&mut c, false);
        assert_error(&r, ST_405, b"method not allowed\n");
        assert_eq!(r.head.field("Allow"), "GET, HEAD");
        assert_eq!(r.head.get("Connection"), None, "{method}: kept alive");
    }
    send(&mut c, &get(&target));
    read_resp(&mut c, false).head.assert_status(ST_200);

    // With a body: answered, then closed (the body is never read as a request).
    let mut c = connect(srv.addr);
    let smuggled = get("/");
    send(
        &mut c,
        &format!(
            "POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        ),
    );
    let r = read_resp(&mut c, false);
    assert_error(&r, ST_405, b"method not allowed\n");
    assert_eq!(r.head.field("Allow"), "GET, HEAD");
    assert!(r.head.closes());
    assert_orderly_eof(&mut c);
}

/// Unknown and malformed IDs, missing files and `/{id}` without a file are 404 with a short
/// text; the connection stays open.
#[test]
fn not_found_for_unknown_or_malformed_id_missing_file_and_missing_path() {
    let root = Root::new();
    root.file("f.txt", b"content");
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let mut tampered = id.clone().into_bytes();
    tampered[35] = if tampered[35] == b'0' { b'1' } else { b'0' };
    let tampered = String::from_utf8(tampered).unwrap();

    let unknown: &[u8] = b"not found: unknown client id\n";
    let malformed: &[u8] = b"not found: malformed client id\n";
    let no_route: &[u8] = b"not found: no such route: use / or /{id}/{path}\n";
    let cases: Vec<(String, &[u8])> = vec![
        // Well-formed v8 UUIDs this server never minted.
        (
            "/00000000-0000-8000-8000-000000000000/f.txt".into(),
            unknown,
        ),
        (format!("/{tampered}/f.txt"), unknown),
        ("/not-an-id/f.txt".into(), malformed),
        (format!("/{}/f.txt", id.to_uppercase()), malformed),
        (format!("/{}/f.txt", id.replace('-', "")), malformed),
        (format!("/{id}/missing.txt"), NO_SUCH_FILE),
        (format!("/{id}/f.txt/more"), NO_SUCH_FILE),
        (format!("/{id}"), no_route),
        (format!("/{id}/"), no_route),
    ];
    let mut c = connect(srv.addr);
    for (target, body) in &cases {
        for method in ["GET", "HEAD"] {
            send(
                &mut c,
                &format!("{method} {target} HTTP/1.1\r\nHost: test\r\n\r\n"),
            );
            let r = read_resp(&mut c, method == "HEAD");
            if method == "GET" {
                assert_error(&r, ST_404, body);
            } else {
                r.head.assert_status(ST_404);
                assert_eq!(r.head.content_length(), body.len() as u64);
            }
            assert_eq!(r.head.get("Connection"), None, "{target}: kept alive");
        }
    }
    // The real ID and file still work on the same connection.
    send(&mut c, &get(&format!("/{id}/f.txt")));
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_200);
    assert_eq!(r.body, b"content");
}

// ---------------------------------------------------------------------------------------------
// Limits, framing and timeouts.
// ---------------------------------------------------------------------------------------------

/// A request line over the limit gets 414 and the connection closes.
#[test]
fn request_line_over_limit_gets_414_and_closes() {
    let root = Root::new();
    let srv = TestServer::start_with(root.path(), |cfg| cfg.limits.max_request_line = 1024);
    let mut c = connect(srv.addr);
    send(&mut c, &get(&format!("/{}", "a".repeat(2000))));
    let r = read_resp(&mut c, false);
    assert_error(&r, ST_414, b"request line too long\n");
    assert!(r.head.closes());
    assert_orderly_eof(&mut c);
    // Just under the limit is an ordinary request.
    let target = format!("/{}", "a".repeat(900));
    let r = exchange(srv.addr, &get(&target));
    r.head.assert_status(ST_404);
}

/// A head over the size limit gets 431 and the connection closes.
#[test]
fn head_over_size_limit_gets_431_and_closes() {
    let root = Root::new();
    let srv = TestServer::start_with(root.path(), |cfg| {
        cfg.limits.max_request_line = 1024;
        cfg.limits.max_head = 4096;
    });
    let mut c = connect(srv.addr);
    let big = format!("X-Big: {}", "v".repeat(5000));
    send(&mut c, &get_with("/", &[&big]));
    let r = read_resp(&mut c, false);
    assert_error(&r, ST_431, b"request header fields too large\n");
    assert!(r.head.closes());
    assert_orderly_eof(&mut c);
}

/// A head with more fields than the limit gets 431 and the connection closes.
#[test]
fn head_over_field_count_limit_gets_431_and_closes() {
    let root = Root::new();
    let srv = TestServer::start_with(root.path(), |cfg| cfg.limits.max_headers = 16);
    // Host plus 15 more: exactly the limit, fine.
    let ok: Vec<String> = (0..15).map(|i| format!("X-F{i}: v")).collect();
    let ok: Vec<&str> = ok.iter().map(|s| s.as_str()).collect();
    exchange(srv.addr, &get_with("/", &ok))
        .head
        .assert_status(ST_200);
    // Host plus 16 more: one over.
    let many: Vec<String> = (0..16).map(|i| format!("X-F{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
    let mut c = connect(srv.addr);
    send(&mut c, &get_with("/", &many));
    let r = read_resp(&mut c, false);
    assert_error(&r, ST_431, b"request header fields too large\n");
    assert!(r.head.closes());
    assert_orderly_eof(&mut c);
}

/// A GET with a body is refused with 400 and the connection closes; the request hidden in the
/// body (or after it) is never answered.
#[test]
fn get_with_content_length_body_gets_400_and_hidden_request_is_never_answered() {
    let root = Root::new();
    root.file("f.txt", b"x");
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/f.txt");

    // `Content-Length: 5` with "hello", then a second request.
    let mut c = connect(srv.addr);
    send(
        &mut c,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\n\r\nhello{}",
            get("/")
        ),
    );
    assert_bad_request_closes(&mut c);

    // The body is itself a request: a server ignoring Content-Length would answer it.
    let hidden = get("/");
    let mut c = connect(srv.addr);
    send(
        &mut c,
        &format!(
            "GET {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{hidden}",
            hidden.len()
        ),
    );
    assert_bad_request_closes(&mut c);

    // `Content-Length: 0` is no body: served normally.
    let r = exchange(srv.addr, &get_with(&target, &["Content-Length: 0"]));
    r.head.assert_status(ST_200);
}

/// A GET with `Transfer-Encoding` is refused with 400 and the connection closes.
#[test]
fn get_with_transfer_encoding_gets_400_and_closes() {
    let root = Root::new();
    let srv = TestServer::start(root.path());
    let mut c = connect(srv.addr);
    send(
        &mut c,
        &format!(
            "GET / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            get("/").len(),
            get("/")
        ),
    );
    assert_bad_request_closes(&mut c);
}

/// HTTP/1.1 without Host, or with two, is 400 and the connection closes.
#[test]
fn missing_or_duplicate_host_gets_400_and_closes() {
    let root = Root::new();
    let srv = TestServer::start(root.path());
    for raw in [
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
    ] {
        let mut c = connect(srv.addr);
        send(&mut c, raw);
        assert_bad_request_closes(&mut c);
    }
    // HTTP/1.0 may omit Host.
    exchange(srv.addr, "GET / HTTP/1.0\r\n\r\n")
        .head
        .assert_status(ST_200);
}

/// Malformed heads are 400 and close.
#[test]
fn malformed_heads_get_400_and_close() {
    let root = Root::new();
    let srv = TestServer::start(root.path());
    for raw in [
        "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n folded\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n",
    ] {
        let mut c = connect(srv.addr);
        send(&mut c, raw);
        assert_bad_request_closes(&mut c);
    }
}

/// A head that stalls past the header timeout gets 408 and the connection closes.
#[test]
fn stalled_head_gets_408_and_closes() {
    let root = Root::new();
    let srv = TestServer::start_with(root.path(), |cfg| {
        cfg.header_timeout = Duration::from_millis(300);
    });
    let mut c = connect(srv.addr);
    send(&mut c, "GET / HTTP/1.1\r\nHost: te");
    let r = read_resp(&mut c, false);
    assert_error(&r, ST_408, b"timed out reading the request head\n");
    assert!(r.head.closes());
    assert_orderly_eof(&mut c);

    // Also after a first request on a kept-alive connection.
    let mut c = connect(srv.addr);
    send(&mut c, &get("/"));
    read_resp(&mut c, false).head.assert_status(ST_200);
    send(&mut c, "GET / HTTP/1.1\r\n");
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_408);
    assert!(r.head.closes());
    assert_orderly_eof(&mut c);
}

/// An idle keep-alive connection is closed silently after the idle timeout.
#[test]
fn idle_keep_alive_connection_closes_silently() {
    let root = Root::new();
    let srv = TestServer::start_with(root.path(), |cfg| {
        cfg.idle_timeout = Duration::from_millis(300);
        cfg.header_timeout = Duration::from_millis(300);
    });
    let mut c = connect(srv.addr);
    send(&mut c, &get("/"));
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_200);
    assert_eq!(r.head.get("Connection"), None);
    assert_orderly_eof(&mut c);

    // A connection that never sends anything is closed silently too.
    let mut c = connect(srv.addr);
    assert_orderly_eof(&mut c);
}

/// Paths that could leave the root, or name things never served, are all the same 404, and
/// never reveal what is outside the root.
#[test]
fn traversal_attempts_are_404_and_never_leak() {
    const TOKEN: &str = "TOKEN-5c1f0a-outside-the-root";
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("token.txt"), TOKEN).unwrap();
    std::fs::write(root.join("ok.txt"), b"served").unwrap();
    std::fs::write(root.join("sub/in.txt"), b"inside").unwrap();
    std::fs::write(root.join(".secret"), TOKEN).unwrap();
    std::fs::write(root.join("con.txt"), TOKEN).unwrap();
    std::os::unix::fs::symlink(outside.join("token.txt"), root.join("escape-link")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape-dir")).unwrap();
    std::os::unix::fs::symlink("../../outside/token.txt", root.join("sub/rel-link")).unwrap();
    std::os::unix::fs::symlink("../..", root.join("sub/up")).unwrap();
    let srv = TestServer::start(&root);
    let id = srv.mint();

    let attempts = [
        format!("/{id}/../outside/token.txt"),
        format!("/{id}/sub/../../outside/token.txt"),
        format!("/{id}/%2e%2e/outside/token.txt"),
        format!("/{id}/%2E%2E%2Foutside%2Ftoken.txt"),
        format!("/{id}/sub/..%2f..%2foutside%2ftoken.txt"),
        format!("/{id}/sub%5c..%5c..%5coutside%5ctoken.txt"),
        format!("/{id}/%252e%252e/outside/token.txt"),
        format!("/{id}/%c0%ae%c0%ae/outside/token.txt"),
        format!("/{id}//outside/token.txt"),
        format!("/{id}/ok.txt%00.png"),
        format!("/{id}/c:%2foutside%2ftoken.txt"),
        format!("/{id}/C%3a%5coutside%5ctoken.txt"),
        format!("/{id}/.secret"),
        format!("/{id}/%2esecret"),
        format!("/{id}/con.txt"),
        format!("/{id}/CON"),
        format!("/{id}/escape-link"),
        format!("/{id}/escape-dir/token.txt"),
        format!("/{id}/sub/rel-link"),
        format!("/{id}/sub/up/outside/token.txt"),
        format!("http://test/{id}/../outside/token.txt"),
        format!("/{id}/sub"),
        format!("/{id}/sub\\..\\..\\outside\\token.txt"),
        format!("/{id}/..\\outside\\token.txt"),
    ];
    let root_text = root.to_string_lossy().into_owned();
    for target in &attempts {
        let mut c = connect(srv.addr);
        send(
            &mut c,
            &format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
        );
        let raw = read_to_end_lossy(&mut c);
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.contains(TOKEN), "{target}: leaked the token: {text}");
        assert!(!text.contains(&root_text), "{target}: leaked the root path");
        assert!(!text.contains("outside"), "{target}: echoed the path");
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("{target}: no response head in {text:?}"));
        let head = parse_head(&raw[..end + 4]);
        let resp = Resp {
            body: raw[end + 4..].to_vec(),
            head,
        };
        assert_error(&resp, ST_404, NO_SUCH_FILE);
    }
    // A symlink that stays inside the root is followed...
    std::os::unix::fs::symlink("in.txt", root.join("sub/inner-link")).unwrap();
    let r = exchange(srv.addr, &get(&format!("/{id}/sub/inner-link")));
    r.head.assert_status(ST_200);
    assert_eq!(r.body, b"inside");
    // ...and the server still serves normal requests.
    let r = exchange(srv.addr, &get(&format!("/{id}/ok.txt")));
    r.head.assert_status(ST_200);
    assert_eq!(r.body, b"served");
}

/// With the session cap reached, a new (client, file) pair gets 503 with `Retry-After`;
/// existing sessions still work.
#[test]
fn session_cap_gives_503_with_retry_after() {
    let root = Root::new();
    root.file("a.txt", b"aaaa");
    root.file("b.txt", b"bbbb");
    let srv = TestServer::start_with(root.path(), |cfg| cfg.max_sessions = 1);
    let x = srv.mint();
    let y = srv.mint();

    let mut c = connect(srv.addr);
    send(&mut c, &get(&format!("/{x}/a.txt")));
    let r = read_resp(&mut c, false);
    r.head.assert_status(ST_200);
    assert_eq!(r.body, b"aaaa");

    for target in [format!("/{x}/b.txt"), format!("/{y}/a.txt")] {
        send(&mut c, &get(&target));
        let r = read_resp(&mut c, false);
        assert_error(&r, ST_503, b"too many download sessions\n");
        let retry: u64 = r.head.field("Retry-After").parse().expect("delay-seconds");
        assert!(retry > 0);
        assert_eq!(r.head.get("Connection"), None, "kept alive");
    }
    // The existing session is unaffected.
    send(&mut c, &get(&format!("/{x}/a.txt")));
    assert_finished_416(&read_resp(&mut c, false), 4);
}

/// Stopping the server must finish within its shutdown deadline even while the background
/// `Repr-Digest` of a very large file is being computed: the digest is an optimisation that no
/// one is waiting for, and a SIGTERM'd server must not keep running (and reading the disk) for
/// as long as hashing the file takes. The file is sparse, so it costs no disk space, only the
/// hashing time the server should abandon.
#[test]
fn shutdown_is_not_held_up_by_the_background_digest_of_a_large_file() {
    const SIZE: u64 = 20 * 1024 * 1024 * 1024;
    let root = Root::new();
    std::fs::File::create(root.path().join("huge.bin"))
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let srv = TestServer::start_with(root.path(), |cfg| {
        cfg.shutdown_timeout = Duration::from_millis(500);
    });
    let id = srv.mint();
    let r = exchange(srv.addr, &head_req(&format!("/{id}/huge.bin")));
    r.head.assert_status(ST_200);
    assert_eq!(r.head.content_length(), SIZE);
    // Let the digest task get going.
    std::thread::sleep(Duration::from_millis(300));

    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        srv.stop();
        let _ = done_tx.send(());
    });
    // Ten times the configured deadline; hashing 20 GiB takes far longer even in release.
    assert!(
        done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "the server did not stop within 5 s of a shutdown with a 500 ms deadline: \
         the background digest of the 20 GiB file holds it up"
    );
}

/// A client must be able to tell "the digest is not computed yet" from "this server has no
/// digest" (issue 10: `roam get` gave up polling after 2 s while a debug build was still
/// hashing a 64 MiB file). Until the SHA-256 of a version is known, every file response says
/// `Roam-Digest: pending`; once it is known, `Repr-Digest` replaces it.
#[test]
fn a_digest_being_computed_is_announced_as_pending_until_it_is_ready() {
    let root = Root::new();
    root.file("big.bin", &pattern(48 * 1024 * 1024, 21));
    let srv = TestServer::start(root.path());
    let id = srv.mint();
    let target = format!("/{id}/big.bin");
    // The first request starts the computation; it cannot have finished before the answer.
    let first = exchange(srv.addr, &head_req(&target));
    first.head.assert_status(ST_200);
    assert_eq!(first.head.get("Roam-Digest"), Some("pending"));
    assert_eq!(first.head.get("Repr-Digest"), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = exchange(srv.addr, &head_req(&target));
        match (r.head.get("Repr-Digest"), r.head.get("Roam-Digest")) {
            (Some(d), None) => {
                assert!(d.starts_with("sha-256=:"), "{d}");
                break;
            }
            (None, Some("pending")) => {}
            other => {
                panic!("a digest is either pending or ready, never both or neither: {other:?}")
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the digest never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
