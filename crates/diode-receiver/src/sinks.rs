//! Sinks: where records leave the receiver. Each route has its own queue and task, so a slow or
//! absent sink never stalls the link or other routes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use diode_common::config::Framing;
use diode_wire::Record;
use quinn_udp::{Transmit, UdpSocketState};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpStream, UdpSocket};

use crate::config::SinkConfig;
use crate::link::Queued;
use crate::metrics::RouteMetrics;

/// Records taken off the queue per write batch before a flush. A batch holds its records' share
/// of the route's byte budget until it is written.
const BATCH: usize = 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

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
        }),
        payload,
        payload_base64,
    };
    serde_json::to_writer(&mut *out, &line).expect("serialising to a Vec cannot fail");
    out.push(b'\n');
}

pub async fn run(
    config: SinkConfig,
    queue: flume::Receiver<Vec<Queued>>,
    metrics: RouteMetrics,
    route: String,
) {
    match config {
        SinkConfig::File { path } => run_file(path, queue, metrics, route).await,
        SinkConfig::Stdout {} => run_stdout(queue, metrics).await,
        SinkConfig::Udp { target } => run_udp(target, queue, metrics, route).await,
        SinkConfig::Tcp { connect, framing } => {
            run_tcp(connect, framing, queue, metrics, route).await
        }
    }
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

async fn write_json_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &[Queued],
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    buf.clear();
    for queued in batch {
        json_line(&queued.record, buf);
    }
    writer.write_all(buf).await?;
    writer.flush().await
}

async fn run_file(
    path: PathBuf,
    queue: flume::Receiver<Vec<Queued>>,
    metrics: RouteMetrics,
    route: String,
) {
    let mut batch = Vec::new();
    let mut buf = Vec::new();
    let mut file: Option<tokio::fs::File> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        // A batch that failed is kept and retried before anything new is taken.
        if batch.is_empty() && !next_batch(&queue, &mut batch).await {
            return;
        }
        metrics.queue.set(metrics.budget.used() as i64);
        if file.is_none() {
            if let Some(dir) = path.parent() {
                let _ = tokio::fs::create_dir_all(dir).await;
            }
            match tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await
            {
                Ok(f) => file = Some(f),
                Err(e) => {
                    metrics.errors.inc();
                    tracing::warn!(%route, path = %path.display(), error = %e, "file sink cannot open its file; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let f = file.as_mut().expect("opened above");
        match write_json_batch(f, &batch, &mut buf).await {
            Ok(()) => {
                metrics.delivered.inc_by(batch.len() as u64);
                batch.clear();
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                metrics.errors.inc();
                tracing::warn!(%route, path = %path.display(), error = %e, "file sink write failed; retrying");
                file = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn run_stdout(queue: flume::Receiver<Vec<Queued>>, metrics: RouteMetrics) {
    let mut batch = Vec::new();
    let mut buf = Vec::new();
    let mut out = tokio::io::stdout();
    while next_batch(&queue, &mut batch).await {
        metrics.queue.set(metrics.budget.used() as i64);
        match write_json_batch(&mut out, &batch, &mut buf).await {
            Ok(()) => {
                metrics.delivered.inc_by(batch.len() as u64);
            }
            Err(_) => {
                metrics.errors.inc();
            }
        }
        batch.clear();
    }
}

async fn run_udp(
    target: String,
    queue: flume::Receiver<Vec<Queued>>,
    metrics: RouteMetrics,
    route: String,
) {
    let target: SocketAddr = match tokio::net::lookup_host(&target)
        .await
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(addr) => addr,
        None => {
            tracing::error!(%route, %target, "udp sink target does not resolve");
            return;
        }
    };
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let socket = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%route, error = %e, "udp sink cannot bind");
            return;
        }
    };
    let gso = match UdpSocketState::new((&socket).into()) {
        Ok(state) => state,
        Err(e) => {
            tracing::error!(%route, error = %e, "udp sink cannot set up its socket");
            return;
        }
    };
    let mut batch = Vec::new();
    let mut contents = Vec::with_capacity(64 * 1024);
    while next_batch(&queue, &mut batch).await {
        metrics.queue.set(metrics.budget.used() as i64);
        // Runs of records of one size go out as one GSO send: a block's worth of telemetry
        // leaves in a few system calls instead of one per record.
        let mut rest = &batch[..];
        while let Some(first) = rest.first() {
            let size = first.record.payload.len();
            let max = gso
                .max_gso_segments()
                .clamp(1, 32)
                .min((64 * 1024 / size.max(1)).max(1));
            let run = rest
                .iter()
                .take(max)
                .take_while(|q| q.record.payload.len() == size)
                .count()
                .max(1);
            contents.clear();
            for q in &rest[..run] {
                contents.extend_from_slice(&q.record.payload);
            }
            let transmit = Transmit {
                destination: target,
                ecn: None,
                contents: &contents,
                segment_size: (run > 1).then_some(size),
                src_ip: None,
            };
            let sent = loop {
                match socket.try_io(tokio::io::Interest::WRITABLE, || {
                    gso.try_send((&socket).into(), &transmit)
                }) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if socket.writable().await.is_err() {
                            break Err(e);
                        }
                    }
                    result => break result,
                }
            };
            match sent {
                Ok(()) => {
                    metrics.delivered.inc_by(run as u64);
                }
                Err(e) => {
                    if metrics.errors.inc() % 1000 == 0 {
                        tracing::warn!(%route, %target, error = %e, "udp sink send failed");
                    }
                }
            }
            rest = &rest[run..];
        }
        batch.clear();
    }
}

async fn run_tcp(
    connect: String,
    framing: Framing,
    queue: flume::Receiver<Vec<Queued>>,
    metrics: RouteMetrics,
    route: String,
) {
    let mut batch: Vec<Queued> = Vec::new();
    let mut buf = Vec::new();
    let mut conn: Option<BufWriter<TcpStream>> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        // A batch whose write failed is sent again whole after reconnecting: at least once.
        if batch.is_empty() && !next_batch(&queue, &mut batch).await {
            break;
        }
        metrics.queue.set(metrics.budget.used() as i64);
        if conn.is_none() {
            match TcpStream::connect(&connect).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    tracing::info!(%route, %connect, "tcp sink connected");
                    conn = Some(BufWriter::with_capacity(256 * 1024, stream));
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    if metrics.errors.inc() == 1 || backoff == BACKOFF_MAX {
                        tracing::warn!(%route, %connect, error = %e, "tcp sink cannot connect; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            }
        }
        let writer = conn.as_mut().expect("connected above");
        let result = async {
            for Queued { record, .. } in &batch {
                buf.clear();
                match framing {
                    Framing::Lines => {
                        buf.extend_from_slice(&record.payload);
                        buf.push(b'\n');
                    }
                    Framing::Length => {
                        buf.extend_from_slice(&(record.payload.len() as u32).to_be_bytes());
                        buf.extend_from_slice(&record.payload);
                    }
                    Framing::Raw => buf.extend_from_slice(&record.payload),
                }
                writer.write_all(&buf).await?;
            }
            writer.flush().await
        }
        .await;
        match result {
            Ok(()) => {
                metrics.delivered.inc_by(batch.len() as u64);
                batch.clear();
            }
            Err(e) => {
                metrics.errors.inc();
                tracing::warn!(%route, %connect, error = %e, "tcp sink connection lost; reconnecting");
                conn = None;
            }
        }
    }
    if let Some(mut writer) = conn {
        let _ = writer.shutdown().await;
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
