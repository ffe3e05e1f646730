//! Files across the link (wire-format.md §5.6): the payload of a files topic's records, the rules
//! a path from the wire must meet before a receiver uses it, and the byte ranges a receiver holds
//! of a file version. No I/O: the sender's files source and the receiver's files sink do that.

use bytes::Bytes;
use prost::Message;

use crate::proto::{file_part, FileChunk, FileDeleted, FileManifest, FilePart, Origin};

/// `Origin.protocol` of a files topic's records (§5.4): only records that carry it are read as
/// file parts.
pub const PROTOCOL: &str = "files";

/// A path on the wire is at most this long in all (Linux's PATH_MAX) ...
pub const MAX_PATH_BYTES: usize = 4096;
/// ... and each of its names at most this long (NAME_MAX).
pub const MAX_NAME_BYTES: usize = 255;
/// The receiver keeps what it needs under this top-level name of its target directory; no file
/// from the wire may be written there.
pub const RESERVED_NAME: &str = ".diode-files";

/// The origin every record of a files topic carries.
pub fn origin() -> Origin {
    Origin {
        protocol: PROTOCOL.into(),
        ..Origin::default()
    }
}

/// Whether a record's origin says its payload is a file part.
pub fn is_file_part(origin: Option<&Origin>) -> bool {
    origin.is_some_and(|o| o.protocol == PROTOCOL)
}

/// One part of a file version, as the files source sends it.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Manifest(FileManifest),
    Chunk(FileChunk),
    Deleted(FileDeleted),
}

impl Part {
    /// The record payload.
    pub fn encode(self) -> Bytes {
        let body = match self {
            Part::Manifest(m) => file_part::Body::Manifest(m),
            Part::Chunk(c) => file_part::Body::Chunk(c),
            Part::Deleted(d) => file_part::Body::Deleted(d),
        };
        FilePart { body: Some(body) }.encode_to_vec().into()
    }

    /// The file version the part belongs to.
    pub fn file_id(&self) -> u64 {
        match self {
            Part::Manifest(m) => m.file_id,
            Part::Chunk(c) => c.file_id,
            Part::Deleted(d) => d.file_id,
        }
    }

    /// Decodes a payload; a chunk's data stays a slice of `payload`, not a copy.
    pub fn decode(payload: Bytes) -> Result<Part, PartError> {
        let part = FilePart::decode(payload).map_err(|_| PartError::Malformed)?;
        match part.body.ok_or(PartError::Empty)? {
            file_part::Body::Manifest(m) => {
                if !(m.sha256.is_empty() || m.sha256.len() == 32) {
                    return Err(PartError::Digest);
                }
                if m.path.len() > MAX_PATH_BYTES {
                    return Err(PartError::PathTooLong);
                }
                Ok(Part::Manifest(m))
            }
            file_part::Body::Chunk(c) => {
                if c.offset.checked_add(c.data.len() as u64).is_none() {
                    return Err(PartError::Range);
                }
                Ok(Part::Chunk(c))
            }
            file_part::Body::Deleted(d) => {
                if d.path.len() > MAX_PATH_BYTES {
                    return Err(PartError::PathTooLong);
                }
                Ok(Part::Deleted(d))
            }
        }
    }
}

/// Why a payload is not a file part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    #[error("not a FilePart message")]
    Malformed,
    #[error("a FilePart with no body")]
    Empty,
    #[error("a manifest's sha256 is neither empty nor 32 bytes")]
    Digest,
    #[error("a path longer than {MAX_PATH_BYTES} bytes")]
    PathTooLong,
    #[error("a chunk that ends past 2^64")]
    Range,
}

/// Why a path from the wire is refused (§5.6). Each is a way a hostile or broken sender could
/// try to write outside the target directory, or where a consumer would trip over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    #[error("the path is empty")]
    Empty,
    #[error("the path is not UTF-8")]
    NotUtf8,
    #[error("the path is absolute")]
    Absolute,
    #[error("the path has an empty, '.' or '..' name")]
    DotOrEmptyName,
    #[error("the path holds a backslash, NUL or control character")]
    Character,
    #[error("the path is longer than {MAX_PATH_BYTES} bytes")]
    TooLong,
    #[error("a name in the path is longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("a name in the path is a device name (CON, NUL, COM1, ...)")]
    DeviceName,
    #[error("the path is under the receiver's own {RESERVED_NAME}")]
    Reserved,
}

