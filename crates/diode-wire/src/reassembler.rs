//! The receiver's state machine: datagrams in, ordered records, gaps and link events out.
//!
//! ```text
//! handle_datagram() ─► §2 checks ─► session (§6.1) ─► pending blocks (§6.2) ─► rebuild (§3.2)
//!                                                                           └─► in block order: frames (§4, §5)
//!                                                                                 └─► per-topic order and gaps (§6.4) ─► poll_event()
//! ```
//!
//! Every input may be hostile: nothing here panics on it, and memory is bounded by
//! [`ReassemblerConfig`] whatever arrives.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use prost::Message;

use crate::auth::{BlockCipher, LinkKey, SEAL_TAG_LEN};
use crate::datagram::{self, BlockGeometry, Header, Rejected};
use crate::fec::{self, CodecCache};
use crate::frames::{self, proto};
use crate::gaps::{GapBook, OpenGap};

/// Retired session ids remembered to reject their late datagrams (§6.1).
const RETIRED_SESSIONS: usize = 16;
/// A new session whose first block seen is below this starts at block 0 (§6.1).
const JOIN_FROM_START_BLOCKS: u64 = 16;
/// Shards this far behind the delivery point are unneeded rather than stale (§6.2).
const UNNEEDED_WINDOW_BLOCKS: u64 = 1024;
/// With outage protection, repair shards of delivered blocks come a repair delay late: however
/// many blocks went by meanwhile, they are unneeded, never `stale` or `replay` (§3.4).
const UNNEEDED_WINDOW_BLOCKS_REPAIRED: u64 = 1 << 22;
/// Instants at which blocks were doomed (§3.4), kept at most; closer ones are merged.
const DOOMED_ENTRIES: usize = 1024;
/// Reordering slack on top of the interleave depth (§6.3).
const REORDER_SLACK_BLOCKS: u64 = 2;
/// Candidate sessions held at once, and the bytes and datagrams each may hold (§6.1).
const MAX_CANDIDATES: usize = 4;
const CANDIDATE_BYTES: usize = 256 * 1024;
const CANDIDATE_DATAGRAMS: usize = 2048;
/// Plausibility bounds (§6.6): no sender moves its block numbers or a topic's sequence numbers
/// faster than these, so a forged datagram cannot drive a loss counter past what a link could
/// physically carry in the time since the session or the topic was first seen.
const MAX_BLOCK_JUMP: u64 = 1 << 16;
const MAX_BLOCKS_PER_SEC: u64 = 1 << 22;
const MAX_SEQ_JUMP: u64 = 1 << 20;
const MAX_RECORDS_PER_SEC: u64 = 1 << 25;
/// Heartbeat intervals of silence before the link is called down (§6.5).
const LINK_DOWN_HEARTBEATS: u32 = 4;

#[derive(Debug, Clone)]
pub struct ReassemblerConfig {
    pub max_inflight_bytes: usize,
    pub block_timeout: Duration,
    pub max_record_bytes: usize,
    pub max_topics: usize,
    /// Silence that means link down before a heartbeat has announced the sender's interval.
    pub initial_link_timeout: Duration,
    /// With keys, only datagrams authenticated by one of them are accepted (wire-format.md §2.1).
    pub keys: Vec<LinkKey>,
    /// Accept only encrypted blocks (wire-format.md §4.4); others are rejected as `auth`.
    pub require_encryption: bool,
    /// Bytes the cached Reed-Solomon codecs may come to hold (see `fec::CodecCache`).
    pub codec_cache_bytes: usize,
}

impl Default for ReassemblerConfig {
    fn default() -> Self {
        ReassemblerConfig {
            max_inflight_bytes: 32 << 20,
            block_timeout: Duration::from_millis(200),
            max_record_bytes: 16 << 20,
            max_topics: 4096,
            initial_link_timeout: Duration::from_secs(2),
            keys: Vec::new(),
            require_encryption: false,
            codec_cache_bytes: fec::DEFAULT_CODEC_CACHE_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: Arc<str>,
    pub seq: u64,
    /// The sender's session it came in: with the topic and sequence number, what identifies a
    /// record for good (sequence numbers restart with each session, §1). 0: not known (a record
    /// kept by a disk buffer of an earlier version).
    pub session_id: u64,
    /// Microseconds since the Unix epoch, when the sender took the record in.
    pub time_us: i64,
    /// Where the record came from inside its source, when the source said (wire-format.md §5.4).
    pub origin: Option<proto::Origin>,
    /// Sent again from the sender's journal (§5.5): it fills a gap reported earlier, so it
    /// comes after records with higher sequence numbers.
    pub late: bool,
    pub payload: Bytes,
}

/// Records `first_seq..=last_seq` of `topic` are lost, unless a replay from the sender's
/// journal fills the gap later (§6.7). They were taken in after `after_us` and before
/// `before_us` (the sender's clock; 0 when not known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub topic: Arc<str>,
    pub first_seq: u64,
    pub last_seq: u64,
    pub after_us: i64,
    pub before_us: i64,
}

impl Gap {
    /// How many records it lost: a gap is never empty.
    pub fn records(&self) -> u64 {
        (self.last_seq - self.first_seq).saturating_add(1)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Record(Record),
    Gap(Gap),
    /// Blocks `first..=last` of the session could not be rebuilt.
    BlocksLost {
        session_id: u64,
        first: u64,
        last: u64,
    },
    SessionStarted {
        session_id: u64,
        previous: Option<u64>,
        mid_stream: bool,
    },
    Heartbeat(Box<proto::Heartbeat>),
    LinkUp,
    LinkDown,
    /// A session is authenticated by another key than the one before it (or this is the first
    /// session): `previous` when it is not the first configured key, a rotation the sender has
    /// not made yet (§2.1). Said once per change, at a session's first datagram.
    KeyInUse {
        key_id: u8,
        previous: bool,
    },
}

/// Cumulative counters; the receiver exports them as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReassemblerStats {
    pub datagrams_accepted: u64,
    pub datagrams_unneeded: u64,
    pub rejected: [u64; Rejected::ALL.len()],
    pub blocks_complete: u64,
    /// Blocks that needed parity to rebuild.
    pub blocks_recovered: u64,
    pub blocks_lost: u64,
    pub malformed_blocks: u64,
    /// Authenticated blocks no configured key could decrypt (§4.4).
    pub undecryptable_blocks: u64,
    pub malformed_frames: u64,
    pub records_out: u64,
    pub records_lost: u64,
    pub duplicate_records: u64,
    /// Replayed records that filled a gap (§6.7), delivered late.
    pub records_recovered: u64,
    /// Replayed records not needed: delivered already, or before what this receiver knows.
    pub replayed_duplicates: u64,
    /// Open gaps forgotten to stay within their caps: no replay can fill them now.
    pub gaps_forgotten: u64,
    pub records_over_topic_cap: u64,
    pub oversize_records: u64,
    pub heartbeats: u64,
    pub sessions: u64,
    /// Reed-Solomon codecs built and evicted (new geometries; a steady rise means hostile input).
    pub codecs_built: u64,
    pub codecs_evicted: u64,
}

impl ReassemblerStats {
    pub fn rejected(&self, reason: Rejected) -> u64 {
        self.rejected[reason as usize]
    }

