//! Input fetching: the service fetches a task's portrait, mask and audio,
//! and a URL it cannot fetch fails the task (`INVALID_IMAGE_URL`,
//! `INVALID_AUDIO_URL`). The simulator does the same for URLs on a loopback
//! host (its own `/media`, a daemon's `/media/…`, a local object store), so
//! that a test passing through it proves the URLs the daemon published work.
//! Other hosts cannot be reached from a test machine and are taken as
//! reachable (`batch.sample.csv` names such hosts).
//!
//! Each fetch is one GET of the first byte (`Range: bytes=0-0`), bounded by
//! [`FETCH_TIMEOUT`]; only the status is read, never the body.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::header::RANGE;

use super::state::Shared;
use super::validate::SubmitRequest;

/// Longest one input fetch may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// True for hosts of this machine: `localhost`, 127.0.0.0/8, `::1`.
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost") || d.to_ascii_lowercase().ends_with(".localhost")
        }
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Whether the service could fetch `raw`: `Err` holds why not.
async fn reachable(shared: &Shared, raw: &str, audio: bool) -> Result<(), String> {
    let Ok(url) = url::Url::parse(raw) else {
        return Err("not a URL".into());
    };
    if !is_loopback(&url) {
        return Ok(());
    }
    // Its own `/media` serves `.wav` audio only, to anyone: answer without a
    // request to itself (the same verdict, at no cost per submit).
    if let Some(name) = raw
        .strip_prefix(shared.base_url())
        .and_then(|rest| rest.strip_prefix("/media/"))
    {
        let name = name.split(['?', '#']).next().unwrap_or_default();
        return if audio && name.to_ascii_lowercase().ends_with(".wav") && !name.contains('/') {
            Ok(())
        } else {
            Err("404 from the simulator's own /media (it serves .wav audio only)".into())
        };
    }
    let answer = shared
        .client
        .get(url)
        .header(RANGE, "bytes=0-0")
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {}", status.as_u16()))
    }
}

/// The fail code of a task whose inputs cannot be fetched, and the URL that
/// failed (quoted in the task's `failMsg`, as services do: a presigned URL
/// comes back to the daemon this way), if any.
pub(crate) async fn check(shared: &Shared, req: &SubmitRequest) -> Option<(&'static str, String)> {
    let images = req.image_urls.iter().map(|u| reachable(shared, u, false));
    let images = futures_util::future::join_all(images);
    let (images, audio) = tokio::join!(images, reachable(shared, &req.audio_url, true));
    if let Some((url, why)) = req
        .image_urls
        .iter()
        .zip(images)
        .find_map(|(u, r)| r.err().map(|why| (u, why)))
    {
        tracing::info!(url = %redact(url), why, "simulator: image URL not fetchable; the task will fail");
        return Some(("INVALID_IMAGE_URL", url.clone()));
    }
    if let Err(why) = audio {
        tracing::info!(url = %redact(&req.audio_url), why, "simulator: audio URL not fetchable; the task will fail");
        return Some(("INVALID_AUDIO_URL", req.audio_url.clone()));
    }
    None
}

/// The URL without its path's last segment and query (tokens, signatures).
fn redact(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(u) => format!(
            "{}://{}{}/…",
            u.scheme(),
            u.host_str().unwrap_or_default(),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "(not a URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        for u in [
            "http://127.0.0.1:9/a",
            "http://127.8.9.1/a",
            "http://[::1]:80/a",
            "http://localhost/a",
            "http://LocalHost:1/a",
        ] {
            assert!(is_loopback(&url::Url::parse(u).expect("url")), "{u}");
        }
        for u in [
            "https://img.example/a",
            "http://10.0.0.1/a",
            "http://[::2]/a",
        ] {
            assert!(!is_loopback(&url::Url::parse(u).expect("url")), "{u}");
        }
    }
}
