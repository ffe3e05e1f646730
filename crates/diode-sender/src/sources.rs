//! Sources: each turns what a plant system sends into records of one topic.
//!
//! Every kind of source is a module of its own (docs/connectors.md): its configuration table,
//! its checks, its `check` line and its run loop, behind [`Source`]. [`SourceConfig`] is the
//! closed list of kinds, and [`SourceConfig::check`] the one place that dispatches on it.
//!
//! Listening sources (udp, tcp, syslog) never connect out and never answer with anything but
//! what their protocol requires. The MQTT source connects to the one broker it is given; the
//! Modbus source polls the one device it is given, at its configured rate, with read function
//! codes only. Nothing scans. A full queue towards the link slows TCP senders (TCP flow control)
//! and MQTT brokers (unacknowledged messages wait there), and drops UDP datagrams, counted
//! (`diode_records_dropped_total{reason="queue_full"}`).

pub mod files;
pub mod modbus;
pub mod mqtt;
pub mod opcua;
pub mod syslog;
pub mod tcp;
pub mod udp;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use diode_common::budget::ByteBudget;
use diode_common::config::{ConfigError, ConfigScope};
use diode_common::net::{udp_socket, Buffer, SourceFilter};
use diode_common::LogThrottle;
use diode_common::{unix_time_us, Shutdown};
use diode_wire::proto::Origin;
use diode_wire::{RecordLimits, TopicId};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::TopicMetrics;

/// The kinds of source, as `source = { kind = "...", ... }` names them. Closed on purpose: no
/// plug-in loads code on the plant side. A new kind is one module and one line here and one in
/// [`SourceConfig::check`].
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    Udp(udp::UdpConfig),
    Tcp(tcp::TcpConfig),
    Mqtt(mqtt::MqttConfig),
    Modbus(modbus::ModbusConfig),
    Syslog(syslog::SyslogConfig),
    Files(files::FilesConfig),
    Opcua(opcua::OpcuaConfig),
}

impl SourceConfig {
    /// Checks the table (errors name its keys under `scope`) and resolves its addresses.
    pub fn check(&self, scope: &Scope<'_>) -> Result<CheckedSource, ConfigError> {
        let (kind, source): (_, Arc<dyn Source>) = match self {
            SourceConfig::Udp(c) => ("udp", Arc::new(c.check(scope)?)),
            SourceConfig::Tcp(c) => ("tcp", Arc::new(c.check(scope)?)),
            SourceConfig::Mqtt(c) => ("mqtt", Arc::new(c.check(scope)?)),
            SourceConfig::Modbus(c) => ("modbus", Arc::new(c.check(scope)?)),
            SourceConfig::Syslog(c) => ("syslog", Arc::new(c.check(scope)?)),
            SourceConfig::Files(c) => ("files", Arc::new(c.check(scope)?)),
            SourceConfig::Opcua(c) => ("opcua", Arc::new(c.check(scope)?)),
        };
        Ok(CheckedSource { kind, source })
    }
}

/// A topic's source as checked at load.
#[derive(Debug, Clone)]
pub struct CheckedSource {
    /// The `kind` of its table.
    pub kind: &'static str,
    pub source: Arc<dyn Source>,
}

/// A source's table, with the limits its checks depend on.
pub type Scope<'a> = ConfigScope<'a, SiteLimits>;

/// What the whole configuration sets that a source's checks depend on.
#[derive(Debug, Clone, Copy)]
pub struct SiteLimits {
    /// `link.max_record_bytes`.
    pub max_record_bytes: usize,
    /// `safety.min_poll_interval_ms`: no device is asked more often.
    pub min_poll_interval_ms: u64,
}

/// A source, checked and resolved, ready to start.
pub trait Source: std::fmt::Debug + Send + Sync {
    /// What it does, in one line, for `diode-send check`.
    fn describe(&self) -> String;

    /// What only one topic's source may hold.
    fn claims(&self) -> Vec<Claim> {
        Vec::new()
    }

    /// A bulk source (files) yields to every live one: its records wait in a queue of their
    /// own and go on the link only when no live record waits.
    fn bulk(&self) -> bool {
        false
    }

    /// Binds what it listens on (at start-up, so a taken port stops the service) and returns
    /// the task that runs it until `ctx.shutdown`. Called inside the runtime; the task is
    /// spawned once every source and the link socket are bound.
    fn start(&self, ctx: SourceContext) -> std::io::Result<Started>;
}

pub type SourceTask = Pin<Box<dyn Future<Output = ()> + Send>>;

pub struct Started {
    /// The address a listening source is bound to (useful when configured with port 0).
    pub local_addr: Option<SocketAddr>,
    pub task: SourceTask,
}

/// Something only one topic's source may hold: a listening socket, an MQTT client id. Two
/// topics claiming the same are refused at load.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Claim {
    /// What is held, as the error names it (`udp 127.0.0.1:5140`).
    pub what: String,
    /// How the error says it is taken twice (`is the source of`).
    pub conflict: &'static str,
}

