//! What the receiver makes of the reassembler's events: records to the router; losses to
//! counters and to log lines folded within a budget; session and link changes to log lines; the
//! sender's own counters, carried in its heartbeats, mirrored into our metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diode_common::LogThrottle;
use diode_wire::{proto, Event};

use crate::lanes::Verdict;
use crate::metrics::{ReceiverMetrics, TopicCounters, TopicLabels};
use crate::route::Router;

/// Turns events into deliveries, counters and log lines.
pub struct Events {
    pub router: Router,
    /// This link thread's lane, and what it shares with the others.
    pub lane: crate::lanes::Lane,
    /// Records whose topic is moving to this lane from another (wire-format.md §7).
    waiting: Waiting,
    /// When the last pass ended: a clock for what needs no finer one.
    pass_now: Instant,
    metrics: ReceiverMetrics,
    topic_counters: HashMap<Arc<str>, TopicCounters>,
    sender: SenderView,
    /// Topic names that have series of their own from heartbeats, across every session: at most
    /// `max_topics`, so that senders announcing new names session after session cannot grow the
    /// label set without bound.
    labeled_topics: std::collections::HashSet<String>,
    losses: LossLog,
    max_topics: usize,
    pub security: crate::security::SecurityEvents,
    /// The link's state and since when (Unix microseconds), for the status page.
    link_since: Option<(bool, i64)>,
    /// When the sender's session started and its version, as its heartbeats say.
    sender_started_us: i64,
    sender_version: String,
    /// The session the events now handled belong to, from the last `SessionStarted`: that
    /// event comes after every event of the session before, so a heartbeat of the old session
    /// still queued when a new one starts is not taken for the new one's.
    session: Option<u64>,
    /// Sessions only change on a sender's restart or a proven takeover (§6.1), but a line per
    /// change is still capped; per lane, so that one lane's restart line cannot hide another's
    /// takeover.
    restarts: LogThrottle,
}

/// Records of topics moving to this lane, held in order until the lane they come from has seen
/// the sender's new session (at most `TOPIC_HOLD`, lanes.rs), within a budget.
#[derive(Default)]
struct Waiting {
    records: Vec<diode_wire::Record>,
    bytes: usize,
    topics: std::collections::HashSet<Arc<str>>,
}

/// What records may wait for their topic to settle on a lane; past it they are refused,
/// counted as conflicts and logged.
const WAITING_MAX_BYTES: usize = 16 << 20;

impl Waiting {
    fn holds(&self, topic: &Arc<str>) -> bool {
        !self.topics.is_empty() && self.topics.contains(topic)
    }

    fn push(&mut self, record: diode_wire::Record, lane: &crate::lanes::Lane) {
        let cost = record.payload.len() + crate::route::QUEUED_RECORD_OVERHEAD_BYTES;
        if self.bytes + cost > WAITING_MAX_BYTES {
            static FULL: LogThrottle = LogThrottle::new(Duration::from_secs(10));
            if let Some(folded) = FULL.allow() {
                tracing::error!(
                    topic = %record.topic,
                    seq = record.seq,
                    folded,
                    "records of a topic moving to this lane refused: too many waiting"
                );
            }
            lane.count_refused();
            return;
        }
        self.bytes += cost;
        self.topics.insert(record.topic.clone());
        self.records.push(record);
    }
}

/// The sender's cumulative counters as last seen, to turn them into increments.
#[derive(Default)]
struct SenderView {
    session: Option<u64>,
    counters: proto::SenderCounters,
    /// Per topic, what the last heartbeat said.
    topics: HashMap<String, TopicView>,
    /// The start of the window `diode_link_loss_ratio` is measured over: when, the sender's
    /// datagrams sent, ours received.
    loss_window: Option<(Instant, u64, u64)>,
    /// This receiver saw the session start: its counts from 0 are this receiver's to count.
    from_start: bool,
}

