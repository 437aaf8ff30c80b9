//! Money at submission: each row's audio probed just before its claim
//! (`--probe`), and the spend cap (`--max-spend-usd`) checked before a row
//! would cross it.
//!
//! The spend is the known cost of every row submitted (the probed length, or
//! without probing the 5 s minimum), added to the store before the row's
//! write-ahead flush and refunded when a row goes back to the queue without
//! a task.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use super::submit::Feed;
use super::{Engine, backoff, sleep_or_stop};
use crate::api::PauseReason;
use crate::probe::ProbeError;
use crate::spec::RowSpec;
use crate::store::{Claim, Op, RowKey, RowRecord, StoreError};

/// Probe attempts on transient errors before a row waits in the queue again.
const PROBE_ATTEMPTS: u32 = 3;

/// Rounds of [`PROBE_ATTEMPTS`] before a row whose audio cannot be read
/// fails `AUDIO_PROBE_FAILED` (a retry starts the count again). Between
/// rounds the row waits in the queue, longer each time (1 s doubling to
/// 30 s, about a minute in all), without holding a slot: an audio host that
/// is down for a minute costs nothing, one that stays down ends the batch.
pub(super) const PROBE_ROUNDS: u32 = 7;

/// How long a row waits in the queue after a failed round, with `earlier`
/// failed rounds before it.
pub(super) fn probe_wait(earlier: u32) -> Duration {
    backoff(earlier, Duration::from_secs(1), Duration::from_secs(30))
}

/// The message of a row failed because its audio's length could not be read.
pub(super) fn probe_failure_msg(e: &ProbeError) -> String {
    if e.is_transient() {
        format!("audio_url: {e} (after {PROBE_ROUNDS} rounds of {PROBE_ATTEMPTS} tries)")
    } else {
        format!("audio_url: {e}")
    }
}

/// What is to become of one claimed row.
pub(super) enum Outcome {
    /// Submit it; it costs `usd` (`seconds` when probed).
    Submit { usd: f64, seconds: Option<f64> },
    /// Its audio is bad for good: fail it, unsent.
    Fail(ProbeError),
    /// Its audio could not be read now: back to the queue, held for `wait`.
    Defer { error: ProbeError, wait: Duration },
}

/// The cost counted for a row without a probed length.
pub(super) fn counted_cost(engine: &Engine, record: &RowRecord) -> f64 {
    record.cost_usd.unwrap_or_else(|| {
        record
            .spec
            .resolution_or(&engine.settings.defaults)
            .cost_usd(0.0)
    })
}

/// The length of a row's audio (`--probe`): a local file's was read when
/// the manifest was accepted; a URL's is probed, with retries.
pub(super) async fn audio_length(
    engine: &Engine,
    key: RowKey,
    spec: &RowSpec,
) -> Result<f64, ProbeError> {
    if crate::media::is_local(&spec.audio_url) {
        engine.media.recorded_seconds(key).await
    } else {
        probe_row(engine, &spec.audio_url).await
    }
}

