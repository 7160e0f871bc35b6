//! The client's side of HTTP/1.1: one GET per connection (plain or through TLS), a response
//! head parsed with httparse, and the body read by `Content-Length` with a stall timeout on
//! every read.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head we accept.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

/// An `http://` or `https://host[:port]/path` URL, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// `https`: the connection speaks TLS.
    pub tls: bool,
    /// The host as written (a name, an IPv4 address, or an IPv6 address in brackets): what the
    /// server's certificate must name.
    pub host: String,
    /// `host:port`, as connected to and sent in `Host`.
    pub authority: String,
    /// Origin-form path, starting with `/`.
    pub path: String,
}

impl Url {
    /// Parses an http or https URL.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(rest) = s.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = s.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(format!(
                "{s:?}: only http:// and https:// URLs are supported"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{s:?}: expected http(s)://host[:port]/path"));
        }
        if path.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'#') {
            return Err(format!("{s:?}: the path must be percent-encoded"));
        }
        let has_port = authority.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']'))
        });
        let (host, authority) = if has_port {
            let (h, _) = authority.rsplit_once(':').unwrap_or((authority, ""));
            (h.to_owned(), authority.to_owned())
        } else {
            let port = if tls { 443 } else { 80 };
            (authority.to_owned(), format!("{authority}:{port}"))
        };
        if host.is_empty() {
            return Err(format!("{s:?}: expected http(s)://host[:port]/path"));
        }
        Ok(Url {
            tls,
            host,
            authority,
            path: path.to_owned(),
        })
    }

    /// The same server with another path.
    pub fn with_path(&self, path: String) -> Url {
        Url {
            path,
            ..self.clone()
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path)
    }
}

/// A byte stream to a server: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How connections are opened: the TLS client configuration for `https://` URLs (the
/// system's root certificates, or only those of `--cacert`).
#[derive(Clone, Default)]
pub struct Connector {
    tls: Option<tokio_rustls::TlsConnector>,
    /// Open Multipath TCP connections where the kernel can (TCP where it cannot, and the
    /// kernel falls back to TCP by itself when the server does not speak it).
    mptcp: bool,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .field("mptcp", &self.mptcp)
            .finish()
    }
}

impl Connector {
    /// A connector for plain `http://` only.
    pub fn plain() -> Connector {
        Connector {
            tls: None,
            mptcp: false,
        }
    }

    /// The same connector, opening Multipath TCP connections when `on`.
    pub fn mptcp(self, on: bool) -> Connector {
        Connector { mptcp: on, ..self }
    }

    /// A connector that also speaks TLS, trusting the certificates in `cacert` (PEM) if given,
    /// like curl's `--cacert`, otherwise the system's roots.
    pub fn with_tls(cacert: Option<&Path>) -> Result<Connector, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        match cacert {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("cannot read --cacert {}: {e}", path.display()))?;
                for cert in CertificateDer::pem_slice_iter(&bytes) {
                    let cert = cert.map_err(|e| {
                        format!("--cacert {}: not a PEM certificate: {e}", path.display())
                    })?;
                    roots.add(cert).map_err(|e| {
                        format!("--cacert {}: unusable certificate: {e}", path.display())
                    })?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "--cacert {}: no certificate in the file",
                        path.display()
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(format!(
                        "no usable system root certificates ({}); install ca-certificates or \
                         pass --cacert",
                        found
                            .errors
                            .first()
                            .map_or_else(|| "none found".to_owned(), |e| e.to_string())
                    ));
                }
            }
        }
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| format!("TLS configuration: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Connector {
            tls: Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
            mptcp: false,
        })
    }

    /// Opens a connection to `url`'s server, with the TLS handshake for `https`.
    async fn connect(&self, url: &Url, stall: Duration) -> io::Result<Box<dyn Stream>> {
        let stream = within(stall, self.connect_tcp(&url.authority)).await??;
        stream.set_nodelay(true)?;
        if !url.tls {
            return Ok(Box::new(stream));
        }
        let Some(tls) = &self.tls else {
            return Err(io::Error::other("https:// needs a TLS connector"));
        };
        let host = url.host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let stream = match within(stall, tls.connect(name, stream)).await? {
            Ok(s) => s,
            // The handshake itself failed (an untrusted or wrong certificate, no common
            // version): trying again gets the same answer.
            Err(e) if is_tls_error(&e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    HandshakeRefused(e.to_string()),
                ))
            }
            Err(e) => return Err(e),
        };
        Ok(Box::new(stream))
    }
}

impl Connector {
    /// Connects to the first address of `authority` that answers, over Multipath TCP if asked
    /// and the kernel has it.
    async fn connect_tcp(&self, authority: &str) -> io::Result<TcpStream> {
        if !self.mptcp {
            return TcpStream::connect(authority).await;
        }
        let mut last = None;
        for addr in tokio::net::lookup_host(authority).await? {
            match mptcp_socket(addr)?.connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{authority}: no address"))
        }))
    }
}

/// An unconnected socket for `addr`: Multipath TCP, or TCP on a kernel that refuses it
/// (built without MPTCP, or `net.mptcp.enabled=0`).
fn mptcp_socket(addr: std::net::SocketAddr) -> io::Result<tokio::net::TcpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(
        domain,
        socket2::Type::STREAM,
        Some(socket2::Protocol::MPTCP),
    )
    .or_else(|_| {
        socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
    })?;
    socket.set_nonblocking(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}

/// A TLS handshake that failed for a reason a retry does not change.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake failed: {0}")]
pub struct HandshakeRefused(String);

/// The TLS handshake failure inside `e`, if that is what `e` is.
pub fn handshake_refused(e: &io::Error) -> Option<&HandshakeRefused> {
    e.get_ref()?.downcast_ref::<HandshakeRefused>()
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
    stream: Box<dyn Stream>,
    /// Body bytes that arrived with the head.
    leftover: Vec<u8>,
    stall: Duration,
}

/// Sends `GET url` with extra header lines and reads the response head. Every network step is
/// bounded by `stall`.
pub async fn get(
    connector: &Connector,
    url: &Url,
    extra: &[(&str, String)],
    stall: Duration,
) -> io::Result<Exchange> {
    request(connector, "GET", url, extra, stall).await
}

/// Sends `HEAD url` and reads the response head.
pub async fn head(
    connector: &Connector,
    url: &Url,
    extra: &[(&str, String)],
    stall: Duration,
) -> io::Result<Head> {
    Ok(request(connector, "HEAD", url, extra, stall).await?.head)
}

async fn request(
    connector: &Connector,
    method: &str,
    url: &Url,
    extra: &[(&str, String)],
    stall: Duration,
) -> io::Result<Exchange> {
    let mut stream = connector.connect(url, stall).await?;
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
        let s = Url::parse("https://h/x").unwrap();
        assert!(s.tls);
        assert_eq!((s.host.as_str(), s.authority.as_str()), ("h", "h:443"));
        assert_eq!(s.to_string(), "https://h:443/x");
        let v6 = Url::parse("https://[::1]:8443/x").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.authority.as_str()),
            ("[::1]", "[::1]:8443")
        );
        assert!(Url::parse("ftp://h/x").is_err());
        assert!(Url::parse("https://:9/x").is_err());
        assert!(Url::parse("http://h/a b").is_err());
        assert!(Url::parse("http:///x").is_err());
    }
}
