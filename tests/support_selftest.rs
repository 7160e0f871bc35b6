//! Self-tests for tests/support: checks that the disruptive proxy and the namespace harness really do what the server tests rely on.

mod support;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

use support::netns::{
    in_namespace, netns_command, require_netns, set_sysctl, spawn_in_namespace, tcp_connect_in,
    tcp_listen_in, KillOnDrop, TwoPathNet,
};
use support::proxy::{Disruption, DisruptiveProxy};

const MIB: usize = 1024 * 1024;

/// Offset-dependent bytes, so a dropped or duplicated chunk shows up as a mismatch.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[derive(Debug)]
enum UpstreamEvent {
    WriteDone(Result<(), ErrorKind>),
    PeerClosed { received: usize },
}

/// Upstream that, like an HTTP server, waits for the client's first byte (the
/// "request"), then sends `len` pattern bytes and a FIN, while separately
/// reading (and reporting) whatever else the client sends until it goes away.
/// Reading and writing are independent so a blocked write cannot hide a close.
async fn bulk_upstream(len: usize) -> (SocketAddr, mpsc::UnboundedReceiver<UpstreamEvent>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (mut rd, mut wr) = stream.into_split();
            let mut request = [0u8; 1];
            if rd.read_exact(&mut request).await.is_err() {
                continue;
            }
            let tx_w = tx.clone();
            tokio::spawn(async move {
                let mut res = wr.write_all(&pattern(len)).await;
                if res.is_ok() {
                    res = wr.shutdown().await;
                }
                let _ = tx_w.send(UpstreamEvent::WriteDone(res.map_err(|e| e.kind())));
                // Keep the write half (and so the socket) alive until reading ends.
                std::future::pending::<()>().await;
            });
            let tx_r = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut received = 0;
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    received += n;
                }
                let _ = tx_r.send(UpstreamEvent::PeerClosed { received });
            });
        }
    });
    (addr, rx)
}

/// Connects and sends the one-byte request that starts `bulk_upstream`.
async fn request(addr: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"g").await.unwrap();
    c
}

async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = stream.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

/// Reads until EOF or error; panics if the stream goes quiet for `idle`.
async fn read_to_end_or_error(s: &mut TcpStream, idle: Duration) -> (Vec<u8>, Option<io::Error>) {
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match timeout(idle, s.read(&mut buf)).await {
            Err(_) => panic!("stream idle for {idle:?} after {} bytes", data.len()),
            Ok(Ok(0)) => return (data, None),
            Ok(Ok(n)) => data.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (data, Some(e)),
        }
    }
}

