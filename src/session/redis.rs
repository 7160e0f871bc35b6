//! The shared backend: session records in Redis (or Valkey), so that every node of a fleet
//! resumes every client (`--store redis://…`, `rediss://…`, `redis+cluster://…`).
//!
//! One hash per session, `roam:{<client>}:<file>` (16 hex digits each; the braces are a
//! Cluster hash tag, so all sessions of a client live in one slot and a Cluster shards by
//! client), with the fields `o` offset, `v` version, `e` epoch, `n` how the sender ended (the
//! two bits of [`Ended`]), `h` the node whose sender owns the epoch, `b` the id of the begin
//! that set the epoch, `t` when it was last touched (seconds, by the nodes' session clock).
//! The key's own TTL is refreshed by every write; every script also compares `t` with the
//! caller's clock, so a record idle for longer than the TTL is gone at once for every node.
//!
//! Everything that must be atomic runs as a Lua script (EVALSHA; reloaded after a restart or
//! a failover emptied the script cache): a begin increments the epoch and answers who held the
//! session; a commit applies only for the current epoch of the same node, and only forward.
//! Commits travel in batches, one pipeline per flush (per client in a Cluster).
//!
//! Each node also has a heartbeat key `roam:node:{<node>}` (refreshed every second, expiring
//! after three) and a stop channel `roam:{<node>}:stop` (sharded pub/sub in a Cluster) on
//! which other nodes ask it to stop a sender (see `owners::stop_remote`).
//!
//! A request never waits longer than the configured bound (`--redis-wait`) for Redis, and not
//! at all while Redis is known to be unreachable: the first failure marks it so (one warning
//! per outage), and a background probe clears the mark when Redis answers again.

use super::backend::{
    Backend, Begin, BeginError, BoxFuture, Committed, Expect, Holding, Local, Report, ResumeAsk,
    Resumed, SharedStore, StopRequest, StoreError, Stored,
};
use super::clock::Clock;
use super::key::{Ended, Epoch, FileKey, Record, SessionKey};
use super::table::Full;
use redis::aio::ConnectionLike;
use redis::{Cmd, IntoConnectionInfo, Pipeline, PushKind, RedisError, RedisFuture, Script, Value};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify, OnceCell};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a node refreshes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a heartbeat lasts: a node silent for this long counts as gone, and other nodes
/// stop waiting for it.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// While Redis is unreachable, how often a node tries it again.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How long a call off the request path (a batch of commits, a heartbeat, connecting) may
/// take before it counts as failed and is retried.
pub const BACKGROUND_WAIT: Duration = Duration::from_secs(2);
/// Sessions per script call when committing to a single server (Redis runs a call whole: about
/// 2 µs per session, so a call blocks it well under a millisecond).
const COMMIT_CHUNK: usize = 256;
/// How often the estimate of the number of records is refreshed (DBSIZE).
const COUNT_EVERY: Duration = Duration::from_secs(10);

