//! What `diode-send` and `diode-recv` share as programs: `--config FILE` runs the service until
//! SIGTERM or Ctrl-C, `check --config FILE` validates a file and prints what it would do, and
//! each service's own tools (`diode-send replay`, `diode-recv gaps`) read the same file. A
//! configuration error exits with status 2, a failure to start with status 1.

use std::fmt::Display;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use diode_common::config::ConfigError;
use diode_common::Shutdown;

#[derive(Parser)]
#[command(version)]
struct Args<T: Tool> {
    /// The configuration file (see deploy/).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command<T>>,
}

/// A service's own subcommands, each of which reads the service's configuration.
pub trait Tool: Subcommand {
    /// The configuration file given to the subcommand itself, if any.
    fn config(&self) -> Option<&Path>;

    /// Runs a subcommand that needs no configuration (it makes what a configuration will
    /// name), or None for one that does.
    fn run_without_config(&self) -> Option<ExitCode> {
        None
    }
}

#[derive(Subcommand)]
enum Command<T: Tool> {
    /// Checks a configuration file and prints what it would do.
    Check {
        /// The configuration file to check (or give --config before `check`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Writes a new random link key, readable by its owner only; give the same file to both sides.
    Keygen {
        /// Where to write the key: 32 random bytes as 64 hexadecimal characters, mode 0600. An
        /// existing file is never overwritten.
        #[arg(long, short)]
        out: PathBuf,
    },
    #[command(flatten)]
    Tool(T),
}

pub struct Service<L, T> {
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    pub load: fn(&Path) -> Result<L, ConfigError>,
    pub describe: fn(&L) -> String,
    /// Runs one of the service's own subcommands on the loaded configuration.
    pub tool: fn(&L, T) -> ExitCode,
}

impl<L, T: Tool> Service<L, T> {
    /// Parses the command line; `run` starts the service and resolves when it has stopped after
    /// `shutdown`.
    pub fn main<F, Fut, E>(&self, run: F) -> ExitCode
    where
        F: FnOnce(L, Shutdown) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        let matches = Args::<T>::command()
            .name(self.name)
            .about(self.about)
            .get_matches();
        let args = match Args::<T>::from_arg_matches(&matches) {
            Ok(args) => args,
            Err(e) => e.exit(),
        };
        diode_common::init_logging();
        let (path, check) = match (args.command, args.config) {
            (Some(Command::Tool(tool)), config) => {
                if let Some(code) = tool.run_without_config() {
                    return code;
                }
                let Some(path) = tool.config().map(Path::to_owned).or(config) else {
                    eprintln!("error: this command needs --config FILE");
                    return ExitCode::from(2);
                };
                return match (self.load)(&path) {
                    Ok(loaded) => (self.tool)(&loaded, tool),
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(2)
                    }
                };
            }
            (Some(Command::Keygen { out }), _) => {
                return match diode_common::keyfile::generate(&out) {
                    Ok(key) => {
                        println!(
                            "wrote {} (key id {}): copy it to both sides, mode 0600",
                            out.display(),
                            diode_wire::LinkKey::new(&key).id()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            (
                Some(Command::Check {
                    config: Some(config),
                }),
                _,
            )
            | (Some(Command::Check { config: None }), Some(config)) => (config, true),
            (Some(Command::Check { config: None }), None) => {
                eprintln!("error: check needs --config FILE");
                return ExitCode::from(2);
            }
            (None, Some(config)) => (config, false),
            (None, None) => {
                eprintln!(
                    "error: --config FILE is required (or `{} check --config FILE`)",
                    self.name
                );
                return ExitCode::from(2);
            }
        };
        let loaded = match (self.load)(&path) {
            Ok(loaded) => loaded,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        if let Err(e) = diode_wire::fec::check_cpu() {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        if check {
            print!("{}", (self.describe)(&loaded));
            println!("ok: {}", path.display());
            return ExitCode::SUCCESS;
        }
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("error: starting the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let result = runtime.block_on(async {
            let shutdown = Shutdown::new();
            shutdown.trigger_on_signals();
            run(loaded, shutdown).await
        });
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }
}
