//! Local media at validation and acceptance: paths checked against the
//! media root (escapes, types, limits), the two publishing flags named when
//! neither is set, and the content recorded when a manifest is accepted.
//! Real files in temp folders; `validate` through the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use infinitetalk_batch::ingest::{self, Folders, Outcome};
use infinitetalk_batch::media::{Column, MediaSettings, Publishing, table};
use infinitetalk_batch::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_infinitetalk-batch");

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x01\0\0\0\x01\x08\x06\0\0\0";

fn wav(seconds: f64) -> Vec<u8> {
    infinitetalk_batch::simulator::silent_wav_bytes(seconds)
}

/// A folder with `media/` holding a portrait and a voice, and a manifest
/// beside it.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let media = dir.path().join("media");
        std::fs::create_dir_all(media.join("people")).expect("mkdir");
        std::fs::write(media.join("people/ann.png"), PNG).expect("png");
        std::fs::write(media.join("ann.wav"), wav(2.0)).expect("wav");
        Setup { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn manifest(&self, body: &str) -> PathBuf {
        let path = self.path("m.csv");
        std::fs::write(&path, format!("id,image_url,audio_url\n{body}")).expect("manifest");
        path
    }

    /// `validate` with `--media-root` and the extra arguments: (exit, stdout).
    fn validate(&self, manifest: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(BIN)
            .current_dir(self.dir.path())
            .arg("validate")
            .arg(manifest)
            .arg("--media-root")
            .arg(self.path("media"))
            .args(extra)
            .output()
            .expect("runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

const URL: &[&str] = &["--media-url", "https://media.example/it"];

#[test]
fn local_files_inside_the_root_validate() {
    let s = Setup::new();
    let abs = s.path("media/ann.wav");
    let m = s.manifest(&format!(
        "a,people/ann.png,ann.wav\nb,people/ann.png,{}\nc,https://x.test/a.png,ann.wav\n",
        abs.display()
    ));
    let (code, out, err) = s.validate(&m, URL);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("rows: 3"), "{out}");
}

#[test]
fn escapes_are_rejected_with_line_and_column() {
    let s = Setup::new();
    std::fs::write(s.path("secret.png"), PNG).expect("secret");
    std::os::unix::fs::symlink(s.path("secret.png"), s.path("media/link.png")).expect("symlink");
    let m = s.manifest(
        "a,../secret.png,ann.wav\n\
         b,link.png,ann.wav\n\
         c,people/ann.png,/etc/hostname\n",
    );
    let (code, out, _) = s.validate(&m, URL);
    assert_eq!(code, Some(1), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0]
            .starts_with("line 2: column image_url: \"../secret.png\" is outside the media root"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("line 3: column image_url: \"link.png\" is outside the media root"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("line 4: column audio_url: \"/etc/hostname\""),
        "{out}"
    );
}

#[test]
fn wrong_types_missing_files_and_sizes_are_rejected() {
    let s = Setup::new();
    std::fs::write(s.path("media/notes.txt"), b"hello").expect("txt");
    // Sparse: over the API's 128 MB audio limit without writing it.
    let big = std::fs::File::create(s.path("media/big.wav")).expect("big");
    big.set_len(128_000_001).expect("sparse");
    std::fs::create_dir(s.path("media/folder.png")).expect("dir");
    let m = s.manifest(
        "a,notes.txt,ann.wav\n\
         b,people/ann.png,people/ann.png\n\
         c,people/ann.png,big.wav\n\
         d,missing.png,ann.wav\n\
         e,folder.png,ann.wav\n",
    );
    let (code, out, _) = s.validate(&m, URL);
    assert_eq!(code, Some(1), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(
        lines[0].starts_with(
            "line 2: column image_url: \"notes.txt\" is not a JPEG, PNG or WebP image"
        ),
        "{out}"
    );
    assert!(
        lines[1].starts_with(
            "line 3: column audio_url: \"people/ann.png\" is not MP3, WAV or M4A audio"
        ),
        "{out}"
    );
    assert!(
        lines[2].starts_with("line 4: column audio_url: \"big.wav\" is 128000001 bytes"),
        "{out}"
    );
    assert!(
        lines[3].starts_with("line 5: column image_url: \"missing.png\": no such file"),
        "{out}"
    );
    assert!(
        lines[4].starts_with("line 6: column image_url: \"folder.png\" is not a regular file"),
        "{out}"
    );
}

#[test]
fn local_paths_without_a_publishing_flag_name_both_flags() {
    let s = Setup::new();
    let m = s.manifest("a,people/ann.png,ann.wav\nb,people/ann.png,ann.wav\n");
    let (code, out, _) = s.validate(&m, &[]);
    assert_eq!(code, Some(1), "{out}");
    // Said once, on the first local cell.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].starts_with("line 2: column image_url: "), "{out}");
    assert!(
        lines[0].contains("--media-url") && lines[0].contains("--media-store"),
        "{out}"
    );
    // A manifest of URLs only needs neither.
    let m = s.manifest("a,https://x.test/a.png,https://x.test/a.wav\n");
    assert_eq!(s.validate(&m, &[]).0, Some(0));
}

#[test]
fn validate_takes_the_media_settings_from_the_config() {
    let s = Setup::new();
    let m = s.manifest("a,people/ann.png,ann.wav\n");
    let config = s.path("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "media-root = {:?}\nmedia-url = \"https://media.example/\"\n",
            s.path("media").display().to_string()
        ),
    )
    .expect("config");
    let out = Command::new(BIN)
        .current_dir(s.dir.path())
        .arg("validate")
        .arg(&m)
        .arg("--config")
        .arg(&config)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn acceptance_records_each_local_file() {
    let s = Setup::new();
    let mut folders = Folders::new(s.path("inbox"), s.path("outbox"));
    folders.media = MediaSettings {
        root: s.path("media"),
        publishing: Publishing::Url(url::Url::parse("https://media.example/").expect("url")),
    };
    std::fs::create_dir_all(&folders.inbox).expect("inbox");
    let store = Store::open(&s.path("state")).expect("store");
    let file = folders.inbox.join("local.csv");
    std::fs::write(
        &file,
        "id,image_url,audio_url\na,people/ann.png,ann.wav\nb,https://x.test/a.png,https://x.test/a.wav\nc,people/ann.png,ann.wav\n",
    )
    .expect("manifest");
    let outcome = ingest::ingest_file(&store, &folders, &file, true).expect("ingest");
    let Outcome::Accepted(batch) = outcome else {
        panic!("expected accepted: {outcome:?}");
    };
    let t = table::Table::open(&table::path_of(&s.path("state"), batch.seq)).expect("table");
    let img = t.get(1, Column::Image).expect("read").expect("recorded");
    assert_eq!(img.print.size, PNG.len() as u64);
    let audio = t.get(1, Column::Audio).expect("read").expect("recorded");
    let seconds = audio.seconds.expect("measured");
    assert!((seconds - 2.0).abs() < 0.01, "{seconds}");
    assert_eq!(t.get(2, Column::Image).expect("read"), None);
    assert_eq!(t.get(3, Column::Audio).expect("read"), Some(audio));
    // Nothing half-written is left beside the tables.
    let names: Vec<String> = std::fs::read_dir(s.path("state/media"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("{}.table", batch.seq)]);

    // The same manifest with neither flag is rejected, naming both.
    folders.media.publishing = Publishing::Off;
    let file = folders.inbox.join("again.csv");
    std::fs::write(&file, "id,image_url,audio_url\nz,people/ann.png,ann.wav\n").expect("write");
    match ingest::ingest_file(&store, &folders, &file, true).expect("ingest") {
        Outcome::Rejected { problems } => {
            assert_eq!(problems.len(), 1, "{problems:?}");
            let text = problems[0].to_string();
            assert!(
                text.contains("--media-url") && text.contains("--media-store"),
                "{text}"
            );
        }
        other => panic!("expected rejected: {other:?}"),
    }
    assert!(!table::path_of(&s.path("state"), batch.seq + 1).exists());
}

#[test]
fn validate_probe_reads_local_audio_lengths() {
    let s = Setup::new();
    std::fs::write(s.path("media/long.wav"), wav(90.0)).expect("wav");
    let m = s.manifest("a,people/ann.png,ann.wav\nb,people/ann.png,long.wav\n");
    let (code, out, err) = s.validate(&m, &["--probe", "--media-url", "https://m.example/"]);
    assert_eq!(code, Some(0), "{out}{err}");
    // 5 s minimum for the 2 s clip, 90 s for the other, at 480p.
    assert!(out.contains("estimated cost: $2.85"), "{out}");
}
