//! Link keys and datagram tags: wire-format.md §2.1.

use ring::hmac;
use subtle::ConstantTimeEq;

/// Bytes of a link key.
pub const KEY_LEN: usize = 32;
/// Bytes of the truncated HMAC-SHA256 tag.
pub const TAG_LEN: usize = 16;
/// Key id and tag, between an authenticated datagram's shard and its CRC.
pub const TRAILER_LEN: usize = 1 + TAG_LEN;

/// A link key and its id. The secret never leaves this type (not even through `Debug`).
#[derive(Clone)]
pub struct LinkKey {
    id: u8,
    key: hmac::Key,
}

impl LinkKey {
    pub fn new(secret: &[u8; KEY_LEN]) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let id = hmac::sign(&key, b"diode link key id").as_ref()[0];
        LinkKey { id, key }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    pub(crate) fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&hmac::sign(&self.key, data).as_ref()[..TAG_LEN]);
        tag
    }

    pub(crate) fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        self.tag(data).ct_eq(tag).into()
    }
}

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LinkKey {{ id: {} }}", self.id)
    }
}
