//! infinitetalk-batch: a daemon that turns folders of CSV manifests into
//! talking-head videos through the APIXO InfiniteTalk API.
//!
//! # Layout
//!
//! - [`cli`] and [`config`]: the command line and the merged settings of `run`.
//! - [`spec`]: what a row asks for and what it costs.
//! - [`manifest`]: CSV manifests read and validated, streaming.
//! - [`store`]: the durable state (batches, live rows, the archive of ended
//!   rows, the request ledger) and the row state machine. Only
//!   `store/sled.rs` imports sled.
//! - [`ingest`]: one manifest file into one batch (or into `rejected/`).
//! - [`media`]: local files named by manifests: checked, hashed, published.
//! - [`inbox`]: watching the inbox folder, feeding [`ingest`].
//! - [`api`]: the APIXO client, wire types and the classification of answers.
//! - [`dispatch`]: pacing (request budget, concurrency slots), submitting and polling.
//! - [`download`]: fetching result videos into the outbox.
//! - [`results`]: `results.csv` when a batch ends.
//! - [`outbox`]: the outbox, a local folder or an object store (`s3://`).
//! - [`listener`]: `/status`, `/metrics` and callbacks over HTTP.
//! - [`console`]: the browser console on `/` (pages, live updates, the
//!   manifest drop).
//! - [`admin`]: the admin token, the console link and the guards of the
//!   listener's routes (token, cross-site refusal, `Host` check).
//! - [`status`]: what `status` shows.
//! - [`manage`]: `retry` and `cancel` of a batch; spend gauges.
//! - [`metrics`]: counters for `/metrics`.
//! - [`probe`]: the length of a row's audio, read over HTTP before paying.
//! - [`daemon`]: `run`, wiring it all together.
//! - [`simulator`]: the built-in simulator of the API.
//! - [`supervisor`]: starts, watches and restarts the long-lived workers.
//! - [`fsutil`]: atomic, durable file writes.
//! - [`failpoint`]: named points where tests make the process die.
#![forbid(unsafe_code)]

pub mod admin;
mod api;
pub mod cli;
pub mod config;
pub mod console;
pub mod daemon;
pub mod dispatch;
mod download;
pub mod failpoint;
mod fsutil;
pub mod inbox;
pub mod ingest;
mod listener;
pub mod manage;
pub mod manifest;
pub mod media;
mod metrics;
pub mod outbox;
pub mod probe;
mod redact;
mod results;
pub mod simulator;
pub mod spec;
pub mod status;
pub mod store;
mod supervisor;
