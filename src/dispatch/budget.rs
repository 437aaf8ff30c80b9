//! The request budget: at most N API requests in any sliding window, shared
//! by submits and polls, also across restarts.
//!
//! governor smooths the pace (a small burst, then a steady rate), but a GCRA
//! quota alone lets almost 2N through in one 60 s window, so an exact log of
//! send times is the hard limit. The log's window is a little longer than the
//! server's (61 s) so that uneven network latency cannot squeeze two of our
//! windows into one of the server's. Submits wait ahead of polls: polls can
//! only free concurrency slots, and submits can only use free slots, so the
//! two cannot starve each other for long.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::{Quota, RateLimiter};
use tokio::sync::Notify;

use crate::store::LedgerEntry;

/// The server's window (60 s) plus one second of latency allowance.
pub const WINDOW: Duration = Duration::from_secs(61);

/// What a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Submit,
    Poll,
}

type Gcra = RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
    governor::middleware::NoOpMiddleware,
>;

pub struct RequestBudget {
    limit: usize,
    gcra: Gcra,
    log: Mutex<VecDeque<Instant>>,
    /// Earliest instant the next request may go after a 429.
    hold_until: Mutex<Option<Instant>>,
    submits_waiting: AtomicUsize,
    submit_done: Notify,
}

impl std::fmt::Debug for RequestBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBudget")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

/// The limit actually aimed at: a 1% margin below the published one, for
/// clock differences at the server.
pub fn effective_limit(per_minute: u32) -> usize {
    let n = per_minute as usize;
    n.saturating_sub((n / 100).max(1)).max(1)
}

struct WaitGuard<'a>(&'a RequestBudget);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.submits_waiting.fetch_sub(1, Ordering::SeqCst);
        self.0.submit_done.notify_waiters();
    }
}

impl RequestBudget {
    /// A budget of `per_minute` requests, with `ledger` (what a previous run
    /// spent, as saved by [`RequestBudget::ledger`]) already counted.
    pub fn new(per_minute: u32, ledger: &[LedgerEntry]) -> Self {
        let limit = effective_limit(per_minute);
        let burst = (limit / 20).max(1);
        let period = Duration::from_secs_f64(60.0 / limit as f64);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst as u32).unwrap_or(NonZeroU32::MIN));
        let budget = RequestBudget {
            limit,
            gcra: RateLimiter::direct(quota),
            log: Mutex::new(VecDeque::with_capacity(limit.min(1 << 16))),
            hold_until: Mutex::new(None),
            submits_waiting: AtomicUsize::new(0),
            submit_done: Notify::new(),
        };
        budget.restore(ledger, burst);
        budget
    }

    fn restore(&self, ledger: &[LedgerEntry], burst: usize) {
        let now = Instant::now();
        let wall = unix_now();
        let mut log = self.lock_log();
        let mut last: Option<u64> = None;
        for entry in ledger {
            let age = (wall - entry.unix_second as f64).max(0.0);
            if age >= WINDOW.as_secs_f64() {
                continue;
            }
            let at = now.checked_sub(Duration::from_secs_f64(age)).unwrap_or(now);
            for _ in 0..entry.requests {
                log.push_back(at);
            }
            last = Some(last.map_or(entry.unix_second, |l| l.max(entry.unix_second)));
        }
        if let Some(last) = last {
            // The ledger is saved every second: what was sent after the last
            // save is unknown, so count the most the pace could have sent.
            let unknown = (2 * self.limit / 60 + burst).min(self.limit);
            let age = (wall - (last as f64 + 1.0)).max(0.0);
            let at = now.checked_sub(Duration::from_secs_f64(age)).unwrap_or(now);
            for _ in 0..unknown {
                log.push_back(at);
            }
        }
        log.make_contiguous().sort();
        while log.len() > self.limit {
            log.pop_front();
        }
    }

    fn lock_log(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most requests this budget lets through in any window.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Requests sent in the last window.
    pub fn sent_in_window(&self) -> usize {
        let mut log = self.lock_log();
        prune(&mut log, Instant::now());
        log.len()
    }

    /// After a 429: nothing goes for `pause`.
    pub fn hold(&self, pause: Duration) {
        // `pause` comes from the network (clamped there); never overflow.
        let now = Instant::now();
        let until = now
            .checked_add(pause.min(Duration::from_secs(24 * 3600)))
            .unwrap_or(now);
        let mut hold = self.hold_until.lock().unwrap_or_else(|p| p.into_inner());
        if hold.is_none_or(|h| h < until) {
            *hold = Some(until);
        }
    }

    /// Waits until one request of `class` may be sent, and counts it.
    pub async fn acquire(&self, class: Class) {
        let _guard = (class == Class::Submit).then(|| {
            self.submits_waiting.fetch_add(1, Ordering::SeqCst);
            WaitGuard(self)
        });
        loop {
            if class == Class::Poll && self.submits_waiting.load(Ordering::SeqCst) > 0 {
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), self.submit_done.notified())
                        .await;
                continue;
            }
            let hold = *self.hold_until.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = hold.filter(|u| *u > Instant::now()) {
                tokio::time::sleep_until(until.into()).await;
                continue;
            }
            self.gcra.until_ready().await;
            match self.try_take() {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Counts one request if the window has room; otherwise how long until it has.
    fn try_take(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut log = self.lock_log();
        prune(&mut log, now);
        if log.len() < self.limit {
            log.push_back(now);
            return Ok(());
        }
        let oldest = log.front().copied().unwrap_or(now);
        Err((oldest + WINDOW).saturating_duration_since(now) + Duration::from_millis(1))
    }

    /// Takes one request now if both the pace and the window allow it.
    pub fn try_acquire(&self) -> bool {
        let held = self
            .hold_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|h| h > Instant::now());
        !held && self.gcra.check().is_ok() && self.try_take().is_ok()
    }

    /// Counts every request counted since `since` as sent now. The server
    /// counts a request when it arrives: a submit counted, then held back
    /// by its write-ahead flush (which can take seconds on a busy disk),
    /// must count from when it is sent, or a window at the server could hold
    /// more than the limit. Requests of others counted meanwhile move too,
    /// which only makes the budget more careful.
    pub fn restamp_since(&self, since: Instant) {
        let now = Instant::now();
        let mut log = self.lock_log();
        for at in log.iter_mut().rev() {
            if *at < since {
                break;
            }
            *at = now;
        }
    }

    /// Requests per second of the last window, to persist.
    pub fn ledger(&self) -> Vec<LedgerEntry> {
        let now = Instant::now();
        let wall = unix_now();
        let mut log = self.lock_log();
        prune(&mut log, now);
        let mut out: Vec<LedgerEntry> = Vec::new();
        for at in log.iter() {
            let second = (wall - now.duration_since(*at).as_secs_f64())
                .floor()
                .max(0.0) as u64;
            match out.last_mut() {
                Some(last) if last.unix_second == second => last.requests += 1,
                _ => out.push(LedgerEntry {
                    unix_second: second,
                    requests: 1,
                }),
            }
        }
        out
    }
}

