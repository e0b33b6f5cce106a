//! Service-name validation, shared by the catalog, config entries and intentions. A leaf
//! module, so `catalog` and `config_entries` (which use each other's types) do not need each
//! other for it.

use crate::error::{Error, Result};

/// Checks a service name: 1–128 characters of `[A-Za-z0-9_-]`. Names become DNS labels in SNI
/// (`<svc>.default.<dc>.internal.<td>`) and path segments, so dots and slashes are refused.
pub fn validate_name(name: &str, field: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "invalid field `{field}` {name:?}: must be 1-128 characters of letters, digits, '-' or '_'"
        )))
    }
}
