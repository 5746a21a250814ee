//! The cell cipher: one personal value, encrypted with AES-256-GCM under the data key of its
//! subject and key period.
//!
//! A cell is `[version 1][key id u64 LE][nonce 12][ciphertext][tag 16]`. The nonce is random
//! (96 bits); the associated data binds scope (database and table), column, series and
//! timestamp, so a cell copied to another row, column or table fails to decrypt.

use ring::aead::{Aad, LessSafeKey, NONCE_LEN, Nonce};

use crate::keyring::Entry;

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + NONCE_LEN;
const TAG_LEN: usize = 16;

/// Why a cell did not decrypt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    /// Not a cell of this format.
    #[error("malformed cell")]
    Malformed,
    /// Its key was destroyed (erasure or personal TTL) or never existed here.
    #[error("key destroyed")]
    KeyGone,
    /// The authentication tag did not match: the cell was altered or moved.
    #[error("cell failed its integrity check")]
    Tampered,
}

/// The key id a cell was encrypted under.
pub fn key_id_of(cell: &[u8]) -> Option<u64> {
    if cell.len() < HEADER_LEN + TAG_LEN || cell[0] != VERSION {
        return None;
    }
    Some(u64::from_le_bytes(cell[1..9].try_into().ok()?))
}

/// Writes the associated data of a cell into `out` (cleared first).
///
/// `series` are the row's series-key tags as (name, value), sorted by name, without subject
/// values (their pseudonyms stand in). Every part is length-prefixed, so no two different
/// inputs encode alike.
pub fn associated_data<'a>(
    out: &mut Vec<u8>,
    scope: &str,
    column: &str,
    series: impl IntoIterator<Item = (&'a str, &'a str)>,
    time_ns: i64,
) {
    out.clear();
    let mut part = |bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    part(scope.as_bytes());
    part(column.as_bytes());
    for (name, value) in series {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    out.extend_from_slice(&time_ns.to_le_bytes());
}

/// Encrypts `plaintext` under the entry's data key with a fresh random nonce.
pub fn encrypt_cell(entry: &Entry, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
    let mut cell = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    cell.push(VERSION);
    cell.extend_from_slice(&entry.key_id.to_le_bytes());
    cell.extend_from_slice(&nonce);
    cell.extend_from_slice(plaintext);
    let mut body = cell.split_off(HEADER_LEN);
    seal(entry.cipher(), nonce, aad, &mut body);
    cell.extend_from_slice(&body);
    cell
}

fn seal(key: &LessSafeKey, nonce: [u8; NONCE_LEN], aad: &[u8], body: &mut Vec<u8>) {
    // Sealing only fails for inputs beyond GCM's 64 GiB limit, far above any cell.
    if key
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
        .is_err()
    {
        body.clear();
    }
}

/// Decrypts a cell, finding its key through `key_for` (None: destroyed or unknown).
pub fn decrypt_cell<'k>(
    cell: &[u8],
    aad: &[u8],
    key_for: impl FnOnce(u64) -> Option<&'k Entry>,
) -> Result<Vec<u8>, CellError> {
    let key_id = key_id_of(cell).ok_or(CellError::Malformed)?;
    let entry = key_for(key_id).ok_or(CellError::KeyGone)?;
    let nonce: [u8; NONCE_LEN] = cell[9..HEADER_LEN]
        .try_into()
        .map_err(|_| CellError::Malformed)?;
    let mut body = cell[HEADER_LEN..].to_vec();
    let plain_len = entry
        .cipher()
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .map_err(|_| CellError::Tampered)?
        .len();
    body.truncate(plain_len);
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::Entry;

    fn aad(column: &str, time: i64) -> Vec<u8> {
        let mut out = Vec::new();
        associated_data(&mut out, "db/mes", column, [("line", "L1")], time);
        out
    }

    #[test]
    fn cells_round_trip_and_bind_their_place() {
        let entry = Entry::for_test(7);
        let other = Entry::for_test(8);
        let a = aad("operator_name", 10);
        let cell = encrypt_cell(&entry, &a, "Jürgen Müller".as_bytes());
        assert_eq!(key_id_of(&cell), Some(7));
        assert!(
            !cell.windows(6).any(|w| w == b"rgen M"),
            "no plaintext in the cell"
        );
        let found = |id: u64| (id == 7).then_some(&entry);
        assert_eq!(
            decrypt_cell(&cell, &a, found).unwrap(),
            "Jürgen Müller".as_bytes()
        );
        // Another row, column, or a key that is gone.
        assert_eq!(
            decrypt_cell(&cell, &aad("operator_name", 11), found),
            Err(CellError::Tampered)
        );
        assert_eq!(
            decrypt_cell(&cell, &aad("badge_id", 10), found),
            Err(CellError::Tampered)
        );
        assert_eq!(
            decrypt_cell(&cell, &a, |_| Some(&other)),
            Err(CellError::Tampered)
        );
        assert_eq!(decrypt_cell(&cell, &a, |_| None), Err(CellError::KeyGone));
        assert_eq!(decrypt_cell(b"short", &a, found), Err(CellError::Malformed));
        // Same value twice: different nonces, different cells.
        assert_ne!(cell, encrypt_cell(&entry, &a, "Jürgen Müller".as_bytes()));
    }

    #[test]
    fn associated_data_is_unambiguous() {
        let mut x = Vec::new();
        let mut y = Vec::new();
        associated_data(&mut x, "db/t", "c", [("a", "b,c=d")], 1);
        associated_data(&mut y, "db/t", "c", [("a", "b"), ("c", "d")], 1);
        assert_ne!(x, y);
    }
}
