//! The link thread: the only place that touches the link socket. It moves records from the source
//! queue into the encoder and the encoder's paced batches of datagrams onto the wire; pacing and
//! batching are the encoder's (diode-wire), so the simulated link checks them. FEC runs here, off
//! the async threads that serve the sources.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use diode_common::{unix_time_us, Shutdown};
use diode_wire::Encoder;
use quinn_udp::{Transmit, UdpSocketState};

use crate::metrics::{SenderMetrics, TopicMetrics};
use crate::sources::Ingest;

/// How often the sources' drop and error counts are copied into the encoder for heartbeats.
const COUNTER_SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// How long a clean stop may take to send what is queued.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

pub struct LinkThread {
    /// This link thread's lane (wire-format.md §7): 0 unless `[[link.lane]]` adds more.
    pub lane: usize,
    pub encoder: Encoder,
    pub socket: UdpSocket,
    /// Segmentation offload state for `socket`.
    pub udp: UdpSocketState,
    pub destination: SocketAddr,
    pub queue: flume::Receiver<Ingest>,
    /// Records of bulk topics (files): taken only when no live record waits, and only while less
    /// than `bulk_room_bytes` is queued ahead of a record pushed now, so a large transfer adds at
    /// most that much link time to a live record's latency.
    pub bulk: flume::Receiver<Ingest>,
    pub bulk_room_bytes: usize,
    pub max_queued_bytes: usize,
    pub metrics: SenderMetrics,
    pub lane_metrics: crate::metrics::LaneMetrics,
    /// Indexed by the lane's topic id.
    pub topics: Vec<TopicMetrics>,
    /// Each topic's index in the configuration, by the lane's topic id: the journal and the
    /// sequence numbers are kept by that index.
    pub globals: Vec<usize>,
    pub shutdown: Shutdown,
    /// Datagrams of one GSO send, back to back.
    pub batch: Vec<u8>,
    pub journal: Option<LinkJournal>,
    /// Sequence numbers kept across restarts (with a journal, or `link.state_file`).
    pub sequences: Option<crate::journal::SharedSequences>,
    /// What the lanes finish together: the sequence numbers kept across restarts, and the
    /// journal's writer.
    pub closing: LanesClosing,
    /// This lane has said it stopped (`close_journal`).
    pub closed: bool,
    /// When reserving sequence numbers last failed: retried a second later, not per record.
    pub reserve_failed: Option<Instant>,
    pub waker: LinkWaker,
}

/// Wakes the link thread before its next timer. While a block is open the thread sleeps until
/// its flush deadline and takes what queued meanwhile in one go; a busy source, whose records
/// fill blocks long before that deadline, wakes it after each batch it queues instead.
#[derive(Clone, Default)]
pub struct LinkWaker(std::sync::Arc<std::sync::OnceLock<std::thread::Thread>>);

impl LinkWaker {
    pub fn wake(&self) {
        if let Some(thread) = self.0.get() {
            thread.unpark();
        }
    }

    /// Makes the calling thread the one woken.
    fn register(&self) {
        let _ = self.0.set(std::thread::current());
    }
}

/// The link thread's side of the journal: what it sends goes in, replayed records come out, and
/// no sequence number is used before it is reserved on disk.
pub struct LinkJournal {
    /// Topic names by index, as the journal's records carry them.
    pub names: Vec<std::sync::Arc<str>>,
    pub handle: crate::journal::JournalHandle,
    /// This lane's topics' replayed records.
    pub replay: flume::Receiver<crate::replay::Replayed>,
    /// Each configured topic's id in this lane's encoder, by configuration index (none for a
    /// topic on another lane).
    pub local_ids: Vec<Option<diode_wire::TopicId>>,
}

/// A link thread that ends any other way than its clean stop (a panic) still counts itself out,
/// so that the other lanes' stop writes the sequence numbers and joins the journal's writer.
impl Drop for LinkThread {
    fn drop(&mut self) {
        self.close_journal();
    }
}

/// What every lane's link thread shares at a clean stop. The last lane to stop writes each
/// topic's exact next sequence number (every lane's topics, so one lane stopping early cannot
/// write another's numbers back) and joins the journal's writer, whose queue closes once every
/// lane has let go of it, so the journal is synced before the sender says it has stopped.
#[derive(Clone)]
pub struct LanesClosing {
    /// How many lanes the link has.
    lanes: usize,
    closing: std::sync::Arc<std::sync::Mutex<Closing>>,
}

