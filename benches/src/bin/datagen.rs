//! historian-datagen: deterministic line-protocol generator (same seed, same bytes).
//!
//! ```text
//! historian-datagen tsbs --seed 1 --start 2026-01-01T00:00:00Z --duration 1h --hosts 10 --out cpu.lp
//! historian-datagen mes  --seed 1 --lines 2 --machines 3 --interval 10s --out mes.lp.gz
//! ```

use clap::{Args, Parser, Subcommand};
use flate2::Compression;
use flate2::write::GzEncoder;
use historian_benches::mes::{MesConfig, MesGen};
use historian_benches::time::{format_rfc3339, now_ns, parse_duration_ns, parse_time};
use historian_benches::tsbs::TsbsGen;
use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "historian-datagen",
    version,
    about = "Deterministic InfluxDB line-protocol generator (same seed => same bytes)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// TSBS cpu-only: per host 10 tags and 10 float fields (usage_*), one row per host per
    /// interval.
    Tsbs(TsbsArgs),
    /// A factory: `machine` signals per interval and operator-linked `mes_event` rows.
    Mes(MesArgs),
}

#[derive(Args, Debug)]
struct Common {
    /// PRNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// First timestamp: RFC 3339 (2026-01-01T00:00:00Z), integer ns, `now` or `now-1d`.
    #[arg(long, default_value = "2026-01-01T00:00:00Z")]
    start: String,
    /// Time span to generate (e.g. 1h, 30m, 1d).
    #[arg(long, default_value = "1h")]
    duration: String,
    /// Sampling interval (default: 10s for tsbs, 1s for mes).
    #[arg(long)]
    interval: Option<String>,
    /// Output file; `.gz` suffix gzips; `-` is stdout.
    #[arg(long, short, default_value = "-")]
    out: String,
    /// Gzip level for `.gz` output.
    #[arg(long, default_value_t = 6)]
    gzip_level: u32,
}

#[derive(Args, Debug)]
struct TsbsArgs {
    #[command(flatten)]
    common: Common,
    /// Number of hosts.
    #[arg(long, default_value_t = 100)]
    hosts: usize,
    /// Round values to this many decimals (default: full f64 precision, like TSBS).
    #[arg(long)]
    decimals: Option<u32>,
}

#[derive(Args, Debug)]
struct MesArgs {
    #[command(flatten)]
    common: Common,
    /// Production lines.
    #[arg(long, default_value_t = 4)]
    lines: usize,
    /// Machines per line.
    #[arg(long, default_value_t = 5)]
    machines: usize,
    /// Event-rate multiplier (1.0: ~10 events per machine per hour).
    #[arg(long, default_value_t = 1.0)]
    event_rate: f64,
}

struct Span {
    start: i64,
    end: i64,
    interval: i64,
}

fn span(c: &Common, default_interval: &str) -> Result<Span, String> {
    let start = parse_time(&c.start, now_ns())?;
    let duration = parse_duration_ns(&c.duration)?;
    let interval = parse_duration_ns(c.interval.as_deref().unwrap_or(default_interval))?;
    if interval <= 0 {
        return Err("--interval must be positive".into());
    }
    Ok(Span {
        start,
        end: start + duration,
        interval,
    })
}

fn open_out(path: &str, level: u32) -> Result<Box<dyn Write>, String> {
    let sink: Box<dyn Write> = if path == "-" {
        Box::new(io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?)
    };
    let sink = BufWriter::with_capacity(1 << 20, sink);
    Ok(if path.ends_with(".gz") {
        Box::new(GzEncoder::new(sink, Compression::new(level)))
    } else {
        Box::new(sink)
    })
}

/// Generate into `out`, flushing the buffer every ~1 MiB; returns (lines, bytes).
fn generate(cmd: &Cmd, out: &mut dyn Write) -> Result<(u64, u64), String> {
    let mut buf = Vec::with_capacity(2 << 20);
    let (mut lines, mut bytes) = (0u64, 0u64);
    let mut flush = |buf: &mut Vec<u8>, force: bool| -> io::Result<()> {
        if force || buf.len() >= 1 << 20 {
            lines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
            bytes += buf.len() as u64;
            out.write_all(buf)?;
            buf.clear();
        }
        Ok(())
    };
    let io_err = |e: io::Error| format!("write: {e}");
    match cmd {
        Cmd::Tsbs(a) => {
            let s = span(&a.common, "10s")?;
            if a.hosts == 0 {
                return Err("--hosts must be positive".into());
            }
            let mut g = TsbsGen::new(a.common.seed, a.hosts, s.start, s.interval, a.decimals);
            while g.next_ts() < s.end {
                g.write_interval(&mut buf);
                flush(&mut buf, false).map_err(io_err)?;
            }
        }
        Cmd::Mes(a) => {
            let s = span(&a.common, "1s")?;
            if a.lines == 0 || a.machines == 0 {
                return Err("--lines and --machines must be positive".into());
            }
            if !(a.event_rate > 0.0 && a.event_rate.is_finite()) {
                return Err("--event-rate must be positive".into());
            }
            let mut g = MesGen::new(&MesConfig {
                seed: a.common.seed,
                lines: a.lines,
                machines: a.machines,
                start_ns: s.start,
                interval_ns: s.interval,
                event_rate: a.event_rate,
            });
            while g.next_ts() < s.end {
                g.write_tick(&mut buf);
                flush(&mut buf, false).map_err(io_err)?;
            }
        }
    }
    flush(&mut buf, true).map_err(io_err)?;
    out.flush().map_err(io_err)?;
    Ok((lines, bytes))
}

