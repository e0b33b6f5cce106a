//! The data directory's permissions. `state.redb` holds the CA's private keys and every token
//! secret, so the directory is created `0700`, the file `0600`, and the agent refuses to start
//! on a directory or file that other users can reach (like OpenSSH with a private key).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The store's file name inside the data directory.
pub const STATE_FILE: &str = "state.redb";

/// Permission bits that let the group or others in.
const FOREIGN_BITS: u32 = 0o077;

/// Creates the data directory (`0700`) if missing, checks it and an existing store file allow
/// their owner only, and returns the store file's path (see [`create_private_file`]).
pub fn prepare(dir: &Path) -> Result<PathBuf> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                Error::Startup(format!("cannot create data dir {}: {e}", dir.display()))
            })?;
        // `mode` is filtered by the umask; set it exactly.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
            Error::Startup(format!("cannot set the mode of {}: {e}", dir.display()))
        })?;
    }
    check_private(dir, "data dir", "chmod 700")?;
    let state = dir.join(STATE_FILE);
    // The store creates a missing state file itself (0600, initialised under a temporary
    // name and renamed into place), so a crash mid-initialisation never leaves an empty
    // `state.redb` behind; an existing one must already be private.
    if !state.exists() {
        return Ok(state);
    }
    check_private(&state, "state file", "chmod 600")?;
    Ok(state)
}

/// Creates a new file readable and writable by its owner only (`0600`, whatever the umask).
pub fn create_private_file(path: &Path) -> Result<fs::File> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Startup(format!("cannot create {}: {e}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::Startup(format!("cannot set the mode of {}: {e}", path.display())))?;
    Ok(file)
}

/// Refuses a path whose mode lets the group or others in.
fn check_private(path: &Path, what: &str, fix: &str) -> Result<()> {
    let mode = fs::metadata(path)
        .map_err(|e| Error::Startup(format!("cannot stat {what} {}: {e}", path.display())))?
        .permissions()
        .mode();
    if mode & FOREIGN_BITS != 0 {
        return Err(Error::Startup(format!(
            "refusing to start: {what} {} has mode {:o}, which lets other users read the CA private key and token secrets; run `{fix} {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cplite-datadir-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    }

    #[test]
    fn creates_private_dir_and_file() {
        let dir = scratch("create");
        let state = prepare(&dir.join("nested")).expect("prepare");
        assert_eq!(mode(&dir.join("nested")), 0o700);
        assert!(
            !state.exists(),
            "the store creates the state file, not prepare"
        );
        create_private_file(&state).expect("create");
        assert_eq!(mode(&state), 0o600);
        // A second start on the same directory is fine.
        assert!(prepare(&dir.join("nested")).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_foreign_readable_dir_or_file() {
        let dir = scratch("refuse");
        let state = prepare(&dir).expect("prepare");
        create_private_file(&state).expect("create");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).expect("chmod");
        let error = prepare(&dir).expect_err("group-readable dir").to_string();
        assert!(error.contains("chmod 700"), "{error}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o604)).expect("chmod");
        let error = prepare(&dir).expect_err("world-readable file").to_string();
        assert!(error.contains("chmod 600"), "{error}");
        let _ = fs::remove_dir_all(&dir);
    }
}
