//! Command-line interface: clap definitions with an environment variable for every flag, and
//! their conversion into a validated [`Config`].

use super::config::{self, AccessLogTarget, Accounting, Config, ConfigError, LogFormat, StoreKind};
use clap::{Args, Parser, Subcommand};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// roam: an HTTP/1.1 file server for devices whose connections break.
#[derive(Debug, Parser)]
#[command(name = "roam", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a folder: `GET /` mints a client ID, `GET /{id}/{path}` resumes that client's
    /// download of `path` exactly where its TCP connection left off.
    Serve(Box<ServeArgs>),
    /// Download a file and finish it however often the connection breaks.
    ///
    /// URL is a roam server plus a file path (http://host:8080/video.mp4: the client mints its
    /// own ID), a full http://host:8080/{id}/{path} URL, or any URL on a server that supports
    /// standard byte ranges. Bytes go to FILE.part until the download is complete and verified
    /// against the server's Repr-Digest; running the same command again resumes.
    ///
    /// Exit codes: 0 done, 1 local error (disk, state file), 2 usage, 3 the server refused
    /// (4xx, or an answer it cannot use such as a redirect), 4 gave up (retries or time limit),
    /// 5 integrity check failed (FILE.part kept).
    Get(GetArgs),
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to download (an http:// or https:// URL).
    pub url: String,
    /// Where to put the finished file (default: the URL's last path segment).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// No byte for this long counts as a broken connection: reconnect.
    #[arg(long, env = "ROAM_GET_STALL_TIMEOUT", value_parser = duration, default_value = "10s")]
    pub stall_timeout: Duration,
    /// Give up after this many retries in a row that received nothing (a retry that receives
    /// bytes starts the count again).
    #[arg(long, env = "ROAM_GET_RETRIES", default_value_t = 20)]
    pub retries: u32,
    /// Longest pause between attempts (pauses grow exponentially, with jitter).
    #[arg(long, env = "ROAM_GET_MAX_RETRY_DELAY", value_parser = duration, default_value = "5s")]
    pub max_retry_delay: Duration,
    /// Give up after this long in total (0 for never).
    #[arg(long, env = "ROAM_GET_MAX_TIME", value_parser = duration, default_value = "1h")]
    pub max_time: Duration,
    /// Do not mint a roam client ID even if the server is roam: plain Range requests only.
    #[arg(long)]
    pub plain: bool,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
    /// For https:// URLs: trust the certificates in this PEM file (a private CA) instead of
    /// the system's root certificates.
    #[arg(long, env = "ROAM_GET_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Use Multipath TCP where the kernel has it: with a server that speaks it, a change of
    /// network keeps the connection (no reconnect). Otherwise the kernel falls back to TCP.
    #[arg(long, env = "ROAM_GET_MPTCP", value_enum, default_value = "on")]
    pub mptcp: Switch,
}

impl GetArgs {
    pub fn options(&self) -> crate::client::GetOptions {
        crate::client::GetOptions {
            url: self.url.clone(),
            output: self.output.clone(),
            stall_timeout: self.stall_timeout,
            retries: self.retries,
            max_time: self.max_time,
            max_retry_delay: self.max_retry_delay,
            plain: self.plain,
            cacert: self.cacert.clone(),
            mptcp: self.mptcp.on(),
        }
    }
}

/// The shape of the async runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeMode {
    MultiThread,
    PerCore,
}

