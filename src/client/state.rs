//! What `roam get` keeps beside `FILE.part` so that running the same command again continues:
//! the URL actually downloaded (with the client ID), the version (ETag) and the length. The
//! offset itself is the part file's length, which is what is really on disk.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Resume state of one download.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumeState {
    /// The URL requested by the user.
    pub source: String,
    /// The URL bytes come from (for a roam server, with the minted client ID).
    pub url: String,
    /// Strong ETag of the version being downloaded, if the server sent one.
    pub etag: Option<String>,
    /// Complete length, once known.
    pub length: Option<u64>,
    /// `Repr-Digest` of that version, once seen.
    pub digest: Option<String>,
}

/// The state file for a part file: `FILE.part.roam`.
pub fn path_for(part: &Path) -> PathBuf {
    let mut p = part.as_os_str().to_owned();
    p.push(".roam");
    PathBuf::from(p)
}

impl ResumeState {
    /// Reads a state file; `Ok(None)` if there is none.
    pub fn load(path: &Path) -> io::Result<Option<ResumeState>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut s = ResumeState::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "source" => s.source = v.to_owned(),
                "url" => s.url = v.to_owned(),
                "etag" => s.etag = Some(v.to_owned()),
                "length" => s.length = v.parse().ok(),
                "digest" => s.digest = Some(v.to_owned()),
                _ => {}
            }
        }
        if s.url.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no url", path.display()),
            ));
        }
        Ok(Some(s))
    }

    /// Writes the state atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let mut text = format!("source={}\nurl={}\n", self.source, self.url);
        if let Some(e) = &self.etag {
            text.push_str(&format!("etag={e}\n"));
        }
        if let Some(l) = self.length {
            text.push_str(&format!("length={l}\n"));
        }
        if let Some(d) = &self.digest {
            text.push_str(&format!("digest={d}\n"));
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.part.roam");
        assert_eq!(ResumeState::load(&p).unwrap(), None);
        let s = ResumeState {
            source: "http://h:1/f".into(),
            url: "http://h:1/id/f".into(),
            etag: Some("\"a-b\"".into()),
            length: Some(10),
            digest: Some("sha-256=:x=:".into()),
        };
        s.save(&p).unwrap();
        assert_eq!(ResumeState::load(&p).unwrap(), Some(s));
    }
}
