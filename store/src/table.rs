//! Per-table settings and retention horizons.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::partition::{PartitionGranularity, PartitionKey};

/// Settings of one table, from the configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableOptions {
    /// Partition granularity (default: day).
    #[serde(default)]
    pub partition: PartitionGranularity,
    /// How long rows live; unset = forever.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Privacy profile: how long personal columns stay readable; unset = as long as rows.
    #[serde(default, with = "humantime_serde")]
    pub personal_ttl: Option<Duration>,
    /// Privacy profile: how long one data key and pseudonym of a subject serve.
    #[serde(default)]
    pub key_period: KeyPeriod,
    /// Privacy profile: each column that identifies a person, with the personal columns
    /// that belong to that person.
    #[serde(default)]
    pub subjects: BTreeMap<String, Vec<String>>,
    /// Privacy profile: the other columns the table may store (allow-list); unset = any.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Privacy profile: columns never stored (data minimisation).
    #[serde(default)]
    pub drop: Vec<String>,
    /// Privacy profile: what happens to a column that is not in the profile.
    #[serde(default)]
    pub unknown_columns: UnknownColumns,
}

/// Suffix of the column that holds a subject value's ciphertext beside its pseudonym.
pub const CIPHER_SUFFIX: &str = "__enc";

/// The scope of a table's pseudonyms and data keys, also bound into its cells' associated
/// data: `db/table` (database names cannot contain `/`).
pub fn key_scope(db: &str, table: &str) -> String {
    format!("{db}/{table}")
}

/// The ciphertext column of a subject column.
pub fn cipher_column(subject: &str) -> String {
    format!("{subject}{CIPHER_SUFFIX}")
}

/// What a profiled table does with a column its profile does not name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownColumns {
    /// Reject the line (the default: nothing is stored by accident).
    #[default]
    Reject,
    /// Store the line without the column, and report it like a dropped one.
    Drop,
}

/// How long one data key and pseudonym of a subject serve (UTC calendar periods).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPeriod {
    /// One key per subject per day.
    Day,
    /// One key per subject per ISO week (from Monday).
    Week,
    /// One key per subject per month (the default).
    #[default]
    Month,
}

impl KeyPeriod {
    /// The period `[start, end)` holding a timestamp (ns).
    pub fn period_of(self, nanos: i64) -> (i64, i64) {
        const DAY: i64 = 86_400_000_000_000;
        match self {
            KeyPeriod::Day => {
                let p = PartitionGranularity::Day.partition_of(nanos);
                (p.start, p.end)
            }
            // 1970-01-05 was a Monday.
            KeyPeriod::Week => crate::partition::aligned_range(nanos, 7 * DAY, 4 * DAY),
            KeyPeriod::Month => {
                let p = PartitionGranularity::Month.partition_of(nanos);
                (p.start, p.end)
            }
        }
    }
}

