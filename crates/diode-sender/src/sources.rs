//! Sources: each turns what a plant system sends into records of one topic.
//!
//! Listening sources (udp, tcp, syslog) never connect out and never answer with anything but
//! what their protocol requires. The MQTT source connects to the one broker it is given; the
//! Modbus source polls the one device it is given, at its configured rate, with read function
//! codes only. Nothing scans. A full queue towards the link slows TCP senders (TCP flow control)
//! and MQTT brokers (unacknowledged messages wait there), and drops UDP datagrams, counted
//! (`diode_records_dropped_total{reason="queue_full"}`).

pub mod modbus;
pub mod mqtt;
pub mod syslog;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use diode_common::budget::ByteBudget;
use diode_common::net::{udp_socket, Buffer};
use diode_common::LogThrottle;
use diode_common::{unix_time_us, Shutdown};
use diode_wire::proto::Origin;
use diode_wire::{RecordLimits, TopicId};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Framing, SourceConfig, SourceEndpoint, SyslogProtocol};
use crate::metrics::TopicMetrics;

/// A record on its way from a source to the link thread. It holds its share of the queue's
/// byte budget until the link thread has taken it.
pub struct Ingest {
    pub topic: TopicId,
    pub time_us: i64,
    pub origin: Option<Origin>,
    pub payload: Bytes,
    pub _budget: OwnedSemaphorePermit,
}

/// What every source of one topic needs.
#[derive(Clone)]
pub struct SourceContext {
    pub topic: TopicId,
    pub name: Arc<str>,
    pub queue: flume::Sender<Ingest>,
    pub budget: ByteBudget,
    pub metrics: TopicMetrics,
    /// The topic's own ceiling, if it has one.
    pub rate: Option<Arc<crate::rate::TopicRate>>,
    pub max_record_bytes: usize,
    /// What the link can frame: a record (its origin included) beyond it is refused here.
    pub limits: RecordLimits,
    /// A listening source's `allowed_peers` (empty: any).
    pub peers: Arc<[diode_common::net::SourceFilter]>,
    pub shutdown: Shutdown,
}

impl SourceContext {
    /// Whether the link can frame this record; if not it is counted as oversize and logged with
    /// the topic (at most one line a minute per process, with the count folded in), and the
    /// source goes on with the next one. It never reaches the encoder.
    pub(crate) fn frameable(&self, origin: Option<&Origin>, payload_len: usize) -> bool {
        static REFUSED: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(60));
        match self.limits.check(self.name.len(), origin, payload_len) {
            Ok(()) => true,
            Err(e) => {
                self.metrics.dropped_oversize.inc();
                if let Some(folded) = REFUSED.allow() {
                    let origin_topic: String = origin
                        .map(|o| o.topic.chars().take(80).collect())
                        .unwrap_or_default();
                    tracing::warn!(topic = %self.name, origin = %origin_topic, folded, error = %e,
                        "record refused: it cannot be framed (see diode_records_dropped_total{{reason=\"oversize\"}})");
                }
                false
            }
        }
    }
}

/// Chunk size read from a raw TCP stream: one record per read of up to this many bytes.
const RAW_CHUNK_BYTES: usize = 64 * 1024;

/// A bound source, ready to run. Binding happens at start-up so a taken port stops the service.
pub enum BoundSource {
    Udp(UdpSocket),
    Tcp {
        listener: TcpListener,
        framing: Framing,
        max_connections: usize,
    },
    SyslogUdp(UdpSocket),
    SyslogTcp {
        listener: TcpListener,
        max_connections: usize,
    },
    Mqtt(Box<mqtt::MqttSource>),
    Modbus(modbus::ModbusPoller),
}

/// How each message of a listening source becomes a record.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cutting {
    Framed(Framing),
    Syslog,
}

