//! Client IDs: minted by `GET /`, presented as the first path segment of every download.
//!
//! An ID is a UUID (RFC 9562 version 8) made of a 60-bit random nonce and a 62-bit HMAC-SHA-256
//! tag of that nonce under a server secret. The server can tell its own IDs from forgeries
//! without remembering them, so minting stores nothing and a forged or never-used ID allocates
//! nothing: memory grows only with (client, file) sessions, which are capped.

pub mod limit;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use uuid::Uuid;

/// Length of an ID in its text form, `xxxxxxxx-xxxx-8xxx-xxxx-xxxxxxxxxxxx`.
pub const ID_TEXT_LEN: usize = 36;

/// A client ID the server has verified as its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId(Uuid);

impl ClientId {
    /// The ID's nonce: its first eight bytes, which determine the rest (the tag is a function
    /// of them), so it identifies the client as well as the whole ID does, in one word.
    pub fn nonce(&self) -> u64 {
        self.0.as_u64_pair().0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The nonce of the ID-shaped first segment of a request target (`/{id}/…`, origin-form or
/// absolute-form), without verifying it: enough to tell whether two requests name the same
/// client. Any text that is not ID-shaped gives `None`.
pub fn nonce_in_target(target: &str) -> Option<u64> {
    let path = match target.find("://") {
        Some(i) => &target[i + 3..][target[i + 3..].find('/')?..],
        None => target,
    };
    let segment = path.strip_prefix('/')?.split(['/', '?']).next()?;
    if segment.len() != ID_TEXT_LEN {
        return None;
    }
    Uuid::try_parse(segment).ok().map(|u| u.as_u64_pair().0)
}

/// The secret kept in `dir` (`id-secret`, 32 random bytes, mode 0600), created on first use, so
/// IDs minted before a restart stay valid after it. A file too short to be a secret is an
/// error naming it, never silently replaced (that would invalidate every client's ID).
pub fn secret_in(dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("id-secret");
    let mut fresh = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut fresh);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(&fresh)?;
            f.sync_all()?;
            std::fs::File::open(dir)?.sync_all()?;
            return Ok(fresh.to_vec());
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let secret = std::fs::read(&path)?;
    if secret.len() < 16 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} holds {} bytes, not a secret (at least 16): restore it, or remove it to \
                 start with a new one (every ID minted before then stops working)",
                path.display(),
                secret.len()
            ),
        ));
    }
    Ok(secret)
}

/// True for text in the one spelling of an ID: 36 characters, lowercase hexadecimal digits
/// with hyphens after the 8th, 12th, 16th and 20th. Says nothing about whose ID it is.
pub fn is_id_shaped(text: &str) -> bool {
    text.len() == ID_TEXT_LEN
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

/// Why a path segment is not one of our IDs. Both answer 404; the reason goes into the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("malformed client id")]
    Malformed,
    #[error("unknown client id")]
    Unknown,
}

/// Mints and verifies IDs under one secret.
#[derive(Clone)]
pub struct IdAuthority {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for IdAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdAuthority { .. }")
    }
}

impl IdAuthority {
    /// An authority keyed by `secret` (any length; 32 random bytes is plenty). Servers sharing a
    /// secret accept each other's IDs.
    pub fn new(secret: &[u8]) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        IdAuthority { mac }
    }

    /// An authority with a fresh random secret: IDs are valid until the process exits.
    pub fn random() -> Self {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Self::new(&secret)
    }

    /// A new ID.
    pub fn mint(&self) -> ClientId {
        let mut nonce = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut nonce);
        ClientId(self.seal(nonce))
    }

    /// Verifies the text form of an ID. Only the lowercase hyphenated form is accepted, so each
    /// ID has exactly one spelling (and one URL).
    pub fn verify(&self, text: &str) -> Result<ClientId, IdError> {
        if !is_id_shaped(text) {
            return Err(IdError::Malformed);
        }
        let uuid = Uuid::try_parse(text).map_err(|_| IdError::Malformed)?;
        let bytes = uuid.as_bytes();
        let mut nonce = [0u8; 8];
        nonce.copy_from_slice(&bytes[..8]);
        let expected = self.seal(nonce);
        // Constant-time comparison: the tag is a secret until it matches.
        let diff = expected
            .as_bytes()
            .iter()
            .zip(bytes.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff == 0 {
            Ok(ClientId(uuid))
        } else {
            Err(IdError::Unknown)
        }
    }

    /// Builds the UUID for a nonce: version 8 in the nonce's high bits of byte 6 and the RFC
    /// variant in the tag's byte 8: 60 random nonce bits and 62 bits of HMAC output remain.
    fn seal(&self, mut nonce: [u8; 8]) -> Uuid {
        nonce[6] = (nonce[6] & 0x0f) | 0x80;
        let mut mac = self.mac.clone();
        mac.update(&nonce);
        let tag = mac.finalize().into_bytes();
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&nonce);
        bytes[8..].copy_from_slice(&tag[..8]);
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        Uuid::from_bytes(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_secret_in_a_state_directory_is_made_once_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = secret_in(dir.path()).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(secret_in(dir.path()).unwrap(), first);
        let mode = std::fs::metadata(dir.path().join("id-secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join("id-secret"), b"short").unwrap();
        let e = secret_in(dir.path()).unwrap_err().to_string();
        assert!(e.contains("id-secret") && e.contains("5 bytes"), "{e}");
    }

    #[test]
    fn minted_ids_verify_and_are_v8_text() {
        let auth = IdAuthority::new(b"secret");
        for _ in 0..100 {
            let id = auth.mint();
            let text = id.to_string();
            assert_eq!(text.len(), ID_TEXT_LEN);
            assert_eq!(&text[14..15], "8");
            assert_eq!(auth.verify(&text), Ok(id));
        }
    }

    #[test]
    fn nonce_in_target_names_the_client() {
        let auth = IdAuthority::new(b"n");
        let id = auth.mint();
        assert_eq!(nonce_in_target(&format!("/{id}/a/b.txt")), Some(id.nonce()));
        assert_eq!(
            nonce_in_target(&format!("http://h:1/{id}/x?q")),
            Some(id.nonce())
        );
        assert_eq!(nonce_in_target("/"), None);
        assert_eq!(nonce_in_target("/short/x"), None);
        assert_eq!(nonce_in_target("http://h"), None);
    }

    #[test]
    fn other_secret_and_tampering_are_unknown() {
        let a = IdAuthority::new(b"a");
        let b = IdAuthority::new(b"b");
        let text = a.mint().to_string();
        assert_eq!(b.verify(&text), Err(IdError::Unknown));
        let mut tampered = text.into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            a.verify(std::str::from_utf8(&tampered).unwrap()),
            Err(IdError::Unknown)
        );
    }

    #[test]
    fn other_spellings_are_malformed() {
        let auth = IdAuthority::new(b"s");
        let text = auth.mint().to_string();
        assert_eq!(auth.verify(&text.to_uppercase()), Err(IdError::Malformed));
        assert_eq!(auth.verify(&text.replace('-', "")), Err(IdError::Malformed));
        assert_eq!(auth.verify(&format!("{{{text}}}")), Err(IdError::Malformed));
        assert_eq!(auth.verify(""), Err(IdError::Malformed));
        assert_eq!(
            auth.verify("..%2f..%2f..%2f..%2f..%2f..%2f..%2f"),
            Err(IdError::Malformed)
        );
    }

    proptest! {
        #[test]
        fn random_text_never_verifies(s in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}") {
            let auth = IdAuthority::new(b"k");
            prop_assert!(auth.verify(&s).is_err());
        }
    }
}
