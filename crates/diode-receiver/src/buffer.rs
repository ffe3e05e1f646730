//! A route's on-disk buffer: the receiver is the last place that can keep a record, since the OT
//! side cannot send it again. A buffered route's records that the sink does not take at once are
//! written here and read back in order (route.rs decides which: from the first the sink does not
//! take in time until the sink has caught up with the disk), so order holds across sink outages
//! and receiver restarts, and a stop loses nothing (vector's memory buffer overflowing into a
//! disk buffer).
//!
//! Layout of `buffer_dir`: segment files `NNNNNNNNNNNNNNNNNNNN.seg` of frames
//! `[u32 BE body length][u32 BE CRC-32 of body][body]`, the body a `RecordBatch` of one record
//! (proto/diode.proto, so a record's topic, sequence number, time and origin are kept as they came
//! over the link); and `cursor`, the segment and offset of the first record not yet delivered,
//! written after each delivered batch. A crash can therefore deliver the last batch twice, never
//! lose it. A torn frame at the end of a segment (power cut mid-write) ends that segment.
//!
//! The cursor is written in place, into two slots in turn (at 0 and at 4096), each
//! `[generation u64][segment u64][offset u64][CRC-32 u32]` big-endian, the CRC over the 24 bytes
//! before it; the valid slot with the higher generation is the cursor. A write torn by a power
//! cut spoils at most its own slot, and the other still holds the cursor before it. Nothing is
//! created, renamed or freed per delivery: on a file system mounted with `discard`, freeing the
//! file a rename replaced waited for the disk after every delivery, and so did deleting a
//! delivered segment, which is why segments are deleted (`take_retired`) outside the lock the
//! spooler needs. A 16-byte `cursor` (segment, offset) left by an earlier version is read too.
//!
//! When a segment is full, `NNNNNNNNNNNNNNNNNNNN.count` beside it keeps how many records it
//! holds, so that opening the buffer after an outage counts its backlog from these files and by
//! walking frame headers of at most the first and last segments, in bounded memory and time
//! whatever the backlog (it once read the whole backlog into memory to count it).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use diode_wire::Record;
use serde::Deserialize;
use thiserror::Error;

const FRAME_HEADER_BYTES: u64 = 8;
const CURSOR_SLOT_BYTES: usize = 28;
/// The second cursor slot is in another page of the file than the first.
const CURSOR_SLOT_SPACING: u64 = 4096;
const SEGMENT_MAX_BYTES: u64 = 64 << 20;
const SEGMENT_MIN_BYTES: u64 = 1 << 20;
const WRITE_CHUNK_BYTES: usize = 1 << 20;
/// Frame bytes of undelivered records kept in memory as well as on disk: while the sink keeps
/// up, what it reads next was appended a moment ago and is taken from here, neither read back
/// nor decoded again.
const CACHE_BYTES: u64 = 8 << 20;

/// What to give up when the buffer is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Delete the oldest segment: recent plant data is usually worth more.
    #[default]
    DropOldest,
    /// Refuse what comes in: keep the oldest history intact.
    DropNewest,
}

#[derive(Debug, Error)]
pub enum BufferError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BufferError + '_ {
    move |source| BufferError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Records dropped for lack of room, by topic: (first seq, last seq, count).
pub type Dropped = BTreeMap<Arc<str>, (u64, u64, u64)>;

fn note_dropped(dropped: &mut Dropped, record: &Record) {
    let entry = dropped
        .entry(record.topic.clone())
        .or_insert((record.seq, record.seq, 0));
    entry.0 = entry.0.min(record.seq);
    entry.1 = entry.1.max(record.seq);
    entry.2 += 1;
}

/// Adds the drops of `more` to `into`.
pub fn merge_dropped(into: &mut Dropped, more: Dropped) {
    for (topic, (first, last, count)) in more {
        let entry = into.entry(topic).or_insert((first, last, 0));
        entry.0 = entry.0.min(first);
        entry.1 = entry.1.max(last);
        entry.2 += count;
    }
}

struct Segment {
    id: u64,
    len: u64,
    /// Records written to it by this run; its `.count` file says so once it is full.
    records: u64,
}

/// Where the next undelivered record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    segment: u64,
    offset: u64,
}

pub struct DiskBuffer {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    policy: FullPolicy,
    segments: VecDeque<Segment>,
    writer: Option<File>,
    read: Position,
    /// For what the buffer reads itself: `peek`, and the records a full buffer drops.
    reader: SegmentReader,
    unread_bytes: u64,
    unread_records: u64,
    /// Frames being appended, kept between calls.
    scratch: Vec<u8>,
    /// Undelivered records with where their frames are on disk, in order and contiguous: what
    /// `peek` serves from memory when the read position is among them. It keeps the oldest it
    /// took, not the newest: a sink that has fallen behind by more than the cache reads the
    /// gap from disk once and then finds the cache waiting, instead of chasing records the
    /// cache keeps forgetting just before it gets to them.
    cache: VecDeque<Cached>,
    cache_bytes: u64,
    /// Whether the cache runs to the newest record written, so that appends may join it. Once
    /// an append does not fit, later ones stay out until the cache has been delivered.
    cache_open: bool,
    /// Opened at the first write, then written in place.
    cursor_file: Option<File>,
    cursor_generation: u64,
    /// Segments delivered or dropped and not yet deleted.
    retired: Vec<u64>,
}

