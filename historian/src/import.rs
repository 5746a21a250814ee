//! `historian import`: bulk-loads line-protocol files (`.lp`, `.lp.gz`) into a running
//! server through its write API, with a progress bar and a summary.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// Options of `historian import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// Files to load: `.lp` or `.lp.gz`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub server: crate::client::ServerArgs,
    /// Target database.
    #[arg(long)]
    pub db: String,
    /// Timestamp precision of the files: ns, us, ms, s or auto.
    #[arg(long, default_value = "ns")]
    pub precision: String,
    /// Lines per request.
    #[arg(long, default_value_t = 10_000)]
    pub batch_lines: usize,
    /// No progress bar (for scripts).
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Default)]
struct Totals {
    lines: u64,
    written: u64,
    rejected: u64,
}

/// Runs the import; returns an error if the server is unreachable or refuses a request.
pub async fn run(args: ImportArgs) -> Result<(), Box<dyn std::error::Error>> {
    let client = args.server.client()?;
    let endpoint = args.server.endpoint(&format!(
        "/api/v3/write_lp?db={}&precision={}",
        args.db, args.precision
    ));
    let total_bytes: u64 = args
        .files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .sum();
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total_bytes)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut totals = Totals::default();
    for path in &args.files {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let counted = CountingReader {
            inner: file,
            bar: bar.clone(),
        };
        let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::read::MultiGzDecoder::new(counted))
        } else {
            Box::new(counted)
        };
        let mut lines = BufReader::with_capacity(1 << 20, reader);
        let mut batch = String::new();
        let mut in_batch = 0usize;
        let mut first_line = totals.lines + 1;
        let mut line = String::new();
        loop {
            line.clear();
            let n = lines
                .read_line(&mut line)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if n > 0 {
                batch.push_str(&line);
                if !line.ends_with('\n') {
                    batch.push('\n');
                }
                in_batch += 1;
                totals.lines += 1;
            }
            if (n == 0 && in_batch > 0) || in_batch >= args.batch_lines {
                post(
                    &client,
                    &endpoint,
                    &batch,
                    in_batch,
                    first_line,
                    path,
                    &mut totals,
                )
                .await?;
                bar.set_message(format!(
                    "{} rows, {} rejected",
                    totals.written, totals.rejected
                ));
                batch.clear();
                in_batch = 0;
                first_line = totals.lines + 1;
            }
            if n == 0 {
                break;
            }
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {} rows from {} lines in {:.1}s ({:.0} rows/s); {} lines rejected",
        totals.written,
        totals.lines,
        secs,
        totals.written as f64 / secs.max(1e-9),
        totals.rejected
    );
    Ok(())
}

async fn post(
    client: &reqwest::Client,
    endpoint: &str,
    batch: &str,
    lines: usize,
    first_line: u64,
    path: &std::path::Path,
    totals: &mut Totals,
) -> Result<(), Box<dyn std::error::Error>> {
    loop {
        let resp = client.post(endpoint).body(batch.to_string()).send().await?;
        let status = resp.status();
        if status.as_u16() == 503 {
            let wait = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
            continue;
        }
        if status.is_success() {
            totals.written += lines as u64;
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if status.as_u16() == 400 && body.get("lines_written").is_some() {
            let written = body["lines_written"].as_u64().unwrap_or(0);
            let rejected = body["lines_rejected"].as_u64().unwrap_or(0);
            totals.written += written;
            totals.rejected += rejected;
            for e in body["data"].as_array().into_iter().flatten().take(5) {
                let n = e["line_number"].as_u64().unwrap_or(0);
                eprintln!(
                    "{}:{}: {}",
                    path.display(),
                    first_line + n.saturating_sub(1),
                    e["error_message"].as_str().unwrap_or("rejected")
                );
            }
            return Ok(());
        }
        return Err(format!("server answered {status}: {body}").into());
    }
}

struct CountingReader<R> {
    inner: R,
    bar: ProgressBar,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}
