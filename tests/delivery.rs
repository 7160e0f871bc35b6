//! Confirmed delivery, black-box: the offset a server-resumed download starts from is what the
//! client's TCP acknowledged, never what the server wrote; takeover aborts a stale sender;
//! an open-ended Range declares a position, and no Range request aborts anyone.
//!
//! Run alone with `cargo test --test delivery -- --nocapture` to see the measured numbers
//! (repeated bytes over the vanished path, gaps behind the disruptive proxy, server memory).

mod support;

use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::check::{
    assert_bytes_eq, connect_small_rcvbuf, drain, parse_content_range, recorded, resumed_start,
    session_key, wait_until_stalled,
};
use support::moving::{download, Stats, PLAN_SEED};
use support::netns::{
    netns_command, require_netns, set_sysctl, tcp_connect_in, tcp_listen_in, KillOnDrop, TwoPathNet,
};
use support::server::{connect, get, get_with, pattern, read_response, Response, Root, TestServer};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// 1. Takeover of a stale connection, on loopback
// ---------------------------------------------------------------------------------------------

/// What connection A delivered and where B started, in the takeover scenario.
struct Takeover {
    data: Vec<u8>,
    /// A's body: read before it stopped, plus what it drained after the takeover.
    a_body: Vec<u8>,
    /// How A's drain ended.
    a_ended: Result<(), ErrorKind>,
    /// B's start and body.
    start: u64,
    b_body: Vec<u8>,
}

/// A reads 1 MiB of a 32 MiB file and stops reading; once the server's writes have stalled, B
/// asks again (same ID, no Range) and reads to the end; then A is drained to its end.
fn takeover_scenario(tweak: impl FnOnce(&mut roam::settings::Config)) -> Takeover {
    let root = Root::new();
    let data = pattern(32 * MIB, 1);
    root.file("big.bin", &data);
    let server = TestServer::start_with(root.path(), tweak);
    let id = server.mint();
    let target = format!("/{id}/big.bin");
    let key = session_key(&server.service, &id, "big.bin");

    let mut a = connect_small_rcvbuf(server.addr, 256 * KIB);
    a.write_all(get(&target).as_bytes()).unwrap();
    let head = read_response(&mut a, true);
    assert_eq!(head.status, 200);
    assert_eq!(resumed_start(&head, data.len() as u64), 0);
    let mut a_body = vec![0u8; MIB];
    a.read_exact(&mut a_body).unwrap();
    // A stops reading: its receive buffer fills, the window closes, the server's writes block.
    let stalled_at = wait_until_stalled(&server.service, &key);

    let mut b = connect(server.addr);
    b.write_all(get(&target).as_bytes()).unwrap();
    let rb = read_response(&mut b, false);
    assert_eq!(rb.status, 206, "A delivered part of the file: B resumes");
    let start = resumed_start(&rb, data.len() as u64);

    // A was reset by the takeover; what its kernel acknowledged is still readable.
    let (rest, a_ended) = drain(&mut a);
    a_body.extend_from_slice(&rest);
    println!(
        "takeover: A read {} bytes ({} after it stopped reading), offset recorded while \
         stalled {stalled_at}, B starts at {start}",
        a_body.len(),
        rest.len()
    );
    Takeover {
        data,
        a_body,
        a_ended,
        start,
        b_body: rb.body,
    }
}

/// A stops reading mid-file; B asks again (same ID, no Range). B must start exactly where A's
/// delivery ends: A's body (what it read plus what its kernel still holds, readable even after
/// the RST) followed by B's body is the file, with no byte missing and none repeated.
///
/// A server that records bytes *written* instead of bytes *acknowledged* fails this test: the
/// bytes of A that sat in the server's send queue (written, never acknowledged, thrown away by
/// the RST) would be counted, so B would start past the end of what A received and those bytes
/// would be skipped. `written_accounting_is_caught_by_the_takeover_check` runs exactly that.
#[test]
fn stale_connection_is_taken_over_without_gap_or_repeat() {
    let t = takeover_scenario(|_| {});
    assert_eq!(
        t.a_ended,
        Err(ErrorKind::ConnectionReset),
        "takeover must abort A with a reset"
    );
    assert!(
        t.a_body.len() < t.data.len(),
        "A must not have had the whole file"
    );
    assert_eq!(
        t.start,
        t.a_body.len() as u64,
        "B must start exactly where A's delivered bytes end (>: gap, <: repeat)"
    );
    let mut whole = t.a_body;
    whole.extend_from_slice(&t.b_body);
    assert_bytes_eq(&whole, &t.data, "A's body + B's body");
}

