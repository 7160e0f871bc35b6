//! Operability (issue 17), with real `roam serve` processes over real TCP: the admin listener's
//! metrics moving with real downloads, `/healthz` and `/readyz` (during a drain, with a store
//! that cannot be written), the access log's lines and how each body ended, its reopening after
//! a rotation by the real logrotate, a log that cannot be opened or written, systemd readiness
//! notification, and the service unit checked by `systemd-analyze verify`.

mod support;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};
use support::server::{connect, get, get_with, pattern, read_response, request, Root};
use support::tls::{tls_connect, TestPki};

const MIB: usize = 1024 * 1024;

/// A `roam serve` process with an admin listener, killed on drop.
struct Roam {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    stderr: PathBuf,
    _stdout: BufReader<ChildStdout>,
}

impl Roam {
    /// Starts `roam serve` on `root` (state in `state`) with `extra` flags, listening and
    /// administering on free loopback ports; stderr goes to `dir/roam.err`.
    fn start(root: &Path, state: &Path, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Roam {
        let stderr = dir.join("roam.err");
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_roam"))
            .arg("serve")
            .arg("--root")
            .arg(root)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .envs(env.iter().copied())
            // ROAM_TEST_LOG=roam=debug shows more of what the server did when a test fails.
            .env(
                "RUST_LOG",
                std::env::var("ROAM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn roam");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = |prefix: &str| {
            let mut l = String::new();
            let _ = stdout.read_line(&mut l);
            let l = l.trim().replace("https://", "http://");
            match l.strip_prefix(prefix) {
                Some(a) => a.parse::<SocketAddr>().unwrap(),
                None => panic!(
                    "roam did not start: {l:?}\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                ),
            }
        };
        let addr = line("roam listening on http://");
        let admin = line("roam admin listening on http://");
        Roam {
            child,
            addr,
            admin,
            stderr: stderr.clone(),
            _stdout: stdout,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn mint(&self) -> String {
        let r = request(self.addr, &get("/"));
        assert_eq!(r.status, 200, "{r:?}");
        String::from_utf8(r.body).unwrap()
    }

    fn scrape(&self) -> String {
        let r = request(self.admin, &get("/metrics"));
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            r.header("content-type")
                .unwrap()
                .contains("openmetrics-text"),
            "{r:?}"
        );
        String::from_utf8(r.body).unwrap()
    }

    /// The value of one series (name with its labels, as exposed).
    fn metric(&self, series: &str) -> f64 {
        value(&self.scrape(), series).unwrap_or_else(|| panic!("no series {series}"))
    }

    /// Waits until `roam_connections` is 0, showing roam's log if it does not get there.
    fn wait_connections_closed(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.metric("roam_connections") != 0.0 {
            assert!(
                Instant::now() < deadline,
                "a connection was still open after {limit:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "roam did not exit in {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Roam {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// True when `tool` runs; under CI a missing tool fails the test (scripts/test.sh installs it).
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found || !ci(),
        "{tool} is required under CI (scripts/test.sh installs it)"
    );
    if !found {
        println!("skipping: {tool} is not installed");
    }
    found
}

/// The JSON lines of an access log.
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Reads a response head from `s`, returning it as text.
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed in the head");
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Downloads with real clients, then reads the metrics and the access log and checks them
/// against each other and against what the clients saw: responses by status, IDs minted, body
/// bytes sent and acknowledged (equal to the sums of the log's lines), an implicit and a
/// declared resume, a local takeover (the successor's body starts exactly where the
/// predecessor's acknowledged bytes end), a client gone mid-body, the connection and session
/// gauges, the duration histogram; and the public listener knows no admin route.
#[test]
fn metrics_and_access_log_follow_real_downloads() {
    let root = Root::new();
    let small = pattern(300 * 1024, 1);
    root.file("small.bin", &small);
    let big = pattern(16 * MIB, 2);
    root.file("big.bin", &big);
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("access.log");
    let srv = Roam::start(
        root.path(),
        &work.path().join("state"),
        work.path(),
        &[
            "--access-log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[],
    );
    let id = srv.mint();
    let other = srv.mint();

    // A whole download, then a declared resume.
    let r = request(srv.addr, &get(&format!("/{id}/small.bin")));
    assert_eq!((r.status, r.body.len()), (200, small.len()));
    let r = request(
        srv.addr,
        &get_with(&format!("/{id}/small.bin"), &["Range: bytes=1000-"]),
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &small[1000..]);

    // A takeover: A reads 256 KiB of big.bin and stops reading; B asks for the same file
    // without Range and continues where A's client acknowledged.
    let target = format!("/{other}/big.bin");
    let mut a = connect(srv.addr);
    a.write_all(get(&target).as_bytes()).unwrap();
    assert!(read_head(&mut a).starts_with("HTTP/1.1 200"));
    let mut got = vec![0u8; 256 * 1024];
    a.read_exact(&mut got).unwrap();
    let mut b = connect(srv.addr);
    b.write_all(get(&target).as_bytes()).unwrap();
    let resp = read_response(&mut b, false);
    assert_eq!(resp.status, 206, "{:?}", resp.headers);
    let start: usize = resp.header("roam-offset").unwrap().parse().unwrap();
    assert!(start >= 256 * 1024, "resumed at {start}");
    assert_eq!(resp.body, &big[start..]);
    drop(a);
    drop(b);

    // A client gone mid-body: reads 64 KiB of a declared download, then closes with bytes
    // unread (a reset).
    let mut c = connect(srv.addr);
    c.write_all(get_with(&format!("/{id}/big.bin"), &["Range: bytes=0-"]).as_bytes())
        .unwrap();
    assert!(read_head(&mut c).starts_with("HTTP/1.1 206"));
    let mut got = vec![0u8; 64 * 1024];
    c.read_exact(&mut got).unwrap();
    drop(c);

    // A HEAD, and the admin routes on the public listener.
    let r = request(
        srv.addr,
        &format!("HEAD /{other}/small.bin HTTP/1.1\r\nHost: t\r\n\r\n"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(request(srv.addr, &get(path)).status, 404, "{path}");
    }

    // An idle keep-alive connection counts in the gauge while it is open.
    let mut idle = connect(srv.addr);
    idle.write_all(get("/").as_bytes()).unwrap();
    assert_eq!(read_response(&mut idle, false).status, 200);
    assert!(srv.metric("roam_connections") >= 1.0);
    drop(idle);
    srv.wait_connections_closed(Duration::from_secs(30));
    // Mint x3, the whole download, the takeover's first response, the HEAD: 200. The
    // declared resume, the takeover's successor, the reset download: 206. The three admin
    // paths on the public listener: 404.
    let expected = 3 + 3 + 3 + 3;
    wait_until("every line written", Duration::from_secs(10), || {
        lines(&log).len() == expected
    });
    let text = srv.scrape();
    let m = |s: &str| value(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
    assert_eq!(m("roam_responses_total{status=\"200\"}"), 6.0);
    assert_eq!(m("roam_responses_total{status=\"206\"}"), 3.0);
    assert_eq!(m("roam_responses_total{status=\"416\"}"), 0.0);
    assert_eq!(m("roam_responses_total{status=\"404\"}"), 3.0);
    assert_eq!(m("roam_ids_minted_total"), 3.0);
    assert_eq!(m("roam_resumes_total{how=\"declared\"}"), 1.0);
    assert_eq!(m("roam_resumes_total{how=\"implicit\"}"), 1.0);
    assert_eq!(m("roam_takeovers_total{scope=\"local\"}"), 1.0);
    assert_eq!(m("roam_takeovers_total{scope=\"remote\"}"), 0.0);
    assert!(m("roam_sessions") >= 3.0);
    assert!(m("roam_store_flush_seconds_count") >= 1.0);
    assert_eq!(m("roam_store_errors_total"), 0.0);
    assert_eq!(m("roam_access_log_dropped_lines_total"), 0.0);
    // Responses sent whole: all but the taken-over and the reset one.
    let whole = (expected - 2) as f64;
    assert_eq!(m("roam_request_duration_seconds_count"), whole);
    assert_eq!(
        m("roam_request_duration_seconds_bucket{le=\"+Inf\"}"),
        whole
    );
    assert!(m("roam_request_duration_seconds_bucket{le=\"0.0005\"}") <= whole);
    assert!(text.contains("roam_request_duration_seconds_bucket{le=\"3600.0\"}"));

    let all = lines(&log);
    let sum = |k: &str| all.iter().map(|l| l[k].as_u64().unwrap()).sum::<u64>() as f64;
    let (sent, acked) = (m("roam_bytes_sent_total"), m("roam_bytes_acked_total"));
    assert_eq!(
        sent,
        sum("bytes_sent"),
        "metrics and log agree on bytes sent"
    );
    assert_eq!(acked, sum("bytes_acked"), "and on bytes acknowledged");
    assert!(
        acked < sent,
        "the taken-over and the reset bodies were not all acknowledged"
    );

    let find = |pred: &dyn Fn(&Value) -> bool| -> Value {
        all.iter()
            .find(|l| pred(l))
            .cloned()
            .unwrap_or_else(|| panic!("no such line in {all:#?}"))
    };
    let whole_small = find(&|l| l["path"] == format!("/{id}/small.bin") && l["status"] == 200);
    assert_eq!(whole_small["client_id"], id.as_str());
    assert_eq!(whole_small["method"], "GET");
    assert_eq!(whole_small["range"], Value::Null);
    assert_eq!(whole_small["body_start"], 0);
    assert_eq!(whole_small["bytes_sent"], small.len());
    assert_eq!(whole_small["bytes_acked"], small.len());
    assert_eq!(whole_small["ended"], "complete");
    assert!(whole_small["client"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(whole_small["duration_ms"].as_f64().unwrap() >= 0.0);
    let declared = find(&|l| l["range"] == "bytes=1000-");
    assert_eq!(declared["body_start"], 1000);
    assert_eq!(declared["bytes_acked"], small.len() - 1000);
    assert_eq!(declared["ended"], "complete");

    let taken = find(&|l| l["path"] == target && l["status"] == 200);
    assert_eq!(taken["ended"], "taken_over");
    assert_eq!(
        taken["bytes_acked"], start as u64,
        "the successor starts where the predecessor's client acknowledged"
    );
    assert!(taken["bytes_sent"].as_u64().unwrap() >= start as u64);
    let successor = find(&|l| l["path"] == target && l["status"] == 206);
    assert_eq!(successor["body_start"], start as u64);
    assert_eq!(successor["bytes_acked"], (big.len() - start) as u64);
    assert_eq!(successor["ended"], "complete");

    let gone = find(&|l| l["path"] == format!("/{id}/big.bin"));
    assert_eq!(gone["ended"], "client_gone");
    assert_eq!(gone["range"], "bytes=0-");
    let gone_acked = gone["bytes_acked"].as_u64().unwrap();
    assert!(gone_acked >= 64 * 1024, "{gone}");
    assert!(gone_acked <= gone["bytes_sent"].as_u64().unwrap());
    assert!(gone_acked < big.len() as u64);

    let head = find(&|l| l["method"] == "HEAD");
    assert_eq!(
        (head["status"].as_u64(), head["bytes_sent"].as_u64()),
        (Some(200), Some(0))
    );
    let minted = find(&|l| l["path"] == "/");
    assert_eq!(minted["bytes_acked"], 36);
    assert_eq!(minted["client_id"], Value::Null);
}

/// A client that resets its connection mid-body (closes with bytes unread) frees the
/// connection at once. Symptom before: when a write had already taken the reset's error (it
/// then fails with EPIPE), the orderly close waited for acknowledgements that could never come,
/// holding the connection for the whole write-stall timeout (`roam_connections` stayed up).
#[test]
fn a_client_reset_mid_body_frees_its_connection_at_once() {
    let root = Root::new();
    root.file("big.bin", &pattern(16 * MIB, 5));
    let work = tempfile::tempdir().unwrap();
    let srv = Roam::start(
        root.path(),
        &work.path().join("state"),
        work.path(),
        &["--store", "memory", "--write-stall-timeout", "120s"],
        &[],
    );
    let id = srv.mint();
    for _ in 0..40 {
        let mut c = connect(srv.addr);
        c.write_all(get_with(&format!("/{id}/big.bin"), &["Range: bytes=0-"]).as_bytes())
            .unwrap();
        assert!(read_head(&mut c).starts_with("HTTP/1.1 206"));
        let mut got = vec![0u8; 64 * 1024];
        c.read_exact(&mut got).unwrap();
    }
    // Far below the write-stall timeout: what the close waits for (a 2 s linger) and slack.
    srv.wait_connections_closed(Duration::from_secs(30));
}

/// With HTTPS, handshakes are counted by how they ended: `ok`; `failed` (a handshake record
/// rustls cannot parse); `timeout` (a ClientHello's first byte, then nothing for the header
/// timeout). A plain-HTTP request on the HTTPS port is not a handshake and is not counted.
#[test]
fn tls_handshakes_are_counted_by_result() {
    let pki = TestPki::new(&[]);
    let root = Root::new();
    let work = tempfile::tempdir().unwrap();
    let srv = Roam::start(
        root.path(),
        &work.path().join("state"),
        work.path(),
        &[
            "--store",
            "memory",
            "--header-timeout",
            "1s",
            "--tls-cert",
            pki.cert_path().to_str().unwrap(),
            "--tls-key",
            pki.key_path().to_str().unwrap(),
        ],
        &[],
    );
    let series = |result: &str| {
        value(
            &srv.scrape(),
            &format!("roam_tls_handshakes_total{{result=\"{result}\"}}"),
        )
    };
    for _ in 0..2 {
        drop(tls_connect(srv.addr, &pki.client_config()));
    }
    let mut sink = Vec::new();
    let mut bad = connect(srv.addr);
    bad.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    let _ = bad.read_to_end(&mut sink);
    let mut slow = connect(srv.addr);
    slow.write_all(b"\x16").unwrap();
    let _ = slow.read_to_end(&mut sink);
    let plain = request(srv.addr, &get("/"));
    assert_eq!(plain.status, 400, "{plain:?}");
    wait_until("every handshake counted", Duration::from_secs(10), || {
        series("ok") == Some(2.0) && series("failed") == Some(1.0) && series("timeout") == Some(1.0)
    });
}

/// The admin listener answers GET and HEAD on its three paths only, with the public listener's
/// limits and timeouts: other methods 405, other paths 404, an oversized head 431, a head that
/// does not arrive 408; several requests share a keep-alive connection.
#[test]
fn the_admin_listener_has_three_routes_and_the_public_limits() {
    let root = Root::new();
    let work = tempfile::tempdir().unwrap();
    let srv = Roam::start(
        root.path(),
        &work.path().join("state"),
        work.path(),
        &[
            "--header-timeout",
            "1s",
            "--max-request-line",
            "1024",
            "--max-head",
            "4096",
            "--store",
            "memory",
        ],
        &[],
    );
    let r = request(srv.admin, &get("/healthz"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok\n"[..]));
    let r = request(srv.admin, &get("/readyz"));
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ready\n"[..]));
    let r = request(srv.admin, "POST /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    for path in ["/", "/metrics/", "/nope", "/healthz/x"] {
        assert_eq!(request(srv.admin, &get(path)).status, 404, "{path}");
    }
    let r = request(srv.admin, "HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 100
    );
    assert!(r.body.is_empty());
    // The query is ignored, as Prometheus never sends one but a browser might.
    assert_eq!(request(srv.admin, &get("/metrics?x=1")).status, 200);

    // Keep-alive: three answers on one connection, in order.
    let mut s = connect(srv.admin);
    s.write_all(format!("{}{}{}", get("/healthz"), get("/nope"), get("/readyz")).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut s, false).status, 200);
    assert_eq!(read_response(&mut s, false).status, 404);
    assert_eq!(read_response(&mut s, false).body, b"ready\n");

    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: t\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(8000)
    );
    assert_eq!(request(srv.admin, &huge).status, 431);
    let mut slow = connect(srv.admin);
    slow.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    assert_eq!(read_response(&mut slow, false).status, 408);
}

/// After SIGTERM, while a download is held open, `/readyz` answers 503 and `/healthz` 200; the
/// service manager hears READY=1 at start and STOPPING=1 at the signal; the process exits
/// cleanly once the download's client goes.
#[test]
fn readyz_is_503_while_draining_and_systemd_hears_ready_and_stopping() {
    let root = Root::new();
    root.file("big.bin", &pattern(64 * MIB, 3));
    let work = tempfile::tempdir().unwrap();
    let sock_path = work.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut srv = Roam::start(
        root.path(),
        &work.path().join("state"),
        work.path(),
        &["--shutdown-timeout", "60s", "--write-stall-timeout", "60s"],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    wait_until("ready", Duration::from_secs(10), || {
        request(srv.admin, &get("/readyz")).status == 200
    });
    let id = srv.mint();
    let mut held = connect(srv.addr);
    held.write_all(get(&format!("/{id}/big.bin")).as_bytes())
        .unwrap();
    assert!(read_head(&mut held).starts_with("HTTP/1.1 200"));
    srv.signal("-TERM");
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    wait_until("/readyz says draining", Duration::from_secs(10), || {
        let r = request(srv.admin, &get("/readyz"));
        r.status == 503 && r.body == b"draining\n"
    });
    assert_eq!(request(srv.admin, &get("/healthz")).status, 200);
    assert!(
        srv.child.try_wait().unwrap().is_none(),
        "still draining while the download is held"
    );
    drop(held);
    assert!(srv.wait_exit(Duration::from_secs(30)).success());
}

/// A small tmpfs mounted at `dir` (root only), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The state directory's disk fills up: downloads go on (served from memory), but `/readyz`
/// answers 503 naming the store, and the failed batches are counted; when space returns it is
/// ready again.
#[test]
fn readyz_is_503_while_the_store_cannot_be_written() {
    let root = Root::new();
    root.file("a.bin", &pattern(MIB, 4));
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let Some(_fs) = Tmpfs::mount(&state, "16m") else {
        assert!(!ci(), "mounting a tmpfs needs root, which CI has");
        println!("skipping: cannot mount a tmpfs (not root?)");
        return;
    };
    let srv = Roam::start(root.path(), &state, work.path(), &[], &[]);
    wait_until("the store is open", Duration::from_secs(10), || {
        request(srv.admin, &get("/readyz")).status == 200
    });
    let ballast = state.join("ballast");
    let mut f = std::fs::File::create(&ballast).unwrap();
    let block = vec![0u8; 1 << 16];
    while f.write_all(&block).is_ok() {}
    drop(f);
    let ids: Vec<String> = (0..5).map(|_| srv.mint()).collect();
    for id in &ids {
        let r = request(srv.addr, &get(&format!("/{id}/a.bin")));
        assert_eq!((r.status, r.body.len()), (200, MIB), "served from memory");
    }
    wait_until(
        "/readyz says the store is full",
        Duration::from_secs(10),
        || {
            let r = request(srv.admin, &get("/readyz"));
            r.status == 503 && String::from_utf8_lossy(&r.body).contains("is full")
        },
    );
    assert!(srv.metric("roam_store_errors_total") >= 1.0);
    std::fs::remove_file(&ballast).unwrap();
    wait_until("ready again", Duration::from_secs(10), || {
        request(srv.admin, &get("/readyz")).status == 200
    });
}

/// logrotate (the real one, with the shipped configuration) moves the access log away and
/// sends SIGHUP: roam reopens the path, so lines before the rotation are in the rotated file
/// and lines after it in the new one; the text format is logfmt.
#[test]
fn logrotate_and_sighup_move_the_access_log_to_a_new_file() {
    if !have("logrotate") {
        return;
    }
    let root = Root::new();
    root.file("f.txt", b"hello");
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("access.log");
    let srv = Roam::start(
        root.path(),
        &work.path().join("state"),
        work.path(),
        &["--access-log", log.to_str().unwrap(), "--store", "memory"],
        &[],
    );
    let id = srv.mint();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until("the first line", Duration::from_secs(10), || {
        read(&log).lines().count() == 1
    });
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/roam.logrotate"),
    )
    .unwrap();
    let conf = shipped
        .replace("/var/log/roam/access.log", log.to_str().unwrap())
        .replace(
            "systemctl reload roam.service >/dev/null 2>&1 || true",
            &format!("kill -HUP {}", srv.child.id()),
        );
    assert_ne!(conf, shipped);
    let conf_path = work.path().join("logrotate.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let out = Command::new("logrotate")
        .arg("-f")
        .arg("-s")
        .arg(work.path().join("logrotate.state"))
        .arg(&conf_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_until("the log reopened", Duration::from_secs(10), || {
        srv.log().contains("access log reopened")
    });
    let r = request(srv.addr, &get(&format!("/{id}/f.txt")));
    assert_eq!(r.body, b"hello");
    wait_until("the second line", Duration::from_secs(10), || {
        read(&log).lines().count() == 1
    });
    let rotated = read(&work.path().join("access.log.1"));
    assert_eq!(rotated.lines().count(), 1, "{rotated}");
    assert!(rotated.contains(" path=/ status=200 "), "{rotated}");
    let fresh = read(&log);
    assert!(
        fresh.contains(&format!(
            " client_id={id} method=GET path=/{id}/f.txt status=200 "
        )),
        "{fresh}"
    );
    assert!(fresh.contains(" bytes_sent=5 bytes_acked=5 "), "{fresh}");
    assert!(fresh.trim_end().ends_with(" ended=complete"), "{fresh}");
    assert!(srv.child.id() > 0 && !srv.log().contains("panicked"));
}

/// An access log that cannot be opened stops the start with one line naming it; one that
/// fails later (a full disk: /dev/full) keeps roam serving, every lost line counted, the
/// failure logged once for the burst.
#[test]
fn an_unopenable_access_log_stops_the_start_and_a_failing_one_is_counted() {
    let root = Root::new();
    root.file("f.txt", b"hello");
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("no-such-dir/access.log");
    let out = Command::new(env!("CARGO_BIN_EXE_roam"))
        .arg("serve")
        .arg("--root")
        .arg(root.path())
        .args(["--listen", "127.0.0.1:0", "--store", "memory"])
        .arg("--access-log")
        .arg(&missing)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    assert!(
        stderr.contains("cannot open the access log") && stderr.contains(missing.to_str().unwrap()),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let srv = Roam::start(
        root.path(),
        &work.path().join("state"),
        work.path(),
        &["--access-log", "/dev/full", "--store", "memory"],
        &[],
    );
    let id = srv.mint();
    for _ in 0..20 {
        let r = request(
            srv.addr,
            &get_with(&format!("/{id}/f.txt"), &["Range: bytes=0-"]),
        );
        assert_eq!(r.body, b"hello", "still serving");
    }
    wait_until(
        "every line counted as lost",
        Duration::from_secs(10),
        || srv.metric("roam_access_log_dropped_lines_total") == 21.0,
    );
    let failures = srv.log().matches("cannot write the access log").count();
    assert_eq!(failures, 1, "once per burst:\n{}", srv.log());
}

/// The shipped systemd unit passes `systemd-analyze verify` without a warning (with ExecStart
/// pointing at the binary under test, which verify requires to exist), and `systemd-analyze
/// security` rates its sandbox at an exposure of at most 2.0 of 10.
#[test]
fn the_service_unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/roam.service"))
            .unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "StateDirectory=roam",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(unit.contains(line), "the unit lost {line:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roam.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/roam", env!("CARGO_BIN_EXE_roam")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    // The sandbox as systemd scores it: exposure 1.6 of 10 when written. Dropping the empty
    // capability set makes it 3.4, the syscall filter 3.0, RestrictAddressFamilies= with
    // NoNewPrivileges= 2.1 (ProtectSystem=strict is implied by DynamicUser=; the line checks
    // above keep it spelled out).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the unit's exposure rose above 2.0:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
