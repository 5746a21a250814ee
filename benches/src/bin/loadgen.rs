//! historian-loadgen: posts TSBS cpu line protocol to an InfluxDB-compatible write
//! endpoint over N connections and reports throughput and acknowledgement latency.
//!
//! ```text
//! historian-loadgen --url http://127.0.0.1:8181 --endpoint '/api/v3/write_lp?db=bench' \
//!     --connections 16 --batch-size 5000 --duration 60s --pid $(pidof historian)
//! ```
//!
//! Bodies are built before the run (see `historian_benches::pool`) so the generator costs
//! little CPU while it shares the machine with the server.

use bytes::Bytes;
use clap::Parser;
use historian_benches::hist::Histogram;
use historian_benches::pool::{BodyPool, PoolConfig, recycle};
use historian_benches::procfs;
use historian_benches::time::{NS_PER_SEC, format_rfc3339, now_ns, parse_duration_ns, parse_time};
use historian_benches::tsbs;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "historian-loadgen",
    version,
    about = "Ingest load generator: posts TSBS cpu line protocol to an InfluxDB-compatible \
             write endpoint and reports throughput and latency"
)]
struct Cli {
    /// Server base URL (plain http).
    #[arg(long, default_value = "http://127.0.0.1:8181")]
    url: String,
    /// Path and query appended to --url, e.g. /api/v3/write_lp?db=bench,
    /// /api/v2/write?bucket=bench, /write?db=bench.
    #[arg(long, default_value = "/api/v3/write_lp?db=bench")]
    endpoint: String,
    /// Concurrent connections (one request loop each).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Lines (rows) per request.
    #[arg(long, default_value_t = 5000)]
    batch_size: usize,
    /// Send gzip-compressed bodies (Content-Encoding: gzip).
    #[arg(long)]
    gzip: bool,
    /// gzip level (1 fastest .. 9 smallest; Go clients such as Telegraf use 6). The
    /// server's decompression cost hardly depends on it; building the bodies does.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=9))]
    gzip_level: u32,
    /// Measured run time after the warmup, e.g. 60s, 5m (default 60s unless --rows).
    #[arg(long, conflicts_with = "rows")]
    duration: Option<String>,
    /// Stop after sending this many rows in total (warmup included).
    #[arg(long)]
    rows: Option<u64>,
    /// Warmup excluded from the statistics (default 5s with --duration, 0 with --rows).
    #[arg(long)]
    warmup: Option<String>,
    /// TSBS host count (series = hosts).
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// Interval between rows of one host.
    #[arg(long, default_value = "10s")]
    interval: String,
    /// First timestamp: RFC 3339, integer ns, `now` or `now-<duration>`; floored to the
    /// interval.
    #[arg(long, default_value = "now-1d")]
    start: String,
    /// PRNG seed (with the same --start/--hosts/--interval, round 0 equals
    /// `historian-datagen tsbs`).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Round field values to this many decimals (default full precision).
    #[arg(long)]
    decimals: Option<u32>,
    /// Pre-built bodies; later requests reuse them with shifted timestamps.
    #[arg(long, default_value_t = 64)]
    pool: usize,
    /// Memory budget (MB) for pre-compressing every body of a --gzip --rows run.
    #[arg(long, default_value_t = 1024)]
    max_pool_mb: u64,
    /// Resend pool bodies unchanged (rows repeat: duplicates/overwrites on the server).
    #[arg(long)]
    reuse_bodies: bool,
    /// PID of the server: sample VmRSS from /proc/PID/status every second and its CPU.
    #[arg(long)]
    pid: Option<u32>,
    /// Extra request header, `Name: value` (repeatable), e.g. 'Authorization: Bearer xyz'.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Shortcut for --header 'Authorization: Bearer TOKEN'.
    #[arg(long, env = "HISTORIAN_TOKEN")]
    token: Option<String>,
    /// Per-request timeout.
    #[arg(long, default_value = "60s")]
    timeout: String,
    /// Retries of a request answered 503/429 (after Retry-After) or failing in transport.
    #[arg(long, default_value_t = 20)]
    max_retries: u32,
    /// Progress line interval.
    #[arg(long, default_value = "5s")]
    progress: String,
    /// Target rate in rows per second over all connections (default: as fast as the
    /// server takes them). Requests follow a fixed schedule, so a slow answer does not
    /// lower the offered load.
    #[arg(long)]
    rate: Option<f64>,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print a one-line JSON summary on stdout (the human summary goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Default, Clone)]
