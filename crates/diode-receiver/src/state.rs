//! What the receiver keeps across its own restarts (`link.state_file`), on an authenticated link
//! (wire-format.md §6.1): the replay floor, and each topic's next sequence number in that
//! session, so that what the sender sent while the receiver was down is reported lost. Text, a
//! line for the floor then a line a topic, written to a temporary file, synced and renamed over
//! the old one, so a crash leaves either the old state or the new one. Written once a second and
//! at a clean stop: after a crash, records delivered in the last second before it may be
//! reported lost once more, never the other way round.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use diode_wire::ReplayFloor;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a receiver state file (expected `session=<hex> next_block=<n>`, then lines `seq=<n> topic=<name>`)")]
    Format { path: String },
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
    pub floor: ReplayFloor,
    /// Per topic of the floor's session, the next sequence number it was to deliver.
    pub watermarks: Vec<(Arc<str>, u64)>,
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
    parse(&text).map(Some).ok_or_else(|| StateError::Format {
        path: path.display().to_string(),
    })
}

fn parse(text: &str) -> Option<Saved> {
    let mut lines = text.lines();
    let mut session_id = None;
    let mut next_block = None;
    for field in lines.next()?.split_whitespace() {
        match field.split_once('=')? {
            ("session", hex) => session_id = u64::from_str_radix(hex, 16).ok(),
            ("next_block", n) => next_block = n.parse().ok(),
            _ => return None,
        }
    }
    let mut watermarks = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let (seq, topic) = line.strip_prefix("seq=")?.split_once(" topic=")?;
        watermarks.push((Arc::from(topic), seq.parse().ok()?));
    }
    Some(Saved {
        floor: ReplayFloor {
            session_id: session_id?,
            next_block: next_block?,
        },
        watermarks,
    })
}

pub fn save(path: &Path, saved: &Saved) -> Result<(), StateError> {
    let error = |source| StateError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut text = format!(
        "session={:016x} next_block={}\n",
        saved.floor.session_id, saved.floor.next_block
    );
    for (topic, seq) in &saved.watermarks {
        // Topic names hold no control characters (wire-format.md §1): one line each.
        text += &format!("seq={seq} topic={topic}\n");
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&tmp, path).map_err(error)
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
            floor: ReplayFloor {
                session_id: 0x0123_4567_89ab_cdef,
                next_block: 42,
            },
            watermarks: vec![
                (Arc::from("line 3/telemetry"), 7),
                (Arc::from("plant/x"), 0),
            ],
        };
        save(&path, &saved).unwrap();
        assert_eq!(load(&path).unwrap(), Some(saved));
        // The one-line files of earlier versions still load, without marks.
        std::fs::write(&path, "session=0123456789abcdef next_block=42\n").unwrap();
        assert!(load(&path).unwrap().unwrap().watermarks.is_empty());
        std::fs::write(&path, "session=1 next_block=1\nseq=3 topic=a\n\n").unwrap();
        assert_eq!(
            load(&path).unwrap().unwrap().watermarks.len(),
            1,
            "a blank line is fine"
        );
        std::fs::write(&path, "session=zz next_block=1\n").unwrap();
        assert!(matches!(load(&path), Err(StateError::Format { .. })));
        std::fs::write(&path, "session=1 next_block=1\nseq=x topic=a\n").unwrap();
        assert!(matches!(load(&path), Err(StateError::Format { .. })));
    }
}
