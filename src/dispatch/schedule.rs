//! When to poll a task: learned from how long finished tasks took.
//!
//! The status endpoint says nothing about progress, so every poll of an
//! unfinished task is a request spent for nothing, and every moment between a
//! task finishing and the daemon seeing it keeps a concurrency slot idle.
//! Each task is polled on a *ladder*: moments after its submission, chosen
//! from the durations seen so far. Which ladder is used is decided by
//! replaying candidate ladders against the recent durations; each gives the
//! polls a task needs on average (`p`) and the mean delay before a finished
//! task is seen (`d`):
//!
//! - while rows wait to be submitted, the ladder that lets the most tasks
//!   through: the larger of `min(requests per second / (1 + p),
//!   slots / (mean duration + d))`, within half a percent the cheaper one.
//!   Late, sparse polls when requests are the scarce resource; dense ones
//!   where tasks are likely to end when slots are, as dense as the spare
//!   requests allow: the request budget is the only cap on polls;
//! - with nothing waiting, the ladder with the least delay whose polls the
//!   budget can carry for the tasks in flight.
//!
//! Candidate ladders put their polls where they pay: for a given number of
//! rungs, the poll density that minimises the expected delay is proportional
//! to the square root of the hazard (how likely a task still running at that
//! age is to end in the next moment), so rungs crowd where tasks end and thin
//! out where few do. Quantile ladders (a first rung at some quantile, then
//! evenly to the longest duration) are replayed too; the replay decides.
//!
//! When the audio length of tasks is known (`--probe`), durations are also
//! learned per second of audio: task time grows with audio length, so a
//! task's own length narrows the guess a lot. Until the model has started
//! (the engine starts it once a whole first cohort of tasks has ended, or at
//! once from the samples a previous run saved), the cohort's intervals grow
//! by half from `poll_min`. Once a task has outlived its whole ladder, polls
//! back off geometrically. Every interval is kept within
//! `poll_min..=poll_max`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Finished tasks with a known audio length needed for a per-audio ladder.
const MIN_SAMPLES: usize = 5;
/// Durations remembered (the most recent ones).
const MAX_SAMPLES: usize = 512;
/// The share of the request budget a ladder may plan to use: the rest
/// absorbs polls that bunch up and the submits of tasks that end early.
const PLANNED_SHARE: f64 = 0.95;
/// Polls land a hair past their quantile, so the task is likely done.
const PAST: f64 = 1.02;
/// Ladders are re-chosen at most this often while tasks keep finishing.
const REFIT_EVERY: Duration = Duration::from_millis(250);
/// First rungs of the quantile ladders, as quantiles; each ladder then
/// climbs evenly to the largest duration seen.
const FIRST_RUNGS: [f64; 17] = [
    0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0,
];
/// Most rungs in a quantile ladder.
const MAX_RUNGS: usize = 8;
/// A scout's polls: each at this factor of the age of the one before.
const SCOUT_STEP: f64 = 1.5;
/// A task that outlived its whole ladder (or, before the model starts, every
/// duration seen so far) is polled at this factor of its age: late enough
/// to cost few requests, early enough that it is seen within a fifth of its
/// age of ending.
const OUTLIVED_STEP: f64 = 1.2;
/// Rung counts tried for the square-root-of-hazard ladders.
const HAZARD_RUNGS: [usize; 26] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192,
    256,
];
/// Bins of the hazard estimate (equal counts of samples each), at most.
const HAZARD_BINS: usize = 64;

/// What the ladder is chosen for: the engine's limits and whether rows wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Requests the budget lets through per second, submits and polls together.
    pub requests_per_sec: f64,
    /// Concurrency slots (`--max-concurrent`).
    pub slots: f64,
    /// Rows are waiting to be submitted, so throughput is what counts.
    pub backlog: bool,
    /// Tasks in flight (rounded, see [`Limits::round_in_flight`]): without a
    /// backlog, what the budget's polls are shared by.
    pub in_flight: f64,
}

impl Limits {
    /// Rounds a count of tasks in flight to a step of about 19%, so that
    /// the limits (and with them the ladders) change only when the count
    /// really moves.
    pub fn round_in_flight(n: usize) -> f64 {
        if n == 0 {
            return 0.0;
        }
        let steps = ((n as f64).ln() / 1.19f64.ln()).round();
        1.19f64.powf(steps).round().max(1.0)
    }
}

