//! Multipath TCP, black-box: a phone (a client namespace with "wifi" and "lte" links, the kernel
//! path manager adding a subflow over lte) loses wifi in the middle of a download and the same
//! connection finishes over lte, byte-exact, with the stall at the switch measured; `roam get`
//! does it with zero reconnects; the offset a takeover starts from counts what the client
//! acknowledged on every path (the data level), not what the first subflow carried; plain TCP
//! clients on the same port are served as before; `--mptcp off` accepts TCP only.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::check::wait_until_stalled;
use support::check::{assert_bytes_eq, connect_small_rcvbuf, resumed_start, session_key};
use support::mptcp::{
    mptcp_connect, mptcp_connect_in, mptcp_state, require_mptcp, roam_listener_in, unread,
    wait_for_second_subflow, PhoneNet,
};
use support::netns::{netns_command, require_netns, tcp_connect_in, KillOnDrop};
use support::server::{get, pattern, read_response, Root, TestServer};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

fn any_port() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
}

/// Reads `s` until `have` holds `want` bytes, calling `at(have.len())` after each read, and
/// returns the longest wait for one read after `since_len` bytes.
fn read_to(
    s: &mut TcpStream,
    have: &mut Vec<u8>,
    want: usize,
    mut at: impl FnMut(usize),
) -> Duration {
    let mut buf = vec![0u8; 64 * KIB];
    let mut longest = Duration::ZERO;
    let mut last = Instant::now();
    while have.len() < want {
        let room = (want - have.len()).min(buf.len());
        match s.read(&mut buf[..room]) {
            Ok(0) => panic!("the connection closed after {} bytes", have.len()),
            Ok(n) => {
                longest = longest.max(last.elapsed());
                last = Instant::now();
                have.extend_from_slice(&buf[..n]);
                at(have.len());
            }
            Err(e) => panic!("read failed after {} bytes: {e}", have.len()),
        }
    }
    longest
}

/// The phone loses wifi a quarter into a 24 MiB download (each path limited to 100 Mbit/s, so
/// the download takes about two seconds): the same connection delivers the rest over lte, and
/// the file is exact.
#[test]
fn a_download_keeps_its_connection_when_the_phone_loses_wifi() {
    if !require_netns() || !require_mptcp() {
        return;
    }
    let phone = PhoneNet::create("mpdl", Some("100mbit"));
    let net = &phone.net;
    let root = Root::new();
    let data = pattern(24 * MIB, 7);
    root.file("big.bin", &data);
    let listener = roam_listener_in(net.srv_ns(), any_port());
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start_on(listener, root.path(), |_| {});
    let wifi = SocketAddr::new(net.wifi_server_ip().into(), port);

    let mut s = mptcp_connect_in(net.cli_ns(), wifi, None);
    // The path manager adds subflows once the connection is fully established (data has
    // gone both ways).
    s.write_all(get("/").as_bytes()).unwrap();
    let id = String::from_utf8(read_response(&mut s, false).body).unwrap();
    wait_for_second_subflow(&s);
    phone.wait_for_both_paths(port);
    s.write_all(get(&format!("/{id}/big.bin")).as_bytes())
        .unwrap();
    let head = read_response(&mut s, true);
    assert_eq!(head.status, 200);

    let mut have = Vec::with_capacity(data.len());
    let before = read_to(&mut s, &mut have, data.len() / 4, |_| {});
    phone.wifi_down();
    let cut_at = have.len();
    let cut = Instant::now();
    let after = read_to(&mut s, &mut have, data.len(), |_| {});
    let rest_took = cut.elapsed();
    assert!(
        mptcp_state(&s).is_some(),
        "the connection is still Multipath TCP (it did not fall back)"
    );
    println!(
        "mptcp: wifi lost at {cut_at} bytes; the same connection delivered the remaining {} \
         bytes over lte in {rest_took:?}; longest wait for a read: {after:?} after the cut, \
         {before:?} before it",
        data.len() - cut_at
    );
    assert_bytes_eq(&have, &data, "the body over one connection and two paths");
    drop(server);
}

