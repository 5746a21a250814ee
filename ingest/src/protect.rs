//! The privacy step of the write path, between validation and the WAL: minimisation,
//! pseudonymisation and encryption of one line of a table with a privacy profile.
//!
//! - Dropped columns (and, if the profile says so, unknown ones) vanish; the write reports
//!   their names.
//! - Each subject value becomes a tag holding its pseudonym for the key period of the row's
//!   time, so the series key is the other tags plus the pseudonym.
//! - The subject value goes to `<subject>__enc` and each personal column stays under its
//!   name, both as AES-256-GCM cells under the subject's data key for that period, with
//!   associated data binding table, column, series and timestamp.
//!
//! Nothing here ever puts a value into an error: reasons name columns only.

use std::borrow::Cow;
use std::collections::BTreeSet;

use ahash::AHashMap;
use std::sync::Arc;

use privacy::{CURRENT_VERSION, Entry, Keyring, associated_data, encrypt_values_into};
use smallvec::SmallVec;
use store::{CIPHER_SUFFIX, TableOptions, UnknownColumns, cipher_column};

use crate::line_protocol::{FieldValue, ParsedLine};

/// Per-request state of the privacy step: caches per table, and what to report.
#[derive(Default)]
pub struct ProtectScratch {
    /// Per table (key scope) of the request; a request names few tables, so a list.
    scopes: Vec<(String, ScopeCache)>,
    aad: Vec<u8>,
    /// The cells of the current line (reused: no allocation per row).
    cells: Vec<u8>,
    /// Names of columns dropped from the request.
    pub dropped: BTreeSet<String>,
    /// Highest keyring generation used: durable before the write is acknowledged.
    pub generation: u64,
}

/// What one table's profile says about each column it names, and the entries used so far.
struct ScopeCache {
    roles: AHashMap<String, Role>,
    /// Subject columns with the names of their ciphertext columns.
    subjects: Vec<(String, String)>,
    /// The columns of the previous line with their roles: lines of one table mostly share
    /// their shape, so a comparison usually replaces a lookup.
    last_shape: Vec<(String, Role)>,
    /// The key period of the previous line, `[start, end)`: consecutive lines mostly share
    /// it, so a comparison usually replaces the calendar arithmetic.
    period: (i64, i64),
    /// Period start, then subject value, to the entry's place in `entries`.
    index: AHashMap<i64, AHashMap<String, usize>>,
    /// The entries used in this request.
    entries: Vec<Arc<Entry>>,
}

impl ScopeCache {
    fn new(opts: &TableOptions) -> Self {
        let mut roles = AHashMap::new();
        for c in opts.columns.iter().flatten() {
            roles.insert(c.clone(), Role::Keep);
        }
        for c in &opts.drop {
            roles.insert(c.clone(), Role::Drop);
        }
        let mut subjects = Vec::new();
        for (i, (subject, personal)) in opts.subjects.iter().enumerate() {
            roles.insert(subject.clone(), Role::Subject(i));
            subjects.push((subject.clone(), cipher_column(subject)));
            for p in personal {
                roles.insert(p.clone(), Role::Personal(i));
            }
        }
        ScopeCache {
            roles,
            subjects,
            last_shape: Vec::new(),
            period: (0, 0),
            index: AHashMap::new(),
            entries: Vec::new(),
        }
    }

    /// The role of the `position`-th column of a line.
    fn role(&mut self, opts: &TableOptions, position: usize, column: &str) -> Role {
        if let Some((name, role)) = self.last_shape.get(position)
            && name == column
        {
            return *role;
        }
        let role = match self.roles.get(column) {
            _ if column.ends_with(CIPHER_SUFFIX) => Role::Reserved,
            Some(r) => *r,
            None if opts.columns.is_none() => Role::Keep,
            // With `unknown_columns = "drop"` an unknown column is a dropped one.
            None if opts.unknown_columns == UnknownColumns::Drop => Role::Drop,
            None => Role::Unknown,
        };
        if position < self.last_shape.len() {
            self.last_shape[position] = (column.to_string(), role);
        } else if position == self.last_shape.len() {
            self.last_shape.push((column.to_string(), role));
        }
        role
    }

