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

/// Bytes of the AES-256-GCM tag that ends an encrypted block's frames (wire-format.md §4.4).
pub const SEAL_TAG_LEN: usize = 16;

/// A session's block cipher: AES-256-GCM under a key derived from the link key and the session
/// id, so that block numbers, the nonces, never repeat under one key however often the sender
/// restarts (wire-format.md §4.4).
pub struct BlockCipher {
    key: ring::aead::LessSafeKey,
}

impl LinkKey {
    pub fn block_cipher(&self, session_id: u64) -> BlockCipher {
        let mut message = Vec::with_capacity(32);
        message.extend_from_slice(b"diode block encryption v1");
        message.extend_from_slice(&session_id.to_be_bytes());
        let derived = hmac::sign(&self.key, &message);
        let key = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, derived.as_ref())
            .expect("32 bytes is an AES-256 key");
        BlockCipher {
            key: ring::aead::LessSafeKey::new(key),
        }
    }
}

impl BlockCipher {
    fn nonce_and_aad(
        session_id: u64,
        block: u64,
        frames_len: u32,
    ) -> (ring::aead::Nonce, [u8; 20]) {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&block.to_be_bytes());
        let mut aad = [0u8; 20];
        aad[..8].copy_from_slice(&session_id.to_be_bytes());
        aad[8..16].copy_from_slice(&block.to_be_bytes());
        aad[16..].copy_from_slice(&frames_len.to_be_bytes());
        (ring::aead::Nonce::assume_unique_for_key(nonce), aad)
    }

    /// Encrypts `frames` in place and returns the tag to append.
    pub fn seal(&self, session_id: u64, block: u64, frames: &mut [u8]) -> [u8; SEAL_TAG_LEN] {
        let (nonce, aad) = Self::nonce_and_aad(session_id, block, frames.len() as u32);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(aad), frames)
            .expect("a block is far below AES-GCM's length limit");
        let mut out = [0u8; SEAL_TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Decrypts `frames_and_tag` (ciphertext then tag) in place; the plaintext is its first
    /// `len - 16` bytes. False if the tag does not verify.
    pub fn open(&self, session_id: u64, block: u64, frames_and_tag: &mut [u8]) -> bool {
        let Some(frames_len) = frames_and_tag.len().checked_sub(SEAL_TAG_LEN) else {
            return false;
        };
        let (nonce, aad) = Self::nonce_and_aad(session_id, block, frames_len as u32);
        self.key
            .open_in_place(nonce, ring::aead::Aad::from(aad), frames_and_tag)
            .is_ok()
    }
}
