//! The `roam` binary: parses the command line, sets up logging, binds the listener, wires
//! SIGINT/SIGTERM to shutdown and runs the server.

use anyhow::Context;
use clap::Parser;
use roam::ops::access_log::AccessLog;
use roam::ops::notify;
use roam::ops::Ops;
use roam::service::Service;
use roam::session::clock::SessionClock;
use roam::session::disk::{self, DiskBackend};
use roam::session::redis::RedisBackend;
use roam::session::{Sessions, Store};
use roam::settings::cli::{Cli, Command, GetArgs, RuntimeMode, ServeArgs};
use roam::settings::{Config, LogFormat, StoreKind};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Get(args) => return get(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roam: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let log_format = args.log_format;
    let mode = args.runtime;
    let workers = match args.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut config = args.into_config()?;
    init_tracing(log_format);
    if let Err(e) = roam::sys::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let prepared = prepare_sessions(&mut config)?;
    let metrics = prepared.sessions.metrics().clone();
    let ops = Ops {
        access_log: AccessLog::open(
            &config.access_log,
            config.log_format,
            metrics.access_log_dropped(),
        )?,
        ..Ops::new(metrics)
    };
    let admin = match config.admin_listen {
        Some(addr) => Some(
            // Plain TCP: scrapers and probes on a management network gain nothing from MPTCP.
            roam::server::bind_std(addr, ADMIN_BACKLOG, false, false)
                .with_context(|| format!("cannot listen on --admin-listen {addr}"))?
                .0,
        ),
        None => None,
    };
    let svc = Service::with_ops(config, prepared.sessions.clone(), ops)?;
    let ops_thread = OpsThread::start(&svc, admin)?;
    let result = match mode {
        RuntimeMode::MultiThread => serve_multi_thread(svc, &ops_thread, prepared, workers),
        RuntimeMode::PerCore => serve_per_core(svc.clone(), &ops_thread, prepared, workers),
    };
    ops_thread.stop();
    result
}

/// The admin listener's backlog: scrapers and probes, not clients.
const ADMIN_BACKLOG: u32 = 128;

/// A thread of its own for what operators reach: the admin listener (answered even while the
/// workers are saturated or draining) and the SIGHUP reload broadcast. Started before the
/// listeners are announced, so a SIGHUP from then on reloads instead of killing the process.
struct OpsThread {
    admin: Option<SocketAddr>,
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
    svc: Arc<Service>,
}

impl OpsThread {
    fn start(svc: &Arc<Service>, admin: Option<std::net::TcpListener>) -> anyhow::Result<Self> {
        let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
        let stop = CancellationToken::new();
        let (started_tx, started) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (svc2, stop2) = (Arc::clone(svc), stop.clone());
        let thread = std::thread::Builder::new()
            .name("roam-ops".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(e).context("cannot start the ops runtime"));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let reload = svc2.ops().reload.clone();
                    let mut hangup = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::hangup(),
                    ) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = started_tx.send(Err(e).context("cannot listen for SIGHUP"));
                            return;
                        }
                    };
                    // One SIGHUP path for everything that reloads.
                    let log = svc2.ops().access_log.clone();
                    reload.on_reload(move || log.reopen());
                    let tls_svc = Arc::clone(&svc2);
                    reload.on_reload(move || reload_tls(&tls_svc));
                    let admin = match admin.map(tokio::net::TcpListener::from_std).transpose() {
                        Ok(a) => a,
                        Err(e) => {
                            let _ = started_tx.send(Err(e).context("cannot serve --admin-listen"));
                            return;
                        }
                    };
                    if let Some(listener) = admin {
                        tokio::spawn(roam::ops::admin::run(
                            listener,
                            Arc::clone(&svc2),
                            stop2.clone(),
                        ));
                    }
                    let _ = started_tx.send(Ok(()));
                    loop {
                        tokio::select! {
                            Some(()) = hangup.recv() => {
                                tracing::info!("SIGHUP: reloading");
                                reload.fire();
                            }
                            () = stop2.cancelled() => break,
                        }
                    }
                    // Let the admin listener close its connections.
                    tokio::task::yield_now().await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .context("cannot start the ops thread")?;
        started
            .recv()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the ops thread stopped at start")))?;
        Ok(OpsThread {
            admin: admin_addr,
            stop,
            thread,
            svc: Arc::clone(svc),
        })
    }

    /// After the server stopped: writes the rest of the access log, then closes the admin
    /// listener (it answered `/readyz` with 503 throughout the drain).
    fn stop(self) {
        self.svc.ops().access_log.close();
        self.stop.cancel();
        let _ = self.thread.join();
    }
}

