//! Time partitions: how a timestamp maps to a directory of the lake.

use std::fmt;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// How long one partition of a table spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionGranularity {
    /// One partition per UTC hour: `date=YYYY-MM-DD/hour=HH`.
    Hour,
    /// One partition per UTC day: `date=YYYY-MM-DD` (the default).
    #[default]
    Day,
    /// One partition per UTC month: `month=YYYY-MM`.
    Month,
}

/// A partition of a table, named by the start of its time range (ns since the epoch, UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// Start of the partition's range, inclusive.
    pub start: i64,
    /// End of the partition's range, exclusive.
    pub end: i64,
    granularity_code: u8,
}

const NANOS_PER_SEC: i64 = 1_000_000_000;

fn to_datetime(nanos: i64) -> DateTime<Utc> {
    Utc.timestamp_nanos(nanos)
}

fn from_datetime(dt: DateTime<Utc>) -> i64 {
    // Dates outside the i64 nanosecond range cannot come from i64 timestamps.
    dt.timestamp_nanos_opt().unwrap_or(if dt.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

impl PartitionGranularity {
    /// The partition holding a timestamp.
    pub fn partition_of(self, nanos: i64) -> PartitionKey {
        let (start, end) = match self {
            PartitionGranularity::Hour => {
                let start = nanos
                    .div_euclid(3600 * NANOS_PER_SEC)
                    .saturating_mul(3600 * NANOS_PER_SEC);
                (start, start.saturating_add(3600 * NANOS_PER_SEC))
            }
            PartitionGranularity::Day => {
                let start = nanos
                    .div_euclid(86_400 * NANOS_PER_SEC)
                    .saturating_mul(86_400 * NANOS_PER_SEC);
                (start, start.saturating_add(86_400 * NANOS_PER_SEC))
            }
            PartitionGranularity::Month => {
                let dt = to_datetime(nanos);
                let first = NaiveDate::from_ymd_opt(dt.year(), dt.month(), 1)
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|d| from_datetime(d.and_utc()))
                    .unwrap_or(nanos);
                let (y, m) = if dt.month() == 12 {
                    (dt.year() + 1, 1)
                } else {
                    (dt.year(), dt.month() + 1)
                };
                let next = NaiveDate::from_ymd_opt(y, m, 1)
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .map(|d| from_datetime(d.and_utc()))
                    .unwrap_or(i64::MAX);
                (first, next)
            }
        };
        PartitionKey {
            start,
            end,
            granularity_code: self as u8,
        }
    }

    /// Parses the Hive-style directory of a partition back into its key.
    pub fn parse_dir(self, dir: &str) -> Option<PartitionKey> {
        let nanos = match self {
            PartitionGranularity::Hour => {
                let (date, hour) = dir.split_once("/hour=")?;
                let date =
                    NaiveDate::parse_from_str(date.strip_prefix("date=")?, "%Y-%m-%d").ok()?;
                let hour: u32 = hour.parse().ok()?;
                from_datetime(date.and_hms_opt(hour, 0, 0)?.and_utc())
            }
            PartitionGranularity::Day => {
                let date =
                    NaiveDate::parse_from_str(dir.strip_prefix("date=")?, "%Y-%m-%d").ok()?;
                from_datetime(date.and_hms_opt(0, 0, 0)?.and_utc())
            }
            PartitionGranularity::Month => {
                let month = dir.strip_prefix("month=")?;
                let date = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").ok()?;
                from_datetime(date.and_hms_opt(0, 0, 0)?.and_utc())
            }
        };
        let key = self.partition_of(nanos);
        (key.dir() == dir).then_some(key)
    }
}

impl PartitionKey {
    /// The granularity this key was made with.
    pub fn granularity(&self) -> PartitionGranularity {
        match self.granularity_code {
            0 => PartitionGranularity::Hour,
            2 => PartitionGranularity::Month,
            _ => PartitionGranularity::Day,
        }
    }

    /// The Hive-style directory name, relative to the table directory.
    pub fn dir(&self) -> String {
        let dt = to_datetime(self.start);
        match self.granularity() {
            PartitionGranularity::Hour => {
                format!("date={}/hour={:02}", dt.format("%Y-%m-%d"), dt.hour())
            }
            PartitionGranularity::Day => format!("date={}", dt.format("%Y-%m-%d")),
            PartitionGranularity::Month => format!("month={}", dt.format("%Y-%m")),
        }
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dir())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_name_their_hive_directory_and_parse_back() {
        // 2026-11-27T13:45:00Z
        let t = 1_795_787_100 * NANOS_PER_SEC;
        for (g, dir) in [
            (PartitionGranularity::Hour, "date=2026-11-27/hour=13"),
            (PartitionGranularity::Day, "date=2026-11-27"),
            (PartitionGranularity::Month, "month=2026-11"),
        ] {
            let key = g.partition_of(t);
            assert_eq!(key.dir(), dir);
            assert!(key.start <= t && t < key.end);
            assert_eq!(g.parse_dir(dir), Some(key));
        }
        assert_eq!(PartitionGranularity::Day.parse_dir("date=2026-13-01"), None);
    }

    #[test]
    fn negative_and_extreme_timestamps_do_not_panic() {
        for g in [
            PartitionGranularity::Hour,
            PartitionGranularity::Day,
            PartitionGranularity::Month,
        ] {
            for t in [i64::MIN, -1, 0, i64::MAX] {
                let key = g.partition_of(t);
                let _ = key.dir();
            }
        }
        let key = PartitionGranularity::Day.partition_of(-1);
        assert_eq!(key.dir(), "date=1969-12-31");
    }
}
