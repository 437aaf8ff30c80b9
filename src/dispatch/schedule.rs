//! When to poll a task: learned from how long finished tasks took.
//!
//! The status endpoint says nothing about progress, so every poll of an
//! unfinished task is a request spent for nothing. Tasks are polled at
//! quantiles of the durations seen so far (half of them done, three
//! quarters, ...), so a typical task needs one or two polls; until enough
//! tasks have finished, intervals double from `poll_min`. Once a task has
//! outlived every quantile, polls back off geometrically. Every interval is
//! kept within `poll_min..=poll_max`.

use std::collections::VecDeque;
use std::time::Duration;

/// Finished tasks needed before quantiles are trusted.
const MIN_SAMPLES: usize = 5;
/// Durations remembered (the most recent ones).
const MAX_SAMPLES: usize = 512;
/// Quantiles polled at while requests are plentiful (about 2.9 polls a
/// task, for a short delay between a task finishing and its slot freeing).
const LADDER_SLACK: [f64; 7] = [0.3, 0.5, 0.65, 0.8, 0.9, 0.97, 1.0];
const LADDER: [f64; 5] = [0.5, 0.75, 0.9, 0.97, 1.0];

/// How much of the request budget the last window used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// Under 40% of the budget used.
    Slack,
    Normal,
    /// Over 80% used. Polling later here was measured to cost more in
    /// slot time than it saved in requests (BENCHMARKS.md), so it keeps the
    /// normal ladder.
    Tight,
}

impl Pressure {
    pub fn of(used: usize, limit: usize) -> Pressure {
        let share = used as f64 / limit.max(1) as f64;
        if share > 0.8 {
            Pressure::Tight
        } else if share < 0.4 {
            Pressure::Slack
        } else {
            Pressure::Normal
        }
    }

    fn ladder(self) -> &'static [f64] {
        match self {
            Pressure::Slack => &LADDER_SLACK,
            Pressure::Normal | Pressure::Tight => &LADDER,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PollModel {
    samples: VecDeque<f64>,
    sorted: Vec<f64>,
    poll_min: Duration,
    poll_max: Duration,
}

impl PollModel {
    pub fn new(poll_min: Duration, poll_max: Duration) -> Self {
        PollModel {
            samples: VecDeque::new(),
            sorted: Vec::new(),
            poll_min,
            poll_max,
        }
    }

    /// A task took `took` from submission to being seen finished.
    pub fn observe(&mut self, took: Duration) {
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(took.as_secs_f64());
        self.sorted = self.samples.iter().copied().collect();
        self.sorted.sort_by(f64::total_cmp);
    }

    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// True once quantiles are used.
    pub fn is_trained(&self) -> bool {
        self.samples.len() >= MIN_SAMPLES
    }

    fn quantile(&self, q: f64) -> Option<f64> {
        if self.sorted.is_empty() {
            return None;
        }
        let pos = (q * (self.sorted.len() - 1) as f64).round() as usize;
        self.sorted.get(pos.min(self.sorted.len() - 1)).copied()
    }

    /// How long to wait before the next poll of a task submitted `elapsed` ago.
    pub fn next_delay(&self, elapsed: Duration) -> Duration {
        self.next_delay_under(elapsed, Pressure::Normal)
    }

    /// [`PollModel::next_delay`], with the ladder chosen by budget pressure.
    pub fn next_delay_under(&self, elapsed: Duration, pressure: Pressure) -> Duration {
        let min = self.poll_min.as_secs_f64();
        let e = elapsed.as_secs_f64();
        let delay = if self.is_trained() {
            let next_quantile = pressure
                .ladder()
                .iter()
                .filter_map(|q| self.quantile(*q))
                .find(|t| *t > e + min / 2.0);
            match next_quantile {
                // A hair past the quantile, so the task is likely done.
                Some(t) => t * 1.02 - e,
                None => e * 0.5,
            }
        } else {
            e.max(min)
        };
        Duration::from_secs_f64(delay.clamp(min, self.poll_max.as_secs_f64().max(min)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> PollModel {
        PollModel::new(Duration::from_secs(1), Duration::from_secs(60))
    }

    #[test]
    fn untrained_intervals_double_within_bounds() {
        let m = model();
        assert_eq!(m.next_delay(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(m.next_delay(Duration::from_secs(4)), Duration::from_secs(4));
        assert_eq!(
            m.next_delay(Duration::from_secs(500)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn trained_first_poll_lands_past_the_median() {
        let mut m = model();
        for s in [10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30] {
            m.observe(Duration::from_secs(s));
        }
        let first = m.next_delay(Duration::ZERO).as_secs_f64();
        assert!((20.0..21.0).contains(&first), "{first}");
        // Found running at 20.4 s: next near the 75th percentile.
        let second = m.next_delay(Duration::from_secs_f64(20.4)).as_secs_f64();
        assert!((5.0..7.0).contains(&second), "{second}");
        // Outlived everything: back off by half the age, capped.
        let late = m.next_delay(Duration::from_secs(40)).as_secs_f64();
        assert!((19.0..=21.0).contains(&late), "{late}");
    }

    #[test]
    fn pressure_moves_the_first_poll() {
        let mut m = model();
        for s in 10..=30 {
            m.observe(Duration::from_secs(s));
        }
        let slack = m.next_delay_under(Duration::ZERO, Pressure::Slack);
        let normal = m.next_delay_under(Duration::ZERO, Pressure::Normal);
        let tight = m.next_delay_under(Duration::ZERO, Pressure::Tight);
        assert!(
            slack < normal && normal == tight,
            "{slack:?} {normal:?} {tight:?}"
        );
        assert_eq!(Pressure::of(90, 100), Pressure::Tight);
        assert_eq!(Pressure::of(10, 100), Pressure::Slack);
        assert_eq!(Pressure::of(50, 100), Pressure::Normal);
    }

    #[test]
    fn intervals_respect_poll_min() {
        let mut m = model();
        for _ in 0..10 {
            m.observe(Duration::from_millis(100));
        }
        assert_eq!(m.next_delay(Duration::ZERO), Duration::from_secs(1));
    }
}
