//! Pre-built request bodies for the load generator.
//!
//! The load generator shares the machine with the server, so bodies are generated before
//! the run. A pool of `K` bodies covers `K * batch` consecutive TSBS rows, i.e. a time
//! span `S`. Request `seq` uses body `seq % K` in round `r = seq / K`, with every timestamp
//! shifted by `r * S`, so rows never repeat (unless `reuse` is set).
//!
//! - Uncompressed: shifting is done by copying the template and rewriting its 19-digit
//!   timestamps in place (a memcpy plus ~20 bytes per row; no regeneration).
//! - gzip with a row count: all bodies of the run are generated and compressed up front
//!   ("exact" pool) if they fit in `max_pool_bytes`, so nothing is compressed during the run.
//! - gzip otherwise: round 0 is pre-compressed; later rounds must be patched and
//!   re-compressed during the run (costly: a few ms of CPU per body, reported by the load
//!   generator). Use `--rows`, a larger pool, or `reuse` to avoid it.

use crate::tsbs::TsbsGen;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use std::io::Write;

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub seed: u64,
    pub hosts: usize,
    pub start_ns: i64,
    pub interval_ns: i64,
    pub decimals: Option<u32>,
    pub batch_size: usize,
    /// Bodies in the pool (K).
    pub pool_bodies: usize,
    /// gzip level when bodies are compressed.
    pub gzip_level: Option<u32>,
    /// Total rows of the run, when known (`--rows`).
    pub total_rows: Option<u64>,
    /// Resend bodies unchanged instead of shifting timestamps (rows repeat).
    pub reuse: bool,
    /// Memory budget for an exact gzip pool.
    pub max_pool_bytes: u64,
    /// Threads used to compress while building.
    pub threads: usize,
}

struct Template {
    raw: Bytes,
    ts_pos: Vec<u32>,
}

impl Template {
    fn line_end(&self, rows: usize) -> usize {
        self.ts_pos[rows - 1] as usize + TS_DIGITS + 1
    }
}

/// One request body.
pub struct Body {
    pub wire: Bytes,
    /// Uncompressed line-protocol bytes.
    pub raw_len: usize,
    pub rows: usize,
    /// True when the body had to be compressed for this request.
    pub compressed_now: bool,
}

pub struct BodyPool {
    batch: usize,
    templates: Vec<Template>,
    wire: Vec<Bytes>,
    raw_len: Vec<usize>,
    exact: bool,
    span_ns: i64,
    gzip_level: Option<u32>,
    reuse: bool,
    /// Human-readable notes on how the pool was built (for the report).
    pub notes: Vec<String>,
}

const TS_DIGITS: usize = 19;
/// Smallest 19-digit nanosecond timestamp: 2001-09-09T01:46:40Z.
pub const MIN_PATCHABLE_TS: i64 = 1_000_000_000_000_000_000;

pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(data.len() / 6 + 64),
        Compression::new(level),
    );
    enc.write_all(data).expect("gzip to Vec");
    enc.finish().expect("gzip to Vec")
}

