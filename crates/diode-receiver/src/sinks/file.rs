//! The file sink: JSON lines (or raw payloads) appended to one file, rotated by size and by age.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use diode_common::config::ConfigError;
use diode_wire::Record;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::{json_line, Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Relative to the configuration file.
    pub path: PathBuf,
    #[serde(default)]
    pub format: FileFormat,
    /// Start a new file once this one holds this many bytes.
    #[serde(default)]
    pub rotate_bytes: Option<u64>,
    /// Start a new file once this one is this old.
    #[serde(default)]
    pub rotate_interval_ms: Option<u64>,
}

/// How the file sink writes records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON object per line: `topic`, `seq`, `time`, `origin`, `payload` or `payload_base64`.
    #[default]
    Json,
    /// The payloads alone, back to back, byte for byte (a stream or file sent with raw framing).
    Raw,
}

impl FileConfig {
    /// Resolves `path` against the configuration file's directory.
    pub fn check(&self, scope: &Scope<'_>) -> Result<FileConfig, ConfigError> {
        let path = scope.resolve(&self.path);
        if let Some(dir) = path.parent() {
            scope.writable_dir("path", dir)?;
        }
        if self.rotate_bytes.is_some_and(|b| b < 4096) {
            return Err(scope.invalid("rotate_bytes", "must be at least 4096"));
        }
        if self.rotate_interval_ms.is_some_and(|ms| ms < 1000) {
            return Err(scope.invalid("rotate_interval_ms", "must be at least 1000"));
        }
        Ok(FileConfig {
            path,
            ..self.clone()
        })
    }
}

impl SinkSettings for FileConfig {
    fn describe(&self) -> String {
        format!(
            "file {} ({}){}{}",
            self.path.display(),
            match self.format {
                FileFormat::Json => "JSON lines",
                FileFormat::Raw => "raw payloads",
            },
            self.rotate_bytes
                .map(|b| format!(", rotated at {b} bytes"))
                .unwrap_or_default(),
            self.rotate_interval_ms
                .map(|ms| format!(", rotated every {} s", ms / 1000))
                .unwrap_or_default()
        )
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        Ok(route.spawn(FileSink {
            path: self.path.clone(),
            format: self.format,
            rotate_bytes: self.rotate_bytes,
            rotate_interval: self.rotate_interval_ms.map(Duration::from_millis),
            file: None,
            written: 0,
            opened: Instant::now(),
            buf: Vec::new(),
        }))
    }
}

pub struct FileSink {
    path: PathBuf,
    format: FileFormat,
    rotate_bytes: Option<u64>,
    rotate_interval: Option<Duration>,
    file: Option<tokio::fs::File>,
    written: u64,
    opened: Instant,
    buf: Vec<u8>,
}

impl Sink for FileSink {
    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        let due = self.rotate_bytes.is_some_and(|max| self.written >= max)
            || self
                .rotate_interval
                .is_some_and(|age| self.opened.elapsed() >= age && self.written > 0);
        if due {
            self.rotate().await?;
        }
        if self.file.is_none() {
            if let Some(dir) = self.path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            // Plant data: readable by the service's group (the consumers), not by everyone.
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&self.path)
                .await?;
            self.written = file.metadata().await?.len();
            if self.written == 0 {
                self.opened = Instant::now();
            }
            self.file = Some(file);
        }
        self.buf.clear();
        for record in records {
            match self.format {
                FileFormat::Json => json_line(record, &mut self.buf),
                FileFormat::Raw => self.buf.extend_from_slice(&record.payload),
            }
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(&self.buf).await?;
        file.flush().await?;
        self.written += self.buf.len() as u64;
        Ok(Refusals::new())
    }

    fn reset(&mut self) {
        self.file = None;
    }
}

impl FileSink {
    /// Renames the current file to `<path>.<UTC time>` and starts a new one.
    async fn rotate(&mut self) -> Result<(), SinkError> {
        self.file = None;
        let stamp = diode_common::format_rfc3339_us(diode_common::unix_time_us())
            .replace([':', '-'], "")
            .replace('.', "-");
        let mut target = self.path.with_extension(format!(
            "{}{}",
            self.path
                .extension()
                .map(|e| format!("{}.", e.to_string_lossy()))
                .unwrap_or_default(),
            stamp
        ));
        let mut n = 1;
        while tokio::fs::try_exists(&target).await.unwrap_or(false) {
            target = PathBuf::from(format!("{}.{n}", target.display()));
            n += 1;
        }
        tokio::fs::rename(&self.path, &target).await?;
        tracing::info!(from = %self.path.display(), to = %target.display(), "file sink rotated");
        self.written = 0;
        self.opened = Instant::now();
        Ok(())
    }
}
