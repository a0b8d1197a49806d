//! `/v2/` paths: a route parsed from a path prints back to that same path (up to the two spellings the parser
//! takes as one: `/v2` and `/v2/`, and an upload start with or without its trailing slash), and parses again
//! to the same route, so no two routes share a path and no part of a path is lost.
#![no_main]

use breakwater::fuzzing::{parse_route, Route};
use libfuzzer_sys::fuzz_target;

fn print(r: &Route) -> String {
    match r {
        Route::Base => "/v2/".into(),
        Route::Catalog => "/v2/_catalog".into(),
        Route::Tags { name } => format!("/v2/{name}/tags/list"),
        Route::Manifest { name, reference } => format!("/v2/{name}/manifests/{reference}"),
        Route::Blob { name, digest } => format!("/v2/{name}/blobs/{digest}"),
        Route::UploadStart { name } => format!("/v2/{name}/blobs/uploads/"),
        Route::Upload { name, id } => format!("/v2/{name}/blobs/uploads/{id}"),
        Route::Referrers { name, digest } => format!("/v2/{name}/referrers/{digest}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let Some(route) = parse_route(path) else { return };
    let printed = print(&route);
    let same = printed == path
        || (route == Route::Base && path == "/v2")
        || (matches!(route, Route::UploadStart { .. }) && printed.strip_suffix('/') == Some(path));
    assert!(same, "{path:?} parsed as {route:?}, which is {printed:?}");
    assert_eq!(parse_route(&printed).as_ref(), Some(&route));
    // Metrics label every request by kind; it must be one of the fixed few.
    assert!(["base", "catalog", "tags", "manifest", "blob", "upload", "referrers"].contains(&route.kind()));
});
