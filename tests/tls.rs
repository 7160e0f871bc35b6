//! HTTPS, black-box: real clients (curl, wget, `roam get`) download and resume through TLS; the
//! offset a server-resumed download starts from is what the client can decrypt (whole records
//! its TCP acknowledged), on loopback through a takeover and over a path that vanishes; the
//! certificate is reloaded on SIGHUP under load; and what is not TLS, or not finished TLS, is
//! refused without harm. Every test makes its own CA.

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::check::{
    assert_bytes_eq, parse_content_range, resumed_start, session_key, wait_until_stalled,
};
use support::netns::{
    require_netns, set_sysctl, tcp_connect_in, tcp_listen_in, KillOnDrop, TwoPathNet,
};
use support::proxy::{Disruption, DisruptiveProxy};
use support::server::{get, pattern, read_response, Root, TestServer};
use support::tls::{drain_tls, peer_leaf, tls_connect, tls_over, TestPki, TlsEnd, TlsStream};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// The most plaintext one TLS record carries.
const RECORD: u64 = 16 * 1024;

/// A TLS server for `root` with `pki`'s certificate, settings adjusted by `tweak`.
fn https_server(
    root: &Path,
    pki: &TestPki,
    tweak: impl FnOnce(&mut roam::settings::Config),
) -> TestServer {
    let files = pki.files();
    TestServer::start_with(root, move |cfg| {
        cfg.tls = Some(files);
        tweak(cfg);
    })
}

/// `GET /` over TLS: a fresh client ID.
fn mint(addr: SocketAddr, pki: &TestPki) -> String {
    let mut s = tls_connect(addr, &pki.client_config());
    s.write_all(get("/").as_bytes()).unwrap();
    let r = read_response(&mut s, false);
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).unwrap()
}

/// Fails under CI when a tool the tests need is missing; elsewhere the caller skips.
fn tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "{name} is required under CI (scripts/test.sh installs it)"
        );
        eprintln!("skipping: {name} is not installed");
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------------------------

/// curl (`--cacert`) and wget (`--ca-certificate`) download over HTTPS, and each resumes a
/// partial file with its own option (`-C -`, `-c`) to the exact file.
#[test]
fn curl_and_wget_download_and_resume_over_https() {
    if !tool("curl") || !tool("wget") {
        return;
    }
    let pki = TestPki::new(&[]);
    let root = Root::new();
    let data = pattern(3 * MIB + 12_345, 7);
    root.file("big.bin", &data);
    let server = https_server(root.path(), &pki, |_| {});
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.ca_path();
    let port = server.addr.port();

    // curl, whole, then resumed from a third of the file.
    let id = mint(server.addr, &pki);
    let url = format!("https://localhost:{port}/{id}/big.bin");
    let out = dir.path().join("curl.bin");
    let status = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(&ca)
        .arg("-o")
        .arg(&out)
        .arg(&url)
        .status()
        .unwrap();
    assert!(status.success());
    assert_bytes_eq(&std::fs::read(&out).unwrap(), &data, "curl over https");
    std::fs::write(&out, &data[..data.len() / 3]).unwrap();
    let id = mint(server.addr, &pki);
    let url = format!("https://localhost:{port}/{id}/big.bin");
    let status = Command::new("curl")
        .args(["-sS", "--fail", "-C", "-", "--cacert"])
        .arg(&ca)
        .arg("-o")
        .arg(&out)
        .arg(&url)
        .status()
        .unwrap();
    assert!(status.success());
    assert_bytes_eq(&std::fs::read(&out).unwrap(), &data, "curl -C - over https");

    // wget, resuming two thirds in.
    let id = mint(server.addr, &pki);
    let url = format!("https://127.0.0.1:{port}/{id}/big.bin");
    let out = dir.path().join("wget.bin");
    std::fs::write(&out, &data[..2 * data.len() / 3]).unwrap();
    let status = Command::new("wget")
        .args(["-q", "-c", "--ca-certificate"])
        .arg(&ca)
        .arg("-O")
        .arg(&out)
        .arg(&url)
        .status()
        .unwrap();
    assert!(status.success());
    assert_bytes_eq(&std::fs::read(&out).unwrap(), &data, "wget -c over https");

    // Without the CA, both refuse the server: nothing is trusted by accident.
    let status = Command::new("curl")
        .args(["-sS", "-o", "/dev/null"])
        .arg(&url)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(60), "curl must not trust the test CA");
}

