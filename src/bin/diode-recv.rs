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
    if loaded.state_file.is_none() {
        eprintln!(
            "error: this receiver keeps no state (set link.state_file): it remembers no gaps"
        );
        return ExitCode::FAILURE;
    }
    // Each lane keeps its own gaps; a topic travels on one lane, so they never overlap.
    let mut gaps = Vec::new();
    for lane in 0..loaded.lanes.len() {
        let Some(path) = loaded.state_file(lane) else {
            continue;
        };
        match diode_receiver::state::load(&path) {
            Ok(saved) => gaps.extend(saved.map(|s| s.gaps).unwrap_or_default()),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    print!("{}", diode_receiver::state::describe_gaps(&gaps));
    ExitCode::SUCCESS
}
