//! The listener's `GET`/`HEAD /media/{token}.{ext}`: a local file served to
//! the API (through `--media-url`), with Range requests.
//!
//! The token is the only credential, like the callback route's secret path:
//! the route sits outside the admin gate, so the API reaches it on a
//! listener that is not on loopback. It answers a file only when the token's
//! MAC matches the row, column and recorded content, the row is live with a
//! task that may still fetch (`submitting` or `running`), and the file
//! still holds the recorded bytes; every other request, a guessed token
//! included, gets the same bare 404. Nothing else under the media root is
//! reachable: the path comes from the row, never from the request.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceExt;
use tower_http::services::ServeFile;

use super::local::MediaFormat;
use super::publish::{Publisher, Verified, verify};
use super::table::{self, Table};
use super::{Column, MediaError, MediaRef, classify};
use crate::dispatch::Engine;
use crate::store::{RowKey, RowState};

/// The `/media/{name}` route, with its state.
pub(crate) fn routes(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/media/{name}", get(media_handler))
        .with_state(engine)
}

async fn media_handler(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    request: Request,
) -> Response {
    let token = name.split_once('.').map_or(name.as_str(), |(t, _)| t);
    let Some((key, column, mac)) = Publisher::parse_token(token) else {
        return not_found();
    };
    let found = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || find(&engine, key, column, &mac)).await
    };
    let Ok(Some(verified)) = found else {
        return not_found();
    };
    let Ok(response) = ServeFile::new(&verified.path).oneshot(request).await;
    let mut response = response.map(Body::new);
    if response.status().is_success() {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(verified.entry.format)),
        );
        tracing::debug!(batch = %engine.batch_name(key.batch), row = key.row, column = column.name(), status = response.status().as_u16(), "local media served");
    }
    response
}

fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

fn content_type(format: MediaFormat) -> &'static str {
    match format {
        MediaFormat::Jpeg => "image/jpeg",
        MediaFormat::Png => "image/png",
        MediaFormat::Webp => "image/webp",
        MediaFormat::Mp3 => "audio/mpeg",
        MediaFormat::Wav => "audio/wav",
        MediaFormat::M4a => "audio/mp4",
    }
}

/// The file a token stands for, if it may be served now. Blocks.
fn find(engine: &Engine, key: RowKey, column: Column, mac: &[u8; 16]) -> Option<Verified> {
    let row = engine.store.live_row(key).ok()??;
    if !matches!(row.state, RowState::Submitting | RowState::Running) {
        return None;
    }
    let cell = match column {
        Column::Image => Some(row.spec.image_url.as_str()),
        Column::Mask => row.spec.mask_url.as_deref(),
        Column::Audio => Some(row.spec.audio_url.as_str()),
    }?;
    let MediaRef::Local(cell) = classify(cell) else {
        return None;
    };
    let publisher = &engine.media;
    let table = Table::open(&table::path_of(publisher.state_dir(), key.batch)).ok()?;
    let entry = table.get(key.row, column).ok()??;
    if !publisher.mac_matches(key, column, &entry.print.sha256, mac) {
        return None;
    }
    match verify(&table, key.row, column, cell) {
        Ok(v) => Some(v),
        Err(e @ MediaError::Changed { .. }) => {
            tracing::warn!(batch = %engine.batch_name(key.batch), row = %row.id, column = column.name(), error = %e, "local media changed after submit; not served");
            None
        }
        Err(_) => None,
    }
}
