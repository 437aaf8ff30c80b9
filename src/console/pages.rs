//! The overview (`/`), its live regions, and the rejected manifests
//! (`/rejected`, `/rejected/{file}` with the file's error lines).

use std::collections::BTreeMap;
use std::io::Read;

use axum::extract::{Path, State};
use axum::response::Response;
use maud::{Markup, html};

use super::Console;
use super::monitor::{BatchView, Event, Overview, Rejected};
use super::view::{self, duration, progress, region, seg, time, usd};
use crate::status::BatchStatus;
use crate::store::BatchPhase;

/// Events shown on the overview.
pub(crate) const EVENTS_SHOWN: usize = 20;
/// Error lines shown for one rejected manifest.
const MAX_ERROR_LINES: usize = 1000;
/// Bytes of an errors file read, at most.
const MAX_ERROR_BYTES: u64 = 256 * 1024;

/// Every live region, rendered: the overview's, and one card per batch.
pub(crate) fn regions(
    o: &Overview,
    events: &[Event],
    rejected: &[Rejected],
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("summary".into(), summary(o).into_string());
    out.insert("batches".into(), batches(o).into_string());
    out.insert("events".into(), events_list(events).into_string());
    out.insert("rejected".into(), rejected_list(rejected, 5).into_string());
    for b in &o.batches {
        out.insert(
            format!("batch:{}", b.status.name),
            super::batch::card(b).into_string(),
        );
    }
    out
}

pub(crate) async fn overview(State(c): State<Console>) -> Response {
    let p = c.monitor.current();
    let r = &p.regions;
    let get = |k: &str| r.get(k).map_or("", String::as_str);
    view::page(
        "Overview",
        p.overview.simulated,
        html! {
            h1 { "Overview" }
            (region("summary", get("summary")))
            section aria-labelledby="h-batches" {
                h2 #h-batches { "Batches" }
                (region("batches", get("batches")))
            }
            (super::drop::form())
            div.cols {
                section aria-labelledby="h-events" {
                    h2 #h-events { "Recent events" }
                    (region("events", get("events")))
                }
                section aria-labelledby="h-rejected" {
                    h2 #h-rejected { "Rejected manifests" }
                    (region("rejected", get("rejected")))
                    p { a href="/rejected" { "All rejected manifests" } }
                }
            }
        },
    )
}

fn summary(o: &Overview) -> Markup {
    let (state, class) = match &o.paused {
        Some(reason) => (format!("Paused: {reason}"), "warn"),
        None => ("Running".to_owned(), "ok"),
    };
    html! {
        div.cards {
            div.card {
                span.k { "Submission" }
                span.v.(class) #submission { (state) }
            }
            div.card {
                span.k { "Requests in the last minute" }
                span.v { (o.requests) " / " (o.max_requests) }
            }
            div.card {
                span.k { "Tasks in flight" }
                span.v { (o.in_flight) " / " (o.max_concurrent) }
            }
            div.card {
                span.k { "Spent" }
                @match &o.spend {
                    Some(s) => {
                        span.v {
                            (usd(s.spent_usd))
                            @if let Some(cap) = s.cap_usd { " of " (usd(cap)) " cap" }
                        }
                        @if o.simulated || s.simulated_usd > 0.0 {
                            span.note { "simulated: " (usd(s.simulated_usd)) " (not paid)" }
                        }
                        @if s.possibly_paid_twice_rows > 0 {
                            span.note.warn { (s.possibly_paid_twice_rows) " row(s) possibly paid twice" }
                        }
                    }
                    None => span.v { "unknown" }
                }
            }
            div.card {
                span.k { "Left to do" }
                span.v {
                    (o.remaining) " rows"
                    @if let Some(eta) = o.eta_secs { " · ETA ≈ " (duration(eta)) }
                }
            }
            div.card.wide {
                span.k { "Rows ended per minute, last hour (" (format!("{:.1}", o.rate_per_min)) "/min lately)" }
                (chart(&o.throughput))
            }
        }
    }
}

/// A small bar chart of per-minute counts, inline SVG.
fn chart(counts: &[u64]) -> Markup {
    let max = counts.iter().copied().max().unwrap_or(0).max(1);
    let n = counts.len().max(1);
    let (w, h) = (600.0, 60.0);
    let bw = w / n as f64;
    let total: u64 = counts.iter().sum();
    let label = format!("{total} rows ended in the last hour; at most {max} in one minute");
    html! {
        svg.chart viewBox=(format!("0 0 {w} {h}")) preserveAspectRatio="none" role="img" aria-label=(label) {
            title { (label) }
            @for (i, c) in counts.iter().enumerate() {
                @if *c > 0 {
                    @let bh = (*c as f64 / max as f64 * (h - 2.0)).max(1.0);
                    rect x=(format!("{:.1}", i as f64 * bw)) y=(format!("{:.1}", h - bh))
                        width=(format!("{:.1}", (bw - 1.0).max(1.0))) height=(format!("{bh:.1}")) {
                        title { (c) " rows, " (n - 1 - i) " min ago" }
                    }
                }
            }
        }
    }
}

