//! The link thread: reads datagrams, feeds the reassembler, and hands its events to routes,
//! logs and metrics. It never writes to the link socket: the diode has no way back, and the
//! receiver never tries one.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diode_common::budget::ByteBudget;
use diode_common::{LogThrottle, Shutdown};
use diode_wire::{proto, Event, Reassembler, ReassemblerStats, Record};
use quinn_udp::{RecvMeta, UdpSocketState, BATCH_SIZE};
use std::io::IoSliceMut;
use tokio::sync::OwnedSemaphorePermit;

use crate::filter::TopicFilter;
use crate::metrics::{ReceiverMetrics, RouteMetrics, TopicCounters, TopicLabels};

/// The longest the loop sleeps when no timer is due.
const IDLE_WAKE: Duration = Duration::from_millis(100);
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// `recvmmsg` calls per wake-up before timers and events get a turn.
const DRAIN_BATCHES: usize = 16;

/// A record waiting for a sink, holding its share of the route's byte budget.
pub struct Queued {
    pub record: Record,
    pub _budget: OwnedSemaphorePermit,
}

/// What a queued record costs on top of its payload, in the route's byte budget.
const QUEUED_RECORD_OVERHEAD_BYTES: usize = 64;

pub struct RouteHandle {
    pub name: String,
    pub filters: Vec<TopicFilter>,
    /// Deliveries: the records of one pass over the reassembler's events, so that a block's
    /// records reach the sink with one queue operation and one wake-up.
    pub queue: flume::Sender<Vec<Queued>>,
    pub budget: ByteBudget,
    /// Records of the current pass, not yet handed over.
    pub pending: Vec<Queued>,
    pub metrics: RouteMetrics,
}

pub struct LinkThread {
    pub reassembler: Reassembler,
    /// Where the replay floor is kept across restarts, and the floor last written there.
    pub state_file: Option<std::path::PathBuf>,
    pub saved_floor: Option<diode_wire::ReplayFloor>,
    /// Datagrams from other addresses are dropped unread (`link.allowed_sources`).
    pub allowed_sources: Vec<diode_common::net::SourceFilter>,
    pub socket: UdpSocket,
    /// GRO and `recvmmsg` state for `socket`.
    pub udp: UdpSocketState,
    pub routes: Vec<RouteHandle>,
    pub metrics: ReceiverMetrics,
    pub max_topics: usize,
    pub shutdown: Shutdown,
}

/// The sender's cumulative counters as last seen, to turn them into increments.
#[derive(Default)]
struct SenderView {
    session: Option<u64>,
    counters: proto::SenderCounters,
    dropped: HashMap<String, u64>,
}

/// Loss is logged exactly, gap by gap, up to `LOSS_LINES_PER_SEC` lines a second; beyond that
/// (an outage of many blocks, or forged frames) losses are folded per topic into one line with
/// the range they cover and exact counts, logged as soon as the budget allows. Counters always
/// count every record.
struct LossLog {
    tokens: f64,
    refilled: Instant,
    /// Per topic, folded gaps not yet logged: (first, last, records, gaps).
    folded: HashMap<Arc<str>, (u64, u64, u64, u64)>,
    /// Lost blocks not yet logged: (session, first, last, blocks).
    blocks: Option<(u64, u64, u64, u64)>,
    /// The sender's last heartbeat said it was stopping.
    sender_stopping: bool,
}

const LOSS_LINES_PER_SEC: f64 = 20.0;

impl Default for LossLog {
    fn default() -> Self {
        LossLog {
            tokens: LOSS_LINES_PER_SEC,
            refilled: Instant::now(),
            folded: HashMap::new(),
            blocks: None,
            sender_stopping: false,
        }
    }
}

impl LossLog {
    fn take_token(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * LOSS_LINES_PER_SEC).min(LOSS_LINES_PER_SEC);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn gap(&mut self, now: Instant, gap: &diode_wire::Gap) {
        if !self.folded.contains_key(&gap.topic) && self.take_token(now) {
            log_gap(&gap.topic, gap.first_seq, gap.last_seq, gap.len(), 1);
            return;
        }
        let entry =
            self.folded
                .entry(gap.topic.clone())
                .or_insert((gap.first_seq, gap.last_seq, 0, 0));
        entry.0 = entry.0.min(gap.first_seq);
        entry.1 = entry.1.max(gap.last_seq);
        entry.2 += gap.len();
        entry.3 += 1;
    }

