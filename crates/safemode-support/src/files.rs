//! Files written whole: every file safemode writes for itself (a
//! last-known-good policy, a signing key and its public half, a drill
//! report) is written the one way here, so a reader or a crash sees the old
//! file or the new one, never half of either.
//!
//! The bytes go to a fresh temporary file in the same directory (made by
//! `tempfile`: created exclusively, never through a symlink), which is
//! synced, renamed over the path, and made durable by syncing the
//! directory.

use std::io::{self, Write as _};
use std::path::Path;

/// Who may read the file written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readers {
    /// Only its owner (0600): keys, and policies a service keeps.
    Owner,
    /// Whoever may read a new file here (0666 less the umask): what is
    /// written for people and other programs to read.
    Anyone,
}

/// What to do when the path already holds a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Replace it.
    Replace,
    /// Keep it, and fail with [`io::ErrorKind::AlreadyExists`]: a key is
    /// never overwritten by another one made at the same moment.
    Keep,
}

/// The directory `path` is in (`.` for a bare file name).
pub fn directory(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Writes `bytes` to `path` atomically and durably, readable by `readers`;
/// a file already there is replaced or kept as `existing` says.
pub fn write_atomically(
    path: &Path,
    bytes: &[u8],
    readers: Readers,
    existing: Existing,
) -> io::Result<()> {
    let dir = directory(path);
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    if readers == Readers::Anyone {
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    }
    let mut file = builder.tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    match existing {
        Existing::Replace => file.persist(path).map_err(|e| e.error)?,
        Existing::Keep => file.persist_noclobber(path).map_err(|e| e.error)?,
    };
    // The rename itself is durable once the directory is.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_a_kept_one_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomically(&path, b"one", Readers::Owner, Existing::Replace).unwrap();
        write_atomically(&path, b"two", Readers::Owner, Existing::Replace).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let kept = write_atomically(&path, b"three", Readers::Owner, Existing::Keep).unwrap_err();
        assert_eq!(kept.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // No temporary file is left behind either way.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn readers_decide_the_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("key");
        write_atomically(&private, b"k", Readers::Owner, Existing::Keep).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        // Anyone: what any new file gets here, whatever the umask.
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"p").unwrap();
        let shared = dir.path().join("report");
        write_atomically(&shared, b"r", Readers::Anyone, Existing::Replace).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&shared), mode(&plain));
    }
}