#[derive(Default)]
struct TopicView {
    dropped: u64,
    /// None until a first heartbeat of the session: that one sets the baseline of a session
    /// joined mid-stream, so that the mirrored counter counts only what was taken in after the
    /// receiver started listening; a session seen from its start counts from its `first_seq`.
    next_seq: Option<u64>,
    source_errors: Option<u64>,
}

/// `diode_link_loss_ratio` is measured over heartbeats at least this far apart.
const LOSS_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

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
            log_gap(&gap.topic, gap.first_seq, gap.last_seq, gap.records(), 1);
            return;
        }
        let entry =
            self.folded
                .entry(gap.topic.clone())
                .or_insert((gap.first_seq, gap.last_seq, 0, 0));
        entry.0 = entry.0.min(gap.first_seq);
        entry.1 = entry.1.max(gap.last_seq);
        entry.2 += gap.records();
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
    // What an OT operator types in to have them sent again, if the sender keeps a journal.
    tracing::warn!(
        topic = %topic,
        first_seq,
        last_seq,
        records,
        gaps,
        replay = format_args!(
            "diode-send replay --topic {} --seq {first_seq}-{last_seq}",
            diode_common::shell_quote(topic)
        ),
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

impl Events {
    pub fn new(
        router: Router,
        metrics: ReceiverMetrics,
        max_topics: usize,
        security: crate::security::SecurityEvents,
        lane: crate::lanes::Lane,
    ) -> Events {
        Events {
            router,
            lane,
            waiting: Waiting::default(),
            pass_now: Instant::now(),
            metrics,
            topic_counters: HashMap::new(),
            sender: SenderView::default(),
            labeled_topics: Default::default(),
            losses: LossLog::default(),
            max_topics,
            security,
            link_since: None,
            sender_started_us: 0,
            sender_version: String::new(),
            session: None,
            restarts: LogThrottle::new(Duration::from_secs(1)),
        }
    }

    /// The sender's session start and version, as its last heartbeat said (none yet: `None`).
    pub fn sender_notes(&self) -> Option<String> {
        (self.sender_started_us > 0).then(|| {
            format!(
                "started {}, diode-send {}",
                diode_common::format_rfc3339_us(self.sender_started_us),
                self.sender_version
            )
        })
    }

    /// For the status page: the link's state since when, and each topic's last record.
    pub fn status_notes(&self) -> (Option<String>, Vec<Vec<String>>) {
        let link = self.link_since.map(|(up, since)| {
            format!(
                "{} since {}",
                if up { "up" } else { "down" },
                diode_common::format_rfc3339_us(since)
            )
        });
        let mut rows: Vec<Vec<String>> = self
            .topic_counters
            .iter()
            .map(|(topic, c)| {
                vec![
                    topic.to_string(),
                    c.last_seq.map_or("-".into(), |s| s.to_string()),
                    if c.last_time_us == 0 {
                        "-".into()
                    } else {
                        diode_common::format_rfc3339_us(c.last_time_us)
                    },
                ]
            })
            .collect();
        rows.sort();
        (link, rows)
    }

    /// A security event (security.rs), as a log line and to the SIEM when configured.
    pub fn security_event(&mut self, kind: crate::security::Kind, message: String) {
        self.security.emit(&mut self.router, kind, message);
    }

    /// Rejections and losses since the last report, aggregated (security.rs).
    pub fn security_tick(
        &mut self,
        now: Instant,
        stats: &diode_wire::ReassemblerStats,
        refused_source: u64,
        last: bool,
    ) {
        self.security
            .tick(&mut self.router, now, stats, refused_source, last);
    }

    /// Logs what loss lines were folded, as far as the budget allows, and hands the routes
    /// this pass's records.
    pub fn end_pass(&mut self, now: Instant) {
        self.pass_now = now;
        self.settle_waiting();
        self.losses.flush_due(now);
        self.router.flush();
    }

    pub fn handle(&mut self, event: Event) {
        let losses = &mut self.losses;
        match event {
            Event::Record(record) => self.offer(record),
            Event::Gap(gap) => {
                losses.gap(Instant::now(), &gap);
                Self::topic_counters(&self.metrics, &mut self.topic_counters, &gap.topic)
                    .lost
                    .inc_by(gap.records());
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
                self.session = Some(session_id);
                self.lane.set_session(session_id);
                let stopped_cleanly = std::mem::take(&mut losses.sender_stopping);
                match previous {
                    Some(previous) => {
                        if let Some(folded) = self.restarts.allow() {
                            tracing::warn!(
                                session = format_args!("{session_id:016x}"),
                                previous = format_args!("{previous:016x}"),
                                stopped_cleanly,
                                folded,
                                "the sender restarted: new session"
                            );
                            let message = format!(
                                "new sender session {session_id:016x} replaced {previous:016x} \
                                 (stopped cleanly: {stopped_cleanly}; {folded} more since the last)"
                            );
                            self.security.emit(
                                &mut self.router,
                                crate::security::Kind::Session,
                                message,
                            );
                        }
                    }
                    None => {
                        tracing::info!(
                            session = format_args!("{session_id:016x}"),
                            mid_stream,
                            "receiving session"
                        );
                        let message = format!(
                            "sender session {session_id:016x} (joined mid-stream: {mid_stream})"
                        );
                        self.security.emit(
                            &mut self.router,
                            crate::security::Kind::Session,
                            message,
                        );
                    }
                }
            }
            Event::Heartbeat(heartbeat) => {
                if heartbeat.stopping && !losses.sender_stopping {
                    tracing::info!("the sender is stopping cleanly");
                }
                losses.sender_stopping = heartbeat.stopping;
                if let Some(session) = self.session {
                    for topic in &heartbeat.topics {
                        self.lane.announced(&topic.name, session, self.pass_now);
                    }
                }
                self.mirror_sender(&heartbeat)
            }
            Event::KeyInUse { key_id, previous } => {
                let message = if previous {
                    format!(
                        "the sender authenticates with the previous key (id {key_id}): its key \
                         rotation is not done; keep previous_key_file until it is"
                    )
                } else {
                    format!("the sender authenticates with the current key (id {key_id})")
                };
                tracing::info!(key_id, previous, "{message}");
                self.security
                    .emit(&mut self.router, crate::security::Kind::Key, message);
            }
            Event::LinkUp => {
                tracing::info!("link up");
                self.lane.set_up(true);
                self.link_since = Some((true, diode_common::unix_time_us()));
                self.security.emit(
                    &mut self.router,
                    crate::security::Kind::LinkUp,
                    "link up".into(),
                );
            }
            Event::LinkDown => {
                let message = if losses.sender_stopping {
                    tracing::info!("link quiet: the sender stopped cleanly");
                    "link quiet: the sender stopped cleanly"
                } else {
                    tracing::warn!("link down: no datagram for four heartbeat intervals");
                    "link down: no datagram for four heartbeat intervals"
                };
                self.lane.set_up(false);
                self.link_since = Some((false, diode_common::unix_time_us()));
                self.security.emit(
                    &mut self.router,
                    crate::security::Kind::LinkDown,
                    message.into(),
                );
            }
        }
    }

    fn deliver(&mut self, record: &diode_wire::Record) {
        let counters = Self::topic_counters(&self.metrics, &mut self.topic_counters, &record.topic);
        counters.out.inc();
        if record.late {
            counters.recovered.inc();
        } else {
            counters.last_seq = Some(record.seq);
            counters.last_time_us = record.time_us;
        }
        self.router.route(record);
    }

    /// Records that waited for their topic to settle on this lane, in order: delivered once it
    /// has, dropped (counted) if another lane keeps it.
    fn settle_waiting(&mut self) {
        if self.waiting.records.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.waiting.records);
        self.waiting.bytes = 0;
        self.waiting.topics.clear();
        for record in records {
            self.offer(record);
        }
    }

    /// Delivers a record if its topic is this lane's (wire-format.md §7), or has it wait
    /// behind those of its topic that wait already.
    fn offer(&mut self, record: diode_wire::Record) {
        if self.waiting.holds(&record.topic) {
            self.waiting.push(record, &self.lane);
            return;
        }
        match self
            .lane
            .carries(&record.topic, record.session_id, self.pass_now)
        {
            Verdict::Deliver => self.deliver(&record),
            Verdict::Wait => self.waiting.push(record, &self.lane),
            Verdict::Refuse => {}
        }
    }

    fn topic_counters<'a>(
        metrics: &ReceiverMetrics,
        cache: &'a mut HashMap<Arc<str>, TopicCounters>,
        topic: &Arc<str>,
    ) -> &'a mut TopicCounters {
        // The reassembler caps distinct topics, which bounds this map and the label cardinality.
        cache.entry(topic.clone()).or_insert_with(|| {
            let labels = TopicLabels {
                topic: topic.to_string(),
            };
            TopicCounters {
                out: metrics.records_out.get_or_create_owned(&labels),
                lost: metrics.records_lost.get_or_create_owned(&labels),
                recovered: metrics.records_recovered.get_or_create_owned(&labels),
                last_seq: None,
                last_time_us: 0,
            }
        })
    }

    /// Turns the sender's cumulative counters into increments of our mirrored counters.
    fn mirror_sender(&mut self, heartbeat: &proto::Heartbeat) {
        let session = self.session;
        let view = &mut self.sender;
        if view.session != session {
            *view = SenderView {
                session,
                ..SenderView::default()
            };
            // A session whose first heartbeats this receiver reads (sent, by the sender's own
            // clock, within two intervals of its start) is counted from 0. One that was running
            // before (a receiver restart, or a receiver started after the sender) is counted
            // from its first heartbeat here: the sender's totals so far would show as a burst
            // of records in, drops and errors that did not happen now.
            let age_us = heartbeat
                .sent_time_us
                .saturating_sub(heartbeat.session_start_time_us);
            let early_us = 2 * i64::from(heartbeat.heartbeat_interval_ms) * 1000 + 100_000;
            view.from_start = session.is_some() && age_us <= early_us;
            if !view.from_start {
                if let Some(c) = &heartbeat.counters {
                    view.counters = *c;
                }
            }
        }
        self.metrics
            .last_heartbeat_seconds
            .set(diode_common::unix_time_us() / 1_000_000);
        self.sender_started_us = heartbeat.session_start_time_us;
        self.sender_version.clone_from(&heartbeat.sender_version);
        if let Some(c) = &heartbeat.counters {
            let last = &view.counters;
            let m = &self.metrics;
            // Loss on the link: what the sender had sent by this heartbeat (queued ahead of it
            // included) against what arrived here and was valid.
            let received = m.datagrams_valid.get();
            let sent_by_now = if c.datagrams_before > 0 {
                c.datagrams_before
            } else {
                c.datagrams_sent
            };
            let now = Instant::now();
            match view.loss_window {
                Some((at, sent, got)) if now.duration_since(at) >= LOSS_WINDOW => {
                    let sent_now = sent_by_now.saturating_sub(sent);
                    let got_now = received.saturating_sub(got);
                    if sent_now > 0 {
                        let lost = sent_now.saturating_sub(got_now) as f64 / sent_now as f64;
                        self.lane.set_loss_ratio(lost);
                    }
                    view.loss_window = Some((now, sent_by_now, received));
                }
                Some(_) => {}
                None => view.loss_window = Some((now, sent_by_now, received)),
            }
            for (mirror, now, before) in [
                (&m.sender_records_in, c.records_in, last.records_in),
                (
                    &m.sender_datagrams_sent,
                    c.datagrams_sent,
                    last.datagrams_sent,
                ),
                (
                    &m.sender_link_bytes_sent,
                    c.link_bytes_sent,
                    last.link_bytes_sent,
                ),
                (&m.sender_source_errors, c.source_errors, last.source_errors),
            ] {
                mirror.inc_by(now.saturating_sub(before));
            }
            view.counters = *c;
        }
        for topic in &heartbeat.topics {
            // Label values come only from valid topic names (no control characters).
            if !diode_wire::is_valid_topic(&topic.name) {
                continue;
            }
            if !self.labeled_topics.contains(&topic.name) {
                if self.labeled_topics.len() >= self.max_topics {
                    continue;
                }
                self.labeled_topics.insert(topic.name.clone());
            }
            let last = view.topics.entry(topic.name.clone()).or_default();
            let labels = TopicLabels {
                topic: topic.name.clone(),
            };
            let m = &self.metrics;
            // A topic first heard of in a session joined mid-stream: its counts so far are the
            // baseline (as `next_seq` and `source_errors` are, being None until now).
            if last.next_seq.is_none() && !view.from_start {
                last.dropped = topic.records_dropped;
            }
            if topic.records_dropped > last.dropped {
                m.sender_records_dropped
                    .get_or_create(&labels)
                    .inc_by(topic.records_dropped - last.dropped);
                last.dropped = topic.records_dropped;
            }
            // Seen from its start, a session's numbering is counted from where it began.
            let baseline = last.next_seq.or(view.from_start.then_some(topic.first_seq));
            if let Some(before) = baseline {
                m.sender_topic_records_in
                    .get_or_create(&labels)
                    .inc_by(topic.next_seq.saturating_sub(before));
            }
            last.next_seq = Some(topic.next_seq);
            if let Some(before) = last.source_errors {
                m.sender_topic_source_errors
                    .get_or_create(&labels)
                    .inc_by(topic.source_errors.saturating_sub(before));
            } else {
                let _ = m.sender_topic_source_errors.get_or_create(&labels);
            }
            last.source_errors = Some(topic.source_errors);
            m.sender_source_connections
                .get_or_create(&labels)
                .set(i64::from(topic.source_connections));
            if topic.last_record_time_us > 0 {
                m.sender_last_record_seconds
                    .get_or_create(&labels)
                    .set(topic.last_record_time_us / 1_000_000);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lanes::{Lane, Lanes};

    fn lane_events(index: usize, lanes: &Arc<Lanes>, metrics: &ReceiverMetrics) -> Events {
        let (router, _) = Router::start(Vec::new(), metrics).unwrap();
        Events::new(
            router,
            metrics.clone(),
            64,
            crate::security::SecurityEvents::new(
                None,
                Arc::new(std::sync::Mutex::new(0)),
                Some(index),
            ),
            Lane::new(index, lanes.clone(), metrics),
        )
    }

    fn started(session_id: u64, previous: Option<u64>) -> Event {
        Event::SessionStarted {
            session_id,
            previous,
            mid_stream: false,
        }
    }

    /// The old session's last heartbeat, read in the same pass as the new session's first
    /// datagrams, still names the old session's topics: it must not claim them for the new
    /// session, which would refuse them on the lane the restarted sender moved them to.
    #[test]
    fn a_heartbeat_read_before_a_new_session_started_speaks_for_the_old_one() {
        let metrics = ReceiverMetrics::new(&mut prometheus_client::registry::Registry::default());
        let lanes = Lanes::new(2, false, &metrics);
        let (mut lane_0, mut lane_1) = (
            lane_events(0, &lanes, &metrics),
            lane_events(1, &lanes, &metrics),
        );
        let (old, new) = (7 << 20, 8 << 20);
        let topic: Arc<str> = Arc::from("cell2/pressure");
        lane_1.handle(started(old, None));
        lane_1.handle(Event::Heartbeat(Box::new(proto::Heartbeat {
            stopping: true,
            topics: vec![proto::TopicStatus {
                name: topic.to_string(),
                next_seq: 500,
                ..Default::default()
            }],
            ..Default::default()
        })));
        lane_1.handle(started(new, Some(old)));
        lane_0.handle(started(new, None));
        lane_0.handle(Event::Record(diode_wire::Record {
            topic: topic.clone(),
            seq: 500,
            session_id: new,
            time_us: 1,
            origin: None,
            late: false,
            payload: bytes::Bytes::from_static(b"x"),
        }));
        assert_eq!(
            metrics.lane_topic_conflicts.get(),
            0,
            "refused on its new lane"
        );
        assert!(!lane_0.waiting.holds(&topic));
    }
}
