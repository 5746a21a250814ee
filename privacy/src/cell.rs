//! The cell cipher: one personal value, encrypted with AES-256-GCM under the data key of its
//! subject and key period.
//!
//! A cell is `[version 1][key id u64 LE][nonce 12][ciphertext][tag 16]`. The nonce is random
//! (96 bits); the associated data binds scope (database and table), column, series and
//! timestamp, so a cell copied to another row, column or table fails to decrypt.

use ring::aead::{Aad, NONCE_LEN, Nonce};

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
    let mut cell = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    seal_into(&mut cell, entry, aad, |buf| {
        buf.extend_from_slice(plaintext)
    });
    cell
}

/// Encrypts named values (a subject value and that person's personal values) as one cell:
/// one AES-GCM operation per subject and row instead of one per column.
pub fn encrypt_values<'v>(
    entry: &Entry,
    aad: &[u8],
    values: impl IntoIterator<Item = (&'v str, &'v str)>,
) -> Vec<u8> {
    let mut cell = Vec::new();
    encrypt_values_into(&mut cell, entry, aad, values);
    cell
}

/// Like [`encrypt_values`], appending the cell to `out`; returns where it lies there.
pub fn encrypt_values_into<'v>(
    out: &mut Vec<u8>,
    entry: &Entry,
    aad: &[u8],
    values: impl IntoIterator<Item = (&'v str, &'v str)>,
) -> std::ops::Range<usize> {
    seal_into(out, entry, aad, |buf| {
        for (name, value) in values {
            let name = &name.as_bytes()[..name.len().min(255)];
            buf.push(name.len() as u8);
            buf.extend_from_slice(name);
            buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
            buf.extend_from_slice(value.as_bytes());
        }
    })
}

/// Appends a cell to `out`: header, the plaintext `fill` writes, sealed in place, tag.
/// Returns where the cell lies in `out`.
fn seal_into(
    out: &mut Vec<u8>,
    entry: &Entry,
    aad: &[u8],
    fill: impl FnOnce(&mut Vec<u8>),
) -> std::ops::Range<usize> {
    let start = out.len();
    let mut nonce = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
    out.push(VERSION);
    out.extend_from_slice(&entry.key_id.to_le_bytes());
    out.extend_from_slice(&nonce);
    fill(out);
    // Sealing fails only past GCM's 64 GiB limit, far above any cell.
    let tag = entry
        .cipher()
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[start + HEADER_LEN..],
        )
        .expect("a cell is far below the AES-GCM size limit");
    out.extend_from_slice(tag.as_ref());
    start..out.len()
}

/// The value named `name` in the plaintext of a cell made by [`encrypt_values`].
pub fn value_of<'p>(plaintext: &'p [u8], name: &str) -> Option<&'p str> {
    let mut at = 0;
    while at < plaintext.len() {
        let name_len = *plaintext.get(at)? as usize;
        let key = plaintext.get(at + 1..at + 1 + name_len)?;
        at += 1 + name_len;
        let len = u32::from_le_bytes(plaintext.get(at..at + 4)?.try_into().ok()?) as usize;
        let value = plaintext.get(at + 4..at + 4 + len)?;
        at += 4 + len;
        if key == name.as_bytes() {
            return std::str::from_utf8(value).ok();
        }
    }
    None
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
    fn named_values_share_one_cell() {
        let entry = Entry::for_test(3);
        let a = aad("operator_id__enc", 5);
        let cell = encrypt_values(
            &entry,
            &a,
            [("operator_id", "E7"), ("operator_name", "Zoë")],
        );
        let plain = decrypt_cell(&cell, &a, |_| Some(&entry)).unwrap();
        assert_eq!(value_of(&plain, "operator_id"), Some("E7"));
        assert_eq!(value_of(&plain, "operator_name"), Some("Zoë"));
        assert_eq!(value_of(&plain, "badge_id"), None);
        assert_eq!(
            value_of(&plain[..plain.len() - 1], "operator_name"),
            None,
            "truncated"
        );
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

#[cfg(test)]
mod timing {
    use super::*;
    use crate::keyring::Entry;

    #[test]
    #[ignore = "timing, run with --release --ignored --nocapture"]
    fn seal_cost() {
        let entry = Entry::for_test(7);
        let mut aad = Vec::new();
        associated_data(
            &mut aad,
            "bench/mes_event",
            "operator_name",
            [
                ("event", "quality_check"),
                ("line", "line_3"),
                ("machine", "m_3_4"),
                ("operator_id", "ps-0123456789abcdef0123"),
                ("plant", "plant_1"),
            ],
            1_795_759_699_850_412_542,
        );
        let n = 1_000_000;
        let t = std::time::Instant::now();
        let mut total = 0;
        for _ in 0..n {
            total += encrypt_cell(&entry, &aad, b"Jurgen Muller").len();
        }
        eprintln!(
            "aad {} bytes: {:.0} ns per cell ({total})",
            aad.len(),
            t.elapsed().as_nanos() as f64 / n as f64
        );
        let t = std::time::Instant::now();
        for _ in 0..n {
            total += encrypt_values(
                &entry,
                &aad,
                [
                    ("operator_id", "OP-52642"),
                    ("operator_name", "Jurgen Muller"),
                    ("badge_id", "BDG-EBBFBF94"),
                ],
            )
            .len();
        }
        eprintln!(
            "3 values in one cell: {:.0} ns per cell ({total})",
            t.elapsed().as_nanos() as f64 / n as f64
        );
    }
}
