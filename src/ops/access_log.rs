//! The access log: one line per response, written when the response's body accounting ends
//! (its last byte acknowledged, or its connection closed), so each line says how many bytes the
//! client's TCP acknowledged and how the body ended, not only how many were written.
//!
//! Off the hot path: a connection hands a finished [`AccessRecord`] to a bounded channel
//! ([`BUFFER_LINES`]) and goes on; one thread formats and writes the lines in batches. A slow or
//! failing disk never stalls a response: when the channel is full, or a write fails, lines are
//! dropped and counted (`roam_access_log_dropped_lines_total`), and the failure is logged once
//! per burst. A file is reopened on SIGHUP (after logrotate moved it away).

use crate::http::request::Method;
use crate::settings::{AccessLogTarget, LogFormat};
use crate::throttle::LogThrottle;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Records waiting for the writer. About 300 bytes each: a few MB at most, and at 50,000
/// responses a second a third of a second of traffic, which absorbs a disk's hiccup.
pub const BUFFER_LINES: usize = 16 * 1024;
/// The writer writes what it has once it holds this much, even while more is queued.
const WRITE_AT: usize = 64 * 1024;
/// A new log file's mode: client IDs are in it, and anyone holding an ID can use it.
const FILE_MODE: u32 = 0o640;

/// At most one warning a second when the buffer is full.
static FULL_LOG: LogThrottle = LogThrottle::new();

/// How a response's body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyEnd {
    /// Every byte of the response was written and the client's TCP acknowledged all of it.
    Complete,
    /// The client closed or reset the connection, or stopped acknowledging before the
    /// connection ended, with bytes of this body unacknowledged.
    ClientGone,
    /// A newer request from the same client for the same file stopped this one.
    TakenOver,
    /// The server was shutting down.
    Shutdown,
    /// The socket made no progress for `--write-stall-timeout`.
    Stalled,
    /// The kernel gave up on the path (`TCP_USER_TIMEOUT`, keepalive, unreachable).
    NetworkFailed,
    /// The file changed during the transfer, which was aborted.
    FileChanged,
}

impl BodyEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyEnd::Complete => "complete",
            BodyEnd::ClientGone => "client_gone",
            BodyEnd::TakenOver => "taken_over",
            BodyEnd::Shutdown => "shutdown",
            BodyEnd::Stalled => "stalled",
            BodyEnd::NetworkFailed => "network_failed",
            BodyEnd::FileChanged => "file_changed",
        }
    }
}

/// One response, filled in as it goes: built when the request is answered, finished when the
/// body's accounting ends.
#[derive(Clone, Debug)]
pub struct AccessRecord {
    /// When the request's head was read.
    pub time: SystemTime,
    pub client: SocketAddr,
    /// None for a head that could not be parsed.
    pub method: Option<Method>,
    /// The request target as sent.
    pub path: String,
    pub status: u16,
    /// The `Range` field as sent.
    pub range: Option<String>,
    /// The file offset of the body's first byte (none for multipart and non-file bodies).
    pub body_start: Option<u64>,
    /// Body bytes handed to the kernel.
    pub sent: u64,
    /// Body bytes the client's TCP acknowledged when the body ended.
    pub acked: u64,
    /// When the request's head was read (monotonic).
    pub received: Instant,
    /// From `received` to the body's last byte handed to the kernel; for a body that never got
    /// there, to the moment it ended.
    pub duration: Option<Duration>,
    pub ended: BodyEnd,
}

impl AccessRecord {
    /// A record for a request whose head was read at `received` (the response may have been
    /// decided later: a takeover waits for the previous sender).
    pub fn new(
        client: SocketAddr,
        method: Option<Method>,
        path: &str,
        range: Option<&str>,
        received: Instant,
    ) -> Self {
        let now = SystemTime::now();
        AccessRecord {
            time: now.checked_sub(received.elapsed()).unwrap_or(now),
            client,
            method,
            path: path.to_owned(),
            status: 0,
            range: range.map(str::to_owned),
            body_start: None,
            sent: 0,
            acked: 0,
            received,
            duration: None,
            ended: BodyEnd::Complete,
        }
    }

    /// Marks the body's last byte as handed to the kernel now (once).
    pub fn written_whole(&mut self) {
        if self.duration.is_none() {
            self.duration = Some(self.received.elapsed());
        }
    }

