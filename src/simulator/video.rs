//! The result videos the simulator serves.
//!
//! One real, playable MP4 (generated once with ffmpeg, committed as
//! `assets/sample.mp4`) is the base of every file. Tests must be able to tell
//! videos apart, so each file gets a top-level `free` box naming its task and
//! index: players skip `free` boxes, so the file stays playable.

use sha2::{Digest, Sha256};

/// The committed sample video: 2 s, 160x160, H.264 + AAC, faststart.
pub const SAMPLE_MP4: &[u8] = include_bytes!("../../assets/sample.mp4");

/// Largest file `sim_video_bytes` may ask for, so a marker cannot make the
/// simulator allocate without bound.
pub const MAX_VIDEO_BYTES: usize = 64 * 1024 * 1024;

/// The bytes of result file `index` of task `task_id`, deterministic.
///
/// `pad_to` pads the `free` box so that the file is about that many bytes
/// (never less than the sample plus its `free` box; capped at
/// [`MAX_VIDEO_BYTES`]).
pub fn result_video(task_id: &str, index: usize, pad_to: Option<usize>) -> Vec<u8> {
    let tag = format!("infinitetalk-batch simulator: task={task_id} file={index}\n");
    let natural = SAMPLE_MP4.len() + 8 + tag.len();
    let total = pad_to.map_or(natural, |p| p.clamp(natural, MAX_VIDEO_BYTES.max(natural)));
    let box_len = total - SAMPLE_MP4.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(SAMPLE_MP4);
    // `box_len` is at most MAX_VIDEO_BYTES plus a short tag, far below u32::MAX.
    out.extend_from_slice(&u32::try_from(box_len).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(b"free");
    out.extend_from_slice(tag.as_bytes());
    out.resize(total, 0);
    out
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top_level_boxes(bytes: &[u8]) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 8 <= bytes.len() {
            let size = u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned();
            assert!(size >= 8, "box {kind} at {at} has size {size}");
            out.push((kind, size));
            at += size;
        }
        assert_eq!(at, bytes.len(), "boxes must tile the file exactly");
        out
    }

    #[test]
    fn files_are_valid_mp4_and_distinct() {
        let a = result_video("t1", 0, None);
        let b = result_video("t1", 1, None);
        let c = result_video("t2", 0, None);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, result_video("t1", 0, None));
        let boxes = top_level_boxes(&a);
        assert_eq!(boxes[0].0, "ftyp");
        assert_eq!(boxes.last().expect("boxes").0, "free");
    }

    #[test]
    fn padding_reaches_the_asked_size() {
        let v = result_video("t1", 0, Some(100_000));
        assert_eq!(v.len(), 100_000);
        top_level_boxes(&v);
        // Too small a pad leaves the natural size.
        assert_eq!(
            result_video("t1", 0, Some(10)).len(),
            result_video("t1", 0, None).len()
        );
    }

    #[test]
    fn sha_is_lower_hex() {
        let h = sha256_hex(b"abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