/// A feature switch on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn on(self) -> bool {
        self == Switch::On
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Folder to serve.
    #[arg(long, env = "ROAM_ROOT", default_value = config::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Address to listen on, HOST:PORT (port 0 picks a free port).
    #[arg(long, env = "ROAM_LISTEN", default_value = config::DEFAULT_LISTEN)]
    pub listen: String,
    /// Runtime worker threads (0: one per CPU the process may run on).
    #[arg(long, env = "ROAM_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// How the workers run: one work-stealing runtime, or one single-threaded runtime per worker
    /// each with its own SO_REUSEPORT listener (see docs/benchmarks.md for the measurement).
    #[arg(long, env = "ROAM_RUNTIME", value_enum, default_value = "multi-thread")]
    pub runtime: RuntimeMode,
    /// Log format, of the logs and of the access log (the level comes from RUST_LOG, default
    /// info).
    #[arg(long, env = "ROAM_LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// Most connections served at once; more wait in the listen backlog.
    #[arg(long, env = "ROAM_MAX_CONNECTIONS", default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Listen backlog (capped by net.core.somaxconn).
    #[arg(long, env = "ROAM_BACKLOG", default_value_t = config::DEFAULT_BACKLOG)]
    pub backlog: u32,
    /// Time to receive a whole request head once it has started (e.g. 10s).
    #[arg(long, env = "ROAM_HEADER_TIMEOUT", value_parser = duration, default_value = "10s")]
    pub header_timeout: Duration,
    /// Time an idle keep-alive connection waits for its next request.
    #[arg(long, env = "ROAM_IDLE_TIMEOUT", value_parser = duration, default_value = "60s")]
    pub idle_timeout: Duration,
    /// Time a response may make no progress before the peer is considered gone.
    #[arg(long, env = "ROAM_WRITE_STALL_TIMEOUT", value_parser = duration, default_value = "30s")]
    pub write_stall_timeout: Duration,
    /// TCP_USER_TIMEOUT: how long the kernel retransmits unacknowledged data before giving up.
    #[arg(long, env = "ROAM_TCP_USER_TIMEOUT", value_parser = duration, default_value = "45s")]
    pub tcp_user_timeout: Duration,
    /// Idle time before TCP keepalive probes start.
    #[arg(long, env = "ROAM_TCP_KEEPALIVE", value_parser = duration, default_value = "30s")]
    pub tcp_keepalive: Duration,
    /// TCP_NOTSENT_LOWAT in bytes, set on a connection from its first body over 1 MiB: how much
    /// unsent data may wait in the socket, which bounds the gap between bytes written and bytes
    /// acknowledged (0: never set).
    #[arg(long, env = "ROAM_NOTSENT_LOWAT", default_value_t = config::DEFAULT_NOTSENT_LOWAT)]
    pub notsent_lowat: u32,
    /// Forget download sessions idle for longer than this.
    #[arg(long, env = "ROAM_SESSION_TTL", value_parser = duration, default_value = "24h")]
    pub session_ttl: Duration,
    /// Most (client, file) sessions tracked at once; past it new sessions get 503.
    #[arg(long, env = "ROAM_MAX_SESSIONS", default_value_t = config::DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
    /// After SIGINT/SIGTERM, how long connections get to record progress and close.
    #[arg(long, env = "ROAM_SHUTDOWN_TIMEOUT", value_parser = duration, default_value = "10s")]
    pub shutdown_timeout: Duration,
    /// Record confirmed progress at least every this many bytes sent.
    #[arg(long, env = "ROAM_PROGRESS_INTERVAL", default_value_t = config::DEFAULT_PROGRESS_INTERVAL)]
    pub progress_interval: u64,
    /// What advances a session's offset: bytes the client acknowledged, or bytes written (the
    /// seed prototype's behaviour, which skips data lost in flight; for measurement only).
    #[arg(
        long,
        env = "ROAM_ACCOUNTING",
        value_enum,
        default_value = "acknowledged"
    )]
    pub accounting: Accounting,
    /// Re-resolve a cached file's path after this long: how soon a replaced, renamed or deleted
    /// file is noticed (a large file rewritten in place is noticed at once).
    #[arg(long, env = "ROAM_FILE_REVALIDATE", value_parser = duration, default_value = "1s")]
    pub file_revalidate: Duration,
    /// Open files kept in the file table (0 disables it).
    #[arg(long, env = "ROAM_FILE_CACHE_ENTRIES", default_value_t = config::DEFAULT_FILE_CACHE_ENTRIES)]
    pub file_cache_entries: usize,
    /// Longest request line, in bytes (414 beyond).
    #[arg(long, env = "ROAM_MAX_REQUEST_LINE", default_value_t = config::DEFAULT_MAX_REQUEST_LINE)]
    pub max_request_line: usize,
    /// Largest request head, in bytes (431 beyond).
    #[arg(long, env = "ROAM_MAX_HEAD", default_value_t = config::DEFAULT_MAX_HEAD)]
    pub max_head: usize,
    /// Most request header fields (431 beyond).
    #[arg(long, env = "ROAM_MAX_HEADERS", default_value_t = config::DEFAULT_MAX_HEADERS)]
    pub max_headers: usize,
    /// Serve files and folders whose names start with a dot (refused by default).
    #[arg(long, env = "ROAM_ALLOW_DOTFILES")]
    pub allow_dotfiles: bool,
    /// Answer download requests without Range like any HTTP server (200, the whole file, the
    /// session restarts) instead of resuming them from the session. For servers behind proxies
    /// that strip Range or buffer responses, and for download managers such as aria2c.
    #[arg(long, env = "ROAM_NO_IMPLICIT_RESUME")]
    pub no_implicit_resume: bool,
    /// Limit minting IDs per source address (IPv6 per /64), as RATE/s or RATE/s,BURST (e.g.
    /// 10/s,50). Off by default: carriers put many phones behind one address.
    #[arg(long, env = "ROAM_MINT_RATE", value_parser = mint_rate)]
    pub mint_rate: Option<(f64, u32)>,
    /// File holding the secret that keys client IDs (at least 16 bytes). Servers sharing it
    /// accept each other's IDs. Without it: with the disk store, a secret generated once into
    /// the state directory (IDs survive restarts); with the memory store, a random one (IDs are
    /// valid until the process exits).
    #[arg(long, env = "ROAM_ID_SECRET_FILE")]
    pub id_secret_file: Option<PathBuf>,
    /// Where session records live: disk (in --state-dir: a restart or crash keeps every
    /// client's place), memory (lost when the process ends), or Redis shared by a fleet of
    /// nodes, any of which resumes any client: redis://[USER:PASSWORD@]HOST:PORT[/DB],
    /// rediss://… (TLS), redis+cluster://HOST:PORT,HOST:PORT,… (a Redis Cluster). A fleet
    /// needs --id-secret-file (docs/DEPLOYMENT.md).
    #[arg(long, env = "ROAM_STORE", value_parser = StoreKind::parse, default_value = "disk")]
    pub store: StoreKind,
    /// Directory for durable sessions, the ID secret and stored digests (created mode 0700).
    #[arg(long, env = "ROAM_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Longest time a session change waits in memory before it is written (one sync per batch;
    /// new epochs and ends are written sooner).
    #[arg(long, env = "ROAM_FLUSH_INTERVAL", value_parser = duration, default_value = "50ms")]
    pub flush_interval: Duration,
    /// Certificate chain (PEM, leaf first): with --tls-key, the listener speaks HTTPS only
    /// (TLS 1.2 and 1.3). SIGHUP reloads both files.
    #[arg(long, env = "ROAM_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "ROAM_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Accept Multipath TCP (a client's connection survives a switch of network); clients that
    /// do not use it are served over TCP as before. On a kernel without it: TCP, logged.
    #[arg(long, env = "ROAM_MPTCP", value_enum, default_value = "on")]
    pub mptcp: Switch,
    /// With a Redis store: longest a request waits for Redis (a begin, a read) before it is
    /// served from what this node knows; Redis then counts as unreachable until it answers.
    #[arg(long, env = "ROAM_REDIS_WAIT", value_parser = duration, default_value = "50ms")]
    pub redis_wait: Duration,
    /// A second listener, HOST:PORT, serving only /metrics (Prometheus), /healthz and /readyz.
    /// Off unless given: bind it to loopback or a management network (docs/SECURITY.md).
    #[arg(long, env = "ROAM_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// One line per response: off, stderr, or a file (appended, reopened on SIGHUP); JSON with
    /// --log-format json, logfmt otherwise.
    #[arg(long, env = "ROAM_ACCESS_LOG", default_value = config::DEFAULT_ACCESS_LOG)]
    pub access_log: AccessLogTarget,
}

