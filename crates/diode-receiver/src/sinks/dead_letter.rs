//! A route's dead letters: records its sink can never accept (a topic name its protocol
//! refuses, a datagram too large for UDP, a Kafka topic that does not exist and may not be
//! created). Retrying such a record forever would block everything behind it; dropping it
//! silently would break the promise that loss is never silent. So it is counted
//! (`diode_sink_dead_letters_total{route}`), logged with its topic, sequence number and reason,
//! and kept as a JSON line (the file sink's format plus `reason`) in a bounded file, and the route
//! goes on.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use diode_common::LogThrottle;
use diode_wire::Record;

use crate::metrics::RouteMetrics;

pub struct DeadLetters {
    path: Option<PathBuf>,
    max_bytes: u64,
    file: Option<std::fs::File>,
    written: u64,
    full_logged: bool,
}

static LOGGED: LogThrottle = LogThrottle::new(Duration::from_secs(1));

impl DeadLetters {
    pub fn new(path: Option<PathBuf>, max_bytes: u64) -> Self {
        let written = path
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or(0, |m| m.len());
        DeadLetters {
            path,
            max_bytes,
            file: None,
            written,
            full_logged: false,
        }
    }

    pub fn put(&mut self, record: &Record, why: &str, metrics: &RouteMetrics, route: &str) {
        metrics.dead_letters.inc();
        if let Some(folded) = LOGGED.allow() {
            tracing::warn!(%route, topic = %record.topic, seq = record.seq, reason = why, folded,
                "record set aside as a dead letter: the sink can never accept it");
        }
        let Some(path) = &self.path else {
            return;
        };
        let mut line = Vec::new();
        super::json_line(record, &mut line);
        // The file sink's line, with the reason as one more field.
        line.truncate(line.len() - 2);
        line.extend_from_slice(b",\"reason\":");
        serde_json::to_writer(&mut line, why).expect("a Vec takes any string");
        line.extend_from_slice(b"}\n");
        if self.written + line.len() as u64 > self.max_bytes {
            if !std::mem::replace(&mut self.full_logged, true) {
                tracing::error!(%route, path = %path.display(),
                    "dead-letter file full (dead_letter_max_bytes): further dead letters are counted only");
            }
            return;
        }
        if self.file.is_none() {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(path)
            {
                Ok(file) => self.file = Some(file),
                Err(e) => {
                    tracing::error!(%route, path = %path.display(), error = %e, "cannot open the dead-letter file");
                    return;
                }
            }
        }
        let file = self.file.as_mut().expect("opened above");
        match file.write_all(&line) {
            Ok(()) => self.written += line.len() as u64,
            Err(e) => {
                tracing::error!(%route, path = %path.display(), error = %e, "cannot write the dead-letter file");
                self.file = None;
            }
        }
    }
}
