//! Validated configuration: every knob with its default as a named constant, checked once at
//! start-up and then read-only for the server's life.

use crate::http::request::{Limits, MAX_HEADERS_CEILING};
use crate::session::redis::{RedisTarget, REDIS_FORMS};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_ROOT: &str = "./serve_root";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Connections served at once; one more waits in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Kernel accept queue. Linux caps it at `net.core.somaxconn` (4096 by default).
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Time a client has to send a whole request head once it has started (slowloris bound).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive connection is kept waiting for its next request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a response may make no progress (the socket never becomes writable) before the peer is
/// considered gone: a phone that changed networks is not coming back on this connection.
pub const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// `TCP_USER_TIMEOUT`: the kernel gives up on unacknowledged data after this long, instead of
/// retransmitting for about 15 minutes.
pub const DEFAULT_TCP_USER_TIMEOUT: Duration = Duration::from_secs(45);
/// TCP keepalive idle time before the first probe, for silent peers on idle connections.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(30);
/// `TCP_NOTSENT_LOWAT`: measured here with a peer that stops reading, 16 KiB let the server
/// write about 176 KB before the socket stopped being writable instead of about 2.9 MB, which
/// keeps "written" close to "acknowledged".
pub const DEFAULT_NOTSENT_LOWAT: u32 = 16 * 1024;
/// Sessions idle for longer than this are forgotten.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(24 * 3600);
/// Session cap; past it new (client, file) pairs get 503 until expiry frees room.
pub const DEFAULT_MAX_SESSIONS: usize = 1_000_000;
/// How old a file table entry may get before its path is resolved again: the bound on how
/// long a replaced, renamed or deleted file can still be served as it was.
pub const DEFAULT_FILE_REVALIDATE: Duration = Duration::from_secs(1);
/// Open files the file table keeps (each holds a descriptor).
pub const DEFAULT_FILE_CACHE_ENTRIES: usize = 10_000;
/// Hard deadline for in-flight connections after a shutdown signal.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Record confirmed progress at least every this many bytes sent.
pub const DEFAULT_PROGRESS_INTERVAL: u64 = 256 * 1024;
/// Where durable sessions and the ID secret live (created, mode 0700, if missing).
pub const DEFAULT_STATE_DIR: &str = "./roam-state";
/// How long a change to a session may wait in memory before the write-behind layer commits it
/// (one sync per batch). Measured in docs/benchmarks.md.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Accept Multipath TCP by default: plain TCP clients are handed over as TCP sockets by the
/// kernel, so they pay nothing for it (docs/benchmarks.md, "Multipath TCP").
pub const DEFAULT_MPTCP: bool = true;
/// Longest a request waits for the fleet's Redis (a begin, a read) before it is served from
/// what this node knows; Redis then counts as unreachable until it answers a background call.
pub const DEFAULT_REDIS_WAIT: Duration = Duration::from_millis(50);
/// No admin listener unless one is asked for: `/metrics` tells traffic volumes and client
/// counts, so it is exposed only where the operator chose (docs/SECURITY.md).
pub const DEFAULT_ADMIN_LISTEN: Option<SocketAddr> = None;
/// No access log unless asked for: at tens of thousands of responses a second it is the
/// largest thing roam would write.
pub const DEFAULT_ACCESS_LOG: &str = "off";
pub const DEFAULT_MAX_REQUEST_LINE: usize = 8 * 1024;
pub const DEFAULT_MAX_HEAD: usize = 16 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 64;

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Where the access log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessLogTarget {
    Off,
    Stderr,
    /// Appended to this file (created mode 0640), reopened on SIGHUP.
    File(PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(AccessLogTarget::Off),
            "stderr" => Ok(AccessLogTarget::Stderr),
            "" => Err("expected off, stderr or a file path".into()),
            path => Ok(AccessLogTarget::File(PathBuf::from(path))),
        }
    }
}

