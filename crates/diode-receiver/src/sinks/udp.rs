//! The UDP sink: one datagram per record, the payload alone.

use std::net::SocketAddr;

use diode_common::config::ConfigError;
use diode_wire::Record;
use quinn_udp::{Transmit, UdpSocketState};
use serde::Deserialize;
use tokio::net::UdpSocket;

use super::{Refusals, Scope, Sink, SinkError, SinkSettings};
use crate::metrics::RouteMetrics;
use crate::route::RouteTask;

/// The largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD_BYTES: usize = 65_507;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpConfig {
    pub target: String,
}

impl UdpConfig {
    pub fn check(&self, scope: &Scope<'_>) -> Result<UdpConfig, ConfigError> {
        scope.socket_addr("target", &self.target)?;
        Ok(self.clone())
    }
}

impl SinkSettings for UdpConfig {
    fn describe(&self) -> String {
        format!("udp {}", self.target)
    }

    fn start(&self, route: RouteTask) -> std::io::Result<tokio::task::JoinHandle<()>> {
        Ok(route.spawn(UdpSink {
            target: self.target.clone(),
            socket: None,
            contents: Vec::new(),
        }))
    }
}

pub struct UdpSink {
    target: String,
    socket: Option<(UdpSocket, UdpSocketState, SocketAddr)>,
    contents: Vec<u8>,
}

impl Sink for UdpSink {
    fn refusal(&self, record: &Record) -> Option<String> {
        (record.payload.len() > MAX_UDP_PAYLOAD_BYTES)
            .then(|| format!("{} bytes do not fit one UDP datagram", record.payload.len()))
    }

    async fn deliver(
        &mut self,
        records: &[Record],
        metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        if self.socket.is_none() {
            let target = tokio::net::lookup_host(&self.target)
                .await?
                .next()
                .ok_or_else(|| {
                    std::io::Error::other(format!("{} resolves to nothing", self.target))
                })?;
            let bind: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .expect("literal");
            let socket = UdpSocket::bind(bind).await?;
            let state = UdpSocketState::new((&socket).into())?;
            self.socket = Some((socket, state, target));
        }
        let (socket, gso, target) = self.socket.as_ref().expect("set above");
        // Runs of records of one size go out as one GSO send: a block's worth of telemetry
        // leaves in a few system calls instead of one per record.
        let mut rest = records;
        while let Some(first) = rest.first() {
            let size = first.payload.len();
            let max = gso
                .max_gso_segments()
                .clamp(1, 32)
                .min((64 * 1024 / size.max(1)).max(1));
            let run = rest
                .iter()
                .take(max)
                .take_while(|r| r.payload.len() == size)
                .count()
                .max(1);
            self.contents.clear();
            for r in &rest[..run] {
                self.contents.extend_from_slice(&r.payload);
            }
            let transmit = Transmit {
                destination: *target,
                ecn: None,
                contents: &self.contents,
                segment_size: (run > 1).then_some(size),
                src_ip: None,
            };
            let sent = loop {
                match socket.try_io(tokio::io::Interest::WRITABLE, || {
                    gso.try_send(socket.into(), &transmit)
                }) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if socket.writable().await.is_err() {
                            break Err(e);
                        }
                    }
                    result => break result,
                }
            };
            // A datagram the network refuses is gone either way: counted, not retried.
            if let Err(e) = sent {
                if metrics.errors.inc() % 1000 == 0 {
                    tracing::warn!(target = %target, error = %e, "udp sink send failed");
                }
            }
            rest = &rest[run..];
        }
        Ok(Refusals::new())
    }
}
