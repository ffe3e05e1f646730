//! What both services share outside the wire protocol: configuration files with precise errors,
//! the Prometheus endpoint, UDP sockets sized for bursts, the kernel's drop counter, shutdown.

pub mod budget;
pub mod config;
pub mod fsutil;
pub mod hex;
pub mod keyfile;
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod shutdown;
pub mod status;
pub mod throttle;

pub use shutdown::Shutdown;
pub use throttle::LogThrottle;

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

/// Logs to `path` instead of stderr (at info unless `RUST_LOG` says otherwise): for a program
/// whose terminal shows something else, the demo's live table.
pub fn init_logging_to(path: &std::path::Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

/// RFC 3339 with microseconds, UTC, for a time in microseconds since the Unix epoch; a time
/// outside years 0000-9999 (a broken clock) shows as the epoch.
pub fn format_rfc3339_us(time_us: i64) -> String {
    use std::time::{Duration, UNIX_EPOCH};
    let time = if time_us >= 0 {
        UNIX_EPOCH + Duration::from_micros(time_us as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(time_us.unsigned_abs())
    };
    if time
        .duration_since(UNIX_EPOCH)
        .is_ok_and(|d| d.as_secs() < 253_402_300_800)
    {
        humantime::format_rfc3339_micros(time).to_string()
    } else {
        "1970-01-01T00:00:00.000000Z".to_owned()
    }
}

/// `text` as one word for a POSIX shell, in single quotes: what a printed command may safely
/// carry when `text` comes from the network (a topic name may hold `'`, `$(` or `;`).
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// This host's name as syslog headers carry it (RFC 5424 §6.2.4), `-` when it has none usable.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(' '))
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod shell_quote_tests {
    #[test]
    fn quotes_what_a_shell_would_interpret() {
        assert_eq!(super::shell_quote("line3/x"), "'line3/x'");
        assert_eq!(super::shell_quote("a'$(id)'"), r"'a'\''$(id)'\'''");
    }
}