fn gzip_parallel(raws: &[&[u8]], level: u32, threads: usize) -> Vec<Vec<u8>> {
    if raws.is_empty() {
        return Vec::new();
    }
    let per = raws.len().div_ceil(threads.max(1));
    std::thread::scope(|s| {
        let handles: Vec<_> = raws
            .chunks(per)
            .map(|chunk| s.spawn(move || chunk.iter().map(|r| gzip(r, level)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("gzip thread"))
            .collect()
    })
}

/// Rewrite the 19-digit timestamps at `ts_pos` in `buf`, adding `shift_ns`. Rows of one
/// interval share a timestamp, so the last conversion is cached.
pub fn shift_timestamps(buf: &mut [u8], ts_pos: &[u32], shift_ns: i64) {
    let mut last_old = [0u8; TS_DIGITS];
    let mut last_new = [0u8; TS_DIGITS];
    let mut have_last = false;
    for &p in ts_pos {
        let d = &mut buf[p as usize..p as usize + TS_DIGITS];
        if have_last && *d == last_old {
            d.copy_from_slice(&last_new);
            continue;
        }
        last_old.copy_from_slice(d);
        let mut v: i64 = 0;
        for &c in d.iter() {
            v = v * 10 + (c - b'0') as i64;
        }
        let mut v = v.checked_add(shift_ns).expect("timestamp overflow");
        assert!(v >= MIN_PATCHABLE_TS, "timestamp left 19 digits");
        for c in d.iter_mut().rev() {
            *c = b'0' + (v % 10) as u8;
            v /= 10;
        }
        last_new.copy_from_slice(d);
        have_last = true;
    }
}

impl BodyPool {
    pub fn build(cfg: &PoolConfig, mut log: impl FnMut(&str)) -> Result<BodyPool, String> {
        if cfg.batch_size == 0 || cfg.pool_bodies == 0 || cfg.hosts == 0 {
            return Err("batch size, pool size and hosts must be positive".into());
        }
        let batch = cfg.batch_size;
        let needed_bodies = cfg.total_rows.map(|r| r.div_ceil(batch as u64));
        let mut tsbs = TsbsGen::new(
            cfg.seed,
            cfg.hosts,
            cfg.start_ns,
            cfg.interval_ns,
            cfg.decimals,
        );
        let mut notes = Vec::new();
        let threads = cfg.threads.max(1);

        // gzip + known row count: try to pre-build every body of the run.
        if let (Some(level), Some(total), Some(n), false) =
            (cfg.gzip_level, cfg.total_rows, needed_bodies, cfg.reuse)
        {
            let chunk = (threads * 4).max(1);
            let mut wire = Vec::with_capacity(n as usize);
            let mut raw_len = Vec::with_capacity(n as usize);
            let mut produced = 0u64;
            let mut fits = true;
            let mut last_report = std::time::Instant::now();
            while produced < n {
                let k = chunk.min((n - produced) as usize);
                let mut raws = Vec::with_capacity(k);
                for j in 0..k {
                    let first_row = (produced + j as u64) * batch as u64;
                    let rows = (total - first_row).min(batch as u64) as usize;
                    let mut raw = Vec::with_capacity(rows * 360);
                    for _ in 0..rows {
                        tsbs.write_row(&mut raw);
                    }
                    raws.push(raw);
                }
                let refs: Vec<&[u8]> = raws.iter().map(|r| r.as_slice()).collect();
                for (raw, gz) in raws.iter().zip(gzip_parallel(&refs, level, threads)) {
                    raw_len.push(raw.len());
                    wire.push(Bytes::from(gz));
                }
                produced += k as u64;
                let so_far: u64 = wire.iter().map(|b| b.len() as u64).sum();
                let estimate = so_far / produced * n;
                if estimate > cfg.max_pool_bytes {
                    fits = false;
                    notes.push(format!(
                        "an exact gzip pool for {total} rows would need ~{} MB (> max pool \
                         {} MB); falling back to a pool of {} bodies with re-compression",
                        estimate >> 20,
                        cfg.max_pool_bytes >> 20,
                        cfg.pool_bodies
                    ));
                    break;
                }
                if last_report.elapsed().as_secs() >= 5 {
                    last_report = std::time::Instant::now();
                    log(&format!("  pre-compressed {produced}/{n} bodies"));
                }
            }
            if fits {
                let bytes: u64 = wire.iter().map(|b| b.len() as u64).sum();
                notes.push(format!(
                    "exact gzip pool: {n} bodies, {:.1} MB compressed, nothing compressed \
                     during the run",
                    bytes as f64 / 1e6
                ));
                return Ok(BodyPool {
                    batch,
                    templates: Vec::new(),
                    wire,
                    raw_len,
                    exact: true,
                    span_ns: 0,
                    gzip_level: cfg.gzip_level,
                    reuse: false,
                    notes,
                });
            }
            tsbs = TsbsGen::new(
                cfg.seed,
                cfg.hosts,
                cfg.start_ns,
                cfg.interval_ns,
                cfg.decimals,
            );
        }

        let k = match needed_bodies {
            Some(n) => (cfg.pool_bodies as u64).min(n) as usize,
            None => cfg.pool_bodies,
        };
        let rounds_needed = needed_bodies.is_none_or(|n| n > k as u64);
        if rounds_needed && !cfg.reuse && cfg.start_ns < MIN_PATCHABLE_TS {
            return Err(format!(
                "start time must be after 2001-09-09T01:46:40Z (19-digit ns timestamps) so \
                 timestamps can be shifted in place; got {}",
                cfg.start_ns
            ));
        }
        let mut templates = Vec::with_capacity(k);
        for _ in 0..k {
            let mut raw = Vec::with_capacity(batch * 360);
            let mut ts_pos = Vec::with_capacity(batch);
            for _ in 0..batch {
                let p = tsbs.write_row(&mut raw);
                ts_pos.push(u32::try_from(p).map_err(|_| "body larger than 4 GiB")?);
            }
            templates.push(Template {
                raw: Bytes::from(raw),
                ts_pos,
            });
        }
        let rows_in_pool = (k * batch) as i64;
        let intervals = (rows_in_pool + cfg.hosts as i64 - 1) / cfg.hosts as i64;
        let span_ns = intervals * cfg.interval_ns;
        let (wire, raw_len) = match cfg.gzip_level {
            Some(level) => {
                let refs: Vec<&[u8]> = templates.iter().map(|t| t.raw.as_ref()).collect();
                let gz = gzip_parallel(&refs, level, threads);
                (
                    gz.into_iter().map(Bytes::from).collect(),
                    templates.iter().map(|t| t.raw.len()).collect(),
                )
            }
            None => (
                templates.iter().map(|t| t.raw.clone()).collect(),
                templates.iter().map(|t| t.raw.len()).collect(),
            ),
        };
        if rounds_needed {
            if cfg.reuse {
                notes.push(format!(
                    "pool of {k} bodies resent unchanged: rows repeat every {k} requests"
                ));
            } else if cfg.gzip_level.is_some() {
                notes.push(format!(
                    "pool of {k} bodies; after {k} requests bodies are re-timestamped and \
                     re-compressed during the run (client CPU; see prep time)"
                ));
            } else {
                notes.push(format!(
                    "pool of {k} bodies; timestamps shifted by {:.0} s per round (copy + \
                     in-place rewrite)",
                    span_ns as f64 / 1e9
                ));
            }
        } else {
            notes.push(format!("pool of {k} bodies covers the whole run"));
        }
        Ok(BodyPool {
            batch,
            templates,
            wire,
            raw_len,
            exact: false,
            span_ns,
            gzip_level: cfg.gzip_level,
            reuse: cfg.reuse,
            notes,
        })
    }

    /// Number of pre-built bodies.
    pub fn len(&self) -> usize {
        self.wire.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wire.is_empty()
    }

    /// Bytes held by the pool (templates + compressed bodies).
    pub fn memory_bytes(&self) -> usize {
        let t: usize = self
            .templates
            .iter()
            .map(|t| t.raw.len() + 4 * t.ts_pos.len())
            .sum();
        let w: usize = if self.gzip_level.is_some() {
            self.wire.iter().map(|b| b.len()).sum()
        } else {
            0
        };
        t + w
    }

    /// Time span covered by one round of the pool.
    pub fn span_ns(&self) -> i64 {
        self.span_ns
    }

    fn cached(&self, seq: u64, rows: usize) -> Option<usize> {
        if self.exact {
            return Some(seq as usize);
        }
        let k = self.wire.len() as u64;
        let round = seq / k;
        ((round == 0 || self.reuse) && rows == self.batch).then_some((seq % k) as usize)
    }

    /// True when building this body costs real CPU (gzip re-compression), so the caller
    /// should run [`BodyPool::body`] on a blocking thread.
    pub fn is_expensive(&self, seq: u64, rows: usize) -> bool {
        self.gzip_level.is_some() && self.cached(seq, rows).is_none()
    }

    /// The body of request `seq` with `rows` rows (`rows` < batch only for the last
    /// request of a `--rows` run).
    pub fn body(&self, seq: u64, rows: usize) -> Body {
        self.body_reusing(seq, rows, Vec::new())
    }

    /// Like [`BodyPool::body`], reusing `scratch`'s allocation for a patched body (pass
    /// the previous request's body back via [`recycle`] to avoid a fresh multi-MB
    /// allocation and its page faults per request).
    pub fn body_reusing(&self, seq: u64, rows: usize, mut scratch: Vec<u8>) -> Body {
        assert!(rows > 0 && rows <= self.batch);
        if let Some(i) = self.cached(seq, rows) {
            return Body {
                wire: self.wire[i].clone(),
                raw_len: self.raw_len[i],
                rows,
                compressed_now: false,
            };
        }
        let k = self.templates.len() as u64;
        let t = &self.templates[(seq % k) as usize];
        let round = (seq / k) as i64;
        let end = t.line_end(rows);
        let raw: Bytes = if round == 0 || self.reuse {
            t.raw.slice(..end)
        } else {
            scratch.clear();
            scratch.extend_from_slice(&t.raw[..end]);
            let mut v = scratch;
            shift_timestamps(&mut v, &t.ts_pos[..rows], round * self.span_ns);
            Bytes::from(v)
        };
        let raw_len = raw.len();
        match self.gzip_level {
            Some(level) => Body {
                wire: Bytes::from(gzip(&raw, level)),
                raw_len,
                rows,
                compressed_now: true,
            },
            None => Body {
                wire: raw,
                raw_len,
                rows,
                compressed_now: false,
            },
        }
    }
}

/// Get a sent body's allocation back if nothing else references it (see
/// [`BodyPool::body_reusing`]); pool bodies are shared and never come back.
pub fn recycle(b: Bytes) -> Vec<u8> {
    match b.try_into_mut() {
        Ok(m) => {
            let v = Vec::from(m);
            if v.capacity() >= 1024 { v } else { Vec::new() }
        }
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;
    use std::collections::HashSet;
    use std::io::Read;

    fn cfg() -> PoolConfig {
        PoolConfig {
            seed: 1,
            hosts: 7,
            start_ns: 1_767_225_600_000_000_000,
            interval_ns: 10_000_000_000,
            decimals: None,
            batch_size: 10,
            pool_bodies: 3,
            gzip_level: None,
            total_rows: None,
            reuse: false,
            max_pool_bytes: 1 << 30,
            threads: 2,
        }
    }

    fn text(b: &Body, gz: bool) -> String {
        if gz {
            let mut s = String::new();
            GzDecoder::new(&b.wire[..]).read_to_string(&mut s).unwrap();
            assert_eq!(s.len(), b.raw_len);
            s
        } else {
            String::from_utf8(b.wire.to_vec()).unwrap()
        }
    }

    /// (hostname, timestamp) of every row.
    fn keys(s: &str) -> Vec<(String, String)> {
        s.lines()
            .map(|l| {
                let host = l.split(',').nth(1).unwrap().to_string();
                let ts = l.rsplit(' ').next().unwrap().to_string();
                (host, ts)
            })
            .collect()
    }

    fn continuous_rows_are_distinct(c: &PoolConfig, requests: u64, gz: bool) {
        let pool = BodyPool::build(c, |_| {}).unwrap();
        let mut seen = HashSet::new();
        let mut all = String::new();
        for seq in 0..requests {
            let b = pool.body(seq, c.batch_size);
            let s = text(&b, gz);
            assert_eq!(s.lines().count(), c.batch_size);
            for k in keys(&s) {
                assert!(
                    seen.insert(k.clone()),
                    "duplicate row {k:?} in request {seq}"
                );
            }
            all.push_str(&s);
        }
        // Round 0 is exactly the datagen stream.
        let mut g = TsbsGen::new(c.seed, c.hosts, c.start_ns, c.interval_ns, c.decimals);
        let mut want = Vec::new();
        for _ in 0..c.batch_size * c.pool_bodies {
            g.write_row(&mut want);
        }
        assert!(all.as_bytes().starts_with(&want));
    }

    #[test]
    fn shifted_rounds_are_distinct_raw() {
        continuous_rows_are_distinct(&cfg(), 10, false);
    }

    #[test]
    fn shifted_rounds_are_distinct_gzip() {
        let mut c = cfg();
        c.gzip_level = Some(1);
        let pool = BodyPool::build(&c, |_| {}).unwrap();
        assert!(!pool.is_expensive(0, 10));
        assert!(pool.is_expensive(3, 10));
        continuous_rows_are_distinct(&c, 8, true);
    }

    #[test]
    fn exact_gzip_pool_for_rows() {
        let mut c = cfg();
        c.gzip_level = Some(1);
        c.total_rows = Some(95);
        let pool = BodyPool::build(&c, |_| {}).unwrap();
        assert_eq!(pool.len(), 10);
        assert!(!pool.is_expensive(9, 5));
        let mut all = String::new();
        for seq in 0..10 {
            let rows = if seq == 9 { 5 } else { 10 };
            all.push_str(&text(&pool.body(seq, rows), true));
        }
        let mut g = TsbsGen::new(c.seed, c.hosts, c.start_ns, c.interval_ns, None);
        let mut want = Vec::new();
        for _ in 0..95 {
            g.write_row(&mut want);
        }
        assert_eq!(all.as_bytes(), &want[..]);
    }

    #[test]
    fn exact_pool_falls_back_when_too_big() {
        let mut c = cfg();
        c.gzip_level = Some(1);
        c.total_rows = Some(1000);
        c.max_pool_bytes = 100;
        let pool = BodyPool::build(&c, |_| {}).unwrap();
        assert_eq!(pool.len(), 3);
        assert!(pool.notes[0].contains("falling back"));
        continuous_rows_are_distinct(&c, 7, true);
    }

    #[test]
    fn partial_last_body_and_small_runs() {
        let mut c = cfg();
        c.total_rows = Some(25);
        let pool = BodyPool::build(&c, |_| {}).unwrap();
        let b = pool.body(2, 5);
        assert_eq!(b.rows, 5);
        assert_eq!(text(&b, false).lines().count(), 5);
    }

    #[test]
    fn recycled_buffers_give_same_bodies() {
        let pool = BodyPool::build(&cfg(), |_| {}).unwrap();
        let mut scratch = Vec::new();
        for seq in 0..9 {
            let b = pool.body_reusing(seq, 10, scratch);
            assert_eq!(b.wire, pool.body(seq, 10).wire);
            scratch = recycle(b.wire);
            // pool bodies (round 0) are shared and not handed out for reuse
            assert_eq!(scratch.is_empty(), seq < 3);
        }
    }

    #[test]
    fn reuse_repeats() {
        let mut c = cfg();
        c.reuse = true;
        let pool = BodyPool::build(&c, |_| {}).unwrap();
        assert_eq!(pool.body(0, 10).wire, pool.body(3, 10).wire);
    }

    #[test]
    fn patching() {
        let mut buf =
            b"x 1999999999999999999\ny 1999999999999999999\nz 1000000000000000000\n".to_vec();
        shift_timestamps(&mut buf, &[2, 24, 46], 1);
        assert_eq!(
            &buf[..],
            b"x 2000000000000000000\ny 2000000000000000000\nz 1000000000000000001\n"
        );
        let mut c = cfg();
        c.start_ns = 1_000;
        assert!(BodyPool::build(&c, |_| {}).is_err());
        c.reuse = true;
        assert!(BodyPool::build(&c, |_| {}).is_ok());
    }
}