/// With the connection moved to lte, the client stops reading; another connection for the
/// same session takes over. It must start exactly after the bytes the first connection's
/// client received (read, plus what waits in its socket): the data-level acknowledgements.
/// Counting the first subflow's `TCP_INFO` would start where wifi died, megabytes earlier.
#[test]
fn after_a_path_switch_the_offset_counts_every_path() {
    if !require_netns() || !require_mptcp() {
        return;
    }
    let phone = PhoneNet::create("mpack", None);
    let net = &phone.net;
    let root = Root::new();
    let data = pattern(32 * MIB, 8);
    root.file("big.bin", &data);
    let listener = roam_listener_in(net.srv_ns(), any_port());
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start_on(listener, root.path(), |_| {});
    let wifi = SocketAddr::new(net.wifi_server_ip().into(), port);
    let lte = SocketAddr::new(net.lte_server_ip().into(), port);

    let mut a = mptcp_connect_in(net.cli_ns(), wifi, Some(256 * KIB));
    a.write_all(get("/").as_bytes()).unwrap();
    let id = String::from_utf8(read_response(&mut a, false).body).unwrap();
    let target = format!("/{id}/big.bin");
    let key = session_key(&server.service, &id, "big.bin");
    wait_for_second_subflow(&a);
    phone.wait_for_both_paths(port);
    a.write_all(get(&target).as_bytes()).unwrap();
    assert_eq!(read_response(&mut a, true).status, 200);
    let mut a_body = Vec::new();
    read_to(&mut a, &mut a_body, 2 * MIB, |_| {});
    phone.wifi_down();
    read_to(&mut a, &mut a_body, 8 * MIB, |_| {});
    let stalled = wait_until_stalled(&server.service, &key);
    let queued = unread(&a);
    let received = (a_body.len() + queued) as u64;

    let mut b = tcp_connect_in(net.cli_ns(), lte, Duration::from_secs(5)).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    b.write_all(get(&target).as_bytes()).unwrap();
    let rb = read_response(&mut b, false);
    let start = resumed_start(&rb, data.len() as u64);
    println!(
        "mptcp takeover after a path switch: A read {} bytes and held {queued} more, the \
         server recorded {stalled} while A was stalled, B starts at {start}",
        a_body.len()
    );
    assert_eq!(
        start, received,
        "B must start exactly after what A's client received over both paths \
         (<: repeat, >: gap)"
    );
    assert_bytes_eq(&a_body, &data[..a_body.len()], "A's body");
    assert_bytes_eq(&rb.body, &data[start as usize..], "B's body");
}

