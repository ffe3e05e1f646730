//! Sinks: where records leave the receiver. Each route has its own queue and task, so a slow or
//! absent sink never stalls the link or other routes. A route with a disk buffer writes every
//! record there first and its sink reads them back (buffer.rs): the sink being down or slow then
//! costs disk space, not records.

pub mod broker;
pub mod dead_letter;
pub mod kafka;
pub mod mqtt;
pub mod syslog;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use diode_common::config::Framing;
use diode_wire::Record;
use quinn_udp::{Transmit, UdpSocketState};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpStream, UdpSocket};

use crate::config::SinkConfig;
use crate::link::Queued;
use crate::metrics::RouteMetrics;

/// Records taken off the queue per write batch before a flush. A batch holds its records' share
/// of the route's byte budget until it is written.
const BATCH: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The largest UDP payload over IPv4.
const MAX_UDP_PAYLOAD_BYTES: usize = 65_507;

/// One JSON line: `topic`, `seq`, `time` (RFC 3339, when the sender took it in), `origin` when
/// the source gave one (`{"topic", "qos", "retain"}`, wire-format.md §5.4), and `payload` (UTF-8)
/// or `payload_base64`.
pub fn json_line(record: &Record, out: &mut Vec<u8>) {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        topic: &'a str,
        seq: u64,
        time: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        origin: Option<Origin<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload_base64: Option<String>,
    }
    #[derive(serde::Serialize)]
    struct Origin<'a> {
        topic: &'a str,
        qos: u32,
        retain: bool,
        #[serde(skip_serializing_if = "str::is_empty")]
        protocol: &'a str,
    }
    let (payload, payload_base64) = match std::str::from_utf8(&record.payload) {
        Ok(text) => (Some(text), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&record.payload)),
        ),
    };
    let line = Line {
        topic: &record.topic,
        seq: record.seq,
        time: diode_common::format_rfc3339_us(record.time_us),
        origin: record.origin.as_ref().map(|o| Origin {
            topic: &o.topic,
            qos: o.qos,
            retain: o.retain,
            protocol: &o.protocol,
        }),
        payload,
        payload_base64,
    };
    serde_json::to_writer(&mut *out, &line).expect("serialising to a Vec cannot fail");
    out.push(b'\n');
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the broker has not acknowledged for {0:?}")]
    AckTimeout(Duration),
    #[error("the MQTT client stopped")]
    ClientGone,
    #[error("kafka: {0}")]
    Kafka(String),
}

/// Records of a batch a sink took as delivered but can never accept: (index in the batch, why).
pub type Refusals = Vec<(usize, String)>;

/// A sink, ready to deliver batches. Connections are made on first use and again after a failure.
pub enum Sink {
    File(FileSink),
    Stdout(tokio::io::Stdout),
    Udp(UdpSink),
    Tcp(TcpSink),
    Mqtt(mqtt::MqttSink),
    Broker(broker::BrokerSink),
    Kafka(kafka::KafkaSink),
    Syslog(syslog::SyslogSink),
}

impl Sink {
    /// Must be called inside the runtime. Fails only for a sink that listens (the embedded broker).
    pub fn new(route: &crate::config::Route) -> std::io::Result<Sink> {
        Ok(match &route.sink {
            SinkConfig::MqttBroker { .. } => Sink::Broker(broker::BrokerSink::start(
                (**route
                    .broker
                    .as_ref()
                    .expect("the config loader resolves a broker's settings"))
                .clone(),
            )?),
            SinkConfig::File {
                path,
                format,
                rotate_bytes,
                rotate_interval_ms,
            } => Sink::File(FileSink {
                path: path.clone(),
                format: *format,
                rotate_bytes: *rotate_bytes,
                rotate_interval: rotate_interval_ms.map(Duration::from_millis),
                file: None,
                written: 0,
                opened: std::time::Instant::now(),
                buf: Vec::new(),
            }),
            SinkConfig::Stdout {} => Sink::Stdout(tokio::io::stdout()),
            SinkConfig::Udp { target } => Sink::Udp(UdpSink {
                target: target.clone(),
                socket: None,
                contents: Vec::new(),
            }),
            SinkConfig::Tcp { connect, framing } => Sink::Tcp(TcpSink {
                connect: connect.clone(),
                framing: *framing,
                conn: None,
                buf: Vec::new(),
            }),
            SinkConfig::Mqtt {
                topic_prefix, qos, ..
            } => Sink::Mqtt(mqtt::MqttSink::new(
                (**route
                    .mqtt
                    .as_ref()
                    .expect("the config loader builds MQTT options"))
                .clone(),
                topic_prefix.clone(),
                *qos,
                &route.name,
            )),
            SinkConfig::Syslog { target, protocol } => {
                Sink::Syslog(syslog::SyslogSink::new(target.clone(), *protocol))
            }
            SinkConfig::Kafka {
                brokers,
                topic,
                client_id,
                create_partitions,
            } => Sink::Kafka(kafka::KafkaSink::new(
                brokers.clone(),
                topic.clone(),
                client_id.clone(),
                *create_partitions,
            )),
        })
    }