use crate::store::DurationSample as Sample;

/// A chosen ladder and what replaying it against the samples predicted.
#[derive(Debug, Clone, PartialEq)]
pub struct Ladder {
    /// Poll moments after submission, ascending: seconds, or seconds per
    /// second of audio for a per-audio ladder.
    pub times: Vec<f64>,
    /// Expected status polls per task.
    pub polls: f64,
    /// Expected seconds between a task finishing and a poll seeing it.
    pub delay: f64,
}

#[derive(Debug, Clone)]
pub struct PollModel {
    samples: VecDeque<Sample>,
    plain: Option<Ladder>,
    per_audio: Option<Ladder>,
    fitted_at: Option<Instant>,
    fitted_for: Option<Limits>,
    stale: bool,
    /// The samples so far are a fair picture of durations (see [`PollModel::start`]).
    ready: bool,
    poll_min: Duration,
    poll_max: Duration,
}

impl PollModel {
    pub fn new(poll_min: Duration, poll_max: Duration) -> Self {
        PollModel {
            samples: VecDeque::new(),
            plain: None,
            per_audio: None,
            fitted_at: None,
            fitted_for: None,
            stale: false,
            ready: false,
            poll_min,
            poll_max,
        }
    }

    /// A task ran `took` (from submission to its end, as the API measured
    /// it where it could) on `audio` seconds of audio, if known.
    pub fn observe(&mut self, took: Duration, audio: Option<f64>) {
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        let audio = audio.filter(|a| a.is_finite() && *a > 0.0);
        self.samples.push_back(Sample {
            secs: took.as_secs_f64(),
            audio,
        });
        self.stale = true;
    }

    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// The durations remembered, oldest first, for a later run.
    pub fn export(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }

    /// Takes up the durations a previous run remembered. With at least
    /// `enough` of them the model starts at once: they are a fair picture
    /// of durations already (not the first few, short, tasks of a cohort).
    pub fn restore(&mut self, saved: &[Sample], enough: usize) {
        let usable = saved
            .iter()
            .filter(|s| s.secs.is_finite() && s.secs >= 0.0)
            .copied();
        for s in usable.skip(saved.len().saturating_sub(MAX_SAMPLES)) {
            self.observe(Duration::from_secs_f64(s.secs.min(1e9)), s.audio);
        }
        if self.samples.len() >= enough.max(1) {
            self.ready = true;
        }
    }

    /// The mean duration seen, in seconds.
    pub fn mean(&self) -> Option<f64> {
        let n = self.samples.len();
        (n > 0).then(|| self.samples.iter().map(|s| s.secs).sum::<f64>() / n as f64)
    }

    /// The longest duration seen, in seconds.
    pub fn longest(&self) -> Option<f64> {
        self.samples.iter().map(|s| s.secs).reduce(f64::max)
    }

    /// Lets the next [`PollModel::refit`] choose ladders. The first tasks
    /// to end are the short ones, so the caller says when the samples stop
    /// being a biased picture: when a whole cohort of tasks has ended.
    pub fn start(&mut self) {
        self.ready = true;
    }

    /// True once the durations of enough finished tasks are known.
    pub fn is_trained(&self) -> bool {
        self.plain.is_some()
    }

    /// The ladder used for tasks of unknown audio length.
    pub fn ladder(&self) -> Option<&Ladder> {
        self.plain.as_ref()
    }

    /// The ladder used for tasks whose audio length is known.
    pub fn per_audio_ladder(&self) -> Option<&Ladder> {
        self.per_audio.as_ref()
    }

