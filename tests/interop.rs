//! Real download tools against roam: a download is SIGKILLed part-way and resumed with the
//! same command, and the result must be the file, byte for byte.
//!
//! A missing tool fails the test under `CI=true` (scripts/test.sh installs them) and is
//! otherwise skipped with a message.
//!
//! Measured with curl 7.88, wget 1.21 and aria2c 1.36:
//! - `curl -C -` and `wget -c` send `Range: bytes=N-` (N = the partial file's size) without
//!   `If-Range`: they declare their position, so roam's session follows them. On a complete
//!   file they get 416 and exit 0 leaving the file alone.
//! - aria2c first sends a GET *without* Range. When roam answers that request with a 206 from
//!   the session's offset, aria2c may take the body as the file's first bytes: see
//!   `aria2c_finding_range_less_get_answered_from_the_session`.

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::server::*;

const MIB: u64 = 1024 * 1024;
/// About 30 MB: long enough at 2 MB/s that a kill after a few MB lands mid-download.
const LEN: u64 = 30 * MIB;
/// Kill once the output file holds at least this much.
const KILL_AFTER: u64 = 3 * MIB;

/// The tools run one at a time: throttled transfers and kill timing on two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether `tool` can run; panics under `CI=true` when it cannot.
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
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

/// A served 30 MiB file, a client ID and an empty download folder.
struct Setup {
    _root: Root,
    _server: TestServer,
    data: Vec<u8>,
    dir: tempfile::TempDir,
    url: String,
    /// Numbers the output files of the tool runs.
    runs: std::cell::Cell<u32>,
}

impl Setup {
    fn new(seed: u64) -> Setup {
        // A short idle timeout: aria2c waits on a finished keep-alive body until the server
        // closes (see the aria2c finding); the other tools close themselves.
        Self::with_config(seed, |c| c.idle_timeout = Duration::from_secs(2))
    }

    fn with_config(seed: u64, tweak: impl FnOnce(&mut roam::settings::Config)) -> Setup {
        let root = Root::new();
        let data = pattern(LEN as usize, seed);
        root.file("big.bin", &data);
        let server = TestServer::start_with(root.path(), tweak);
        let id = server.mint();
        let url = format!("{}/{id}/big.bin", server.url());
        Setup {
            _root: root,
            _server: server,
            data,
            dir: tempfile::tempdir().unwrap(),
            url,
            runs: std::cell::Cell::new(0),
        }
    }

    /// Where the tools write the download.
    fn out(&self) -> PathBuf {
        self.dir.path().join("big.bin")
    }

    /// aria2c's control file next to the download.
    fn control(&self) -> PathBuf {
        self.dir.path().join("big.bin.aria2")
    }

    /// A file for run number `n`'s console output or log.
    fn run_file(&self, what: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("run{}.{what}", self.runs.get()))
    }

    /// Starts `cmd` with its output captured to a file; returns the child and that file.
    fn spawn(&self, cmd: &mut Command) -> (Child, PathBuf) {
        self.runs.set(self.runs.get() + 1);
        let console = self.run_file("console");
        let f = fs::File::create(&console).unwrap();
        let child = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        (child, console)
    }

    /// Runs `cmd` to the end (at most `limit`): its exit status and console output.
    fn run(&self, cmd: &mut Command, limit: Duration) -> (ExitStatus, String) {
        let (mut child, console) = self.spawn(cmd);
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, fs::read_to_string(&console).unwrap_or_default());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{cmd:?} still running after {limit:?}:\n{}",
                    fs::read_to_string(&console).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `cmd` and SIGKILLs it once `ready()` holds (polled every 10 ms), which must happen
    /// while the download is still incomplete. Returns the output file's size after the kill.
    fn kill_midway(&self, cmd: &mut Command, ready: impl Fn() -> bool) -> u64 {
        let (mut child, console) = self.spawn(cmd);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{cmd:?} ended ({status}) before the kill:\n{}",
                    fs::read_to_string(&console).unwrap_or_default()
                );
            }
            if ready() {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?} never reached the kill point:\n{}",
                fs::read_to_string(&console).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let size = self.size();
        assert!(
            size < LEN || !self.is_complete(),
            "the kill landed after the download had finished; lower the rate"
        );
        size
    }

    fn size(&self) -> u64 {
        fs::metadata(self.out()).map(|m| m.len()).unwrap_or(0)
    }

    fn is_complete(&self) -> bool {
        fs::read(self.out()).is_ok_and(|d| d == self.data)
    }

    /// Asserts the download equals the served file; on mismatch says where the bytes came
    /// from.
    fn assert_downloaded(&self, what: &str, console: &str) {
        let got = fs::read(self.out()).unwrap_or_default();
        if got == self.data {
            return;
        }
        panic!(
            "{what}: the download differs from the served file ({}).\nconsole:\n{console}",
            describe_difference(&got, &self.data)
        );
    }
}

