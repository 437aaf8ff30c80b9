//! The inbox watcher against the real filesystem, a real store and the real
//! validator. Waits poll for the expected outcome under a deadline.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use infinitetalk_batch::inbox::{self, InboxConfig, InboxError};
use infinitetalk_batch::ingest::Folders;
use infinitetalk_batch::store::{BatchRecord, Store};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SETTLE: Duration = Duration::from_millis(300);
const RESCAN: Duration = Duration::from_secs(1);

struct Harness {
    _dir: TempDir,
    folders: Folders,
    store: Store,
    seen: Arc<Mutex<Vec<BatchRecord>>>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), InboxError>>,
}

fn new_dir() -> (TempDir, Folders) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("infinitetalk_batch=debug")
        .try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let folders = Folders::new(dir.path().join("inbox"), dir.path().join("outbox"));
    (dir, folders)
}

fn start(dir: TempDir, folders: Folders) -> Harness {
    let store = Store::open(&dir.path().join("state")).expect("open store");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let shutdown = CancellationToken::new();
    let config = InboxConfig {
        folders: folders.clone(),
        settle: SETTLE,
        rescan_every: RESCAN,
        simulated: true,
    };
    let sink = seen.clone();
    let task = tokio::spawn(inbox::watch(
        store.clone(),
        config,
        move |b| sink.lock().expect("lock").push(b),
        shutdown.clone(),
    ));
    Harness {
        _dir: dir,
        folders,
        store,
        seen,
        shutdown,
        task,
    }
}

impl Harness {
    fn inbox(&self, name: &str) -> PathBuf {
        self.folders.inbox.join(name)
    }

    fn seen(&self) -> Vec<BatchRecord> {
        self.seen.lock().expect("lock").clone()
    }

    fn names(&self) -> Vec<String> {
        self.seen().into_iter().map(|b| b.name).collect()
    }

