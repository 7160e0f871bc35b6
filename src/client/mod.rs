//! `roam get`: a download client that finishes no matter how often the connection breaks.
//!
//! Bytes go to `FILE.part` (never to `FILE`) and every resume asks for exactly what is on disk
//! with `Range: bytes=N-` plus `If-Range` naming the version being downloaded, so a changed file
//! restarts cleanly instead of splicing two versions. A stall (no byte for `stall_timeout`) is
//! treated like a broken connection: a phone that changed networks should not wait for TCP to
//! give up. Against a roam server the client mints its own ID; against any other server that
//! speaks standard ranges (nginx, lighttpd…) it works without one.

pub mod http;
pub mod state;

use self::http::{Exchange, Url};
use self::state::ResumeState;
use sha2::{Digest as _, Sha256};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Sync the part file and state at least this often while receiving.
const SYNC_EVERY: u64 = 8 << 20;
/// First retry delay; doubles per consecutive failure up to `max_retry_delay`.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// The field roam sends (`Roam-Digest: pending`) while it computes a file's `Repr-Digest`.
const DIGEST_PENDING_FIELD: &str = "roam-digest";
/// The slowest hashing rate a server is assumed to reach, queueing included: waiting for a
/// pending digest is bounded by the file's length at this rate (with [`DIGEST_WAIT_BASE`]).
/// roam hashes at about 1.6 GB/s on one core; a fiftieth of that leaves room for a busy disk
/// and other files hashed first.
pub const DIGEST_RATE_FLOOR: u64 = 32 * 1000 * 1000;
/// Added to the wait for any file, small ones included.
pub const DIGEST_WAIT_BASE: Duration = Duration::from_secs(30);
const DIGEST_POLL_FIRST: Duration = Duration::from_millis(100);
const DIGEST_POLL_MAX: Duration = Duration::from_secs(2);

/// How long to wait for a pending digest of a `length`-byte file (before `--max-time`).
pub fn digest_wait(length: u64) -> Duration {
    DIGEST_WAIT_BASE + Duration::from_secs(length / DIGEST_RATE_FLOOR)
}

/// What `roam get` was asked to do.
#[derive(Clone, Debug)]
pub struct GetOptions {
    pub url: String,
    /// Where the finished file goes; default: the URL's last path segment.
    pub output: Option<PathBuf>,
    /// No byte for this long means the connection is dead.
    pub stall_timeout: Duration,
    /// Give up after this many consecutive attempts that received nothing.
    pub retries: u32,
    /// Give up after this much time in total (zero: never).
    pub max_time: Duration,
    pub max_retry_delay: Duration,
    /// Treat the server as a plain HTTP server even if it is roam (no client ID).
    pub plain: bool,
}

/// How a download ended without a file. Each maps to a documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("{0}")]
    Usage(String),
    #[error("the server refused: {status} {reason}")]
    Refused { status: u16, reason: String },
    #[error("gave up after {attempts} attempts without progress: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("gave up: the time limit of {0:?} was reached")]
    OutOfTime(Duration),
    #[error("integrity check failed: the server's digest is {expected}, the file's is {actual}; kept {part} for inspection (running the command again starts over)")]
    Integrity {
        expected: String,
        actual: String,
        part: String,
    },
    #[error("{0}")]
    Local(#[from] io::Error),
}

impl GetError {
    /// The process exit code (documented in README and `roam get --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            GetError::Local(_) => 1,
            GetError::Usage(_) => 2,
            GetError::Refused { .. } => 3,
            GetError::GaveUp { .. } | GetError::OutOfTime(_) => 4,
            GetError::Integrity { .. } => 5,
        }
    }
}

/// What a finished download cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub path: PathBuf,
    pub length: u64,
    /// Body bytes received over the network in this run, including any overlap discarded.
    pub received: u64,
    /// Connections after the first.
    pub reconnects: u32,
    /// Times the download started over because the file changed on the server.
    pub restarts: u32,
    /// Whether a `Repr-Digest` from the server was checked.
    pub verified: bool,
}

/// Events for whoever shows progress.
pub trait Observer {
    fn length_known(&mut self, _length: u64) {}
    fn progress(&mut self, _on_disk: u64) {}
    fn note(&mut self, _message: &str) {}
}