const BEGIN_LUA: &str = r#"#!lua flags=
-- BEGIN: make the calling node the sender of one session under a new epoch, atomically.
-- KEYS[1] the session
-- ARGV[1] node  ARGV[2] begin id (unique per call: the same call retried answers the same)
-- ARGV[3] mode: "resume" (start where the client stands) | "declare" (start at ARGV[6])
-- ARGV[4] version  ARGV[5] file length (resume: a record at or past it is finished)
-- ARGV[6] offset (declare)
-- ARGV[7] expect: "" (resume: unless another node's sender holds it; declare: anything)
--         | "absent" | an epoch
-- ARGV[8] the node's own newer record: "" | "mine" (of an epoch the store began for it)
--         | "begun" (of an epoch it began by itself, not written yet); ARGV[9..12] its epoch,
--         offset, version, end
-- ARGV[13] now (s)  ARGV[14] ttl (s)  ARGV[15] first epoch of a new record  ARGV[16] cap
-- Reply: {status, epoch, start, previous epoch, previous end, previous holder}, status one of
--   ok | finished | held | conflict | full
local k = KEYS[1]
local me, id, mode = ARGV[1], ARGV[2], ARGV[3]
local now, ttl = tonumber(ARGV[13]), tonumber(ARGV[14])
local r = redis.call('HMGET', k, 'o', 'v', 'e', 'n', 'h', 'b', 't')
local o, v, e, n, h = r[1], r[2], r[3], r[4], r[5]
if e and now - tonumber(r[7] or '0') > ttl then
  redis.call('DEL', k)
  o, v, e, n, h = false, false, false, false, false
elseif e and r[6] == id then
  return {'ok', tonumber(e), o, e, n or '', h or ''}
end
local lmode = ARGV[8]
if lmode == 'mine' and e == ARGV[9] and h == me then
  if tonumber(ARGV[10]) > tonumber(o) then o = ARGV[10] end
  n = ARGV[12]
elseif lmode == 'begun' and not (e and n == '0' and h and h ~= me) then
  o, v, e, n, h = ARGV[10], ARGV[11], ARGV[9], ARGV[12], me
end
local expect = ARGV[7]
if expect == 'absent' then
  if e then return {'conflict', -1, '', e, n or '', h or ''} end
elseif expect ~= '' then
  if e ~= expect then return {'conflict', -1, '', e or '', n or '', h or ''} end
elseif mode == 'resume' and e and n == '0' and h and h ~= '' and h ~= me then
  return {'held', -1, o, e, n, h}
end
local start = ARGV[6]
if mode == 'resume' then
  start = '0'
  if e and v == ARGV[4] and n ~= '3' then
    if tonumber(o) >= tonumber(ARGV[5]) then return {'finished', -1, o, e, n, h or ''} end
    start = o
  end
end
local epoch
if e then
  epoch = (tonumber(e) + 1) % 65536
else
  local cap = tonumber(ARGV[16])
  if cap > 0 and redis.call('DBSIZE') >= cap then return {'full', -1, '', '', '', ''} end
  epoch = tonumber(ARGV[15]) % 65536
end
redis.call('HSET', k, 'o', start, 'v', ARGV[4], 'e', epoch, 'n', '0', 'h', me, 'b', id,
  't', ARGV[13])
redis.call('PEXPIRE', k, ttl * 1000)
return {'ok', epoch, start, e or '', n or '', h or ''}
"#;

const COMMIT_LUA: &str = r#"#!lua flags=allow-oom
-- COMMIT: progress of the senders that own epochs, one entry per key. Each applies only to the
-- current epoch of the same node, moves the offset only forward, records how the sender ended.
-- Allowed when the server is out of memory, so that running downloads keep their progress (new
-- records are refused then).
-- KEYS[1..n] the sessions (one slot)  ARGV[1] node  ARGV[2] now (s)  ARGV[3] ttl (s)
-- ARGV[4+3i..6+3i] key i+1's epoch, offset, end
-- Reply: per key, 1 applied, 0 stale (another epoch or node, or no record)
local me, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i, k in ipairs(KEYS) do
  local a = 3 * i + 1
  local r = redis.call('HMGET', k, 'e', 'h', 'o', 't')
  if not r[1] or r[1] ~= ARGV[a] or r[2] ~= me or now - tonumber(r[4] or '0') > ttl then
    out[i] = 0
  else
    local o = r[3]
    if tonumber(ARGV[a + 1]) > tonumber(o) then o = ARGV[a + 1] end
    redis.call('HSET', k, 'o', o, 'n', ARGV[a + 2], 't', ARGV[2])
    redis.call('PEXPIRE', k, ttl * 1000)
    out[i] = 1
  end
end
return out
"#;

const DECLARE_LUA: &str = r#"#!lua flags=
-- DECLARE: nodes began epochs by themselves (a position the client declared, or a begin while
-- the store was unreachable); the store takes each record as that node's from now on. Written
-- again (a retried batch), an entry only moves the offset forward.
-- KEYS[1..n] the sessions (one slot)  ARGV[1] node  ARGV[2] now (s)  ARGV[3] ttl (s)
-- ARGV[4] cap  ARGV[5+4i..8+4i] key i+1's epoch, offset, end, version
-- Reply: per key, 1 written, -1 refused (a new record past the cap)
local me, now, ttl, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i, k in ipairs(KEYS) do
  local a = 4 * i + 1
  local r = redis.call('HMGET', k, 'e', 'h', 'o', 't')
  local live = r[1] and now - tonumber(r[4] or '0') <= ttl
  local o = ARGV[a + 1]
  local refused = false
  if live and r[1] == ARGV[a] and r[2] == me then
    if tonumber(r[3]) > tonumber(o) then o = r[3] end
  elseif not live then
    if r[1] then redis.call('DEL', k) end
    if cap > 0 and redis.call('DBSIZE') >= cap then refused = true end
  end
  if refused then
    out[i] = -1
  else
    redis.call('HSET', k, 'o', o, 'v', ARGV[a + 3], 'e', ARGV[a], 'n', ARGV[a + 2], 'h', me,
      'b', '', 't', ARGV[2])
    redis.call('PEXPIRE', k, ttl * 1000)
    out[i] = 1
  end
end
return out
"#;

const RELEASE_LUA: &str = r#"#!lua flags=allow-oom
-- RELEASE: the node holding an epoch gives it up without progress (it runs no sender for it).
-- KEYS[1] the session  ARGV[1] node  ARGV[2] epoch
local r = redis.call('HMGET', KEYS[1], 'e', 'h', 'n')
if r[1] == ARGV[2] and r[2] == ARGV[1] and r[3] == '0' then
  redis.call('HSET', KEYS[1], 'n', '2')
  return 1
end
return 0
"#;

const HEARTBEAT_LUA: &str = r#"#!lua flags=allow-oom
-- HEARTBEAT: this node is alive (allowed out of memory: a full shard must not make its nodes
-- look dead). KEYS[1] roam:node:{<node>}  ARGV[1] ttl (ms)
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"#;

/// Where the fleet's Redis is: one server, or the seeds of a Cluster. Parsed once from
/// `--store`; displays with any password hidden.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// One URL for a server; one per seed node for a Cluster.
    urls: Vec<String>,
    cluster: bool,
    shown: String,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// The URL forms `--store` takes for Redis.
pub const REDIS_FORMS: &str = "redis://[USER:PASSWORD@]HOST:PORT[/DB], rediss://… (TLS), or \
                               redis+cluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT,… (a Cluster; \
                               rediss+cluster:// with TLS)";

impl RedisTarget {
    /// Parses a Redis `--store` value; `None` when `s` names no Redis scheme.
    pub fn parse(s: &str) -> Option<Result<RedisTarget, String>> {
        let (scheme, rest) = s.split_once("://")?;
        let bad = |why: String| Some(Err(format!("--store {}: {why}", redact(s))));
        match scheme {
            "redis" | "rediss" | "valkey" | "valkeys" | "redis+unix" | "unix" => {
                if let Err(e) = s.into_connection_info() {
                    return bad(format!("{e} (expected {REDIS_FORMS})"));
                }
                Some(Ok(RedisTarget {
                    urls: vec![s.to_owned()],
                    cluster: false,
                    shown: redact(s),
                }))
            }
            "redis+cluster" | "rediss+cluster" => {
                let node_scheme = scheme.trim_end_matches("+cluster");
                let (userinfo, hosts) = match rest.rfind('@') {
                    Some(i) => (&rest[..=i], &rest[i + 1..]),
                    None => ("", rest),
                };
                let hosts = match hosts.strip_suffix("/0").or_else(|| hosts.strip_suffix('/')) {
                    Some(h) => h,
                    None => hosts,
                };
                if hosts.contains('/') || hosts.contains('?') {
                    return bad("a Cluster has only database 0 and takes no options".into());
                }
                let mut urls = Vec::new();
                for host in hosts.split(',') {
                    if host.is_empty() || !host.contains(':') {
                        return bad(format!(
                            "{host:?} is not HOST:PORT (expected {REDIS_FORMS})"
                        ));
                    }
                    let url = format!("{node_scheme}://{userinfo}{host}/");
                    if let Err(e) = url.as_str().into_connection_info() {
                        return bad(format!("{host}: {e}"));
                    }
                    urls.push(url);
                }
                Some(Ok(RedisTarget {
                    urls,
                    cluster: true,
                    shown: redact(s),
                }))
            }
            _ => None,
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// True for `rediss://`: the connection is TLS.
    pub fn tls(&self) -> bool {
        self.urls
            .first()
            .is_some_and(|u| u.starts_with("rediss://") || u.starts_with("valkeys://"))
    }
}

/// `s` with the password of its user information replaced by `***`.
fn redact(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_owned();
    };
    match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            let masked = if rest[..at].contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{scheme}://{masked}@{}", &rest[at + 1..])
        }
        None => s.to_owned(),
    }
}

