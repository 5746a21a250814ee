//! Personal data protection for Historian: the keyring (pseudonyms and per-subject data keys,
//! wrapped under a master key), the AES-256-GCM cell cipher, and crypto-shredding.
//!
//! Nothing here knows about tables, Arrow or HTTP: callers name a scope (a table), a subject
//! value and a key period, and get back a pseudonym and a data key; cells are bytes in,
//! bytes out. The only I/O is the keyring's own files.

pub mod cell;
pub mod keyring;
pub mod master;

pub use cell::{
    CURRENT_VERSION, CellError, Plaintext, associated_data, decrypt_cell, encrypt_cell,
    encrypt_values, encrypt_values_into, key_id_of, version_of,
};
pub use keyring::{
    DESTROYED_FILE, DestroyReason, Entry, KEYRING_FILE, KeyView, Keyring, KeyringError,
    KeyringStatus, SubjectHash,
};
pub use master::{MasterKey, MasterKeyError};
