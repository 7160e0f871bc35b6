//! Disruptive TCP proxy for tests: owns injecting resets, blackholes and stalls into a client<->upstream TCP stream at exact downstream byte offsets.
#![allow(dead_code)]

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What happens to one proxied connection. Offsets count server->client
/// ("downstream") bytes of that connection only. A disruption at offset N
/// fires when, after N bytes were forwarded, the upstream offers byte N+1;
/// if the upstream closes first, the connection just closes normally. Firing
/// on data rather than on reaching N keeps `ResetAfter(0)` from racing the
/// client's own connect and request: it hits once the response starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disruption {
    /// Forward faithfully in both directions.
    None,
    /// Deliver exactly N downstream bytes, then RST the client and close the
    /// upstream connection. The RST is only sent once the client has
    /// acknowledged all N bytes.
    ResetAfter(u64),
    /// After N downstream bytes stop forwarding in both directions, but keep
    /// both sockets open until the client closes or the proxy goes away.
    BlackholeAfter(u64),
    /// The path breaks: deliver exactly N downstream bytes and RST the client
    /// (as `ResetAfter`), but leave the upstream connection open and unread,
    /// as a server sees a phone whose network vanished: no FIN, no RST, only
    /// silence, until the server gives up on it or the proxy goes away.
    CutAfter(u64),
    /// After `after` downstream bytes pause both directions for `duration`,
    /// then carry on as if nothing happened.
    StallFor { after: u64, duration: Duration },
}

impl Disruption {
    fn offset(&self) -> Option<u64> {
        match *self {
            Disruption::None => None,
            Disruption::ResetAfter(n) | Disruption::BlackholeAfter(n) | Disruption::CutAfter(n) => {
                Some(n)
            }
            Disruption::StallFor { after, .. } => Some(after),
        }
    }
}

#[derive(Default)]
struct Counters {
    downstream: AtomicU64,
    upstream: AtomicU64,
    connections: AtomicU64,
}

type Plan = Arc<dyn Fn(u64) -> Disruption + Send + Sync + 'static>;

/// A TCP proxy on 127.0.0.1 that forwards to `upstream`, disrupting each
/// connection as the plan says. Dropping it (or [`DisruptiveProxy::shutdown`])
/// closes the listener and every proxied connection.
pub struct DisruptiveProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    counters: Arc<Counters>,
    accept_task: JoinHandle<()>,
}

impl DisruptiveProxy {
    /// Binds 127.0.0.1:0 and starts proxying. `plan` gets the 0-based index of
    /// each accepted connection. Must be called inside a tokio runtime; panics
    /// if the listener cannot be bound (use [`DisruptiveProxy::try_start`] to
    /// handle that).
    pub fn start(
        upstream: SocketAddr,
        plan: impl Fn(u64) -> Disruption + Send + Sync + 'static,
    ) -> DisruptiveProxy {
        Self::try_start(upstream, plan)
            .unwrap_or_else(|e| panic!("DisruptiveProxy: cannot bind 127.0.0.1:0: {e}"))
    }

    pub fn try_start(
        upstream: SocketAddr,
        plan: impl Fn(u64) -> Disruption + Send + Sync + 'static,
    ) -> io::Result<DisruptiveProxy> {
        Self::try_start_on((Ipv4Addr::LOCALHOST, 0).into(), upstream, plan)
    }

    /// A proxy for roaming clients: whatever happens on the client's side (a disruption, the
    /// client closing or resetting its connection), the upstream sees no FIN and no RST from
    /// the proxy, only silence, as a server sees a phone whose old path vanished. The upstream
    /// connection stays open, unread, until the upstream ends it or the proxy goes away.
    pub fn start_roaming(
        upstream: SocketAddr,
        plan: impl Fn(u64) -> Disruption + Send + Sync + 'static,
    ) -> DisruptiveProxy {
        Self::start_with((Ipv4Addr::LOCALHOST, 0).into(), upstream, plan, true)
            .unwrap_or_else(|e| panic!("DisruptiveProxy: cannot bind 127.0.0.1:0: {e}"))
    }

    /// Like [`DisruptiveProxy::try_start`], listening on `listen` (port 0 picks a free port).
    pub fn try_start_on(
        listen: SocketAddr,
        upstream: SocketAddr,
        plan: impl Fn(u64) -> Disruption + Send + Sync + 'static,
    ) -> io::Result<DisruptiveProxy> {
        Self::start_with(listen, upstream, plan, false)
    }

