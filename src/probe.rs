//! Audio probing: how many seconds of audio a row's `audio_url` holds, read
//! over HTTP before any money is spent.
//!
//! Only what the container needs is fetched: a first HTTP Range request for
//! the head of the file (which also tells the file's size), then further
//! ranges on demand (an M4A whose `moov` box sits at the end, an MP3 without
//! a Xing/VBRI header whose duration is estimated from its bitrate and size).
//! Every probe is bounded in time (`timeout`), in bytes fetched
//! ([`MAX_FETCHED_BYTES`]) and refuses files over [`MAX_AUDIO_BYTES`].
//!
//! The demuxers are symphonia's (MP3, WAV, MP4/M4A only). This module never
//! decodes audio and never writes anything.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSource, MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;
use tokio::sync::Semaphore;

/// The API refuses audio files larger than this: 128 MB, decimal, as the
/// API's page writes it (a file of 128 MiB is over it).
pub const MAX_AUDIO_BYTES: u64 = 128_000_000;
/// The API refuses audio longer than this (10 minutes).
pub const MAX_AUDIO_SECONDS: f64 = 600.0;
/// Audio longer than this is accepted, but the model's quality drifts.
pub const LONG_AUDIO_SECONDS: f64 = 60.0;
/// The first request asks for this much of the file.
pub const HEAD_BYTES: u64 = 256 * 1024;
/// Later requests ask for blocks of this size.
const BLOCK_BYTES: u64 = 64 * 1024;
/// Most bytes one probe fetches in all (a server ignoring Range sends the
/// whole file, up to [`MAX_AUDIO_BYTES`]).
pub const MAX_FETCHED_BYTES: u64 = 8 * 1024 * 1024;
/// Probes on the wire at once, by default.
pub const DEFAULT_PROBES_IN_FLIGHT: usize = 16;

/// Container of the audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioFormat {
    Mp3,
    Wav,
    M4a,
}

impl AudioFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            AudioFormat::Mp3 => "MP3",
            AudioFormat::Wav => "WAV",
            AudioFormat::M4a => "M4A",
        }
    }
}

/// What a probe learned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probed {
    pub seconds: f64,
    pub format: AudioFormat,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// Why the length of an audio URL is not known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProbeError {
    /// No usable answer: connection refused or reset, timeout, DNS.
    #[error("cannot fetch the audio: {0}")]
    Network(String),
    /// The server answered with an HTTP error status.
    #[error("the audio URL answers HTTP {0}")]
    Status(u16),
    /// The server sent fewer bytes than it announced.
    #[error("the audio download was cut short ({got} of {expected} bytes)")]
    CutShort { expected: u64, got: u64 },
    /// The probe took longer than its time limit.
    #[error("reading the audio took longer than {0:?}")]
    Timeout(Duration),
    /// The file is larger than the API accepts.
    #[error("the audio file is {bytes} bytes; the API accepts at most 128 MB")]
    TooLarge { bytes: u64 },
    /// The audio is longer than the API accepts.
    #[error("the audio is {seconds:.1} s long; the API accepts at most 10 minutes")]
    TooLong { seconds: f64 },
    /// Not MP3, WAV or M4A audio (or unreadable as such).
    #[error("not MP3, WAV or M4A audio ({0})")]
    Unsupported(String),
    /// The container does not say how long it is.
    #[error("the {0} file does not tell its duration")]
    NoDuration(&'static str),
    /// Reading needed more bytes than a probe may fetch.
    #[error("reading the duration needs more than {MAX_FETCHED_BYTES} bytes of the file")]
    TooMuchToRead,
}

impl ProbeError {
    /// True when asking again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            ProbeError::Network(_) | ProbeError::CutShort { .. } | ProbeError::Timeout(_) => true,
            ProbeError::Status(s) => *s >= 500 || *s == 429 || *s == 408,
            _ => false,
        }
    }

    /// The fail code recorded on a row whose probe failed for good.
    pub fn fail_code(&self) -> &'static str {
        match self {
            ProbeError::TooLong { .. } => "AUDIO_TOO_LONG",
            ProbeError::TooLarge { .. } => "AUDIO_TOO_LARGE",
            ProbeError::Unsupported(_) | ProbeError::NoDuration(_) => "AUDIO_UNSUPPORTED",
            _ => "AUDIO_PROBE_FAILED",
        }
    }
}

/// Most probed lengths kept; the oldest goes first.
pub const PROBE_CACHE_ENTRIES: usize = 10_000;

