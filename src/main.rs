//! The `usernet` command: parse flags, build the plan, run the daemon.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use usernet::cli::Cli;
use usernet::daemon;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args = match usernet::compat::translate(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("usernet: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cli = Cli::parse_from(args);
    if let Err(e) = init_logging(&cli) {
        eprintln!("usernet: {e}");
        return ExitCode::from(2);
    }
    raise_fd_limit();
    if let Err(e) = daemon::apply_config_extras(&mut cli) {
        eprintln!("usernet: {e}");
        return ExitCode::from(2);
    }
    let prepared = daemon::plan_from(&cli)
        .and_then(|plan| daemon::dhcp_server(&plan, cli.lease_file.as_deref()).map(|d| (plan, d)));
    let (plan, dhcp) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("usernet: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.transports().is_empty() {
        eprintln!(
            "usernet: no transport given, so no VM can attach.\n\n{}",
            Cli::attach_help()
        );
        return ExitCode::from(2);
    }
    let opts = match daemon::options_from(&cli, &plan) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("usernet: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("usernet: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(plan, dhcp, opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usernet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every flow holds a host socket: raise the soft limit on open files to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Logs via tracing (`RUST_LOG`, default info) to standard error or `--log-file`.
fn init_logging(cli: &Cli) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match &cli.log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("log-file {}: {e}", path.display()))?;
            builder
                .with_writer(std::sync::Mutex::new(file))
                .with_ansi(false)
                .init();
        }
        None => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
    }
    Ok(())
}