impl BoundSource {
    /// Must be called inside the runtime.
    pub fn bind(config: &SourceConfig, endpoint: &SourceEndpoint) -> std::io::Result<Self> {
        let listen = |endpoint: &SourceEndpoint| match endpoint {
            SourceEndpoint::Listen(addr) => Ok(*addr),
            _ => Err(std::io::Error::other(
                "a listening source needs a listen address",
            )),
        };
        let tcp = |addr: SocketAddr| -> std::io::Result<TcpListener> {
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        };
        let udp = |addr: SocketAddr, buffer: usize| -> std::io::Result<UdpSocket> {
            let socket = udp_socket(addr, Buffer::Receive, buffer)?;
            socket.set_nonblocking(true)?;
            UdpSocket::from_std(socket)
        };
        match config {
            SourceConfig::Udp {
                receive_buffer_bytes,
                ..
            } => Ok(BoundSource::Udp(udp(
                listen(endpoint)?,
                *receive_buffer_bytes,
            )?)),
            SourceConfig::Tcp {
                framing,
                max_connections,
                ..
            } => Ok(BoundSource::Tcp {
                listener: tcp(listen(endpoint)?)?,
                framing: *framing,
                // A raw stream is one ordered byte stream: one connection at a time.
                max_connections: if *framing == Framing::Raw {
                    1
                } else {
                    *max_connections
                },
            }),
            SourceConfig::Syslog {
                protocol: SyslogProtocol::Udp,
                ..
            } => Ok(BoundSource::SyslogUdp(udp(listen(endpoint)?, 4 << 20)?)),
            SourceConfig::Syslog {
                protocol: SyslogProtocol::Tcp,
                max_connections,
                ..
            } => Ok(BoundSource::SyslogTcp {
                listener: tcp(listen(endpoint)?)?,
                max_connections: *max_connections,
            }),
            SourceConfig::Mqtt { subscribe, qos, .. } => {
                let SourceEndpoint::Mqtt(options) = endpoint else {
                    return Err(std::io::Error::other(
                        "an MQTT source needs its client options",
                    ));
                };
                Ok(BoundSource::Mqtt(Box::new(mqtt::MqttSource {
                    options: (**options).clone(),
                    subscribe: subscribe.clone(),
                    qos: if *qos == 0 {
                        rumqttc::QoS::AtMostOnce
                    } else {
                        rumqttc::QoS::AtLeastOnce
                    },
                })))
            }
            SourceConfig::Modbus {
                unit_id,
                poll_interval_ms,
                timeout_ms,
                registers,
                ..
            } => {
                let SourceEndpoint::Modbus(address) = endpoint else {
                    return Err(std::io::Error::other(
                        "a Modbus source needs a device address",
                    ));
                };
                Ok(BoundSource::Modbus(modbus::ModbusPoller {
                    address: *address,
                    unit_id: *unit_id,
                    poll_interval: std::time::Duration::from_millis(*poll_interval_ms),
                    timeout: std::time::Duration::from_millis(*timeout_ms),
                    registers: registers.clone(),
                }))
            }
        }
    }

    /// The local address a listening source is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            BoundSource::Udp(socket) | BoundSource::SyslogUdp(socket) => socket.local_addr().ok(),
            BoundSource::Tcp { listener, .. } | BoundSource::SyslogTcp { listener, .. } => {
                listener.local_addr().ok()
            }
            BoundSource::Mqtt(_) | BoundSource::Modbus(_) => None,
        }
    }

    pub async fn run(self, ctx: SourceContext) {
        match self {
            BoundSource::Udp(socket) => run_udp(socket, false, ctx).await,
            BoundSource::SyslogUdp(socket) => run_udp(socket, true, ctx).await,
            BoundSource::Tcp {
                listener,
                framing,
                max_connections,
            } => run_tcp(listener, Cutting::Framed(framing), max_connections, ctx).await,
            BoundSource::SyslogTcp {
                listener,
                max_connections,
            } => run_tcp(listener, Cutting::Syslog, max_connections, ctx).await,
            BoundSource::Mqtt(source) => source.run(ctx).await,
            BoundSource::Modbus(poller) => poller.run(ctx).await,
        }
    }
}

async fn run_udp(socket: UdpSocket, syslog: bool, ctx: SourceContext) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let received = tokio::select! {
            _ = ctx.shutdown.wait() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        match received {
            Ok((_, peer)) if !diode_common::net::SourceFilter::allows(&ctx.peers, peer) => {
                ctx.metrics.errors_peer.inc();
            }
            Ok((len, _)) if len > ctx.max_record_bytes => {
                ctx.metrics.dropped_oversize.inc();
            }
            Ok((len, _)) if !ctx.frameable(None, len) => {}
            Ok((len, _)) => {
                let (payload, origin) = if syslog {
                    let (record, parsed) = syslog::to_record(&buf[..len]);
                    if !parsed {
                        ctx.metrics.unparsed.inc();
                    }
                    (record, parsed.then(syslog::origin))
                } else {
                    (Bytes::copy_from_slice(&buf[..len]), None)
                };
                if ctx
                    .rate
                    .as_ref()
                    .is_some_and(|r| !r.try_acquire(payload.len()))
                {
                    if ctx.metrics.dropped_rate.inc() % 10_000 == 0 {
                        tracing::warn!(topic = %ctx.name, "topic above its rate_mbps: dropping UDP records (see diode_records_dropped_total)");
                    }
                    continue;
                }
                let Some(budget) = ctx.budget.try_acquire(payload.len()) else {
                    if ctx.metrics.dropped_queue_full.inc() % 10_000 == 0 {
                        tracing::warn!(topic = %ctx.name, "link queue full: dropping UDP records (see diode_records_dropped_total)");
                    }
                    continue;
                };
                let ingest = Ingest {
                    topic: ctx.topic,
                    time_us: unix_time_us(),
                    origin,
                    payload,
                    _budget: budget,
                };
                match ctx.queue.try_send(ingest) {
                    Ok(()) => {}
                    Err(flume::TrySendError::Full(_)) => {
                        if ctx.metrics.dropped_queue_full.inc() % 10_000 == 0 {
                            tracing::warn!(topic = %ctx.name, "link queue full: dropping UDP records (see diode_records_dropped_total)");
                        }
                    }
                    Err(flume::TrySendError::Disconnected(_)) => return,
                }
            }
            Err(e) => {
                ctx.metrics.errors_io.inc();
                tracing::debug!(topic = %ctx.name, error = %e, "udp source receive error");
            }
        }
    }
}

