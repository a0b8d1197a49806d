//! Registry errors as HTTP responses: the spec's status codes and its JSON error body.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::registry::RegistryError;

/// The HTTP status the spec gives each error.
fn status(e: &RegistryError) -> StatusCode {
    use crate::storage::StorageError as S;
    match e {
        RegistryError::BlobUnknown
        | RegistryError::BlobUploadUnknown
        | RegistryError::ManifestUnknown
        | RegistryError::ManifestNotAcceptable(_)
        | RegistryError::NameUnknown
        | RegistryError::Storage(S::NotFound) => StatusCode::NOT_FOUND,
        RegistryError::UploadOutOfOrder { .. }
        | RegistryError::UploadBusy
        | RegistryError::RangeInvalid(_)
        | RegistryError::Storage(S::Busy) => StatusCode::RANGE_NOT_SATISFIABLE,
        RegistryError::ManifestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        RegistryError::TooManyTags(_) => StatusCode::URI_TOO_LONG,
        RegistryError::Unsupported(_) => StatusCode::METHOD_NOT_ALLOWED,
        RegistryError::Denied(_) => StatusCode::FORBIDDEN,
        RegistryError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
        RegistryError::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        RegistryError::Collecting(_) => StatusCode::SERVICE_UNAVAILABLE,
        RegistryError::BlobUploadInvalid(_)
        | RegistryError::DigestInvalid(_)
        | RegistryError::ManifestBlobUnknown(_)
        | RegistryError::ManifestInvalid(_)
        | RegistryError::NameInvalid(_)
        | RegistryError::PaginationInvalid(_)
        | RegistryError::Storage(S::DigestMismatch { .. } | S::Body(_)) => StatusCode::BAD_REQUEST,
        RegistryError::Storage(S::Io(_)) | RegistryError::Meta(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The error body: `{"errors":[{"code": ..., "message": ..., "detail": ...}]}`.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] }).to_string()
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let status = status(&self);
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], error_body(self.code(), &self.to_string()))
            .into_response();
        if let RegistryError::UploadOutOfOrder { offset } = self {
            // Tells the client where to resume, as the upload status endpoint would.
            if let Ok(v) = super::upload_range(offset).parse() {
                resp.headers_mut().insert(header::RANGE, v);
            }
        }
        resp
    }
}
