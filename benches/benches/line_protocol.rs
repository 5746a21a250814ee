//! Throughput of the line protocol parser on a TSBS "cpu-only" style body: the shape of the
//! ingest benchmark, so a regression here shows up before it does end to end.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ingest::line_protocol::parse_lines;

const LINES: usize = 10_000;

/// A body like the one TSBS generates for its cpu-only use case: 10 tags, 10 float fields
/// and a nanosecond timestamp per line, 100 hosts reporting every 10 s.
fn tsbs_cpu_body() -> Vec<u8> {
    const REGIONS: [(&str, &str); 3] = [
        ("eu-west-1", "eu-west-1a"),
        ("us-east-1", "us-east-1b"),
        ("ap-southeast-2", "ap-southeast-2a"),
    ];
    const FIELDS: [&str; 10] = historian_benches::tsbs::FIELDS;
    // A fixed LCG keeps the body identical between runs without a rand dependency here.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed >> 33
    };
    let mut body = String::with_capacity(LINES * 400);
    for i in 0..LINES {
        let host = i % 100;
        let (region, datacenter) = REGIONS[host % REGIONS.len()];
        body.push_str(&format!(
            "cpu,hostname=host_{host},region={region},datacenter={datacenter},rack={},os=Ubuntu16.10,arch=x86,team=SF,service={},service_version={},service_environment=test ",
            host % 50,
            host % 20,
            host % 2
        ));
        for (f, name) in FIELDS.iter().enumerate() {
            if f > 0 {
                body.push(',');
            }
            let value = next() % 1_000_000;
            body.push_str(&format!("{name}={}.{}", value / 10_000, value % 10_000));
        }
        let timestamp = 1_451_606_400_000_000_000u64 + (i / 100) as u64 * 10_000_000_000;
        body.push_str(&format!(" {timestamp}\n"));
    }
    body.into_bytes()
}

fn bench(c: &mut Criterion) {
    let body = tsbs_cpu_body();
    assert_eq!(parse_lines(&body).filter(Result::is_ok).count(), LINES);

    let mut group = c.benchmark_group("line_protocol");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("tsbs_cpu_10k/bytes", |b| {
        b.iter(|| {
            parse_lines(black_box(&body))
                .map(|line| black_box(line).is_ok() as usize)
                .sum::<usize>()
        })
    });
    group.throughput(Throughput::Elements(LINES as u64));
    group.bench_function("tsbs_cpu_10k/lines", |b| {
        b.iter(|| {
            parse_lines(black_box(&body))
                .map(|line| black_box(line).is_ok() as usize)
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