    /// Why this sink could never accept `record`, if so: checked before delivery, so one bad
    /// record goes to the dead letters instead of failing its batch forever.
    pub fn refusal(&self, record: &Record) -> Option<String> {
        match self {
            Sink::Mqtt(sink) => mqtt::republished_part(&sink.prefix, record)
                .err()
                .map(str::to_owned),
            Sink::Broker(sink) => mqtt::republished_part(&sink.settings.topic_prefix, record)
                .err()
                .map(str::to_owned)
                .or_else(|| {
                    (record.payload.len() + 65_536 > sink.settings.max_packet_bytes)
                        .then(|| "larger than the broker's largest packet".to_owned())
                }),
            Sink::Kafka(sink) => {
                let topic = kafka::kafka_topic(&sink.pattern, &record.topic);
                (!kafka::valid_kafka_topic(&topic)).then(|| {
                    format!("{topic:?} is not a valid Kafka topic name (at most 249 characters)")
                })
            }
            Sink::Udp(_) => (record.payload.len() > MAX_UDP_PAYLOAD_BYTES)
                .then(|| format!("{} bytes do not fit one UDP datagram", record.payload.len())),
            Sink::File(_) | Sink::Stdout(_) | Sink::Tcp(_) | Sink::Syslog(_) => None,
        }
    }

    /// Delivers the whole batch or fails; a failed batch is offered again whole, so a sink may
    /// see records twice after a failure (at least once), never lose them. Records a sink finds
    /// it can never accept while delivering are returned rather than failing the batch.
    pub async fn deliver(
        &mut self,
        records: &[Record],
        metrics: &RouteMetrics,
    ) -> Result<Refusals, SinkError> {
        let none = |result: Result<(), SinkError>| result.map(|()| Refusals::new());
        match self {
            Sink::File(sink) => none(sink.deliver(records).await),
            Sink::Stdout(out) => {
                let mut buf = Vec::new();
                for record in records {
                    json_line(record, &mut buf);
                }
                out.write_all(&buf).await?;
                out.flush().await?;
                Ok(Refusals::new())
            }
            Sink::Udp(sink) => none(sink.deliver(records, metrics).await),
            Sink::Tcp(sink) => none(sink.deliver(records).await),
            Sink::Mqtt(sink) => none(sink.deliver(records).await),
            Sink::Broker(sink) => none(sink.deliver(records)),
            Sink::Kafka(sink) => sink.deliver(records).await,
            Sink::Syslog(sink) => none(sink.deliver(records).await),
        }
    }

    /// Called after a failed delivery, so the next one starts on a fresh connection.
    fn reset(&mut self) {
        match self {
            Sink::File(sink) => sink.file = None,
            Sink::Tcp(sink) => sink.conn = None,
            Sink::Syslog(sink) => sink.reset(),
            Sink::Kafka(sink) => sink.reset(),
            Sink::Stdout(_) | Sink::Udp(_) | Sink::Mqtt(_) | Sink::Broker(_) => {}
        }
    }

    async fn close(&mut self) {
        match self {
            Sink::Tcp(sink) => {
                if let Some(mut conn) = sink.conn.take() {
                    let _ = conn.shutdown().await;
                }
            }
            Sink::Mqtt(sink) => sink.close().await,
            _ => {}
        }
    }
}

/// Runs one route: takes deliveries off its queue (through its disk buffer, if it has one) and
/// hands them to its sink, retrying with backoff until they are taken.
pub async fn run_route(
    mut sink: Sink,
    queue: flume::Receiver<Vec<Queued>>,
    buffer: Option<crate::buffer::DiskBuffer>,
    mut dead: dead_letter::DeadLetters,
    metrics: RouteMetrics,
    route: String,
) {
    match buffer {
        None => {
            let mut batch = Vec::new();
            while next_batch(&queue, &mut batch).await {
                metrics.queue.set(metrics.budget.used() as i64);
                let records: Vec<Record> = batch.iter().map(|q| q.record.clone()).collect();
                // Without a disk buffer, the memory queue is what holds records while the sink
                // retries; when it is full the link thread drops, counted.
                deliver_with_retry(&mut sink, &records, &mut dead, &metrics, &route).await;
                batch.clear();
            }
        }
        Some(buffer) => run_buffered(&mut sink, queue, buffer, &mut dead, &metrics, &route).await,
    }
    sink.close().await;
}