    fn start_with(
        listen: SocketAddr,
        upstream: SocketAddr,
        plan: impl Fn(u64) -> Disruption + Send + Sync + 'static,
        silent_upstream: bool,
    ) -> io::Result<DisruptiveProxy> {
        // Bind with std so start() can stay synchronous for callers.
        let std_listener = std::net::TcpListener::bind(listen)?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let accept_task = tokio::spawn(accept_loop(
            listener,
            upstream,
            Arc::new(plan),
            counters.clone(),
            silent_upstream,
        ));
        Ok(DisruptiveProxy {
            addr,
            upstream,
            counters,
            accept_task,
        })
    }

    /// Where clients should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Server->client bytes written to clients, summed over all connections.
    pub fn downstream_bytes(&self) -> u64 {
        self.counters.downstream.load(Ordering::SeqCst)
    }

    /// Client->server bytes written to upstream, summed over all connections.
    pub fn upstream_bytes(&self) -> u64 {
        self.counters.upstream.load(Ordering::SeqCst)
    }

    /// Client connections accepted so far (also the next connection's index).
    pub fn connections(&self) -> u64 {
        self.counters.connections.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes every proxied socket. Idempotent. Closing
    /// happens when the runtime next runs the aborted tasks, i.e. promptly but
    /// not synchronously inside this call.
    pub fn shutdown(&self) {
        // The accept task owns the JoinSet of connection tasks, so aborting it
        // drops the set, which aborts (and thereby closes) every connection.
        self.accept_task.abort();
    }
}

impl Drop for DisruptiveProxy {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    plan: Plan,
    counters: Arc<Counters>,
    silent_upstream: bool,
) {
    let mut conns = JoinSet::new();
    loop {
        let client = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // ECONNABORTED / EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let index = counters.connections.fetch_add(1, Ordering::SeqCst);
        let disruption = plan(index);
        conns.spawn(serve(
            client,
            upstream,
            disruption,
            counters.clone(),
            silent_upstream,
        ));
        while conns.try_join_next().is_some() {}
    }
}

/// A plan for demos and long soak runs: every connection is reset (or, with `blackhole`,
/// blackholed) after a pseudo-random number of downstream bytes in `1..=max`, a pure function
/// of `seed` and the connection index, so a run can be replayed exactly.
pub fn random_plan(
    max: u64,
    seed: u64,
    blackhole: bool,
) -> impl Fn(u64) -> Disruption + Send + Sync + 'static {
    assert!(max > 0, "random_plan needs max > 0");
    move |index| {
        // splitmix64 of (seed, index).
        let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let after = 1 + z % max;
        if blackhole {
            Disruption::BlackholeAfter(after)
        } else {
            Disruption::ResetAfter(after)
        }
    }
}

enum End {
    /// Both directions finished (EOF or error): just close.
    Done,
    Reset,
    Cut,
    Blackhole {
        /// Such a client already reads as "read side closed", so only a
        /// hangup or error (or the proxy going away) can end the blackhole.
        client_half_closed: bool,
    },
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    disruption: Disruption,
    counters: Arc<Counters>,
    silent_upstream: bool,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    // Nagle + delayed ACK would add 40ms hiccups that look like stalls.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (stalled_tx, stalled_rx) = watch::channel(false);

    let end = {
        // Borrowed halves (not into_split) because dropping an OwnedWriteHalf
        // sends a FIN, which would reach the client before our RST.
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let down = pump_down(&mut sr, &mut cw, disruption, &counters, &stalled_tx);
        let up = pump_up(&mut cr, &mut sw, &counters, stalled_rx, silent_upstream);
        tokio::pin!(down, up);
        let (mut down_done, mut up_done) = (false, false);
        loop {
            tokio::select! {
                d = &mut down, if !down_done => match d {
                    Down::Eof => down_done = true,
                    Down::Abort => break End::Done,
                    Down::Reset => break End::Reset,
                    Down::Cut => break End::Cut,
                    Down::Blackhole => break End::Blackhole { client_half_closed: up_done },
                },
                u = &mut up, if !up_done => match u {
                    Ok(()) => up_done = true,
                    Err(_) => break End::Done,
                },
                else => break End::Done,
            }
            if down_done && up_done {
                break End::Done;
            }
        }
    };