impl Claim {
    /// A listening socket: (`udp` or `tcp`, the configured address).
    pub fn listen(protocol: &str, listen: &str) -> Claim {
        Claim {
            what: format!("{protocol} {listen}"),
            conflict: "is the source of",
        }
    }
}

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
    /// Every family, for a source with series of its own (files).
    pub sender_metrics: crate::metrics::SenderMetrics,
    /// The topic's own ceiling, if it has one.
    pub rate: Option<Arc<crate::rate::TopicRate>>,
    pub max_record_bytes: usize,
    /// At most this many of the topic's bytes can be queued and not yet on the wire: what a
    /// crash can lose after a source took them.
    pub queued_ahead_bytes: usize,
    /// What the link can frame: a record (its origin included) beyond it is refused here.
    pub limits: RecordLimits,
    pub shutdown: Shutdown,
    /// For a source that queues records in batches, to have them taken at once.
    pub link: crate::link::LinkWaker,
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

/// Where a listening source (udp, tcp, syslog) listens and whom it takes data from.
#[derive(Debug, Clone)]
pub(crate) struct Listening {
    pub listen: SocketAddr,
    /// `allowed_peers`, parsed (empty: any).
    pub peers: Arc<[SourceFilter]>,
}

impl Listening {
    /// Checks `listen` and `allowed_peers`; errors name the entry.
    pub fn check(
        scope: &Scope<'_>,
        listen: &str,
        peers: &[String],
    ) -> Result<Listening, ConfigError> {
        let listen = scope.socket_addr("listen", listen)?;
        let peers = peers
            .iter()
            .enumerate()
            .map(|(j, text)| {
                text.parse().map_err(|_| {
                    scope.invalid(
                        &format!("allowed_peers[{j}]"),
                        format!("{text:?} is not an IP address or ip:port"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Listening { listen, peers })
    }
}

/// Refuses an interval below the site's floor (`[safety] min_poll_interval_ms`): asking a plant
/// device or server more often could load it. `asking` says how (`polling`, `sampling`) and
/// `whom` what would be loaded.
pub(crate) fn check_poll_floor(
    scope: &Scope<'_>,
    key: &str,
    interval_ms: u64,
    asking: &str,
    whom: &str,
) -> Result<(), ConfigError> {
    let floor = scope.site().min_poll_interval_ms;
    if interval_ms < floor {
        return Err(scope.invalid(
            key,
            format!(
                "{interval_ms} ms is below the site's floor of {floor} ms \
                 (safety.min_poll_interval_ms): {asking} faster could load the {whom}"
            ),
        ));
    }
    Ok(())
}

pub(crate) fn check_max_connections(
    scope: &Scope<'_>,
    max_connections: usize,
) -> Result<(), ConfigError> {
    if max_connections == 0 {
        return Err(scope.invalid("max_connections", "must be at least 1"));
    }
    Ok(())
}

pub(crate) fn bind_udp(
    addr: SocketAddr,
    receive_buffer_bytes: usize,
) -> std::io::Result<std::net::UdpSocket> {
    udp_socket(addr, Buffer::Receive, receive_buffer_bytes)
}

pub(crate) fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Datagrams taken in one wake-up from which a source counts as busy.
const BUSY_DATAGRAMS_PER_WAKE: usize = 32;
/// How long a busy source lets datagrams gather in its socket before it takes them. At 500,000
/// datagrams a second, waking for each one cost more than taking it; this adds at most this
/// much to a busy source's latency and nothing to a quiet one's.
const BUSY_GATHER: std::time::Duration = std::time::Duration::from_millis(1);
/// Datagrams taken, in a drain that does not end, between wake-ups of the link thread and looks
/// at whether the sender is stopping: a millisecond's worth at 1,000,000 a second.
const DATAGRAMS_PER_CHECK: usize = 1024;
/// How often a quiet source looks whether the sender is stopping.
const SHUTDOWN_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Takes datagrams from allowed peers, one record each, made by `to_record` (payload, origin).
/// A datagram is never waited for: past the topic's ceiling or a full queue it is dropped,
/// counted, since the sending device cannot be slowed.
///
/// On a thread of its own, with its own poller, not on the runtime: while a busy source lets
/// datagrams gather, each one that lands would wake the runtime's poller, and so a worker,
/// for nothing.
pub(crate) fn run_datagrams(
    socket: std::net::UdpSocket,
    peers: Arc<[SourceFilter]>,
    ctx: SourceContext,
    to_record: impl Fn(&[u8], &SourceContext) -> (Bytes, Option<Origin>) + Send + 'static,
) -> std::io::Result<SourceTask> {
    socket.set_nonblocking(true)?;
    let mut socket = mio::net::UdpSocket::from_std(socket);
    let mut poll = mio::Poll::new()?;
    poll.registry()
        .register(&mut socket, mio::Token(0), mio::Interest::READABLE)?;
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("diode-udp-{}", ctx.topic.index()))
        .spawn(move || {
            let mut events = mio::Events::with_capacity(4);
            let mut buf = vec![0u8; 65_536];
            'running: while !ctx.shutdown.is_triggered() {
                // Everything queued in the socket, then back to waiting.
                let mut taken = 0;
                let mut errors_in_a_row = 0;
                loop {
                    let (len, peer) = match socket.recv_from(&mut buf) {
                        Ok(received) => received,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // Go on reading (the poller only wakes for new datagrams), unless
                            // the error repeats.
                            ctx.metrics.errors_io.inc();
                            tracing::debug!(topic = %ctx.name, error = %e, "udp source receive error");
                            errors_in_a_row += 1;
                            if errors_in_a_row >= BUSY_DATAGRAMS_PER_WAKE {
                                break;
                            }
                            continue;
                        }
                    };
                    errors_in_a_row = 0;
                    taken += 1;
                    // A socket that never empties: the link still takes each batch at once, and
                    // a stop is still seen.
                    if taken % DATAGRAMS_PER_CHECK == 0 {
                        ctx.link.wake();
                        if ctx.shutdown.is_triggered() {
                            break 'running;
                        }
                    }
                    if !SourceFilter::allows(&peers, peer) {
                        ctx.metrics.errors_peer.inc();
                    } else if len > ctx.max_record_bytes {
                        ctx.metrics.dropped_oversize.inc();
                    } else if ctx.frameable(None, len) {
                        let (payload, origin) = to_record(&buf[..len], &ctx);
                        if !offer(&ctx, origin, payload) {
                            return;
                        }
                    }
                }
                if taken >= BUSY_DATAGRAMS_PER_WAKE {
                    ctx.link.wake();
                    std::thread::sleep(BUSY_GATHER);
                } else if let Err(e) = poll.poll(&mut events, Some(SHUTDOWN_CHECK)) {
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        ctx.metrics.errors_io.inc();
                        tracing::warn!(topic = %ctx.name, error = %e, "udp source cannot wait for datagrams");
                        std::thread::sleep(SHUTDOWN_CHECK);
                    }
                }
            }
            drop(done);
        })?;
    Ok(Box::pin(async move {
        // Resolves when the thread ends and drops its end.
        let _ = finished.await;
    }))
}

/// Queues a record if there is room now, else drops it, counted; false once the queue is closed.
fn offer(ctx: &SourceContext, origin: Option<Origin>, payload: Bytes) -> bool {
    if ctx
        .rate
        .as_ref()
        .is_some_and(|r| !r.try_acquire(payload.len()))
    {
        if ctx.metrics.dropped_rate.inc() % 10_000 == 0 {
            tracing::warn!(topic = %ctx.name, "topic above its rate_mbps: dropping UDP records (see diode_records_dropped_total)");
        }
        return true;
    }
    let queue_full = |ctx: &SourceContext| {
        if ctx.metrics.dropped_queue_full.inc() % 10_000 == 0 {
            tracing::warn!(topic = %ctx.name, "link queue full: dropping UDP records (see diode_records_dropped_total)");
        }
    };
    let Some(budget) = ctx.budget.try_acquire(payload.len()) else {
        queue_full(ctx);
        return true;
    };
    let ingest = Ingest {
        topic: ctx.topic,
        time_us: unix_time_us(),
        origin,
        payload,
        _budget: budget,
    };
    match ctx.queue.try_send(ingest) {
        Ok(()) => true,
        Err(flume::TrySendError::Full(_)) => {
            queue_full(ctx);
            true
        }
        Err(flume::TrySendError::Disconnected(_)) => false,
    }
}

/// Why a listening source closed one connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}; the stream cannot be resynchronised")]
    Framing(String),
    #[error("the link queue is closed")]
    QueueClosed,
}

