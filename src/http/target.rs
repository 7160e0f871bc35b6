//! Request targets: from the raw target of a request line to a [`Route`], with the file path
//! percent-decoded exactly once and built from validated components. Pure: no filesystem.

use percent_encoding::percent_decode_str;
use std::path::{Path, PathBuf};

/// Where a request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/`: mint a client ID.
    Mint,
    /// `/{id}/{path}`: a download. `id` is the raw segment, verified later.
    File { id: &'a str, path: RelPath },
}

/// A relative path made only of normal components: no `.`/`..`, no separators inside a
/// component, no NUL, no drive prefix, and (unless allowed) no dotfiles. Joining it below a
/// directory can only name something below that directory (symlinks aside, which the opener
/// handles).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelPath(PathBuf);

impl RelPath {
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

/// Why a target is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetError {
    /// Not a form a GET may use (RFC 9112 §3.2): a 400.
    BadForm,
    /// The first segment is not shaped like an ID, or the path has no file part.
    NoSuchRoute,
    /// The path names something we never serve (traversal, dotfile, device name…). Answered
    /// with the same 404 as a missing file, so it says nothing about what exists.
    Refused,
}

/// Routes a request target. Accepts origin-form (`/a/b?q`) and absolute-form
/// (`http://host/a/b`, RFC 9112 §3.2.2: servers must accept it); the query is ignored.
pub fn route(target: &str, allow_dotfiles: bool) -> Result<Route<'_>, TargetError> {
    let path = origin_path(target)?;
    if path == "/" {
        return Ok(Route::Mint);
    }
    let rest = &path[1..];
    let (id, file) = rest.split_once('/').ok_or(TargetError::NoSuchRoute)?;
    if file.is_empty() {
        return Err(TargetError::NoSuchRoute);
    }
    Ok(Route::File {
        id,
        path: decode_path(file, allow_dotfiles)?,
    })
}

fn origin_path(target: &str) -> Result<&str, TargetError> {
    let without_query = target.split_once('?').map_or(target, |(p, _)| p);
    if without_query.starts_with('/') {
        return Ok(without_query);
    }
    for scheme in ["http://", "https://"] {
        // Bytes, not str slicing: the target may hold a multi-byte character right where the
        // scheme would end.
        if without_query.len() > scheme.len()
            && without_query.as_bytes()[..scheme.len()].eq_ignore_ascii_case(scheme.as_bytes())
        {
            let after = &without_query[scheme.len()..];
            return Ok(after.find('/').map_or("/", |i| &after[i..]));
        }
    }
    Err(TargetError::BadForm)
}

/// Decodes `a/b%20c/d` into validated components. Splitting happens on the raw `/` before
/// decoding, so `%2F` can never introduce a separator, and each segment is decoded once, so
/// `%252e` stays the literal `%2e`.
fn decode_path(raw: &str, allow_dotfiles: bool) -> Result<RelPath, TargetError> {
    let mut path = PathBuf::new();
    for segment in raw.split('/') {
        let decoded = percent_decode_str(segment)
            .decode_utf8()
            .map_err(|_| TargetError::Refused)?;
        if !component_ok(&decoded, allow_dotfiles) {
            return Err(TargetError::Refused);
        }
        path.push(decoded.as_ref());
    }
    Ok(RelPath(path))
}

fn component_ok(c: &str, allow_dotfiles: bool) -> bool {
    if c.is_empty() || c == "." || c == ".." {
        return false;
    }
    if c.starts_with('.') && !allow_dotfiles {
        return false;
    }
    // Separators of any platform, NUL and controls; ':' would be a drive prefix or an NTFS
    // stream on Windows.
    if c.chars()
        .any(|ch| ch == '/' || ch == '\\' || ch == ':' || ch.is_control())
    {
        return false;
    }
    !is_windows_device(c)
}

