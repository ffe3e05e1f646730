//! A receiver's lanes (wire-format.md §7): each has its own socket, link thread and
//! reassembler. What the operator sees of the link as a whole is made here from every lane's
//! state, and here a topic is held to one lane at a time, which is what keeps its records in
//! order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diode_common::LogThrottle;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::{LaneLabels, ReceiverMetrics};

/// A topic delivered by one lane is refused on another until the first has delivered none of it
/// for this long: two senders (or two lanes of one, misconfigured) numbering one topic each their
/// own way would otherwise interleave two sequences in the sinks. A topic moved to another lane
/// by a sender restart waits this out at most.
const TOPIC_HOLD: Duration = Duration::from_secs(3);
/// How long a lane trusts its own answer about a topic before asking the shared table again:
/// the owner refreshes its hold this often, well within `TOPIC_HOLD`.
const TOPIC_RECHECK: Duration = Duration::from_secs(1);

type OpenGapOf = (Arc<str>, diode_wire::OpenGap);

/// Every lane's state, shared by their link threads.
pub struct Lanes {
    up: Vec<AtomicBool>,
    loss_ratio: Mutex<Vec<f64>>,
    /// Per topic, the lane delivering it and when it last said so.
    topics: Mutex<HashMap<Arc<str>, (usize, Instant)>>,
    /// Each lane's open gaps as of its last second, for the status page lane 0 keeps.
    gaps: Mutex<Vec<Vec<OpenGapOf>>>,
    link_up: Gauge,
    link_loss_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Lanes {
    pub fn new(count: usize, metrics: &ReceiverMetrics) -> Arc<Lanes> {
        Arc::new(Lanes {
            up: (0..count).map(|_| AtomicBool::new(false)).collect(),
            loss_ratio: Mutex::new(vec![0.0; count]),
            topics: Mutex::new(HashMap::new()),
            gaps: Mutex::new(vec![Vec::new(); count]),
            link_up: metrics.link_up.clone(),
            link_loss_ratio: metrics.link_loss_ratio.clone(),
        })
    }

    pub fn count(&self) -> usize {
        self.up.len()
    }

    /// A lane's open gaps, once a second.
    pub fn set_gaps(&self, lane: usize, gaps: Vec<OpenGapOf>) {
        self.gaps.lock().unwrap_or_else(|e| e.into_inner())[lane] = gaps;
    }

    /// Every lane's open gaps, for the status page.
    pub fn all_gaps(&self) -> Vec<OpenGapOf> {
        self.gaps.lock().unwrap_or_else(|e| e.into_inner()).concat()
    }

    /// "lane 0 up, lane 1 down", for the status page.
    pub fn describe(&self) -> String {
        self.up
            .iter()
            .enumerate()
            .map(|(i, up)| {
                let state = if up.load(Ordering::Relaxed) {
                    "up"
                } else {
                    "down"
                };
                format!("lane {i} {state}")
            })
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
        self.lanes.up[self.index].store(up, Ordering::Relaxed);
        let all = self.lanes.up.iter().all(|u| u.load(Ordering::Relaxed));
        self.lanes.link_up.set(i64::from(all));
    }

    /// `diode_link_loss_ratio` is the worst lane's.
    pub fn set_loss_ratio(&self, ratio: f64) {
        let mut ratios = self
            .lanes
            .loss_ratio
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        ratios[self.index] = ratio;
        let worst = ratios.iter().copied().fold(0.0, f64::max);
        self.lanes.link_loss_ratio.set(worst);
    }

    /// Whether this lane may deliver `topic` now: it may unless another lane delivered it within
    /// `TOPIC_HOLD`. Refusals are counted and logged. Free with a single lane.
    pub fn carries(&mut self, topic: &Arc<str>, now: Instant) -> bool {
        if self.lanes.count() == 1 {
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
            match topics.get(topic) {
                Some((other, at))
                    if *other != self.index && now.saturating_duration_since(*at) < TOPIC_HOLD =>
                {
                    static REFUSED: LogThrottle = LogThrottle::new(Duration::from_secs(10));
                    if let Some(folded) = REFUSED.allow() {
                        tracing::error!(
                            topic = %topic,
                            lane = self.index,
                            carried_by = other,
                            folded,
                            "records of a topic another lane carries: refused (is the topic \
                             configured on two lanes, or sent by two senders?)"
                        );
                    }
                    false
                }
                _ => {
                    topics.insert(topic.clone(), (self.index, now));
                    true
                }
            }
        };
        if !answer {
            self.conflicts.inc();
        }
        // The reassembler caps the topics a lane sees, which bounds this map.
        self.carries.insert(topic.clone(), (answer, now));
        answer
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
        assert!(a.carries(&topic, t0));
        assert!(!b.carries(&topic, t0 + Duration::from_millis(10)));
        // The owner goes on delivering: its hold is refreshed, the other stays refused.
        for s in 1..6 {
            let at = t0 + Duration::from_millis(1100 * s);
            assert!(a.carries(&topic, at));
            assert!(!b.carries(&topic, at));
        }
        assert_eq!(m.lane_topic_conflicts.get(), 6);
        // The owner falls silent (the topic moved lanes): the other takes it after the hold.
        let later = t0 + Duration::from_millis(5500) + TOPIC_HOLD;
        assert!(b.carries(&topic, later));
        assert!(!a.carries(&topic, later + TOPIC_RECHECK));
    }
}
