//! roam behind a real HTTP proxy: nginx as a reverse proxy (HTTP/1.1 upstream keep-alive) in
//! front of a roam server, driven with raw HTTP so every byte can be compared.
//!
//! Through a proxy, roam's TCP peer is the proxy: "acknowledged" means "reached the proxy", not
//! "reached the client". These tests pin down what stays exact anyway (question d in
//! docs/questions.md):
//! - a `Range: bytes=N-` resume is exact, and roam's fields (206, `Content-Range`,
//!   `Roam-Offset`, `ETag`, `Repr-Digest`, `Cache-Control: no-store`) pass through unchanged;
//! - a resume without `Range` through a buffering proxy starts at or after what the client has
//!   (the gap is printed, not asserted), and its `Content-Range` is honest;
//! - a cache in the proxy stores neither IDs nor session responses (`no-store`), while the same
//!   cache told to ignore `Cache-Control` would hand one client's ID to the next;
//! - a caching nginx drops `Range` from upstream requests, which turns a client's `bytes=N-`
//!   into a server-resumed request; the answer still says what it is.
//!
//! nginx missing: the tests fail under `CI=true` and are skipped otherwise.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::server::*;

const MIB: usize = 1024 * 1024;

/// One test at a time: large loopback transfers and buffer-size measurements on two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// nginx proxying to one roam server through an upstream with keep-alive, with a cache zone.
struct Nginx(support::nginx::Nginx);

