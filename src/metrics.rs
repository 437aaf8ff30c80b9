//! Counters and histograms the daemon keeps for `/metrics` and `/status`.
//!
//! Rows by state and batches are read from the store at scrape time; what is
//! counted here is what the store does not know (requests, waits, bytes).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `submit`, `status` or `download`.
    pub endpoint: &'static str,
    /// `ok`, `rate_limited`, `transient`, `paused`, `refused`.
    pub outcome: &'static str,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub rate_limited: Counter,
    pub tasks_in_flight: Gauge,
    pub tasks_submitted: Counter,
    pub resubmitted: Counter,
    /// Submits whose answer was lost or unreadable (a task may exist).
    pub submits_ambiguous: Counter,
    /// Rows with at least one such submit, as the store keeps it.
    pub rows_possibly_paid_twice: Gauge,
    /// Seconds between a task's completion (as the API reports) and our seeing it.
    pub detection_delay: Histogram,
    /// Seconds from submission to being seen finished.
    pub task_duration: Histogram,
    /// Polls each finished task needed.
    pub polls_per_task: Histogram,
    pub download_bytes: Counter,
    pub callbacks: Family<CallbackLabels, Counter>,
    pub worker_restarts: Family<WorkerLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// `submit`, `poll`, `download`, `results`, `archive`, `inbox`, `listener`, ...
    pub worker: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallbackLabels {
    /// `accepted`, `bad_secret`, `unknown_task`, `malformed`, `too_large`.
    pub outcome: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            rate_limited: Counter::default(),
            tasks_in_flight: Gauge::default(),
            tasks_submitted: Counter::default(),
            resubmitted: Counter::default(),
            submits_ambiguous: Counter::default(),
            rows_possibly_paid_twice: Gauge::default(),
            detection_delay: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            task_duration: Histogram::new(exponential_buckets(0.5, 2.0, 18)),
            polls_per_task: Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0]),
            download_bytes: Counter::default(),
            callbacks: Family::default(),
            worker_restarts: Family::default(),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, outcome })
            .inc();
    }

    pub fn worker_restarted(&self, worker: &'static str) {
        self.worker_restarts
            .get_or_create(&WorkerLabels { worker })
            .inc();
    }

    pub fn worker_restarts_of(&self, worker: &'static str) -> u64 {
        self.worker_restarts
            .get_or_create(&WorkerLabels { worker })
            .get()
    }

    /// Registers everything under the `infinitetalk_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("infinitetalk");
        r.register(
            "api_requests",
            "API requests by endpoint and outcome",
            self.requests.clone(),
        );
        r.register(
            "api_rate_limited",
            "429 answers received",
            self.rate_limited.clone(),
        );
        r.register(
            "tasks_in_flight",
            "Tasks submitted and not yet seen finished",
            self.tasks_in_flight.clone(),
        );
        r.register(
            "tasks_submitted",
            "Tasks created by submits",
            self.tasks_submitted.clone(),
        );
        r.register(
            "rows_resubmitted",
            "Rows resubmitted after a service-side failure or a crash mid-submit",
            self.resubmitted.clone(),
        );
        r.register(
            "submits_ambiguous",
            "Submits whose answer was lost or unreadable after sending (each may have created a paid task)",
            self.submits_ambiguous.clone(),
        );
        r.register(
            "rows_possibly_paid_twice",
            "Rows with at least one ambiguous submit, since the state folder was created",
            self.rows_possibly_paid_twice.clone(),
        );
        r.register_with_unit(
            "detection_delay",
            "Delay between a task finishing and the daemon noticing it",
            prometheus_client::registry::Unit::Seconds,
            self.detection_delay.clone(),
        );
        r.register_with_unit(
            "task_duration",
            "Time from submission to the task being seen finished",
            prometheus_client::registry::Unit::Seconds,
            self.task_duration.clone(),
        );
        r.register(
            "polls_per_task",
            "Status polls each finished task needed",
            self.polls_per_task.clone(),
        );
        r.register_with_unit(
            "download",
            "Bytes of video downloaded",
            prometheus_client::registry::Unit::Bytes,
            self.download_bytes.clone(),
        );
        r.register(
            "callbacks",
            "Callbacks received by outcome",
            self.callbacks.clone(),
        );
        r.register(
            "worker_restarts",
            "Workers restarted after a panic or an unexpected exit",
            self.worker_restarts.clone(),
        );
    }
}