fn prune(log: &mut VecDeque<Instant>, now: Instant) {
    while let Some(front) = log.front() {
        if now.duration_since(*front) >= WINDOW {
            log.pop_front();
        } else {
            break;
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_more_than_the_limit_in_a_window() {
        let budget = RequestBudget::new(101, &[]);
        assert_eq!(budget.limit(), 100);
        let mut taken = 0;
        while budget.try_acquire() || budget.try_take().is_ok() {
            taken += 1;
            if taken > 1000 {
                break;
            }
        }
        assert_eq!(taken, 100);
        assert_eq!(budget.sent_in_window(), 100);
    }

    #[test]
    fn a_request_held_back_counts_from_when_it_is_sent() {
        let budget = RequestBudget::new(600, &[]);
        let before = Instant::now();
        assert!(budget.try_take().is_ok());
        let since = Instant::now();
        assert!(budget.try_take().is_ok());
        assert!(budget.try_take().is_ok());
        std::thread::sleep(Duration::from_millis(20));
        budget.restamp_since(since);
        let log = budget.lock_log();
        assert_eq!(log.len(), 3);
        assert!(log[0] < since && log[0] >= before);
        assert!(log[1] >= since + Duration::from_millis(20), "{log:?}");
        assert!(log[2] >= since + Duration::from_millis(20), "{log:?}");
    }

    #[test]
    fn ledger_round_trips_across_a_restart() {
        let first = RequestBudget::new(600, &[]);
        for _ in 0..50 {
            assert!(first.try_take().is_ok());
        }
        let ledger = first.ledger();
        assert_eq!(ledger.iter().map(|e| e.requests).sum::<u32>(), 50);
        let second = RequestBudget::new(600, &ledger);
        // 50 restored, plus the unknown tail after the last save.
        assert!(second.sent_in_window() >= 50, "{}", second.sent_in_window());
        assert!(second.sent_in_window() <= second.limit());
    }

    #[test]
    fn old_ledger_entries_are_ignored() {
        let old = LedgerEntry {
            unix_second: unix_now() as u64 - 3600,
            requests: 500,
        };
        let budget = RequestBudget::new(600, &[old]);
        assert_eq!(budget.sent_in_window(), 0);
    }
}
