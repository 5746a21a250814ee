//! Support code for Historian's data generators and load generator.
//!
//! - [`lp`]: a line-protocol writer with correct escaping;
//! - [`rng`]: a portable seeded PRNG (same seed, same bytes, everywhere);
//! - [`tsbs`]: TSBS cpu-only rows; [`mes`]: a factory with machines and MES events;
//! - [`pool`]: pre-built request bodies for the load generator;
//! - [`hist`], [`procfs`], [`time`]: latency histogram, /proc sampling, time parsing.

pub mod hist;
pub mod lp;
pub mod mes;
pub mod pool;
pub mod procfs;
pub mod rng;
pub mod time;
pub mod tsbs;
