//! Real download clients against the real `roam` binary, each test on its own server and file:
//!
//! - every resuming client (curl, wget, wget2, aria2c with one and with four connections, lftp,
//!   axel, httpie) is SIGKILLed part-way and run again with its resume option: the result must
//!   be the file byte for byte, or the client must fail loudly (a non-zero exit), never a wrong
//!   file with exit 0;
//! - a fresh client (curl, wget2, Python urllib) on a URL whose previous client was killed gets
//!   the whole file with `200`;
//! - the seed's scenario, `curl URL > f` killed and then `curl URL >> f`, never loses bytes.
//!
//! Why these pass: a client killed with bytes unread in its socket resets the connection, and
//! roam then answers the next request without `Range` with `200` and the whole file (the client
//! may have lost acknowledged bytes; docs/PROTOCOL.md, "When a request without Range resumes"),
//! while a request with `Range: bytes=N-` is always answered from N.
//!
//! A missing tool fails its test under `CI=true` (scripts/test.sh installs them all) and skips
//! it otherwise. Run with `cargo test --test clients -- --nocapture` to see one `client:` line
//! per test: where the kill landed, the rerun's exit, whether the file was exact, the statuses
//! roam logged and the requests the tool showed.

mod support;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::netns::KillOnDrop;
use support::server::{get, pattern, request, Root};

const MIB: u64 = 1024 * 1024;
/// The file for rate-limited clients: 24 s at `RATE`, so a kill after `KILL_AFTER` lands
/// mid-download.
const LEN: usize = 48 * MIB as usize;
/// The file for clients without a rate limit (wget2 1.99 has no `--limit-rate`, httpie none):
/// they run at hundreds of MB/s on loopback, so the file is large enough that the kill after
/// `KILL_AFTER` still lands early.
const FAST_LEN: usize = 256 * MIB as usize;
/// The first run's rate limit, in bytes per second (each tool's own spelling of 2 MiB/s).
const RATE: u64 = 2 * MIB;
/// Kill once the first run has saved at least this much.
const KILL_AFTER: u64 = 4 * MIB;
/// How often waits poll.
const POLL: Duration = Duration::from_millis(2);
/// Bound on any single wait or run.
const LIMIT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Whether `tool` can run; panics under `CI=true` when it cannot.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required under CI=true (scripts/test.sh installs it)"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    ok
}

/// Polls `ready` every `POLL` until it holds; panics after `LIMIT`, or when `gone` reports
/// that what is awaited cannot happen any more (returning why).
fn wait_for(what: &str, mut ready: impl FnMut() -> bool, mut gone: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + LIMIT;
    while !ready() {
        if let Some(why) = gone() {
            panic!("waiting for {what}: {why}");
        }
        assert!(Instant::now() < deadline, "no {what} after {LIMIT:?}");
        std::thread::sleep(POLL);
    }
}

/// Bytes of `path` written so far: its length, or its allocated blocks when fewer (a client
/// that writes segments at their offsets leaves a sparse file as long as its last segment).
fn written(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len().min(m.blocks() * 512))
}

/// The lines of a client's console or log that show its requests and the answers: request
/// lines, `Range`, status lines and `Content-Range`, with the markers curl (`> `, `< `) and
/// lftp (`---> `, `<--- `) put before them removed.
fn exchanges(text: &str) -> Vec<String> {
    const SHOWN: [&str; 5] = ["GET ", "HEAD ", "Range:", "HTTP/1.", "Content-Range:"];
    text.lines()
        .filter_map(|line| {
            let mut l = line.trim();
            if let Some(i) = l.find("---> ").or_else(|| l.find("<--- ")) {
                l = &l[i + 5..];
            } else if let Some(rest) = l.strip_prefix("> ").or_else(|| l.strip_prefix("< ")) {
                l = rest;
            }
            let l = l.trim();
            SHOWN
                .iter()
                .any(|s| l.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s)))
                .then(|| l.to_owned())
        })
        .collect()
}

/// Where `got` departs from `want`, and where in `want` the bytes from there on come from.
fn difference(got: &[u8], want: &[u8]) -> String {
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let mut s = format!(
        "{} bytes, want {}; first difference at byte {first}",
        got.len(),
        want.len()
    );
    if let Some(probe) = got.get(first..first + 64) {
        if let Some(src) = want.windows(64).position(|w| w == probe) {
            s.push_str(&format!(
                "; from there on it holds the file's bytes from {src}"
            ));
        }
    }
    s
}