struct Cached {
    start: Position,
    end: Position,
    record: Record,
}

impl Cached {
    /// Its frame's bytes (start and end are in one segment).
    fn len(&self) -> u64 {
        self.end.offset - self.start.offset
    }
}

fn order(p: Position) -> (u64, u64) {
    (p.segment, p.offset)
}

impl DiskBuffer {
    pub fn open(dir: &Path, max_bytes: u64, policy: FullPolicy) -> Result<Self, BufferError> {
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io_error(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let (cursor, cursor_generation) = match read_cursor(&dir.join("cursor")) {
            Some((position, generation)) => (Some(position), generation),
            None => (None, 0),
        };
        let mut buffer = DiskBuffer {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(SEGMENT_MIN_BYTES, SEGMENT_MAX_BYTES),
            policy,
            segments: VecDeque::new(),
            writer: None,
            read: Position {
                segment: 0,
                offset: 0,
            },
            reader: SegmentReader::new(dir),
            unread_bytes: 0,
            unread_records: 0,
            scratch: Vec::new(),
            cache: VecDeque::new(),
            cache_bytes: 0,
            cache_open: true,
            cursor_file: None,
            cursor_generation,
            retired: Vec::new(),
        };
        for id in ids {
            let path = buffer.segment_path(id);
            let len = std::fs::metadata(&path).map_err(io_error(&path))?.len();
            if cursor.is_some_and(|c| id < c.segment) {
                // Delivered before the last stop.
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(buffer.count_path(id));
                continue;
            }
            buffer.segments.push_back(Segment {
                id,
                len,
                records: 0,
            });
        }
        buffer.read = match (cursor, buffer.segments.front()) {
            (Some(c), Some(first)) if c.segment == first.id => c,
            (_, Some(first)) => Position {
                segment: first.id,
                offset: 0,
            },
            (_, None) => Position {
                segment: cursor.map_or(0, |c| c.segment + 1),
                offset: 0,
            },
        };
        // Count what is left, for the backlog metrics: from the `.count` files of full segments,
        // by walking frame headers where there is none (the partly delivered first segment, the
        // last one, one whose count was lost in a crash).
        let last = buffer.segments.back().map(|s| s.id);
        for segment in &buffer.segments {
            let from = if segment.id == buffer.read.segment {
                buffer.read.offset
            } else {
                0
            };
            let kept = (from == 0 && Some(segment.id) != last)
                .then(|| read_count(&buffer.count_path(segment.id)))
                .flatten();
            buffer.unread_records += match kept {
                Some(count) => count,
                None => count_frames(&buffer.segment_path(segment.id), from, segment.len)?,
            };
        }
        buffer.unread_bytes = buffer
            .segments
            .iter()
            .map(|s| s.len)
            .sum::<u64>()
            .saturating_sub(buffer.read.offset);
        Ok(buffer)
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        segment_path(&self.dir, id)
    }

    fn count_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.count"))
    }

    /// Segments delivered or dropped since the last call, for the caller to delete
    /// ([`Retired::remove`]) without holding the buffer: the cursor already points past them,
    /// and opening the buffer deletes any a crash left behind.
    pub fn take_retired(&mut self) -> Retired {
        let ids = std::mem::take(&mut self.retired);
        Retired(
            ids.into_iter()
                .flat_map(|id| [self.segment_path(id), self.count_path(id)])
                .collect(),
        )
    }

    pub fn unread_bytes(&self) -> u64 {
        self.unread_bytes
    }

    pub fn unread_records(&self) -> u64 {
        self.unread_records
    }

