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

/// The runtime that upstream downloads run on: one thread of its own, apart from the runtime that serves clients.
///
/// A flight's download must keep its pace while hundreds of clients stream what it brings. On the serving
/// runtime each chunk from upstream waited for a turn in a run queue full of busy client connections (the
/// connection task that reads the socket, then the download task that takes the chunk): a 100 MB/s download
/// ran at 0.5x its pace under a 200-client herd on a loaded machine. Here the download (and the upstream
/// connection it opens: see `Upstream::blob`) competes only with other downloads, and the kernel schedules
/// its thread against the serving threads fairly.
///
/// Built on first use and never dropped (a runtime may not be dropped inside another's context, and this one
/// lives as long as the process). Its tasks are still tracked and cancelled by their owners' `shutdown::Tasks`.
pub fn downloads() -> tokio::runtime::Handle {
    static DOWNLOADS: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    DOWNLOADS
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(DOWNLOADS_THREAD)
                .enable_all()
                .build()
                .expect("building the download runtime (a thread and a reactor)")
        })
        .handle()
        .clone()
}

/// The name of the download runtime's threads (its worker and its blocking pool), for tests and for `top -H`.
pub const DOWNLOADS_THREAD: &str = "bw-downloads";

/// The message a panic was raised with, for the error its waiters get.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".to_string(),
    }
}
