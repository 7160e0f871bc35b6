//! Clients that move while their paths break: each client downloads through roaming
//! disruptive proxies (one per server) that cut, blackhole and stall its connections, and it
//! also moves on its own (stops reading, asks again, drains the old connection). Used by
//! `tests/delivery.rs` against one server and by `tests/fleet.rs` against several nodes.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::check::{parse_content_range, resumed_start};
use super::proxy::{Disruption, DisruptiveProxy};
use super::server::{get, get_with, Response};

const KIB: usize = 1024;

/// The seed of `tests/delivery.rs`'s plans.
pub const PLAN_SEED: u64 = 0x0dd_5eed_2024;
/// No byte for this long: the client treats the connection as dead and reconnects.
pub const STALL_DETECT: Duration = Duration::from_millis(500);
/// How long a client that moved waits for each read while draining its old connection (the
/// proxy's longest stall is 1.5 s).
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Disruption and move points of a client's first connections are drawn below this, so every
/// client is cut several times; later ones below [`LATE_CUT`] (downstream bytes, head
/// included; a point past the response's end means no disruption).
const EARLY_CUT: u64 = 400_000;
const LATE_CUT: u64 = 2_500_000;
const FORCED: usize = 6;
pub const MAX_ATTEMPTS: usize = 300;

/// What happens to one of a client's connections: the proxy's disruption, and, on otherwise
/// undisturbed connections, the body offset at which the client itself moves (stops reading,
/// asks again on a new connection, then drains the old one).
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub disruption: Disruption,
    pub move_at: Option<u64>,
}

/// A client's seeded plan, one step per connection it opens. Each client has its own proxy, so
/// the proxy's connection index is the client's attempt number and a run is reproducible per
/// client (up to timing: where a stall detector fires, how much the proxy had buffered).
pub fn client_plan(seed: u64, client: usize) -> Vec<Step> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ client as u64);
    (0..MAX_ATTEMPTS)
        .map(|i| {
            // The first connections are always disturbed somehow; later ones often are not.
            let kind = if i < FORCED {
                rng.gen_range(0..80)
            } else {
                rng.gen_range(0..100)
            };
            // The very first is always cut: a reset, a blackhole or a move end it whatever the
            // timing, while a stall ends it only if the client's detector fires before the
            // stall does, which a client task scheduled late on a loaded machine can miss
            // (a fresh-clone CI run then saw a client that was never cut).
            let kind = if i == 0 && (45..=59).contains(&kind) {
                kind - 45
            } else {
                kind
            };
            let at = rng.gen_range(0..if i < FORCED { EARLY_CUT } else { LATE_CUT });
            // Forced stalls always outlast the client's stall detector; later ones may not.
            let stall = Duration::from_millis(if i < FORCED {
                rng.gen_range(700..1500)
            } else {
                rng.gen_range(100..1500)
            });
            let (disruption, move_at) = match kind {
                // The path breaks: the client sees a reset, the server only silence (a phone
                // whose network vanished). A proxy that closed or reset its upstream would look
                // like a client that went away, which roam answers with the whole file again.
                0..=24 => (Disruption::CutAfter(at), None),
                25..=44 => (Disruption::BlackholeAfter(at), None),
                45..=59 => (
                    Disruption::StallFor {
                        after: at,
                        duration: stall,
                    },
                    None,
                ),
                60..=79 => (Disruption::None, Some(at)),
                _ => (Disruption::None, None),
            };
            Step {
                disruption,
                move_at,
            }
        })
        .collect()
}

/// How a connection ended, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ending {
    /// Before the first connection.
    Fresh,
    /// Read returned ECONNRESET (the proxy's ResetAfter).
    Reset,
    /// EOF before the response was complete.
    Eof,
    /// No byte for [`STALL_DETECT`] (or [`DRAIN_WAIT`] while draining): dropped by the client.
    Stalled,
    /// Some other socket error.
    Other,
    /// The client moved and drained the old connection to its end (EOF or reset).
    Moved,
    /// The response started past what the client has; the client dropped it.
    Gap,
}

#[derive(Default)]
pub struct Stats {
    pub attempts: AtomicU64,
    pub declared: AtomicU64,
    pub moves: AtomicU64,
    /// Connections opened to a different server than the client's previous one.
    pub node_changes: AtomicU64,
    pub repeated_bytes: AtomicU64,
    /// Responses without `Range` that started over at byte 0 for a client that already had
    /// bytes (a `200` after progress).
    pub restarts: AtomicU64,
    pub max_gap: AtomicU64,
    /// Cuts (resets, stalls given up on, moves, cut heads) per client.
    pub cuts: Mutex<Vec<u64>>,
    pub endings: Mutex<BTreeMap<Ending, u64>>,
    /// Gaps, keyed by how the connection before them ended.
    pub gaps: Mutex<BTreeMap<Ending, u64>>,
}