struct Closing {
    lanes_running: usize,
    /// By topic index in the configuration; each lane sets its own topics'.
    next: Vec<u64>,
    sequences: Option<crate::journal::SharedSequences>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl LanesClosing {
    pub fn new(
        lanes: usize,
        first_seqs: Vec<u64>,
        sequences: Option<crate::journal::SharedSequences>,
        writer: Option<std::thread::JoinHandle<()>>,
    ) -> Self {
        LanesClosing {
            lanes,
            closing: std::sync::Arc::new(std::sync::Mutex::new(Closing {
                lanes_running: lanes,
                next: first_seqs,
                sequences,
                writer,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Closing> {
        self.closing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lane has stopped, its topics' next numbers by configuration index.
    fn lane_stopped(&self, next: impl IntoIterator<Item = (usize, u64)>) {
        let (sequences, writer) = {
            let mut closing = self.lock();
            for (global, seq) in next {
                if let Some(slot) = closing.next.get_mut(global) {
                    *slot = seq;
                }
            }
            closing.lanes_running = closing.lanes_running.saturating_sub(1);
            if closing.lanes_running > 0 {
                return;
            }
            (
                closing.sequences.take().map(|s| (s, closing.next.clone())),
                closing.writer.take(),
            )
        };
        if let Some((sequences, next)) = sequences {
            if let Err(e) = sequences.close(&next) {
                tracing::error!(error = %e, "cannot keep the sequence numbers");
            }
        }
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

/// Datagrams per send: quinn-udp's batch size, and within the kernel's 64 GSO segments.
const MAX_BATCH_DATAGRAMS: usize = 32;

impl LinkThread {
    pub fn run(mut self) {
        // With several lanes, each link thread's lines say which; one lane logs as it always has.
        let _lane = (self.closing.lanes > 1)
            .then(|| tracing::info_span!("lane", lane = self.lane).entered());
        self.waker.register();
        let mut noted_drops = vec![0u64; self.topics.len()];
        let mut noted_records_in = vec![0u64; self.topics.len()];
        let mut noted_errors = 0u64;
        let mut last_stats = self.encoder.stats().clone();
        let mut stopping_since: Option<Instant> = None;
        // The encoder has been told to finish: the `stopping` heartbeat is on its way.
        let mut finished = false;
        let mut next_counter_sync = Instant::now();
        loop {
            let now = Instant::now();
            let mut disconnected = false;
            let mut live_waiting = false;
            while self.encoder.queued_bytes() < self.max_queued_bytes {
                match self.queue.try_recv() {
                    Ok(ingest) => self.push(now, ingest),
                    Err(flume::TryRecvError::Empty) => break,
                    Err(flume::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
                live_waiting = self.encoder.queued_bytes() >= self.max_queued_bytes;
            }
            // Replayed records only when no live one waits, and into half the queue at most,
            // so that a replay never delays live traffic; none once stopping. Bulk records
            // likewise, and at a stop too, so that what a files source queued is sent.
            if !live_waiting && stopping_since.is_none() {
                self.take_replayed(now);
            }
            if !live_waiting && !finished {
                self.take_bulk(now);
            }
            // Drops at the sources go into heartbeats, so the IT side sees OT-side loss. Heartbeats
            // are hundreds of milliseconds apart: this need not run for every record.
            if now >= next_counter_sync || stopping_since.is_none() && self.shutdown.is_triggered()
            {
                next_counter_sync = now + COUNTER_SYNC_INTERVAL;
                let now_s = unix_time_us() / 1_000_000;
                let mut errors = 0;
                for (i, topic) in self.topics.iter().enumerate() {
                    let id = diode_wire::TopicId::from_index(i);
                    let dropped = topic.dropped_total();
                    if dropped > noted_drops[i] {
                        self.encoder.note_dropped(id, dropped - noted_drops[i]);
                        noted_drops[i] = dropped;
                    }
                    let records_in = topic.records_in.get();
                    if records_in != noted_records_in[i] {
                        noted_records_in[i] = records_in;
                        topic.last_record_seconds.set(now_s);
                    }
                    let topic_errors = topic.errors_total();
                    errors += topic_errors;
                    let connections = topic.connections.get().clamp(0, i64::from(u32::MAX));
                    self.encoder
                        .note_source_state(id, connections as u32, topic_errors);
                }
                self.encoder.note_source_errors(errors - noted_errors);
                noted_errors = errors;
            }

            // The sources are gone only when neither queue has a sender left: a sender whose
            // topics are all bulk (files) has no live queue from the start.
            let sources_gone = disconnected && self.bulk.is_disconnected();
            // A lane without topics (one made ready before topics move onto it) has no source
            // to wait for: it sends its heartbeats, so the IT side sees it up, until shutdown.
            let sources_ended = sources_gone && !self.topics.is_empty();
            if (sources_ended || self.shutdown.is_triggered()) && stopping_since.is_none() {
                stopping_since = Some(now);
            }
            // What bulk sources queued goes out first (a files source saved its place as sent),
            // then the last heartbeat says `stopping`, so that nothing of this session follows
            // it; a bulk queue that will not empty gets half the drain time.
            if let Some(since) = stopping_since {
                let bulk_done = self.bulk.is_empty() || now.duration_since(since) > DRAIN_LIMIT / 2;
                if !finished && bulk_done {
                    finished = true;
                    self.encoder.finish(now, unix_time_us());
                }
            }
            self.encoder.handle_timeout(now, unix_time_us());
            self.transmit(now);
            self.update_metrics(&mut last_stats);

            if let Some(since) = stopping_since {
                if (finished && sources_gone && self.bulk.is_empty() && self.encoder.is_idle())
                    || now.duration_since(since) > DRAIN_LIMIT
                {
                    if !self.encoder.is_idle() {
                        tracing::warn!("stopped before the link queue was empty");
                    }
                    self.close_journal();
                    return;
                }
            }

            // Sleep until the next thing to do: a record, a timer, or pacer credit.
            let wake = self
                .encoder
                .poll_timeout()
                .unwrap_or(now + Duration::from_millis(100))
                .min(now + Duration::from_millis(100));
            let queue_open = !disconnected && self.encoder.queued_bytes() < self.max_queued_bytes;
            // A record only needs this thread at once when it opens a block (its arrival starts
            // the flush deadline); while a block is open, later records wait in the queue until
            // the next timer and are taken in together, rather than waking the thread one by one.
            let waiting_for_first_record = !self.encoder.has_open_block();
            let replay_ready = stopping_since.is_none()
                && self.replay_room()
                && self.journal.as_ref().is_some_and(|j| !j.replay.is_empty());
            // None after the `stopping` heartbeat: nothing of this session may follow it.
            let bulk_ready = !finished && self.bulk_room() && !self.bulk.is_empty();
            let bulk_open = !finished && self.bulk_room() && !self.bulk.is_disconnected();
            if replay_ready || bulk_ready {
                // Replayed or bulk records wait: go round again at once.
            } else if waiting_for_first_record && (queue_open || bulk_open) {
                // A bulk record wakes the thread as a live one does, while it may take one.
                let woken = if queue_open && bulk_open {
                    flume::Selector::new()
                        .recv(&self.queue, Result::ok)
                        .recv(&self.bulk, Result::ok)
                        .wait_deadline(wake)
                        .ok()
                        .flatten()
                } else if queue_open {
                    self.queue.recv_deadline(wake).ok()
                } else {
                    self.bulk.recv_deadline(wake).ok()
                };
                if let Some(ingest) = woken {
                    self.push(Instant::now(), ingest);
                }
            } else if let Some(pause) = wake.checked_duration_since(Instant::now()) {
                std::thread::park_timeout(pause);
            }
        }
    }

    fn push(&mut self, now: Instant, ingest: Ingest) {
        let topic = ingest.topic.index();
        let global = self.globals[topic];
        if let Some(sequences) = &self.sequences {
            let next = self.encoder.next_seq(ingest.topic).unwrap_or(0);
            let retry = self
                .reserve_failed
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1));
            if retry {
                // Synced before the number is used: a crash can skip numbers, never reuse one.
                // If the disk refuses, records still flow (the plant's data comes first), but
                // a crash before it recovers may reuse numbers: said loudly, once a second.
                match sequences.ensure(global, next, now) {
                    Ok(()) => self.reserve_failed = None,
                    Err(e) => {
                        self.reserve_failed = Some(now);
                        self.metrics.journal_errors.inc();
                        tracing::error!(
                            error = %e,
                            "cannot keep the sequence numbers; until it can, a crash may reuse \
                             some"
                        );
                    }
                }
            }
        }
        let kept = self
            .journal
            .as_ref()
            .map(|_| (ingest.origin.clone(), ingest.payload.clone()));
        // The record's budget returns to the sources once the encoder holds it.
        match self.encoder.push_with_origin(
            now,
            ingest.topic,
            ingest.time_us,
            ingest.origin,
            ingest.payload,
        ) {
            Ok(seq) => {
                self.topics[topic].records_in.inc();
                if let (Some(journal), Some((origin, payload))) = (&self.journal, kept) {
                    let entry = crate::journal::Entry {
                        topic: journal.names[global].clone(),
                        seq,
                        session_id: self.encoder.session_id(),
                        time_us: ingest.time_us,
                        origin,
                        late: false,
                        payload,
                    };
                    journal.handle.append(global, entry);
                }
            }
            Err(e) => {
                // Sources check the same limits first; this is the encoder's own guard.
                self.topics[topic].dropped_oversize.inc();
                tracing::warn!(error = %e, "record refused by the encoder");
            }
        }
    }

    fn bulk_room(&self) -> bool {
        // Repair shards held back for outage protection leave later whatever is pushed now:
        // they are not ahead of a live record.
        self.encoder.queued_ahead_bytes() < self.bulk_room_bytes
    }

    fn take_bulk(&mut self, now: Instant) {
        while self.bulk_room() {
            match self.bulk.try_recv() {
                Ok(ingest) => self.push(now, ingest),
                Err(_) => return,
            }
        }
    }

    fn replay_room(&self) -> bool {
        self.encoder.queued_bytes() < self.max_queued_bytes / 2
    }

    fn take_replayed(&mut self, now: Instant) {
        while self.replay_room() {
            let Some(journal) = &self.journal else {
                return;
            };
            let Ok(replayed) = journal.replay.try_recv() else {
                return;
            };
            let entry = replayed.entry;
            let Some(&Some(topic)) = journal.local_ids.get(replayed.topic) else {
                continue;
            };
            let result = self.encoder.push_replay(
                now,
                topic,
                entry.seq,
                entry.time_us,
                entry.origin,
                entry.payload,
            );
            if let Err(e) = result {
                // A journal from before a reset of the sequence file, or damaged: not sent.
                tracing::debug!(error = %e, "replayed record refused by the encoder");
            }
        }
    }

    /// At a clean stop: the exact next sequence numbers, and the journal synced.
    fn close_journal(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        // This lane's hold on the journal's queue goes first, so that the last lane's join
        // finds the writer done.
        self.journal = None;
        let next: Vec<(usize, u64)> = self
            .globals
            .iter()
            .enumerate()
            .map(|(local, global)| {
                let seq = self
                    .encoder
                    .next_seq(diode_wire::TopicId::from_index(local))
                    .unwrap_or(0);
                (*global, seq)
            })
            .collect();
        self.closing.lane_stopped(next);
    }

    /// Sends what the encoder's pacer allows, a GSO batch per system call.
    fn transmit(&mut self, now: Instant) {
        let max_datagrams = self.udp.max_gso_segments().clamp(1, MAX_BATCH_DATAGRAMS);
        while let Some(batch) =
            self.encoder
                .poll_transmit_batch(now, max_datagrams, &mut self.batch)
        {
            let transmit = Transmit {
                destination: self.destination,
                ecn: None,
                contents: &self.batch,
                segment_size: (batch.datagrams > 1).then_some(batch.segment_size),
                src_ip: None,
            };
            match self.udp.try_send((&self.socket).into(), &transmit) {
                Ok(()) => {
                    self.metrics.datagrams_sent.inc_by(batch.datagrams as u64);
                    self.lane_metrics
                        .datagrams_sent
                        .inc_by(batch.datagrams as u64);
                    self.metrics.link_bytes_sent.inc_by(batch.wire_bytes as u64);
                }
                Err(e) => {
                    self.lane_metrics.send_errors.inc_by(batch.datagrams as u64);
                    if self.metrics.send_errors.inc_by(batch.datagrams as u64) < 1000 {
                        tracing::warn!(error = %e, lane = self.lane, destination = %self.destination, "link send failed");
                    }
                }
            }
        }
    }

    fn update_metrics(&mut self, last: &mut diode_wire::EncoderStats) {
        let stats = self.encoder.stats();
        self.metrics
            .blocks_sent
            .inc_by(stats.blocks_sealed - last.blocks_sealed);
        self.metrics
            .heartbeats_sent
            .inc_by(stats.heartbeats - last.heartbeats);
        self.metrics
            .repair_datagrams_sent
            .inc_by(stats.repair_datagrams_out - last.repair_datagrams_out);
        // The unlabelled gauge is every lane's: each adds what its own share moved by.
        let queued = self.encoder.queued_bytes() as i64;
        let before = self.lane_metrics.queued_bytes.set(queued);
        self.metrics.queued_bytes.inc_by(queued - before);
        *last = stats.clone();
    }
}
