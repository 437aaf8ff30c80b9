//! Files users read appear whole or not at all: temp file, fsync, rename,
//! fsync of the folder.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The hidden temporary name used while `path` is being written.
pub(crate) fn temp_path(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{suffix}"))
}

/// Makes a rename or a new file in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Writes `path` atomically through `fill`, which gets a buffered writer.
/// The temporary file is created exclusively under an unpredictable hidden
/// name (`.NAME.XXXXXX.tmp`), so nothing planted at a known name is followed.
pub(crate) fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut io::BufWriter<&File>) -> io::Result<()>,
) -> io::Result<()> {
    let dir = parent(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    let mut w = io::BufWriter::new(tmp.as_file());
    fill(&mut w)?;
    w.flush()?;
    drop(w);
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Removes temporary files a killed [`write_atomic_with`] of `path` left.
pub(crate) fn remove_temps(path: &Path) -> io::Result<()> {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(());
    };
    let prefix = format!(".{name}.");
    remove_where(parent(path), |file, kind| {
        file.starts_with(&prefix) && file.ends_with(".tmp") && kind.is_file()
    })
}

/// Removes every hidden `.*.part` entry of `dir` (files or links, never
/// followed): once a batch has ended no download of it runs, so they are
/// leftovers of killed or abandoned downloads.
pub(crate) fn remove_parts(dir: &Path) -> io::Result<()> {
    remove_where(dir, |file, kind| {
        file.starts_with('.') && file.ends_with(".part") && (kind.is_file() || kind.is_symlink())
    })
}

/// Removes the entries of `dir` whose name and type `doomed` picks (a
/// missing folder has none).
fn remove_where(dir: &Path, doomed: impl Fn(&str, fs::FileType) -> bool) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if doomed(&entry.file_name().to_string_lossy(), entry.file_type()?) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Copies `from` to `to` durably under a temporary name first.
pub(crate) fn copy_atomic(from: &Path, to: &Path) -> io::Result<()> {
    let mut src = File::open(from)?;
    write_atomic_with(to, |w| io::copy(&mut src, w).map(|_| ()))
}

/// Moves `from` to `to` (both durable after), falling back to copy and
/// remove across filesystems. `to` appears whole or not at all.
pub(crate) fn move_file(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Ok(()) => {
            sync_dir(parent(to))?;
            sync_dir(parent(from))
        }
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: another filesystem.
            copy_atomic(from, to)?;
            fs::remove_file(from)?;
            sync_dir(parent(from))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("results.csv");
        write_atomic(&path, b"a,b\n").expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"a,b\n");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn leftover_temps_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("manifest.csv");
        fs::write(dir.path().join(".manifest.csv.Ab12Cd.tmp"), b"half").expect("temp");
        fs::write(dir.path().join("manifest.csv"), b"whole").expect("file");
        fs::write(dir.path().join(".other.csv.x.tmp"), b"other").expect("other");
        remove_temps(&path).expect("remove");
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".other.csv.x.tmp", "manifest.csv"]);
    }
}
