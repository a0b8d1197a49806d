//! Wall-clock time as breakwater stores and compares it: Unix milliseconds. One function, so that every record
//! (claims, cache access times, heartbeats, leases) is on one scale.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix milliseconds (0 on a clock set before 1970, which then only makes things look old).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