/// Where `got` departs from `want`, and whether its first bytes are `want`'s from elsewhere.
fn describe_difference(got: &[u8], want: &[u8]) -> String {
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
    if got.len() >= first + 64 {
        let probe = &got[first..first + 64];
        if let Some(src) = want.windows(64).position(|w| w == probe) {
            s.push_str(&format!(
                "; from byte {first} on it holds the source's bytes from offset {src}"
            ));
        }
    }
    s
}

/// aria2c's control file says piece 0 is complete. Layout (aria2 DefaultBtProgressInfoFile,
/// version 1): version u16, extension u32, info-hash length u32 (0 for HTTP), piece length u32,
/// total length u64, upload length u64, bitfield length u32, bitfield (MSB first).
fn control_has_piece_0(path: &Path) -> bool {
    let Ok(b) = fs::read(path) else {
        return false;
    };
    if b.len() < 10 {
        return false;
    }
    let hash_len = u32::from_be_bytes(b[6..10].try_into().unwrap()) as usize;
    let bitfield_at = 10 + hash_len + 4 + 8 + 8 + 4;
    b.len() > bitfield_at && b[bitfield_at] & 0x80 != 0
}

/// The HTTP exchanges aria2c logged (`-l FILE --log-level=info`): each request and response
/// head, as sent and received.
fn aria2c_exchanges(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if line.contains("Requesting:") || line.contains("Response received:") {
            out.push_str(if line.contains("Requesting:") {
                ">>> "
            } else {
                "<<< "
            });
            out.push('\n');
            for l in lines.by_ref() {
                if l.trim().is_empty() {
                    break;
                }
                out.push_str("    ");
                out.push_str(l);
                out.push('\n');
            }
        } else if line.contains("errorCode=") {
            out.push_str("!!! ");
            out.push_str(line.trim());
            out.push('\n');
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// curl

fn curl(s: &Setup, rate: Option<&str>) -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "-C", "-", "-o"]).arg(s.out());
    if let Some(rate) = rate {
        c.args(["--limit-rate", rate]);
    }
    c.arg(&s.url);
    c
}

#[test]
fn curl_c_resumes_a_killed_download() {
    if !have("curl") {
        return;
    }
    let _serial = serial();
    let s = Setup::new(1);
    let killed_at = s.kill_midway(&mut curl(&s, Some("2M")), || s.size() >= KILL_AFTER);
    assert!(killed_at < LEN, "curl finished before the kill");
    let (status, console) = s.run(&mut curl(&s, None), Duration::from_secs(60));
    assert!(status.success(), "curl -C - resume: {status}\n{console}");
    s.assert_downloaded("curl -C - after SIGKILL", &console);
}

#[test]
fn curl_c_on_a_complete_file_exits_0_and_leaves_it_alone() {
    if !have("curl") {
        return;
    }
    let _serial = serial();
    let s = Setup::new(2);
    let (status, console) = s.run(&mut curl(&s, None), Duration::from_secs(60));
    assert!(status.success(), "first curl: {status}\n{console}");
    s.assert_downloaded("curl -C - from nothing", &console);
    let before = fs::metadata(s.out()).unwrap().modified().unwrap();
    // curl sends Range: bytes=LEN- and gets 416 bytes */LEN.
    let (status, console) = s.run(&mut curl(&s, None), Duration::from_secs(60));
    assert!(
        status.success(),
        "curl -C - on a complete file: {status}\n{console}"
    );
    s.assert_downloaded("curl -C - on a complete file", &console);
    assert_eq!(fs::metadata(s.out()).unwrap().modified().unwrap(), before);
}

// ---------------------------------------------------------------------------------------------
// wget

