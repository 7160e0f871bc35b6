//! One client connection, from accept to close: reading request heads (keep-alive, pipelining,
//! timeouts) here; writing responses and sending files in `send`; confirming what each body's
//! peer acknowledged in `progress`; closing in `close`; why it ended in `end`.
//!
//! Progress is settled at milestones while sending, whenever the socket blocks, while waiting
//! for the next request, and once more before the socket is dropped (the kernel's counters
//! outlive `EPIPE` and `ECONNRESET`, not `close`).

mod close;
pub mod end;
pub mod progress;
mod send;
mod tls;

use self::end::Ending;
use self::progress::Deliveries;
use crate::http::error::RequestError;
use crate::http::request::{self, Method, Request};
use crate::ops::access_log::AccessRecord;
use crate::ops::metrics::ConnectionGauge;
use crate::respond;
use crate::service::Service;
use crate::session::ConnectionHandle;
use crate::settings::Accounting;
use crate::sys::{self, AckCounter};
use crate::throttle::LogThrottle;
use crate::tls::conn::TlsLayer;
use bytes::{Buf, BytesMut};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Read buffer growth step. The buffer is allocated only when a request is arriving and freed
/// whenever the connection goes idle, so idle keep-alive connections hold no buffer.
const READ_CHUNK: usize = 2048;
/// How often an idle connection re-reads the acknowledgement counter while a finished body is
/// still unconfirmed.
const SETTLE_TICK: Duration = Duration::from_millis(20);
/// Most unconfirmed bodies a connection keeps before reading the counter anyway.
const SETTLE_BATCH: usize = 16;

/// At most one warning a second for server-side request failures.
static OURS_LOG: LogThrottle = LogThrottle::new();

/// What one read from the socket brought.
enum Received {
    /// Request bytes (possibly none yet: part of a TLS record).
    Bytes,
    /// The peer closed its side.
    Closed,
}

/// Why reading a request stopped.
enum ReadEnd {
    Bad(RequestError),
    End(Ending),
}

struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    svc: Arc<Service>,
    handle: ConnectionHandle,
    /// Unparsed bytes; empty and unallocated between requests.
    buf: BytesMut,
    deliveries: Deliveries,
    /// Whether `TCP_NOTSENT_LOWAT` is set yet (it is, from the first large body on).
    lowat_set: bool,
    /// The TLS layer, on an HTTPS listener (boxed: plain connections stay small).
    tls: Option<Box<TlsLayer>>,
    /// A plain-HTTP request arrived on the HTTPS listener: it is answered with a cleartext
    /// `400` saying so, then the connection closes.
    plain_on_tls_port: bool,
    /// TCP or Multipath TCP: where acknowledgements are read.
    transport: sys::Transport,
    /// Counts the connection as open while it lives.
    _open: ConnectionGauge,
    /// The listener's connection slot, given back when the connection ends.
    _slot: Option<OwnedSemaphorePermit>,
}

/// Serves one accepted connection to the end. Never panics on peer behaviour; every error ends
/// only this connection; `slot` (the listener's permit) is given back when it ends.
///
/// The socket is set up here, before the connection's task starts, so that the task's future
/// holds the connection and nothing else: an idle connection costs that future plus the
/// runtime's share (docs/benchmarks.md, memory per connection).
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    svc: Arc<Service>,
    shutdown: CancellationToken,
    slot: Option<OwnedSemaphorePermit>,
) -> impl Future<Output = ()> + Send + 'static {
    let open = svc.metrics().connection();
    let fd = stream.as_raw_fd();
    let transport = sys::transport(fd);
    configure_socket(&stream, &svc, transport);
    let at_accept = sys::ack_counter_on(fd, transport).unwrap_or(AckCounter::Unknown);
    let handle = ConnectionHandle::new(svc.next_connection_id(), peer.ip(), &shutdown);
    let tls = svc.tls().is_some();
    let mut conn = Connection {
        stream,
        peer,
        svc,
        handle,
        buf: BytesMut::new(),
        // Through TLS the layer counts from the handshake's baseline and reports plaintext.
        deliveries: Deliveries::new(if tls {
            AckCounter::BytesAcked(0)
        } else {
            at_accept
        }),
        lowat_set: false,
        tls: None,
        plain_on_tls_port: false,
        transport,
        _open: open,
        _slot: slot,
    };
    // The block uses `conn` where it was captured: an `async fn` taking it would hold it twice
    // (its argument and the body's binding of it).
    async move {
        let end = match Box::pin(conn.start_tls()).await {
            Ok(()) => conn.run().await,
            Err(end) => end,
        };
        Box::pin(conn.close(end)).await;
    }
}