    /// Writes `records` after everything already buffered. What does not fit is dropped by the
    /// policy and returned, by topic, for the caller to count and log.
    pub fn append(&mut self, records: &[Record]) -> Result<Dropped, BufferError> {
        let mut dropped = Dropped::new();
        let mut bytes = std::mem::take(&mut self.scratch);
        bytes.clear();
        let mut written = 0;
        // The records in `bytes`, with their frames' lengths, for the cache.
        let mut chunk: Vec<(&Record, u64)> = Vec::new();
        for record in records {
            let start = bytes.len();
            encode_frame(record, &mut bytes);
            written += 1;
            let mut kept = true;
            while self.unread_bytes + (bytes.len() as u64) > self.max_bytes {
                let oldest_deletable = self.segments.len() > 1;
                if self.policy == FullPolicy::DropOldest && oldest_deletable {
                    self.drop_oldest_segment(&mut dropped)?;
                } else {
                    note_dropped(&mut dropped, record);
                    bytes.truncate(start);
                    written -= 1;
                    kept = false;
                    break;
                }
            }
            if kept {
                chunk.push((record, (bytes.len() - start) as u64));
            }
            // Written out in pieces: a delivery of large records must not be held whole twice.
            if bytes.len() >= WRITE_CHUNK_BYTES {
                let at = self.write_out(&bytes, std::mem::take(&mut written))?;
                self.remember(at, chunk.drain(..));
                bytes.clear();
            }
        }
        if !bytes.is_empty() {
            let at = self.write_out(&bytes, written)?;
            self.remember(at, chunk.drain(..));
        }
        bytes.clear();
        self.scratch = bytes;
        Ok(dropped)
    }

