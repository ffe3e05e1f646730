//! What the receiver keeps across its own restarts (`link.state_file`): the replay floor of an
//! authenticated link (wire-format.md §6.1). One line of text, written to a temporary file,
//! synced and renamed over the old one, so a crash leaves either the old floor or the new one.

use std::io::Write;
use std::path::Path;

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
    #[error("{path} is not a receiver state file (expected `session=<hex> next_block=<n>`)")]
    Format { path: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The floor kept in `path`; `None` if there is no file yet (a first start).
pub fn load(path: &Path) -> Result<Option<ReplayFloor>, StateError> {
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

fn parse(text: &str) -> Option<ReplayFloor> {
    let mut session_id = None;
    let mut next_block = None;
    for field in text.split_whitespace() {
        match field.split_once('=')? {
            ("session", hex) => session_id = u64::from_str_radix(hex, 16).ok(),
            ("next_block", n) => next_block = n.parse().ok(),
            _ => return None,
        }
    }
    Some(ReplayFloor {
        session_id: session_id?,
        next_block: next_block?,
    })
}

pub fn save(path: &Path, floor: ReplayFloor) -> Result<(), StateError> {
    let error = |source| StateError::Write {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(error)?;
    writeln!(
        file,
        "session={:016x} next_block={}",
        floor.session_id, floor.next_block
    )
    .map_err(error)?;
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
        let floor = ReplayFloor {
            session_id: 0x0123_4567_89ab_cdef,
            next_block: 42,
        };
        save(&path, floor).unwrap();
        assert_eq!(load(&path).unwrap(), Some(floor));
        std::fs::write(&path, "session=zz next_block=1\n").unwrap();
        assert!(matches!(load(&path), Err(StateError::Format { .. })));
    }
}