/// The Redis key of a session.
fn session_key(key: SessionKey) -> String {
    format!("roam:{{{:016x}}}:{:016x}", key.client, key.file.0)
}

fn heartbeat_key(node: &str) -> String {
    format!("roam:node:{{{node}}}")
}

fn stop_channel(node: &str) -> String {
    format!("roam:{{{node}}}:stop")
}

/// What a node sends itself on its stop channel to check that it still listens.
const PING: &str = "ping";

/// A stop request on the wire: the session (client and file, 32 hex digits) and the epoch.
fn stop_message(key: SessionKey, epoch: Epoch) -> String {
    format!("{:016x}{:016x} {}", key.client, key.file.0, epoch.0)
}

fn parse_stop(text: &str) -> Option<StopRequest> {
    let (k, e) = text.split_once(' ')?;
    if k.len() != 32 {
        return None;
    }
    let client = u64::from_str_radix(&k[..16], 16).ok()?;
    let file = u64::from_str_radix(&k[16..], 16).ok()?;
    Some(StopRequest {
        key: SessionKey {
            client,
            file: FileKey(file),
        },
        epoch: Epoch(e.parse().ok()?),
    })
}

/// A connection for commands: one server through a reconnecting manager, or a Cluster.
#[derive(Clone)]
enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Whether Redis answers, and the bookkeeping that logs one line when an outage starts and one
/// when it ends.
#[derive(Debug, Default)]
struct Health {
    down: AtomicBool,
    /// Calls that failed since the outage began.
    failures: AtomicU64,
    since: Mutex<Option<std::time::Instant>>,
}

impl Health {
    fn failed(&self, what: &str, e: &dyn fmt::Display) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if !self.down.swap(true, Ordering::AcqRel) {
            if let Ok(mut s) = self.since.lock() {
                *s = Some(std::time::Instant::now());
            }
            tracing::warn!(
                error = %e,
                during = what,
                "the session store (Redis) is unreachable: serving from what this node knows, \
                 keeping its progress and writing it when Redis is back"
            );
        }
    }

    fn answered(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            let failed = self.failures.swap(0, Ordering::Relaxed);
            let lasted = self
                .since
                .lock()
                .ok()
                .and_then(|mut s| s.take())
                .map(|t| t.elapsed());
            tracing::info!(
                failed_calls = failed,
                outage = ?lasted,
                "the session store (Redis) answers again"
            );
        }
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

fn no_script(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript))
}

type QueuedBegin = (Cmd, oneshot::Sender<Result<Value, RedisError>>);

/// BEGINs of requests waiting to go to a single server together.
#[derive(Default)]
struct BeginQueue {
    pending: Mutex<Vec<QueuedBegin>>,
    wake: Notify,
    /// The sending task runs (it starts with the first BEGIN, on the runtime serving it).
    started: AtomicBool,
    /// The backend is gone: the task ends.
    closed: AtomicBool,
}

/// The task that empties the queue of BEGINs: when woken, it first lets every task that is
/// ready run (each request among them queues its BEGIN), then sends all that are queued in one
/// pipeline, on a task of its own so that the next batch need not wait for this one's reply.
/// Without the yield, the request that woke it would be alone in its batch: the scheduler
/// runs a task woken by the running one right after it.
async fn send_begins(inner: std::sync::Weak<Inner>, q: Arc<BeginQueue>) {
    /// Marks the task gone however it ends (a runtime shutting down drops it), so that the
    /// next BEGIN starts another.
    struct Running(Arc<BeginQueue>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.started.store(false, Ordering::Release);
        }
    }
    let _running = Running(q.clone());
    loop {
        if q.closed.load(Ordering::Acquire) {
            return;
        }
        if q.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            q.wake.notified().await;
            continue;
        }
        tokio::task::yield_now().await;
        let batch = std::mem::take(&mut *q.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            continue;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let backend = RedisBackend { inner };
        tokio::spawn(async move { backend.send_begin_batch(batch).await });
    }
}

struct Scripts {
    begin: Script,
    commit: Script,
    declare: Script,
    release: Script,
    heartbeat: Script,
}

struct Inner {
    target: RedisTarget,
    /// This node's name: random per process, so a restarted node never answers for the
    /// senders of its previous life.
    node: String,
    /// Numbers begins, for their ids.
    begins: AtomicU64,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    cap: usize,
    /// Longest a request waits for Redis.
    wait: Duration,
    conn: OnceCell<Conn>,
    health: Health,
    scripts: Scripts,
    /// Records in the store at the last count, and records this node created since.
    counted: AtomicUsize,
    created: AtomicUsize,
    /// BEGINs on the request path waiting to be sent together (a single server only).
    queue: Arc<BeginQueue>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        self.queue.wake.notify_one();
    }
}

/// Session records in Redis, shared by every node pointed at it. A cheap-clone handle;
/// connects lazily (a node starts whether or not Redis is there).
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RedisBackend({}, node {})",
            self.inner.target, self.inner.node
        )
    }
}

