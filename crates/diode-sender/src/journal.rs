//! The sender's journal: every record it sends, kept on disk per topic within a size and age
//! budget, so that what the receiver reports lost can be sent again (`diode-send replay`, or
//! continuously in the background) with no return channel. And the sequence numbers: kept
//! ahead of use in a small synced file, so a restarted sender goes on where the last one left
//! off and a (topic, sequence number) pair never names two different records.
//!
//! ```text
//! <dir>/sequences                      next sequence number per topic, reserved ahead (synced)
//! <dir>/topics/<topic>/<first seq>.seg records as diode_wire::stored keeps them
//! <dir>/replay/<id>.req                requests written by `diode-send replay`
//! ```
//!
//! Entries are written by a thread of their own, fed by the link thread through a bounded
//! channel (a full channel costs the journal an entry, counted, never the link a record). A
//! torn last entry after a crash fails its CRC and ends the segment there.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diode_wire::{stored, Record};

use crate::metrics::JournalMetrics;

const SEGMENT_MAGIC: &[u8; 8] = b"DIODEJ1\n";
/// An entry larger than this is not one the sender wrote (records are at most 16 MiB).
const MAX_ENTRY_BYTES: usize = 64 << 20;
/// How often written entries are synced to disk and the budget is enforced.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Sequence numbers reserved at a time, at least and at most: a crash skips at most the unused
/// rest of a reservation, which the receiver reports as a gap that replay cannot fill.
const MIN_RESERVATION: u64 = 256;
const MAX_RESERVATION: u64 = 1 << 20;

/// One record as the journal keeps it: with its topic, its session and when it was taken in.
pub type Entry = Record;

/// A topic's journal budget: the oldest segments go first when either is exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub max_bytes: u64,
    pub max_age: Duration,
}

/// The directory a topic's segments live in: its name with every byte outside `[A-Za-z0-9._-]`
/// written as `%XX`, so no topic can name a path outside the journal.
pub fn topic_dir(root: &Path, topic: &str) -> PathBuf {
    let mut name = String::new();
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && !name.is_empty()) {
            name.push(b as char);
        } else {
            name += &format!("%{b:02X}");
        }
    }
    root.join("topics").join(name)
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// Reads a segment's entries in order, stopping at the first that is torn or damaged.
pub struct SegmentReader {
    file: io::BufReader<File>,
    /// Bytes of whole, valid entries read so far, the magic included.
    pub valid_len: u64,
    buf: Vec<u8>,
}

impl SegmentReader {
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut file = io::BufReader::with_capacity(256 << 10, File::open(path)?);
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic)?;
        if &magic != SEGMENT_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a journal segment",
            ));
        }
        Ok(SegmentReader {
            file,
            valid_len: SEGMENT_MAGIC.len() as u64,
            buf: Vec::new(),
        })
    }

    pub fn next_entry(&mut self) -> Option<Entry> {
        let mut head = [0u8; stored::HEADER_BYTES];
        self.file.read_exact(&mut head).ok()?;
        let (len, crc) = stored::header(head);
        if len > MAX_ENTRY_BYTES {
            return None;
        }
        self.buf.resize(len, 0);
        self.file.read_exact(&mut self.buf).ok()?;
        let entry = stored::decode(&self.buf, crc)?;
        self.valid_len += (stored::HEADER_BYTES + len) as u64;
        Some(entry)
    }
}

/// A segment on disk: its first sequence number (from its name) and its size.
#[derive(Debug, Clone)]
pub struct Segment {
    pub path: PathBuf,
    pub first_seq: u64,
    pub bytes: u64,
}

/// A topic's segments, oldest first.
pub fn segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut out = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(first_seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        out.push(Segment {
            path: entry.path(),
            first_seq,
            bytes: entry.metadata()?.len(),
        });
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// What a topic's journal holds, for `replay` and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_time_us: i64,
    pub last_time_us: i64,
    pub records: u64,
    pub bytes: u64,
}

