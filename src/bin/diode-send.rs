//! `diode-send`: the OT side of the diode.

use std::process::ExitCode;

use diode_gateway::service::Service;

fn main() -> ExitCode {
    let service = Service {
        name: "diode-send",
        about: "Sends plant data one way across a data diode: sources in, paced FEC-protected datagrams out",
        load: diode_sender::config::load,
        describe: diode_sender::describe,
    };
    service.main(|loaded, shutdown| async move {
        diode_sender::start(loaded, shutdown)
            .await?
            .finished()
            .await;
        Ok::<(), diode_sender::StartError>(())
    })
}