    /// Keeps the records just written at `at` (frames contiguous from there) in the cache, as
    /// many as fit.
    fn remember<'r>(&mut self, at: Position, written: impl Iterator<Item = (&'r Record, u64)>) {
        if self.cache.is_empty() {
            // Whatever was before is delivered or on disk only: a new run can start here.
            self.cache_open = true;
        }
        let mut start = at;
        for (record, len) in written {
            if !self.cache_open || self.cache_bytes + len > CACHE_BYTES {
                self.cache_open = false;
                return;
            }
            let end = Position {
                segment: start.segment,
                offset: start.offset + len,
            };
            self.cache.push_back(Cached {
                start,
                end,
                record: record.clone(),
            });
            self.cache_bytes += len;
            start = end;
        }
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self.cache.pop_front() {
            self.cache_bytes -= oldest.len();
        }
    }

    /// Where in the cache the record at `at` is, if it is there: at `at` itself, or, when `at`
    /// is the end of its segment, at the start of the next segment.
    fn cache_index(&self, at: Position) -> Option<usize> {
        let i = self.cache.partition_point(|c| order(c.start) < order(at));
        let cached = self.cache.get(i)?;
        if cached.start == at {
            return Some(i);
        }
        let at_end = self
            .segments
            .iter()
            .find(|s| s.id == at.segment)
            .is_none_or(|s| at.offset >= s.len);
        let next = self.segments.iter().find(|s| s.id > at.segment)?.id;
        (at_end && cached.start.offset == 0 && cached.start.segment == next).then_some(i)
    }

    /// Appends whole frames to the last segment, starting a new one when it is full (or was
    /// left by an earlier run: its tail may be torn). Returns where they start.
    fn write_out(&mut self, bytes: &[u8], records: u64) -> Result<Position, BufferError> {
        let roll = match self.segments.back() {
            None => true,
            Some(last) => last.len >= self.segment_bytes || self.writer.is_none() && last.len > 0,
        };
        if roll {
            if let Some(full) = self.segments.back().filter(|_| self.writer.is_some()) {
                // Best effort: without it the next start walks this segment's headers instead.
                let _ = std::fs::write(self.count_path(full.id), full.records.to_be_bytes());
            }
            let id = self.segments.back().map_or(self.read.segment, |s| s.id + 1);
            let path = self.segment_path(id);
            // Plant data waiting for a sink: the service's own, nobody else's.
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .map_err(io_error(&path))?;
            self.writer = Some(file);
            self.segments.push_back(Segment {
                id,
                len: 0,
                records: 0,
            });
        } else if self.writer.is_none() {
            let id = self.segments.back().expect("not rolled: one exists").id;
            let path = self.segment_path(id);
            self.writer = Some(
                OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(io_error(&path))?,
            );
        }
        let last = self.segments.back_mut().expect("one exists");
        let at = Position {
            segment: last.id,
            offset: last.len,
        };
        let path = segment_path(&self.dir, last.id);
        self.writer
            .as_mut()
            .expect("opened above")
            .write_all(bytes)
            .map_err(io_error(&path))?;
        last.len += bytes.len() as u64;
        last.records += records;
        self.unread_bytes += bytes.len() as u64;
        self.unread_records += records;
        Ok(at)
    }

    fn drop_oldest_segment(&mut self, dropped: &mut Dropped) -> Result<(), BufferError> {
        // Rare (the buffer is full): the cache is rebuilt by the next appends.
        self.cache.clear();
        self.cache_bytes = 0;
        let oldest = self.segments.front().expect("caller checked").id;
        let start = if self.read.segment == oldest {
            self.read.offset
        } else {
            0
        };
        let mut position = Position {
            segment: oldest,
            offset: start,
        };
        let mut removed_records = 0;
        let segments = self.segment_lengths();
        loop {
            let (records, next) =
                self.reader
                    .read_records(&segments, position, 4096, u64::MAX, true, None)?;
            if records.is_empty() {
                break;
            }
            for record in &records {
                note_dropped(dropped, record);
            }
            removed_records += records.len() as u64;
            position = next;
        }
        let segment = self.segments.pop_front().expect("caller checked");
        self.retired.push(segment.id);
        self.unread_bytes = self.unread_bytes.saturating_sub(segment.len - start);
        self.unread_records = self.unread_records.saturating_sub(removed_records);
        let next = self
            .segments
            .front()
            .expect("caller checked: more than one")
            .id;
        self.read = Position {
            segment: next,
            offset: 0,
        };
        self.reader.open = None;
        self.write_cursor()
    }

    /// Up to `max_records` (and about `max_bytes`) undelivered records, and where the next read
    /// starts once they are delivered (`commit`).
    pub fn peek(
        &mut self,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<Option<(Vec<Record>, Position)>, BufferError> {
        loop {
            let plan = match self.next(max_records, max_bytes) {
                Next::Cached(records, next) => return Ok(Some((records, next))),
                Next::Drained => return Ok(None),
                Next::OnDisk(plan) => plan,
            };
            let (records, next) = self.reader.read(&plan, max_records, max_bytes)?;
            if !records.is_empty() {
                return Ok(Some((records, next)));
            }
            // Nothing readable up to the cache or the end (damaged frames, counted): past them.
            self.commit(0, next)?;
        }
    }

    /// What the sink takes next: records from memory, or a read from disk for a
    /// [`SegmentReader`] to do without holding the buffer.
    pub fn next(&mut self, max_records: usize, max_bytes: u64) -> Next {
        if let Some(first) = self.cache_index(self.read) {
            let (records, next) = self.cached(first, max_records, max_bytes);
            return Next::Cached(records, next);
        }
        if self.is_drained() {
            return Next::Drained;
        }
        Next::OnDisk(DiskRead {
            segments: self.segment_lengths(),
            from: self.read,
            // Behind the cache: from disk up to where the cache takes over.
            until: self.cache.front().map(|c| c.start),
        })
    }

    /// Whether everything written has been delivered: nothing on disk past the read position.
    /// From positions, not from the record count, which a full buffer dropping segments under a
    /// delivery, or a damaged frame, can leave off.
    pub fn is_drained(&self) -> bool {
        let read = order(self.read);
        !self.segments.iter().any(|s| {
            order(Position {
                segment: s.id,
                offset: s.len,
            }) > read
        })
    }

    /// A reader of this buffer's segments, for reads done without holding it.
    pub fn segment_reader(&self) -> SegmentReader {
        SegmentReader::new(&self.dir)
    }

    /// Where the next undelivered record starts.
    pub fn read_position(&self) -> Position {
        self.read
    }

    fn segment_lengths(&self) -> Vec<(u64, u64)> {
        self.segments.iter().map(|s| (s.id, s.len)).collect()
    }

    /// Records from the cache, from its `first`th on, and where the read goes on after them.
    fn cached(&self, first: usize, max_records: usize, max_bytes: u64) -> (Vec<Record>, Position) {
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut next = self.read;
        for cached in self.cache.range(first..) {
            if records.len() >= max_records || bytes >= max_bytes {
                break;
            }
            bytes += cached.len();
            records.push(cached.record.clone());
            next = cached.end;
        }
        (records, next)
    }

    /// Marks everything before `next` delivered: the segments behind it are deleted.
    pub fn commit(&mut self, delivered: usize, next: Position) -> Result<(), BufferError> {
        if order(next) < order(self.read) {
            // A full buffer dropped these segments while their records were out for delivery:
            // the read has moved on already.
            return Ok(());
        }
        while self
            .cache
            .front()
            .is_some_and(|c| order(c.start) < order(next))
        {
            self.forget_oldest();
        }
        let before = self.read;
        let mut freed = 0;
        while let Some(first) = self.segments.front() {
            if first.id >= next.segment {
                break;
            }
            let offset = if first.id == before.segment {
                before.offset
            } else {
                0
            };
            freed += first.len - offset;
            let segment = self.segments.pop_front().expect("checked");
            if self.segments.is_empty() {
                self.writer = None;
            }
            self.retired.push(segment.id);
        }
        freed += next.offset
            - if next.segment == before.segment {
                before.offset
            } else {
                0
            };
        self.read = next;
        self.unread_bytes = self.unread_bytes.saturating_sub(freed);
        self.unread_records = self.unread_records.saturating_sub(delivered as u64);
        self.write_cursor()
    }

    fn write_cursor(&mut self) -> Result<(), BufferError> {
        let path = self.dir.join("cursor");
        if self.cursor_file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(io_error(&path))?;
            self.cursor_file = Some(file);
        }
        self.cursor_generation += 1;
        let slot = encode_cursor(self.cursor_generation, self.read);
        let at = (self.cursor_generation % 2) * CURSOR_SLOT_SPACING;
        self.cursor_file
            .as_ref()
            .expect("opened above")
            .write_all_at(&slot, at)
            .map_err(io_error(&path))
    }
}

