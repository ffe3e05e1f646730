//! The receiver's open gaps (wire-format.md §6.7): per topic, the ranges of sequence numbers
//! reported lost and not yet sent again. A record replayed from the sender's journal is
//! delivered only if it falls into one, and closes that much of it; anything else replayed is
//! a duplicate. Bounded whatever the link sends: gaps come only from sequence numbers that
//! passed the plausibility bounds (§6.6), and past the caps the oldest are forgotten (counted).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Open gaps kept per topic and in all.
pub const MAX_GAPS_PER_TOPIC: usize = 1024;
pub const MAX_GAPS: usize = 65_536;

/// Records `first_seq..=last_seq` of a topic, lost and not (yet) sent again. The lost records
/// were taken in after `after_us` and before `before_us` (the sender's clock, microseconds since
/// the Unix epoch; 0 when not known): what `diode-send replay --since/--until` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenGap {
    pub first_seq: u64,
    pub last_seq: u64,
    pub after_us: i64,
    pub before_us: i64,
}

impl OpenGap {
    pub fn records(&self) -> u64 {
        (self.last_seq - self.first_seq).saturating_add(1)
    }
}

#[derive(Default)]
pub(crate) struct GapBook {
    /// Per topic, by first sequence number; ranges never overlap.
    topics: HashMap<Arc<str>, BTreeMap<u64, OpenGap>>,
    count: usize,
    /// Gaps dropped to stay within the caps: what they held can no longer be filled.
    pub(crate) forgotten: u64,
}

impl GapBook {
    pub(crate) fn open(&mut self, topic: &Arc<str>, gap: OpenGap) {
        if gap.first_seq > gap.last_seq {
            return;
        }
        let gaps = self.topics.entry(topic.clone()).or_default();
        // A gap that continues the newest one (a heartbeat's, then a record's) extends it.
        if let Some((_, last)) = gaps.iter_mut().next_back() {
            if last.last_seq.checked_add(1) == Some(gap.first_seq) {
                last.last_seq = gap.last_seq;
                last.before_us = gap.before_us;
                return;
            }
        }
        // Overlaps come only from a sender whose numbering went back: the old range goes.
        let overlapping: Vec<u64> = gaps
            .range(..=gap.last_seq)
            .filter(|(_, g)| g.last_seq >= gap.first_seq)
            .map(|(k, _)| *k)
            .collect();
        for key in overlapping {
            gaps.remove(&key);
            self.count -= 1;
        }
        gaps.insert(gap.first_seq, gap);
        self.count += 1;
        self.enforce_caps(topic);
    }

    fn enforce_caps(&mut self, topic: &Arc<str>) {
        while self
            .topics
            .get(topic)
            .is_some_and(|g| g.len() > MAX_GAPS_PER_TOPIC)
            || self.count > MAX_GAPS
        {
            // Past a topic's cap, its own oldest goes; past the total, the oldest of the topic
            // holding most, so one noisy (or forged) topic cannot push out the others' gaps.
            let own = self
                .topics
                .get(topic)
                .is_some_and(|g| g.len() > MAX_GAPS_PER_TOPIC);
            let victim = if own {
                topic.clone()
            } else {
                match self.topics.iter().max_by_key(|(_, g)| g.len()) {
                    Some((t, _)) => t.clone(),
                    None => return,
                }
            };
            let gaps = self.topics.get_mut(&victim).expect("found above");
            gaps.pop_first();
            if gaps.is_empty() {
                self.topics.remove(&victim);
            }
            self.count -= 1;
            self.forgotten += 1;
        }
    }