/// The `roam` binary serving a folder, logging each response's status (`RUST_LOG=roam=debug`)
/// to a file. Killed when dropped.
struct Server {
    addr: SocketAddr,
    log: PathBuf,
    _child: KillOnDrop,
    /// The server's state directory (sessions on disk, the ID secret).
    _state: tempfile::TempDir,
}

impl Server {
    /// Starts `roam serve` on 127.0.0.1:0 and waits (bounded) for its `roam listening on` line.
    /// The idle timeout is short because aria2c waits for the server to close a finished
    /// keep-alive connection.
    fn start(root: &Path, log: PathBuf) -> Server {
        let state = tempfile::tempdir().unwrap();
        let mut child = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_roam"))
                .arg("serve")
                .arg("--root")
                .arg(root)
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--idle-timeout",
                    "2s",
                    "--state-dir",
                ])
                .arg(state.path())
                .env("RUST_LOG", "roam=debug")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(fs::File::create(&log).unwrap())
                .spawn()
                .expect("start roam"),
        );
        // A thread reads stdout to its end, so the server never writes to a closed pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "roam did not start:\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let addr = line
            .trim()
            .strip_prefix("roam listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line from roam: {line:?}"))
            .parse()
            .unwrap();
        Server {
            addr,
            log,
            _child: child,
            _state: state,
        }
    }

    /// A new client ID (`GET /`).
    fn mint(&self) -> String {
        let resp = request(self.addr, &get("/"));
        assert_eq!(resp.status, 200, "mint: {resp:?}");
        String::from_utf8(resp.body).unwrap()
    }

    /// `Roam-Offset` of a `HEAD`: where a request without `Range` would start.
    fn roam_offset(&self, target: &str) -> u64 {
        let resp = request(
            self.addr,
            &format!("HEAD {target} HTTP/1.1\r\nHost: test\r\n\r\n"),
        );
        resp.header("Roam-Offset")
            .unwrap_or_else(|| panic!("no Roam-Offset: {resp:?}"))
            .parse()
            .unwrap()
    }

    /// The statuses roam logged for requests to `target`, in order (a `HEAD` logs as 200).
    fn statuses(&self, target: &str) -> Vec<u16> {
        let needle = format!("target={target} ");
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| l.split("status=").nth(1)?.trim().parse().ok())
            .collect()
    }
}

/// One test's world: a served file of `pattern` bytes, a server, a client ID and a folder the
/// clients run in (also their `$HOME`, so they keep no state between tests).
struct Case {
    data: Vec<u8>,
    server: Server,
    /// `/{id}/big.bin`
    target: String,
    url: String,
    dir: tempfile::TempDir,
    _root: Root,
}

