//! The sender's metrics. Topic labels only for configured topics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: String,
}

/// One lane's own series (wire-format.md §7); the unlabelled link series sum every lane's.
#[derive(Clone)]
pub struct LaneMetrics {
    pub datagrams_sent: Counter,
    pub send_errors: Counter,
    pub queued_bytes: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicReasonLabels {
    pub topic: String,
    pub reason: String,
}

#[derive(Clone)]
pub struct SenderMetrics {
    pub records_in: Family<TopicLabels, Counter>,
    pub records_dropped: Family<TopicReasonLabels, Counter>,
    pub source_errors: Family<TopicReasonLabels, Counter>,
    pub source_connections: Family<TopicLabels, Gauge>,
    pub source_unparsed: Family<TopicLabels, Counter>,
    pub source_polls: Family<TopicLabels, Counter>,
    pub source_last_record_seconds: Family<TopicLabels, Gauge>,
    pub source_last_poll_seconds: Family<TopicLabels, Gauge>,
    /// Monitored items an OPC UA source holds.
    pub source_items: Family<TopicLabels, Gauge>,
    pub datagrams_sent: Counter,
    pub link_bytes_sent: Counter,
    pub blocks_sent: Counter,
    pub heartbeats_sent: Counter,
    pub repair_datagrams_sent: Counter,
    pub send_errors: Counter,
    pub queued_bytes: Gauge,
    pub lane_datagrams_sent: Family<LaneLabels, Counter>,
    pub lane_send_errors: Family<LaneLabels, Counter>,
    pub lane_queued_bytes: Family<LaneLabels, Gauge>,
    pub session_start_seconds: Gauge,
    pub journal_records: Family<TopicLabels, Counter>,
    pub journal_bytes: Family<TopicLabels, Gauge>,
    pub journal_span_seconds: Family<TopicLabels, Gauge>,
    pub journal_dropped: Family<TopicLabels, Counter>,
    pub journal_errors: Counter,
    pub replay: ReplayMetrics,
    pub files: FileFamilies,
}

/// The files source's families (sources/files.rs); series only for topics with a files source.
#[derive(Clone, Default)]
pub struct FileFamilies {
    pub sent: Family<TopicLabels, Counter>,
    pub passes: Family<TopicLabels, Counter>,
    pub bytes_sent: Family<TopicLabels, Counter>,
    pub tracked: Family<TopicLabels, Gauge>,
    pub pending: Family<TopicLabels, Gauge>,
    pub skipped: Family<TopicReasonLabels, Counter>,
    pub deletions: Family<TopicLabels, Counter>,
}

/// One files source's handles.
#[derive(Clone)]
pub struct FileMetrics {
    topic: String,
    families: FileFamilies,
    /// Versions sent whole at least once.
    pub sent: Counter,
    /// Whole passes of the carousel, first passes included.
    pub passes: Counter,
    pub bytes_sent: Counter,
    /// Versions in the carousel.
    pub tracked: Gauge,
    /// Versions not yet sent as many times as configured.
    pub pending: Gauge,
    pub deletions: Counter,
}

impl FileMetrics {
    /// `diode_files_skipped_total{reason}`.
    pub fn skipped(&self, reason: &str) -> Counter {
        self.families
            .skipped
            .get_or_create_owned(&TopicReasonLabels {
                topic: self.topic.clone(),
                reason: reason.to_owned(),
            })
    }
}

/// One journaled topic's handles (see `journal.rs`).
#[derive(Clone)]
pub struct JournalMetrics {
    pub records: Counter,
    pub bytes: Gauge,
    pub span_seconds: Gauge,
    /// Sent but not journaled: the journal's writer fell behind.
    pub dropped: Counter,
}

#[derive(Clone, Default)]
pub struct ReplayMetrics {
    pub requests: Counter,
    /// Records sent again on request.
    pub records: Counter,
    /// Records sent again by continuous backfill.
    pub backfill_records: Counter,
}

/// Per-topic handles, resolved once so the hot path touches only atomics.
#[derive(Clone)]
pub struct TopicMetrics {
    pub records_in: Counter,
    pub dropped_queue_full: Counter,
    pub dropped_oversize: Counter,
    /// Over the topic's own `rate_mbps` (UDP sources, which cannot wait).
    pub dropped_rate: Counter,
    pub errors_io: Counter,
    pub errors_framing: Counter,
    /// A peer this source connects to (MQTT broker, Modbus device) could not be reached.
    pub errors_connect: Counter,
    /// A polled device did not answer in time.
    pub errors_timeout: Counter,
    /// A polled device answered with a Modbus exception.
    pub errors_exception: Counter,
    /// Datagrams or connections from a peer not in `allowed_peers`.
    pub errors_peer: Counter,
    /// Messages that did not parse as their protocol (syslog) and were passed on as raw text.
    pub unparsed: Counter,
    pub polls: Counter,
    pub last_poll_seconds: Gauge,
    /// Set by the link thread when records came in since it last looked.
    pub last_record_seconds: Gauge,
    pub connections: Gauge,
}

impl TopicMetrics {
    pub fn dropped_total(&self) -> u64 {
        self.dropped_queue_full.get() + self.dropped_oversize.get() + self.dropped_rate.get()
    }