fn run(cli: &Cli) -> Result<(), String> {
    let common = match &cli.cmd {
        Cmd::Tsbs(a) => &a.common,
        Cmd::Mes(a) => &a.common,
    };
    let mut out = open_out(&common.out, common.gzip_level)?;
    let t0 = std::time::Instant::now();
    let (lines, bytes) = generate(&cli.cmd, &mut out)?;
    drop(out); // finishes the gzip stream
    if common.out != "-" {
        let start = parse_time(&common.start, now_ns())?;
        eprintln!(
            "wrote {lines} lines ({:.2} MB of line protocol) from {} to {} in {:.2?}",
            bytes as f64 / 1e6,
            format_rfc3339(start),
            common.out,
            t0.elapsed()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("historian-datagen: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen_cli(args: &[&str]) -> Vec<u8> {
        let mut argv = vec!["historian-datagen"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).unwrap();
        let mut out = Vec::new();
        generate(&cli.cmd, &mut out).unwrap();
        out
    }

    fn testdata(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    // Keep in sync with testdata/README.md.
    const TSBS_SAMPLE: &[&str] = &[
        "tsbs",
        "--seed",
        "1",
        "--start",
        "2026-01-01T00:00:00Z",
        "--duration",
        "1h",
        "--interval",
        "10s",
        "--hosts",
        "10",
        "--decimals",
        "2",
    ];
    const MES_SAMPLE: &[&str] = &[
        "mes",
        "--seed",
        "1",
        "--start",
        "2026-01-01T05:30:00Z",
        "--duration",
        "1h",
        "--interval",
        "10s",
        "--lines",
        "2",
        "--machines",
        "3",
        "--event-rate",
        "2",
    ];

    #[test]
    fn tsbs_is_deterministic_and_sized() {
        let a = gen_cli(&["tsbs", "--seed", "7", "--hosts", "3", "--duration", "2m"]);
        let b = gen_cli(&["tsbs", "--seed", "7", "--hosts", "3", "--duration", "2m"]);
        assert_eq!(a, b);
        assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), 3 * 12);
        let c = gen_cli(&["tsbs", "--seed", "8", "--hosts", "3", "--duration", "2m"]);
        assert_ne!(a, c);
    }

    #[test]
    fn mes_is_deterministic() {
        let args = ["mes", "--seed", "3", "--lines", "1", "--duration", "30m"];
        assert_eq!(gen_cli(&args), gen_cli(&args));
    }

    #[test]
    fn committed_samples_match_generator() {
        assert!(
            gen_cli(TSBS_SAMPLE) == testdata("tsbs-cpu-sample.lp"),
            "testdata/tsbs-cpu-sample.lp differs from the generator: regenerate it (see \
             testdata/README.md) or fix the change that broke determinism"
        );
        assert!(
            gen_cli(MES_SAMPLE) == testdata("mes-sample.lp"),
            "testdata/mes-sample.lp differs from the generator: regenerate it (see \
             testdata/README.md) or fix the change that broke determinism"
        );
    }

    #[test]
    fn gzip_output_roundtrips() {
        let dir = std::env::temp_dir().join(format!("datagen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.lp.gz");
        let p = path.to_str().unwrap();
        let cli = Cli::try_parse_from([
            "historian-datagen",
            "tsbs",
            "--hosts",
            "2",
            "--duration",
            "1m",
            "--out",
            p,
        ])
        .unwrap();
        run(&cli).unwrap();
        let mut s = Vec::new();
        use std::io::Read;
        flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
            .read_to_end(&mut s)
            .unwrap();
        assert_eq!(s, gen_cli(&["tsbs", "--hosts", "2", "--duration", "1m"]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
