//! What the benchmarks share: the release binary, a daemon started against
//! a simulator, and reading a process's CPU time and peak memory.

#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub(crate) type BoxError = Box<dyn std::error::Error>;

/// The folders of one daemon.
pub(crate) struct Dirs {
    pub(crate) root: tempfile::TempDir,
    pub(crate) inbox: PathBuf,
    pub(crate) outbox: PathBuf,
    pub(crate) state: PathBuf,
}

impl Dirs {
    pub(crate) fn new() -> Result<Dirs, BoxError> {
        let root = tempfile::tempdir()?;
        let inbox = root.path().join("inbox");
        let outbox = root.path().join("outbox");
        let state = root.path().join("state");
        fs::create_dir_all(&inbox)?;
        Ok(Dirs {
            root,
            inbox,
            outbox,
            state,
        })
    }

    /// Drops a manifest into the inbox the way users should: written aside,
    /// then renamed in.
    pub(crate) fn drop_manifest(&self, name: &str, text: &str) -> Result<(), BoxError> {
        let tmp = self.inbox.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.inbox.join(name))?;
        Ok(())
    }

    pub(crate) fn log(&self, n: usize) -> PathBuf {
        self.root.path().join(format!("daemon-{n}.log"))
    }
}

/// `infinitetalk-batch run` against `api_base`, logging to `dirs.log(n)`.
pub(crate) fn spawn_daemon(
    bin: &Path,
    dirs: &Dirs,
    api_base: &str,
    listen: SocketAddr,
    extra: &[String],
    n: usize,
) -> Result<Child, BoxError> {
    Ok(Command::new(bin)
        .arg("run")
        .arg("--inbox")
        .arg(&dirs.inbox)
        .arg("--outbox")
        .arg(&dirs.outbox)
        .arg("--state")
        .arg(&dirs.state)
        .arg("--api-base")
        .arg(api_base)
        .arg("--listen")
        .arg(listen.to_string())
        .args(extra)
        .env("APIXO_API_KEY", "bench-key")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(fs::File::create(dirs.log(n))?))
        .spawn()?)
}

/// `run` flags for `slots` and `rate`, with the default poll bounds (2 s,
/// 30 min) scaled by the simulator's `time_factor`, as its durations are.
pub(crate) fn daemon_args(slots: u32, rate: u32, time_factor: f64) -> Vec<String> {
    let ms = |d: f64| format!("{:.0}ms", d * 1000.0 * time_factor);
    vec![
        "--max-concurrent".into(),
        slots.to_string(),
        "--max-requests-per-minute".into(),
        rate.to_string(),
        "--poll-min".into(),
        ms(2.0),
        "--poll-max".into(),
        ms(1800.0),
    ]
}

/// The built-in simulator on loopback with the daemon's limits, seeded.
pub(crate) async fn start_sim(
    slots: u32,
    rate: u32,
    time_factor: f64,
    stop: tokio_util::sync::CancellationToken,
) -> Result<infinitetalk_batch::simulator::SimHandle, BoxError> {
    use infinitetalk_batch::simulator::{self, SimArgs};
    let args = SimArgs {
        time_factor,
        seed: Some(4),
        max_requests_per_minute: rate,
        max_concurrent: slots,
        ..SimArgs::default()
    };
    Ok(simulator::start(SocketAddr::from(([127, 0, 0, 1], 0)), args, stop).await?)
}

/// Stops a daemon gracefully and waits for it.
pub(crate) fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

pub(crate) fn binary() -> Result<PathBuf, BoxError> {
    let exe = std::env::current_exe()?;
    // target/release/examples/drain_bench -> target/release/infinitetalk-batch
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target folder")?;
    let bin = dir.join("infinitetalk-batch");
    if !bin.exists() {
        return Err(format!(
            "{} missing: run `cargo build --release` first",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

/// User + system CPU seconds of a live process.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(crate) fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024.0 / 1e6)
}
