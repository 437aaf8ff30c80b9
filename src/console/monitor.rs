//! The console's sampler: twice a second it reads the batches and the
//! engine's gauges (a few small reads), keeps per-minute throughput for the
//! last hour and a bounded ring of recent events (found by comparing one
//! sample with the last), renders the pages' live regions, and publishes
//! them on a `watch` channel only when one changed. Open consoles cost the
//! daemon nothing more: every stream reads the same published regions.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::dispatch::Engine;
use crate::status::{BatchStatus, Spend};
use crate::store::{BatchPhase, BatchRecord, now_ms};

/// How often the sampler looks: live changes show within this.
pub(crate) const TICK: Duration = Duration::from_millis(500);
/// Minutes of throughput kept (the chart's width).
pub(crate) const MINUTES: usize = 60;
/// Recent events kept.
const MAX_EVENTS: usize = 200;
/// Ticks between looks at the rejected folder (a directory listing).
const REJECTED_EVERY: u32 = 4;
/// How far back the pace behind an ETA looks.
const PACE_WINDOW_MS: u64 = 10 * 60_000;
/// Time between two remembered points of the pace.
const PACE_STEP_MS: u64 = 5_000;
/// Workers whose restarts are events.
const WORKERS: [&str; 6] = ["submit", "poll", "download", "results", "archive", "inbox"];

/// One thing worth telling the operator.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Event {
    pub at_ms: u64,
    pub text: String,
    /// Shown as a warning.
    pub warn: bool,
}

/// A batch as the console shows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BatchView {
    pub status: BatchStatus,
    pub created_at_ms: u64,
    pub simulated: bool,
    /// Rows submitted so far at the least they cost (5 billed seconds).
    pub cost_usd: f64,
    /// Every row at the least it costs.
    pub estimate_usd: f64,
    /// Seconds until its last row ends (the status model's estimate).
    pub eta_secs: Option<u64>,
}

/// What the overview shows, from one sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Overview {
    pub paused: Option<String>,
    pub simulated: bool,
    pub requests: u64,
    pub max_requests: u32,
    pub in_flight: u64,
    pub max_concurrent: u32,
    pub spend: Option<Spend>,
    /// Rows ended per minute, oldest first, the current minute last.
    pub throughput: Vec<u64>,
    /// Rows ended per minute over the last few minutes.
    pub rate_per_min: f64,
    /// Rows not yet ended, over all active batches.
    pub remaining: u64,
    pub eta_secs: Option<u64>,
    pub batches: Vec<BatchView>,
}

/// A rejected manifest in `INBOX/rejected/`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rejected {
    /// File name of the manifest (`NAME.csv`).
    pub file: String,
    pub at_ms: u64,
}

/// What the pages' live regions show now, rendered.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub overview: Overview,
    /// Region id to its HTML.
    pub regions: BTreeMap<String, String>,
}

/// The sampler's shared state.
pub struct Monitor {
    events: Mutex<VecDeque<Event>>,
    rejected: Mutex<Vec<Rejected>>,
    published: watch::Sender<Arc<Published>>,
}

/// What the sampler remembers between ticks.
#[derive(Default)]
struct Memory {
    batches: BTreeMap<u64, BatchRecord>,
    paused: Option<String>,
    ended_total: Option<u64>,
    /// (unix minute, rows ended in it).
    minutes: VecDeque<(u64, u64)>,
    /// (unix ms, rows ended in all) every few seconds, for the pace.
    pace: VecDeque<(u64, u64)>,
    restarts: BTreeMap<&'static str, u64>,
    rejected: Option<Vec<Rejected>>,
}

