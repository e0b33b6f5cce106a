//! How bytes move once a connection relays: copied through user-space buffers, spliced
//! through a pipe, or copied until a flow turns bulk. This is the one home of that decision
//! and of its setting, for both engines: the readiness engine (`relay.rs`) and the completion
//! engine's connection machine (`machine.rs`) ask [`Mode::splices`] after every read.

/// Bytes one splice moves at most, and the capacity asked of each pipe. 256 KiB pipes halve
/// the syscalls of the default 64 KiB on bulk flows; their pages exist only while full.
pub const SPLICE_CHUNK: usize = 256 * 1024;

/// In [`Mode::Auto`], a read of at least this many bytes marks a bulk flow. It is the
/// readiness engine's whole scratch buffer, and one full segment on loopback or with GRO. The
/// completion engine's buffers are larger (128 KiB): a receive fills one only when two
/// segments queued before it ran, which a worker that keeps up rarely sees, so a 32 MiB stream
/// sometimes never spliced there (a test caught it: 2 runs in 3 at load 3). It uses this
/// threshold, not its buffer size.
pub const BULK_READ: usize = 64 * 1024;

/// How bytes are moved once the ClientHello was forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Copy through user-space buffers (recv/send, or the completion engine's provided
    /// buffers).
    Copy,
    /// splice(2) through a pipe (pages are moved, not copied).
    Splice,
    /// Copy, and switch a direction to splice once one read fills the reader's buffer: small
    /// request/response traffic stays on the cheaper copy path, bulk flows move to splice
    /// (HAProxy's `option splice-auto` works the same way).
    Auto,
}

impl Mode {
    /// The process-wide mode, read once from `GATEWAY_RELAY_MODE` (copy, splice, auto);
    /// the default is [`Mode::Auto`].
    pub fn current() -> Mode {
        static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
        *MODE
            .get_or_init(|| Mode::from_setting(std::env::var("GATEWAY_RELAY_MODE").ok().as_deref()))
    }

    /// The mode a `GATEWAY_RELAY_MODE` value names (anything unknown: [`Mode::Auto`]).
    pub fn from_setting(setting: Option<&str>) -> Mode {
        match setting {
            Some("copy") => Mode::Copy,
            Some("splice") => Mode::Splice,
            _ => Mode::Auto,
        }
    }

    /// Whether a direction should splice from now on, given whether its last read filled the
    /// reader's whole buffer (`false` before any read).
    pub fn splices(self, filled: bool) -> bool {
        match self {
            Mode::Copy => false,
            Mode::Splice => true,
            Mode::Auto => filled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_splices_only_after_a_full_read() {
        assert!(!Mode::Auto.splices(false));
        assert!(Mode::Auto.splices(true));
        assert!(Mode::Splice.splices(false));
        assert!(!Mode::Copy.splices(true));
        assert_eq!(Mode::from_setting(None), Mode::Auto);
        assert_eq!(Mode::from_setting(Some("copy")), Mode::Copy);
        assert_eq!(Mode::from_setting(Some("splice")), Mode::Splice);
        assert_eq!(Mode::from_setting(Some("bogus")), Mode::Auto);
    }
}