fn wget(s: &Setup, rate: Option<&str>) -> Command {
    let mut c = Command::new("wget");
    c.args(["-c", "--progress=dot:giga", "-O"]).arg(s.out());
    if let Some(rate) = rate {
        c.arg(format!("--limit-rate={rate}"));
    }
    c.arg(&s.url);
    c
}

#[test]
fn wget_c_resumes_a_killed_download() {
    if !have("wget") {
        return;
    }
    let _serial = serial();
    let s = Setup::new(3);
    let killed_at = s.kill_midway(&mut wget(&s, Some("2m")), || s.size() >= KILL_AFTER);
    assert!(killed_at < LEN, "wget finished before the kill");
    let (status, console) = s.run(&mut wget(&s, None), Duration::from_secs(60));
    assert!(status.success(), "wget -c resume: {status}\n{console}");
    assert!(console.contains("206"), "wget did not resume:\n{console}");
    s.assert_downloaded("wget -c after SIGKILL", &console);
}

#[test]
fn wget_c_on_a_complete_file_exits_0_and_leaves_it_alone() {
    if !have("wget") {
        return;
    }
    let _serial = serial();
    let s = Setup::new(4);
    let (status, console) = s.run(&mut wget(&s, None), Duration::from_secs(60));
    assert!(status.success(), "first wget: {status}\n{console}");
    s.assert_downloaded("wget -c from nothing", &console);
    let before = fs::metadata(s.out()).unwrap().modified().unwrap();
    let (status, console) = s.run(&mut wget(&s, None), Duration::from_secs(60));
    assert!(
        status.success(),
        "wget -c on a complete file: {status}\n{console}"
    );
    assert!(
        console.contains("already fully retrieved"),
        "wget -c on a complete file:\n{console}"
    );
    s.assert_downloaded("wget -c on a complete file", &console);
    assert_eq!(fs::metadata(s.out()).unwrap().modified().unwrap(), before);
}

// ---------------------------------------------------------------------------------------------
// aria2c

/// `aria2c --continue` into the setup's folder, logging its HTTP exchanges to a run file.
fn aria2c(s: &Setup, extra: &[&str]) -> (Command, PathBuf) {
    let log = s
        .dir
        .path()
        .join(format!("aria2c-{}.log", s.runs.get() + 1));
    let mut c = Command::new("aria2c");
    c.args([
        "--continue",
        // The file grows as it downloads (the default preallocates it), so progress shows.
        "--file-allocation=none",
        "--console-log-level=warn",
        "--summary-interval=0",
        "--show-console-readout=false",
        "--log-level=info",
    ])
    .arg("-l")
    .arg(&log)
    .arg("-d")
    .arg(s.dir.path())
    .args(["-o", "big.bin"])
    .args(extra)
    .arg(&s.url);
    (c, log)
}

/// What works: the killed run's control file is deleted and the same command run again.
/// aria2c then sizes the partial file, probes with a Range-less GET (whose 206 body it
/// discards) and fetches `Range: bytes=SIZE-LEN-1`.
#[test]
fn aria2c_resumes_after_the_control_file_is_deleted() {
    if !have("aria2c") {
        return;
    }
    let _serial = serial();
    let s = Setup::new(5);
    let (mut first, _) = aria2c(&s, &["--max-download-limit=2M"]);
    let killed_at = s.kill_midway(&mut first, || s.size() >= KILL_AFTER);
    assert!(killed_at < LEN);
    fs::remove_file(s.control()).expect("aria2c left a control file");
    let (mut again, log) = aria2c(&s, &[]);
    let (status, console) = s.run(&mut again, Duration::from_secs(120));
    let exchanges = aria2c_exchanges(&log);
    assert!(
        status.success(),
        "aria2c resume: {status}\n{console}\n{exchanges}"
    );
    s.assert_downloaded(
        &format!("aria2c without control file\n{exchanges}"),
        &console,
    );
}

/// What works: a control file saved after piece 0 (the first MiB) was complete. aria2c's
/// Range-less probe still gets a 206 from the session, but piece 0 is not what it asks for,
/// so the body is discarded and the missing pieces come with closed ranges.
#[test]
fn aria2c_resumes_with_a_control_file_recording_piece_0() {
    if !have("aria2c") {
        return;
    }
    let _serial = serial();
    let s = Setup::new(6);
    let (mut first, _) = aria2c(&s, &["--max-download-limit=2M", "--auto-save-interval=1"]);
    let control = s.control();
    s.kill_midway(&mut first, || {
        s.size() >= KILL_AFTER && control_has_piece_0(&control)
    });
    assert!(control_has_piece_0(&control));
    let (mut again, log) = aria2c(&s, &[]);
    let (status, console) = s.run(&mut again, Duration::from_secs(120));
    let exchanges = aria2c_exchanges(&log);
    assert!(
        status.success(),
        "aria2c resume: {status}\n{console}\n{exchanges}"
    );
    s.assert_downloaded(&format!("aria2c with control file\n{exchanges}"), &console);
}

