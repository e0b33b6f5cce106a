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

/// Creates the data directory (`0700`) and the store file (`0600`) if missing, checks both
/// allow their owner only, and returns the store file's path.
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
    if !state.exists() {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&state)
            .map_err(|e| Error::Startup(format!("cannot create {}: {e}", state.display())))?;
        fs::set_permissions(&state, fs::Permissions::from_mode(0o600)).map_err(|e| {
            Error::Startup(format!("cannot set the mode of {}: {e}", state.display()))
        })?;
    }
    check_private(&state, "state file", "chmod 600")?;
    Ok(state)
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
        assert_eq!(mode(&state), 0o600);
        // A second start on the same directory is fine.
        assert!(prepare(&dir.join("nested")).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_foreign_readable_dir_or_file() {
        let dir = scratch("refuse");
        let state = prepare(&dir).expect("prepare");
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