    pub fn errors_total(&self) -> u64 {
        self.errors_io.get()
            + self.errors_framing.get()
            + self.errors_connect.get()
            + self.errors_timeout.get()
            + self.errors_exception.get()
            + self.errors_peer.get()
    }
}

impl SenderMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = SenderMetrics {
            records_in: Family::default(),
            records_dropped: Family::default(),
            source_errors: Family::default(),
            source_connections: Family::default(),
            source_unparsed: Family::default(),
            source_polls: Family::default(),
            source_last_record_seconds: Family::default(),
            source_last_poll_seconds: Family::default(),
            source_items: Family::default(),
            datagrams_sent: Counter::default(),
            link_bytes_sent: Counter::default(),
            blocks_sent: Counter::default(),
            heartbeats_sent: Counter::default(),
            repair_datagrams_sent: Counter::default(),
            send_errors: Counter::default(),
            queued_bytes: Gauge::default(),
            lane_datagrams_sent: Family::default(),
            lane_send_errors: Family::default(),
            lane_queued_bytes: Family::default(),
            session_start_seconds: Gauge::default(),
            journal_records: Family::default(),
            journal_bytes: Family::default(),
            journal_span_seconds: Family::default(),
            journal_dropped: Family::default(),
            journal_errors: Counter::default(),
            replay: ReplayMetrics::default(),
            files: FileFamilies::default(),
        };
        registry.register(
            "diode_records_in",
            "Records taken in from sources",
            m.records_in.clone(),
        );
        registry.register(
            "diode_records_dropped",
            "Records not taken in (queue_full: the link is saturated; oversize: above max_record_bytes; rate: above the topic's rate_mbps)",
            m.records_dropped.clone(),
        );
        registry.register(
            "diode_source_errors",
            "Source errors (io, framing; connect: broker or device unreachable; timeout and exception: Modbus polls)",
            m.source_errors.clone(),
        );
        registry.register(
            "diode_source_connections",
            "Open source connections: TCP clients, or 1 while connected to a broker or device",
            m.source_connections.clone(),
        );
        registry.register(
            "diode_source_unparsed_records",
            "Messages passed on as raw text because they did not parse (syslog)",
            m.source_unparsed.clone(),
        );
        registry.register(
            "diode_source_polls",
            "Polls of a device that returned every configured value (Modbus)",
            m.source_polls.clone(),
        );
        registry.register(
            "diode_source_last_record_seconds",
            "Unix time the topic's source last took a record in",
            m.source_last_record_seconds.clone(),
        );
        registry.register(
            "diode_source_last_poll_seconds",
            "Unix time of the last poll that returned every configured value (Modbus), or of the last data changes an OPC UA subscription published",
            m.source_last_poll_seconds.clone(),
        );
        registry.register(
            "diode_source_items",
            "Monitored items an OPC UA source holds on its server",
            m.source_items.clone(),
        );
        registry.register(
            "diode_datagrams_sent",
            "Datagrams sent on the link",
            m.datagrams_sent.clone(),
        );
        registry.register(
            "diode_link_bytes_sent",
            "Wire bytes sent on the link (UDP payload plus IP and UDP headers)",
            m.link_bytes_sent.clone(),
        );
        registry.register(
            "diode_blocks_sent",
            "FEC blocks sent",
            m.blocks_sent.clone(),
        );
        registry.register(
            "diode_heartbeats_sent",
            "Heartbeats sent",
            m.heartbeats_sent.clone(),
        );
        registry.register(
            "diode_repair_datagrams_sent",
            "Repair shards sent again after their block, for outage protection (wire-format.md 3.4)",
            m.repair_datagrams_sent.clone(),
        );
        registry.register(
            "diode_send_errors",
            "Datagrams the socket refused",
            m.send_errors.clone(),
        );
        registry.register(
            "diode_encoder_queued_bytes",
            "Encoded bytes waiting for the link, every lane's",
            m.queued_bytes.clone(),
        );
        registry.register(
            "diode_lane_datagrams_sent",
            "Datagrams sent, by lane",
            m.lane_datagrams_sent.clone(),
        );
        registry.register(
            "diode_lane_send_errors",
            "Datagrams the socket refused, by lane",
            m.lane_send_errors.clone(),
        );
        registry.register(
            "diode_lane_encoder_queued_bytes",
            "Encoded bytes waiting for the link, by lane",
            m.lane_queued_bytes.clone(),
        );
        registry.register(
            "diode_session_start_seconds",
            "Unix time the current session started",
            m.session_start_seconds.clone(),
        );
        registry.register(
            "diode_journal_records",
            "Records written to the journal",
            m.journal_records.clone(),
        );
        registry.register(
            "diode_journal_bytes",
            "Bytes the topic's journal holds on disk",
            m.journal_bytes.clone(),
        );
        registry.register(
            "diode_journal_span_seconds",
            "Ingest time between the oldest and the newest record the topic's journal holds",
            m.journal_span_seconds.clone(),
        );
        registry.register(
            "diode_journal_records_dropped",
            "Records sent but not journaled because the journal's writer fell behind",
            m.journal_dropped.clone(),
        );
        registry.register(
            "diode_journal_errors",
            "Journal writes, syncs or trims that failed (see the log)",
            m.journal_errors.clone(),
        );
        registry.register(
            "diode_replay_requests",
            "Replay requests served (diode-send replay)",
            m.replay.requests.clone(),
        );
        registry.register(
            "diode_replayed_records",
            "Records sent again from the journal on request",
            m.replay.records.clone(),
        );
        registry.register(
            "diode_backfill_records",
            "Records sent again from the journal by continuous backfill",
            m.replay.backfill_records.clone(),
        );
        registry.register(
            "diode_files_sent",
            "File versions sent whole at least once (files source)",
            m.files.sent.clone(),
        );
        registry.register(
            "diode_file_passes",
            "Whole passes of the carousel over a file version, the first included",
            m.files.passes.clone(),
        );
        registry.register(
            "diode_file_bytes_sent",
            "File bytes sent as chunks, every pass counted",
            m.files.bytes_sent.clone(),
        );
        registry.register(
            "diode_files_tracked",
            "File versions in the carousel",
            m.files.tracked.clone(),
        );
        registry.register(
            "diode_files_pending",
            "File versions not yet sent as many times as configured",
            m.files.pending.clone(),
        );
        registry.register(
            "diode_files_skipped",
            "Files not sent, by reason (changed: modified while being sent; too_large; name: a path no receiver takes; unreadable; limit: max_files reached)",
            m.files.skipped.clone(),
        );
        registry.register(
            "diode_file_deletions_sent",
            "Deletions of files sent earlier, announced to the receiver (propagate_deletions)",
            m.files.deletions.clone(),
        );
        m
    }

    pub fn files(&self, topic: &str) -> FileMetrics {
        let labels = TopicLabels {
            topic: topic.to_owned(),
        };
        let f = &self.files;
        FileMetrics {
            topic: topic.to_owned(),
            families: f.clone(),
            sent: f.sent.get_or_create_owned(&labels),
            passes: f.passes.get_or_create_owned(&labels),
            bytes_sent: f.bytes_sent.get_or_create_owned(&labels),
            tracked: f.tracked.get_or_create_owned(&labels),
            pending: f.pending.get_or_create_owned(&labels),
            deletions: f.deletions.get_or_create_owned(&labels),
        }
    }

    pub fn journal(&self, topic: &str) -> JournalMetrics {
        let labels = TopicLabels {
            topic: topic.to_owned(),
        };
        JournalMetrics {
            records: self.journal_records.get_or_create_owned(&labels),
            bytes: self.journal_bytes.get_or_create_owned(&labels),
            span_seconds: self.journal_span_seconds.get_or_create_owned(&labels),
            dropped: self.journal_dropped.get_or_create_owned(&labels),
        }
    }

    pub fn lane(&self, lane: usize) -> LaneMetrics {
        let labels = LaneLabels {
            lane: lane.to_string(),
        };
        LaneMetrics {
            datagrams_sent: self.lane_datagrams_sent.get_or_create_owned(&labels),
            send_errors: self.lane_send_errors.get_or_create_owned(&labels),
            queued_bytes: self.lane_queued_bytes.get_or_create_owned(&labels),
        }
    }

    pub fn topic(&self, topic: &str) -> TopicMetrics {
        let labels = TopicLabels {
            topic: topic.to_owned(),
        };
        let reason = |r: &str| TopicReasonLabels {
            topic: topic.to_owned(),
            reason: r.to_owned(),
        };
        TopicMetrics {
            records_in: self.records_in.get_or_create_owned(&labels),
            dropped_queue_full: self
                .records_dropped
                .get_or_create_owned(&reason("queue_full")),
            dropped_oversize: self
                .records_dropped
                .get_or_create_owned(&reason("oversize")),
            dropped_rate: self.records_dropped.get_or_create_owned(&reason("rate")),
            errors_io: self.source_errors.get_or_create_owned(&reason("io")),
            errors_framing: self.source_errors.get_or_create_owned(&reason("framing")),
            errors_connect: self.source_errors.get_or_create_owned(&reason("connect")),
            errors_timeout: self.source_errors.get_or_create_owned(&reason("timeout")),
            errors_exception: self.source_errors.get_or_create_owned(&reason("exception")),
            errors_peer: self.source_errors.get_or_create_owned(&reason("peer")),
            unparsed: self.source_unparsed.get_or_create_owned(&labels),
            polls: self.source_polls.get_or_create_owned(&labels),
            last_poll_seconds: self.source_last_poll_seconds.get_or_create_owned(&labels),
            last_record_seconds: self.source_last_record_seconds.get_or_create_owned(&labels),
            connections: self.source_connections.get_or_create_owned(&labels),
        }
    }
}

