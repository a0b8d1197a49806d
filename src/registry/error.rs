//! Registry errors, each with the stable error code of the OCI distribution spec.

use crate::meta::MetaError;
use crate::oci::{Digest, GrammarError};
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to registry")]
    BlobUnknown,
    #[error("blob upload unknown to registry")]
    BlobUploadUnknown,
    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),
    #[error("chunk does not continue the upload at offset {offset}, or its length does not match its Content-Range")]
    UploadOutOfOrder { offset: u64 },
    /// Another request is working on the upload session (one request at a time per session).
    #[error("another request on this upload session is in progress; retry when it is over")]
    UploadBusy,
    #[error("{0}")]
    DigestInvalid(String),
    #[error("manifest references {0}, which is unknown to this repository")]
    ManifestBlobUnknown(Digest),
    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest exceeds the 4 MiB limit")]
    ManifestTooLarge,
    #[error("manifest unknown")]
    ManifestUnknown,
    /// The tag names a manifest of a media type the client did not accept: to that client it is unknown (as
    /// distribution answers), with the reason in the message.
    #[error("the manifest is {0}, which the request's Accept does not include")]
    ManifestNotAcceptable(String),
    #[error("{0}")]
    NameInvalid(String),
    #[error("repository name not known to registry")]
    NameUnknown,
    #[error("{0}")]
    RangeInvalid(String),
    #[error("{0}")]
    PaginationInvalid(String),
    #[error("the operation is unsupported: {0}")]
    Unsupported(String),
    /// A manifest push asked for more tags (`?tag=`) than one request may add.
    #[error("at most {0} tags may be pushed with one manifest")]
    TooManyTags(usize),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    UpstreamUnavailable(String),
    #[error("the upstream registry is rate-limiting requests; try again later")]
    TooManyRequests,
    /// A collector is removing the bytes of a digest the request needs, and did not finish in time.
    #[error("{0} is being garbage-collected; retry")]
    Collecting(Digest),
    #[error(transparent)]
    Storage(StorageError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl RegistryError {
    /// The spec's error code. Internal failures have none in the spec; `UNKNOWN` is what distribution sends.
    pub fn code(&self) -> &'static str {
        match self {
            RegistryError::BlobUnknown => "BLOB_UNKNOWN",
            RegistryError::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            RegistryError::BlobUploadInvalid(_) => "BLOB_UPLOAD_INVALID",
            RegistryError::UploadOutOfOrder { .. } | RegistryError::UploadBusy => "BLOB_UPLOAD_INVALID",
            RegistryError::DigestInvalid(_) => "DIGEST_INVALID",
            RegistryError::ManifestBlobUnknown(_) => "MANIFEST_BLOB_UNKNOWN",
            RegistryError::ManifestInvalid(_) => "MANIFEST_INVALID",
            RegistryError::ManifestTooLarge => "SIZE_INVALID",
            RegistryError::ManifestUnknown | RegistryError::ManifestNotAcceptable(_) => "MANIFEST_UNKNOWN",
            RegistryError::NameInvalid(_) => "NAME_INVALID",
            RegistryError::NameUnknown => "NAME_UNKNOWN",
            RegistryError::RangeInvalid(_) => "RANGE_INVALID",
            RegistryError::PaginationInvalid(_) => "PAGINATION_NUMBER_INVALID",
            // The spec has no code for it; the spec lets a registry answer 414 to too many tags.
            RegistryError::Unsupported(_) | RegistryError::TooManyTags(_) => "UNSUPPORTED",
            RegistryError::Denied(_) => "DENIED",
            // Not a spec code: the spec has none for a gateway failure; clients only show the message.
            RegistryError::UpstreamUnavailable(_) => "UNAVAILABLE",
            RegistryError::TooManyRequests => "TOOMANYREQUESTS",
            RegistryError::Collecting(_) => "UNAVAILABLE",
            RegistryError::Storage(StorageError::DigestMismatch { .. }) => "DIGEST_INVALID",
            RegistryError::Storage(StorageError::Body(_) | StorageError::Busy) => "BLOB_UPLOAD_INVALID",
            RegistryError::Storage(StorageError::NotFound) => "BLOB_UNKNOWN",
            RegistryError::Storage(StorageError::Io(_)) | RegistryError::Meta(_) => "UNKNOWN",
        }
    }
}

impl From<StorageError> for RegistryError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Busy => RegistryError::UploadBusy,
            e => RegistryError::Storage(e),
        }
    }
}

impl From<GrammarError> for RegistryError {
    fn from(e: GrammarError) -> Self {
        match e {
            GrammarError::Name(_) => RegistryError::NameInvalid(e.to_string()),
            GrammarError::Digest(_) => RegistryError::DigestInvalid(e.to_string()),
            GrammarError::Tag(_) => RegistryError::ManifestInvalid(e.to_string()),
        }
    }
}