fn mint_rate(s: &str) -> Result<(f64, u32), String> {
    let (rate, burst) = match s.split_once(',') {
        Some((r, b)) => (r, Some(b)),
        None => (s, None),
    };
    let rate: f64 = rate
        .trim()
        .strip_suffix("/s")
        .ok_or("expected RATE/s or RATE/s,BURST, e.g. 10/s,50")?
        .parse()
        .map_err(|_| "the rate must be a number, e.g. 10/s")?;
    let burst = match burst {
        Some(b) => b
            .trim()
            .parse()
            .map_err(|_| "the burst must be a whole number")?,
        None => rate.ceil().max(1.0) as u32,
    };
    Ok((rate, burst))
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 10s, 5m, 24h)"))
}

impl ServeArgs {
    /// Resolves the listen address, reads the secret and validates everything.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let listen = resolve("--listen", &self.listen)?;
        let admin_listen = match &self.admin_listen {
            Some(a) => Some(resolve("--admin-listen", a)?),
            None => None,
        };
        let id_secret = match &self.id_secret_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                ConfigError(format!(
                    "cannot read --id-secret-file {}: {e}",
                    path.display()
                ))
            })?),
            None => None,
        };
        let mut config = Config::new(self.root, listen);
        config.max_connections = self.max_connections;
        config.backlog = self.backlog;
        config.header_timeout = self.header_timeout;
        config.idle_timeout = self.idle_timeout;
        config.write_stall_timeout = self.write_stall_timeout;
        config.tcp_user_timeout = self.tcp_user_timeout;
        config.tcp_keepalive = self.tcp_keepalive;
        config.notsent_lowat = self.notsent_lowat;
        config.session_ttl = self.session_ttl;
        config.max_sessions = self.max_sessions;
        config.shutdown_timeout = self.shutdown_timeout;
        config.progress_interval = self.progress_interval;
        config.accounting = self.accounting;
        config.file_revalidate = self.file_revalidate;
        config.file_cache_entries = self.file_cache_entries;
        config.limits.max_request_line = self.max_request_line;
        config.limits.max_head = self.max_head;
        config.limits.max_headers = self.max_headers;
        config.allow_dotfiles = self.allow_dotfiles;
        config.implicit_resume = !self.no_implicit_resume;
        config.mint_rate = self.mint_rate;
        config.id_secret = id_secret;
        config.store = self.store;
        config.state_dir = self.state_dir;
        config.flush_interval = self.flush_interval;
        config.mptcp = self.mptcp.on();
        config.tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsFiles { cert, key }),
            _ => None,
        };
        config.redis_wait = self.redis_wait;
        config.admin_listen = admin_listen;
        config.access_log = self.access_log;
        config.log_format = self.log_format;
        config.validate()
    }
}

