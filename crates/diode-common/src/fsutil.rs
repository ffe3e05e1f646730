//! Small file operations both services need: state files replaced whole, and file digests.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Writes `path` through a temporary name beside it and a rename, so a crash leaves the old
/// content or the new, never a mix. With `sync`, the content and then the rename reach the disk
/// before it returns.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    if sync {
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if sync {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
    }
    Ok(())
}

/// Reads at `offset` until `buf` is full or the file ends; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut read = 0;
    while read < buf.len() {
        match file.read_at(&mut buf[read..], offset + read as u64)? {
            0 => break,
            n => read += n,
        }
    }
    Ok(read)
}

/// The SHA-256 of bytes `[0, size)` of `file`, going on from `prefix`: a context that has
/// hashed bytes `[0, at)` already (or none, to start from the beginning).
pub fn sha256_of(
    file: &File,
    size: u64,
    prefix: Option<(u64, ring::digest::Context)>,
) -> io::Result<ring::digest::Digest> {
    let (mut at, mut context) = match prefix {
        Some((at, context)) if at <= size => (at, context),
        _ => (0, ring::digest::Context::new(&ring::digest::SHA256)),
    };
    let mut buf = vec![0u8; 1 << 20];
    while at < size {
        let want = ((size - at) as usize).min(buf.len());
        let read = read_full_at(file, &mut buf[..want], at)?;
        if read < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file is shorter than its size",
            ));
        }
        context.update(&buf[..read]);
        at += read as u64;
    }
    Ok(context.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_go_on_from_a_prefix_and_files_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        replace_file(&path, &content, 0o600, true).unwrap();
        let file = File::open(&path).unwrap();
        let whole = ring::digest::digest(&ring::digest::SHA256, &content);
        assert_eq!(
            sha256_of(&file, 3_000_000, None).unwrap().as_ref(),
            whole.as_ref()
        );
        let mut prefix = ring::digest::Context::new(&ring::digest::SHA256);
        prefix.update(&content[..1000]);
        let resumed = sha256_of(&file, 3_000_000, Some((1000, prefix))).unwrap();
        assert_eq!(resumed.as_ref(), whole.as_ref());
        assert!(sha256_of(&file, 3_000_001, None).is_err());
        replace_file(&path, b"new", 0o600, false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!path.with_extension("tmp").exists());
    }
}
