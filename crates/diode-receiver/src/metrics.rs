//! The receiver's metrics, including the sender's own counters as carried by heartbeats, so the IT
//! side sees OT-side health. Topic labels only for topics the sender announces (capped).

use diode_wire::{ReassemblerStats, Rejected};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReasonLabels {
    pub route: String,
    pub reason: String,
}

/// The files sink's families (sinks/files.rs); series exist only for routes with a files sink.
#[derive(Clone, Default)]
pub struct FileFamilies {
    pub received: Family<RouteLabels, Counter>,
    pub bytes_received: Family<RouteLabels, Counter>,
    pub bytes_written: Family<RouteLabels, Counter>,
    pub failed: Family<RouteReasonLabels, Counter>,
    pub incomplete: Family<RouteLabels, Gauge>,
    pub incomplete_passes: Family<RouteLabels, Counter>,
    pub deleted: Family<RouteLabels, Counter>,
}

/// One files sink's handles.
#[derive(Clone)]
pub struct FileMetrics {
    route: String,
    families: FileFamilies,
    /// Versions verified and renamed into place.
    pub received: Counter,
    pub bytes_received: Counter,
    /// Chunk bytes written to partial files (more than received when passes overlap).
    pub bytes_written: Counter,
    /// Versions being put together.
    pub incomplete: Gauge,
    /// Passes of the sender's carousel that ended with bytes of a version missing.
    pub incomplete_passes: Counter,
    pub deleted: Counter,
}

impl FileMetrics {
    /// `diode_files_failed_total{reason}`.
    pub fn failed(&self, reason: &str) -> Counter {
        self.families
            .failed
            .get_or_create_owned(&RouteReasonLabels {
                route: self.route.clone(),
                reason: reason.to_owned(),
            })
    }
}

impl FileFamilies {
    pub fn route(&self, route: &str) -> FileMetrics {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        FileMetrics {
            route: route.to_owned(),
            families: self.clone(),
            received: self.received.get_or_create_owned(&labels),
            bytes_received: self.bytes_received.get_or_create_owned(&labels),
            bytes_written: self.bytes_written.get_or_create_owned(&labels),
            incomplete: self.incomplete.get_or_create_owned(&labels),
            incomplete_passes: self.incomplete_passes.get_or_create_owned(&labels),
            deleted: self.deleted.get_or_create_owned(&labels),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "diode_files_received",
            "File versions verified (SHA-256) and renamed into place by a files sink",
            self.received.clone(),
        );
        r.register(
            "diode_file_bytes_received",
            "Bytes of the file versions received",
            self.bytes_received.clone(),
        );
        r.register(
            "diode_file_bytes_written",
            "Chunk bytes written to partial files",
            self.bytes_written.clone(),
        );
        r.register(
            "diode_files_failed",
            "File versions not installed, by reason (path, too_large, verify, conflict, fragmented, evicted, expired, io)",
            self.failed.clone(),
        );
        r.register(
            "diode_files_incomplete",
            "File versions being put together, waiting for chunks from a later pass",
            self.incomplete.clone(),
        );
        r.register(
            "diode_file_passes_incomplete",
            "Carousel passes that ended with bytes of a file version missing",
            self.incomplete_passes.clone(),
        );
        r.register(
            "diode_files_deleted",
            "Files removed because the plant side deleted them",
            self.deleted.clone(),
        );
    }
}

