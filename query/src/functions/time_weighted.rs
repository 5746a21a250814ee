//! `time_weighted_avg(value, time)`: each value weighted by how long it held (step
//! interpolation, as PI's TimeWeighted summary).
//!
//! On its own, the average runs from the group's first sample to its last. In a query
//! grouped by `date_bin` or `date_bin_gapfill`, the gap-fill step finishes it per series:
//! the last value before a bucket holds from the bucket's start to its first sample, and
//! the bucket's last value holds to the bucket's end. For the range's first bucket that
//! value comes from a lookback scan of the window before the range (24 h unless
//! `[query] time_weighted_lookback` says otherwise). For that the aggregate yields the
//! bucket's [`TwaSummary`] instead, which the gap-fill step turns into the average.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, StructArray};
use arrow::datatypes::{
    DataType, Field, FieldRef, Fields, Float64Type, TimeUnit, TimestampNanosecondType,
};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

/// Name of the user-facing aggregate.
pub const TIME_WEIGHTED_AVG: &str = "time_weighted_avg";
/// Name of the per-bucket summary aggregate the gap-fill rewrite substitutes.
pub const TIME_WEIGHTED_SUMMARY: &str = "_time_weighted_summary";

/// What the per-bucket summary holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwaSummary {
    /// Time of the first sample (ns).
    pub first_time: i64,
    /// Time of the last sample (ns).
    pub last_time: i64,
    /// Value of the last sample.
    pub last_value: f64,
    /// Integral of the step function from the first to the last sample (value × ns).
    pub area: f64,
}

/// The fields of the summary struct.
pub fn summary_fields() -> Fields {
    Fields::from(vec![
        Field::new("first_time", DataType::Int64, false),
        Field::new("last_time", DataType::Int64, false),
        Field::new("last_value", DataType::Float64, false),
        Field::new("area", DataType::Float64, false),
    ])
}

/// Reads row `i` of a summary column.
pub fn read_summary(column: &StructArray, i: usize) -> Option<TwaSummary> {
    if column.is_null(i) {
        return None;
    }
    let int = |n: usize| {
        column
            .column(n)
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(i)
    };
    let float = |n: usize| column.column(n).as_primitive::<Float64Type>().value(i);
    Some(TwaSummary {
        first_time: int(0),
        last_time: int(1),
        last_value: float(2),
        area: float(3),
    })
}

/// The aggregate; `summary` selects the per-bucket summary form.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TimeWeightedAvg {
    summary: bool,
    signature: Signature,
}

impl TimeWeightedAvg {
    /// The user-facing average (`summary = false`) or the summary.
    pub fn new(summary: bool) -> Self {
        TimeWeightedAvg {
            summary,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for TimeWeightedAvg {
    fn name(&self) -> &str {
        if self.summary {
            TIME_WEIGHTED_SUMMARY
        } else {
            TIME_WEIGHTED_AVG
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if !arg_types[0].is_numeric() {
            return plan_err!("time_weighted_avg(value, time): the value must be numeric");
        }
        if !matches!(arg_types[1], DataType::Timestamp(TimeUnit::Nanosecond, _)) {
            return plan_err!(
                "time_weighted_avg(value, time): the second argument must be the time column"
            );
        }
        Ok(if self.summary {
            DataType::Struct(summary_fields())
        } else {
            DataType::Float64
        })
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(TwaAccumulator {
            summary: self.summary,
            samples: Vec::new(),
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
        Ok(vec![
            Arc::new(Field::new(
                format!("{}_times", args.name),
                list(DataType::Timestamp(TimeUnit::Nanosecond, None)),
                true,
            )),
            Arc::new(Field::new(
                format!("{}_values", args.name),
                list(DataType::Float64),
                true,
            )),
        ])
    }
}

#[derive(Debug)]
struct TwaAccumulator {
    summary: bool,
    samples: Vec<(i64, f64)>,
}

impl TwaAccumulator {
    fn add(&mut self, times: &dyn Array, values: &dyn Array) -> Result<()> {
        let values = arrow::compute::cast(values, &DataType::Float64)?;
        let values = values.as_primitive::<Float64Type>();
        let Some(times) = times.as_primitive_opt::<TimestampNanosecondType>() else {
            return plan_err!(
                "time_weighted_avg: the time argument must be a nanosecond timestamp"
            );
        };
        for i in 0..values.len() {
            if values.is_valid(i) && times.is_valid(i) {
                self.samples.push((times.value(i), values.value(i)));
            }
        }
        Ok(())
    }

    fn summarise(&mut self) -> Option<TwaSummary> {
        self.samples.sort_by_key(|s| s.0);
        let (first, last) = (self.samples.first()?, self.samples.last()?);
        let area = self
            .samples
            .windows(2)
            .map(|w| w[0].1 * (w[1].0 - w[0].0) as f64)
            .sum();
        Some(TwaSummary {
            first_time: first.0,
            last_time: last.0,
            last_value: last.1,
            area,
        })
    }
}

impl Accumulator for TwaAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.add(values[1].as_ref(), values[0].as_ref())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let times = states[0].as_list::<i32>();
        let values = states[1].as_list::<i32>();
        for i in 0..times.len() {
            if times.is_valid(i) && values.is_valid(i) {
                self.add(times.value(i).as_ref(), values.value(i).as_ref())?;
            }
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let times = ListArray::from_iter_primitive::<TimestampNanosecondType, _, _>(vec![Some(
            self.samples.iter().map(|s| Some(s.0)),
        )]);
        let values = ListArray::from_iter_primitive::<Float64Type, _, _>(vec![Some(
            self.samples.iter().map(|s| Some(s.1)),
        )]);
        Ok(vec![
            ScalarValue::List(Arc::new(times)),
            ScalarValue::List(Arc::new(values)),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        // `summarise` sorts the samples by time.
        let summary = self.summarise();
        let first_value = self.samples.first().map(|s| s.1);
        if !self.summary {
            return Ok(ScalarValue::Float64(summary.map(|s| {
                let span = s.last_time - s.first_time;
                if span > 0 {
                    s.area / span as f64
                } else {
                    // One instant: the value(s) at it.
                    first_value.unwrap_or(s.last_value)
                }
            })));
        }
        let fields = summary_fields();
        let array = match summary {
            Some(s) => StructArray::new(
                fields,
                vec![
                    Arc::new(arrow::array::Int64Array::from(vec![s.first_time])),
                    Arc::new(arrow::array::Int64Array::from(vec![s.last_time])),
                    Arc::new(arrow::array::Float64Array::from(vec![s.last_value])),
                    Arc::new(arrow::array::Float64Array::from(vec![s.area])),
                ],
                None,
            ),
            None => StructArray::new_null(fields, 1),
        };
        Ok(ScalarValue::Struct(Arc::new(array)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.samples.capacity() * 16
    }
}