/// Socket options, checked on both transports (Linux 6.18; `net/mptcp/sockopt.c`): on
/// Multipath TCP, `TCP_NODELAY` and keepalive apply to every subflow, and `TCP_NOTSENT_LOWAT`
/// (conn/send.rs) and `SO_LINGER` (conn/close.rs; 0 sends MP_FASTCLOSE, a reset of the whole
/// connection) work at the connection level. `TCP_USER_TIMEOUT` is refused (`ENOPROTOOPT`),
/// so it is skipped there: `--write-stall-timeout` already bounds every write and the wait for
/// final acknowledgements on both transports, which is what drops a vanished peer; the kernel
/// keeps retrying each subflow by its own rules, which harms nothing once roam has closed.
fn configure_socket(stream: &TcpStream, svc: &Service, transport: sys::Transport) {
    let cfg = svc.config();
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(cfg.tcp_keepalive)
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "cannot set TCP keepalive");
    }
    #[cfg(target_os = "linux")]
    if transport == sys::Transport::Tcp {
        if let Err(e) = sock.set_tcp_user_timeout(Some(cfg.tcp_user_timeout)) {
            tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
        }
    }
}

impl Connection {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Serves requests until the connection ends. The loop itself only waits for the next
    /// head: everything a request does after that runs in one boxed future
    /// ([`Connection::handle`]), so an idle connection's task is as small as that wait
    /// (docs/benchmarks.md, memory per connection).
    async fn run(&mut self) -> Ending {
        let mut first = true;
        loop {
            let read = self.read_request(first).await;
            first = false;
            if let Some(end) = Box::pin(self.handle(read)).await {
                return end;
            }
        }
    }

    /// Answers one request (or the error reading it); `Some` ends the connection.
    async fn handle(&mut self, read: Result<Request, ReadEnd>) -> Option<Ending> {
        let req = match read {
            Ok(req) => req,
            Err(ReadEnd::End(end)) => return Some(end),
            Err(ReadEnd::Bad(err)) => {
                self.log_error(&err, None);
                let resp = respond::error_response(&err, false);
                let received = std::time::Instant::now();
                let line = self.access_line(None, received);
                return Some(match self.send(resp, true, false, received, line).await {
                    Ok(()) => Ending::Done,
                    Err(end) => end,
                });
            }
        };
        let received = std::time::Instant::now();
        if self.plain_on_tls_port {
            let err = RequestError::PlainHttpOnTlsPort;
            self.log_error(&err, Some(&req));
            let resp = respond::error_response(&err, req.method == Method::Head);
            let line = self.access_line(Some(&req), received);
            return Some(
                match self.send(resp, true, req.http10, received, line).await {
                    Ok(()) => Ending::Done,
                    Err(end) => end,
                },
            );
        }
        // Confirm what earlier responses delivered before this request can read their
        // records: only a request from the same client can (its sessions are keyed by its
        // ID), so responses to other clients sharing the connection (a proxy, a load
        // generator) are settled in batches instead of costing a TCP_INFO read each.
        if self.deliveries.pending_count() >= SETTLE_BATCH || self.pending_for(&req.target) {
            self.settle();
        }
        let head_only = req.method == Method::Head;
        let deliveries = &self.deliveries;
        let in_flight = |key| deliveries.written_end(key);
        let decided = respond::respond(&self.svc, &req, &self.handle, &in_flight).await;
        let (resp, close) = match decided {
            Ok(resp) => (resp, !req.keep_alive),
            Err(RequestError::TakenOver) => return Some(Ending::TakenOver),
            Err(err) => {
                self.log_error(&err, Some(&req));
                let close = !req.keep_alive || err.disposition().close;
                (respond::error_response(&err, head_only), close)
            }
        };
        let close = close || self.handle.shutdown.is_cancelled();
        tracing::debug!(peer = %self.peer, target = %req.target, status = resp.head.status().code(), "response");
        let line = self.access_line(Some(&req), received);
        if let Err(end) = self.send(resp, close, req.http10, received, line).await {
            return Some(end);
        }
        close.then_some(Ending::Done)
    }

