//! The stdout sink: the file sink's JSON lines on standard output.

use diode_wire::Record;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::{json_line, Refusals, Sink, SinkError, SinkSettings};
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

/// It has no settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}

impl SinkSettings for StdoutConfig {
    fn describe(&self) -> String {
        "stdout (JSON lines)".into()
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        Ok(route.spawn(StdoutSink {
            out: tokio::io::stdout(),
            buf: Vec::new(),
        }))
    }
}

pub struct StdoutSink {
    out: tokio::io::Stdout,
    buf: Vec<u8>,
}

impl Sink for StdoutSink {
    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        self.buf.clear();
        for record in records {
            json_line(record, &mut self.buf);
        }
        self.out.write_all(&self.buf).await?;
        self.out.flush().await?;
        Ok(Refusals::new())
    }
}