    /// Datagrams dropped, for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

enum BlockState {
    Receiving {
        geometry: BlockGeometry,
        shards: fec::ShardSet,
    },
    Complete(Bytes),
    /// k shards arrived but did not rebuild: a lost block, never delivered.
    Unrecoverable,
}

struct PendingBlock {
    state: BlockState,
    /// Bytes counted against `max_inflight_bytes`.
    charged: usize,
}

struct PartialRecord {
    topic: String,
    replayed: bool,
    seq: u64,
    time_us: i64,
    total_len: usize,
    origin: Option<proto::Origin>,
    data: Vec<u8>,
}

struct Session {
    id: u64,
    next_deliver: u64,
    pending: BTreeMap<u64, PendingBlock>,
    inflight_bytes: usize,
    max_depth: u64,
    /// Since when the block at `next_deliver` has seen no progress (§6.3).
    head_since: Instant,
    topics: HashMap<Arc<str>, TopicState>,
    mid_stream: bool,
    /// A block of this session has decoded: from now on only a new session that proves itself
    /// with a heartbeat replaces it, and only once this one has gone quiet (§6.1).
    confirmed: bool,
    /// Its last heartbeat said the sender was stopping (§5.3).
    stopped: bool,
    /// When its last datagram arrived: a session still sending is alive and cannot be displaced.
    last_datagram: Instant,
    /// Outage protection as its heartbeats announce it (§3.4): how long an incomplete block is
    /// waited for before it is given up. Zero: the rules of §6.3 alone.
    repair_wait: Duration,
    /// (threshold, when): every block below `threshold` was known to be complete or lost at
    /// `when` by the rule of §6.3; with outage protection it is given up a repair wait later.
    doomed: VecDeque<(u64, Instant)>,
    /// When and at which block it started, for the plausibility bound on block numbers (§6.6).
    started_at: Instant,
    first_block: u64,
    partial: Option<PartialRecord>,
}

impl Session {
    /// The highest block number a genuine sender could have reached by `now` (§6.6).
    fn block_frontier(&self, now: Instant) -> u64 {
        let secs = now.saturating_duration_since(self.started_at).as_secs();
        self.first_block
            .saturating_add(MAX_BLOCK_JUMP)
            .saturating_add(secs.saturating_mul(MAX_BLOCKS_PER_SEC))
    }
}

/// Per topic and session: the next expected sequence number (`None` until known when joined
/// mid-stream), and the first sequence number seen with its time, which bound how far a
/// sequence number can plausibly jump (§6.6).
#[derive(Clone)]
struct TopicState {
    expected: Option<u64>,
    anchor: Option<(u64, Instant)>,
    /// The ingest time of the last record delivered, to date the gap after it.
    last_time_us: i64,
    /// Until a heartbeat of the session says where the sender's numbering of the topic began.
    unresolved: Option<Unresolved>,
    /// Where that heartbeat said it began, and the heartbeat's time.
    first_seq: Option<(u64, i64)>,
    /// The mark it came with when that heartbeat resolved it.
    resolved_against: Option<Mark>,
    /// The lowest number from which this session's records of the topic are accounted for,
    /// delivered or reported lost, with the ingest time of the first record delivered from
    /// there (0: not known): below it, only a mark from elsewhere can say what was lost
    /// (`Reassembler::take_over`).
    accounted_from: Option<(u64, i64)>,
}

/// What a topic's first records in a session cannot tell alone (§6.4): whether the sender's
/// numbering went on from where an earlier session left it, or started over. The session's
/// heartbeats say where it began (`first_seq`); until one does, records are delivered and the
/// first one seen is remembered, so the gap before it is reported then.
#[derive(Clone, Copy)]
struct Unresolved {
    /// The session was seen from its start: every record of it counts.
    from_start: bool,
    /// Where an earlier session, or this receiver before its restart, left the topic.
    carried: Option<Mark>,
    /// The first record seen: (sequence number, ingest time).
    first_seen: Option<(u64, i64)>,
}

/// Where a topic stood: its next expected sequence number, the ingest time of the record
/// before it (0: not known), and the session it stood there in (0: not known).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    pub next_seq: u64,
    pub last_time_us: i64,
    pub session_id: u64,
}

impl Mark {
    /// The later of two marks of one topic: the one of the later session (session ids grow
    /// with the sender's start time, §1), or, in one session, the one further on.
    pub fn max_by_session(self, other: Mark) -> Mark {
        if (other.session_id, other.next_seq) > (self.session_id, self.next_seq) {
            other
        } else {
            self
        }
    }
}

/// What a reassembler lets go of when another carries a topic now
/// ([`Reassembler::hand_over`]), for that one to take ([`Reassembler::take_over`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicHandover {
    /// Where the topic stood.
    pub mark: Option<Mark>,
    /// Its gaps still open, for replays to fill where it is now.
    pub gaps: Vec<OpenGap>,
}

impl TopicState {
    /// Where the topic stands in session `session_id`, or the mark it came with while no
    /// record of the session has placed it yet.
    fn mark(&self, session_id: u64) -> Option<Mark> {
        match self.expected {
            Some(next_seq) => Some(Mark {
                next_seq,
                last_time_us: self.last_time_us,
                session_id,
            }),
            None => self.unresolved.and_then(|u| u.carried),
        }
    }

    /// A topic no heartbeat resolved, leaving: judged by its first record alone, at or above
    /// the mark it came with, the sender numbered on and what lies between is a gap (§6.4).
    /// Returns the mark, and the first record's number and time.
    fn unreported_gap(&self) -> Option<(Mark, u64, i64)> {
        let unresolved = self.unresolved?;
        let (mark, (seen, seen_time_us)) = (unresolved.carried?, unresolved.first_seen?);
        (seen > mark.next_seq).then_some((mark, seen, seen_time_us))
    }

    fn plausible(&mut self, seq: u64, now: Instant) -> bool {
        self.anchor.get_or_insert((seq, now));
        self.within_bound(seq, now)
    }

    /// Whether `seq` is within the §6.6 bound of the anchor (true while there is none).
    fn within_bound(&self, seq: u64, now: Instant) -> bool {
        let Some((first, since)) = self.anchor else {
            return true;
        };
        seq <= seq_frontier(first, now.saturating_duration_since(since).as_secs())
    }

    /// Whether a topic that went on from `mark` can have reached `seq` by `time_us` (the
    /// sender's clock, as the mark's time): the §6.6 bound counted from the mark. A mark of
    /// unknown time bounds nothing.
    fn carried_plausible(mark: Mark, seq: u64, time_us: i64) -> bool {
        if mark.last_time_us == 0 {
            return true;
        }
        let secs = (time_us.saturating_sub(mark.last_time_us).max(0) / 1_000_000) as u64;
        seq <= seq_frontier(mark.next_seq, secs)
    }

    /// An unresolved topic whose first numbers are beyond the bound of where it was expected
    /// to start: a fresh receiver meeting a sender that has numbered on for long, or a forgery.
    /// Either way nothing before them can be called lost: the topic is taken as joined
    /// mid-stream, anchored where it is now.
    fn rejoin_mid_stream(&mut self, seq: u64, now: Instant) {
        if let Some(unresolved) = self.unresolved.as_mut() {
            unresolved.from_start = false;
            unresolved.carried = None;
        }
        self.anchor = Some((seq, now));
    }
}

/// The highest sequence number a topic could have reached `secs` after it stood at `first`
/// (§6.6).
fn seq_frontier(first: u64, secs: u64) -> u64 {
    first
        .saturating_add(MAX_SEQ_JUMP)
        .saturating_add(secs.saturating_mul(MAX_RECORDS_PER_SEC))
}

/// Datagrams of an unknown, unauthenticated session held until one of its blocks yields a
/// heartbeat (§6.1). Each datagram's header is parsed once, on arrival, and its block's shards
/// counted, so the work per datagram is bounded whatever the candidate holds.
struct Candidate {
    id: u64,
    /// The newest datagrams, within the bounds: a candidate that fills up before a heartbeat
    /// comes must still be able to prove itself with the next one, so the oldest make room.
    held: VecDeque<(Header, Vec<u8>)>,
    /// The position, counted since the candidate's first datagram, of `held[0]`.
    base: u64,
    /// The lowest block number seen of it, held or not: whether it was seen from its start.
    lowest_block: u64,
    bytes: usize,
    blocks: HashMap<u64, HeldBlock>,
    /// A block of it rebuilt to content holding a heartbeat.
    proven: bool,
    last_seen: Instant,
}

/// One block of a candidate: which of its shards are held, and where.
struct HeldBlock {
    geometry: BlockGeometry,
    present: [u64; 4],
    /// (shard index, position counted since the candidate's first datagram).
    shards: Vec<(u8, u64)>,
    /// Decoded once when k shards were held; never again.
    checked: bool,
}

