//! The datagram header and its checks: wire-format.md §2.

use thiserror::Error;

use crate::auth::{LinkKey, TAG_LEN, TRAILER_LEN};

pub const MAGIC: [u8; 2] = [0xD1, 0x0D];
pub const VERSION: u8 = 1;
/// Flag bit 0: the datagram carries a key id and a tag (§2.1).
pub const FLAG_AUTHENTICATED: u8 = 0x01;
/// The block's frames are encrypted (wire-format.md §4.4); only with `FLAG_AUTHENTICATED`.
pub const FLAG_ENCRYPTED: u8 = 0x02;
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
    #[error("not authenticated, unknown key or wrong tag")]
    Auth,
    #[error("a genuine but old datagram: retired or older session, or a block long gone")]
    Replay,
    #[error(
        "from a new session that has not yet shown a heartbeat, or while the current one is alive"
    )]
    Unconfirmed,
    #[error("a block number further ahead than a sender could have reached")]
    FarAhead,
}

impl Rejected {
    pub const ALL: [Rejected; 12] = [
        Rejected::Truncated,
        Rejected::Crc,
        Rejected::Version,
        Rejected::Malformed,
        Rejected::Stale,
        Rejected::Duplicate,
        Rejected::Inconsistent,
        Rejected::Overload,
        Rejected::Auth,
        Rejected::Replay,
        Rejected::Unconfirmed,
        Rejected::FarAhead,
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
            Rejected::Auth => "auth",
            Rejected::Replay => "replay",
            Rejected::Unconfirmed => "unconfirmed",
            Rejected::FarAhead => "far_ahead",
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

    pub fn datagram_len(&self, authenticated: bool) -> usize {
        DATAGRAM_OVERHEAD + self.shard_len as usize + if authenticated { TRAILER_LEN } else { 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub authenticated: bool,
    pub encrypted: bool,
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
        out[3] = if self.authenticated {
            FLAG_AUTHENTICATED
        } else {
            0
        } | if self.encrypted { FLAG_ENCRYPTED } else { 0 };
        out[4..12].copy_from_slice(&self.session_id.to_be_bytes());
        out[12..20].copy_from_slice(&self.block.to_be_bytes());
        out[20] = self.shard_index;
        out[21] = self.geometry.data_shards;
        out[22] = self.geometry.parity_shards;
        out[23] = self.geometry.interleave_depth;
        out[24..26].copy_from_slice(&self.geometry.shard_len.to_be_bytes());
    }
}

/// Seals a datagram laid out as header, shard, [trailer space,] CRC space: fills the key id and
/// tag when `key` is given (§2.1), then the CRC (§2).
pub fn seal(datagram: &mut [u8], key: Option<&LinkKey>) {
    let body = datagram.len() - CRC_LEN;
    if let Some(key) = key {
        let tag_at = body - TAG_LEN;
        datagram[tag_at - 1] = key.id();
        let tag = key.tag(&datagram[..tag_at]);
        datagram[tag_at..body].copy_from_slice(&tag);
    }
    let crc = crc32fast::hash(&datagram[..body]);
    datagram[body..].copy_from_slice(&crc.to_be_bytes());
}

/// Checks a received datagram in the order of wire-format.md §2 and returns its header and shard.
/// With `keys`, only datagrams authenticated by one of them pass; without, only unauthenticated.
/// The id of the key that authenticated a datagram `parse` accepted with `authenticated` set
/// (§2.1: the byte before the tag).
pub fn key_id(datagram: &[u8]) -> Option<u8> {
    let tag_at = datagram.len().checked_sub(CRC_LEN + TAG_LEN)?;
    datagram.get(tag_at.checked_sub(1)?).copied()
}

pub fn parse<'a>(datagram: &'a [u8], keys: &[LinkKey]) -> Result<(Header, &'a [u8]), Rejected> {
    if datagram.len() < DATAGRAM_OVERHEAD {
        return Err(Rejected::Truncated);
    }
    let body = datagram.len() - CRC_LEN;
    let expected = u32::from_be_bytes(datagram[body..].try_into().expect("4 bytes"));
    if crc32fast::hash(&datagram[..body]) != expected {
        return Err(Rejected::Crc);
    }
    if datagram[0..2] != MAGIC
        || datagram[2] != VERSION
        || datagram[3] & !(FLAG_AUTHENTICATED | FLAG_ENCRYPTED) != 0
    {
        return Err(Rejected::Version);
    }
    let authenticated = datagram[3] & FLAG_AUTHENTICATED != 0;
    let encrypted = datagram[3] & FLAG_ENCRYPTED != 0;
    // Encryption without authentication would let anyone flip ciphertext bits undetected by the
    // CRC-protected header: the format does not have it.
    if encrypted && !authenticated {
        return Err(Rejected::Version);
    }
    // With keys only authenticated datagrams pass; without, authenticated ones cannot be checked.
    let keys_configured = !keys.is_empty();
    if authenticated != keys_configured {
        return Err(Rejected::Auth);
    }
    if authenticated {
        if datagram.len() < DATAGRAM_OVERHEAD + TRAILER_LEN {
            return Err(Rejected::Malformed);
        }
        let tag_at = body - TAG_LEN;
        let key_id = datagram[tag_at - 1];
        let verified = keys
            .iter()
            .find(|k| k.id() == key_id)
            .is_some_and(|k| k.verify(&datagram[..tag_at], &datagram[tag_at..body]));
        if !verified {
            return Err(Rejected::Auth);
        }
    }
    let be_u64 = |at: usize| u64::from_be_bytes(datagram[at..at + 8].try_into().expect("8 bytes"));
    let header = Header {
        authenticated,
        encrypted,
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
        && datagram.len() == g.datagram_len(authenticated);
    if !valid {
        return Err(Rejected::Malformed);
    }
    Ok((
        header,
        &datagram[HEADER_LEN..HEADER_LEN + g.shard_len as usize],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(shard: &[u8]) -> Vec<u8> {
        sample_with(shard, None)
    }

    fn sample_with(shard: &[u8], key: Option<&LinkKey>) -> Vec<u8> {
        let header = Header {
            authenticated: key.is_some(),
            encrypted: false,
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
        let mut dgram = vec![0u8; header.geometry.datagram_len(key.is_some())];
        header.write(&mut dgram);
        dgram[HEADER_LEN..HEADER_LEN + shard.len()].copy_from_slice(shard);
        seal(&mut dgram, key);
        dgram
    }

    #[test]
    fn round_trip() {
        let dgram = sample(b"hello");
        let (header, shard) = parse(&dgram, &[]).unwrap();
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
            assert!(parse(&bad, &[]).is_err(), "bit {bit} flipped and accepted");
        }
    }

    #[test]
    fn truncation_is_rejected() {
        let dgram = sample(b"some shard bytes");
        for len in 0..dgram.len() {
            assert!(parse(&dgram[..len], &[]).is_err());
        }
        assert_eq!(parse(&dgram[..10], &[]), Err(Rejected::Truncated));
    }

    #[test]
    fn valid_crc_with_bad_fields_is_malformed() {
        let mut dgram = sample(b"xyz");
        dgram[20] = 200; // shard index beyond k + m
        seal(&mut dgram, None);
        assert_eq!(parse(&dgram, &[]), Err(Rejected::Malformed));
        let mut dgram = sample(b"xyz");
        dgram[3] = 2; // unknown flag
        seal(&mut dgram, None);
        assert_eq!(parse(&dgram, &[]), Err(Rejected::Version));
    }

    #[test]
    fn authentication() {
        let key = LinkKey::new(&[1u8; 32]);
        let other = LinkKey::new(&[2u8; 32]);
        let dgram = sample_with(b"hello", Some(&key));
        let (header, shard) = parse(&dgram, std::slice::from_ref(&key)).unwrap();
        assert!(header.authenticated);
        assert_eq!(shard, b"hello");
        // Either of two keys, for rotation.
        assert!(parse(&dgram, &[other.clone(), key.clone()]).is_ok());
        assert_eq!(
            parse(&dgram, std::slice::from_ref(&other)),
            Err(Rejected::Auth)
        );
        // A receiver with keys refuses unauthenticated datagrams, one without keys authenticated ones.
        assert_eq!(
            parse(&sample(b"hello"), std::slice::from_ref(&key)),
            Err(Rejected::Auth)
        );
        assert_eq!(parse(&dgram, &[]), Err(Rejected::Auth));
        // Any change, with the CRC recomputed by a forger, fails the tag.
        for at in 0..dgram.len() - CRC_LEN {
            let mut forged = dgram.clone();
            forged[at] ^= 0x40;
            let body = forged.len() - CRC_LEN;
            let crc = crc32fast::hash(&forged[..body]);
            forged[body..].copy_from_slice(&crc.to_be_bytes());
            assert!(
                parse(&forged, std::slice::from_ref(&key)).is_err(),
                "byte {at} changed and accepted"
            );
        }
        assert_ne!(format!("{key:?}"), "", "Debug does not show the secret");
        assert!(!format!("{key:?}").contains("01"));
    }
}
