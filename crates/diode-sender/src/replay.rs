//! Sending journaled records again: on an operator's request (`diode-send replay`, which drops a
//! request file into the journal directory of the running sender: nothing crosses from IT to
//! OT, the operator types in what the IT side reported), and continuously, the journal's recent
//! window in the background, so that a short gap heals by itself. Replayed records go to the
//! link thread through a queue of their own, which it serves only when live records are not
//! waiting: a replay is paced by its own ceiling and never delays live traffic.

use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diode_common::Shutdown;

use crate::journal::{self, Entry};

/// How often the request directory is looked at.
const REQUEST_POLL: Duration = Duration::from_millis(500);
/// A backfill round starts at most this often.
const BACKFILL_ROUND: Duration = Duration::from_secs(1);

/// Records `seqs` of `topic` whose ingest time is within `times`, to be sent again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub topic: String,
    pub seqs: RangeInclusive<u64>,
    pub times: RangeInclusive<i64>,
}

impl Request {
    fn to_text(&self) -> String {
        format!(
            "seq={}-{}\ntime_us={}..{}\ntopic={}\n",
            self.seqs.start(),
            self.seqs.end(),
            self.times.start(),
            self.times.end(),
            self.topic
        )
    }

    fn parse(text: &str) -> Option<Request> {
        let (mut seqs, mut times, mut topic) = (None, None, None);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match line.split_once('=')? {
                ("seq", range) => {
                    let (a, b) = range.split_once('-')?;
                    seqs = Some(a.parse().ok()?..=b.parse().ok()?);
                }
                ("time_us", range) => {
                    let (a, b) = range.split_once("..")?;
                    times = Some(a.parse().ok()?..=b.parse().ok()?);
                }
                ("topic", name) => topic = Some(name.to_owned()),
                _ => return None,
            }
        }
        Some(Request {
            topic: topic?,
            seqs: seqs?,
            times: times?,
        })
    }
}

pub fn request_dir(root: &Path) -> PathBuf {
    root.join("replay")
}

