//! The OCI vocabulary: repository names, tags, digests and the few manifest fields breakwater needs.
//!
//! Nothing here does I/O; everything here is the grammar of the distribution spec, so that every other module
//! can take a parsed `Digest` or `RepoName` as proof that the input was valid.

mod digest;
mod manifest;
mod name;

pub use digest::{Algorithm, Digest, Hasher};
pub use manifest::{
    Descriptor, ManifestInfo, ManifestKind, DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST,
};
pub use name::{Reference, RepoName, Tag};

/// Why a piece of input is not valid OCI grammar. The HTTP layer maps each to the spec's error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrammarError {
    #[error("invalid repository name {0:?}")]
    Name(String),
    #[error("invalid tag {0:?}")]
    Tag(String),
    #[error("invalid digest {0:?}")]
    Digest(String),
}