/// A read from disk, planned under the buffer's lock (`DiskBuffer::next`) and done without it
/// (`SegmentReader::read`), so that appends never wait behind one: the segments and their
/// lengths as they stood, where to start, and where the cache takes over. Appends meanwhile
/// only add after what it covers.
pub struct DiskRead {
    segments: Vec<(u64, u64)>,
    from: Position,
    until: Option<Position>,
}

impl DiskRead {
    /// Where it starts.
    pub fn from(&self) -> Position {
        self.from
    }
}

/// What the sink takes next.
pub enum Next {
    /// Records from memory, and where the read goes on after them.
    Cached(Vec<Record>, Position),
    /// Records to read from disk.
    OnDisk(DiskRead),
    /// Nothing undelivered.
    Drained,
}

/// Reads frames from a buffer's segment files.
pub struct SegmentReader {
    dir: PathBuf,
    /// The segment being read, and where in it the reader is.
    open: Option<(u64, BufReader<File>, u64)>,
    frame: Vec<u8>,
    /// Frames that failed their CRC or did not decode (a torn write, a damaged disk).
    pub corrupt_frames: u64,
}

impl SegmentReader {
    fn new(dir: &Path) -> Self {
        SegmentReader {
            dir: dir.to_owned(),
            open: None,
            frame: Vec::new(),
            corrupt_frames: 0,
        }
    }

    /// Up to `max_records` (and about `max_bytes`) records of `plan`, and where the read goes on
    /// after them: past damaged frames even when no record could be read.
    pub fn read(
        &mut self,
        plan: &DiskRead,
        max_records: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Record>, Position), BufferError> {
        self.read_records(
            &plan.segments,
            plan.from,
            max_records,
            max_bytes,
            false,
            plan.until,
        )
    }

    /// Records from `position` on, in `segments` (id, length) as they stand; with
    /// `one_segment`, without going past the end of `position`'s segment.
    fn read_records(
        &mut self,
        segments: &[(u64, u64)],
        mut position: Position,
        max_records: usize,
        max_bytes: u64,
        one_segment: bool,
        until: Option<Position>,
    ) -> Result<(Vec<Record>, Position), BufferError> {
        let mut records = Vec::new();
        let mut bytes = 0;
        loop {
            // At the end of a segment (or at one never written), go on with the next one there is.
            let segment_len = segments
                .iter()
                .find(|(id, _)| *id == position.segment)
                .map(|(_, len)| *len);
            if segment_len.is_none_or(|len| position.offset >= len) {
                if one_segment && segment_len.is_some() {
                    break;
                }
                match segments.iter().find(|(id, _)| *id > position.segment) {
                    Some((next, _)) => {
                        position = Position {
                            segment: *next,
                            offset: 0,
                        };
                        continue;
                    }
                    None => break,
                }
            }
            let segment_len = segment_len.expect("checked above");
            let reached = until.is_some_and(|u| order(position) >= order(u));
            if records.len() >= max_records || bytes >= max_bytes || reached {
                break;
            }
            let mut frame = std::mem::take(&mut self.frame);
            let left = segment_len - position.offset;
            let read = read_frame(self.reader_at(position)?, &mut frame, left);
            self.frame = frame;
            match read {
                Ok(record) => {
                    let len = FRAME_HEADER_BYTES + self.frame.len() as u64;
                    position.offset += len;
                    bytes += len;
                    if let Some((_, _, at)) = self.open.as_mut() {
                        *at = position.offset;
                    }
                    records.push(record);
                }
                Err(_) => {
                    // A torn or damaged frame: the rest of this segment cannot be framed.
                    self.corrupt_frames += 1;
                    self.open = None;
                    position.offset = segment_len;
                }
            }
        }
        Ok((records, position))
    }

