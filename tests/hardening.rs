//! Hardening (issue 7): hostile input, abuse and faults, proven over real TCP.
//!
//! Most tests drive the in-process server (`tests/support/server.rs`). Tests that measure the
//! server itself (resident memory, CPU time, descriptors, its log, a descriptor limit or
//! another user) run the `roam` binary as a child process and read `/proc/PID`. The bounds
//! asserted here are the ones docs/SECURITY.md states.
//!
//! Timeouts are real (the server runs on its own runtime), configured small, and never asserted
//! as durations: a hang fails through a client read timeout.

mod support;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use roam::http::target::{Route, TargetError};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::server::*;

const MIB: usize = 1024 * 1024;
const ST_200: &str = "HTTP/1.1 200 OK";
const ST_400: &str = "HTTP/1.1 400 Bad Request";
const ST_404: &str = "HTTP/1.1 404 Not Found";
const ST_408: &str = "HTTP/1.1 408 Request Timeout";
const ST_429: &str = "HTTP/1.1 429 Too Many Requests";

// ---------------------------------------------------------------------------------------------
// Raw HTTP helpers.
// ---------------------------------------------------------------------------------------------

/// How a peer's byte stream ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Orderly close (FIN).
    Eof,
    /// Connection reset (the server aborted with an RST).
    Reset,
    /// Nothing more arrived within the read timeout: the connection is still open.
    TimedOut,
}

/// Reads until the stream ends; returns the bytes and how it ended.
fn drain(s: &mut TcpStream) -> (Vec<u8>, Ending) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, Ending::Eof),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (out, Ending::TimedOut)
            }
            Err(_) => return (out, Ending::Reset),
        }
    }
}

/// Sends raw bytes on a fresh connection and reads until the server ends the stream.
fn exchange_raw(addr: SocketAddr, raw: &[u8]) -> (Vec<u8>, Ending) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    drain(&mut s)
}

/// How a table test reaches the server: plain TCP, or TLS trusting the test's CA (the same
/// hostile bytes, as plaintext inside records).
#[derive(Clone)]
enum Over {
    Plain,
    Tls(Arc<rustls::ClientConfig>),
}

/// [`exchange_raw`] over `over`.
fn exchange_over(over: &Over, addr: SocketAddr, raw: &[u8]) -> (Vec<u8>, Ending) {
    let Over::Tls(config) = over else {
        return exchange_raw(addr, raw);
    };
    let mut s = support::tls::tls_connect(addr, config);
    s.sock
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    s.write_all(raw).unwrap();
    let (out, end) = support::tls::drain_tls(&mut s);
    let end = match end {
        support::tls::TlsEnd::Closed => Ending::Eof,
        support::tls::TlsEnd::Reset => Ending::Reset,
        support::tls::TlsEnd::TimedOut => Ending::TimedOut,
    };
    (out, end)
}

/// A server for `root`, speaking TLS when `over` does; and a request helper that goes the
/// same way.
fn server_over(over: &Over, pki: &support::tls::TestPki, root: &Path) -> TestServer {
    match over {
        Over::Plain => TestServer::start(root),
        Over::Tls(_) => {
            let files = pki.files();
            TestServer::start_with(root, move |cfg| cfg.tls = Some(files))
        }
    }
}

/// Both ways in.
fn transports(pki: &support::tls::TestPki) -> [Over; 2] {
    [Over::Plain, Over::Tls(pki.client_config())]
}

/// `GET /` over `over`: a fresh ID.
fn mint_over(over: &Over, addr: SocketAddr) -> String {
    let (resp, _) = exchange_over(
        over,
        addr,
        b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&resp).into_owned();
    assert!(text.starts_with(ST_200), "{text}");
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
}

