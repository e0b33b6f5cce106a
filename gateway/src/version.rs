//! Build identity, recorded by build.rs.
pub const GIT_REVISION: &str = env!("GATEWAY_GIT_REVISION");
pub const RUSTC_VERSION: &str = env!("GATEWAY_RUSTC_VERSION");