/// True when `e` is an answer from a working server (a refusal), not a sign that the store is
/// unreachable, down, loading or failing over.
fn answered(e: &RedisError) -> bool {
    use redis::ServerErrorKind as K;
    match e.kind() {
        redis::ErrorKind::Extension => true,
        redis::ErrorKind::Server(k) => !matches!(
            k,
            K::BusyLoading
                | K::TryAgain
                | K::ClusterDown
                | K::MasterDown
                | K::ReadOnly
                | K::Moved
                | K::Ask
        ),
        _ => false,
    }
}

fn store_error(what: &str, e: impl fmt::Display) -> StoreError {
    StoreError(format!("redis {what}: {e}"))
}

impl RedisBackend {
    /// A backend on `target` for records that expire after `ttl` idle by `clock`, with at most
    /// `cap` records per server (per Cluster shard), where a request waits at most `wait`.
    pub fn new(
        target: RedisTarget,
        ttl: Duration,
        cap: usize,
        wait: Duration,
        clock: Arc<dyn Clock>,
    ) -> RedisBackend {
        if target.tls() {
            // rediss:// through rustls, which takes the process's default crypto provider
            // (roam's HTTPS passes its provider explicitly): set before any connection is made,
            // by the command or the subscription connection. Already set is fine.
            let _ = crate::tls::provider().install_default();
        }
        RedisBackend {
            inner: Arc::new(Inner {
                target,
                node: format!("{:016x}", rand::random::<u64>()),
                begins: AtomicU64::new(0),
                clock,
                ttl,
                cap,
                wait,
                conn: OnceCell::new(),
                health: Health::default(),
                scripts: Scripts {
                    begin: Script::new(BEGIN_LUA),
                    commit: Script::new(COMMIT_LUA),
                    declare: Script::new(DECLARE_LUA),
                    release: Script::new(RELEASE_LUA),
                    heartbeat: Script::new(HEARTBEAT_LUA),
                },
                counted: AtomicUsize::new(0),
                created: AtomicUsize::new(0),
                queue: Arc::default(),
            }),
        }
    }

    /// Where the records live (password hidden).
    pub fn target(&self) -> &RedisTarget {
        &self.inner.target
    }

    fn tcp() -> redis::io::tcp::TcpSettings {
        // Off by default in this client: with many concurrent requests on one connection,
        // Nagle would hold each write until the previous one is acknowledged.
        redis::io::tcp::TcpSettings::default().set_nodelay(true)
    }

