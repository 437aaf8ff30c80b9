//! infinitetalk-batch: a daemon that turns folders of CSV manifests into
//! talking-head videos through the APIXO InfiniteTalk API.
//!
//! # Layout
//!
//! - [`cli`] and [`config`]: the command line and the merged settings of `run`.
//! - [`spec`]: what a row asks for and what it costs.
//! - [`manifest`]: CSV manifests read and validated, streaming.
//! - [`store`]: the durable state (batches, rows past `queued`, the request
//!   ledger). Only `store/sled.rs` imports sled.
//! - [`ingest`]: one manifest file into one batch (or into `rejected/`).
//! - [`inbox`]: watches the inbox and takes each manifest once it is whole.
//! - [`simulator`]: the built-in simulator of the API.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod fsutil;
pub mod inbox;
pub mod ingest;
pub mod manifest;
pub mod simulator;
pub mod spec;
pub mod store;
