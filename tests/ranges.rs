//! Byte ranges and conditional requests over real TCP, against RFC 9110 (§13 conditional
//! requests, §14 range requests, §15.3.7 206, §15.4.5 304, §15.5.13 412, §15.5.17 416) and
//! RFC 9530 (`Repr-Digest`), plus what ranges do to roam's download sessions.
//!
//! The conformance table sends every row as HEAD and then as GET on one connection, followed
//! by a third request on the same connection: a response whose framing is wrong (a body on
//! HEAD, a Content-Length that does not match) makes that third request fail to parse.

mod support;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::server::*;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// The table's file length: RFC 9110 §14.1.2 writes its examples against 10000 bytes.
const LEN: u64 = 10_000;
/// Modification time of the table's file, with a sub-second part so the ETag's nanoseconds
/// show.
const MTIME_SECS: u64 = 1_700_000_000;
const MTIME_NANOS: u32 = 123_456_789;

// ---------------------------------------------------------------------------------------------
// Fixture

/// A served file with the validators the server must report for it.
struct Fixture {
    /// Downloads interrupted the way a broken path interrupts them (see [`partial_get`]):
    /// closed first when the fixture is dropped, so the server is not kept waiting on them.
    hung: std::cell::RefCell<Vec<TcpStream>>,
    _root: Root,
    server: TestServer,
    path: PathBuf,
    data: Vec<u8>,
    etag: String,
    last_modified: String,
    mtime: SystemTime,
}

impl Fixture {
    /// Serves `f.bin` (`len` pattern bytes) with modification time `mtime`.
    fn new(len: usize, seed: u64, mtime: SystemTime) -> Fixture {
        Self::with_config(len, seed, mtime, |_| {})
    }

