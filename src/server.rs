//! The accept loop: a connection cap taken before accepting, backoff on accept errors, one task
//! per connection, the session sweeper and writer, and graceful shutdown with a hard deadline.
//! The listener and the shutdown signal are injected, so tests bind port 0 and stop the server
//! with a channel.

use crate::conn;
use crate::service::Service;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// First pause after an accept error that means "out of resources"; doubles up to the max.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves connections from `listener` until `shutdown` completes, then stops accepting at once,
/// lets every connection record its progress and close, and returns after at most
/// `config.shutdown_timeout`.
pub async fn run(listener: TcpListener, svc: Arc<Service>, shutdown: impl Future<Output = ()>) {
    let max_connections = svc.config().max_connections;
    run_listener(listener, svc, shutdown, max_connections, true).await;
}

/// Serves one of several listeners sharing a service (one runtime per core, `SO_REUSEPORT`):
/// with its own share of the connection cap, and the session sweeper and writer on one of them
/// only (`sweep`).
pub async fn run_listener(
    listener: TcpListener,
    svc: Arc<Service>,
    shutdown: impl Future<Output = ()>,
    max_connections: usize,
    sweep: bool,
) {
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(max_connections));
    // The writer outlives the connections: it stops after they have recorded their last
    // progress, and flushes that too.
    let writer_stop = CancellationToken::new();
    let writer = sweep.then(|| {
        let sessions = svc.sessions().clone();
        let stop = writer_stop.clone();
        tokio::spawn(async move { sessions.run_writer(stop).await })
    });
    if sweep {
        tracker.spawn(sweep_sessions(Arc::clone(&svc), cancel.clone()));
        tracker.spawn(Arc::clone(svc.digests()).run(Arc::clone(svc.root()), cancel.clone()));
    }
    tokio::pin!(shutdown);
    let mut backoff = Duration::ZERO;
    let mut failed_accepts = 0u64;
    loop {
        // Taking the permit first means a full server leaves new connections in the kernel's
        // backlog instead of accepting and dropping them.
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                if failed_accepts > 0 {
                    tracing::info!(failed_accepts, "accepting again");
                    failed_accepts = 0;
                }
                backoff = Duration::ZERO;
                let (svc, cancel) = (Arc::clone(&svc), cancel.clone());
                tracker.spawn(conn::serve(stream, peer, svc, cancel, Some(permit)));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // EMFILE and friends: the error repeats until something frees up, so retrying at
                // once would spin a core. Log the first of a burst only.
                failed_accepts += 1;
                if failed_accepts == 1 {
                    tracing::warn!(error = %e, "accept failed; backing off");
                }
                backoff = (backoff * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut shutdown => break,
                }
            }
        }
    }
    drop(listener);
    // A balancer polling /readyz stops sending new clients from here on.
    svc.ops().health.drain();
    tracing::info!(
        connections = max_connections - permits.available_permits(),
        "shutting down: no longer accepting"
    );
    cancel.cancel();
    svc.digests().stop();
    tracker.close();
    let deadline = tokio::time::Instant::now() + svc.config().shutdown_timeout;
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tracker.len(),
            "shutdown deadline reached; abandoning remaining connections"
        );
    }
    writer_stop.cancel();
    if let Some(writer) = writer {
        // The last flush gets what is left of the deadline, and at least a second.
        let at_least = tokio::time::Instant::now() + Duration::from_secs(1);
        if tokio::time::timeout_at(deadline.max(at_least), writer)
            .await
            .is_err()
        {
            tracing::warn!("shutdown deadline reached before the last sessions were written");
        }
    }
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::PermissionDenied
            | io::ErrorKind::Interrupted
    )
}

/// Forgets idle sessions periodically: often enough that expiry is within a few percent of the
/// TTL, never more than once a second.
async fn sweep_sessions(svc: Arc<Service>, cancel: CancellationToken) {
    let period =
        (svc.config().session_ttl / 16).clamp(Duration::from_secs(1), Duration::from_secs(300));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let expired = svc.sessions().expire().await;
                svc.files().sweep();
                if expired > 0 {
                    tracing::debug!(expired, remaining = svc.sessions().len(), "expired idle sessions");
                }
            }
            () = cancel.cancelled() => return,
        }
    }
}

/// What a listener accepts.
#[derive(Debug)]
pub enum ListenProtocol {
    /// Multipath TCP, and TCP from clients that do not ask for it (the kernel's fallback).
    Mptcp,
    /// TCP only, as configured (`--mptcp off`).
    Tcp,
    /// TCP only because the kernel refused a Multipath TCP socket (built without it, or
    /// `net.mptcp.enabled=0`): the error it gave.
    TcpFallback(io::Error),
}

/// Binds a listener with a backlog sized for bursts of thousands of connections; with `mptcp`,
/// a Multipath TCP listener where the kernel offers one.
pub fn bind(
    addr: std::net::SocketAddr,
    backlog: u32,
    mptcp: bool,
) -> io::Result<(TcpListener, ListenProtocol)> {
    let (listener, protocol) = bind_std(addr, backlog, false, mptcp)?;
    Ok((TcpListener::from_std(listener)?, protocol))
}

/// Binds a non-blocking std listener; with `reuse_port`, several may share one address and the
/// kernel spreads connections among them. With `mptcp`, the socket is `IPPROTO_MPTCP` when the
/// kernel accepts it, else TCP (and the reason is returned, for the log).
pub fn bind_std(
    addr: std::net::SocketAddr,
    backlog: u32,
    reuse_port: bool,
    mptcp: bool,
) -> io::Result<(std::net::TcpListener, ListenProtocol)> {
    let domain = socket2::Domain::for_address(addr);
    let (socket, protocol) = if mptcp {
        match mptcp_socket(domain) {
            Ok(socket) => (socket, ListenProtocol::Mptcp),
            Err(e) => (
                socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?,
                ListenProtocol::TcpFallback(e),
            ),
        }
    } else {
        (
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?,
            ListenProtocol::Tcp,
        )
    };
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok((socket.into(), protocol))
}

/// A Multipath TCP stream socket. Kernels without MPTCP answer `EPROTONOSUPPORT` (or
/// `EINVAL` on old ones), and `ENOPROTOOPT` when `net.mptcp.enabled` is 0.
#[cfg(target_os = "linux")]
fn mptcp_socket(domain: socket2::Domain) -> io::Result<socket2::Socket> {
    socket2::Socket::new(
        domain,
        socket2::Type::STREAM,
        Some(socket2::Protocol::MPTCP),
    )
}

#[cfg(not(target_os = "linux"))]
fn mptcp_socket(_domain: socket2::Domain) -> io::Result<socket2::Socket> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "Multipath TCP needs Linux",
    ))
}
