//! SPIFFE IDs of Connect services. The type and its parser live in `mesh-model`, shared with
//! the sidecar that checks the certificates this control plane signs, so the two cannot
//! disagree on what a valid ID is.

pub use mesh_model::spiffe::{SpiffeError, SpiffeId};