async fn probe_row(engine: &Engine, url: &str) -> Result<f64, ProbeError> {
    let mut attempt = 0;
    loop {
        match engine.prober.probe(url).await {
            Ok(p) => return Ok(p.seconds),
            Err(e) if e.is_transient() && attempt + 1 < PROBE_ATTEMPTS => {
                attempt += 1;
                let url = crate::redact::presigned(url);
                tracing::warn!(url = %url, error = %e, "cannot read the audio's length yet; retrying");
                if !sleep_or_stop(
                    engine,
                    backoff(attempt, Duration::from_millis(500), Duration::from_secs(10)),
                )
                .await
                {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Decides the fate of a claimed group: probes it (with `--probe`) and cuts
/// it before the first row that would cross the spend cap, putting the rest
/// back in `feed`. An empty answer with the cap reached pauses submission.
pub(super) async fn plan(
    engine: &Arc<Engine>,
    feed: &mut Feed,
    group: Vec<(OwnedSemaphorePermit, Option<Claim>)>,
) -> (Vec<(OwnedSemaphorePermit, Claim)>, Vec<Outcome>) {
    let group: Vec<(OwnedSemaphorePermit, Claim)> = group
        .into_iter()
        .filter_map(|(s, c)| c.map(|c| (s, c)))
        .collect();
    // Rows queued again have their spec in the store; read it (and the
    // spend so far) off the async threads.
    let again: Vec<RowKey> = group
        .iter()
        .filter_map(|(_, c)| match c {
            Claim::Again(key) => Some(*key),
            Claim::Fresh { .. } => None,
        })
        .collect();
    let read = engine
        .store
        .call(move |s| {
            let mut specs = std::collections::HashMap::new();
            for key in again {
                if let Some(r) = s.live_row(key)? {
                    specs.insert(key, (r.spec, r.probe_deferrals, r.audio_seconds));
                }
            }
            Ok((specs, s.spend()?.usd))
        })
        .await;
    let (mut again_specs, spent_before) = match read {
        Ok(read) => read,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the rows' specs and the spend so far");
            (std::collections::HashMap::new(), 0.0)
        }
    };
    let mut specs = Vec::with_capacity(group.len());
    let mut deferrals = Vec::with_capacity(group.len());
    let mut known = Vec::with_capacity(group.len());
    for (_, claim) in &group {
        let (spec, d, seconds) = match claim {
            Claim::Fresh { row, .. } => (Some(row.spec.clone()), 0, None),
            Claim::Again(key) => again_specs
                .remove(key)
                .map_or((None, 0, None), |(spec, d, s)| (Some(spec), d, s)),
        };
        specs.push(spec);
        deferrals.push(d);
        known.push(seconds);
    }
    let keys: Vec<RowKey> = group
        .iter()
        .map(|(_, c)| match c {
            Claim::Fresh { batch, row, .. } => RowKey {
                batch: *batch,
                row: row.index,
            },
            Claim::Again(key) => *key,
        })
        .collect();
    let probe = engine.settings.probe;
    let lengths = specs.iter().zip(&keys).zip(&known);
    let probes: Vec<Option<Result<f64, ProbeError>>> =
        futures_util::future::join_all(lengths.map(|((spec, key), known)| async move {
            match (known, spec) {
                // Read when the row was admitted (or sent before).
                (Some(seconds), _) => Some(Ok(*seconds)),
                (None, Some(spec)) if probe => Some(audio_length(engine, *key, spec).await),
                _ => None,
            }
        }))
        .await;
    let cap = *engine.spend_cap.borrow();
    let mut spent = spent_before;
    let mut kept = Vec::with_capacity(group.len());
    let mut outcomes = Vec::with_capacity(group.len());
    let mut rest = Vec::new();
    let rows = group
        .into_iter()
        .zip(specs)
        .zip(probes)
        .zip(keys)
        .zip(deferrals);
    for (((((slot, claim), spec), probe), key), deferrals) in rows {
        if !rest.is_empty() {
            rest.push(claim);
            continue;
        }
        let res = spec
            .as_ref()
            .map_or(engine.settings.defaults.resolution, |s| {
                s.resolution_or(&engine.settings.defaults)
            });
        let outcome = match probe {
            None => Outcome::Submit {
                usd: res.cost_usd(0.0),
                seconds: None,
            },
            Some(Ok(seconds)) => Outcome::Submit {
                usd: res.cost_usd(seconds),
                seconds: Some(seconds),
            },
            Some(Err(e)) if e.is_transient() && deferrals + 1 < PROBE_ROUNDS => {
                let wait = probe_wait(deferrals);
                feed.hold(key, wait);
                Outcome::Defer { error: e, wait }
            }
            Some(Err(e)) => Outcome::Fail(e),
        };
        if let (Outcome::Submit { usd, .. }, Some(cap)) = (&outcome, cap)
            && spent + usd > cap + 1e-9
        {
            drop(slot);
            rest.push(claim);
            continue;
        }
        if let Outcome::Submit { usd, .. } = &outcome {
            spent += usd;
        }
        kept.push((slot, claim));
        outcomes.push(outcome);
    }
    if !rest.is_empty() {
        feed.unpop(rest);
        if kept.is_empty() {
            if let Some(cap) = cap {
                tracing::warn!(
                    spent_usd = format!("{spent:.2}"),
                    cap_usd = format!("{cap:.2}"),
                    "the next row would cross the spend cap; submission pauses until the cap is raised"
                );
            }
            engine.set_pause(PauseReason::SpendCap);
        }
    }
    (kept, outcomes)
}

/// After the group is marked `submitting` (before the flush), on a blocking
/// thread: records the probed lengths and the spend, fails and requeues what
/// must not be sent. Returns the rows to submit.
pub(super) fn apply(
    engine: &Engine,
    group: Vec<(OwnedSemaphorePermit, Claim)>,
    claimed: Vec<(RowKey, RowRecord)>,
    outcomes: Vec<Outcome>,
) -> Result<Vec<(OwnedSemaphorePermit, RowKey, RowRecord)>, StoreError> {
    let mut send = Vec::with_capacity(claimed.len());
    let (mut usd_total, mut seconds_total) = (0.0, 0.0);
    for (((slot, _), (key, record)), outcome) in group.into_iter().zip(claimed).zip(outcomes) {
        match outcome {
            Outcome::Submit { usd, seconds } => {
                usd_total += usd;
                let record = match seconds {
                    Some(seconds) => {
                        seconds_total += seconds;
                        engine.store.apply(
                            key,
                            Op::Costed {
                                audio_seconds: seconds,
                                cost_usd: usd,
                            },
                        )?
                    }
                    None => record,
                };
                send.push((slot, key, record));
            }
            Outcome::Fail(e) => {
                let msg = probe_failure_msg(&e);
                tracing::warn!(batch = %engine.batch_name(key.batch), row = %record.id, code = e.fail_code(), msg, "row failed");
                let op = Op::SubmitFailed {
                    code: e.fail_code().to_owned(),
                    msg,
                };
                engine.apply_blocking(key, op)?;
            }
            Outcome::Defer { error, wait } => {
                let record = engine.apply_blocking(key, Op::ProbeDeferred)?;
                if record.state == crate::store::RowState::Queued {
                    tracing::warn!(batch = %engine.batch_name(key.batch), row = %record.id, %error, wait = ?wait, "cannot read the audio's length; the row waits in the queue");
                }
            }
        }
    }
    if usd_total > 0.0 {
        engine.store.add_spend(usd_total, seconds_total)?;
    }
    Ok(send)
}
