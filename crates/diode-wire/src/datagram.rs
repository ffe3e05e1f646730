//! The datagram header and its checks: wire-format.md §2.

use thiserror::Error;

pub const MAGIC: [u8; 2] = [0xD1, 0x0D];
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 26;
pub const CRC_LEN: usize = 4;
/// Header plus CRC: what a datagram costs on top of its shard.
pub const DATAGRAM_OVERHEAD: usize = HEADER_LEN + CRC_LEN;
/// IPv4 and UDP headers: counted in wire bytes (wire-format.md §1).
pub const IP_UDP_OVERHEAD: usize = 28;
/// GF(2^8) Reed-Solomon codes at most 256 shards; one value is kept back so k + m fits a byte.
pub const MAX_TOTAL_SHARDS: usize = 255;

/// Why a datagram was dropped. Each variant is one value of the `reason` label of
/// `diode_datagrams_rejected_total`.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejected {
    #[error("shorter than a header and CRC")]
    Truncated,
    #[error("CRC mismatch")]
    Crc,
    #[error("unknown magic, version or flags")]
    Version,
    #[error("header fields out of range")]
    Malformed,
    #[error("from a retired session or a block long gone")]
    Stale,
    #[error("shard already held")]
    Duplicate,
    #[error("geometry differs from the block's first shard")]
    Inconsistent,
    #[error("pending-block memory cap reached")]
    Overload,
}

impl Rejected {
    pub const ALL: [Rejected; 8] = [
        Rejected::Truncated,
        Rejected::Crc,
        Rejected::Version,
        Rejected::Malformed,
        Rejected::Stale,
        Rejected::Duplicate,
        Rejected::Inconsistent,
        Rejected::Overload,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Truncated => "truncated",
            Rejected::Crc => "crc",
            Rejected::Version => "version",
            Rejected::Malformed => "malformed",
            Rejected::Stale => "stale",
            Rejected::Duplicate => "duplicate",
            Rejected::Inconsistent => "inconsistent",
            Rejected::Overload => "overload",
        }
    }
}

/// Geometry of one block as announced by each of its datagrams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGeometry {
    pub data_shards: u8,
    pub parity_shards: u8,
    pub interleave_depth: u8,
    pub shard_len: u16,
}

impl BlockGeometry {
    pub fn total_shards(&self) -> usize {
        self.data_shards as usize + self.parity_shards as usize
    }

    pub fn datagram_len(&self) -> usize {
        DATAGRAM_OVERHEAD + self.shard_len as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub session_id: u64,
    pub block: u64,
    pub shard_index: u8,
    pub geometry: BlockGeometry,
}

impl Header {
    /// Writes the 26-byte header into `out[..HEADER_LEN]`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = 0;
        out[4..12].copy_from_slice(&self.session_id.to_be_bytes());
        out[12..20].copy_from_slice(&self.block.to_be_bytes());
        out[20] = self.shard_index;
        out[21] = self.geometry.data_shards;
        out[22] = self.geometry.parity_shards;
        out[23] = self.geometry.interleave_depth;
        out[24..26].copy_from_slice(&self.geometry.shard_len.to_be_bytes());
    }
}

/// Seals a datagram laid out as header, shard, CRC space: fills the CRC (§2).
pub fn seal(datagram: &mut [u8]) {
    let body = datagram.len() - CRC_LEN;
    let crc = crc32fast::hash(&datagram[..body]);
    datagram[body..].copy_from_slice(&crc.to_be_bytes());
}

/// Checks a received datagram in the order of wire-format.md §2 and returns its header and shard.
pub fn parse(datagram: &[u8]) -> Result<(Header, &[u8]), Rejected> {
    if datagram.len() < DATAGRAM_OVERHEAD {
        return Err(Rejected::Truncated);
    }
    let body = datagram.len() - CRC_LEN;
    let expected = u32::from_be_bytes(datagram[body..].try_into().expect("4 bytes"));
    if crc32fast::hash(&datagram[..body]) != expected {
        return Err(Rejected::Crc);
    }
    if datagram[0..2] != MAGIC || datagram[2] != VERSION || datagram[3] != 0 {
        return Err(Rejected::Version);
    }
    let be_u64 = |at: usize| u64::from_be_bytes(datagram[at..at + 8].try_into().expect("8 bytes"));
    let header = Header {
        session_id: be_u64(4),
        block: be_u64(12),
        shard_index: datagram[20],
        geometry: BlockGeometry {
            data_shards: datagram[21],
            parity_shards: datagram[22],
            interleave_depth: datagram[23],
            shard_len: u16::from_be_bytes([datagram[24], datagram[25]]),
        },
    };
    let g = header.geometry;
    let valid = header.session_id != 0
        && g.data_shards >= 1
        && g.interleave_depth >= 1
        && g.shard_len >= 1
        && g.total_shards() <= MAX_TOTAL_SHARDS
        && (header.shard_index as usize) < g.total_shards()
        && datagram.len() == g.datagram_len();
    if !valid {
        return Err(Rejected::Malformed);
    }
    Ok((header, &datagram[HEADER_LEN..body]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(shard: &[u8]) -> Vec<u8> {
        let header = Header {
            session_id: 7,
            block: 42,
            shard_index: 3,
            geometry: BlockGeometry {
                data_shards: 4,
                parity_shards: 2,
                interleave_depth: 4,
                shard_len: shard.len() as u16,
            },
        };
        let mut dgram = vec![0u8; DATAGRAM_OVERHEAD + shard.len()];
        header.write(&mut dgram);
        dgram[HEADER_LEN..HEADER_LEN + shard.len()].copy_from_slice(shard);
        seal(&mut dgram);
        dgram
    }

    #[test]
    fn round_trip() {
        let dgram = sample(b"hello");
        let (header, shard) = parse(&dgram).unwrap();
        assert_eq!(header.block, 42);
        assert_eq!(header.shard_index, 3);
        assert_eq!(shard, b"hello");
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let dgram = sample(b"some shard bytes");
        for bit in 0..dgram.len() * 8 {
            let mut bad = dgram.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(parse(&bad).is_err(), "bit {bit} flipped and accepted");
        }
    }

    #[test]
    fn truncation_is_rejected() {
        let dgram = sample(b"some shard bytes");
        for len in 0..dgram.len() {
            assert!(parse(&dgram[..len]).is_err());
        }
        assert_eq!(parse(&dgram[..10]), Err(Rejected::Truncated));
    }

    #[test]
    fn valid_crc_with_bad_fields_is_malformed() {
        let mut dgram = sample(b"xyz");
        dgram[20] = 200; // shard index beyond k + m
        seal(&mut dgram);
        assert_eq!(parse(&dgram), Err(Rejected::Malformed));
        let mut dgram = sample(b"xyz");
        dgram[3] = 1; // unknown flag
        seal(&mut dgram);
        assert_eq!(parse(&dgram), Err(Rejected::Version));
    }
}