    /// Takes `seq` out of the topic's open gaps; false if it was in none.
    pub(crate) fn fill(&mut self, topic: &str, seq: u64) -> bool {
        let Some(gaps) = self.topics.get_mut(topic) else {
            return false;
        };
        let Some((&key, &gap)) = gaps.range(..=seq).next_back() else {
            return false;
        };
        if gap.last_seq < seq {
            return false;
        }
        gaps.remove(&key);
        self.count -= 1;
        if gap.first_seq < seq {
            gaps.insert(
                gap.first_seq,
                OpenGap {
                    last_seq: seq - 1,
                    ..gap
                },
            );
            self.count += 1;
        }
        if seq < gap.last_seq {
            gaps.insert(
                seq + 1,
                OpenGap {
                    first_seq: seq + 1,
                    ..gap
                },
            );
            self.count += 1;
        }
        if gaps.is_empty() {
            self.topics.remove(topic);
        } else if let Some(topic) = self.topics.get_key_value(topic).map(|(k, _)| k.clone()) {
            self.enforce_caps(&topic);
        }
        true
    }

    /// Removes a topic's gaps and returns them by sequence number: its sender started its
    /// numbering over, so they name other records, or another reassembler carries it now.
    pub(crate) fn take(&mut self, topic: &str) -> Vec<OpenGap> {
        let Some(gaps) = self.topics.remove(topic) else {
            return Vec::new();
        };
        self.count -= gaps.len();
        gaps.into_values().collect()
    }

    /// Every open gap, by topic then sequence number.
    pub(crate) fn list(&self) -> Vec<(Arc<str>, OpenGap)> {
        let mut out: Vec<(Arc<str>, OpenGap)> = self
            .topics
            .iter()
            .flat_map(|(t, gaps)| gaps.values().map(move |g| (t.clone(), *g)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.first_seq.cmp(&b.1.first_seq)));
        out
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(first_seq: u64, last_seq: u64) -> OpenGap {
        OpenGap {
            first_seq,
            last_seq,
            after_us: 1,
            before_us: 2,
        }
    }

    #[test]
    fn fills_split_and_close_gaps() {
        let topic: Arc<str> = Arc::from("t");
        let mut book = GapBook::default();
        book.open(&topic, gap(10, 19));
        book.open(&topic, gap(20, 24));
        assert_eq!(book.list(), vec![(topic.clone(), gap(10, 24))], "merged");
        assert!(book.fill("t", 15));
        assert!(!book.fill("t", 15), "filled once");
        assert!(!book.fill("t", 9) && !book.fill("t", 25) && !book.fill("u", 12));
        assert_eq!(book.len(), 2);
        for seq in (10..15).chain(16..25) {
            assert!(book.fill("t", seq));
        }
        assert_eq!(book.len(), 0);
        assert!(book.list().is_empty());
    }

    #[test]
    fn stays_within_its_caps() {
        let topic: Arc<str> = Arc::from("t");
        let mut book = GapBook::default();
        for i in 0..(MAX_GAPS_PER_TOPIC as u64 + 10) {
            book.open(&topic, gap(i * 3, i * 3 + 1));
        }
        assert_eq!(book.len(), MAX_GAPS_PER_TOPIC);
        assert_eq!(book.forgotten, 10);
        assert_eq!(book.list()[0].1.first_seq, 30, "the oldest went first");
        // Splitting a gap at the cap forgets the oldest rather than growing.
        let (_, last) = book.list()[MAX_GAPS_PER_TOPIC - 1];
        book.open(&topic, gap(last.last_seq + 10, last.last_seq + 20));
        assert!(book.fill(&topic, last.last_seq + 15));
        assert_eq!(book.len(), MAX_GAPS_PER_TOPIC);
        for t in 0..(MAX_GAPS / MAX_GAPS_PER_TOPIC + 2) {
            let topic: Arc<str> = Arc::from(format!("topic{t}").as_str());
            for i in 0..MAX_GAPS_PER_TOPIC as u64 {
                book.open(&topic, gap(i * 3, i * 3 + 1));
            }
        }
        assert_eq!(book.len(), MAX_GAPS);
        // A quiet topic's one gap survives the flood of the others.
        let quiet: Arc<str> = Arc::from("quiet");
        book.open(&quiet, gap(5, 6));
        assert!(book.list().iter().any(|(t, _)| *t == quiet));
        assert_eq!(book.len(), MAX_GAPS);
    }
}