impl Stats {
    fn ended(&self, how: Ending) {
        *self.endings.lock().unwrap().entry(how).or_default() += 1;
    }
}

/// Reads some bytes within `wait`, classifying every way a read can end a connection.
async fn read_within(
    s: &mut tokio::net::TcpStream,
    buf: &mut [u8],
    wait: Duration,
) -> Result<usize, Ending> {
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(wait, s.read(buf)).await {
        Err(_) => Err(Ending::Stalled),
        Ok(Ok(0)) => Err(Ending::Eof),
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => Err(Ending::Reset),
        Ok(Err(_)) => Err(Ending::Other),
    }
}

/// Parses a response head (`head` ends with the blank line) into status and lowercase fields.
fn parse_head(head: &[u8]) -> Response {
    let text = std::str::from_utf8(head).expect("ASCII head");
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Response {
        status,
        headers,
        body: Vec::new(),
    }
}

/// A response whose head has arrived.
struct Open {
    s: tokio::net::TcpStream,
    head: Response,
    /// Body bytes that arrived with the head.
    leftover: Vec<u8>,
}

/// Connects through the proxy, sends the request (no Range, or `Range: bytes=N-` to declare
/// a position) and reads the head.
async fn open(proxy: SocketAddr, target: &str, declare: Option<u64>) -> Result<Open, Ending> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|_| Ending::Other)?;
    let request = match declare {
        Some(n) => get_with(target, &[&format!("Range: bytes={n}-")]),
        None => get(target),
    };
    s.write_all(request.as_bytes())
        .await
        .map_err(|_| Ending::Other)?;
    let mut buf = vec![0u8; 16 * KIB];
    let mut head = Vec::new();
    loop {
        if let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let leftover = head.split_off(p + 4);
            return Ok(Open {
                s,
                head: parse_head(&head),
                leftover,
            });
        }
        let n = read_within(&mut s, &mut buf, STALL_DETECT).await?;
        head.extend_from_slice(&buf[..n]);
    }
}

/// Places body bytes that start at file offset `*pos`: bytes the client already has must be
/// identical, the rest are appended. `pos` never exceeds `have.len()`.
fn place(have: &mut Vec<u8>, pos: &mut u64, end: u64, bytes: &[u8]) {
    assert!(
        *pos + bytes.len() as u64 <= end,
        "more body than Content-Length"
    );
    let p = *pos as usize;
    assert!(
        p <= have.len(),
        "placing at {p} past the {} bytes held",
        have.len()
    );
    let overlap = (have.len() - p).min(bytes.len());
    assert!(
        have[p..p + overlap] == bytes[..overlap],
        "repeated bytes at {p} differ from what the client has"
    );
    have.extend_from_slice(&bytes[overlap..]);
    *pos += bytes.len() as u64;
}

/// A connection the client left for a new one, still to be drained.
struct Old {
    s: tokio::net::TcpStream,
    pos: u64,
    end: u64,
}

/// Reads what is left on a connection the client moved away from: the server aborted it when
/// the new request took over, and everything its TCP saw acknowledged is still readable.
async fn drain_old(mut old: Old, have: &mut Vec<u8>) -> Ending {
    let mut buf = vec![0u8; 64 * KIB];
    loop {
        if old.pos == old.end {
            // The whole body had been delivered before the move; nothing was aborted.
            return Ending::Moved;
        }
        match read_within(&mut old.s, &mut buf, DRAIN_WAIT).await {
            Ok(n) => place(have, &mut old.pos, old.end, &buf[..n]),
            Err(Ending::Eof | Ending::Reset) => return Ending::Moved,
            Err(how) => return how,
        }
    }
}

