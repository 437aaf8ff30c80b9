//! The page shell every console page shares, small formatting helpers, and
//! the embedded stylesheet and script (no build step, no CDN).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

const SCRIPT: &str = include_str!("console.js");
const STYLE: &str = include_str!("console.css");

/// A whole page: header with navigation and the live indicator, then `body`.
pub(crate) fn page(title: &str, simulated: bool, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · infinitetalk-batch" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    nav aria-label="Console" {
                        a.brand href="/" { "infinitetalk-batch" }
                        a href="/" { "Overview" }
                        a href="/rejected" { "Rejected" }
                    }
                    @if simulated {
                        span.badge.warn title="run --simulate: nothing is paid, videos are test patterns" { "simulated" }
                    }
                    span #live.live role="status" aria-live="polite" data-state="connecting" { "connecting…" }
                }
                main #main tabindex="-1" { (body) }
                div #toast role="alert" aria-live="assertive" {}
            }
        }
    };
    let mut resp = markup.into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; media-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    resp
}

/// A page saying what was not found, with a 404.
pub(crate) fn not_found(what: &str) -> Response {
    let mut resp = page(
        "Not found",
        false,
        html! { h1 { "Not found" } p { (what) } p { a href="/" { "Back to the overview" } } },
    );
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp
}

/// A page saying something failed on our side, with a 500.
pub(crate) fn failed(what: &str) -> Response {
    tracing::error!(error = what, "console page failed");
    let mut resp = page(
        "Error",
        false,
        html! { h1 { "Something went wrong" } p { (what) } },
    );
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp
}

/// A live region: replaced by the script whenever the daemon publishes it.
pub(crate) fn region(id: &str, html: &str) -> Markup {
    html! { div data-region=(id) { (PreEscaped(html)) } }
}

/// `text` as one path segment of a URL: batch and file names may hold
/// spaces, `#`, `?` or `%`.
pub(crate) fn seg(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn usd(v: f64) -> String {
    format!("${v:.2}")
}

/// `1h 05m`, `4m 10s`, `12s`.
pub(crate) fn duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if secs >= 86_400 * 2 {
        format!("{}d {}h", secs / 86_400, h % 24)
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Unix milliseconds as UTC `YYYY-MM-DD HH:MM:SS`.
pub(crate) fn time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, mo, d) = civil(days as i64);
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) date (H. Hinnant's method).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A progress bar of `part` out of `whole`, with its text for screen readers.
pub(crate) fn progress(done: u64, failed: u64, whole: u64) -> Markup {
    let pct = |n: u64| {
        if whole == 0 {
            0.0
        } else {
            (n as f64 / whole as f64 * 100.0).clamp(0.0, 100.0)
        }
    };
    let label = format!(
        "{:.1}% ended ({} done, {} failed of {})",
        pct(done + failed),
        done,
        failed,
        whole
    );
    html! {
        div.bar role="img" aria-label=(label) title=(label) {
            span.done style=(format!("width:{:.2}%", pct(done))) {}
            span.failed style=(format!("width:{:.2}%", pct(failed))) {}
        }
    }
}

pub(crate) async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub(crate) async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_durations() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(1_798_761_600_000), "2027-01-01 00:00:00");
        assert_eq!(time(951_782_400_000 + 3_723_000), "2000-02-29 01:02:03");
        assert_eq!(seg("a b#1?%.csv"), "a%20b%231%3F%25.csv");
        assert_eq!(seg("d-0_x.mp4"), "d-0_x.mp4");
        assert_eq!(duration(12), "12s");
        assert_eq!(duration(250), "4m 10s");
        assert_eq!(duration(3900), "1h 05m");
        assert_eq!(duration(3 * 86_400 + 7200), "3d 2h");
    }
}