impl std::ops::Deref for Nginx {
    type Target = support::nginx::Nginx;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Nginx {
    /// `server_body` is the inside of the `server { }` block after `listen`; it can use the
    /// upstream `roam` and the cache zone `c`.
    fn start(bin: &Path, upstream: SocketAddr, server_body: &str) -> Nginx {
        let http = move |dir: &Path| {
            let d = dir.display();
            std::fs::create_dir_all(dir.join("cache")).unwrap();
            format!(
                "log_format up '\"$request\" $status $body_bytes_sent range=\"$http_range\" \
                 upstream=$upstream_status/$upstream_response_length cache=$upstream_cache_status';\n\
                 access_log {d}/access.log up;\n\
                 proxy_cache_path {d}/cache keys_zone=c:1m;\n\
                 upstream roam {{ server {upstream}; keepalive 8; }}"
            )
        };
        let body =
            format!("proxy_http_version 1.1;\nproxy_set_header Connection \"\";\n{server_body}");
        Nginx(support::nginx::Nginx::start(bin, http, &body))
    }

    /// Files nginx has written into its cache folder.
    fn cached_files(&self) -> usize {
        fn count(p: &Path) -> usize {
            std::fs::read_dir(p).map_or(0, |rd| {
                rd.flatten()
                    .map(|e| {
                        let p = e.path();
                        if p.is_dir() {
                            count(&p)
                        } else {
                            1
                        }
                    })
                    .sum()
            })
        }
        count(&self.dir.path().join("cache"))
    }
}

/// `location / { proxy_pass http://roam; ... }` with `extra` directives.
fn location(extra: &str) -> String {
    format!("location / {{ proxy_pass http://roam; {extra} }}")
}

/// A roam server with one file, and its content.
struct Origin {
    _root: Root,
    server: TestServer,
    data: Vec<u8>,
}

fn origin(len: usize, seed: u64) -> Origin {
    let root = Root::new();
    let data = pattern(len, seed);
    root.file("f.bin", &data);
    let server = TestServer::start(root.path());
    Origin {
        _root: root,
        server,
        data,
    }
}

/// Mints an ID through `addr` (the proxy).
fn mint_via(addr: SocketAddr) -> String {
    let r = request(addr, &get("/"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"), "{r:?}");
    String::from_utf8(r.body).unwrap()
}

/// Polls HEAD on the origin until roam has computed `Repr-Digest` for the file.
fn wait_for_digest(origin: SocketAddr, id: &str) -> String {
    let started = Instant::now();
    loop {
        let r = request(
            origin,
            &format!("HEAD /{id}/f.bin HTTP/1.1\r\nHost: t\r\n\r\n"),
        );
        if let Some(d) = r.header("repr-digest") {
            return d.to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Repr-Digest never appeared"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `raw` on a new connection, reads the response head and exactly `body_bytes` of the
/// body, and returns the head and the bytes, leaving the connection open.
fn partial_get(addr: SocketAddr, raw: &str, body_bytes: usize) -> (TcpStream, Response, Vec<u8>) {
    let mut s = connect(addr);
    s.write_all(raw.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed in the head");
        head.push(byte[0]);
    }
    let resp = read_response(&mut head.as_slice(), true);
    let mut body = vec![0u8; body_bytes];
    s.read_exact(&mut body).unwrap();
    (s, resp, body)
}

/// The start of a `Content-Range: bytes first-last/len` field.
fn range_start(r: &Response) -> u64 {
    let cr = r.header("content-range").expect("Content-Range");
    let rest = cr.strip_prefix("bytes ").expect("bytes unit");
    rest.split('-').next().unwrap().parse().expect("first byte")
}

/// (1) and (3): a client behind a buffering nginx (the default, `proxy_buffering on`) reads
/// 1 MiB of a 32 MiB file, pauses, and hangs up. Asked again without `Range`, roam answers from what
/// the *proxy* acknowledged: at or after the client's 1 MiB, with an honest `Content-Range`
/// (usually `416 bytes */LEN`, because nginx buffered the whole file). Asked with
/// `Range: bytes=N-`, the answer is exact.
#[test]
fn buffering_proxy_resume_without_range_is_honest_and_with_range_is_exact() {
    let _serial = serial();
    let Some(bin) = support::nginx::nginx_or_skip() else {
        return;
    };
    const LEN: usize = 32 * MIB;
    const HAVE: usize = MIB;
    let o = origin(LEN, 1);
    let ng = Nginx::start(&bin, o.server.addr, &location(""));
    let id = mint_via(ng.addr);
    let target = format!("/{id}/f.bin");

    let (s, first, have) = partial_get(ng.addr, &get(&target), HAVE);
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(&have[..], &o.data[..HAVE]);
    // A slow client: it reads no more for a second while nginx goes on reading from roam into
    // its buffers and temporary file, then it is gone.
    std::thread::sleep(Duration::from_secs(1));
    drop(s);
    // Let every acknowledgement of bytes the client got reach roam and be recorded.
    std::thread::sleep(Duration::from_millis(500));

    // (3) Resume without Range through the buffering proxy.
    let r = request(ng.addr, &get(&target));
    let len = LEN as u64;
    match r.status {
        206 => {
            let start = range_start(&r);
            assert!(
                start >= HAVE as u64,
                "starts before the client's bytes: {r:?}"
            );
            assert_eq!(r.header("roam-offset"), Some(start.to_string().as_str()));
            assert_eq!(
                r.header("content-range"),
                Some(format!("bytes {start}-{}/{len}", len - 1).as_str())
            );
            assert!(
                r.body == o.data[start as usize..],
                "206 body is not the file from its Content-Range start"
            );
            println!(
                "no-Range resume through buffering nginx: client has {HAVE}, 206 from {start}: \
                 gap {} bytes",
                start - HAVE as u64
            );
        }
        416 => {
            assert_eq!(
                r.header("content-range"),
                Some(format!("bytes */{len}").as_str())
            );
            assert_eq!(r.header("roam-offset"), Some(len.to_string().as_str()));
            assert!(r.body.is_empty());
            println!(
                "no-Range resume through buffering nginx: client has {HAVE}, 416 bytes */{len} \
                 (nginx acknowledged the whole file): gap {} bytes",
                len - HAVE as u64
            );
        }
        s => panic!("unexpected status {s}: {r:?}"),
    }

    // (1) Resume with Range through the proxy: exact.
    let r = request(
        ng.addr,
        &get_with(&target, &[&format!("Range: bytes={HAVE}-")]),
    );
    assert_eq!(r.status, 206, "{:?}", r.headers);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {HAVE}-{}/{len}", len - 1).as_str())
    );
    let mut copy = have;
    copy.extend_from_slice(&r.body);
    assert!(copy == o.data, "prefix + Range resume is not the file");
    println!("nginx access log:\n{}", ng.access_log());
}

/// (2) Through a non-buffering nginx (`proxy_buffering off`), a client that stops reading
/// leaves roam blocked at what nginx acknowledged. A second request without `Range` (the
/// phone on its new network) takes the session over and gets a `206` whose fields all pass
/// through nginx unchanged: `Content-Range`, `Roam-Offset`, `ETag`, `Repr-Digest`,
/// `Cache-Control`. Meanwhile a second client with its own ID, behind the same proxy and from
/// the same address, keeps a separate session.
#[test]
fn fields_pass_through_and_sessions_stay_separate_behind_one_proxy() {
    let _serial = serial();
    let Some(bin) = support::nginx::nginx_or_skip() else {
        return;
    };
    const LEN: usize = 64 * MIB;
    const READ: usize = MIB;
    let o = origin(LEN, 2);
    let ng = Nginx::start(&bin, o.server.addr, &location("proxy_buffering off;"));
    let len = LEN as u64;
    let a = mint_via(ng.addr);
    let b = mint_via(ng.addr);
    assert_ne!(a, b);
    let digest = wait_for_digest(o.server.addr, &a);
    let a_target = format!("/{a}/f.bin");
    let head_a = format!("HEAD {a_target} HTTP/1.1\r\nHost: t\r\n\r\n");

    // Client A reads 1 MiB and then stops reading, connection open.
    let (mut stalled, first, got) = partial_get(ng.addr, &get(&a_target), READ);
    assert_eq!(first.status, 200);
    assert_eq!(first.header("roam-offset"), Some("0"));
    assert_eq!(&got[..], &o.data[..READ]);
    // Wait until roam's record for A stops moving: roam, nginx and the socket buffers are full.
    let mut last = String::new();
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(400));
        let h = request(ng.addr, &head_a);
        let off = h.header("roam-offset").unwrap_or_default().to_owned();
        if off == last {
            break;
        }
        last = off;
        assert!(started.elapsed() < Duration::from_secs(30), "never settled");
    }
    let stalled_at: u64 = last.parse().unwrap();
    println!(
        "stalled client read {READ} bytes; roam recorded {stalled_at} (what nginx acknowledged: \
         {} bytes more)",
        stalled_at - READ as u64
    );
    assert!(stalled_at > READ as u64 && stalled_at < len, "{stalled_at}");

    // Client B, same proxy, same address, its own ID: a fresh session, whole file from 0, and
    // A's record does not move.
    let rb = request(ng.addr, &get(&format!("/{b}/f.bin")));
    assert_eq!(rb.status, 200);
    assert_eq!(rb.header("roam-offset"), Some("0"));
    assert!(rb.body == o.data, "B's download is not the file");
    let h = request(ng.addr, &head_a);
    assert_eq!(h.header("roam-offset"), Some(last.as_str()), "B moved A");

    // A again, without Range, from a new connection: takeover, 206 from the recorded offset.
    let r = request(ng.addr, &get(&a_target));
    assert_eq!(r.status, 206, "{:?}", r.headers);
    let start = range_start(&r);
    assert!(start >= stalled_at, "{start} < {stalled_at}");
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {start}-{}/{len}", len - 1).as_str())
    );
    assert_eq!(r.header("roam-offset"), Some(start.to_string().as_str()));
    assert_eq!(r.header("repr-digest"), Some(digest.as_str()));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    let direct = request(
        o.server.addr,
        &format!("HEAD {a_target} HTTP/1.1\r\nHost: t\r\n\r\n"),
    );
    let etag = direct.header("etag").expect("ETag");
    assert_eq!(r.header("etag"), Some(etag));
    assert!(
        r.body == o.data[start as usize..],
        "206 body is not the file from its start"
    );

    // The old connection: nginx forwards what roam had sent before the reset, then closes.
    let rest = read_to_end_lossy(&mut stalled);
    let old_total = READ as u64 + rest.len() as u64;
    let verdict = match old_total.cmp(&start) {
        std::cmp::Ordering::Less => format!("a gap of {} bytes", start - old_total),
        std::cmp::Ordering::Equal => "no gap, no overlap".to_owned(),
        std::cmp::Ordering::Greater => format!("{} bytes repeated", old_total - start),
    };
    println!(
        "old connection delivered {old_total} body bytes; the new response starts at {start}: \
         {verdict}"
    );

    // A's HEAD and a Range request declare and read positions through the proxy too.
    let r = request(ng.addr, &get_with(&a_target, &["Range: bytes=1000-1999"]));
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 1000-1999/{len}").as_str())
    );
    assert!(r.body == o.data[1000..2000]);
    assert_eq!(
        r.header("roam-offset"),
        None,
        "Range answers carry no Roam-Offset"
    );
    println!("nginx access log:\n{}", ng.access_log());
}

/// (4) nginx with `proxy_cache` (and `proxy_cache_valid 200 206 10m`, so it would keep both):
/// `Cache-Control: no-store` keeps every ID and every session response out of the cache, so a
/// second client never receives the first one's. The control location is the same cache told
/// to ignore `Cache-Control`: there, the second client gets the first client's ID.
#[test]
fn caching_proxy_stores_no_id_and_no_session_response() {
    let _serial = serial();
    let Some(bin) = support::nginx::nginx_or_skip() else {
        return;
    };
    const LEN: usize = 2 * MIB;
    let o = origin(LEN, 3);
    let cache = "proxy_cache c; proxy_cache_valid 200 206 10m; \
                 add_header X-Cache-Status $upstream_cache_status always;";
    let body = format!(
        "location / {{ proxy_pass http://roam; {cache} }}\n\
         location /ignoring/ {{ proxy_pass http://roam/; {cache} \
         proxy_ignore_headers Cache-Control Expires; }}"
    );
    let ng = Nginx::start(&bin, o.server.addr, &body);

    // Two clients mint through the cache: two IDs, both MISS, nothing stored.
    let first = request(ng.addr, &get("/"));
    let second = request(ng.addr, &get("/"));
    for r in [&first, &second] {
        assert_eq!(r.status, 200);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.header("x-cache-status"), Some("MISS"), "{r:?}");
    }
    assert_ne!(
        first.body, second.body,
        "the second client got the first one's ID"
    );
    let a = String::from_utf8(first.body).unwrap();

