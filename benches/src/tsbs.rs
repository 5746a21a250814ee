//! TSBS "cpu-only" style data: per host 10 tags and 10 float fields, one row per host per
//! interval, time-ordered (all hosts at t, then all hosts at t + interval, ...).
//!
//! Host `i`'s tags and values come from their own PRNG stream, so they do not depend on
//! the number of hosts; the same seed gives the same bytes.

use crate::lp::{LineWriter, series_key};
use crate::rng::{Rng, round_to};

pub const MEASUREMENT: &str = "cpu";

pub const FIELDS: [&str; 10] = [
    "usage_user",
    "usage_system",
    "usage_idle",
    "usage_nice",
    "usage_iowait",
    "usage_irq",
    "usage_softirq",
    "usage_steal",
    "usage_guest",
    "usage_guest_nice",
];

pub const TAG_KEYS: [&str; 10] = [
    "hostname",
    "region",
    "datacenter",
    "rack",
    "os",
    "arch",
    "team",
    "service",
    "service_version",
    "service_environment",
];

/// Regions and their datacenters, as in TSBS's devops generator.
pub const REGIONS: [(&str, &[&str]); 9] = [
    (
        "us-east-1",
        &["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1e"],
    ),
    ("us-west-1", &["us-west-1a", "us-west-1b"]),
    ("us-west-2", &["us-west-2a", "us-west-2b", "us-west-2c"]),
    ("eu-west-1", &["eu-west-1a", "eu-west-1b", "eu-west-1c"]),
    ("eu-central-1", &["eu-central-1a", "eu-central-1b"]),
    ("ap-southeast-1", &["ap-southeast-1a", "ap-southeast-1b"]),
    ("ap-southeast-2", &["ap-southeast-2a", "ap-southeast-2b"]),
    ("ap-northeast-1", &["ap-northeast-1a", "ap-northeast-1c"]),
    ("sa-east-1", &["sa-east-1a", "sa-east-1b", "sa-east-1c"]),
];
const OSES: [&str; 3] = ["Ubuntu16.10", "Ubuntu16.04LTS", "Ubuntu15.10"];
const ARCHES: [&str; 2] = ["x64", "x86"];
const TEAMS: [&str; 4] = ["SF", "NYC", "LON", "CHI"];
const ENVIRONMENTS: [&str; 3] = ["production", "staging", "test"];

struct Host {
    key: Vec<u8>,
    rng: Rng,
    values: [f64; 10],
}

impl Host {
    fn new(seed: u64, i: usize) -> Host {
        let mut rng = Rng::stream(seed, i as u64);
        let hostname = format!("host_{i}");
        let (region, dcs) = *rng.pick(&REGIONS);
        let dc = *rng.pick(dcs);
        let rack = rng.below(100).to_string();
        let os = *rng.pick(&OSES);
        let arch = *rng.pick(&ARCHES);
        let team = *rng.pick(&TEAMS);
        let service = rng.below(20).to_string();
        let version = rng.below(2).to_string();
        let env = *rng.pick(&ENVIRONMENTS);
        let vals = [
            hostname.as_str(),
            region,
            dc,
            rack.as_str(),
            os,
            arch,
            team,
            service.as_str(),
            version.as_str(),
            env,
        ];
        let tags: Vec<(&str, &str)> = TAG_KEYS.iter().copied().zip(vals).collect();
        let key = series_key(MEASUREMENT, &tags);
        let mut values = [0.0; 10];
        for v in &mut values {
            *v = rng.range(0.0, 100.0);
        }
        Host { key, rng, values }
    }

    fn step(&mut self) {
        for v in &mut self.values {
            *v = (*v + self.rng.normal()).clamp(0.0, 100.0);
        }
    }
}

/// Streams TSBS cpu rows in time order.
pub struct TsbsGen {
    hosts: Vec<Host>,
    interval_ns: i64,
    next_ts: i64,
    next_host: usize,
    decimals: Option<u32>,
}