/// Downloads `target` to the end: no-Range requests placed where the server's Content-Range
/// says, and `Range: bytes=N-` only to fill a gap the proxy made. With several `servers` each
/// connection goes to one drawn at random (through that server's proxy): the client moves
/// between them. The plan, drawn from `seed`, counts the client's connections over all its
/// proxies.
pub async fn download(
    client: usize,
    target: String,
    len: u64,
    servers: &[SocketAddr],
    seed: u64,
    stats: &Stats,
) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let plan = client_plan(seed, client);
    let opened_so_far = Arc::new(AtomicUsize::new(0));
    let proxies: Vec<DisruptiveProxy> = servers
        .iter()
        .map(|&server| {
            let (plan, opened_so_far) = (plan.clone(), Arc::clone(&opened_so_far));
            DisruptiveProxy::start_roaming(server, move |_| {
                plan.get(opened_so_far.fetch_add(1, Ordering::SeqCst))
                    .map_or(Disruption::None, |s| s.disruption)
            })
        })
        .collect();
    // Which server each connection goes to: a stream of its own, so the plan of a client
    // with one server is the same as with several.
    let mut routes = rand::rngs::StdRng::seed_from_u64(seed.rotate_left(17) ^ client as u64);
    let mut node = 0;
    let mut have = Vec::with_capacity(len as usize);
    let mut declare = None;
    let mut previous = Ending::Fresh;
    let mut moving: Option<Old> = None;
    let mut cuts = 0u64;
    let mut buf = vec![0u8; 64 * KIB];
    for (index, step) in plan.iter().enumerate() {
        stats.attempts.fetch_add(1, Ordering::Relaxed);
        if declare.is_some() {
            stats.declared.fetch_add(1, Ordering::Relaxed);
        }
        let declared = declare.take();
        let was = node;
        node = routes.gen_range(0..proxies.len());
        if index > 0 && node != was {
            stats.node_changes.fetch_add(1, Ordering::Relaxed);
        }
        let opened = open(proxies[node].addr(), &target, declared).await;
        if let Some(old) = moving.take() {
            // The new request has reached the server (its head, or its cut, came back), so the
            // old connection is aborted: drain it.
            previous = drain_old(old, &mut have).await;
            stats.ended(previous);
        }
        let Open {
            mut s,
            head,
            leftover,
        } = match opened {
            Ok(o) => o,
            Err(how) => {
                stats.ended(how);
                cuts += 1;
                previous = how;
                continue;
            }
        };
        let start = match (declared, head.status) {
            // A declared position: exactly the range asked for.
            (Some(n), status) => {
                assert_eq!(status, 206, "declared range: {head:?}");
                let range = parse_content_range(head.header("content-range").unwrap());
                assert_eq!(range, (n, len - 1, len), "declared range framing");
                n
            }
            // Everything already confirmed on the server's side.
            (None, 416) => {
                let offset: u64 = head.header("roam-offset").unwrap().parse().unwrap();
                assert_eq!(offset, len, "416 on a resumed request means complete");
                offset
            }
            (None, _) => resumed_start(&head, len),
        };
        if start > have.len() as u64 {
            // The server resumes past what this client has. Legitimate only when the proxy's
            // kernel acknowledged bytes it then never forwarded: it reset the client, or the
            // client gave up on a connection it had stopped forwarding.
            assert!(
                matches!(previous, Ending::Reset | Ending::Stalled),
                "client {client}: gap, server {node} starts at {start} but the client has {} \
                 bytes, after a connection that ended {previous:?} (this is connection {index}, \
                 planned {step:?})",
                have.len()
            );
            *stats.gaps.lock().unwrap().entry(previous).or_default() += 1;
            stats
                .max_gap
                .fetch_max(start - have.len() as u64, Ordering::Relaxed);
            stats.ended(Ending::Gap);
            previous = Ending::Gap;
            declare = Some(have.len() as u64);
            continue;
        }
        if head.status == 416 {
            break;
        }
        stats
            .repeated_bytes
            .fetch_add(have.len() as u64 - start, Ordering::Relaxed);
        if start == 0 && !have.is_empty() && declared.is_none() {
            stats.restarts.fetch_add(1, Ordering::Relaxed);
        }

        let mut pos = start;
        place(&mut have, &mut pos, len, &leftover);
        let mut body = leftover.len() as u64;
        let ended = loop {
            if pos == len {
                break None;
            }
            if step.move_at.is_some_and(|m| body >= m) {
                stats.moves.fetch_add(1, Ordering::Relaxed);
                moving = Some(Old { s, pos, end: len });
                break Some(Ending::Moved);
            }
            match read_within(&mut s, &mut buf, STALL_DETECT).await {
                Ok(n) => {
                    place(&mut have, &mut pos, len, &buf[..n]);
                    body += n as u64;
                }
                Err(how) => break Some(how),
            }
        };
        match ended {
            None => break,
            Some(Ending::Moved) => cuts += 1,
            Some(how) => {
                stats.ended(how);
                cuts += 1;
                previous = how;
            }
        }
    }
    assert_eq!(
        have.len() as u64,
        len,
        "client {client}: not complete after {MAX_ATTEMPTS} connections"
    );
    stats.cuts.lock().unwrap().push(cuts);
    have
}