impl Monitor {
    /// Starts the sampler on the engine's task tracker (stopped with it).
    /// `requeued` is how many submits a crash interrupted (said once).
    pub fn start(engine: Arc<Engine>, requeued: usize) -> Arc<Monitor> {
        let monitor = Arc::new(Monitor {
            events: Mutex::default(),
            rejected: Mutex::default(),
            published: watch::Sender::new(Arc::default()),
        });
        let text = if requeued > 0 {
            format!(
                "daemon started; recovered after a crash: {requeued} interrupted submit(s) queued again"
            )
        } else {
            "daemon started".to_owned()
        };
        monitor.push(text, requeued > 0);
        let m = monitor.clone();
        let stop = engine.shutdown.clone();
        engine.tracker.clone().spawn(async move {
            let mut memory = Memory::default();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n: u32 = 0;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let look_rejected = n.is_multiple_of(REJECTED_EVERY);
                n = n.wrapping_add(1);
                let (e, m2) = (engine.clone(), m.clone());
                let sampled = tokio::task::spawn_blocking(move || {
                    m2.sample(&e, &mut memory, look_rejected);
                    memory
                })
                .await;
                match sampled {
                    Ok(mem) => memory = mem,
                    Err(e) => {
                        tracing::error!(error = %e, "console sampler panicked; starting over");
                        memory = Memory::default();
                    }
                }
            }
        });
        monitor
    }

    /// The regions as last published.
    pub(crate) fn current(&self) -> Arc<Published> {
        self.published.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    /// Recent events, newest first.
    pub(crate) fn events(&self, limit: usize) -> Vec<Event> {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        events.iter().rev().take(limit).cloned().collect()
    }

    pub(crate) fn rejected(&self) -> Vec<Rejected> {
        self.rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records an event (also used by the manifest drop).
    pub(crate) fn push(&self, text: String, warn: bool) {
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() >= MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(Event {
            at_ms: now_ms(),
            text,
            warn,
        });
    }

    fn sample(&self, engine: &Engine, memory: &mut Memory, look_rejected: bool) {
        let records = match engine.store.batches() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "console: cannot read the batches");
                return;
            }
        };
        let records: Vec<BatchRecord> = records
            .into_iter()
            .filter(|b| b.phase != BatchPhase::Ingesting)
            .collect();
        self.batch_events(memory, &records);
        let paused = engine.paused().map(|r| r.as_str().to_owned());
        if paused != memory.paused {
            match &paused {
                Some(reason) => self.push(format!("submission paused: {reason}"), true),
                None => self.push("submission resumed".into(), false),
            }
            memory.paused = paused.clone();
        }
        for worker in WORKERS {
            let n = engine.metrics.worker_restarts_of(worker);
            let before = memory.restarts.insert(worker, n).unwrap_or(0);
            if n > before {
                self.push(
                    format!("worker {worker} failed and was restarted ({n} so far)"),
                    true,
                );
            }
        }
        if look_rejected {
            self.look_rejected(engine, memory);
        }
        let ended: u64 = records
            .iter()
            .map(|b| b.counts.done + b.counts.failed)
            .sum();
        let minute = now_ms() / 60_000;
        let delta = memory
            .ended_total
            .map_or(0, |before| ended.saturating_sub(before));
        memory.ended_total = Some(ended);
        match memory.minutes.back_mut() {
            Some((m, n)) if *m == minute => *n += delta,
            _ => memory.minutes.push_back((minute, delta)),
        }
        while memory
            .minutes
            .front()
            .is_some_and(|(m, _)| *m + MINUTES as u64 <= minute)
        {
            memory.minutes.pop_front();
        }
        let now = now_ms();
        if memory
            .pace
            .back()
            .is_none_or(|(at, _)| now.saturating_sub(*at) >= PACE_STEP_MS)
        {
            memory.pace.push_back((now, ended));
        }
        while memory
            .pace
            .front()
            .is_some_and(|(at, _)| at + PACE_WINDOW_MS < now)
        {
            memory.pace.pop_front();
        }
        let rate = match memory.pace.front() {
            Some((at, before)) if now.saturating_sub(*at) >= PACE_STEP_MS => {
                ended.saturating_sub(*before) as f64 * 60_000.0 / (now - at) as f64
            }
            _ => 0.0,
        };
        let overview = overview(engine, &records, &memory.minutes, minute, rate, paused);
        let events = self.events(super::pages::EVENTS_SHOWN);
        let regions = super::pages::regions(&overview, &events, &self.rejected());
        let changed = self.published.borrow().regions != regions;
        if changed {
            self.published
                .send_replace(Arc::new(Published { overview, regions }));
        }
    }

    fn batch_events(&self, memory: &mut Memory, records: &[BatchRecord]) {
        let first = memory.batches.is_empty() && memory.ended_total.is_none();
        for b in records {
            let before = memory.batches.insert(b.seq, b.clone());
            if first {
                continue;
            }
            let Some(before) = before else {
                self.push(
                    format!("batch {} accepted: {} rows", b.name, b.total_rows),
                    false,
                );
                continue;
            };
            if before.phase != BatchPhase::Finished && b.phase == BatchPhase::Finished {
                self.push(
                    format!(
                        "batch {} finished: {} done, {} failed",
                        b.name, b.counts.done, b.counts.failed
                    ),
                    b.counts.failed > 0,
                );
            }
            if before.phase == BatchPhase::Finished && b.phase == BatchPhase::Active {
                self.push(format!("batch {} active again (retry)", b.name), false);
            }
            if before.paused != b.paused {
                let what = if b.paused { "paused" } else { "resumed" };
                self.push(format!("batch {} {what}", b.name), false);
            }
            if !before.cancelled && b.cancelled {
                self.push(format!("batch {} cancelled", b.name), true);
            }
            if before.priority != b.priority {
                self.push(
                    format!("batch {} priority {}", b.name, b.priority.as_str()),
                    false,
                );
            }
        }
    }

    fn look_rejected(&self, engine: &Engine, memory: &mut Memory) {
        let now = list_rejected(&engine.folders.rejected_dir());
        if let Some(before) = &memory.rejected {
            for r in now.iter().filter(|r| !before.contains(r)) {
                self.push(format!("manifest {} rejected", r.file), true);
            }
        }
        memory.rejected = Some(now.clone());
        *self.rejected.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }
}