impl TsbsGen {
    /// `decimals`: round values to this many decimal places (None: full f64 precision,
    /// like TSBS).
    pub fn new(
        seed: u64,
        hosts: usize,
        start_ns: i64,
        interval_ns: i64,
        decimals: Option<u32>,
    ) -> Self {
        assert!(hosts > 0 && interval_ns > 0);
        TsbsGen {
            hosts: (0..hosts).map(|i| Host::new(seed, i)).collect(),
            interval_ns,
            next_ts: start_ns,
            next_host: 0,
            decimals,
        }
    }

    /// Timestamp of the next row.
    pub fn next_ts(&self) -> i64 {
        self.next_ts
    }

    /// Append the next row; returns the byte offset of its timestamp in `out`.
    pub fn write_row(&mut self, out: &mut Vec<u8>) -> usize {
        let ts = self.next_ts;
        let decimals = self.decimals;
        let h = &mut self.hosts[self.next_host];
        h.step();
        let mut w = LineWriter::with_series(out, &h.key);
        for (k, v) in FIELDS.iter().zip(h.values) {
            w.f64(k, round_to(v, decimals));
        }
        let pos = w.end(ts);
        self.next_host += 1;
        if self.next_host == self.hosts.len() {
            self.next_host = 0;
            self.next_ts += self.interval_ns;
        }
        pos
    }

    /// Append all rows of the current interval (or the rest of it).
    pub fn write_interval(&mut self, out: &mut Vec<u8>) {
        loop {
            self.write_row(out);
            if self.next_host == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lp::tests::{Val, parse_line};

    fn gen_bytes(seed: u64, hosts: usize, intervals: usize) -> Vec<u8> {
        let mut g = TsbsGen::new(seed, hosts, 1_767_225_600_000_000_000, 10_000_000_000, None);
        let mut out = Vec::new();
        for _ in 0..intervals {
            g.write_interval(&mut out);
        }
        out
    }

    #[test]
    fn deterministic() {
        assert_eq!(gen_bytes(3, 5, 20), gen_bytes(3, 5, 20));
        assert_ne!(gen_bytes(3, 5, 20), gen_bytes(4, 5, 20));
    }

    #[test]
    fn host_data_independent_of_host_count() {
        let a = gen_bytes(9, 2, 3);
        let b = gen_bytes(9, 5, 3);
        let first = |v: &[u8]| {
            String::from_utf8(v.to_vec())
                .unwrap()
                .lines()
                .filter(|l| l.starts_with("cpu,hostname=host_1,"))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(first(&a), first(&b));
    }

    #[test]
    fn shape_and_order() {
        let out = String::from_utf8(gen_bytes(1, 4, 3)).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 12);
        let mut last_ts = 0;
        for (n, l) in lines.iter().enumerate() {
            let (m, tags, fields, ts) = parse_line(l);
            assert_eq!(m, "cpu");
            let keys: Vec<&str> = tags.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, TAG_KEYS);
            assert_eq!(tags[0].1, format!("host_{}", n % 4));
            let region = REGIONS.iter().find(|(r, _)| *r == tags[1].1).unwrap();
            assert!(region.1.contains(&tags[2].1.as_str()));
            assert_eq!(fields.len(), 10);
            for (k, v) in &fields {
                assert!(FIELDS.contains(&k.as_str()));
                match v {
                    Val::F(f) => assert!((0.0..=100.0).contains(f)),
                    _ => panic!("not a float"),
                }
            }
            assert!(ts >= last_ts);
            assert_eq!(
                ts,
                1_767_225_600_000_000_000 + (n / 4) as i64 * 10_000_000_000
            );
            last_ts = ts;
        }
    }

    #[test]
    fn decimals_round() {
        let mut g = TsbsGen::new(1, 1, 0, 1, Some(2));
        let mut out = Vec::new();
        g.write_row(&mut out);
        let (_, _, fields, _) = parse_line(std::str::from_utf8(&out).unwrap());
        for (_, v) in fields {
            let Val::F(f) = v else { panic!() };
            assert_eq!((f * 100.0).round() / 100.0, f);
        }
    }
}