async fn deliver_with_retry(
    sink: &mut Sink,
    records: &[Record],
    dead: &mut dead_letter::DeadLetters,
    metrics: &RouteMetrics,
    route: &str,
) {
    let screened: Vec<Record>;
    let records = if records.iter().any(|r| sink.refusal(r).is_some()) {
        let mut kept = Vec::with_capacity(records.len());
        for record in records {
            match sink.refusal(record) {
                Some(why) => dead.put(record, &why, metrics, route),
                None => kept.push(record.clone()),
            }
        }
        screened = kept;
        &screened[..]
    } else {
        records
    };
    if records.is_empty() {
        return;
    }
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    loop {
        match sink.deliver(records, metrics).await {
            Ok(refused) => {
                for (i, why) in &refused {
                    dead.put(&records[*i], why, metrics, route);
                }
                metrics
                    .delivered
                    .inc_by((records.len() - refused.len()) as u64);
                if failures > 0 {
                    tracing::info!(%route, failures, "sink delivers again");
                }
                return;
            }
            Err(e) => {
                metrics.errors.inc();
                if failures == 0 || backoff == BACKOFF_MAX && failures % 12 == 0 {
                    tracing::warn!(%route, error = %e, records = records.len(), "sink delivery failed; retrying");
                }
                failures += 1;
                sink.reset();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Records read back from the disk buffer per delivery.
const BUFFER_BATCH_RECORDS: usize = 1024;
const BUFFER_BATCH_BYTES: u64 = 4 << 20;

async fn run_buffered(
    sink: &mut Sink,
    queue: flume::Receiver<Vec<Queued>>,
    buffer: crate::buffer::DiskBuffer,
    dead: &mut dead_letter::DeadLetters,
    metrics: &RouteMetrics,
    route: &str,
) {
    use std::sync::{Arc, Mutex};
    let buffer = Arc::new(Mutex::new(buffer));
    let appended = Arc::new(tokio::sync::Notify::new());
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    metrics
        .backlog
        .set(buffer.lock().expect("not poisoned").unread_bytes() as i64);
    // The spooler writes every delivery to disk as it comes, whatever the sink is doing.
    let spooler = {
        let buffer = buffer.clone();
        let appended = appended.clone();
        let closed = closed.clone();
        let metrics = metrics.clone();
        let route = route.to_owned();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut records = Vec::new();
            let mut last_warning: Option<std::time::Instant> = None;
            let mut unreported = crate::buffer::Dropped::new();
            while next_batch(&queue, &mut batch).await {
                // The records keep their share of the route's memory budget until they are on
                // disk: a slow disk then slows the link thread's hand-over (counted drops there)
                // instead of letting memory grow.
                records.clear();
                records.extend(batch.iter().map(|q| q.record.clone()));
                let result = {
                    let mut buffer = buffer.lock().expect("not poisoned");
                    let result = buffer.append(&records);
                    metrics.backlog.set(buffer.unread_bytes() as i64);
                    result
                };
                batch.clear();
                metrics.queue.set(metrics.budget.used() as i64);
                match result {
                    Ok(dropped) if dropped.is_empty() => {}
                    Ok(dropped) => {
                        metrics
                            .dropped
                            .inc_by(dropped.values().map(|d| d.2).sum::<u64>());
                        crate::buffer::merge_dropped(&mut unreported, dropped);
                        if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            last_warning = Some(std::time::Instant::now());
                            for (topic, (first, last, count)) in std::mem::take(&mut unreported) {
                                tracing::warn!(%route, %topic, first_seq = first, last_seq = last, records = count,
                                    "disk buffer full: records dropped (see diode_sink_dropped_total)");
                            }
                        }
                    }
                    Err(e) => {
                        // The disk refused (full, read-only): these records cannot be kept.
                        metrics.errors.inc();
                        metrics.dropped.inc_by(records.len() as u64);
                        let first = records.first().map(|r| (r.topic.clone(), r.seq));
                        tracing::error!(%route, error = %e, records = records.len(), first = ?first,
                            "cannot write to the disk buffer: records dropped");
                    }
                }
                appended.notify_one();
            }
            for (topic, (first, last, count)) in unreported {
                tracing::warn!(%route, %topic, first_seq = first, last_seq = last, records = count,
                    "disk buffer full: records dropped (see diode_sink_dropped_total)");
            }
            closed.store(true, std::sync::atomic::Ordering::Release);
            appended.notify_one();
        })
    };
    loop {
        let next = {
            let mut buffer = buffer.lock().expect("not poisoned");
            buffer.peek(BUFFER_BATCH_RECORDS, BUFFER_BATCH_BYTES)
        };
        match next {
            Ok(Some((records, position))) => {
                deliver_with_retry(sink, &records, dead, metrics, route).await;
                let mut buffer = buffer.lock().expect("not poisoned");
                if let Err(e) = buffer.commit(records.len(), position) {
                    metrics.errors.inc();
                    tracing::error!(%route, error = %e, "cannot update the disk buffer's cursor");
                }
                metrics.backlog.set(buffer.unread_bytes() as i64);
            }
            Ok(None) => {
                // Read again after a wake-up: an append may land between the read and the wait,
                // and Notify keeps that one permit for us.
                if closed.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                appended.notified().await;
            }
            Err(e) => {
                metrics.errors.inc();
                tracing::error!(%route, error = %e, "cannot read the disk buffer; retrying");
                tokio::time::sleep(BACKOFF_MAX).await;
            }
        }
    }
    let _ = spooler.await;
}

/// Waits for a delivery, then takes what else is queued, up to about a batch.
async fn next_batch(queue: &flume::Receiver<Vec<Queued>>, batch: &mut Vec<Queued>) -> bool {
    match queue.recv_async().await {
        Ok(delivery) => batch.extend(delivery),
        Err(_) => return false,
    }
    while batch.len() < BATCH {
        match queue.try_recv() {
            Ok(delivery) => batch.extend(delivery),
            Err(_) => break,
        }
    }
    true
}

pub struct FileSink {
    path: PathBuf,
    format: crate::config::FileFormat,
    rotate_bytes: Option<u64>,
    rotate_interval: Option<Duration>,
    file: Option<tokio::fs::File>,
    written: u64,
    opened: std::time::Instant,
    buf: Vec<u8>,
}

impl FileSink {
    async fn deliver(&mut self, records: &[Record]) -> Result<(), SinkError> {
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
                self.opened = std::time::Instant::now();
            }
            self.file = Some(file);
        }
        self.buf.clear();
        for record in records {
            match self.format {
                crate::config::FileFormat::Json => json_line(record, &mut self.buf),
                crate::config::FileFormat::Raw => self.buf.extend_from_slice(&record.payload),
            }
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(&self.buf).await?;
        file.flush().await?;
        self.written += self.buf.len() as u64;
        Ok(())
    }

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
        self.opened = std::time::Instant::now();
        Ok(())
    }
}

