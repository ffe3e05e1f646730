//! What the receiver keeps across its own restarts (`link.state_file`): on an authenticated
//! link the replay floor (wire-format.md §6.1); on any link each topic's next sequence number,
//! so that what the sender sent while the receiver was down is reported lost, and the gaps still
//! open, so that records replayed from the sender's journal fill them and nothing else (§6.7).
//! Text, a line each, written to a temporary file, synced and renamed over the old one, so a
//! crash leaves either the old state or the new one. Written once a second and at a clean
//! stop: after a crash, records delivered in the last second before it may be reported lost
//! once more (and a replay would deliver them again), never the other way round.

use std::path::Path;
use std::sync::Arc;

use diode_wire::{Mark, OpenGap, ReplayFloor};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line} is not receiver state (expected `session=<hex> next_block=<n>`, `seq=<n> topic=<name>` or `gap=<first>-<last> after_us=<n> before_us=<n> topic=<name>`)")]
    Format { path: String, line: usize },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a receiver keeps across its restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Only on an authenticated link.
    pub floor: Option<ReplayFloor>,
    /// Per topic, where it stood: the next sequence number it was to deliver, in which session.
    pub watermarks: Vec<(Arc<str>, Mark)>,
    /// Gaps reported and not yet filled by a replay.
    pub gaps: Vec<(Arc<str>, OpenGap)>,
}

/// The state kept in `path`; `None` if there is no file yet (a first start).
pub fn load(path: &Path) -> Result<Option<Saved>, StateError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.display().to_string(),
                source,
            })
        }
    };
    parse(&text).map(Some).map_err(|line| StateError::Format {
        path: path.display().to_string(),
        line,
    })
}

/// The state in `text`, or the number of the first line that is not.
pub fn parse(text: &str) -> Result<Saved, usize> {
    let mut saved = Saved {
        floor: None,
        watermarks: Vec::new(),
        gaps: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        let bad = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with("session=") {
            let mut session_id = None;
            let mut next_block = None;
            for field in line.split_whitespace() {
                match field.split_once('=').ok_or(bad)? {
                    ("session", hex) => session_id = u64::from_str_radix(hex, 16).ok(),
                    ("next_block", n) => next_block = n.parse().ok(),
                    _ => return Err(bad),
                }
            }
            saved.floor = Some(ReplayFloor {
                session_id: session_id.ok_or(bad)?,
                next_block: next_block.ok_or(bad)?,
            });
        } else if let Some(rest) = line.strip_prefix("seq=") {
            let (fields, topic) = rest.split_once(" topic=").ok_or(bad)?;
            let mark = parse_mark(fields).ok_or(bad)?;
            saved.watermarks.push((Arc::from(topic), mark));
        } else if let Some(rest) = line.strip_prefix("gap=") {
            let (fields, topic) = rest.split_once(" topic=").ok_or(bad)?;
            let gap = parse_gap(fields).ok_or(bad)?;
            saved.gaps.push((Arc::from(topic), gap));
        } else {
            return Err(bad);
        }
    }
    // Marks of earlier versions name no session: they were the floor's.
    if let Some(floor) = saved.floor {
        for (_, mark) in saved.watermarks.iter_mut() {
            if mark.session_id == 0 {
                mark.session_id = floor.session_id;
            }
        }
    }
    Ok(saved)
}

/// `<next seq>[ session=<hex>][ after_us=<n>]`
fn parse_mark(fields: &str) -> Option<Mark> {
    let mut fields = fields.split(' ');
    let mut mark = Mark {
        next_seq: fields.next()?.parse().ok()?,
        last_time_us: 0,
        session_id: 0,
    };
    for field in fields {
        match field.split_once('=')? {
            ("session", hex) => mark.session_id = u64::from_str_radix(hex, 16).ok()?,
            ("after_us", n) => mark.last_time_us = n.parse().ok()?,
            _ => return None,
        }
    }
    Some(mark)
}

fn parse_gap(fields: &str) -> Option<OpenGap> {
    let mut fields = fields.split(' ');
    let (first, last) = fields.next()?.split_once('-')?;
    let after_us = fields.next()?.strip_prefix("after_us=")?.parse().ok()?;
    let before_us = fields.next()?.strip_prefix("before_us=")?.parse().ok()?;
    let (first_seq, last_seq) = (first.parse().ok()?, last.parse().ok()?);
    if fields.next().is_some() || first_seq > last_seq {
        return None;
    }
    Some(OpenGap {
        first_seq,
        last_seq,
        after_us,
        before_us,
    })
}