/// Leaves a request for the running sender (written aside, then renamed into place, so it is
/// never read half-written). Returns its path.
pub fn submit(root: &Path, request: &Request) -> io::Result<PathBuf> {
    let dir = request_dir(root);
    fs::create_dir_all(&dir)?;
    let name = format!(
        "{:016}-{:08x}",
        diode_common::unix_time_us(),
        rand::random::<u32>()
    );
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(format!("{name}.req"));
    fs::write(&tmp, request.to_text())?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

/// What a topic's journal holds, and how much of a request.
pub struct Survey {
    pub span: Option<journal::Span>,
    pub matched: u64,
    pub matched_seqs: Option<(u64, u64)>,
}

/// Reads the topic's journal for `diode-send replay`: what it holds, and what of the request.
pub fn survey(root: &Path, request: &Request) -> io::Result<Survey> {
    let dir = journal::topic_dir(root, &request.topic);
    let (mut matched, mut matched_seqs) = (0, None);
    let span = journal::span_with(&dir, |entry| {
        if request.seqs.contains(&entry.seq) && request.times.contains(&entry.time_us) {
            matched += 1;
            let seqs = matched_seqs.get_or_insert((entry.seq, entry.seq));
            seqs.1 = entry.seq;
        }
    })?;
    Ok(Survey {
        span,
        matched,
        matched_seqs,
    })
}

/// A journaled record on its way back to the link.
pub struct Replayed {
    pub topic: usize,
    pub entry: Entry,
}

/// Continuous backfill: the journal's last `window` re-sent over and over at `rate_mbps`.
#[derive(Debug, Clone, Copy)]
pub struct Backfill {
    pub window: Duration,
    pub rate_mbps: f64,
}

pub struct Replayer {
    pub root: PathBuf,
    /// Topic names by index, and whether each is journaled.
    pub topics: Vec<(String, bool)>,
    /// Each lane's link thread, and each topic's lane: a topic's records, replayed or live,
    /// take the one lane (wire-format.md §7).
    pub out: Vec<flume::Sender<Replayed>>,
    pub lane_of: Vec<usize>,
    /// The ceiling of on-request replays, in megabits per second of payload.
    pub rate_mbps: f64,
    pub backfill: Option<Backfill>,
    pub shutdown: Shutdown,
    pub metrics: crate::metrics::ReplayMetrics,
}

/// Paces payload bytes at a rate, by sleeping.
struct Pace {
    bytes_per_sec: f64,
    since: Instant,
    sent: f64,
}

impl Pace {
    fn new(rate_mbps: f64) -> Self {
        Pace {
            bytes_per_sec: rate_mbps * 1e6 / 8.0,
            since: Instant::now(),
            sent: 0.0,
        }
    }

    fn wait(&mut self, bytes: usize) {
        // Time spent waiting on a full queue is not credit for a burst later: at most 100 ms
        // of it is kept.
        let elapsed = self.since.elapsed().as_secs_f64();
        let floor = (elapsed - 0.1) * self.bytes_per_sec;
        if self.sent < floor {
            self.sent = floor;
        }
        self.sent += bytes as f64;
        let due = Duration::from_secs_f64(self.sent / self.bytes_per_sec);
        if let Some(pause) = due.checked_sub(self.since.elapsed()) {
            std::thread::sleep(pause);
        }
    }
}

impl Replayer {
    pub fn run(self) {
        let mut next_round = Instant::now();
        while !self.shutdown.is_triggered() {
            let mut did_request = false;
            for path in self.pending_requests() {
                did_request = true;
                self.serve_request(&path);
            }
            if let Some(backfill) = self.backfill.filter(|_| !did_request) {
                if Instant::now() >= next_round {
                    self.backfill_round(backfill);
                    next_round = Instant::now() + BACKFILL_ROUND;
                }
            }
            std::thread::sleep(REQUEST_POLL);
        }
    }

    fn pending_requests(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(request_dir(&self.root)) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "req"))
            .collect();
        paths.sort();
        paths
    }

    fn serve_request(&self, path: &Path) {
        let request = fs::read_to_string(path)
            .ok()
            .as_deref()
            .and_then(Request::parse);
        // Taken off first: a request that cannot be served must not be retried forever.
        let _ = fs::remove_file(path);
        let Some(request) = request else {
            tracing::warn!(path = %path.display(), "replay: not a request file, removed");
            return;
        };
        let Some(index) = self
            .topics
            .iter()
            .position(|(name, journaled)| *journaled && *name == request.topic)
        else {
            tracing::warn!(topic = %request.topic, "replay: no journaled topic of that name");
            return;
        };
        let mut pace = Pace::new(self.rate_mbps);
        let (mut sent, mut first, mut last) = (0u64, None, 0);
        let dir = journal::topic_dir(&self.root, &request.topic);
        let result = journal::scan(&dir, request.seqs.clone(), request.times.clone(), |entry| {
            first.get_or_insert(entry.seq);
            last = entry.seq;
            sent += 1;
            pace.wait(entry.payload.len());
            self.metrics.records.inc();
            self.send(index, entry)
        });
        if let Err(e) = result {
            tracing::error!(topic = %request.topic, error = %e, "replay: cannot read the journal");
        }
        self.metrics.requests.inc();
        match first {
            Some(first) => tracing::info!(
                topic = %request.topic,
                requested = format_args!("{}-{}", request.seqs.start(), request.seqs.end()),
                replayed = format_args!("{first}-{last}"),
                records = sent,
                "replay: sent again from the journal"
            ),
            None => tracing::warn!(
                topic = %request.topic,
                requested = format_args!("{}-{}", request.seqs.start(), request.seqs.end()),
                "replay: none of these records is in the journal"
            ),
        }
    }

    fn backfill_round(&self, backfill: Backfill) {
        let mut pace = Pace::new(backfill.rate_mbps);
        let window_us = backfill.window.as_micros().min(i64::MAX as u128) as i64;
        let since = diode_common::unix_time_us().saturating_sub(window_us);
        for (index, (name, journaled)) in self.topics.iter().enumerate() {
            if !journaled || self.shutdown.is_triggered() {
                continue;
            }
            // An operator's request does not wait for a whole round.
            for path in self.pending_requests() {
                self.serve_request(&path);
            }
            let dir = journal::topic_dir(&self.root, name);
            let _ = journal::scan(&dir, 0..=u64::MAX, since..=i64::MAX, |entry| {
                pace.wait(entry.payload.len());
                self.metrics.backfill_records.inc();
                self.send(index, entry)
            });
        }
    }

    /// Hands a record to the link thread, waiting while its queue is full; false once stopping.
    fn send(&self, topic: usize, entry: Entry) -> bool {
        let Some(out) = self.lane_of.get(topic).and_then(|lane| self.out.get(*lane)) else {
            return false;
        };
        let mut item = Replayed { topic, entry };
        loop {
            if self.shutdown.is_triggered() {
                return false;
            }
            match out.send_timeout(item, Duration::from_millis(100)) {
                Ok(()) => return true,
                Err(flume::SendTimeoutError::Timeout(back)) => item = back,
                Err(flume::SendTimeoutError::Disconnected(_)) => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let request = Request {
            topic: "line 3/ü".into(),
            seqs: 5..=90,
            times: -3..=i64::MAX,
        };
        assert_eq!(Request::parse(&request.to_text()), Some(request));
        assert_eq!(Request::parse("seq=1-2\n"), None);
        assert_eq!(Request::parse("bogus\n"), None);
    }
}
