//! The download engine: prepare the part file and resume state (minting a roam ID when the
//! server is roam), then ask again and again for what is missing until every byte is on disk,
//! backing off between broken attempts.

use super::attempt::{self, Answer, Decision, Holding};
use super::http::{self, Connector, Exchange, Url};
use super::state::ResumeState;
use super::{has_roam_id, GetError, GetOptions, Observer, Summary};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Sync the part file and state at least this often while receiving.
const SYNC_EVERY: u64 = 8 << 20;
/// First retry delay; doubles per consecutive failure up to `max_retry_delay`.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);

/// One download in progress.
pub(super) struct Download<'a> {
    pub(super) opts: &'a GetOptions,
    pub(super) part: PathBuf,
    pub(super) state_path: PathBuf,
    pub(super) state: ResumeState,
    pub(super) file: Option<File>,
    pub(super) summary: Summary,
    pub(super) started: Instant,
    /// Opens connections (TLS for https://).
    pub(super) connector: Connector,
}

/// What one attempt achieved.
pub(super) enum Attempt {
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
    pub(super) async fn prepare(
        &mut self,
        source: &Url,
        obs: &mut dyn Observer,
    ) -> Result<(), GetError> {
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
    pub(super) async fn resolve(
        &self,
        source: &Url,
        obs: &mut dyn Observer,
    ) -> Result<Url, GetError> {
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
                Err(e) if http::handshake_refused(&e).is_some() => {
                    return Err(GetError::Untrusted(e.to_string()))
                }
                Err(e) => {
                    failures += 1;
                    self.back_off(failures, &e.to_string(), obs).await?;
                }
            }
        }
    }

    /// `GET /`: a roam server answers with a client ID and `Server: roam/…`.
    async fn probe_mint(&self, root: &Url) -> io::Result<Option<String>> {
        let mut ex = http::get(&self.connector, root, &[], self.opts.stall_timeout).await?;
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
        Ok(crate::id::is_id_shaped(&id).then_some(id))
    }

    fn on_disk(&self) -> io::Result<u64> {
        Ok(self
            .file
            .as_ref()
            .map(|f| f.metadata())
            .transpose()?
            .map_or(0, |m| m.len()))
    }

    pub(super) async fn run(&mut self, obs: &mut dyn Observer) -> Result<(), GetError> {
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

    pub(super) fn reset(&mut self) -> io::Result<()> {
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

    /// One request: ask for everything from what is on disk, and act on what the answer
    /// means ([`attempt::decide`]).
    async fn attempt(&mut self, url: &Url, obs: &mut dyn Observer) -> Result<Attempt, GetError> {
        let offset = self.on_disk()?;
        let holding = Holding {
            on_disk: offset,
            etag: self.state.etag.as_deref(),
            length: self.state.length,
        };
        match attempt::before_asking(&holding) {
            Some(Decision::Complete { .. }) => return Ok(Attempt::Complete),
            Some(Decision::StartOver(why)) => return Ok(Attempt::StartOver(why.into())),
            _ => {}
        }
        let mut headers = vec![("Range", format!("bytes={offset}-"))];
        if let Some(etag) = &self.state.etag {
            headers.push(("If-Range", etag.clone()));
        }
        let mut ex = match http::get(&self.connector, url, &headers, self.opts.stall_timeout).await
        {
            Ok(ex) => ex,
            Err(e) if http::handshake_refused(&e).is_some() => {
                return Err(GetError::Untrusted(e.to_string()))
            }
            Err(e) => {
                return Ok(Attempt::Broken {
                    progressed: false,
                    why: e.to_string(),
                })
            }
        };
        let etag = ex
            .head
            .field("etag")
            .filter(|e| !e.starts_with("W/"))
            .map(str::to_owned);
        let answer = Answer {
            status: ex.head.status,
            etag: etag.as_deref(),
            content_range: ex.head.field("content-range"),
            content_length: ex.head.content_length(),
        };
        let digest = ex.head.field("repr-digest").map(str::to_owned);
        match attempt::decide(&holding, &answer) {
            Decision::Receive {
                start,
                length,
                fresh,
            } => {
                let have = if fresh {
                    if offset > 0 {
                        obs.note("the server sent the whole file (it changed, or ignores Range): starting over");
                        self.summary.restarts += 1;
                        if let Some(f) = &self.file {
                            f.set_len(0)?;
                        }
                    }
                    self.state.etag = None;
                    self.state.digest = None;
                    0
                } else {
                    offset
                };
                self.learn(length, etag, digest.as_deref(), obs)?;
                self.receive(&mut ex, start, have, obs).await
            }
            Decision::Complete { length } => {
                self.learn(length, etag, digest.as_deref(), obs)?;
                Ok(Attempt::Complete)
            }
            Decision::StartOver(why) => Ok(Attempt::StartOver(why.into())),
            Decision::Retry(why) => Ok(Attempt::Broken {
                progressed: false,
                why,
            }),
            Decision::Refused => {
                let status = ex.head.status;
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
                Err(GetError::Refused { status, reason })
            }
        }
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
}