/// `roam get https://…` through a proxy that cuts the connection three times mid-body: it
/// reconnects, resumes with Range through TLS, and the file is exact; with no `--cacert` the
/// private CA is not trusted and it stops at once with exit code 3.
#[test]
fn roam_get_resumes_over_https_through_cuts() {
    let pki = TestPki::new(&[]);
    let root = Root::new();
    let data = pattern(4 * MIB, 8);
    root.file("big.bin", &data);
    let server = https_server(root.path(), &pki, |_| {});
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let proxy = {
        let _guard = rt.enter();
        DisruptiveProxy::start(server.addr, |i| match i {
            // The mint goes through; then three downloads are cut part-way.
            0 => Disruption::None,
            1 => Disruption::CutAfter(700_000),
            2 => Disruption::ResetAfter(1_300_000),
            3 => Disruption::CutAfter(900_000),
            _ => Disruption::None,
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{}/big.bin", proxy.addr().port());
    let out = Command::new(env!("CARGO_BIN_EXE_roam"))
        .args([
            "get",
            "--stall-timeout",
            "2s",
            "--max-retry-delay",
            "200ms",
            "--cacert",
        ])
        .arg(pki.ca_path())
        .arg(&url)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "roam get failed: {stderr}");
    assert_bytes_eq(
        &std::fs::read(dir.path().join("big.bin")).unwrap(),
        &data,
        "roam get over https",
    );
    assert!(
        proxy.connections() >= 5,
        "the cuts did not happen ({} connections): {stderr}",
        proxy.connections()
    );

    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_roam"))
        .args(["get", "-o"])
        .arg(dir.path().join("untrusted.bin"))
        .arg(format!("https://127.0.0.1:{}/big.bin", server.addr.port()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("--cacert"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an untrusted certificate is not retried"
    );
    assert!(!dir.path().join("untrusted.bin.part").exists());
}

// ---------------------------------------------------------------------------------------------
// Accounting through TLS
// ---------------------------------------------------------------------------------------------

/// A TLS connection whose receive buffer is fixed small, so a client that stops reading holds
/// a bounded part of the file.
fn tls_small_rcvbuf(addr: SocketAddr, pki: &TestPki) -> TlsStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(256 * KIB).unwrap();
    sock.connect(&addr.into()).unwrap();
    let tcp: TcpStream = sock.into();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tls_over(tcp, &pki.client_config()).unwrap()
}

/// A reads 1 MiB through TLS and stops reading; B asks again (same ID, no Range). A's
/// plaintext (what it read, plus every whole record its kernel still held, readable after the
/// reset) followed by B's body is the file: no byte missing, none repeated. The server counted
/// whole records the client acknowledged, never ciphertext bytes as plaintext.
#[test]
fn a_stale_tls_connection_is_taken_over_without_gap_or_repeat() {
    let pki = TestPki::new(&[]);
    let root = Root::new();
    let data = pattern(32 * MIB, 1);
    root.file("big.bin", &data);
    let server = https_server(root.path(), &pki, |_| {});
    let id = mint(server.addr, &pki);
    let target = format!("/{id}/big.bin");
    let key = session_key(&server.service, &id, "big.bin");

    let mut a = tls_small_rcvbuf(server.addr, &pki);
    a.write_all(get(&target).as_bytes()).unwrap();
    let head = read_response(&mut a, true);
    assert_eq!(head.status, 200);
    let mut a_body = vec![0u8; MIB];
    a.read_exact(&mut a_body).unwrap();
    let stalled_at = wait_until_stalled(&server.service, &key);

    let mut b = tls_connect(server.addr, &pki.client_config());
    b.write_all(get(&target).as_bytes()).unwrap();
    let rb = read_response(&mut b, false);
    assert_eq!(rb.status, 206, "A delivered part of the file: B resumes");
    let start = resumed_start(&rb, data.len() as u64);

    let (rest, a_ended) = drain_tls(&mut a);
    a_body.extend_from_slice(&rest);
    println!(
        "tls takeover: A read {} bytes ({} after it stopped), recorded while stalled \
         {stalled_at}, B starts at {start}",
        a_body.len(),
        rest.len()
    );
    assert_eq!(a_ended, TlsEnd::Reset, "the takeover resets A");
    assert!(a_body.len() < data.len());
    assert_eq!(
        start,
        a_body.len() as u64,
        "B must start exactly where A's usable plaintext ends (>: gap, <: repeat)"
    );
    let mut whole = a_body;
    whole.extend_from_slice(&rb.body);
    assert_bytes_eq(&whole, &data, "A's plaintext + B's body");
}

/// The vanished-path test through TLS: a download over wifi, wifi cut silently, the same ID
/// asked again over lte. No gap; the bytes repeated are at most what plain TCP repeats (the
/// acknowledgements lost with the path) plus one record the client held only in part.
#[test]
fn a_vanished_path_resumes_over_https_without_gap() {
    if !require_netns() {
        return;
    }
    const CLIENT_RMEM_MAX: usize = 4 * MIB;
    let net = TwoPathNet::create("tls").expect("create namespaces");
    set_sysctl(
        net.cli_ns(),
        "net.ipv4.tcp_rmem",
        &format!("4096 131072 {CLIENT_RMEM_MAX}"),
    )
    .expect("cap the client's receive window");
    let pki = TestPki::new(&[net.wifi_server_ip().into(), net.lte_server_ip().into()]);
    let root = Root::new();
    let data = pattern(48 * MIB, 2);
    root.file("big.bin", &data);
    let listener = tcp_listen_in(
        net.srv_ns(),
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
    )
    .expect("listen in srv");
    let port = listener.local_addr().unwrap().port();
    let files = pki.files();
    let server = TestServer::start_on(listener, root.path(), |cfg| {
        cfg.tls = Some(files);
        cfg.write_stall_timeout = Duration::from_secs(60);
        cfg.tcp_user_timeout = Duration::from_secs(60);
    });
    let wifi = SocketAddr::new(net.wifi_server_ip().into(), port);
    let lte = SocketAddr::new(net.lte_server_ip().into(), port);
    let config = pki.client_config();
    let dial = |addr| {
        let s = tcp_connect_in(net.cli_ns(), addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tls_over(s, &config).expect("TLS handshake")
    };

    let mut m = dial(lte);
    m.write_all(get("/").as_bytes()).unwrap();
    let id = String::from_utf8(read_response(&mut m, false).body).unwrap();
    drop(m);
    let target = format!("/{id}/big.bin");

    let mut w = dial(wifi);
    w.write_all(get(&target).as_bytes()).unwrap();
    let head = read_response(&mut w, true);
    assert_eq!(head.status, 200);
    w.sock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let cut_at = data.len() / 8;
    let mut have: Vec<u8> = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 64 * KIB];
    let cut_done = AtomicBool::new(false);
    let mut cut_asked = None;
    let mut last_byte = Instant::now();
    std::thread::scope(|scope| loop {
        match w.read(&mut buf) {
            Ok(0) => panic!("wifi connection closed after {} bytes", have.len()),
            Ok(n) => {
                have.extend_from_slice(&buf[..n]);
                last_byte = Instant::now();
                if cut_asked.is_none() && have.len() >= cut_at {
                    let (net, done) = (&net, &cut_done);
                    scope.spawn(move || {
                        net.cut_wifi().expect("cut wifi");
                        done.store(true, Ordering::SeqCst);
                    });
                    cut_asked = Some(have.len());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if cut_done.load(Ordering::SeqCst) && last_byte.elapsed() >= Duration::from_secs(1)
                {
                    break;
                }
            }
            Err(e) => panic!("wifi read failed after {} bytes: {e}", have.len()),
        }
    });
    assert!(
        have.len() < data.len(),
        "the download finished before the cut"
    );
    assert_bytes_eq(&have, &data[..have.len()], "plaintext received over wifi");

    let mut l = dial(lte);
    let asked = Instant::now();
    l.write_all(get(&target).as_bytes()).unwrap();
    let head = read_response(&mut l, true);
    let waited = asked.elapsed();
    let start = resumed_start(&head, data.len() as u64);
    let repeated = have.len() as i64 - start as i64;
    println!(
        "tls vanished path: cut asked at {cut_asked:?} bytes, client had {} when it gave up, \
         server resumed at {start}, repeated bytes: {repeated}, lte head after {waited:?}",
        have.len()
    );
    assert!(
        start <= have.len() as u64,
        "gap: the server resumes at {start} but the client has only {} bytes",
        have.len()
    );
    assert!(
        repeated as u64 <= CLIENT_RMEM_MAX as u64 + RECORD,
        "repeated {repeated} bytes: more than a window and a record"
    );
    let mut body = vec![0u8; data.len() - start as usize];
    l.read_exact(&mut body).unwrap();
    let mut whole = have[..start as usize].to_vec();
    whole.extend_from_slice(&body);
    assert_bytes_eq(&whole, &data, "file reassembled over wifi then lte");
    drop(w);
    drop(l);
    drop(server);
    drop(net);
}

// ---------------------------------------------------------------------------------------------
// Certificate reload
// ---------------------------------------------------------------------------------------------

/// A `roam serve` process with TLS, for signals.
struct Process {
    child: KillOnDrop,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Process {
    fn start(root: &Path, pki: &TestPki, logs: &Path) -> Process {
        let log = logs.join("serve.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_roam"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "memory",
                "--root",
            ])
            .arg(root)
            .arg("--tls-cert")
            .arg(pki.cert_path())
            .arg("--tls-key")
            .arg(pki.key_path())
            .env("RUST_LOG", "info")
            .env("ROAM_LOG_FORMAT", "json")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("roam listening on https://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Process {
            child: KillOnDrop(child),
            addr,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn hangup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Waits until the log holds `n` lines containing `needle`.
    fn wait_log(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGHUP swaps the certificate under load: four clients keep opening new TLS connections
/// and downloading; after each reload new handshakes get the new certificate; a reload to a
/// key that does not match keeps the current pair and says why; not one request fails.
#[test]
fn sighup_reloads_the_certificate_under_load_without_a_failed_request() {
    let mut pki = TestPki::new(&[]);
    let root = Root::new();
    let data = pattern(200 * KIB, 3);
    root.file("f.bin", &data);
    let logs = tempfile::tempdir().unwrap();
    let server = Process::start(root.path(), &pki, logs.path());
    let config = pki.client_config();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done, config) = (Arc::clone(&stop), Arc::clone(&done), Arc::clone(&config));
            let (addr, data) = (server.addr, data.clone());
            std::thread::spawn(move || -> Result<(), String> {
                while !stop.load(Ordering::Relaxed) {
                    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut s = tls_over(tcp, &config).map_err(|e| format!("handshake: {e}"))?;
                    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                        .map_err(|e| e.to_string())?;
                    let id = String::from_utf8(read_response(&mut s, false).body).unwrap();
                    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    let mut s = tls_over(tcp, &config).map_err(|e| format!("handshake: {e}"))?;
                    s.write_all(get(&format!("/{id}/f.bin")).as_bytes())
                        .map_err(|e| e.to_string())?;
                    let r = read_response(&mut s, false);
                    if r.status != 200 || r.body != data {
                        return Err(format!("status {} with {} bytes", r.status, r.body.len()));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    let wait_for_progress = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let target = done.load(Ordering::Relaxed) + n;
        while done.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the load stopped progressing");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for_progress(10);
    // A fresh client configuration for each look at the certificate: a resumed session would
    // show the certificate of the session it resumes.
    let first = peer_leaf(&tls_connect(server.addr, &pki.client_config()));
    assert_eq!(first, pki.leaf_der);
    for round in 1..=3 {
        let (cert, key) = pki.issue();
        pki.install(&cert, &key);
        server.hangup();
        server.wait_log("TLS certificate reloaded", round);
        let now = peer_leaf(&tls_connect(server.addr, &pki.client_config()));
        assert_eq!(
            now, pki.leaf_der,
            "round {round}: new handshakes use the new pair"
        );
        wait_for_progress(10);
    }
    // A certificate with another certificate's key: refused, the current pair stays.
    let current = pki.leaf_der.clone();
    let (cert, _) = pki.issue();
    let (_, other_key) = pki.issue();
    pki.install(&cert, &other_key);
    server.hangup();
    server.wait_log("cannot be used; keeping the current one", 1);
    assert_eq!(
        peer_leaf(&tls_connect(server.addr, &pki.client_config())),
        current
    );
    wait_for_progress(10);
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join()
            .unwrap()
            .expect("a request failed during the reloads");
    }
    println!(
        "{} downloads during 4 reloads",
        done.load(Ordering::Relaxed)
    );
}

// ---------------------------------------------------------------------------------------------
// What is not (finished) TLS
// ---------------------------------------------------------------------------------------------

/// Plain HTTP to the HTTPS port gets a short cleartext 400 saying to use https; bytes that are
/// neither get the connection closed; a ClientHello cut short and a handshake that never
/// finishes are dropped at the header timeout while others are served; a client's fatal alert
/// ends only its connection; a TLS 1.2 client asking to renegotiate is refused and the server
/// keeps serving.
#[test]
fn what_is_not_tls_is_refused_and_the_server_keeps_serving() {
    let pki = TestPki::new(&[]);
    let root = Root::new();
    root.file("ok.txt", b"fine");
    let server = https_server(root.path(), &pki, |cfg| {
        cfg.header_timeout = Duration::from_secs(1);
    });
    let config = pki.client_config();
    let works = || {
        let id = mint(server.addr, &pki);
        let mut s = tls_connect(server.addr, &config);
        s.write_all(get(&format!("/{id}/ok.txt")).as_bytes())
            .unwrap();
        let r = read_response(&mut s, false);
        assert_eq!((r.status, r.body.as_slice()), (200, b"fine".as_slice()));
    };
    let raw = |bytes: &[u8]| {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let ended = s.read_to_end(&mut out);
        (out, ended)
    };

    // Plain HTTP.
    let (out, _) = raw(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("Connection: close\r\n"), "{text}");
    assert!(text.contains("https://"), "{text}");
    // Neither TLS nor HTTP: closed, nothing sent.
    let (out, _) = raw(b"\x00\x01\x02garbage\r\n\r\n");
    assert!(out.is_empty(), "{out:?}");
    // A ClientHello cut short, and a connection that never says anything: both dropped at
    // the header timeout while a full exchange goes through.
    let mut hello = Vec::new();
    {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
        c.write_tls(&mut hello).unwrap();
    }
    let mut cut = TcpStream::connect(server.addr).unwrap();
    cut.write_all(&hello[..hello.len() / 2]).unwrap();
    let silent = TcpStream::connect(server.addr).unwrap();
    let started = Instant::now();
    works();
    for mut s in [cut, silent] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty());
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not dropped at the header timeout"
    );
    // Garbage after a valid record header.
    let (out, _) = raw(b"\x16\x03\x01\x00\x10not a client hello");
    assert!(out.len() < 64, "at most an alert: {out:?}");
    // A client that sends a fatal alert after the handshake.
    let mut s = tls_connect(server.addr, &config);
    s.conn.send_close_notify();
    s.flush().unwrap();
    let (rest, _) = drain_tls(&mut s);
    assert!(rest.is_empty());
    let mut s = tls_connect(server.addr, &config);
    s.sock.write_all(b"\x15\x03\x03\x00\x02\x02\x28").unwrap(); // an unencrypted fatal alert
    let (rest, end) = drain_tls(&mut s);
    assert!(rest.is_empty());
    assert_ne!(
        end,
        TlsEnd::TimedOut,
        "the server closes a connection that broke TLS"
    );
    // TLS 1.2 renegotiation: openssl's `R` command, when openssl is here.
    if tool("openssl") {
        let mut child = Command::new("openssl")
            .args(["s_client", "-tls1_2", "-connect"])
            .arg(server.addr.to_string())
            .arg("-CAfile")
            .arg(pki.ca_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"R\n").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(all.contains("RENEGOTIATING"), "{all}");
    }
    works();
}

/// TLS 1.2 and 1.3 both work, a second connection resumes the session (no full handshake),
/// and ALPN settles on http/1.1.
#[test]
fn both_versions_resume_sessions_and_speak_http11() {
    let pki = TestPki::new(&[]);
    let root = Root::new();
    root.file("ok.txt", b"fine");
    let server = https_server(root.path(), &pki, |_| {});
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = pki.client_config_for(&[version]);
        for round in 0..2 {
            let mut s = tls_connect(server.addr, &config);
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            let r = read_response(&mut s, false);
            assert_eq!(r.status, 200);
            assert_eq!(s.conn.protocol_version(), Some(version.version));
            assert_eq!(s.conn.alpn_protocol(), Some(b"http/1.1".as_slice()));
            let kind = s.conn.handshake_kind();
            if round == 1 {
                assert_eq!(
                    kind,
                    Some(rustls::HandshakeKind::Resumed),
                    "{version:?}: the second connection resumes"
                );
            }
        }
    }
}

/// Files that cannot serve HTTPS stop the server at start with a message naming the file;
/// a key that other users can read is served but warned about.
#[test]
fn unusable_certificate_files_stop_the_server_with_a_clear_message() {
    let pki = TestPki::new(&[]);
    let root = Root::new();
    let dir = tempfile::tempdir().unwrap();
    let run = |cert: &Path, key: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_roam"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--store",
                "memory",
                "--root",
            ])
            .arg(root.path())
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = dir.path().join("missing.pem");
    let (code, err) = run(&missing, &pki.key_path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("missing.pem"), "{err}");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not pem at all").unwrap();
    let (code, err) = run(&junk, &pki.key_path());
    assert_eq!(code, Some(2));
    assert!(
        err.contains("junk.pem") && err.contains("no certificate"),
        "{err}"
    );
    let (code, err) = run(&pki.cert_path(), &junk);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("junk.pem") && err.contains("private key"),
        "{err}"
    );
    let (_, other) = pki.issue();
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, other.serialize_pem()).unwrap();
    let (code, err) = run(&pki.cert_path(), &other_key);
    assert_eq!(code, Some(2));
    assert!(err.contains("other.key"), "{err}");
    // --tls-cert without --tls-key is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_roam"))
        .args(["serve", "--tls-cert"])
        .arg(pki.cert_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));

    // A world-readable key: served, with a warning.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pki.key_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let server = Process::start(root.path(), &pki, logs.path());
    server.wait_log("readable by every user", 1);
    let id = mint(server.addr, &pki);
    assert!(!id.is_empty());
}

/// A response body that starts mid-record keeps exact framing: every Range slice over TLS is
/// the file's bytes (records cut at 16 KiB of the connection's plaintext, not of the file).
#[test]
fn ranges_over_tls_are_exact() {
    let pki = TestPki::new(&[]);
    let root = Root::new();
    let data = pattern(300 * KIB + 7, 5);
    root.file("f.bin", &data);
    let server = https_server(root.path(), &pki, |_| {});
    let id = mint(server.addr, &pki);
    let mut s = tls_connect(server.addr, &pki.client_config());
    for (a, b) in [
        (0u64, 0u64),
        (1, 16_383),
        (16_380, 16_390),
        (100_000, 307_206),
        (5, 70_000),
    ] {
        let req = format!("GET /{id}/f.bin HTTP/1.1\r\nHost: t\r\nRange: bytes={a}-{b}\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut s, false);
        assert_eq!(r.status, 206);
        let (start, end, total) = parse_content_range(r.header("content-range").unwrap());
        assert_eq!((start, end, total), (a, b, data.len() as u64));
        assert_bytes_eq(&r.body, &data[a as usize..=b as usize], "range over tls");
    }
}