/// An observer that shows nothing.
pub struct Silent;
impl Observer for Silent {}

/// Runs a download to the end.
pub async fn get(opts: &GetOptions, obs: &mut dyn Observer) -> Result<Summary, GetError> {
    let source = Url::parse(&opts.url).map_err(GetError::Usage)?;
    let output = match &opts.output {
        Some(p) => p.clone(),
        None => default_output(&source)?,
    };
    let part = part_path(&output);
    let state_path = state::path_for(&part);
    let mut dl = Download {
        opts,
        part: part.clone(),
        state_path,
        state: ResumeState::default(),
        file: None,
        summary: Summary {
            path: output.clone(),
            ..Summary::default()
        },
        started: Instant::now(),
    };
    dl.prepare(&source, obs).await?;
    loop {
        dl.run(obs).await?;
        match dl.fetch_digest(obs).await {
            DigestCheck::Changed => {
                // The bytes on disk may mix versions and there is no digest of ours to tell.
                obs.note("the file changed on the server during the download: starting over");
                dl.summary.restarts += 1;
                dl.reset()?;
            }
            check => {
                dl.finish(&output, obs, check)?;
                return Ok(dl.summary);
            }
        }
    }
}

/// What is known about the digest of the bytes on disk once all of them arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DigestCheck {
    /// The server's digest for the version downloaded is known.
    Known,
    /// None to check against, and why.
    Unavailable(&'static str),
    /// The server now has another version: what is on disk may be spliced.
    Changed,
}

/// `FILE.part`.
pub fn part_path(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

fn default_output(url: &Url) -> Result<PathBuf, GetError> {
    let last = url
        .path
        .split('?')
        .next()
        .unwrap_or("")
        .rsplit('/')
        .next()
        .unwrap_or("");
    let name = percent_encoding::percent_decode_str(last)
        .decode_utf8_lossy()
        .into_owned();
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
        return Err(GetError::Usage(format!(
            "cannot name the output after {url}; use -o FILE"
        )));
    }
    Ok(PathBuf::from(name))
}

/// True for a path whose first segment is shaped like a roam client ID.
fn has_roam_id(path: &str) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    first.len() == roam_id_len()
        && first.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
        && path.trim_start_matches('/').contains('/')
}

fn roam_id_len() -> usize {
    crate::id::ID_TEXT_LEN
}

struct Download<'a> {
    opts: &'a GetOptions,
    part: PathBuf,
    state_path: PathBuf,
    state: ResumeState,
    file: Option<File>,
    summary: Summary,
    started: Instant,
}

/// What one attempt achieved.
enum Attempt {
    Complete,
    /// Broke off; `progressed` says whether any byte arrived (which resets the retry count).
    Broken {
        progressed: bool,
        why: String,
    },
    /// The file changed on the server or the part is unusable: start again from byte 0.
    StartOver(String),
}

