//! How fast rows end: per batch over the last minutes (for each batch's
//! estimated time to finish) and for the whole daemon over the last hour
//! (the console's throughput chart). Memory only: after a restart the
//! estimate starts afresh, from the poll model's mean task time.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::store::BatchSeq;

/// One bucket of a batch's recent ends.
const BUCKET: Duration = Duration::from_secs(10);
/// A batch's rate is measured over at most this many buckets (5 minutes).
const BATCH_BUCKETS: usize = 30;
/// Minutes of the daemon's history kept (the last hour).
const HOUR: usize = 60;

#[derive(Debug, Default)]
struct Ring {
    /// (bucket start, rows ended in it), oldest first.
    buckets: VecDeque<(Instant, u64)>,
}

impl Ring {
    fn add(&mut self, now: Instant, width: Duration, keep: usize) {
        match self.buckets.back_mut() {
            Some((start, n)) if now.duration_since(*start) < width => *n += 1,
            _ => {
                self.buckets.push_back((now, 1));
                while self.buckets.len() > keep {
                    self.buckets.pop_front();
                }
            }
        }
    }

    /// Rows ended per second since the oldest bucket within `span`.
    fn rate(&self, now: Instant, span: Duration) -> Option<f64> {
        let recent = self
            .buckets
            .iter()
            .filter(|(start, _)| now.duration_since(*start) < span);
        let (mut first, mut ended) = (None, 0u64);
        for (start, n) in recent {
            first.get_or_insert(*start);
            ended += n;
        }
        let secs = now.duration_since(first?).as_secs_f64();
        // A rate over less than a bucket is noise.
        (secs >= BUCKET.as_secs_f64()).then(|| ended as f64 / secs)
    }
}

/// Rows ended, counted as they end.
#[derive(Debug, Default)]
pub struct Progress {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    batches: HashMap<BatchSeq, Ring>,
    hour: Ring,
}

impl Progress {
    /// A row of `batch` ended (done or failed).
    pub fn ended(&self, batch: BatchSeq) {
        let now = Instant::now();
        let mut inner = self.lock();
        inner
            .batches
            .entry(batch)
            .or_default()
            .add(now, BUCKET, BATCH_BUCKETS);
        inner.hour.add(now, Duration::from_secs(60), HOUR);
    }

    /// The batch finished: its history is no longer needed.
    pub fn forget(&self, batch: BatchSeq) {
        self.lock().batches.remove(&batch);
    }

    /// Rows of `batch` ended per second over the last few minutes, once
    /// there is enough history to say.
    pub fn rate(&self, batch: BatchSeq) -> Option<f64> {
        let span = BUCKET * BATCH_BUCKETS as u32;
        self.lock()
            .batches
            .get(&batch)
            .and_then(|r| r.rate(Instant::now(), span))
    }

    /// Rows ended in each of the last 60 minutes, oldest first (the current,
    /// partial minute last).
    pub fn last_hour(&self) -> Vec<u64> {
        let now = Instant::now();
        let inner = self.lock();
        let mut minutes = vec![0u64; HOUR];
        for (start, n) in &inner.hour.buckets {
            let ago = (now.duration_since(*start).as_secs() / 60) as usize;
            if ago < HOUR {
                minutes[HOUR - 1 - ago] += n;
            }
        }
        minutes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Seconds until `remaining` rows have ended: at the batch's measured rate
/// when there is one, else from the mean task time and the batch's share of
/// the slots (`slots_share` slots, each ending a task every `mean_task`
/// seconds).
pub fn eta_seconds(
    remaining: u64,
    rate: Option<f64>,
    mean_task: Option<f64>,
    slots_share: f64,
) -> Option<u64> {
    if remaining == 0 {
        return Some(0);
    }
    let per_sec = match rate {
        Some(r) if r > 0.0 => r,
        _ => {
            let mean = mean_task.filter(|m| *m > 0.0)?;
            slots_share.max(1.0) / mean
        }
    };
    let secs = remaining as f64 / per_sec;
    // Bounded: a rate of one row a year says "unknown" as well as any.
    (secs.is_finite() && secs < 365.0 * 86_400.0).then(|| secs.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rate_until_a_bucket_has_passed() {
        let mut ring = Ring::default();
        let t0 = Instant::now();
        ring.add(t0, BUCKET, 3);
        assert_eq!(ring.rate(t0 + Duration::from_secs(5), BUCKET * 3), None);
        for i in 1..=20 {
            ring.add(t0 + Duration::from_secs(i), BUCKET, 3);
        }
        // 21 rows over 20 s.
        let r = ring
            .rate(t0 + Duration::from_secs(20), BUCKET * 3)
            .expect("rate");
        assert!((r - 21.0 / 20.0).abs() < 1e-9, "{r}");
        // Old buckets fall out of the span, and of the ring.
        ring.add(t0 + Duration::from_secs(45), BUCKET, 3);
        assert_eq!(ring.buckets.len(), 3);
    }

    #[test]
    fn eta_from_rate_or_model() {
        assert_eq!(eta_seconds(0, None, None, 10.0), Some(0));
        assert_eq!(eta_seconds(100, Some(2.0), None, 10.0), Some(50));
        // No rate yet: 10 slots, a task a minute each.
        assert_eq!(eta_seconds(100, None, Some(60.0), 10.0), Some(600));
        assert_eq!(eta_seconds(100, None, None, 10.0), None);
        assert_eq!(eta_seconds(u64::MAX, Some(1e-9), None, 1.0), None);
    }

    #[test]
    fn the_hour_is_counted_per_minute() {
        let p = Progress::default();
        for _ in 0..5 {
            p.ended(1);
        }
        let hour = p.last_hour();
        assert_eq!(hour.len(), HOUR);
        assert_eq!(hour[HOUR - 1], 5);
        assert_eq!(hour.iter().sum::<u64>(), 5);
    }
}