fn resolve(flag: &str, listen: &str) -> Result<SocketAddr, ConfigError> {
    listen
        .to_socket_addrs()
        .map_err(|e| ConfigError(format!("{flag} {listen:?}: {e} (expected HOST:PORT)")))?
        .next()
        .ok_or_else(|| ConfigError(format!("{flag} {listen:?} resolves to no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let cli = Cli::try_parse_from(["roam", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let config = args.into_config().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        // The textual defaults in the clap attributes must agree with the named constants.
        let reference = Config::new(config.root.clone(), config.listen);
        assert_eq!(config.header_timeout, reference.header_timeout);
        assert_eq!(config.idle_timeout, reference.idle_timeout);
        assert_eq!(config.write_stall_timeout, reference.write_stall_timeout);
        assert_eq!(config.tcp_user_timeout, reference.tcp_user_timeout);
        assert_eq!(config.tcp_keepalive, reference.tcp_keepalive);
        assert_eq!(config.session_ttl, reference.session_ttl);
        assert_eq!(config.shutdown_timeout, reference.shutdown_timeout);
        assert_eq!(config.accounting, reference.accounting);
        assert_eq!(config.file_revalidate, reference.file_revalidate);
        assert_eq!(config.store, reference.store);
        assert_eq!(config.state_dir, reference.state_dir);
        assert_eq!(config.flush_interval, reference.flush_interval);
        assert_eq!(config.redis_wait, reference.redis_wait);
        assert_eq!(config.admin_listen, reference.admin_listen);
        assert_eq!(config.access_log, reference.access_log);
        assert_eq!(config.log_format, reference.log_format);
    }

    fn serve(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["roam", "serve"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        args.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn store_forms_parse_and_hide_passwords() {
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), [7u8; 32]).unwrap();
        let s = secret.path().to_str().unwrap();
        let c = serve(&[
            "--store",
            "redis://:hunter2@10.0.0.5:6380/3",
            "--id-secret-file",
            s,
        ])
        .unwrap();
        let StoreKind::Redis(t) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert!(!t.is_cluster() && !t.tls());
        assert_eq!(t.to_string(), "redis://:***@10.0.0.5:6380/3");
        let c = serve(&[
            "--store",
            "rediss+cluster://u:pw@h1:7000,h2:7001,h3:7002",
            "--id-secret-file",
            s,
        ])
        .unwrap();
        let StoreKind::Redis(t) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert!(t.is_cluster() && t.tls());
        assert_eq!(
            t.to_string(),
            "rediss+cluster://u:***@h1:7000,h2:7001,h3:7002"
        );
        assert_eq!(
            serve(&["--store", "memory"]).unwrap().store,
            StoreKind::Memory
        );
        // A fleet without a shared secret would refuse every other node's IDs.
        let e = serve(&["--store", "redis://127.0.0.1:6379"]).unwrap_err();
        assert!(e.contains("--id-secret-file"), "{e}");
        for bad in [
            "redis+cluster://h1:1,/x",
            "redis+cluster://h1",
            "mongodb://h",
            "redis://",
        ] {
            let e = serve(&["--store", bad, "--id-secret-file", s]).unwrap_err();
            assert!(
                e.contains("--store") || e.contains("expected"),
                "{bad}: {e}"
            );
            assert!(!e.contains("hunter2"));
        }
        let e = serve(&[
            "--store",
            "redis://:hunter2@h:1",
            "--id-secret-file",
            s,
            "--redis-wait",
            "0s",
        ])
        .unwrap_err();
        assert!(e.contains("--redis-wait") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn access_log_and_admin_listener_parse() {
        let cli = Cli::try_parse_from([
            "roam",
            "serve",
            "--access-log",
            "/var/log/roam/access.log",
            "--admin-listen",
            "127.0.0.1:9090",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let config = args.into_config().unwrap();
        assert_eq!(
            config.access_log,
            AccessLogTarget::File("/var/log/roam/access.log".into())
        );
        assert_eq!(config.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        let cli =
            Cli::try_parse_from(["roam", "serve", "--admin-listen", "127.0.0.1:8080"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let err = args.into_config().unwrap_err().to_string();
        assert!(err.contains("--admin-listen"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_name() {
        let cli = Cli::try_parse_from(["roam", "serve", "--max-headers", "0"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert!(args
            .into_config()
            .unwrap_err()
            .to_string()
            .contains("--max-headers"));
        assert!(Cli::try_parse_from(["roam", "serve", "--idle-timeout", "soon"]).is_err());
        let cli = Cli::try_parse_from(["roam", "serve", "--listen", "nonsense"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert!(args
            .into_config()
            .unwrap_err()
            .to_string()
            .contains("--listen"));
    }
}
