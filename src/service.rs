//! The state every connection shares: configuration, the served root, the ID authority, the
//! progress store and the registry of session owners. One `Arc<Service>` per server.

use crate::config::Config;
use crate::digest::Digests;
use crate::files::Root;
use crate::filetable::FileTable;
use crate::id::IdAuthority;
use crate::limit::MintLimiter;
use crate::store::{MemoryStore, ProgressStore};
use crate::takeover::Owners;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Shared server state. Cheap to reach from any task through an `Arc`.
#[derive(Debug)]
pub struct Service {
    pub config: Config,
    pub root: Root,
    pub ids: IdAuthority,
    pub store: Arc<dyn ProgressStore>,
    pub files: FileTable,
    pub owners: Arc<Owners>,
    pub digests: Arc<Digests>,
    /// Present when `--mint-rate` is set.
    pub mint_limiter: Option<MintLimiter>,
    connection_ids: AtomicU64,
}

impl std::fmt::Debug for dyn ProgressStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProgressStore {{ len: {} }}", self.len())
    }
}

impl Service {
    /// A service with the in-memory store sized from `config`.
    pub fn new(config: Config) -> io::Result<Arc<Service>> {
        let store = Arc::new(MemoryStore::new(config.max_sessions, config.session_ttl));
        Self::with_store(config, store)
    }

    /// A service over any progress backend.
    pub fn with_store(config: Config, store: Arc<dyn ProgressStore>) -> io::Result<Arc<Service>> {
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
        Ok(Arc::new(Service {
            config,
            root,
            ids,
            store,
            files,
            owners: Arc::new(Owners::default()),
            digests: Arc::new(Digests::default()),
            mint_limiter,
            connection_ids: AtomicU64::new(0),
        }))
    }

    /// A fresh connection number.
    pub fn next_connection_id(&self) -> u64 {
        self.connection_ids.fetch_add(1, Ordering::Relaxed)
    }
}
