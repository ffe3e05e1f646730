//! The sender's state machine: records in, paced-ready datagrams out.
//!
//! ```text
//! push() ──► open block (batches per topic, fragments) ──seal──► waiting blocks ──group of D──► poll_transmit()
//!            wire-format.md §4, §5                       §3.1-3.2                §3.3
//! ```
//!
//! No sockets and no clock: `now` is passed in, `poll_timeout` says when `handle_timeout` is due.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use thiserror::Error;

use crate::auth::{BlockCipher, LinkKey, SEAL_TAG_LEN, TRAILER_LEN};
use crate::datagram::{
    self, BlockGeometry, Header, DATAGRAM_OVERHEAD, HEADER_LEN, IP_UDP_OVERHEAD, MAX_TOTAL_SHARDS,
};
use crate::fec::{self, CodecCache};
use crate::frames::{self, proto};
use crate::pacer::Pacer;

/// The 4-byte content length that opens every block (wire-format.md §4.1).
const CONTENT_HEADER_LEN: usize = 4;
/// The most UDP payload one send may carry, GSO batches included.
const MAX_UDP_PAYLOAD_BYTES: usize = 65_507;
/// Topics per heartbeat catalogue turn (wire-format.md §5.3).
const CATALOGUE_TURN_TOPICS: usize = 128;

#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Random and non-zero; a new one for every start of the sender.
    pub session_id: u64,
    /// The link's IP MTU; datagrams are at most `mtu_bytes - 28` bytes.
    pub mtu_bytes: usize,
    pub data_shards: usize,
    pub parity_shards: usize,
    /// The loss each block size is protected against as well as a full block (§3.1).
    pub design: fec::DesignPoint,
    /// Outage protection (§3.4): each block also gets k + m repair shards, sent this long after
    /// it, so that an outage shorter than this loses no block. Zero: off.
    pub repair_delay: Duration,
    pub interleave_depth: usize,
    /// A block leaves at most this long after its first record.
    pub flush_interval: Duration,
    pub heartbeat_interval: Duration,
    /// Microseconds since the Unix epoch when the sender started, announced in heartbeats.
    pub session_start_time_us: i64,
    /// Authenticates every datagram (wire-format.md §2.1).
    pub key: Option<LinkKey>,
    /// Encrypts every block's frames with a key derived from `key` (wire-format.md §4.4).
    pub encrypt: bool,
    /// The pacing ceiling in megabits per second of wire bytes (wire-format.md §1): the
    /// encoder hands out no datagram faster. None: as fast as they are polled (tests, benchmarks).
    pub rate_mbps: Option<f64>,
}

/// The project's defaults (`docs/wire-format.md` §3), unpaced, for session 1: tests and
/// benchmarks set what they vary and take the rest from here.
impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            session_id: 1,
            mtu_bytes: 1500,
            data_shards: 32,
            parity_shards: 8,
            design: fec::DesignPoint {
                loss: 0.0,
                burst_datagrams: 0,
            },
            repair_delay: Duration::ZERO,
            interleave_depth: 4,
            flush_interval: Duration::from_millis(5),
            heartbeat_interval: Duration::from_millis(500),
            session_start_time_us: 1,
            key: None,
            encrypt: false,
            rate_mbps: None,
        }
    }
}

impl EncoderConfig {
    /// The same settings for another session.
    pub fn with_session(self, session_id: u64) -> Self {
        EncoderConfig { session_id, ..self }
    }

    pub fn max_shard_len(&self) -> usize {
        let trailer = if self.key.is_some() { TRAILER_LEN } else { 0 };
        self.mtu_bytes
            .saturating_sub(IP_UDP_OVERHEAD + DATAGRAM_OVERHEAD + trailer)
    }

    /// Bytes of block content (§4.1) a full block holds; an encrypted block keeps room for its tag.
    pub fn block_capacity(&self) -> usize {
        let tag = if self.encrypt { SEAL_TAG_LEN } else { 0 };
        (self.data_shards * self.max_shard_len()).saturating_sub(tag)
    }