/// Probes audio URLs, caching lengths per URL (at most
/// [`PROBE_CACHE_ENTRIES`], oldest evicted first). Failures are never kept:
/// a URL fixed after a failure is read again on its next use.
pub struct Prober {
    http: reqwest::Client,
    timeout: Duration,
    head_bytes: u64,
    wire: Semaphore,
    cache: Mutex<Cache>,
}

/// Successful probes, bounded, in insertion order.
#[derive(Default)]
struct Cache {
    map: HashMap<String, Probed>,
    order: std::collections::VecDeque<String>,
}

impl Cache {
    fn insert(&mut self, url: String, probed: Probed) {
        if self.map.insert(url.clone(), probed).is_none() {
            self.order.push_back(url);
        }
        while self.map.len() > PROBE_CACHE_ENTRIES {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
    }
}

impl std::fmt::Debug for Prober {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prober")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Prober {
    /// `timeout` bounds one probe from its first request to its answer.
    pub fn new(http: reqwest::Client, timeout: Duration, in_flight: usize) -> Prober {
        Prober {
            http,
            timeout,
            head_bytes: HEAD_BYTES,
            wire: Semaphore::new(in_flight.max(1)),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Asks for `bytes` in the first request instead of [`HEAD_BYTES`]
    /// (tests use a small head to exercise later range requests).
    pub fn with_head_bytes(mut self, bytes: u64) -> Prober {
        self.head_bytes = bytes.clamp(16, HEAD_BYTES);
        self
    }

    /// The length of the audio at `url`, checked against the API's limits.
    pub async fn probe(&self, url: &str) -> Result<Probed, ProbeError> {
        if let Some(known) = self.cached(url) {
            return Ok(known);
        }
        let result = {
            let Ok(_permit) = self.wire.acquire().await else {
                return Err(ProbeError::Network("prober closed".into()));
            };
            match tokio::time::timeout(
                self.timeout,
                probe_url(&self.http, url, self.timeout, self.head_bytes),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(ProbeError::Timeout(self.timeout)),
            }
        };
        let result = result.and_then(|p| {
            if p.seconds > MAX_AUDIO_SECONDS {
                Err(ProbeError::TooLong { seconds: p.seconds })
            } else {
                Ok(p)
            }
        });
        if let Ok(probed) = &result {
            self.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(url.to_owned(), *probed);
        }
        result
    }

    fn cached(&self, url: &str) -> Option<Probed> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .get(url)
            .cloned()
    }

    /// URLs whose length is kept.
    pub fn cached_entries(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }
}

/// One fetched piece of the file.
struct Piece {
    data: Bytes,
    /// The server sent the whole file (it ignored Range).
    whole: bool,
    /// Size of the whole file.
    total: u64,
}

/// `GET url` for bytes `start..=end`.
async fn fetch(
    http: &reqwest::Client,
    url: &str,
    start: u64,
    end: u64,
    timeout: Duration,
) -> Result<Piece, ProbeError> {
    let resp = http
        .get(url)
        .header(RANGE, format!("bytes={start}-{end}"))
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| ProbeError::Network(crate::api::error_chain(&e)))?;
    let status = resp.status();
    let (whole, total, expected) = match status {
        StatusCode::PARTIAL_CONTENT => {
            let total = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_total)
                .ok_or_else(|| {
                    ProbeError::Network("a partial answer without a usable Content-Range".into())
                })?;
            (
                false,
                total,
                (end.min(total.saturating_sub(1)) + 1).saturating_sub(start),
            )
        }
        StatusCode::OK => {
            let total = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(total) = total
                && total > MAX_AUDIO_BYTES
            {
                return Err(ProbeError::TooLarge { bytes: total });
            }
            (true, total.unwrap_or(0), total.unwrap_or(0))
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(ProbeError::Unsupported("the file is empty".into()));
        }
        other => return Err(ProbeError::Status(other.as_u16())),
    };
    if total > MAX_AUDIO_BYTES {
        return Err(ProbeError::TooLarge { bytes: total });
    }
    let limit = if whole { MAX_AUDIO_BYTES } else { expected };
    let mut data = Vec::with_capacity(expected.min(MAX_FETCHED_BYTES) as usize);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            if data.len() as u64 >= expected && !whole {
                ProbeError::Network(crate::api::error_chain(&e))
            } else {
                ProbeError::CutShort {
                    expected,
                    got: data.len() as u64,
                }
            }
        })?;
        data.extend_from_slice(&chunk);
        if data.len() as u64 > limit {
            if whole {
                return Err(ProbeError::TooLarge {
                    bytes: data.len() as u64,
                });
            }
            data.truncate(limit as usize);
            break;
        }
    }
    let got = data.len() as u64;
    if got < expected {
        return Err(ProbeError::CutShort { expected, got });
    }
    let total = if whole { got } else { total };
    Ok(Piece {
        data: Bytes::from(data),
        whole,
        total,
    })
}

