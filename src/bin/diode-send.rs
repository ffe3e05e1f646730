//! `diode-send`: the OT side of the diode.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use diode_common::Shutdown;

/// Sends plant data one way across a data diode: sources in, paced FEC-protected datagrams out.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The configuration file (see deploy/sender.toml).
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
        Some(Command::Check { config }) => match diode_sender::config::load(&config) {
            Ok(loaded) => {
                print!("{}", diode_sender::describe(&loaded));
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
                eprintln!("error: --config FILE is required (or `diode-send check --config FILE`)");
                return ExitCode::from(2);
            };
            let loaded = match diode_sender::config::load(&config) {
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

fn run(loaded: diode_sender::config::Loaded) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let running = diode_sender::start(loaded, shutdown).await?;
        running.finished().await;
        Ok(())
    })
}