/// The open gaps for an operator: per topic, each range, when its records were taken in, and
/// the `diode-send replay` command that sends it again.
pub fn describe_gaps(gaps: &[(Arc<str>, OpenGap)]) -> String {
    if gaps.is_empty() {
        return "no open gaps: every record reported lost has been delivered late, or none was lost\n"
            .to_owned();
    }
    let time = |us: i64| {
        if us == 0 {
            "an unknown time".to_owned()
        } else {
            diode_common::format_rfc3339_us(us)
        }
    };
    let mut out = String::new();
    let mut topic: Option<&str> = None;
    for (name, gap) in gaps {
        if topic != Some(name) {
            let (count, records) = gaps
                .iter()
                .filter(|(n, _)| n == name)
                .fold((0, 0u64), |(c, r), (_, g)| {
                    (c + 1, r.saturating_add(g.records()))
                });
            out += &format!("{name}: {count} open gaps, {records} records\n");
            topic = Some(name);
        }
        out += &format!(
            "  seq {}-{} ({} records), taken in after {} and before {}\n    diode-send replay --topic {} --seq {}-{}\n",
            gap.first_seq,
            gap.last_seq,
            gap.records(),
            time(gap.after_us),
            time(gap.before_us),
            diode_common::shell_quote(name),
            gap.first_seq,
            gap.last_seq,
        );
    }
    out
}

pub fn save(path: &Path, saved: &Saved) -> Result<(), StateError> {
    let error = |source| StateError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut text = String::new();
    if let Some(floor) = saved.floor {
        text += &format!(
            "session={:016x} next_block={}\n",
            floor.session_id, floor.next_block
        );
    }
    // Topic names hold no control characters (wire-format.md §1): one line each.
    for (topic, mark) in &saved.watermarks {
        text += &format!(
            "seq={} session={:016x} after_us={} topic={topic}\n",
            mark.next_seq, mark.session_id, mark.last_time_us
        );
    }
    for (topic, gap) in &saved.gaps {
        text += &format!(
            "gap={}-{} after_us={} before_us={} topic={topic}\n",
            gap.first_seq, gap.last_seq, gap.after_us, gap.before_us
        );
    }
    diode_common::fsutil::replace_file(path, text.as_bytes(), 0o600, true).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        assert!(load(&path).unwrap().is_none());
        let saved = Saved {
            floor: Some(ReplayFloor {
                session_id: 0x0123_4567_89ab_cdef,
                next_block: 42,
            }),
            watermarks: vec![
                (
                    Arc::from("line 3/telemetry"),
                    Mark {
                        next_seq: 7,
                        last_time_us: 1_764_100_000_000_000,
                        session_id: 0x0123_4567_89ab_cdef,
                    },
                ),
                (
                    Arc::from("plant/x"),
                    Mark {
                        next_seq: 0,
                        last_time_us: 0,
                        session_id: 5,
                    },
                ),
            ],
            gaps: vec![(
                Arc::from("line 3/telemetry"),
                OpenGap {
                    first_seq: 3,
                    last_seq: 5,
                    after_us: -1,
                    before_us: 1_764_100_000_000_000,
                },
            )],
        };
        save(&path, &saved).unwrap();
        assert_eq!(load(&path).unwrap(), Some(saved.clone()));
        // Unauthenticated links keep no floor.
        let unauthenticated = Saved {
            floor: None,
            ..saved
        };
        save(&path, &unauthenticated).unwrap();
        assert_eq!(load(&path).unwrap(), Some(unauthenticated));
        // The one-line files of earlier versions still load, without marks.
        std::fs::write(&path, "session=0123456789abcdef next_block=42\n").unwrap();
        assert!(load(&path).unwrap().unwrap().watermarks.is_empty());
        std::fs::write(&path, "session=1 next_block=1\nseq=3 topic=a\n\n").unwrap();
        let marks = load(&path).unwrap().unwrap().watermarks;
        assert_eq!(marks.len(), 1, "a blank line is fine");
        assert_eq!(
            marks[0].1.session_id, 1,
            "an earlier version's marks are the floor's"
        );
        for (text, line) in [
            ("session=zz next_block=1\n", 1),
            ("session=1 next_block=1\nseq=x topic=a\n", 2),
            ("seq=1 topic=a\ngap=5-4 after_us=0 before_us=0 topic=a\n", 2),
            ("gap=1-2 after_us=0 topic=a\n", 1),
            ("bogus\n", 1),
        ] {
            std::fs::write(&path, text).unwrap();
            match load(&path) {
                Err(StateError::Format { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }
}
