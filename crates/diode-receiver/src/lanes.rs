//! A receiver's lanes (wire-format.md §7): each has its own socket, link thread and
//! reassembler. What the operator sees of the link as a whole is made here from every lane's
//! state, and here a topic is held to one lane at a time, which is what keeps its records in
//! order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diode_common::LogThrottle;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{LaneLabels, ReceiverMetrics};

/// A topic delivered by one lane is not delivered by another until the first has delivered none
/// of it for this long, unless the second's records come in a newer session that the first lane
/// has moved to as well (or is authenticated): two senders numbering one topic each their own
/// way would otherwise interleave two sequences in the sinks.
const TOPIC_HOLD: Duration = Duration::from_secs(3);
/// The shared table of topics is swept of entries past `TOPIC_HOLD` once it holds this many.
const TOPICS_SWEEP_AT: usize = 8192;
/// How long a lane trusts its own answer about a topic before asking the shared table again:
/// the owner refreshes its hold this often, well within `TOPIC_HOLD`.
const TOPIC_RECHECK: Duration = Duration::from_secs(1);

type OpenGapOf = (Arc<str>, diode_wire::OpenGap);

#[derive(Clone, Copy)]
struct Claim {
    lane: usize,
    session: u64,
    at: Instant,
}

/// A topic another lane carries now, for lane `from` to let go of: where it stood there and
/// its open gaps go to `to`, or nowhere when they are of a numbering that lane refused.
struct Handover {
    topic: Arc<str>,
    from: usize,
    to: Option<usize>,
    /// What `from` let go of, once it has.
    handed: Option<diode_wire::TopicHandover>,
}

#[derive(Clone, Copy, Default)]
struct LaneState {
    up: bool,
    loss_ratio: f64,
    /// The lane's current session (0: none yet).
    session: u64,
    /// The lane has had its last pass (`Lane::exchange`): nothing more is handed to it.
    stopped: bool,
}

/// What a lane does with a record of a topic (`Lane::carries`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Deliver,
    /// Another lane carried it lately, in an older session that lane has not left yet: wait
    /// (a sender restarted with the topic moved here, and the other lane is about to see it).
    Wait,
    /// Another lane carries it in a session at least as new: two senders, or one misconfigured.
    Refuse,
}