struct Counters {
    requests_ok: u64,
    rows: u64,
    wire_bytes: u64,
    raw_bytes: u64,
    s2xx: u64,
    s4xx: u64,
    s5xx: u64,
    s503: u64,
    other_status: u64,
    transport_errors: u64,
    retries: u64,
    failed_requests: u64,
    failed_rows: u64,
    hist: Option<Histogram>,
    first_start: Option<Instant>,
    last_ack: Option<Instant>,
}

impl Counters {
    fn hist(&mut self) -> &mut Histogram {
        self.hist.get_or_insert_with(Histogram::new)
    }
    fn latency(&self) -> Histogram {
        self.hist.clone().unwrap_or_default()
    }
}

#[derive(Default)]
struct Stats {
    warmup: Counters,
    measured: Counters,
    interval: Counters,
    prep_secs: f64,
    compressed_during_run: u64,
}

impl Stats {
    fn with(&mut self, measured: bool, f: impl Fn(&mut Counters)) {
        f(if measured {
            &mut self.measured
        } else {
            &mut self.warmup
        });
        f(&mut self.interval);
    }
}

#[derive(Default, Clone, Copy)]
struct Rss {
    min: u64,
    max: u64,
    last: u64,
    samples: u64,
    gone: bool,
}

struct Shared {
    cli: Cli,
    url: String,
    pool: BodyPool,
    next_seq: AtomicU64,
    stop: AtomicBool,
    stats: Mutex<Stats>,
    rss: Mutex<Rss>,
    errors_printed: AtomicU32,
    notes_printed: AtomicU32,
    t0: Instant,
    warmup_end: Instant,
    deadline: Option<Instant>,
}

fn dur(s: &str, what: &str) -> Result<Duration, String> {
    parse_duration_ns(s)
        .map(|ns| Duration::from_nanos(ns as u64))
        .map_err(|e| format!("{what}: {e}"))
}

fn sep(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn parse_retry_after(h: Option<&HeaderValue>) -> Option<Duration> {
    let s = h?.to_str().ok()?.trim();
    let secs: f64 = s.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(30.0)))
}

/// Small jittered exponential backoff: 25 ms * 2^attempt, at most 2 s.
fn backoff(attempt: u32, seq: u64) -> Duration {
    let base = 25u64 << attempt.min(6);
    let jitter = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) * base / 64; // 0..base
    Duration::from_millis((base + jitter).min(2000))
}

fn request_headers(cli: &Cli) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if cli.gzip {
        h.insert("content-encoding", HeaderValue::from_static("gzip"));
    }
    if let Some(t) = &cli.token {
        h.insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).map_err(|e| format!("--token: {e}"))?,
        );
    }
    for raw in &cli.headers {
        let (k, v) = raw
            .split_once(':')
            .ok_or_else(|| format!("--header {raw:?}: expected 'Name: value'"))?;
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|e| format!("--header {raw:?}: {e}"))?;
        let value =
            HeaderValue::from_str(v.trim()).map_err(|e| format!("--header {raw:?}: {e}"))?;
        h.insert(name, value);
    }
    Ok(h)
}