/// The session store, ready before the listener exists: with the disk store, the state
/// directory is claimed (created, checked, locked) and the ID secret read or made, so a bad
/// directory stops the start with one line naming it. The store itself opens in the background.
struct Prepared {
    sessions: Sessions,
    disk: Option<DiskBackend>,
    /// Set (with the reason) when the store cannot be opened: the server stops.
    failed: Arc<std::sync::Mutex<Option<String>>>,
    fatal: CancellationToken,
}

fn prepare_sessions(config: &mut Config) -> anyhow::Result<Prepared> {
    let (sessions, disk) = match config.store.clone() {
        StoreKind::Memory => {
            let store = Store::memory(
                config.max_sessions,
                config.session_ttl,
                Arc::new(SessionClock::default()),
            );
            (Sessions::new(store), None)
        }
        StoreKind::Disk => {
            let dir = &config.state_dir;
            let lock = disk::claim_state_dir(dir)?;
            if config.id_secret.is_none() {
                config.id_secret =
                    Some(roam::id::secret_in(dir).with_context(|| {
                        format!("cannot keep the ID secret in {}", dir.display())
                    })?);
            }
            let clock = Arc::new(SessionClock::new(disk::stored_time(dir)));
            let backend = DiskBackend::open(
                dir,
                lock,
                config.session_ttl,
                config.max_sessions,
                clock.clone(),
            );
            let store = Store::with_backend(
                Arc::new(backend.clone()),
                config.max_sessions,
                config.session_ttl,
                clock,
                config.flush_interval,
            );
            (Sessions::new(store), Some(backend))
        }
        StoreKind::Redis(target) => {
            // Nothing to wait for: the node connects in the background and serves from what it
            // knows until Redis answers (docs/DEPLOYMENT.md, "Redis faults").
            let clock = Arc::new(SessionClock::default());
            let backend = RedisBackend::new(
                target,
                config.session_ttl,
                config.max_sessions,
                config.redis_wait,
                clock.clone(),
            );
            let store = Store::with_shared(
                Arc::new(backend),
                config.max_sessions,
                config.session_ttl,
                clock,
                config.flush_interval,
            );
            (Sessions::new(store), None)
        }
    };
    Ok(Prepared {
        sessions,
        disk,
        failed: Arc::new(std::sync::Mutex::new(None)),
        fatal: CancellationToken::new(),
    })
}

impl Prepared {
    /// Watches the store's background open: logs what it found, or stops the server. Digests
    /// are kept in the store from then on.
    fn watch_store(&self, svc: &Service) {
        let Some(disk) = self.disk.clone() else {
            return;
        };
        svc.digests().keep_in(Arc::new(disk.clone()));
        let (failed, fatal) = (Arc::clone(&self.failed), self.fatal.clone());
        tokio::spawn(async move {
            match disk.ready().await {
                Ok(r) => {
                    if let Some((stored, marked)) = r.lost_batches {
                        tracing::error!(
                            stored,
                            marked,
                            "the session store holds fewer batches than it had written (a damaged \
                             journal): its records may be older than what clients acknowledged \
                             since, so none of them resumes without Range (each starts over)"
                        );
                    }
                    tracing::info!(
                        sessions = r.sessions,
                        opened_in = ?r.opened_in,
                        after_crash = r.after_crash,
                        "session store open"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "the session store cannot be opened; stopping");
                    if let Ok(mut f) = failed.lock() {
                        *f = Some(e.to_string());
                    }
                    fatal.cancel();
                }
            }
        });
    }