    /// The access log record for `req` (none for a head that could not be parsed), read at
    /// `received`, if the log is on.
    fn access_line(
        &self,
        req: Option<&Request>,
        received: std::time::Instant,
    ) -> Option<Box<AccessRecord>> {
        if !self.svc.ops().access_log.enabled() {
            return None;
        }
        let (method, target, range) = match req {
            Some(r) => (Some(r.method), r.target.as_str(), r.range.as_deref()),
            None => (None, "-", None),
        };
        Some(Box::new(AccessRecord::new(
            self.peer, method, target, range, received,
        )))
    }

    fn log_error(&self, err: &RequestError, req: Option<&Request>) {
        let target = req.map(|r| r.target.as_str()).unwrap_or("");
        if err.disposition().ours {
            // Our own failures (descriptor exhaustion, a full store) come in bursts: one line a
            // second with the count of what was suppressed, not one per request.
            if let Some(suppressed) = OURS_LOG.admit() {
                tracing::warn!(peer = %self.peer, target, error = %err, suppressed, "request failed");
            }
        } else {
            tracing::debug!(peer = %self.peer, target, error = %err, "request refused");
        }
    }

    /// The ending for a cancelled abort token: a shutdown or a takeover.
    fn cancelled(&self) -> Ending {
        if self.handle.shutdown.is_cancelled() {
            Ending::Shutdown
        } else {
            Ending::TakenOver
        }
    }

    /// Reads the next request head. The header timeout runs from the first byte of a request;
    /// the idle timeout from the end of the previous response (the first request of a
    /// connection gets the header timeout). A shutdown ends an idle wait at once; a head that
    /// has started arriving is read to its end (within the header timeout) and answered.
    async fn read_request(&mut self, first: bool) -> Result<Request, ReadEnd> {
        // Settings are read where used, not copied into locals that would live in every idle
        // connection's future.
        let idle_deadline = Instant::now()
            + if first {
                self.svc.config().header_timeout
            } else {
                self.svc.config().idle_timeout
            };
        let mut head_deadline = None;
        loop {
            if self.buf.is_empty() {
                if self.buf.capacity() > 0 {
                    self.buf = BytesMut::new();
                }
                self.deliveries.release_buffers();
                if let Some(tls) = &mut self.tls {
                    tls.release_buffers();
                }
            } else {
                match request::parse(&self.buf, &self.svc.config().limits) {
                    Ok(Some((req, n))) => {
                        self.buf.advance(n);
                        return Ok(req);
                    }
                    Ok(None) => {}
                    Err(e) => return Err(ReadEnd::Bad(e)),
                }
                head_deadline
                    .get_or_insert_with(|| Instant::now() + self.svc.config().header_timeout);
            }
            let deadline = head_deadline.unwrap_or(idle_deadline);
            let waiting_for_acks = self.deliveries.unsettled();
            // At shutdown, a head already arriving is finished and answered; only a takeover
            // interrupts it.
            let interruptible = head_deadline.is_none() || !self.handle.shutdown.is_cancelled();
            // One timer for both the deadline and the settle tick (an idle connection's task
            // stays small: docs/benchmarks.md, memory per connection).
            let wake = if waiting_for_acks {
                deadline.min(Instant::now() + SETTLE_TICK)
            } else {
                deadline
            };
            tokio::select! {
                biased;
                _ = self.handle.abort.cancelled(), if interruptible => {
                    if head_deadline.is_none() || self.handle.taken_over() {
                        return Err(ReadEnd::End(self.cancelled()));
                    }
                }
                // Through the socket's own reader slot rather than `readable()`, whose future
                // carries a waiter node (150 bytes more in every idle connection's task).
                ready = std::future::poll_fn(|cx| self.stream.poll_read_ready(cx)) => {
                    if let Err(e) = ready {
                        return Err(ReadEnd::End(Ending::from_io(e)));
                    }
                    if self.buf.capacity() == self.buf.len() {
                        self.buf.reserve(READ_CHUNK);
                    }
                    match self.read_some() {
                        Ok(Received::Closed) => {
                            // The peer closed its side. With a body still unconfirmed, it
                            // left while bytes were in flight.
                            self.settle();
                            return Err(ReadEnd::End(if self.deliveries.pending() {
                                Ending::PeerClosed
                            } else {
                                Ending::Done
                            }));
                        }
                        Ok(Received::Bytes) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                            // The client broke TLS (a bad record, a fatal alert): it ended
                            // the connection, and what it kept of the last records is unknown.
                            tracing::debug!(peer = %self.peer, error = %e, "TLS error from the client");
                            self.try_flush_tls();
                            self.settle();
                            return Err(ReadEnd::End(Ending::PeerReset(e)));
                        }
                        Err(e) => return Err(ReadEnd::End(Ending::from_io(e))),
                    }
                    // Records rustls owes the peer (an answer to its KeyUpdate) go out now.
                    if self.tls.is_some() {
                        Box::pin(self.flush_tls(false)).await.map_err(ReadEnd::End)?;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() < deadline {
                        self.settle();
                        continue;
                    }
                    return Err(if head_deadline.is_some() {
                        ReadEnd::Bad(RequestError::HeadTimeout)
                    } else {
                        ReadEnd::End(Ending::Done)
                    });
                }
            }
        }
    }