    fn with_config(
        len: usize,
        seed: u64,
        mtime: SystemTime,
        tweak: impl FnOnce(&mut roam::settings::Config),
    ) -> Fixture {
        let root = Root::new();
        let data = pattern(len, seed);
        let path = root.file("f.bin", &data);
        set_mtime(&path, mtime);
        let server = TestServer::start_with(root.path(), tweak);
        Fixture {
            hung: std::cell::RefCell::new(Vec::new()),
            etag: etag_for(len as u64, mtime),
            last_modified: httpdate::fmt_http_date(mtime),
            _root: root,
            server,
            path,
            data,
            mtime,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `/{fresh id}/f.bin`.
    fn fresh_target(&self) -> String {
        format!("/{}/f.bin", self.server.mint())
    }

    fn digest(&self) -> String {
        repr_digest_of(&self.data)
    }

    /// Replaces the file with `data` and `mtime` (a new version: new ETag).
    fn rewrite(&mut self, data: Vec<u8>, mtime: SystemTime) {
        std::fs::write(&self.path, &data).unwrap();
        set_mtime(&self.path, mtime);
        self.etag = etag_for(data.len() as u64, mtime);
        self.last_modified = httpdate::fmt_http_date(mtime);
        self.data = data;
        self.mtime = mtime;
    }

    /// Polls HEAD until the server has computed `Repr-Digest` for the current version (it is
    /// computed in the background and may be missing on the first requests).
    fn wait_for_digest(&self) -> String {
        let target = self.fresh_target();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = request(self.addr(), &head_with(&target, &[]));
            if let Some(d) = r.header("repr-digest") {
                if r.header("etag") == Some(self.etag.as_str()) {
                    return d.to_owned();
                }
            }
            assert!(
                Instant::now() < deadline,
                "Repr-Digest never appeared for {}",
                self.etag
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn mtime_at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// `"<len hex>-<mtime ns hex>"`, the strong ETag roam documents.
fn etag_for(len: u64, mtime: SystemTime) -> String {
    let ns = mtime.duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("\"{len:x}-{ns:x}\"")
}

/// `sha-256=:BASE64:` (RFC 9530 §3, a structured-field byte sequence).
fn repr_digest_of(bytes: &[u8]) -> String {
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(bytes))
    )
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP helpers

fn head_with(target: &str, headers: &[&str]) -> String {
    get_with(target, headers).replacen("GET ", "HEAD ", 1)
}

/// A connection whose receive buffer is small (autotuning off), so that what the client's TCP
/// acknowledges stays close to what the test has read.
fn connect_small(addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(32 * KIB).unwrap();
    sock.connect(&addr.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Sends a GET on a small-buffer connection, reads the head and `take` body bytes, and then
/// stops: the connection is left open and unread, as a path that breaks leaves it (the server
/// sees silence, not a close or a reset, and the client holds everything its TCP
/// acknowledged). The next request without `Range` for the session takes it over; the fixture
/// closes it when dropped.
fn partial_get(fx: &Fixture, target: &str, headers: &[&str], take: usize) -> (Response, Vec<u8>) {
    let mut s = connect_small(fx.addr());
    s.write_all(get_with(target, headers).as_bytes()).unwrap();
    let head = read_response(&mut s, true);
    let mut body = vec![0u8; take];
    s.read_exact(&mut body).expect("read partial body");
    fx.hung.borrow_mut().push(s);
    (head, body)
}

/// HEAD without Range: (status, Roam-Offset).
fn probe(addr: SocketAddr, target: &str) -> (u16, u64) {
    let r = request(addr, &head_with(target, &[]));
    let offset = r
        .header("roam-offset")
        .unwrap_or_else(|| panic!("HEAD without Range lacks Roam-Offset: {r:?}"))
        .parse()
        .unwrap();
    (r.status, offset)
}

/// Polls `probe` until `ok(offset)`; progress is recorded asynchronously.
fn wait_offset(addr: SocketAddr, target: &str, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, o) = probe(addr, target);
        if ok(o) {
            return o;
        }
        assert!(
            Instant::now() < deadline,
            "Roam-Offset stuck at {o}: expected {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls until the offset satisfies `ok` and then stays the same for 300 ms: the previous
/// connection has recorded its final progress.
fn settled_offset(addr: SocketAddr, target: &str, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let mut last = wait_offset(addr, target, what, &ok);
    let mut since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while since.elapsed() < Duration::from_millis(300) {
        assert!(Instant::now() < deadline, "Roam-Offset never settled");
        std::thread::sleep(Duration::from_millis(30));
        let (_, o) = probe(addr, target);
        if o != last {
            last = o;
            since = Instant::now();
        }
    }
    assert!(ok(last), "Roam-Offset settled at {last}: expected {what}");
    last
}

fn content_range_of(r: &Response) -> Option<(u64, u64, u64)> {
    let v = r.header("content-range")?;
    let rest = v.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, total.parse().ok()?))
}

/// The first position where `a` and `b` differ, for readable failures on large bodies.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or(if a.len() == b.len() {
            None
        } else {
            Some(a.len().min(b.len()))
        })
}

fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: {} bytes received, {} expected, first difference at byte {i}",
            got.len(),
            want.len()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// multipart/byteranges (RFC 9110 §14.6)

/// One part of a `multipart/byteranges` body: its fields and its bytes.
#[derive(Debug)]
struct Part {
    content_type: Option<String>,
    content_range: String,
    bytes: Vec<u8>,
}

/// Parses a `multipart/byteranges` body strictly: optional CRLF, then for every part
/// `--boundary CRLF fields CRLF CRLF bytes CRLF`, then `--boundary--` and an optional CRLF,
/// nothing else. Part lengths come from each part's `Content-Range`.
fn parse_multipart(content_type: &str, body: &[u8]) -> Result<Vec<Part>, String> {
    let boundary = content_type
        .strip_prefix("multipart/byteranges; boundary=")
        .ok_or_else(|| format!("not multipart/byteranges: {content_type:?}"))?
        .trim_matches('"');
    let delimiter = format!("--{boundary}").into_bytes();
    let mut pos = 0usize;
    if body.starts_with(b"\r\n") {
        pos = 2;
    }
    let mut parts = Vec::new();
    loop {
        if !body[pos..].starts_with(&delimiter) {
            return Err(format!("expected a delimiter at byte {pos}"));
        }
        pos += delimiter.len();
        if body[pos..].starts_with(b"--") {
            pos += 2;
            let rest = &body[pos..];
            if !rest.is_empty() && rest != b"\r\n" {
                return Err(format!("{} bytes after the close delimiter", rest.len()));
            }
            return Ok(parts);
        }
        if !body[pos..].starts_with(b"\r\n") {
            return Err(format!("no CRLF after a delimiter at byte {pos}"));
        }
        pos += 2;
        let fields_end = body[pos..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("part fields never end")?;
        let fields =
            std::str::from_utf8(&body[pos..pos + fields_end]).map_err(|e| e.to_string())?;
        pos += fields_end + 4;
        let mut content_type = None;
        let mut content_range = None;
        for line in fields.split("\r\n") {
            let (name, value) = line.split_once(':').ok_or("bad part field")?;
            match name.trim().to_ascii_lowercase().as_str() {
                "content-type" => content_type = Some(value.trim().to_owned()),
                "content-range" => content_range = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        let content_range = content_range.ok_or("a part without Content-Range")?;
        let span = content_range
            .strip_prefix("bytes ")
            .and_then(|r| r.split_once('/'))
            .and_then(|(s, _)| s.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .ok_or_else(|| format!("bad part Content-Range {content_range:?}"))?;
        let len = span.1 + 1 - span.0;
        if body.len() < pos + len {
            return Err("a part is cut short".into());
        }
        let bytes = body[pos..pos + len].to_vec();
        pos += len;
        if !body[pos..].starts_with(b"\r\n") {
            return Err(format!("no CRLF after a part's bytes at byte {pos}"));
        }
        pos += 2;
        parts.push(Part {
            content_type,
            content_range,
            bytes,
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The conformance table

/// What the body of the GET must be.
#[derive(Clone, Debug)]
enum Body {
    /// The whole file.
    Whole,
    /// `first..=last` of the file.
    Slice(u64, u64),
    /// `multipart/byteranges` with these inclusive ranges, in this order.
    Parts(Vec<(u64, u64)>),
    /// Nothing (304, 412, 416).
    Empty,
}

/// One row: the request's header lines, the status, the `Content-Range` of the head (`None`:
/// absent) and the body.
#[derive(Clone, Debug)]
struct Case {
    /// The RFC section and what the row checks.
    why: &'static str,
    headers: Vec<String>,
    status: u16,
    content_range: Option<String>,
    body: Body,
}

fn hs<S: AsRef<str>>(lines: &[S]) -> Vec<String> {
    lines.iter().map(|s| s.as_ref().to_owned()).collect()
}

fn whole(why: &'static str, headers: Vec<String>) -> Case {
    Case {
        why,
        headers,
        status: 200,
        content_range: None,
        body: Body::Whole,
    }
}

fn partial(why: &'static str, headers: Vec<String>, first: u64, last: u64) -> Case {
    Case {
        why,
        headers,
        status: 206,
        content_range: Some(format!("bytes {first}-{last}/{LEN}")),
        body: Body::Slice(first, last),
    }
}

fn multi(why: &'static str, headers: Vec<String>, parts: &[(u64, u64)]) -> Case {
    Case {
        why,
        headers,
        status: 206,
        content_range: None,
        body: Body::Parts(parts.to_vec()),
    }
}

fn unsatisfiable(why: &'static str, headers: Vec<String>) -> Case {
    Case {
        why,
        headers,
        status: 416,
        content_range: Some(format!("bytes */{LEN}")),
        body: Body::Empty,
    }
}

fn bodiless(why: &'static str, headers: Vec<String>, status: u16) -> Case {
    Case {
        why,
        headers,
        status,
        content_range: None,
        body: Body::Empty,
    }
}

fn range(spec: &str) -> String {
    format!("Range: {spec}")
}

/// `count` one-byte ranges 200 bytes apart (gaps far above the coalescing threshold).
fn disjoint(count: u64) -> (String, Vec<(u64, u64)>) {
    let spans: Vec<(u64, u64)> = (0..count).map(|i| (i * 200, i * 200)).collect();
    let spec = spans
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(",");
    (format!("bytes={spec}"), spans)
}

fn table(fx: &Fixture) -> Vec<Case> {
    let etag = fx.etag.as_str();
    let weak = format!("W/{etag}");
    let lm = fx.last_modified.as_str();
    let before = httpdate::fmt_http_date(fx.mtime - Duration::from_secs(1));
    let after = httpdate::fmt_http_date(fx.mtime + Duration::from_secs(1));
    let r = |s: &str| range(s);
    let (sixteen, sixteen_parts) = disjoint(16);
    let (seventeen, _) = disjoint(17);
    let (hundred_one_disjoint, _) = disjoint(101);
    let hundred_zero = format!("bytes={}", vec!["0-0"; 100].join(","));
    let hundred_one_zero = format!("bytes={}", vec!["0-0"; 101].join(","));

    vec![
        // --- No Range -----------------------------------------------------------------------
        // §15.3.1: a plain GET of a new session is the whole representation.
        whole("§15.3.1 no Range: 200, whole file", vec![]),
        // --- Range forms (§14.1.2) ------------------------------------------------------------
        // §14.1.2: first-last, inclusive.
        partial("§14.1.2 bytes=0-499", hs(&[r("bytes=0-499")]), 0, 499),
        partial("§14.1.2 bytes=500-999", hs(&[r("bytes=500-999")]), 500, 999),
        partial("§14.1.2 one byte bytes=0-0", hs(&[r("bytes=0-0")]), 0, 0),
        // §14.1.2: open-ended first- runs to the end.
        partial(
            "§14.1.2 open-ended bytes=9500-",
            hs(&[r("bytes=9500-")]),
            9500,
            9999,
        ),
        partial(
            "§14.1.2 open-ended last byte bytes=9999-",
            hs(&[r("bytes=9999-")]),
            9999,
            9999,
        ),
        // §14.1.2 + §15.3.7: bytes=0- is satisfiable; a 206 covering everything is allowed.
        partial(
            "§14.1.2 bytes=0- (whole as 206)",
            hs(&[r("bytes=0-")]),
            0,
            9999,
        ),
        // §14.1.2: suffix -N is the final N bytes.
        partial(
            "§14.1.2 suffix bytes=-500",
            hs(&[r("bytes=-500")]),
            9500,
            9999,
        ),
        partial("§14.1.2 suffix bytes=-1", hs(&[r("bytes=-1")]), 9999, 9999),
        // §14.1.2: a suffix longer than the representation selects all of it.
        partial(
            "§14.1.2 suffix longer than file",
            hs(&[r("bytes=-20000")]),
            0,
            9999,
        ),
        // §14.1.2: last-pos at or past the length is replaced by length-1.
        partial(
            "§14.1.2 end past EOF clamped",
            hs(&[r("bytes=5000-99999")]),
            5000,
            9999,
        ),
        partial(
            "§14.1.2 last-pos = length clamped",
            hs(&[r("bytes=9000-10000")]),
            9000,
            9999,
        ),
        partial(
            "§14.1.2 huge last-pos clamped",
            hs(&[r("bytes=3-99999999999999999999999")]),
            3,
            9999,
        ),
        // --- Case and whitespace (§14.1, §5.5, §5.6.1) ----------------------------------------
        // §14.1: range units are case-insensitive.
        partial("§14.1 BYTES=0-1", hs(&[r("BYTES=0-1")]), 0, 1),
        partial("§14.1 Bytes=0-1", hs(&[r("Bytes=0-1")]), 0, 1),
        // §5.1: field names are case-insensitive.
        partial(
            "§5.1 lower-case field name",
            hs(&["range: bytes=0-1"]),
            0,
            1,
        ),
        // §5.6.1: OWS around list elements (so after '=').
        partial("§5.6.1 bytes= 0-1", hs(&[r("bytes= 0-1")]), 0, 1),
        // §5.5: OWS around the field value.
        partial("§5.5 surrounding OWS", hs(&["Range:   bytes=0-1  "]), 0, 1),
        // §5.6.1 + §14.2: OWS before a comma; 0-1 and 5-6 are 3 bytes apart and coalesce.
        partial(
            "§5.6.1 bytes=0-1 , 5-6 coalesced",
            hs(&[r("bytes=0-1 , 5-6")]),
            0,
            6,
        ),
        // §5.6.1: empty list elements are ignored.
        partial(
            "§5.6.1 empty list element",
            hs(&[r("bytes=0-1,,5-6")]),
            0,
            6,
        ),
        partial("§5.6.1 trailing comma", hs(&[r("bytes=0-1,")]), 0, 1),
        // --- Garbage: ignored, whole file (§14.2: a server MAY ignore Range) ------------------
        whole("§14.1.1 bytes=a-b not digits", hs(&[r("bytes=a-b")])),
        whole(
            "§14.1.1 bytes=1-0 first > last is invalid",
            hs(&[r("bytes=1-0")]),
        ),
        whole("§14.2 unknown unit items=0-1", hs(&[r("items=0-1")])),
        whole("§14.1.1 bytes= empty set", hs(&[r("bytes=")])),
        whole("§14.1.1 bytes=- ", hs(&[r("bytes=-")])),
        whole("§14.1.1 bytes with no '='", hs(&[r("bytes")])),
        whole("§14.1.1 whitespace inside a spec", hs(&[r("bytes=0 -1")])),
        whole("§14.1 whitespace before '='", hs(&[r("bytes =0-1")])),
        whole("§14.1.1 signed number", hs(&[r("bytes=+1-2")])),
        whole("§14.1.1 hex number", hs(&[r("bytes=0x10-")])),
        whole("§14.1.1 three numbers", hs(&[r("bytes=1-2-3")])),
        whole(
            "§14.1.1 one bad element spoils the set",
            hs(&[r("bytes=0-1,a-b")]),
        ),
        whole(
            "§14.1.1 parameters are not grammar",
            hs(&[r("bytes=0-1;x")]),
        ),
        // --- Unsatisfiable (§14.1.2, §15.5.17: 416 with Content-Range: bytes */len) ----------
        unsatisfiable("§15.5.17 first-pos = length", hs(&[r("bytes=10000-")])),
        unsatisfiable(
            "§15.5.17 closed range past EOF",
            hs(&[r("bytes=10000-20000")]),
        ),
        unsatisfiable("§14.1.2 suffix of 0 bytes", hs(&[r("bytes=-0")])),
        unsatisfiable(
            "§14.1.2 all elements past EOF",
            hs(&[r("bytes=20000-30000,10000-")]),
        ),
        unsatisfiable(
            "§14.1.2 huge first-pos",
            hs(&[r("bytes=99999999999999999999999-")]),
        ),
        // §14.1.2: one satisfiable element is enough; the unsatisfiable one is dropped.
        partial(
            "§14.1.2 one satisfiable element",
            hs(&[r("bytes=20000-30000,2-3")]),
            2,
            3,
        ),
        // --- Several ranges (§14.6, §15.3.7.2) ------------------------------------------------
        multi(
            "§14.6 two ranges: multipart",
            hs(&[r("bytes=0-0,-1")]),
            &[(0, 0), (9999, 9999)],
        ),
        // §15.3.7.2: parts SHOULD follow the order of the request.
        multi(
            "§15.3.7.2 parts in request order",
            hs(&[r("bytes=9000-9099,0-99")]),
            &[(9000, 9099), (0, 99)],
        ),
        // §15.3.7.2: overlapping ranges MAY be coalesced; here into one, so a single part.
        partial(
            "§15.3.7.2 overlap coalesced",
            hs(&[r("bytes=0-99,50-149")]),
            0,
            149,
        ),
        partial(
            "§15.3.7.2 adjacent coalesced",
            hs(&[r("bytes=500-600,601-999")]),
            500,
            999,
        ),
        partial(
            "§15.3.7.2 contained coalesced",
            hs(&[r("bytes=0-999,10-20")]),
            0,
            999,
        ),
        partial(
            "§15.3.7.2 open-ended twice coalesced",
            hs(&[r("bytes=100-,200-")]),
            100,
            9999,
        ),
        // §15.3.7.2: a gap smaller than a part's overhead MAY be coalesced (roam: < 80 bytes).
        partial(
            "§15.3.7.2 gap of 79 coalesced",
            hs(&[r("bytes=0-99,179-199")]),
            0,
            199,
        ),
        multi(
            "§15.3.7.2 gap of 81 kept apart",
            hs(&[r("bytes=0-99,181-199")]),
            &[(0, 99), (181, 199)],
        ),
        multi(
            "§15.3.7.2 three parts, one pair coalesced",
            hs(&[r("bytes=5000-5009,0-9,5010-5019,9990-")]),
            &[(5000, 5019), (0, 9), (9990, 9999)],
        ),
        multi(
            "§15.3.7.2 16 parts allowed",
            hs(&[r(&sixteen)]),
            &sixteen_parts,
        ),
        // §14.2: a server MAY ignore a Range of many small ranges (roam: > 16 parts → 200).
        whole("§14.2 17 disjoint parts → whole", hs(&[r(&seventeen)])),
        // §14.2: roam ignores a Range listing more than 100 ranges.
        whole(
            "§14.2 101 disjoint listed → whole",
            hs(&[r(&hundred_one_disjoint)]),
        ),
        whole(
            "§14.2 101 × 0-0 listed → whole",
            hs(&[r(&hundred_one_zero)]),
        ),
        // §15.3.7.2: 100 copies of the same range coalesce to one part.
        partial(
            "§15.3.7.2 100 × 0-0 → single",
            hs(&[r(&hundred_zero)]),
            0,
            0,
        ),
        // --- If-Match / If-Unmodified-Since (§13.1.1, §13.1.4) ---------------------------------
        whole(
            "§13.1.1 If-Match own strong tag",
            hs(&[format!("If-Match: {etag}")]),
        ),
        whole("§13.1.1 If-Match *", hs(&["If-Match: *"])),
        whole(
            "§13.1.1 If-Match list",
            hs(&[format!("If-Match: \"x\", {etag}")]),
        ),
        // §13.1.1: If-Match uses the strong comparison (§8.8.3.2): a weak tag never matches.
        bodiless(
            "§13.1.1 If-Match weak tag → 412",
            hs(&[format!("If-Match: {weak}")]),
            412,
        ),
        bodiless(
            "§13.1.1 If-Match other tag → 412",
            hs(&["If-Match: \"other\""]),
            412,
        ),
        whole(
            "§13.1.4 If-Unmodified-Since = LM",
            hs(&[format!("If-Unmodified-Since: {lm}")]),
        ),
        whole(
            "§13.1.4 If-Unmodified-Since later",
            hs(&[format!("If-Unmodified-Since: {after}")]),
        ),
        bodiless(
            "§13.1.4 If-Unmodified-Since earlier → 412",
            hs(&[format!("If-Unmodified-Since: {before}")]),
            412,
        ),
        whole(
            "§13.1.4 invalid date ignored",
            hs(&["If-Unmodified-Since: yesterday"]),
        ),
        // §13.1.4: If-Unmodified-Since is ignored when If-Match is present.
        whole(
            "§13.1.4 If-Match wins over If-Unmodified-Since",
            hs(&[
                format!("If-Match: {etag}"),
                format!("If-Unmodified-Since: {before}"),
            ]),
        ),
        bodiless(
            "§13.2.2 failing If-Match with a true If-Unmodified-Since → 412",
            hs(&[
                "If-Match: \"zzz\"".to_owned(),
                format!("If-Unmodified-Since: {after}"),
            ]),
            412,
        ),
        // --- If-None-Match / If-Modified-Since (§13.1.2, §13.1.3, §15.4.5) --------------------
        bodiless(
            "§13.1.2 If-None-Match own tag → 304",
            hs(&[format!("If-None-Match: {etag}")]),
            304,
        ),
        // §13.1.2: If-None-Match uses the weak comparison.
        bodiless(
            "§13.1.2 If-None-Match weak → 304",
            hs(&[format!("If-None-Match: {weak}")]),
            304,
        ),
        bodiless(
            "§13.1.2 If-None-Match * → 304",
            hs(&["If-None-Match: *"]),
            304,
        ),
        bodiless(
            "§13.1.2 If-None-Match list → 304",
            hs(&[format!("If-None-Match: \"a\", {etag}")]),
            304,
        ),
        whole(
            "§13.1.2 If-None-Match other tag",
            hs(&["If-None-Match: \"zzz\""]),
        ),
        bodiless(
            "§13.1.3 If-Modified-Since = LM → 304",
            hs(&[format!("If-Modified-Since: {lm}")]),
            304,
        ),
        bodiless(
            "§13.1.3 If-Modified-Since later → 304",
            hs(&[format!("If-Modified-Since: {after}")]),
            304,
        ),
        whole(
            "§13.1.3 If-Modified-Since earlier",
            hs(&[format!("If-Modified-Since: {before}")]),
        ),
        whole(
            "§13.1.3 invalid date ignored",
            hs(&["If-Modified-Since: not a date"]),
        ),
        // §13.1.3: If-Modified-Since is ignored when If-None-Match is present.
        whole(
            "§13.1.3 If-None-Match wins over If-Modified-Since",
            hs(&[
                "If-None-Match: \"zzz\"".to_owned(),
                format!("If-Modified-Since: {lm}"),
            ]),
        ),
        bodiless(
            "§13.2.2 matching If-None-Match with an earlier If-Modified-Since → 304",
            hs(&[
                format!("If-None-Match: {etag}"),
                format!("If-Modified-Since: {before}"),
            ]),
            304,
        ),
        // --- Precedence (§13.2.2): 412 is decided before 304 ---------------------------------
        bodiless(
            "§13.2.2 If-Match fails before If-None-Match → 412",
            hs(&[
                "If-Match: \"zzz\"".to_owned(),
                format!("If-None-Match: {etag}"),
            ]),
            412,
        ),
        bodiless(
            "§13.2.2 If-Unmodified-Since fails before If-Modified-Since → 412",
            hs(&[
                format!("If-Unmodified-Since: {before}"),
                format!("If-Modified-Since: {after}"),
            ]),
            412,
        ),
        // §13.2.2 steps 1-4 come before Range (step 5).
        partial(
            "§13.2.2 passing If-Match then Range",
            hs(&[format!("If-Match: {etag}"), r("bytes=0-9")]),
            0,
            9,
        ),
        bodiless(
            "§13.2.2 If-Match fails before Range → 412",
            hs(&["If-Match: \"zzz\"".to_owned(), r("bytes=0-9")]),
            412,
        ),
        bodiless(
            "§13.2.2 If-None-Match before Range → 304",
            hs(&[format!("If-None-Match: {etag}"), r("bytes=0-9")]),
            304,
        ),
        bodiless(
            "§13.2.2 If-None-Match before an unsatisfiable Range → 304",
            hs(&[format!("If-None-Match: {etag}"), r("bytes=20000-")]),
            304,
        ),
        // --- If-Range (§13.1.5, §13.2.2 step 5) ----------------------------------------------
        partial(
            "§13.1.5 If-Range own strong tag → Range honoured",
            hs(&[r("bytes=0-99"), format!("If-Range: {etag}")]),
            0,
            99,
        ),
        partial(
            "§13.1.5 If-Range exact Last-Modified → Range honoured",
            hs(&[r("bytes=0-99"), format!("If-Range: {lm}")]),
            0,
            99,
        ),
        whole(
            "§13.1.5 If-Range weak tag → whole",
            hs(&[r("bytes=0-99"), format!("If-Range: {weak}")]),
        ),
        whole(
            "§13.1.5 If-Range stale tag → whole",
            hs(&[r("bytes=0-99"), "If-Range: \"stale\"".to_owned()]),
        ),
        whole(
            "§13.1.5 If-Range later date (not exact) → whole",
            hs(&[r("bytes=0-99"), format!("If-Range: {after}")]),
        ),
        whole(
            "§13.1.5 If-Range earlier date → whole",
            hs(&[r("bytes=0-99"), format!("If-Range: {before}")]),
        ),
        whole(
            "§13.1.5 If-Range junk → whole",
            hs(&[r("bytes=0-99"), "If-Range: junk".to_owned()]),
        ),
        // §13.1.5: If-Range without Range is ignored.
        whole(
            "§13.1.5 If-Range without Range",
            hs(&["If-Range: \"stale\""]),
        ),
        whole(
            "§13.1.5 stale If-Range with an unsatisfiable Range → whole, not 416",
            hs(&[r("bytes=20000-"), "If-Range: \"stale\"".to_owned()]),
        ),
        multi(
            "§13.1.5 If-Range own tag with several ranges",
            hs(&[r("bytes=0-0,-1"), format!("If-Range: {etag}")]),
            &[(0, 0), (9999, 9999)],
        ),
        unsatisfiable(
            "§13.1.5 If-Range own tag with an unsatisfiable Range → 416",
            hs(&[r("bytes=20000-"), format!("If-Range: {etag}")]),
        ),
        whole(
            "§13.1.5 If-Range own tag with a garbage Range → whole",
            hs(&[r("bytes=a-b"), format!("If-Range: {etag}")]),
        ),
        // --- Singleton field sent twice (§5.3: Range is not a list) ----------------------------
        bodiless(
            "§5.3 two Range fields → 400",
            hs(&[r("bytes=0-1"), r("bytes=2-3")]),
            400,
        ),
    ]
}

/// Checks a GET or HEAD response against a row; `head` for HEAD. Returns the problems found.
fn check(fx: &Fixture, case: &Case, resp: &Response, head: bool, digest: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let method = if head { "HEAD" } else { "GET" };
    if resp.status != case.status {
        bad.push(format!(
            "{method}: status {} (want {})",
            resp.status, case.status
        ));
        return bad;
    }
    if resp.header("content-range") != case.content_range.as_deref() {
        bad.push(format!(
            "{method}: Content-Range {:?} (want {:?})",
            resp.header("content-range"),
            case.content_range
        ));
    }
    if case.status == 400 {
        return bad;
    }
    // Validators on every response about the representation (§8.8, §15.4.5 for 304).
    if resp.header("etag") != Some(fx.etag.as_str()) {
        bad.push(format!("{method}: ETag {:?}", resp.header("etag")));
    }
    if resp.header("last-modified") != Some(fx.last_modified.as_str()) {
        bad.push(format!(
            "{method}: Last-Modified {:?}",
            resp.header("last-modified")
        ));
    }
    if matches!(case.status, 200 | 206) {
        if resp.header("accept-ranges") != Some("bytes") {
            bad.push(format!(
                "{method}: Accept-Ranges {:?}",
                resp.header("accept-ranges")
            ));
        }
        // RFC 9530 §3: the digest of the whole representation, also on 206.
        if resp.header("repr-digest") != Some(digest) {
            bad.push(format!(
                "{method}: Repr-Digest {:?}",
                resp.header("repr-digest")
            ));
        }
    }
    let expected_len = match &case.body {
        Body::Whole => Some(LEN as usize),
        Body::Slice(a, b) => Some((b - a + 1) as usize),
        Body::Parts(_) => None,
        Body::Empty => (case.status != 304).then_some(0),
    };
    let content_length: Option<usize> = resp.header("content-length").map(|v| v.parse().unwrap());
    if let Some(want) = expected_len {
        if content_length != Some(want) {
            bad.push(format!(
                "{method}: Content-Length {content_length:?} (want {want})"
            ));
        }
    }
    if head {
        if !resp.body.is_empty() {
            bad.push("HEAD: a body".into());
        }
        return bad;
    }
    if content_length.is_some_and(|n| n != resp.body.len()) {
        bad.push("GET: body length differs from Content-Length".into());
    }
    match &case.body {
        Body::Whole => {
            if resp.body != fx.data {
                bad.push("GET: body is not the whole file".into());
            }
        }
        Body::Slice(a, b) => {
            if resp.body[..] != fx.data[*a as usize..=*b as usize] {
                bad.push("GET: body is not the requested slice".into());
            }
        }
        Body::Empty => {
            if !resp.body.is_empty() {
                bad.push("GET: unexpected body".into());
            }
        }
        Body::Parts(spans) => {
            let ct = resp.header("content-type").unwrap_or("");
            match parse_multipart(ct, &resp.body) {
                Err(e) => bad.push(format!("GET: multipart body: {e}")),
                Ok(parts) => {
                    let got: Vec<String> = parts.iter().map(|p| p.content_range.clone()).collect();
                    let want: Vec<String> = spans
                        .iter()
                        .map(|(a, b)| format!("bytes {a}-{b}/{LEN}"))
                        .collect();
                    if got != want {
                        bad.push(format!("GET: part ranges {got:?} (want {want:?})"));
                    }
                    for (p, (a, b)) in parts.iter().zip(spans) {
                        if p.bytes[..] != fx.data[*a as usize..=*b as usize] {
                            bad.push(format!("GET: part {} has the wrong bytes", p.content_range));
                        }
                        if p.content_type.as_deref() != Some("application/octet-stream") {
                            bad.push(format!("GET: part Content-Type {:?}", p.content_type));
                        }
                    }
                }
            }
        }
    }
    bad
}

/// HEAD must carry GET's fields (RFC 9110 §9.3.2), `Date` and the random multipart boundary
/// aside.
fn compare_head_to_get(head: &Response, get: &Response) -> Vec<String> {
    let mut bad = Vec::new();
    let mut names: Vec<&String> = head.headers.keys().chain(get.headers.keys()).collect();
    names.sort();
    names.dedup();
    for name in names {
        let (h, g) = (head.header(name), get.header(name));
        let same = match name.as_str() {
            "date" => h.is_some() && g.is_some(),
            "content-type" if g.is_some_and(|v| v.starts_with("multipart/byteranges")) => {
                h.is_some_and(|v| v.starts_with("multipart/byteranges; boundary="))
            }
            _ => h == g,
        };
        if !same {
            bad.push(format!("HEAD {name}: {h:?} vs GET {g:?}"));
        }
    }
    bad
}

#[test]
fn conformance_table() {
    let fx = Fixture::new(LEN as usize, 7, mtime_at(MTIME_SECS, MTIME_NANOS));
    // The documented ETag form, to the nanosecond: "<len hex>-<mtime ns hex>".
    assert_eq!(fx.etag, "\"2710-17979cfe3d85cd15\"");
    let digest = fx.wait_for_digest();
    assert_eq!(
        digest,
        fx.digest(),
        "Repr-Digest is not sha-256 of the file"
    );

    let mut failures = Vec::new();
    for case in table(&fx) {
        let target = fx.fresh_target();
        let lines: Vec<&str> = case.headers.iter().map(|s| s.as_str()).collect();
        let mut s = connect(fx.addr());
        // HEAD first: it must not change the session the GET then sees.
        s.write_all(head_with(&target, &lines).as_bytes()).unwrap();
        let head = read_response(&mut s, true);
        // The same HEAD without Range, before the GET can move the session.
        let has_range = lines
            .iter()
            .any(|l| l.to_ascii_lowercase().starts_with("range:"));
        let plain_head = has_range.then(|| {
            let without: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| !l.to_ascii_lowercase().starts_with("range:"))
                .collect();
            let mut p = connect(fx.addr());
            p.write_all(head_with(&target, &without).as_bytes())
                .unwrap();
            read_response(&mut p, true)
        });
        let closes = head.header("connection") == Some("close");
        let get = if closes {
            let mut s = connect(fx.addr());
            s.write_all(get_with(&target, &lines).as_bytes()).unwrap();
            read_response(&mut s, false)
        } else {
            s.write_all(get_with(&target, &lines).as_bytes()).unwrap();
            let get = read_response(&mut s, false);
            if get.header("connection") != Some("close") {
                // Framing: the next response on this connection must start right after the body.
                s.write_all(get_with("/", &[]).as_bytes()).unwrap();
                let next = read_response(&mut s, false);
                if next.status != 200 || next.body.len() != 36 {
                    failures.push(format!(
                        "{}: the connection is out of step after GET",
                        case.why
                    ));
                }
            }
            get
        };
        let mut bad = check(&fx, &case, &get, false, &digest);
        let without_range: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| !l.to_ascii_lowercase().starts_with("range:"))
            .collect();
        if without_range.len() == lines.len() || get.status == 400 {
            bad.extend(check(&fx, &case, &head, true, &digest));
            if head.status == get.status {
                bad.extend(compare_head_to_get(&head, &get));
            }
        } else {
            // RFC 9110 §14.2: Range is defined for GET only, so HEAD ignores it and answers as
            // it would without it.
            let plain = plain_head.as_ref().expect("sent for rows with Range");
            for name in ["content-length", "content-range", "etag", "roam-offset"] {
                if head.header(name) != plain.header(name) {
                    bad.push(format!(
                        "HEAD with Range differs from HEAD without it in {name}: {:?} vs {:?}",
                        head.header(name),
                        plain.header(name)
                    ));
                }
            }
            if head.status != plain.status {
                bad.push(format!(
                    "HEAD with Range: status {} but {} without it",
                    head.status, plain.status
                ));
            }
        }
        if !bad.is_empty() {
            failures.push(format!(
                "{} {:?}:\n    {}",
                case.why,
                case.headers,
                bad.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Multipart framing in detail: the total `Content-Length` is exactly the parts' headers,
/// bytes and delimiters, and the connection stays in step for the next request.
#[test]
fn multipart_body_and_length_are_exact() {
    let fx = Fixture::new(LEN as usize, 8, mtime_at(MTIME_SECS, 0));
    let target = fx.fresh_target();
    let mut s = connect(fx.addr());
    s.write_all(get_with(&target, &["Range: bytes=10-19, 5000-5099, -7"]).as_bytes())
        .unwrap();
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        None,
        "§14.4: no Content-Range on a multipart head"
    );
    let ct = r.header("content-type").unwrap().to_owned();
    let boundary = ct.strip_prefix("multipart/byteranges; boundary=").unwrap();
    // RFC 2046 §5.1.1: 1 to 70 characters from bchars.
    assert!((1..=70).contains(&boundary.len()), "{boundary:?}");
    assert!(!fx
        .data
        .windows(boundary.len())
        .any(|w| w == boundary.as_bytes()));
    let parts = parse_multipart(&ct, &r.body).unwrap();
    let spans = [(10usize, 19usize), (5000, 5099), (9993, 9999)];
    assert_eq!(parts.len(), spans.len());
    let mut expected_len = 0;
    for (p, (a, b)) in parts.iter().zip(spans) {
        assert_eq!(p.content_range, format!("bytes {a}-{b}/{LEN}"));
        assert_eq!(p.bytes, fx.data[a..=b]);
        // "\r\n--B\r\nContent-Type: T\r\nContent-Range: R\r\n\r\n" + bytes
        expected_len += 2
            + 2
            + boundary.len()
            + 2
            + "Content-Type: application/octet-stream\r\n".len()
            + format!("Content-Range: {}\r\n", p.content_range).len()
            + 2
            + p.bytes.len();
    }
    expected_len += 2 + 2 + boundary.len() + 2 + 2; // "\r\n--B--\r\n"
    assert_eq!(r.body.len(), expected_len, "multipart body size");
    assert_eq!(
        r.header("content-length"),
        Some(expected_len.to_string().as_str())
    );
    s.write_all(get_with("/", &[]).as_bytes()).unwrap();
    assert_eq!(read_response(&mut s, false).status, 200);
}

/// RFC 9110 §15.3.7.2: "the server SHOULD send the parts in the same order that the
/// corresponding range-spec appeared in the received Range header field, excluding those
/// ranges that were deemed unsatisfiable or that were coalesced into other ranges". roam sorts
/// every part (src/range.rs `plan`, `ranges.sort_unstable()`), by design.
#[test]
fn multipart_parts_follow_request_order() {
    let fx = Fixture::new(LEN as usize, 9, mtime_at(MTIME_SECS, 0));
    let r = request(
        fx.addr(),
        &get_with(&fx.fresh_target(), &["Range: bytes=9000-9099,0-99"]),
    );
    assert_eq!(r.status, 206);
    let parts = parse_multipart(r.header("content-type").unwrap(), &r.body).unwrap();
    let order: Vec<&str> = parts.iter().map(|p| p.content_range.as_str()).collect();
    assert_eq!(order, ["bytes 9000-9099/10000", "bytes 0-99/10000"]);
}

/// RFC 9110 §14.2: "A server MUST ignore a Range header field received with a request method
/// that is unrecognized or for which range handling is not defined. For this specification,
/// GET is the only method for which range handling is defined." roam follows it: HEAD reports
/// what a GET without Range would get.
#[test]
fn head_ignores_range() {
    let fx = Fixture::new(LEN as usize, 10, mtime_at(MTIME_SECS, 0));
    let r = request(
        fx.addr(),
        &head_with(&fx.fresh_target(), &["Range: bytes=0-99"]),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("10000"));
    assert_eq!(r.header("content-range"), None);
}

/// The documented coalescing rule is "gaps < 80 bytes" (src/range.rs `COALESCE_GAP`: "Ranges
/// separated by fewer bytes than a part's own header costs are merged"). A gap of exactly 80
/// bytes must therefore stay two parts. RFC 9110 §15.3.7.2 allows either; this checks roam's
/// own contract.
#[test]
fn coalescing_gap_of_exactly_80_bytes_is_not_merged() {
    let fx = Fixture::new(LEN as usize, 11, mtime_at(MTIME_SECS, 0));
    // 0-99 ends at byte 99; bytes 100..=179 (80 bytes) lie between it and 180-199.
    let r = request(
        fx.addr(),
        &get_with(&fx.fresh_target(), &["Range: bytes=0-99,180-199"]),
    );
    assert_eq!(r.status, 206);
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("multipart/byteranges")),
        "an 80-byte gap was coalesced (Content-Range {:?}): src/range.rs plan() merges when \
         r.start <= prev.end + COALESCE_GAP, i.e. gaps <= 80, not < 80",
        r.header("content-range")
    );
}

// ---------------------------------------------------------------------------------------------
// Repr-Digest (RFC 9530)

#[test]
fn repr_digest_is_sha256_of_the_file_on_200_206_multipart_and_head() {
    let mut fx = Fixture::new(3 * MIB, 12, mtime_at(MTIME_SECS, 5));
    let want = fx.digest();
    assert_eq!(fx.wait_for_digest(), want);
    let check = |fx: &Fixture, want: &str| {
        let target = fx.fresh_target();
        let head = request(fx.addr(), &head_with(&target, &[]));
        assert_eq!(head.header("repr-digest"), Some(want), "HEAD");
        let ranged = request(fx.addr(), &get_with(&target, &["Range: bytes=10-19"]));
        assert_eq!(ranged.status, 206);
        assert_eq!(ranged.header("repr-digest"), Some(want), "206");
        let multi = request(fx.addr(), &get_with(&target, &["Range: bytes=0-0,-1"]));
        assert_eq!(multi.status, 206);
        assert_eq!(multi.header("repr-digest"), Some(want), "multipart 206");
        let full = request(fx.addr(), &get_with(&target, &[]));
        assert_eq!(full.status, 200);
        assert_eq!(full.header("repr-digest"), Some(want), "200");
        assert_eq!(
            repr_digest_of(&full.body),
            want,
            "the 200 body hashes to Repr-Digest"
        );
    };
    check(&fx, &want);

    // A new version: until its digest is ready the field may be missing, but it must never
    // carry the old version's digest next to the new ETag.
    fx.rewrite(pattern(3 * MIB, 13), mtime_at(MTIME_SECS + 60, 0));
    let new = fx.digest();
    assert_ne!(new, want);
    let target = fx.fresh_target();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = request(fx.addr(), &head_with(&target, &[]));
        assert_eq!(r.header("etag"), Some(fx.etag.as_str()));
        match r.header("repr-digest") {
            Some(d) if d == new => break,
            Some(d) => panic!("new ETag {} with digest {d}, want {new}", fx.etag),
            None => {}
        }
        assert!(Instant::now() < deadline, "new digest never computed");
        std::thread::sleep(Duration::from_millis(25));
    }
    check(&fx, &new);
}

// ---------------------------------------------------------------------------------------------
// Ranges and the session record

/// `Range: bytes=N-` declares the client's position: the session follows it (new epoch), and
/// the next Range-less GET resumes from N plus what the client confirmed of that response.
#[test]
fn open_ended_range_moves_the_session() {
    let fx = Fixture::new(8 * MIB, 20, mtime_at(MTIME_SECS, 0));
    let len = fx.data.len() as u64;
    let target = fx.fresh_target();

    // A server-resumed download that breaks after 1 MiB.
    let (h, got) = partial_get(&fx, &target, &[], MIB);
    assert_eq!(h.status, 200);
    assert_eq!(got, fx.data[..MIB]);
    let first = settled_offset(fx.addr(), &target, ">= 1 MiB", |o| o >= MIB as u64);
    assert!(
        first < 4 * MIB as u64,
        "confirmed {first} after reading 1 MiB"
    );

    // The client declares it holds 5 MiB and breaks again after 256 KiB more.
    let n = 5 * MIB;
    let (h, got) = partial_get(&fx, &target, &[&format!("Range: bytes={n}-")], 256 * KIB);
    assert_eq!(h.status, 206);
    assert_eq!(
        h.header("content-range"),
        Some(format!("bytes {n}-{}/{len}", len - 1).as_str())
    );
    assert_eq!(got, fx.data[n..n + 256 * KIB]);
    let declared = (n + 256 * KIB) as u64;
    let at = settled_offset(fx.addr(), &target, ">= N + 256 KiB", |o| o >= declared);
    assert!(
        at < declared + MIB as u64,
        "offset {at} far past what was read"
    );
    assert_eq!(
        probe(fx.addr(), &target),
        (206, at),
        "HEAD reports where a GET starts"
    );

    // A Range-less GET on a new connection continues there, with the right bytes.
    let r = request(fx.addr(), &get_with(&target, &[]));
    assert_eq!(r.status, 206);
    assert_eq!(r.header("roam-offset"), Some(at.to_string().as_str()));
    assert_eq!(content_range_of(&r), Some((at, len - 1, len)));
    assert_bytes(&r.body, &fx.data[at as usize..], "resumed body");

    // Everything confirmed: 416 bytes */len, Roam-Offset = len.
    wait_offset(fx.addr(), &target, "complete", |o| o == len);
    let done = request(fx.addr(), &head_with(&target, &[]));
    assert_eq!(done.status, 416);
    assert_eq!(
        done.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );
}

/// A declared position may also move the session backwards.
#[test]
fn bytes_0_dash_starts_over() {
    let fx = Fixture::new(8 * MIB, 21, mtime_at(MTIME_SECS, 0));
    let len = fx.data.len() as u64;
    let target = fx.fresh_target();
    partial_get(&fx, &target, &[], 3 * MIB);
    settled_offset(fx.addr(), &target, ">= 3 MiB", |o| o >= 3 * MIB as u64);

    // HEAD with bytes=0- is not a download: the session stays.
    let head = request(fx.addr(), &head_with(&target, &["Range: bytes=0-"]));
    assert_eq!(head.status, 206);
    wait_offset(fx.addr(), &target, "unchanged by HEAD", |o| {
        o >= 3 * MIB as u64
    });

    let (h, got) = partial_get(&fx, &target, &["Range: bytes=0-"], 100 * KIB);
    assert_eq!(h.status, 206);
    assert_eq!(
        h.header("content-range"),
        Some(format!("bytes 0-{}/{len}", len - 1).as_str())
    );
    assert_eq!(got, fx.data[..100 * KIB]);
    let at = settled_offset(fx.addr(), &target, "restarted near 100 KiB", |o| {
        (100 * KIB as u64..2 * MIB as u64).contains(&o)
    });
    let r = request(fx.addr(), &get_with(&target, &[]));
    assert_eq!(r.status, 206);
    assert_eq!(content_range_of(&r), Some((at, len - 1, len)));
    assert_bytes(&r.body, &fx.data[at as usize..], "resumed body");
}

/// Closed ranges, suffixes, several ranges, ignored and unsatisfiable ranges, and HEAD do not
/// touch the session: only `bytes=N-` declares a position.
#[test]
fn other_ranges_leave_the_session_alone() {
    let fx = Fixture::new(8 * MIB, 22, mtime_at(MTIME_SECS, 0));
    let target = fx.fresh_target();
    partial_get(&fx, &target, &[], MIB);
    let at = settled_offset(fx.addr(), &target, ">= 1 MiB", |o| o >= MIB as u64);
    let (seventeen, _) = disjoint(17);
    let requests: Vec<(String, u16)> = vec![
        (get_with(&target, &["Range: bytes=0-99"]), 206),
        (get_with(&target, &["Range: bytes=2000000-2999999"]), 206),
        (get_with(&target, &["Range: bytes=-100"]), 206),
        (
            get_with(&target, &["Range: bytes=0-0,4000000-4000099"]),
            206,
        ),
        (get_with(&target, &["Range: bytes=7000000-,7000010-"]), 206),
        (get_with(&target, &["Range: bytes=a-b"]), 200),
        (get_with(&target, &[&format!("Range: {seventeen}")]), 200),
        (get_with(&target, &["Range: bytes=99999999-"]), 416),
        (
            get_with(
                &target,
                &["Range: bytes=0-99", &format!("If-Range: {}", fx.etag)],
            ),
            206,
        ),
        (head_with(&target, &["Range: bytes=6000000-"]), 206),
        (head_with(&target, &[]), 206),
    ];
    for (raw, status) in requests {
        let r = request(fx.addr(), &raw);
        let line = raw
            .lines()
            .find(|l| l.starts_with("Range"))
            .unwrap_or("(no Range)");
        assert_eq!(r.status, status, "{line}");
        // Let any progress the request could record land before looking.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            probe(fx.addr(), &target).1,
            at,
            "after {} {line}",
            &raw[..4]
        );
    }
}

/// Ranged requests never abort the connection currently downloading the session.
#[test]
fn ranged_requests_never_abort_other_connections() {
    let fx = Fixture::new(4 * MIB, 23, mtime_at(MTIME_SECS, 0));
    let target = fx.fresh_target();
    let mut a = connect_small(fx.addr());
    a.write_all(get_with(&target, &[]).as_bytes()).unwrap();
    let head = read_response(&mut a, true);
    assert_eq!(head.status, 200);
    let mut body = vec![0u8; fx.data.len()];
    a.read_exact(&mut body[..64 * KIB]).unwrap();

    for lines in [
        vec!["Range: bytes=0-99"],
        vec!["Range: bytes=1048576-"],
        vec!["Range: bytes=0-0,-1"],
        vec!["Range: bytes=-5"],
    ] {
        let r = request(fx.addr(), &get_with(&target, &lines));
        assert_eq!(r.status, 206, "{lines:?}");
    }
    a.read_exact(&mut body[64 * KIB..])
        .expect("the first download was cut off by a ranged request");
    assert_bytes(&body, &fx.data, "first download");
}

// ---------------------------------------------------------------------------------------------
// The file changes in the middle of a session: no splicing

const V1_MTIME: (u64, u32) = (MTIME_SECS, 100_000_000);
const V2_MTIME: (u64, u32) = (MTIME_SECS + 3600, 0);

/// A session that has 1 MiB of version 1 of a 4 MiB file, then the file is rewritten (same
/// length, other bytes, other mtime). Returns the fixture (now at version 2), the target, the
/// old ETag and how many bytes the client holds.
fn session_on_changed_file(seed: u64, v2_mtime: (u64, u32)) -> (Fixture, String, String, usize) {
    session_on_changed_file_at(seed, V1_MTIME, v2_mtime)
}

fn session_on_changed_file_at(
    seed: u64,
    v1_mtime: (u64, u32),
    v2_mtime: (u64, u32),
) -> (Fixture, String, String, usize) {
    let mut fx = Fixture::new(4 * MIB, seed, mtime_at(v1_mtime.0, v1_mtime.1));
    let target = fx.fresh_target();
    let (h, got) = partial_get(&fx, &target, &[], MIB);
    assert_eq!(h.status, 200);
    assert_eq!(h.header("etag"), Some(fx.etag.as_str()));
    assert_eq!(got, fx.data[..MIB]);
    settled_offset(fx.addr(), &target, ">= 1 MiB", |o| o >= MIB as u64);
    let old = fx.etag.clone();
    fx.rewrite(
        pattern(4 * MIB, seed + 1000),
        mtime_at(v2_mtime.0, v2_mtime.1),
    );
    assert_ne!(fx.etag, old);
    (fx, target, old, MIB)
}

fn assert_whole_new_version(fx: &Fixture, r: &Response, what: &str) {
    assert_eq!(
        r.status, 200,
        "{what}: must restart from 0 with the new version"
    );
    assert_eq!(r.header("content-range"), None, "{what}");
    assert_eq!(r.header("etag"), Some(fx.etag.as_str()), "{what}: new ETag");
    assert_bytes(&r.body, &fx.data, what);
}

/// (a) Range-less: the session remembers its version, so a changed file restarts at 0.
#[test]
fn changed_file_restarts_a_server_resumed_download() {
    let (fx, target, old, _) = session_on_changed_file(30, V2_MTIME);
    let head = request(fx.addr(), &head_with(&target, &[]));
    assert_eq!(head.status, 200);
    assert_eq!(head.header("roam-offset"), Some("0"));
    assert_eq!(head.header("etag"), Some(fx.etag.as_str()));
    assert_ne!(head.header("etag"), Some(old.as_str()));
    let r = request(fx.addr(), &get_with(&target, &[]));
    assert_eq!(r.header("roam-offset"), Some("0"));
    assert_whole_new_version(&fx, &r, "Range-less GET after the change");
}

/// (b) `Range: bytes=N-` with the old ETag in `If-Range` (§13.1.5): the whole new file.
#[test]
fn changed_file_with_stale_if_range_sends_the_whole_new_file() {
    let (fx, target, old, have) = session_on_changed_file(31, V2_MTIME);
    let r = request(
        fx.addr(),
        &get_with(
            &target,
            &[
                &format!("Range: bytes={have}-"),
                &format!("If-Range: {old}"),
            ],
        ),
    );
    assert_whole_new_version(&fx, &r, "Range + stale If-Range");
    // The whole new file is now the session's position: complete.
    let len = fx.data.len() as u64;
    wait_offset(fx.addr(), &target, "complete on the new version", |o| {
        o == len
    });
}

/// (c) `Range: bytes=N-` without `If-Range` (curl -C -, wget -c) from a session that began on
/// the old version: the whole new file, never old beginning + new end.
#[test]
fn changed_file_with_range_but_no_if_range_sends_the_whole_new_file() {
    let (fx, target, _, have) = session_on_changed_file(32, V2_MTIME);
    let r = request(
        fx.addr(),
        &get_with(&target, &[&format!("Range: bytes={have}-")]),
    );
    assert_whole_new_version(&fx, &r, "Range without If-Range");
    // The session now follows the new version: resuming again is an ordinary Range.
    let again = request(fx.addr(), &get_with(&target, &["Range: bytes=100-199"]));
    assert_eq!(again.status, 206);
    assert_eq!(again.body, fx.data[100..200]);
}

/// The same client as (c), but the file did not change: an ordinary resume.
#[test]
fn unchanged_file_with_range_but_no_if_range_resumes() {
    let fx = Fixture::new(4 * MIB, 33, mtime_at(V1_MTIME.0, V1_MTIME.1));
    let target = fx.fresh_target();
    partial_get(&fx, &target, &[], MIB);
    settled_offset(fx.addr(), &target, ">= 1 MiB", |o| o >= MIB as u64);
    let r = request(
        fx.addr(),
        &get_with(&target, &[&format!("Range: bytes={MIB}-")]),
    );
    assert_eq!(r.status, 206);
    assert_bytes(&r.body, &fx.data[MIB..], "resumed body");
}

/// (d) A same-length rewrite within the same second leaves `Last-Modified` unchanged while the
/// ETag (nanoseconds) changes. A client resuming with `If-Range: <Last-Modified>` must not get
/// the new bytes from N: RFC 9110 §13.1.5 step 1 makes the condition false for a date that is
/// not a strong validator, and §8.8.2.2 lets an origin deem a date strong only if it knows the
/// representation did not change twice within that second. roam knows it did: the session was
/// begun on the other version (its ETag).
#[test]
fn changed_file_with_if_range_date_in_same_second_is_not_spliced() {
    let (fx, target, old, have) = session_on_changed_file(34, (V1_MTIME.0, 900_000_000));
    assert_ne!(fx.etag, old);
    let date = httpdate::fmt_http_date(mtime_at(V1_MTIME.0, 0));
    assert_eq!(
        fx.last_modified, date,
        "both versions share the Last-Modified second"
    );
    let r = request(
        fx.addr(),
        &get_with(
            &target,
            &[
                &format!("Range: bytes={have}-"),
                &format!("If-Range: {date}"),
            ],
        ),
    );
    assert!(
        r.status != 206,
        "206 {:?} of the new version to a client holding {have} bytes of the old one ({old}): \
         the client splices two versions. src/respond.rs serve_file skips its stale-session \
         check whenever If-Range is present, and precondition::if_range accepts a date equal \
         to Last-Modified even though the session shows the file changed within that second",
        r.header("content-range")
    );
    assert_whole_new_version(&fx, &r, "Range + If-Range date after a same-second rewrite");
}

/// Regression: an If-Range date was taken for an entity-tag when it started with "W" (as a
/// Wednesday does), which skipped the stale-session check and spliced two versions.
#[test]
fn changed_file_with_if_range_date_on_a_wednesday_is_not_spliced() {
    let wednesday = MTIME_SECS + 86_400;
    let (fx, target, _old, have) =
        session_on_changed_file_at(35, (wednesday, 100_000_000), (wednesday, 900_000_000));
    let date = httpdate::fmt_http_date(mtime_at(wednesday, 0));
    assert!(date.starts_with("Wed"), "{date}");
    let r = request(
        fx.addr(),
        &get_with(
            &target,
            &[
                &format!("Range: bytes={have}-"),
                &format!("If-Range: {date}"),
            ],
        ),
    );
    assert_whole_new_version(&fx, &r, "Range + If-Range Wednesday date after a rewrite");
}