impl Candidate {
    /// Holds a datagram within the candidate's bounds, letting the oldest go (with the blocks
    /// they belong to) to make room; returns whether it was held (not a duplicate shard, not a
    /// geometry that contradicts its block's).
    fn hold(&mut self, header: &Header, datagram: &[u8]) -> bool {
        if let Some(block) = self.blocks.get(&header.block) {
            let index = header.shard_index as usize;
            if block.geometry != header.geometry
                || block.present[index / 64] & (1u64 << (index % 64)) != 0
            {
                return false;
            }
        }
        while !self.held.is_empty()
            && (self.bytes + datagram.len() > CANDIDATE_BYTES
                || self.held.len() >= CANDIDATE_DATAGRAMS)
        {
            let (old, bytes) = self.held.pop_front().expect("not empty");
            self.base += 1;
            self.bytes -= bytes.len();
            self.blocks.remove(&old.block);
        }
        let block = self.blocks.entry(header.block).or_insert(HeldBlock {
            geometry: header.geometry,
            present: [0; 4],
            shards: Vec::new(),
            checked: false,
        });
        let index = header.shard_index as usize;
        block.present[index / 64] |= 1u64 << (index % 64);
        block
            .shards
            .push((header.shard_index, self.base + self.held.len() as u64));
        self.bytes += datagram.len();
        self.held.push_back((*header, datagram.to_vec()));
        true
    }
}

/// The session a receiver last delivered from on an authenticated link, and how far: kept by the
/// receiver across its restarts so that a replay of an old session, or of the current one's
/// delivered blocks, is refused after a restart too (§6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayFloor {
    pub session_id: u64,
    pub next_block: u64,
}

/// The session a forged or mistaken one displaced, kept so that if it turns out to be alive it
/// can come back with its per-topic expectations, and what it sent meanwhile is reported lost.
struct Displaced {
    id: u64,
    topics: HashMap<Arc<str>, TopicState>,
}

pub struct Reassembler {
    config: ReassemblerConfig,
    session: Option<Session>,
    retired: VecDeque<u64>,
    displaced: Option<Displaced>,
    candidates: Vec<Candidate>,
    /// Restored from the receiver's state: the newest authenticated session known (§6.1).
    floor: Option<ReplayFloor>,
    /// Per topic, where the last session (or the receiver before its restart) left it: the
    /// same session goes on from there, and so does a sender whose numbering goes on across its
    /// restarts (§6.1, §6.4).
    carried: HashMap<Arc<str>, Mark>,
    /// Gaps still open, across sessions, for replayed records to fill (§6.7).
    gaps: GapBook,
    codecs: CodecCache,
    /// Block ciphers of the current session, one per configured key (§4.4).
    ciphers: Option<(u64, Vec<BlockCipher>)>,
    events: VecDeque<Event>,
    stats: ReassemblerStats,
    last_valid: Option<Instant>,
    link_up: bool,
    link_timeout: Duration,
    /// The session whose key was last announced, and that key's id.
    key_in_use: Option<(u64, u8)>,
}

impl Reassembler {
    pub fn new(config: ReassemblerConfig) -> Self {
        Reassembler {
            link_timeout: config.initial_link_timeout,
            session: None,
            retired: VecDeque::new(),
            displaced: None,
            candidates: Vec::new(),
            floor: None,
            carried: HashMap::new(),
            gaps: GapBook::default(),
            codecs: CodecCache::with_budget(config.codec_cache_bytes),
            ciphers: None,
            events: VecDeque::new(),
            stats: ReassemblerStats::default(),
            last_valid: None,
            link_up: false,
            key_in_use: None,
            config,
        }
    }

    /// Says which key authenticates a session, once, from its first datagram accepted: the one
    /// event of a key rotation the IT side can see (§2.1). A sender takes up a new key when it
    /// restarts, so once per session is every change; and a holder of the other key cannot
    /// make it flap by slipping datagrams into the session.
    fn note_key(&mut self, session_id: u64, datagram: &[u8]) {
        if self
            .key_in_use
            .is_some_and(|(session, _)| session == session_id)
        {
            return;
        }
        let Some(key_id) = datagram::key_id(datagram) else {
            return;
        };
        if self.key_in_use.is_some_and(|(_, key)| key == key_id) {
            self.key_in_use = Some((session_id, key_id));
            return;
        }
        self.key_in_use = Some((session_id, key_id));
        let previous = self.config.keys.first().is_some_and(|k| k.id() != key_id);
        self.events.push_back(Event::KeyInUse { key_id, previous });
    }

    /// The newest authenticated session delivered from, and its delivery point, for the
    /// receiver to keep across restarts (§6.1). `None` on an unauthenticated link.
    pub fn replay_floor(&self) -> Option<ReplayFloor> {
        match &self.session {
            Some(s) if !self.config.keys.is_empty() => Some(ReplayFloor {
                session_id: s.id,
                next_block: s.next_deliver,
            }),
            _ => self.floor,
        }
    }

    /// Takes back what [`Reassembler::replay_floor`] said before a restart: older sessions are
    /// refused as `replay`, and the same session resumes where delivery stopped.
    pub fn restore_replay_floor(&mut self, floor: ReplayFloor) {
        self.floor = Some(floor);
    }

    /// Where each topic stands, for the receiver to keep across its restarts (§6.1, §6.4):
    /// the current session's topics, and the marks carried from before that it has not seen
    /// yet (a receiver that restarts again meanwhile must not lose them).
    pub fn watermarks(&self) -> Vec<(Arc<str>, Mark)> {
        let mut marks = self.carried.clone();
        if let Some(s) = &self.session {
            marks.extend(
                s.topics
                    .iter()
                    .filter_map(|(topic, state)| Some((topic.clone(), state.mark(s.id)?))),
            );
        }
        let mut marks: Vec<_> = marks.into_iter().collect();
        marks.sort();
        marks
    }

    /// Gaps reported and not yet filled by replayed records (§6.7), by topic and sequence
    /// number, for the receiver to keep across restarts and to list for operators.
    pub fn open_gaps(&self) -> Vec<(Arc<str>, OpenGap)> {
        self.gaps.list()
    }

    /// How many gaps are open (§6.7).
    pub fn open_gap_count(&self) -> usize {
        self.gaps.len()
    }

    /// Takes back what [`Reassembler::open_gaps`] said before a restart.
    pub fn restore_gaps(&mut self, gaps: impl IntoIterator<Item = (Arc<str>, OpenGap)>) {
        for (topic, gap) in gaps {
            if frames::is_valid_topic(&topic) {
                self.gaps.open(&topic, gap);
            }
        }
    }

    /// Takes back what [`Reassembler::watermarks`] said before a restart: when a topic's
    /// session comes back, or a later one that numbers on (§6.4), the topic goes on from its
    /// mark, so the records sent while this receiver was down are reported as gaps with their
    /// ranges, at the first record or heartbeat that shows them. At most `max_topics` are kept.
    pub fn restore_watermarks(&mut self, marks: impl IntoIterator<Item = (Arc<str>, Mark)>) {
        self.carried = marks
            .into_iter()
            .filter(|(topic, _)| frames::is_valid_topic(topic))
            .take(self.config.max_topics)
            .collect();
    }

    /// Lets go of a topic that another reassembler now carries (a receiver's other lane,
    /// wire-format.md §7): its place in the current session, its mark and its open gaps leave
    /// this one, which would otherwise take the topic's later numbers, should it come back
    /// here, for records lost. Returns them for the one that carries it now
    /// ([`Reassembler::take_over`]).
    pub fn hand_over(&mut self, topic: &str) -> TopicHandover {
        self.release(topic, true)
    }

    /// Lets go of a topic as [`Reassembler::hand_over`] does, for a numbering of it this
    /// receiver refuses (two senders, or a topic on two lanes, §7): nothing it showed is
    /// reported lost.
    pub fn forget(&mut self, topic: &str) -> TopicHandover {
        self.release(topic, false)
    }

    fn release(&mut self, topic: &str, report_unseen: bool) -> TopicHandover {
        let carried = self.carried.remove(topic);
        let placed = self
            .session
            .as_mut()
            .and_then(|s| Some((s.topics.remove_entry(topic)?, s.id)));
        let mark = match placed {
            Some(((key, state), session_id)) => {
                // Leaving as it would at the session's end: what its first record showed lost
                // goes with its other gaps.
                if let Some((mark, seen, seen_time_us)) =
                    state.unreported_gap().filter(|_| report_unseen)
                {
                    self.report_gap(
                        &key,
                        mark.next_seq,
                        seen - 1,
                        mark.last_time_us,
                        seen_time_us,
                    );
                }
                state.mark(session_id).or(carried)
            }
            None => carried,
        };
        let gaps = self.gaps.take(topic);
        TopicHandover { mark, gaps }
    }

