//! A connection on the HTTPS listener: telling a TLS client from a plain-HTTP one, the
//! handshake, and the TLS side of reading and writing. The record map in `tls::conn` keeps
//! the accounting in plaintext, so everything above this file (requests, bodies, progress)
//! is the same as on a plain connection.

use super::end::Ending;
use super::progress::BodyId;
use super::{Connection, Received};
use crate::ops::metrics::TlsHandshake;
use crate::sys::{self, AckCounter};
use crate::tls::conn::{Input, TlsLayer};
use std::io::{self, Read};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// `Read` over the non-blocking socket, for rustls: `WouldBlock` when nothing is there.
struct SocketReader<'a>(&'a TcpStream);

impl Read for SocketReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Connection {
    /// On an HTTPS listener: looks at the first byte (as nginx does) to tell a TLS ClientHello
    /// from a plain-HTTP request, then runs the handshake, both within the header timeout. A
    /// plain request is read and answered in cleartext with a `400`; anything else is closed.
    pub(super) async fn start_tls(&mut self) -> Result<(), Ending> {
        if self.svc.tls().is_none() {
            return Ok(());
        }
        let deadline = Instant::now() + self.svc.config().header_timeout;
        let first = self.first_byte(deadline).await?;
        match first {
            TLS_HANDSHAKE => {}
            b'A'..=b'Z' => {
                self.plain_on_tls_port = true;
                return Ok(());
            }
            other => {
                tracing::debug!(peer = %self.peer, first_byte = other, "neither TLS nor HTTP; closing");
                return Err(Ending::Done);
            }
        }
        let svc = std::sync::Arc::clone(&self.svc);
        let Some(tls) = svc.tls() else {
            return Ok(());
        };
        let handshakes = svc.metrics().tls();
        let session = tls.accept().map_err(|e| {
            tracing::warn!(error = %e, "cannot start a TLS session");
            handshakes.handshake(TlsHandshake::Failed);
            Ending::NetworkFailed(io::Error::other(e))
        })?;
        // Nothing was written yet, so the counter reads as it did at accept (read here rather
        // than kept from then: the idle connection's future stays smaller).
        let at_accept =
            sys::ack_counter_on(self.fd(), self.transport).unwrap_or(AckCounter::Unknown);
        self.tls = Some(Box::new(TlsLayer::new(session, at_accept)));
        let result = self.handshake(deadline).await;
        // Counted once a ClientHello's first byte arrived; a handshake stopped by a shutdown or
        // a takeover is neither a success nor the client's failure.
        match &result {
            Ok(()) => handshakes.handshake(TlsHandshake::Ok),
            Err(Ending::Shutdown | Ending::TakenOver) => {}
            Err(_) if Instant::now() >= deadline => handshakes.handshake(TlsHandshake::TimedOut),
            Err(_) => handshakes.handshake(TlsHandshake::Failed),
        }
        result
    }

