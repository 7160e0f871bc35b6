//! Durable progress (issue 13), with real processes: the `roam` binary started, stopped with
//! SIGTERM or killed with SIGKILL, and started again on the same state directory, with clients
//! that keep downloading across the restarts.
//!
//! What is promised (docs/PROTOCOL.md, "Restarts"): after SIGTERM every acknowledged offset is
//! on disk, so a client resuming without `Range` gets exactly the rest; after SIGKILL never a
//! gap, and a repeat of at most the progress interval plus one flush interval of traffic; IDs
//! stay valid; finished sessions stay finished; digests are not computed again.
//!
//! Run with `cargo test --test durable -- --nocapture` to see the measured repeats.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::server::{get, pattern, request, Root};

const MIB: usize = 1024 * 1024;

/// A `roam serve` process on a state directory, killed on drop.
struct Roam {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _stdout: BufReader<ChildStdout>,
}

impl Roam {
    /// Starts `roam serve` on `root` with its state in `state`, on a free port, logging to `log`
    /// (appended).
    fn start(root: &Path, state: &Path, log: &Path, extra: &[&str]) -> Roam {
        Self::try_start(root, state, log, "127.0.0.1:0", extra).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The same on `listen`.
    fn start_on(root: &Path, state: &Path, log: &Path, listen: &str) -> Roam {
        Self::try_start(root, state, log, listen, &[]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start(
        root: &Path,
        state: &Path,
        log: &Path,
        listen: &str,
        extra: &[&str],
    ) -> Result<Roam, String> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_roam"))
            .arg("serve")
            .arg("--root")
            .arg(root)
            .args(["--listen", listen, "--state-dir"])
            .arg(state)
            .args(extra)
            .env("RUST_LOG", "roam=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn roam");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        match line.trim().strip_prefix("roam listening on http://") {
            Some(addr) => Ok(Roam {
                addr: addr.parse().unwrap(),
                child,
                log: log.to_path_buf(),
                _stdout: stdout,
            }),
            None => {
                let status = child.wait().unwrap();
                Err(format!(
                    "roam did not start ({status}): {line:?}\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ))
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY-free: kill(2) through the libc crate on our own child's pid.
        let rc = unsafe_free_kill(self.child.id(), sig);
        assert_eq!(rc, 0, "kill failed");
    }

    /// SIGTERM, then waits for the process to exit (bounded); returns its exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        wait_exit(&mut self.child, Duration::from_secs(30))
    }

    /// SIGKILL, then waits for the process to exit.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn mint(&self) -> String {
        let r = request(self.addr, &get("/"));
        assert_eq!(r.status, 200, "{r:?}");
        String::from_utf8(r.body).unwrap()
    }
}

impl Drop for Roam {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_free_kill(pid: u32, sig: libc::c_int) -> libc::c_int {
    // The `kill` command keeps this file free of unsafe code.
    let name = match sig {
        libc::SIGTERM => "-TERM",
        libc::SIGKILL => "-KILL",
        _ => "-INT",
    };
    let status = Command::new("kill")
        .args([name, &pid.to_string()])
        .status()
        .expect("run kill");
    if status.success() {
        0
    } else {
        -1
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "roam did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that downloads without `Range`, at about `rate` bytes a second, and survives
/// restarts: whenever its connection ends it asks again (at the server's current address) and
/// places what comes where `Content-Range` says. It fails on a gap; it counts repeats.
struct Downloader {
    target: String,
    data: Arc<Vec<u8>>,
    have: Vec<u8>,
    /// Bytes received again that the client already had.
    repeated: u64,
    worst_repeat: u64,
    /// Responses received (heads), and the starts each declared.
    starts: Vec<(u16, u64)>,
    rate: usize,
}

impl Downloader {
    fn new(target: String, data: Arc<Vec<u8>>, rate: usize) -> Self {
        Downloader {
            target,
            data,
            have: Vec::new(),
            repeated: 0,
            worst_repeat: 0,
            starts: Vec::new(),
            rate,
        }
    }

    fn done(&self) -> bool {
        self.have.len() == self.data.len()
    }

    /// One connection: sends the request without `Range` and reads until the body ends or the
    /// connection does. Returns false when the server could not be reached.
    fn attempt(&mut self, addr: SocketAddr) -> bool {
        let Ok(mut s) = TcpStream::connect(addr) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        if s.write_all(get(&self.target).as_bytes()).is_err() {
            return false;
        }
        let Some(head) = read_head(&mut s) else {
            return false;
        };
        let status: u16 = head[9..12].parse().unwrap();
        let len = self.data.len() as u64;
        let start = match status {
            200 => 0,
            206 => {
                let cr = field(&head, "content-range").expect("206 has Content-Range");
                cr["bytes ".len()..]
                    .split('-')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            }
            416 => {
                assert_eq!(
                    field(&head, "roam-offset").map(str::to_owned),
                    Some(len.to_string()),
                    "416 means finished"
                );
                len
            }
            other => panic!("unexpected status {other}: {head}"),
        };
        self.starts.push((status, start));
        let had = self.have.len() as u64;
        assert!(
            start <= had,
            "gap: the server resumed {} at {start}, the client has {had} bytes ({:?})",
            self.target,
            self.starts
        );
        let repeat = had - start;
        self.repeated += repeat;
        self.worst_repeat = self.worst_repeat.max(repeat);
        if status == 416 {
            assert_eq!(had, len, "416 but the client has {had} of {len}");
            return true;
        }
        let mut pos = start;
        let mut buf = vec![0u8; 64 * 1024];
        let pause = Duration::from_secs_f64(buf.len() as f64 / self.rate as f64);
        while pos < len {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = &buf[..n];
                    assert_eq!(
                        chunk,
                        &self.data[pos as usize..pos as usize + n],
                        "wrong bytes at {pos}"
                    );
                    let new_from = (self.have.len() as u64).saturating_sub(pos) as usize;
                    if new_from < n {
                        self.have.extend_from_slice(&chunk[new_from..]);
                    }
                    pos += n as u64;
                    std::thread::sleep(pause);
                }
            }
        }
        true
    }
}

fn read_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    String::from_utf8(head).ok()
}

fn field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a server-resumed GET would start now (HEAD moves nothing).
fn offset(addr: SocketAddr, target: &str) -> u64 {
    let r = request(addr, &format!("HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n"));
    r.header("roam-offset").unwrap().parse().unwrap()
}

/// SIGTERM in the middle of a download, three times in a row, with the same client: after each
/// restart its request without `Range` resumes exactly where its bytes end (no gap, no repeat),
/// and its ID is still valid.
#[test]
fn a_graceful_restart_resumes_exactly_several_times_in_a_row() {
    const LEN: usize = 20 * MIB;
    let root = Root::new();
    let data = Arc::new(pattern(LEN, 51));
    root.file("big.bin", &data);
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("../durable-graceful.log");
    let mut srv = Roam::start(root.path(), state.path(), &log, &[]);
    let id = srv.mint();
    let target = format!("/{id}/big.bin");
    let addr = Arc::new(Mutex::new(srv.addr));
    let client = {
        let (addr, target, data) = (Arc::clone(&addr), target.clone(), Arc::clone(&data));
        std::thread::spawn(move || {
            let mut d = Downloader::new(target, data, 4 * MIB);
            let deadline = Instant::now() + Duration::from_secs(120);
            while !d.done() {
                assert!(Instant::now() < deadline, "never finished: {:?}", d.starts);
                let a = *addr.lock().unwrap();
                if !d.attempt(a) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            d
        })
    };
    for restart in 1..=3u64 {
        let at = restart * 4 * MIB as u64;
        wait_until("the download progresses", Duration::from_secs(60), || {
            offset(srv.addr, &target) >= at
        });
        let status = srv.terminate();
        assert!(status.success(), "SIGTERM: {status}");
        srv = Roam::start(root.path(), state.path(), &log, &[]);
        *addr.lock().unwrap() = srv.addr;
    }
    let d = client.join().unwrap();
    assert!(d.done());
    println!(
        "graceful restarts: responses {:?}, repeated {} bytes",
        d.starts, d.repeated
    );
    assert_eq!(
        d.repeated, 0,
        "a graceful restart repeats nothing: {:?}",
        d.starts
    );
    assert!(
        d.starts.iter().filter(|(s, _)| *s == 206).count() >= 3,
        "each restart resumed with 206: {:?}",
        d.starts
    );
    // The ID minted before the restarts still works, and the finished session stays finished.
    let r = request(srv.addr, &get(&target));
    assert_eq!(r.status, 416, "{r:?}");
    drop(srv);
}

/// IDs minted before a restart stay valid (the secret lives in the state directory, mode 0600),
/// finished sessions stay finished, and a digest is not computed again.
#[test]
fn ids_finished_sessions_and_digests_survive_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let root = Root::new();
    let big = pattern(16 * MIB, 52);
    root.file("done.bin", &big);
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("../durable-survive.log");
    let srv = Roam::start(root.path(), state.path(), &log, &[]);
    let id = srv.mint();
    let target = format!("/{id}/done.bin");
    let r = request(srv.addr, &get(&target));
    assert_eq!((r.status, r.body.len()), (200, big.len()));
    wait_until("finished", Duration::from_secs(10), || {
        request(
            srv.addr,
            &format!("HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n"),
        )
        .status
            == 416
    });
    wait_until("the digest", Duration::from_secs(60), || {
        request(
            srv.addr,
            &format!("HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n"),
        )
        .header("repr-digest")
        .is_some()
    });
    let digest = request(
        srv.addr,
        &format!("HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n"),
    )
    .header("repr-digest")
    .unwrap()
    .to_owned();
    assert!(srv.terminate().success());
    let mode = std::fs::metadata(state.path().join("id-secret"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the ID secret is private");
    let dir_mode = std::fs::metadata(state.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o077, 0, "the state directory is private");

    let srv = Roam::start(root.path(), state.path(), &log, &[]);
    let r = request(srv.addr, &get(&target));
    assert_eq!(
        r.status, 416,
        "the ID is still valid and the session still finished: {r:?}"
    );
    let restarted = srv
        .log()
        .rsplit("roam listening")
        .next()
        .unwrap_or("")
        .to_owned();
    let _ = restarted;
    wait_until(
        "the digest after the restart",
        Duration::from_secs(10),
        || {
            request(
                srv.addr,
                &format!("HEAD {target} HTTP/1.1\r\nHost: t\r\n\r\n"),
            )
            .header("repr-digest")
                == Some(digest.as_str())
        },
    );
    let log_text = srv.log();
    let after = log_text.rsplit("serving").next().unwrap();
    assert!(
        after.contains("digest restored from the store"),
        "the digest came from the store:\n{after}"
    );
    assert!(
        !after.contains("hashing a file"),
        "the file was hashed again after the restart:\n{after}"
    );
}

/// A free loopback port, found by binding port 0 and letting it go: restarts reuse it, so
/// clients (and `roam get`'s resume state, which keeps the URL) need no new address.
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// SIGKILL at random moments, ten times, while twelve clients download without `Range` (each
/// asking again whenever its connection ends) and two `roam get` processes run. Every file ends
/// exact; no resume without `Range` ever starts past the bytes its client has; the worst repeat
/// is reported, and stays within 1 MiB (the progress interval plus one flush interval of
/// traffic at 4 MB/s, plus what the kernel had queued).
#[test]
fn a_crash_loop_never_loses_a_byte_and_bounds_the_repeat() {
    const LEN: usize = 24 * MIB;
    const CLIENTS: usize = 12;
    const RATE: usize = 4 * MIB;
    const KILLS: usize = 10;
    let root = Root::new();
    let data = Arc::new(pattern(LEN, 53));
    root.file("f.bin", &data);
    let state = tempfile::tempdir().unwrap();
    let log = state.path().join("../durable-crash.log");
    let listen = free_port();
    let start = || Roam::start_on(root.path(), state.path(), &log, &listen);
    let mut srv = start();
    let addr = srv.addr;
    let ids: Vec<String> = (0..CLIENTS).map(|_| srv.mint()).collect();
    let clients: Vec<_> = ids
        .iter()
        .map(|id| {
            let data = Arc::clone(&data);
            let target = format!("/{id}/f.bin");
            std::thread::spawn(move || {
                let mut d = Downloader::new(target, data, RATE);
                let deadline = Instant::now() + Duration::from_secs(240);
                while !d.done() {
                    assert!(Instant::now() < deadline, "never finished: {:?}", d.starts);
                    if !d.attempt(addr) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                d
            })
        })
        .collect();
    let work = tempfile::tempdir().unwrap();
    let gets: Vec<_> = (0..2)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_roam"))
                .args(["get", &format!("http://{addr}/f.bin"), "-o"])
                .arg(work.path().join(format!("get{i}.bin")))
                .args(["--max-retry-delay", "200ms", "--retries", "200", "-q"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn roam get")
        })
        .collect();
    let mut rng = 0x5eed_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for kill in 0..KILLS {
        // Let a client make some progress, a random amount, before each kill.
        let target = format!("/{}/f.bin", ids[kill % CLIENTS]);
        let before = offset(addr, &target);
        let step = next() % (2 * MIB as u64) + 256 * 1024;
        wait_until("progress before the kill", Duration::from_secs(60), || {
            offset(addr, &target) >= (before + step).min(LEN as u64)
        });
        srv.kill();
        srv = start();
    }
    let mut worst = 0u64;
    let mut total_repeat = 0u64;
    for c in clients {
        let d = c.join().unwrap();
        assert!(d.have == *data, "a client's file differs");
        worst = worst.max(d.worst_repeat);
        total_repeat += d.repeated;
    }
    for (i, g) in gets.into_iter().enumerate() {
        let out = g.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "roam get {i}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let got = std::fs::read(work.path().join(format!("get{i}.bin"))).unwrap();
        assert!(got == *data, "roam get {i}: the file differs");
    }
    println!(
        "crash loop: {KILLS} SIGKILLs, {CLIENTS} clients reading at {} MiB/s: worst repeat {worst} \
         bytes, {total_repeat} bytes repeated in all",
        RATE / MIB
    );
    assert!(worst <= MIB as u64, "worst repeat {worst} bytes");
    drop(srv);
}

/// Runs `roam serve` with `args` expecting it to refuse to start: returns its stderr.
fn refused(root: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_roam"))
        .arg("serve")
        .arg("--root")
        .arg(root)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run roam");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "roam started: {stdout}\n{stderr}");
    assert!(
        !stdout.contains("listening"),
        "it must refuse before listening: {stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// A state directory that cannot be created or used stops the start, before listening, with one
/// line naming it; so does a second roam on a directory in use, naming the other process.
#[test]
fn an_unusable_or_busy_state_directory_stops_the_start_with_its_path() {
    let root = Root::new();
    let err = refused(root.path(), &["--state-dir", "/proc/roam-cannot-exist"]);
    assert!(err.contains("/proc/roam-cannot-exist"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let err = refused(root.path(), &["--state-dir", file.to_str().unwrap()]);
    assert!(err.contains("a-file"), "{err}");

    let state = work.path().join("state");
    let first = Roam::start(root.path(), &state, &work.path().join("first.log"), &[]);
    let err = refused(root.path(), &["--state-dir", state.to_str().unwrap()]);
    assert!(
        err.contains(state.to_str().unwrap()) && err.contains(&format!("pid {}", first.child.id())),
        "{err}"
    );
    drop(first);
    // The lock is released with its process: a new one starts at once.
    let again = Roam::start(root.path(), &state, &work.path().join("again.log"), &[]);
    again.mint();
}

/// Sessions part-way on three files, then the server is stopped and its store damaged: table
/// files truncated, or bytes flipped in them and in the journal. A restarted roam either
/// refuses with a message naming the store and what to do, or starts and never resumes a
/// session past what its client acknowledged. Never a panic.
#[test]
fn a_damaged_store_never_resumes_past_what_was_acknowledged() {
    for damage in ["truncate tables", "flip table bytes", "flip journal bytes"] {
        let root = Root::new();
        for f in ["a.bin", "b.bin", "c.bin"] {
            root.file(f, &pattern(4 * MIB, f.len() as u64));
        }
        let work = tempfile::tempdir().unwrap();
        let state = work.path().join("state");
        let log = work.path().join("roam.log");
        let srv = Roam::start(root.path(), &state, &log, &["--shutdown-timeout", "2s"]);
        let id = srv.mint();
        let mut hung = Vec::new();
        for f in ["a.bin", "b.bin", "c.bin"] {
            // A client that stops reading after 1 MiB, holding its connection (a broken path).
            let mut s = TcpStream::connect(srv.addr).unwrap();
            s.write_all(get(&format!("/{id}/{f}")).as_bytes()).unwrap();
            let mut first = vec![0u8; MIB];
            read_head(&mut s).unwrap();
            s.read_exact(&mut first).unwrap();
            hung.push(s);
        }
        for f in ["a.bin", "b.bin", "c.bin"] {
            let target = format!("/{id}/{f}");
            wait_until("progress recorded", Duration::from_secs(10), || {
                offset(srv.addr, &target) >= MIB as u64
            });
        }
        // The server stops; its connections end with its shutdown (what the clients hold is at
        // least what was recorded).
        let status = srv.terminate();
        assert!(status.success());
        drop(hung);
        let store = state.join("store");
        let files: Vec<PathBuf> = walk(&store);
        let tables: Vec<&PathBuf> = files
            .iter()
            .filter(|p| p.components().any(|c| c.as_os_str() == "tables"))
            .collect();
        let journals: Vec<&PathBuf> = files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
            .collect();
        match damage {
            "truncate tables" => {
                for t in &tables {
                    let len = std::fs::metadata(t).unwrap().len();
                    std::fs::File::options()
                        .write(true)
                        .open(t)
                        .unwrap()
                        .set_len(len / 2)
                        .unwrap();
                }
            }
            "flip table bytes" => {
                for t in &tables {
                    flip(t);
                }
            }
            _ => {
                for j in &journals {
                    flip(j);
                }
            }
        }
        let log = work.path().join("restarted.log");
        match Roam::try_start(root.path(), &state, &log, "127.0.0.1:0", &[]) {
            Err(e) => panic!("{damage}: roam must start (the store opens in the background): {e}"),
            Ok(mut srv) => {
                // Either it stops with a message naming the store, or it serves sessions no
                // further than 4 MiB (what any client could have) and never panics.
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    if let Some(status) = srv.child.try_wait().unwrap() {
                        let text = srv.log();
                        assert!(!status.success(), "{damage}: stopped with success?\n{text}");
                        assert!(
                            text.contains(store.to_str().unwrap()) && text.contains("move it away"),
                            "{damage}: the message names the store and what to do:\n{text}"
                        );
                        println!("{damage}: roam refused to start: {status}");
                        break;
                    }
                    if srv.log().contains("session store open") {
                        for f in ["a.bin", "b.bin", "c.bin"] {
                            let o = offset(srv.addr, &format!("/{id}/{f}"));
                            assert!(o <= 4 * MIB as u64, "{damage}: {f} at {o}");
                        }
                        assert!(!srv.log().contains("panicked"), "{}", srv.log());
                        println!("{damage}: roam started and serves (no offset past the file)");
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{damage}: neither served nor refused:\n{}",
                        srv.log()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = srv.child.kill();
            }
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Flips every byte of the middle third of a file's data (its allocated part).
fn flip(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    for b in &mut bytes[used / 3..2 * used / 3] {
        *b = !*b;
    }
    std::fs::write(path, bytes).unwrap();
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

/// The state directory's disk fills up while roam serves: every request is still answered
/// (sessions are kept in memory), the failure is logged once for the whole burst, and when
/// space returns the store catches up: after a graceful restart every session is there.
#[test]
fn a_full_disk_keeps_serving_and_catches_up_when_space_returns() {
    let root = Root::new();
    root.file("a.bin", &pattern(2 * MIB, 60));
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let Some(_fs) = Tmpfs::mount(&state, "16m") else {
        let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        assert!(!ci, "mounting a tmpfs needs root, which CI has");
        println!("skipping: cannot mount a tmpfs (not root?)");
        return;
    };
    let log = work.path().join("roam.log");
    let srv = Roam::start(root.path(), &state, &log, &[]);
    wait_until("the store is open", Duration::from_secs(10), || {
        srv.log().contains("session store open")
    });
    // Fill the file system.
    let ballast = state.join("ballast");
    let mut f = std::fs::File::create(&ballast).unwrap();
    let block = vec![0u8; 1 << 16];
    while f.write_all(&block).is_ok() {}
    drop(f);
    let ids: Vec<String> = (0..20).map(|_| srv.mint()).collect();
    for id in &ids {
        let r = request(srv.addr, &get(&format!("/{id}/a.bin")));
        assert_eq!(
            (r.status, r.body.len()),
            (200, 2 * MIB),
            "served from memory"
        );
    }
    wait_until("the failure is logged", Duration::from_secs(10), || {
        srv.log().contains("cannot write sessions")
    });
    let failures = srv.log().matches("cannot write sessions").count();
    assert_eq!(failures, 1, "one line for the whole burst:\n{}", srv.log());
    std::fs::remove_file(&ballast).unwrap();
    wait_until("the store catches up", Duration::from_secs(10), || {
        srv.log().contains("session store writable again")
    });
    assert!(srv.terminate().success());
    let srv = Roam::start(root.path(), &state, &work.path().join("again.log"), &[]);
    for id in &ids {
        let r = request(srv.addr, &get(&format!("/{id}/a.bin")));
        assert_eq!(
            r.status, 416,
            "a session written after the disk had room again: {r:?}"
        );
    }
    assert!(!srv.log().contains("panicked"));
}