    /// Takes a topic another reassembler let go of ([`Reassembler::hand_over`]): its open gaps,
    /// for replays to fill here, and its mark. What the sender numbered after that mark and
    /// neither saw (the last moments of the other lane, or all that was sent while the
    /// receiver was down) is reported lost here, as it would have been had the topic stayed
    /// where it was (§6.4, §7).
    pub fn take_over(&mut self, topic: &str, handover: TopicHandover) {
        if !frames::is_valid_topic(topic) {
            return;
        }
        let name: Arc<str> = Arc::from(topic);
        let TopicHandover { mark, gaps } = handover;
        let gaps = gaps.into_iter().map(|gap| (name.clone(), gap));
        let Some(mark) = mark else {
            self.restore_gaps(gaps);
            return;
        };
        let Some(session) = self
            .session
            .as_mut()
            .filter(|s| s.topics.contains_key(topic))
        else {
            // Not placed yet in the current session: it comes with this mark, as if from this
            // reassembler's own state file, unless that holds a later one; the heartbeat that
            // places it clears the gaps if the sender started its numbering over.
            self.restore_gaps(gaps);
            let room = self.carried.len() < self.config.max_topics;
            match self.carried.get_mut(topic) {
                Some(own) => *own = own.max_by_session(mark),
                None if room => {
                    self.carried.insert(name, mark);
                }
                None => {}
            }
            return;
        };
        if mark.session_id >= session.id {
            // Numbered here in this very session already: nothing lies between.
            self.restore_gaps(gaps);
            return;
        }
        let key = session
            .topics
            .get_key_value(topic)
            .map(|(key, _)| key.clone())
            .expect("checked above");
        let state = session.topics.get_mut(&key).expect("checked above");
        if let Some(unresolved) = state.unresolved.as_mut() {
            // The heartbeat that resolves it judges its first record against the later mark,
            // and clears the gaps if the sender started its numbering over.
            let later = unresolved
                .carried
                .map_or(mark, |own| own.max_by_session(mark));
            if unresolved.carried != Some(later) {
                unresolved.carried = Some(later);
                if state.expected.is_none() {
                    state.anchor = None;
                }
            }
            self.restore_gaps(gaps);
            return;
        }
        let (Some((first_seq, first_time_us)), Some((from, from_time_us))) =
            (state.first_seq, state.accounted_from)
        else {
            self.restore_gaps(gaps);
            return;
        };
        if first_seq < mark.next_seq {
            // The sender started its numbering over: the old gaps name other records, and
            // nothing lies between.
            return;
        }
        // Resolved against a mark of its own at least as late: what lay between that and the
        // session's records is accounted for already. A mark too far behind to be this
        // numbering's leaves nothing to call lost either (as `resolve_start` and `deliver`: the
        // topic counts as joined mid-stream).
        let stale = state
            .resolved_against
            .is_some_and(|own| own.max_by_session(mark) == own);
        let plausible = TopicState::carried_plausible(mark, first_seq, first_time_us)
            && TopicState::carried_plausible(mark, from, from_time_us.max(first_time_us));
        let lost = !stale && plausible && mark.next_seq < from;
        if lost {
            // Accounted for from the mark now: the same mark taken again reports nothing more.
            state.accounted_from = Some((mark.next_seq, from_time_us));
        }
        self.restore_gaps(gaps);
        if lost {
            self.report_gap(
                &key,
                mark.next_seq,
                from - 1,
                mark.last_time_us,
                from_time_us,
            );
        }
    }

    /// Bytes the cached Reed-Solomon codecs can come to hold.
    pub fn codec_cache_bytes(&self) -> usize {
        self.codecs.bytes()
    }

    pub fn stats(&self) -> &ReassemblerStats {
        &self.stats
    }

    pub fn session_id(&self) -> Option<u64> {
        self.session.as_ref().map(|s| s.id)
    }

    /// Bytes held for blocks not yet delivered.
    pub fn inflight_bytes(&self) -> usize {
        self.session.as_ref().map_or(0, |s| s.inflight_bytes)
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let head = self
            .session
            .as_ref()
            .filter(|s| !s.pending.is_empty())
            .map(|s| s.head_since + self.config.block_timeout + s.repair_wait);
        let doomed = self.session.as_ref().and_then(|s| {
            s.doomed
                .front()
                .map(|&(_, at)| at + s.repair_wait + self.config.block_timeout)
        });
        let link = self
            .last_valid
            .filter(|_| self.link_up)
            .map(|t| t + self.link_timeout);
        let takeover = self
            .session
            .as_ref()
            .filter(|_| self.candidates.iter().any(|c| c.proven))
            .map(|s| s.last_datagram + self.quiet_period());
        [head, doomed, link, takeover].into_iter().flatten().min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.link_up
            && self
                .last_valid
                .is_some_and(|t| now >= t + self.link_timeout)
        {
            self.link_up = false;
            self.events.push_back(Event::LinkDown);
        }
        let timed_out = self
            .session
            .as_ref()
            .filter(|s| !s.pending.is_empty())
            .is_some_and(|s| now >= s.head_since + self.config.block_timeout + s.repair_wait);
        if timed_out {
            let next = self.session.as_ref().map_or(0, |s| s.next_deliver);
            self.advance_to(now, next.saturating_add(1));
        }
        self.give_up_doomed(now);
        if self.session_replaceable(now) {
            if let Some(index) = self.candidates.iter().position(|c| c.proven) {
                self.promote(now, index);
            }
        }
    }