    /// Waits for the client's first byte without consuming it.
    async fn first_byte(&mut self, deadline: Instant) -> Result<u8, Ending> {
        let mut byte = [0u8; 1];
        tokio::select! {
            biased;
            _ = self.handle.abort.cancelled() => Err(self.cancelled()),
            r = self.stream.peek(&mut byte) => match r {
                Ok(0) => Err(Ending::Done),
                Ok(_) => Ok(byte[0]),
                Err(e) => Err(Ending::from_io(e)),
            },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::debug!(peer = %self.peer, "no first byte within the header timeout");
                Err(Ending::Done)
            }
        }
    }

    /// Runs the TLS handshake to its end. A client that breaks the protocol gets rustls's
    /// alert and the connection closes; one that stalls is dropped at `deadline`.
    async fn handshake(&mut self, deadline: Instant) -> Result<(), Ending> {
        loop {
            self.take_tls_control()?;
            self.flush_tls(false).await?;
            if !self.tls.as_ref().is_some_and(|t| t.is_handshaking()) {
                break;
            }
            tokio::select! {
                biased;
                _ = self.handle.abort.cancelled() => return Err(self.cancelled()),
                r = self.stream.readable() => r.map_err(Ending::from_io)?,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                    return Err(Ending::Done);
                }
            }
            match self.read_some() {
                Ok(Received::Bytes) => {}
                Ok(Received::Closed) => {
                    tracing::debug!(peer = %self.peer, "client left during the TLS handshake");
                    return Err(Ending::Done);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                    self.try_flush_tls();
                    return Err(Ending::Done);
                }
                Err(e) => return Err(Ending::from_io(e)),
            }
        }
        if let Some((version, suite)) = self.tls.as_ref().and_then(|t| t.negotiated()) {
            tracing::debug!(peer = %self.peer, ?version, ?suite, "TLS handshake done");
        }
        Ok(())
    }

    /// One read from the socket into the request buffer: directly, or through TLS (which may
    /// yield no plaintext yet, or queue records to send back).
    pub(super) fn read_some(&mut self) -> io::Result<Received> {
        match self.tls.as_deref_mut() {
            None => {
                // A read that leaves room in the buffer took everything the socket had: its
                // readiness is cleared now (as tokio's own `poll_read` does after a short
                // read), so the next wait does not begin with a `recv` that finds nothing,
                // one wasted system call per request. Readiness that a newer event set stays.
                let (fd, buf) = (self.fd(), &mut self.buf);
                let mut short = false;
                let read = self.stream.try_io(tokio::io::Interest::READABLE, || {
                    let room = buf.capacity() - buf.len();
                    let n = crate::sys::recv_into(fd, buf)?;
                    if n > 0 && n < room {
                        short = true;
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(n)
                });
                match read {
                    _ if short => Ok(Received::Bytes),
                    Ok(0) => Ok(Received::Closed),
                    Ok(_) => Ok(Received::Bytes),
                    Err(e) => Err(e),
                }
            }
            Some(tls) => match tls.receive(&mut SocketReader(&self.stream), &mut self.buf)? {
                Input::Closed => Ok(Received::Closed),
                Input::Progress => Ok(Received::Bytes),
            },
        }
    }

    /// Moves records rustls queued by itself to the outgoing buffer.
    fn take_tls_control(&mut self) -> Result<(), Ending> {
        if let Some(tls) = self.tls.as_deref_mut() {
            tls.take_control().map_err(Ending::NetworkFailed)?;
        }
        Ok(())
    }

    /// Encrypts `buf` (part of a response) into the outgoing buffer; its bytes count as
    /// written for `body` from now on (the record map decides when they are delivered).
    pub(super) fn tls_encrypt(&mut self, buf: &[u8], body: Option<BodyId>) -> Result<(), Ending> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return Err(Ending::NetworkFailed(io::Error::other("no TLS layer")));
        };
        if let Err(e) = tls.encrypt(buf) {
            if e.kind() == io::ErrorKind::InvalidData {
                tracing::error!(error = %e, "TLS record accounting failed; closing the connection");
            }
            return Err(Ending::NetworkFailed(e));
        }
        self.deliveries.wrote(buf.len() as u64, body);
        Ok(())
    }

    /// Writes every byte of TLS output waiting, waiting for the socket as plain writes do.
    pub(super) async fn flush_tls(&mut self, stoppable: bool) -> Result<(), Ending> {
        loop {
            let Some(tls) = self.tls.as_deref_mut() else {
                return Ok(());
            };
            if tls.unsent().is_empty() {
                return Ok(());
            }
            match self.stream.try_write(tls.unsent()) {
                Ok(n) => tls.sent(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.settle();
                    self.writable(stoppable).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Ending::from_io(e)),
            }
        }
    }

    /// Writes what TLS output the socket takes now, without waiting (alerts before a close).
    pub(super) fn try_flush_tls(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            while !tls.unsent().is_empty() {
                match self.stream.try_write(tls.unsent()) {
                    Ok(n) if n > 0 => tls.sent(n),
                    _ => break,
                }
            }
        }
    }

    /// Before an orderly close that we begin: our `close_notify` (RFC 9112 §9.8), if the socket
    /// takes it now. Not in answer to the client's: a client that sent its `close_notify`
    /// closes its socket next, and if ours arrived before that close, its kernel would answer
    /// the unread bytes with a reset, which reads as a client that left with bytes unread
    /// (TLS 1.3 allows the half-close; curl, for one, closes without reading further).
    pub(super) fn tls_close_notify(&mut self) {
        if let Some(tls) = self.tls.as_deref_mut() {
            if tls.is_handshaking() || tls.peer_closed() || !tls.unsent().is_empty() {
                return;
            }
            if tls.close_notify().is_ok() {
                self.try_flush_tls();
            }
        }
    }
}
