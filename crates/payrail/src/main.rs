//! `payrail`: the one binary. See `payrail --help`.
//!
//! Exit codes: 0 success, 1 runtime failure (the message says what), 2 bad usage or
//! configuration.

mod bench;
mod bench_ledger;
mod config;
mod demo;
mod emulate;
mod requery;
mod serve;
mod settle;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: requests hand buffers between the tokio threads and the
/// SQLite writer thread, and glibc frees those on the allocating thread's arena under its lock;
/// `perf` showed 45 % of the worker threads' sleeps waiting on that lock under load
/// (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "payrail",
    version,
    about = "An aggregated payment platform: one merchant API over many payment channels."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Default)]
struct ServerArgs {
    /// TOML configuration file (also PAYRAIL_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, IP:PORT (default 127.0.0.1:8080; also PAYRAIL_LISTEN).
    #[arg(long)]
    listen: Option<String>,
    /// Data folder for the embedded database and keys (default ./payrail-data).
    #[arg(long)]
    data_dir: Option<String>,
    /// sqlite://PATH or postgres://… (default: SQLite in the data folder).
    #[arg(long)]
    database_url: Option<String>,
    /// Roles of this process: api, worker or api,worker (default both).
    #[arg(long)]
    roles: Option<String>,
}

impl ServerArgs {
    fn overrides(&self) -> config::Overrides {
        config::Overrides {
            config: self.config.clone(),
            listen: self.listen.clone(),
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            roles: self.roles.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the payment server (API and workers) on the embedded database with the sandbox channel.
    Serve(ServerArgs),
    /// Apply database migrations and exit.
    Migrate(ServerArgs),
    /// Walk through a signed merchant flow against a running server.
    Demo(demo::DemoArgs),
    /// Measure create-payment throughput and latency over real HTTP, then verify every payment
    /// (`payrail bench ledger …`: ledger posting throughput instead).
    Bench(bench::BenchArgs),
    /// Ask the channels again about open (or named) payments and apply their answers.
    Requery {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        args: requery::RequeryArgs,
    },
    /// Run a channel emulator (wechatpay, alipay or unionpay) on loopback for demos and tests.
    Emulate(emulate::EmulateArgs),
    /// Settle every due business day (or those up to --date): one batch per merchant, currency
    /// and day, posted pending -> available; re-running creates nothing new.
    Settle {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        args: settle::SettleArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Serve(a) => serve::serve(a.overrides()).await,
            Command::Migrate(a) => serve::migrate(a.overrides()).await,
            Command::Demo(a) => demo::run(a).await,
            Command::Bench(a) => match a.command {
                Some(bench_ledger::BenchCommand::Ledger(l)) => bench_ledger::run(l).await,
                None => bench::run(a).await,
            },
            Command::Emulate(a) => emulate::run(a).await,
            Command::Requery { server, args } => requery::run(server.overrides(), args).await,
            Command::Settle { server, args } => settle::run(server.overrides(), args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<serve::ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
