//! The state every connection shares: configuration, the served folder and its file table,
//! digests, the ID authority, the optional mint limiter and the sessions. One `Arc<Service>`
//! per server; the request path reaches each part through a method.

use crate::files::{Digests, FileTable, OpenError, OpenFile, Root};
use crate::http::target::RelPath;
use crate::id::limit::MintLimiter;
use crate::id::IdAuthority;
use crate::ops::health::Readiness;
use crate::ops::metrics::Metrics;
use crate::ops::Ops;
use crate::session::clock::SessionClock;
use crate::session::{FileKey, SessionKey, Sessions, Store};
use crate::settings::Config;
use crate::tls::Tls;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Shared server state.
#[derive(Debug)]
pub struct Service {
    config: Config,
    root: Arc<Root>,
    ids: IdAuthority,
    files: FileTable,
    digests: Arc<Digests>,
    sessions: Sessions,
    /// Present when `--mint-rate` is set.
    mint_limiter: Option<MintLimiter>,
    connection_ids: AtomicU64,
    /// Present when the listener speaks HTTPS.
    tls: Option<Tls>,
    ops: Ops,
}

impl Service {
    /// A service keeping sessions in memory, sized from `config`.
    pub fn new(config: Config) -> io::Result<Arc<Service>> {
        let store = Store::memory(
            config.max_sessions,
            config.session_ttl,
            Arc::new(SessionClock::default()),
        );
        Self::with_sessions(config, Sessions::new(store))
    }

    /// A service over any session store stack, with metrics and no access log.
    pub fn with_sessions(config: Config, sessions: Sessions) -> io::Result<Arc<Service>> {
        let ops = Ops::new(sessions.metrics().clone());
        Self::with_ops(config, sessions, ops)
    }

    /// A service over any session store stack, with `ops` (whose metrics should be the ones
    /// `sessions` counts into).
    pub fn with_ops(config: Config, sessions: Sessions, ops: Ops) -> io::Result<Arc<Service>> {
        let root = Root::open(&config.root).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot serve {}: {e}", config.root.display()),
            )
        })?;
        let ids = match &config.id_secret {
            Some(secret) => IdAuthority::new(secret),
            None => IdAuthority::random(),
        };
        // Cached files hold descriptors: never more than a quarter of what the process may open.
        let fd_share = crate::sys::fd_limit()
            .map_or(usize::MAX, |n| usize::try_from(n / 4).unwrap_or(usize::MAX));
        let files = FileTable::new(
            config.file_revalidate,
            config.file_cache_entries.min(fd_share),
        );
        let mint_limiter = config
            .mint_rate
            .map(|(rate, burst)| MintLimiter::new(rate, burst));
        let tls = match &config.tls {
            Some(files) => Some(Tls::load(files).map_err(io::Error::other)?),
            None => None,
        };
        Ok(Arc::new(Service {
            config,
            root: Arc::new(root),
            ids,
            files,
            digests: Arc::new(Digests::default()),
            sessions,
            mint_limiter,
            connection_ids: AtomicU64::new(0),
            tls,
            ops,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The TLS side, when the listener speaks HTTPS.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    /// The served folder.
    pub fn root(&self) -> &Arc<Root> {
        &self.root
    }

    pub fn ids(&self) -> &IdAuthority {
        &self.ids
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The file table (tests and the sweeper look inside).
    pub fn files(&self) -> &FileTable {
        &self.files
    }

    pub fn digests(&self) -> &Arc<Digests> {
        &self.digests
    }

    /// Whether `peer` may mint an ID now (always, without `--mint-rate`).
    pub fn allow_mint(&self, peer: IpAddr) -> bool {
        self.mint_limiter
            .as_ref()
            .is_none_or(|limiter| limiter.allow(peer))
    }

    /// Opens `rel` through the file table, with what is known of its digest (starting the
    /// computation if nothing is), and its session key.
    pub fn open(&self, rel: &RelPath) -> Result<(OpenFile, FileKey), OpenError> {
        let (mut file, key) = self.files.open(&self.root, rel)?;
        file.digest = self.digests.get_or_start(&file, rel);
        Ok((file, key))
    }

    /// The session key of (`id`, `rel`), if `id` is one of this server's IDs.
    pub fn session_key(&self, id: &str, rel: &Path) -> Option<SessionKey> {
        let client = self.ids.verify(id).ok()?;
        Some(SessionKey::new(client, FileKey::of_path(rel)))
    }

    /// Metrics, the access log, the reload broadcast, health.
    pub fn ops(&self) -> &Ops {
        &self.ops
    }

    pub fn metrics(&self) -> &Metrics {
        &self.ops.metrics
    }

    /// What `/readyz` answers: draining after a shutdown signal, or a store that cannot be
    /// reached, make the server unready.
    pub fn readiness(&self) -> Readiness {
        if self.ops.health.draining() {
            return Readiness::Draining;
        }
        match self.sessions.store().health() {
            Ok(()) => Readiness::Ready,
            Err(e) => Readiness::StoreUnavailable(e.0),
        }
    }

    /// A fresh connection number.
    pub fn next_connection_id(&self) -> u64 {
        self.connection_ids.fetch_add(1, Ordering::Relaxed)
    }
}