/// Checks a path from the wire and returns its names, in order. Accepted paths are relative,
/// made of UTF-8 names that are neither empty, `.` nor `..`, hold no `/`, `\`, NUL or control
/// character, and are not device names that Windows consumers of a shared mirror would open as a
/// device; so joined under a directory they name something inside it, as long as nothing on the
/// way is a symbolic link (the receiver checks that as it opens each directory).
pub fn check_path(raw: &[u8]) -> Result<Vec<&str>, PathRefused> {
    if raw.is_empty() {
        return Err(PathRefused::Empty);
    }
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathRefused::TooLong);
    }
    let text = std::str::from_utf8(raw).map_err(|_| PathRefused::NotUtf8)?;
    if text.starts_with('/') {
        return Err(PathRefused::Absolute);
    }
    let names: Vec<&str> = text.split('/').collect();
    for name in &names {
        if name.is_empty() || *name == "." || *name == ".." {
            return Err(PathRefused::DotOrEmptyName);
        }
        if name.chars().any(|c| c == '\\' || c.is_control()) {
            return Err(PathRefused::Character);
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(PathRefused::NameTooLong);
        }
        if is_device_name(name) {
            return Err(PathRefused::DeviceName);
        }
    }
    if names[0] == RESERVED_NAME {
        return Err(PathRefused::Reserved);
    }
    Ok(names)
}

/// CON, PRN, AUX, NUL, COM1-9, LPT1-9, with or without an extension, in any case.
fn is_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).trim_end();
    let upper = stem.to_ascii_uppercase();
    match upper.as_str() {
        "CON" | "PRN" | "AUX" | "NUL" => true,
        _ => {
            let bytes = upper.as_bytes();
            bytes.len() == 4
                && (upper.starts_with("COM") || upper.starts_with("LPT"))
                && (b'1'..=b'9').contains(&bytes[3])
        }
    }
}

/// The byte ranges held of a file, as sorted, disjoint, non-adjacent `[start, end)` pairs. A
/// hostile sender could scatter one-byte chunks: past `max_ranges` an insert is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

/// An insert would have split the set into more than its bound of ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a file held in more than {0} separate pieces")]
pub struct TooFragmented(pub usize);

impl RangeSet {
    pub fn from_ranges(mut ranges: Vec<(u64, u64)>) -> RangeSet {
        ranges.retain(|(s, e)| s < e);
        ranges.sort_unstable();
        let mut set = RangeSet::default();
        for (start, end) in ranges {
            match set.ranges.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => set.ranges.push((start, end)),
            }
        }
        set
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Adds `[start, end)`; returns how many of its bytes were new.
    pub fn insert(
        &mut self,
        start: u64,
        end: u64,
        max_ranges: usize,
    ) -> Result<u64, TooFragmented> {
        if start >= end {
            return Ok(0);
        }
        // The ranges that touch or overlap [start, end) are first..last.
        let first = self.ranges.partition_point(|&(_, e)| e < start);
        let last = self.ranges.partition_point(|&(s, _)| s <= end);
        if first == last {
            if self.ranges.len() >= max_ranges {
                return Err(TooFragmented(max_ranges));
            }
            self.ranges.insert(first, (start, end));
            return Ok(end - start);
        }
        let merged = (
            start.min(self.ranges[first].0),
            end.max(self.ranges[last - 1].1),
        );
        let covered: u64 = self.ranges[first..last].iter().map(|(s, e)| e - s).sum();
        let new = merged.1 - merged.0 - covered;
        self.ranges.splice(first..last, [merged]);
        Ok(new)
    }

    /// Whether `[0, size)` is held whole.
    pub fn covers(&self, size: u64) -> bool {
        size == 0
            || self
                .ranges
                .first()
                .is_some_and(|&(s, e)| s == 0 && e >= size)
    }

