//! Per-table settings and retention horizons.

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
}

impl TableOptions {
    /// The oldest timestamp (ns) still visible at `now_ns`, or `i64::MIN` without a TTL.
    pub fn horizon(&self, now_ns: i64) -> i64 {
        match self.ttl {
            Some(ttl) => now_ns.saturating_sub(i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX)),
            None => i64::MIN,
        }
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
        };
        let now = 10 * day + 5;
        assert_eq!(opts.horizon(now), 8 * day + 5);
        assert!(opts.partition_expired(&PartitionGranularity::Day.partition_of(7 * day), now));
        assert!(!opts.partition_expired(&PartitionGranularity::Day.partition_of(8 * day), now));
        assert_eq!(TableOptions::default().horizon(now), i64::MIN);
    }
}