    // The first client's session responses: downloaded twice through the cache, never stored
    // (the second answer is 416: roam's own, not a replay of the 200).
    let target = format!("/{a}/f.bin");
    let r1 = request(ng.addr, &get(&target));
    assert_eq!(r1.status, 200);
    assert!(r1.body == o.data);
    let r2 = request(ng.addr, &get(&target));
    assert_eq!(
        r2.status, 416,
        "a cache replayed the session response: {r2:?}"
    );
    for r in [&r1, &r2] {
        assert_eq!(r.header("x-cache-status"), Some("MISS"), "{r:?}");
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    assert_eq!(ng.cached_files(), 0, "nginx stored a no-store response");

    // Control: the same cache ignoring Cache-Control replays one ID to everyone.
    let c1 = request(ng.addr, &get("/ignoring/"));
    let c2 = request(ng.addr, &get("/ignoring/"));
    assert_eq!(c1.header("x-cache-status"), Some("MISS"));
    assert_eq!(c2.header("x-cache-status"), Some("HIT"));
    assert_eq!(
        c1.body, c2.body,
        "control: the cache should have replayed the ID"
    );
    assert!(ng.cached_files() >= 1);
    println!("nginx access log:\n{}", ng.access_log());
}

/// A proxy that rewrites ranges: with `proxy_cache` on, nginx does not pass `Range` or
/// `If-Range` upstream (it wants whole responses to cache), so roam sees a request without
/// `Range` and resumes from its session. Every answer still says what it is: `200` from 0 on a
/// fresh session (not the asked-for range), `416 bytes */LEN` once the session is complete (a
/// client that trusts 416 as "done", like `curl -C -`, keeps a truncated copy; the length tells
/// it otherwise). Passing the fields explicitly (`proxy_set_header Range $http_range`) makes the
/// resume exact again.
#[test]
fn caching_proxy_drops_range_and_answers_stay_self_describing() {
    let _serial = serial();
    let Some(bin) = support::nginx::nginx_or_skip() else {
        return;
    };
    const LEN: usize = 4 * MIB;
    const N: usize = 1_000_000;
    let o = origin(LEN, 4);
    let len = LEN as u64;
    let body =
        "location / { proxy_pass http://roam; proxy_cache c; proxy_cache_valid 200 206 10m; }\n\
                location /fixed/ { proxy_pass http://roam/; proxy_cache c; \
                proxy_cache_valid 200 206 10m; \
                proxy_set_header Connection \"\"; \
                proxy_set_header Range $http_range; proxy_set_header If-Range $http_if_range; }";
    let ng = Nginx::start(&bin, o.server.addr, body);
    let id = mint_via(ng.addr);
    let target = format!("/{id}/f.bin");
    let range = format!("Range: bytes={N}-");

    // Fresh session: the client asks for bytes N-, roam never saw the Range: 200 from 0.
    let r = request(ng.addr, &get_with(&target, &[&range]));
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert_eq!(r.header("roam-offset"), Some("0"), "roam saw no Range");
    assert!(r.body == o.data, "a 200 is the whole file");

    // The session is now complete (nginx acknowledged everything): bytes N- gets 416 */LEN.
    std::thread::sleep(Duration::from_millis(200));
    let r = request(ng.addr, &get_with(&target, &[&range]));
    assert_eq!(r.status, 416, "{:?}", r.headers);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{len}").as_str())
    );
    assert!((N as u64) < len, "the length shows the copy is incomplete");

    // With Range passed explicitly, the same cache location resumes exactly.
    let r = request(ng.addr, &get_with(&format!("/fixed{target}"), &[&range]));
    assert_eq!(r.status, 206, "{:?}", r.headers);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {N}-{}/{len}", len - 1).as_str())
    );
    assert!(r.body == o.data[N..]);
    assert_eq!(ng.cached_files(), 0);
    println!("nginx access log:\n{}", ng.access_log());
}
