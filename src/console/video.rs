//! `GET /batches/{name}/files/{file}`: a video of a batch for the row page's
//! player, with Range requests so that seeking works. From the batch's
//! folder in a local outbox; from the object store in an `s3://` outbox,
//! streamed through the daemon (a presigned URL is never shown).

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use tower::ServiceExt;

use super::Console;
use super::pages::safe_name;
use super::view;
use crate::outbox::S3Outbox;

pub(crate) async fn video(
    State(c): State<Console>,
    Path((name, file)): Path<(String, String)>,
    req: Request,
) -> Response {
    if !safe_name(&name) || !safe_name(&file) || !file.ends_with(".mp4") {
        return view::not_found("No such video.");
    }
    let store = c.engine.store.clone();
    let n2 = name.clone();
    let known = tokio::task::spawn_blocking(move || store.batch_named(&n2)).await;
    if !matches!(known, Ok(Ok(Some(_)))) {
        return view::not_found("No such batch.");
    }
    if let Some(s3) = c.engine.outbox.store() {
        return from_store(s3, &name, &file, req.headers()).await;
    }
    // The outbox folder only: no other file, no hidden or partial one, no link.
    let path = c.engine.folders.batch_dir(&name).join(&file);
    match tokio::fs::symlink_metadata(&path).await {
        Ok(m) if m.is_file() => {}
        _ => return view::not_found("No such video (not downloaded yet?)."),
    }
    match tower_http::services::ServeFile::new(&path)
        .oneshot(req)
        .await
    {
        Ok(resp) => resp.into_response(),
        Err(e) => view::failed(&e.to_string()),
    }
}

/// The bytes of one range request, or why there are none.
#[derive(Debug, PartialEq)]
enum Wanted {
    All,
    Part(std::ops::Range<u64>),
    Unsatisfiable,
}

/// Reads a `Range` header against an object of `size` bytes. One range of
/// bytes is served; anything else (several ranges, other units, garbage) is
/// answered with the whole object, as RFC 9110 allows.
fn wanted(headers: &HeaderMap, size: u64) -> Wanted {
    let Some(spec) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
    else {
        return Wanted::All;
    };
    if spec.contains(',') {
        return Wanted::All;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return Wanted::All;
    };
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.parse::<u64>(), last.parse::<u64>()) {
        (Ok(a), Ok(b)) if a <= b => a..b.saturating_add(1).min(size),
        (Ok(a), Err(_)) if last.is_empty() => a..size,
        (Err(_), Ok(n)) if first.is_empty() && n > 0 => size.saturating_sub(n)..size,
        _ => return Wanted::All,
    };
    if range.start >= size {
        Wanted::Unsatisfiable
    } else {
        Wanted::Part(range)
    }
}

fn unreachable(batch: &str, file: &str, e: &crate::outbox::OutboxError) -> Response {
    tracing::warn!(batch, file, error = %e, "console: cannot read the video from the object store");
    (
        StatusCode::BAD_GATEWAY,
        "the object store cannot be reached\n",
    )
        .into_response()
}

async fn from_store(s3: &S3Outbox, batch: &str, file: &str, headers: &HeaderMap) -> Response {
    let key = s3.key(batch, file);
    let size = match s3.size_of(&key).await {
        Ok(Some(size)) => size,
        Ok(None) => return view::not_found("No such video (not uploaded yet?)."),
        Err(e) => return unreachable(batch, file, &e),
    };
    let (status, range) = match wanted(headers, size) {
        Wanted::All => (StatusCode::OK, 0..size),
        Wanted::Part(range) => (StatusCode::PARTIAL_CONTENT, range),
        Wanted::Unsatisfiable => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response();
        }
    };
    let body = if range.is_empty() {
        Body::empty()
    } else {
        match s3.read(&key, range.clone()).await {
            Ok(stream) => Body::from_stream(stream.map_err(std::io::Error::other)),
            Err(e) => return unreachable(batch, file, &e),
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("video/mp4"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(range.end - range.start),
    );
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!(
            "bytes {}-{}/{size}",
            range.start,
            range.end.saturating_sub(1)
        ))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).expect("value"));
        h
    }

    #[test]
    fn one_range_of_bytes_is_read_and_the_rest_means_all() {
        assert_eq!(wanted(&HeaderMap::new(), 100), Wanted::All);
        assert_eq!(wanted(&range("bytes=0-9"), 100), Wanted::Part(0..10));
        assert_eq!(wanted(&range("bytes=90-"), 100), Wanted::Part(90..100));
        assert_eq!(wanted(&range("bytes=-5"), 100), Wanted::Part(95..100));
        assert_eq!(wanted(&range("bytes=-500"), 100), Wanted::Part(0..100));
        assert_eq!(wanted(&range("bytes=50-5000"), 100), Wanted::Part(50..100));
        assert_eq!(wanted(&range("bytes=100-"), 100), Wanted::Unsatisfiable);
        assert_eq!(wanted(&range("bytes=0-1,5-6"), 100), Wanted::All);
        assert_eq!(wanted(&range("items=0-1"), 100), Wanted::All);
        assert_eq!(wanted(&range("bytes=9-1"), 100), Wanted::All);
        assert_eq!(wanted(&range("bytes=-0"), 100), Wanted::All);
        assert_eq!(wanted(&range("bytes=x-y"), 100), Wanted::All);
    }
}
