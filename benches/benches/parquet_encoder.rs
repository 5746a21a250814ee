//! Throughput of the flush path from buffered batches to Parquet bytes, on TSBS "cpu-only"
//! rows: concatenation and sort/dedup (`ingest::dedup`), then the Parquet encoder with the
//! persister's writer settings, then both together as one flush does.
//!
//! The persister writes through `AsyncArrowWriter` into an object store; here the sync
//! `ArrowWriter` writes into a `Vec<u8>`, so only the encoding is measured, not the upload.
//!
//! `compaction_merge` measures compaction's k-way merge (`ingest::merge::SortedMerge`) over
//! four flushed files of the same partition: every file holds every host, at later times
//! than the one before, as a partition's flushes do.

use std::hint::black_box;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Builder, StringDictionaryBuilder, TimestampNanosecondBuilder};
use arrow::datatypes::{Field, Int32Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use historian_benches::tsbs;
use ingest::buffer::with_seq;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use store::dedup::{concat_aligned, sort_dedup};
use store::{ColumnType, TableSchema};

/// Hosts reporting; every host sends one row per timestamp.
const HOSTS: usize = 1_000;
/// Timestamps, 10 s apart.
const TIMESTAMPS: usize = 100;
/// Timestamps per buffered batch: 5 x 1000 hosts = 5000 rows, 20 batches.
const TIMESTAMPS_PER_BATCH: usize = 5;
/// Flushed files the compaction bench merges (20 batches, 5 per file).
const FLUSHES: usize = 4;
const ROWS: usize = HOSTS * TIMESTAMPS;
/// The persister's zstd levels: flushes, then compaction.
const FLUSH_ZSTD: i32 = 1;
const COMPACT_ZSTD: i32 = 3;
/// `Persister::write_file` writes the batch in slices of this many rows.
const WRITE_STEP: usize = 65_536;

/// The TSBS cpu tag keys, fields and regions of the generators, so the bench data has their shape.
const TAGS: [&str; 10] = tsbs::TAG_KEYS;
const FIELDS: [&str; 10] = tsbs::FIELDS;
const REGIONS: [(&str, &[&str]); 9] = tsbs::REGIONS;
const OS: [&str; 3] = ["Ubuntu16.10", "Ubuntu16.04LTS", "Ubuntu15.10"];
const ARCH: [&str; 2] = ["x64", "x86"];
const TEAM: [&str; 4] = ["SF", "NYC", "LON", "CHI"];
const ENVIRONMENT: [&str; 3] = ["production", "staging", "test"];

/// A fixed LCG: the same data on every run, without a rand dependency.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn pick(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The tag values of each host, in `TAGS` order, drawn once as TSBS does.
fn host_tags(rng: &mut Lcg) -> Vec<[String; 10]> {
    (0..HOSTS)
        .map(|h| {
            let region = REGIONS[rng.pick(REGIONS.len())].0;
            let datacenter = format!("{region}{}", ['a', 'b', 'c'][rng.pick(3)]);
            [
                format!("host_{h}"),
                region.to_string(),
                datacenter,
                rng.pick(100).to_string(),
                OS[rng.pick(OS.len())].to_string(),
                ARCH[rng.pick(ARCH.len())].to_string(),
                TEAM[rng.pick(TEAM.len())].to_string(),
                rng.pick(20).to_string(),
                rng.pick(2).to_string(),
                ENVIRONMENT[rng.pick(ENVIRONMENT.len())].to_string(),
            ]
        })
        .collect()
}

/// The `cpu` table as the catalog holds it: tags sorted by name, `time`, fields in arrival
/// order.
fn table_schema() -> TableSchema {
    let mut schema = TableSchema::new();
    for tag in TAGS {
        schema.add_column(tag, ColumnType::Tag);
    }
    for field in FIELDS {
        schema.add_column(field, ColumnType::Float);
    }
    schema
}

/// The write buffer's batches for one partition: each built as the catalog builds a write's
/// batch (own dictionaries, columns in table order), then given its `_seq` column. Rows
/// arrive time-ordered, all hosts per timestamp, as collectors send them.
fn buffered_batches(schema: &TableSchema) -> Vec<RecordBatch> {
    let mut rng = Lcg(0x9E37_79B9_7F4A_7C15);
    let hosts = host_tags(&mut rng);
    let start: i64 = 1_451_606_400_000_000_000;
    let rows_per_batch = HOSTS * TIMESTAMPS_PER_BATCH;
    let mut seq = 1;
    let mut batches = Vec::new();
    for first_ts in (0..TIMESTAMPS).step_by(TIMESTAMPS_PER_BATCH) {
        let mut tags: Vec<StringDictionaryBuilder<Int32Type>> = TAGS
            .iter()
            .map(|_| StringDictionaryBuilder::new())
            .collect();
        let mut time = TimestampNanosecondBuilder::with_capacity(rows_per_batch);
        let mut fields: Vec<Float64Builder> = FIELDS
            .iter()
            .map(|_| Float64Builder::with_capacity(rows_per_batch))
            .collect();
        for ts in first_ts..first_ts + TIMESTAMPS_PER_BATCH {
            for host in &hosts {
                for (b, v) in tags.iter_mut().zip(host) {
                    b.append_value(v);
                }
                time.append_value(start + ts as i64 * 10_000_000_000);
                for b in &mut fields {
                    // 0..100 with two decimals.
                    b.append_value(rng.pick(10_000) as f64 / 100.0);
                }
            }
        }
        let mut tags: Vec<Option<ArrayRef>> = tags
            .iter_mut()
            .map(|b| Some(Arc::new(b.finish()) as ArrayRef))
            .collect();
        let mut fields: Vec<Option<ArrayRef>> = fields
            .iter_mut()
            .map(|b| Some(Arc::new(b.finish()) as ArrayRef))
            .collect();
        let mut time = Some(Arc::new(time.finish()) as ArrayRef);
        let mut schema_fields = Vec::new();
        let mut columns = Vec::new();
        for c in &schema.columns {
            let array = match c.column_type {
                ColumnType::Time => time.take(),
                ColumnType::Tag => TAGS
                    .iter()
                    .position(|t| *t == c.name)
                    .and_then(|i| tags[i].take()),
                _ => FIELDS
                    .iter()
                    .position(|f| *f == c.name)
                    .and_then(|i| fields[i].take()),
            };
            let array = array.expect("every table column is built once");
            let nullable = c.column_type != ColumnType::Time;
            schema_fields.push(Field::new(&c.name, c.column_type.data_type(), nullable));
            columns.push(array);
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(schema_fields)), columns)
            .expect("columns of one length and their declared types");
        batches.push(with_seq(&batch, seq));
        seq += batch.num_rows() as u64;
    }
    batches
}

