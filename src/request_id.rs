//! The request id headers and the rule for a client's id: names and one check shared by the
//! [`trace`](crate::trace) layers and the [`usage`](crate::usage) tap.

use http::header::{HeaderName, HeaderValue};

/// The request id header: taken from the client or made by the gateway, sent upstream and
/// returned to the client.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Where the tap moves the upstream's own request id when it differs from the gateway's.
pub const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");

/// Whether a client's request id may be kept: 1 to 128 characters from
/// `A–Z a–z 0–9 - _ . : / + =`. Anything else could smuggle text into logs.
pub fn is_valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    (1..=128).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(b))
}
