//! `diode-recv`: the IT side of the diode.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use diode_common::Shutdown;

/// Receives plant data from a data diode: datagrams in, repaired, ordered records out to sinks.
/// It never sends anything towards the link.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The configuration file (see deploy/receiver.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Checks a configuration file and prints what it would do.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    diode_common::init_logging();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => match diode_receiver::config::load(&config) {
            Ok(loaded) => {
                print!("{}", diode_receiver::describe(&loaded));
                println!("ok: {}", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        None => {
            let Some(config) = cli.config else {
                eprintln!("error: --config FILE is required (or `diode-recv check --config FILE`)");
                return ExitCode::from(2);
            };
            let loaded = match diode_receiver::config::load(&config) {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match run(loaded) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(loaded: diode_receiver::config::Loaded) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let running = diode_receiver::start(loaded, shutdown).await?;
        running.finished().await;
        Ok(())
    })
}
