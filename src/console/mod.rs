//! The console: a browser's view of the running daemon on `/`, and the
//! forms that steer it.
//!
//! Pages are rendered on the server (maud, compiled into the binary); one
//! small script (`console.js`, embedded) keeps them live over server-sent
//! events and sends the actions as same-origin `fetch` POSTs to the admin
//! routes ([`crate::manage`]). Nothing is fetched from elsewhere.
//!
//! - `monitor.rs`: one sampler task reads the store twice a second, keeps
//!   the throughput ring and the recent events, and publishes the live
//!   regions of the pages when they change.
//! - `live.rs`: `GET /console/live`, the event stream of those regions.
//! - `pages.rs`: the overview, rejected manifests; `batch.rs`: a batch's
//!   rows, paged and filtered on the server, and one row with its video.
//! - `rows.rs`: reading rows never claimed from the manifest.
//! - `drop.rs`: a manifest dropped in the page, checked, then accepted
//!   through the same ingest as the inbox.
//! - `view.rs`: the page shell, formatting, the embedded CSS and script.
//!
//! Who may use which route is [`crate::admin::Gate`]'s call: the pages,
//! the stream and the videos are reading routes; dropping a manifest is a
//! changing one. No handler here checks authentication.
//!
//! The console never changes a row itself: actions go through `manage`,
//! manifests through `ingest`.

mod batch;
mod detail;
mod drop;
mod live;
mod monitor;
mod pages;
mod rows;
mod video;
mod view;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::admin::Gate;
use crate::dispatch::Engine;

pub use self::drop::{Accepted, Checked};
pub use self::monitor::Monitor;

/// Largest manifest accepted through the page.
pub const MAX_UPLOAD_BYTES: usize = 64 * 1024 * 1024;

/// What every console handler shares.
#[derive(Clone)]
pub(crate) struct Console {
    engine: Arc<Engine>,
    monitor: Arc<Monitor>,
    drops: Arc<drop::Drops>,
    manifests: Arc<rows::Checkpoints>,
}

/// The console's routes: reading ones behind `gate.reading`, the manifest
/// drop behind `gate.changing`.
pub(crate) fn routes(engine: Arc<Engine>, monitor: Arc<Monitor>, gate: &Gate) -> Router {
    let console = Console {
        drops: Arc::new(drop::Drops::new(engine.folders.inbox.clone())),
        manifests: Arc::default(),
        engine,
        monitor,
    };
    let reading = Router::new()
        .route("/", get(pages::overview))
        .route("/rejected", get(pages::rejected))
        .route("/rejected/{file}", get(pages::rejected_one))
        .route("/batches/{name}", get(batch::page))
        .route("/batches/{name}/rows/{id}", get(batch::row))
        .route("/batches/{name}/files/{file}", get(video::video))
        .route("/console/live", get(live::stream))
        .route("/console/assets/console.js", get(view::script))
        .route("/console/assets/console.css", get(view::style))
        .with_state(console.clone());
    let changing = Router::new()
        .route("/console/drop", post(drop::check))
        .route("/console/drop/{token}/accept", post(drop::accept))
        .layer(DefaultBodyLimit::max(MAX_UPLOAD_BYTES))
        .with_state(console);
    gate.reading(reading).merge(gate.changing(changing))
}
