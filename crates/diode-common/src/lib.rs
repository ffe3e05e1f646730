//! What both services share outside the wire protocol: configuration files with precise errors,
//! the Prometheus endpoint, UDP sockets sized for bursts, the kernel's drop counter, shutdown.

pub mod budget;
pub mod config;
pub mod keyfile;
pub mod metrics;
pub mod net;
pub mod shutdown;

pub use shutdown::Shutdown;

/// Microseconds since the Unix epoch by the system clock: records carry the time they were taken in.
pub fn unix_time_us() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_micros().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_micros().min(i64::MAX as u128) as i64),
    }
}

/// Runs a service's link loop on a thread of its own (FEC and socket work stay off the async
/// workers); the receiver resolves when the loop has returned.
pub fn spawn_link_thread(
    link_loop: impl FnOnce() + Send + 'static,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("diode-link".into())
        .spawn(move || {
            link_loop();
            let _ = done_tx.send(());
        })?;
    Ok(done)
}

/// Logs to stderr; `RUST_LOG` overrides the default level (info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