    /// Bytes held.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges of `[0, size)` not held, the first `most` of them.
    pub fn missing(&self, size: u64, most: usize) -> Vec<(u64, u64)> {
        let mut missing = Vec::new();
        let mut at = 0;
        for &(s, e) in &self.ranges {
            if s >= size {
                break;
            }
            if s > at {
                missing.push((at, s));
            }
            at = at.max(e);
        }
        if at < size {
            missing.push((at, size));
        }
        missing.truncate(most);
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_chunks_are_not_copied() {
        let data = Bytes::from(vec![7u8; 1000]);
        let payload = Part::Chunk(FileChunk {
            file_id: 42,
            offset: 65_536,
            data: data.clone(),
        })
        .encode();
        let Part::Chunk(chunk) = Part::decode(payload.clone()).unwrap() else {
            panic!("not a chunk");
        };
        assert_eq!(
            (chunk.file_id, chunk.offset, &chunk.data[..]),
            (42, 65_536, &data[..])
        );
        let start = payload.as_ptr() as usize;
        let at = chunk.data.as_ptr() as usize;
        assert!(
            at >= start && at < start + payload.len(),
            "the data was copied"
        );

        let manifest = FileManifest {
            file_id: 42,
            path: Bytes::from_static(b"exports/line 3/r\xc3\xa9sum\xc3\xa9.csv"),
            size: 10,
            mtime_us: 1_764_100_000_000_000,
            mode: 0o640,
            sha256: Bytes::from(vec![1u8; 32]),
            pass: 2,
            end_of_pass: true,
            found_us: 1_764_100_001_000_000,
        };
        let decoded = Part::decode(Part::Manifest(manifest.clone()).encode()).unwrap();
        assert_eq!(decoded, Part::Manifest(manifest));
    }

    #[test]
    fn broken_parts_are_errors() {
        assert_eq!(
            Part::decode(Bytes::from_static(b"\xff\xff\xff")),
            Err(PartError::Malformed)
        );
        assert_eq!(Part::decode(Bytes::new()), Err(PartError::Empty));
        let bad_digest = Part::Manifest(FileManifest {
            sha256: Bytes::from_static(b"short"),
            ..FileManifest::default()
        });
        assert_eq!(Part::decode(bad_digest.encode()), Err(PartError::Digest));
        let wraps = Part::Chunk(FileChunk {
            file_id: 1,
            offset: u64::MAX - 1,
            data: Bytes::from_static(b"abc"),
        });
        assert_eq!(Part::decode(wraps.encode()), Err(PartError::Range));
    }

    #[test]
    fn hostile_paths_are_refused() {
        let refused: &[(&[u8], PathRefused)] = &[
            (b"", PathRefused::Empty),
            (b"/etc/passwd", PathRefused::Absolute),
            (b"../outside", PathRefused::DotOrEmptyName),
            (b"a/../../outside", PathRefused::DotOrEmptyName),
            (b"a/./b", PathRefused::DotOrEmptyName),
            (b"a//b", PathRefused::DotOrEmptyName),
            (b"a/", PathRefused::DotOrEmptyName),
            (b"..", PathRefused::DotOrEmptyName),
            (b"a\\..\\b", PathRefused::Character),
            (b"a\0b", PathRefused::Character),
            (b"line\nbreak", PathRefused::Character),
            (b"\xff\xfe.csv", PathRefused::NotUtf8),
            (b"reports/CON", PathRefused::DeviceName),
            (b"nul.txt", PathRefused::DeviceName),
            (b"Com3.log", PathRefused::DeviceName),
            (b"lpt9", PathRefused::DeviceName),
            (b".diode-files/partial/1.part", PathRefused::Reserved),
        ];
        for (path, why) in refused {
            assert_eq!(
                check_path(path),
                Err(*why),
                "{:?}",
                String::from_utf8_lossy(path)
            );
        }
        let long_name = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(
            check_path(long_name.as_bytes()),
            Err(PathRefused::NameTooLong)
        );
        let long_path = "abc/".repeat(MAX_PATH_BYTES / 4) + "x";
        assert_eq!(check_path(long_path.as_bytes()), Err(PathRefused::TooLong));

        for fine in [
            "a.csv",
            "line 3/résumé 2026.csv",
            "deep/er/still/x",
            "COM10",
            "console.log",
            "a/.diode-files",
        ] {
            assert!(check_path(fine.as_bytes()).is_ok(), "{fine}");
        }
        assert_eq!(check_path(b"a/b c/d").unwrap(), vec!["a", "b c", "d"]);
    }

    #[test]
    fn range_sets_merge_and_say_what_is_missing() {
        let mut set = RangeSet::default();
        assert_eq!(set.insert(100, 200, 8).unwrap(), 100);
        assert_eq!(set.insert(300, 400, 8).unwrap(), 100);
        assert_eq!(set.insert(120, 180, 8).unwrap(), 0);
        assert_eq!(set.missing(500, 10), vec![(0, 100), (200, 300), (400, 500)]);
        assert_eq!(set.insert(150, 300, 8).unwrap(), 100);
        assert_eq!(set.ranges(), &[(100, 400)]);
        assert_eq!(set.insert(0, 100, 8).unwrap(), 100);
        assert!(set.covers(400));
        assert!(!set.covers(401));
        assert_eq!(set.len(), 400);
        assert!(RangeSet::default().covers(0));

        let mut scattered = RangeSet::default();
        for i in 0..4 {
            scattered.insert(i * 10, i * 10 + 1, 4).unwrap();
        }
        assert_eq!(scattered.insert(100, 101, 4), Err(TooFragmented(4)));
        // Filling a hole never needs a new range.
        assert_eq!(scattered.insert(1, 10, 4).unwrap(), 9);

        let rebuilt = RangeSet::from_ranges(vec![(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]);
        assert_eq!(rebuilt.ranges(), &[(0, 4), (5, 12)]);
    }
}