    pub fn validate(&self) -> Result<(), EncoderConfigError> {
        if self.session_id == 0 {
            return Err(EncoderConfigError::ZeroSessionId);
        }
        if !(576..=65_535).contains(&self.mtu_bytes) {
            return Err(EncoderConfigError::Mtu(self.mtu_bytes));
        }
        if self.data_shards == 0 || self.data_shards + self.parity_shards > MAX_TOTAL_SHARDS {
            return Err(EncoderConfigError::Shards {
                data: self.data_shards,
                parity: self.parity_shards,
            });
        }
        if !(1..=255).contains(&self.interleave_depth) {
            return Err(EncoderConfigError::InterleaveDepth(self.interleave_depth));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(EncoderConfigError::HeartbeatInterval);
        }
        if self.encrypt && self.key.is_none() {
            return Err(EncoderConfigError::EncryptWithoutKey);
        }
        if !(0.0..=0.5).contains(&self.design.loss) || self.design.burst_datagrams > 64 {
            return Err(EncoderConfigError::Design);
        }
        if self.repair_delay > MAX_REPAIR_DELAY {
            return Err(EncoderConfigError::RepairDelay);
        }
        if self.rate_mbps.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return Err(EncoderConfigError::Rate);
        }
        Ok(())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EncoderConfigError {
    #[error("encryption needs a link key")]
    EncryptWithoutKey,
    #[error("session id must be non-zero")]
    ZeroSessionId,
    #[error("mtu_bytes {0} is outside 576..=65535")]
    Mtu(usize),
    #[error("data_shards {data} + parity_shards {parity}: need at least 1 data shard and at most 255 in all")]
    Shards { data: usize, parity: usize },
    #[error("interleave_depth {0} is outside 1..=255")]
    InterleaveDepth(usize),
    #[error("heartbeat interval must be above zero")]
    HeartbeatInterval,
    #[error("the design loss must be within 0..=50 % and the design burst at most 64 datagrams")]
    Design,
    #[error("the repair delay must be at most 10 s")]
    RepairDelay,
    #[error("the pacing rate must be a positive number of megabits per second")]
    Rate,
}

/// One send's worth of datagrams from [`Encoder::poll_transmit_batch`]: `datagrams` of
/// `segment_size` bytes back to back, the last possibly shorter (what UDP segmentation offload
/// sends with one system call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub datagrams: usize,
    pub segment_size: usize,
    /// What the batch costs the pacer: its bytes and every datagram's IP and UDP headers.
    pub wire_bytes: usize,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PushError {
    #[error("unknown topic id {0}")]
    UnknownTopic(u32),
    #[error(transparent)]
    TooLarge(#[from] RecordTooLarge),
    /// A replay can only send again what was sent.
    #[error("sequence number {seq} has not been sent yet (the topic's next is {next})")]
    NotYetSent { seq: u64, next: u64 },
}

/// A record whose metadata leaves no room for even one byte of it in an empty block.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error(
    "a record with {origin_bytes} bytes of origin metadata cannot be framed: a block holds \
     {capacity} bytes (at most {max_origin_topic_bytes} bytes of origin topic fit)"
)]
pub struct RecordTooLarge {
    pub origin_bytes: usize,
    pub capacity: usize,
    pub max_origin_topic_bytes: usize,
}

/// What a record must satisfy to be framed (wire-format.md §4.1, §5.2): its first fragment,
/// origin included, and any later one must each fit an empty block with at least one byte of
/// payload. Sources check it before a record reaches the link queue; the encoder checks it
/// again, so no record can make it loop without progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimits {
    /// Room for frames in an empty block: its capacity less the content length.
    room: usize,
    /// Whether any record without an origin fits, whatever its topic and size (the usual case,
    /// decided once instead of for every record on the sources' path).
    any_plain_fits: bool,
}

impl RecordLimits {
    pub fn new(config: &EncoderConfig) -> Self {
        let mut limits = RecordLimits {
            room: config.block_capacity().saturating_sub(CONTENT_HEADER_LEN),
            any_plain_fits: false,
        };
        // The largest topic and a payload at the largest varint length are the worst case.
        limits.any_plain_fits = limits.fits(frames::MAX_TOPIC_LEN, 0, usize::MAX).is_ok();
        limits
    }

    /// Checks a record of a topic named with `topic_len` bytes. Sizes are taken at their worst
    /// (the largest sequence number, time and offset), so a record that passes here fits
    /// whatever its place in the stream.
    pub fn check(
        &self,
        topic_len: usize,
        origin: Option<&proto::Origin>,
        payload_len: usize,
    ) -> Result<(), RecordTooLarge> {
        let origin_len = origin
            .filter(|o| frames::origin_is_present(o))
            .map_or(0, frames::origin_field_len);
        if origin_len == 0 && self.any_plain_fits {
            return Ok(());
        }
        self.fits(topic_len, origin_len, payload_len)
    }

    fn fits(
        &self,
        topic_len: usize,
        origin_len: usize,
        payload_len: usize,
    ) -> Result<(), RecordTooLarge> {
        let head = |origin_len, offset| frames::FragmentHead {
            origin_len,
            topic_len,
            seq: u64::MAX,
            time_us: -1,
            total_len: payload_len,
            offset,
            replayed: true,
        };
        let data = payload_len.min(1);
        let first = frames::frame_stream_len(head(origin_len, 0).body_len(data));
        let later = frames::frame_stream_len(head(0, payload_len).body_len(1));
        if first <= self.room && later <= self.room {
            return Ok(());
        }
        Err(RecordTooLarge {
            origin_bytes: origin_len,
            capacity: self.room + CONTENT_HEADER_LEN,
            max_origin_topic_bytes: self.max_origin_topic_bytes(topic_len),
        })
    }