    fn reader_at(&mut self, position: Position) -> Result<&mut BufReader<File>, BufferError> {
        let fresh = !matches!(&self.open, Some((id, _, at)) if *id == position.segment && *at == position.offset);
        if fresh {
            let path = segment_path(&self.dir, position.segment);
            let mut file = File::open(&path).map_err(io_error(&path))?;
            file.seek(SeekFrom::Start(position.offset))
                .map_err(io_error(&path))?;
            self.open = Some((
                position.segment,
                BufReader::with_capacity(256 << 10, file),
                position.offset,
            ));
        }
        Ok(&mut self.open.as_mut().expect("set above").1)
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

fn read_count(path: &Path) -> Option<u64> {
    let bytes: [u8; 8] = std::fs::read(path).ok()?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Frames in `[from, len)` of a segment, by their headers alone: memory bounded by the read
/// buffer, whatever the segment holds. Stops at a frame that runs past the end (a torn write).
fn count_frames(path: &Path, from: u64, len: u64) -> Result<u64, BufferError> {
    let file = File::open(path).map_err(io_error(path))?;
    let mut reader = BufReader::with_capacity(256 << 10, file);
    reader.seek(SeekFrom::Start(from)).map_err(io_error(path))?;
    let mut at = from;
    let mut count = 0;
    let mut header = [0u8; diode_wire::stored::HEADER_BYTES];
    while at + FRAME_HEADER_BYTES <= len {
        reader.read_exact(&mut header).map_err(io_error(path))?;
        let body = diode_wire::stored::header(header).0 as u64;
        if at + FRAME_HEADER_BYTES + body > len {
            break;
        }
        reader.seek_relative(body as i64).map_err(io_error(path))?;
        at += FRAME_HEADER_BYTES + body;
        count += 1;
    }
    Ok(count)
}

/// The cursor and its generation: the valid slot with the higher generation, or what an
/// earlier version wrote (generation 0).
fn read_cursor(path: &Path) -> Option<(Position, u64)> {
    let bytes = std::fs::read(path).ok()?;
    if let Ok(legacy) = <[u8; 16]>::try_from(&bytes[..]) {
        return Some((
            Position {
                segment: be_u64(&legacy[..8]),
                offset: be_u64(&legacy[8..]),
            },
            0,
        ));
    }
    [0, CURSOR_SLOT_SPACING as usize]
        .into_iter()
        .filter_map(|at| decode_cursor(bytes.get(at..at + CURSOR_SLOT_BYTES)?))
        .max_by_key(|(_, generation)| *generation)
}

fn encode_cursor(generation: u64, at: Position) -> [u8; CURSOR_SLOT_BYTES] {
    let mut slot = [0u8; CURSOR_SLOT_BYTES];
    slot[..8].copy_from_slice(&generation.to_be_bytes());
    slot[8..16].copy_from_slice(&at.segment.to_be_bytes());
    slot[16..24].copy_from_slice(&at.offset.to_be_bytes());
    let crc = crc32fast::hash(&slot[..24]);
    slot[24..].copy_from_slice(&crc.to_be_bytes());
    slot
}

fn decode_cursor(slot: &[u8]) -> Option<(Position, u64)> {
    let crc = u32::from_be_bytes(slot[24..28].try_into().ok()?);
    (crc32fast::hash(&slot[..24]) == crc).then(|| {
        (
            Position {
                segment: be_u64(&slot[8..16]),
                offset: be_u64(&slot[16..24]),
            },
            be_u64(&slot[..8]),
        )
    })
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().expect("8 bytes"))
}

/// Segment files to delete, taken from the buffer by [`DiskBuffer::take_retired`].
#[must_use = "the segments stay on disk until removed"]
pub struct Retired(Vec<PathBuf>);

impl Retired {
    /// Deletes them; one that is already gone is not an error.
    pub fn remove(self) -> Result<(), BufferError> {
        for path in self.0 {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(BufferError::Io { path, source }),
            }
        }
        Ok(())
    }
}

fn encode_frame(record: &Record, out: &mut Vec<u8>) {
    diode_wire::stored::encode(record, out);
}

/// One frame of a segment with `left` bytes from here to its end; an error for a torn or damaged
/// frame. A damaged length cannot make it allocate more than what is left of the segment.
fn read_frame(reader: &mut impl Read, body: &mut Vec<u8>, left: u64) -> std::io::Result<Record> {
    let mut header = [0u8; diode_wire::stored::HEADER_BYTES];
    reader.read_exact(&mut header)?;
    let (len, crc) = diode_wire::stored::header(header);
    if len as u64 > left.saturating_sub(FRAME_HEADER_BYTES) {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    body.resize(len, 0);
    reader.read_exact(body)?;
    diode_wire::stored::decode(body, crc).ok_or(std::io::ErrorKind::InvalidData.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn record(topic: &str, seq: u64, len: usize) -> Record {
        Record {
            topic: Arc::from(topic),
            seq,
            session_id: 0x5E55 << 20,
            time_us: 1_764_000_000_000_000 + seq as i64,
            origin: (seq % 2 == 0).then(|| diode_wire::proto::Origin {
                topic: format!("plant/{seq}"),
                qos: 1,
                retain: false,
                protocol: "mqtt".into(),
            }),
            late: seq % 3 == 0,
            payload: Bytes::from(vec![seq as u8; len]),
        }
    }

    fn drain(buffer: &mut DiskBuffer, max: usize) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some((records, next)) = buffer.peek(max, u64::MAX).unwrap() {
            let n = records.len();
            out.extend(records);
            buffer.commit(n, next).unwrap();
        }
        out
    }

    /// Past the in-memory cache the oldest records come from disk, the newest from memory, in
    /// one order and with the same cursor either way; reads interleave with appends as a
    /// route's do.
    #[test]
    fn reads_move_from_disk_to_the_memory_cache_without_a_seam() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 256 << 20, FullPolicy::DropOldest).unwrap();
        let sent: Vec<Record> = (0..6000).map(|i| record("line3/plc7", i, 4000)).collect();
        let mut got = Vec::new();
        for (n, chunk) in sent.chunks(250).enumerate() {
            assert!(buffer.append(chunk).unwrap().is_empty());
            // The sink falls behind for the first half, then keeps up.
            if n >= 12 {
                while let Some((records, next)) = buffer.peek(300, u64::MAX).unwrap() {
                    buffer.commit(records.len(), next).unwrap();
                    got.extend(records);
                }
            }
        }
        assert_eq!(got, sent);
        assert_eq!(buffer.unread_records(), 0);
        assert_eq!(buffer.unread_bytes(), 0);
        assert!(buffer.cache_bytes <= CACHE_BYTES);
        // What the cache served is on disk too: a restart at a cursor inside it reads it back.
        let mut buffer = DiskBuffer::open(dir.path(), 256 << 20, FullPolicy::DropOldest).unwrap();
        assert!(buffer.peek(10, u64::MAX).unwrap().is_none());
    }