    /// The command connection, made on first use.
    async fn conn(&self) -> Result<Conn, RedisError> {
        let t = &self.inner.target;
        self.inner
            .conn
            .get_or_try_init(|| async {
                if t.cluster {
                    let client = redis::cluster::ClusterClientBuilder::new(t.urls.clone())
                        .connection_timeout(BACKGROUND_WAIT / 2)
                        .response_timeout(BACKGROUND_WAIT)
                        .retries(2)
                        .tcp_settings(Self::tcp())
                        .build()?;
                    Ok(Conn::Cluster(client.get_async_connection().await?))
                } else {
                    let info = t.urls[0]
                        .as_str()
                        .into_connection_info()?
                        .set_tcp_settings(Self::tcp());
                    let client = redis::Client::open(info)?;
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(BACKGROUND_WAIT / 2))
                        .set_response_timeout(Some(BACKGROUND_WAIT))
                        .set_number_of_retries(2)
                        .set_min_delay(Duration::from_millis(10))
                        .set_max_delay(Duration::from_millis(200));
                    Ok(Conn::Single(
                        redis::aio::ConnectionManager::new_lazy_with_config(client, config)?,
                    ))
                }
            })
            .await
            .cloned()
    }

    /// Runs `call` for the request path: not at all while Redis is known to be down, and for
    /// at most the request bound otherwise (a failure or a timeout marks Redis down).
    async fn quick<T, F, Fut>(&self, what: &str, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        if self.inner.health.is_down() {
            return Err(StoreError("redis is unreachable".into()));
        }
        // Connecting to a Cluster (finding its shards) takes several round trips: that happens
        // off the request path, in the node's presence loop; until then requests do not wait.
        if self.inner.target.cluster && self.inner.conn.get().is_none() {
            return Err(StoreError("redis cluster: not connected yet".into()));
        }
        let outcome = tokio::time::timeout(self.inner.wait, async {
            let conn = self.conn().await?;
            call(conn).await
        })
        .await;
        self.settle(what, outcome, self.inner.wait)
    }

    /// Runs `call` off the request path, for at most [`BACKGROUND_WAIT`].
    async fn slow<T, F, Fut>(&self, what: &str, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let outcome = tokio::time::timeout(BACKGROUND_WAIT, async {
            let conn = self.conn().await?;
            call(conn).await
        })
        .await;
        self.settle(what, outcome, BACKGROUND_WAIT)
    }

    fn settle<T>(
        &self,
        what: &str,
        outcome: Result<Result<T, RedisError>, tokio::time::error::Elapsed>,
        bound: Duration,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(Ok(v)) => {
                self.inner.health.answered();
                Ok(v)
            }
            // A script's error (out of memory, say) comes from a Redis that is there.
            Ok(Err(e)) if answered(&e) => Err(store_error(what, e)),
            Ok(Err(e)) => {
                self.inner.health.failed(what, &e);
                Err(store_error(what, e))
            }
            Err(_) => {
                let e = format!("no answer within {bound:?}");
                self.inner.health.failed(what, &e);
                Err(store_error(what, e))
            }
        }
    }

    fn now(&self) -> u64 {
        self.inner.clock.now()
    }

    fn begin_id(&self) -> String {
        format!(
            "{}.{}",
            self.inner.node,
            self.inner.begins.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// One BEGIN.
    #[allow(clippy::too_many_arguments)]
    async fn begin_script(
        &self,
        key: SessionKey,
        mode: &str,
        version: u32,
        length: u64,
        offset: u64,
        expect: String,
        local: Local,
    ) -> Result<BeginReply, StoreError> {
        let id = self.begin_id();
        let (lmode, l) = match local {
            Local::None => ("", None),
            Local::Registered(r) => ("mine", Some(r)),
            Local::Begun(r) => ("begun", Some(r)),
        };
        let l = l.unwrap_or(Record {
            offset: 0,
            version: 0,
            epoch: Epoch(0),
            ended: Ended::Sending,
        });
        let seed = rand::random::<u16>();
        macro_rules! with_args {
            ($call:expr) => {
                $call
                    .arg(&self.inner.node)
                    .arg(&id)
                    .arg(mode)
                    .arg(version)
                    .arg(length)
                    .arg(offset)
                    .arg(&expect)
                    .arg(lmode)
                    .arg(l.epoch.0)
                    .arg(l.offset)
                    .arg(l.version)
                    .arg(l.ended.bits())
                    .arg(self.now())
                    .arg(self.inner.ttl.as_secs().max(1))
                    .arg(seed)
                    .arg(self.inner.cap)
            };
        }
        let reply: Vec<Value> = if self.inner.target.cluster {
            let mut inv = self.inner.scripts.begin.key(session_key(key));
            with_args!(inv);
            self.quick(
                "begin",
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await?
        } else {
            // A single server: queued with the begins of every request ready now, and sent
            // with them in one pipeline (one write, one read for all of them).
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.inner.scripts.begin.get_hash())
                .arg(1)
                .arg(session_key(key));
            with_args!(cmd);
            let value = self.quick("begin", |_| self.together(cmd)).await?;
            redis::from_redis_value(value)
                .map_err(|e| StoreError(format!("redis begin: unexpected reply: {e}")))?
        };
        let reply = BeginReply::parse(&reply)
            .ok_or_else(|| StoreError(format!("redis begin: unexpected reply {reply:?}")))?;
        if reply.status == "ok" && reply.previous_epoch.is_none() {
            self.inner.created.fetch_add(1, Ordering::Relaxed);
        }
        Ok(reply)
    }

    /// Queues one call of the request path (a BEGIN, an `EVALSHA` of [`BEGIN_LUA`], or a read)
    /// to be sent with the others queued meanwhile, and waits for its reply.
    async fn together(&self, cmd: Cmd) -> Result<Value, RedisError> {
        let q = &self.inner.queue;
        if !q.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(send_begins(Arc::downgrade(&self.inner), q.clone()));
        }
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut pending = q.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.push((cmd, tx));
            pending.len() == 1
        };
        if first {
            q.wake.notify_one();
        }
        rx.await.unwrap_or_else(|_| {
            Err(RedisError::from((
                redis::ErrorKind::Io,
                "the queue of begins stopped",
            )))
        })
    }

    /// Sends queued BEGINs in one pipeline and hands each its reply. Every BEGIN is
    /// idempotent (its begin id), so a pipeline whose scripts Redis lost is sent again whole.
    async fn send_begin_batch(
        &self,
        batch: Vec<(Cmd, oneshot::Sender<Result<Value, RedisError>>)>,
    ) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut replies = Vec::with_capacity(batch.len());
        for (cmd, tx) in batch {
            pipe.add_command(cmd);
            replies.push(tx);
        }
        let sent = async {
            let mut conn = self.conn().await?;
            let values: Vec<Value> = pipe.query_async(&mut conn).await?;
            if !values.iter().any(no_script) {
                return Ok(values);
            }
            self.inner
                .scripts
                .begin
                .prepare_invoke()
                .load_async(&mut conn)
                .await?;
            pipe.query_async(&mut conn).await
        }
        .await;
        match sent {
            Ok(values) => {
                for (tx, v) in replies.into_iter().zip(values) {
                    let _ = tx.send(match v {
                        Value::ServerError(e) => Err(e.into()),
                        v => Ok(v),
                    });
                }
            }
            Err(e) => {
                for tx in replies {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }

    /// Whether a session this node last saw finished is still finished, decided by a plain
    /// read instead of a BEGIN: a repeated request after completion (answered `416`) costs
    /// Redis a quarter of a script's work (a read: 2.8 µs on this machine's Redis, a BEGIN
    /// 11 µs). Nothing is written either way, so the read decides exactly as BEGIN would: the
    /// record as this node's newer knowledge completes it, not held by another node's sender,
    /// the same version, the client's end not a reset, the offset at the file's end. Anything
    /// else (or a session this node did not see finished) goes to BEGIN.
    async fn finished_by_read(&self, key: SessionKey, ask: ResumeAsk) -> Result<bool, StoreError> {
        let Local::Registered(mine) = ask.local else {
            return Ok(false);
        };
        let seen_finished =
            mine.version == ask.version && mine.offset >= ask.length && mine.ended == Ended::Clean;
        if ask.expect.is_some() || !seen_finished {
            return Ok(false);
        }
        let Some(h) = self.read(key).await? else {
            return Ok(false);
        };
        let me = self.inner.node.as_str();
        let mut r = h.stored.record;
        let held_by = h.holder.as_deref();
        if r.ended == Ended::Sending && held_by.is_some_and(|h| h != me) {
            return Ok(false);
        }
        if r.epoch == mine.epoch && held_by == Some(me) {
            r.offset = r.offset.max(mine.offset);
            r.ended = mine.ended;
        }
        Ok(r.version == ask.version && r.ended != Ended::Peer && r.offset >= ask.length)
    }

    /// Reads one record with its holder: on a single server queued with the BEGINs of the
    /// moment (one pipeline).
    async fn read(&self, key: SessionKey) -> Result<Option<Holding>, StoreError> {
        if self.inner.target.cluster {
            return self.hold(key).await;
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(session_key(key))
            .arg(&["o", "v", "e", "n", "h", "t"]);
        let value = self.quick("read", |_| self.together(cmd)).await?;
        let fields: Vec<Option<String>> = redis::from_redis_value(value)
            .map_err(|e| StoreError(format!("redis read: unexpected reply: {e}")))?;
        Ok(self.decode(&fields))
    }

    /// Reads one record with its holder.
    async fn hold(&self, key: SessionKey) -> Result<Option<Holding>, StoreError> {
        let k = session_key(key);
        let fields: Vec<Option<String>> = self
            .quick("read", |mut c| async move {
                redis::cmd("HMGET")
                    .arg(&k)
                    .arg(&["o", "v", "e", "n", "h", "t"])
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(self.decode(&fields))
    }

    fn decode(&self, f: &[Option<String>]) -> Option<Holding> {
        let num = |i: usize| f.get(i)?.as_deref()?.parse::<u64>().ok();
        let epoch = u16::try_from(num(2)?).ok()?;
        let touched = num(5).unwrap_or(0);
        if self.now().saturating_sub(touched) > self.inner.ttl.as_secs() {
            return None;
        }
        Some(Holding {
            stored: Stored {
                record: Record {
                    offset: num(0)?,
                    version: u32::try_from(num(1)?).ok()?,
                    epoch: Epoch(epoch),
                    ended: Ended::from_bits(u8::try_from(num(3).unwrap_or(0)).unwrap_or(0)),
                },
                touched,
            },
            holder: f.get(4).cloned().flatten().filter(|h| !h.is_empty()),
        })
    }

    /// Sends one pipeline of script invocations, loading the scripts and sending it again if
    /// Redis lost them (a restart or a failover empties the script cache; every entry is
    /// idempotent).
    async fn send_batch(&self, conn: &mut Conn, pipe: &Pipeline) -> Result<Vec<Value>, RedisError> {
        let values: Vec<Value> = pipe.query_async(conn).await?;
        if !values.iter().any(no_script) {
            return Ok(values);
        }
        let s = &self.inner.scripts;
        for script in [&s.commit, &s.declare] {
            script.prepare_invoke().load_async(conn).await?;
        }
        pipe.query_async(conn).await
    }

    /// The records in the store as of the last count, plus those this node created since.
    fn estimate(&self) -> usize {
        self.inner.counted.load(Ordering::Relaxed) + self.inner.created.load(Ordering::Relaxed)
    }

    async fn count(&self) {
        if let Ok(n) = self
            .slow("count", |mut c| async move {
                redis::cmd("DBSIZE").query_async::<usize>(&mut c).await
            })
            .await
        {
            self.inner.counted.store(n, Ordering::Relaxed);
            self.inner.created.store(0, Ordering::Relaxed);
        }
    }

    async fn heartbeat(&self) -> Result<(), StoreError> {
        let mut inv = self
            .inner
            .scripts
            .heartbeat
            .key(heartbeat_key(&self.inner.node));
        inv.arg(HEARTBEAT_TTL.as_millis() as u64);
        self.slow("heartbeat", |mut c| async move {
            inv.invoke_async::<i64>(&mut c).await
        })
        .await
        .map(|_| ())
    }

    /// Subscribes to this node's stop channel and forwards what arrives to `stops`, until
    /// `stop`; reconnects (and subscribes again) by itself after Redis went away.
    async fn listen(&self, stops: mpsc::UnboundedSender<StopRequest>, stop: CancellationToken) {
        let channel = stop_channel(&self.inner.node);
        let (tx, mut rx) = mpsc::unbounded_channel::<redis::PushInfo>();
        // Kept alive for as long as we listen.
        let mut subscription: Option<Conn> = None;
        let mut retry = Duration::from_millis(50);
        // Every second the node sends itself a ping on its channel: PUBLISH answers how many
        // subscribers got it, and none means the subscription was lost without the client
        // noticing (measured: a Cluster failover of the channel's shard leaves the sharded
        // subscription on the dead master). Then it subscribes again.
        let mut check = tokio::time::interval(HEARTBEAT_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if subscription.is_none() {
                match tokio::time::timeout(BACKGROUND_WAIT, self.subscribe(&channel, tx.clone()))
                    .await
                {
                    Ok(Ok(c)) => {
                        subscription = Some(c);
                        retry = Duration::from_millis(50);
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "cannot subscribe to the stop channel yet")
                    }
                    Err(_) => tracing::debug!("subscribing to the stop channel timed out"),
                }
            }
            let wait = if subscription.is_some() {
                Duration::from_secs(3600)
            } else {
                retry
            };
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    if !matches!(msg.kind, PushKind::Message | PushKind::SMessage) {
                        continue;
                    }
                    // [channel, payload]
                    let payload = msg.data.get(1).and_then(|v| match v {
                        Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_owned),
                        Value::SimpleString(s) => Some(s.clone()),
                        _ => None,
                    });
                    match payload.as_deref().and_then(parse_stop) {
                        Some(req) => {
                            let _ = stops.send(req);
                        }
                        None if payload.as_deref() == Some(PING) => {}
                        None => tracing::debug!(?payload, "ignoring a malformed stop message"),
                    }
                }
                _ = check.tick(), if subscription.is_some() => {
                    let cluster = self.inner.target.cluster;
                    let channel = channel.clone();
                    let heard = self
                        .slow("ping", |mut c| async move {
                            redis::cmd(if cluster { "SPUBLISH" } else { "PUBLISH" })
                                .arg(&channel)
                                .arg(PING)
                                .query_async::<i64>(&mut c)
                                .await
                        })
                        .await;
                    if let Ok(0) = heard {
                        tracing::debug!("the stop channel's subscription was lost; subscribing again");
                        subscription = None;
                    }
                }
                () = tokio::time::sleep(wait) => {
                    retry = (retry * 2).min(Duration::from_secs(1));
                }
                () = stop.cancelled() => return,
            }
        }
    }

    /// A second connection, in RESP3, that only listens to `channel` (a flood of commands never
    /// delays a stop); the client resubscribes after every reconnect.
    async fn subscribe(
        &self,
        channel: &str,
        tx: mpsc::UnboundedSender<redis::PushInfo>,
    ) -> Result<Conn, RedisError> {
        let t = &self.inner.target;
        if t.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(t.urls.clone())
                .connection_timeout(BACKGROUND_WAIT / 2)
                .response_timeout(BACKGROUND_WAIT)
                .tcp_settings(Self::tcp())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .build()?;
            let mut c = client.get_async_connection().await?;
            c.ssubscribe(channel).await?;
            Ok(Conn::Cluster(c))
        } else {
            let info = t.urls[0].as_str().into_connection_info()?;
            let redis_info = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            let info = info
                .set_redis_settings(redis_info)
                .set_tcp_settings(Self::tcp());
            let client = redis::Client::open(info)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(BACKGROUND_WAIT / 2))
                .set_response_timeout(Some(BACKGROUND_WAIT))
                .set_number_of_retries(usize::MAX)
                .set_min_delay(Duration::from_millis(10))
                .set_max_delay(Duration::from_millis(500))
                .set_push_sender(tx)
                .set_automatic_resubscription();
            let mut c = redis::aio::ConnectionManager::new_with_config(client, config).await?;
            c.subscribe(channel).await?;
            Ok(Conn::Single(c))
        }
    }
}