    /// Chooses the ladders again if new durations came in (at most every
    /// [`REFIT_EVERY`]) or the limits changed. True if it did.
    pub fn refit(&mut self, limits: Limits, now: Instant) -> bool {
        let due = self.stale
            && (self.plain.is_none()
                || self
                    .fitted_at
                    .is_none_or(|at| now.duration_since(at) >= REFIT_EVERY));
        if !due && self.fitted_for == Some(limits) {
            return false;
        }
        if !self.ready || self.samples.is_empty() {
            return false;
        }
        let plain: Vec<(f64, f64)> = self.samples.iter().map(|s| (s.secs, 1.0)).collect();
        let per_audio: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|s| s.audio.map(|a| (s.secs / a, a)))
            .collect();
        // Rungs closer than `poll_min` could not be kept apart anyway.
        let gap = self.poll_min.as_secs_f64();
        self.plain = choose(&plain, limits, gap);
        self.per_audio = if per_audio.len() >= MIN_SAMPLES {
            let mean_audio = per_audio.iter().map(|(_, a)| a).sum::<f64>() / per_audio.len() as f64;
            choose(&per_audio, limits, gap / mean_audio.max(1e-9))
        } else {
            None
        };
        self.fitted_at = Some(now);
        self.fitted_for = Some(limits);
        self.stale = false;
        true
    }

    /// The ladder (and its scale) for a task on `audio` seconds of audio.
    fn ladder_for(&self, audio: Option<f64>) -> Option<(&Ladder, f64)> {
        match (audio.filter(|a| a.is_finite() && *a > 0.0), &self.per_audio) {
            (Some(a), Some(l)) => Some((l, a)),
            _ => self.plain.as_ref().map(|l| (l, 1.0)),
        }
    }

    /// Keeps the poll after one at `from` within `poll_min..=poll_max` of it.
    fn bounded(&self, from: f64, at: f64) -> Duration {
        let min = self.poll_min.as_secs_f64();
        let max = self.poll_max.as_secs_f64().max(min);
        Duration::from_secs_f64(at.clamp(from + min, from + max))
    }

    /// When (as the task's age) to poll next a task last polled at age
    /// `polled` (never: `None`), on `audio` seconds of audio if known. An
    /// age already past means "now".
    pub fn next_poll(&self, polled: Option<Duration>, audio: Option<f64>) -> Duration {
        let from = polled.map_or(0.0, |d| d.as_secs_f64());
        let min = self.poll_min.as_secs_f64();
        let at = match self.ladder_for(audio) {
            // Untrained (a scout): intervals grow by half, so that a scout
            // is seen soon after it ends and the model can start.
            None => from * SCOUT_STEP,
            Some((ladder, scale)) => next_rung(&ladder.times, scale, from, min)
                // Outlived the whole ladder: back off with its age.
                .unwrap_or(from * OUTLIVED_STEP),
        };
        self.bounded(from, at)
    }

    /// Before the model starts, a task that is not a scout waits until the
    /// shortest duration seen so far (nothing ended yet: `None`, wait for
    /// the scouts), then is polled at growing intervals. The first tasks to
    /// end are the short ones, so this costs few polls, and a task that ends
    /// while the scouts still run is not kept waiting for all of them.
    pub fn untrained_poll(&self, polled: Option<Duration>) -> Option<Duration> {
        let shortest = self.samples.iter().map(|s| s.secs).reduce(f64::min)?;
        let at = match polled {
            None => shortest * PAST,
            Some(p) => (p.as_secs_f64() * OUTLIVED_STEP).max(shortest * PAST),
        };
        let from = polled.map_or(0.0, |d| d.as_secs_f64());
        Some(self.bounded(from, at))
    }

    /// In callback mode the API says when a task ends (and retries a
    /// callback for minutes); polls are only a safety net for a callback lost
    /// for good: at twice the longest duration seen or half `poll_max`,
    /// whichever is later, then backing off. Same terms as
    /// [`PollModel::next_poll`].
    pub fn safety_poll(&self, polled: Option<Duration>, audio: Option<f64>) -> Duration {
        let from = polled.map_or(0.0, |d| d.as_secs_f64());
        let max = self.poll_max.as_secs_f64();
        let at = match self.ladder_for(audio) {
            None => from + max,
            Some((ladder, scale)) => {
                let last = ladder.times.last().map_or(0.0, |t| t * scale);
                let safety = (last * 2.0).max(max / 2.0);
                if safety > from { safety } else { from * 1.5 }
            }
        };
        self.bounded(from, at)
    }
}

/// Value at quantile `q` of ascending `sorted` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[pos.min(sorted.len() - 1)]
}