    /// A sink far behind finds the oldest of its backlog in memory, not the newest, reads
    /// the rest from disk, and new records join the cache again once it has caught up.
    #[test]
    fn the_cache_keeps_the_oldest_undelivered_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 256 << 20, FullPolicy::DropOldest).unwrap();
        let sent: Vec<Record> = (0..10_000).map(|i| record("line3/plc7", i, 4000)).collect();
        assert!(buffer.append(&sent).unwrap().is_empty());
        assert_eq!(buffer.cache.front().unwrap().record.seq, 0);
        assert!(buffer.cache_bytes <= CACHE_BYTES && buffer.cache_bytes > CACHE_BYTES / 2);
        let (first, next) = buffer.peek(100, u64::MAX).unwrap().unwrap();
        assert_eq!(first, sent[..100]);
        assert!(buffer.reader.open.is_none(), "served from memory");
        buffer.commit(first.len(), next).unwrap();
        let mut got = first;
        got.extend(drain(&mut buffer, 300));
        assert_eq!(got, sent);
        assert!(buffer.cache.is_empty() && buffer.reader.open.is_some());
        buffer
            .append(&[record("line3/plc7", 10_000, 4000)])
            .unwrap();
        assert_eq!(buffer.cache.len(), 1);
    }

    /// The cursor survives a torn write of either slot, and a cursor an earlier version wrote
    /// is read.
    #[test]
    fn the_cursor_survives_a_torn_slot_and_reads_the_old_format() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        let sent: Vec<Record> = (0..30).map(|i| record("t", i, 100)).collect();
        buffer.append(&sent).unwrap();
        let mut cursors = Vec::new();
        for _ in 0..3 {
            let (records, next) = buffer.peek(10, u64::MAX).unwrap().unwrap();
            buffer.commit(records.len(), next).unwrap();
            cursors.push(next);
        }
        buffer.take_retired().remove().unwrap();
        drop(buffer);
        let path = dir.path().join("cursor");
        assert_eq!(read_cursor(&path), Some((cursors[2], 3)));
        // The last write (generation 3, the second slot) torn: the one before it holds.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[4096 + 20] ^= 0xFF;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_cursor(&path), Some((cursors[1], 2)));
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        assert_eq!(drain(&mut buffer, 100), sent[20..]);
        drop(buffer);
        // An earlier version's 16 bytes.
        let mut legacy = Vec::new();
        legacy.extend_from_slice(&cursors[0].segment.to_be_bytes());
        legacy.extend_from_slice(&cursors[0].offset.to_be_bytes());
        std::fs::write(&path, legacy).unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        assert_eq!(drain(&mut buffer, 100), sent[10..]);
        assert_eq!(
            read_cursor(&path).map(|(_, generation)| generation),
            Some(1)
        );
    }

    /// The cache's copy and the disk's agree: records peeked from memory are the ones a reader
    /// of the segment files finds at the same cursor.
    #[test]
    fn the_memory_cache_matches_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        let sent: Vec<Record> = (0..500).map(|i| record("line3/plc7", i, 700)).collect();
        buffer.append(&sent).unwrap();
        let (from_memory, next) = buffer.peek(200, u64::MAX).unwrap().unwrap();
        let segments = buffer.segment_lengths();
        let (from_disk, disk_next) = buffer
            .reader
            .read_records(&segments, buffer.read, 200, u64::MAX, false, None)
            .unwrap();
        assert_eq!(from_memory, from_disk);
        assert_eq!(next, disk_next);
    }

    #[test]
    fn records_come_back_in_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        // 8 MiB: 1 MiB segments, so 3 MB of records take several.
        let max = 8 << 20;
        let mut buffer = DiskBuffer::open(dir.path(), max, FullPolicy::DropOldest).unwrap();
        let sent: Vec<Record> = (0..3000).map(|i| record("line3/plc7", i, 1000)).collect();
        for chunk in sent.chunks(100) {
            assert!(buffer.append(chunk).unwrap().is_empty());
        }
        assert!(
            std::fs::read_dir(dir.path()).unwrap().count() > 2,
            "several segments"
        );
        assert_eq!(buffer.unread_records(), 3000);
        // Deliver a third, then "restart".
        let mut got = Vec::new();
        for _ in 0..10 {
            let (records, next) = buffer.peek(100, u64::MAX).unwrap().unwrap();
            buffer.commit(records.len(), next).unwrap();
            got.extend(records);
        }
        // Taken but never committed: must come again after the restart.
        let _ = buffer.peek(50, u64::MAX).unwrap();
        drop(buffer);
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        assert_eq!(buffer.unread_records(), 2000);
        buffer.append(&[record("line3/plc7", 3000, 10)]).unwrap();
        got.extend(drain(&mut buffer, 77));
        let mut expected = sent.clone();
        expected.push(record("line3/plc7", 3000, 10));
        assert_eq!(got, expected);
        assert_eq!(buffer.unread_bytes(), 0);
        drop(buffer);
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        assert_eq!(buffer.unread_records(), 0);
        assert!(buffer.peek(10, u64::MAX).unwrap().is_none());
    }

    #[test]
    fn a_full_buffer_drops_by_policy_and_says_what() {
        let dir = tempfile::tempdir().unwrap();
        // 8 MiB: 1 MiB segments.
        let max = 8 << 20;
        let mut newest =
            DiskBuffer::open(&dir.path().join("n"), max, FullPolicy::DropNewest).unwrap();
        let mut oldest =
            DiskBuffer::open(&dir.path().join("o"), max, FullPolicy::DropOldest).unwrap();
        let mut dropped_newest = Dropped::new();
        let mut dropped_oldest = Dropped::new();
        for i in 0..12_000u64 {
            let r = [record("t", i, 1000)];
            merge_dropped(&mut dropped_newest, newest.append(&r).unwrap());
            merge_dropped(&mut dropped_oldest, oldest.append(&r).unwrap());
            assert!(newest.unread_bytes() <= max && oldest.unread_bytes() <= max);
        }
        let kept = newest.unread_records();
        let (first, last, count) = dropped_newest[&Arc::from("t")];
        assert_eq!((first, last), (kept, 11_999));
        assert_eq!(count + kept, 12_000);
        let kept_new = drain(&mut newest, 500);
        assert_eq!(kept_new.first().unwrap().seq, 0);

        let (first, last, count) = dropped_oldest[&Arc::from("t")];
        let kept = drain(&mut oldest, 500);
        assert_eq!(first, 0);
        assert_eq!(last + 1, kept.first().unwrap().seq);
        assert_eq!(count as usize + kept.len(), 12_000);
        assert_eq!(kept.last().unwrap().seq, 11_999);
    }

    #[test]
    fn a_damaged_length_skips_its_segment_without_a_large_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        buffer
            .append(&(0..5).map(|i| record("t", i, 100)).collect::<Vec<_>>())
            .unwrap();
        drop(buffer);
        let segment = dir.path().join(format!("{:020}.seg", 0));
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        std::fs::write(&segment, bytes).unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        assert_eq!(buffer.unread_records(), 0);
        buffer.append(&[record("t", 5, 100)]).unwrap();
        assert_eq!(drain(&mut buffer, 10).len(), 1);
        assert!(buffer.reader.corrupt_frames > 0);
    }

    #[test]
    fn a_torn_tail_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        buffer
            .append(&(0..10).map(|i| record("t", i, 100)).collect::<Vec<_>>())
            .unwrap();
        drop(buffer);
        let segment = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.path().extension().is_some_and(|x| x == "seg"))
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes.truncate(bytes.len() - 30);
        std::fs::write(&segment, bytes).unwrap();
        let mut buffer = DiskBuffer::open(dir.path(), 64 << 20, FullPolicy::DropOldest).unwrap();
        assert_eq!(buffer.unread_records(), 9);
        buffer.append(&[record("t", 10, 100)]).unwrap();
        let got: Vec<u64> = drain(&mut buffer, 4).iter().map(|r| r.seq).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 10]);
        assert!(buffer.reader.corrupt_frames > 0);
    }
}
