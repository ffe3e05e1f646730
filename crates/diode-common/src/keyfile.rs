//! Link key files: 32 random bytes as 64 hexadecimal characters, readable by their owner only
//! (wire-format.md §2.1).

use std::io::Write;
use std::path::Path;

use thiserror::Error;

pub const KEY_LEN: usize = 32;

#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by others (mode {mode:o}): run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
    #[error("{path} belongs to uid {owner}, neither this service's user (uid {user}) nor root: `chown` it")]
    Owner { path: String, owner: u32, user: u32 },
    #[error("{path} does not hold 64 hexadecimal characters (a key from `diode-send keygen`)")]
    Format { path: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the system's random source failed")]
    Random,
}

/// Reads a key file, refusing one that group or others could read or that belongs to another
/// user than this service's (or root).
pub fn load(path: &Path) -> Result<[u8; KEY_LEN], KeyFileError> {
    let text = read_secret(path)?;
    parse_hex(text.trim()).ok_or(KeyFileError::Format {
        path: path.display().to_string(),
    })
}

/// Reads a secret (a key, a password file) under the same rules as a key file, without its
/// trailing line end.
pub fn read_secret(path: &Path) -> Result<String, KeyFileError> {
    let shown = path.display().to_string();
    let read_error = |source| KeyFileError::Read {
        path: shown.clone(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let metadata = std::fs::metadata(path).map_err(read_error)?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions { path: shown, mode });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let user = unsafe { libc::geteuid() };
        if metadata.uid() != user && metadata.uid() != 0 {
            return Err(KeyFileError::Owner {
                path: shown,
                owner: metadata.uid(),
                user,
            });
        }
    }
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Writes a new random key to a file that must not exist yet, readable by its owner only.
pub fn generate(path: &Path) -> Result<[u8; KEY_LEN], KeyFileError> {
    let mut key = [0u8; KEY_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| KeyFileError::Random)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let write_error = |source| KeyFileError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut file = options.open(path).map_err(write_error)?;
    writeln!(file, "{}", crate::hex::encode(&key)).map_err(write_error)?;
    Ok(key)
}

fn parse_hex(text: &str) -> Option<[u8; KEY_LEN]> {
    crate::hex::decode(text)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link.key");
        let key = generate(&path).unwrap();
        assert_eq!(load(&path).unwrap(), key);
        assert!(
            generate(&path).is_err(),
            "an existing key is never overwritten"
        );
    }

    #[cfg(unix)]
    #[test]
    fn refuses_readable_by_others_and_bad_text() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link.key");
        std::fs::write(&path, "00".repeat(32)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load(&path).unwrap(), [0u8; 32]);
        std::fs::write(&path, "xyz").unwrap();
        assert!(matches!(load(&path), Err(KeyFileError::Format { .. })));
    }
}