fn flags(s: &BatchStatus) -> Markup {
    html! {
        @if s.phase == BatchPhase::Finished { span.badge.ok { "finished" } }
        @if s.cancelled { span.badge.warn { "cancelled" } }
        @else if s.paused { span.badge.warn { "paused" } }
        @if s.priority != crate::store::Priority::Normal { span.badge { (s.priority.as_str()) } }
    }
}

fn batches(o: &Overview) -> Markup {
    html! {
        @if o.batches.is_empty() {
            p.empty { "No batches yet: drop a manifest below, or place a CSV file in the inbox." }
        } @else {
            div.scroll {
                table.batches {
                    thead { tr {
                        th scope="col" { "Batch" } th scope="col" { "Progress" }
                        th scope="col" .num { "Queued" } th scope="col" .num { "In flight" }
                        th scope="col" .num { "Downloading" } th scope="col" .num { "Done" }
                        th scope="col" .num { "Failed" } th scope="col" .num { "Cost ≈ (est. total)" }
                        th scope="col" { "ETA" } th scope="col" { "State" }
                    } }
                    tbody {
                        @for b in &o.batches { (batch_row(b)) }
                    }
                }
            }
        }
    }
}

fn batch_row(b: &BatchView) -> Markup {
    let s = &b.status;
    html! {
        tr data-batch=(s.name) {
            th scope="row" { a href=(format!("/batches/{}", seg(&s.name))) { (s.name) } }
            td { (progress(s.done, s.failed, s.total)) span.small { (s.done + s.failed) " / " (s.total) } }
            td.num data-count="queued" { (s.queued) }
            td.num data-count="in_flight" { (s.in_flight) }
            td.num data-count="downloading" { (s.downloading) }
            td.num data-count="done" { (s.done) }
            td.num data-count="failed" { (s.failed) }
            td.num { (usd(b.cost_usd)) " (" (usd(b.estimate_usd)) ")" }
            td { @match b.eta_secs { Some(e) => { "≈ " (duration(e)) }, None => "–" } }
            td { (flags(s)) @if s.priority == crate::store::Priority::Normal && !s.paused && !s.cancelled && s.phase == BatchPhase::Active { span.small { "normal" } } }
        }
    }
}

fn events_list(events: &[Event]) -> Markup {
    html! {
        @if events.is_empty() { p.empty { "Nothing yet." } }
        ul.events {
            @for e in events {
                li.warn[e.warn] { time { (time(e.at_ms)) } " " (e.text) }
            }
        }
    }
}

fn rejected_list(rejected: &[Rejected], limit: usize) -> Markup {
    html! {
        @if rejected.is_empty() { p.empty { "None." } }
        ul.rejected {
            @for r in rejected.iter().take(limit) {
                li { a href=(format!("/rejected/{}", seg(&r.file))) { (r.file) } " " time { (time(r.at_ms)) } }
            }
        }
    }
}

pub(crate) async fn rejected(State(c): State<Console>) -> Response {
    let all = c.monitor.rejected();
    view::page(
        "Rejected manifests",
        c.engine.settings.simulate,
        html! {
            h1 { "Rejected manifests" }
            p { "Files in " code { (c.engine.folders.rejected_dir().display()) } ", newest first. Nothing from a rejected manifest was submitted." }
            (rejected_list(&all, usize::MAX))
        },
    )
}

pub(crate) async fn rejected_one(State(c): State<Console>, Path(file): Path<String>) -> Response {
    let Some(stem) = file.strip_suffix(".csv").filter(|s| safe_name(s)) else {
        return view::not_found("No such rejected manifest.");
    };
    let path = c
        .engine
        .folders
        .rejected_dir()
        .join(format!("{stem}.errors.txt"));
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut text = String::new();
        std::fs::File::open(&path)?
            .take(MAX_ERROR_BYTES)
            .read_to_string(&mut text)?;
        Ok(text)
    })
    .await;
    let text = match read {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => {
            return view::not_found("No such rejected manifest (or its errors file is gone).");
        }
        Err(e) => return view::failed(&e.to_string()),
    };
    let lines: Vec<&str> = text.lines().take(MAX_ERROR_LINES).collect();
    view::page(
        &file,
        c.engine.settings.simulate,
        html! {
            h1 { "Rejected: " (file) }
            p { (lines.len()) " problem(s); nothing from this file was submitted. Fix them and drop the file again." }
            ol.errors { @for l in &lines { li { code { (l) } } } }
        },
    )
}

/// A file name the console may look up: no path, not hidden.
pub(crate) fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 255
        && !name.contains(['/', '\\', '\0'])
}