async fn read_exact_within(s: &mut TcpStream, n: usize, limit: Duration) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    timeout(limit, s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("did not get {n} bytes within {limit:?}"))
        .unwrap();
    buf
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<UpstreamEvent>) -> UpstreamEvent {
    timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("no upstream event within 5s")
        .expect("upstream gone")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_none_forwards_everything_and_counts() {
    let (upstream, mut events) = bulk_upstream(MIB).await;
    let proxy = DisruptiveProxy::start(upstream, |_| Disruption::None);
    for _ in 0..2 {
        let mut c = request(proxy.addr()).await;
        let (data, err) = read_to_end_or_error(&mut c, Duration::from_secs(5)).await;
        assert!(err.is_none(), "unexpected error {err:?}");
        assert!(data == pattern(MIB), "payload corrupted");
        loop {
            if let UpstreamEvent::WriteDone(res) = next_event(&mut events).await {
                assert_eq!(res, Ok(()));
                break;
            }
        }
    }
    assert_eq!(proxy.connections(), 2);
    assert_eq!(proxy.downstream_bytes(), 2 * MIB as u64);

    let echo = DisruptiveProxy::start(echo_upstream().await, |_| Disruption::None);
    let mut c = TcpStream::connect(echo.addr()).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    assert_eq!(
        read_exact_within(&mut c, 5, Duration::from_secs(2)).await,
        b"hello"
    );
    assert_eq!(echo.upstream_bytes(), 5);
    assert_eq!(echo.downstream_bytes(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_reset_delivers_exactly_n_then_econnreset() {
    for n in [0usize, 1, 65_537, 300_000] {
        let (upstream, mut events) = bulk_upstream(MIB).await;
        let proxy = DisruptiveProxy::start(upstream, move |_| Disruption::ResetAfter(n as u64));
        let mut c = request(proxy.addr()).await;
        let (data, err) = read_to_end_or_error(&mut c, Duration::from_secs(5)).await;
        assert_eq!(
            data.len(),
            n,
            "ResetAfter({n}) delivered {} bytes",
            data.len()
        );
        assert!(data == pattern(n), "payload corrupted");
        assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::ConnectionReset));
        assert_eq!(proxy.downstream_bytes(), n as u64);
        // The upstream side must see its connection end too.
        loop {
            if let UpstreamEvent::PeerClosed { .. } = next_event(&mut events).await {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cut_resets_the_client_and_leaves_the_upstream_silent() {
    let n = 70_000usize;
    let (upstream, mut events) = bulk_upstream(MIB).await;
    let proxy = DisruptiveProxy::start(upstream, move |_| Disruption::CutAfter(n as u64));
    let mut c = request(proxy.addr()).await;
    let (data, err) = read_to_end_or_error(&mut c, Duration::from_secs(5)).await;
    assert_eq!(data.len(), n);
    assert!(data == pattern(n), "payload corrupted");
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::ConnectionReset));
    // The upstream's connection stays open: no close, no reset, while the proxy lives.
    let quiet = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let UpstreamEvent::PeerClosed { .. } = next_event(&mut events).await {
                break;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "the upstream saw its connection end");
    proxy.shutdown();
    loop {
        if let UpstreamEvent::PeerClosed { .. } = next_event(&mut events).await {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_reset_waits_for_a_slow_reader() {
    // The client does not read for a while, so most of the N bytes are still
    // queued in the proxy when the offset is reached; a premature RST would
    // discard them.
    let n = 2 * MIB;
    let (upstream, _events) = bulk_upstream(4 * MIB).await;
    let proxy = DisruptiveProxy::start(upstream, move |_| Disruption::ResetAfter(n as u64));
    let mut c = request(proxy.addr()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (data, err) = read_to_end_or_error(&mut c, Duration::from_secs(5)).await;
    assert_eq!(data.len(), n);
    assert!(data == pattern(n), "payload corrupted");
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::ConnectionReset));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_blackhole_delivers_n_then_silence_with_socket_open() {
    let n = 50_000;
    let (upstream, mut events) = bulk_upstream(MIB).await;
    let proxy = DisruptiveProxy::start(upstream, move |_| Disruption::BlackholeAfter(n as u64));
    let mut c = request(proxy.addr()).await;
    let data = read_exact_within(&mut c, n, Duration::from_secs(5)).await;
    assert!(data == pattern(n), "payload corrupted");

    let mut buf = [0u8; 1024];
    let waited = timeout(Duration::from_secs(1), c.read(&mut buf)).await;
    assert!(waited.is_err(), "expected silence, got {waited:?}");
    // Still open: writes are accepted (and go nowhere).
    c.write_all(b"ping").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(proxy.upstream_bytes(), 1, "only the request byte may pass");
    assert_eq!(proxy.downstream_bytes(), n as u64);

    // A client close ends the blackholed connection on the upstream side too.
    drop(c);
    loop {
        if let UpstreamEvent::PeerClosed { received } = next_event(&mut events).await {
            assert_eq!(received, 0);
            break;
        }
    }

    // Dropping the proxy closes a blackholed connection.
    let mut c = request(proxy.addr()).await;
    read_exact_within(&mut c, n, Duration::from_secs(5)).await;
    assert!(timeout(Duration::from_millis(300), c.read(&mut buf))
        .await
        .is_err());
    drop(proxy);
    let ended = timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .expect("proxy drop did not close the client socket");
    assert!(matches!(ended, Ok(0) | Err(_)), "got {ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_stall_delays_then_delivers_everything() {
    let after = 100_000;
    let stall = Duration::from_millis(700);
    let (upstream, _events) = bulk_upstream(MIB).await;
    let proxy = DisruptiveProxy::start(upstream, move |_| Disruption::StallFor {
        after: after as u64,
        duration: stall,
    });
    let mut c = request(proxy.addr()).await;
    let head = read_exact_within(&mut c, after, Duration::from_secs(5)).await;
    let reached = Instant::now();
    let one = read_exact_within(&mut c, 1, Duration::from_secs(5)).await;
    let gap = reached.elapsed();
    assert!(
        gap >= stall - Duration::from_millis(150),
        "gap only {gap:?}"
    );
    let (rest, err) = read_to_end_or_error(&mut c, Duration::from_secs(5)).await;
    assert!(err.is_none(), "unexpected error {err:?}");
    let mut all = head;
    all.extend_from_slice(&one);
    all.extend_from_slice(&rest);
    assert!(all == pattern(MIB), "payload corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_stall_also_holds_client_to_server_bytes() {
    let stall = Duration::from_millis(600);
    let proxy = DisruptiveProxy::start(echo_upstream().await, move |_| Disruption::StallFor {
        after: 4,
        duration: stall,
    });
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"abcd").await.unwrap();
    assert_eq!(
        read_exact_within(&mut c, 4, Duration::from_secs(2)).await,
        b"abcd"
    );
    // The echo of "efgh" is downstream byte 5, which starts the stall.
    let sent = Instant::now();
    c.write_all(b"efgh").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(proxy.upstream_bytes(), 8);
    c.write_all(b"ijkl").await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(proxy.upstream_bytes(), 8, "bytes crossed during the stall");
    assert_eq!(
        read_exact_within(&mut c, 8, Duration::from_secs(2)).await,
        b"efghijkl"
    );
    assert!(sent.elapsed() >= stall - Duration::from_millis(150));
    assert_eq!(proxy.upstream_bytes(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_plan_sees_connection_index() {
    let (upstream, _events) = bulk_upstream(100_000).await;
    let proxy = DisruptiveProxy::start(upstream, |i| {
        if i == 0 {
            Disruption::ResetAfter(10)
        } else {
            Disruption::None
        }
    });
    let mut c = request(proxy.addr()).await;
    let (data, err) = read_to_end_or_error(&mut c, Duration::from_secs(5)).await;
    assert_eq!(
        (data.len(), err.map(|e| e.kind())),
        (10, Some(ErrorKind::ConnectionReset))
    );
    let mut c = request(proxy.addr()).await;
    let (data, err) = read_to_end_or_error(&mut c, Duration::from_secs(5)).await;
    assert_eq!((data.len(), err.is_none()), (100_000, true));
    assert_eq!(proxy.connections(), 2);
    assert_eq!(proxy.downstream_bytes(), 100_010);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_shutdown_closes_connections_and_listener() {
    let proxy = DisruptiveProxy::start(echo_upstream().await, |_| Disruption::None);
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    c.write_all(b"x").await.unwrap();
    read_exact_within(&mut c, 1, Duration::from_secs(2)).await;
    proxy.shutdown();
    let mut buf = [0u8; 16];
    let ended = timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .expect("shutdown did not close the client socket");
    assert!(matches!(ended, Ok(0) | Err(_)), "got {ended:?}");
    assert!(TcpStream::connect(proxy.addr()).await.is_err());
}

fn netns_names() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn listed(ns: &str) -> bool {
    netns_names()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(ns))
}

fn assert_silent(s: &mut std::net::TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("{what}: expected a read timeout, got {other:?}"),
    }
}

fn read_exactly(s: &mut std::net::TcpStream, n: usize, limit: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn netns_wifi_cut_is_silent_and_lte_still_works() {
    if !require_netns() {
        return;
    }
    let net = TwoPathNet::create("self").unwrap();
    let (srv, cli) = (net.srv_ns().to_string(), net.cli_ns().to_string());
    assert!(srv.len() <= 15 && cli.len() <= 15, "{srv} / {cli}");
    assert!(listed(&srv) && listed(&cli));

    let listener = tcp_listen_in(&srv, (Ipv4Addr::UNSPECIFIED, 0).into()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let wifi = SocketAddr::from((net.wifi_server_ip(), port));
    let lte = SocketAddr::from((net.lte_server_ip(), port));

    let mut c = tcp_connect_in(&cli, wifi, Duration::from_secs(2)).unwrap();
    let (mut s, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), net.wifi_client_ip());
    c.write_all(b"hello").unwrap();
    assert_eq!(read_exactly(&mut s, 5, Duration::from_secs(2)), b"hello");

    net.cut_wifi().unwrap();
    // Sends still "succeed" and nothing comes back in either direction: no
    // FIN, no RST, no error.
    c.write_all(b"lost?").unwrap();
    s.write_all(b"gone?").unwrap();
    assert_silent(&mut s, "server over cut wifi");
    assert_silent(&mut c, "client over cut wifi");
    // New connections over the cut path hang rather than fail fast.
    let err = tcp_connect_in(&cli, wifi, Duration::from_secs(1)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");

    let mut c2 = tcp_connect_in(&cli, lte, Duration::from_secs(2)).unwrap();
    let (mut s2, peer2) = listener.accept().unwrap();
    assert_eq!(peer2.ip(), net.lte_client_ip());
    c2.write_all(b"via lte").unwrap();
    assert_eq!(read_exactly(&mut s2, 7, Duration::from_secs(2)), b"via lte");
    s2.write_all(b"ok").unwrap();
    assert_eq!(read_exactly(&mut c2, 2, Duration::from_secs(2)), b"ok");

    // The stalled connection recovers on its next retransmission.
    net.restore_wifi().unwrap();
    assert_eq!(read_exactly(&mut s, 5, Duration::from_secs(20)), b"lost?");
    assert_eq!(read_exactly(&mut c, 5, Duration::from_secs(20)), b"gone?");

    drop(net);
    assert!(
        !listed(&srv) && !listed(&cli),
        "left behind: {}",
        netns_names()
    );
}

#[test]
fn netns_parallel_nets_are_independent() {
    if !require_netns() {
        return;
    }
    let a = TwoPathNet::create("para").unwrap();
    let b = TwoPathNet::create("para").unwrap();
    assert_ne!(a.srv_ns(), b.srv_ns());
    assert_ne!(a.wifi_server_ip(), b.wifi_server_ip());
    assert_ne!(a.lte_server_ip(), b.lte_server_ip());
    for net in [&a, &b] {
        let l = tcp_listen_in(net.srv_ns(), (net.lte_server_ip(), 0).into()).unwrap();
        let addr = l.local_addr().unwrap();
        let _c = tcp_connect_in(net.cli_ns(), addr, Duration::from_secs(2)).unwrap();
        l.accept().unwrap();
    }
    // A namespace only sees its own addresses.
    let foreign = SocketAddr::from((b.wifi_server_ip(), 9));
    let err = tcp_connect_in(a.cli_ns(), foreign, Duration::from_millis(500)).unwrap_err();
    assert_ne!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn netns_drop_cleans_up_after_a_panic() {
    if !require_netns() {
        return;
    }
    let names = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let net = TwoPathNet::create("boom").unwrap();
        *names.lock().unwrap() = Some((net.srv_ns().to_string(), net.cli_ns().to_string()));
        panic!("test failure while the net is alive");
    });
    assert!(result.is_err());
    let (srv, cli) = names.lock().unwrap().take().unwrap();
    assert!(
        !listed(&srv) && !listed(&cli),
        "left behind: {}",
        netns_names()
    );
}

#[test]
fn netns_runs_code_and_processes_inside_the_namespace() {
    if !require_netns() {
        return;
    }
    let net = TwoPathNet::create("exec").unwrap();

    // /proc/net is /proc/self/net, i.e. the main thread's namespace; only
    // thread-self reflects the namespace the closure runs in.
    let addrs = in_namespace(net.cli_ns(), || {
        std::fs::read_to_string("/proc/thread-self/net/fib_trie").unwrap_or_default()
    });
    assert!(addrs.contains(&net.wifi_client_ip().to_string()), "{addrs}");
    let caught = std::panic::catch_unwind(|| in_namespace(net.cli_ns(), || panic!("inner")));
    assert!(caught.is_err(), "panic inside in_namespace was swallowed");

    let key = "net.ipv4.tcp_retries2";
    let read_retries = || std::fs::read_to_string("/proc/sys/net/ipv4/tcp_retries2").unwrap();
    let root_before = read_retries();
    let wanted = if root_before.trim() == "7" { "6" } else { "7" };
    set_sysctl(net.cli_ns(), key, wanted).unwrap();
    assert_eq!(in_namespace(net.cli_ns(), read_retries).trim(), wanted);
    assert_eq!(
        read_retries(),
        root_before,
        "sysctl leaked into the root namespace"
    );

    let out = netns_command(net.srv_ns(), "ip")
        .args(["-4", "-br", "addr"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains(&net.lte_server_ip().to_string()), "{out}");

    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    let child = KillOnDrop(spawn_in_namespace(net.cli_ns(), sleep));
    let pid = child.id().to_string();
    // `ip netns exec` switches namespace before exec'ing, so poll briefly.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let out = Command::new("ip")
            .args(["netns", "identify", pid.as_str()])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).trim() == net.cli_ns() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "child {pid} never entered the namespace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
