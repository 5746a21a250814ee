//! `first(value, time)` and `last(value, time)`: the value at the earliest or latest time
//! of the group (NULL values skipped), as InfluxDB's selectors and PI's "at time" values.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Field, FieldRef, TimeUnit, TimestampNanosecondType};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

/// Which end of time a selector picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    /// The earliest time.
    First,
    /// The latest time.
    Last,
}

/// The `first` / `last` aggregate.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Selector {
    end: End,
    signature: Signature,
}

impl Selector {
    /// The selector for one end of time.
    pub fn new(end: End) -> Self {
        Selector {
            end,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, None)
}

impl AggregateUDFImpl for Selector {
    fn name(&self) -> &str {
        match self.end {
            End::First => "first",
            End::Last => "last",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if !matches!(
            arg_types.get(1),
            Some(DataType::Timestamp(TimeUnit::Nanosecond, _))
        ) {
            return plan_err!(
                "{}(value, time): the second argument must be the time column",
                self.name()
            );
        }
        Ok(arg_types[0].clone())
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let value = ScalarValue::try_from(args.return_field.data_type())?;
        Ok(Box::new(SelectorAccumulator {
            end: self.end,
            value,
            time: None,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![
            Arc::new(Field::new(
                format!("{}_value", args.name),
                args.return_field.data_type().clone(),
                true,
            )),
            Arc::new(Field::new(format!("{}_time", args.name), time_type(), true)),
        ])
    }
}

#[derive(Debug)]
struct SelectorAccumulator {
    end: End,
    value: ScalarValue,
    time: Option<i64>,
}

impl SelectorAccumulator {
    fn better(&self, t: i64, than: Option<i64>) -> bool {
        match (self.end, than) {
            (_, None) => true,
            (End::First, Some(b)) => t < b,
            (End::Last, Some(b)) => t >= b,
        }
    }

    fn take(&mut self, values: &ArrayRef, times: &ArrayRef) -> Result<()> {
        let Some(times) = times.as_primitive_opt::<TimestampNanosecondType>() else {
            return plan_err!("the time argument must be a nanosecond timestamp");
        };
        let mut best: Option<(usize, i64)> = None;
        for i in 0..values.len() {
            if values.is_null(i) || times.is_null(i) {
                continue;
            }
            let t = times.value(i);
            if self.better(t, best.map(|b| b.1)) {
                best = Some((i, t));
            }
        }
        if let Some((i, t)) = best
            && self.better(t, self.time)
        {
            self.value = ScalarValue::try_from_array(values, i)?;
            self.time = Some(t);
        }
        Ok(())
    }
}

impl Accumulator for SelectorAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.take(&values[0], &values[1])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.take(&states[0], &states[1])
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![
            self.value.clone(),
            ScalarValue::TimestampNanosecond(self.time, None),
        ])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(self.value.clone())
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.value.size()
    }
}