    /// True when a pending body belongs to the client this target names.
    fn pending_for(&self, target: &str) -> bool {
        if !self.deliveries.pending() {
            return false;
        }
        match crate::id::nonce_in_target(target) {
            Some(nonce) => self.deliveries.pending_for(nonce),
            // Not a download of a known shape: it reads no session, but settle anyway.
            None => true,
        }
    }

    /// Reads the acknowledgement counter once and records every pending body's confirmed
    /// offset; bodies wholly confirmed are finished.
    fn settle(&mut self) {
        if !self.deliveries.unsettled() {
            return;
        }
        let counter = match self.svc.config().accounting {
            Accounting::Written => AckCounter::Unknown,
            Accounting::Acknowledged => match self.ack_counter() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read TCP_INFO");
                    return;
                }
            },
        };
        self.deliveries.settle(counter, &self.svc.ops().access_log);
        let (sent, acked) = self.deliveries.take_counts();
        if sent | acked != 0 {
            self.svc.metrics().body_bytes(sent, acked);
        }
    }

    /// The kernel's acknowledgement counter, in bytes of the stream `deliveries` counts: as
    /// read on a plain connection, turned into usable plaintext through TLS.
    fn ack_counter(&mut self) -> io::Result<AckCounter> {
        let counter = sys::ack_counter_on(self.fd(), self.transport)?;
        Ok(match &mut self.tls {
            Some(tls) => tls.plaintext_counter(counter),
            None => counter,
        })
    }
}

#[cfg(test)]
mod tests {
    /// An idle connection costs its task's future (plus the socket's registration and its
    /// cancellation token). The future is as large as its largest suspended state, so all a
    /// request does after its head arrived runs boxed (`Connection::handle`), the TLS handshake
    /// and the close too, and the wait for the next head stays small: 3,120 bytes, then 1,632,
    /// now 648 (release) and 656 (this profile) (docs/benchmarks.md, memory per idle
    /// connection). Tokio 1.54 allocates a task as the future plus 112 bytes, rounded up to
    /// 128: up to 656 bytes that is 768; past it, 896 for every connection.
    #[test]
    fn an_idle_connections_future_stays_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = crate::settings::Config::new(
                dir.path().to_path_buf(),
                "127.0.0.1:0".parse().unwrap(),
            );
            cfg.store = crate::settings::StoreKind::Memory;
            let svc = crate::service::Service::new(cfg.validate().unwrap()).unwrap();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
                .await
                .unwrap();
            let peer = c.local_addr().unwrap();
            let fut = super::serve(
                c,
                peer,
                svc,
                tokio_util::sync::CancellationToken::new(),
                None,
            );
            let size = std::mem::size_of_val(&fut);
            println!("serve future: {size} bytes");
            assert!(
                size <= 656,
                "the connection future grew to {size} bytes: box the new await state, or read \
                 what it keeps across the wait where it is used"
            );
        });
    }
}
