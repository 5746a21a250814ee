//! The master key: wraps every record of the keyring. Read from a file (mode 0600) or an
//! environment variable, never stored in the lake.

use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};

/// Length of the master key in bytes (AES-256).
pub const MASTER_KEY_LEN: usize = 32;

/// Why the master key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    /// The file is missing or unreadable.
    #[error("cannot read master key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error(
        "master key file {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: String,
        /// Its mode bits.
        mode: u32,
    },
    /// The content is not 64 hex digits.
    #[error("master key from {source_name} is not 64 hexadecimal digits (32 bytes)")]
    Format {
        /// File path or variable name.
        source_name: String,
    },
    /// The file could not be written.
    #[error("cannot write master key file {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The operating system's random source failed.
    #[error("the system random source failed")]
    Random,
}

/// A 256-bit master key.
#[derive(Clone)]
pub struct MasterKey([u8; MASTER_KEY_LEN]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, MasterKeyError> {
        let mut key = [0u8; MASTER_KEY_LEN];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| MasterKeyError::Random)?;
        Ok(MasterKey(key))
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str, source_name: &str) -> Result<Self, MasterKeyError> {
        let format = || MasterKeyError::Format {
            source_name: source_name.to_string(),
        };
        let bytes = hex::decode(text.trim()).map_err(|_| format())?;
        let key: [u8; MASTER_KEY_LEN] = bytes.try_into().map_err(|_| format())?;
        Ok(MasterKey(key))
    }

    /// Reads a key file, refusing one that group or others can read.
    pub fn from_file(path: &Path) -> Result<Self, MasterKeyError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| MasterKeyError::Read {
            path: shown.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(MasterKeyError::Permissions { path: shown, mode });
            }
        }
        #[cfg(not(unix))]
        let _ = meta;
        let text = std::fs::read_to_string(path).map_err(|source| MasterKeyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_hex(&text, &shown)
    }

    /// Writes the key as hex to a new file with mode 0600 (fails if the file exists).
    pub fn write_new_file(&self, path: &Path) -> Result<(), MasterKeyError> {
        use std::io::Write;
        let err = |source| MasterKeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(err)?;
        file.write_all(format!("{}\n", self.to_hex()).as_bytes())
            .map_err(err)?;
        file.sync_all().map_err(err)?;
        Ok(())
    }

    /// The key as 64 hex digits (for an operator moving it into a secret store).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn bytes(&self) -> &[u8; MASTER_KEY_LEN] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_must_be_private_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let key = MasterKey::generate().unwrap();
        key.write_new_file(&path).unwrap();
        assert_eq!(MasterKey::from_file(&path).unwrap().to_hex(), key.to_hex());
        assert!(key.write_new_file(&path).is_err(), "never overwrites a key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = MasterKey::from_file(&path).unwrap_err().to_string();
            assert!(err.contains("chmod 600"), "{err}");
        }
        let err = MasterKey::from_hex("abc", "HISTORIAN_MASTER_KEY").unwrap_err();
        assert!(err.to_string().contains("HISTORIAN_MASTER_KEY"));
    }
}