impl TableOptions {
    /// The oldest timestamp (ns) still visible at `now_ns`, or `i64::MIN` without a TTL.
    pub fn horizon(&self, now_ns: i64) -> i64 {
        match self.ttl {
            Some(ttl) => now_ns.saturating_sub(i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX)),
            None => i64::MIN,
        }
    }

    /// Whether the table has a privacy profile (tables without one are stored as sent).
    pub fn has_profile(&self) -> bool {
        !self.subjects.is_empty() || self.columns.is_some() || !self.drop.is_empty()
    }

    /// The subject a personal column belongs to, if it is one.
    pub fn subject_of(&self, column: &str) -> Option<&str> {
        self.subjects
            .iter()
            .find(|(_, personal)| personal.iter().any(|p| p == column))
            .map(|(s, _)| s.as_str())
    }

    /// Every column whose stored value is a cell of ciphertext: the subjects' ciphertext
    /// columns and all personal columns, each with its subject.
    pub fn encrypted_columns(&self) -> Vec<(String, &str)> {
        let mut out = Vec::new();
        for (subject, personal) in &self.subjects {
            out.push((cipher_column(subject), subject.as_str()));
            out.extend(personal.iter().map(|p| (p.clone(), subject.as_str())));
        }
        out
    }

    /// The oldest timestamp whose personal cells are still readable at `now_ns`.
    pub fn personal_horizon(&self, now_ns: i64) -> i64 {
        match self.personal_ttl.or(self.ttl) {
            Some(ttl) => now_ns.saturating_sub(i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX)),
            None => i64::MIN,
        }
    }

    /// Checks a profile for contradictions; the message names the table and column.
    pub fn validate_profile(&self, table: &str) -> Result<(), String> {
        let mut seen: BTreeMap<String, &'static str> = BTreeMap::new();
        let mut add = |column: &str, role: &'static str| -> Result<(), String> {
            if column == crate::TIME_COLUMN || column == crate::SEQ_COLUMN {
                return Err(format!("table {table}: column {column:?} is reserved"));
            }
            if column.ends_with(CIPHER_SUFFIX) {
                return Err(format!(
                    "table {table}: column {column:?} ends with {CIPHER_SUFFIX:?}, which is reserved for ciphertext"
                ));
            }
            if let Some(other) = seen.insert(column.to_string(), role) {
                return Err(format!(
                    "table {table}: column {column:?} is listed both as {other} and as {role}"
                ));
            }
            Ok(())
        };
        for (subject, personal) in &self.subjects {
            add(subject, "a subject")?;
            for p in personal {
                add(p, "a personal column")?;
            }
        }
        for c in self.columns.iter().flatten() {
            add(c, "an allowed column")?;
        }
        for c in &self.drop {
            add(c, "a dropped column")?;
        }
        if let (Some(p), Some(t)) = (self.personal_ttl, self.ttl)
            && p > t
        {
            return Err(format!(
                "table {table}: personal_ttl is longer than ttl; personal data cannot outlive its rows"
            ));
        }
        if self.personal_ttl.is_some() && self.subjects.is_empty() {
            return Err(format!("table {table}: personal_ttl needs subjects"));
        }
        Ok(())
    }

    /// Whether a whole partition lies before the horizon, so it can be deleted.
    pub fn partition_expired(&self, partition: &PartitionKey, now_ns: i64) -> bool {
        partition.end <= self.horizon(now_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizon_follows_ttl() {
        let day = 86_400_000_000_000i64;
        let opts = TableOptions {
            partition: PartitionGranularity::Day,
            ttl: Some(Duration::from_secs(86_400 * 2)),
            ..Default::default()
        };
        let now = 10 * day + 5;
        assert_eq!(opts.horizon(now), 8 * day + 5);
        assert!(opts.partition_expired(&PartitionGranularity::Day.partition_of(7 * day), now));
        assert!(!opts.partition_expired(&PartitionGranularity::Day.partition_of(8 * day), now));
        assert_eq!(TableOptions::default().horizon(now), i64::MIN);
    }

    #[test]
    fn key_periods_are_calendar_periods() {
        let day = 86_400_000_000_000i64;
        // 2026-11-27 is a Friday.
        let t = 1_795_780_800_000_000_000i64; // 2026-11-27T12:00:00Z
        let (s, e) = KeyPeriod::Week.period_of(t);
        assert_eq!((t - s) / day, 4, "from Monday");
        assert_eq!(e - s, 7 * day);
        let (s, e) = KeyPeriod::Month.period_of(t);
        assert_eq!(e - s, 30 * day, "November");
        assert_eq!(
            KeyPeriod::Day.period_of(t).1 - KeyPeriod::Day.period_of(t).0,
            day
        );
    }

    #[test]
    fn profiles_must_not_contradict_themselves() {
        let opts: TableOptions = serde_json::from_value(serde_json::json!({
            "ttl": "365d", "personal_ttl": "90d", "columns": ["line", "event"],
            "drop": ["photo"],
            "subjects": {"operator_id": ["operator_name", "badge_id"], "supervisor_id": []}
        }))
        .unwrap();
        assert!(opts.has_profile());
        opts.validate_profile("mes").unwrap();
        assert_eq!(opts.subject_of("badge_id"), Some("operator_id"));
        assert_eq!(opts.encrypted_columns().len(), 4);
        let mut bad = opts.clone();
        bad.drop.push("badge_id".into());
        let err = bad.validate_profile("mes").unwrap_err();
        assert!(err.contains("badge_id") && err.contains("mes"), "{err}");
        let mut bad = opts.clone();
        bad.personal_ttl = Some(Duration::from_secs(400 * 86_400));
        assert!(bad.validate_profile("mes").is_err());
        assert!(!TableOptions::default().has_profile());
    }
}
