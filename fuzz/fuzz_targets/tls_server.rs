//! Fuzzes what a stranger's bytes reach on the HTTPS listener before any request exists: the
//! server's TLS layer fed arbitrary ciphertext in arbitrary pieces (rustls, then roam's
//! plaintext drain and control-record accounting), and the record map fed arbitrary "records".
//! Nothing may panic; the map never reports more plaintext delivered than was encrypted, and
//! never less than it reported before.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use roam::sys::AckCounter;
use roam::tls::conn::TlsLayer;
use roam::tls::records::RecordMap;
use roam::tls::{Tls, TlsFiles};
use std::sync::OnceLock;

/// A server configuration with a certificate made at start (never a key in the repository).
fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("roam-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.cert, key.cert.pem()).unwrap();
        std::fs::write(&files.key, key.signing_key.serialize_pem()).unwrap();
        Tls::load(&files).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Ciphertext in pieces whose sizes come from the input itself.
        let mut layer = TlsLayer::new(tls().accept().unwrap(), AckCounter::BytesAcked(0));
        let mut plain = BytesMut::new();
        let mut input = rest;
        let mut step = usize::from(mode >> 1) + 1;
        while !input.is_empty() {
            let n = step.min(input.len());
            let mut piece = &input[..n];
            match layer.receive(&mut piece, &mut plain) {
                Ok(_) => {}
                Err(_) => break,
            }
            input = &input[n..];
            step = step * 7 % 251 + 1;
        }
        let _ = layer.take_control();
        // Nothing was encrypted: nothing can be delivered, whatever the kernel says.
        for acked in [0u64, 1, 1 << 20, u64::MAX] {
            assert_eq!(
                layer.plaintext_counter(AckCounter::BytesAcked(acked)),
                AckCounter::BytesAcked(0)
            );
        }
    } else {
        // Arbitrary output claimed for arbitrary plaintext lengths.
        let mut map = RecordMap::new();
        let mut last = 0;
        for chunk in rest.chunks(97) {
            let plain = usize::from(chunk[0]) * 131;
            let _ = map.wrote(chunk, plain);
            let delivered = map.delivered(map.produced() / 2);
            assert!(delivered >= last && delivered <= map.plaintext());
            last = delivered;
        }
    }
});