/// aria2c always opens with a GET **without** Range, and does not check the Content-Range of
/// the answer. With roam's default implicit resume that request is answered from the session:
/// a 206 from the session's offset when a run was killed before aria2c saved any piece (aria2c
/// 1.36 then writes that body at offset 0 and exits 0 with a corrupted file, measured), or a 416
/// when the session is complete (aria2c exits 22). `--no-implicit-resume` answers requests
/// without Range like any HTTP server (200, the whole file), which is what aria2c expects, and
/// resumes only with Range, which aria2c sends once it knows its pieces. The three scenarios:
/// 1. a rerun with the control file of a run killed before its first auto-save;
/// 2. a fresh start (partial file and control file deleted) on a partial session;
/// 3. a fresh start on a complete session.
#[test]
fn aria2c_without_implicit_resume_restarts_early_kills_and_finished_sessions_cleanly() {
    if !have("aria2c") {
        return;
    }
    let _serial = serial();
    let mut problems = Vec::new();

    // 1. Resume with the control file of an early kill.
    let s = Setup::with_config(7, plain_get);
    let (mut first, _) = aria2c(&s, &["--max-download-limit=2M"]);
    s.kill_midway(&mut first, || s.size() >= KILL_AFTER);
    assert!(s.control().exists(), "aria2c left no control file");
    assert!(
        !control_has_piece_0(&s.control()),
        "piece 0 already saved: kill earlier"
    );
    let (mut again, log) = aria2c(&s, &[]);
    let (status, console) = s.run(&mut again, Duration::from_secs(120));
    if !status.success() || !s.is_complete() {
        let got = fs::read(s.out()).unwrap_or_default();
        problems.push(format!(
            "1. rerun with the control file of a run killed early: aria2c {status}, file: {}\n\
             {}{console}",
            describe_difference(&got, &s.data),
            aria2c_exchanges(&log)
        ));
    }

    // 2. Fresh start (no partial file, no control file) on a partial session.
    let s = Setup::with_config(8, plain_get);
    let (mut first, _) = aria2c(&s, &["--max-download-limit=2M"]);
    s.kill_midway(&mut first, || s.size() >= KILL_AFTER);
    fs::remove_file(s.out()).unwrap();
    let _ = fs::remove_file(s.control());
    let (mut again, log) = aria2c(&s, &[]);
    let (status, console) = s.run(&mut again, Duration::from_secs(120));
    if !status.success() || !s.is_complete() {
        let got = fs::read(s.out()).unwrap_or_default();
        problems.push(format!(
            "2. fresh start on a partial session: aria2c {status}, file: {}\n{}{console}",
            describe_difference(&got, &s.data),
            aria2c_exchanges(&log)
        ));
    }

    // 3. Fresh start on a complete session.
    let s = Setup::with_config(9, plain_get);
    let (mut full, _) = aria2c(&s, &[]);
    let (status, console) = s.run(&mut full, Duration::from_secs(120));
    assert!(
        status.success(),
        "first full aria2c download: {status}\n{console}"
    );
    s.assert_downloaded("first full aria2c download", &console);
    // Let the session record the whole file before starting over.
    std::thread::sleep(Duration::from_millis(300));
    fs::remove_file(s.out()).unwrap();
    let (mut again, log) = aria2c(&s, &[]);
    let (status, console) = s.run(&mut again, Duration::from_secs(120));
    if !status.success() || !s.is_complete() {
        problems.push(format!(
            "3. fresh start on a complete session: aria2c {status}\n{}{console}",
            aria2c_exchanges(&log)
        ));
    }

    assert!(
        problems.is_empty(),
        "aria2c against roam with --no-implicit-resume:\n\n{}",
        problems.join("\n\n")
    );
}

fn plain_get(cfg: &mut roam::settings::Config) {
    cfg.implicit_resume = false;
}
