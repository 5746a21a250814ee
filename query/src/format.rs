//! Output formats: each encodes a result batch by batch, so a large result never sits
//! whole in memory.

use std::str::FromStr;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::writer::StreamWriter;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// A result format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// One JSON array of objects.
    Json,
    /// One JSON object per line.
    JsonLines,
    /// CSV with a header line.
    Csv,
    /// A Parquet file.
    Parquet,
    /// An Arrow IPC stream.
    Arrow,
    /// Text tables for people.
    Pretty,
}

impl FromStr for OutputFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "json" => OutputFormat::Json,
            "jsonl" | "ndjson" => OutputFormat::JsonLines,
            "csv" => OutputFormat::Csv,
            "parquet" => OutputFormat::Parquet,
            "arrow" => OutputFormat::Arrow,
            "pretty" => OutputFormat::Pretty,
            other => {
                return Err(format!(
                    "unknown format {other:?}: use json, jsonl, csv, parquet, arrow or pretty"
                ));
            }
        })
    }
}

impl OutputFormat {
    /// The HTTP content type.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Json => "application/json",
            OutputFormat::JsonLines => "application/jsonl",
            OutputFormat::Csv => "text/csv; charset=utf-8",
            OutputFormat::Parquet => "application/vnd.apache.parquet",
            OutputFormat::Arrow => "application/vnd.apache.arrow.stream",
            OutputFormat::Pretty => "text/plain; charset=utf-8",
        }
    }

    /// An encoder for results of `schema`.
    pub fn encoder(self, schema: SchemaRef) -> Result<Encoder, ArrowError> {
        let state = match self {
            OutputFormat::Json => State::Json { first: true },
            OutputFormat::JsonLines => State::JsonLines,
            OutputFormat::Csv => State::Csv { header: true },
            OutputFormat::Arrow => {
                State::Arrow(Box::new(StreamWriter::try_new(Vec::new(), &schema)?))
            }
            OutputFormat::Parquet => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build();
                State::Parquet(Box::new(
                    ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))
                        .map_err(|e| ArrowError::ExternalError(Box::new(e)))?,
                ))
            }
            OutputFormat::Pretty => State::Pretty { any: false },
        };
        Ok(Encoder { state, schema })
    }
}

enum State {
    Json { first: bool },
    JsonLines,
    Csv { header: bool },
    Arrow(Box<StreamWriter<Vec<u8>>>),
    Parquet(Box<ArrowWriter<Vec<u8>>>),
    Pretty { any: bool },
}