/// Replays a ladder over `points` of (duration in ladder units, seconds per
/// unit): expected polls per task and mean delay in seconds.
fn replay(times: &[f64], points: &[(f64, f64)]) -> (f64, f64) {
    let mut polls = 0.0;
    let mut delay = 0.0;
    for &(x, scale) in points {
        let i = times.partition_point(|t| *t < x);
        match times.get(i) {
            Some(t) => {
                polls += (i + 1) as f64;
                delay += (t - x) * scale;
            }
            // Outlived the ladder (only for durations past every sample).
            None => {
                polls += (times.len() + 1) as f64;
                delay += x * 0.5 * scale;
            }
        }
    }
    let n = points.len().max(1) as f64;
    (polls / n, delay / n)
}

/// The first rung (scaled) that a task last polled at age `from` has not
/// passed yet. Ladders are re-chosen as durations come in: a poll that
/// landed past the middle between two rungs counts as the later one, so a
/// rung that merely moved a little earns no second poll.
fn next_rung(times: &[f64], scale: f64, from: f64, min: f64) -> Option<f64> {
    let mut prev = 0.0;
    for t in times.iter().map(|t| t * scale) {
        if from < (prev + t) / 2.0 && t > from + min / 2.0 {
            return Some(t);
        }
        prev = t;
    }
    None
}

/// Drops rungs closer than `gap` to the one before, always keeping the last
/// (past every duration seen).
fn spread_out(times: &mut Vec<f64>, gap: f64) {
    let Some(&last) = times.last() else { return };
    let mut kept: Vec<f64> = Vec::with_capacity(times.len());
    for &t in times.iter() {
        if kept.last().is_none_or(|k| t >= k + gap) {
            kept.push(t);
        }
    }
    while kept.len() > 1 && kept[kept.len() - 2] + gap > last {
        kept.remove(kept.len() - 2);
    }
    if let Some(l) = kept.last_mut() {
        *l = last;
    }
    *times = kept;
}

/// The integral of the square root of the hazard, as a piecewise-linear
/// function of the duration: `(duration, integral)` at each bin edge. Bins
/// hold equal counts of the ascending `sorted` durations.
fn root_hazard(sorted: &[f64]) -> Vec<(f64, f64)> {
    let n = sorted.len();
    let bins = (n / 4).clamp(1, HAZARD_BINS);
    let mut curve = Vec::with_capacity(bins + 1);
    let mut total = 0.0;
    let mut lo = 0;
    curve.push((sorted[0], 0.0));
    for b in 1..=bins {
        let hi = if b == bins { n - 1 } else { b * n / bins };
        let width = sorted[hi] - sorted[lo];
        let ended = (hi - lo).max(1) as f64;
        let at_risk = (n - lo) as f64;
        // sqrt(hazard) x width, with hazard = ended / (width x at risk).
        if width > 0.0 {
            total += (ended * width / at_risk).sqrt();
        }
        curve.push((sorted[hi], total));
        lo = hi;
    }
    curve
}

/// `k` rungs at even steps of the root-hazard integral.
fn root_hazard_rungs(curve: &[(f64, f64)], k: usize) -> Vec<f64> {
    let total = curve.last().map_or(0.0, |c| c.1);
    let last = curve.last().map_or(0.0, |c| c.0);
    if total <= 0.0 {
        return vec![last * PAST];
    }
    let mut times = Vec::with_capacity(k);
    let mut i = 1;
    for j in 1..=k {
        let g = total * j as f64 / k as f64;
        while i < curve.len() - 1 && curve[i].1 < g {
            i += 1;
        }
        let ((x0, g0), (x1, g1)) = (curve[i - 1], curve[i]);
        let x = if g1 > g0 {
            x0 + (x1 - x0) * ((g - g0) / (g1 - g0)).clamp(0.0, 1.0)
        } else {
            x1
        };
        times.push(x * PAST);
    }
    times
}

