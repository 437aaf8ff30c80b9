//! One batch (`/batches/{name}`): its live card, its actions, and its rows
//! paged on the server (filter by state or fail code, search by id); one
//! row (`/batches/{name}/rows/{id}`) with its timeline and video; and the
//! videos themselves (`/batches/{name}/files/{file}`, Range supported,
//! confined to the batch's folder in the outbox).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use maud::{Markup, html};
use serde::Deserialize;

use super::Console;
use super::monitor::BatchView;
use super::view::{self, duration, progress, region, seg, time, usd};
use crate::manifest::ManifestRow;
use crate::store::{BatchPhase, BatchRecord, RowFilter, RowRecord, RowState};

/// Rows on one page.
pub(crate) const PAGE_ROWS: usize = 50;
/// Longest search text accepted.
const MAX_QUERY: usize = 128;

/// The live card of a batch (also a region of the overview's data).
pub(crate) fn card(b: &BatchView) -> Markup {
    let s = &b.status;
    html! {
        div.cards {
            div.card.wide {
                span.k { "Progress" }
                (progress(s.done, s.failed, s.total))
                span.v #progress-text { (s.done + s.failed) " of " (s.total) " rows ended" }
            }
            div.card { span.k { "Queued" } span.v data-count="queued" { (s.queued) } }
            div.card { span.k { "In flight" } span.v data-count="in_flight" { (s.in_flight) } }
            div.card { span.k { "Downloading" } span.v data-count="downloading" { (s.downloading) } }
            div.card { span.k { "Done" } span.v data-count="done" { (s.done) } }
            div.card { span.k { "Failed" } span.v data-count="failed" { (s.failed) } }
            div.card { span.k { "Cost so far ≈ (est. total)" } span.v { (usd(b.cost_usd)) " (" (usd(b.estimate_usd)) ")" } span.note { "at 5 billed seconds a row" } }
            div.card { span.k { "ETA" } span.v { @match b.eta_secs { Some(e) => { "≈ " (duration(e)) }, None => "–" } } }
            div.card {
                span.k { "State" }
                span.v #batch-state data-paused=(s.paused) data-cancelled=(s.cancelled) data-priority=(s.priority.as_str()) {
                    @if s.phase == BatchPhase::Finished { "finished" }
                    @else if s.cancelled { "cancelled" }
                    @else if s.paused { "paused" }
                    @else { "active" }
                    ", priority " (s.priority.as_str())
                }
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PageQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    q: Option<String>,
}

/// One row of the table: its number, what the manifest says, what the
/// store knows.
struct Line {
    row: u64,
    id: String,
    state: RowState,
    record: Option<RowRecord>,
}

pub(crate) async fn page(
    State(c): State<Console>,
    Path(name): Path<String>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Response {
    let q = query.map(|Query(q)| q).unwrap_or_default();
    let c2 = c.clone();
    let loaded =
        tokio::task::spawn_blocking(move || load_page(&c2, &name, &q).map(|p| (p, q))).await;
    let (loaded, q) = match loaded {
        Ok(Ok((Some(p), q))) => (p, q),
        Ok(Ok((None, _))) => return view::not_found("No batch of that name."),
        Ok(Err(e)) => return view::failed(&e),
        Err(e) => return view::failed(&e.to_string()),
    };
    let (batch, lines, codes) = loaded;
    let published = c.monitor.current();
    let key = format!("batch:{}", batch.name);
    let live = published.regions.get(&key).map_or("", String::as_str);
    let per_row = c.engine.settings.defaults.resolution.cost_usd(0.0);
    let base = format!("/batches/{}", seg(&batch.name));
    view::page(
        &batch.name,
        c.engine.settings.simulate,
        html! {
            p.crumbs { a href="/" { "Overview" } " › " (batch.name) }
            h1 { "Batch " (batch.name) }
            p.small { "Accepted " (time(batch.created_at_ms)) " · " (batch.total_rows) " rows"
                @if batch.simulated { " · simulated" } }
            (region(&key, live))
            (actions(&batch, &codes, per_row))
            section aria-labelledby="h-rows" {
                h2 #h-rows { "Rows" }
                (filters(&base, &q, &codes))
                (table(&batch.name, &lines))
                (pager(&base, &q, &lines, batch.total_rows))
            }
        },
    )
}

type Loaded = (BatchRecord, Vec<Line>, Vec<(String, u64)>);

fn load_page(c: &Console, name: &str, q: &PageQuery) -> Result<Option<Loaded>, String> {
    let store = &c.engine.store;
    let Some(batch) = store.batch_named(name).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    if batch.phase == BatchPhase::Ingesting {
        return Ok(None);
    }
    let manifest = c.engine.folders.manifest_of(&batch.name);
    let after = q.after.unwrap_or(0);
    let codes: Vec<(String, u64)> = store
        .fail_codes(batch.seq)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let with_records = |rows: Vec<ManifestRow>| -> Result<Vec<Line>, String> {
        rows.into_iter()
            .map(|m| {
                let record = store
                    .row_record(batch.seq, m.index)
                    .map_err(|e| e.to_string())?;
                Ok(Line {
                    row: m.index,
                    id: m.id,
                    state: record.as_ref().map_or(RowState::Queued, |r| r.state),
                    record,
                })
            })
            .collect()
    };
    let from_store = |rows: Vec<(u64, RowRecord)>| -> Vec<Line> {
        rows.into_iter()
            .map(|(row, r)| Line {
                row,
                id: r.id.clone(),
                state: r.state,
                record: Some(r),
            })
            .collect()
    };
    let search = q.q.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let lines = if let Some(text) = search {
        let text: String = text.chars().take(MAX_QUERY).collect();
        let found = super::rows::search(&manifest, &text, PAGE_ROWS).map_err(|e| e.to_string())?;
        with_records(found)?
    } else {
        let state = parse_state(q.state.as_deref());
        let filter = RowFilter {
            state,
            code: q.code.clone().filter(|c| !c.is_empty()),
        };
        match (filter.state, &filter.code) {
            (None, None) => with_records(
                c.manifests
                    .rows_after(batch.seq, &manifest, after, PAGE_ROWS)
                    .map_err(|e| e.to_string())?,
            )?,
            (Some(RowState::Queued), None) => {
                let claimed = batch.cursor.map_or(0, |p| p.rows_read);
                let mut lines = from_store(
                    store
                        .rows_page(batch.seq, &filter, after, PAGE_ROWS)
                        .map_err(|e| e.to_string())?,
                );
                let fresh = c
                    .manifests
                    .rows_after(batch.seq, &manifest, after.max(claimed), PAGE_ROWS)
                    .map_err(|e| e.to_string())?;
                lines.extend(
                    with_records(fresh)?
                        .into_iter()
                        .filter(|l| l.record.is_none()),
                );
                lines.sort_by_key(|l| l.row);
                lines.truncate(PAGE_ROWS);
                lines
            }
            _ => from_store(
                store
                    .rows_page(batch.seq, &filter, after, PAGE_ROWS)
                    .map_err(|e| e.to_string())?,
            ),
        }
    };
    Ok(Some((batch, lines, codes)))
}

fn parse_state(s: Option<&str>) -> Option<RowState> {
    let s = s?;
    RowState::ALL.into_iter().find(|st| st.as_str() == s)
}

fn actions(batch: &BatchRecord, codes: &[(String, u64)], per_row: f64) -> Markup {
    let name = &batch.name;
    let failed: u64 = codes.iter().map(|(_, n)| n).sum();
    html! {
        section.actions aria-labelledby="h-actions" data-batch=(name) data-per-row=(per_row) {
            h2 #h-actions { "Actions" }
            div.row {
                button type="button" data-action="pause" { "Pause" }
                button type="button" data-action="resume" { "Resume" }
                label { "Priority "
                    select #priority name="priority" {
                        @for p in ["high", "normal", "low"] {
                            option value=(p) selected[batch.priority.as_str() == p] { (p) }
                        }
                    }
                }
                button type="button" data-action="priority" { "Set priority" }
            }
            @if failed > 0 {
                fieldset.retry {
                    legend { "Retry failed rows (each is a new, paid task)" }
                    @for (code, n) in codes {
                        @let label = if code.is_empty() { "(no code)" } else { code.as_str() };
                        label.check {
                            input type="checkbox" name="code" value=(code) data-rows=(n) checked;
                            " " (label) " — " (n) " row(s)"
                        }
                    }
                    p { button type="button" data-action="retry" #retry-button { "Retry" } " " span #retry-cost.small {} }
                }
            }
            @if batch.phase == BatchPhase::Active && !batch.cancelled {
                div.row {
                    button.danger type="button" data-action="cancel-ask" { "Cancel batch…" }
                }
                div.confirm #cancel-confirm hidden role="group" aria-labelledby="cancel-q" {
                    p #cancel-q { "Cancel batch " strong { (name) } "? Its " (batch.queued()) " queued row(s) end failed (CANCELLED) and are never submitted; tasks already running finish." }
                    button.danger type="button" data-action="cancel" { "Yes, cancel the batch" }
                    " "
                    button type="button" data-action="cancel-no" { "No, keep it" }
                }
            }
        }
    }
}

fn filters(base: &str, q: &PageQuery, codes: &[(String, u64)]) -> Markup {
    let state = q.state.as_deref().unwrap_or("");
    let code = q.code.as_deref().unwrap_or("");
    html! {
        div.filters {
            form method="get" action=(base) role="search" {
                label for="q" { "Find row by id" }
                input #q type="search" name="q" value=(q.q.as_deref().unwrap_or("")) maxlength=(MAX_QUERY) placeholder="row id";
                button type="submit" { "Find" }
            }
            form method="get" action=(base) {
                label for="state" { "State" }
                select #state name="state" {
                    option value="" selected[state.is_empty()] { "all" }
                    @for s in RowState::ALL {
                        option value=(s.as_str()) selected[state == s.as_str()] { (s.as_str()) }
                    }
                }
                label for="code" { "Fail code" }
                select #code name="code" {
                    option value="" selected[code.is_empty()] { "any" }
                    @for (c, n) in codes {
                        option value=(c) selected[code == c] { (c) " (" (n) ")" }
                    }
                }
                button type="submit" { "Show" }
            }
        }
    }
}