    /// Takes one datagram from the link. `Err` says why it was dropped; it is also counted.
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) -> Result<(), Rejected> {
        let result = self.accept(now, datagram);
        self.stats.codecs_built = self.codecs.built();
        self.stats.codecs_evicted = self.codecs.evicted();
        match result {
            Ok(()) => self.stats.datagrams_accepted += 1,
            Err(reason) => self.stats.rejected[reason as usize] += 1,
        }
        result
    }

    fn accept(&mut self, now: Instant, datagram: &[u8]) -> Result<(), Rejected> {
        let (header, shard) = datagram::parse(datagram, &self.config.keys)?;
        if self.config.require_encryption && !header.encrypted {
            return Err(Rejected::Auth);
        }
        match self.role_of(&header) {
            Role::Current => {}
            Role::Start => self.force_session(now, &header),
            Role::Candidate => return self.hold_candidate(now, &header, datagram),
            Role::Old => return Err(old_datagram(&header)),
        }
        if header.authenticated {
            self.note_key(header.session_id, datagram);
        }
        let session = self.session.as_mut().expect("current or started above");
        if header.block > session.block_frontier(now) {
            return Err(Rejected::FarAhead);
        }
        session.last_datagram = now;
        self.last_valid = Some(now);
        if !self.link_up {
            self.link_up = true;
            self.events.push_back(Event::LinkUp);
        }
        let session = self.session.as_mut().expect("entered above");
        let block = header.block;
        if block < session.next_deliver {
            let window = if session.repair_wait.is_zero() {
                UNNEEDED_WINDOW_BLOCKS
            } else {
                UNNEEDED_WINDOW_BLOCKS_REPAIRED
            };
            return if session.next_deliver - block <= window {
                self.stats.datagrams_unneeded += 1;
                Ok(())
            } else {
                Err(old_datagram(&header))
            };
        }
        // §6.3: a datagram this far ahead proves that earlier blocks were sent in full.
        session.max_depth = session
            .max_depth
            .max(header.geometry.interleave_depth as u64);
        let horizon = session.max_depth + REORDER_SLACK_BLOCKS;
        if block >= session.next_deliver.saturating_add(horizon) {
            let threshold = block - horizon + 1;
            if session.repair_wait.is_zero() {
                self.advance_to(now, threshold);
            } else {
                // §3.4: what the outage took may still come with the repair shards.
                let full = session.doomed.len() >= DOOMED_ENTRIES;
                match session.doomed.back_mut() {
                    Some((last, _)) if threshold <= *last => {}
                    Some((last, at))
                        if full
                            || now.saturating_duration_since(*at) < Duration::from_millis(5) =>
                    {
                        // Merged into an entry a little older: given up at most that much
                        // early, well within the margin the sender adds to the delay.
                        *last = threshold;
                    }
                    _ => session.doomed.push_back((threshold, now)),
                }
                self.give_up_doomed(now);
            }
        }
        self.store_shard(now, &header, shard)
    }

    /// §6.1: which session a datagram belongs to, and so what becomes of it.
    fn role_of(&self, header: &Header) -> Role {
        let id = header.session_id;
        let Some(current) = &self.session else {
            // Nothing to protect yet, but after a restart an authenticated link still knows
            // the newest session it delivered from.
            return match self.floor {
                Some(floor) if header.authenticated && id < floor.session_id => Role::Old,
                _ => Role::Start,
            };
        };
        if id == current.id {
            return Role::Current;
        }
        if header.authenticated {
            // Authenticated sessions are genuine: a newer one is the sender restarted.
            return if self.retired.contains(&id) || id < current.id {
                Role::Old
            } else {
                Role::Start
            };
        }
        let displaced = self.displaced.as_ref().is_some_and(|d| d.id == id);
        if self.retired.contains(&id) && !displaced {
            Role::Old
        } else {
            Role::Candidate
        }
    }

    /// Silence after which a session counts as gone: two of its heartbeat intervals.
    fn quiet_period(&self) -> Duration {
        self.link_timeout / 2
    }

    /// Whether a proven candidate may take over now: the current session never decoded a
    /// block, said it was stopping, or has sent nothing for the quiet period. A session still
    /// sending is alive, and a forged heartbeat cannot retire it.
    fn session_replaceable(&self, now: Instant) -> bool {
        self.session.as_ref().is_none_or(|s| {
            !s.confirmed
                || s.stopped
                || now.saturating_duration_since(s.last_datagram) >= self.quiet_period()
        })
    }

    /// Holds a candidate session's datagram; promotes the candidate once a block of it has
    /// rebuilt to content holding a heartbeat and the current session may be replaced.
    fn hold_candidate(
        &mut self,
        now: Instant,
        header: &Header,
        datagram: &[u8],
    ) -> Result<(), Rejected> {
        let index = match self
            .candidates
            .iter()
            .position(|c| c.id == header.session_id)
        {
            Some(index) => index,
            None => {
                if self.candidates.len() == MAX_CANDIDATES {
                    // Keep the candidates most likely genuine: proven ones, then those that
                    // have sent the most; a flood of one-datagram sessions evicts only itself.
                    let weakest = (0..self.candidates.len())
                        .min_by_key(|&i| {
                            let c = &self.candidates[i];
                            (c.proven, c.held.len(), c.last_seen)
                        })
                        .expect("full");
                    self.candidates.swap_remove(weakest);
                }
                self.candidates.push(Candidate {
                    id: header.session_id,
                    held: VecDeque::new(),
                    base: 0,
                    lowest_block: header.block,
                    bytes: 0,
                    blocks: HashMap::new(),
                    proven: false,
                    last_seen: now,
                });
                self.candidates.len() - 1
            }
        };
        let candidate = &mut self.candidates[index];
        candidate.last_seen = now;
        candidate.lowest_block = candidate.lowest_block.min(header.block);
        let held = candidate.hold(header, datagram);
        if held && !candidate.proven {
            self.check_candidate_block(index, header.block);
        }
        if !self.candidates[index].proven || !self.session_replaceable(now) {
            return Err(Rejected::Unconfirmed);
        }
        self.promote(now, index);
        if held {
            // It was taken in with the others the candidate held.
            self.stats.datagrams_accepted = self.stats.datagrams_accepted.saturating_sub(1);
            Ok(())
        } else {
            self.accept(now, datagram)
        }
    }

    /// Starts the candidate's session and takes in everything it held, the earliest block first
    /// so that a sender's start is recognised as such.
    fn promote(&mut self, now: Instant, index: usize) {
        let candidate = self.candidates.swap_remove(index);
        let mut held = Vec::from(candidate.held);
        held.sort_by_key(|(h, _)| h.block);
        let Some((first, _)) = held.first() else {
            return;
        };
        // Seen from its start, even if its first blocks had to make room: they are lost, and
        // reported so, rather than the session counting as joined mid-stream.
        let from_start = candidate.lowest_block < JOIN_FROM_START_BLOCKS;
        self.start_session(now, first, from_start);
        for (_, d) in &held {
            let _ = self.handle_datagram(now, d);
        }
    }

    /// Rebuilds the candidate's block once k of its shards are held, and marks the candidate
    /// proven if the block holds a heartbeat. Each block is decoded at most once.
    fn check_candidate_block(&mut self, index: usize, block: u64) {
        let candidate = &mut self.candidates[index];
        let Some(held) = candidate.blocks.get_mut(&block) else {
            return;
        };
        let g = held.geometry;
        let (k, m, len) = (
            g.data_shards as usize,
            g.parity_shards as usize,
            g.shard_len as usize,
        );
        if held.checked || held.shards.len() < k {
            return;
        }
        held.checked = true;
        let mut shards = fec::ShardSet::new(k, m, len);
        for &(i, at) in &held.shards {
            // Blocks lose their entry with their first evicted shard: the rest are all held.
            let (_, d) = &candidate.held[(at - candidate.base) as usize];
            shards.put(
                i as usize,
                &d[datagram::HEADER_LEN..datagram::HEADER_LEN + len],
            );
        }
        if shards.rebuild(&mut self.codecs).is_err() {
            return;
        }
        let data = shards.data;
        // Candidates are unauthenticated, hence never encrypted (§2: flag rules).
        if contains_heartbeat(&data) {
            self.candidates[index].proven = true;
        }
    }

    /// Retires the current session, if any, and starts the one `header` belongs to.
    fn force_session(&mut self, now: Instant, header: &Header) {
        self.start_session(now, header, false);
    }

    /// As `force_session`; `from_start` says the session was seen from its first block even if
    /// `header` is a later one.
    fn start_session(&mut self, now: Instant, header: &Header, from_start: bool) {
        let previous = self.session.as_ref().map(|s| s.id);
        self.candidates.retain(|c| c.id != header.session_id);
        if let Some(old) = previous {
            // Deliver what the old session completed, count the rest as lost.
            let end = self
                .session
                .as_ref()
                .and_then(|s| s.pending.last_key_value().map(|(b, _)| b.saturating_add(1)));
            if let Some(end) = end {
                self.advance_to(now, end);
            }
            // Where it left each topic: the new session may go on from there (§6.4). A topic
            // no heartbeat of it resolved is judged by its first record alone: at or above
            // the mark it came with, the sender numbered on and what lies between is a gap.
            let mut unreported = Vec::new();
            if let Some(s) = &self.session {
                for (topic, state) in &s.topics {
                    if let Some((mark, seen, seen_time_us)) = state.unreported_gap() {
                        unreported.push((topic.clone(), mark, seen, seen_time_us));
                    }
                    let Some(mark) = state.mark(s.id) else {
                        continue;
                    };
                    // Bounded like the topics themselves: a train of forged sessions with
                    // new names cannot grow it.
                    if self.carried.len() < self.config.max_topics
                        || self.carried.contains_key(topic)
                    {
                        self.carried.insert(topic.clone(), mark);
                    }
                }
            }
            for (topic, mark, seen, seen_time_us) in unreported {
                self.report_gap(
                    &topic,
                    mark.next_seq,
                    seen - 1,
                    mark.last_time_us,
                    seen_time_us,
                );
            }
            if self.retired.len() == RETIRED_SESSIONS {
                self.retired.pop_front();
            }
            if !self.retired.contains(&old) {
                self.retired.push_back(old);
            }
        }
        // A displaced session that comes back resumes its per-topic expectations, so what it
        // sent while displaced is reported lost rather than silently skipped.
        let resumed = self
            .displaced
            .take_if(|d| d.id == header.session_id)
            .map(|d| d.topics);
        // Taken after the old session's last blocks were delivered above, so that its
        // expectations count what they delivered.
        let previous_topics = self
            .session
            .as_mut()
            .filter(|_| !header.authenticated)
            .map(|s| std::mem::take(&mut s.topics));
        if let (Some(old), Some(topics)) = (previous, previous_topics) {
            self.displaced = Some(Displaced { id: old, topics });
        }
        let mut mid_stream = header.block >= JOIN_FROM_START_BLOCKS && !from_start;
        let mut next_deliver = if mid_stream { header.block } else { 0 };
        if let Some(floor) = self
            .floor
            .filter(|f| header.authenticated && f.session_id == header.session_id)
        {
            // The receiver restarted within this session: what it delivered before is not
            // delivered again. The topics it has marks for go on from them (see `topic`), so
            // what was sent while it was down is reported lost; others joined mid-stream.
            mid_stream = true;
            next_deliver = next_deliver.max(floor.next_block);
        }
        let topics = match resumed {
            Some(topics) => {
                mid_stream = false;
                topics
            }
            None => HashMap::new(),
        };
        self.session = Some(Session {
            id: header.session_id,
            next_deliver,
            pending: BTreeMap::new(),
            inflight_bytes: 0,
            max_depth: header.geometry.interleave_depth as u64,
            head_since: now,
            topics,
            mid_stream,
            confirmed: false,
            stopped: false,
            last_datagram: now,
            repair_wait: Duration::ZERO,
            doomed: VecDeque::new(),
            started_at: now,
            first_block: next_deliver,
            partial: None,
        });
        self.stats.sessions += 1;
        self.events.push_back(Event::SessionStarted {
            session_id: header.session_id,
            previous,
            mid_stream,
        });
    }

    fn store_shard(&mut self, now: Instant, header: &Header, shard: &[u8]) -> Result<(), Rejected> {
        let geometry = header.geometry;
        let block = header.block;
        let (k, m, len) = (
            geometry.data_shards as usize,
            geometry.parity_shards as usize,
            geometry.shard_len as usize,
        );
        let session = self.session.as_mut().expect("entered");
        if !session.pending.contains_key(&block) {
            let charge = (k + m) * len;
            if charge > self.config.max_inflight_bytes {
                return Err(Rejected::Overload);
            }
            // Make room by giving up the oldest pending blocks, but never for a block older than them.
            loop {
                let session = self.session.as_ref().expect("entered");
                if session.inflight_bytes + charge <= self.config.max_inflight_bytes {
                    break;
                }
                let oldest = *session
                    .pending
                    .keys()
                    .next()
                    .expect("bytes are charged to blocks");
                if oldest > block {
                    return Err(Rejected::Overload);
                }
                self.advance_to(now, oldest.saturating_add(1));
            }
            let session = self.session.as_mut().expect("entered");
            if block < session.next_deliver {
                // Making room moved delivery past this block.
                return Err(Rejected::Overload);
            }
            session.inflight_bytes += charge;
            session.pending.insert(
                block,
                PendingBlock {
                    state: BlockState::Receiving {
                        geometry,
                        shards: fec::ShardSet::new(k, m, len),
                    },
                    charged: charge,
                },
            );
        }
        let session = self.session.as_mut().expect("entered");
        if block == session.next_deliver {
            session.head_since = now;
        }
        let pending = session.pending.get_mut(&block).expect("inserted above");
        let BlockState::Receiving {
            geometry: expected,
            shards,
        } = &mut pending.state
        else {
            self.stats.datagrams_unneeded += 1;
            return Ok(());
        };
        if *expected != geometry {
            return Err(Rejected::Inconsistent);
        }
        if !shards.put(header.shard_index as usize, shard) {
            return Err(Rejected::Duplicate);
        }
        if !shards.is_complete() {
            return Ok(());
        }
        // §3.2: k shards rebuild the block; all data shards need no decoding at all.
        match shards.rebuild(&mut self.codecs) {
            Ok(true) => self.stats.blocks_recovered += 1,
            Ok(false) => {}
            Err(_) => {
                // Should not happen with k distinct shards; if it does, the holes must never be
                // delivered as data: the block is lost, its records reported through their gap.
                self.stats.malformed_blocks += 1;
                let released = pending.charged;
                pending.state = BlockState::Unrecoverable;
                pending.charged = 0;
                let session = self.session.as_mut().expect("entered");
                session.inflight_bytes -= released;
                if block == session.next_deliver {
                    self.advance_to(now, block.saturating_add(1));
                }
                return Ok(());
            }
        }
        self.stats.blocks_complete += 1;
        let mut data = std::mem::take(&mut shards.data);
        if header.encrypted && !self.decrypt(header.session_id, block, &mut data) {
            // Authenticated yet undecryptable: a sender with another key or a broken one. The
            // block's records are reported lost through the gap it leaves.
            self.stats.undecryptable_blocks += 1;
            data.clear();
        }
        let session = self.session.as_mut().expect("entered");
        let pending = session.pending.get_mut(&block).expect("inserted above");
        let content = Bytes::from(data);
        let released = m * len;
        pending.state = BlockState::Complete(content);
        pending.charged -= released;
        session.inflight_bytes -= released;
        if block == session.next_deliver {
            self.drain_ready(now);
        }
        Ok(())
    }

    /// With outage protection (§3.4): gives up the blocks whose repair wait has passed since the
    /// rule of §6.3 doomed them.
    fn give_up_doomed(&mut self, now: Instant) {
        loop {
            let Some(session) = self.session.as_mut() else {
                return;
            };
            let wait = session.repair_wait + self.config.block_timeout;
            let Some(&(threshold, at)) = session.doomed.front() else {
                return;
            };
            if threshold <= session.next_deliver {
                session.doomed.pop_front();
                continue;
            }
            if now < at + wait {
                return;
            }
            session.doomed.pop_front();
            self.advance_to(now, threshold);
        }
    }

    /// Delivers or gives up every block below `target`, then drains what is ready (§6.3).
    fn advance_to(&mut self, now: Instant, target: u64) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let mut lost: Option<(u64, u64)> = None;
        let mut complete = Vec::new();
        while session.next_deliver < target {
            let next = session.next_deliver;
            match session.pending.first_key_value().map(|(b, _)| *b) {
                Some(b) if b == next => {
                    let pending = session.pending.remove(&b).expect("present");
                    session.inflight_bytes -= pending.charged;
                    match pending.state {
                        BlockState::Complete(content) => complete.push(Some(content)),
                        BlockState::Receiving { .. } | BlockState::Unrecoverable => {
                            lost = Some((lost.map_or(b, |l| l.0), b));
                            complete.push(None);
                        }
                    }
                    session.next_deliver = next.saturating_add(1);
                    if next == u64::MAX {
                        break;
                    }
                }
                Some(b) if b < target => {
                    lost = Some((lost.map_or(next, |l| l.0), b - 1));
                    complete.push(None);
                    session.next_deliver = b;
                }
                _ => {
                    lost = Some((lost.map_or(next, |l| l.0), target - 1));
                    complete.push(None);
                    session.next_deliver = target;
                }
            }
        }
        session.head_since = now;
        let session_id = session.id;
        // Blocks are processed in order; a lost one breaks any record being pieced together.
        for content in complete {
            match content {
                Some(content) => self.process_block(now, content),
                None => {
                    if let Some(s) = self.session.as_mut() {
                        s.partial = None;
                    }
                }
            }
        }
        if let Some((first, last)) = lost {
            self.stats.blocks_lost = self
                .stats
                .blocks_lost
                .saturating_add((last - first).saturating_add(1));
            self.events.push_back(Event::BlocksLost {
                session_id,
                first,
                last,
            });
        }
        self.drain_ready(now);
    }

    /// Delivers complete blocks at the head, in order.
    fn drain_ready(&mut self, now: Instant) {
        loop {
            let Some(session) = self.session.as_mut() else {
                return;
            };
            let next = session.next_deliver;
            match session.pending.get(&next).map(|p| &p.state) {
                Some(BlockState::Complete(_)) => {}
                Some(BlockState::Unrecoverable) => {
                    self.advance_to(now, next.saturating_add(1));
                    return;
                }
                _ => return,
            }
            let pending = session.pending.remove(&next).expect("checked");
            session.inflight_bytes -= pending.charged;
            session.next_deliver = next.saturating_add(1);
            session.head_since = now;
            if let BlockState::Complete(content) = pending.state {
                self.process_block(now, content);
            }
        }
    }

    /// Decrypts a rebuilt block's frames in place (§4.4); false if no key opens them.
    fn decrypt(&mut self, session_id: u64, block: u64, content: &mut [u8]) -> bool {
        let Some(frames_len) = content
            .get(..4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
        else {
            return false;
        };
        let Some(sealed) = frames_len
            .checked_add(4 + SEAL_TAG_LEN)
            .and_then(|end| content.get_mut(4..end))
        else {
            return false;
        };
        if self
            .ciphers
            .as_ref()
            .is_none_or(|(id, _)| *id != session_id)
        {
            let ciphers = self
                .config
                .keys
                .iter()
                .map(|k| k.block_cipher(session_id))
                .collect();
            self.ciphers = Some((session_id, ciphers));
        }
        let (_, ciphers) = self.ciphers.as_ref().expect("set above");
        match ciphers.as_slice() {
            [only] => only.open(session_id, block, sealed),
            several => {
                // While keys rotate: a failed attempt leaves the buffer unspecified, so each
                // key tries a copy.
                let original = sealed.to_vec();
                for cipher in several {
                    sealed.copy_from_slice(&original);
                    if cipher.open(session_id, block, sealed) {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// Reads the frames of a rebuilt block (wire-format.md §4.1).
    fn process_block(&mut self, now: Instant, content: Bytes) {
        if content.len() < 4 {
            self.stats.malformed_blocks += 1;
            return;
        }
        let frames_len = u32::from_be_bytes(content[..4].try_into().expect("4 bytes")) as usize;
        if frames_len > content.len() - 4 {
            self.stats.malformed_blocks += 1;
            return;
        }
        let block_len = content.len();
        let mut frames = content.slice(4..4 + frames_len);
        while frames.has_remaining() {
            let frame = match proto::Frame::decode_length_delimited(&mut frames) {
                Ok(frame) => {
                    if let Some(session) = self.session.as_mut() {
                        session.confirmed = true;
                    }
                    frame
                }
                Err(_) => {
                    // Lengths can no longer be trusted: the rest of the block is unreadable.
                    self.stats.malformed_frames += 1;
                    return;
                }
            };
            match frame.body {
                Some(proto::frame::Body::Records(batch)) => {
                    self.handle_batch(now, batch, block_len)
                }
                Some(proto::frame::Body::Fragment(fragment)) => self.handle_fragment(now, fragment),
                Some(proto::frame::Body::Heartbeat(heartbeat)) => {
                    self.handle_heartbeat(now, heartbeat)
                }
                None => self.stats.malformed_frames += 1,
            }
        }
    }

    /// §5.1
    fn handle_batch(&mut self, now: Instant, batch: proto::RecordBatch, block_len: usize) {
        let count = batch.payloads.len() as u64;
        // From the datagrams' headers, never from the batch (its field 7 is the disk buffer's).
        let session_id = self.session.as_ref().map_or(0, |s| s.id);
        if !frames::is_valid_topic(&batch.topic)
            || batch.payloads.is_empty()
            || batch.payloads.len() != batch.time_deltas_us.len()
            || !(batch.origins.is_empty() || batch.origins.len() == batch.payloads.len())
            || batch.first_seq.checked_add(count).is_none()
        {
            self.stats.malformed_frames += 1;
            return;
        }
        let Some(topic) = self.topic(&batch.topic) else {
            self.stats.records_over_topic_cap += count;
            return;
        };
        let replayed = batch.replayed;
        let mut time_us = batch.first_time_us;
        let mut origins = batch.origins.into_iter();
        for (i, (delta, payload)) in batch.time_deltas_us.iter().zip(batch.payloads).enumerate() {
            time_us = time_us.wrapping_add(*delta);
            // A small record must not pin its whole block in memory while sinks hold it.
            let payload = if payload.len() * 4 < block_len {
                Bytes::copy_from_slice(&payload)
            } else {
                payload
            };
            self.deliver(
                now,
                &topic,
                Record {
                    topic: topic.clone(),
                    seq: batch.first_seq + i as u64,
                    session_id,
                    time_us,
                    origin: origins.next().filter(frames::origin_is_present),
                    late: replayed,
                    payload,
                },
            );
        }
    }

    /// §5.2
    fn handle_fragment(&mut self, now: Instant, fragment: proto::RecordFragment) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let total = fragment.total_len;
        let offset = fragment.offset;
        let end = offset.checked_add(fragment.data.len() as u64);
        if !frames::is_valid_topic(&fragment.topic) || end.is_none_or(|end| end > total) {
            self.stats.malformed_frames += 1;
            session.partial = None;
            return;
        }
        if total > self.config.max_record_bytes as u64 {
            if offset == 0 {
                self.stats.oversize_records += 1;
            }
            session.partial = None;
            return;
        }
        if offset == 0 {
            session.partial = Some(PartialRecord {
                topic: fragment.topic.clone(),
                replayed: fragment.replayed,
                seq: fragment.seq,
                time_us: fragment.time_us,
                total_len: total as usize,
                origin: fragment.origin.clone().filter(frames::origin_is_present),
                data: Vec::with_capacity(fragment.data.len()),
            });
        }
        let continues = session.partial.as_ref().is_some_and(|p| {
            p.topic == fragment.topic
                && p.replayed == fragment.replayed
                && p.seq == fragment.seq
                && p.total_len as u64 == total
                && p.data.len() as u64 == offset
        });
        if !continues {
            // Its beginning was lost: the gap in sequence numbers reports it.
            session.partial = None;
            return;
        }
        let partial = session.partial.as_mut().expect("checked");
        partial.data.extend_from_slice(&fragment.data);
        if partial.data.len() < partial.total_len {
            return;
        }
        let done = session.partial.take().expect("checked");
        let Some(topic) = self.topic(&done.topic) else {
            self.stats.records_over_topic_cap += 1;
            return;
        };
        self.deliver(
            now,
            &topic,
            Record {
                topic: topic.clone(),
                seq: done.seq,
                session_id: self.session.as_ref().map_or(0, |s| s.id),
                time_us: done.time_us,
                origin: done.origin,
                late: done.replayed,
                payload: Bytes::from(done.data),
            },
        );
    }

    /// §5.3: liveness, the sender's interval and the tail-loss check.
    fn handle_heartbeat(&mut self, now: Instant, heartbeat: proto::Heartbeat) {
        self.stats.heartbeats += 1;
        if let Some(session) = self.session.as_mut() {
            session.repair_wait = Duration::from_millis(heartbeat.repair_delay_ms as u64)
                .min(crate::encoder::MAX_REPAIR_DELAY);
        }
        if heartbeat.stopping {
            if let Some(session) = self.session.as_mut() {
                session.stopped = true;
            }
        }
        if heartbeat.heartbeat_interval_ms > 0 {
            self.link_timeout = Duration::from_millis(heartbeat.heartbeat_interval_ms as u64)
                * LINK_DOWN_HEARTBEATS;
        }
        for status in &heartbeat.topics {
            if !frames::is_valid_topic(&status.name) {
                self.stats.malformed_frames += 1;
                continue;
            }
            let Some(topic) = self.topic(&status.name) else {
                continue;
            };
            self.resolve_start(&topic, status.first_seq, heartbeat.sent_time_us, now);
            let session = self.session.as_mut().expect("blocks belong to a session");
            let state = session.topics.get_mut(&topic).expect("just looked up");
            if !state.plausible(status.next_seq, now) {
                self.stats.malformed_frames += 1;
                continue;
            }
            match state.expected {
                Some(e) if status.next_seq > e => {
                    state.expected = Some(status.next_seq);
                    let after_us = state.last_time_us;
                    self.report_gap(
                        &topic,
                        e,
                        status.next_seq - 1,
                        after_us,
                        heartbeat.sent_time_us,
                    );
                }
                Some(_) => {}
                // Joined mid-stream: what came before is not ours to call lost (§6.1).
                None => {
                    state.expected = Some(status.next_seq);
                    state.accounted_from = Some((status.next_seq, 0));
                }
            }
        }
        self.events.push_back(Event::Heartbeat(Box::new(heartbeat)));
    }

    /// The interned name of a topic, registering it within the cap.
    fn topic(&mut self, name: &str) -> Option<Arc<str>> {
        let session = self.session.as_mut()?;
        if let Some((key, _)) = session.topics.get_key_value(name) {
            return Some(key.clone());
        }
        if session.topics.len() >= self.config.max_topics {
            return None;
        }
        let key: Arc<str> = Arc::from(name);
        // From the session's start every record is accounted for, from where its numbering
        // began, which its heartbeats say (§6.1, §6.4).
        let carried = self.carried.remove(&key);
        let state = match carried {
            // The same session, after this receiver's restart: it goes on from its mark.
            Some(mark) if mark.session_id == session.id => TopicState {
                expected: Some(mark.next_seq),
                anchor: None,
                last_time_us: mark.last_time_us,
                unresolved: None,
                first_seq: None,
                resolved_against: None,
                accounted_from: None,
            },
            carried => TopicState {
                expected: None,
                // From the session's start it begins at 0 unless it goes on from a mark, which
                // `carried_plausible` bounds instead (§6.6).
                anchor: (carried.is_none() && !session.mid_stream)
                    .then_some((0, session.started_at)),
                last_time_us: 0,
                unresolved: Some(Unresolved {
                    from_start: !session.mid_stream,
                    carried,
                    first_seen: None,
                }),
                first_seq: None,
                resolved_against: None,
                accounted_from: None,
            },
        };
        session.topics.insert(key.clone(), state);
        Some(key)
    }

    /// §6.4, and §6.7 for replayed records.
    fn deliver(&mut self, now: Instant, topic: &Arc<str>, mut record: Record) {
        let session = self.session.as_mut().expect("records belong to a session");
        let state = session.topics.get_mut(topic).expect("registered by caller");
        let replayed = record.late;
        // Until a heartbeat says where the session's numbering began, a replayed record below a
        // carried mark is judged against that mark: it can only fill a gap.
        let pending_mark = state
            .unresolved
            .and_then(|u| u.carried)
            .filter(|m| replayed && record.seq < m.next_seq)
            .map(|m| m.next_seq);
        if let Some(mark) = state.unresolved.and_then(|u| u.carried) {
            let first = state.expected.is_none();
            if first
                && !replayed
                && !TopicState::carried_plausible(mark, record.seq, record.time_us)
            {
                state.rejoin_mid_stream(record.seq, now);
            }
        }
        let expected = pending_mark.or(state.expected);
        // Below what is expected, a record can at most fill a gap: only the others can move
        // the topic on, and they are held to the plausibility bound (§6.6).
        if expected.is_none_or(|e| record.seq >= e) && !state.plausible(record.seq, now) {
            // Only a topic's very first number can start it somewhere unexpected.
            if state.unresolved.is_none() || state.expected.is_some() || replayed {
                self.stats.malformed_frames += 1;
                return;
            }
            state.rejoin_mid_stream(record.seq, now);
        }
        match expected {
            Some(e) if record.seq < e => {
                if replayed && self.gaps.fill(topic, record.seq) {
                    self.stats.records_recovered += 1;
                    self.stats.records_out += 1;
                    self.events.push_back(Event::Record(record));
                } else if replayed {
                    self.stats.replayed_duplicates += 1;
                } else {
                    self.stats.duplicate_records += 1;
                }
                return;
            }
            // Joined mid-stream: only the live stream says where it stands.
            None if replayed => {
                self.stats.replayed_duplicates += 1;
                return;
            }
            Some(e) if record.seq > e => {
                state.expected = Some(record.seq.saturating_add(1));
                let after_us = state.last_time_us;
                state.last_time_us = record.time_us;
                self.report_gap(topic, e, record.seq - 1, after_us, record.time_us);
            }
            _ => {
                if let Some(unresolved) = state.unresolved.as_mut() {
                    unresolved
                        .first_seen
                        .get_or_insert((record.seq, record.time_us));
                }
                state
                    .accounted_from
                    .get_or_insert((record.seq, record.time_us));
                state.expected = Some(record.seq.saturating_add(1));
                state.last_time_us = record.time_us;
            }
        }
        // In order, replayed or not: a replayed one got here before its live copy, which will
        // be a duplicate.
        record.late = false;
        self.stats.records_out += 1;
        self.events.push_back(Event::Record(record));
    }

    /// A heartbeat says the session's numbering of `topic` began at `first_seq` (§5.3): the
    /// topic goes on from an earlier session's mark if the sender numbered on from it, or
    /// from `first_seq` if the session was seen from its start; what lies between that and the
    /// first record seen is a gap (§6.4).
    fn resolve_start(&mut self, topic: &Arc<str>, first_seq: u64, sent_time_us: i64, now: Instant) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let Some(state) = session.topics.get_mut(topic) else {
            return;
        };
        let plausible = match state.unresolved.and_then(|u| u.carried) {
            Some(mark) => TopicState::carried_plausible(mark, first_seq, sent_time_us),
            None => state.within_bound(first_seq, now),
        };
        if !plausible {
            state.rejoin_mid_stream(first_seq, now);
        }
        let Some(unresolved) = state.unresolved.take() else {
            return;
        };
        state.first_seq = Some((first_seq, sent_time_us));
        state.resolved_against = unresolved.carried;
        let lower = match unresolved.carried {
            Some(mark) if first_seq >= mark.next_seq => Some((mark.next_seq, mark.last_time_us)),
            carried => {
                if carried.is_some() {
                    // The sender started its numbering over: old gaps name other records.
                    self.gaps.take(topic);
                }
                unresolved.from_start.then_some((first_seq, 0))
            }
        };
        let Some((lower, lower_time_us)) = lower else {
            return;
        };
        match unresolved.first_seen {
            Some((seen, seen_time_us)) if lower < seen => {
                state.accounted_from = Some((lower, seen_time_us));
                self.report_gap(topic, lower, seen - 1, lower_time_us, seen_time_us)
            }
            Some(_) => {}
            None => {
                state.expected = Some(lower);
                state.last_time_us = lower_time_us;
                state.anchor.get_or_insert((lower, now));
                state.accounted_from = Some((lower, 0));
            }
        }
    }

    fn report_gap(
        &mut self,
        topic: &Arc<str>,
        first_seq: u64,
        last_seq: u64,
        after_us: i64,
        before_us: i64,
    ) {
        let gap = Gap {
            topic: topic.clone(),
            first_seq,
            last_seq,
            after_us,
            before_us,
        };
        self.stats.records_lost = self.stats.records_lost.saturating_add(gap.records());
        self.gaps.open(
            topic,
            OpenGap {
                first_seq,
                last_seq,
                after_us,
                before_us,
            },
        );
        self.stats.gaps_forgotten = self.gaps.forgotten;
        self.events.push_back(Event::Gap(gap));
    }
}

/// What a datagram's session id makes of it (§6.1).
enum Role {
    /// The current session's.
    Current,
    /// Starts a session now: there is none yet, or it is a newer authenticated one.
    Start,
    /// An unauthenticated unknown session's, held until it proves itself.
    Candidate,
    /// Retired or older: `stale`, or `replay` on an authenticated link.
    Old,
}

/// Genuine but old datagrams are replays on an authenticated link, merely stale otherwise (§6.1).
fn old_datagram(header: &Header) -> Rejected {
    if header.authenticated {
        Rejected::Replay
    } else {
        Rejected::Stale
    }
}

/// Whether rebuilt block content (wire-format.md §4.1) holds a heartbeat frame.
fn contains_heartbeat(content: &[u8]) -> bool {
    let Some(len) = content
        .get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
    else {
        return false;
    };
    let Some(mut frames) = content.get(4..4usize.saturating_add(len)) else {
        return false;
    };
    while !frames.is_empty() {
        match proto::Frame::decode_length_delimited(&mut frames) {
            Ok(proto::Frame {
                body: Some(proto::frame::Body::Heartbeat(_)),
            }) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}