/// The total of `bytes a-b/TOTAL`.
fn content_range_total(value: &str) -> Option<u64> {
    value.rsplit_once('/')?.1.trim().parse().ok()
}

async fn probe_url(
    http: &reqwest::Client,
    url: &str,
    timeout: Duration,
    head_bytes: u64,
) -> Result<Probed, ProbeError> {
    let deadline = Instant::now() + timeout;
    let head = fetch(http, url, 0, head_bytes - 1, timeout).await?;
    if head.total == 0 {
        return Err(ProbeError::Unsupported("the file is empty".into()));
    }
    let format = sniff(&head.data)?;
    let total = head.total;
    let mut pieces = BTreeMap::new();
    let whole = head.whole;
    pieces.insert(0, head.data);
    let source = RangeSource {
        http: http.clone(),
        url: url.to_owned(),
        runtime: tokio::runtime::Handle::current(),
        deadline,
        timeout,
        len: total,
        pos: 0,
        pieces,
        fetched: 0,
        whole,
        error: Arc::new(Mutex::new(None)),
    };
    let error = source.error.clone();
    let demuxed = tokio::task::spawn_blocking(move || demux(Box::new(source), total, format)).await;
    let last_fetch_error = || error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match demuxed {
        Ok(Ok(seconds)) => Ok(Probed {
            seconds,
            format,
            bytes: total,
        }),
        Ok(Err(e)) => Err(last_fetch_error().unwrap_or(e)),
        Err(e) => Err(last_fetch_error().unwrap_or_else(|| {
            ProbeError::Unsupported(format!("the {} reader failed: {e}", format.as_str()))
        })),
    }
}

/// Which of the three containers the first bytes announce.
fn sniff(head: &[u8]) -> Result<AudioFormat, ProbeError> {
    if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WAVE" {
        return Ok(AudioFormat::Wav);
    }
    if head.len() >= 8 && &head[4..8] == b"ftyp" {
        return Ok(AudioFormat::M4a);
    }
    if head.starts_with(b"ID3") {
        return Ok(AudioFormat::Mp3);
    }
    // An MPEG audio frame sync: 11 bits set, layer III.
    if head.len() >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0 && head[1] & 0x06 == 0x02 {
        return Ok(AudioFormat::Mp3);
    }
    let shown: String = head
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    Err(ProbeError::Unsupported(format!(
        "the file starts with bytes {shown}"
    )))
}

/// The length of a local audio file (a manifest's local media), read the
/// same way as a remote one: sniffed, then demuxed (never decoded). Blocks:
/// call it from a blocking thread.
pub fn probe_file(mut file: std::fs::File) -> Result<Probed, ProbeError> {
    let len = file
        .metadata()
        .map_err(|e| ProbeError::Network(format!("cannot read the file: {e}")))?
        .len();
    if len == 0 {
        return Err(ProbeError::Unsupported("the file is empty".into()));
    }
    if len > MAX_AUDIO_BYTES {
        return Err(ProbeError::TooLarge { bytes: len });
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProbeError::Network(format!("cannot read the file: {e}"))),
        }
    }
    let format = sniff(&head[..got])?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| ProbeError::Network(format!("cannot read the file: {e}")))?;
    let seconds = demux(Box::new(file), len, format)?;
    if seconds > MAX_AUDIO_SECONDS {
        return Err(ProbeError::TooLong { seconds });
    }
    Ok(Probed {
        seconds,
        format,
        bytes: len,
    })
}