/// `roam get` over Multipath TCP through the same wifi loss: the file is exact and it never
/// reconnected.
#[test]
fn roam_get_rides_through_the_switch_without_reconnecting() {
    if !require_netns() || !require_mptcp() {
        return;
    }
    let phone = PhoneNet::create("mpget", Some("100mbit"));
    let net = &phone.net;
    let root = Root::new();
    let data = pattern(24 * MIB, 9);
    root.file("big.bin", &data);
    let listener = roam_listener_in(net.srv_ns(), any_port());
    let port = listener.local_addr().unwrap().port();
    let _server = TestServer::start_on(listener, root.path(), |_| {});
    let url = format!("http://{}:{port}/big.bin", net.wifi_server_ip());
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("big.bin");
    let part = work.path().join("big.bin.part");

    let mut cmd = netns_command(net.cli_ns(), env!("CARGO_BIN_EXE_roam"));
    cmd.args(["get", "--mptcp", "on", "--stall-timeout", "30s", &url, "-o"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = KillOnDrop(cmd.spawn().expect("spawn roam get"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < (data.len() / 4) as u64 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "roam get ended before the cut"
        );
        assert!(Instant::now() < deadline, "roam get made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The download runs over both paths (so losing wifi is felt), on one connection.
    phone.wait_for_both_paths(port);
    phone.wifi_down();
    let status = wait_exit(&mut child.0, Duration::from_secs(60));
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    println!("roam get --mptcp on through the switch: {stderr}");
    assert!(status.success(), "roam get failed: {stderr}");
    assert!(
        stderr.contains(" 0 reconnects"),
        "the connection must survive the switch: {stderr}"
    );
    assert!(
        !stderr.contains("not verified"),
        "the digest check (a new connection, over lte) must work: {stderr}"
    );
    assert_bytes_eq(&std::fs::read(&out).unwrap(), &data, "roam get's file");
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// On one port (roam's default Multipath TCP listener): a plain TCP client and an MPTCP client
/// both download exactly; each is accounted by its own transport, so a takeover of either
/// starts exactly after what its client received.
#[test]
fn tcp_and_mptcp_clients_share_the_port_and_both_resume_exactly() {
    if !require_mptcp() {
        return;
    }
    let root = Root::new();
    let data = pattern(16 * MIB, 10);
    root.file("big.bin", &data);
    let (listener, protocol) =
        roam::server::bind_std("127.0.0.1:0".parse().unwrap(), 128, false, true).unwrap();
    assert!(matches!(protocol, roam::server::ListenProtocol::Mptcp));
    let server = TestServer::start_on(listener, root.path(), |_| {});

    for mptcp in [false, true] {
        let what = if mptcp { "MPTCP" } else { "TCP" };
        let mut m = TcpStream::connect(server.addr).unwrap();
        m.write_all(get("/").as_bytes()).unwrap();
        let id = String::from_utf8(read_response(&mut m, false).body).unwrap();
        let target = format!("/{id}/big.bin");
        let key = session_key(&server.service, &id, "big.bin");

        let mut a = if mptcp {
            mptcp_connect(server.addr, Some(256 * KIB)).unwrap()
        } else {
            connect_small_rcvbuf(server.addr, 256 * KIB)
        };
        assert_eq!(
            mptcp_state(&a).is_some(),
            mptcp,
            "{what} client: the connection's transport"
        );
        a.write_all(get(&target).as_bytes()).unwrap();
        assert_eq!(read_response(&mut a, true).status, 200);
        let mut a_body = Vec::new();
        read_to(&mut a, &mut a_body, MIB, |_| {});
        wait_until_stalled(&server.service, &key);
        let received = (a_body.len() + unread(&a)) as u64;

        let mut b = TcpStream::connect(server.addr).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        b.write_all(get(&target).as_bytes()).unwrap();
        let rb = read_response(&mut b, false);
        let start = resumed_start(&rb, data.len() as u64);
        assert_eq!(
            start, received,
            "{what} client: B starts after what A received"
        );
        assert_bytes_eq(&rb.body, &data[start as usize..], "B's body");

        // And a whole download over this transport, start to end.
        let mut c = if mptcp {
            mptcp_connect(server.addr, None).unwrap()
        } else {
            TcpStream::connect(server.addr).unwrap()
        };
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(get("/").as_bytes()).unwrap();
        let id = String::from_utf8(read_response(&mut c, false).body).unwrap();
        c.write_all(get(&format!("/{id}/big.bin")).as_bytes())
            .unwrap();
        let rc = read_response(&mut c, false);
        assert_eq!(rc.status, 200);
        assert_bytes_eq(&rc.body, &data, &format!("{what} client's download"));
    }
}

/// `roam serve` accepts Multipath TCP by default, and only TCP with `--mptcp off` (an MPTCP
/// client then falls back); both serve the file.
#[test]
fn the_mptcp_switch_decides_what_the_listener_accepts() {
    if !require_mptcp() {
        return;
    }
    let root = Root::new();
    root.file("a.txt", b"hello over either transport");
    let state = tempfile::tempdir().unwrap();
    for (flag, expect_mptcp) in [("on", true), ("off", false)] {
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_roam"))
                .args(["serve", "--store", "memory", "--listen", "127.0.0.1:0"])
                .arg("--root")
                .arg(root.path())
                .arg("--state-dir")
                .arg(state.path())
                .args(["--mptcp", flag])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start roam"),
        );
        let mut line = String::new();
        BufReader::new(child.0.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("roam listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let mut s = mptcp_connect(addr, None).unwrap();
        assert_eq!(
            mptcp_state(&s).is_some(),
            expect_mptcp,
            "--mptcp {flag}: an MPTCP client's connection"
        );
        s.write_all(get("/").as_bytes()).unwrap();
        let id = String::from_utf8(read_response(&mut s, false).body).unwrap();
        s.write_all(get(&format!("/{id}/a.txt")).as_bytes())
            .unwrap();
        let r = read_response(&mut s, false);
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello over either transport");
    }
}