pub struct UdpSink {
    target: String,
    socket: Option<(UdpSocket, UdpSocketState, SocketAddr)>,
    contents: Vec<u8>,
}

impl UdpSink {
    async fn deliver(
        &mut self,
        records: &[Record],
        metrics: &RouteMetrics,
    ) -> Result<(), SinkError> {
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
        Ok(())
    }
}

pub struct TcpSink {
    connect: String,
    framing: Framing,
    conn: Option<BufWriter<TcpStream>>,
    buf: Vec<u8>,
}

impl TcpSink {
    async fn deliver(&mut self, records: &[Record]) -> Result<(), SinkError> {
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
        for record in records {
            self.buf.clear();
            match self.framing {
                Framing::Lines => {
                    self.buf.extend_from_slice(&record.payload);
                    self.buf.push(b'\n');
                }
                Framing::Length => {
                    self.buf
                        .extend_from_slice(&(record.payload.len() as u32).to_be_bytes());
                    self.buf.extend_from_slice(&record.payload);
                }
                Framing::Raw => self.buf.extend_from_slice(&record.payload),
            }
            writer.write_all(&self.buf).await?;
        }
        writer.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn json_lines_follow_the_documented_shape() {
        let mut out = Vec::new();
        let record = Record {
            topic: "line3/telemetry".into(),
            seq: 7,
            time_us: 1_764_100_000_123_456,
            origin: None,
            payload: Bytes::from_static(b"{\"t\":21.5}"),
        };
        json_line(&record, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["topic"], "line3/telemetry");
        assert_eq!(line["seq"], 7);
        assert_eq!(line["time"], "2025-11-25T19:46:40.123456Z");
        assert_eq!(line["payload"], "{\"t\":21.5}");
        let binary = Record {
            payload: Bytes::from_static(&[0xff, 0x00]),
            ..record
        };
        out.clear();
        json_line(&binary, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["payload_base64"], "/wA=");
        assert!(line.get("payload").is_none());
        assert!(line.get("origin").is_none());
        let from_mqtt = Record {
            origin: Some(diode_wire::proto::Origin {
                topic: "plant/line3/speed".into(),
                qos: 1,
                retain: true,
                protocol: "mqtt".into(),
            }),
            ..binary
        };
        out.clear();
        json_line(&from_mqtt, &mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["origin"]["topic"], "plant/line3/speed");
        assert_eq!(line["origin"]["qos"], 1);
        assert_eq!(line["origin"]["retain"], true);
    }
}