    fn blocks(&mut self, now: Instant, session: u64, first: u64, last: u64) {
        let count = (last - first).saturating_add(1);
        match &mut self.blocks {
            Some((s, f, l, n)) if *s == session => {
                *f = (*f).min(first);
                *l = (*l).max(last);
                *n += count;
            }
            _ => {
                self.flush_blocks(now);
                if self.blocks.is_none() && self.take_token(now) {
                    log_blocks(session, first, last, count);
                } else {
                    self.blocks = Some((session, first, last, count));
                }
            }
        }
    }

    fn flush_blocks(&mut self, now: Instant) {
        if self.blocks.is_some() && self.take_token(now) {
            let (session, first, last, count) = self.blocks.take().expect("checked");
            log_blocks(session, first, last, count);
        }
    }

    /// Logs what was folded, as far as the budget allows.
    fn flush_due(&mut self, now: Instant) {
        self.flush_blocks(now);
        while !self.folded.is_empty() && self.take_token(now) {
            let topic = self.folded.keys().next().expect("not empty").clone();
            let (first, last, records, gaps) = self.folded.remove(&topic).expect("present");
            log_gap(&topic, first, last, records, gaps);
        }
    }
}

fn log_gap(topic: &str, first_seq: u64, last_seq: u64, records: u64, gaps: u64) {
    tracing::warn!(
        topic = %topic,
        first_seq,
        last_seq,
        records,
        gaps,
        "records lost beyond repair"
    );
}

fn log_blocks(session: u64, first_block: u64, last_block: u64, blocks: u64) {
    tracing::warn!(
        session = format_args!("{session:016x}"),
        first_block,
        last_block,
        blocks,
        "FEC blocks lost: more datagrams missing than parity could repair"
    );
}

/// Per-loop state that is not configuration.
struct Scratch {
    last_stats: ReassemblerStats,
    matches: HashMap<Arc<str>, Vec<usize>>,
    topic_counters: HashMap<Arc<str>, TopicCounters>,
    sender: SenderView,
    rcvbuf_seen: u64,
    next_gauges: Instant,
    losses: LossLog,
}