/// Reads the container's header and returns its duration in seconds.
fn demux(source: Box<dyn MediaSource>, len: u64, format: AudioFormat) -> Result<f64, ProbeError> {
    let mut hint = Hint::new();
    hint.with_extension(match format {
        AudioFormat::Mp3 => "mp3",
        AudioFormat::Wav => "wav",
        AudioFormat::M4a => "m4a",
    });
    let mss = MediaSourceStream::new(
        source,
        MediaSourceStreamOptions {
            buffer_len: 64 * 1024,
        },
    );
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            mss,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| ProbeError::Unsupported(e.to_string()))?;
    let reader = probed.format;
    let track = reader
        .tracks()
        .iter()
        .find(|t| t.codec_params.sample_rate.is_some() && t.codec_params.n_frames.is_some())
        .or_else(|| reader.default_track())
        .ok_or_else(|| ProbeError::Unsupported("no audio track".into()))?;
    let params = &track.codec_params;
    let frames = params
        .n_frames
        .ok_or(ProbeError::NoDuration(format.as_str()))?;
    let mut seconds = match (params.time_base, params.sample_rate) {
        (Some(tb), _) if tb.numer > 0 && tb.denom > 0 => {
            frames as f64 * f64::from(tb.numer) / f64::from(tb.denom)
        }
        (_, Some(rate)) if rate > 0 => frames as f64 / f64::from(rate),
        _ => return Err(ProbeError::NoDuration(format.as_str())),
    };
    // A WAV header may claim more samples than the file holds (a file cut
    // short, or one that lies): the bytes decide.
    if format == AudioFormat::Wav
        && let (Some(rate), Some(channels), Some(bits)) =
            (params.sample_rate, params.channels, params.bits_per_sample)
    {
        let bytes_per_second = f64::from(rate) * channels.count() as f64 * f64::from(bits) / 8.0;
        if bytes_per_second > 0.0 {
            seconds = seconds.min(len as f64 / bytes_per_second);
        }
    }
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(ProbeError::NoDuration(format.as_str()));
    }
    Ok(seconds)
}

/// The remote file as a seekable source: bytes already fetched are served
/// from memory, others fetched by Range on demand (from a blocking thread).
struct RangeSource {
    http: reqwest::Client,
    url: String,
    runtime: tokio::runtime::Handle,
    deadline: Instant,
    timeout: Duration,
    len: u64,
    pos: u64,
    /// Fetched pieces by start offset; they do not overlap.
    pieces: BTreeMap<u64, Bytes>,
    fetched: u64,
    whole: bool,
    /// The fetch error behind the last failed read, for the report.
    error: Arc<Mutex<Option<ProbeError>>>,
}

impl RangeSource {
    fn piece_at(&self, pos: u64) -> Option<(u64, &Bytes)> {
        let (start, data) = self.pieces.range(..=pos).next_back()?;
        (pos < start + data.len() as u64).then_some((*start, data))
    }

    fn fail(&self, e: ProbeError) -> io::Error {
        let text = e.to_string();
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        io::Error::other(text)
    }

    fn fetch_at(&mut self, pos: u64) -> io::Result<()> {
        if self.whole {
            // The whole file is here already: nothing past it exists.
            return Err(self.fail(ProbeError::CutShort {
                expected: self.len,
                got: pos,
            }));
        }
        let start = pos - pos % BLOCK_BYTES;
        // Up to the next piece already fetched, or one block.
        let mut end = (start + BLOCK_BYTES).min(self.len) - 1;
        if let Some((next, _)) = self.pieces.range(pos + 1..).next() {
            end = end.min(next - 1);
        }
        let start = start.max(
            self.pieces
                .range(..=pos)
                .next_back()
                .map_or(0, |(s, d)| s + d.len() as u64),
        );
        if self.fetched + (end + 1 - start) > MAX_FETCHED_BYTES {
            return Err(self.fail(ProbeError::TooMuchToRead));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.fail(ProbeError::Timeout(self.timeout)));
        }
        let piece = self.runtime.block_on(async {
            tokio::time::timeout(left, fetch(&self.http, &self.url, start, end, left)).await
        });
        let piece = match piece {
            Ok(Ok(p)) if !p.whole => p,
            Ok(Ok(_)) => {
                return Err(self.fail(ProbeError::Network(
                    "the server stopped honouring Range requests".into(),
                )));
            }
            Ok(Err(e)) => return Err(self.fail(e)),
            Err(_) => return Err(self.fail(ProbeError::Timeout(self.timeout))),
        };
        self.fetched += piece.data.len() as u64;
        self.pieces.insert(start, piece.data);
        Ok(())
    }
}

