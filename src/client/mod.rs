//! `roam get`: a download client that finishes no matter how often the connection breaks.
//!
//! Bytes go to `FILE.part` (never to `FILE`) and every resume asks for exactly what is on disk
//! with `Range: bytes=N-` plus `If-Range` naming the version being downloaded, so a changed file
//! restarts cleanly instead of splicing two versions. A stall (no byte for `stall_timeout`) is
//! treated like a broken connection: a phone that changed networks should not wait for TCP to
//! give up. Against a roam server the client mints its own ID; against any other server that
//! speaks standard ranges (nginx, lighttpd…) it works without one.

//!
//! The parts: `attempt` (pure: what an answer means for the part file), `http` (one request per
//! connection), `state` (the resume state beside the part file), `verify` (the digest check),
//! `report` (progress output); this file runs the loop.

pub mod attempt;
mod download;
pub mod http;
pub mod report;
pub mod state;
pub mod verify;

pub use self::report::Reporter;

use self::download::Download;
use self::http::Url;
use self::state::ResumeState;
use self::verify::DigestCheck;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// For https:// URLs: trust only the certificates in this PEM file (a private CA) instead
    /// of the system's roots.
    pub cacert: Option<PathBuf>,
    /// Open Multipath TCP connections (where the kernel has it): the connection survives a
    /// change of network without a reconnect when the server speaks it too.
    pub mptcp: bool,
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
    /// The TLS handshake failed (the server's certificate is not trusted or does not name
    /// it): retrying cannot help.
    #[error("{0} (use --cacert for a private CA)")]
    Untrusted(String),
    #[error("{0}")]
    Local(#[from] io::Error),
}

impl GetError {
    /// The process exit code (documented in README and `roam get --help`).
    pub fn exit_code(&self) -> u8 {
        match self {
            GetError::Local(_) => 1,
            GetError::Usage(_) => 2,
            GetError::Refused { .. } | GetError::Untrusted(_) => 3,
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
    let connector = if source.tls {
        http::Connector::with_tls(opts.cacert.as_deref()).map_err(GetError::Usage)?
    } else {
        http::Connector::plain()
    }
    .mptcp(opts.mptcp);
    let mut dl = Download {
        connector,
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
pub(crate) fn has_roam_id(path: &str) -> bool {
    let path = path.trim_start_matches('/');
    path.split_once('/')
        .is_some_and(|(first, _)| crate::id::is_id_shaped(first))
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
}
