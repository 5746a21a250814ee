//! CPU of one write request of 10,000 MES events, with the table's privacy profile and
//! without: validation (with pseudonyms and AES-256-GCM cells when profiled), the WAL
//! encoding and the buffer's sort, as the server does them per request. The end-to-end
//! comparison is `benches/scripts/privacy-ingest.sh`; this one isolates the privacy step
//! from the network, the disk and the scheduler.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use historian_benches::mes::{MesConfig, MesGen};
use ingest::buffer::WriteBuffer;
use ingest::line_protocol::{Precision, parse_lines};
use ingest::wal::EncodedRecord;
use ingest::{Catalog, IngestMetrics, Limits};
use privacy::{Keyring, MasterKey};
use store::TableOptions;

const LINES: usize = 10_000;

/// The first 10,000 `mes_event` lines of `privacy-ingest.sh`'s data (seed 1, 100 machines).
fn mes_events() -> Vec<u8> {
    let mut generator = MesGen::new(&MesConfig {
        seed: 1,
        lines: 10,
        machines: 10,
        start_ns: 1_793_491_200_000_000_000,
        interval_ns: 60_000_000_000,
        event_rate: 20.0,
    });
    let mut body = Vec::new();
    let mut lines = 0;
    let mut tick = Vec::new();
    while lines < LINES {
        tick.clear();
        generator.write_tick(&mut tick);
        for line in tick.split_inclusive(|b| *b == b'\n') {
            if lines < LINES && line.starts_with(b"mes_event") {
                body.extend_from_slice(line);
                lines += 1;
            }
        }
    }
    body
}

/// The profile of `privacy-ingest.sh`: the subjects and allow-list of
/// `testdata/historian.toml`, everything else (partitions, key period) at its default.
fn profile() -> TableOptions {
    serde_json::from_value(serde_json::json!({
        "columns": ["plant", "line", "machine", "event", "job_id", "alarm_code", "result"],
        "subjects": {"operator_id": ["operator_name", "badge_id"], "supervisor_id": []}
    }))
    .expect("a valid profile")
}

fn bench(c: &mut Criterion) {
    let body = mes_events();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let keyring = Arc::new(
        Keyring::init(dir.path(), MasterKey::generate().expect("a master key")).expect("keyring"),
    );
    let plain = Catalog::new(Limits::default(), HashMap::new(), None);
    let profiled = Catalog::new(
        Limits::default(),
        HashMap::from([("mes_event".to_string(), profile())]),
        Some(keyring),
    );
    let now = 1_800_000_000_000_000_000;
    let request = |catalog: &Catalog| {
        let validated = catalog
            .validate_for(
                "bench",
                parse_lines(&body),
                LINES,
                Precision::Nanosecond,
                now,
                None,
            )
            .expect("a valid database");
        assert_eq!(validated.lines_accepted, LINES, "{:?}", validated.rejected);
        validated
    };
    let mut group = c.benchmark_group("privacy_ingest");
    group.throughput(Throughput::Elements(LINES as u64));
    for (name, catalog) in [("off", &plain), ("on", &profiled)] {
        request(catalog);
        group.bench_function(format!("validate_10k/{name}"), |b| {
            b.iter(|| black_box(request(catalog)))
        });
        group.bench_function(format!("request_10k/{name}"), |b| {
            b.iter(|| {
                let validated = request(catalog);
                let record =
                    EncodedRecord::encode("bench", validated.writes).expect("encodable writes");
                let buffer = WriteBuffer::new(usize::MAX, Arc::new(IngestMetrics::default()));
                let encoded = record.encoded_len();
                buffer.insert(1, record.into_writes());
                black_box((encoded, buffer.bytes()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
