//! The link thread: reads datagrams, feeds the reassembler, and hands its events to routes,
//! logs and metrics. It never writes to the link socket: the diode has no way back, and the
//! receiver never tries one.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diode_common::Shutdown;
use diode_wire::{proto, Event, Reassembler, ReassemblerStats, Record};

use crate::filter::TopicFilter;
use crate::metrics::{ReceiverMetrics, RouteMetrics, TopicCounters, TopicLabels};

/// How long a read waits before timers are checked.
const READ_TIMEOUT: Duration = Duration::from_millis(5);
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

pub struct RouteHandle {
    pub name: String,
    pub filters: Vec<TopicFilter>,
    pub queue: flume::Sender<Record>,
    pub metrics: RouteMetrics,
}

pub struct LinkThread {
    pub reassembler: Reassembler,
    pub socket: UdpSocket,
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

impl LinkThread {
    pub fn run(mut self) {
        if let Err(e) = self.socket.set_read_timeout(Some(READ_TIMEOUT)) {
            tracing::error!(error = %e, "cannot set the link socket's read timeout");
            return;
        }
        let mut buf = vec![0u8; 65_536];
        let mut last_stats = ReassemblerStats::default();
        let mut matches: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        let mut topic_counters: HashMap<Arc<str>, TopicCounters> = HashMap::new();
        let mut sender = SenderView::default();
        let rcvbuf_start = diode_common::net::udp_rcvbuf_errors();
        let mut rcvbuf_seen = rcvbuf_start.unwrap_or(0);
        let mut next_gauges = Instant::now();
        while !self.shutdown.is_triggered() {
            match self.socket.recv(&mut buf) {
                Ok(len) => {
                    self.metrics.datagrams_received.inc();
                    let _ = self
                        .reassembler
                        .handle_datagram(Instant::now(), &buf[..len]);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "link socket read failed");
                    std::thread::sleep(READ_TIMEOUT);
                }
            }
            let now = Instant::now();
            self.reassembler.handle_timeout(now);
            while let Some(event) = self.reassembler.poll_event() {
                self.handle_event(event, &mut matches, &mut topic_counters, &mut sender);
            }
            let stats = self.reassembler.stats();
            if stats != &last_stats {
                self.metrics.add_stats(stats, &last_stats);
                last_stats = stats.clone();
            }
            if now >= next_gauges {
                next_gauges = now + GAUGE_INTERVAL;
                self.metrics
                    .inflight_bytes
                    .set(self.reassembler.inflight_bytes() as i64);
                if let Some(errors) = diode_common::net::udp_rcvbuf_errors() {
                    if errors > rcvbuf_seen {
                        tracing::warn!(
                            dropped = errors - rcvbuf_seen,
                            "the kernel dropped UDP datagrams for a full receive buffer; \
                             raise link.receive_buffer_bytes and net.core.rmem_max"
                        );
                        self.metrics
                            .kernel_rcvbuf_errors
                            .inc_by(errors - rcvbuf_seen);
                        rcvbuf_seen = errors;
                    }
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
                    let route = &self.routes[i];
                    match route.queue.try_send(record.clone()) {
                        Ok(()) => {}
                        Err(_) => {
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
                tracing::warn!(
                    topic = %gap.topic,
                    first_seq = gap.first_seq,
                    last_seq = gap.last_seq,
                    records = gap.len(),
                    "records lost beyond repair"
                );
                self.topic_counters(topic_counters, &gap.topic)
                    .lost
                    .inc_by(gap.len());
            }
            Event::BlocksLost {
                session_id,
                first,
                last,
            } => {
                tracing::warn!(
                    session = format_args!("{session_id:016x}"),
                    first_block = first,
                    last_block = last,
                    "FEC blocks lost: more datagrams missing than parity could repair"
                );
            }
            Event::SessionStarted {
                session_id,
                previous,
                mid_stream,
            } => match previous {
                Some(previous) => tracing::warn!(
                    session = format_args!("{session_id:016x}"),
                    previous = format_args!("{previous:016x}"),
                    "the sender restarted: new session"
                ),
                None => tracing::info!(
                    session = format_args!("{session_id:016x}"),
                    mid_stream,
                    "receiving session"
                ),
            },
            Event::Heartbeat(heartbeat) => self.mirror_sender(&heartbeat, sender),
            Event::LinkUp => {
                tracing::info!("link up");
                self.metrics.link_up.set(1);
            }
            Event::LinkDown => {
                tracing::warn!("link down: no datagram for four heartbeat intervals");
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