/// Encodes one result, batch by batch.
pub struct Encoder {
    state: State,
    schema: SchemaRef,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

/// Row groups of a Parquet result are cut at this many buffered bytes.
const PARQUET_ROW_GROUP_BYTES: usize = 64 << 20;

/// Text encoders want plain strings: dictionary columns are decoded first.
fn plain(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    if !batch
        .schema()
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Dictionary(..)))
    {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (f, c) in batch.schema().fields().iter().zip(batch.columns()) {
        match f.data_type() {
            DataType::Dictionary(_, value) => {
                columns.push(arrow::compute::cast(c, value)?);
                fields.push(Field::new(
                    f.name(),
                    value.as_ref().clone(),
                    f.is_nullable(),
                ));
            }
            _ => {
                columns.push(c.clone());
                fields.push(f.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

fn json_lines(batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
    let batch = plain(batch)?;
    let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
    writer.write(&batch)?;
    writer.finish()?;
    Ok(writer.into_inner())
}

/// Room for an IPC message's header (schema-sized flatbuffer) and padding.
const IPC_HEADER_ROOM: usize = 4096;

impl Encoder {
    /// Bytes for one batch (possibly none yet).
    pub fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, ArrowError> {
        match &mut self.state {
            State::Json { first } => {
                let lines = json_lines(batch)?;
                let mut out = Vec::with_capacity(lines.len() + 2);
                for line in lines.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    out.push(if *first { b'[' } else { b',' });
                    *first = false;
                    out.extend_from_slice(line);
                }
                Ok(out)
            }
            State::JsonLines => json_lines(batch),
            State::Csv { header } => {
                let batch = plain(batch)?;
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(*header)
                    .build(Vec::new());
                writer.write(&batch)?;
                *header = false;
                Ok(writer.into_inner())
            }
            State::Arrow(writer) => {
                // The buffer was handed on with the previous batch: sized for this one
                // (the bytes its rows use, not the buffers a slice shares with others,
                // plus the message header) it is written without regrowing.
                let body: usize = batch
                    .columns()
                    .iter()
                    .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
                    .sum();
                writer.get_mut().reserve(body + IPC_HEADER_ROOM);
                writer.write(batch)?;
                Ok(std::mem::take(writer.get_mut()))
            }
            State::Parquet(writer) => {
                writer
                    .write(batch)
                    .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
                if writer.in_progress_size() > PARQUET_ROW_GROUP_BYTES {
                    writer
                        .flush()
                        .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
                }
                Ok(std::mem::take(writer.inner_mut()))
            }
            State::Pretty { any } => {
                if batch.num_rows() == 0 {
                    return Ok(Vec::new());
                }
                *any = true;
                let table = arrow::util::pretty::pretty_format_batches(&[plain(batch)?])?;
                Ok(format!("{table}\n").into_bytes())
            }
        }
    }

    /// The closing bytes.
    pub fn finish(&mut self) -> Result<Vec<u8>, ArrowError> {
        match &mut self.state {
            State::Json { first } => Ok(if *first {
                b"[]".to_vec()
            } else {
                b"]".to_vec()
            }),
            State::JsonLines => Ok(Vec::new()),
            State::Csv { header } => {
                if !*header {
                    return Ok(Vec::new());
                }
                // No rows: still send the header line.
                let empty = plain(&RecordBatch::new_empty(self.schema.clone()))?;
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(Vec::new());
                writer.write(&empty)?;
                Ok(writer.into_inner())
            }
            State::Arrow(writer) => {
                writer.finish()?;
                Ok(std::mem::take(writer.get_mut()))
            }
            State::Parquet(writer) => {
                writer
                    .finish()
                    .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
                Ok(std::mem::take(writer.inner_mut()))
            }
            State::Pretty { any } => {
                if *any {
                    return Ok(Vec::new());
                }
                let table = arrow::util::pretty::pretty_format_batches(&[plain(
                    &RecordBatch::new_empty(self.schema.clone()),
                )?])?;
                Ok(format!("{table}\n").into_bytes())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{DictionaryArray, Float64Array};
    use arrow::datatypes::Int32Type;

    fn batch(hosts: &[&str], values: &[Option<f64>]) -> RecordBatch {
        let host: DictionaryArray<Int32Type> = hosts.iter().copied().collect();
        RecordBatch::try_from_iter(vec![
            ("host", Arc::new(host) as ArrayRef),
            (
                "v",
                Arc::new(Float64Array::from(values.to_vec())) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    fn encode(format: OutputFormat, batches: &[RecordBatch]) -> Vec<u8> {
        let mut e = format.encoder(batches[0].schema()).unwrap();
        let mut out = Vec::new();
        for b in batches {
            out.extend(e.batch(b).unwrap());
        }
        out.extend(e.finish().unwrap());
        out
    }

    #[test]
    fn json_is_one_array_across_batches() {
        let out = encode(
            OutputFormat::Json,
            &[
                batch(&["a"], &[Some(1.5)]),
                batch(&["b", "c"], &[None, Some(2.0)]),
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"host": "a", "v": 1.5}, {"host": "b"}, {"host": "c", "v": 2.0}])
        );
        let empty = encode(OutputFormat::Json, &[batch(&[], &[])]);
        assert_eq!(empty, b"[]");
    }

    #[test]
    fn csv_has_one_header_and_decoded_tags() {
        let out = encode(
            OutputFormat::Csv,
            &[batch(&["a"], &[Some(1.5)]), batch(&["b"], &[Some(2.0)])],
        );
        assert_eq!(String::from_utf8(out).unwrap(), "host,v\na,1.5\nb,2.0\n");
        let empty = encode(OutputFormat::Csv, &[batch(&[], &[])]);
        assert_eq!(String::from_utf8(empty).unwrap(), "host,v\n");
    }

    #[test]
    fn arrow_and_parquet_read_back() {
        let batches = [batch(&["a"], &[Some(1.5)]), batch(&["b"], &[Some(2.0)])];
        let ipc = encode(OutputFormat::Arrow, &batches);
        let reader = arrow::ipc::reader::StreamReader::try_new(&ipc[..], None).unwrap();
        let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 2);
        let pq = encode(OutputFormat::Parquet, &batches);
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(
            bytes::Bytes::from(pq),
            1024,
        )
        .unwrap();
        let read: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        let values = read[0]
            .column(1)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        assert_eq!(values.values(), &[1.5, 2.0]);
    }

    #[test]
    fn a_slice_of_a_large_batch_reserves_only_its_own_bytes() {
        let values = Float64Array::from_iter_values((0..1_000_000).map(f64::from));
        let big = RecordBatch::try_from_iter(vec![("v", Arc::new(values) as ArrayRef)]).unwrap();
        let slice = big.slice(500_000, 10);
        let mut e = OutputFormat::Arrow.encoder(slice.schema()).unwrap();
        let bytes = e.batch(&slice).unwrap();
        assert!(
            bytes.capacity() < 64 << 10,
            "{} bytes reserved for 10 rows of a batch of 8 MB",
            bytes.capacity()
        );
        let mut stream = e.batch(&slice).unwrap();
        stream.extend(e.finish().unwrap());
        let all = [bytes, stream].concat();
        let read = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(all), None)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(read, vec![slice.clone(), slice]);
    }
}