impl Case {
    fn new(len: usize, seed: u64) -> Case {
        let root = Root::new();
        let data = pattern(len, seed);
        root.file("big.bin", &data);
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(root.path(), dir.path().join("roam.log"));
        let target = format!("/{}/big.bin", server.mint());
        let url = format!("http://{}{target}", server.addr);
        Case {
            data,
            server,
            target,
            url,
            dir,
            _root: root,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `program` to run in the case's folder, with that folder as `$HOME`.
    fn tool(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.current_dir(self.dir.path()).env("HOME", self.dir.path());
        c
    }

    /// Starts `cmd` with stdin closed and its output going to the file `{label}.console`.
    fn spawn(&self, cmd: &mut Command, label: &str) -> (KillOnDrop, PathBuf) {
        let console = self.path(&format!("{label}.console"));
        let f = fs::File::create(&console).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        (KillOnDrop(child), console)
    }

    /// Runs `cmd` to its end (at most `LIMIT`): its exit status and console output.
    fn run(&self, cmd: &mut Command, label: &str) -> (ExitStatus, String) {
        let (mut child, console) = self.spawn(cmd, label);
        let mut status = None;
        wait_for(
            &format!("{label} to finish"),
            || {
                status = child.try_wait().unwrap();
                status.is_some()
            },
            || None,
        );
        (
            status.unwrap(),
            fs::read_to_string(&console).unwrap_or_default(),
        )
    }

    /// Runs `cmd` and SIGKILLs it as soon as `progress()` reaches `KILL_AFTER`; returns that
    /// progress after the kill. Panics if the client ends first.
    fn kill_midway(&self, cmd: &mut Command, label: &str, progress: impl Fn() -> u64) -> u64 {
        let (mut child, console) = self.spawn(cmd, label);
        wait_for(
            &format!("{label} to save {KILL_AFTER} bytes"),
            || progress() >= KILL_AFTER,
            || {
                let status = child.try_wait().unwrap()?;
                Some(format!(
                    "it ended first ({status}):\n{}",
                    fs::read_to_string(&console).unwrap_or_default()
                ))
            },
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        progress()
    }

    /// The statuses roam logged for this case's file.
    fn statuses(&self) -> Vec<u16> {
        self.server.statuses(&self.target)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. SIGKILL, then the same client with its resume option
// ---------------------------------------------------------------------------------------------

/// A resuming client, as the resume tests run it.
struct Client {
    /// The program (for `have`).
    program: &'static str,
    /// The served file's size: `LEN` for a rate-limited client, `FAST_LEN` for one without.
    len: usize,
    seed: u64,
    /// The command with its resume option; `Some(rate)` adds the tool's rate limit (bytes/s).
    command: fn(&Case, Option<u64>) -> Command,
    /// What the killed run saved, by the client's own measure (its output, or its state file).
    progress: fn(&Case) -> u64,
    /// The client's log file in the case folder, if it writes one besides its console.
    log: Option<&'static str>,
}

/// Runs `client` rate-limited (or on a large file), SIGKILLs it once it saved `KILL_AFTER`
/// bytes, and runs it again without a limit. The file `big.bin` must then be exact, or the
/// rerun must exit non-zero; a wrong file with exit 0 fails the test.
fn killed_then_resumed(label: &str, client: Client) {
    if !have(client.program) {
        return;
    }
    let case = Case::new(client.len, client.seed);
    let out = case.path("big.bin");
    let rate = (client.len == LEN).then_some(RATE);
    let killed_at = case.kill_midway(&mut (client.command)(&case, rate), "first", || {
        (client.progress)(&case)
    });
    assert!(
        fs::read(&out).map_or(true, |d| d != case.data),
        "{label}: the kill landed after the download had finished"
    );
    let offset = case.server.roam_offset(&case.target);
    if let Some(log) = client.log {
        let _ = fs::remove_file(case.path(log)); // the rerun's requests only
    }
    let (status, console) = case.run(&mut (client.command)(&case, None), "rerun");
    let log = client
        .log
        .map(|l| fs::read_to_string(case.path(l)).unwrap_or_default())
        .unwrap_or_default();
    let requests = exchanges(&format!("{console}\n{log}"));
    let got = fs::read(&out).unwrap_or_default();
    let exact = got == case.data;
    eprintln!(
        "client: {label}: killed at {killed_at} bytes saved (Roam-Offset then {offset}); rerun \
         {status}, {}; roam answered {:?}; rerun showed {requests:?}",
        if exact { "exact" } else { "NOT exact" },
        case.statuses(),
    );
    assert!(
        exact || !status.success(),
        "{label}: the rerun exited 0 with a wrong file ({}).\nroam answered {:?}\nrerun \
         requests {requests:#?}\nconsole:\n{console}",
        difference(&got, &case.data),
        case.statuses(),
    );
}

/// `curl -C -` sends `Range: bytes=N-` with N the size of its output: a declared position,
/// always exact.
#[test]
fn curl_c_resumes_after_sigkill() {
    killed_then_resumed(
        "curl -C -",
        Client {
            program: "curl",
            len: LEN,
            seed: 1,
            command: |case, rate| {
                let mut c = case.tool("curl");
                c.args(["-sS", "-v", "-C", "-", "-o", "big.bin"]);
                if let Some(rate) = rate {
                    c.args(["--limit-rate", &rate.to_string()]);
                }
                c.arg(&case.url);
                c
            },
            progress: |case| written(&case.path("big.bin")),
            log: None,
        },
    );
}

/// `wget -c` sends `Range: bytes=N-` with N the size of its output, like curl.
#[test]
fn wget_c_resumes_after_sigkill() {
    killed_then_resumed(
        "wget -c",
        Client {
            program: "wget",
            len: LEN,
            seed: 2,
            command: |case, rate| {
                let mut c = case.tool("wget");
                c.args(["-c", "-d", "--progress=dot:giga", "-O", "big.bin"]);
                if let Some(rate) = rate {
                    c.arg(format!("--limit-rate={rate}"));
                }
                c.arg(&case.url);
                c
            },
            progress: |case| written(&case.path("big.bin")),
            log: None,
        },
    );
}

/// `wget2 -c` (saving under the URL's name: wget2 1.99 ignores `-c` with `-O`) sends
/// `Range: bytes=N-`. wget2 1.99 has no `--limit-rate`, so it runs on the large file and is
/// killed early.
#[test]
fn wget2_c_resumes_after_sigkill() {
    killed_then_resumed(
        "wget2 -c",
        Client {
            program: "wget2",
            len: FAST_LEN,
            seed: 3,
            command: |case, _| {
                let mut c = case.tool("wget2");
                c.args(["-c", "-d", "--progress=none"]).arg(&case.url);
                c
            },
            progress: |case| written(&case.path("big.bin")),
            log: None,
        },
    );
}

/// `aria2c --continue` with a rate limit: the first request of each run is a `GET` without
/// `Range`.
fn aria2c(case: &Case, rate: Option<u64>, connections: &str) -> Command {
    let mut c = case.tool("aria2c");
    c.args([
        "--continue=true",
        "-x",
        connections,
        "-s",
        connections,
        // The file grows as it downloads (the default preallocates it), so progress shows.
        "--file-allocation=none",
        "--console-log-level=warn",
        "--summary-interval=0",
        "--log-level=info",
        "-l",
        "aria2c.log",
        "-o",
        "big.bin",
    ]);
    if let Some(rate) = rate {
        c.arg(format!("--max-overall-download-limit={rate}"));
    }
    c.arg(&case.url);
    c
}

/// aria2c with one connection. Killed before its first control-file save, its rerun asks
/// without `Range` and takes the body as the file from byte 0: roam must answer `200` (the kill
/// reset the connection), not a `206` from the acknowledged offset, or the file is corrupt with
/// exit 0 (what tests/interop.rs measured before the reset rule).
#[test]
fn aria2c_single_connection_resumes_after_sigkill() {
    killed_then_resumed(
        "aria2c -x1 -s1",
        Client {
            program: "aria2c",
            len: LEN,
            seed: 4,
            command: |case, rate| aria2c(case, rate, "1"),
            progress: |case| written(&case.path("big.bin")),
            log: Some("aria2c.log"),
        },
    );
}

/// aria2c with four connections: a `GET` without `Range` for the first segment and closed
/// ranges (`bytes=A-B`) for the others, which write at their offsets (a sparse file, so
/// progress counts allocated blocks).
#[test]
fn aria2c_segmented_resumes_after_sigkill() {
    killed_then_resumed(
        "aria2c -x4 -s4",
        Client {
            program: "aria2c",
            len: LEN,
            seed: 5,
            command: |case, rate| aria2c(case, rate, "4"),
            progress: |case| written(&case.path("big.bin")),
            log: Some("aria2c.log"),
        },
    );
}

/// Bytes lftp's `pget` recorded as done in `big.bin.lftp-pget-status` (`N.pos=`/`N.limit=`
/// lines; chunk N starts at chunk N-1's limit). pget preallocates the whole file, so its
/// size says nothing.
fn lftp_progress(case: &Case) -> u64 {
    let text = fs::read_to_string(case.path("big.bin.lftp-pget-status")).unwrap_or_default();
    let value = |key: String| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
    };
    let (mut done, mut start) = (0, 0);
    for n in 0.. {
        let (Some(pos), Some(limit)) = (value(format!("{n}.pos=")), value(format!("{n}.limit=")))
        else {
            break;
        };
        done += pos.saturating_sub(start);
        start = limit;
    }
    done
}

/// `lftp pget -n 4 -c`: chunk 0 is a `GET` without `Range` in the first run; on resume every
/// chunk asks from its recorded position (`bytes=N-` for chunk 0, closed ranges for the
/// others). The status file is saved every second (default 10 s) so the rerun has progress to
/// resume from.
#[test]
fn lftp_pget_resumes_after_sigkill() {
    killed_then_resumed(
        "lftp pget -n 4 -c",
        Client {
            program: "lftp",
            len: LEN,
            seed: 6,
            command: |case, rate| {
                let mut script = String::from("debug -o lftp.log 5; set pget:save-status 1s; ");
                if let Some(rate) = rate {
                    script.push_str(&format!("set net:limit-total-rate {rate}; "));
                }
                script.push_str(&format!("pget -n 4 -c {}", case.url));
                let mut c = case.tool("lftp");
                c.arg("-c").arg(script);
                c
            },
            progress: lftp_progress,
            log: Some("lftp.log"),
        },
    );
}

/// Bytes axel's state file `big.bin.st` records as downloaded. Layout written by axel 2.17 on
/// x86-64: the connection count (u16), bytes done (i64), then each connection's current and
/// last byte (i64 each), native byte order. A file of another length (axel writes it field by
/// field, so a read can catch it half-written) counts as 0.
fn axel_progress(case: &Case) -> u64 {
    let b = fs::read(case.path("big.bin.st")).unwrap_or_default();
    if b.len() < 10 || b.len() != 10 + 16 * u16::from_ne_bytes([b[0], b[1]]) as usize {
        return 0;
    }
    i64::from_ne_bytes(b[2..10].try_into().unwrap()) as u64
}

/// `axel -n 4`: probes with `Range: bytes=0-`, then closed ranges per connection; rerun, it
/// resumes from its `.st` state file, saved every second (`save_state_interval` in
/// `$HOME/.axelrc`; default 10 s).
#[test]
fn axel_resumes_after_sigkill() {
    killed_then_resumed(
        "axel -n 4",
        Client {
            program: "axel",
            len: LEN,
            seed: 7,
            command: |case, rate| {
                fs::write(case.path(".axelrc"), "save_state_interval = 1\n").unwrap();
                let mut c = case.tool("axel");
                c.args(["-n", "4", "-q"]);
                if let Some(rate) = rate {
                    c.args(["-s", &rate.to_string()]);
                }
                c.arg(&case.url);
                c
            },
            progress: axel_progress,
            log: None,
        },
    );
}

/// `http --download --continue -o big.bin` (HTTPie) sends `Range: bytes=N-` and checks the
/// `206`'s `Content-Range`. It has no rate limit: large file, early kill.
#[test]
fn httpie_continue_resumes_after_sigkill() {
    killed_then_resumed(
        "http --download --continue",
        Client {
            program: "http",
            len: FAST_LEN,
            seed: 8,
            command: |case, _| {
                let mut c = case.tool("http");
                // Without --ignore-stdin HTTPie sends its (empty) stdin as a POST body.
                c.args([
                    "--ignore-stdin",
                    "--verbose",
                    "--download",
                    "--continue",
                    "-o",
                    "big.bin",
                    "GET",
                ])
                .arg(&case.url);
                c
            },
            progress: |case| written(&case.path("big.bin")),
            log: None,
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A fresh client after a killed one
// ---------------------------------------------------------------------------------------------

/// Kills a rate-limited plain `curl -o part` part-way (which resets its connection), then runs
/// `fresh`, a client that knows nothing of it, on the same URL: it must get `200` and the whole
/// file. `fresh` returns its exit status and the status it received; it writes `new`.
fn fresh_after_a_killed_curl(
    program: &str,
    seed: u64,
    fresh: impl FnOnce(&Case) -> (ExitStatus, Option<u16>, String),
) {
    if !have("curl") || !have(program) {
        return;
    }
    let case = Case::new(LEN, seed);
    let part = case.path("part");
    let mut killed = case.tool("curl");
    killed
        .args(["-sS", "--limit-rate", &RATE.to_string(), "-o"])
        .arg(&part)
        .arg(&case.url);
    let killed_at = case.kill_midway(&mut killed, "killed", || written(&part));
    let offset = case.server.roam_offset(&case.target);
    let (status, got_status, console) = fresh(&case);
    let got = fs::read(case.path("new")).unwrap_or_default();
    eprintln!(
        "client: fresh {program} after a killed curl (killed at {killed_at}, Roam-Offset then \
         {offset}): {status}, status {got_status:?}, {}; roam answered {:?}",
        if got == case.data {
            "exact"
        } else {
            "NOT exact"
        },
        case.statuses(),
    );
    assert!(status.success(), "fresh {program}: {status}\n{console}");
    assert_eq!(got_status, Some(200), "fresh {program}:\n{console}");
    assert!(
        got == case.data,
        "fresh {program}: {}\n{console}",
        difference(&got, &case.data)
    );
}

/// The status line of the last response among `exchanges`.
fn last_status(text: &str) -> Option<u16> {
    exchanges(text)
        .iter()
        .rev()
        .find(|l| l.starts_with("HTTP/1."))
        .and_then(|l| l.split(' ').nth(1)?.parse().ok())
}

/// A fresh `curl -o new` (no `Range`) after a killed curl gets `200` and the whole file.
#[test]
fn fresh_curl_after_a_killed_curl_gets_the_whole_file() {
    fresh_after_a_killed_curl("curl", 11, |case| {
        let mut c = case.tool("curl");
        c.args(["-sS", "-D", "new.head", "-o", "new"])
            .arg(&case.url);
        let (status, console) = case.run(&mut c, "fresh");
        let head = fs::read_to_string(case.path("new.head")).unwrap_or_default();
        (status, last_status(&head), format!("{console}\n{head}"))
    });
}

/// A fresh `wget2 -O new` after a killed curl gets `200` and the whole file.
#[test]
fn fresh_wget2_after_a_killed_curl_gets_the_whole_file() {
    fresh_after_a_killed_curl("wget2", 12, |case| {
        let mut c = case.tool("wget2");
        c.args(["-d", "--progress=none", "-O", "new"])
            .arg(&case.url);
        let (status, console) = case.run(&mut c, "fresh");
        (status, last_status(&console), console)
    });
}

/// Python's `urllib.request.urlopen(url).read()`, written to a file, after a killed curl gets
/// `200` and the whole file.
#[test]
fn fresh_python_urllib_after_a_killed_curl_gets_the_whole_file() {
    const SCRIPT: &str = "import sys, urllib.request\n\
        with urllib.request.urlopen(sys.argv[1]) as r:\n\
        \x20   body = r.read()\n\
        \x20   print(r.status)\n\
        open(sys.argv[2], 'wb').write(body)\n";
    fresh_after_a_killed_curl("python3", 13, |case| {
        // Not case.tool: python3 may be a pyenv shim that finds its interpreter through $HOME.
        let mut c = Command::new("python3");
        c.current_dir(case.dir.path())
            .args(["-c", SCRIPT])
            .arg(&case.url)
            .arg("new");
        let (status, console) = case.run(&mut c, "fresh");
        let got = console.lines().next().and_then(|l| l.trim().parse().ok());
        (status, got, console)
    });
}

// ---------------------------------------------------------------------------------------------
// 3. The seed's scenario: `curl URL > f`, killed, then `curl URL >> f`
// ---------------------------------------------------------------------------------------------

/// `curl $URL > f` rate-limited and SIGKILLed, then `curl $URL >> f`: f must never miss a
/// byte. The kill resets the connection with bytes unread, so curl may have lost bytes its TCP
/// acknowledged (its socket buffer, its own stdio buffer); a `206` from the acknowledged offset
/// would leave a hole. roam answers the second curl, which sends no `Range`, with `200` and the
/// whole file instead: f = (the first curl's partial prefix) + (the whole file), a repeat that
/// the `200` announces, never a gap. So f's tail is the file and f's head a prefix of it.
#[test]
fn curl_appending_after_a_killed_curl_repeats_never_skips() {
    if !have("curl") {
        return;
    }
    let case = Case::new(LEN, 21);
    let f = case.path("f");
    // The seed's command lines; `exec`, so that the kill reaches curl itself.
    let shell = |line: &str| {
        let mut c = case.tool("sh");
        c.args(["-c", &format!("exec {line}"), "sh", &case.url]);
        c
    };
    let mut first = shell(&format!("curl -sS --limit-rate {RATE} \"$1\" > f"));
    let killed_at = case.kill_midway(&mut first, "first", || written(&f));
    let offset = case.server.roam_offset(&case.target);
    let mut second = shell("curl -sS -D second.head \"$1\" >> f");
    let (status, console) = case.run(&mut second, "second");
    let head = fs::read_to_string(case.path("second.head")).unwrap_or_default();
    let got = fs::read(&f).unwrap();
    let repeated = got.len().saturating_sub(case.data.len());
    eprintln!(
        "client: curl > f killed at {killed_at} (Roam-Offset then {offset}), then curl >> f: \
         {status}, status {:?}, f = {repeated} repeated bytes + the file: {}; roam answered {:?}",
        last_status(&head),
        got.len() >= case.data.len()
            && got[repeated..] == case.data[..]
            && got[..repeated] == case.data[..repeated],
        case.statuses(),
    );
    assert!(status.success(), "curl >> f: {status}\n{console}");
    assert_eq!(last_status(&head), Some(200), "curl >> f:\n{head}");
    assert!(
        got.len() >= case.data.len(),
        "f is shorter than the file: {}",
        difference(&got, &case.data)
    );
    assert!(
        got[repeated..] == case.data[..],
        "f's tail is not the whole file: {}",
        difference(&got[repeated..], &case.data)
    );
    assert!(
        got[..repeated] == case.data[..repeated],
        "f's head ({repeated} bytes) is not a prefix of the file: {}",
        difference(&got[..repeated], &case.data[..repeated])
    );
}