/// Every lane's state, shared by their link threads.
pub struct Lanes {
    count: usize,
    /// Sessions are genuine (the link is authenticated): a newer one takes a topic over at once.
    authenticated: bool,
    /// Each lane's link state and loss ratio, changed and summed under one lock so that two
    /// lanes changing at once cannot leave the link's gauges stale.
    states: Mutex<Vec<LaneState>>,
    /// Per topic, the lane delivering it, in which session, and when it last said so.
    topics: Mutex<HashMap<Arc<str>, Claim>>,
    /// Topics a lane has taken from another, for the other to let go of (`Lane::exchange`).
    handovers: Mutex<Vec<Handover>>,
    /// Each lane's topic rows for the status page (topic, seq, taken in), as of its last second.
    last_records: Mutex<Vec<Vec<Vec<String>>>>,
    /// Each lane's open gaps as of its last second, for the status page lane 0 keeps.
    gaps: Mutex<Vec<Vec<OpenGapOf>>>,
    link_up: Gauge,
    link_loss_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Lanes {
    pub fn new(count: usize, authenticated: bool, metrics: &ReceiverMetrics) -> Arc<Lanes> {
        Arc::new(Lanes {
            count,
            authenticated,
            states: Mutex::new(vec![LaneState::default(); count]),
            topics: Mutex::new(HashMap::new()),
            gaps: Mutex::new(vec![Vec::new(); count]),
            handovers: Mutex::new(Vec::new()),
            last_records: Mutex::new(vec![Vec::new(); count]),
            link_up: metrics.link_up.clone(),
            link_loss_ratio: metrics.link_loss_ratio.clone(),
        })
    }

    pub fn count(&self) -> usize {
        self.count
    }

    fn lock_states(&self) -> std::sync::MutexGuard<'_, Vec<LaneState>> {
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lane's open gaps, once a second.
    pub fn set_gaps(&self, lane: usize, gaps: Vec<OpenGapOf>) {
        self.gaps.lock().unwrap_or_else(|e| e.into_inner())[lane] = gaps;
    }

    /// Every lane's open gaps, for the status page.
    pub fn all_gaps(&self) -> Vec<OpenGapOf> {
        self.gaps.lock().unwrap_or_else(|e| e.into_inner()).concat()
    }

    /// A lane's rows of the status page's "last record per topic", once a second.
    pub fn set_last_records(&self, lane: usize, rows: Vec<Vec<String>>) {
        self.last_records.lock().unwrap_or_else(|e| e.into_inner())[lane] = rows;
    }

    /// Every lane's, sorted by topic.
    pub fn all_last_records(&self) -> Vec<Vec<String>> {
        let mut rows = self
            .last_records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .concat();
        rows.sort();
        rows
    }

    /// "lane 0 up, lane 1 down", for the status page.
    pub fn describe(&self) -> String {
        self.lock_states()
            .iter()
            .enumerate()
            .map(|(i, lane)| format!("lane {i} {}", if lane.up { "up" } else { "down" }))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One lane's end of `Lanes`.
pub struct Lane {
    pub index: usize,
    lanes: Arc<Lanes>,
    up: Gauge,
    /// This lane's answers about topics, and when each was taken.
    carries: HashMap<Arc<str>, (Verdict, Instant)>,
    conflicts: Counter,
}

impl Lane {
    pub fn new(index: usize, lanes: Arc<Lanes>, metrics: &ReceiverMetrics) -> Lane {
        let labels = LaneLabels {
            lane: index.to_string(),
        };
        Lane {
            index,
            lanes,
            up: metrics.lane_up.get_or_create_owned(&labels),
            carries: HashMap::new(),
            conflicts: metrics.lane_topic_conflicts.clone(),
        }
    }

    /// `diode_link_up` is 1 only while every lane is up, so that an alert on it fires for a
    /// lane lost while the others carry on; `diode_lane_up` says which.
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
        let mut states = self.lanes.lock_states();
        states[self.index].up = up;
        let all = states.iter().all(|lane| lane.up);
        self.lanes.link_up.set(i64::from(all));
    }

    /// The lane's current session, which another lane's newer one waits for before it takes a
    /// topic over on an unauthenticated link.
    pub fn set_session(&self, session: u64) {
        self.lanes.lock_states()[self.index].session = session;
    }

    /// `diode_link_loss_ratio` is the worst lane's.
    pub fn set_loss_ratio(&self, ratio: f64) {
        let mut states = self.lanes.lock_states();
        states[self.index].loss_ratio = ratio;
        let worst = states
            .iter()
            .map(|lane| lane.loss_ratio)
            .fold(0.0, f64::max);
        self.lanes.link_loss_ratio.set(worst);
    }

    /// A record refused without asking (its lane could not hold it while it waited).
    pub fn count_refused(&self) {
        self.conflicts.inc();
    }

    /// What this lane does now with a record of `topic` from `session` (wire-format.md §7).
    /// Taking a topic over, the lane asks the others to let go of what they knew of it
    /// (`exchange`). Refusals are counted and logged. Free with a single lane.
    pub fn carries(&mut self, topic: &Arc<str>, session: u64, now: Instant) -> Verdict {
        if self.lanes.count == 1 {
            return Verdict::Deliver;
        }
        if let Some((verdict, at)) = self.carries.get(topic) {
            if now.saturating_duration_since(*at) < TOPIC_RECHECK {
                if *verdict == Verdict::Refuse {
                    self.conflicts.inc();
                }
                return *verdict;
            }
        }
        let verdict = self.decide(topic, session, now, false);
        match verdict {
            Verdict::Refuse => {
                self.conflicts.inc();
            }
            // Asked again at every pass until it is settled.
            Verdict::Wait => return verdict,
            Verdict::Deliver => {}
        }
        if self.carries.len() >= TOPICS_SWEEP_AT && !self.carries.contains_key(topic) {
            self.carries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < TOPIC_RECHECK);
        }
        self.carries.insert(topic.clone(), (verdict, now));
        verdict
    }

    /// A heartbeat of `session` on this lane lists `topic`: the lane takes the topic if a record
    /// of that session would deliver (so a topic that moved here is handed over before any of
    /// its records, replayed ones included, arrive), and otherwise does nothing: a heartbeat
    /// is no record to refuse.
    pub fn announced(&mut self, topic: &str, session: u64, now: Instant) {
        if self.lanes.count == 1 || session == 0 {
            return;
        }
        let topic: Arc<str> = Arc::from(topic);
        if let Some((Verdict::Deliver, at)) = self.carries.get(&topic) {
            if now.saturating_duration_since(*at) < TOPIC_RECHECK {
                return;
            }
        }
        if self.decide(&topic, session, now, true) == Verdict::Deliver {
            self.carries.insert(topic, (Verdict::Deliver, now));
        }
    }

    /// `quiet`: for a heartbeat, which takes a topic but neither refuses nor waits.
    fn decide(&self, topic: &Arc<str>, session: u64, now: Instant, quiet: bool) -> Verdict {
        let mut topics = self.lanes.topics.lock().unwrap_or_else(|e| e.into_inner());
        if topics.len() >= TOPICS_SWEEP_AT && !topics.contains_key(topic) {
            topics.retain(|_, claim| now.saturating_duration_since(claim.at) < TOPIC_HOLD);
        }
        let mine = Claim {
            lane: self.index,
            session,
            at: now,
        };
        let claim = topics.get(topic).copied();
        let from: Vec<usize> = match claim {
            Some(claim) if claim.lane == self.index => Vec::new(),
            Some(claim) => {
                let expired = now.saturating_duration_since(claim.at) >= TOPIC_HOLD;
                let newer = session > claim.session;
                let followed = self.lanes.authenticated
                    || self.lanes.lock_states()[claim.lane].session >= session;
                if !(expired || newer && followed) {
                    if newer {
                        return Verdict::Wait;
                    }
                    if quiet {
                        return Verdict::Refuse;
                    }
                    static REFUSED: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                    if let Some(folded) = REFUSED.allow() {
                        tracing::error!(
                            topic = %topic,
                            lane = self.index,
                            carried_by = claim.lane,
                            folded,
                            "records of a topic another lane carries: refused (is the topic \
                             configured on two lanes, or sent by two senders?)"
                        );
                    }
                    // What this lane knew of the topic is of the numbering it refuses. Asked
                    // for with `topics` let go of: `exchange` takes `handovers` first.
                    drop(topics);
                    self.push_handover(topic, self.index, None);
                    return Verdict::Refuse;
                }
                tracing::info!(
                    topic = %topic,
                    lane = self.index,
                    from_lane = claim.lane,
                    "topic moved to this lane"
                );
                vec![claim.lane]
            }
            // First seen since this receiver started (or long quiet): whatever another lane
            // kept of it from before (its state file) comes here.
            None => (0..self.lanes.count).filter(|l| *l != self.index).collect(),
        };
        topics.insert(topic.clone(), mine);
        drop(topics);
        let mut handovers = self.lock_handovers();
        // This lane carries the topic now: an earlier request that it let go is stale.
        handovers.retain(|h| !(h.from == self.index && h.handed.is_none() && h.topic == *topic));
        drop(handovers);
        for lane in from {
            self.push_handover(topic, lane, Some(self.index));
        }
        Verdict::Deliver
    }

    fn push_handover(&self, topic: &Arc<str>, from: usize, to: Option<usize>) {
        let mut handovers = self.lock_handovers();
        let pending = handovers
            .iter()
            .any(|h| h.handed.is_none() && h.from == from && h.to == to && h.topic == *topic);
        if !pending {
            handovers.push(Handover {
                topic: topic.clone(),
                from,
                to,
                handed: None,
            });
        }
    }

    /// Once a second: lets go of the topics another lane took from this one, handing over
    /// where each stood and its open gaps, and takes in those of the topics this lane took:
    /// replays fill the gaps here, and what the sender numbered after the mark that neither
    /// lane saw is reported lost here. A topic's handovers are taken together once every lane
    /// asked has answered, so that the latest mark is judged, not whichever came first; those
    /// of a topic that has moved on again meanwhile go on to the lane that carries it now.
    ///
    /// `stopping`: this lane's last pass. It takes what was handed to it, whether every lane
    /// has answered or not, and withdraws what it asked for and was not handed yet: the other
    /// lane keeps that in its own state file (taken on the next start, when the topic is first
    /// claimed) rather than handing it over to a lane that has stopped.
    pub fn exchange(&self, reassembler: &mut diode_wire::Reassembler, stopping: bool) {
        if self.lanes.count == 1 {
            return;
        }
        if stopping {
            self.lanes.lock_states()[self.index].stopped = true;
        }
        // Locks are taken one at a time, never one inside another: `decide` holds `topics`
        // while it reads `states`.
        let asked: Vec<Arc<str>> = {
            let mut handovers = self.lock_handovers();
            for handover in handovers.iter_mut() {
                if handover.from == self.index && handover.handed.is_none() {
                    handover.handed = Some(match handover.to {
                        Some(_) => reassembler.hand_over(&handover.topic),
                        // Of a numbering this lane refused: nothing in it was lost.
                        None => reassembler.forget(&handover.topic),
                    });
                }
            }
            // Let go of, with nowhere to go: done.
            handovers.retain(|h| h.to.is_some() || h.handed.is_none());
            let mut asked: Vec<Arc<str>> = handovers
                .iter()
                .filter(|h| h.to == Some(self.index))
                .map(|h| h.topic.clone())
                .collect();
            asked.sort();
            asked.dedup();
            asked
        };
        if asked.is_empty() {
            return;
        }
        // Where each has gone since, if it has, to a lane still running: what was handed here
        // goes on there. A lane that stops keeps what it was handed in its own state file.
        let holders: Vec<Option<usize>> = {
            let topics = self.lanes.topics.lock().unwrap_or_else(|e| e.into_inner());
            asked
                .iter()
                .map(|t| topics.get(t).map(|claim| claim.lane))
                .collect()
        };
        let running: Vec<bool> = self
            .lanes
            .lock_states()
            .iter()
            .map(|l| !l.stopped)
            .collect();
        let mut handovers = self.lock_handovers();
        for (topic, holder) in asked.into_iter().zip(holders) {
            let mine = |h: &Handover| h.to == Some(self.index) && h.topic == topic;
            let elsewhere = holder.filter(|lane| *lane != self.index && running[*lane]);
            if let Some(holder) = elsewhere.filter(|_| !stopping) {
                for handover in handovers.iter_mut().filter(|h| mine(h)) {
                    handover.to = Some(holder);
                }
                continue;
            }
            if !stopping && handovers.iter().any(|h| mine(h) && h.handed.is_none()) {
                continue;
            }
            let mut taken = diode_wire::TopicHandover::default();
            let mut from_lanes = Vec::new();
            handovers.retain_mut(|handover| {
                if !mine(handover) {
                    return true;
                }
                let Some(handed) = handover.handed.take() else {
                    // Unanswered at the last pass: the other lane keeps it in its state file.
                    return !stopping;
                };
                from_lanes.push(handover.from);
                taken.mark = match (taken.mark, handed.mark) {
                    (Some(a), Some(b)) => Some(a.max_by_session(b)),
                    (a, b) => a.or(b),
                };
                taken.gaps.extend(handed.gaps);
                false
            });
            if !taken.gaps.is_empty() {
                tracing::info!(
                    topic = %topic,
                    from_lanes = ?from_lanes,
                    gaps = taken.gaps.len(),
                    "open gaps of a topic moved here taken over: replays fill them on this lane"
                );
            }
            reassembler.take_over(&topic, taken);
        }
    }

    fn lock_handovers(&self) -> std::sync::MutexGuard<'_, Vec<Handover>> {
        self.lanes
            .handovers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> ReceiverMetrics {
        ReceiverMetrics::new(&mut prometheus_client::registry::Registry::default())
    }

    #[test]
    fn the_link_is_up_only_while_every_lane_is() {
        let m = metrics();
        let lanes = Lanes::new(2, false, &m);
        let (a, b) = (
            Lane::new(0, lanes.clone(), &m),
            Lane::new(1, lanes.clone(), &m),
        );
        a.set_up(true);
        assert_eq!(m.link_up.get(), 0);
        b.set_up(true);
        assert_eq!(m.link_up.get(), 1);
        b.set_up(false);
        assert_eq!(m.link_up.get(), 0);
        assert_eq!(lanes.describe(), "lane 0 up, lane 1 down");
        a.set_loss_ratio(0.01);
        b.set_loss_ratio(0.2);
        a.set_loss_ratio(0.0);
        assert_eq!(m.link_loss_ratio.get(), 0.2);
    }

    #[test]
    fn a_topic_stays_with_its_lane_until_that_lane_lets_go_or_the_sender_moves_it() {
        use Verdict::*;
        let m = metrics();
        let lanes = Lanes::new(2, false, &m);
        let (mut a, mut b) = (Lane::new(0, lanes.clone(), &m), Lane::new(1, lanes, &m));
        a.set_session(7);
        b.set_session(7);
        let topic: Arc<str> = Arc::from("line1/temp");
        let t0 = Instant::now();
        // Records of one topic on two lanes in one session: the first lane keeps it.
        assert_eq!(a.carries(&topic, 7, t0), Deliver);
        assert_eq!(b.carries(&topic, 7, t0 + Duration::from_millis(10)), Refuse);
        // The owner goes on delivering: its hold is refreshed, the other stays refused.
        for s in 1..6 {
            let at = t0 + Duration::from_millis(1100 * s);
            assert_eq!(a.carries(&topic, 7, at), Deliver);
            assert_eq!(b.carries(&topic, 7, at), Refuse);
        }
        assert_eq!(m.lane_topic_conflicts.get(), 6);
        // The owner falls silent: the other takes it after the hold.
        let later = t0 + Duration::from_millis(5500) + TOPIC_HOLD;
        assert_eq!(b.carries(&topic, 7, later), Deliver);
        assert_eq!(a.carries(&topic, 7, later + TOPIC_RECHECK), Refuse);
        // The sender restarts with the topic back on lane 0: its records wait until lane 1 has
        // seen the new session too (unauthenticated, a forged session on lane 0 alone must not
        // take the topic), then move at once.
        let moved = later + TOPIC_RECHECK * 2;
        a.set_session(8);
        assert_eq!(a.carries(&topic, 8, moved), Wait);
        b.set_session(8);
        assert_eq!(a.carries(&topic, 8, moved), Deliver);
        assert_eq!(b.carries(&topic, 7, moved + TOPIC_RECHECK), Refuse);
    }

    #[test]
    fn a_newer_authenticated_session_moves_a_topic_at_once() {
        let m = metrics();
        let lanes = Lanes::new(2, true, &m);
        let (mut a, mut b) = (Lane::new(0, lanes.clone(), &m), Lane::new(1, lanes, &m));
        let topic: Arc<str> = Arc::from("line1/temp");
        let t0 = Instant::now();
        assert_eq!(a.carries(&topic, 7, t0), Verdict::Deliver);
        assert_eq!(b.carries(&topic, 8, t0), Verdict::Deliver);
    }

    #[test]
    fn the_lane_a_topic_leaves_hands_its_open_gaps_to_the_lane_that_takes_it() {
        let m = metrics();
        let lanes = Lanes::new(2, true, &m);
        let (mut a, mut b) = (Lane::new(0, lanes.clone(), &m), Lane::new(1, lanes, &m));
        let config = || diode_wire::ReassemblerConfig::default();
        let (mut ra, mut rb) = (
            diode_wire::Reassembler::new(config()),
            diode_wire::Reassembler::new(config()),
        );
        let topic: Arc<str> = Arc::from("line1/temp");
        let gap = diode_wire::OpenGap {
            first_seq: 300,
            last_seq: 499,
            after_us: 1,
            before_us: 2,
        };
        // Lane 0 kept a gap of the topic from before a restart; lane 1 carries it now.
        ra.restore_gaps([(topic.clone(), gap)]);
        assert_eq!(b.carries(&topic, 9, Instant::now()), Verdict::Deliver);
        b.exchange(&mut rb, false);
        assert!(rb.open_gaps().is_empty(), "nothing to take yet");
        a.exchange(&mut ra, false);
        assert!(ra.open_gaps().is_empty());
        b.exchange(&mut rb, false);
        assert_eq!(rb.open_gaps(), vec![(topic.clone(), gap)]);
        assert!(lanes_handovers_empty(&a));
        // A lane that refuses a topic forgets what it knew of it, and gives it to no one.
        ra.restore_gaps([(topic.clone(), gap)]);
        assert_eq!(a.carries(&topic, 9, Instant::now()), Verdict::Refuse);
        a.exchange(&mut ra, false);
        b.exchange(&mut rb, false);
        assert!(ra.open_gaps().is_empty());
        assert_eq!(rb.open_gaps().len(), 1);
        assert!(lanes_handovers_empty(&a));
    }

    fn mark(next_seq: u64, session_id: u64) -> diode_wire::Mark {
        diode_wire::Mark {
            next_seq,
            last_time_us: 0,
            session_id,
        }
    }

    fn mark_of(ra: &diode_wire::Reassembler, topic: &str) -> Option<diode_wire::Mark> {
        ra.watermarks()
            .into_iter()
            .find(|(t, _)| &**t == topic)
            .map(|(_, m)| m)
    }

    #[test]
    fn a_topic_first_claimed_takes_the_latest_mark_once_every_other_lane_has_answered() {
        let m = metrics();
        let lanes = Lanes::new(3, true, &m);
        let [a, b, mut c] = [0, 1, 2].map(|i| Lane::new(i, lanes.clone(), &m));
        let [mut ra, mut rb, mut rc] =
            [(); 3].map(|_| diode_wire::Reassembler::new(Default::default()));
        let topic: Arc<str> = Arc::from("line1/temp");
        // Two state files kept the topic: lane 1's is the later.
        ra.restore_watermarks([(topic.clone(), mark(100, 5 << 20))]);
        rb.restore_watermarks([(topic.clone(), mark(200, 6 << 20))]);
        assert_eq!(c.carries(&topic, 7 << 20, Instant::now()), Verdict::Deliver);
        a.exchange(&mut ra, false);
        c.exchange(&mut rc, false);
        assert_eq!(mark_of(&rc, &topic), None, "lane 1 has not answered yet");
        b.exchange(&mut rb, false);
        c.exchange(&mut rc, false);
        assert_eq!(mark_of(&rc, &topic), Some(mark(200, 6 << 20)));
        assert_eq!((mark_of(&ra, &topic), mark_of(&rb, &topic)), (None, None));
        assert!(lanes_handovers_empty(&a));
    }

    #[test]
    fn what_was_handed_to_a_lane_the_topic_left_again_goes_on_to_the_lane_that_has_it() {
        let m = metrics();
        let lanes = Lanes::new(2, true, &m);
        let (mut a, mut b) = (Lane::new(0, lanes.clone(), &m), Lane::new(1, lanes, &m));
        let (mut ra, mut rb) = (
            diode_wire::Reassembler::new(Default::default()),
            diode_wire::Reassembler::new(Default::default()),
        );
        let topic: Arc<str> = Arc::from("line1/temp");
        let t0 = Instant::now();
        assert_eq!(a.carries(&topic, 7 << 20, t0), Verdict::Deliver);
        ra.restore_watermarks([(topic.clone(), mark(300, 7 << 20))]);
        // To lane 1, which has not taken what lane 0 handed when the topic comes back.
        assert_eq!(b.carries(&topic, 8 << 20, t0), Verdict::Deliver);
        a.exchange(&mut ra, false);
        assert_eq!(
            a.carries(&topic, 9 << 20, t0 + TOPIC_RECHECK),
            Verdict::Deliver
        );
        b.exchange(&mut rb, false);
        a.exchange(&mut ra, false);
        assert_eq!(mark_of(&rb, &topic), None, "a stale mark left on lane 1");
        assert_eq!(mark_of(&ra, &topic), Some(mark(300, 7 << 20)));
        assert!(lanes_handovers_empty(&a));
    }

    #[test]
    fn what_a_stopped_lane_asked_for_and_was_not_handed_stays_in_the_other_lanes_state() {
        let m = metrics();
        let lanes = Lanes::new(2, true, &m);
        let (a, mut b) = (Lane::new(0, lanes.clone(), &m), Lane::new(1, lanes, &m));
        let (mut ra, mut rb) = (
            diode_wire::Reassembler::new(Default::default()),
            diode_wire::Reassembler::new(Default::default()),
        );
        let topic: Arc<str> = Arc::from("line1/temp");
        ra.restore_watermarks([(topic.clone(), mark(300, 7 << 20))]);
        assert_eq!(b.carries(&topic, 8 << 20, Instant::now()), Verdict::Deliver);
        // Lane 1 stops first; lane 0 has one more pass before it stops too.
        b.exchange(&mut rb, true);
        a.exchange(&mut ra, false);
        assert_eq!(mark_of(&ra, &topic), Some(mark(300, 7 << 20)));
        assert!(lanes_handovers_empty(&a));
    }

    #[test]
    fn nothing_is_handed_to_a_lane_that_has_stopped() {
        let m = metrics();
        let lanes = Lanes::new(3, true, &m);
        let [f, mut t, mut h] = [0, 1, 2].map(|i| Lane::new(i, lanes.clone(), &m));
        let [mut rf, mut rt, mut rh] =
            [(); 3].map(|_| diode_wire::Reassembler::new(Default::default()));
        let topic: Arc<str> = Arc::from("line1/temp");
        rf.restore_watermarks([(topic.clone(), mark(300, 6 << 20))]);
        let t0 = Instant::now();
        // Lane 1 claims the topic first and asks the others; it moves on to lane 2, which stops
        // before lane 0 has answered.
        assert_eq!(t.carries(&topic, 7 << 20, t0), Verdict::Deliver);
        assert_eq!(h.carries(&topic, 8 << 20, t0), Verdict::Deliver);
        h.exchange(&mut rh, true);
        t.exchange(&mut rt, false);
        f.exchange(&mut rf, false);
        t.exchange(&mut rt, false);
        assert_eq!(mark_of(&rh, &topic), None);
        assert_eq!(
            mark_of(&rt, &topic),
            Some(mark(300, 6 << 20)),
            "kept by a running lane"
        );
        assert!(lanes_handovers_empty(&f));
    }

    #[test]
    fn a_lane_refusing_records_while_another_exchanges_does_not_deadlock() {
        let m = metrics();
        let lanes = Lanes::new(2, true, &m);
        let mut a = Lane::new(0, lanes.clone(), &m);
        let (done, finished) = std::sync::mpsc::channel();
        let topics: Vec<Arc<str>> = (0..64).map(|i| Arc::from(format!("t/{i}"))).collect();
        let t0 = Instant::now();
        // Lane 0 claims every topic first and asks lane 1, which never answers here: each of
        // lane 0's passes looks the topics up.
        for topic in &topics {
            assert_eq!(a.carries(topic, 9 << 20, t0), Verdict::Deliver);
        }
        let refusing = {
            let done = done.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    // A lane of its own each round: no answer cached, each record decided.
                    let mut b = Lane::new(1, lanes.clone(), &m);
                    for topic in &topics {
                        assert_eq!(b.carries(topic, 8 << 20, t0), Verdict::Refuse);
                    }
                }
                done.send(()).unwrap();
            })
        };
        let exchanging = std::thread::spawn(move || {
            let mut ra = diode_wire::Reassembler::new(Default::default());
            for _ in 0..2000 {
                a.exchange(&mut ra, false);
            }
            done.send(()).unwrap();
        });
        for _ in 0..2 {
            finished
                .recv_timeout(Duration::from_secs(20))
                .expect("the lanes deadlocked");
        }
        refusing.join().unwrap();
        exchanging.join().unwrap();
    }

    fn lanes_handovers_empty(lane: &Lane) -> bool {
        lane.lanes
            .handovers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}