#[derive(Clone)]
pub struct ReceiverMetrics {
    pub datagrams_received: Counter,
    pub datagrams_rejected: Family<ReasonLabels, Counter>,
    pub datagrams_unneeded: Counter,
    pub blocks_complete: Counter,
    pub blocks_recovered: Counter,
    pub blocks_lost: Counter,
    pub frames_malformed: Counter,
    pub records_out: Family<TopicLabels, Counter>,
    pub records_lost: Family<TopicLabels, Counter>,
    pub records_recovered: Family<TopicLabels, Counter>,
    pub records_duplicate: Counter,
    pub replayed_duplicate: Counter,
    pub gaps_open: Gauge,
    pub gaps_forgotten: Counter,
    pub sessions: Counter,
    pub link_up: Gauge,
    pub lane_up: Family<LaneLabels, Gauge>,
    pub lane_datagrams_received: Family<LaneLabels, Counter>,
    pub lane_datagrams_rejected: Family<LaneLabels, Counter>,
    pub lane_topic_conflicts: Counter,
    pub inflight_bytes: Gauge,
    pub kernel_rcvbuf_errors: Counter,
    pub sender_records_in: Counter,
    pub sender_records_dropped: Family<TopicLabels, Counter>,
    pub sender_datagrams_sent: Counter,
    pub sender_link_bytes_sent: Counter,
    pub sender_source_errors: Counter,
    pub last_heartbeat_seconds: Gauge,
    pub sink_delivered: Family<RouteLabels, Counter>,
    pub sink_dropped: Family<RouteLabels, Counter>,
    pub sink_dead_letters: Family<RouteLabels, Counter>,
    pub sink_errors: Family<RouteLabels, Counter>,
    pub sink_queue_bytes: Family<RouteLabels, Gauge>,
    pub sink_backlog_bytes: Family<RouteLabels, Gauge>,
    pub sink_buffer_max_bytes: Family<RouteLabels, Gauge>,
    pub sink_up: Family<RouteLabels, Gauge>,
    /// Datagrams the sender sent that did not arrive, as a fraction, over the last window of
    /// heartbeats at least `LOSS_WINDOW` long.
    pub link_loss_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Datagrams the reassembler accepted (duplicates, forgeries and other sources left out):
    /// what `link_loss_ratio` counts as arrived. Not exported.
    pub datagrams_valid: Counter,
    pub sender_topic_records_in: Family<TopicLabels, Counter>,
    pub sender_source_connections: Family<TopicLabels, Gauge>,
    pub sender_topic_source_errors: Family<TopicLabels, Counter>,
    pub sender_last_record_seconds: Family<TopicLabels, Gauge>,
    pub files: FileFamilies,
}