/// A BEGIN's answer.
#[derive(Debug)]
struct BeginReply {
    status: String,
    epoch: Option<Epoch>,
    start: u64,
    previous_epoch: Option<Epoch>,
    previous_holder: Option<String>,
}

impl BeginReply {
    fn parse(v: &[Value]) -> Option<BeginReply> {
        let text = |i: usize| -> Option<String> {
            match v.get(i)? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                Value::SimpleString(s) => Some(s.clone()),
                Value::Int(n) => Some(n.to_string()),
                Value::Nil => Some(String::new()),
                _ => None,
            }
        };
        let epoch = |s: String| s.parse::<u16>().ok().map(Epoch);
        Some(BeginReply {
            status: text(0)?,
            epoch: epoch(text(1)?),
            start: text(2)?.parse().unwrap_or(0),
            previous_epoch: epoch(text(3)?),
            previous_holder: text(5).filter(|h| !h.is_empty()),
        })
    }
}

fn expect_arg(expect: Expect) -> String {
    match expect {
        Expect::Any => String::new(),
        Expect::Absent => "absent".into(),
        Expect::Epoch(e) => e.0.to_string(),
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn exclusive(&self) -> bool {
        false
    }

    fn read(&self, key: SessionKey) -> BoxFuture<'_, Result<Option<Stored>, StoreError>> {
        Box::pin(async move { Ok(self.hold(key).await?.map(|h| h.stored)) })
    }

    fn begin(&self, key: SessionKey, begin: Begin) -> BoxFuture<'_, Result<Epoch, BeginError>> {
        Box::pin(async move {
            let reply = self
                .begin_script(
                    key,
                    "declare",
                    begin.version,
                    u64::MAX,
                    begin.offset,
                    expect_arg(begin.expect),
                    Local::None,
                )
                .await?;
            match (reply.status.as_str(), reply.epoch) {
                ("ok", Some(e)) => Ok(e),
                ("conflict", _) => Err(BeginError::Conflict),
                ("full", _) => Err(BeginError::Full(Full {
                    cap: self.inner.cap,
                })),
                _ => Err(BeginError::Store(StoreError(format!(
                    "redis begin: unexpected reply {reply:?}"
                )))),
            }
        })
    }

    fn commit(&self, batch: Vec<Report>) -> BoxFuture<'_, Result<Committed, StoreError>> {
        Box::pin(async move {
            let now = self.now();
            let ttl = self.inner.ttl.as_secs().max(1);
            let node = &self.inner.node;
            let s = &self.inner.scripts;
            // One script call takes many sessions, but all its keys must be in one slot: on a
            // Cluster one group per client (its hash tag), on a single server groups of up to
            // COMMIT_CHUNK. Each group is one pipeline of at most two calls, the declared
            // records first (a batch holds one report per session, so the order between
            // sessions does not matter).
            let mut groups: HashMap<u64, Vec<&Report>> = HashMap::new();
            for (i, r) in batch.iter().enumerate() {
                let group = if self.inner.target.cluster {
                    r.key().client
                } else {
                    (i / COMMIT_CHUNK) as u64
                };
                groups.entry(group).or_default().push(r);
            }
            let pipes: Vec<Pipeline> = groups
                .into_values()
                .map(|reports| {
                    let mut declare = s.declare.prepare_invoke();
                    declare.arg(node).arg(now).arg(ttl).arg(self.inner.cap);
                    let mut commit = s.commit.prepare_invoke();
                    commit.arg(node).arg(now).arg(ttl);
                    let (mut declared, mut committed) = (0, 0);
                    for r in reports {
                        match *r {
                            Report::Progress {
                                key,
                                epoch,
                                offset,
                                ended,
                            } => {
                                commit
                                    .key(session_key(key))
                                    .arg(epoch.0)
                                    .arg(offset)
                                    .arg(ended.bits());
                                committed += 1;
                            }
                            Report::Begun { key, record } | Report::Snapshot { key, record } => {
                                declare
                                    .key(session_key(key))
                                    .arg(record.epoch.0)
                                    .arg(record.offset)
                                    .arg(record.ended.bits())
                                    .arg(record.version);
                                declared += 1;
                            }
                        }
                    }
                    let mut p = redis::pipe();
                    p.ignore_errors();
                    if declared > 0 {
                        p.invoke_script(&declare);
                    }
                    if committed > 0 {
                        p.invoke_script(&commit);
                    }
                    p
                })
                .collect();
            let results = self
                .slow("commit", |conn| async move {
                    let sends = pipes.iter().map(|p| {
                        let mut c = conn.clone();
                        async move { self.send_batch(&mut c, p).await }
                    });
                    let all = futures_util::future::join_all(sends).await;
                    all.into_iter().collect::<Result<Vec<_>, _>>()
                })
                .await?;
            let mut done = Committed::default();
            let mut refused = None;
            let entries = results.into_iter().flatten().flat_map(|v| match v {
                Value::Array(each) => each,
                other => vec![other],
            });
            for v in entries {
                match v {
                    Value::Int(1) => done.applied += 1,
                    Value::Int(0) => done.stale += 1,
                    Value::Int(-1) => {
                        done.stale += 1;
                        refused.get_or_insert_with(|| "the session cap".to_owned());
                    }
                    Value::ServerError(e) => {
                        refused.get_or_insert_with(|| format!("{e:?}"));
                    }
                    other => {
                        refused.get_or_insert_with(|| format!("unexpected reply {other:?}"));
                    }
                }
            }
            match refused {
                // Out of memory, for example: the whole batch is kept and written again (every
                // entry is idempotent), and the writer logs it once per burst.
                Some(why) if why != "the session cap" => {
                    Err(StoreError(format!("redis refused a commit: {why}")))
                }
                _ => Ok(done),
            }
        })
    }

    fn expire(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        // Redis deletes idle keys by their TTL; scripts and reads ignore any not deleted yet.
        Box::pin(std::future::ready(Ok(0)))
    }

    fn expires_itself(&self) -> bool {
        true
    }

    fn len(&self) -> usize {
        self.estimate()
    }

    fn len_is_exact(&self) -> bool {
        false
    }
}

