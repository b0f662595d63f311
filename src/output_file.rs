//! Output files written so that a failure never leaves a half-written file or destroys a good
//! one: the content goes to a temporary file in the same folder, is flushed and synced, and is
//! then renamed over the target in one step. A full disk or a crash leaves the old file as it was.

use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Write `path` through `fill`, atomically (see the module doc). The folder is created if missing.
pub fn write_with(path: &Path, fill: impl FnOnce(&mut BufWriter<&mut std::fs::File>) -> Result<()>) -> Result<()> {
    let io = |e: std::io::Error| Error::io(path, e);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::Builder::new().prefix(".flux2-").suffix(".partial").tempfile_in(dir).map_err(io)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        fill(&mut w)?;
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Write `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// Check, before any long work, that `path` can be written later: it is not a folder, and the
/// nearest existing folder on its way accepts a new file (tried with a temporary file).
pub fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::InvalidArgument(format!("{} is a folder; give a file name", path.display())));
    }
    let mut dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    while !dir.exists() {
        dir = match dir.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
    }
    if !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "cannot write {}: {} is not a folder",
            path.display(),
            dir.display()
        )));
    }
    tempfile::Builder::new()
        .prefix(".flux2-")
        .suffix(".probe")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| Error::InvalidArgument(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writability_is_checked_before_the_work() {
        let dir = tempfile::tempdir().unwrap();
        check_writable(&dir.path().join("new/sub/out.png")).unwrap();
        assert!(!dir.path().join("new").exists(), "the check must not create folders");
        assert!(check_writable(dir.path()).is_err(), "a folder is not a file name");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_writable(&file.join("out.png")).unwrap_err().to_string();
        assert!(err.contains("is not a folder"), "{err}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file")], "the probe file was left behind");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_bytes(&path, b"good").unwrap();
        let failed = write_with(&path, |w| {
            w.write_all(b"half").unwrap();
            Err(Error::Other("disk full".into()))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"good");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.json")], "a temporary file was left behind");
        write_bytes(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn the_folder_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/c.bin");
        write_bytes(&path, b"x").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }
}