/// The sender's status page (`/`, `/status.json`).
pub static STATUS: diode_common::status::Layout = {
    use diode_common::status::{Chart, Figure, Layout, Table, Unit};
    Layout {
        service: "diode-send",
        summary: &[
            Figure::new(
                "Session started",
                "diode_session_start_seconds",
                Unit::Since,
            ),
            Figure::new("Records in", "diode_records_in_total", Unit::Count),
            Figure {
                bad_above: Some(0.0),
                ..Figure::new(
                    "Records dropped",
                    "diode_records_dropped_total",
                    Unit::Count,
                )
            },
            Figure::new("Source errors", "diode_source_errors_total", Unit::Count),
            Figure::new(
                "Source connections",
                "diode_source_connections",
                Unit::Count,
            ),
            Figure::new("Datagrams sent", "diode_datagrams_sent_total", Unit::Count),
            Figure::new(
                "Link bytes sent",
                "diode_link_bytes_sent_total",
                Unit::Bytes,
            ),
            Figure::new(
                "Queued for the link",
                "diode_encoder_queued_bytes",
                Unit::Bytes,
            ),
            Figure::new("Journal", "diode_journal_bytes", Unit::Bytes),
            Figure {
                bad_above: Some(0.0),
                ..Figure::new(
                    "Not journaled",
                    "diode_journal_records_dropped_total",
                    Unit::Count,
                )
            },
            Figure::new("Replayed", "diode_replayed_records_total", Unit::Count),
        ],
        tables: &[
            Table {
                title: "Topics",
                label: "topic",
                columns: &[
                    ("records in", "diode_records_in_total"),
                    ("in/s", "diode_records_in_total"),
                    ("dropped", "diode_records_dropped_total"),
                    ("source errors", "diode_source_errors_total"),
                    ("connections", "diode_source_connections"),
                    ("polls", "diode_source_polls_total"),
                    ("last record ago", "diode_source_last_record_seconds"),
                    ("last poll ago", "diode_source_last_poll_seconds"),
                    ("journal bytes", "diode_journal_bytes"),
                    ("journal span s", "diode_journal_span_seconds"),
                ],
                only_nonzero: false,
            },
            Table {
                title: "Files",
                label: "topic",
                columns: &[
                    ("versions sent", "diode_files_sent_total"),
                    ("passes", "diode_file_passes_total"),
                    ("bytes sent", "diode_file_bytes_sent_total"),
                    ("bytes/s", "diode_file_bytes_sent_total"),
                    ("pending", "diode_files_pending"),
                    ("tracked", "diode_files_tracked"),
                    ("skipped", "diode_files_skipped_total"),
                    ("deletions", "diode_file_deletions_sent_total"),
                ],
                only_nonzero: false,
            },
        ],
        charts: &[
            Chart {
                title: "Records in",
                metric: "diode_records_in_total",
                scale: 1.0,
                unit: "records/s",
            },
            Chart {
                title: "Link rate",
                metric: "diode_link_bytes_sent_total",
                scale: 8e-6,
                unit: "Mb/s",
            },
            Chart {
                title: "Records dropped",
                metric: "diode_records_dropped_total",
                scale: 1.0,
                unit: "records/s",
            },
        ],
    }
};