    /// Waits until the inbox exists, i.e. the watcher has started.
    async fn ready(&self) {
        wait_for("the inbox to be created", Duration::from_secs(5), || {
            self.folders.inbox.is_dir()
        })
        .await;
        // The watch is set up right after the folder; give it a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Stops the watcher and checks that it ends promptly and cleanly.
    async fn stop(self) -> Vec<BatchRecord> {
        self.shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(6), self.task)
            .await
            .expect("the watcher ends soon after the cancel");
        ended.expect("no panic").expect("clean stop");
        self.seen.lock().expect("lock").clone()
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn manifest(tag: &str, rows: usize) -> String {
    let mut s = String::from("image_url,audio_url\n");
    for i in 1..=rows {
        s.push_str(&format!(
            "https://example.com/{tag}-{i}.png,https://example.com/{tag}-{i}.mp3\n"
        ));
    }
    s
}

/// Writes under a hidden name outside the inbox's view, then renames in,
/// the way careful tools deliver files.
fn drop_file(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, content).expect("write temp");
    fs::rename(&tmp, dir.join(name)).expect("rename in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_in_chunks_is_taken_once_whole() {
    let (dir, folders) = new_dir();
    let h = start(dir, folders);
    h.ready().await;
    let content = manifest("slow", 40);
    let bytes = content.as_bytes();
    let path = h.inbox("slow.csv");
    let mut file = fs::File::create(&path).expect("create");
    // Cut inside a URL so that a partial take would be rejected.
    let cuts = [bytes.len() / 3 + 7, 2 * bytes.len() / 3 + 5, bytes.len()];
    let mut from = 0;
    for cut in cuts {
        file.write_all(&bytes[from..cut]).expect("write");
        file.flush().expect("flush");
        from = cut;
        // Pauses well past the settle time, the file still open.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(h.seen().is_empty(), "taken while still open");
        assert!(
            !h.folders.rejected_dir().exists(),
            "a partial file was rejected"
        );
    }
    drop(file);

    wait_for("the batch", Duration::from_secs(5), || h.seen().len() == 1).await;
    let batch = &h.seen()[0];
    assert_eq!(batch.name, "slow");
    assert_eq!(batch.total_rows, 40);
    let copied = fs::read(h.folders.manifest_of("slow")).expect("manifest in outbox");
    assert_eq!(copied, bytes);
    assert!(!path.exists(), "left the inbox");
    // Nothing more after a rescan or two.
    tokio::time::sleep(RESCAN * 2).await;
    assert_eq!(h.store.batches().expect("batches").len(), 1);
    assert_eq!(h.stop().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_in_is_taken_promptly() {
    let (dir, folders) = new_dir();
    let h = start(dir, folders);
    h.ready().await;
    let tmp = h.inbox(".x.csv.tmp");
    fs::write(&tmp, manifest("x", 3)).expect("write temp");
    tokio::time::sleep(SETTLE * 3).await;
    assert!(tmp.exists(), "the temporary name is not taken");
    let renamed = Instant::now();
    fs::rename(&tmp, h.inbox("x.csv")).expect("rename");
    wait_for("the batch", Duration::from_secs(3), || h.seen().len() == 1).await;
    assert!(
        renamed.elapsed() < RESCAN,
        "taken on the rename event, not at a rescan ({:?})",
        renamed.elapsed()
    );
    assert_eq!(h.names(), ["x"]);
    assert!(!h.folders.rejected_dir().exists());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_present_before_start_are_taken() {
    let (dir, folders) = new_dir();
    fs::create_dir_all(&folders.inbox).expect("inbox");
    for name in ["one", "two", "three"] {
        fs::write(folders.inbox.join(format!("{name}.csv")), manifest(name, 2)).expect("write");
    }
    let h = start(dir, folders);
    wait_for("three batches", Duration::from_secs(5), || {
        h.seen().len() == 3
    })
    .await;
    let mut names = h.names();
    names.sort();
    assert_eq!(names, ["one", "three", "two"]);
    assert!(h.folders.outbox.join("two").join("manifest.csv").is_file());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_names_and_folders_are_left_untouched() {
    let (dir, folders) = new_dir();
    fs::create_dir_all(folders.inbox.join("sub")).expect("sub");
    fs::create_dir_all(folders.rejected_dir()).expect("rejected");
    let ignored = [
        ".hidden.csv",
        "a.txt",
        "b.csv.part",
        "c.csv~",
        "d.csv.tmp",
        "#e.csv#",
        "sub/x.csv",
        "rejected/y.csv",
    ];
    for name in ignored {
        fs::write(folders.inbox.join(name), manifest("ignored", 1)).expect("write");
    }
    // A folder and a FIFO with a candidate name: never opened (a FIFO would
    // block the reader forever).
    fs::create_dir_all(folders.inbox.join("folder.csv")).expect("folder.csv");
    let fifo = std::process::Command::new("mkfifo")
        .arg(folders.inbox.join("pipe.csv"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let stamps: Vec<_> = ignored
        .iter()
        .map(|n| {
            fs::metadata(folders.inbox.join(n))
                .expect("meta")
                .modified()
                .expect("mtime")
        })
        .collect();

    let h = start(dir, folders);
    h.ready().await;
    // Taken after the others were seen: it is the proof the loop went past them.
    drop_file(&h.folders.inbox, "marker.csv", &manifest("marker", 1));
    wait_for("the marker batch", Duration::from_secs(5), || {
        h.seen().len() == 1
    })
    .await;
    tokio::time::sleep(RESCAN * 2).await;

    assert_eq!(h.names(), ["marker"]);
    for (name, mtime) in ignored.iter().zip(&stamps) {
        let path = h.inbox(name);
        assert_eq!(
            fs::read_to_string(&path).unwrap_or_default(),
            manifest("ignored", 1),
            "{name} was touched"
        );
        assert_eq!(
            &fs::metadata(&path)
                .expect("meta")
                .modified()
                .expect("mtime"),
            mtime
        );
    }
    assert!(h.inbox("folder.csv").is_dir());
    if fifo {
        assert!(h.inbox("pipe.csv").exists());
    } else {
        eprintln!("mkfifo unavailable: the FIFO case was not checked");
    }
    let rejected: Vec<_> = fs::read_dir(h.folders.rejected_dir())
        .expect("rejected")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(rejected, ["y.csv"], "nothing new in rejected/");
    h.stop().await;
}

/// As root, permissions do not stop a read; a link into a symlink loop does
/// (ELOOP), whoever runs the test. It is made readable by a change outside
/// the inbox, which sends no event: only the retry can find it.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_is_refused_never_followed() {
    let (dir, folders) = new_dir();
    let elsewhere = dir.path().join("elsewhere");
    fs::create_dir_all(&elsewhere).expect("elsewhere");
    fs::create_dir_all(&folders.inbox).expect("inbox");
    // A valid manifest outside the inbox, reached through a link in it.
    let content = manifest("u", 4);
    drop_file(&elsewhere, "real.csv", &content);
    std::os::unix::fs::symlink(elsewhere.join("real.csv"), folders.inbox.join("u.csv"))
        .expect("link");
    // A dangling link and a FIFO too: neither followed nor blocking.
    std::os::unix::fs::symlink(elsewhere.join("nothing"), folders.inbox.join("d.csv"))
        .expect("dangling link");
    nix_mkfifo(&folders.inbox.join("f.csv"));

    let h = start(dir, folders);
    h.ready().await;
    let rejected = h.folders.rejected_dir();
    // The error file is written before the link is moved: wait for both.
    wait_for("the links rejected", Duration::from_secs(6), || {
        rejected.join("u.errors.txt").exists()
            && rejected.join("d.errors.txt").exists()
            && fs::symlink_metadata(rejected.join("u.csv")).is_ok()
    })
    .await;
    assert!(h.seen().is_empty(), "nothing accepted through a link");
    let errors = fs::read_to_string(rejected.join("u.errors.txt")).expect("errors");
    assert!(errors.contains("symbolic link"), "{errors}");
    assert!(
        fs::symlink_metadata(rejected.join("u.csv"))
            .expect("the link moved")
            .file_type()
            .is_symlink(),
        "the link itself is moved, not its target"
    );
    assert_eq!(
        fs::read_to_string(elsewhere.join("real.csv")).expect("target"),
        content,
        "the target is untouched"
    );
    // The FIFO is left alone and the watcher still works.
    assert!(h.inbox("f.csv").exists());
    drop_file(&h.folders.inbox, "ok.csv", &manifest("ok", 2));
    wait_for("the next manifest", Duration::from_secs(6), || {
        h.seen().len() == 1
    })
    .await;
    h.stop().await;
}

/// Makes a FIFO (no reader: opening it for reading would block).
fn nix_mkfifo(path: &std::path::Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success(), "mkfifo");
}

/// The permission case proper; it can only be run by a user other than root.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_without_read_permission_is_retried() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, folders) = new_dir();
    fs::create_dir_all(&folders.inbox).expect("inbox");
    let path = folders.inbox.join("p.csv");
    fs::write(&path, manifest("p", 2)).expect("write");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o000)).expect("chmod");
    if fs::File::open(&path).is_ok() {
        eprintln!(
            "skipped: this user (root?) reads files without read permission; see an_unreadable_file_is_retried_until_it_can_be_read"
        );
        return;
    }
    let h = start(dir, folders);
    h.ready().await;
    tokio::time::sleep(RESCAN * 2).await;
    assert!(h.seen().is_empty());
    assert!(path.exists());
    assert!(!h.folders.rejected_dir().join("p.csv").exists());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod back");
    wait_for("the retried batch", Duration::from_secs(5), || {
        h.seen().len() == 1
    })
    .await;
    assert_eq!(h.names(), ["p"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_stem_twice_makes_two_batches() {
    let (dir, folders) = new_dir();
    let h = start(dir, folders);
    h.ready().await;
    drop_file(&h.folders.inbox, "a.csv", &manifest("first", 2));
    wait_for("the first batch", Duration::from_secs(5), || {
        h.seen().len() == 1
    })
    .await;
    drop_file(&h.folders.inbox, "a.csv", &manifest("second", 3));
    wait_for("the second batch", Duration::from_secs(5), || {
        h.seen().len() == 2
    })
    .await;
    assert_eq!(h.names(), ["a", "a-2"]);
    assert_eq!(h.seen()[1].total_rows, 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_manifests_at_once_each_become_one_batch() {
    let (dir, folders) = new_dir();
    let h = start(dir, folders);
    h.ready().await;
    for i in 0..200 {
        fs::write(
            h.inbox(&format!("m{i:03}.csv")),
            manifest(&format!("m{i}"), 1),
        )
        .expect("write");
    }
    wait_for("200 batches", Duration::from_secs(90), || {
        h.seen().len() >= 200
    })
    .await;
    tokio::time::sleep(RESCAN * 2).await;

    let mut names = h.names();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 200, "one batch per file");
    assert_eq!(h.store.batches().expect("batches").len(), 200);
    let folders_out = fs::read_dir(&h.folders.outbox).expect("outbox").count();
    assert_eq!(folders_out, 200);
    let left: Vec<_> = fs::read_dir(&h.folders.inbox)
        .expect("inbox")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left in the inbox: {left:?}");
    assert_eq!(h.stop().await.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_and_duplicate_manifests_are_rejected() {
    let (dir, folders) = new_dir();
    let h = start(dir, folders);
    h.ready().await;
    let rejected = h.folders.rejected_dir();

    drop_file(
        &h.folders.inbox,
        "bad.csv",
        "image_url\nhttps://example.com/a.png\n",
    );
    wait_for("bad.csv rejected", Duration::from_secs(5), || {
        rejected.join("bad.csv").is_file() && rejected.join("bad.errors.txt").is_file()
    })
    .await;
    let errors = fs::read_to_string(rejected.join("bad.errors.txt")).expect("errors");
    assert!(errors.contains("audio_url"), "{errors}");

    let good = manifest("good", 2);
    drop_file(&h.folders.inbox, "good.csv", &good);
    wait_for("the good batch", Duration::from_secs(5), || {
        h.seen().len() == 1
    })
    .await;
    drop_file(&h.folders.inbox, "good.csv", &good);
    wait_for("the duplicate rejected", Duration::from_secs(5), || {
        rejected.join("good.csv").is_file() && rejected.join("good.errors.txt").is_file()
    })
    .await;
    let errors = fs::read_to_string(rejected.join("good.errors.txt")).expect("errors");
    assert!(
        errors.contains("\"good\""),
        "names the earlier batch: {errors}"
    );
    assert_eq!(h.names(), ["good"]);
    assert_eq!(h.store.batches().expect("batches").len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_taken_when_the_daemon_died_is_ingested_at_the_next_start() {
    let (dir, folders) = new_dir();
    // Left in the private folder by a daemon killed mid-ingest.
    let taking = folders.inbox.join(".taking");
    fs::create_dir_all(&taking).expect("private folder");
    drop_file(&taking, "left.csv", &manifest("left", 3));
    let h = start(dir, folders);
    h.ready().await;
    wait_for("the leftover batch", Duration::from_secs(6), || {
        h.seen().len() == 1
    })
    .await;
    assert_eq!(h.names(), ["left"]);
    assert!(!taking.join("left.csv").exists());
    h.stop().await;
}

/// A FIFO (or a link) swapped in at the name ingest takes is refused from
/// the open handle, at once, never read or followed.
#[test]
fn ingest_refuses_a_fifo_from_its_handle_without_blocking() {
    let (dir, folders) = new_dir();
    fs::create_dir_all(&folders.inbox).expect("inbox");
    let store = Store::open(&dir.path().join("state")).expect("store");
    let fifo = folders.inbox.join("f.csv");
    nix_mkfifo(&fifo);
    let (tx, rx) = std::sync::mpsc::channel();
    let (s, f, p) = (store.clone(), folders.clone(), fifo.clone());
    std::thread::spawn(move || {
        let _ = tx.send(infinitetalk_batch::ingest::ingest_file(&s, &f, &p, false));
    });
    let outcome = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("ingest of a FIFO does not block")
        .expect("no I/O error");
    assert!(
        matches!(
            outcome,
            infinitetalk_batch::ingest::Outcome::Rejected { .. }
        ),
        "{outcome:?}"
    );
    let errors =
        fs::read_to_string(folders.rejected_dir().join("f.errors.txt")).expect("errors file");
    assert!(errors.contains("not a regular file"), "{errors}");
    assert!(!fifo.exists());
}