/// Where session records live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// In the state directory, on disk, so a restart or a crash keeps every client's place.
    Disk,
    /// In memory only: lost when the process ends (tests, benchmarks).
    Memory,
    /// In Redis, shared by every node of a fleet: any node resumes any client.
    Redis(RedisTarget),
}

impl StoreKind {
    /// Parses `--store`: `disk`, `memory`, or a Redis URL.
    pub fn parse(s: &str) -> Result<StoreKind, String> {
        match s {
            "disk" => Ok(StoreKind::Disk),
            "memory" => Ok(StoreKind::Memory),
            _ => match RedisTarget::parse(s) {
                Some(t) => t.map(StoreKind::Redis),
                None => Err(format!("expected disk, memory, or Redis: {REDIS_FORMS}")),
            },
        }
    }
}

/// What counts as delivered when a session's offset advances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accounting {
    /// Bytes the client's TCP acknowledged (`TCP_INFO`): no gap after a vanished path.
    Acknowledged,
    /// Bytes handed to the kernel, as the seed prototype counted. Resumes past data still in
    /// flight; kept only to measure what acknowledged accounting costs and prevents.
    Written,
}

/// The server's validated settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub root: PathBuf,
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub backlog: u32,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_stall_timeout: Duration,
    pub tcp_user_timeout: Duration,
    pub tcp_keepalive: Duration,
    pub notsent_lowat: u32,
    pub session_ttl: Duration,
    pub max_sessions: usize,
    pub shutdown_timeout: Duration,
    pub progress_interval: u64,
    pub accounting: Accounting,
    pub file_revalidate: Duration,
    pub file_cache_entries: usize,
    pub limits: Limits,
    pub allow_dotfiles: bool,
    /// Whether a download request without `Range` resumes from the session (the seed's
    /// protocol). Off: such a request gets the whole file with `200`, like any HTTP server, and
    /// the session restarts from 0; only `Range` resumes. For deployments behind proxies that
    /// strip `Range` or buffer whole responses, and for download managers (aria2c) that do not
    /// expect a `206` they did not ask for.
    pub implicit_resume: bool,
    /// Per-address mint limit: (IDs per second, burst). `None`: unlimited (the default, since
    /// carriers put many phones behind one address).
    pub mint_rate: Option<(f64, u32)>,
    /// Secret that keys client IDs; with the disk store, generated once into the state
    /// directory when absent; otherwise random per process.
    pub id_secret: Option<Vec<u8>>,
    pub store: StoreKind,
    pub state_dir: PathBuf,
    pub flush_interval: Duration,
    /// Certificate chain and key: the listener speaks HTTPS only. `None`: plain HTTP.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Listen with Multipath TCP where the kernel has it (TCP otherwise).
    pub mptcp: bool,
    /// Longest a request waits for the fleet's Redis.
    pub redis_wait: Duration,
    /// The admin listener's address (`/metrics`, `/healthz`, `/readyz`); none by default.
    pub admin_listen: Option<SocketAddr>,
    pub access_log: AccessLogTarget,
    /// The format of the logs and of the access log.
    pub log_format: LogFormat,
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Defaults for everything but where to serve from and listen on (used by tests and embedders).
    pub fn new(root: PathBuf, listen: SocketAddr) -> Config {
        Config {
            root,
            listen,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            backlog: DEFAULT_BACKLOG,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            write_stall_timeout: DEFAULT_WRITE_STALL_TIMEOUT,
            tcp_user_timeout: DEFAULT_TCP_USER_TIMEOUT,
            tcp_keepalive: DEFAULT_TCP_KEEPALIVE,
            notsent_lowat: DEFAULT_NOTSENT_LOWAT,
            session_ttl: DEFAULT_SESSION_TTL,
            max_sessions: DEFAULT_MAX_SESSIONS,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            accounting: Accounting::Acknowledged,
            file_revalidate: DEFAULT_FILE_REVALIDATE,
            file_cache_entries: DEFAULT_FILE_CACHE_ENTRIES,
            limits: Limits {
                max_request_line: DEFAULT_MAX_REQUEST_LINE,
                max_head: DEFAULT_MAX_HEAD,
                max_headers: DEFAULT_MAX_HEADERS,
            },
            allow_dotfiles: false,
            implicit_resume: true,
            mint_rate: None,
            id_secret: None,
            store: StoreKind::Disk,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            flush_interval: DEFAULT_FLUSH_INTERVAL,
            tls: None,
            mptcp: DEFAULT_MPTCP,
            redis_wait: DEFAULT_REDIS_WAIT,
            admin_listen: DEFAULT_ADMIN_LISTEN,
            access_log: AccessLogTarget::Off,
            log_format: LogFormat::Pretty,
        }
    }

    /// Checks the relations between settings.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let bad = |m: &str| Err(ConfigError(m.to_owned()));
        if self.max_connections == 0 {
            return bad("--max-connections must be at least 1");
        }
        if self.backlog == 0 {
            return bad("--backlog must be at least 1");
        }
        if self.limits.max_headers == 0 || self.limits.max_headers > MAX_HEADERS_CEILING {
            return Err(ConfigError(format!(
                "--max-headers must be between 1 and {MAX_HEADERS_CEILING}"
            )));
        }
        if self.limits.max_request_line < 16 {
            return bad("--max-request-line must be at least 16 bytes");
        }
        if self.limits.max_head < self.limits.max_request_line {
            return bad("--max-head must be at least --max-request-line");
        }
        for (name, d) in [
            ("--header-timeout", self.header_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--write-stall-timeout", self.write_stall_timeout),
            ("--tcp-user-timeout", self.tcp_user_timeout),
            ("--tcp-keepalive", self.tcp_keepalive),
        ] {
            if d.is_zero() {
                return Err(ConfigError(format!("{name} must be greater than zero")));
            }
        }
        // A session must outlive the quiet stretches of its own download (a stalled write, a
        // takeover wait, a phone between networks) or it would be swept from under its owner.
        if self.session_ttl < Duration::from_secs(60) {
            return bad("--session-ttl must be at least 1 minute");
        }
        if self.max_sessions == 0 {
            return bad("--max-sessions must be at least 1");
        }
        if self.progress_interval == 0 {
            return bad("--progress-interval must be at least 1 byte");
        }
        if self
            .mint_rate
            .is_some_and(|(rate, burst)| !(rate > 0.0 && rate.is_finite()) || burst == 0)
        {
            return bad("--mint-rate must be a positive rate with a burst of at least 1");
        }
        if self.flush_interval < Duration::from_millis(1)
            || self.flush_interval > Duration::from_secs(10)
        {
            return bad("--flush-interval must be between 1ms and 10s");
        }
        if let StoreKind::Redis(target) = &self.store {
            // Every node must accept every node's IDs, and keep accepting them whatever
            // happens to Redis (docs/DEPLOYMENT.md, "The fleet's secret").
            if self.id_secret.is_none() {
                return Err(ConfigError(format!(
                    "--store {target} needs --id-secret-file: every node of a fleet must use the \
                     same secret for client IDs (make one with `head -c 32 /dev/urandom > \
                     roam-id-secret` and give each node a copy; docs/DEPLOYMENT.md)"
                )));
            }
            if self.redis_wait < Duration::from_millis(1)
                || self.redis_wait > Duration::from_secs(10)
            {
                return bad("--redis-wait must be between 1ms and 10s");
            }
        }
        if self
            .admin_listen
            .is_some_and(|a| a == self.listen && a.port() != 0)
        {
            return bad("--admin-listen must differ from --listen");
        }
        if self.id_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return bad("the ID secret must be at least 16 bytes");
        }
        Ok(self)
    }
}
