//! Coalescing: at most one fetch in flight per key, shared by every request that wants its result.
//!
//! - `Group` is a single-flight for small results (manifests, tag revalidations): the first caller starts the
//!   work as a task of its own, later callers await the same result.
//! - `BlobFlights` is the heart of the pull-through cache: one upstream download per blob digest, written to a
//!   spool file that every waiting client streams from while it grows.
//!
//! Architecture invariant: a flight is never owned by the request that started it. It runs as its own task, so
//! a client that disconnects cancels nothing that others wait on. A task that panics fails its waiters with an
//! error and frees its key: the next caller starts afresh.

mod blob;
mod group;

pub use blob::{BlobFlight, BlobFlights, FetchBody, FetchError, Fetcher, FlightError, Join};
pub use group::{Group, GroupError};

/// The message a panic was raised with, for the error its waiters get.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".to_string(),
    }
}
