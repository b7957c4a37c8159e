//! Creating the files mtracer writes (traces, the `run` log, exports): private to the user, and
//! never through a link someone else planted.
//!
//! A trace holds the program's arguments, its environment, its addresses and (for `run`) its
//! output, so every file is created `0600`, and an existing one we write over is made `0600`
//! too. The last component of the path is opened with `O_NOFOLLOW`: a symbolic link there is
//! refused with a clear error, never followed (with `fs.protected_symlinks` off, one planted in
//! `/tmp` would otherwise make root overwrite any file). A name mtracer chose itself (the default
//! `mtrace.<pid>.mtr`) is created with `O_EXCL`: it must not exist yet. An existing regular file
//! that belongs to another user is refused rather than overwritten. Devices and pipes
//! (`-o /dev/null`) are written as they are.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// How a file is to be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// A name the user gave: created, or an existing file of ours emptied.
    Replace,
    /// A name we made up: it must not exist.
    New,
}

/// Open `path` for writing as described in the module docs. Errors say what was refused.
pub fn create_private(path: &Path, how: Create) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    match how {
        Create::New => o.create_new(true),
        Create::Replace => o.create(true),
    };
    let f = o.open(path).map_err(|e| explain(path, e))?;
    let meta = f.metadata()?;
    if !meta.file_type().is_file() {
        return Ok(f);
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, format!("{} belongs to uid {}, not to this user (uid {me}): refusing to write over it", path.display(), meta.uid())));
    }
    if meta.permissions().mode() & 0o777 != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    if how == Create::Replace {
        f.set_len(0)?;
    }
    Ok(f)
}

/// Write `bytes` to a file made by [`create_private`].
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    create_private(path, Create::Replace)?.write_all(bytes)
}

fn explain(path: &Path, e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::new(io::ErrorKind::InvalidInput, format!("{} is a symbolic link: refusing to write through it (name the file itself)", path.display())),
        Some(libc::EEXIST) => io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists already: refusing to write over it (name the output with -o)", path.display())),
        _ => io::Error::new(e.kind(), format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_files_are_private_and_old_ones_made_so() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.mtr");
        create_private(&p, Create::New).unwrap();
        assert_eq!(mode(&p), 0o600);
        std::fs::write(&p, b"old contents").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"new").unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let e = create_private(&p, Create::New).unwrap_err();
        assert!(e.to_string().contains("exists already"), "{e}");
    }

    #[test]
    fn a_symbolic_link_is_refused_and_its_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("victim");
        std::fs::write(&target, b"precious").unwrap();
        let link = d.path().join("t.mtr");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for how in [Create::Replace, Create::New] {
            let e = create_private(&link, how).unwrap_err();
            assert!(e.to_string().contains("symbolic link") || e.to_string().contains("exists already"), "{how:?}: {e}");
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
        // A dangling link too: nothing is created at its target.
        std::fs::remove_file(&target).unwrap();
        assert!(create_private(&link, Create::Replace).unwrap_err().to_string().contains("symbolic link"));
        assert!(!target.exists());
    }
}