impl ReceiverMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = ReceiverMetrics {
            datagrams_received: Counter::default(),
            datagrams_rejected: Family::default(),
            datagrams_unneeded: Counter::default(),
            blocks_complete: Counter::default(),
            blocks_recovered: Counter::default(),
            blocks_lost: Counter::default(),
            frames_malformed: Counter::default(),
            records_out: Family::default(),
            records_lost: Family::default(),
            records_recovered: Family::default(),
            records_duplicate: Counter::default(),
            replayed_duplicate: Counter::default(),
            gaps_open: Gauge::default(),
            gaps_forgotten: Counter::default(),
            sessions: Counter::default(),
            link_up: Gauge::default(),
            lane_up: Family::default(),
            lane_datagrams_received: Family::default(),
            lane_datagrams_rejected: Family::default(),
            lane_topic_conflicts: Counter::default(),
            inflight_bytes: Gauge::default(),
            kernel_rcvbuf_errors: Counter::default(),
            sender_records_in: Counter::default(),
            sender_records_dropped: Family::default(),
            sender_datagrams_sent: Counter::default(),
            sender_link_bytes_sent: Counter::default(),
            sender_source_errors: Counter::default(),
            last_heartbeat_seconds: Gauge::default(),
            sink_delivered: Family::default(),
            sink_dropped: Family::default(),
            sink_dead_letters: Family::default(),
            sink_errors: Family::default(),
            sink_queue_bytes: Family::default(),
            sink_backlog_bytes: Family::default(),
            sink_buffer_max_bytes: Family::default(),
            sink_up: Family::default(),
            link_loss_ratio: Gauge::default(),
            datagrams_valid: Counter::default(),
            sender_topic_records_in: Family::default(),
            sender_source_connections: Family::default(),
            sender_topic_source_errors: Family::default(),
            sender_last_record_seconds: Family::default(),
            files: FileFamilies::default(),
        };
        let r = registry;
        r.register(
            "diode_datagrams_received",
            "Datagrams read from the link",
            m.datagrams_received.clone(),
        );
        r.register(
            "diode_datagrams_rejected",
            "Datagrams dropped, by reason (source, truncated, crc, version, auth, malformed, stale, replay, unconfirmed, far_ahead, duplicate, inconsistent, overload)",
            m.datagrams_rejected.clone(),
        );
        r.register(
            "diode_datagrams_unneeded",
            "Valid datagrams for blocks already delivered or given up (mostly spare parity)",
            m.datagrams_unneeded.clone(),
        );
        r.register(
            "diode_blocks_complete",
            "FEC blocks rebuilt",
            m.blocks_complete.clone(),
        );
        r.register(
            "diode_blocks_recovered",
            "FEC blocks that needed parity to rebuild",
            m.blocks_recovered.clone(),
        );
        r.register(
            "diode_blocks_lost",
            "FEC blocks lost beyond repair",
            m.blocks_lost.clone(),
        );
        r.register(
            "diode_frames_malformed",
            "Frames or blocks that did not decode",
            m.frames_malformed.clone(),
        );
        r.register(
            "diode_records_out",
            "Records delivered in order",
            m.records_out.clone(),
        );
        r.register(
            "diode_records_lost",
            "Records lost beyond repair (exact, from sequence gaps)",
            m.records_lost.clone(),
        );
        r.register(
            "diode_records_duplicate",
            "Records dropped as already delivered",
            m.records_duplicate.clone(),
        );
        r.register(
            "diode_records_recovered",
            "Records reported lost, then delivered late from a replay of the sender's journal",
            m.records_recovered.clone(),
        );
        r.register(
            "diode_replayed_records_duplicate",
            "Replayed records dropped: delivered already, or not in any open gap",
            m.replayed_duplicate.clone(),
        );
        r.register(
            "diode_gaps_open",
            "Gaps reported lost and not yet filled by a replay (diode-recv gaps lists them)",
            m.gaps_open.clone(),
        );
        r.register(
            "diode_gaps_forgotten",
            "Open gaps forgotten to stay within their bounds: a replay can no longer fill them",
            m.gaps_forgotten.clone(),
        );
        r.register(
            "diode_sessions",
            "Sender sessions seen (a new one per sender start)",
            m.sessions.clone(),
        );
        r.register(
            "diode_link_up",
            "1 while datagrams arrive on every lane, 0 after four heartbeat intervals of silence on one",
            m.link_up.clone(),
        );
        r.register(
            "diode_lane_up",
            "1 while datagrams arrive on the lane, 0 after four heartbeat intervals of silence",
            m.lane_up.clone(),
        );
        r.register(
            "diode_lane_datagrams_received",
            "Datagrams read from the lane",
            m.lane_datagrams_received.clone(),
        );
        r.register(
            "diode_lane_datagrams_rejected",
            "Datagrams of the lane dropped, for any reason of diode_datagrams_rejected_total",
            m.lane_datagrams_rejected.clone(),
        );
        r.register(
            "diode_lane_topic_conflicts",
            "Records refused because another lane carries their topic",
            m.lane_topic_conflicts.clone(),
        );
        r.register(
            "diode_inflight_bytes",
            "Memory held for blocks being rebuilt",
            m.inflight_bytes.clone(),
        );
        r.register(
            "diode_kernel_udp_rcvbuf_errors",
            "Host-wide UDP datagrams the kernel dropped for a full receive buffer (/proc/net/snmp RcvbufErrors) since start",
            m.kernel_rcvbuf_errors.clone(),
        );
        r.register(
            "diode_sender_records_in",
            "The sender's records taken in, from heartbeats",
            m.sender_records_in.clone(),
        );
        r.register(
            "diode_sender_records_dropped",
            "Records the sender could not take in, from heartbeats",
            m.sender_records_dropped.clone(),
        );
        r.register(
            "diode_sender_datagrams_sent",
            "The sender's datagrams sent, from heartbeats",
            m.sender_datagrams_sent.clone(),
        );
        r.register(
            "diode_sender_link_bytes_sent",
            "The sender's wire bytes sent, from heartbeats",
            m.sender_link_bytes_sent.clone(),
        );
        r.register(
            "diode_sender_source_errors",
            "The sender's source errors, from heartbeats",
            m.sender_source_errors.clone(),
        );
        r.register(
            "diode_last_heartbeat_seconds",
            "Unix time of the last heartbeat received",
            m.last_heartbeat_seconds.clone(),
        );
        r.register(
            "diode_sink_delivered",
            "Records a sink delivered",
            m.sink_delivered.clone(),
        );
        r.register(
            "diode_sink_dropped",
            "Records dropped because a sink's queue was full",
            m.sink_dropped.clone(),
        );
        r.register(
            "diode_sink_dead_letters",
            "Records a sink can never accept (invalid topic name, too large, missing topic), set aside in the route's dead-letter file",
            m.sink_dead_letters.clone(),
        );
        r.register(
            "diode_sink_errors",
            "Sink write or connection errors",
            m.sink_errors.clone(),
        );
        r.register(
            "diode_sink_queue_bytes",
            "Bytes of records waiting for a sink (payloads plus 64 bytes each)",
            m.sink_queue_bytes.clone(),
        );
        r.register(
            "diode_sink_backlog_bytes",
            "Bytes in a route's disk buffer not yet delivered",
            m.sink_backlog_bytes.clone(),
        );
        r.register(
            "diode_sink_buffer_max_bytes",
            "What the route's disk buffer may hold (buffer_max_bytes; 0 without one)",
            m.sink_buffer_max_bytes.clone(),
        );
        r.register(
            "diode_sink_up",
            "1 while the route's sink takes deliveries, 0 from a failed one until one succeeds",
            m.sink_up.clone(),
        );
        r.register(
            "diode_link_loss_ratio",
            "Datagrams the sender had sent by each heartbeat that did not arrive valid, as a fraction, over the last 5 s or more of heartbeats",
            m.link_loss_ratio.clone(),
        );
        r.register(
            "diode_sender_topic_records_in",
            "The sender's records taken in per topic, from its heartbeats",
            m.sender_topic_records_in.clone(),
        );
        r.register(
            "diode_sender_source_connections",
            "The sender's source connections per topic (TCP clients; 1 while connected to a broker or device), from its heartbeats",
            m.sender_source_connections.clone(),
        );
        r.register(
            "diode_sender_topic_source_errors",
            "The sender's source errors per topic, from its heartbeats",
            m.sender_topic_source_errors.clone(),
        );
        r.register(
            "diode_sender_last_record_seconds",
            "Unix time the sender's source last took a record in, per topic, from its heartbeats",
            m.sender_last_record_seconds.clone(),
        );
        m.files.register(r);
        // Every reason exists from the start, at 0, so alerts can be written against it.
        for reason in Rejected::ALL {
            let _ = m.datagrams_rejected.get_or_create(&ReasonLabels {
                reason: reason.as_str().to_owned(),
            });
        }
        m
    }

    /// Adds what the reassembler counted since `last`.
    pub fn add_stats(&self, stats: &ReassemblerStats, last: &ReassemblerStats) {
        self.datagrams_valid
            .inc_by(stats.datagrams_accepted - last.datagrams_accepted);
        self.datagrams_unneeded
            .inc_by(stats.datagrams_unneeded - last.datagrams_unneeded);
        for reason in Rejected::ALL {
            let delta = stats.rejected(reason) - last.rejected(reason);
            if delta > 0 {
                self.datagrams_rejected
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str().to_owned(),
                    })
                    .inc_by(delta);
            }
        }
        self.blocks_complete
            .inc_by(stats.blocks_complete - last.blocks_complete);
        self.blocks_recovered
            .inc_by(stats.blocks_recovered - last.blocks_recovered);
        self.blocks_lost
            .inc_by(stats.blocks_lost - last.blocks_lost);
        self.frames_malformed.inc_by(
            (stats.malformed_frames + stats.malformed_blocks)
                - (last.malformed_frames + last.malformed_blocks),
        );
        self.records_duplicate
            .inc_by(stats.duplicate_records - last.duplicate_records);
        self.replayed_duplicate
            .inc_by(stats.replayed_duplicates - last.replayed_duplicates);
        self.gaps_forgotten
            .inc_by(stats.gaps_forgotten - last.gaps_forgotten);
        self.sessions.inc_by(stats.sessions - last.sessions);
    }

    pub fn route(&self, route: &str, budget: diode_common::budget::ByteBudget) -> RouteMetrics {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        RouteMetrics {
            delivered: self.sink_delivered.get_or_create_owned(&labels),
            dropped: self.sink_dropped.get_or_create_owned(&labels),
            dead_letters: self.sink_dead_letters.get_or_create_owned(&labels),
            errors: self.sink_errors.get_or_create_owned(&labels),
            queue: self.sink_queue_bytes.get_or_create_owned(&labels),
            backlog: self.sink_backlog_bytes.get_or_create_owned(&labels),
            buffer_max: self.sink_buffer_max_bytes.get_or_create_owned(&labels),
            up: {
                // Up until a delivery fails: a route with nothing to deliver is not down.
                let up = self.sink_up.get_or_create_owned(&labels);
                up.set(1);
                up
            },
            health: Arc::default(),
            budget,
            files: self.files.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RouteMetrics {
    pub delivered: Counter,
    pub dropped: Counter,
    pub dead_letters: Counter,
    pub errors: Counter,
    /// Bytes waiting for the sink, as held in `budget`.
    pub queue: Gauge,
    /// Bytes in the route's disk buffer not yet delivered.
    pub backlog: Gauge,
    /// What the route's disk buffer may hold (0: none), for "nearly full" alerts.
    pub buffer_max: Gauge,
    pub budget: diode_common::budget::ByteBudget,
    /// For a files sink's own series.
    pub files: FileFamilies,
    /// `diode_sink_up`.
    pub up: Gauge,
    /// The sink's state and last error, for the status page.
    pub health: Arc<Mutex<SinkHealth>>,
}

/// What the status page says of a route's sink.
#[derive(Debug, Clone, Default)]
pub struct SinkHealth {
    /// Since a delivery failed, until one succeeds.
    pub failing: bool,
    /// When it last changed between delivering and failing (Unix microseconds; 0: never).
    pub since_us: i64,
    /// The last failure: when, and what.
    pub last_error: Option<(i64, String)>,
}

impl RouteMetrics {
    /// A delivery succeeded.
    pub fn sink_delivers(&self) {
        self.up.set(1);
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if health.failing || health.since_us == 0 {
            health.failing = false;
            health.since_us = diode_common::unix_time_us();
        }
    }

    /// A delivery failed with `error`.
    pub fn sink_fails(&self, error: &str) {
        self.up.set(0);
        let now = diode_common::unix_time_us();
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        if !health.failing {
            health.failing = true;
            health.since_us = now;
        }
        health.last_error = Some((now, error.chars().take(300).collect()));
    }
}

/// One topic's delivery counters, resolved once.
#[derive(Clone)]
pub struct TopicCounters {
    pub out: Counter,
    pub lost: Counter,
    pub recovered: Counter,
    /// The last record delivered in order: its sequence number and ingest time, for the page.
    pub last_seq: Option<u64>,
    pub last_time_us: i64,
}

/// The receiver's status page (`/`, `/status.json`): what an IT operator looks at first.
pub static STATUS: diode_common::status::Layout = {
    use diode_common::status::{Chart, Figure, Layout, Table, Unit};
    Layout {
        service: "diode-recv",
        summary: &[
            Figure {
                bad_below: Some(1.0),
                ..Figure::new("Link", "diode_link_up", Unit::UpDown)
            },
            Figure {
                bad_above: Some(5.0),
                ..Figure::new(
                    "Last heartbeat",
                    "diode_last_heartbeat_seconds",
                    Unit::Since,
                )
            },
            Figure::new("Records delivered", "diode_records_out_total", Unit::Count),
            Figure::new("Records lost", "diode_records_lost_total", Unit::Count),
            Figure::new(
                "Recovered late",
                "diode_records_recovered_total",
                Unit::Count,
            ),
            Figure::bad_if_any("Open gaps", "diode_gaps_open"),
            Figure::new(
                "Blocks repaired",
                "diode_blocks_recovered_total",
                Unit::Count,
            ),
            Figure::new("Blocks lost", "diode_blocks_lost_total", Unit::Count),
            Figure::new(
                "Datagrams rejected",
                "diode_datagrams_rejected_total",
                Unit::Count,
            ),
            Figure {
                bad_above: Some(0.05),
                ..Figure::new("Loss on the link", "diode_link_loss_ratio", Unit::Ratio)
            },
            Figure::bad_if_any("Kernel drops", "diode_kernel_udp_rcvbuf_errors_total"),
            Figure::bad_if_any(
                "Dropped at the sender",
                "diode_sender_records_dropped_total",
            ),
            Figure::new(
                "Sender source errors",
                "diode_sender_source_errors_total",
                Unit::Count,
            ),
            Figure::bad_if_any("Dropped at sinks", "diode_sink_dropped_total"),
        ],
        tables: &[
            Table {
                title: "Topics",
                label: "topic",
                columns: &[
                    ("delivered", "diode_records_out_total"),
                    ("delivered/s", "diode_records_out_total"),
                    ("lost", "diode_records_lost_total"),
                    ("recovered late", "diode_records_recovered_total"),
                    (
                        "dropped at the sender",
                        "diode_sender_records_dropped_total",
                    ),
                    ("in/s at the sender", "diode_sender_topic_records_in_total"),
                    ("source connections", "diode_sender_source_connections"),
                    ("source errors", "diode_sender_topic_source_errors_total"),
                    ("taken in ago", "diode_sender_last_record_seconds"),
                ],
                only_nonzero: false,
            },
            Table {
                title: "Routes",
                label: "route",
                columns: &[
                    ("delivered", "diode_sink_delivered_total"),
                    ("delivered/s", "diode_sink_delivered_total"),
                    ("dropped", "diode_sink_dropped_total"),
                    ("dead letters", "diode_sink_dead_letters_total"),
                    ("up", "diode_sink_up"),
                    ("errors", "diode_sink_errors_total"),
                    ("queued bytes", "diode_sink_queue_bytes"),
                    ("disk backlog bytes", "diode_sink_backlog_bytes"),
                    ("disk buffer bytes", "diode_sink_buffer_max_bytes"),
                ],
                only_nonzero: false,
            },
            Table {
                title: "File mirrors",
                label: "route",
                columns: &[
                    ("received", "diode_files_received_total"),
                    ("bytes", "diode_file_bytes_received_total"),
                    ("bytes/s", "diode_file_bytes_written_total"),
                    ("incomplete", "diode_files_incomplete"),
                    ("passes incomplete", "diode_file_passes_incomplete_total"),
                    ("failed", "diode_files_failed_total"),
                    ("deleted", "diode_files_deleted_total"),
                ],
                only_nonzero: false,
            },
            Table {
                title: "Datagrams rejected",
                label: "reason",
                columns: &[("datagrams", "diode_datagrams_rejected_total")],
                only_nonzero: true,
            },
        ],
        charts: &[
            Chart {
                title: "Records delivered",
                metric: "diode_records_out_total",
                scale: 1.0,
                unit: "records/s",
            },
            Chart {
                title: "Datagrams received",
                metric: "diode_datagrams_received_total",
                scale: 1.0,
                unit: "datagrams/s",
            },
            Chart {
                title: "Link rate (the sender's count)",
                metric: "diode_sender_link_bytes_sent_total",
                scale: 8e-6,
                unit: "Mb/s",
            },
            Chart {
                title: "Records lost",
                metric: "diode_records_lost_total",
                scale: 1.0,
                unit: "records/s",
            },
        ],
    }
};
