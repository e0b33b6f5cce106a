//! The crate's one error type. Each variant says who is at fault; the HTTP layer maps that to a
//! status code, so a client mistake is always a 4xx that names the field and never a 500.

use std::fmt;

/// Everything that can go wrong inside controlplane-lite.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client sent a malformed or invalid value (HTTP 400). The message names the field.
    #[error("{0}")]
    BadRequest(String),
    /// The token is missing the permission the endpoint needs (HTTP 403).
    #[error("Permission denied: {0}")]
    PermissionDenied(String),
    /// The token secret the client sent is not known (HTTP 403, Consul's wording).
    #[error("ACL not found")]
    AclNotFound,
    /// The client asked for something that does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The write conflicts with existing state, e.g. a duplicate intention (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The feature exists but is not available in this datacenter yet, e.g. the CA in a
    /// secondary before replication (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// The embedded store failed: disk full, corrupted file, I/O error (HTTP 500, our fault).
    #[error("store: {0}")]
    Store(String),
    /// A limit of the agent is reached, e.g. too many blocking queries (HTTP 429; retry later).
    #[error("{0}")]
    TooManyRequests(String),
    /// The agent could not start: a bad flag, a port in use, an unreadable config dir (the
    /// operator's to fix).
    #[error("{0}")]
    Startup(String),
    /// A write made because this agent leads (a duty's result) was refused: another agent
    /// leads now (HTTP 503; the duty stops, and the new leader's runs).
    #[error("{0}")]
    NotLeader(String),
    /// A bug or an impossible state inside controlplane-lite (HTTP 500, our fault).
    #[error("internal: {0}")]
    Internal(String),
}

/// The crate-wide result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A 400 error from anything printable.
    pub fn bad_request(message: impl fmt::Display) -> Error {
        Error::BadRequest(message.to_string())
    }

    /// The HTTP status this error is reported with.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) => 400,
            Error::PermissionDenied(_) | Error::AclNotFound => 403,
            Error::NotFound(_) => 404,
            Error::Conflict(_) => 409,
            Error::Unavailable(_) | Error::NotLeader(_) => 503,
            Error::TooManyRequests(_) => 429,
            Error::Store(_) | Error::Internal(_) | Error::Startup(_) => 500,
        }
    }
}

impl From<redb::Error> for Error {
    fn from(error: redb::Error) -> Error {
        Error::Store(error.to_string())
    }
}

macro_rules! store_error_from {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Error {
            fn from(error: $ty) -> Error {
                Error::Store(error.to_string())
            }
        }
    )*};
}

store_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);