    /// The longest origin topic a record of this topic may carry.
    pub fn max_origin_topic_bytes(&self, topic_len: usize) -> usize {
        let fits = |len: usize| {
            let origin = proto::Origin {
                topic: "x".repeat(len),
                qos: 2,
                retain: true,
                // The longest protocol name a source sets.
                protocol: "syslog".to_owned(),
            };
            let head = frames::FragmentHead {
                origin_len: frames::origin_field_len(&origin),
                topic_len,
                seq: u64::MAX,
                time_us: -1,
                total_len: usize::MAX >> 1,
                offset: 0,
                replayed: true,
            };
            frames::frame_stream_len(head.body_len(1)) <= self.room
        };
        let (mut low, mut high) = (0, self.room);
        // The largest `len` that fits, by bisection (fits is monotonic in len).
        if !fits(0) {
            return 0;
        }
        while low < high {
            let mid = (low + high).div_ceil(2);
            if fits(mid) {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        low
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AddTopicError {
    #[error("topic name {0:?} is empty, longer than 255 bytes, or contains + or # or a control character")]
    InvalidName(String),
    #[error("topic {0:?} is already registered")]
    Duplicate(String),
}

/// Handle for a registered topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TopicId(u32);

impl TopicId {
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id of the `index`-th topic added to an encoder.
    pub fn from_index(index: usize) -> Self {
        TopicId(index as u32)
    }
}

/// Cumulative counters of what the encoder produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncoderStats {
    pub records_in: u64,
    pub payload_bytes_in: u64,
    pub records_dropped: u64,
    /// Records refused because they cannot be framed (see [`RecordLimits`]).
    pub records_refused: u64,
    pub source_errors: u64,
    pub blocks_sealed: u64,
    pub fragments: u64,
    pub heartbeats: u64,
    pub datagrams_out: u64,
    /// Of those, repair shards sent after their block (§3.4).
    pub repair_datagrams_out: u64,
    /// Records sent again from the journal (§5.5).
    pub records_replayed: u64,
    /// UDP payload plus IP and UDP headers (wire-format.md §1).
    pub wire_bytes_out: u64,
}

struct Topic {
    name: String,
    /// Where this session's numbering began, announced in heartbeats (§5.3).
    first_seq: u64,
    next_seq: u64,
    dropped: u64,
    /// The source's state, announced in heartbeats (§5.3).
    source_connections: u32,
    source_errors: u64,
    last_record_time_us: i64,
    /// Index of this topic's batch in the open block, if it has one.
    open_batch: Option<usize>,
    /// Likewise for records sent again from the journal (§5.5), which never share a batch with
    /// live ones.
    open_replay_batch: Option<usize>,
}

struct OpenBatch {
    topic: TopicId,
    first_seq: u64,
    first_time_us: i64,
    last_time_us: i64,
    time_deltas_us: Vec<i64>,
    payloads: Vec<Bytes>,
    /// Empty, or one per payload (wire-format.md §5.4).
    origins: Vec<proto::Origin>,
    deltas_len: usize,
    payloads_len: usize,
    origins_len: usize,
    replayed: bool,
}

impl OpenBatch {
    fn body_len(&self, topic_len: usize) -> usize {
        frames::bytes_field_len(topic_len)
            + frames::scalar_len(self.first_seq)
            + frames::scalar_len(self.first_time_us as u64)
            + frames::packed_len(self.deltas_len)
            + self.payloads_len
            + self.origins_len
            + frames::bool_len(self.replayed)
    }
}

/// What places a record in a block, besides its bytes.
#[derive(Clone, Copy)]
struct Placed {
    topic: TopicId,
    seq: u64,
    time_us: i64,
    replayed: bool,
}

struct Fragment {
    topic: TopicId,
    seq: u64,
    time_us: i64,
    total_len: usize,
    offset: usize,
    data: Bytes,
    origin: Option<proto::Origin>,
    replayed: bool,
}

/// The block being filled (wire-format.md §4.3 gives the order of its frames).
#[derive(Default)]
struct OpenBlock {
    leading: Option<Fragment>,
    batches: Vec<OpenBatch>,
    heartbeat: Option<proto::Heartbeat>,
    trailing: Option<Fragment>,
    content_len: usize,
    deadline: Option<Instant>,
}

impl OpenBlock {
    fn is_empty(&self) -> bool {
        self.content_len == CONTENT_HEADER_LEN
    }
}

struct SealedBlock {
    /// `count` datagrams of `stride` bytes, ready to send.
    datagrams: Bytes,
    stride: usize,
    count: usize,
    deadline: Instant,
}

/// The longest repair delay (§3.4): what a receiver may be asked to wait, at most.
pub const MAX_REPAIR_DELAY: Duration = Duration::from_secs(10);

/// A block's repair shards (§3.4), sent once `due`: datagrams `next..end` of `datagrams`.
struct Repair {
    datagrams: Bytes,
    stride: usize,
    next: usize,
    end: usize,
    due: Instant,
}

pub struct Encoder {
    config: EncoderConfig,
    limits: RecordLimits,
    max_shard_len: usize,
    capacity: usize,
    topics: Vec<Topic>,
    open: OpenBlock,
    waiting: VecDeque<SealedBlock>,
    /// Repair shards waiting for their time, in the order they are due.
    repairs: VecDeque<Repair>,
    /// The group being sent and its transmission order: (block in group, shard index).
    group: Vec<SealedBlock>,
    schedule: Vec<(usize, usize)>,
    schedule_cursor: usize,
    queued_bytes: usize,
    /// Of those, repair shards waiting for their time (§3.4).
    repair_queued_bytes: usize,
    next_block: u64,
    next_heartbeat: Instant,
    catalogue_cursor: usize,
    codecs: CodecCache,
    /// Parity per block size (§3.1).
    plan: fec::ParityPlan,
    /// Set when the link is encrypted.
    cipher: Option<BlockCipher>,
    scratch: Vec<u8>,
    stats: EncoderStats,
    /// Set by `finish`: heartbeats from then on say the sender is stopping (§5.3).
    stopping: bool,
    pacer: Option<Pacer>,
    /// A datagram taken from the schedule but held back by the pacer or by a batch's shape.
    held: Option<Bytes>,
}

impl Encoder {
    /// The first heartbeat is due at once, so a receiver learns the session straight away.
    pub fn new(config: EncoderConfig, now: Instant) -> Result<Self, EncoderConfigError> {
        config.validate()?;
        let max_shard_len = config.max_shard_len();
        Ok(Encoder {
            limits: RecordLimits::new(&config),
            plan: fec::ParityPlan::new(config.data_shards, config.parity_shards, config.design),
            capacity: config.block_capacity(),
            cipher: config
                .key
                .as_ref()
                .filter(|_| config.encrypt)
                .map(|key| key.block_cipher(config.session_id)),
            max_shard_len,
            topics: Vec::new(),
            open: OpenBlock {
                content_len: CONTENT_HEADER_LEN,
                ..OpenBlock::default()
            },
            waiting: VecDeque::new(),
            repairs: VecDeque::new(),
            group: Vec::new(),
            schedule: Vec::new(),
            schedule_cursor: 0,
            repair_queued_bytes: 0,
            queued_bytes: 0,
            next_block: 0,
            next_heartbeat: now,
            catalogue_cursor: 0,
            codecs: CodecCache::default(),
            scratch: Vec::new(),
            stats: EncoderStats::default(),
            stopping: false,
            pacer: config
                .rate_mbps
                .map(|rate| Pacer::new(rate, config.mtu_bytes, now)),
            held: None,
            config,
        })
    }

    pub fn limits(&self) -> RecordLimits {
        self.limits
    }

    /// Parity per block size, as configured (§3.1).
    pub fn parity_plan(&self) -> &fec::ParityPlan {
        &self.plan
    }

    pub fn add_topic(&mut self, name: &str) -> Result<TopicId, AddTopicError> {
        self.add_topic_from(name, 0)
    }

    /// Registers a topic whose first record gets `next_seq`: a restarted sender goes on from
    /// where its last run stopped (wire-format.md §1).
    pub fn add_topic_from(&mut self, name: &str, next_seq: u64) -> Result<TopicId, AddTopicError> {
        if !frames::is_valid_topic(name) {
            return Err(AddTopicError::InvalidName(name.to_owned()));
        }
        if self.topics.iter().any(|t| t.name == name) {
            return Err(AddTopicError::Duplicate(name.to_owned()));
        }
        self.topics.push(Topic {
            name: name.to_owned(),
            first_seq: next_seq,
            next_seq,
            dropped: 0,
            source_connections: 0,
            source_errors: 0,
            last_record_time_us: 0,
            open_batch: None,
            open_replay_batch: None,
        });
        Ok(TopicId(self.topics.len() as u32 - 1))
    }

    pub fn session_id(&self) -> u64 {
        self.config.session_id
    }

    /// The sequence number the topic's next record gets.
    pub fn next_seq(&self, topic: TopicId) -> Option<u64> {
        self.topics.get(topic.index()).map(|t| t.next_seq)
    }

    pub fn stats(&self) -> &EncoderStats {
        &self.stats
    }

    /// Bytes of sealed blocks not yet handed out, plus the open block: the caller stops pushing
    /// above its memory budget.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes + self.open.content_len
    }

    /// What goes out before a record pushed now: `queued_bytes` without the repair shards that
    /// wait for their time (§3.4), which leave later whatever is pushed.
    pub fn queued_ahead_bytes(&self) -> usize {
        self.queued_bytes() - self.repair_queued_bytes
    }

    /// Counts records the caller could not take in, announced per topic in heartbeats.
    pub fn note_dropped(&mut self, topic: TopicId, count: u64) {
        if let Some(t) = self.topics.get_mut(topic.index()) {
            t.dropped += count;
            self.stats.records_dropped += count;
        }
    }

    pub fn note_source_errors(&mut self, count: u64) {
        self.stats.source_errors += count;
    }

    /// The topic's source as the caller sees it (its open connections and its errors so far),
    /// announced per topic in heartbeats (§5.3).
    pub fn note_source_state(&mut self, topic: TopicId, connections: u32, errors: u64) {
        if let Some(t) = self.topics.get_mut(topic.index()) {
            t.source_connections = connections;
            t.source_errors = errors;
        }
    }

    /// Takes one record; returns the sequence number it got. A record that cannot be framed is
    /// refused (and counted) before it gets one.
    pub fn push(
        &mut self,
        now: Instant,
        topic: TopicId,
        time_us: i64,
        payload: Bytes,
    ) -> Result<u64, PushError> {
        self.push_with_origin(now, topic, time_us, None, payload)
    }

    /// Takes one record that carries where it came from inside its source (wire-format.md §5.4).
    pub fn push_with_origin(
        &mut self,
        now: Instant,
        topic: TopicId,
        time_us: i64,
        origin: Option<proto::Origin>,
        payload: Bytes,
    ) -> Result<u64, PushError> {
        let origin = origin.filter(frames::origin_is_present);
        let t = self
            .topics
            .get_mut(topic.index())
            .ok_or(PushError::UnknownTopic(topic.0))?;
        if let Err(e) = self
            .limits
            .check(t.name.len(), origin.as_ref(), payload.len())
        {
            self.stats.records_refused += 1;
            return Err(e.into());
        }
        let seq = t.next_seq;
        t.next_seq += 1;
        t.last_record_time_us = time_us;
        self.stats.records_in += 1;
        self.stats.payload_bytes_in += payload.len() as u64;
        let record = Placed {
            topic,
            seq,
            time_us,
            replayed: false,
        };
        self.place_record(now, record, origin, payload);
        Ok(seq)
    }

    /// Sends a record again, from the sender's journal, with the sequence number it was first
    /// sent with (wire-format.md §5.5): it travels in batches of its own, marked replayed, so
    /// the receiver delivers it only if it fills a gap.
    pub fn push_replay(
        &mut self,
        now: Instant,
        topic: TopicId,
        seq: u64,
        time_us: i64,
        origin: Option<proto::Origin>,
        payload: Bytes,
    ) -> Result<(), PushError> {
        let origin = origin.filter(frames::origin_is_present);
        let t = self
            .topics
            .get(topic.index())
            .ok_or(PushError::UnknownTopic(topic.0))?;
        if seq >= t.next_seq {
            return Err(PushError::NotYetSent {
                seq,
                next: t.next_seq,
            });
        }
        if let Err(e) = self
            .limits
            .check(t.name.len(), origin.as_ref(), payload.len())
        {
            self.stats.records_refused += 1;
            return Err(e.into());
        }
        self.stats.records_replayed += 1;
        let record = Placed {
            topic,
            seq,
            time_us,
            replayed: true,
        };
        self.place_record(now, record, origin, payload);
        Ok(())
    }

    fn place_record(
        &mut self,
        now: Instant,
        record: Placed,
        origin: Option<proto::Origin>,
        payload: Bytes,
    ) {
        if self.try_add_to_batch(now, record, &origin, &payload) {
            return;
        }
        // Small records are never cut: a record of up to one shard that does not fit closes the
        // block (wasting less than a shard) and opens the next one.
        let alone = CONTENT_HEADER_LEN + self.new_batch_stream_len(record, &origin, payload.len());
        if payload.len() <= self.max_shard_len && alone <= self.capacity && !self.open.is_empty() {
            self.seal(now);
            if self.try_add_to_batch(now, record, &origin, &payload) {
                return;
            }
        }
        self.place_fragments(now, record, origin, payload);
    }

    fn new_batch_stream_len(
        &self,
        record: Placed,
        origin: &Option<proto::Origin>,
        len: usize,
    ) -> usize {
        let batch = OpenBatch {
            topic: record.topic,
            first_seq: record.seq,
            first_time_us: record.time_us,
            last_time_us: record.time_us,
            time_deltas_us: Vec::new(),
            payloads: Vec::new(),
            origins: Vec::new(),
            deltas_len: 1,
            payloads_len: frames::repeated_bytes_elem_len(len),
            origins_len: origin.as_ref().map_or(0, frames::origin_field_len),
            replayed: record.replayed,
        };
        frames::frame_stream_len(batch.body_len(self.topics[record.topic.index()].name.len()))
    }

    /// Appends to the topic's batch in the open block if the block has room.
    fn try_add_to_batch(
        &mut self,
        now: Instant,
        record: Placed,
        origin: &Option<proto::Origin>,
        payload: &Bytes,
    ) -> bool {
        let Placed { topic, time_us, .. } = record;
        let topic_len = self.topics[topic.index()].name.len();
        let elem_len = frames::repeated_bytes_elem_len(payload.len());
        let t = &self.topics[topic.index()];
        let open = if record.replayed {
            // A batch's sequence numbers follow each other: a replay that skips starts another.
            t.open_replay_batch.filter(|&i| {
                let batch = &self.open.batches[i];
                batch.first_seq + batch.payloads.len() as u64 == record.seq
            })
        } else {
            t.open_batch
        };
        match open {
            Some(index) => {
                let batch = &self.open.batches[index];
                let delta = time_us.wrapping_sub(batch.last_time_us);
                // Origins are all or none in a batch: a record without one takes an empty
                // element, and the first record with one gives empty elements to those before.
                let empty_origin = frames::origin_field_len(&proto::Origin::default());
                let origins_added = match (origin, batch.origins_len > 0) {
                    (None, false) => 0,
                    (None, true) => empty_origin,
                    (Some(o), true) => frames::origin_field_len(o),
                    (Some(o), false) => {
                        frames::origin_field_len(o) + batch.payloads.len() * empty_origin
                    }
                };
                let old = frames::frame_stream_len(batch.body_len(topic_len));
                let new_body = batch.body_len(topic_len) - frames::packed_len(batch.deltas_len)
                    + frames::packed_len(batch.deltas_len + frames::zigzag_len(delta))
                    + elem_len
                    + origins_added;
                let grown = frames::frame_stream_len(new_body) - old;
                if self.open.content_len + grown > self.capacity {
                    return false;
                }
                let batch = &mut self.open.batches[index];
                if origins_added > 0 {
                    batch
                        .origins
                        .resize(batch.payloads.len(), proto::Origin::default());
                    batch.origins.push(origin.clone().unwrap_or_default());
                    batch.origins_len += origins_added;
                }
                batch.deltas_len += frames::zigzag_len(delta);
                batch.payloads_len += elem_len;
                batch.time_deltas_us.push(delta);
                batch.payloads.push(payload.clone());
                batch.last_time_us = time_us;
                self.open.content_len += grown;
            }
            None => {
                let added = self.new_batch_stream_len(record, origin, payload.len());
                if self.open.content_len + added > self.capacity {
                    return false;
                }
                let slot = if record.replayed {
                    &mut self.topics[topic.index()].open_replay_batch
                } else {
                    &mut self.topics[topic.index()].open_batch
                };
                *slot = Some(self.open.batches.len());
                self.open.batches.push(OpenBatch {
                    topic,
                    first_seq: record.seq,
                    first_time_us: time_us,
                    last_time_us: time_us,
                    time_deltas_us: vec![0],
                    payloads: vec![payload.clone()],
                    origins: origin.iter().cloned().collect(),
                    deltas_len: 1,
                    payloads_len: elem_len,
                    origins_len: origin.as_ref().map_or(0, frames::origin_field_len),
                    replayed: record.replayed,
                });
                self.open.content_len += added;
            }
        }
        self.open
            .deadline
            .get_or_insert(now + self.config.flush_interval);
        true
    }

    /// Cuts a record into `RecordFragment`s (wire-format.md §5.2): the first piece fills what is
    /// left of the open block, the next ones fill fresh blocks, the last one opens a block that
    /// stays open for what comes next.
    fn place_fragments(
        &mut self,
        now: Instant,
        record: Placed,
        mut origin: Option<proto::Origin>,
        payload: Bytes,
    ) {
        let Placed {
            topic,
            seq,
            time_us,
            replayed,
        } = record;
        let topic_len = self.topics[topic.index()].name.len();
        let total_len = payload.len();
        let mut offset = 0;
        loop {
            let room = self.capacity - self.open.content_len;
            let head = frames::FragmentHead {
                // Only the first piece carries the origin.
                origin_len: if offset == 0 {
                    origin.as_ref().map_or(0, frames::origin_field_len)
                } else {
                    0
                },
                topic_len,
                seq,
                time_us,
                total_len,
                offset,
                replayed,
            };
            let data_len = head.max_data(room, total_len - offset);
            let ends_record = offset + data_len == total_len;
            let fits = frames::frame_stream_len(head.body_len(data_len)) <= room;
            if data_len == 0 && !(ends_record && fits) {
                if self.open.is_empty() {
                    // Not even an empty block holds this piece: `push` checked the record
                    // against the limits, so this cannot happen; the record stays incomplete
                    // (its gap is reported) rather than the loop spinning without progress.
                    debug_assert!(false, "a record that passed RecordLimits does not fit");
                    self.stats.records_refused += 1;
                    return;
                }
                // Not even one byte fits: start on a fresh block.
                self.seal(now);
                continue;
            }
            let body = head.body_len(data_len);
            let fragment = Fragment {
                topic,
                seq,
                time_us,
                total_len,
                offset,
                data: payload.slice(offset..offset + data_len),
                origin: if offset == 0 { origin.take() } else { None },
                replayed,
            };
            self.open.content_len += frames::frame_stream_len(body);
            self.open
                .deadline
                .get_or_insert(now + self.config.flush_interval);
            self.stats.fragments += 1;
            if offset == 0 {
                // A first piece goes after every batch of its block (§4.3), so nothing may follow it.
                self.open.trailing = Some(fragment);
                self.seal(now);
            } else {
                // Later pieces always open a fresh block.
                debug_assert!(self.open.leading.is_none() && self.open.batches.is_empty());
                self.open.leading = Some(fragment);
                if !ends_record {
                    self.seal(now);
                }
            }
            offset += data_len;
            if ends_record {
                return;
            }
        }
    }

    /// Seals the open block and releases every waiting block now, whatever their deadlines.
    pub fn flush(&mut self, now: Instant) {
        self.seal(now);
        for block in &mut self.waiting {
            block.deadline = block.deadline.min(now);
        }
    }

    /// Releases the repair shards now, whatever they are due: for a clean stop, so that the
    /// last blocks still get their repair before the sender goes.
    pub fn release_repairs(&mut self, now: Instant) {
        for repair in &mut self.repairs {
            repair.due = repair.due.min(now);
        }
    }

    /// For a clean stop: everything pushed so far, then a heartbeat whose catalogue tells the
    /// receiver each topic's final sequence number, all released at once.
    pub fn finish(&mut self, now: Instant, unix_time_us: i64) {
        self.stopping = true;
        self.add_heartbeat(now, unix_time_us);
        self.flush(now);
        self.release_repairs(now);
    }

    /// Whether a block is being filled (and so has a flush deadline).
    pub fn has_open_block(&self) -> bool {
        !self.open.is_empty()
    }

    /// True when nothing is left to send.
    pub fn is_idle(&self) -> bool {
        self.open.is_empty()
            && self.waiting.is_empty()
            && self.repairs.is_empty()
            && self.schedule_cursor == self.schedule.len()
            && self.held.is_none()
    }

    pub fn handle_timeout(&mut self, now: Instant, unix_time_us: i64) {
        if self.open.deadline.is_some_and(|d| d <= now) {
            self.seal(now);
        }
        if self.next_heartbeat <= now {
            self.add_heartbeat(now, unix_time_us);
            self.next_heartbeat = now + self.config.heartbeat_interval;
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = Some(self.next_heartbeat);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        consider(self.open.deadline);
        let sending = self.schedule_cursor < self.schedule.len();
        if !sending && self.waiting.len() < self.config.interleave_depth {
            consider(self.waiting.front().map(|b| b.deadline));
        }
        consider(self.repairs.front().map(|r| r.due));
        if self.held.is_some() {
            consider(self.pacer.as_ref().map(Pacer::next_send_time));
        }
        next
    }

    /// The next datagram to send, if one is ready and the pacer allows it (wire-format.md §3.3).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        let datagram = self.held.take().or_else(|| self.next_datagram(now))?;
        if let Some(pacer) = &mut self.pacer {
            if !pacer.ready(now) {
                self.held = Some(datagram);
                return None;
            }
            pacer.consume(datagram.len() + IP_UDP_OVERHEAD);
        }
        Some(datagram)
    }

    /// The datagrams of one send, written back to back into `out`: up to `max_datagrams` of one
    /// size (a shorter one may end the batch, never sit inside it), as many as the pacer's credit
    /// allows, at least one when it allows any. None when nothing is ready or the pacer says
    /// wait (`poll_timeout` then says until when).
    pub fn poll_transmit_batch(
        &mut self,
        now: Instant,
        max_datagrams: usize,
        out: &mut Vec<u8>,
    ) -> Option<Batch> {
        out.clear();
        let first = self.held.take().or_else(|| self.next_datagram(now))?;
        let segment = first.len();
        let wire = |datagrams: usize| datagrams * (segment + IP_UDP_OVERHEAD);
        let budget = match &mut self.pacer {
            Some(pacer) => {
                if !pacer.ready(now) {
                    self.held = Some(first);
                    return None;
                }
                pacer.budget(now).max(wire(1))
            }
            None => usize::MAX,
        };
        out.extend_from_slice(&first);
        let mut count = 1;
        // The kernel takes at most 64 KiB of UDP payload in one segmented send.
        while count < max_datagrams
            && wire(count + 1) <= budget
            && out.len() + segment <= MAX_UDP_PAYLOAD_BYTES
        {
            match self.next_datagram(now) {
                Some(d) if d.len() == segment => out.extend_from_slice(&d),
                Some(d) if d.len() < segment => {
                    out.extend_from_slice(&d);
                    count += 1;
                    break;
                }
                Some(d) => {
                    self.held = Some(d);
                    break;
                }
                None => break,
            }
            count += 1;
        }
        let wire_bytes = out.len() + count * IP_UDP_OVERHEAD;
        if let Some(pacer) = &mut self.pacer {
            pacer.consume(wire_bytes);
        }
        Some(Batch {
            datagrams: count,
            segment_size: segment,
            wire_bytes,
        })
    }

    /// Takes the next datagram off the schedule, paced or not.
    fn next_datagram(&mut self, now: Instant) -> Option<Bytes> {
        // Repair shards that are due go first: their block has waited for them already.
        if let Some(repair) = self.repairs.front_mut().filter(|r| r.due <= now) {
            let at = repair.next * repair.stride;
            let datagram = repair.datagrams.slice(at..at + repair.stride);
            repair.next += 1;
            if repair.next == repair.end {
                self.repairs.pop_front();
            }
            self.queued_bytes -= datagram.len();
            self.repair_queued_bytes -= datagram.len();
            self.stats.datagrams_out += 1;
            self.stats.repair_datagrams_out += 1;
            self.stats.wire_bytes_out += (datagram.len() + IP_UDP_OVERHEAD) as u64;
            return Some(datagram);
        }
        if self.schedule_cursor == self.schedule.len() && !self.start_group(now) {
            return None;
        }
        let (block, shard) = self.schedule[self.schedule_cursor];
        self.schedule_cursor += 1;
        let block = &self.group[block];
        let datagram = block
            .datagrams
            .slice(shard * block.stride..(shard + 1) * block.stride);
        self.queued_bytes -= datagram.len();
        self.stats.datagrams_out += 1;
        self.stats.wire_bytes_out += (datagram.len() + IP_UDP_OVERHEAD) as u64;
        Some(datagram)
    }

    /// Forms the next group and its spread-out transmission order (wire-format.md §3.3).
    fn start_group(&mut self, now: Instant) -> bool {
        let ready = self.waiting.len() >= self.config.interleave_depth
            || self.waiting.front().is_some_and(|b| b.deadline <= now);
        if !ready {
            return false;
        }
        let take = self.waiting.len().min(self.config.interleave_depth);
        self.group.clear();
        self.group.extend(self.waiting.drain(..take));
        self.schedule.clear();
        self.schedule_cursor = 0;
        for (b, block) in self.group.iter().enumerate() {
            self.schedule.extend((0..block.count).map(|i| (b, i)));
        }
        // Position (2i + 1) / 2n compared exactly by cross-multiplication, ties by block.
        let counts: Vec<u64> = self.group.iter().map(|b| b.count as u64).collect();
        self.schedule.sort_by(|&(b1, i1), &(b2, i2)| {
            let left = (2 * i1 as u64 + 1) * counts[b2];
            let right = (2 * i2 as u64 + 1) * counts[b1];
            left.cmp(&right).then(b1.cmp(&b2))
        });
        true
    }

    fn add_heartbeat(&mut self, now: Instant, unix_time_us: i64) {
        // This heartbeat's block goes after every block sealed before it (§5.3).
        let queued_ahead = (self.schedule.len() - self.schedule_cursor.min(self.schedule.len()))
            + self.waiting.iter().map(|b| b.count).sum::<usize>();
        let mut heartbeat = proto::Heartbeat {
            sent_time_us: unix_time_us,
            session_start_time_us: self.config.session_start_time_us,
            heartbeat_interval_ms: self
                .config
                .heartbeat_interval
                .as_millis()
                .min(u32::MAX as u128) as u32,
            topics: Vec::new(),
            counters: Some(proto::SenderCounters {
                records_in: self.stats.records_in,
                records_dropped: self.stats.records_dropped,
                blocks_sent: self.stats.blocks_sealed,
                datagrams_sent: self.stats.datagrams_out,
                link_bytes_sent: self.stats.wire_bytes_out,
                source_errors: self.stats.source_errors,
                datagrams_before: self.stats.datagrams_out + queued_ahead as u64,
            }),
            sender_version: env!("CARGO_PKG_VERSION").to_owned(),
            stopping: self.stopping,
            repair_delay_ms: self.config.repair_delay.as_millis() as u32,
        };
        // The catalogue goes in turns of at most 128 topics and at most half a block (§5.3).
        let count = self.topics.len();
        let start = if count == 0 {
            0
        } else {
            self.catalogue_cursor % count
        };
        for i in 0..count.min(CATALOGUE_TURN_TOPICS) {
            let topic = &self.topics[(start + i) % count];
            let status = proto::TopicStatus {
                name: topic.name.clone(),
                next_seq: topic.next_seq,
                records_dropped: topic.dropped,
                first_seq: topic.first_seq,
                source_connections: topic.source_connections,
                source_errors: topic.source_errors,
                last_record_time_us: topic.last_record_time_us,
            };
            if heartbeat.encoded_len() + status.encoded_len() + 4 > self.capacity / 2 {
                break;
            }
            heartbeat.topics.push(status);
        }
        self.catalogue_cursor = start + heartbeat.topics.len();
        let stream_len = frames::frame_stream_len(heartbeat.encoded_len());
        if self.open.content_len + stream_len > self.capacity {
            self.seal(now);
        }
        self.open.content_len += stream_len;
        self.open.heartbeat = Some(heartbeat);
        self.stats.heartbeats += 1;
        // A heartbeat's block leaves at once: it is what tells the receiver the link is alive.
        self.open.deadline = Some(now);
        self.seal(now);
    }

    /// Serialises the open block, codes it and queues its datagrams (wire-format.md §3-§4).
    fn seal(&mut self, now: Instant) {
        if self.open.is_empty() {
            return;
        }
        let open = std::mem::replace(
            &mut self.open,
            OpenBlock {
                content_len: CONTENT_HEADER_LEN,
                ..OpenBlock::default()
            },
        );
        let content = &mut self.scratch;
        content.clear();
        content.extend_from_slice(&[0; CONTENT_HEADER_LEN]);
        let fragment_frame = |f: Fragment, topics: &[Topic]| proto::Frame {
            body: Some(proto::frame::Body::Fragment(proto::RecordFragment {
                topic: topics[f.topic.index()].name.clone(),
                seq: f.seq,
                time_us: f.time_us,
                total_len: f.total_len as u64,
                offset: f.offset as u64,
                data: f.data,
                origin: f.origin,
                replayed: f.replayed,
            })),
        };
        let encode = |frame: proto::Frame, content: &mut Vec<u8>| {
            frame
                .encode_length_delimited(content)
                .expect("Vec grows as needed");
        };
        if let Some(f) = open.leading {
            encode(fragment_frame(f, &self.topics), content);
        }
        for batch in open.batches {
            let topic = &mut self.topics[batch.topic.index()];
            topic.open_batch = None;
            topic.open_replay_batch = None;
            encode(
                proto::Frame {
                    body: Some(proto::frame::Body::Records(proto::RecordBatch {
                        topic: topic.name.clone(),
                        first_seq: batch.first_seq,
                        first_time_us: batch.first_time_us,
                        time_deltas_us: batch.time_deltas_us,
                        payloads: batch.payloads,
                        origins: batch.origins,
                        // The receiver's own field: never on the link (wire-format.md §5.1).
                        session_id: 0,
                        replayed: batch.replayed,
                    })),
                },
                content,
            );
        }
        if let Some(h) = open.heartbeat {
            encode(
                proto::Frame {
                    body: Some(proto::frame::Body::Heartbeat(h)),
                },
                content,
            );
        }
        if let Some(f) = open.trailing {
            encode(fragment_frame(f, &self.topics), content);
        }
        debug_assert_eq!(content.len(), open.content_len, "size accounting drifted");
        debug_assert!(content.len() <= self.capacity);
        let frames_len = (content.len() - CONTENT_HEADER_LEN) as u32;
        content[..CONTENT_HEADER_LEN].copy_from_slice(&frames_len.to_be_bytes());
        if let Some(cipher) = &self.cipher {
            // §4.4: the frames are sealed before FEC; their length stays clear, bound as AAD.
            let tag = cipher.seal(
                self.config.session_id,
                self.next_block,
                &mut content[CONTENT_HEADER_LEN..],
            );
            content.extend_from_slice(&tag);
        }

        let (k, m, shard_len) = fec::geometry_for(
            content.len(),
            self.max_shard_len,
            self.config.data_shards,
            &self.plan,
        );
        // §3.4: with outage protection, k + m more parity shards of the same code (any k of
        // all the block's shards rebuild it) follow the block after the repair delay: alone
        // they rebuild it as surely as its first k + m do, even if an outage took all of those.
        let repair = if self.config.repair_delay.is_zero() || m == 0 {
            0
        } else {
            (k + m).min(datagram::MAX_TOTAL_SHARDS - k - m)
        };
        let total_parity = m + repair;
        let geometry = BlockGeometry {
            data_shards: k as u8,
            parity_shards: total_parity as u8,
            interleave_depth: self.config.interleave_depth as u8,
            shard_len: shard_len as u16,
        };
        let stride = geometry.datagram_len(self.config.key.is_some());
        // Each data shard written once rather than zeroed and then copied over. Headers and tags
        // are written below, parity by the codec.
        let mut datagrams = BytesMut::with_capacity((k + total_parity) * stride);
        for chunk in content.chunks(shard_len) {
            datagrams.put_bytes(0, HEADER_LEN);
            datagrams.extend_from_slice(chunk);
            datagrams.put_bytes(0, stride - HEADER_LEN - chunk.len());
        }
        datagrams.resize((k + total_parity) * stride, 0);
        if total_parity > 0 {
            let codec = self.codecs.get(k, total_parity);
            fec::encode_strided(&codec, &mut datagrams, k, stride, HEADER_LEN, shard_len);
        }
        for (index, slot) in datagrams.chunks_mut(stride).enumerate() {
            Header {
                authenticated: self.config.key.is_some(),
                encrypted: self.cipher.is_some(),
                session_id: self.config.session_id,
                block: self.next_block,
                shard_index: index as u8,
                geometry,
            }
            .write(slot);
            datagram::seal(slot, self.config.key.as_ref());
        }
        self.next_block += 1;
        self.stats.blocks_sealed += 1;
        self.queued_bytes += datagrams.len();
        let deadline = open.deadline.unwrap_or(now);
        let datagrams = datagrams.freeze();
        if repair > 0 {
            // The block leaves by its deadline at the latest; its repair that long after.
            self.repair_queued_bytes += repair * stride;
            self.repairs.push_back(Repair {
                datagrams: datagrams.clone(),
                stride,
                next: k + m,
                end: k + m + repair,
                due: deadline.max(now) + self.config.repair_delay,
            });
        }
        self.waiting.push_back(SealedBlock {
            datagrams,
            stride,
            count: k + m,
            deadline,
        });
    }
}