fn table(batch: &str, lines: &[Line]) -> Markup {
    html! {
        @if lines.is_empty() {
            p.empty #no-rows { "No rows here." }
        } @else {
            div.scroll {
                table.rows {
                    thead { tr {
                        th scope="col" .num { "Row" } th scope="col" { "Id" } th scope="col" { "State" }
                        th scope="col" { "Task" } th scope="col" { "Fail code" } th scope="col" { "Output" }
                    } }
                    tbody {
                        @for l in lines {
                            @let r = l.record.as_ref();
                            tr data-row-id=(l.id) {
                                td.num { (l.row) }
                                th scope="row" { a href=(format!("/batches/{}/rows/{}", seg(batch), seg(&l.id))) { (l.id) } }
                                td { span.(format!("st st-{}", l.state.as_str())) { (l.state.as_str()) } }
                                td.mono { (r.and_then(|r| r.task_id.as_deref()).unwrap_or("")) }
                                td { (r.and_then(|r| r.fail_code.as_deref()).unwrap_or("")) }
                                td { (r.map(|r| r.outputs.join(", ")).unwrap_or_default()) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn pager(base: &str, q: &PageQuery, lines: &[Line], total: u64) -> Markup {
    if q.q.as_deref().is_some_and(|s| !s.trim().is_empty()) {
        return html! { p { a href=(base) { "Show all rows" } } };
    }
    let mut params = String::new();
    if let Some(s) = q.state.as_deref().filter(|s| !s.is_empty()) {
        params.push_str(&format!("&state={}", seg(s)));
    }
    if let Some(c) = q.code.as_deref().filter(|s| !s.is_empty()) {
        params.push_str(&format!(
            "&code={}",
            url::form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>()
        ));
    }
    let after = q.after.unwrap_or(0);
    let last = lines.last().map(|l| l.row);
    let plain = q.state.is_none() && q.code.is_none();
    html! {
        nav.pager aria-label="Pages of rows" {
            @if after > 0 { a href=(format!("{base}?after=0{params}")) { "« First" } }
            @if plain && after > 0 {
                a href=(format!("{base}?after={}{params}", after.saturating_sub(PAGE_ROWS as u64))) { "‹ Previous" }
            }
            @if let (Some(first), Some(last)) = (lines.first(), last) {
                span { "rows " (first.row) "–" (last) " of " (total) }
            }
            @if let Some(last) = last.filter(|_| lines.len() >= PAGE_ROWS) {
                a #next-page href=(format!("{base}?after={last}{params}")) { "Next ›" }
            }
        }
    }
}

pub(crate) async fn row(
    State(c): State<Console>,
    Path((name, id)): Path<(String, String)>,
) -> Response {
    let c2 = c.clone();
    let found = tokio::task::spawn_blocking(move || -> Result<Option<_>, String> {
        let store = &c2.engine.store;
        let Some(batch) = store.batch_named(&name).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let manifest = c2.engine.folders.manifest_of(&batch.name);
        let Some(m) = c2
            .manifests
            .find_id(batch.seq, &manifest, &id)
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let record = store
            .row_record(batch.seq, m.index)
            .map_err(|e| e.to_string())?;
        Ok(Some((batch, m, record)))
    })
    .await;
    let (batch, m, record) = match found {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return view::not_found("No such batch or row."),
        Ok(Err(e)) => return view::failed(&e),
        Err(e) => return view::failed(&e.to_string()),
    };
    super::detail::render(&c, &batch, &m, record.as_ref())
}