    /// The key period holding `time`.
    fn period_of(&mut self, opts: &TableOptions, time: i64) -> (i64, i64) {
        if !(self.period.0 <= time && time < self.period.1) {
            self.period = opts.key_period.period_of(time);
        }
        self.period
    }

    /// Where the entry of a subject value for a period lies in `entries`, made on first use.
    fn entry_of(
        &mut self,
        keyring: &Keyring,
        scope: &str,
        period: (i64, i64),
        value: &str,
    ) -> Result<usize, Refusal> {
        let in_period = self.index.entry(period.0).or_default();
        if let Some(i) = in_period.get(value) {
            return Ok(*i);
        }
        let hash = keyring.subject_hash(value);
        let entry = keyring.entry_for(scope, &hash, period).map_err(|e| {
            tracing::error!(error = %e, "keyring failed");
            ("the keyring failed; see the server log".to_string(), None)
        })?;
        self.entries.push(entry);
        in_period.insert(value.to_string(), self.entries.len() - 1);
        Ok(self.entries.len() - 1)
    }
}

/// A personal column of a line: its name, the index of its subject, its value as text.
type PersonalValue<'a> = (Cow<'a, str>, usize, Cow<'a, str>);

/// Why a line was refused: a reason and the column, never a value.
pub type Refusal = (String, Option<String>);

/// What the profile makes of a column; subjects by their index in the profile. `Unknown`
/// is a column the profile does not name, under `unknown_columns = "reject"`; `Reserved`
/// a name only ciphertext columns may have.
#[derive(Clone, Copy)]
enum Role {
    Keep,
    Drop,
    Subject(usize),
    Personal(usize),
    Unknown,
    Reserved,
}

fn text_of<'a>(value: FieldValue<'a>) -> Cow<'a, str> {
    match value {
        FieldValue::Float(v) => Cow::Owned(v.to_string()),
        FieldValue::Integer(v) => Cow::Owned(v.to_string()),
        FieldValue::UInteger(v) => Cow::Owned(v.to_string()),
        FieldValue::Boolean(v) => Cow::Borrowed(if v { "true" } else { "false" }),
        FieldValue::String(s) => s,
        FieldValue::Encrypted(_) => Cow::Borrowed(""),
    }
}