/// The first half of a flush: one sorted, deduplicated batch.
fn sort(batches: &[RecordBatch], target: &SchemaRef) -> RecordBatch {
    let all = concat_aligned(batches, target).expect("batches align to the table schema");
    sort_dedup(&all).expect("the batch has time and _seq")
}

/// The persister's own Parquet settings.
fn writer_props(batch: &RecordBatch, zstd_level: i32) -> WriterProperties {
    ingest::persist::writer_props(&batch.schema(), zstd_level)
}

/// The second half of a flush: the batch as a Parquet file, written in slices as
/// `Persister::write_file` does.
fn encode(batch: &RecordBatch, zstd_level: i32) -> Vec<u8> {
    let props = writer_props(batch, zstd_level);
    let mut writer =
        ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props)).expect("valid schema");
    let mut offset = 0;
    while offset < batch.num_rows() {
        let len = WRITE_STEP.min(batch.num_rows() - offset);
        writer
            .write(&batch.slice(offset, len))
            .expect("in-memory write");
        offset += len;
    }
    writer.into_inner().expect("in-memory close")
}

fn bench(c: &mut Criterion) {
    let schema = table_schema();
    let target = schema.arrow_schema();
    let batches = buffered_batches(&schema);
    assert_eq!(
        batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
        ROWS
    );
    let sorted = sort(&batches, &target);
    // TSBS never repeats a series and time: nothing to merge, the no-duplicate path runs.
    assert_eq!(sorted.num_rows(), ROWS);
    eprintln!(
        "parquet_encoder: {} batches, {ROWS} rows, {} columns, sorted batch {} bytes in memory",
        batches.len(),
        sorted.num_columns(),
        sorted.get_array_memory_size()
    );
    for level in [FLUSH_ZSTD, COMPACT_ZSTD] {
        let file = encode(&sorted, level);
        let len = file.len();
        let reader = SerializedFileReader::new(bytes::Bytes::from(file)).expect("valid file");
        let meta = reader.metadata();
        assert_eq!(meta.file_metadata().num_rows(), ROWS as i64);
        eprintln!(
            "parquet_encoder: zstd {level}: {len} bytes, {:.2} bytes/row, {} row group(s)",
            len as f64 / ROWS as f64,
            meta.num_row_groups()
        );
    }

    let mut group = c.benchmark_group("sort_dedup");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    group.bench_function("tsbs_cpu_100k", |b| {
        b.iter(|| sort(black_box(&batches), &target))
    });
    group.finish();

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    for level in [FLUSH_ZSTD, COMPACT_ZSTD] {
        group.bench_with_input(
            BenchmarkId::new("tsbs_cpu_100k/zstd", level),
            &level,
            |b, &level| b.iter(|| encode(black_box(&sorted), level).len()),
        );
    }
    group.finish();

    let files: Vec<bytes::Bytes> = batches
        .chunks(batches.len() / FLUSHES)
        .map(|chunk| bytes::Bytes::from(encode(&sort(chunk, &target), FLUSH_ZSTD)))
        .collect();
    let merge = |files: &[bytes::Bytes]| {
        let mut merge =
            ingest::merge::SortedMerge::new(files.to_vec(), target.clone()).expect("valid files");
        let mut rows = 0;
        while let Some(b) = merge.next_batch().expect("merge") {
            rows += b.num_rows();
        }
        rows
    };
    assert_eq!(merge(&files), ROWS);
    let mut group = c.benchmark_group("compaction_merge");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    group.bench_function("tsbs_cpu_100k/4_flushes", |b| {
        b.iter(|| merge(black_box(&files)))
    });
    group.finish();

    let mut group = c.benchmark_group("flush_total");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.sample_size(10);
    group.bench_function("tsbs_cpu_100k/zstd_1", |b| {
        b.iter(|| encode(&sort(black_box(&batches), &target), FLUSH_ZSTD).len())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