    /// The shutdown future: a signal, or a store that cannot be opened.
    fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let fatal = self.fatal.clone();
        async move {
            tokio::select! {
                () = shutdown_signal() => {}
                () = fatal.cancelled() => {}
            }
            notify::tell(notify::STOPPING);
        }
    }

    /// An error if the server stopped because the store could not be opened.
    fn outcome(&self) -> anyhow::Result<()> {
        match self.failed.lock().ok().and_then(|f| f.clone()) {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok(()),
        }
    }
}

/// One work-stealing runtime with `workers` threads and one listener.
fn serve_multi_thread(
    svc: Arc<Service>,
    ops: &OpsThread,
    prepared: Prepared,
    workers: usize,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (listen, backlog, mptcp) = (
        svc.config().listen,
        svc.config().backlog,
        svc.config().mptcp,
    );
    let admin = ops.admin;
    let result = runtime.block_on(async move {
        let (listener, protocol) = roam::server::bind(listen, backlog, mptcp)
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        announce(
            addr,
            admin,
            &svc,
            workers,
            RuntimeMode::MultiThread,
            &protocol,
        )?;
        prepared.watch_store(&svc);
        roam::server::run(listener, svc, prepared.shutdown()).await;
        tracing::info!("stopped");
        prepared.outcome()
    });
    // Connections already had `shutdown_timeout`; blocking-pool work (a digest mid-chunk, a file
    // read) gets one more second, not another full timeout.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// One single-threaded runtime per worker, each with its own `SO_REUSEPORT` listener on the same
/// address, sharing one service. No work stealing: each connection stays on the thread that
/// accepted it.
fn serve_per_core(
    svc: Arc<Service>,
    ops: &OpsThread,
    prepared: Prepared,
    workers: usize,
) -> anyhow::Result<()> {
    let (listen, backlog) = (svc.config().listen, svc.config().backlog);
    let (first, protocol) = roam::server::bind_std(listen, backlog, true, svc.config().mptcp)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = first.local_addr()?;
    // Every worker's listener is of the first one's kind (SO_REUSEPORT groups one protocol).
    let mptcp = matches!(protocol, roam::server::ListenProtocol::Mptcp);
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(
            roam::server::bind_std(addr, backlog, true, mptcp)
                .with_context(|| format!("cannot add a listener on {addr}"))?
                .0,
        );
    }
    announce(
        addr,
        ops.admin,
        &svc,
        workers,
        RuntimeMode::PerCore,
        &protocol,
    )?;
    let prepared = Arc::new(prepared);
    let share = svc.config().max_connections.div_ceil(workers).max(1);
    let stop = CancellationToken::new();
    let threads = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            let svc = Arc::clone(&svc);
            let stop = stop.clone();
            let prepared = Arc::clone(&prepared);
            std::thread::Builder::new()
                .name(format!("roam-worker-{i}"))
                .spawn(move || -> anyhow::Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("cannot start an async runtime")?;
                    runtime.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)?;
                        if i == 0 {
                            prepared.watch_store(&svc);
                            let stop = stop.clone();
                            let shutdown = prepared.shutdown();
                            tokio::spawn(async move {
                                shutdown.await;
                                stop.cancel();
                            });
                        }
                        roam::server::run_listener(
                            listener,
                            svc,
                            stop.cancelled_owned(),
                            share,
                            i == 0,
                        )
                        .await;
                        Ok::<(), anyhow::Error>(())
                    })?;
                    runtime.shutdown_timeout(Duration::from_secs(1));
                    Ok(())
                })
                .context("cannot start a worker thread")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut result = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(anyhow::anyhow!("a worker thread panicked")),
        }
    }
    tracing::info!("stopped");
    result.and(prepared.outcome())
}