impl Download<'_> {
    /// Loads or creates the resume state and works out which URL to download from.
    async fn prepare(&mut self, source: &Url, obs: &mut dyn Observer) -> Result<(), GetError> {
        match ResumeState::load(&self.state_path)? {
            Some(s) if s.source == self.opts.url => {
                obs.note(&format!(
                    "resuming {} from byte {}",
                    self.part.display(),
                    std::fs::metadata(&self.part).map(|m| m.len()).unwrap_or(0)
                ));
                self.state = s;
            }
            Some(s) => {
                return Err(GetError::Usage(format!(
                    "{} belongs to another download ({}); remove it or choose another -o",
                    self.part.display(),
                    s.source
                )))
            }
            None => {
                if self.part.exists() {
                    obs.note(&format!(
                        "{} has no resume state: starting over",
                        self.part.display()
                    ));
                }
                let url = self.resolve(source, obs).await?;
                self.state = ResumeState {
                    source: self.opts.url.clone(),
                    url: url.to_string(),
                    ..Default::default()
                };
                let f = File::create(&self.part)?;
                f.sync_all()?;
                self.state.save(&self.state_path)?;
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.part)?;
        self.file = Some(file);
        if let Some(len) = self.state.length {
            obs.length_known(len);
        }
        Ok(())
    }

    /// The URL to download from: the given one for a plain server or a full roam URL, else
    /// `/{minted id}{path}` on a roam server.
    async fn resolve(&self, source: &Url, obs: &mut dyn Observer) -> Result<Url, GetError> {
        if self.opts.plain || has_roam_id(&source.path) {
            return Ok(source.clone());
        }
        let root = source.with_path("/".to_owned());
        let mut failures = 0;
        loop {
            match self.probe_mint(&root).await {
                Ok(Some(id)) => {
                    obs.note(&format!("roam server: minted client id {id}"));
                    return Ok(source.with_path(format!("/{id}{}", source.path)));
                }
                Ok(None) => return Ok(source.clone()),
                Err(e) => {
                    failures += 1;
                    self.back_off(failures, &e.to_string(), obs).await?;
                }
            }
        }
    }

    /// `GET /`: a roam server answers with a client ID and `Server: roam/…`.
    async fn probe_mint(&self, root: &Url) -> io::Result<Option<String>> {
        let mut ex = http::get(root, &[], self.opts.stall_timeout).await?;
        // A busy or rate-limiting server is not an answer to "are you roam?": try again later.
        if matches!(ex.head.status, 408 | 429 | 500..=599) {
            return Err(io::Error::other(format!(
                "the server answered {} to GET /",
                ex.head.status
            )));
        }
        let is_roam = ex.head.status == 200
            && ex
                .head
                .field("server")
                .is_some_and(|s| s.starts_with("roam/"));
        if !is_roam {
            return Ok(None);
        }
        let body = ex.read_small(256).await?;
        let id = String::from_utf8_lossy(&body).trim().to_owned();
        Ok((id.len() == roam_id_len()).then_some(id))
    }

    fn on_disk(&self) -> io::Result<u64> {
        Ok(self
            .file
            .as_ref()
            .map(|f| f.metadata())
            .transpose()?
            .map_or(0, |m| m.len()))
    }

    async fn run(&mut self, obs: &mut dyn Observer) -> Result<(), GetError> {
        let url = Url::parse(&self.state.url).map_err(GetError::Usage)?;
        let mut failures = 0u32;
        let mut attempts = 0u32;
        loop {
            if !self.opts.max_time.is_zero() && self.started.elapsed() > self.opts.max_time {
                return Err(GetError::OutOfTime(self.opts.max_time));
            }
            if attempts > 0 {
                self.summary.reconnects += 1;
            }
            attempts += 1;
            match self.attempt(&url, obs).await? {
                Attempt::Complete => return Ok(()),
                Attempt::StartOver(why) => {
                    obs.note(&format!("{why}: starting over"));
                    self.summary.restarts += 1;
                    self.reset()?;
                    failures = 0;
                }
                Attempt::Broken { progressed, why } => {
                    failures = if progressed { 1 } else { failures + 1 };
                    self.sync()?;
                    obs.note(&format!("connection lost ({why}); reconnecting"));
                    self.back_off(failures, &why, obs).await?;
                }
            }
        }
    }

    /// Sleeps before retry number `failures` (exponential, with jitter so that many clients cut
    /// off together do not return together), or gives up.
    async fn back_off(
        &self,
        failures: u32,
        why: &str,
        _obs: &mut dyn Observer,
    ) -> Result<(), GetError> {
        if failures > self.opts.retries {
            return Err(GetError::GaveUp {
                attempts: failures,
                last: why.to_owned(),
            });
        }
        let exp = FIRST_RETRY_DELAY.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let cap = exp.min(self.opts.max_retry_delay);
        let delay = cap.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        if !self.opts.max_time.is_zero() && self.started.elapsed() + delay > self.opts.max_time {
            return Err(GetError::OutOfTime(self.opts.max_time));
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        if let Some(f) = &self.file {
            f.set_len(0)?;
            f.sync_all()?;
        }
        self.state.etag = None;
        self.state.length = None;
        self.state.digest = None;
        self.state.save(&self.state_path)
    }

    fn sync(&mut self) -> io::Result<()> {
        if let Some(f) = &self.file {
            f.sync_data()?;
        }
        self.state.save(&self.state_path)
    }

    /// One request: ask for everything from what is on disk, and write what comes.
    async fn attempt(&mut self, url: &Url, obs: &mut dyn Observer) -> Result<Attempt, GetError> {
        let offset = self.on_disk()?;
        if self.state.length.is_some_and(|l| offset > l) {
            return Ok(Attempt::StartOver(
                "the part file is longer than the file".into(),
            ));
        }
        if self.state.length == Some(offset) && offset > 0 {
            return Ok(Attempt::Complete);
        }
        let mut headers = vec![("Range", format!("bytes={offset}-"))];
        if let Some(etag) = &self.state.etag {
            headers.push(("If-Range", etag.clone()));
        }
        let mut ex = match http::get(url, &headers, self.opts.stall_timeout).await {
            Ok(ex) => ex,
            Err(e) => {
                return Ok(Attempt::Broken {
                    progressed: false,
                    why: e.to_string(),
                })
            }
        };
        let status = ex.head.status;
        let etag = ex
            .head
            .field("etag")
            .filter(|e| !e.starts_with("W/"))
            .map(str::to_owned);
        if etag.is_some() && self.state.etag.is_some() && etag != self.state.etag && offset > 0 {
            return Ok(Attempt::StartOver("the file changed on the server".into()));
        }
        let (start, have) = match status {
            206 => {
                let Some((Some((first, last)), complete)) = ex
                    .head
                    .field("content-range")
                    .and_then(http::parse_content_range)
                else {
                    return Ok(Attempt::Broken {
                        progressed: false,
                        why: "206 without a usable Content-Range".into(),
                    });
                };
                if first > offset {
                    return Ok(Attempt::Broken {
                        progressed: false,
                        why: format!("server started at {first}, past {offset}"),
                    });
                }
                let Some(end) = last.checked_add(1) else {
                    return Ok(Attempt::Broken {
                        progressed: false,
                        why: "Content-Range past the largest offset".into(),
                    });
                };
                let complete = complete.unwrap_or(end);
                if end != complete {
                    return Ok(Attempt::Broken {
                        progressed: false,
                        why: "server sent a closed range".into(),
                    });
                }
                self.learn(complete, etag, ex.head.field("repr-digest"), obs)?;
                (first, offset)
            }
            200 => {
                if offset > 0 {
                    obs.note("the server sent the whole file (it changed, or ignores Range): starting over");
                    self.summary.restarts += 1;
                    if let Some(f) = &self.file {
                        f.set_len(0)?;
                    }
                }
                let Some(len) = ex.head.content_length() else {
                    return Ok(Attempt::Broken {
                        progressed: false,
                        why: "200 without Content-Length".into(),
                    });
                };
                self.state.etag = None;
                self.state.digest = None;
                self.learn(len, etag, ex.head.field("repr-digest"), obs)?;
                (0, 0)
            }
            416 => {
                let complete = ex
                    .head
                    .field("content-range")
                    .and_then(http::parse_content_range)
                    .and_then(|(_, c)| c);
                return Ok(match complete {
                    Some(len)
                        if len == offset
                            && (self.state.etag.is_none()
                                || etag.is_none()
                                || etag == self.state.etag) =>
                    {
                        self.learn(len, etag, ex.head.field("repr-digest"), obs)?;
                        Attempt::Complete
                    }
                    _ => Attempt::StartOver("the server has a shorter file now".into()),
                });
            }
            408 | 429 | 500..=599 => {
                return Ok(Attempt::Broken {
                    progressed: false,
                    why: format!("server answered {status}"),
                });
            }
            _ => {
                // Nothing downloaded yet: leave nothing behind that a rerun would "resume".
                if offset == 0 {
                    let _ = std::fs::remove_file(&self.state_path);
                    let _ = std::fs::remove_file(&self.part);
                }
                let reason = ex
                    .read_small(4096)
                    .await
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                    .unwrap_or_default();
                return Err(GetError::Refused { status, reason });
            }
        };
        self.receive(&mut ex, start, have, obs).await
    }

    /// Records the version facts a response gave.
    fn learn(
        &mut self,
        length: u64,
        etag: Option<String>,
        digest: Option<&str>,
        obs: &mut dyn Observer,
    ) -> io::Result<()> {
        let changed =
            self.state.length != Some(length) || (etag.is_some() && self.state.etag != etag);
        self.state.length = Some(length);
        if etag.is_some() {
            self.state.etag = etag;
        }
        if let Some(d) = digest {
            self.state.digest = Some(d.to_owned());
        }
        if changed {
            obs.length_known(length);
            self.state.save(&self.state_path)?;
        }
        Ok(())
    }

    /// Streams a body that starts at file offset `start` into the part file, discarding any
    /// overlap with what is already on disk (`have`).
    async fn receive(
        &mut self,
        ex: &mut Exchange,
        start: u64,
        have: u64,
        obs: &mut dyn Observer,
    ) -> Result<Attempt, GetError> {
        let length = self.state.length.unwrap_or(0);
        let mut pos = start;
        let mut synced = have;
        let mut progressed = false;
        let mut buf = vec![0u8; 256 * 1024];
        while pos < length {
            let want = buf.len().min((length - pos) as usize);
            let n = match ex.read(&mut buf[..want]).await {
                Ok(0) => {
                    return Ok(Attempt::Broken {
                        progressed,
                        why: "connection closed mid-body".into(),
                    })
                }
                Ok(n) => n,
                Err(e) => {
                    return Ok(Attempt::Broken {
                        progressed,
                        why: e.to_string(),
                    })
                }
            };
            self.summary.received += n as u64;
            let chunk = &buf[..n];
            // Bytes before `have` are already on disk: skip them.
            let skip = have.saturating_sub(pos).min(n as u64) as usize;
            if skip < n {
                let file = self
                    .file
                    .as_ref()
                    .ok_or_else(|| io::Error::other("part file not open"))?;
                file.write_all_at(&chunk[skip..], pos + skip as u64)?;
                progressed = true;
            }
            pos += n as u64;
            if pos > have {
                obs.progress(pos);
            }
            if pos >= synced + SYNC_EVERY {
                self.sync()?;
                synced = pos;
            }
        }
        self.sync()?;
        Ok(Attempt::Complete)
    }

    /// A server computing digests in the background (roam) may not have had one when the bytes
    /// were sent. roam says so with `Roam-Digest: pending`: then ask again with HEAD, with a
    /// growing pause, for as long as hashing this file can reasonably take (see
    /// [`digest_wait`]) and never past `--max-time`. A server that sends neither field has no
    /// digest: one HEAD is enough. A different ETag now means the file changed while we
    /// downloaded it.
    async fn fetch_digest(&mut self, obs: &mut dyn Observer) -> DigestCheck {
        if self.state.digest.is_some() {
            return DigestCheck::Known;
        }
        let (Some(etag), Ok(url)) = (self.state.etag.clone(), Url::parse(&self.state.url)) else {
            return DigestCheck::Unavailable("the server sent no ETag or digest");
        };
        let mut wait = digest_wait(self.state.length.unwrap_or(0));
        if !self.opts.max_time.is_zero() {
            wait = wait.min(self.opts.max_time.saturating_sub(self.started.elapsed()));
        }
        let deadline = Instant::now() + wait;
        let mut pause = DIGEST_POLL_FIRST;
        let mut told = false;
        loop {
            let Ok(head) = http::head(&url, &[], self.opts.stall_timeout).await else {
                return DigestCheck::Unavailable("the server could not be asked for its digest");
            };
            if head.field("etag") != Some(etag.as_str()) {
                return DigestCheck::Changed;
            }
            if let Some(d) = head.field("repr-digest") {
                self.state.digest = Some(d.to_owned());
                return DigestCheck::Known;
            }
            if head.field(DIGEST_PENDING_FIELD) != Some("pending") {
                return DigestCheck::Unavailable("the server sent no sha-256 Repr-Digest");
            }
            if Instant::now() + pause > deadline {
                return DigestCheck::Unavailable(
                    "the server's digest was still pending when the wait for it ended",
                );
            }
            if !told {
                obs.note(&format!(
                    "waiting for the server to finish its sha-256 of the file (up to {}s)",
                    wait.as_secs()
                ));
                told = true;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(DIGEST_POLL_MAX);
        }
    }

    /// Verifies against the server's digest, then renames the part file into place.
    fn finish(
        &mut self,
        output: &Path,
        obs: &mut dyn Observer,
        check: DigestCheck,
    ) -> Result<(), GetError> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("part file not open"))?;
        file.sync_all()?;
        let length = file.metadata()?.len();
        self.summary.length = length;
        if let Some(expected) = self.state.digest.clone() {
            if let Some(expected_b64) = sha256_from_field(&expected) {
                let actual = sha256_file(&file)?;
                if actual != expected_b64 {
                    // Keep the bytes for inspection but not the state: running the command again
                    // must start over, not "resume" a complete, wrong file.
                    let _ = std::fs::remove_file(&self.state_path);
                    return Err(GetError::Integrity {
                        expected: expected_b64,
                        actual,
                        part: self.part.display().to_string(),
                    });
                }
                self.summary.verified = true;
            }
        }
        if !self.summary.verified {
            let why = match check {
                DigestCheck::Unavailable(why) => why,
                DigestCheck::Known | DigestCheck::Changed => "the server's digest is not sha-256",
            };
            obs.note(&format!("{why}: length checked, content not verified"));
        }
        drop(file);
        std::fs::rename(&self.part, output)?;
        let _ = std::fs::remove_file(&self.state_path);
        if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

/// The base64 sha-256 value in a `Repr-Digest` field (`sha-256=:…:`, possibly among others).
fn sha256_from_field(field: &str) -> Option<String> {
    field.split(',').find_map(|member| {
        let (alg, value) = member.trim().split_once('=')?;
        if alg.trim() != "sha-256" {
            return None;
        }
        Some(
            value
                .trim()
                .strip_prefix(':')?
                .strip_suffix(':')?
                .to_owned(),
        )
    })
}

fn sha256_file(file: &File) -> io::Result<String> {
    use base64::Engine as _;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = file.read_at(&mut buf, pos)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(hasher.finalize()))
}

/// Writes progress to a terminal bar or to plain log lines.
pub struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    last_line: Instant,
    reconnects: u64,
}

