//! When to poll a task: learned from how long finished tasks took.
//!
//! The status endpoint says nothing about progress, so every poll of an
//! unfinished task is a request spent for nothing, and every moment between a
//! task finishing and the daemon seeing it keeps a concurrency slot idle.
//! Each task is polled on a *ladder*: a few moments at quantiles of the
//! durations seen so far. Which ladder is used is decided by replaying
//! candidate ladders against the recent durations; each gives the polls a
//! task needs on average (`p`) and the mean delay before a finished task is
//! seen (`d`):
//!
//! - while rows wait to be submitted, the ladder that lets the most tasks
//!   through: the larger of `min(requests per second / (1 + p),
//!   slots / (mean duration + d))`. Late, sparse polls when requests are the
//!   scarce resource; early, dense ones when slots are;
//! - with nothing waiting, the ladder with the least delay.
//!
//! Either way at most [`MAX_POLLS`] polls a task on average. When the audio
//! length of tasks is known (`--probe`), durations are also learned per second
//! of audio: task time grows with audio length, so a task's own length narrows
//! the guess a lot. Until the model has started (the engine starts it once a
//! whole first cohort of tasks has ended), the cohort's intervals grow by
//! half from `poll_min`.
//! Once a task has outlived its whole ladder, polls back off geometrically.
//! Every interval is kept within `poll_min..=poll_max`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Finished tasks with a known audio length needed for a per-audio ladder.
const MIN_SAMPLES: usize = 5;
/// Durations remembered (the most recent ones).
const MAX_SAMPLES: usize = 512;
/// Most status polls a task may need on average under the chosen ladder
/// (a little under 3: scouts, stragglers and ladders that move as durations
/// come in add a few polls to what the replay predicts).
pub const MAX_POLLS: f64 = 2.8;
/// Polls land a hair past their quantile, so the task is likely done.
const PAST: f64 = 1.02;
/// Ladders are re-chosen at most this often while tasks keep finishing.
const REFIT_EVERY: Duration = Duration::from_millis(250);
/// First rungs tried, as quantiles; each ladder then climbs evenly to the
/// largest duration seen.
const FIRST_RUNGS: [f64; 17] = [
    0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0,
];
/// Most rungs in a ladder.
const MAX_RUNGS: usize = 8;
/// A scout's polls: each at this factor of the age of the one before.
const SCOUT_STEP: f64 = 1.5;
/// Rungs of a ladder are at least this factor apart...
const RUNG_STEP: f64 = 1.1;
/// ...and a task's next poll comes at least this factor after its last one:
/// ladders are re-chosen as durations come in, and a rung that merely moved
/// a little must not earn a task a second poll.
const POLL_STEP: f64 = 1.05;

/// What the ladder is chosen for: the engine's limits and whether rows wait.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Requests the budget lets through per second, submits and polls together.
    pub requests_per_sec: f64,
    /// Concurrency slots (`--max-concurrent`).
    pub slots: f64,
    /// Rows are waiting to be submitted, so throughput is what counts.
    pub backlog: bool,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    audio: Option<f64>,
}

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
        self.plain = choose(&plain, limits);
        self.per_audio = if per_audio.len() >= MIN_SAMPLES {
            choose(&per_audio, limits)
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
            Some((ladder, scale)) => ladder
                .times
                .iter()
                .map(|t| t * scale)
                .find(|t| *t > from * POLL_STEP + min / 2.0)
                // Outlived the whole ladder: back off by half its age.
                .unwrap_or(from * 1.5),
        };
        self.bounded(from, at)
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

/// Drops rungs closer than [`RUNG_STEP`] to the one before, always keeping
/// the last (past every duration seen).
fn spread_out(times: &mut Vec<f64>) {
    let Some(&last) = times.last() else { return };
    let mut kept: Vec<f64> = Vec::with_capacity(times.len());
    for &t in times.iter() {
        if kept.last().is_none_or(|k| t >= k * RUNG_STEP) {
            kept.push(t);
        }
    }
    while kept.len() > 1 && kept[kept.len() - 2] * RUNG_STEP > last {
        kept.remove(kept.len() - 2);
    }
    if let Some(l) = kept.last_mut() {
        *l = last;
    }
    *times = kept;
}

