//! The `roam` binary: parses the command line, sets up logging, binds the listener, wires
//! SIGINT/SIGTERM to shutdown and runs the server.

use anyhow::Context;
use clap::Parser;
use roam::cli::{Cli, Command, GetArgs, ServeArgs};
use roam::config::LogFormat;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

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
    let workers = match args.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let config = args.into_config()?;
    init_tracing(log_format);
    if let Err(e) = roam::sys::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the open-file limit");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let listener = roam::server::bind(config.listen, config.backlog)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let svc = roam::service::Service::new(config)?;
        println!("roam listening on http://{addr}");
        std::io::stdout().flush()?;
        let cfg = &svc.config;
        tracing::info!(
            %addr,
            workers,
            root = %svc.root.path().display(),
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
            allow_dotfiles = cfg.allow_dotfiles,
            persistent_ids = cfg.id_secret.is_some(),
            "serving"
        );
        roam::server::run(listener, svc, shutdown_signal()).await;
        tracing::info!("stopped");
        Ok::<(), anyhow::Error>(())
    });
    // Connections already had `shutdown_timeout`; blocking-pool work (a digest mid-chunk, a file
    // read) gets one more second, not another full timeout.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
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
