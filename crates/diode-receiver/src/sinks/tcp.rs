//! The TCP sink: the payloads framed as the TCP source frames them; reconnects with backoff.

use diode_common::config::{ConfigError, Framing};
use diode_wire::Record;
use serde::Deserialize;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;

use super::{Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    pub connect: String,
    #[serde(default)]
    pub framing: Framing,
}

impl TcpConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<TcpConfig, ConfigError> {
        scope.socket_addr("connect", &self.connect)?;
        Ok(self.clone())
    }
}

impl SinkSettings for TcpConfig {
    fn describe(&self) -> String {
        format!("tcp {}, framing {:?}", self.connect, self.framing).to_lowercase()
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        Ok(route.spawn(TcpSink {
            connect: self.connect.clone(),
            framing: self.framing,
            conn: None,
        }))
    }
}

pub struct TcpSink {
    connect: String,
    framing: Framing,
    conn: Option<BufWriter<TcpStream>>,
}

impl Sink for TcpSink {
    async fn deliver(
        &mut self,
        records: &[Record],
        _metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        if self.conn.is_none() {
            let stream =
                TcpStream::connect(&self.connect)
                    .await
                    .map_err(|source| SinkError::Connect {
                        target: self.connect.clone(),
                        source,
                    })?;
            let _ = stream.set_nodelay(true);
            tracing::info!(connect = %self.connect, "tcp sink connected");
            self.conn = Some(BufWriter::with_capacity(256 * 1024, stream));
        }
        let writer = self.conn.as_mut().expect("connected above");
        // Straight into the writer's buffer: a copy through a frame buffer of our own would
        // be one more pass over every byte the route carries.
        for record in records {
            match self.framing {
                Framing::Lines => {
                    writer.write_all(&record.payload).await?;
                    writer.write_all(b"\n").await?;
                }
                Framing::Length => {
                    writer
                        .write_all(&(record.payload.len() as u32).to_be_bytes())
                        .await?;
                    writer.write_all(&record.payload).await?;
                }
                Framing::Raw => writer.write_all(&record.payload).await?,
            }
        }
        writer.flush().await?;
        Ok(Refusals::new())
    }

    fn reset(&mut self) {
        self.conn = None;
    }

    async fn close(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = conn.shutdown().await;
        }
    }
}