/// The best ladder for `points` of (duration in ladder units, seconds per
/// unit), rungs at least `gap` units apart (see the module documentation).
fn choose(points: &[(f64, f64)], limits: Limits, gap: f64) -> Option<Ladder> {
    if points.is_empty() {
        return None;
    }
    let mut sorted: Vec<f64> = points.iter().map(|p| p.0).collect();
    sorted.sort_by(f64::total_cmp);
    let mean_secs = points.iter().map(|(x, s)| x * s).sum::<f64>() / points.len() as f64;
    let requests = limits.requests_per_sec * PLANNED_SHARE;
    let throughput = |l: &Ladder| -> f64 {
        let by_requests = requests / (1.0 + l.polls);
        let by_slots = limits.slots / (mean_secs + l.delay).max(1e-9);
        by_requests.min(by_slots)
    };
    // Without a backlog, the polls of the tasks in flight must fit the budget.
    let affordable = |l: &Ladder| -> bool {
        limits.in_flight * l.polls / (mean_secs + l.delay).max(1e-9) <= requests
    };
    let better = |a: &Ladder, b: &Ladder| -> bool {
        if limits.backlog {
            let (ta, tb) = (throughput(a), throughput(b));
            // Within half a percent the cheaper ladder wins.
            if (ta - tb).abs() > 0.005 * ta.max(tb) {
                return ta > tb;
            }
            if (a.polls - b.polls).abs() > 1e-9 {
                return a.polls < b.polls;
            }
            a.delay < b.delay
        } else {
            match (affordable(a), affordable(b)) {
                (true, false) => return true,
                (false, true) => return false,
                // Neither fits: the cheapest.
                (false, false) => return a.polls < b.polls,
                (true, true) => {}
            }
            // Within a hundredth of the mean task time the cheaper one wins.
            if (a.delay - b.delay).abs() > 0.01 * mean_secs {
                return a.delay < b.delay;
            }
            a.polls < b.polls
        }
    };
    let curve = root_hazard(&sorted);
    let hazard = HAZARD_RUNGS.iter().map(|&k| root_hazard_rungs(&curve, k));
    let quantile_ladders = (2..=MAX_RUNGS).flat_map(|rungs| {
        let sorted = &sorted;
        FIRST_RUNGS.map(move |first| {
            (0..rungs)
                .map(|i| {
                    let q = first + (1.0 - first) * i as f64 / (rungs - 1) as f64;
                    quantile(sorted, q) * PAST
                })
                .collect::<Vec<f64>>()
        })
    });
    let mut best: Option<Ladder> = None;
    for mut times in hazard.chain(quantile_ladders) {
        spread_out(&mut times, gap);
        let (polls, delay) = replay(&times, points);
        let candidate = Ladder {
            times,
            polls,
            delay,
        };
        if best.as_ref().is_none_or(|b| better(&candidate, b)) {
            best = Some(candidate);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> PollModel {
        PollModel::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    /// Requests plentiful, slots scarce.
    const SLOT_BOUND: Limits = Limits {
        requests_per_sec: 1000.0,
        slots: 10.0,
        backlog: true,
        in_flight: 10.0,
    };
    /// Slots plentiful, requests scarce.
    const REQUEST_BOUND: Limits = Limits {
        requests_per_sec: 1.0,
        slots: 1000.0,
        backlog: true,
        in_flight: 1000.0,
    };

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn age(m: &PollModel, polled: Option<f64>) -> f64 {
        m.next_poll(polled.map(secs), None).as_secs_f64()
    }

    fn trained(limits: Limits) -> PollModel {
        let mut m = model();
        for s in 10..=30 {
            m.observe(Duration::from_secs(s), None);
        }
        m.start();
        assert!(m.refit(limits, Instant::now()));
        m
    }

    #[test]
    fn untrained_intervals_grow_within_bounds() {
        let mut m = model();
        assert_eq!(age(&m, None), 1.0);
        assert_eq!(age(&m, Some(1.0)), 2.0, "at least poll_min later");
        assert_eq!(age(&m, Some(4.0)), 6.0);
        assert_eq!(age(&m, Some(500.0)), 560.0, "at most poll_max later");
        // Samples alone do not start the model: a biased few would mislead it.
        m.observe(secs(2.0), None);
        assert!(!m.refit(SLOT_BOUND, Instant::now()));
        assert!(!m.is_trained());
        m.start();
        assert!(m.refit(SLOT_BOUND, Instant::now()));
        assert!(m.is_trained());
    }

    #[test]
    fn scarce_requests_poll_once_late() {
        let m = trained(REQUEST_BOUND);
        let l = m.ladder().expect("trained");
        // One poll past the longest task: every task is seen on it.
        assert!((l.polls - 1.0).abs() < 1e-9, "{l:?}");
        let first = age(&m, None);
        assert!((30.0..31.0).contains(&first), "{first}");
    }

    #[test]
    fn spare_requests_buy_dense_polls_where_tasks_end() {
        let m = trained(SLOT_BOUND);
        let l = m.ladder().expect("trained");
        // Requests cost nothing here: polls as dense as poll_min allows
        // (1 s), so a finished task is seen within about half a second.
        assert!(l.polls > 5.0, "{l:?}");
        assert!(l.delay < 0.8, "{l:?}");
        // No poll before the shortest task could have ended (10 s).
        let first = age(&m, None);
        assert!((10.0..12.0).contains(&first), "{first}");
        // Found running at the first rung: the next one follows soon.
        let second = age(&m, Some(first + 0.1));
        assert!(second - first < 3.0, "{first} {second}");
        // Outlived everything: back off with the age.
        assert!((age(&m, Some(40.0)) - 48.0).abs() < 1e-9);
    }

    #[test]
    fn the_budget_is_the_cap_on_polls() {
        // 10 slots on 10..30 s tasks end about half a task a second; two
        // requests a second leave room for a little over two polls a task.
        let limits = Limits {
            requests_per_sec: 2.0,
            ..SLOT_BOUND
        };
        let m = trained(limits);
        let l = m.ladder().expect("trained");
        let mean = 20.0;
        let tasks_per_sec = (limits.slots / (mean + l.delay)).min(2.0 * 0.95 / (1.0 + l.polls));
        assert!(
            tasks_per_sec * (1.0 + l.polls) <= 2.0 * 0.95 + 1e-9,
            "over the budget: {l:?}"
        );
        assert!(l.polls > 1.5, "spare requests left unused: {l:?}");
        let dense = trained(SLOT_BOUND);
        let d = dense.ladder().expect("trained");
        assert!(d.polls > l.polls && d.delay < l.delay, "{d:?} {l:?}");
    }

    #[test]
    fn a_poll_that_came_late_skips_the_rungs_it_passed() {
        let m = trained(SLOT_BOUND);
        let times = m.ladder().expect("trained").times.clone();
        assert!(times.len() >= 3, "{times:?}");
        // Polled (late) just past the second rung: the third is next.
        let step = times[2] - times[1];
        let from = times[1] + 0.25 * step;
        let next = age(&m, Some(from));
        // (At least poll_min after the last poll.)
        assert!(
            (next - times[2].max(from + 1.0)).abs() < 1e-9,
            "{next} {times:?}"
        );
        // Polled nearer the third than the second: that counts as the third.
        let next = age(&m, Some(times[1] + 0.75 * step));
        assert!((next - times[3]).abs() < 1e-9, "{next} {times:?}");
        // Never polled: the first rung, even if that moment has passed (the
        // caller polls at once then).
        assert!((age(&m, None) - times[0]).abs() < 1e-9);
    }

    #[test]
    fn without_backlog_the_tasks_in_flight_share_the_budget() {
        let few = Limits {
            backlog: false,
            in_flight: 2.0,
            ..REQUEST_BOUND
        };
        let many = Limits {
            in_flight: 1000.0,
            ..few
        };
        let busy = trained(REQUEST_BOUND);
        let calm = trained(few);
        let crowded = trained(many);
        let (b, c, m) = (
            busy.ladder().expect("b"),
            calm.ladder().expect("c"),
            crowded.ladder().expect("m"),
        );
        // Two tasks left and a request a second: poll them densely, within it.
        assert!(c.delay < b.delay && c.polls > b.polls, "{b:?} {c:?}");
        assert!(2.0 * c.polls / (20.0 + c.delay) <= 0.95 + 1e-9, "{c:?}");
        // A thousand in flight on the same budget: once, late.
        assert!((m.polls - 1.0).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn known_audio_length_narrows_the_guess() {
        let mut m = model();
        // 2 s of work per second of audio, on 5 s and 20 s clips.
        for i in 0..40 {
            let audio = if i % 2 == 0 { 5.0 } else { 20.0 };
            m.observe(secs(audio * 2.0), Some(audio));
        }
        m.start();
        assert!(m.refit(SLOT_BOUND, Instant::now()));
        let a = m.per_audio_ladder().expect("per-audio ladder");
        assert!(a.polls < 1.01 && a.delay < 0.6, "{a:?}");
        let short = m.next_poll(None, Some(5.0)).as_secs_f64();
        let long = m.next_poll(None, Some(20.0)).as_secs_f64();
        assert!((10.0..10.5).contains(&short), "{short}");
        assert!((40.0..41.0).contains(&long), "{long}");
        // Unknown length: the plain ladder over both kinds of task.
        let plain = m.ladder().expect("plain");
        assert!(plain.polls > a.polls + 0.4, "{plain:?}");
    }

    #[test]
    fn refits_are_throttled_but_follow_the_limits() {
        let mut m = trained(SLOT_BOUND);
        let t0 = Instant::now() + REFIT_EVERY;
        m.observe(secs(12.0), None);
        assert!(m.refit(SLOT_BOUND, t0));
        m.observe(secs(13.0), None);
        assert!(!m.refit(SLOT_BOUND, t0), "too soon");
        assert!(m.refit(REQUEST_BOUND, t0), "limits changed");
        m.observe(secs(14.0), None);
        assert!(m.refit(REQUEST_BOUND, t0 + REFIT_EVERY));
    }

    #[test]
    fn callback_safety_polls_come_well_after_the_longest_task() {
        let untrained = model();
        assert_eq!(untrained.safety_poll(None, None), secs(60.0));
        let m = trained(SLOT_BOUND);
        // Twice the longest (30 s x 1.02), at most poll_max after the last poll.
        let first = m.safety_poll(None, None).as_secs_f64();
        assert!((59.0..=60.0).contains(&first), "{first}");
        let later = m.safety_poll(Some(secs(70.0)), None).as_secs_f64();
        assert!((later - 105.0).abs() < 1e-9, "{later}");
        // Short tasks: half of poll_max at the earliest.
        let mut short = model();
        for _ in 0..10 {
            short.observe(secs(2.0), None);
        }
        short.start();
        short.refit(SLOT_BOUND, Instant::now());
        let first = short.safety_poll(None, None).as_secs_f64();
        assert!((29.0..=30.0).contains(&first), "{first}");
    }

    #[test]
    fn rungs_are_spread_out_and_the_last_is_kept() {
        let mut t = vec![1.0, 1.05, 1.2, 1.3, 2.0, 2.1];
        spread_out(&mut t, 0.15);
        assert_eq!(t, vec![1.0, 1.2, 2.1]);
        let mut t = vec![1.0, 1.01];
        spread_out(&mut t, 0.15);
        assert_eq!(t, vec![1.01]);
    }

    #[test]
    fn a_ladder_that_moved_a_little_earns_no_extra_poll() {
        let m = trained(SLOT_BOUND);
        let times = m.ladder().expect("trained").times.clone();
        // Polled at a rung that has since moved 3% later: the next poll is
        // the following rung, not the moved one.
        let next = age(&m, Some(times[1] / 1.03));
        assert!((next - times[2]).abs() < 1e-9, "{next} {times:?}");
    }

    #[test]
    fn before_the_model_starts_the_others_wait_for_the_first_end() {
        let mut m = model();
        assert_eq!(m.untrained_poll(None), None, "nothing ended yet");
        m.observe(secs(10.0), None);
        let first = m.untrained_poll(None).expect("a duration is known");
        assert!((first.as_secs_f64() - 10.2).abs() < 1e-9, "{first:?}");
        let next = m.untrained_poll(Some(secs(20.0))).expect("known");
        assert!((next.as_secs_f64() - 24.0).abs() < 1e-9, "{next:?}");
    }

    #[test]
    fn a_restored_model_starts_at_once() {
        let m = trained(SLOT_BOUND);
        let mut again = model();
        again.restore(&m.export(), 8);
        assert!(again.refit(SLOT_BOUND, Instant::now()));
        assert_eq!(again.ladder(), m.ladder());
        // Too few samples to trust: the scouts teach it as before.
        let mut few = model();
        few.restore(&m.export()[..3], 8);
        assert!(!few.refit(SLOT_BOUND, Instant::now()));
        assert!(!few.is_trained());
    }

    #[test]
    fn intervals_respect_poll_min() {
        let mut m = model();
        for _ in 0..10 {
            m.observe(Duration::from_millis(100), None);
        }
        m.start();
        m.refit(SLOT_BOUND, Instant::now());
        assert_eq!(m.next_poll(None, None), secs(1.0));
        assert_eq!(m.next_poll(Some(secs(3.0)), None), secs(4.0));
    }
}