impl SharedStore for RedisBackend {
    fn node(&self) -> &str {
        &self.inner.node
    }

    fn reachable(&self) -> bool {
        !self.inner.health.is_down()
    }

    fn resume(
        &self,
        key: SessionKey,
        ask: ResumeAsk,
    ) -> BoxFuture<'_, Result<Resumed, BeginError>> {
        Box::pin(async move {
            if self.finished_by_read(key, ask).await? {
                return Ok(Resumed::Finished);
            }
            let expect = ask.expect.map(|e| e.0.to_string()).unwrap_or_default();
            let reply = self
                .begin_script(key, "resume", ask.version, ask.length, 0, expect, ask.local)
                .await?;
            match (reply.status.as_str(), reply.epoch) {
                ("ok", Some(epoch)) => Ok(Resumed::Began {
                    epoch,
                    start: reply.start,
                }),
                ("finished", _) => Ok(Resumed::Finished),
                ("held", _) => match (reply.previous_holder, reply.previous_epoch) {
                    (Some(holder), Some(epoch)) => Ok(Resumed::Held { holder, epoch }),
                    _ => Err(BeginError::Store(StoreError(
                        "redis begin: a held record without its holder".into(),
                    ))),
                },
                ("conflict", _) => Ok(Resumed::Conflict),
                ("full", _) => Err(BeginError::Full(Full {
                    cap: self.inner.cap,
                })),
                _ => Err(BeginError::Store(StoreError(format!(
                    "redis begin: unexpected reply {reply:?}"
                )))),
            }
        })
    }

    fn holding(&self, key: SessionKey) -> BoxFuture<'_, Result<Option<Holding>, StoreError>> {
        Box::pin(self.hold(key))
    }

    fn stop(
        &self,
        holder: &str,
        key: SessionKey,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        let channel = stop_channel(holder);
        let beat = heartbeat_key(holder);
        let message = stop_message(key, epoch);
        let cluster = self.inner.target.cluster;
        Box::pin(async move {
            // The node is there if it got the message (PUBLISH counts the subscribers that
            // did) or if its heartbeat has not lapsed: a live node may be between two
            // connections to Redis (its subscription comes back by itself, and the message is
            // sent again), and a node killed a moment ago stays "alive" until its heartbeat
            // expires (HEARTBEAT_TTL), which bounds the wait for it.
            let (told, alive) = self
                .quick("stop", |conn| async move {
                    let mut c1 = conn.clone();
                    let mut c2 = conn;
                    let publish = async move {
                        redis::cmd(if cluster { "SPUBLISH" } else { "PUBLISH" })
                            .arg(&channel)
                            .arg(&message)
                            .query_async::<i64>(&mut c1)
                            .await
                    };
                    let exists = async move {
                        redis::cmd("EXISTS")
                            .arg(&beat)
                            .query_async::<i64>(&mut c2)
                            .await
                    };
                    let (p, e) = tokio::join!(publish, exists);
                    Ok((p?, e?))
                })
                .await?;
            Ok(told > 0 || alive > 0)
        })
    }

    fn release(&self, key: SessionKey, epoch: Epoch) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let mut inv = self.inner.scripts.release.key(session_key(key));
            inv.arg(&self.inner.node).arg(epoch.0);
            self.slow("release", |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await
            .map(|_| ())
        })
    }

    fn run(
        &self,
        stops: mpsc::UnboundedSender<StopRequest>,
        stop: CancellationToken,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            tracing::info!(
                node = %self.inner.node,
                store = %self.inner.target,
                "joining the fleet"
            );
            let listener = self.listen(stops, stop.clone());
            let presence = async {
                let mut last_count: Option<Instant> = None;
                let mut joined = false;
                loop {
                    let ok = self.heartbeat().await.is_ok();
                    if ok && !joined {
                        joined = true;
                        tracing::info!(node = %self.inner.node, "connected to the fleet's store");
                    }
                    if ok && last_count.is_none_or(|t| t.elapsed() >= COUNT_EVERY) {
                        self.count().await;
                        last_count = Some(Instant::now());
                    }
                    let pause = if ok { HEARTBEAT_EVERY } else { PROBE_EVERY };
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = stop.cancelled() => break,
                    }
                }
                // Gone at once for the other nodes, rather than after the heartbeat lapses.
                let beat = heartbeat_key(&self.inner.node);
                let _ = self
                    .slow("leaving", |mut c| async move {
                        redis::cmd("DEL")
                            .arg(&beat)
                            .query_async::<i64>(&mut c)
                            .await
                    })
                    .await;
            };
            tokio::join!(listener, presence);
        })
    }
}

#[cfg(test)]
mod tests;