    if silent_upstream {
        // Whatever ended the client's side, the server hears nothing: let it find out on its
        // own (a takeover, a write stall) or hold the connection until the proxy goes away.
        match end {
            End::Reset | End::Cut => {
                wait_until_acked(&client).await;
                let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            }
            End::Blackhole { client_half_closed } => {
                wait_client_gone(&client, !client_half_closed).await;
            }
            End::Done => {}
        }
        drop(client);
        wait_client_gone(&server, false).await;
        return;
    }
    match end {
        End::Done => {}
        End::Reset => {
            // An RST discards whatever is still in our send queue, so wait
            // until the client has acknowledged every forwarded byte; otherwise
            // "exactly N bytes" would silently become "at most N".
            wait_until_acked(&client).await;
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            drop(client);
            // FIN first so the upstream sees an orderly close where it can;
            // the drop may still RST if upstream bytes beyond N sit unread.
            let _ = server.shutdown().await;
        }
        End::Cut => {
            wait_until_acked(&client).await;
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            drop(client);
            // The upstream sees nothing more: its bytes stay unread until it gives up (a
            // takeover or a write stall resets it) or the proxy is shut down.
            wait_client_gone(&server, false).await;
        }
        End::Blackhole { client_half_closed } => {
            // Leave the client's bytes unread so its writes eventually block,
            // as they would on a path that silently stopped delivering.
            wait_client_gone(&client, !client_half_closed).await;
        }
    }
}

enum Down {
    Eof,
    Abort,
    Reset,
    Cut,
    Blackhole,
}

async fn pump_down(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    disruption: Disruption,
    counters: &Counters,
    stalled: &watch::Sender<bool>,
) -> Down {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent: u64 = 0;
    let mut pending = disruption.offset();
    loop {
        if let Some(at) = pending {
            if sent >= at {
                let mut next = [0u8; 1];
                match from.peek(&mut next).await {
                    Ok(0) => {
                        let _ = to.shutdown().await;
                        return Down::Eof;
                    }
                    Ok(_) => {}
                    Err(_) => return Down::Abort,
                }
                pending = None;
                match disruption {
                    Disruption::ResetAfter(_) => return Down::Reset,
                    Disruption::CutAfter(_) => return Down::Cut,
                    Disruption::BlackholeAfter(_) => return Down::Blackhole,
                    Disruption::StallFor { duration, .. } => {
                        stalled.send_replace(true);
                        tokio::time::sleep(duration).await;
                        stalled.send_replace(false);
                        continue;
                    }
                    Disruption::None => {}
                }
            }
        }
        // Never read past the disruption offset: bytes beyond it stay in the
        // kernel instead of being read and then "lost" inside the proxy.
        let room = match pending {
            Some(at) => usize::try_from(at - sent).map_or(buf.len(), |r| r.min(buf.len())),
            None => buf.len(),
        };
        let n = match from.read(&mut buf[..room]).await {
            Ok(0) => {
                let _ = to.shutdown().await;
                return Down::Eof;
            }
            Ok(n) => n,
            Err(_) => return Down::Abort,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return Down::Abort;
        }
        sent += n as u64;
        counters.downstream.fetch_add(n as u64, Ordering::SeqCst);
    }
}

async fn pump_up(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    counters: &Counters,
    mut stalled: watch::Receiver<bool>,
    silent_upstream: bool,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Checked before and after the read: a read already in flight when a
        // stall starts must not slip its bytes through during the stall.
        let _ = stalled.wait_for(|s| !*s).await;
        let n = from.read(&mut buf).await?;
        let _ = stalled.wait_for(|s| !*s).await;
        if n == 0 {
            if silent_upstream {
                // A roaming client's close never reaches the server: keep the upstream open.
                return Ok(());
            }
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        counters.upstream.fetch_add(n as u64, Ordering::SeqCst);
    }
}

async fn wait_until_acked(stream: &TcpStream) {
    let mut delay = Duration::from_millis(1);
    loop {
        match unacked_bytes(stream) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if peer_gone(stream, false) {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(20));
    }
}

/// Bytes in the socket's send queue that the peer has not acknowledged yet.
fn unacked_bytes(stream: &TcpStream) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: the fd is a live socket borrowed from `stream` for the duration
    // of the call, and TIOCOUTQ writes exactly one c_int through the pointer.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Polls the socket state without consuming unread data (a read would ACK and
/// drain it, which a blackhole must not do).
fn peer_gone(stream: &TcpStream, count_half_close: bool) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, exclusively borrowed array of one pollfd whose
    // fd is kept open by `stream`; a zero timeout means poll never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    if rc < 0 {
        return false;
    }
    let mut gone = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    if count_half_close {
        gone |= libc::POLLRDHUP;
    }
    pfd.revents & gone != 0
}

async fn wait_client_gone(stream: &TcpStream, count_half_close: bool) {
    while !peer_gone(stream, count_half_close) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
