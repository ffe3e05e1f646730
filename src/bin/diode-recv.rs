//! `diode-recv`: the IT side of the diode. It never sends anything towards the link.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use diode_gateway::service::{Service, Tool};
use diode_receiver::config::Loaded;

#[derive(Subcommand)]
enum ReceiverTool {
    /// Lists the records reported lost and not yet filled by a replay, per topic, with the
    /// `diode-send replay` command that sends them again (from the receiver's state file).
    Gaps {
        /// The receiver's configuration file (or give --config before `gaps`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

impl Tool for ReceiverTool {
    fn config(&self) -> Option<&Path> {
        match self {
            ReceiverTool::Gaps { config } => config.as_deref(),
        }
    }
}

fn main() -> ExitCode {
    let service = Service {
        name: "diode-recv",
        about: "Receives plant data from a data diode: datagrams in, repaired, ordered records out to sinks",
        load: diode_receiver::config::load,
        describe: diode_receiver::describe,
        tool: run_tool,
    };
    service.main(|loaded, shutdown| async move {
        diode_receiver::start(loaded, shutdown)
            .await?
            .finished()
            .await;
        Ok::<(), diode_receiver::StartError>(())
    })
}

fn run_tool(loaded: &Loaded, tool: ReceiverTool) -> ExitCode {
    let ReceiverTool::Gaps { .. } = tool;
    let Some(path) = &loaded.state_file else {
        eprintln!(
            "error: this receiver keeps no state (set link.state_file): it remembers no gaps"
        );
        return ExitCode::FAILURE;
    };
    match diode_receiver::state::load(path) {
        Ok(saved) => {
            let gaps = saved.map(|s| s.gaps).unwrap_or_default();
            print!("{}", diode_receiver::state::describe_gaps(&gaps));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
