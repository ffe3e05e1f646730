//! `diode-recv`: the IT side of the diode. It never sends anything towards the link.

use std::process::ExitCode;

use diode_gateway::service::Service;

fn main() -> ExitCode {
    let service = Service {
        name: "diode-recv",
        about: "Receives plant data from a data diode: datagrams in, repaired, ordered records out to sinks",
        load: diode_receiver::config::load,
        describe: diode_receiver::describe,
    };
    service.main(|loaded, shutdown| async move {
        diode_receiver::start(loaded, shutdown)
            .await?
            .finished()
            .await;
        Ok::<(), diode_receiver::StartError>(())
    })
}
