//! `GET /console/live`: the pages' live regions as server-sent events.
//!
//! The first event carries every region (so a page reconnecting after a
//! daemon restart catches up at once); each later one only the regions the
//! sampler changed. Nothing is sent while nothing changes but a comment
//! every 15 s that keeps proxies from closing the stream. The stream ends
//! when the daemon stops, so that a graceful stop never waits on an open
//! page; the browser's `EventSource` reconnects by itself.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};

use super::Console;
use super::monitor::Published;

/// How long a browser waits before reconnecting.
const RETRY: Duration = Duration::from_secs(1);

pub(crate) async fn stream(State(c): State<Console>) -> Response {
    let rx = c.monitor.subscribe();
    let stop = c.engine.shutdown.clone();
    Sse::new(events(rx, stop))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn events(
    rx: tokio::sync::watch::Receiver<Arc<Published>>,
    stop: tokio_util::sync::CancellationToken,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let state = (rx, stop, None::<Arc<Published>>);
    stream::unfold(state, |(mut rx, stop, sent)| async move {
        if sent.is_some() {
            tokio::select! {
                () = stop.cancelled() => return None,
                changed = rx.changed() => changed.ok()?,
            }
        }
        let now = rx.borrow_and_update().clone();
        let changed: BTreeMap<&String, &String> = now
            .regions
            .iter()
            .filter(|(k, v)| sent.as_ref().is_none_or(|s| s.regions.get(*k) != Some(*v)))
            .collect();
        let data = serde_json::json!({ "regions": changed }).to_string();
        let event = Event::default().data(data).retry(RETRY);
        Some((Ok(event), (rx, stop, Some(now))))
    })
}
