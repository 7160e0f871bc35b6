//! The `roam` binary: parses the command line, sets up logging, binds the listener, wires
//! SIGINT/SIGTERM to shutdown and runs the server.

use anyhow::Context;
use clap::Parser;
use roam::service::Service;
use roam::settings::cli::{Cli, Command, GetArgs, RuntimeMode, ServeArgs};
use roam::settings::{Config, LogFormat};
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
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
    let config = args.into_config()?;
    init_tracing(log_format);
    if let Err(e) = roam::sys::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    match mode {
        RuntimeMode::MultiThread => serve_multi_thread(config, workers),
        RuntimeMode::PerCore => serve_per_core(config, workers),
    }
}

/// One work-stealing runtime with `workers` threads and one listener.
fn serve_multi_thread(config: Config, workers: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let listener = roam::server::bind(config.listen, config.backlog)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let svc = Service::new(config)?;
        announce(addr, &svc, workers, RuntimeMode::MultiThread)?;
        roam::server::run(listener, svc, shutdown_signal()).await;
        tracing::info!("stopped");
        Ok::<(), anyhow::Error>(())
    });
    // Connections already had `shutdown_timeout`; blocking-pool work (a digest mid-chunk, a file
    // read) gets one more second, not another full timeout.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// One single-threaded runtime per worker, each with its own `SO_REUSEPORT` listener on the same
/// address, sharing one service. No work stealing: each connection stays on the thread that
/// accepted it.
fn serve_per_core(config: Config, workers: usize) -> anyhow::Result<()> {
    let first = roam::server::bind_std(config.listen, config.backlog, true)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(
            roam::server::bind_std(addr, config.backlog, true)
                .with_context(|| format!("cannot add a listener on {addr}"))?,
        );
    }
    let svc = Service::new(config)?;
    announce(addr, &svc, workers, RuntimeMode::PerCore)?;
    let share = svc.config().max_connections.div_ceil(workers).max(1);
    let stop = CancellationToken::new();
    let threads = listeners
        .into_iter()
        .enumerate()
        .map(|(i, listener)| {
            let svc = Arc::clone(&svc);
            let stop = stop.clone();
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
                            let stop = stop.clone();
                            tokio::spawn(async move {
                                shutdown_signal().await;
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
    result
}

/// Prints the one line scripts wait for, and logs the effective configuration.
fn announce(
    addr: SocketAddr,
    svc: &Service,
    workers: usize,
    mode: RuntimeMode,
) -> anyhow::Result<()> {
    println!("roam listening on http://{addr}");
    std::io::stdout().flush()?;
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
        "serving"
    );
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
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