/// The best ladder for `points` (see the module documentation).
fn choose(points: &[(f64, f64)], limits: Limits) -> Option<Ladder> {
    if points.is_empty() {
        return None;
    }
    let mut sorted: Vec<f64> = points.iter().map(|p| p.0).collect();
    sorted.sort_by(f64::total_cmp);
    let mean_secs = points.iter().map(|(x, s)| x * s).sum::<f64>() / points.len() as f64;
    let throughput = |l: &Ladder| -> f64 {
        let by_requests = limits.requests_per_sec / (1.0 + l.polls);
        let by_slots = limits.slots / (mean_secs + l.delay).max(1e-9);
        by_requests.min(by_slots)
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
            if (a.delay - b.delay).abs() > 1e-9 {
                return a.delay < b.delay;
            }
            a.polls < b.polls
        }
    };
    let mut best: Option<Ladder> = None;
    for rungs in 1..=MAX_RUNGS {
        for first in FIRST_RUNGS {
            if rungs == 1 && first < 1.0 {
                continue;
            }
            let mut times: Vec<f64> = (0..rungs)
                .map(|i| {
                    let q = if rungs == 1 {
                        1.0
                    } else {
                        first + (1.0 - first) * i as f64 / (rungs - 1) as f64
                    };
                    quantile(&sorted, q) * PAST
                })
                .collect();
            spread_out(&mut times);
            let (polls, delay) = replay(&times, points);
            if polls > MAX_POLLS {
                continue;
            }
            let candidate = Ladder {
                times,
                polls,
                delay,
            };
            if best.as_ref().is_none_or(|b| better(&candidate, b)) {
                best = Some(candidate);
            }
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
    };
    /// Slots plentiful, requests scarce.
    const REQUEST_BOUND: Limits = Limits {
        requests_per_sec: 1.0,
        slots: 1000.0,
        backlog: true,
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
    fn scarce_slots_poll_densely_within_the_cap() {
        let m = trained(SLOT_BOUND);
        let l = m.ladder().expect("trained");
        assert!(l.polls <= MAX_POLLS && l.polls > 2.0, "{l:?}");
        // Uniform 10..30 s at three polls: delay near a tenth of the range.
        assert!(l.delay < 2.5, "{l:?}");
        let first = age(&m, None);
        assert!(first < 20.0, "{first}");
        // Found running at the first rung: the next one follows soon.
        let second = age(&m, Some(first + 0.1));
        assert!(second - first < 6.0, "{first} {second}");
        // Outlived everything: back off by half the age.
        assert!((age(&m, Some(40.0)) - 60.0).abs() < 1e-9);
    }

    #[test]
    fn a_poll_that_came_late_skips_the_rungs_it_passed() {
        let m = trained(SLOT_BOUND);
        let times = m.ladder().expect("trained").times.clone();
        assert!(times.len() >= 3, "{times:?}");
        // Polled (late) just past the second rung: the third is next.
        let next = age(&m, Some(times[1] + 0.6));
        assert!((next - times[2]).abs() < 1e-9, "{next} {times:?}");
        // Never polled: the first rung, even if that moment has passed (the
        // caller polls at once then).
        assert!((age(&m, None) - times[0]).abs() < 1e-9);
    }

    #[test]
    fn without_backlog_delay_is_minimised() {
        let idle = Limits {
            backlog: false,
            ..REQUEST_BOUND
        };
        let busy = trained(REQUEST_BOUND);
        let calm = trained(idle);
        let (b, c) = (busy.ladder().expect("b"), calm.ladder().expect("c"));
        assert!(c.delay < b.delay && c.polls > b.polls, "{b:?} {c:?}");
        assert!(c.polls <= MAX_POLLS);
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
        spread_out(&mut t);
        assert_eq!(t, vec![1.0, 1.2, 2.1]);
        let mut t = vec![1.0, 1.01];
        spread_out(&mut t);
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
    fn intervals_respect_poll_min() {
        let mut m = model();
        for _ in 0..10 {
            m.observe(Duration::from_millis(100), None);
        }
        m.start();
        m.refit(SLOT_BOUND, Instant::now());
        assert_eq!(m.next_poll(None, None), secs(1.0));
        assert_eq!(m.next_poll(Some(secs(3.0)), None), secs(4.5));
    }
}
