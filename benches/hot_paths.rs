//! Per-call costs on the request path: parsing a head, parsing a Range, reading the kernel's
//! acknowledgement counter (what confirmed-delivery accounting adds per settle), progress
//! store operations, and what the metrics add to one response.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use roam::http::request::{self, Limits};
use roam::session::clock::SessionClock;
use roam::session::table::Table;
use roam::session::{FileKey, SessionKey};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

const HEAD: &[u8] = b"GET /0f3a5c7e-1b2d-8e4f-a6b8-c0d2e4f60819/videos/trip.mp4 HTTP/1.1\r\n\
Host: phone.example:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nRange: bytes=1048576-\r\n\
If-Range: \"1f400000-18eb249dbbe00938\"\r\n\r\n";

fn parsing(c: &mut Criterion) {
    let limits = Limits {
        max_request_line: 8192,
        max_head: 16384,
        max_headers: 64,
    };
    c.bench_function("request head parse", |b| {
        b.iter(|| request::parse(black_box(HEAD), &limits).unwrap().unwrap())
    });
    c.bench_function("range parse+plan (open-ended)", |b| {
        b.iter(|| {
            let specs = roam::http::range::parse(black_box("bytes=1048576-")).unwrap();
            roam::http::range::plan(&specs, 1 << 30)
        })
    });
    c.bench_function("range parse+plan (5 ranges)", |b| {
        b.iter(|| {
            let specs =
                roam::http::range::parse(black_box("bytes=0-99,200-299,-100,5000-,400-450"))
                    .unwrap();
            roam::http::range::plan(&specs, 1 << 20)
        })
    });
}

fn tcp_info(c: &mut Criterion) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let fd = server.as_raw_fd();
    c.bench_function("TCP_INFO bytes_acked read", |b| {
        b.iter(|| roam::sys::ack_counter(black_box(fd)).unwrap())
    });
    c.bench_function("SIOCOUTQ read", |b| {
        b.iter(|| roam::sys::outstanding_bytes(black_box(fd)).unwrap())
    });
    drop(client);
    let mut sink = Vec::new();
    let _ = (&server).read_to_end(&mut sink);
}

fn store(c: &mut Criterion) {
    // 10 million when benchmarking; a small table when `cargo test` runs the benches once.
    let benching = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("ROAM_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 10_000_000 } else { 10_000 });
    let store = Table::new(
        usize::MAX,
        Duration::from_secs(3600),
        Arc::new(SessionClock::default()),
        false,
    );
    let key = |i: u64| SessionKey {
        client: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        file: FileKey(i % 7),
    };
    let epochs: Vec<roam::session::Epoch> =
        (0..n).map(|i| store.begin(key(i), 1, 0).unwrap()).collect();
    let mut i = 0u64;
    c.bench_function(&format!("store advance ({n} sessions)"), |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            store.advance(&key(i), epochs[i as usize], black_box(i))
        })
    });
    c.bench_function(&format!("store get ({n} sessions)"), |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            store.get(&key(i))
        })
    });
    let mut next = n;
    c.bench_function(&format!("store begin new key ({n}+ sessions)"), |b| {
        b.iter(|| {
            next += 1;
            store.begin(key(next), 1, 0)
        })
    });
}

/// The whole decision for one request (route, ID check, file table, preconditions, range,
/// session record, takeover registry, head), as the 1 KiB load test exercises it.
fn decide(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f1k"), vec![7u8; 1024]).unwrap();
    std::fs::write(dir.path().join("f100k"), vec![7u8; 102_400]).unwrap();
    let config = roam::settings::Config::new(dir.path().into(), "127.0.0.1:0".parse().unwrap());
    let svc = roam::service::Service::new(config).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let conn = roam::session::ConnectionHandle::new(
        1,
        [127, 0, 0, 1].into(),
        &tokio_util::sync::CancellationToken::new(),
    );
    let limits = Limits {
        max_request_line: 8192,
        max_head: 16384,
        max_headers: 64,
    };
    let ids: Vec<String> = (0..1000).map(|_| svc.ids().mint().to_string()).collect();
    for file in ["f1k", "f100k"] {
        let heads: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| {
                format!("GET /{id}/{file} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n")
                    .into_bytes()
            })
            .collect();
        let mut i = 0;
        c.bench_function(
            &format!("parse + respond + head ({file}, Range: bytes=0-)"),
            |b| {
                b.iter(|| {
                    i = (i + 1) % heads.len();
                    let (req, _) = request::parse(&heads[i], &limits).unwrap().unwrap();
                    let resp = rt
                        .block_on(roam::respond::respond(
                            &svc,
                            &req,
                            &conn,
                            &roam::respond::nothing_in_flight,
                        ))
                        .unwrap();
                    black_box(resp.head.finish(false, false))
                })
            },
        );
    }
}

/// What the ops layer adds to one 1 KiB response with the access log off (its default): the
/// response counter, the duration histogram, and the body's bytes sent and acknowledged.
fn metrics(c: &mut Criterion) {
    let m = roam::ops::metrics::Metrics::new();
    let took = Duration::from_micros(420);
    c.bench_function("metrics for one response", |b| {
        b.iter(|| {
            m.response(black_box(roam::http::response::Status::PartialContent));
            m.request_done(black_box(took));
            m.body_bytes(black_box(1024), black_box(1024));
        })
    });
}

criterion_group!(benches, parsing, tcp_info, store, decide, metrics);
criterion_main!(benches);
