//! A private PKI for HTTPS tests, made fresh by each test (never a checked-in key): a CA, leaf
//! certificates it signs for `localhost` and the addresses a test needs, PEM files for the
//! server and for curl/wget/`roam get`, and a blocking rustls client.
#![allow(dead_code)]

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A CA and the files of one server certificate it signed.
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_key: rcgen::KeyPair,
    ca_params: rcgen::CertificateParams,
    ca_der: CertificateDer<'static>,
    /// The names and addresses leaves are issued for.
    names: Vec<String>,
    ips: Vec<IpAddr>,
    /// The leaf in the server's files now.
    pub leaf_der: CertificateDer<'static>,
}

impl TestPki {
    /// A CA, and a leaf for `localhost`, 127.0.0.1 and `ips`, written to `cert.pem` and
    /// `key.pem` (mode 0600); the CA to `ca.pem`.
    pub fn new(ips: &[IpAddr]) -> TestPki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "roam test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let mut all_ips = vec![IpAddr::from([127, 0, 0, 1])];
        all_ips.extend_from_slice(ips);
        let mut pki = TestPki {
            dir,
            ca_key,
            ca_params,
            ca_der: ca.der().clone(),
            names: vec!["localhost".into()],
            ips: all_ips,
            leaf_der: CertificateDer::from(Vec::new()),
        };
        let (cert, key) = pki.issue();
        pki.install(&cert, &key);
        pki
    }

    /// A new leaf: (certificate PEM, key PEM), and its DER as `leaf_der` once installed.
    pub fn issue(&self) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(self.names.clone()).unwrap();
        for ip in &self.ips {
            params
                .subject_alt_names
                .push(rcgen::SanType::IpAddress(*ip));
        }
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert, key)
    }

    /// Writes a leaf as the server's files (atomically: a rename over each).
    pub fn install(&mut self, cert: &rcgen::Certificate, key: &rcgen::KeyPair) {
        write_atomic(&self.cert_path(), cert.pem().as_bytes());
        write_atomic(&self.key_path(), key.serialize_pem().as_bytes());
        self.leaf_der = cert.der().clone();
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// The files for the server's configuration.
    pub fn files(&self) -> roam::tls::TlsFiles {
        roam::tls::TlsFiles {
            cert: self.cert_path(),
            key: self.key_path(),
        }
    }

    /// A client configuration trusting this CA only, TLS 1.3 and 1.2, ALPN http/1.1.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client_config_for(&[&rustls::version::TLS13, &rustls::version::TLS12])
    }

    /// The same, limited to `versions`.
    pub fn client_config_for(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A blocking TLS connection to a test server.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Completes a TLS handshake with `addr` over `tcp` (already connected), checking the
/// certificate against `config` for the name `localhost` or the address.
pub fn tls_over(tcp: TcpStream, config: &Arc<rustls::ClientConfig>) -> io::Result<TlsStream> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn =
        rustls::ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    let mut tcp = tcp;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// Connects to `addr` and completes the handshake.
pub fn tls_connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> TlsStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    tcp.set_nodelay(true).unwrap();
    tls_over(tcp, config).expect("TLS handshake")
}

/// The server certificate a connection got.
pub fn peer_leaf(s: &TlsStream) -> CertificateDer<'static> {
    s.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
        .expect("a certificate")
}

/// How reading a TLS stream to its end went.
#[derive(Debug, PartialEq, Eq)]
pub enum TlsEnd {
    /// `close_notify`, or the end of the TCP stream.
    Closed,
    /// A reset (or another error).
    Reset,
    /// Nothing within the read timeout.
    TimedOut,
}

/// Reads until the stream ends; the plaintext and how it ended.
pub fn drain_tls(s: &mut TlsStream) -> (Vec<u8>, TlsEnd) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, TlsEnd::Closed),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (out, TlsEnd::Closed),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return (out, TlsEnd::TimedOut)
            }
            Err(_) => return (out, TlsEnd::Reset),
        }
    }
}

/// A private key in DER for a `rustls` server configuration in-process.
pub fn key_der(key: &rcgen::KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}