impl From<QueueClosed> for ConnectionError {
    fn from(_: QueueClosed) -> Self {
        ConnectionError::QueueClosed
    }
}

/// Accepts connections from allowed peers, at most `max_connections` at once (extra clients
/// wait in the listen backlog), and reads each with `read` until it ends or shutdown.
pub(crate) async fn run_listener<R, F>(
    listener: TcpListener,
    max_connections: usize,
    peers: Arc<[SourceFilter]>,
    ctx: SourceContext,
    read: R,
) where
    R: Fn(TcpStream, SourceContext) -> F + Clone + Send + 'static,
    F: Future<Output = Result<(), ConnectionError>> + Send,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
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
        if !SourceFilter::allows(&peers, peer) {
            static REFUSED: LogThrottle = LogThrottle::new(std::time::Duration::from_secs(60));
            ctx.metrics.errors_peer.inc();
            if let Some(folded) = REFUSED.allow() {
                tracing::warn!(topic = %ctx.name, %peer, folded, "connection refused: the peer is not in allowed_peers");
            }
            continue;
        }
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let read = read.clone();
        tokio::spawn(async move {
            ctx.metrics.connections.inc();
            tracing::debug!(topic = %ctx.name, %peer, "tcp source connection");
            let shutdown = ctx.shutdown.clone();
            let metrics = ctx.metrics.clone();
            let name = ctx.name.clone();
            let result = tokio::select! {
                _ = shutdown.wait() => Ok(()),
                result = read(stream, ctx) => result,
            };
            if let Err(e) = result {
                tracing::warn!(topic = %name, %peer, error = %e, "tcp source connection closed");
            }
            metrics.connections.dec();
            drop(permit);
        });
    }
}
