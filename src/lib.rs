//! breakwater: an OCI Distribution registry that will also be a coalescing pull-through cache and a resumable
//! replication engine. See ARCHITECTURE.md for the map of this crate.

pub mod bounded;
pub mod config;
pub mod connection;
pub mod flight;
pub mod fsck;
pub mod http;
pub mod meta;
pub mod oci;
pub mod pace;
pub mod proxy;
pub mod registry;
pub mod replicate;
pub mod secret;
pub mod server;
pub mod storage;
pub mod upstream;
pub mod warm;