/// Prints the line scripts wait for (and a second one for the admin listener), tells the
/// service manager the server is ready, and logs the effective configuration.
fn announce(
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    svc: &Service,
    workers: usize,
    mode: RuntimeMode,
    protocol: &roam::server::ListenProtocol,
) -> anyhow::Result<()> {
    let scheme = if svc.tls().is_some() { "https" } else { "http" };
    println!("roam listening on {scheme}://{addr}");
    if let Some(admin) = admin {
        println!("roam admin listening on http://{admin}");
    }
    std::io::stdout().flush()?;
    notify::tell(notify::READY);
    match protocol {
        roam::server::ListenProtocol::Mptcp => {
            tracing::info!("accepting Multipath TCP, and TCP from clients that do not use it");
        }
        roam::server::ListenProtocol::Tcp => tracing::info!("Multipath TCP off (--mptcp off)"),
        roam::server::ListenProtocol::TcpFallback(e) => tracing::warn!(
            error = %e,
            "the kernel refused a Multipath TCP socket; accepting TCP only"
        ),
    }
    let cfg = svc.config();
    tracing::info!(
        %addr,
        workers,
        runtime = ?mode,
        root = %svc.root().path().display(),
        max_connections = cfg.max_connections,
        backlog = cfg.backlog,
        header_timeout = ?cfg.header_timeout,
        idle_timeout = ?cfg.idle_timeout,
        write_stall_timeout = ?cfg.write_stall_timeout,
        tcp_user_timeout = ?cfg.tcp_user_timeout,
        notsent_lowat = cfg.notsent_lowat,
        session_ttl = ?cfg.session_ttl,
        max_sessions = cfg.max_sessions,
        shutdown_timeout = ?cfg.shutdown_timeout,
        accounting = ?cfg.accounting,
        file_revalidate = ?cfg.file_revalidate,
        file_cache_entries = cfg.file_cache_entries,
        allow_dotfiles = cfg.allow_dotfiles,
        implicit_resume = cfg.implicit_resume,
        mint_rate = ?cfg.mint_rate,
        persistent_ids = cfg.id_secret.is_some(),
        store = ?cfg.store,
        redis_wait = ?cfg.redis_wait,
        state_dir = %cfg.state_dir.display(),
        flush_interval = ?cfg.flush_interval,
        admin_listen = ?admin,
        access_log = ?cfg.access_log,
        "serving"
    );
    if let Some(tls) = svc.tls() {
        tracing::info!(
            cert = %tls.files().cert.display(),
            key = %tls.files().key.display(),
            records = roam::tls::Tls::record_path(),
            "HTTPS only (TLS 1.3 and 1.2)"
        );
    }
    Ok(())
}

fn get(args: GetArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("roam get: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut reporter = roam::client::Reporter::new(args.quiet);
    let result = runtime.block_on(roam::client::get(&args.options(), &mut reporter));
    reporter.finish();
    match result {
        Ok(summary) => {
            if !args.quiet {
                eprintln!(
                    "roam get: {} complete: {} bytes{}, {} bytes received, {} reconnects, {} restarts",
                    summary.path.display(),
                    summary.length,
                    if summary.verified { ", sha-256 verified" } else { "" },
                    summary.received,
                    summary.reconnects,
                    summary.restarts
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("roam get: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn init_tracing(format: LogFormat) {
    // The store engine logs its own housekeeping at info; only its warnings matter to an
    // operator.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// On a reload (SIGHUP): the TLS certificate and key are read again; new handshakes use the
/// new pair; a pair that cannot be used leaves the old one in place.
fn reload_tls(svc: &Service) {
    let Some(tls) = svc.tls() else {
        return;
    };
    match tls.reload() {
        Ok(()) => tracing::info!(
            cert = %tls.files().cert.display(),
            "SIGHUP: TLS certificate reloaded; new connections use it"
        ),
        Err(e) => tracing::error!(
            error = %e,
            "SIGHUP: the new TLS certificate cannot be used; keeping the current one"
        ),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
