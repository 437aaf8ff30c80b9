//! One row's page: what the manifest asked for, its task(s), its timeline
//! and its video.

use axum::response::Response;
use maud::html;

use super::Console;
use super::view::{self, duration, seg, time, usd};
use crate::manifest::ManifestRow;
use crate::store::{BatchRecord, RowRecord, RowState};

pub(crate) fn render(
    c: &Console,
    batch: &BatchRecord,
    m: &ManifestRow,
    record: Option<&RowRecord>,
) -> Response {
    let state = record.map_or(RowState::Queued, |r| r.state);
    let spec = record.map_or(&m.spec, |r| &r.spec);
    let name = &batch.name;
    let timeline = [
        ("queued (batch accepted)", Some(batch.created_at_ms)),
        ("submitted", record.and_then(|r| r.submitted_at_ms)),
        ("ended at the API", record.and_then(|r| r.finished_at_ms)),
        ("downloaded", record.and_then(|r| r.downloaded_at_ms)),
    ];
    let outputs: Vec<&String> = record
        .map(|r| r.outputs.iter().collect())
        .unwrap_or_default();
    view::page(
        &format!("{name} / {}", m.id),
        c.engine.settings.simulate,
        html! {
            p.crumbs { a href="/" { "Overview" } " › " a href=(format!("/batches/{}", seg(name))) { (name) } " › " (m.id) }
            h1 { "Row " (m.id) }
            dl.facts {
                dt { "State" } dd { span.(format!("st st-{}", state.as_str())) #row-state { (state.as_str()) } }
                dt { "Row / line" } dd { (m.index) " / line " (m.line) " of the manifest" }
                dt { "Task" } dd.mono #task-id { (record.and_then(|r| r.task_id.as_deref()).unwrap_or("none yet")) }
                @if let Some(r) = record.filter(|r| !r.previous_tasks.is_empty()) {
                    dt { "Earlier tasks" } dd.mono { (r.previous_tasks.join(", ")) }
                }
                @if let Some(code) = record.and_then(|r| r.fail_code.as_deref()) {
                    dt { "Fail code" } dd #fail-code { (code) }
                    dt { "Message" } dd { (record.and_then(|r| r.fail_msg.as_deref()).unwrap_or("")) }
                }
                @if let Some(s) = record.and_then(|r| r.audio_seconds) {
                    dt { "Audio" } dd { (format!("{s:.1}")) " s" }
                }
                @if let Some(usd_) = record.and_then(|r| r.paid_cost_usd()) {
                    dt { "Cost" } dd { (usd(usd_)) }
                }
                @if let Some(ms) = record.and_then(|r| r.cost_time_ms) {
                    dt { "Processing time (API)" } dd { (duration(ms / 1000)) }
                }
                @if let Some(r) = record.filter(|r| r.ambiguous_submits > 0) {
                    dt { "Submits without an answer" } dd.warn { (r.ambiguous_submits) " (each possibly paid)" }
                }
                dt { "Image" } dd.mono.wrap { (spec.image_url) }
                @if let Some(mask) = &spec.mask_url { dt { "Mask" } dd.mono.wrap { (mask) } }
                dt { "Audio URL" } dd.mono.wrap { (spec.audio_url) }
            }
            h2 { "Timeline" }
            ol.timeline {
                @for (what, at) in timeline {
                    li.missing[at.is_none()] {
                        span.what { (what) } " "
                        @match at { Some(ms) => time { (time(ms)) " UTC" }, None => span.small { "—" } }
                    }
                }
            }
            @if !outputs.is_empty() {
                h2 { "Video" }
                @for (i, file) in outputs.iter().enumerate() {
                    figure {
                        video #(format!("video-{i}")) controls preload="metadata" src=(format!("/batches/{}/files/{}", seg(name), seg(file))) {
                            "Your browser cannot play this video: " a href=(format!("/batches/{}/files/{}", seg(name), seg(file))) { "download it" }
                        }
                        figcaption { a href=(format!("/batches/{}/files/{}", seg(name), seg(file))) { (file) } }
                    }
                }
            }
        },
    )
}
