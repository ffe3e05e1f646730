//! One record as the services keep it on disk (the receiver's disk buffer, the sender's
//! journal): `[length u32][CRC-32 u32][RecordBatch of one record]`, big-endian, the CRC over the
//! message. The same message as on the link (wire-format.md §5.1), with the fields the link
//! leaves empty: the record's session (field 7) and its late mark (field 8). No I/O here: the
//! callers read and write, and check lengths against what their file can hold.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::frames::{self, proto};
use crate::reassembler::Record;

/// The length and CRC in front of every stored record.
pub const HEADER_BYTES: usize = 8;

/// Appends `record`, header first.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    let batch = proto::RecordBatch {
        topic: record.topic.to_string(),
        first_seq: record.seq,
        first_time_us: record.time_us,
        time_deltas_us: vec![0],
        payloads: vec![record.payload.clone()],
        origins: record.origin.iter().cloned().collect(),
        session_id: record.session_id,
        replayed: record.late,
    };
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_BYTES]);
    batch.encode(out).expect("a Vec grows");
    let body = &out[start + HEADER_BYTES..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// The body length and CRC a header announces.
pub fn header(bytes: [u8; HEADER_BYTES]) -> (usize, u32) {
    let len = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_be_bytes(bytes[4..].try_into().expect("4 bytes"));
    (len, crc)
}

/// The record in `body`, if it matches its CRC and holds exactly one record.
pub fn decode(body: &[u8], crc: u32) -> Option<Record> {
    if crc32fast::hash(body) != crc {
        return None;
    }
    let batch = proto::RecordBatch::decode(body).ok()?;
    let payload: Bytes = batch.payloads.into_iter().next()?;
    Some(Record {
        topic: Arc::from(batch.topic.as_str()),
        seq: batch.first_seq,
        // 0 in what an earlier version kept: not known.
        session_id: batch.session_id,
        time_us: batch.first_time_us,
        origin: batch
            .origins
            .into_iter()
            .next()
            .filter(frames::origin_is_present),
        late: batch.replayed,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let record = Record {
            topic: Arc::from("line3/x"),
            seq: 9,
            session_id: 77,
            time_us: -4,
            origin: None,
            late: true,
            payload: Bytes::from_static(b"abc"),
        };
        let mut out = Vec::new();
        encode(&record, &mut out);
        let (len, crc) = header(out[..HEADER_BYTES].try_into().unwrap());
        assert_eq!(len, out.len() - HEADER_BYTES);
        assert_eq!(decode(&out[HEADER_BYTES..], crc), Some(record));
        out[HEADER_BYTES + 2] ^= 1;
        assert_eq!(decode(&out[HEADER_BYTES..], crc), None);
    }
}