/// The values a line gives up to the privacy step.
struct Taken<'a> {
    subjects: SmallVec<[(usize, Cow<'a, str>); 2]>,
    personal: SmallVec<[PersonalValue<'a>; 4]>,
}

impl<'a> Taken<'a> {
    /// Files a column the line gave up under its role, or refuses the line.
    fn take(
        &mut self,
        role: Role,
        name: Cow<'a, str>,
        value: Cow<'a, str>,
        dropped: &mut BTreeSet<String>,
    ) -> Result<(), Refusal> {
        match role {
            Role::Keep => unreachable!("kept columns stay in the line"),
            // A tag and a field of the same name are two columns to the parser; after
            // the privacy step both would be one pseudonym tag.
            Role::Subject(i) if self.subjects.iter().any(|(s, _)| *s == i) => {
                return Err(twice(name));
            }
            Role::Personal(_) if self.personal.iter().any(|(n, _, _)| *n == name) => {
                return Err(twice(name));
            }
            Role::Subject(i) => self.subjects.push((i, value)),
            Role::Personal(i) => self.personal.push((name, i, value)),
            Role::Drop => {
                if !dropped.contains(name.as_ref()) {
                    dropped.insert(name.into_owned());
                }
            }
            Role::Unknown => {
                return Err((
                    "column is not in the table's privacy profile (allowed, subject, personal or dropped)"
                        .to_string(),
                    Some(name.into_owned()),
                ));
            }
            Role::Reserved => {
                return Err((
                    format!("column names ending in {CIPHER_SUFFIX:?} are reserved"),
                    Some(name.into_owned()),
                ));
            }
        }
        Ok(())
    }
}

fn twice(name: Cow<'_, str>) -> Refusal {
    (
        "column appears twice in the line (as a tag and as a field)".to_string(),
        Some(name.into_owned()),
    )
}

/// Applies a table's privacy profile to one line whose time is `time`. The line it returns
/// borrows names, pseudonyms and cells from `scratch` (no allocation per row): drop it
/// before protecting the next line.
pub fn protect_line<'a: 's, 's>(
    mut line: ParsedLine<'a>,
    time: i64,
    scope: &str,
    opts: &TableOptions,
    keyring: Option<&Keyring>,
    scratch: &'s mut ProtectScratch,
) -> Result<ParsedLine<'s>, Refusal> {
    let ProtectScratch {
        scopes,
        aad,
        cells,
        dropped,
        generation,
    } = scratch;
    let at = match scopes.iter().position(|(s, _)| s == scope) {
        Some(i) => i,
        None => {
            scopes.push((scope.to_string(), ScopeCache::new(opts)));
            scopes.len() - 1
        }
    };
    let cache = &mut scopes[at].1;
    // Sort every column into its role: kept columns move up in place, the others leave
    // the line in one pass.
    let mut taken = Taken {
        subjects: SmallVec::new(),
        personal: SmallVec::new(),
    };
    let mut kept = 0;
    let tag_count = line.tags.len();
    for i in 0..tag_count {
        match cache.role(opts, i, &line.tags[i].0) {
            Role::Keep => {
                line.tags.swap(kept, i);
                kept += 1;
            }
            role => {
                let (name, value) = std::mem::take(&mut line.tags[i]);
                taken.take(role, name, value, dropped)?;
            }
        }
    }
    line.tags.truncate(kept);
    kept = 0;
    for i in 0..line.fields.len() {
        match cache.role(opts, tag_count + i, &line.fields[i].0) {
            Role::Keep => {
                line.fields.swap(kept, i);
                kept += 1;
            }
            role => {
                let (name, value) = std::mem::replace(
                    &mut line.fields[i],
                    (Cow::Borrowed(""), FieldValue::Boolean(false)),
                );
                taken.take(role, name, text_of(value), dropped)?;
            }
        }
    }
    line.fields.truncate(kept);
    let Taken { subjects, personal } = taken;
    if let Some((column, subject, _)) = personal
        .iter()
        .find(|(_, s, _)| !subjects.iter().any(|(i, _)| i == s))
    {
        return Err((
            format!(
                "personal column needs its subject column {:?} in the same line",
                cache.subjects[*subject].0
            ),
            Some(column.to_string()),
        ));
    }
    if subjects.is_empty() {
        return Ok(line);
    }
    let Some(keyring) = keyring else {
        return Err((
            "table has a privacy profile but the server has no keyring".to_string(),
            None,
        ));
    };
    let period = cache.period_of(opts, time);
    let mut places: SmallVec<[usize; 2]> = SmallVec::new();
    for (_, value) in &subjects {
        places.push(cache.entry_of(keyring, scope, period, value)?);
    }
    // From here on the cache is only read: the line borrows names and pseudonyms from it.
    let cache: &'s ScopeCache = cache;
    let mut line: ParsedLine<'s> = line;
    // The series as stored: every tag, sorted by name. Writers mostly send tags sorted
    // already; subjects go in at their place.
    if !line.tags.is_sorted_by(|a, b| a.0 <= b.0) {
        line.tags.sort_by(|a, b| a.0.cmp(&b.0));
    }
    for ((i, _), place) in subjects.iter().zip(&places) {
        let entry: &'s Entry = &cache.entries[*place];
        *generation = (*generation).max(entry.generation());
        let name = cache.subjects[*i].0.as_str();
        let at = line.tags.partition_point(|(k, _)| k.as_ref() < name);
        line.tags.insert(
            at,
            (Cow::Borrowed(name), Cow::Borrowed(entry.pseudonym.as_str())),
        );
    }
    // One cell per subject: the subject value and that person's personal values.
    cells.clear();
    let mut ranges: SmallVec<[std::ops::Range<usize>; 2]> = SmallVec::new();
    for ((i, value), place) in subjects.iter().zip(&places) {
        let column = &cache.subjects[*i].1;
        let series = line.tags.iter().map(|(k, v)| (k.as_ref(), v.as_ref()));
        associated_data(aad, CURRENT_VERSION, scope, column, series, time);
        let personal_values = personal
            .iter()
            .filter(|(_, s, _)| s == i)
            .map(|(p, _, v)| (p.as_ref(), v.as_ref()));
        ranges.push(encrypt_values_into(
            cells,
            &cache.entries[*place],
            aad,
            value,
            personal_values,
        ));
    }
    let cells: &'s Vec<u8> = cells;
    for ((i, _), range) in subjects.iter().zip(ranges) {
        line.fields.push((
            Cow::Borrowed(cache.subjects[*i].1.as_str()),
            FieldValue::Encrypted(Cow::Borrowed(&cells[range])),
        ));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line_protocol::parse_lines;
    use privacy::{MasterKey, decrypt_cell};

    fn profile() -> TableOptions {
        serde_json::from_value(serde_json::json!({
            "columns": ["line", "event", "job_id"],
            "drop": ["photo"],
            "subjects": {"operator_id": ["operator_name"], "supervisor_id": []}
        }))
        .unwrap()
    }

    /// A line with everything owned, so that it outlives the scratch it borrowed from.
    fn owned(line: ParsedLine<'_>) -> ParsedLine<'static> {
        let own = |c: Cow<'_, str>| Cow::Owned(c.into_owned());
        ParsedLine {
            line_number: line.line_number,
            measurement: own(line.measurement),
            tags: line
                .tags
                .into_iter()
                .map(|(a, b)| (own(a), own(b)))
                .collect(),
            fields: line
                .fields
                .into_iter()
                .map(|(a, b)| {
                    let b = match b {
                        FieldValue::String(s) => FieldValue::String(own(s)),
                        FieldValue::Float(v) => FieldValue::Float(v),
                        FieldValue::Integer(v) => FieldValue::Integer(v),
                        FieldValue::UInteger(v) => FieldValue::UInteger(v),
                        FieldValue::Boolean(v) => FieldValue::Boolean(v),
                        FieldValue::Encrypted(v) => {
                            FieldValue::Encrypted(Cow::Owned(v.into_owned()))
                        }
                    };
                    (own(a), b)
                })
                .collect(),
            timestamp: line.timestamp,
        }
    }

    /// Decrypts the line's `operator_id__enc` cell (its first field) as a reader would: with
    /// the associated data of the stored row's tags, which must be sorted by name.
    fn open_first_cell(line: &ParsedLine<'_>, k: &Keyring, time: i64) -> privacy::Plaintext {
        let FieldValue::Encrypted(cell) = &line.fields[0].1 else {
            panic!("the first field is a cell")
        };
        let series: Vec<(&str, &str)> = line
            .tags
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
            .collect();
        assert!(
            series.is_sorted_by(|a, b| a.0 <= b.0),
            "stored tags are sorted"
        );
        let mut aad = Vec::new();
        associated_data(
            &mut aad,
            privacy::version_of(cell).unwrap(),
            "db/mes",
            "operator_id__enc",
            series,
            time,
        );
        let keys = k.keys();
        decrypt_cell(cell, &aad, |id| keys.get(id)).unwrap()
    }

    fn protect(
        body: &str,
        k: &Keyring,
        s: &mut ProtectScratch,
    ) -> Result<ParsedLine<'static>, Refusal> {
        let line = owned(parse_lines(body.as_bytes()).next().unwrap().unwrap());
        protect_line(line, 1_000, "db/mes", &profile(), Some(k), s).map(owned)
    }

    #[test]
    fn subjects_become_pseudonyms_and_personal_values_ciphertext() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::init(dir.path(), MasterKey::generate().unwrap()).unwrap();
        let mut s = ProtectScratch::default();
        let line = protect(
            r#"mes,line=L1,event=qc operator_id="E7",operator_name="Zoë O'Brien",supervisor_id=99i,photo="x""#,
            &k,
            &mut s,
        )
        .unwrap();
        assert_eq!(s.dropped, BTreeSet::from(["photo".to_string()]));
        let tags: Vec<&str> = line.tags.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(tags, ["event", "line", "operator_id", "supervisor_id"]);
        let pseudonym = &line.tags[2].1;
        let entry = k.subject_entries(&k.subject_hash("E7")).pop().unwrap();
        assert_eq!(pseudonym.as_ref(), entry.pseudonym);
        assert!(
            k.subject_entries(&k.subject_hash("99")).len() == 1,
            "integers are subjects too"
        );
        let names: Vec<&str> = line.fields.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(names, ["operator_id__enc", "supervisor_id__enc"]);
        let plain = open_first_cell(&line, &k, 1_000);
        assert_eq!(
            plain.value("operator_id", "operator_name"),
            Some("Zoë O'Brien")
        );
        assert_eq!(plain.value("operator_id", "operator_id"), Some("E7"));
        assert!(s.generation > 0);
    }

    #[test]
    fn a_subject_sent_as_tag_and_field_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::init(dir.path(), MasterKey::generate().unwrap()).unwrap();
        let mut s = ProtectScratch::default();
        for body in [
            r#"mes,operator_id=E7 operator_id="E8""#,
            r#"mes,operator_name=A operator_id="E7",operator_name="B""#,
        ] {
            let err = protect(body, &k, &mut s).unwrap_err();
            assert!(err.0.contains("twice"), "{body}: {}", err.0);
            assert!(!err.0.contains("E7") && !err.0.contains("E8"));
        }
    }

    #[test]
    fn lines_of_one_request_in_two_key_periods_use_each_periods_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::init(dir.path(), MasterKey::generate().unwrap()).unwrap();
        let mut s = ProtectScratch::default();
        let opts = profile();
        let day = 86_400_000_000_000i64;
        // Month key periods: 2026-01-31 and 2026-02-01, then January again.
        let times = [1_769_817_600_000_000_000, 1_769_817_600_000_000_000 + day];
        let mut seen = Vec::new();
        for time in [times[0], times[1], times[0] + 1] {
            let line = parse_lines(br#"mes,event=qc,line=L1 operator_id="E7""#)
                .next()
                .unwrap()
                .unwrap();
            let line = owned(protect_line(line, time, "db/mes", &opts, Some(&k), &mut s).unwrap());
            let plain = open_first_cell(&line, &k, time);
            assert_eq!(plain.value("operator_id", "operator_id"), Some("E7"));
            let FieldValue::Encrypted(cell) = &line.fields[0].1 else {
                panic!("the first field is a cell")
            };
            seen.push((
                privacy::key_id_of(cell).unwrap(),
                line.tags[2].1.to_string(),
            ));
        }
        assert_ne!(
            seen[0], seen[1],
            "a new period has its own key and pseudonym"
        );
        assert_eq!(seen[0], seen[2], "back in the first period, its key again");
        assert_eq!(k.subject_entries(&k.subject_hash("E7")).len(), 2);
    }

    #[test]
    fn each_table_has_its_own_pseudonyms_even_within_one_request() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::init(dir.path(), MasterKey::generate().unwrap()).unwrap();
        let mut s = ProtectScratch::default();
        let body = r#"mes,line=L1 operator_id="E7""#;
        let line = parse_lines(body.as_bytes()).next().unwrap().unwrap();
        let a = owned(
            protect_line(line.clone(), 1_000, "db/mes", &profile(), Some(&k), &mut s).unwrap(),
        );
        let b = owned(protect_line(line, 1_000, "db/other", &profile(), Some(&k), &mut s).unwrap());
        assert_ne!(a.tags, b.tags);
        assert_eq!(k.subject_entries(&k.subject_hash("E7")).len(), 2);
    }

    #[test]
    fn unknown_and_orphaned_columns_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let k = Keyring::init(dir.path(), MasterKey::generate().unwrap()).unwrap();
        let mut s = ProtectScratch::default();
        let err = protect(r#"mes,line=L1 ssn="123-45""#, &k, &mut s).unwrap_err();
        assert_eq!(err.1.as_deref(), Some("ssn"));
        assert!(!err.0.contains("123"));
        let err = protect(r#"mes,line=L1 operator_name="Anna""#, &k, &mut s).unwrap_err();
        assert_eq!(err.1.as_deref(), Some("operator_name"));
        assert!(err.0.contains("operator_id") && !err.0.contains("Anna"));
        let err = protect(r#"mes x__enc="a""#, &k, &mut s).unwrap_err();
        assert_eq!(err.1.as_deref(), Some("x__enc"));
        // With unknown_columns = "drop" the same column is dropped and reported instead.
        let mut lenient = profile();
        lenient.unknown_columns = UnknownColumns::Drop;
        let mut d = ProtectScratch::default();
        let line = parse_lines(br#"mes,line=L1 ssn="123-45",job_id="J""#)
            .next()
            .unwrap()
            .unwrap();
        let kept = owned(protect_line(line, 1_000, "db/mes", &lenient, Some(&k), &mut d).unwrap());
        assert_eq!(kept.fields.len(), 1);
        assert_eq!(d.dropped, BTreeSet::from(["ssn".to_string()]));
        // A line without subjects passes through without keys.
        let line = protect("mes,line=L1 job_id=\"J1\"", &k, &mut s).unwrap();
        assert_eq!(line.fields.len(), 1);
        assert_eq!(k.status().keys, 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// Whatever columns a line brings, a refusal names columns only and a protected
        /// line holds no personal value in clear: every value is marked, so a leak shows.
        #[test]
        fn values_never_leak(
            columns in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "line", "event", "job_id", "photo", "operator_id", "operator_name",
                        "supervisor_id", "ssn", "x__enc",
                    ]),
                    "[a-z]{1,8}",
                    proptest::bool::ANY,
                ),
                1..8,
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            let k = Keyring::init(dir.path(), MasterKey::generate().unwrap()).unwrap();
            let mut s = ProtectScratch::default();
            let mut seen = std::collections::HashSet::new();
            let mut tags = Vec::new();
            let mut fields = Vec::new();
            for (name, value, as_tag) in columns {
                if !seen.insert(name) {
                    continue;
                }
                let value = format!("SECRET{value}");
                if as_tag {
                    tags.push(format!("{name}={value}"));
                } else {
                    fields.push(format!("{name}=\"{value}\""));
                }
            }
            if fields.is_empty() {
                fields.push("n=1i".to_string());
            }
            let mut body = String::from("mes");
            for t in &tags {
                body.push(',');
                body.push_str(t);
            }
            body.push(' ');
            body.push_str(&fields.join(","));
            match protect(&body, &k, &mut s) {
                Err((reason, column)) => {
                    proptest::prop_assert!(!reason.contains("SECRET"), "{}", reason);
                    proptest::prop_assert!(!column.unwrap_or_default().contains("SECRET"));
                }
                Ok(line) => {
                    let personal = ["operator_id", "operator_name", "supervisor_id"];
                    for (name, value) in &line.tags {
                        proptest::prop_assert!(
                            !(personal.contains(&name.as_ref()) && value.contains("SECRET")),
                            "{} in clear", name
                        );
                    }
                    for (name, value) in &line.fields {
                        let leaked = match value {
                            FieldValue::String(v) => v.contains("SECRET"),
                            FieldValue::Encrypted(cell) => cell.windows(6).any(|w| w == b"SECRET"),
                            _ => false,
                        };
                        proptest::prop_assert!(
                            !(leaked && (personal.contains(&name.as_ref()) || name.ends_with("__enc"))),
                            "{} in clear", name
                        );
                        proptest::prop_assert!(name != "photo", "dropped columns vanish");
                    }
                }
            }
        }
    }
}