/// `CON`, `NUL`, `COM1.txt`…: names Windows maps to devices whatever the folder. Refused
/// everywhere so a tree served from Windows behaves like one served from Linux.
fn is_windows_device(c: &str) -> bool {
    let stem = c.split('.').next().unwrap_or(c).trim_end();
    let upper = stem.to_ascii_uppercase();
    matches!(upper.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((upper.starts_with("COM") || upper.starts_with("LPT"))
            && upper.len() == 4
            && upper.as_bytes()[3].is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Component;

    fn file(target: &str) -> Result<PathBuf, TargetError> {
        match route(target, false)? {
            Route::File { path, .. } => Ok(path.0),
            Route::Mint => panic!("mint"),
        }
    }

    #[test]
    fn routes() {
        assert_eq!(route("/", false), Ok(Route::Mint));
        assert_eq!(route("/?x=1", false), Ok(Route::Mint));
        assert_eq!(route("http://example.com", false), Ok(Route::Mint));
        assert_eq!(file("/id/a.txt"), Ok(PathBuf::from("a.txt")));
        assert_eq!(
            file("/id/dir/sub/a%20b.txt?x"),
            Ok(PathBuf::from("dir/sub/a b.txt"))
        );
        assert_eq!(file("HTTP://host:8080/id/a"), Ok(PathBuf::from("a")));
        assert_eq!(file("/id/%E2%82%AC.txt"), Ok(PathBuf::from("\u{20ac}.txt")));
        assert_eq!(route("/id", false), Err(TargetError::NoSuchRoute));
        assert_eq!(route("/id/", false), Err(TargetError::NoSuchRoute));
        assert_eq!(route("*", false), Err(TargetError::BadForm));
        assert_eq!(route("id/a", false), Err(TargetError::BadForm));
        assert_eq!(route("", false), Err(TargetError::BadForm));
        // Found by the fuzzer: a multi-byte character where "http://" would end.
        assert_eq!(
            route("http:/\u{464}xxxxx", false),
            Err(TargetError::BadForm)
        );
        assert_eq!(route("HTTPS:/\u{e9}", false), Err(TargetError::BadForm));
    }

    #[test]
    fn hostile_paths_are_refused() {
        for t in [
            "/id/..",
            "/id/../x",
            "/id/a/../../x",
            "/id/%2e%2e/x",
            "/id/%2E%2E%2Fetc",
            "/id/..%2fetc",
            "/id/a/%2e%2e",
            "/id/.",
            "/id/./a",
            "/id/a\\..\\b",
            "/id/%5c..%5cx",
            "/id/c:/x",
            "/id/c%3a",
            "/id//etc/passwd",
            "/id/%2fetc%2fpasswd",
            "/id/a%00b",
            "/id/%c0%ae%c0%ae/x",
            "/id/.git/config",
            "/id/.env",
            "/id/a/.hidden",
            "/id/CON",
            "/id/nul.txt",
            "/id/com1",
            "/id/LPT9.log",
            "/id/a//b",
            "/id/a/",
            "/id/%0d%0a",
            "/id/a\u{7f}",
        ] {
            assert!(
                matches!(
                    route(t, false),
                    Err(TargetError::Refused | TargetError::NoSuchRoute)
                ),
                "{t}"
            );
        }
        // Double encoding decodes once: a file literally named "%2e%2e" is an ordinary name.
        assert_eq!(file("/id/%252e%252e"), Ok(PathBuf::from("%2e%2e")));
        // Dotfiles may be allowed; dot segments never.
        assert!(matches!(route("/id/.env", true), Ok(Route::File { .. })));
        assert_eq!(route("/id/..", true), Err(TargetError::Refused));
        assert!(!is_windows_device("console"));
        assert!(!is_windows_device("com10"));
    }

    proptest! {
        #[test]
        fn decoded_paths_only_hold_normal_components(target in "/[a-z0-9-]{1,8}/[a-zA-Z0-9%./\\\\:_~-]{1,40}") {
            if let Ok(Route::File { path, .. }) = route(&target, true) {
                prop_assert!(path.as_path().is_relative());
                for c in path.as_path().components() {
                    prop_assert!(matches!(c, Component::Normal(_)));
                }
            }
        }
    }
}