/// The status line of a raw response (empty if there is none).
fn status_line(raw: &[u8]) -> String {
    let end = raw
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// The status code of a raw response (0 if there is none).
fn status_code(raw: &[u8]) -> u16 {
    status_line(raw)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Reads one response head byte by byte (nothing past it is consumed); returns it as text.
fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read response head");
        assert_eq!(
            n,
            1,
            "closed in the response head after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("ASCII head")
}

/// The value of a field in a head read by [`read_head`].
fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn content_length(head: &str) -> usize {
    field(head, "Content-Length")
        .expect("Content-Length")
        .parse()
        .unwrap()
}

fn read_exactly(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read body bytes");
    buf
}

/// A connection from a given loopback source address (the mint limit is per address).
fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&from.into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// A connection whose receive buffer is fixed small (no autotuning): a client that stops
/// reading stalls the server's writes after a few kilobytes.
fn connect_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.connect(&addr.into()).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// True when some bytes are waiting to be read on `s` right now.
fn has_data(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let ready = matches!(s.peek(&mut b), Ok(n) if n > 0);
    s.set_nonblocking(false).unwrap();
    ready
}

/// Polls `cond` every 20 ms until it holds; fails with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// The `roam` binary as a child process, observed through /proc.
// ---------------------------------------------------------------------------------------------

/// A `roam serve` process. Killed (by its own pid) when dropped.
struct Binary {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    /// Kept open: the server must never meet a closed stdout.
    _stdout: BufReader<ChildStdout>,
    _logs: tempfile::TempDir,
}

impl Binary {
    fn start(root: &Path, args: &[&str]) -> Binary {
        Self::start_under(&[], root, args)
    }

    /// Runs the binary under `wrapper` (a command that execs its arguments: `prlimit …`,
    /// `setpriv …`), so the pid is the server's.
    fn start_under(wrapper: &[&str], root: &Path, args: &[&str]) -> Binary {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("stderr.log");
        let bin = env!("CARGO_BIN_EXE_roam");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("serve")
            .arg("--root")
            .arg(root)
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(logs.path().join("state"));
        if wrapper.contains(&"setpriv") {
            // Another user cannot use a state directory inside this test's (root's) temporary
            // folder; these tests are about the served files, not the sessions' store.
            cmd.args(["--store", "memory"]);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().expect("start roam");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Some(addr) = line.trim().strip_prefix("roam listening on http://") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "roam did not start: {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Binary {
            addr: addr.parse().unwrap(),
            child,
            log,
            _stdout: stdout,
            _logs: logs,
        }
    }

    fn proc_path(&self, leaf: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{leaf}", self.child.id()))
    }

    /// Resident set size in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(self.proc_path("status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// User plus system CPU time used so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(self.proc_path("stat")).unwrap();
        // The command name may contain spaces: fields are counted after its closing ')'. The
        // first field after it is field 3 (state); utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / clock_ticks_per_second()
    }

    /// TCP connections the server has accepted and still holds: its socket descriptors that
    /// are established on its listening port (connections waiting in the backlog have no
    /// descriptor yet).
    fn connections(&self) -> usize {
        let inodes: std::collections::HashSet<String> = std::fs::read_dir(self.proc_path("fd"))
            .map(|dir| {
                dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter_map(|l| {
                        let l = l.to_string_lossy().into_owned();
                        Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let port = format!(":{:04X}", self.addr.port());
        let tcp = std::fs::read_to_string(self.proc_path("net/tcp")).unwrap_or_default();
        tcp.lines()
            .skip(1)
            .filter(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // local_address, state (0A is LISTEN), inode.
                f.len() > 9 && f[1].ends_with(&port) && f[3] != "0A" && inodes.contains(f[9])
            })
            .count()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_lines(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "roam exited; its log:\n{}",
            self.log()
        );
    }

    fn mint(&self) -> String {
        let r = request(self.addr, &get("/"));
        assert_eq!(r.status, 200, "mint failed: {r:?}");
        String::from_utf8(r.body).unwrap()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        == Some("0")
}

// ---------------------------------------------------------------------------------------------
// Path escape: a hostile tree, a corpus of raw targets, and a property over the opener.
// ---------------------------------------------------------------------------------------------

/// In a file outside the root: must never be served.
const OUTSIDE_TOKEN: &str = "OUTSIDE-7f3e9a41-never-served";
/// In dotfiles and Windows device names inside the root: refused by default.
const HIDDEN_TOKEN: &str = "HIDDEN-2b8c55d0-never-served";

/// `base/root` is served; `base/token.txt` and `base/outside/token.txt` hold the outside token
/// and are reachable from the root only through `..` or symlinks.
struct HostileTree {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
}

impl HostileTree {
    fn new() -> HostileTree {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let root = base.join("root");
        let outside = base.join("outside");
        for d in [root.join("sub"), root.join(".git"), outside.clone()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(outside.join("token.txt"), OUTSIDE_TOKEN).unwrap();
        std::fs::write(base.join("token.txt"), OUTSIDE_TOKEN).unwrap();
        std::fs::write(root.join("ok.txt"), "served").unwrap();
        std::fs::write(root.join("sub/in.txt"), "inside").unwrap();
        // A file literally named `%2e%2e`: what `%252e%252e` means when decoded exactly once.
        std::fs::write(root.join("%2e%2e"), "literal name").unwrap();
        for hidden in [
            ".env",
            ".htpasswd",
            ".git/config",
            ".git/HEAD",
            "CON",
            "NUL",
            "aux.log",
            "com1.txt",
            "lpt9",
        ] {
            std::fs::write(root.join(hidden), HIDDEN_TOKEN).unwrap();
        }
        let link = |to: &Path, at: &str| std::os::unix::fs::symlink(to, root.join(at)).unwrap();
        link(&outside.join("token.txt"), "secret-link");
        link(Path::new("../outside/token.txt"), "rel-link");
        link(Path::new(".."), "parent");
        link(&base, "parent-abs");
        link(Path::new("../.."), "sub/up");
        link(Path::new("/dev/zero"), "zero");
        link(Path::new("/etc/passwd"), "passwd");
        link(Path::new("sub/in.txt"), "inner-link");
        let fifo = Command::new("mkfifo")
            .arg(root.join("fifo"))
            .status()
            .unwrap();
        assert!(fifo.success(), "mkfifo");
        HostileTree {
            _dir: dir,
            base,
            root,
        }
    }
}

/// Hostile request targets (`{id}` is replaced by a valid client ID) and the exact status each
/// must get. Everything that could leave the root, or names a dotfile or a device, is the same
/// 404 as a missing file; targets that are not origin- or absolute-form are 400.
const TRAVERSAL_CORPUS: &[(&str, u16)] = &[
    // `..` raw and in every encoding.
    ("/{id}/../token.txt", 404),
    ("/{id}/../outside/token.txt", 404),
    ("/{id}/sub/../../outside/token.txt", 404),
    ("/{id}/%2e%2e/outside/token.txt", 404),
    ("/{id}/%2E%2E%2Foutside%2Ftoken.txt", 404),
    ("/{id}/..%2foutside%2ftoken.txt", 404),
    ("/{id}/..%2F..%2F..%2F..%2Fetc%2Fpasswd", 404),
    ("/{id}/.%2e/outside/token.txt", 404),
    ("/{id}/%2e./token.txt", 404),
    // Double encoding is decoded once: `%252e%252e` is the literal name `%2e%2e`.
    ("/{id}/%252e%252e/outside/token.txt", 404),
    ("/{id}/%252e%252e%252ftoken.txt", 404),
    ("/{id}/%252e%252e", 200),
    // Overlong and look-alike UTF-8.
    ("/{id}/%c0%ae%c0%ae/outside/token.txt", 404),
    ("/{id}/%c0%ae%c0%ae%c0%aftoken.txt", 404),
    ("/{id}/%e0%80%ae%e0%80%ae/token.txt", 404),
    ("/{id}/%ef%bc%8e%ef%bc%8e%ef%bc%8ftoken.txt", 404),
    ("/{id}/%u002e%u002e/token.txt", 404),
    // Backslashes raw and encoded, drive prefixes, NTFS streams.
    ("/{id}/..\\token.txt", 404),
    ("/{id}/sub\\..\\..\\outside\\token.txt", 404),
    ("/{id}/..%5ctoken.txt", 404),
    ("/{id}/%5c..%5c..%5coutside%5ctoken.txt", 404),
    ("/{id}/c:/outside/token.txt", 404),
    ("/{id}/C:%5c..%5ctoken.txt", 404),
    ("/{id}/c%3a%2f..%2ftoken.txt", 404),
    ("/{id}/ok.txt::$DATA", 404),
    // Absolute after decoding.
    ("/{id}//etc/passwd", 404),
    ("/{id}/%2fetc%2fpasswd", 404),
    ("//etc/passwd", 404),
    // NUL raw (a malformed request line) and encoded.
    ("/{id}/ok.txt\0.png", 400),
    ("/{id}/ok.txt%00.png", 404),
    ("/{id}/ok.txt%00", 404),
    ("/{id}/%00/../token.txt", 404),
    // Lone dot segments.
    ("/{id}/./ok.txt", 404),
    ("/{id}/%2e/ok.txt", 404),
    ("/{id}/sub/./in.txt", 404),
    ("/{id}/ok.txt/.", 404),
    // Not origin-form.
    ("{id}/ok.txt", 400),
    ("../token.txt", 400),
    ("*", 400),
    ("file:///etc/passwd", 400),
    // Absolute-form: the path is checked like any other.
    ("http://evil/{id}/../token.txt", 404),
    ("http://evil/{id}/%2e%2e/outside/token.txt", 404),
    ("HTTPS://evil:443/{id}/..%2ftoken.txt", 404),
    ("http://evil/../../token.txt", 404),
    // Traversal inside the ID segment.
    ("/../outside/token.txt", 404),
    ("/..%2f..%2foutside/token.txt", 404),
    ("/%2e%2e/token.txt", 404),
    ("/{id}%2f..%2f..%2ftoken.txt", 404),
    // Oddities other servers have tripped on.
    ("/{id}/..;/token.txt", 404),
    ("/{id}/ok.txt#/../../token.txt", 404),
    ("/{id}/%0d%0aSet-Cookie:%20a=b", 404),
    ("/{id}/ok.txt?/../../token.txt", 200),
    // Windows device names (files with these names exist under the root).
    ("/{id}/CON", 404),
    ("/{id}/NUL", 404),
    ("/{id}/aux.log", 404),
    ("/{id}/com1.txt", 404),
    ("/{id}/lpt9", 404),
    ("/{id}/con%2etxt", 404),
    ("/{id}/CON%20", 404),
    // Dotfiles and the .git folder.
    ("/{id}/.env", 404),
    ("/{id}/%2eenv", 404),
    ("/{id}/.git/config", 404),
    ("/{id}/.git%2fconfig", 404),
    ("/{id}/%2egit/HEAD", 404),
    ("/{id}/sub/%2e%2e/.htpasswd", 404),
    // Symlinks that lead outside, to the parent, to devices; a FIFO; a directory.
    ("/{id}/secret-link", 404),
    ("/{id}/rel-link", 404),
    ("/{id}/parent/token.txt", 404),
    ("/{id}/parent/outside/token.txt", 404),
    ("/{id}/parent/root/ok.txt", 404),
    ("/{id}/parent-abs/token.txt", 404),
    ("/{id}/sub/up/outside/token.txt", 404),
    ("/{id}/zero", 404),
    ("/{id}/passwd", 404),
    ("/{id}/fifo", 404),
    ("/{id}/sub", 404),
];

/// Checks one raw answer to a hostile target: the expected status, never a 5xx, and nothing
/// from outside the root or about it.
fn assert_no_leak(target: &str, raw: &[u8], tree: &HostileTree, hidden_allowed: bool) {
    let text = String::from_utf8_lossy(raw);
    let shown: String = target.chars().take(80).collect();
    let status = status_code(raw);
    assert!(
        (200..500).contains(&status),
        "{shown:?}: status {status} in {text:?}"
    );
    assert!(
        !text.contains(OUTSIDE_TOKEN),
        "{shown:?}: leaked a file outside the root"
    );
    assert!(
        hidden_allowed || !text.contains(HIDDEN_TOKEN),
        "{shown:?}: served a dotfile or device name"
    );
    assert!(
        !text.contains("root:x:0:0"),
        "{shown:?}: served /etc/passwd"
    );
    assert!(
        !text.contains(&*tree.base.to_string_lossy()),
        "{shown:?}: revealed a server path"
    );
    assert!(
        !text.to_ascii_lowercase().contains("set-cookie"),
        "{shown:?}: header injection"
    );
}

/// The corpus against the server: exact statuses, no leak, no 5xx, and normal service after.
/// Ten thousand `../` overflow the 8 KiB request line: 414, still no leak.
#[test]
fn traversal_corpus_never_leaks_never_fails_and_the_server_keeps_serving() {
    let tree = HostileTree::new();
    let pki = support::tls::TestPki::new(&[]);
    for over in transports(&pki) {
        let srv = server_over(&over, &pki, &tree.root);
        let id = mint_over(&over, srv.addr);
        let mut corpus: Vec<(String, u16)> = TRAVERSAL_CORPUS
            .iter()
            .map(|(t, s)| (t.replace("{id}", &id), *s))
            .collect();
        corpus.push((format!("/{id}/{}token.txt", "../".repeat(10_000)), 414));
        corpus.push((format!("/{id}/{}token.txt", "%2e%2e%2f".repeat(800)), 404));
        assert!(corpus.len() >= 35);
        for (target, expected) in &corpus {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
            let (resp, ending) = exchange_over(&over, srv.addr, raw.as_bytes());
            let shown: String = target.chars().take(80).collect();
            assert_eq!(ending, Ending::Eof, "{shown:?}: not closed cleanly");
            assert_eq!(
                status_code(&resp),
                *expected,
                "{shown:?}: {:?}",
                String::from_utf8_lossy(&resp)
            );
            assert_no_leak(target, &resp, &tree, false);
        }
    }
    let srv = TestServer::start(&tree.root);
    // The two legitimate ones are the right files. (Fresh IDs: a client that has the whole
    // file gets 416 when it asks again without Range.)
    let fetch = |srv: &TestServer, path: &str| {
        let r = request(srv.addr, &get(&format!("/{}/{path}", srv.mint())));
        (r.status, String::from_utf8_lossy(&r.body).into_owned())
    };
    assert_eq!(fetch(&srv, "%252e%252e"), (200, "literal name".into()));
    assert_eq!(
        fetch(&srv, "ok.txt?/../../token.txt"),
        (200, "served".into())
    );
    // Normal service afterwards, including a symlink that stays inside.
    assert_eq!(fetch(&srv, "ok.txt"), (200, "served".into()));
    assert_eq!(fetch(&srv, "inner-link"), (200, "inside".into()));
    assert_eq!(request(srv.addr, &get("/")).status, 200);

    // With dotfiles allowed, dotfiles are served (that is what the flag is for), but nothing
    // outside the root ever is.
    let open = TestServer::start_with(&tree.root, |cfg| cfg.allow_dotfiles = true);
    let id = open.mint();
    for (template, _) in TRAVERSAL_CORPUS {
        let target = template.replace("{id}", &id);
        let raw = format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        let (resp, _) = exchange_raw(open.addr, raw.as_bytes());
        assert_no_leak(&target, &resp, &tree, true);
    }
    assert_eq!(fetch(&open, ".env"), (200, HIDDEN_TOKEN.into()));
    assert_eq!(fetch(&open, "ok.txt"), (200, "served".into()));
}

/// Routes `target` and opens it; when a file opens, its descriptor must name a file inside the
/// canonical root (read back through /proc/self/fd, so symlinks are fully resolved by the
/// kernel). Returns `None` if the target did not route to a file, else whether a file opened.
fn opens_inside(
    root: &roam::files::Root,
    target: &str,
    allow_dotfiles: bool,
) -> Result<Option<bool>, TestCaseError> {
    let Ok(Route::File { path, .. }) = roam::http::target::route(target, allow_dotfiles) else {
        return Ok(None);
    };
    let Ok(file) = root.open_file(&path) else {
        return Ok(Some(false));
    };
    let fd = file.source.file.as_raw_fd();
    let real = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| TestCaseError::fail(format!("readlink: {e}")))?;
    prop_assert!(
        real.starts_with(root.path()),
        "{target:?} opened {real:?}, outside {:?}",
        root.path()
    );
    Ok(Some(true))
}

/// Names that exist in the hostile tree, symlinks among them.
const NAMES: &[&str] = &[
    "ok.txt",
    "sub",
    "in.txt",
    "inner-link",
    "up",
    "parent",
    "parent-abs",
    "secret-link",
    "rel-link",
    "zero",
    "passwd",
    "fifo",
    "outside",
    "token.txt",
    "root",
    ".git",
    "config",
    ".env",
    "CON",
    "%252e%252e",
];

/// Every spelling of a separator or a dot segment, NUL, drive letters, unicode look-alikes.
const HOSTILE: &[&str] = &[
    "", "..", ".", "%2e", "%2E", "%2e%2e", "%2f", "%2F", "%5c", "%5C", "\\", ":", "c:", "%3a",
    "\0", "%00", "%252e", "%25", "%c0%ae", "%c0%af", "é", "%C3%A9", "\u{202e}", "\u{ff0e}",
];

/// For any path built from names in the tree and hostile atoms, routing plus opening either
/// fails or yields a file inside the root.
#[test]
fn any_routed_path_opens_inside_the_root_or_not_at_all() {
    let tree = HostileTree::new();
    let root = roam::files::Root::open(&tree.root).unwrap();
    // The property is not vacuous: these open, these do not.
    for t in [
        "/x/ok.txt",
        "/x/sub/in.txt",
        "/x/inner-link",
        "/x/%252e%252e",
    ] {
        assert!(
            matches!(opens_inside(&root, t, false), Ok(Some(true))),
            "{t}"
        );
    }
    for t in [
        "/x/parent/root/ok.txt",
        "/x/secret-link",
        "/x/sub/up/token.txt",
    ] {
        assert!(
            matches!(opens_inside(&root, t, true), Ok(Some(false))),
            "{t}"
        );
    }
    let atom = prop_oneof![
        3 => prop::sample::select(NAMES).prop_map(str::to_owned),
        2 => prop::sample::select(HOSTILE).prop_map(str::to_owned),
        1 => "[a-z.%0-9]{1,4}",
    ];
    let segment = prop_oneof![
        3 => atom.clone(),
        1 => prop::collection::vec(atom, 2..=3).prop_map(|v| v.concat()),
    ];
    let path = prop::collection::vec(segment, 1..=5).prop_map(|v| v.join("/"));
    let prefix = prop::sample::select(&["/x/", "http://evil/x/", "HTTP://evil:80/x/"][..]);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 4000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (routed, opened) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
    let result = runner.run(&(prefix, path, any::<bool>()), |(prefix, path, dots)| {
        let outcome = opens_inside(&root, &format!("{prefix}{path}"), dots)?;
        routed.set(routed.get() + usize::from(outcome.is_some()));
        opened.set(opened.get() + usize::from(outcome == Some(true)));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!(
        "of 4000 generated paths, {} routed to a file and {} opened one, all inside the root",
        routed.get(),
        opened.get()
    );
}

/// Found by the fuzzer (fuzz/seeds/request_router/regress-absolute-form-multibyte): a target
/// that starts like absolute-form with a multi-byte character where the scheme's `//` would end
/// panicked in `target::route`, slicing a `str` inside a character.
#[test]
fn route_refuses_a_multibyte_char_where_the_scheme_ends_without_panicking() {
    for target in [
        "http:/\u{464}xxxxx",
        "HTTPS:/\u{e9}/a/b",
        "https:/\u{20ac}/x/y",
        "http:\u{e9}",
        "htt\u{e9}://x/a",
    ] {
        let routed =
            std::panic::catch_unwind(|| roam::http::target::route(target, false).map(|_| ()));
        assert_eq!(
            routed.ok(),
            Some(Err(TargetError::BadForm)),
            "{target:?}: expected BadForm (None means it panicked)"
        );
    }
}

/// The same input over TCP: one 400, never a connection dropped without an answer (httparse
/// accepts UTF-8 in request targets, so these bytes reach the router).
#[test]
fn absolute_form_with_a_multibyte_char_gets_400_not_a_dropped_connection() {
    let root = Root::new();
    let srv = TestServer::start(root.path());
    let raw = "GET http:/\u{464}[[[[ple:8080 HTTP/1.1\r\nHost: test\r\n\r\n";
    let (resp, ending) = exchange_raw(srv.addr, raw.as_bytes());
    assert_eq!(
        status_line(&resp),
        ST_400,
        "got {:?} then {ending:?}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(request(srv.addr, &get("/")).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Framing and smuggling.
// ---------------------------------------------------------------------------------------------

/// Every ambiguous or invalid framing gets exactly one 400 and the connection closes; the
/// complete request sent right behind it (which a lenient parser would take as the next
/// request, or as a body to skip) is never answered.
#[test]
fn smuggling_and_framing_attacks_get_one_400_and_the_hidden_request_is_never_answered() {
    const ANSWER: &str = "HIDDEN-REQUEST-ANSWERED";
    let root = Root::new();
    root.file("ok.txt", ANSWER.as_bytes());
    let pki = support::tls::TestPki::new(&[]);
    for over in transports(&pki) {
        let srv = server_over(&over, &pki, root.path());
        let id = mint_over(&over, srv.addr);
        let hidden = format!("GET /{id}/ok.txt HTTP/1.1\r\nHost: test\r\n\r\n");
        let n = hidden.len();
        let get_with = |fields: &str| format!("GET / HTTP/1.1\r\nHost: test\r\n{fields}\r\n");
        let cases: Vec<(&str, String)> = vec![
        (
            "CL and TE",
            get_with(&format!(
                "Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"
            )),
        ),
        (
            "TE and CL",
            get_with(&format!(
                "Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n"
            )),
        ),
        (
            "TE and CL on POST",
            "POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
                .to_owned(),
        ),
        ("TE on GET", get_with("Transfer-Encoding: chunked\r\n")),
        ("TE obfuscated", get_with("Transfer-Encoding: xchunked\r\n")),
        (
            "TE list",
            get_with("Transfer-Encoding: identity, chunked\r\n"),
        ),
        (
            "CL 0 then n",
            get_with(&format!("Content-Length: 0\r\nContent-Length: {n}\r\n")),
        ),
        (
            "CL n then 0",
            get_with(&format!("Content-Length: {n}\r\nContent-Length: 0\r\n")),
        ),
        ("CL list differing", get_with(&format!("Content-Length: 0, {n}\r\n"))),
        ("CL negative", get_with(&format!("Content-Length: -{n}\r\n"))),
        ("CL hex", get_with(&format!("Content-Length: 0x{n:x}\r\n"))),
        ("CL plus sign", get_with(&format!("Content-Length: +{n}\r\n"))),
        (
            "CL overflow",
            get_with("Content-Length: 18446744073709551616\r\n"),
        ),
        ("CL empty", get_with("Content-Length: \r\n")),
        ("CL two numbers", get_with(&format!("Content-Length: {n} 0\r\n"))),
        (
            "GET body hides a request",
            get_with(&format!("Content-Length: {n}\r\n")),
        ),
        (
            "HEAD body hides a request",
            format!("HEAD / HTTP/1.1\r\nHost: test\r\nContent-Length: {n}\r\n\r\n"),
        ),
        ("obs-fold", get_with("X-Pad: a\r\n folded\r\n")),
        (
            "obs-fold into Host",
            "GET / HTTP/1.1\r\nHost: test\r\n\tevil\r\n\r\n".to_owned(),
        ),
        (
            "space before colon",
            "GET / HTTP/1.1\r\nHost : test\r\n\r\n".to_owned(),
        ),
        (
            "space before colon in CL",
            get_with(&format!("Content-Length : {n}\r\n")),
        ),
        (
            "tab before colon in TE",
            get_with("Transfer-Encoding\t: chunked\r\n"),
        ),
        ("missing Host", "GET / HTTP/1.1\r\n\r\n".to_owned()),
        (
            "doubled Host",
            "GET / HTTP/1.1\r\nHost: test\r\nHost: test\r\n\r\n".to_owned(),
        ),
        (
            "differing Hosts",
            "GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n".to_owned(),
        ),
        (
            "HTTP/2.0",
            "GET / HTTP/2.0\r\nHost: test\r\n\r\n".to_owned(),
        ),
        (
            "HTTP/1.2",
            "GET / HTTP/1.2\r\nHost: test\r\n\r\n".to_owned(),
        ),
        ("HTTP/0.9 style", "GET /\r\n".to_owned()),
        (
            "h2 preface",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_owned(),
        ),
        (
            "lowercase version",
            "GET / http/1.1\r\nHost: test\r\n\r\n".to_owned(),
        ),
        (
            "field without colon",
            "GET / HTTP/1.1\r\nHost test\r\n\r\n".to_owned(),
        ),
        (
            "NUL in a field",
            "GET / HTTP/1.1\r\nHost: te\0st\r\n\r\n".to_owned(),
        ),
        (
            "bare CR",
            "GET / HTTP/1.1\r\nHost: test\rX: y\r\n\r\n".to_owned(),
        ),
    ];
        for (name, head) in &cases {
            let (resp, ending) =
                exchange_over(&over, srv.addr, format!("{head}{hidden}").as_bytes());
            let text = String::from_utf8_lossy(&resp);
            assert_eq!(status_line(&resp), ST_400, "{name}: {text:?}");
            assert_eq!(
                text.matches("HTTP/1.1 ").count(),
                1,
                "{name}: more than one response: {text:?}"
            );
            assert!(
                !text.contains(ANSWER),
                "{name}: answered the hidden request"
            );
            assert!(
                text.contains("\r\nConnection: close\r\n"),
                "{name}: {text:?}"
            );
            assert_eq!(ending, Ending::Eof, "{name}: connection left open");
        }
        // The hidden request on its own is fine: the answers above were refusals, not outages.
        let (resp, _) = exchange_over(
            &over,
            srv.addr,
            format!("GET /{id}/ok.txt HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(status_line(&resp), ST_200);
    }
}

// ---------------------------------------------------------------------------------------------
// Slow and idle peers.
// ---------------------------------------------------------------------------------------------

/// Slowloris: one header byte a second never completes a head; each such connection gets 408
/// and is closed at the header timeout (2 s), while a normal request is served meanwhile.
#[test]
fn slowloris_gets_408_at_the_header_timeout_while_others_are_served() {
    let root = Root::new();
    let srv = TestServer::start_with(root.path(), |cfg| {
        cfg.header_timeout = Duration::from_secs(2);
    });
    let head = get("/");
    let stop = Arc::new(AtomicBool::new(false));
    let mut loris = Vec::new();
    for _ in 0..10 {
        let c = connect(srv.addr);
        let mut w = c.try_clone().unwrap();
        let (stop, head) = (Arc::clone(&stop), head.clone());
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&sent);
        let dripper = std::thread::spawn(move || {
            for b in head.bytes() {
                if stop.load(Ordering::Relaxed) || w.write_all(&[b]).is_err() {
                    return;
                }
                counter.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        loris.push((c, sent, dripper));
    }
    // Served while ten slow heads are pending.
    assert_eq!(request(srv.addr, &get("/")).status, 200);
    for (c, sent, _) in &loris {
        let mut c = c.try_clone().unwrap();
        let head = read_head(&mut c);
        assert!(head.starts_with(ST_408), "{head}");
        assert_eq!(field(&head, "Connection"), Some("close"));
        assert!(
            sent.load(Ordering::Relaxed) < head.len(),
            "the head completed before the timeout"
        );
        read_exactly(&mut c, content_length(&head));
        let (_, ending) = drain(&mut c);
        assert_eq!(ending, Ending::Eof, "408 without closing");
    }
    stop.store(true, Ordering::Relaxed);
    for (_, _, dripper) in loris {
        dripper.join().unwrap();
    }
}

/// Keep-alive connections that go quiet after a response are closed by the idle timeout (1 s),
/// which is much shorter than the header timeout here, without a stray byte.
#[test]
fn idle_keep_alive_connections_are_closed_by_the_idle_timeout() {
    let root = Root::new();
    let srv = TestServer::start_with(root.path(), |cfg| {
        cfg.idle_timeout = Duration::from_secs(1);
        cfg.header_timeout = Duration::from_secs(30);
    });
    let mut idle = Vec::new();
    for _ in 0..100 {
        let mut c = connect(srv.addr);
        c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        c.write_all(get("/").as_bytes()).unwrap();
        let r = read_response(&mut c, false);
        assert_eq!((r.status, r.header("Connection")), (200, None));
        idle.push(c);
    }
    for mut c in idle {
        let (extra, ending) = drain(&mut c);
        assert_eq!(ending, Ending::Eof, "idle connection not closed");
        assert!(extra.is_empty(), "sent {extra:?} on an idle connection");
    }
}

/// A reader that stops reading a large file is dropped at the write-stall timeout (1 s): twenty
/// of them hold the server's memory within 16 MiB of its idle size while stalled, their sockets
/// are closed by the server (fewer bytes than Content-Length arrive, then a reset), and normal
/// requests are served throughout.
#[test]
fn stalled_readers_are_dropped_at_the_write_stall_timeout_with_bounded_memory() {
    let root = Root::new();
    root.file("big.bin", &pattern(16 * MIB, 1));
    let mut srv = Binary::start(root.path(), &["--write-stall-timeout", "1s"]);
    let ids: Vec<String> = (0..20).map(|_| srv.mint()).collect();
    // Warm: the file table, the digest of big.bin, the runtime's buffers.
    let mut warm = connect(srv.addr);
    warm.write_all(
        get_with(&format!("/{}/big.bin", srv.mint()), &["Connection: close"]).as_bytes(),
    )
    .unwrap();
    let (body, _) = drain(&mut warm);
    assert!(body.len() > 16 * MIB);
    drop(warm);
    wait_until(
        "warm-up connections closed",
        Duration::from_secs(10),
        || srv.connections() == 0,
    );
    let idle_rss = srv.rss_kib();

    let mut stalled = Vec::new();
    for id in &ids {
        let mut c = connect_small_rcvbuf(srv.addr);
        c.write_all(get_with(&format!("/{id}/big.bin"), &["Connection: close"]).as_bytes())
            .unwrap();
        let head = read_head(&mut c);
        assert!(head.starts_with(ST_200), "{head}");
        stalled.push((c, content_length(&head)));
    }
    let mut peak_rss = 0;
    wait_until(
        "the server closes the stalled connections",
        Duration::from_secs(20),
        || {
            peak_rss = peak_rss.max(srv.rss_kib());
            srv.connections() == 0
        },
    );
    eprintln!("20 stalled readers: RSS {idle_rss} KiB idle, {peak_rss} KiB at most");
    assert!(
        peak_rss < idle_rss + 16 * 1024,
        "RSS rose from {idle_rss} KiB to {peak_rss} KiB with 20 stalled readers (bound: +16 MiB)"
    );
    for (mut c, len) in stalled {
        let (body, ending) = drain(&mut c);
        assert!(body.len() < len, "a stalled reader got the whole body");
        assert_eq!(ending, Ending::Reset, "stalled reader not reset");
    }
    srv.assert_alive();
    assert_eq!(request(srv.addr, &get("/")).status, 200);
}

/// A thousand idle connections (half silent, half with a partial head) are all accepted and held,
/// yet a normal request and a download are served at once, and the idle connections cost the
/// server less than 16 MiB.
#[test]
fn a_thousand_idle_connections_do_not_stop_normal_service() {
    let root = Root::new();
    let content = pattern(64 * 1024, 2);
    root.file("f.bin", &content);
    let srv = Binary::start(root.path(), &["--header-timeout", "60s"]);
    let id = srv.mint();
    let idle_rss = srv.rss_kib();
    let mut idle = Vec::new();
    for i in 0..1000 {
        let mut c = TcpStream::connect(srv.addr).unwrap();
        if i % 2 == 1 {
            c.write_all(b"GET / HTTP/1.1\r\nHost: te").unwrap();
        }
        idle.push(c);
    }
    wait_until(
        "the server accepts all 1000 connections",
        Duration::from_secs(20),
        || srv.connections() == 1000,
    );
    let mut c = connect(srv.addr);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(get("/").as_bytes()).unwrap();
    assert_eq!(read_response(&mut c, false).status, 200);
    c.write_all(get(&format!("/{id}/f.bin")).as_bytes())
        .unwrap();
    let r = read_response(&mut c, false);
    assert_eq!(r.status, 200);
    assert!(r.body == content, "download corrupted");
    let rss = srv.rss_kib();
    eprintln!("1000 idle connections: RSS {idle_rss} KiB before, {rss} KiB with them");
    assert!(
        rss < idle_rss + 16 * 1024,
        "RSS rose from {idle_rss} KiB to {rss} KiB for 1000 idle connections (bound: +16 MiB)"
    );
    assert!(
        idle.iter().all(|c| !has_data(c)),
        "an idle connection got an answer"
    );
}

/// At the connection cap (20), 200 more connections wait in the listen backlog: the server
/// neither accepts them nor spins (under 0.2 s of CPU over 2 s), and serves every one of them
/// once the first twenty leave.
#[test]
fn the_connection_cap_holds_without_spinning_and_waiting_connections_are_served_later() {
    let root = Root::new();
    let srv = Binary::start(
        root.path(),
        &["--max-connections", "20", "--header-timeout", "60s"],
    );
    let first: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(srv.addr).unwrap())
        .collect();
    wait_until("20 connections accepted", Duration::from_secs(10), || {
        srv.connections() == 20
    });
    let waiting: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut c = connect(srv.addr);
            c.write_all(get_with("/", &["Connection: close"]).as_bytes())
                .unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let before = srv.cpu_seconds();
    std::thread::sleep(Duration::from_secs(2));
    let used = srv.cpu_seconds() - before;
    eprintln!("at the connection cap: {used:.3} s of CPU in 2 s");
    assert!(
        used < 0.2,
        "the server used {used:.2} s of CPU in 2 s at the connection cap"
    );
    assert_eq!(srv.connections(), 20, "the server accepted past its cap");
    assert!(
        !has_data(&waiting[0]),
        "a connection past the cap was served"
    );
    drop(first);
    for (i, mut c) in waiting.into_iter().enumerate() {
        let r = read_response(&mut c, false);
        assert_eq!(r.status, 200, "waiting connection {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Client ID abuse.
// ---------------------------------------------------------------------------------------------

/// One mint request, pipelined in batches.
const MINT: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/// Mints `count` IDs on one keep-alive connection, pipelining batches of 1000, and checks that
/// every answer is a 200 of the same length (a 36-character ID).
fn mint_many(addr: SocketAddr, count: usize) {
    let mut c = connect(addr);
    // The first answer on its own gives the length every other one must have.
    c.write_all(MINT).unwrap();
    let head = read_head(&mut c);
    assert!(head.starts_with(ST_200), "{head}");
    assert_eq!(content_length(&head), 36);
    read_exactly(&mut c, 36);
    let len = head.len() + 36;
    let mut writer = c.try_clone().unwrap();
    let remaining = count - 1;
    let feeder = std::thread::spawn(move || {
        let batch = MINT.repeat(1000);
        let mut left = remaining;
        while left > 0 {
            let n = left.min(1000);
            writer.write_all(&batch[..n * MINT.len()]).unwrap();
            left -= n;
        }
    });
    let mut pending: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut buf = vec![0u8; 1 << 20];
    let mut answered = 0;
    while answered < remaining {
        let n = c.read(&mut buf).expect("read mint answers");
        assert!(n > 0, "closed after {answered} answers");
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / len;
        for i in 0..whole {
            let at = i * len;
            assert!(
                pending[at..].starts_with(ST_200.as_bytes()),
                "answer {} is not a 200 of {len} bytes: {:?}",
                answered + i,
                String::from_utf8_lossy(&pending[at..(at + len).min(pending.len())])
            );
        }
        answered += whole;
        pending.drain(..whole * len);
    }
    assert!(pending.is_empty());
    feeder.join().unwrap();
}

/// A million IDs minted over four pipelined keep-alive connections leave the server's memory
/// within 32 MiB of what it was after a warm-up: minting stores nothing.
#[test]
fn a_million_minted_ids_keep_memory_bounded() {
    let root = Root::new();
    let srv = Binary::start(root.path(), &[]);
    mint_many(srv.addr, 10_000);
    let warm_rss = srv.rss_kib();
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let addr = srv.addr;
            std::thread::spawn(move || mint_many(addr, 250_000))
        })
        .collect();
    let mut peak_rss = warm_rss;
    while !workers.iter().all(|w| w.is_finished()) {
        peak_rss = peak_rss.max(srv.rss_kib());
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in workers {
        w.join().unwrap();
    }
    peak_rss = peak_rss.max(srv.rss_kib());
    eprintln!(
        "1,000,000 mints in {:.1} s: RSS {warm_rss} KiB warm, {peak_rss} KiB at most",
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak_rss < warm_rss + 32 * 1024,
        "RSS rose from {warm_rss} KiB to {peak_rss} KiB over 1,000,000 mints (bound: +32 MiB)"
    );
}

/// A well-shaped ID (version 8, RFC variant, lowercase) that the server did not mint.
fn forged_id() -> String {
    let (a, b): (u64, u64) = (rand::random(), rand::random());
    let hex = format!("{a:016x}{b:016x}");
    let variant = ['8', '9', 'a', 'b'][(b >> 62) as usize];
    format!(
        "{}-{}-8{}-{variant}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// Ten thousand forged IDs asking for a real file (plain, HEAD, with Range) are all 404 and
/// leave no trace: no session, no owner, not even a file table entry.
#[test]
fn forged_ids_allocate_nothing() {
    let root = Root::new();
    root.file("f.bin", &pattern(64 * 1024, 3));
    let srv = TestServer::start(root.path());
    let mut c = connect(srv.addr);
    let mut reader = BufReader::new(c.try_clone().unwrap());
    let variants = [
        "",
        "Range: bytes=100-",
        "Range: bytes=0-9",
        "If-Range: \"x\"",
    ];
    for batch in 0..100 {
        let mut raw = String::new();
        let mut heads = Vec::new();
        for i in 0..100 {
            let target = format!("/{}/f.bin", forged_id());
            let head = i % 7 == 0;
            let variant = variants[(batch + i) % variants.len()];
            let method = if head { "HEAD" } else { "GET" };
            raw.push_str(&format!("{method} {target} HTTP/1.1\r\nHost: test\r\n"));
            if !variant.is_empty() {
                raw.push_str(variant);
                raw.push_str("\r\n");
            }
            raw.push_str("\r\n");
            heads.push(head);
        }
        c.write_all(raw.as_bytes()).unwrap();
        for head in heads {
            let r = read_response(&mut reader, head);
            assert_eq!(r.status, 404);
            if !head {
                assert_eq!(r.body, b"not found: unknown client id\n");
            }
        }
    }
    let svc = &srv.service;
    assert_eq!(svc.sessions().len(), 0, "a forged ID created a session");
    assert!(svc.sessions().senders() == 0, "a forged ID took ownership");
    assert!(svc.files().is_empty(), "a forged ID opened a file");
    // A real ID does allocate, so the counters above can see it.
    let id = srv.mint();
    assert_eq!(request(srv.addr, &get(&format!("/{id}/f.bin"))).status, 200);
    assert_eq!(svc.sessions().len(), 1);
    assert_eq!(svc.files().len(), 1);
}

/// `--mint-rate 5/s,5`: five mints from one address, then 429 with `Retry-After`; another
/// address is unaffected, downloads are never limited, and the bucket refills.
#[test]
fn mint_rate_limit_is_per_address_with_retry_after() {
    let root = Root::new();
    root.file("f.txt", b"hello");
    let srv = Binary::start(root.path(), &["--mint-rate", "5/s,5"]);
    let mut a = connect_from("127.0.0.1", srv.addr);
    let mut id = String::new();
    for _ in 0..5 {
        a.write_all(get("/").as_bytes()).unwrap();
        let r = read_response(&mut a, false);
        assert_eq!(r.status, 200);
        id = String::from_utf8(r.body).unwrap();
    }
    for _ in 0..2 {
        a.write_all(get("/").as_bytes()).unwrap();
        let head = read_head(&mut a);
        assert!(head.starts_with(ST_429), "{head}");
        assert_eq!(field(&head, "Retry-After"), Some("1"));
        assert_eq!(
            field(&head, "Connection"),
            None,
            "429 must keep the connection"
        );
        read_exactly(&mut a, content_length(&head));
    }
    // HEAD does not mint for real (the ID is not sent) and is not limited.
    a.write_all(b"HEAD / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut a, true).status, 200);
    // Downloads from the limited address go on.
    a.write_all(get(&format!("/{id}/f.txt")).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut a, false).body, b"hello");
    // Another address has its own bucket.
    let mut b = connect_from("127.0.0.2", srv.addr);
    b.write_all(get("/").as_bytes()).unwrap();
    assert_eq!(read_response(&mut b, false).status, 200);
    // At 5/s, 0.6 s refills at least two tokens.
    std::thread::sleep(Duration::from_millis(600));
    a.write_all(get("/").as_bytes()).unwrap();
    assert_eq!(read_response(&mut a, false).status, 200);
}

// ---------------------------------------------------------------------------------------------
// Faults: files and the root changing under the server, descriptor exhaustion.
// ---------------------------------------------------------------------------------------------

/// Starts a download with `Connection: close` and reads its head and `n` body bytes.
fn start_download(addr: SocketAddr, target: &str, n: usize) -> (TcpStream, usize, Vec<u8>) {
    let mut c = connect(addr);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(get_with(target, &["Connection: close"]).as_bytes())
        .unwrap();
    let head = read_head(&mut c);
    assert!(head.starts_with(ST_200), "{target}: {head}");
    let len = content_length(&head);
    let body = read_exactly(&mut c, n);
    (c, len, body)
}

/// A file truncated mid-transfer: that transfer ends with a reset before `Content-Length` (never
/// a short body closed as if complete), what did arrive is the original content, and a
/// concurrent transfer of another file completes intact.
#[test]
fn file_shrinking_mid_transfer_aborts_that_transfer_and_others_complete() {
    let root = Root::new();
    let big = pattern(32 * MIB, 4);
    let other = pattern(8 * MIB, 5);
    let big_path = root.file("big.bin", &big);
    root.file("other.bin", &other);
    let srv = TestServer::start_with(root.path(), |cfg| cfg.file_revalidate = Duration::ZERO);
    let (id_a, id_b) = (srv.mint(), srv.mint());
    let (mut a, a_len, mut a_body) = start_download(srv.addr, &format!("/{id_a}/big.bin"), MIB);
    let (mut b, b_len, mut b_body) = start_download(srv.addr, &format!("/{id_b}/other.bin"), MIB);
    assert_eq!((a_len, b_len), (big.len(), other.len()));

    std::fs::OpenOptions::new()
        .write(true)
        .open(&big_path)
        .unwrap()
        .set_len(2 * MIB as u64)
        .unwrap();

    let (rest, ending) = drain(&mut b);
    b_body.extend_from_slice(&rest);
    assert_eq!(ending, Ending::Eof);
    assert!(b_body == other, "the concurrent transfer was corrupted");

    let (rest, ending) = drain(&mut a);
    a_body.extend_from_slice(&rest);
    assert!(
        a_body.len() < a_len,
        "all {a_len} bytes arrived from a file shrunk to 2 MiB"
    );
    assert_eq!(
        ending,
        Ending::Reset,
        "a short body ({} of {a_len} bytes) ended as if complete",
        a_body.len()
    );
    assert!(
        a_body[..] == big[..a_body.len()],
        "bytes that arrived are not the file's"
    );
    // The new version is served whole.
    let r = request(srv.addr, &get(&format!("/{}/big.bin", srv.mint())));
    assert_eq!((r.status, r.body.len()), (200, 2 * MIB));
}

/// A file deleted mid-transfer: the transfer completes from the open descriptor (the inode
/// lives until the server closes it), and the next request for the path is a 404.
#[test]
fn file_deleted_mid_transfer_completes_from_the_open_descriptor() {
    let root = Root::new();
    let content = pattern(16 * MIB, 6);
    let path = root.file("gone.bin", &content);
    let srv = TestServer::start_with(root.path(), |cfg| cfg.file_revalidate = Duration::ZERO);
    let id = srv.mint();
    let (mut c, len, mut body) = start_download(srv.addr, &format!("/{id}/gone.bin"), MIB);
    std::fs::remove_file(&path).unwrap();
    let (rest, ending) = drain(&mut c);
    body.extend_from_slice(&rest);
    assert_eq!((body.len(), ending), (len, Ending::Eof));
    assert!(body == content, "the body changed");
    let r = request(srv.addr, &get(&format!("/{id}/gone.bin")));
    assert_eq!(
        (r.status, r.body.as_slice()),
        (404, &b"not found: no such file\n"[..])
    );
}

/// The root folder renamed away keeps being served (the server holds it open and resolves
/// below that descriptor, so a folder put at the old path is not served); deleted, every
/// download is a clear 404 and the server stays up.
#[test]
fn root_renamed_or_deleted_gives_404_per_request_and_the_server_stays_up() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("ok.txt"), "served").unwrap();
    let srv = TestServer::start_with(&root, |cfg| cfg.file_revalidate = Duration::ZERO);
    // A fresh ID each time: a client that has the whole file gets 416 when it asks again.
    let target = || format!("/{}/ok.txt", srv.mint());
    let fetch = || request(srv.addr, &get(&target()));
    assert_eq!(fetch().body, b"served");

    let moved = base.path().join("moved");
    std::fs::rename(&root, &moved).unwrap();
    assert_eq!(fetch().body, b"served");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("ok.txt"), "impostor").unwrap();
    assert_eq!(fetch().body, b"served");

    std::fs::remove_dir_all(&moved).unwrap();
    for _ in 0..3 {
        let r = fetch();
        assert_eq!(
            (r.status, r.body.as_slice()),
            (404, &b"not found: no such file\n"[..])
        );
        let (resp, _) = exchange_raw(
            srv.addr,
            format!(
                "HEAD {} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
                target()
            )
            .as_bytes(),
        );
        assert_eq!(status_line(&resp), ST_404);
        assert_eq!(request(srv.addr, &get("/")).status, 200);
    }
}

/// An unreadable root or file: 404 per request, the server stays up and recovers when
/// permissions come back. Root ignores permissions, so as root the server runs as `nobody`
/// (setpriv); otherwise as the current user.
#[test]
fn unreadable_root_or_file_gives_404_and_service_recovers() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("ok.txt"), "served").unwrap();
    std::fs::write(root.join("big.bin"), pattern(64 * 1024, 7)).unwrap();
    let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(base.path(), 0o755).unwrap();
    mode(&root, 0o755).unwrap();
    let wrapper: &[&str] = if is_root() {
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ]
    } else {
        &[]
    };
    let mut srv = Binary::start_under(wrapper, &root, &["--file-revalidate", "0s"]);
    // A fresh ID each time: a client that has the whole file gets 416 when it asks again.
    let status = |path: &str| request(srv.addr, &get(&format!("/{}/{path}", srv.mint()))).status;
    assert_eq!((status("ok.txt"), status("big.bin")), (200, 200));

    mode(&root, 0o000).unwrap();
    assert_eq!((status("ok.txt"), status("big.bin")), (404, 404));
    assert_eq!(request(srv.addr, &get("/")).status, 200);

    mode(&root, 0o755).unwrap();
    mode(&root.join("ok.txt"), 0o000).unwrap();
    assert_eq!((status("ok.txt"), status("big.bin")), (404, 200));

    mode(&root.join("ok.txt"), 0o644).unwrap();
    assert_eq!(status("ok.txt"), 200);
    srv.assert_alive();
}

/// Under a 64-descriptor limit, 100 connections exhaust the descriptors: the server stays up,
/// logs the accept failure once for the burst (its retries, backing off from 5 ms to 1 s, log
/// nothing), answers requests that need a descriptor with 500 and logs those at most once a
/// second, and serves normally once the connections close.
#[test]
fn descriptor_exhaustion_is_logged_once_per_burst_and_service_recovers() {
    let root = Root::new();
    root.file("f.txt", b"file");
    let mut srv = Binary::start_under(
        &["prlimit", "--nofile=64:64"],
        root.path(),
        &["--header-timeout", "60s", "--idle-timeout", "60s"],
    );
    // The disk store opens in the background while roam listens; it needs descriptors too, so
    // the flood waits until it is open (this test is about accepting, not the store).
    wait_until("the session store is open", Duration::from_secs(30), || {
        srv.log().contains("session store open")
    });
    let id = srv.mint();
    // A connection closing during the flood would free a descriptor and start a second burst.
    wait_until(
        "the mint connection closed",
        Duration::from_secs(10),
        || srv.connections() == 0,
    );
    let started = Instant::now();
    // Minting needs no descriptor beyond the connection's own.
    let conns: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut c = connect(srv.addr);
            c.write_all(get("/").as_bytes()).unwrap();
            c
        })
        .collect();
    wait_until(
        "an accept failure is logged",
        Duration::from_secs(10),
        || srv.log().contains("accept failed"),
    );
    // Let the accept loop back off and retry for a while.
    std::thread::sleep(Duration::from_millis(2500));
    srv.assert_alive();
    // Retrying every 5 ms doubling to 1 s makes ten attempts in 2.5 s: logging each would show
    // ten lines. (A descriptor freed mid-burst may start a second burst.)
    let accept_failures = srv.log_lines("accept failed");
    assert!(
        (1..=3).contains(&accept_failures),
        "{accept_failures} accept failure lines; one per burst expected:\n{}",
        srv.log()
    );
    let accepted: Vec<TcpStream> = conns
        .iter()
        .filter(|c| has_data(c))
        .map(|c| c.try_clone().unwrap())
        .collect();
    assert!(
        !accepted.is_empty() && accepted.len() < conns.len(),
        "{} of 100 accepted: the limit did not bite",
        accepted.len()
    );
    // With every descriptor taken, opening a file fails: 500 each time, logged at most once a
    // second.
    for c in &accepted {
        let mut c = c.try_clone().unwrap();
        assert_eq!(read_response(&mut c, false).status, 200);
        c.write_all(get(&format!("/{id}/f.txt")).repeat(3).as_bytes())
            .unwrap();
    }
    for c in &accepted {
        let mut c = c.try_clone().unwrap();
        for _ in 0..3 {
            let r = read_response(&mut c, false);
            assert_eq!(
                (r.status, r.body.as_slice()),
                (500, &b"internal error\n"[..])
            );
        }
    }
    let failures = 3 * accepted.len();
    let lines = srv.log_lines("request failed");
    let seconds = started.elapsed().as_secs() as usize + 1;
    eprintln!(
        "descriptor limit 64: {} of 100 connections accepted, {failures} failed requests \
         logged in {lines} lines",
        accepted.len()
    );
    assert!(
        (1..=seconds).contains(&lines),
        "{failures} failed requests logged in {lines} lines over {seconds} s"
    );
    drop(accepted);
    drop(conns);
    let mut c = connect(srv.addr);
    c.write_all(get("/").as_bytes()).unwrap();
    assert_eq!(read_response(&mut c, false).status, 200);
    c.write_all(get(&format!("/{id}/f.txt")).as_bytes())
        .unwrap();
    assert_eq!(read_response(&mut c, false).body, b"file");
    wait_until("recovery is logged", Duration::from_secs(5), || {
        srv.log().contains("accepting again")
    });
    srv.assert_alive();
}

/// The file table keeps a descriptor open per cached file (up to `--file-cache-entries`, 10,000
/// by default, for 60 s after the last request), whatever the descriptor limit. Under a limit
/// of 64, one client fetching 100 different files one after another on one connection (the
/// server needs a handful of descriptors at any moment) must get all of them, and other
/// clients must still be served.
#[test]
fn the_file_table_never_starves_the_server_of_descriptors() {
    let root = Root::new();
    for i in 0..100 {
        root.file(&format!("f{i}.txt"), format!("file {i}").as_bytes());
    }
    let srv = Binary::start_under(&["prlimit", "--nofile=64:64"], root.path(), &[]);
    // The disk store opens in the background and needs descriptors too: counted from its open.
    wait_until("the session store is open", Duration::from_secs(30), || {
        srv.log().contains("session store open")
    });
    let id = srv.mint();
    let mut c = connect(srv.addr);
    let mut failed = Vec::new();
    for i in 0..100 {
        c.write_all(get(&format!("/{id}/f{i}.txt")).as_bytes())
            .unwrap();
        let r = read_response(&mut c, false);
        if r.status != 200 {
            failed.push((i, r.status));
        }
    }
    let held = std::fs::read_dir(srv.proc_path("fd")).unwrap().count();
    assert!(
        failed.is_empty(),
        "{} of 100 sequential downloads failed, from f{} on with {}; the server holds {held} \
         descriptors (limit 64)",
        failed.len(),
        failed[0].0,
        failed[0].1
    );
    assert_eq!(request(srv.addr, &get("/")).status, 200);
}

/// Issue 11, 3: each background digest cloned its file's descriptor before waiting for the one
/// hashing permit, nothing bounded the waiting, and every alias path was a new file: with 300
/// descriptors, one large file being hashed and 400 more files asked for, 113 requests got
/// `500` and accept failed with "Too many open files"; 500 symlink aliases of one large file
/// queued 500 hashes of it. Now a waiting digest holds no descriptor (the worker opens the file
/// when its turn comes), the queue is bounded, and results belong to the file (device, inode,
/// version), so aliases share one.
#[test]
fn waiting_digests_hold_no_descriptors_and_aliases_share_one_digest() {
    let root = Root::new();
    // Sparse: no disk, but hashing it takes seconds, so everything below queues behind it.
    std::fs::File::create(root.path().join("huge.bin"))
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let big = pattern(32 * MIB, 77);
    root.file("big.bin", &big);
    for i in 0..400 {
        // Over 16 KiB, so each is queued rather than hashed from memory at once.
        root.file(&format!("f/{i:03}.bin"), &pattern(20 * 1024, i));
    }
    std::os::unix::fs::symlink(".", root.path().join("x")).unwrap();
    std::os::unix::fs::symlink(".", root.path().join("y")).unwrap();
    let mut srv = Binary::start_under(
        &["prlimit", "--nofile=300:300"],
        root.path(),
        &["--file-cache-entries", "10", "--idle-timeout", "60s"],
    );
    let id = srv.mint();
    let addr = srv.addr;
    let head = |path: &str| {
        request(
            addr,
            &format!("HEAD /{id}/{path} HTTP/1.1\r\nHost: t\r\n\r\n"),
        )
    };
    assert_eq!(head("huge.bin").status, 200);
    for i in 0..400 {
        let r = head(&format!("f/{i:03}.bin"));
        assert_eq!(r.status, 200, "file {i}: {r:?}\n{}", srv.log());
    }
    // 500 distinct paths to big.bin through the two symlinks.
    let mut aliases = Vec::new();
    for n in 0..500usize {
        let mut p = String::new();
        for bit in 0..9 {
            p.push_str(if n >> bit & 1 == 1 { "x/" } else { "y/" });
        }
        p.push_str("big.bin");
        aliases.push(p);
    }
    for p in &aliases {
        let r = head(p);
        assert_eq!(r.status, 200, "{p}: {r:?}");
    }
    let fds = std::fs::read_dir(srv.proc_path("fd")).unwrap().count();
    assert!(fds < 100, "{fds} descriptors open while digests wait");
    srv.assert_alive();
    assert!(
        !srv.log().contains("Too many open files"),
        "descriptors ran out:\n{}",
        srv.log()
    );
    // The one digest of big.bin serves every alias (and the plain path) once it is ready.
    use sha2::Digest as _;
    let expected = {
        use base64::Engine as _;
        format!(
            "sha-256=:{}:",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&big))
        )
    };
    wait_until("big.bin's digest", Duration::from_secs(120), || {
        head("big.bin").header("repr-digest") == Some(expected.as_str())
    });
    for p in aliases.iter().take(20) {
        assert_eq!(
            head(p).header("repr-digest"),
            Some(expected.as_str()),
            "{p}"
        );
    }
}