    /// Ends the record: the body's accounting is over.
    pub fn end(&mut self, ended: BodyEnd, sent: u64, acked: u64) {
        self.ended = ended;
        self.sent = sent;
        self.acked = acked;
        self.written_whole();
    }
}

/// The line as JSON (`--log-format json`).
#[derive(Serialize)]
struct JsonLine<'a> {
    time: String,
    client: String,
    client_id: Option<&'a str>,
    method: &'a str,
    path: &'a str,
    status: u16,
    range: Option<&'a str>,
    body_start: Option<u64>,
    bytes_sent: u64,
    bytes_acked: u64,
    duration_ms: f64,
    ended: BodyEnd,
}

fn method_name(m: Option<Method>) -> &'static str {
    match m {
        Some(Method::Get) => "GET",
        Some(Method::Head) => "HEAD",
        // roam keeps no other method's name: they are all refused with 405.
        Some(Method::Other) => "OTHER",
        None => "-",
    }
}

/// The client ID in a download's target (`/{id}/...`), if its first segment has an ID's shape.
pub fn client_id_in(target: &str) -> Option<&str> {
    let path = match target.find("://") {
        Some(i) => &target[i + 3..][target[i + 3..].find('/')?..],
        None => target,
    };
    let segment = path.strip_prefix('/')?.split(['/', '?']).next()?;
    (segment.len() == crate::id::ID_TEXT_LEN
        && segment.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
    .then_some(segment)
}

/// Appends one line for `rec` to `out`.
pub fn format_line(rec: &AccessRecord, format: LogFormat, out: &mut Vec<u8>) {
    let time = humantime::format_rfc3339_millis(rec.time).to_string();
    let duration_ms = rec.duration.unwrap_or_default().as_secs_f64() * 1000.0;
    let duration_ms = (duration_ms * 1000.0).round() / 1000.0;
    let client_id = client_id_in(&rec.path);
    match format {
        LogFormat::Json => {
            let line = JsonLine {
                time,
                client: rec.client.to_string(),
                client_id,
                method: method_name(rec.method),
                path: &rec.path,
                status: rec.status,
                range: rec.range.as_deref(),
                body_start: rec.body_start,
                bytes_sent: rec.sent,
                bytes_acked: rec.acked,
                duration_ms,
                ended: rec.ended,
            };
            // Serialising plain fields into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &line);
        }
        LogFormat::Pretty => {
            // logfmt: key=value, values quoted (Rust string escapes) when they hold anything
            // but plain visible characters, "-" for none.
            let _ = write!(
                out,
                "time={time} client={} client_id={} method={} path={} status={} range={} \
                 body_start={} bytes_sent={} bytes_acked={} duration_ms={duration_ms:.3} ended={}",
                rec.client,
                client_id.unwrap_or("-"),
                method_name(rec.method),
                Value(&rec.path),
                rec.status,
                Value(rec.range.as_deref().unwrap_or("-")),
                rec.body_start.map_or("-".to_owned(), |s| s.to_string()),
                rec.sent,
                rec.acked,
                rec.ended.as_str(),
            );
        }
    }
    out.push(b'\n');
}

/// A logfmt value: bare when safe, quoted and escaped otherwise.
struct Value<'a>(&'a str);

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bare = !self.0.is_empty()
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' && b != b'=');
        if bare {
            f.write_str(self.0)
        } else {
            write!(f, "{:?}", self.0)
        }
    }
}

enum Msg {
    Line(Box<AccessRecord>),
    /// Look at the reopen flag.
    Wake,
    /// Write what is left and stop.
    Close,
}

/// Where lines go.
enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
}

fn open_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
}

#[derive(Debug)]
struct Shared {
    tx: SyncSender<Msg>,
    reopen: AtomicBool,
    dropped: Counter,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Line(_) => "Line",
            Msg::Wake => "Wake",
            Msg::Close => "Close",
        })
    }
}

/// The access log: a cheap-clone handle; off unless opened.
#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
}

impl AccessLog {
    /// No access log.
    pub fn off() -> AccessLog {
        AccessLog::default()
    }