async fn run_tcp(
    listener: TcpListener,
    cutting: Cutting,
    max_connections: usize,
    ctx: SourceContext,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        // Wait for a free slot before accepting: extra clients wait in the listen backlog.
        let permit = tokio::select! {
            _ = ctx.shutdown.wait() => return,
            permit = slots.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = ctx.shutdown.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    ctx.metrics.errors_io.inc();
                    tracing::warn!(topic = %ctx.name, error = %e, "tcp source accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if !diode_common::net::SourceFilter::allows(&ctx.peers, peer) {
            static REFUSED: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(60));
            ctx.metrics.errors_peer.inc();
            if let Some(folded) = REFUSED.allow() {
                tracing::warn!(topic = %ctx.name, %peer, folded, "connection refused: the peer is not in allowed_peers");
            }
            continue;
        }
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            ctx.metrics.connections.inc();
            tracing::debug!(topic = %ctx.name, %peer, "tcp source connection");
            let result = tokio::select! {
                _ = ctx.shutdown.wait() => Ok(()),
                result = read_records(stream, cutting, &ctx) => result,
            };
            if let Err(e) = result {
                tracing::warn!(topic = %ctx.name, %peer, error = %e, "tcp source connection closed");
            }
            ctx.metrics.connections.dec();
            drop(permit);
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("length prefix {0} is above max_record_bytes; the stream cannot be resynchronised")]
    Oversize(usize),
    #[error("syslog octet count is malformed or above max_record_bytes; the stream cannot be resynchronised")]
    SyslogFraming,
    #[error("the link queue is closed")]
    QueueClosed,
}

impl From<QueueClosed> for ConnectionError {
    fn from(_: QueueClosed) -> Self {
        ConnectionError::QueueClosed
    }
}

async fn read_records(
    mut stream: TcpStream,
    cutting: Cutting,
    ctx: &SourceContext,
) -> Result<(), ConnectionError> {
    let mut buf = BytesMut::with_capacity(RAW_CHUNK_BYTES);
    let mut lines = LineCutter::new(ctx.max_record_bytes);
    let mut syslog_frames = syslog::TcpFramer::new(ctx.max_record_bytes);
    let framing = match cutting {
        Cutting::Framed(framing) => framing,
        // Only compared with Raw and Length below; syslog has its own branch.
        Cutting::Syslog => Framing::Lines,
    };
    loop {
        if framing == Framing::Raw {
            buf.reserve(RAW_CHUNK_BYTES);
        }
        let read = stream.read_buf(&mut buf).await.inspect_err(|_| {
            ctx.metrics.errors_io.inc();
        })?;
        let eof = read == 0;
        if cutting == Cutting::Syslog {
            while let Some(frame) = syslog_frames.next(&mut buf, eof) {
                match frame {
                    syslog::Frame::Message(raw) => {
                        let (record, parsed) = syslog::to_record(&raw);
                        if !parsed {
                            ctx.metrics.unparsed.inc();
                        }
                        emit(ctx, unix_time_us(), parsed.then(syslog::origin), record).await?;
                    }
                    syslog::Frame::Oversize { fatal } => {
                        ctx.metrics.dropped_oversize.inc();
                        if fatal {
                            ctx.metrics.errors_framing.inc();
                            return Err(ConnectionError::SyslogFraming);
                        }
                    }
                }
            }
            if eof {
                return Ok(());
            }
            continue;
        }
        match framing {
            Framing::Raw => {
                if !buf.is_empty() {
                    emit(ctx, unix_time_us(), None, buf.split().freeze()).await?;
                }
            }
            Framing::Lines => {
                while let Some(cut) = lines.next(&mut buf, eof) {
                    match cut {
                        Cut::Record(line) => emit(ctx, unix_time_us(), None, line).await?,
                        Cut::Oversize => {
                            ctx.metrics.dropped_oversize.inc();
                        }
                    }
                }
            }
            Framing::Length => loop {
                if buf.len() < 4 {
                    break;
                }
                let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
                if len > ctx.max_record_bytes {
                    ctx.metrics.dropped_oversize.inc();
                    ctx.metrics.errors_framing.inc();
                    return Err(ConnectionError::Oversize(len));
                }
                if buf.len() < 4 + len {
                    buf.reserve(4 + len - buf.len());
                    break;
                }
                buf.advance(4);
                emit(ctx, unix_time_us(), None, buf.split_to(len).freeze()).await?;
            },
        }
        if eof {
            if framing == Framing::Length && !buf.is_empty() {
                ctx.metrics.errors_framing.inc();
            }
            return Ok(());
        }
    }
}

