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

/// The range `[start, end)` of length `size` holding `nanos`, ranges starting at `offset`
/// modulo `size`; clamped to the i64 range at its ends, so neighbouring ranges never
/// overlap even there.
pub(crate) fn aligned_range(nanos: i64, size: i64, offset: i64) -> (i64, i64) {
    let (nanos, size, offset) = (i128::from(nanos), i128::from(size), i128::from(offset));
    let start = (nanos - offset).div_euclid(size) * size + offset;
    let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    (clamp(start), clamp(start + size))
}

impl PartitionGranularity {
    /// The partition holding a timestamp.
    pub fn partition_of(self, nanos: i64) -> PartitionKey {
        let (start, end) = match self {
            PartitionGranularity::Hour => aligned_range(nanos, 3600 * NANOS_PER_SEC, 0),
            PartitionGranularity::Day => aligned_range(nanos, 86_400 * NANOS_PER_SEC, 0),
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

    /// Writers find a line's partition by range among those already open, so ranges must
    /// hold their timestamps and never overlap, even where they are clamped.
    #[test]
    fn ranges_hold_their_timestamps_and_do_not_overlap_at_the_extremes() {
        for g in [PartitionGranularity::Hour, PartitionGranularity::Day] {
            let first = g.partition_of(i64::MIN);
            let next = g.partition_of(first.end);
            assert_eq!(first.start, i64::MIN);
            assert!(first.end > i64::MIN && next.start == first.end);
            assert_eq!(g.partition_of(first.end - 1), first);
            let last = g.partition_of(i64::MAX);
            assert_eq!(
                last.end,
                i64::MAX,
                "clamped: i64::MAX itself is past the range"
            );
            assert_eq!(g.partition_of(last.start), last);
        }
        assert_eq!(aligned_range(-1, 10, 4), (-6, 4));
        assert_eq!(aligned_range(4, 10, 4), (4, 14));
    }
}
