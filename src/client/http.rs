//! The client's side of HTTP/1.1: one GET per connection, a response head parsed with
//! httparse, and the body read by `Content-Length` with a stall timeout on every read.

use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head we accept.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

/// An `http://host[:port]/path` URL, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// `host:port`, as connected to and sent in `Host`.
    pub authority: String,
    /// Origin-form path, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses an http URL. Only `http` is supported: roam itself speaks plain HTTP/1.1.
    pub fn parse(s: &str) -> Result<Url, String> {
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| format!("{s:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{s:?}: expected http://host[:port]/path"));
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#') {
            return Err(format!("{s:?}: the path must be percent-encoded"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            || authority.ends_with(']')
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Url {
            authority,
            path: path.to_owned(),
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: String) -> Url {
        Url {
            authority: self.authority.clone(),
            path,
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// A response head.
#[derive(Clone, Debug)]
pub struct Head {
    pub status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    /// The first field named `name` (case-insensitive).
    pub fn field(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, if present and valid.
    pub fn content_length(&self) -> Option<u64> {
        self.field("content-length")?.trim().parse().ok()
    }
}

/// An open response: its head, and the connection positioned at the first body byte.
pub struct Exchange {
    pub head: Head,
    stream: TcpStream,
    /// Body bytes that arrived with the head.
    leftover: Vec<u8>,
    stall: Duration,
}

/// Sends `GET url` with extra header lines and reads the response head. Every network step is
/// bounded by `stall`.
pub async fn get(url: &Url, extra: &[(&str, String)], stall: Duration) -> io::Result<Exchange> {
    request("GET", url, extra, stall).await
}

/// Sends `HEAD url` and reads the response head.
pub async fn head(url: &Url, extra: &[(&str, String)], stall: Duration) -> io::Result<Head> {
    Ok(request("HEAD", url, extra, stall).await?.head)
}

async fn request(
    method: &str,
    url: &Url,
    extra: &[(&str, String)],
    stall: Duration,
) -> io::Result<Exchange> {
    let mut stream = within(stall, TcpStream::connect(&url.authority)).await??;
    stream.set_nodelay(true)?;
    let mut req = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: roam/{}\r\nAccept-Encoding: identity\r\n",
        url.path,
        url.authority,
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in extra {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    within(stall, stream.write_all(req.as_bytes())).await??;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let mut chunk = [0u8; 4096];
        let n = within(stall, stream.read(&mut chunk)).await??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).trim().to_owned(),
                        )
                    })
                    .collect();
                let leftover = buf[len..].to_vec();
                return Ok(Exchange {
                    head: Head { status, headers },
                    stream,
                    leftover,
                    stall,
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "response head too large",
                ))
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad response head: {e}"),
                ))
            }
        }
    }
}

impl Exchange {
    /// Reads the next piece of the body into `buf`; `Ok(0)` at end of stream. A read that waits
    /// longer than the stall timeout fails with `TimedOut`.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.len());
            buf[..n].copy_from_slice(&self.leftover[..n]);
            self.leftover.drain(..n);
            return Ok(n);
        }
        within(self.stall, self.stream.read(buf)).await?
    }

    /// Reads a whole small body (at most `limit` bytes).
    pub async fn read_small(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        let len = self.head.content_length().unwrap_or(0);
        if len > limit as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "response body too large",
            ));
        }
        let mut body = vec![0u8; len as usize];
        let mut filled = 0;
        while filled < body.len() {
            let n = self.read(&mut body[filled..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            filled += n;
        }
        Ok(body)
    }
}

async fn within<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> io::Result<T> {
    tokio::time::timeout(limit, fut).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "no progress within the stall timeout",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://example.com:8080/a/b.mp4").unwrap();
        assert_eq!(u.authority, "example.com:8080");
        assert_eq!(u.path, "/a/b.mp4");
        assert_eq!(Url::parse("http://h").unwrap().authority, "h:80");
        assert_eq!(Url::parse("http://h").unwrap().path, "/");
        assert_eq!(Url::parse("http://[::1]:9/x").unwrap().authority, "[::1]:9");
        assert!(Url::parse("https://h/x").is_err());
        assert!(Url::parse("http://h/a b").is_err());
        assert!(Url::parse("http:///x").is_err());
    }
}