/// The control for the test above: with the server counting bytes written (the
/// `--accounting written` measurement mode), the same scenario leaves a gap, so the check
/// above really tells the two accountings apart.
#[test]
fn written_accounting_is_caught_by_the_takeover_check() {
    let t = takeover_scenario(|cfg| cfg.accounting = roam::settings::Accounting::Written);
    println!(
        "written accounting: B starts {} bytes past what A received",
        t.start as i64 - t.a_body.len() as i64
    );
    assert!(
        t.start > t.a_body.len() as u64,
        "counting written bytes should skip A's unacknowledged bytes (B starts at {}, A has {})",
        t.start,
        t.a_body.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A path that vanishes silently; resume over the second link
// ---------------------------------------------------------------------------------------------

/// Upper bound on the receive window of the client namespace (`tcp_rmem` max). The bytes a
/// client gets again are the ones it received but whose acknowledgement was lost with the
/// path; they were in flight at the cut, so they fit in one window. Capping the window makes
/// the 4 MiB bound hold by construction instead of depending on the host's `tcp_rmem`
/// (32 MiB here). Measured: 0 bytes in every run; 0.3-0.7 MB when the client stopped reading
/// while the cut was made (its ACKs were then delayed and lost with the path).
const CLIENT_RMEM_MAX: usize = 4 * MIB;

/// Local addresses of the TCP sockets in namespace `ns` (any state), as `ss` prints them.
fn sockets_in(ns: &str) -> Vec<String> {
    let out = netns_command(ns, "ss")
        .args(["-Htna"])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect()
}

#[test]
fn vanished_path_resumes_over_second_link_without_gap() {
    if !require_netns() {
        return;
    }
    // Declared first so it is dropped last: sockets and the server go before the namespaces.
    let net = TwoPathNet::create("dlv").expect("create namespaces");
    set_sysctl(
        net.cli_ns(),
        "net.ipv4.tcp_rmem",
        &format!("4096 131072 {CLIENT_RMEM_MAX}"),
    )
    .expect("cap the client's receive window");

    let root = Root::new();
    let data = pattern(64 * MIB, 2);
    root.file("big.bin", &data);
    let listener = tcp_listen_in(
        net.srv_ns(),
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
    )
    .expect("listen in srv");
    let port = listener.local_addr().unwrap().port();
    // Only the takeover may end the old connection within this test: the kernel and the
    // write-stall timeout would take a minute.
    let server = TestServer::start_on(listener, root.path(), |cfg| {
        cfg.write_stall_timeout = Duration::from_secs(60);
        cfg.tcp_user_timeout = Duration::from_secs(60);
    });
    let wifi = SocketAddr::new(net.wifi_server_ip().into(), port);
    let lte = SocketAddr::new(net.lte_server_ip().into(), port);
    let dial = |addr| {
        let s = tcp_connect_in(net.cli_ns(), addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };

    let mut m = dial(lte);
    m.write_all(get("/").as_bytes()).unwrap();
    let minted = read_response(&mut m, false);
    assert_eq!(minted.status, 200);
    let id = String::from_utf8(minted.body).unwrap();
    drop(m);
    let target = format!("/{id}/big.bin");

    // Download over wifi, reading continuously; cut wifi an eighth of the way in (what arrives
    // while the cut is being made, measured up to 10 MB on a loaded machine, must not finish
    // the file).
    let mut w = dial(wifi);
    w.write_all(get(&target).as_bytes()).unwrap();
    let head = read_response(&mut w, true);
    assert_eq!(head.status, 200);
    w.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let cut_at = data.len() / 8;
    let mut have: Vec<u8> = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 64 * KIB];
    // (asked for the cut, cut in effect): bytes the client had at each moment.
    let mut cut: (Option<usize>, Option<usize>) = (None, None);
    let cut_done = std::sync::atomic::AtomicBool::new(false);
    let mut last_byte = Instant::now();
    std::thread::scope(|scope| loop {
        match w.read(&mut buf) {
            Ok(0) => panic!("wifi connection closed after {} bytes", have.len()),
            Ok(n) => {
                have.extend_from_slice(&buf[..n]);
                last_byte = Instant::now();
                if cut.0.is_none() && have.len() >= cut_at {
                    // Cut from another thread so that the client keeps reading meanwhile (the
                    // `ip` commands take milliseconds; a client that stopped reading would
                    // delay its acknowledgements and inflate the repeat).
                    let (net, done) = (&net, &cut_done);
                    scope.spawn(move || {
                        net.cut_wifi().expect("cut wifi");
                        done.store(true, Ordering::SeqCst);
                    });
                    cut.0 = Some(have.len());
                }
                if cut.1.is_none() && cut_done.load(Ordering::SeqCst) {
                    cut.1 = Some(have.len());
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if cut.1.is_none() && cut_done.load(Ordering::SeqCst) {
                    cut.1 = Some(have.len());
                }
                if last_byte.elapsed() >= Duration::from_secs(1) {
                    break;
                }
            }
            Err(e) => panic!("wifi read failed after {} bytes: {e}", have.len()),
        }
    });
    let (Some(cut_asked), Some(cut)) = cut else {
        panic!("wifi was not cut ({cut:?})");
    };
    assert!(
        have.len() < data.len(),
        "the download finished before the cut"
    );
    assert_bytes_eq(&have, &data[..have.len()], "bytes received over wifi");
    // Keep the wifi socket open: a real phone's old socket is not closed either, and no FIN
    // or RST could cross the cut path anyway.

    // Ask again over lte: same ID, no Range.
    let mut l = dial(lte);
    let asked = Instant::now();
    l.write_all(get(&target).as_bytes()).unwrap();
    let mut resp = read_response(&mut l, true);
    let waited = asked.elapsed();
    let start = resumed_start(&resp, data.len() as u64);
    let repeated = have.len() as i64 - start as i64;
    println!(
        "vanished path: cut asked at {cut_asked} bytes, in effect at {cut}, client had {} \
         bytes when it gave up, server resumed at {start}, repeated bytes: {repeated}, lte \
         head after {waited:?}",
        have.len()
    );
    assert!(
        start <= have.len() as u64,
        "gap: the server resumes at {start} but the client has only {} bytes",
        have.len()
    );
    assert!(
        repeated as usize <= CLIENT_RMEM_MAX,
        "repeated {repeated} bytes: more than one window"
    );
    assert!(
        waited < Duration::from_secs(3),
        "the lte response waited {waited:?}: the stale connection was not taken over"
    );
    let mut body = vec![0u8; data.len() - start as usize];
    l.read_exact(&mut body).unwrap();
    resp.body = body;
    let overlap = have.len() - start as usize;
    assert_bytes_eq(
        &resp.body[..overlap],
        &have[start as usize..],
        "repeated bytes identical to what the client has",
    );
    let mut whole = have[..start as usize].to_vec();
    whole.extend_from_slice(&resp.body);
    assert_bytes_eq(&whole, &data, "file reassembled over wifi then lte");

    // The server side of the wifi connection is gone (aborted, not waiting for a timeout).
    let old_local = format!("{}:{port}", net.wifi_server_ip());
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let socks = sockets_in(net.srv_ns());
        if !socks.contains(&old_local) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server still holds its wifi connection ({socks:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(w);
    drop(l);
    drop(server);
    drop(net);
}

// ---------------------------------------------------------------------------------------------
// 3. Many moving clients through disruptive proxies, against the real binary
// ---------------------------------------------------------------------------------------------

const CLIENTS: usize = 200;
/// A spawned `roam serve`, killed on drop.
struct Binary {
    child: KillOnDrop,
    addr: SocketAddr,
    /// Its state directory (sessions on disk, the ID secret).
    _state: tempfile::TempDir,
}

impl Binary {
    fn start(root: &Path, extra: &[&str]) -> Binary {
        let state = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_roam"))
            .args(["serve", "--root"])
            .arg(root)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state.path())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn roam");
        let stdout = child.stdout.take().unwrap();
        let child = KillOnDrop(child);
        let mut line = String::new();
        io::BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("roam listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Binary {
            child,
            addr,
            _state: state,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS in /proc/PID/status");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

/// GET over a plain connection, for minting and liveness.
async fn direct_get(addr: SocketAddr, target: &str) -> Response {
    let target = target.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut s = connect(addr);
        s.write_all(get(&target).as_bytes()).unwrap();
        read_response(&mut s, false)
    })
    .await
    .unwrap()
}

/// 200 clients download concurrently through proxies that reset, blackhole and stall their
/// connections, while the clients also move on their own (stop reading, ask again elsewhere,
/// drain the old connection). Every file must come out exact; the server must never resume a
/// client past its bytes except where a proxy swallowed acknowledged bytes; and the server
/// process must end up alive, with its connections closed and its memory near where it began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_moving_clients_get_exact_files() {
    let root = Root::new();
    let files: Vec<(String, Vec<u8>)> = [MIB, 2 * MIB + 333, 3 * MIB - 17]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let name = format!("f{i}.bin");
            let data = pattern(len, 10 + i as u64);
            root.file(&name, &data);
            (name, data)
        })
        .collect();
    // A short write-stall timeout bounds how long a connection nobody reads any more can
    // linger on the server, so the descriptor check below need not wait the default 30 s.
    let server = Binary::start(root.path(), &["--write-stall-timeout", "5s"]);

    // Warm up (runtime threads, file opens) before taking the baseline.
    let warm = direct_get(server.addr, "/").await;
    assert_eq!(warm.status, 200);
    let warm_id = String::from_utf8(warm.body).unwrap();
    for (name, data) in &files {
        let r = direct_get(server.addr, &format!("/{warm_id}/{name}")).await;
        assert_eq!(r.body.len(), data.len());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = server.rss_kib();
    let fds_before = server.open_fds();

    let stats = Arc::new(Stats::default());
    let files = Arc::new(files);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let files = Arc::clone(&files);
        let stats = Arc::clone(&stats);
        let server_addr = server.addr;
        tasks.spawn(async move {
            let minted = direct_get(server_addr, "/").await;
            assert_eq!(minted.status, 200);
            let id = String::from_utf8(minted.body).unwrap();
            let (name, data) = &files[c % files.len()];
            let target = format!("/{id}/{name}");
            let got = download(
                c,
                target,
                data.len() as u64,
                &[server_addr],
                PLAN_SEED,
                &stats,
            )
            .await;
            assert_bytes_eq(&got, data, &format!("client {c} ({name})"));
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    })
    .await;
    assert!(all.is_ok(), "clients did not finish within 90 s");
    let took = started.elapsed();

    let endings = stats.endings.lock().unwrap().clone();
    let gaps = stats.gaps.lock().unwrap().clone();
    let cuts = stats.cuts.lock().unwrap().clone();
    let (min_cuts, total_cuts) = (
        cuts.iter().copied().min().unwrap_or(0),
        cuts.iter().sum::<u64>(),
    );
    println!(
        "moving clients: {CLIENTS} files exact in {took:?}; {} connections, {} of them \
         declared Range fills; {} moves; cuts per client: min {min_cuts}, mean {:.1}; \
         endings {endings:?}; gaps by how the connection before them ended {gaps:?} \
         (largest {} bytes); repeated bytes {}; restarts from 0 {}",
        stats.attempts.load(Ordering::Relaxed),
        stats.declared.load(Ordering::Relaxed),
        stats.moves.load(Ordering::Relaxed),
        total_cuts as f64 / CLIENTS as f64,
        stats.max_gap.load(Ordering::Relaxed),
        stats.repeated_bytes.load(Ordering::Relaxed),
        stats.restarts.load(Ordering::Relaxed),
    );
    // Every break here is the network's (a vanished path, a stall, a client that moved while
    // its old connection hung): each resume continues, none starts over.
    assert_eq!(
        stats.restarts.load(Ordering::Relaxed),
        0,
        "a client whose path broke was sent the whole file again"
    );
    assert!(min_cuts >= 1, "every client must be cut at least once");
    assert!(
        total_cuts >= 2 * CLIENTS as u64,
        "the plan should cut clients several times each ({total_cuts} cuts)"
    );

    // The server is alive, answers, and is back near where it started.
    let mut server = server;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server process exited"
    );
    let alive = direct_get(server.addr, "/").await;
    assert_eq!(alive.status, 200);
    // Connections end within the linger time (2 s) or the write-stall timeout (5 s here).
    let settling = Instant::now();
    let mut fds = server.open_fds();
    while fds > fds_before && settling.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        fds = server.open_fds();
    }
    let rss_after = server.rss_kib();
    println!(
        "server memory: VmRSS {rss_before} KiB before, {rss_after} KiB after; open \
         descriptors {fds_before} before, {fds} after {:?}",
        settling.elapsed()
    );
    assert!(
        fds <= fds_before,
        "the server still holds {fds} descriptors ({fds_before} before): connections leaked"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "server VmRSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Two responses on one keep-alive connection
// ---------------------------------------------------------------------------------------------

/// The first response's head and body (and the second's head) were acknowledged on the same
/// connection before the second body; none of them may count toward the second file's offset.
#[test]
fn keep_alive_second_response_counts_only_its_own_body() {
    let root = Root::new();
    let small = pattern(100 * KIB + 7, 3);
    let big = pattern(32 * MIB, 4);
    root.file("small.bin", &small);
    root.file("big.bin", &big);
    let server = TestServer::start(root.path());
    let id = server.mint();
    let svc = &server.service;
    let small_key = session_key(svc, &id, "small.bin");
    let big_key = session_key(svc, &id, "big.bin");

    let mut a = connect_small_rcvbuf(server.addr, 256 * KIB);
    a.write_all(get(&format!("/{id}/small.bin")).as_bytes())
        .unwrap();
    let first = read_response(&mut a, false);
    assert_eq!(first.status, 200);
    assert_bytes_eq(&first.body, &small, "first response");
    a.write_all(get(&format!("/{id}/big.bin")).as_bytes())
        .unwrap();
    let head = read_response(&mut a, true);
    assert_eq!(head.status, 200);
    let mut a_body = vec![0u8; 2 * MIB];
    a.read_exact(&mut a_body).unwrap();
    wait_until_stalled(svc, &big_key);

    // Reconnect for the big file: takeover, resume where A's second body ends.
    let mut b = connect(server.addr);
    b.write_all(get(&format!("/{id}/big.bin")).as_bytes())
        .unwrap();
    let rb = read_response(&mut b, false);
    let start = resumed_start(&rb, big.len() as u64);
    let (rest, ended) = drain(&mut a);
    a_body.extend_from_slice(&rest);
    assert_eq!(ended, Err(ErrorKind::ConnectionReset));
    println!(
        "keep-alive: second body delivered {} bytes on A, B starts at {start}",
        a_body.len()
    );
    assert_eq!(
        start,
        a_body.len() as u64,
        "the second file's offset must count only its own body bytes"
    );
    let mut whole = a_body;
    whole.extend_from_slice(&rb.body);
    assert_bytes_eq(&whole, &big, "big file over A then B");

    // The first file was confirmed whole, and only it.
    assert_eq!(recorded(svc, &small_key), Some(small.len() as u64));
    let mut c = connect(server.addr);
    c.write_all(get(&format!("/{id}/small.bin")).as_bytes())
        .unwrap();
    let again = read_response(&mut c, false);
    assert_eq!(again.status, 416, "the small file is already complete");
    assert_eq!(
        again.header("roam-offset"),
        Some(small.len().to_string().as_str())
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Range requests never abort another connection
// ---------------------------------------------------------------------------------------------

#[test]
fn range_request_does_not_abort_connection_still_sending() {
    let root = Root::new();
    let data = pattern(16 * MIB, 5);
    root.file("big.bin", &data);
    let server = TestServer::start(root.path());
    let id = server.mint();
    let target = format!("/{id}/big.bin");
    let key = session_key(&server.service, &id, "big.bin");

    let mut a = connect_small_rcvbuf(server.addr, 256 * KIB);
    a.write_all(get(&target).as_bytes()).unwrap();
    let head = read_response(&mut a, true);
    assert_eq!(head.status, 200);
    let mut a_body = vec![0u8; 512 * KIB];
    a.read_exact(&mut a_body).unwrap();
    wait_until_stalled(&server.service, &key);

    // An open-ended range declares a position (new epoch) but takes nothing over.
    let mut b = connect(server.addr);
    b.write_all(get_with(&target, &["Range: bytes=0-"]).as_bytes())
        .unwrap();
    let rb = read_response(&mut b, false);
    assert_eq!(rb.status, 206);
    assert_eq!(
        parse_content_range(rb.header("content-range").unwrap()),
        (0, data.len() as u64 - 1, data.len() as u64)
    );
    assert_bytes_eq(&rb.body, &data, "Range: bytes=0- body");

    // A closed range neither declares nor aborts.
    let mut c = connect(server.addr);
    c.write_all(get_with(&target, &["Range: bytes=1000000-1000099"]).as_bytes())
        .unwrap();
    let rc = read_response(&mut c, false);
    assert_eq!(rc.status, 206);
    assert_bytes_eq(&rc.body, &data[1_000_000..1_000_100], "closed range body");

    // A was never aborted: the rest of its body arrives, and the connection still serves.
    let mut rest = vec![0u8; data.len() - a_body.len()];
    a.read_exact(&mut rest)
        .expect("A must complete after the Range requests");
    a_body.extend_from_slice(&rest);
    assert_bytes_eq(&a_body, &data, "A's whole body");
    a.write_all(get_with(&target, &["Range: bytes=0-9"]).as_bytes())
        .unwrap();
    let tail = read_response(&mut a, false);
    assert_eq!(tail.status, 206);
    assert_bytes_eq(&tail.body, &data[..10], "A still serves after its body");

    // The declared stream owns the session: it is complete.
    let deadline = Instant::now() + Duration::from_secs(5);
    while recorded(&server.service, &key) != Some(data.len() as u64) {
        assert!(
            Instant::now() < deadline,
            "session offset {:?}, expected the declared stream's {}",
            recorded(&server.service, &key),
            data.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// 6. A peer that half-closed and then reset is let go at once
// ---------------------------------------------------------------------------------------------

/// A client sends its request, half-closes (FIN), and then vanishes with a reset while most of
/// the response is still unacknowledged. Nothing more can ever be confirmed, so the server
/// should record what was acknowledged and let the connection go (socket, task, file and the
/// session's ownership), not keep polling a dead socket until the write-stall timeout.
///
/// The same sequence happens behind proxies: a proxy forwards the client's FIN and resets
/// later (the disruptive proxy does exactly this when a stalled client gives up), which is
/// where `many_moving_clients_get_exact_files` first showed dead server connections living
/// ~4 s past the end (its --write-stall-timeout is 5 s; 30 s by default).
#[test]
fn half_closed_then_reset_peer_is_released_promptly() {
    let root = Root::new();
    let data = pattern(8 * KIB, 6);
    root.file("f.bin", &data);
    let server = TestServer::start_with(root.path(), |cfg| {
        cfg.write_stall_timeout = Duration::from_secs(20);
        cfg.shutdown_timeout = Duration::from_secs(1);
    });
    let id = server.mint();
    let svc = &server.service;
    // The smallest receive buffer the kernel allows: the 8 KiB body is written at once but
    // mostly stays unacknowledged.
    let a = connect_small_rcvbuf(server.addr, 1);
    (&a).write_all(get(&format!("/{id}/f.bin")).as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    a.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Precondition: the server wrote the whole response, saw our FIN and is waiting for the
    // acknowledgements (its socket is in LAST-ACK), still owning the session.
    let port = server.addr.port().to_string();
    let out = Command::new("ss")
        .args(["-Htn", "state", "last-ack", "sport", "=", &port])
        .output()
        .expect("run ss");
    let last_ack = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(
        last_ack, 1,
        "precondition: the server is lingering after its response"
    );
    assert_eq!(
        svc.sessions().senders(),
        1,
        "precondition: the body is unconfirmed"
    );
    let key = session_key(svc, &id, "f.bin");
    let confirmed = recorded(svc, &key).unwrap();
    assert!(
        confirmed < data.len() as u64,
        "precondition: the body is unconfirmed"
    );

    socket2::SockRef::from(&a)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(a); // RST
    let reset = Instant::now();
    while svc.sessions().senders() != 0 && reset.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let held = reset.elapsed();
    println!("half-closed then reset: confirmed {confirmed} of {} bytes; connection held {held:?} after the reset", data.len());
    assert_eq!(
        svc.sessions().senders(),
        0,
        "the server still holds a connection whose peer reset {held:?} ago (it polls the dead \
         socket until --write-stall-timeout, 20 s here)"
    );
    assert_eq!(
        recorded(svc, &key),
        Some(confirmed),
        "nothing more was delivered"
    );
}