impl LinkThread {
    /// Runs until shutdown. Reads are driven by a single-threaded runtime of the thread's own:
    /// readiness, then `recvmmsg` batches of up to 32 buffers, each holding up to 64 datagrams
    /// coalesced by GRO.
    pub fn run(self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the link thread's runtime");
                return;
            }
        };
        runtime.block_on(self.run_loop());
    }

    async fn run_loop(mut self) {
        let socket = match self.socket.try_clone().and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(s)
        }) {
            Ok(socket) => socket,
            Err(e) => {
                tracing::error!(error = %e, "cannot register the link socket");
                return;
            }
        };
        let segments = self.udp.gro_segments().max(1);
        let mut buffers: Vec<Vec<u8>> = (0..BATCH_SIZE)
            .map(|_| vec![0u8; (segments * 1500).max(65_536)])
            .collect();
        let mut metas = vec![RecvMeta::default(); BATCH_SIZE];
        let mut scratch = Scratch {
            last_stats: ReassemblerStats::default(),
            matches: HashMap::new(),
            topic_counters: HashMap::new(),
            sender: SenderView::default(),
            rcvbuf_seen: diode_common::net::udp_rcvbuf_errors().unwrap_or(0),
            next_gauges: Instant::now(),
            losses: LossLog::default(),
        };
        let shutdown = self.shutdown.clone();
        let refused_source =
            self.metrics
                .datagrams_rejected
                .get_or_create_owned(&crate::metrics::ReasonLabels {
                    reason: "source".to_owned(),
                });
        loop {
            let wake = self
                .reassembler
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + IDLE_WAKE)
                .min(Instant::now() + IDLE_WAKE);
            tokio::select! {
                _ = shutdown.wait() => {
                    self.save_floor();
                    return;
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
                ready = socket.readable() => {
                    if let Err(e) = ready {
                        tracing::warn!(error = %e, "link socket failed");
                        tokio::time::sleep(IDLE_WAKE).await;
                    }
                    // Drain what the kernel holds, then see to timers and events.
                    for _ in 0..DRAIN_BATCHES {
                        let mut slices: Vec<IoSliceMut<'_>> = buffers.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                        let received = socket.try_io(tokio::io::Interest::READABLE, || {
                            self.udp.recv((&socket).into(), &mut slices, &mut metas)
                        });
                        let count = match received {
                            Ok(count) => count,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "link socket read failed");
                                break;
                            }
                        };
                        let now = Instant::now();
                        for (meta, buffer) in metas.iter().zip(&buffers).take(count) {
                            let stride = meta.stride.max(1);
                            let allowed = diode_common::net::SourceFilter::allows(&self.allowed_sources, meta.addr);
                            for datagram in buffer[..meta.len].chunks(stride) {
                                self.metrics.datagrams_received.inc();
                                if allowed {
                                    let _ = self.reassembler.handle_datagram(now, datagram);
                                } else {
                                    refused_source.inc();
                                }
                            }
                        }
                        self.after_input(&mut scratch);
                    }
                }
            }
            self.after_input(&mut scratch);
        }
    }

    /// Timers, events, metrics: after every batch of input and every wake-up.
    fn after_input(&mut self, scratch: &mut Scratch) {
        let now = Instant::now();
        self.reassembler.handle_timeout(now);
        while let Some(event) = self.reassembler.poll_event() {
            self.handle_event(
                event,
                &mut scratch.matches,
                &mut scratch.topic_counters,
                &mut scratch.sender,
                &mut scratch.losses,
            );
        }
        scratch.losses.flush_due(now);
        for route in &mut self.routes {
            if !route.pending.is_empty() {
                // A sink gone (shutting down) leaves nothing to do with them.
                let _ = route.queue.send(std::mem::take(&mut route.pending));
            }
        }
        let stats = self.reassembler.stats();
        if stats != &scratch.last_stats {
            self.metrics.add_stats(stats, &scratch.last_stats);
            scratch.last_stats = stats.clone();
        }
        if now >= scratch.next_gauges {
            scratch.next_gauges = now + GAUGE_INTERVAL;
            self.save_floor();
            self.metrics
                .inflight_bytes
                .set(self.reassembler.inflight_bytes() as i64);
            if let Some(errors) = diode_common::net::udp_rcvbuf_errors() {
                if errors > scratch.rcvbuf_seen {
                    tracing::warn!(
                        dropped = errors - scratch.rcvbuf_seen,
                        "the kernel dropped UDP datagrams for a full receive buffer; \
                         raise link.receive_buffer_bytes and net.core.rmem_max"
                    );
                    self.metrics
                        .kernel_rcvbuf_errors
                        .inc_by(errors - scratch.rcvbuf_seen);
                    scratch.rcvbuf_seen = errors;
                }
            }
        }
    }

    /// Writes the replay floor when it moved (once a second at most, and at a clean stop).
    fn save_floor(&mut self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let floor = self.reassembler.replay_floor();
        if floor.is_none() || floor == self.saved_floor {
            return;
        }
        let floor = floor.expect("checked");
        match crate::state::save(path, floor) {
            Ok(()) => self.saved_floor = Some(floor),
            Err(e) => {
                static FAILED: LogThrottle = LogThrottle::new(Duration::from_secs(60));
                if let Some(folded) = FAILED.allow() {
                    tracing::error!(error = %e, folded, "cannot keep the replay floor");
                }
            }
        }
    }

    fn handle_event(
        &mut self,
        event: Event,
        matches: &mut HashMap<Arc<str>, Vec<usize>>,
        topic_counters: &mut HashMap<Arc<str>, TopicCounters>,
        sender: &mut SenderView,
        losses: &mut LossLog,
    ) {
        match event {
            Event::Record(record) => {
                let counters = self.topic_counters(topic_counters, &record.topic);
                counters.out.inc();
                let routes = matches.entry(record.topic.clone()).or_insert_with(|| {
                    self.routes
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.filters.iter().any(|f| f.matches(&record.topic)))
                        .map(|(i, _)| i)
                        .collect()
                });
                if routes.is_empty() {
                    return;
                }
                for &i in routes.iter() {
                    let route = &mut self.routes[i];
                    let cost = record.payload.len() + QUEUED_RECORD_OVERHEAD_BYTES;
                    match route.budget.try_acquire(cost) {
                        Some(budget) => route.pending.push(Queued {
                            record: record.clone(),
                            _budget: budget,
                        }),
                        None => {
                            if route.metrics.dropped.inc() % 10_000 == 0 {
                                tracing::warn!(
                                    route = %route.name,
                                    topic = %record.topic,
                                    seq = record.seq,
                                    "sink queue full: dropping records (see diode_sink_dropped_total)"
                                );
                            }
                        }
                    }
                }
            }
            Event::Gap(gap) => {
                losses.gap(Instant::now(), &gap);
                self.topic_counters(topic_counters, &gap.topic)
                    .lost
                    .inc_by(gap.len());
            }
            Event::BlocksLost {
                session_id,
                first,
                last,
            } => losses.blocks(Instant::now(), session_id, first, last),
            Event::SessionStarted {
                session_id,
                previous,
                mid_stream,
            } => {
                // Sessions only change on a sender's restart or a proven takeover (§6.1), but
                // a line per change is still capped.
                static RESTARTS: LogThrottle = LogThrottle::new(Duration::from_secs(1));
                let stopped_cleanly = std::mem::take(&mut losses.sender_stopping);
                match previous {
                    Some(previous) => {
                        if let Some(folded) = RESTARTS.allow() {
                            tracing::warn!(
                                session = format_args!("{session_id:016x}"),
                                previous = format_args!("{previous:016x}"),
                                stopped_cleanly,
                                folded,
                                "the sender restarted: new session"
                            );
                        }
                    }
                    None => tracing::info!(
                        session = format_args!("{session_id:016x}"),
                        mid_stream,
                        "receiving session"
                    ),
                }
            }
            Event::Heartbeat(heartbeat) => {
                if heartbeat.stopping && !losses.sender_stopping {
                    tracing::info!("the sender is stopping cleanly");
                }
                losses.sender_stopping = heartbeat.stopping;
                self.mirror_sender(&heartbeat, sender)
            }
            Event::LinkUp => {
                tracing::info!("link up");
                self.metrics.link_up.set(1);
            }
            Event::LinkDown => {
                if losses.sender_stopping {
                    tracing::info!("link quiet: the sender stopped cleanly");
                } else {
                    tracing::warn!("link down: no datagram for four heartbeat intervals");
                }
                self.metrics.link_up.set(0);
            }
        }
    }

    fn topic_counters<'a>(
        &self,
        cache: &'a mut HashMap<Arc<str>, TopicCounters>,
        topic: &Arc<str>,
    ) -> &'a TopicCounters {
        // The reassembler caps distinct topics, which bounds this map and the label cardinality.
        cache.entry(topic.clone()).or_insert_with(|| {
            let labels = TopicLabels {
                topic: topic.to_string(),
            };
            TopicCounters {
                out: self.metrics.records_out.get_or_create_owned(&labels),
                lost: self.metrics.records_lost.get_or_create_owned(&labels),
            }
        })
    }

    /// Turns the sender's cumulative counters into increments of our mirrored counters.
    fn mirror_sender(&self, heartbeat: &proto::Heartbeat, view: &mut SenderView) {
        let session = self.reassembler.session_id();
        if view.session != session {
            *view = SenderView {
                session,
                ..SenderView::default()
            };
        }
        self.metrics
            .last_heartbeat_seconds
            .set(diode_common::unix_time_us() / 1_000_000);
        if let Some(c) = &heartbeat.counters {
            let last = &view.counters;
            self.metrics
                .sender_records_in
                .inc_by(c.records_in.saturating_sub(last.records_in));
            self.metrics
                .sender_datagrams_sent
                .inc_by(c.datagrams_sent.saturating_sub(last.datagrams_sent));
            self.metrics
                .sender_link_bytes_sent
                .inc_by(c.link_bytes_sent.saturating_sub(last.link_bytes_sent));
            self.metrics
                .sender_source_errors
                .inc_by(c.source_errors.saturating_sub(last.source_errors));
            view.counters = *c;
        }
        for topic in &heartbeat.topics {
            // Label values come only from valid topic names (no control characters).
            if !diode_wire::is_valid_topic(&topic.name) {
                continue;
            }
            if view.dropped.len() >= self.max_topics && !view.dropped.contains_key(&topic.name) {
                continue;
            }
            let last = view.dropped.entry(topic.name.clone()).or_default();
            if topic.records_dropped > *last {
                self.metrics
                    .sender_records_dropped
                    .get_or_create(&TopicLabels {
                        topic: topic.name.clone(),
                    })
                    .inc_by(topic.records_dropped - *last);
                *last = topic.records_dropped;
            }
        }
    }
}
