//! HTTPS: the certificate and key (loaded at start, reloaded on SIGHUP), the rustls server
//! configuration, and per connection a TLS layer (`conn`) that keeps the map from ciphertext
//! the client acknowledged to plaintext it can use (`records`).
//!
//! roam terminates TLS itself because a terminator in front would own the TCP connection the
//! client acknowledges: roam would count bytes that reached the terminator. rustls is driven
//! directly (not through an async wrapper) so that every record roam emits is seen whole, with
//! the plaintext it carries.
//!
//! Crypto: the aws-lc-rs provider (its key exchange includes the post-quantum hybrid
//! X25519MLKEM768; certificates and signatures) with ring's record ciphers, which measured
//! faster for AES-GCM on this machine's CPU (docs/benchmarks.md).

pub mod conn;
pub mod records;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The certificate chain and key files (`--tls-cert`, `--tls-key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the leaf certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM: PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
}

/// A certificate or key that cannot be used, naming the file and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// The TLS side of a server: its configuration and the certificate in use.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    certificate: Arc<CurrentCertificate>,
    config: Arc<ServerConfig>,
}

impl Tls {
    /// Loads the certificate and key and builds the server configuration: TLS 1.2 and 1.3,
    /// ALPN `http/1.1`, stateless session tickets (resumption works across runtimes and
    /// threads without a shared cache) plus TLS 1.2 session IDs, no 0-RTT data.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let provider = Arc::new(provider());
        let key = load_pair(files, &provider)?;
        let certificate = Arc::new(CurrentCertificate(RwLock::new(Arc::new(key))));
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError(format!("TLS configuration: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| TlsError(format!("TLS session tickets: {e}")))?;
        config.max_early_data_size = 0;
        Ok(Tls {
            files: files.clone(),
            certificate,
            config: Arc::new(config),
        })
    }

    /// Loads the files again: new handshakes use the new pair, open connections keep theirs.
    /// A pair that cannot be used leaves the current one in place and says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load_pair(&self.files, &self.config.crypto_provider().clone())?;
        match self.certificate.0.write() {
            Ok(mut current) => *current = Arc::new(key),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(key),
        }
        Ok(())
    }

    /// The files in use.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// A server side for one new connection.
    pub fn accept(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        rustls::ServerConnection::new(Arc::clone(&self.config))
    }

    /// How TLS records are produced here: in user space, since roam does not hand records to
    /// the kernel (see docs/ARCHITECTURE.md, "Kernel TLS"); the answer says whether the kernel
    /// could have.
    pub fn record_path() -> &'static str {
        if crate::sys::kernel_tls_available() {
            "user space (the kernel has TLS offload, which roam does not use yet)"
        } else {
            "user space (the kernel has no TLS offload: no \"tls\" in tcp_available_ulp)"
        }
    }
}

/// The crypto provider: aws-lc-rs with ring's record ciphers.
pub(crate) fn provider() -> CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec();
    p
}

/// Reads and checks a certificate chain and its key: both parse, the chain is not empty, and
/// the key is the leaf certificate's.
fn load_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key)?;
    warn_if_exposed(&files.key);
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        TlsError(format!(
            "{} and {} cannot be used together: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    match key.keys_match() {
        Ok(()) => Ok(key),
        Err(e) => Err(TlsError(format!(
            "the key in {} does not belong to the certificate in {}: {e}",
            files.key.display(),
            files.cert.display()
        ))),
    }
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TlsError(format!("cannot read {}: {e}", path.display())))?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{}: not a PEM certificate chain: {e}",
                path.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        )));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TlsError(format!("cannot read {}: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        TlsError(format!(
            "{}: no private key (expected a PEM PKCS#8, PKCS#1 or SEC1 key): {e}",
            path.display()
        ))
    })
}

/// A key file other users can read is a key they may have copied.
fn warn_if_exposed(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o004 != 0 {
                tracing::warn!(
                    key = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the TLS key file is readable by every user of this machine (chmod o-r)"
                );
            }
        }
    }
}

/// The certificate new handshakes get; replaced whole by a reload.
#[derive(Debug)]
struct CurrentCertificate(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.0.read() {
            Ok(k) => Some(Arc::clone(&k)),
            Err(poisoned) => Some(Arc::clone(&poisoned.into_inner())),
        }
    }
}