impl Read for RangeSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        if self.piece_at(self.pos).is_none() {
            self.fetch_at(self.pos)?;
        }
        let pos = self.pos;
        let Some((start, data)) = self.piece_at(pos) else {
            return Err(self.fail(ProbeError::CutShort {
                expected: self.len,
                got: pos,
            }));
        };
        let from = (pos - start) as usize;
        let n = buf.len().min(data.len() - from);
        buf[..n].copy_from_slice(&data[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangeSource {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        self.pos = target;
        Ok(target)
    }
}

impl MediaSource for RangeSource {
    fn is_seekable(&self) -> bool {
        true
    }

    fn byte_len(&self) -> Option<u64> {
        Some(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_bounded_and_keeps_the_newest() {
        let mut c = Cache::default();
        let p = Probed {
            seconds: 5.0,
            format: AudioFormat::Wav,
            bytes: 1,
        };
        for i in 0..PROBE_CACHE_ENTRIES + 10 {
            c.insert(format!("u{i}"), p);
        }
        assert_eq!(c.map.len(), PROBE_CACHE_ENTRIES);
        assert!(!c.map.contains_key("u0"));
        assert!(c.map.contains_key(&format!("u{}", PROBE_CACHE_ENTRIES + 9)));
    }

    #[test]
    fn content_range_total_is_read() {
        assert_eq!(content_range_total("bytes 0-99/1234"), Some(1234));
        assert_eq!(content_range_total("bytes 0-99/*"), None);
    }

    #[test]
    fn sniffs_the_three_containers_only() {
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), Ok(AudioFormat::Wav));
        assert_eq!(sniff(b"\0\0\0\x20ftypM4A "), Ok(AudioFormat::M4a));
        assert_eq!(sniff(b"ID3\x04\0\0"), Ok(AudioFormat::Mp3));
        assert_eq!(sniff(&[0xFF, 0xFB, 0x90, 0x64]), Ok(AudioFormat::Mp3));
        assert!(sniff(b"OggS\0\x02").is_err());
        assert!(sniff(b"<html>").is_err());
    }

    #[test]
    fn transient_errors_are_told_apart() {
        assert!(ProbeError::Status(503).is_transient());
        assert!(!ProbeError::Status(404).is_transient());
        assert!(!ProbeError::TooLong { seconds: 700.0 }.is_transient());
        assert_eq!(
            ProbeError::TooLong { seconds: 700.0 }.fail_code(),
            "AUDIO_TOO_LONG"
        );
    }
}

/// The length of the local audio file `cell` names under `root`. Blocks.
fn probe_local(root: &std::path::Path, cell: &str) -> Result<Probed, ProbeError> {
    let root =
        crate::media::MediaRoot::open(root).map_err(|e| ProbeError::Unsupported(e.to_string()))?;
    let path = root
        .locate(cell)
        .map_err(|e| ProbeError::Unsupported(e.to_string()))?;
    let file = std::fs::File::open(&path)
        .map_err(|e| ProbeError::Network(format!("cannot read {}: {e}", path.display())))?;
    probe_file(file)
}

/// What `validate --probe` reports: the exact estimate of a manifest.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Estimate {
    /// Per resolution: rows, seconds of audio, dollars.
    pub by_resolution: std::collections::BTreeMap<crate::spec::Resolution, (u64, f64, f64)>,
    /// `line N: column audio_url: ...`, in line order.
    pub problems: Vec<String>,
    /// Rows whose audio is longer than the model handles well.
    pub long_rows: u64,
}

impl Estimate {
    pub fn total_usd(&self) -> f64 {
        self.by_resolution.values().map(|(_, _, usd)| usd).sum()
    }
}

/// Probes every row of a (valid) manifest, `in_flight` at once. Local audio
/// files (see [`crate::media`]) are read under `media_root`.
pub async fn estimate_manifest(
    path: &std::path::Path,
    defaults: &crate::spec::RowDefaults,
    prober: &Prober,
    in_flight: usize,
    media_root: &std::path::Path,
) -> Result<Estimate, crate::manifest::ManifestError> {
    let mut reader = crate::manifest::RowReader::open(path, None)?;
    let mut rows = Vec::new();
    while let Some((row, _)) = reader.next_row()? {
        rows.push((
            row.line,
            row.spec.resolution_or(defaults),
            row.spec.audio_url,
        ));
    }
    let probed: Vec<_> = futures_util::stream::iter(rows)
        .map(|(line, res, url)| async move {
            if crate::media::is_local(&url) {
                let root = media_root.to_owned();
                let local = tokio::task::spawn_blocking(move || probe_local(&root, &url)).await;
                let local = local.unwrap_or_else(|e| Err(ProbeError::Unsupported(e.to_string())));
                return (line, res, local);
            }
            (line, res, prober.probe(&url).await)
        })
        .buffered(in_flight.max(1))
        .collect()
        .await;
    let mut estimate = Estimate::default();
    for (line, res, result) in probed {
        match result {
            Ok(p) => {
                let slot = estimate.by_resolution.entry(res).or_default();
                slot.0 += 1;
                slot.1 += p.seconds;
                slot.2 += res.cost_usd(p.seconds);
                if p.seconds > LONG_AUDIO_SECONDS {
                    estimate.long_rows += 1;
                }
            }
            Err(e) => estimate
                .problems
                .push(format!("line {line}: column audio_url: {e}")),
        }
    }
    Ok(estimate)
}