    /// Opens `target` now (a file that cannot be opened is an error naming it) and starts the
    /// writer thread. Lines lost are counted in `dropped`.
    pub fn open(
        target: &AccessLogTarget,
        format: LogFormat,
        dropped: Counter,
    ) -> io::Result<AccessLog> {
        let sink = match target {
            AccessLogTarget::Off => return Ok(AccessLog::off()),
            AccessLogTarget::Stderr => Sink::Stderr,
            AccessLogTarget::File(path) => Sink::File {
                path: path.clone(),
                file: open_file(path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot open the access log {}: {e}", path.display()),
                    )
                })?,
            },
        };
        let (tx, rx) = mpsc::sync_channel(BUFFER_LINES);
        let shared = Arc::new(Shared {
            tx,
            reopen: AtomicBool::new(false),
            dropped,
            thread: Mutex::new(None),
        });
        let writer = Writer {
            sink,
            format,
            shared: Arc::clone(&shared),
            buf: Vec::with_capacity(WRITE_AT * 2),
            lines: 0,
            failed_lines: 0,
        };
        let thread = std::thread::Builder::new()
            .name("roam-access-log".into())
            .spawn(move || writer.run(rx))?;
        if let Ok(mut t) = shared.thread.lock() {
            *t = Some(thread);
        }
        Ok(AccessLog {
            shared: Some(shared),
        })
    }

    pub fn enabled(&self) -> bool {
        self.shared.is_some()
    }

    /// Hands a finished record to the writer; never waits. A full buffer drops the line.
    pub fn write(&self, record: Box<AccessRecord>) {
        let Some(s) = &self.shared else { return };
        match s.tx.try_send(Msg::Line(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                s.dropped.inc();
                if let Some(suppressed) = FULL_LOG.admit() {
                    tracing::warn!(
                        suppressed,
                        "the access log's buffer is full (its disk is slower than the traffic): \
                         dropping lines"
                    );
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                s.dropped.inc();
            }
        }
    }

    /// Reopens the file at its path (after a rotation); nothing for stderr.
    pub fn reopen(&self) {
        if let Some(s) = &self.shared {
            s.reopen.store(true, Ordering::SeqCst);
            // A full channel means the writer is busy and sees the flag after its batch.
            let _ = s.tx.try_send(Msg::Wake);
        }
    }

    /// Writes what is buffered and stops the writer (at shutdown). Lines recorded afterwards
    /// are dropped.
    pub fn close(&self) {
        let Some(s) = &self.shared else { return };
        let _ = s.tx.send(Msg::Close);
        let thread = s.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// The writer thread's state.
struct Writer {
    sink: Sink,
    format: LogFormat,
    shared: Arc<Shared>,
    /// Formatted lines not yet written.
    buf: Vec<u8>,
    /// Lines in `buf`.
    lines: u64,
    /// Lines lost in the current burst of write failures (0: writing works).
    failed_lines: u64,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        while let Ok(msg) = rx.recv() {
            let mut closing = self.take(msg);
            // Batch whatever else is queued, writing every WRITE_AT bytes.
            while !closing {
                match rx.try_recv() {
                    Ok(msg) => closing = self.take(msg),
                    Err(_) => break,
                }
                if self.buf.len() >= WRITE_AT {
                    self.flush();
                }
            }
            self.flush();
            if self.shared.reopen.swap(false, Ordering::SeqCst) {
                self.reopen();
            }
            if closing {
                return;
            }
        }
        self.flush();
    }

    /// Takes one message; true when it asks to stop.
    fn take(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Line(rec) => {
                format_line(&rec, self.format, &mut self.buf);
                self.lines += 1;
                false
            }
            Msg::Wake => false,
            Msg::Close => true,
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let result = match &mut self.sink {
            // One locked write per batch: tracing's lines never land inside ours.
            Sink::Stderr => io::stderr().lock().write_all(&self.buf),
            Sink::File { file, .. } => file.write_all(&self.buf),
        };
        match result {
            Ok(()) => {
                if self.failed_lines > 0 {
                    tracing::info!(
                        dropped_lines = self.failed_lines,
                        "the access log is writable again"
                    );
                    self.failed_lines = 0;
                }
            }
            Err(e) => {
                // A partial write may leave a broken line; everything in the batch counts as
                // lost.
                if self.failed_lines == 0 {
                    tracing::warn!(
                        error = %e,
                        path = %self.path_for_logs(),
                        "cannot write the access log; dropping its lines until it works again"
                    );
                }
                self.failed_lines += self.lines;
                self.shared.dropped.inc_by(self.lines);
            }
        }
        self.buf.clear();
        self.lines = 0;
    }

    fn path_for_logs(&self) -> String {
        match &self.sink {
            Sink::Stderr => "stderr".into(),
            Sink::File { path, .. } => path.display().to_string(),
        }
    }

    fn reopen(&mut self) {
        let Sink::File { path, file } = &mut self.sink else {
            return;
        };
        match open_file(path) {
            Ok(f) => {
                *file = f;
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(e) => tracing::warn!(
                path = %path.display(),
                error = %e,
                "cannot reopen the access log; still writing to the file open before"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        let mut r = AccessRecord::new(
            "192.0.2.7:4711".parse().unwrap(),
            Some(Method::Get),
            "/0b8e3f6a-9c1d-8e2f-8a4b-5c6d7e8f9a0b/dir/a \"b\".bin",
            Some("bytes=100-"),
            Instant::now(),
        );
        r.status = 206;
        r.body_start = Some(100);
        r.end(BodyEnd::ClientGone, 900, 400);
        r
    }

    #[test]
    fn json_lines_carry_every_field() {
        let mut out = Vec::new();
        format_line(&record(), LogFormat::Json, &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["client"], "192.0.2.7:4711");
        assert_eq!(v["client_id"], "0b8e3f6a-9c1d-8e2f-8a4b-5c6d7e8f9a0b");
        assert_eq!(v["method"], "GET");
        assert_eq!(
            v["path"],
            "/0b8e3f6a-9c1d-8e2f-8a4b-5c6d7e8f9a0b/dir/a \"b\".bin"
        );
        assert_eq!(v["status"], 206);
        assert_eq!(v["range"], "bytes=100-");
        assert_eq!(v["body_start"], 100);
        assert_eq!(v["bytes_sent"], 900);
        assert_eq!(v["bytes_acked"], 400);
        assert_eq!(v["ended"], "client_gone");
        assert!(v["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn logfmt_lines_quote_what_needs_it() {
        let mut out = Vec::new();
        let mut r = record();
        r.range = None;
        r.body_start = None;
        format_line(&r, LogFormat::Pretty, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert!(line.starts_with("time="), "{line}");
        assert!(
            line.contains(r#" path="/0b8e3f6a-9c1d-8e2f-8a4b-5c6d7e8f9a0b/dir/a \"b\".bin" "#),
            "{line}"
        );
        assert!(
            line.contains(" range=- body_start=- bytes_sent=900 bytes_acked=400 "),
            "{line}"
        );
        assert!(line.ends_with(" ended=client_gone\n"), "{line}");
    }

    #[test]
    fn client_ids_only_from_id_shaped_segments() {
        let id = "0b8e3f6a-9c1d-8e2f-8a4b-5c6d7e8f9a0b";
        assert_eq!(client_id_in(&format!("/{id}/x")), Some(id));
        assert_eq!(client_id_in(&format!("http://h:1/{id}/x?q")), Some(id));
        assert_eq!(client_id_in("/"), None);
        assert_eq!(client_id_in("/metrics"), None);
        assert_eq!(client_id_in(&format!("/{}/x", "z".repeat(36))), None);
    }

    #[test]
    fn lines_reach_the_file_and_survive_a_reopen_after_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::open(
            &AccessLogTarget::File(path.clone()),
            LogFormat::Json,
            Counter::default(),
        )
        .unwrap();
        log.write(Box::new(record()));
        // Rotation: move the file away, then reopen (SIGHUP).
        let rotated = dir.path().join("access.log.1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path)
            .unwrap_or_default()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "first line never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path.exists() {
            assert!(Instant::now() < deadline, "never reopened");
            std::thread::sleep(Duration::from_millis(5));
        }
        log.write(Box::new(record()));
        log.close();
        assert_eq!(
            std::fs::read_to_string(&rotated).unwrap().lines().count(),
            1
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn a_failing_file_counts_every_lost_line() {
        let dropped = Counter::default();
        let log = AccessLog::open(
            &AccessLogTarget::File(PathBuf::from("/dev/full")),
            LogFormat::Pretty,
            dropped.clone(),
        )
        .unwrap();
        for _ in 0..5 {
            log.write(Box::new(record()));
        }
        log.close();
        assert_eq!(dropped.get(), 5);
    }
}