/// Manifests in the rejected folder, newest first (at most 500).
fn list_rejected(dir: &std::path::Path) -> Vec<Rejected> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Rejected> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            if !file.ends_with(".csv") || file.starts_with('.') {
                return None;
            }
            let at_ms = e
                .metadata()
                .ok()?
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_millis() as u64;
            Some(Rejected { file, at_ms })
        })
        .take(10_000)
        .collect();
    out.sort_by(|a, b| b.at_ms.cmp(&a.at_ms).then(a.file.cmp(&b.file)));
    out.truncate(500);
    out
}

fn overview(
    engine: &Engine,
    records: &[BatchRecord],
    minutes: &VecDeque<(u64, u64)>,
    minute: u64,
    rate_per_min: f64,
    paused: Option<String>,
) -> Overview {
    let throughput: Vec<u64> = (0..MINUTES as u64)
        .rev()
        .map(|ago| {
            let m = minute.saturating_sub(ago);
            minutes
                .iter()
                .find(|(at, _)| *at == m)
                .map_or(0, |(_, n)| *n)
        })
        .collect();
    let active: Vec<&BatchRecord> = records
        .iter()
        .filter(|b| b.phase == BatchPhase::Active)
        .collect();
    let remaining: u64 = active
        .iter()
        .map(|b| b.total_rows.saturating_sub(b.counts.done + b.counts.failed))
        .sum();
    // The estimates are the status model's (`status`, `/status`).
    let report = crate::listener::live_report(engine);
    let per_row = engine.settings.defaults.resolution.cost_usd(0.0);
    let batches = records
        .iter()
        .rev()
        .map(|b| {
            let status = report
                .batches
                .iter()
                .find(|s| s.seq == b.seq)
                .cloned()
                .unwrap_or_else(|| BatchStatus::from(b));
            BatchView {
                eta_secs: status.eta_seconds,
                status,
                created_at_ms: b.created_at_ms,
                simulated: b.simulated,
                cost_usd: b.total_rows.saturating_sub(b.queued()) as f64 * per_row,
                estimate_usd: b.total_rows as f64 * per_row,
            }
        })
        .collect();
    Overview {
        paused,
        simulated: engine.settings.simulate,
        requests: report.requests_last_minute.unwrap_or(0),
        max_requests: engine.settings.max_requests_per_minute,
        in_flight: report.tasks_in_flight.unwrap_or(0),
        max_concurrent: engine.settings.max_concurrent,
        spend: report.spend,
        throughput,
        rate_per_min,
        remaining,
        eta_secs: report.eta_seconds,
        batches,
    }
}