/// Reads every entry of a topic's journal in sequence order whose sequence number is in `seqs`
/// and whose time is in `times`, handing each to `each` (which returns false to stop).
pub fn scan(
    dir: &Path,
    seqs: std::ops::RangeInclusive<u64>,
    times: std::ops::RangeInclusive<i64>,
    mut each: impl FnMut(Entry) -> bool,
) -> io::Result<()> {
    let segments = segments(dir)?;
    for (i, segment) in segments.iter().enumerate() {
        // A segment holds sequence numbers below the next one's first.
        let end = segments.get(i + 1).map_or(u64::MAX, |s| s.first_seq);
        if end <= *seqs.start() || segment.first_seq > *seqs.end() {
            continue;
        }
        // Ingest times only go up along a topic (one clock): a segment whose successor begins
        // before the window holds nothing in it, and is not read (continuous backfill).
        if *times.start() > i64::MIN {
            let next_first = segments
                .get(i + 1)
                .and_then(|s| SegmentReader::open(&s.path).ok()?.next_entry());
            if next_first.is_some_and(|e| e.time_us < *times.start()) {
                continue;
            }
        }
        let mut reader = match SegmentReader::open(&segment.path) {
            Ok(reader) => reader,
            // Deleted by the budget meanwhile, or being created.
            Err(_) => continue,
        };
        while let Some(entry) = reader.next_entry() {
            if entry.seq > *seqs.end() {
                return Ok(());
            }
            if seqs.contains(&entry.seq) && times.contains(&entry.time_us) && !each(entry) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// What a topic's journal holds now.
pub fn span(dir: &Path) -> io::Result<Option<Span>> {
    span_with(dir, |_| {})
}

/// As `span`, handing each record to `also` on the way: one read of the journal for both.
pub fn span_with(dir: &Path, mut also: impl FnMut(&Entry)) -> io::Result<Option<Span>> {
    let mut span: Option<Span> = None;
    scan(dir, 0..=u64::MAX, i64::MIN..=i64::MAX, |entry| {
        also(&entry);
        let s = span.get_or_insert(Span {
            first_seq: entry.seq,
            first_time_us: entry.time_us,
            ..Span::default()
        });
        s.last_seq = entry.seq;
        s.last_time_us = entry.time_us;
        s.records += 1;
        true
    })?;
    if let Some(s) = span.as_mut() {
        s.bytes = segments(dir)?.iter().map(|s| s.bytes).sum();
    }
    Ok(span)
}

/// One topic's journal as the writer keeps it.
struct TopicJournal {
    dir: PathBuf,
    budget: Budget,
    /// Closed segments, oldest first.
    closed: Vec<Closed>,
    active: Option<Active>,
    metrics: JournalMetrics,
    /// One past the last sequence number it held at start: the run's numbers begin no lower.
    next_seq: u64,
}

struct Closed {
    segment: Segment,
    first_time_us: i64,
    last_time_us: i64,
}

struct Active {
    segment: Segment,
    file: File,
    /// Encoded records not yet written: records are encoded straight into it (their one copy
    /// in this process) and it goes to the file in large writes.
    pending: Vec<u8>,
    last_time_us: i64,
    first_time_us: i64,
}

/// Pending bytes written out at once.
const WRITE_BYTES: usize = 1 << 20;

impl Active {
    fn write_pending(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.file.write_all(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }
}

impl TopicJournal {
    fn open(dir: PathBuf, budget: Budget, metrics: JournalMetrics) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        let mut closed = Vec::new();
        let mut newest_seq = None;
        for segment in segments(&dir)? {
            // Its times, read once at start (segments are at most 64 MiB).
            let (mut first_time_us, mut last_time_us) = (None, i64::MIN);
            let mut valid = SEGMENT_MAGIC.len() as u64;
            if let Ok(mut reader) = SegmentReader::open(&segment.path) {
                while let Some(entry) = reader.next_entry() {
                    first_time_us.get_or_insert(entry.time_us);
                    last_time_us = entry.time_us;
                    newest_seq = newest_seq.max(Some(entry.seq));
                }
                valid = reader.valid_len;
            }
            if valid < segment.bytes {
                // A torn tail from a crash: cut it off, so appends never follow garbage.
                OpenOptions::new()
                    .write(true)
                    .open(&segment.path)?
                    .set_len(valid)?;
            }
            let segment = Segment {
                bytes: valid,
                ..segment
            };
            closed.push(Closed {
                segment,
                first_time_us: first_time_us.unwrap_or(last_time_us),
                last_time_us,
            });
        }
        // One past the newest record of any segment, as read above.
        let next_seq = newest_seq.map_or(0, |s: u64| s.saturating_add(1));
        let journal = TopicJournal {
            dir,
            budget,
            closed,
            active: None,
            metrics,
            next_seq,
        };
        journal.update_metrics();
        Ok(journal)
    }

    fn segment_limit(&self) -> u64 {
        (self.budget.max_bytes / 8).clamp(1 << 20, 64 << 20)
    }

    fn append(&mut self, entry: &Entry) -> io::Result<()> {
        // Sized before encoding, from the payload and a margin for its header and fields:
        // segments need not be exact.
        let estimate = (entry.payload.len() + entry.topic.len() + 96) as u64;
        if self
            .active
            .as_ref()
            .is_some_and(|a| a.segment.bytes + estimate > self.segment_limit())
        {
            self.close_active()?;
        }
        if self.active.is_none() {
            let path = self.dir.join(segment_name(entry.seq));
            // Numbers only go up (see `Sequences`), so a segment's name is never taken: an
            // existing file is an error, not something to overwrite.
            let mut file = OpenOptions::new()
                .create_new(true)
                .write(true)
                .open(&path)?;
            file.write_all(SEGMENT_MAGIC)?;
            self.active = Some(Active {
                segment: Segment {
                    path,
                    first_seq: entry.seq,
                    bytes: SEGMENT_MAGIC.len() as u64,
                },
                file,
                pending: Vec::with_capacity(WRITE_BYTES + (64 << 10)),
                last_time_us: entry.time_us,
                first_time_us: entry.time_us,
            });
        }
        let active = self.active.as_mut().expect("opened above");
        let before = active.pending.len();
        stored::encode(entry, &mut active.pending);
        active.segment.bytes += (active.pending.len() - before) as u64;
        active.last_time_us = entry.time_us;
        if active.pending.len() >= WRITE_BYTES {
            active.write_pending()?;
        }
        self.metrics.records.inc();
        Ok(())
    }

    fn close_active(&mut self) -> io::Result<()> {
        if let Some(mut active) = self.active.take() {
            active.write_pending()?;
            active.file.sync_data()?;
            self.closed.push(Closed {
                segment: active.segment,
                first_time_us: active.first_time_us,
                last_time_us: active.last_time_us,
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.active.as_mut() {
            Some(active) => active.write_pending(),
            None => Ok(()),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        if let Some(active) = self.active.as_mut() {
            active.write_pending()?;
            active.file.sync_data()?;
        }
        Ok(())
    }

    /// Drops the oldest closed segments past the budget's size or age; a quiet topic's active
    /// segment, once all of it is too old, is closed so that it goes too.
    fn enforce_budget(&mut self, now_us: i64) -> io::Result<()> {
        let max_age_us = self.budget.max_age.as_micros().min(i64::MAX as u128) as i64;
        if self
            .active
            .as_ref()
            .is_some_and(|a| now_us.saturating_sub(a.last_time_us) > max_age_us)
        {
            self.close_active()?;
        }
        while let Some(oldest) = self.closed.first() {
            let too_big = self.bytes() > self.budget.max_bytes;
            let too_old = now_us.saturating_sub(oldest.last_time_us) > max_age_us;
            if !(too_big || too_old) {
                break;
            }
            match fs::remove_file(&oldest.segment.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.closed.remove(0);
        }
        self.update_metrics();
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.closed.iter().map(|c| c.segment.bytes).sum::<u64>()
            + self.active.as_ref().map_or(0, |a| a.segment.bytes)
    }

    fn update_metrics(&self) {
        self.metrics.bytes.set(self.bytes() as i64);
        let first = self
            .closed
            .first()
            .map(|c| c.first_time_us)
            .or(self.active.as_ref().map(|a| a.first_time_us));
        let last = self
            .active
            .as_ref()
            .map(|a| a.last_time_us)
            .or(self.closed.last().map(|c| c.last_time_us));
        let span_us = match (first, last) {
            (Some(first), Some(last)) => last.saturating_sub(first).max(0),
            _ => 0,
        };
        self.metrics.span_seconds.set(span_us / 1_000_000);
    }
}

/// One record for the writer thread: the topic's index in the configuration and the record.
pub struct Append {
    pub topic: usize,
    pub entry: Entry,
    /// Its share of the writer's queue, returned once written.
    _room: tokio::sync::OwnedSemaphorePermit,
}

/// The journal writer: its own thread, fed by [`JournalHandle::append`].
pub struct JournalWriter {
    topics: Vec<Option<TopicJournal>>,
    /// Set by `start`: reservations made here, ahead of the link thread.
    pub sequences: Option<SharedSequences>,
    rx: flume::Receiver<Append>,
    errors: prometheus_client::metrics::counter::Counter,
}

/// The link thread's end of the journal.
#[derive(Clone)]
pub struct JournalHandle {
    tx: flume::Sender<Append>,
    /// Which topics are journaled, by index.
    journaled: std::sync::Arc<[bool]>,
    dropped: Vec<prometheus_client::metrics::counter::Counter>,
    room: diode_common::budget::ByteBudget,
}

/// Bytes of records the link thread may be ahead of the writer by before records go
/// unjournaled (counted): what bounds the journal's memory when the disk is slower than the link.
const WRITER_QUEUE_BYTES: usize = 64 << 20;
/// ... and records, for small ones.
const WRITER_QUEUE_ENTRIES: usize = 1 << 16;

impl JournalHandle {
    /// Hands a sent record to the writer; never blocks (a full queue drops it, counted).
    pub fn append(&self, topic: usize, entry: Entry) {
        if !self.journaled.get(topic).copied().unwrap_or(false) {
            return;
        }
        let Some(room) = self.room.try_acquire(entry.payload.len() + 64) else {
            self.dropped[topic].inc();
            return;
        };
        let append = Append {
            topic,
            entry,
            _room: room,
        };
        if self.tx.try_send(append).is_err() {
            self.dropped[topic].inc();
        }
    }
}

/// Opens (and creates) the journal of each topic that has a budget (`None`: not journaled).
pub fn open_writer(
    root: &Path,
    topics: &[(String, Option<Budget>, JournalMetrics)],
    errors: prometheus_client::metrics::counter::Counter,
) -> io::Result<(JournalWriter, JournalHandle, Vec<u64>)> {
    let mut journals = Vec::new();
    let mut journaled = Vec::new();
    let mut dropped = Vec::new();
    for (name, budget, metrics) in topics {
        dropped.push(metrics.dropped.clone());
        journaled.push(budget.is_some());
        journals.push(match budget {
            Some(budget) => Some(TopicJournal::open(
                topic_dir(root, name),
                *budget,
                metrics.clone(),
            )?),
            None => None,
        });
    }
    let next_seqs = journals
        .iter()
        .map(|j| j.as_ref().map_or(0, |j| j.next_seq))
        .collect();
    let (tx, rx) = flume::bounded(WRITER_QUEUE_ENTRIES);
    Ok((
        JournalWriter {
            topics: journals,
            sequences: None,
            rx,
            errors,
        },
        JournalHandle {
            tx,
            journaled: journaled.into(),
            dropped,
            room: diode_common::budget::ByteBudget::new(WRITER_QUEUE_BYTES),
        },
        next_seqs,
    ))
}

impl JournalWriter {
    /// Writes until every [`JournalHandle`] is gone, then syncs and returns.
    pub fn run(mut self) {
        let mut next_sync = Instant::now() + SYNC_INTERVAL;
        let mut noted_errors = 0u32;
        let mut error =
            |e: io::Error, what: &str, errors: &prometheus_client::metrics::counter::Counter| {
                errors.inc();
                noted_errors += 1;
                if noted_errors <= 100 {
                    tracing::error!(error = %e, "journal: {what}");
                }
            };
        loop {
            // Woken at least every 50 ms, so reservations asked for are made in time.
            let wake = next_sync.min(Instant::now() + Duration::from_millis(50));
            let first = match self.rx.recv_deadline(wake) {
                Ok(append) => Some(append),
                Err(flume::RecvTimeoutError::Timeout) => None,
                Err(flume::RecvTimeoutError::Disconnected) => break,
            };
            // Whatever has queued up, then one flush: the page cache holds it from here, so a
            // crash of this process loses nothing written.
            for append in first.into_iter().chain(self.rx.try_iter().take(4096)) {
                if let Some(journal) = self.topics.get_mut(append.topic).and_then(Option::as_mut) {
                    if let Err(e) = journal.append(&append.entry) {
                        error(e, "cannot append", &self.errors);
                    }
                }
            }
            for journal in self.topics.iter_mut().flatten() {
                if let Err(e) = journal.flush() {
                    error(e, "cannot write", &self.errors);
                }
            }
            if let Some(sequences) = &self.sequences {
                if let Err(e) = sequences.extend_wanted(Instant::now()) {
                    error(e, "cannot reserve sequence numbers", &self.errors);
                }
            }
            if Instant::now() >= next_sync {
                next_sync = Instant::now() + SYNC_INTERVAL;
                let now_us = diode_common::unix_time_us();
                for journal in self.topics.iter_mut().flatten() {
                    if let Err(e) = journal.sync().and_then(|()| journal.enforce_budget(now_us)) {
                        error(e, "cannot sync or trim", &self.errors);
                    }
                }
            }
        }
        for journal in self.topics.iter_mut().flatten() {
            if let Err(e) = journal.sync() {
                error(e, "cannot sync at stop", &self.errors);
            }
        }
    }
}

/// The link thread's view of the reserved sequence numbers, shared with the journal's writer,
/// which reserves more in the background once half of a reservation is used: the link thread
/// itself waits on the disk only if the writer did not get there in time.
#[derive(Clone)]
pub struct SharedSequences {
    inner: Arc<Mutex<Sequences>>,
    /// Per topic: the first number not reserved, and the number at which to ask for more.
    limits: Arc<[AtomicU64]>,
    low_water: Arc<[AtomicU64]>,
    wanted: Arc<[AtomicBool]>,
}

impl SharedSequences {
    pub fn new(sequences: Sequences) -> Self {
        let limits: Vec<AtomicU64> = sequences
            .reserved
            .iter()
            .map(|r| AtomicU64::new(*r))
            .collect();
        let low_water: Vec<AtomicU64> = sequences
            .reserved
            .iter()
            .map(|r| AtomicU64::new(*r))
            .collect();
        let wanted: Vec<AtomicBool> = sequences
            .reserved
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect();
        SharedSequences {
            inner: Arc::new(Mutex::new(sequences)),
            limits: limits.into(),
            low_water: low_water.into(),
            wanted: wanted.into(),
        }
    }

    /// Before `next` of `topic` is used (link thread): free unless the reservation runs low
    /// (then the writer is asked for more) or out (then it is made here, synced).
    pub fn ensure(&self, topic: usize, next: u64, now: Instant) -> io::Result<()> {
        let Some(limit) = self.limits.get(topic) else {
            return Ok(());
        };
        if next < self.low_water[topic].load(Ordering::Acquire) {
            return Ok(());
        }
        if next < limit.load(Ordering::Acquire) {
            self.wanted[topic].store(true, Ordering::Release);
            return Ok(());
        }
        self.extend(topic, next, now)
    }

    /// The writer's part: makes the reservations the link thread asked for.
    pub fn extend_wanted(&self, now: Instant) -> io::Result<()> {
        for topic in 0..self.wanted.len() {
            if self.wanted[topic].swap(false, Ordering::AcqRel) {
                let from = self.limits[topic].load(Ordering::Acquire);
                self.extend(topic, from, now)?;
            }
        }
        Ok(())
    }

    fn extend(&self, topic: usize, from: u64, now: Instant) -> io::Result<()> {
        let mut sequences = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if sequences.closed {
            // After a clean stop's exact numbers, nothing may write reserved ones over them.
            return Ok(());
        }
        // Another thread may have extended it meanwhile: never move a limit back.
        let from = from.max(self.limits[topic].load(Ordering::Acquire));
        let (limit, low) = sequences.reserve(topic, from, now)?;
        self.low_water[topic].store(low, Ordering::Release);
        self.limits[topic].store(limit, Ordering::Release);
        Ok(())
    }

    /// At a clean stop: the exact next sequence numbers, so the next run skips none.
    pub fn close(&self, next: &[u64]) -> io::Result<()> {
        let mut sequences = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        sequences.closed = true;
        sequences.write(next)
    }
}

/// The next sequence number of each topic, kept ahead of use in `<dir>/sequences` (synced):
/// the link thread asks for more before it uses them, and a clean stop writes the exact ones.
pub struct Sequences {
    path: PathBuf,
    names: Vec<String>,
    /// Topics the file names that this configuration does not: kept, so a topic taken out
    /// and put back goes on from its number rather than 0.
    others: Vec<(String, u64)>,
    /// Per topic, the first sequence number not yet reserved.
    reserved: Vec<u64>,
    /// Per topic, how many the next reservation takes, and when the last one was made.
    chunk: Vec<u64>,
    last_reserved: Vec<Option<Instant>>,
    /// Set by a clean stop: the file holds the exact numbers and is written no more.
    closed: bool,
}

impl Sequences {
    /// Reads the file (a missing one: every topic starts at 0); returns each topic's first
    /// sequence number for this run: the file's, and never below `floor` (one past what the
    /// topic's journal holds, should the file have been lost).
    pub fn open(dir: &Path, names: &[String], floor: &[u64]) -> io::Result<(Self, Vec<u64>)> {
        Self::open_file(&dir.join("sequences"), names, floor)
    }

    /// As `open`, for a sender with no journal: the file alone (`link.state_file`).
    pub fn open_file(path: &Path, names: &[String], floor: &[u64]) -> io::Result<(Self, Vec<u64>)> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent)?;
        }
        let path = path.to_owned();
        let mut known: HashMap<String, u64> = HashMap::new();
        match fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
                    let parsed = line
                        .strip_prefix("next=")
                        .and_then(|rest| rest.split_once(" topic="))
                        .and_then(|(n, topic)| Some((topic.to_owned(), n.parse().ok()?)));
                    match parsed {
                        Some((topic, next)) => {
                            known.insert(topic, next);
                        }
                        None => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("{}: not a sequences file (line {line:?})", path.display()),
                            ))
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let first: Vec<u64> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let known = known.get(n).copied().unwrap_or(0);
                known.max(floor.get(i).copied().unwrap_or(0))
            })
            .collect();
        let mut others: Vec<(String, u64)> = known
            .into_iter()
            .filter(|(n, _)| !names.contains(n))
            .collect();
        others.sort();
        let sequences = Sequences {
            path,
            names: names.to_vec(),
            others,
            reserved: first.clone(),
            chunk: vec![MIN_RESERVATION; names.len()],
            last_reserved: vec![None; names.len()],
            closed: false,
        };
        Ok((sequences, first))
    }

    /// Reserves more sequence numbers for `topic`, from `next_seq` on, and syncs the file
    /// before returning. Busy topics reserve more at a time (about one write a second at
    /// most, after a burst's first few), quiet ones less (a crash then skips few). Only what
    /// reached the disk counts as reserved: after a failure, the next record asks again.
    fn reserve(&mut self, topic: usize, next_seq: u64, now: Instant) -> io::Result<(u64, u64)> {
        let chunk = &mut self.chunk[topic];
        match self.last_reserved[topic] {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                *chunk = (*chunk * 4).min(MAX_RESERVATION)
            }
            Some(last) if now.duration_since(last) > Duration::from_secs(10) => {
                *chunk = (*chunk / 2).max(MIN_RESERVATION)
            }
            _ => {}
        }
        self.last_reserved[topic] = Some(now);
        let chunk = *chunk;
        let mut reserved = self.reserved.clone();
        reserved[topic] = next_seq.saturating_add(chunk);
        self.write(&reserved)?;
        self.reserved = reserved;
        // Asked for again once half of it is used, so the next one is ready in time.
        Ok((self.reserved[topic], self.reserved[topic] - chunk / 2))
    }

    fn write(&self, next: &[u64]) -> io::Result<()> {
        let mut text = String::from("# diode-send sequence numbers v1: do not edit\n");
        let others = self.others.iter().map(|(n, s)| (n, s));
        for (name, n) in self.names.iter().zip(next).chain(others) {
            // Topic names hold no control characters (wire-format.md §1): one line each.
            text += &format!("next={n} topic={name}\n");
        }
        // The rename itself reaches the disk before these numbers are used.
        diode_common::fsutil::replace_file(&self.path, text.as_bytes(), 0o600, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::SenderMetrics;
    use bytes::Bytes;

    fn record(topic: &str, seq: u64, time_us: i64) -> Entry {
        Record {
            topic: Arc::from(topic),
            seq,
            session_id: 9,
            time_us,
            origin: None,
            late: false,
            payload: Bytes::from(vec![seq as u8; 100 + (seq as usize % 7) * 1000]),
        }
    }

    fn writer(
        root: &Path,
        budget: Budget,
    ) -> (std::thread::JoinHandle<()>, JournalHandle, Vec<u64>) {
        let metrics = SenderMetrics::new(&mut prometheus_client::registry::Registry::default());
        let topics = vec![
            ("a/b".to_owned(), Some(budget), metrics.journal("a/b")),
            ("plain".to_owned(), None, metrics.journal("plain")),
        ];
        let (writer, handle, next) = open_writer(root, &topics, Default::default()).unwrap();
        (std::thread::spawn(move || writer.run()), handle, next)
    }

    const BIG: Budget = Budget {
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
    };

    #[test]
    fn records_come_back_in_order_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (thread, handle, next) = writer(dir.path(), BIG);
        assert_eq!(next, vec![0, 0]);
        for seq in 0..500 {
            handle.append(0, record("a/b", seq, 1_000 + seq as i64));
            handle.append(1, record("plain", seq, 0));
        }
        drop(handle);
        thread.join().unwrap();
        let topic = topic_dir(dir.path(), "a/b");
        assert!(topic.ends_with("a%2Fb"), "{topic:?}");
        assert!(!topic_dir(dir.path(), "plain").exists(), "not journaled");
        let mut seen = Vec::new();
        scan(&topic, 100..=199, 1_150..=i64::MAX, |e| {
            seen.push(e.seq);
            true
        })
        .unwrap();
        assert_eq!(seen, (150..200).collect::<Vec<_>>());
        let held = span(&topic).unwrap().unwrap();
        assert_eq!((held.first_seq, held.last_seq, held.records), (0, 499, 500));

        // A crash mid-write leaves half an entry: it is cut off when the journal reopens, and
        // the run's numbers begin after the last whole record.
        let segment = &segments(&topic).unwrap()[0];
        let mut file = OpenOptions::new().append(true).open(&segment.path).unwrap();
        file.write_all(&[0, 0, 1, 0, 9, 9]).unwrap();
        drop(file);
        let (thread, handle, next) = writer(dir.path(), BIG);
        assert_eq!(next, vec![500, 0]);
        handle.append(0, record("a/b", 500, 2_000));
        drop(handle);
        thread.join().unwrap();
        assert_eq!(span(&topic).unwrap().unwrap().records, 501);
    }

    #[test]
    fn the_budget_drops_the_oldest_segments() {
        let dir = tempfile::tempdir().unwrap();
        // Segments of 1 MiB (the smallest), at most 3 MiB in all.
        let budget = Budget {
            max_bytes: 3 << 20,
            max_age: Duration::from_secs(3600),
        };
        let (thread, handle, _) = writer(dir.path(), budget);
        let now = diode_common::unix_time_us();
        for seq in 0..3000 {
            handle.append(0, record("a/b", seq, now));
            if seq % 200 == 0 {
                // Let the writer keep up: a full queue would drop records, not test the budget.
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        drop(handle);
        thread.join().unwrap();
        let topic = topic_dir(dir.path(), "a/b");
        let held = span(&topic).unwrap().unwrap();
        assert!(held.bytes <= (3 << 20) + (1 << 20), "{held:?}");
        assert!(held.first_seq > 0 && held.last_seq == 2999, "{held:?}");
    }

    #[test]
    fn sequence_numbers_go_on_and_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["a".to_owned(), "b".to_owned()];
        let (sequences, first) = Sequences::open(dir.path(), &names, &[0, 0]).unwrap();
        assert_eq!(first, vec![0, 0]);
        let shared = SharedSequences::new(sequences);
        let now = Instant::now();
        // Out of reservation: made at once; then asked ahead, in the background.
        shared.ensure(0, 0, now).unwrap();
        for next in 0..MIN_RESERVATION {
            shared.ensure(0, next, now).unwrap();
        }
        shared.extend_wanted(now).unwrap();
        // A crash now: the next run starts past everything reserved.
        let (_, after_crash) = Sequences::open(dir.path(), &names, &[0, 0]).unwrap();
        assert!(after_crash[0] >= MIN_RESERVATION, "{after_crash:?}");
        // A clean stop: exactly where it was; a topic taken out of the configuration keeps
        // its number; the journal's own end is a floor.
        shared.close(&[70, 3]).unwrap();
        let (sequences, first) = Sequences::open(dir.path(), &names[..1], &[0]).unwrap();
        assert_eq!(first, vec![70]);
        SharedSequences::new(sequences).close(&[80]).unwrap();
        let (_, first) = Sequences::open(dir.path(), &names, &[0, 10]).unwrap();
        assert_eq!(first, vec![80, 10]);
    }
}