impl Reporter {
    /// A bar when stderr is a terminal (and not quiet), plain lines otherwise.
    pub fn new(quiet: bool) -> Reporter {
        use std::io::IsTerminal;
        let bar = (!quiet && io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Reporter {
            bar,
            quiet,
            last_line: Instant::now(),
            reconnects: 0,
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Reporter {
    fn length_known(&mut self, length: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(length);
        }
    }

    fn progress(&mut self, on_disk: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(on_disk);
        } else if !self.quiet && self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            eprintln!("roam get: {on_disk} bytes on disk");
        }
    }

    fn note(&mut self, message: &str) {
        if message.starts_with("connection lost") {
            self.reconnects += 1;
            if let Some(bar) = &self.bar {
                bar.set_message(format!("reconnects: {}", self.reconnects));
            }
        }
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(format!("roam get: {message}")),
            None => eprintln!("roam get: {message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids() {
        let u = Url::parse("http://h:1/dir/a%20b.mp4").unwrap();
        assert_eq!(default_output(&u).unwrap(), PathBuf::from("a b.mp4"));
        assert!(default_output(&Url::parse("http://h:1/").unwrap()).is_err());
        assert!(default_output(&Url::parse("http://h:1/x/%2e%2e").unwrap()).is_err());
        assert!(has_roam_id("/0f3a5c7e-1b2d-8e4f-a6b8-c0d2e4f60819/file"));
        assert!(!has_roam_id("/0f3a5c7e-1b2d-8e4f-a6b8-c0d2e4f60819"));
        assert!(!has_roam_id("/video.mp4"));
    }

    #[test]
    fn digest_fields() {
        assert_eq!(sha256_from_field("sha-256=:abc=:"), Some("abc=".into()));
        assert_eq!(
            sha256_from_field("sha-512=:x:, sha-256=:y:"),
            Some("y".into())
        );
        assert_eq!(sha256_from_field("md5=:x:"), None);
    }
}
