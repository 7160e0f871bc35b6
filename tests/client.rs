//! `roam get`, black-box: the real binary as a subprocess, against a roam server (or nginx, or a
//! fake server) behind the disruptive proxy. Every test checks the finished file byte for byte.

mod support;

use rand::{Rng, SeedableRng};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::netns::KillOnDrop;
use support::proxy::{Disruption, DisruptiveProxy};
use support::server::{pattern, Root, TestServer};

const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A runtime for the proxy's tasks; the test thread itself stays synchronous and drives
/// subprocesses. Declare it before the proxy so that it is dropped after it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn proxy(
    rt: &tokio::runtime::Runtime,
    upstream: SocketAddr,
    plan: impl Fn(u64) -> Disruption + Send + Sync + 'static,
) -> DisruptiveProxy {
    let _guard = rt.enter();
    DisruptiveProxy::start(upstream, plan)
}

/// A running `roam get`, its stdout and stderr going to files in `logs`.
struct Running {
    child: KillOnDrop,
    stderr: PathBuf,
    started: Instant,
}

/// How a `roam get` ended.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
}

/// Starts `roam get ARGS` in `dir`, with no `ROAM_GET_*` settings inherited.
fn spawn_get(dir: &Path, logs: &Path, tag: &str, args: &[&str]) -> Running {
    let stderr = logs.join(format!("{tag}.stderr"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_roam"));
    cmd.arg("get")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(logs.join(format!("{tag}.stdout"))).unwrap())
        .stderr(File::create(&stderr).unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("ROAM_GET_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd.spawn().expect("spawn roam get");
    Running {
        child: KillOnDrop(child),
        stderr,
        started: Instant::now(),
    }
}

impl Running {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the exit; a run that outlives `limit` is killed and fails the test.
    fn wait(mut self, limit: Duration) -> Finished {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let f = Finished {
                    code: status.code(),
                    stderr: self.stderr(),
                    elapsed: self.started.elapsed(),
                };
                eprintln!("--- roam get stderr ({:?}) ---\n{}", f.elapsed, f.stderr);
                return f;
            }
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "roam get still running after {limit:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL (std's `Child::kill` on Unix), then reap.
    fn sigkill(mut self) -> String {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        self.stderr()
    }
}

fn get(dir: &Path, logs: &Path, tag: &str, args: &[&str], limit: Duration) -> Finished {
    spawn_get(dir, logs, tag, args).wait(limit)
}

/// Polls `cond` every 5 ms until it holds; panics after `limit`.
fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// The parsed final line: `roam get: PATH complete: LEN bytes[, sha-256 verified], RECEIVED
/// bytes received, R reconnects, S restarts`.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    length: u64,
    verified: bool,
    received: u64,
    reconnects: u32,
    restarts: u32,
}

fn summary(stderr: &str) -> Summary {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("roam get: ") && l.contains(" complete: "))
        .unwrap_or_else(|| panic!("no summary line in stderr:\n{stderr}"));
    let rest = line.split_once(" complete: ").unwrap().1;
    let parts: Vec<&str> = rest.split(", ").collect();
    let num = |part: &str, suffix: &str| -> u64 {
        part.strip_suffix(suffix)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read {part:?} in summary {line:?}"))
    };
    let verified = parts.contains(&"sha-256 verified");
    let n = parts.len();
    assert_eq!(n, if verified { 5 } else { 4 }, "summary {line:?}");
    Summary {
        length: num(parts[0], " bytes"),
        verified,
        received: num(parts[n - 3], " bytes received"),
        reconnects: num(parts[n - 2], " reconnects") as u32,
        restarts: num(parts[n - 1], " restarts") as u32,
    }
}

/// `N` in the "resuming PART from byte N" note.
fn resumed_from(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let rest = l.strip_prefix("roam get: resuming ")?;
        rest.rsplit_once(" from byte ")?.1.trim().parse().ok()
    })
}