async fn connection(sh: Arc<Shared>, client: reqwest::Client, headers: HeaderMap) {
    let batch = sh.cli.batch_size as u64;
    let mut scratch = Vec::new();
    loop {
        if sh.stop.load(Ordering::Relaxed) || sh.deadline.is_some_and(|d| Instant::now() >= d) {
            return;
        }
        let seq = sh.next_seq.fetch_add(1, Ordering::Relaxed);
        if let Some(rate) = sh.cli.rate.filter(|r| *r > 0.0) {
            let due = sh.t0 + Duration::from_secs_f64(seq as f64 * batch as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let rows = match sh.cli.rows {
            Some(total) => {
                let first = seq.saturating_mul(batch);
                if first >= total {
                    return;
                }
                (total - first).min(batch) as usize
            }
            None => batch as usize,
        };
        let body = if sh.pool.is_expensive(seq, rows) {
            let sh2 = sh.clone();
            let t = Instant::now();
            let b = tokio::task::spawn_blocking(move || sh2.pool.body(seq, rows))
                .await
                .expect("body builder panicked");
            let mut st = sh.stats.lock().unwrap();
            st.prep_secs += t.elapsed().as_secs_f64();
            st.compressed_during_run += b.compressed_now as u64;
            b
        } else {
            let t = Instant::now();
            let b = sh
                .pool
                .body_reusing(seq, rows, std::mem::take(&mut scratch));
            let e = t.elapsed().as_secs_f64();
            if e > 0.0 {
                sh.stats.lock().unwrap().prep_secs += e;
            }
            b
        };
        let wire =
            send_with_retries(&sh, &client, &headers, seq, body.wire, body.raw_len, rows).await;
        scratch = recycle(wire);
    }
}

async fn send_with_retries(
    sh: &Shared,
    client: &reqwest::Client,
    headers: &HeaderMap,
    seq: u64,
    wire: Bytes,
    raw_len: usize,
    rows: usize,
) -> Bytes {
    let rows = rows as u64;
    let mut attempt = 0u32;
    loop {
        let start = Instant::now();
        let measured = start >= sh.warmup_end;
        let res = client
            .post(&sh.url)
            .headers(headers.clone())
            .body(wire.clone())
            .send()
            .await;
        let (status, retry_after, err_text) = match res {
            Ok(resp) => {
                let status = resp.status();
                let ra = parse_retry_after(resp.headers().get("retry-after"));
                let body = resp.bytes().await.unwrap_or_default();
                (Some(status.as_u16()), ra, body)
            }
            Err(e) => (None, None, Bytes::from(e.to_string())),
        };
        let now = Instant::now();
        let lat_us = now.duration_since(start).as_micros() as u64;
        let mut retry = false;
        {
            let mut st = sh.stats.lock().unwrap();
            st.with(measured, |c| {
                c.first_start.get_or_insert(start);
            });
            match status {
                Some(s) if (200..300).contains(&s) => st.with(measured, |c| {
                    c.s2xx += 1;
                    c.requests_ok += 1;
                    c.rows += rows;
                    c.wire_bytes += wire.len() as u64;
                    c.raw_bytes += raw_len as u64;
                    c.hist().record(lat_us);
                    c.last_ack = Some(now);
                }),
                Some(s) => {
                    st.with(measured, |c| match s {
                        503 => c.s503 += 1,
                        400..=499 => c.s4xx += 1,
                        500..=599 => c.s5xx += 1,
                        _ => c.other_status += 1,
                    });
                    retry = s == 503 || s == 429;
                }
                None => {
                    st.with(measured, |c| c.transport_errors += 1);
                    retry = true;
                }
            }
        }
        if status.is_some_and(|s| (200..300).contains(&s)) {
            return wire;
        }
        report_error(sh, status, &err_text, attempt);
        let stopping = sh.stop.load(Ordering::Relaxed)
            || sh
                .deadline
                .is_some_and(|d| Instant::now() >= d + Duration::from_secs(5));
        if retry && attempt < sh.cli.max_retries && !stopping {
            let wait = retry_after.unwrap_or_default() + backoff(attempt, seq);
            attempt += 1;
            sh.stats.lock().unwrap().with(measured, |c| c.retries += 1);
            tokio::time::sleep(wait).await;
            continue;
        }
        sh.stats.lock().unwrap().with(measured, |c| {
            c.failed_requests += 1;
            c.failed_rows += rows;
        });
        return wire;
    }
}

fn report_error(sh: &Shared, status: Option<u16>, body: &[u8], attempt: u32) {
    if status == Some(503) || status == Some(429) {
        if sh.notes_printed.fetch_add(1, Ordering::Relaxed) < 3 {
            eprintln!(
                "note: server answered {} (backpressure); retrying after Retry-After \
                 (further 503/429 notes suppressed after 3)",
                status.unwrap()
            );
        }
        return;
    }
    if sh.errors_printed.fetch_add(1, Ordering::Relaxed) < 5 {
        let text = String::from_utf8_lossy(&body[..body.len().min(500)]);
        match status {
            Some(s) => eprintln!("error: HTTP {s} (attempt {}): {}", attempt + 1, text.trim()),
            None => eprintln!("error: transport (attempt {}): {text}", attempt + 1),
        }
    }
}

async fn sample_rss(sh: Arc<Shared>, pid: u32) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let v = procfs::rss_kib(pid);
        {
            let mut r = sh.rss.lock().unwrap();
            match v {
                Some(kib) => {
                    if r.samples == 0 {
                        r.min = kib;
                    }
                    r.min = r.min.min(kib);
                    r.max = r.max.max(kib);
                    r.last = kib;
                    r.samples += 1;
                }
                None => r.gone = true,
            }
        }
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

async fn progress(sh: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut last = Instant::now();
    loop {
        tick.tick().await;
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let c = std::mem::take(&mut sh.stats.lock().unwrap().interval);
        let secs = now.duration_since(last).as_secs_f64();
        last = now;
        let h = c.latency();
        let phase = if now < sh.warmup_end {
            "warmup "
        } else {
            "measure"
        };
        let rss = if sh.cli.pid.is_some() {
            let r = *sh.rss.lock().unwrap();
            if r.gone {
                "  rss GONE".to_string()
            } else {
                format!("  rss {:.0} MiB", r.last as f64 / 1024.0)
            }
        } else {
            String::new()
        };
        eprintln!(
            "[{:>7.1}s] {phase} {:>10} rows/s {:>7.1} MB/s {:>6.1} req/s  p50 {:>7.1} ms  p99 \
             {:>7.1} ms  503 {} err {}{rss}",
            now.duration_since(sh.t0).as_secs_f64(),
            sep((c.rows as f64 / secs) as u64),
            c.wire_bytes as f64 / 1e6 / secs,
            c.requests_ok as f64 / secs,
            ms(h.quantile(0.5)),
            ms(h.quantile(0.99)),
            c.s503,
            c.s4xx + c.s5xx + c.transport_errors + c.other_status
        );
    }
}

struct Outcome {
    summary: String,
    json: serde_json::Value,
    exit: ExitCode,
}

async fn run(cli: Cli, pool: BodyPool, start_ns: i64) -> Result<Outcome, String> {
    let timeout = dur(&cli.timeout, "--timeout")?;
    let every = dur(&cli.progress, "--progress")?.max(Duration::from_millis(100));
    let warmup = match (&cli.warmup, cli.rows) {
        (Some(w), _) => dur(w, "--warmup")?,
        (None, Some(_)) => Duration::ZERO,
        (None, None) => Duration::from_secs(5),
    };
    let measure = match (&cli.duration, cli.rows) {
        (Some(d), _) => Some(dur(d, "--duration")?),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(60)),
    };
    let headers = request_headers(&cli)?;
    let url = format!(
        "{}{}{}",
        cli.url.trim_end_matches('/'),
        if cli.endpoint.starts_with('/') {
            ""
        } else {
            "/"
        },
        cli.endpoint
    );
    if !url.starts_with("http://") {
        return Err(format!("--url must be plain http://, got {url}"));
    }
    let t0 = Instant::now();
    let sh = Arc::new(Shared {
        url: url.clone(),
        pool,
        next_seq: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        stats: Mutex::new(Stats::default()),
        rss: Mutex::new(Rss::default()),
        errors_printed: AtomicU32::new(0),
        notes_printed: AtomicU32::new(0),
        t0,
        warmup_end: t0 + warmup,
        deadline: measure.map(|m| t0 + warmup + m),
        cli: cli.clone(),
    });
    eprintln!(
        "historian-loadgen: POST {url}  connections {}  batch {} rows  gzip {}  hosts {}  \
         start {}  warmup {:.1}s  {}",
        cli.connections,
        cli.batch_size,
        if cli.gzip {
            format!("on (level {})", cli.gzip_level)
        } else {
            "off".into()
        },
        cli.hosts,
        format_rfc3339(start_ns),
        warmup.as_secs_f64(),
        match (measure, cli.rows) {
            (Some(m), _) => format!("duration {:.1}s", m.as_secs_f64()),
            (None, Some(r)) => format!("rows {}", sep(r)),
            _ => String::new(),
        }
    );

    let mut background = Vec::new();
    if let Some(pid) = cli.pid {
        if procfs::rss_kib(pid).is_none() {
            return Err(format!("--pid {pid}: cannot read /proc/{pid}/status"));
        }
        background.push(tokio::spawn(sample_rss(sh.clone(), pid)));
    }
    background.push(tokio::spawn(progress(sh.clone(), every)));
    // CPU usage during the measured window.
    let cpu_start = {
        let sh = sh.clone();
        let pid = cli.pid;
        tokio::spawn(async move {
            tokio::time::sleep_until(sh.warmup_end.into()).await;
            (
                Instant::now(),
                pid.and_then(|p| procfs::cpu_secs(&p.to_string())),
                procfs::cpu_secs("self"),
            )
        })
    };
    {
        let sh = sh.clone();
        background.push(tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: finishing in-flight requests");
                sh.stop.store(true, Ordering::Relaxed);
            }
        }));
    }

    let mut conns = Vec::new();
    for _ in 0..cli.connections {
        let client = reqwest::Client::builder()
            .http1_only()
            .no_proxy()
            .pool_max_idle_per_host(1)
            .timeout(timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        conns.push(tokio::spawn(connection(
            sh.clone(),
            client,
            headers.clone(),
        )));
    }
    for c in conns {
        c.await.map_err(|e| format!("connection task: {e}"))?;
    }
    let end = Instant::now();
    let (cpu_t, server_cpu0, self_cpu0) = if cpu_start.is_finished() {
        cpu_start.await.map_err(|e| e.to_string())?
    } else {
        cpu_start.abort();
        (end, None, None)
    };
    let cpu_window = end.duration_since(cpu_t).as_secs_f64();
    let server_cores = match (cli.pid, server_cpu0) {
        (Some(p), Some(c0)) if cpu_window > 0.5 => {
            procfs::cpu_secs(&p.to_string()).map(|c1| (c1 - c0) / cpu_window)
        }
        _ => None,
    };
    let self_cores = match self_cpu0 {
        Some(c0) if cpu_window > 0.5 => procfs::cpu_secs("self").map(|c1| (c1 - c0) / cpu_window),
        _ => None,
    };
    if let Some(pid) = cli.pid
        && let Some(kib) = procfs::rss_kib(pid)
    {
        let mut r = sh.rss.lock().unwrap();
        r.last = kib;
        r.max = r.max.max(kib);
        r.min = if r.samples == 0 { kib } else { r.min.min(kib) };
        r.samples += 1;
    }
    sh.stop.store(true, Ordering::Relaxed);
    for b in background {
        b.abort();
    }

    let st = sh.stats.lock().unwrap();
    let m = &st.measured;
    let w = &st.warmup;
    let from = sh.warmup_end.max(m.first_start.unwrap_or(sh.warmup_end));
    let until = m.last_ack.unwrap_or(end);
    let secs = until.duration_since(from).as_secs_f64().max(1e-9);
    let h = m.latency();
    let rows_s = m.rows as f64 / secs;
    let fields = tsbs::FIELDS.len() as f64;
    let rss = *sh.rss.lock().unwrap();
    let total_failed = m.failed_rows + w.failed_rows;
    let total_rows = m.rows + w.rows;

    let mut s = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(s, "== historian-loadgen summary ==");
    let _ = writeln!(s, "target        POST {url}");
    let _ = writeln!(
        s,
        "load          {} connections, {} rows/request, gzip {}, {} hosts x {} fields, {}",
        cli.connections,
        cli.batch_size,
        if cli.gzip {
            format!("level {}", cli.gzip_level)
        } else {
            "off".into()
        },
        cli.hosts,
        tsbs::FIELDS.len(),
        sh.pool.notes.join("; ")
    );
    let _ = writeln!(
        s,
        "measured      {secs:.2} s (warmup {:.1} s: {} rows, {} requests, not counted)",
        warmup.as_secs_f64(),
        sep(w.rows),
        sep(w.requests_ok)
    );
    let _ = writeln!(
        s,
        "rows          {}  ->  {} rows/s",
        sep(m.rows),
        sep(rows_s as u64)
    );
    let _ = writeln!(
        s,
        "values        {}  ->  {} values/s",
        sep(m.rows * fields as u64),
        sep((rows_s * fields) as u64)
    );
    let _ = writeln!(
        s,
        "body          {:.1} MB/s sent ({:.1} MB/s of line protocol{})",
        m.wire_bytes as f64 / 1e6 / secs,
        m.raw_bytes as f64 / 1e6 / secs,
        if cli.gzip && m.wire_bytes > 0 {
            format!(
                ", gzip ratio {:.1}x",
                m.raw_bytes as f64 / m.wire_bytes as f64
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        s,
        "requests      {} ok ({:.1}/s) | 2xx {} 4xx {} 5xx {} 503 {} other {} | transport \
         errors {} | retries {} | failed {} ({} rows)",
        sep(m.requests_ok),
        m.requests_ok as f64 / secs,
        m.s2xx,
        m.s4xx,
        m.s5xx,
        m.s503,
        m.other_status,
        m.transport_errors,
        m.retries,
        m.failed_requests,
        sep(m.failed_rows)
    );
    let _ = writeln!(
        s,
        "ack latency   p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  mean {:.2} ms",
        ms(h.quantile(0.5)),
        ms(h.quantile(0.9)),
        ms(h.quantile(0.99)),
        ms(h.max()),
        h.mean() / 1000.0
    );
    if cli.pid.is_some() {
        let _ = writeln!(
            s,
            "server RSS    min {:.1} MiB  max {:.1} MiB  last {:.1} MiB ({} samples{})",
            rss.min as f64 / 1024.0,
            rss.max as f64 / 1024.0,
            rss.last as f64 / 1024.0,
            rss.samples,
            if rss.gone { ", PROCESS GONE" } else { "" }
        );
    }
    if let Some(c) = server_cores {
        let _ = writeln!(
            s,
            "server CPU    {c:.2} cores (avg over the measured window)"
        );
    }
    if let Some(c) = self_cores {
        let _ = writeln!(
            s,
            "loadgen CPU   {c:.2} cores; body prep {:.2} s{}",
            st.prep_secs,
            if st.compressed_during_run > 0 {
                format!(
                    " ({} bodies re-compressed during the run)",
                    st.compressed_during_run
                )
            } else {
                String::new()
            }
        );
    }
    if total_failed > 0 {
        let _ = writeln!(
            s,
            "WARNING       {} rows were not acknowledged",
            sep(total_failed)
        );
    }

    let json = serde_json::json!({
        "url": url,
        "connections": cli.connections,
        "batch_size": cli.batch_size,
        "gzip": cli.gzip,
        "gzip_level": cli.gzip.then_some(cli.gzip_level),
        "hosts": cli.hosts,
        "fields_per_row": tsbs::FIELDS.len(),
        "warmup_secs": warmup.as_secs_f64(),
        "measured_secs": secs,
        "rows": m.rows,
        "values": m.rows * fields as u64,
        "rows_per_sec": rows_s,
        "values_per_sec": rows_s * fields,
        "wire_mb_per_sec": m.wire_bytes as f64 / 1e6 / secs,
        "lp_mb_per_sec": m.raw_bytes as f64 / 1e6 / secs,
        "wire_bytes": m.wire_bytes,
        "lp_bytes": m.raw_bytes,
        "requests_ok": m.requests_ok,
        "status_2xx": m.s2xx,
        "status_4xx": m.s4xx,
        "status_5xx": m.s5xx,
        "status_503": m.s503,
        "status_other": m.other_status,
        "transport_errors": m.transport_errors,
        "retries": m.retries,
        "failed_requests": m.failed_requests,
        "failed_rows": m.failed_rows,
        "latency_ms": {
            "p50": ms(h.quantile(0.5)),
            "p90": ms(h.quantile(0.9)),
            "p99": ms(h.quantile(0.99)),
            "max": ms(h.max()),
            "mean": h.mean() / 1000.0,
            "count": h.count(),
        },
        "warmup": { "rows": w.rows, "requests_ok": w.requests_ok, "failed_rows": w.failed_rows },
        "total_rows_acked": total_rows,
        "server_rss_kib": cli.pid.map(|_| serde_json::json!({
            "min": rss.min, "max": rss.max, "last": rss.last, "samples": rss.samples,
            "process_gone": rss.gone,
        })),
        "server_cpu_cores": server_cores,
        "loadgen_cpu_cores": self_cores,
        "prep_secs": st.prep_secs,
        "bodies_compressed_during_run": st.compressed_during_run,
        "start_ns": start_ns,
    });
    let exit = if total_rows == 0 {
        ExitCode::from(2)
    } else if total_failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    };
    Ok(Outcome {
        summary: s,
        json,
        exit,
    })
}

fn prepare(cli: &Cli) -> Result<(BodyPool, i64), String> {
    if cli.connections == 0 || cli.batch_size == 0 || cli.hosts == 0 || cli.pool == 0 {
        return Err("--connections, --batch-size, --hosts and --pool must be positive".into());
    }
    if cli.rows == Some(0) {
        return Err("--rows must be positive".into());
    }
    let interval = parse_duration_ns(&cli.interval).map_err(|e| format!("--interval: {e}"))?;
    if interval <= 0 {
        return Err("--interval must be positive".into());
    }
    let start = parse_time(&cli.start, now_ns()).map_err(|e| format!("--start: {e}"))?;
    let start = start - start.rem_euclid(interval.min(NS_PER_SEC * 86400));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let t = Instant::now();
    let pool = BodyPool::build(
        &PoolConfig {
            seed: cli.seed,
            hosts: cli.hosts,
            start_ns: start,
            interval_ns: interval,
            decimals: cli.decimals,
            batch_size: cli.batch_size,
            pool_bodies: cli.pool,
            gzip_level: cli.gzip.then_some(cli.gzip_level),
            total_rows: cli.rows,
            reuse: cli.reuse_bodies,
            max_pool_bytes: cli.max_pool_mb << 20,
            threads,
        },
        |msg| eprintln!("{msg}"),
    )?;
    eprintln!(
        "built {} request bodies in {:.2?} ({:.1} MB in memory)",
        pool.len(),
        t.elapsed(),
        pool.memory_bytes() as f64 / 1e6
    );
    Ok((pool, start))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let fail = |e: String| {
        eprintln!("historian-loadgen: {e}");
        ExitCode::from(3)
    };
    let (pool, start) = match prepare(&cli) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("tokio runtime: {e}")),
    };
    let json = cli.json;
    match rt.block_on(run(cli, pool, start)) {
        Ok(o) => {
            if json {
                eprint!("{}", o.summary);
                println!("{}", o.json);
            } else {
                print!("{}", o.summary);
            }
            o.exit
        }
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A minimal HTTP/1.1 sink: answers 204 (or 503 with Retry-After for the first
    /// `fail_first` requests); returns the address and the count of lines received.
    async fn sink(fail_first: usize) -> (String, Arc<AtomicU64>, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let lines = Arc::new(AtomicU64::new(0));
        let reqs = Arc::new(AtomicUsize::new(0));
        let (lines2, reqs2) = (lines.clone(), reqs.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let lines = lines2.clone();
                let reqs = reqs2.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 65536];
                    loop {
                        // read headers
                        let hdr_end = loop {
                            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break p + 4;
                            }
                            let n = s.read(&mut tmp).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&tmp[..n]);
                        };
                        let head = String::from_utf8_lossy(&buf[..hdr_end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map(|v| v.trim().parse().unwrap())
                            .unwrap_or(0);
                        while buf.len() < hdr_end + len {
                            let n = s.read(&mut tmp).await.unwrap_or(0);
                            if n == 0 {
                                return;
                            }
                            buf.extend_from_slice(&tmp[..n]);
                        }
                        let body: Vec<u8> = buf[hdr_end..hdr_end + len].to_vec();
                        buf.drain(..hdr_end + len);
                        let n = reqs.fetch_add(1, Ordering::SeqCst);
                        let resp: &[u8] = if n < fail_first {
                            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 0\r\ncontent-length: 4\r\n\r\nbusy"
                        } else {
                            let text = if head.contains("content-encoding: gzip") {
                                let mut s = String::new();
                                use std::io::Read;
                                flate2::read::GzDecoder::new(&body[..])
                                    .read_to_string(&mut s)
                                    .unwrap();
                                s
                            } else {
                                String::from_utf8(body).unwrap()
                            };
                            lines.fetch_add(text.lines().count() as u64, Ordering::SeqCst);
                            b"HTTP/1.1 204 No Content\r\n\r\n"
                        };
                        s.write_all(resp).await.unwrap();
                    }
                });
            }
        });
        (addr, lines, reqs)
    }

    async fn run_against(args: &[&str], fail_first: usize) -> (serde_json::Value, u64, usize) {
        let (addr, lines, reqs) = sink(fail_first).await;
        let url = format!("http://{addr}");
        let mut argv = vec!["historian-loadgen", "--url", &url, "--start", "2026-01-01"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).unwrap();
        let (pool, start) = prepare(&cli).unwrap();
        let out = run(cli, pool, start).await.unwrap();
        (
            out.json,
            lines.load(Ordering::SeqCst),
            reqs.load(Ordering::SeqCst),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_mode_sends_exactly_n_rows() {
        let (j, lines, _) = run_against(
            &[
                "--rows",
                "2345",
                "--batch-size",
                "100",
                "--hosts",
                "10",
                "--connections",
                "3",
                "--pool",
                "4",
            ],
            0,
        )
        .await;
        assert_eq!(lines, 2345);
        assert_eq!(j["rows"], 2345);
        assert_eq!(j["values"], 23450);
        assert_eq!(j["status_2xx"], 24);
        assert_eq!(j["failed_rows"], 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gzip_and_503_retries() {
        let (j, lines, reqs) = run_against(
            &[
                "--rows",
                "1000",
                "--batch-size",
                "100",
                "--hosts",
                "10",
                "--connections",
                "2",
                "--gzip",
                "--gzip-level",
                "1",
            ],
            3,
        )
        .await;
        assert_eq!(lines, 1000);
        assert_eq!(j["rows"], 1000);
        assert_eq!(j["status_503"], 3);
        assert_eq!(j["retries"], 3);
        assert_eq!(reqs, 13);
        assert!(j["lp_bytes"].as_u64().unwrap() > j["wire_bytes"].as_u64().unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duration_mode_runs_and_reports() {
        let (j, lines, _) = run_against(
            &[
                "--duration",
                "1s",
                "--warmup",
                "200ms",
                "--batch-size",
                "50",
                "--hosts",
                "5",
                "--pool",
                "2",
                "--connections",
                "2",
                "--pid",
                &std::process::id().to_string(),
            ],
            0,
        )
        .await;
        assert!(j["rows"].as_u64().unwrap() > 0);
        assert!(lines >= j["rows"].as_u64().unwrap());
        assert!(j["measured_secs"].as_f64().unwrap() > 0.5);
        assert!(j["server_rss_kib"]["max"].as_u64().unwrap() > 0);
        assert!(j["latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn helpers() {
        assert_eq!(sep(1234567), "1,234,567");
        assert_eq!(sep(12), "12");
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static("2"))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(Some(&HeaderValue::from_static("Wed, 21 Oct"))),
            None
        );
        assert!(backoff(10, 3) <= Duration::from_secs(2));
        let cli =
            Cli::try_parse_from(["x", "--gzip", "--header", "X-A: b", "--token", "t"]).unwrap();
        let h = request_headers(&cli).unwrap();
        assert_eq!(h["content-encoding"], "gzip");
        assert_eq!(h["x-a"], "b");
        assert_eq!(h["authorization"], "Bearer t");
        assert!(Cli::try_parse_from(["x", "--rows", "5", "--duration", "1s"]).is_err());
    }
}
