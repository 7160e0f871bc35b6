//! Checking a finished part file against the server's `Repr-Digest` (RFC 9530, sha-256), and
//! how long to wait for a digest roam is still computing.

use super::download::Download;
use super::http::{self, Url};
use super::{GetError, Observer};
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// The field roam sends (`Roam-Digest: pending`) while it computes a file's `Repr-Digest`.
pub const DIGEST_PENDING_FIELD: &str = "roam-digest";
/// The slowest hashing rate a server is assumed to reach, queueing included: waiting for a
/// pending digest is bounded by the file's length at this rate (with [`DIGEST_WAIT_BASE`]).
/// roam hashes at about 1.6 GB/s on one core; a fiftieth of that leaves room for a busy disk
/// and other files hashed first.
pub const DIGEST_RATE_FLOOR: u64 = 32 * 1000 * 1000;
/// Added to the wait for any file, small ones included.
pub const DIGEST_WAIT_BASE: Duration = Duration::from_secs(30);
/// First and longest pause between two `HEAD`s asking for a pending digest.
pub const DIGEST_POLL_FIRST: Duration = Duration::from_millis(100);
pub const DIGEST_POLL_MAX: Duration = Duration::from_secs(2);

/// How long to wait for a pending digest of a `length`-byte file (before `--max-time`).
pub fn digest_wait(length: u64) -> Duration {
    DIGEST_WAIT_BASE + Duration::from_secs(length / DIGEST_RATE_FLOOR)
}

/// What is known about the digest of the bytes on disk once all of them arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DigestCheck {
    /// The server's digest for the version downloaded is known.
    Known,
    /// None to check against, and why.
    Unavailable(&'static str),
    /// The server now has another version: what is on disk may be spliced.
    Changed,
}

/// The base64 sha-256 value in a `Repr-Digest` field (`sha-256=:…:`, possibly among others).
pub fn sha256_from_field(field: &str) -> Option<String> {
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

/// The base64 sha-256 of a whole file.
pub fn sha256_file(file: &File) -> io::Result<String> {
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

impl Download<'_> {
    /// A server computing digests in the background (roam) may not have had one when the bytes
    /// were sent. roam says so with `Roam-Digest: pending`: then ask again with HEAD, with a
    /// growing pause, for as long as hashing this file can reasonably take (see
    /// [`digest_wait`]) and never past `--max-time`. A server that sends neither field has no
    /// digest: one HEAD is enough. A different ETag now means the file changed while we
    /// downloaded it.
    pub(super) async fn fetch_digest(&mut self, obs: &mut dyn Observer) -> DigestCheck {
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
            let Ok(head) = http::head(&self.connector, &url, &[], self.opts.stall_timeout).await
            else {
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
    pub(super) fn finish(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_fields() {
        assert_eq!(sha256_from_field("sha-256=:abc=:"), Some("abc=".into()));
        assert_eq!(
            sha256_from_field("sha-512=:x:, sha-256=:y:"),
            Some("y".into())
        );
        assert_eq!(sha256_from_field("md5=:x:"), None);
    }

    #[test]
    fn the_wait_grows_with_the_file() {
        assert_eq!(digest_wait(0), DIGEST_WAIT_BASE);
        assert_eq!(
            digest_wait(64 * DIGEST_RATE_FLOOR),
            DIGEST_WAIT_BASE + Duration::from_secs(64)
        );
    }
}