fn assert_same_file(got: &Path, want: &[u8]) {
    let got_bytes = std::fs::read(got).unwrap_or_else(|e| panic!("{}: {e}", got.display()));
    assert_eq!(got_bytes.len(), want.len(), "{}: length", got.display());
    if got_bytes != want {
        let at = got_bytes
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!(
            "{}: differs from the served file at byte {at}",
            got.display()
        );
    }
}

/// Rewrites `path` in place (same inode, same length) with new content, then gives it an mtime
/// that is different from, and older than, the old one: a change every strong validator built
/// from length and mtime must notice, and that no length check could.
fn change_in_place(path: &Path, data: &[u8]) {
    let old = std::fs::metadata(path).unwrap().modified().unwrap();
    let mut f = File::options()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    f.set_modified(old - Duration::from_secs(3600)).unwrap();
    f.sync_all().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Surviving a bad network
// ---------------------------------------------------------------------------------------------

/// Twenty disruptions in a row, seeded (set `ROAM_TEST_SEED` to replay another run): resets,
/// blackholes and stalls longer than the client's stall timeout, at random downstream offsets,
/// a tenth of them inside or right after the response head. Connection 0 is the client's
/// `GET /` (the ID mint) and is left alone; after the twentieth disruption the network is
/// perfect.
///
/// Each disrupted connection delivers at most 2 MiB, so 20 of them deliver at most 40 MiB of
/// the 50 MiB file: every disruption is reached before the download can finish, and each must
/// cost exactly one reconnect.
///
/// Overhead: `received` counts body bytes the client read, including any it discarded as
/// already on disk. The bound asserted is one TCP window (4 MiB) per disruption, which is what
/// a client might re-download if it resumed from what it *thinks* it has rather than from what
/// is on disk (a proxy's kernel acknowledges bytes it may never forward). But `roam get`
/// always asks `Range: bytes=N-` for N = the part file's length, everything it reads goes to
/// disk at once, and a roam server answers from exactly N, so the real overhead is expected to
/// be zero; it is printed.
#[test]
fn survives_twenty_random_disruptions() {
    const LEN: usize = 50 * MIB;
    const DISRUPTIONS: u64 = 20;
    let seed: u64 = std::env::var("ROAM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2024);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let plan: Vec<Disruption> = (0..DISRUPTIONS)
        .map(|_| {
            let at = if rng.gen_bool(0.1) {
                rng.gen_range(0..600)
            } else {
                rng.gen_range(600..2 * MIB as u64)
            };
            match rng.gen_range(0..3) {
                0 => Disruption::ResetAfter(at),
                1 => Disruption::BlackholeAfter(at),
                _ => Disruption::StallFor {
                    after: at,
                    duration: Duration::from_millis(rng.gen_range(1_500..3_000)),
                },
            }
        })
        .collect();
    println!("seed {seed:#x}, plan for connections 1..={DISRUPTIONS}: {plan:?}");

    let root = Root::new();
    let data = pattern(LEN, 1);
    root.file("file", &data);
    let srv = TestServer::start(root.path());
    let rt = runtime();
    let planned = plan.clone();
    let px = proxy(&rt, srv.addr, move |i| match i {
        0 => Disruption::None,
        i if i <= DISRUPTIONS => planned[(i - 1) as usize],
        _ => Disruption::None,
    });
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let url = format!("http://{}/file", px.addr());
    let run = get(
        dir,
        dir,
        "run",
        &[
            &url,
            "-o",
            "out",
            "--stall-timeout",
            "1s",
            "--max-retry-delay",
            "200ms",
            "--max-time",
            "170s",
        ],
        Duration::from_secs(180),
    );
    assert_eq!(run.code, Some(0), "exit code; stderr:\n{}", run.stderr);
    assert_same_file(&dir.join("out"), &data);
    assert!(!dir.join("out.part").exists() && !dir.join("out.part.roam").exists());
    let s = summary(&run.stderr);
    assert_eq!(s.length, LEN as u64);
    assert!(s.verified, "summary must say sha-256 verified: {s:?}");
    assert_eq!(s.restarts, 0);
    assert_eq!(
        s.reconnects as u64, DISRUPTIONS,
        "every disruption should cost exactly one reconnect"
    );
    let overhead = s.received - LEN as u64;
    println!(
        "RECEIVED {} bytes for a {} byte file: overhead {} bytes over {} disruptions \
         ({} connections; the proxy wrote {} bytes downstream, counting response heads and \
         bytes written after the client had gone)",
        s.received,
        LEN,
        overhead,
        DISRUPTIONS,
        px.connections(),
        px.downstream_bytes()
    );
    assert!(s.received >= LEN as u64);
    assert!(
        overhead <= DISRUPTIONS * 4 * MIB as u64,
        "overhead {overhead} exceeds one 4 MiB window per disruption"
    );
}

/// A 64 MiB download stopped dead with SIGKILL (no chance to save anything), then the same
/// command again: it resumes from the part file's length and downloads only the rest.
#[test]
fn sigkill_and_rerun_resumes() {
    const LEN: usize = 64 * MIB;
    let root = Root::new();
    let data = pattern(LEN, 2);
    root.file("big.bin", &data);
    let srv = TestServer::start(root.path());
    let rt = runtime();
    // Connection 1 (the first download request) delivers 8 MiB and then hangs for a long
    // time: a slow network, killed in the middle.
    let px = proxy(&rt, srv.addr, |i| match i {
        1 => Disruption::StallFor {
            after: 8 * MIB as u64,
            duration: Duration::from_secs(300),
        },
        _ => Disruption::None,
    });
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let url = format!("http://{}/big.bin", px.addr());
    let args = [url.as_str(), "-o", "out.bin", "--max-retry-delay", "200ms"];
    let part = dir.join("out.bin.part");

    let first = spawn_get(dir, dir, "first", &args);
    wait_until(Duration::from_secs(60), "4 MiB in out.bin.part", || {
        file_len(&part) >= 4 * MIB as u64
    });
    let stderr = first.sigkill();
    println!("first run, killed:\n{stderr}");
    let n = file_len(&part);
    assert!(n >= 4 * MIB as u64 && n <= 8 * MIB as u64, "part holds {n}");
    assert!(dir.join("out.bin.part.roam").exists(), "resume state kept");
    assert!(!dir.join("out.bin").exists(), "no output before completion");
    assert_eq!(
        std::fs::read(&part).unwrap()[..],
        data[..n as usize],
        "the part file is a prefix of the file"
    );

    let second = get(dir, dir, "second", &args, Duration::from_secs(120));
    assert_eq!(second.code, Some(0), "stderr:\n{}", second.stderr);
    assert_eq!(
        resumed_from(&second.stderr),
        Some(n),
        "rerun must say it resumes from byte {n}"
    );
    assert_same_file(&dir.join("out.bin"), &data);
    let s = summary(&second.stderr);
    println!(
        "rerun received {} of {LEN} bytes (resumed at {n})",
        s.received
    );
    assert!(s.received < LEN as u64);
    assert_eq!(
        s.received,
        LEN as u64 - n,
        "the rerun reads exactly the missing bytes"
    );
    assert_eq!((s.restarts, s.reconnects), (0, 0));
    assert!(s.verified, "{s:?}");
    drop(px);
}

/// The file changes on the server in the middle of a download: the client must notice (its
/// `If-Range` no longer matches), start over and end with exactly the new file, never the old
/// file's first part followed by the new file's rest. The change is in place, same length,
/// and the new mtime is older than the old one.
#[test]
fn file_changed_mid_download_restarts_never_splices() {
    const LEN: usize = 16 * MIB;
    let root = Root::new();
    let old = pattern(LEN, 3);
    let new = pattern(LEN, 4);
    let path = root.file("doc.bin", &old);
    let srv = TestServer::start(root.path());
    let rt = runtime();
    // Connection 1 delivers 4 MiB, then stalls for longer than the client's stall timeout: the
    // file changes during the stall, and the client's reconnect finds the new version.
    let px = proxy(&rt, srv.addr, |i| match i {
        1 => Disruption::StallFor {
            after: 4 * MIB as u64,
            duration: Duration::from_secs(8),
        },
        _ => Disruption::None,
    });
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let url = format!("http://{}/doc.bin", px.addr());
    let part = dir.join("doc.bin.part");
    let running = spawn_get(
        dir,
        dir,
        "mid",
        &[
            &url,
            "-o",
            "doc.bin",
            "--stall-timeout",
            "3s",
            "--max-retry-delay",
            "200ms",
        ],
    );
    wait_until(Duration::from_secs(60), "2 MiB of the old version", || {
        file_len(&part) >= 2 * MIB as u64
    });
    let t = Instant::now();
    change_in_place(&path, &new);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "changing the file took {:?}: too slow to happen inside the stall",
        t.elapsed()
    );
    let run = running.wait(Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("changed on the server: starting over"),
        "stderr must say it starts over:\n{}",
        run.stderr
    );
    assert_same_file(&dir.join("doc.bin"), &new);
    let s = summary(&run.stderr);
    assert_eq!(s.restarts, 1, "{s:?}");
    assert!(s.verified, "{s:?}");

    // The same, with the change happening while no client is running: SIGKILL, change, rerun.
    let old2 = pattern(LEN, 5);
    let new2 = pattern(LEN, 6);
    let path2 = root.file("doc2.bin", &old2);
    let px2 = proxy(&rt, srv.addr, |i| match i {
        1 => Disruption::StallFor {
            after: 4 * MIB as u64,
            duration: Duration::from_secs(300),
        },
        _ => Disruption::None,
    });
    let url2 = format!("http://{}/doc2.bin", px2.addr());
    let args2 = [
        url2.as_str(),
        "-o",
        "doc2.bin",
        "--max-retry-delay",
        "200ms",
    ];
    let part2 = dir.join("doc2.bin.part");
    let first = spawn_get(dir, dir, "killed", &args2);
    wait_until(Duration::from_secs(60), "2 MiB of doc2", || {
        file_len(&part2) >= 2 * MIB as u64
    });
    first.sigkill();
    let n = file_len(&part2);
    assert_eq!(std::fs::read(&part2).unwrap()[..], old2[..n as usize]);
    change_in_place(&path2, &new2);
    let rerun = get(dir, dir, "rerun", &args2, Duration::from_secs(120));
    assert_eq!(rerun.code, Some(0), "stderr:\n{}", rerun.stderr);
    assert_eq!(resumed_from(&rerun.stderr), Some(n));
    assert!(
        rerun.stderr.contains("starting over"),
        "stderr must say it starts over:\n{}",
        rerun.stderr
    );
    assert_same_file(&dir.join("doc2.bin"), &new2);
    let s = summary(&rerun.stderr);
    assert_eq!(s.restarts, 1, "{s:?}");
    assert!(s.verified, "{s:?}");
}

/// The file is rewritten in place (same inode, same length) while a response is streaming it:
/// the server, reading the same inode, goes on sending the new bytes under the old ETag, so the
/// client receives the old version's first part and the new version's rest in one response.
/// No request or validator can prevent that; what must not happen is `roam get` accepting the
/// result. Acceptable outcomes: exit 0 with exactly one version (it noticed the ETag change
/// and started over), or exit 5 (the digest caught it) with no output, after which running the
/// same command again must recover and end with the new file.
///
/// `digest_ready`: whether the server already has the old version's `Repr-Digest` when the
/// download starts (so the client holds it) or is still computing it (so the client can only
/// ask for it at the end, when the server has another version).
fn rewrite_while_streaming(digest_ready: bool) {
    const LEN: usize = 16 * MIB;
    let root = Root::new();
    let old = pattern(LEN, 9);
    let new = pattern(LEN, 10);
    let path = root.file("live.bin", &old);
    let srv = TestServer::start(root.path());
    if digest_ready {
        let head = format!(
            "HEAD /{}/live.bin HTTP/1.1\r\nHost: test\r\n\r\n",
            srv.mint()
        );
        wait_until(Duration::from_secs(60), "the server's digest", || {
            support::server::request(srv.addr, &head)
                .header("repr-digest")
                .is_some()
        });
    }
    let rt = runtime();
    // A pause shorter than the client's stall timeout: the client keeps the connection, and
    // the server's sendfile resumes from the same inode after the rewrite.
    let px = proxy(&rt, srv.addr, |i| match i {
        1 => Disruption::StallFor {
            after: 4 * MIB as u64,
            duration: Duration::from_secs(2),
        },
        _ => Disruption::None,
    });
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let url = format!("http://{}/live.bin", px.addr());
    let args = [url.as_str(), "-o", "live.bin", "--stall-timeout", "10s"];
    let part = dir.join("live.bin.part");
    let running = spawn_get(dir, dir, "live", &args);
    wait_until(Duration::from_secs(60), "2 MiB of the old version", || {
        file_len(&part) >= 2 * MIB as u64
    });
    change_in_place(&path, &new);
    let run = running.wait(Duration::from_secs(120));
    let out = dir.join("live.bin");
    match run.code {
        Some(0) => {
            let got = std::fs::read(&out).unwrap();
            assert!(
                got == new || got == old,
                "exit 0 with a file that is neither version: it is the old version up to byte \
                 {:?}, then the new one; stderr:\n{}",
                got.iter().zip(&old).position(|(a, b)| a != b),
                run.stderr
            );
        }
        Some(5) => {
            assert!(!out.exists(), "exit 5 must not leave an output file");
            let rerun = get(dir, dir, "live-rerun", &args, Duration::from_secs(120));
            assert_eq!(
                rerun.code,
                Some(0),
                "after an integrity failure caused by a changed file, running the same command \
                 again must recover; stderr:\n{}",
                rerun.stderr
            );
            assert_same_file(&out, &new);
        }
        other => panic!("exit {other:?}; stderr:\n{}", run.stderr),
    }
}

#[test]
fn file_rewritten_in_place_while_streaming_is_never_accepted_spliced() {
    rewrite_while_streaming(false);
}

#[test]
fn file_rewritten_in_place_while_streaming_with_known_digest_recovers_on_rerun() {
    rewrite_while_streaming(true);
}

// ---------------------------------------------------------------------------------------------
// A plain Range server: nginx
// ---------------------------------------------------------------------------------------------

/// Against nginx (standard ranges, its own ETags, no Repr-Digest, no roam IDs), through a
/// proxy that resets four connections, one of them inside the response head: the file is
/// exact, no ID was minted, and the client says it could only check the length.
#[test]
fn works_against_nginx_with_plain_ranges() {
    let Some(bin) = support::nginx::nginx_or_skip() else {
        return;
    };
    const LEN: usize = 8 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let www = tmp.path().join("www");
    std::fs::create_dir(&www).unwrap();
    let data = pattern(LEN, 7);
    std::fs::write(www.join("file"), &data).unwrap();
    let nginx = support::nginx::Nginx::start(
        &bin,
        |dir| {
            format!(
                "access_log {}/access.log;\ndefault_type application/octet-stream;",
                dir.display()
            )
        },
        &format!("root {};", www.display()),
    );

    let rt = runtime();
    let resets = [
        Disruption::ResetAfter(MIB as u64),
        Disruption::ResetAfter(100),
        Disruption::ResetAfter(5 * MIB as u64 / 2),
        Disruption::ResetAfter(700 * 1024),
    ];
    let px = proxy(&rt, nginx.addr, move |i| match i {
        // Connection 0 is the client's probe `GET /` (nginx: 403, not roam).
        1..=4 => resets[(i - 1) as usize],
        _ => Disruption::None,
    });
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let url = format!("http://{}/file", px.addr());
    let run = get(
        dir,
        dir,
        "nginx",
        &[&url, "-o", "file", "--max-retry-delay", "200ms"],
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(0), "stderr:\n{}", run.stderr);
    assert_same_file(&dir.join("file"), &data);
    assert!(
        !run.stderr.contains("minted"),
        "no roam ID against nginx:\n{}",
        run.stderr
    );
    let s = summary(&run.stderr);
    assert_eq!(s.reconnects, 4, "{s:?}");
    assert!(!s.verified, "nginx sends no Repr-Digest: {s:?}");
    assert!(run.stderr.contains("no sha-256 Repr-Digest"));
    assert_eq!(s.received, LEN as u64, "no byte read twice");
    println!("nginx access log:\n{}", nginx.access_log());
    drop(px);
}

// ---------------------------------------------------------------------------------------------
// Exit codes
// ---------------------------------------------------------------------------------------------

#[test]
fn server_refusal_exits_3() {
    let root = Root::new();
    root.file("present.txt", b"here");
    let srv = TestServer::start(root.path());
    let work = tempfile::tempdir().unwrap();
    let url = format!("{}/absent.txt", srv.url());
    let run = get(
        work.path(),
        work.path(),
        "404",
        &[&url, "-o", "out"],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(3), "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("404"), "{}", run.stderr);
    assert!(!work.path().join("out").exists());
}

#[test]
fn gave_up_exits_4() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/file");
    let run = get(
        work.path(),
        work.path(),
        "nothing",
        &[
            &url,
            "-o",
            "out",
            "--retries",
            "2",
            "--max-retry-delay",
            "50ms",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(4), "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("gave up"), "{}", run.stderr);
    assert!(run.elapsed < Duration::from_secs(10), "{:?}", run.elapsed);
    assert!(!work.path().join("out").exists());
}

/// A tiny HTTP server that serves `body` at any path but `/` (404, so not roam), honouring
/// `Range: bytes=N-`, with a strong ETag and a `Repr-Digest` that is not the body's.
fn lying_server(body: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut from = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("range") {
                        from = value
                            .trim()
                            .strip_prefix("bytes=")
                            .and_then(|v| v.strip_suffix('-'))
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                    }
                }
            }
            let mut words = request_line.split(' ');
            let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let len = body.len();
            let head = if target == "/" {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned()
            } else {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
                     Content-Range: bytes {from}-{}/{len}\r\nETag: \"v1\"\r\n\
                     Repr-Digest: sha-256=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:\r\n\
                     Connection: close\r\n\r\n",
                    len - from,
                    len - 1
                )
            };
            let _ = conn.write_all(head.as_bytes());
            if method == "GET" && target != "/" {
                let _ = conn.write_all(&body[from..]);
            }
            let _ = conn.flush();
        }
    });
    addr
}

#[test]
fn integrity_failure_exits_5_and_keeps_part() {
    let body = pattern(300 * 1024, 8);
    let addr = lying_server(body.clone());
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let url = format!("http://{addr}/file.bin");
    let run = get(
        dir,
        dir,
        "liar",
        &[&url, "-o", "out"],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(5), "stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains("integrity check failed"),
        "{}",
        run.stderr
    );
    assert!(
        !dir.join("out").exists(),
        "an unverified file is not renamed"
    );
    assert_same_file(&dir.join("out.part"), &body);
}

#[test]
fn usage_error_exits_2() {
    let work = tempfile::tempdir().unwrap();
    let run = get(
        work.path(),
        work.path(),
        "ftp",
        &["ftp://127.0.0.1:1/file", "-o", "out"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(2), "stderr:\n{}", run.stderr);
    assert!(run.stderr.contains("http://"), "{}", run.stderr);
    assert!(!work.path().join("out.part").exists());
    // Unknown flags are usage errors too (clap).
    let run = get(
        work.path(),
        work.path(),
        "flag",
        &["http://127.0.0.1:1/file", "--no-such-flag"],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(2), "stderr:\n{}", run.stderr);
}
