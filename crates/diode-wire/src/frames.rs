//! Frames (wire-format.md §5) and the exact sizes the encoder needs to fill blocks without
//! serialising twice.

use prost::encoding::encoded_len_varint as varint_len;

/// Types generated from `proto/diode.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/diode.v1.rs"));
}

/// Topic names: 1 to 255 bytes of UTF-8 without MQTT wildcards or control characters
/// (wire-format.md §1): every sink can name a record by its topic (a NUL or a line end in a
/// topic broke MQTT brokers and log lines).
pub const MAX_TOPIC_LEN: usize = 255;

pub fn is_valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_LEN
        && !name.chars().any(|c| c == '+' || c == '#' || c.is_control())
}

/// Whether an origin says anything (wire-format.md §5.4): an element with neither a topic nor a
/// protocol stands for "none".
pub fn origin_is_present(origin: &proto::Origin) -> bool {
    !origin.topic.is_empty() || !origin.protocol.is_empty()
}

/// A proto3 scalar field: omitted when zero.
pub(crate) fn scalar_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + varint_len(value)
    }
}

/// A proto3 bool field: omitted when false.
pub(crate) fn bool_len(value: bool) -> usize {
    if value {
        2
    } else {
        0
    }
}

/// A proto3 string or bytes field: omitted when empty.
pub(crate) fn bytes_field_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + varint_len(len as u64) + len
    }
}

/// One element of a repeated bytes field: always present, even when empty.
pub(crate) fn repeated_bytes_elem_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// A packed repeated scalar field whose elements take `packed_len` bytes.
pub(crate) fn packed_len(packed_len: usize) -> usize {
    if packed_len == 0 {
        0
    } else {
        1 + varint_len(packed_len as u64) + packed_len
    }
}

pub(crate) fn zigzag_len(value: i64) -> usize {
    varint_len(((value << 1) ^ (value >> 63)) as u64)
}

/// Bytes a frame whose oneof body message is `body_len` bytes takes in block content: the length
/// prefix, the oneof tag and length, the body (wire-format.md §4.1).
pub(crate) fn frame_stream_len(body_len: usize) -> usize {
    let frame_len = 1 + varint_len(body_len as u64) + body_len;
    varint_len(frame_len as u64) + frame_len
}

/// Bytes an `Origin` takes as an element of a repeated field or as a present message field.
pub(crate) fn origin_field_len(origin: &proto::Origin) -> usize {
    use prost::Message;
    let len = origin.encoded_len();
    1 + varint_len(len as u64) + len
}

/// Everything a `RecordFragment` carries besides its data, as the sizes that decide its length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FragmentHead {
    /// 0, or what `origin_field_len` gives (only a record's first fragment has an origin).
    pub origin_len: usize,
    pub topic_len: usize,
    pub seq: u64,
    pub time_us: i64,
    pub total_len: usize,
    pub offset: usize,
    pub replayed: bool,
}

impl FragmentHead {
    /// Size of the fragment's body with `data_len` bytes of data.
    pub(crate) fn body_len(&self, data_len: usize) -> usize {
        bytes_field_len(self.topic_len)
            + scalar_len(self.seq)
            + scalar_len(self.time_us as u64)
            + scalar_len(self.total_len as u64)
            + scalar_len(self.offset as u64)
            + bytes_field_len(data_len)
            + self.origin_len
            + bool_len(self.replayed)
    }

    /// The largest data, at most `remaining`, whose frame fits in `room` bytes (0 if none).
    pub(crate) fn max_data(&self, room: usize, remaining: usize) -> usize {
        let fits = |data: usize| frame_stream_len(self.body_len(data)) <= room;
        // Upper bound of the framing around the data: tag, two lengths prefixes and the oneof tag.
        let mut data = room
            .saturating_sub(self.body_len(0) + 1 + 3 * 5)
            .min(remaining);
        while data > 0 {
            if fits(data) {
                // Grow back what the conservative bound took, one byte at a time (at most ~15).
                while data < remaining && fits(data + 1) {
                    data += 1;
                }
                return data;
            }
            data -= 1;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::proto::*;
    use super::*;
    use prost::Message;

    #[test]
    fn fragment_sizes_match_prost() {
        for (seq, time, total, offset, len) in [
            (0u64, 0i64, 10usize, 0usize, 10usize),
            (1 << 40, -5, 1 << 20, 70_000, 1400),
            (300, 1_700_000_000_000_000, 5, 0, 0),
        ] {
            let frame = Frame {
                body: Some(frame::Body::Fragment(RecordFragment {
                    topic: "line3/plc7".into(),
                    seq,
                    time_us: time,
                    total_len: total as u64,
                    offset: offset as u64,
                    data: vec![1u8; len].into(),
                    origin: None,
                    replayed: seq == 300,
                })),
            };
            let head = FragmentHead {
                origin_len: 0,
                topic_len: 10,
                seq,
                time_us: time,
                total_len: total,
                offset,
                replayed: seq == 300,
            };
            let body = head.body_len(len);
            assert_eq!(
                frame_stream_len(body),
                frame.encode_length_delimited_to_vec().len()
            );
            let origin = Origin {
                topic: "plant/line3/plc7/speed".into(),
                qos: 1,
                retain: true,
                protocol: "mqtt".into(),
            };
            let mut with_origin = frame.clone();
            if let Some(frame::Body::Fragment(f)) = with_origin.body.as_mut() {
                f.origin = Some(origin.clone());
            }
            let body = FragmentHead {
                origin_len: origin_field_len(&origin),
                ..head
            }
            .body_len(len);
            assert_eq!(
                frame_stream_len(body),
                with_origin.encode_length_delimited_to_vec().len()
            );
        }
    }

    #[test]
    fn max_fragment_fills_exactly() {
        let head = FragmentHead {
            origin_len: 0,
            topic_len: 12,
            seq: 99,
            time_us: 1,
            total_len: 1 << 20,
            offset: 5000,
            replayed: false,
        };
        for room in 20..3000 {
            let data = head.max_data(room, usize::MAX);
            if data > 0 {
                let used = frame_stream_len(head.body_len(data));
                assert!(used <= room);
                let more = frame_stream_len(head.body_len(data + 1));
                assert!(more > room, "room {room}: {data} could grow");
            }
        }
    }
}
