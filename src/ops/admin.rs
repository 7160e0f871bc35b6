//! The admin listener (`--admin-listen`): `/metrics`, `/healthz` and `/readyz`, on an address
//! of its own so they never reach the public one. Requests are parsed by the same code under the
//! same limits and timeouts as the public listener's (`http::request`); anything but GET and HEAD
//! is a 405, any other path a 404.
//!
//! It runs until `main` stops it, after the public listener has drained: a balancer polling
//! `/readyz` during the drain sees 503 rather than a refused connection.

use super::health::Readiness;
use crate::http::error::RequestError;
use crate::http::request::{self, Method, Request};
use crate::http::response::{Head, Status};
use crate::respond::{self, Body};
use crate::service::Service;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Admin connections served at once: scrapers and balancer probes, a handful; more wait in the
/// backlog, so a flood on the admin port costs the public listener nothing.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
const READ_CHUNK: usize = 2048;
/// How long a closing admin connection drains what the peer still sends.
const LINGER_READ: Duration = Duration::from_secs(2);
/// Pause after an accept error that means "out of resources".
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `listener` until `stop`, then closes every admin connection.
pub async fn run(listener: TcpListener, svc: Arc<Service>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                let (svc, stop) = (Arc::clone(&svc), stop.clone());
                tracker.spawn(async move {
                    serve(stream, &svc, &stop).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
}

/// Why reading stopped without a request.
enum Read {
    Request(Request),
    /// Idle timeout, the peer closed, or the admin listener stops: close quietly.
    Closed,
    Bad(RequestError),
}

/// One admin connection: keep-alive, answers in order.
async fn serve(mut stream: TcpStream, svc: &Service, stop: &CancellationToken) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        let (resp, close, http10) = match read(&mut stream, &mut buf, svc, first, stop).await {
            Read::Request(req) => {
                let (resp, close) = answer(svc, &req);
                let close = close || !req.keep_alive || req.has_body || stop.is_cancelled();
                (resp, close, req.http10)
            }
            Read::Closed => return,
            Read::Bad(err) => (plain_error(&err, false), true, false),
        };
        first = false;
        let (head, body) = resp;
        let mut out = BytesMut::from(&head.finish(close, http10)[..]);
        out.extend_from_slice(&body);
        let stall = svc.config().write_stall_timeout;
        match tokio::time::timeout(stall, stream.write_all(&out)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        if close {
            linger(&mut stream).await;
            return;
        }
    }
}

/// After the last answer: FIN, then read and discard what the peer still sends (bounded), so
/// that unread request bytes do not turn the close into a reset that destroys the answer.
async fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    let mut scratch = [0u8; 1024];
    let _ = tokio::time::timeout(LINGER_READ, async {
        while let Ok(n) = stream.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Reads the next request head under the public listener's limits: the header timeout from a
/// request's first byte (from accept for the first), the idle timeout between requests.
async fn read(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    svc: &Service,
    first: bool,
    stop: &CancellationToken,
) -> Read {
    let cfg = svc.config();
    let idle = if first {
        cfg.header_timeout
    } else {
        cfg.idle_timeout
    };
    let idle_deadline = Instant::now() + idle;
    let mut head_deadline = None;
    loop {
        if !buf.is_empty() {
            match request::parse(buf, &cfg.limits) {
                Ok(Some((req, n))) => {
                    let _ = buf.split_to(n);
                    return Read::Request(req);
                }
                Ok(None) => {}
                Err(e) => return Read::Bad(e),
            }
            head_deadline.get_or_insert_with(|| Instant::now() + cfg.header_timeout);
        }
        buf.reserve(READ_CHUNK);
        let deadline = head_deadline.unwrap_or(idle_deadline);
        tokio::select! {
            r = stream.read_buf(buf) => match r {
                Ok(0) | Err(_) => return Read::Closed,
                Ok(_) => {}
            },
            () = tokio::time::sleep_until(deadline) => {
                return if head_deadline.is_some() {
                    Read::Bad(RequestError::HeadTimeout)
                } else {
                    Read::Closed
                };
            }
            () = stop.cancelled(), if head_deadline.is_none() => return Read::Closed,
        }
    }
}

/// A head and a body (empty for HEAD).
type Answer = (Head, Bytes);

/// The answer to `req`, and whether the connection must close after it.
fn answer(svc: &Service, req: &Request) -> (Answer, bool) {
    let head_only = req.method == Method::Head;
    if req.method == Method::Other {
        let err = RequestError::MethodNotAllowed;
        return (plain_error(&err, head_only), err.disposition().close);
    }
    let path = req.target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match path {
        "/metrics" => (
            Status::Ok,
            super::metrics::CONTENT_TYPE,
            Bytes::from(svc.metrics().render(svc.sessions().len())),
        ),
        "/healthz" => (Status::Ok, TEXT, Bytes::from_static(b"ok\n")),
        "/readyz" => match svc.readiness() {
            Readiness::Ready => (Status::Ok, TEXT, Bytes::from_static(b"ready\n")),
            Readiness::Draining => (
                Status::ServiceUnavailable,
                TEXT,
                Bytes::from_static(b"draining\n"),
            ),
            Readiness::StoreUnavailable(why) => (
                Status::ServiceUnavailable,
                TEXT,
                Bytes::from(format!("session store unavailable: {why}\n")),
            ),
        },
        _ => {
            let err = RequestError::NotFound("no such route: use /metrics, /healthz or /readyz");
            return (plain_error(&err, head_only), err.disposition().close);
        }
    };
    let mut head = Head::new(status);
    head.field("Content-Type", content_type)
        .field("Content-Length", body.len())
        .field("Cache-Control", "no-store");
    let body = if head_only { Bytes::new() } else { body };
    ((head, body), false)
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The public listener's rendering of an error, as a head and bytes.
fn plain_error(err: &RequestError, head_only: bool) -> Answer {
    let resp = respond::error_response(err, head_only);
    let body = match resp.body {
        Body::Bytes(b) => b,
        _ => Bytes::new(),
    };
    (resp.head, body)
}
