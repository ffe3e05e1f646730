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

/// A topic delivered by one lane is refused on another, in a session no newer, until the first
/// has delivered none of it for this long: two senders numbering one topic each their own way
/// would otherwise interleave two sequences in the sinks. A topic moved to another lane by a
/// sender's restart comes in a newer session, and moves at once.
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

/// A topic on its way from one lane to another, with the open gaps the first held, once it has
/// let go of them.
struct Handover {
    topic: Arc<str>,
    from: usize,
    to: usize,
    gaps: Option<Vec<diode_wire::OpenGap>>,
}

#[derive(Clone, Copy, Default)]
struct LaneState {
    up: bool,
    loss_ratio: f64,
}

/// Every lane's state, shared by their link threads.
pub struct Lanes {
    count: usize,
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
    pub fn new(count: usize, metrics: &ReceiverMetrics) -> Arc<Lanes> {
        Arc::new(Lanes {
            count,
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
    carries: HashMap<Arc<str>, (bool, Instant)>,
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

    /// Whether this lane may deliver `topic` now, in `session` (the lane's current one): it may
    /// unless another lane delivered it within `TOPIC_HOLD` in a session no older. A lane that
    /// takes a topic over asks the other to hand over what it knew of it (`exchange`).
    /// Refusals are counted and logged. Free with a single lane.
    pub fn carries(&mut self, topic: &Arc<str>, session: u64, now: Instant) -> bool {
        if self.lanes.count == 1 {
            return true;
        }
        if let Some((answer, at)) = self.carries.get(topic) {
            if now.saturating_duration_since(*at) < TOPIC_RECHECK {
                if !answer {
                    self.conflicts.inc();
                }
                return *answer;
            }
        }
        let answer = {
            let mut topics = self.lanes.topics.lock().unwrap_or_else(|e| e.into_inner());
            if topics.len() >= TOPICS_SWEEP_AT && !topics.contains_key(topic) {
                topics.retain(|_, claim| now.saturating_duration_since(claim.at) < TOPIC_HOLD);
            }
            let mine = Claim {
                lane: self.index,
                session,
                at: now,
            };
            match topics.get(topic).copied() {
                None => {
                    topics.insert(topic.clone(), mine);
                    true
                }
                Some(claim) if claim.lane == self.index => {
                    topics.insert(topic.clone(), mine);
                    true
                }
                Some(claim)
                    if session > claim.session
                        || now.saturating_duration_since(claim.at) >= TOPIC_HOLD =>
                {
                    tracing::info!(
                        topic = %topic,
                        lane = self.index,
                        from_lane = claim.lane,
                        "topic moved to this lane"
                    );
                    topics.insert(topic.clone(), mine);
                    self.lanes
                        .handovers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Handover {
                            topic: topic.clone(),
                            from: claim.lane,
                            to: self.index,
                            gaps: None,
                        });
                    true
                }
                Some(claim) => {
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
                    false
                }
            }
        };
        if !answer {
            self.conflicts.inc();
        }
        if self.carries.len() >= TOPICS_SWEEP_AT && !self.carries.contains_key(topic) {
            self.carries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < TOPIC_RECHECK);
        }
        self.carries.insert(topic.clone(), (answer, now));
        answer
    }

    /// Once a second: lets go of the topics another lane took from this one, handing their open
    /// gaps over so that replays can still fill them there, and takes in the gaps of the topics
    /// this lane took.
    pub fn exchange(&self, reassembler: &mut diode_wire::Reassembler) {
        if self.lanes.count == 1 {
            return;
        }
        let mut handovers = self
            .lanes
            .handovers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for handover in handovers.iter_mut() {
            if handover.from == self.index && handover.gaps.is_none() {
                handover.gaps = Some(reassembler.hand_over(&handover.topic));
            }
        }
        handovers.retain_mut(|handover| {
            if handover.to != self.index {
                return true;
            }
            let Some(gaps) = handover.gaps.take() else {
                return true;
            };
            if !gaps.is_empty() {
                tracing::info!(
                    topic = %handover.topic,
                    from_lane = handover.from,
                    gaps = gaps.len(),
                    "open gaps of a topic moved here taken over: replays fill them on this lane"
                );
            }
            reassembler.restore_gaps(gaps.into_iter().map(|gap| (handover.topic.clone(), gap)));
            false
        });
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
        let lanes = Lanes::new(2, &m);
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
    fn a_topic_stays_with_the_lane_that_carries_it_until_that_lane_lets_go() {
        let m = metrics();
        let lanes = Lanes::new(2, &m);
        let (mut a, mut b) = (Lane::new(0, lanes.clone(), &m), Lane::new(1, lanes, &m));
        let topic: Arc<str> = Arc::from("line1/temp");
        let t0 = Instant::now();
        // Two senders, the same session age: the first lane keeps the topic.
        assert!(a.carries(&topic, 7, t0));
        assert!(!b.carries(&topic, 7, t0 + Duration::from_millis(10)));
        // The owner goes on delivering: its hold is refreshed, the other stays refused.
        for s in 1..6 {
            let at = t0 + Duration::from_millis(1100 * s);
            assert!(a.carries(&topic, 7, at));
            assert!(!b.carries(&topic, 7, at));
        }
        assert_eq!(m.lane_topic_conflicts.get(), 6);
        // The owner falls silent: the other takes it after the hold.
        let later = t0 + Duration::from_millis(5500) + TOPIC_HOLD;
        assert!(b.carries(&topic, 7, later));
        assert!(!a.carries(&topic, 7, later + TOPIC_RECHECK));
        // A newer session (the sender restarted with the topic on the other lane) moves it at
        // once.
        let moved = later + TOPIC_RECHECK * 2;
        assert!(a.carries(&topic, 8, moved));
        assert!(!b.carries(&topic, 7, moved + TOPIC_RECHECK));
    }
}
