//! Multipath TCP for tests: whether the kernel has it, client sockets, what the kernel says of a
//! connection (`MPTCP_INFO`), and a two-path namespace pair set up like a phone with wifi and
//! lte, the kernel's path manager told to add a subflow over lte.
#![allow(dead_code)]

use super::netns::{in_namespace, ip, set_sysctl, TwoPathNet};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether this kernel creates Multipath TCP sockets. Under `CI=true` a kernel without it
/// fails the test (CI must not skip silently); elsewhere the caller skips.
pub fn require_mptcp() -> bool {
    match socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::MPTCP),
    ) {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
                panic!("CI=true but this kernel has no Multipath TCP: {e}");
            }
            eprintln!("skipping: no Multipath TCP in this kernel: {e}");
            false
        }
    }
}

/// A blocking Multipath TCP connection to `addr`, with receive buffer `rcvbuf` if given.
pub fn mptcp_connect(addr: SocketAddr, rcvbuf: Option<usize>) -> io::Result<TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::MPTCP),
    )?;
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

/// A Multipath TCP connection made from inside `ns`.
pub fn mptcp_connect_in(ns: &str, addr: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    in_namespace(ns, || mptcp_connect(addr, rcvbuf)).expect("MPTCP connect")
}

/// roam's listener (Multipath TCP, as `roam serve` binds it by default), bound inside `ns`.
pub fn roam_listener_in(ns: &str, addr: SocketAddr) -> TcpListener {
    let (listener, protocol) =
        in_namespace(ns, || roam::server::bind_std(addr, 128, false, true)).expect("bind");
    assert!(
        matches!(protocol, roam::server::ListenProtocol::Mptcp),
        "roam's listener must be Multipath TCP here: {protocol:?}"
    );
    listener
}

/// What the kernel says of a client's Multipath TCP connection: `None` once it is not (or
/// no longer) one, i.e. it fell back to TCP.
#[derive(Clone, Copy, Debug)]
pub struct MptcpState {
    /// Subflows besides the first.
    pub extra_subflows: u8,
}

pub fn mptcp_state(s: &TcpStream) -> Option<MptcpState> {
    // struct mptcp_info begins with u8 subflows (include/uapi/linux/mptcp.h).
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is a live writable buffer of `len` bytes; the kernel writes at most `len`
    // bytes and stores the count in `len`. SOL_MPTCP = 284, MPTCP_INFO = 1.
    let rc = unsafe { libc::getsockopt(s.as_raw_fd(), 284, 1, info.as_mut_ptr().cast(), &mut len) };
    (rc == 0).then(|| MptcpState {
        extra_subflows: info[0],
    })
}

/// Bytes received and not yet read (`FIONREAD`; for Multipath TCP, at the connection level).
pub fn unread(s: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    assert_eq!(rc, 0, "FIONREAD: {}", io::Error::last_os_error());
    usize::try_from(n).unwrap()
}

/// Waits (at most 10 s) until the client connection has an extra subflow.
pub fn wait_for_second_subflow(s: &TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match mptcp_state(s) {
            Some(st) if st.extra_subflows >= 1 => return,
            Some(_) => {}
            None => panic!("the connection fell back to TCP: the server did not speak MPTCP"),
        }
        assert!(
            Instant::now() < deadline,
            "no second subflow within 10 s (path manager endpoint or limits not applied?)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A phone and a server: the client reaches the server's wifi address over wifi; the kernel
/// path manager in the client adds a subflow from its lte address, routed over lte to the same
/// server address. `rate` limits what the server sends on each path (`tc tbf`), so a download
/// lasts long enough to lose a path in the middle.
pub struct PhoneNet {
    pub net: TwoPathNet,
}

impl PhoneNet {
    pub fn create(tag: &str, rate: Option<&str>) -> PhoneNet {
        let net = TwoPathNet::create(tag).expect("create namespaces");
        let (srv, cli) = (net.srv_ns().to_owned(), net.cli_ns().to_owned());
        for ns in [&srv, &cli] {
            set_sysctl(ns, "net.mptcp.enabled", "1").expect("enable MPTCP");
            ip([
                "-n",
                ns,
                "mptcp",
                "limits",
                "set",
                "subflow",
                "2",
                "add_addr_accepted",
                "2",
            ])
            .expect("MPTCP limits");
        }
        let lte_cli = net.lte_client_ip().to_string();
        let wifi_srv = format!("{}/32", net.wifi_server_ip());
        let lte_srv = net.lte_server_ip().to_string();
        // Traffic from the lte address goes out over lte, to the server's wifi address too.
        ip(["-n", &cli, "rule", "add", "from", &lte_cli, "table", "102"]).expect("rule");
        ip([
            "-n", &cli, "route", "add", &wifi_srv, "via", &lte_srv, "dev", "lte", "table", "102",
        ])
        .expect("route");
        // The server is reached over wifi while wifi is up; new connections once it is gone
        // go over lte (a phone reaches its server over whichever network it has). Both are
        // host routes, so the longest match does not prefer lte over the wifi subnet.
        ip([
            "-n", &cli, "route", "add", &wifi_srv, "dev", "wifi", "metric", "10",
        ])
        .expect("route over wifi");
        ip([
            "-n", &cli, "route", "add", &wifi_srv, "via", &lte_srv, "dev", "lte", "metric", "100",
        ])
        .expect("fallback route over lte");
        ip([
            "-n", &cli, "mptcp", "endpoint", "add", &lte_cli, "dev", "lte", "subflow",
        ])
        .expect("MPTCP endpoint");
        if let Some(rate) = rate {
            for dev in ["wifi", "lte"] {
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", &srv, "tc", "qdisc", "add", "dev", dev, "root",
                    ])
                    .args(["tbf", "rate", rate, "burst", "32kb", "latency", "100ms"])
                    .output()
                    .expect("run tc");
                assert!(
                    out.status.success(),
                    "tc tbf on {dev}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        PhoneNet { net }
    }

    /// The local addresses of the client's TCP subflows (and plain TCP connections) to
    /// `port`, from `ss`.
    pub fn client_subflow_sources(&self, port: u16) -> Vec<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.net.cli_ns(),
                "ss",
                "-tnH",
                "state",
                "established",
            ])
            .output()
            .expect("run ss");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                // Recv-Q Send-Q Local:Port Peer:Port
                let (local, peer) = (cols.get(2)?, cols.get(3)?);
                peer.ends_with(&format!(":{port}"))
                    // "10.0.0.2%lte" when the subflow is bound to its device.
                    .then(|| {
                        local
                            .rsplit_once(':')
                            .map(|(a, _)| a.split('%').next().unwrap_or(a).to_owned())
                    })
                    .flatten()
            })
            .collect()
    }

    /// Waits (at most 10 s) until the client has a subflow to `port` from both its wifi and
    /// its lte address.
    pub fn wait_for_both_paths(&self, port: u16) {
        let (wifi, lte) = (
            self.net.wifi_client_ip().to_string(),
            self.net.lte_client_ip().to_string(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sources = self.client_subflow_sources(port);
            if sources.contains(&wifi) && sources.contains(&lte) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no subflows from both wifi {wifi} and lte {lte} within 10 s: {sources:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The phone loses wifi: its wifi interface goes down.
    pub fn wifi_down(&self) {
        ip(["-n", self.net.cli_ns(), "link", "set", "wifi", "down"]).expect("wifi down");
    }
}