/// The link thread has stopped: the sender is shutting down.
#[derive(Debug)]
pub(crate) struct QueueClosed;

/// Queues one record, waiting for room: the caller stops reading its peer meanwhile, which slows
/// a TCP sender by flow control and leaves MQTT messages with their broker.
pub(crate) async fn emit(
    ctx: &SourceContext,
    time_us: i64,
    origin: Option<Origin>,
    payload: Bytes,
) -> Result<(), QueueClosed> {
    if !ctx.frameable(origin.as_ref(), payload.len()) {
        return Ok(());
    }
    if let Some(rate) = &ctx.rate {
        rate.acquire(payload.len()).await;
    }
    let budget = ctx.budget.acquire(payload.len()).await;
    let ingest = Ingest {
        topic: ctx.topic,
        time_us,
        origin,
        payload,
        _budget: budget,
    };
    ctx.queue.send_async(ingest).await.map_err(|_| QueueClosed)
}

enum Cut {
    Record(Bytes),
    Oversize,
}

/// Cuts lines out of a stream; a line longer than the limit is dropped whole, counted once.
struct LineCutter {
    max: usize,
    scanned: usize,
    discarding: bool,
}

impl LineCutter {
    fn new(max: usize) -> Self {
        LineCutter {
            max,
            scanned: 0,
            discarding: false,
        }
    }

    fn next(&mut self, buf: &mut BytesMut, eof: bool) -> Option<Cut> {
        loop {
            if let Some(pos) = buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let mut line = buf.split_to(self.scanned + pos + 1);
                self.scanned = 0;
                line.truncate(line.len() - 1);
                if line.last() == Some(&b'\r') {
                    line.truncate(line.len() - 1);
                }
                if std::mem::take(&mut self.discarding) {
                    continue;
                }
                if line.len() > self.max {
                    return Some(Cut::Oversize);
                }
                return Some(Cut::Record(line.freeze()));
            }
            self.scanned = buf.len();
            if buf.len() > self.max {
                buf.clear();
                self.scanned = 0;
                if !std::mem::replace(&mut self.discarding, true) {
                    return Some(Cut::Oversize);
                }
                return None;
            }
            if eof && !buf.is_empty() {
                // A last line without a terminator is still a line.
                self.scanned = 0;
                let line = buf.split().freeze();
                return (!std::mem::take(&mut self.discarding)).then_some(Cut::Record(line));
            }
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_all(input: &[&[u8]], max: usize) -> Vec<Result<Vec<u8>, ()>> {
        let mut cutter = LineCutter::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for (i, chunk) in input.iter().enumerate() {
            buf.extend_from_slice(chunk);
            let eof = i + 1 == input.len();
            while let Some(cut) = cutter.next(&mut buf, eof) {
                out.push(match cut {
                    Cut::Record(b) => Ok(b.to_vec()),
                    Cut::Oversize => Err(()),
                });
            }
        }
        out
    }

    #[test]
    fn lines_across_reads_crlf_and_last_line() {
        let out = cut_all(&[b"ab", b"c\r\nde\n\nf", b"g"], 100);
        assert_eq!(
            out,
            vec![
                Ok(b"abc".to_vec()),
                Ok(b"de".to_vec()),
                Ok(vec![]),
                Ok(b"fg".to_vec())
            ]
        );
    }

    #[test]
    fn an_oversize_line_is_dropped_whole_and_counted_once() {
        let out = cut_all(&[b"ok\n0123456789", b"0123456789", b"0123\nnext\n", b""], 8);
        assert_eq!(out, vec![Ok(b"ok".to_vec()), Err(()), Ok(b"next".to_vec())]);
    }
}
