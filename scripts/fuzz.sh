#!/usr/bin/env bash
# Fuzzes breakwater's parsers: every target in fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each (default 60), one
# at a time under `nice -n 19` (the machine is shared), each from a seed corpus of valid examples written here;
# then prints the executions per target. `scripts/fuzz.sh 600 route config` runs only the targets named;
# FUZZ_RUNS=N also ends each target after N executions.
#
# Works with the stable toolchain alone: by default the targets are built without a sanitizer (`-s none`, which
# needs no unstable flag; the parsers are safe Rust, so AddressSanitizer would find little the bounds checks do
# not) but with debug assertions and overflow checks, so wrapping arithmetic on input is a crash.
# FUZZ_SANITIZER=address builds with AddressSanitizer instead, through `-Zsanitizer` on the stable compiler
# (RUSTC_BOOTSTRAP=1), about twice as slow. cargo-fuzz is installed when missing. Crashing inputs land in
# fuzz/artifacts/<target>/; FUZZING.md says what to do with them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_FUZZ_VERSION=0.13.2
secs=${1:-60}
shift || true
sanitizer=${FUZZ_SANITIZER:-none}
if [ "$sanitizer" != none ]; then
  export RUSTC_BOOTSTRAP=1
fi
fuzz=(cargo fuzz)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
  nice -n 19 cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <("${fuzz[@]}" list)
fi

# --- seed corpora: valid examples of each input, rewritten on every run (fuzz/corpus is not in git) ---

D256=sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
D512=sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e
OCI_MANIFEST=application/vnd.oci.image.manifest.v1+json
OCI_INDEX=application/vnd.oci.image.index.v1+json

# seed TARGET NAME [printf-format [args]]: one seed file.
seed() {
  local target=$1 name=$2
  shift 2
  mkdir -p "fuzz/corpus/$target"
  # shellcheck disable=SC2059
  printf "$@" >"fuzz/corpus/$target/seed-$name"
}

# Little-endian u64 as printf escapes (the numeric prefix of the range targets).
le64() {
  local v=$1 out="" i
  for i in 0 1 2 3 4 5 6 7; do
    out+=$(printf '\\x%02x' $(((v >> (8 * i)) & 255)))
  done
  printf '%s' "$out"
}

write_seeds() {
  local i=0 s
  for s in library/alpine a-b/c.d/e__f latest v1.0.0 _x "$D256" "$D512" sha256:nothex; do
    seed grammar $((i++)) '%s' "$s"
  done

  # Manifests: the first byte picks the Content-Type (see fuzz_targets/manifest.rs), then the body.
  seed manifest image '\x02{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"%s","size":32},{"digest":"%s","size":1,"urls":["https://x.example/l"]}],"subject":{"digest":"%s","size":7},"annotations":{"org.opencontainers.image.created":"2024-01-01T00:00:00Z"}}' "$OCI_MANIFEST" "$D256" "$D512" "$D256" "$D256"
  seed manifest index '\x03{"schemaVersion":2,"mediaType":"%s","artifactType":"application/x.sbom","manifests":[{"mediaType":"%s","digest":"%s","size":500,"platform":{"architecture":"amd64","os":"linux"}}]}' "$OCI_INDEX" "$OCI_MANIFEST" "$D256"
  seed manifest docker '\x00{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"digest":"%s","size":1},"layers":[]}' "$D256"
  seed manifest bare-index '\x01{"schemaVersion":2,"manifests":[{"digest":"%s","size":1}]}' "$D256"

  i=0
  for s in "bytes=0-4" "bytes=5-" "bytes=-3" "bytes=0-1,3-4" " bytes = 1 - 2 " "items=0-1"; do
    seed range $((i++)) "$(le64 20)$(le64 0)$(le64 0)%s" "$s"
  done
  i=0
  for s in "0-99" "bytes 0-99/100" "bytes 100-199/*" "bytes=0-0"; do
    seed content_range $((i++)) "$(le64 0)$(le64 99)%s" "$s"
  done

  seed challenge bearer '%s' 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push"'
  seed challenge basic '%s' 'Basic realm="registry"'
  seed challenge odd '%s' 'Bearer  realm = "r" , service=svc,scope="a\"b"'

  seed link relative '%s' '</v2/_catalog?last=a%2Fb&n=100>; rel="next"'
  seed link absolute '%s' '<https://r.example/v2/x/tags/list?n=2&last=v1.0>; rel="next"'

  i=0
  for s in /v2/ /v2/_catalog /v2/a/b/tags/list /v2/a/manifests/latest /v2/x/manifests/y/manifests/z \
    "/v2/a/b/blobs/$D256" /v2/a/blobs/uploads/ /v2/a/b/blobs/uploads/123 "/v2/a/referrers/$D256" /v2/blobs/blobs/uploads; do
    seed route $((i++)) '%s' "$s"
  done

  # Every TOML example of the README is a valid configuration.
  mkdir -p fuzz/corpus/config
  awk '/^```toml$/ {on = 1; f = sprintf("fuzz/corpus/config/seed-readme-%d", ++n); printf "" > f; next}
    /^```/ && on {on = 0; close(f); next}
    on {print > f}' README.md
  seed config full '%s' 'listen = "127.0.0.1:5000"
data = "/var/lib/breakwater"
metadata = "postgres://postgres@127.0.0.1/breakwater"
log_format = "json"
delete_enabled = true
upload_ttl_secs = 3600
[cache]
negative_ttl_secs = 30
max_bytes = 1000000000
max_age_secs = 86400
[[upstream]]
name = "docker.io"
url = "https://registry-1.docker.io"
username = "u"
password = "p"
tag_ttl_secs = 300
timeout_secs = 5
default = true
library_shorthand = true
[[replication]]
name = "mirror"
from = "https://src.example"
from_kind = "harbor"
to = "local"
include = ["library/**"]
exclude = ["library/old-*"]
tags = ["v*", "regex:[0-9]+\\.[0-9]+"]
exclude_tags = ["*-rc*"]
latest = 3
rewrite = ["library/=mirror/"]
platforms = ["linux/amd64"]
referrers = true
override = false
concurrency = 4
page_size = 100
rate = 10.5
bandwidth = 1000000
schedule_secs = 3600
'
}

write_seeds

# --- build once, then run each target in turn ---

build=("${fuzz[@]}" build -s "$sanitizer" --debug-assertions)
nice -n 19 "${build[@]}" >&2

status=0
results=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" fuzz/logs
  limits=(-max_total_time="$secs")
  [ -n "${FUZZ_RUNS:-}" ] && limits+=(-runs="$FUZZ_RUNS")
  dict=()
  [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
  # Not under fuzz/artifacts: cargo-fuzz reports the newest file there as the crashing input.
  log="fuzz/logs/$t.log"
  echo "fuzz.sh: $t for ${secs}s" >&2
  # -rss_limit_mb: a parser whose memory grows with anything but its (small) input is a crash.
  # -timeout: an input that takes seconds is a hang, and a crash too.
  if nice -n 19 "${fuzz[@]}" run -s "$sanitizer" --debug-assertions "$t" "fuzz/corpus/$t" -- \
    "${limits[@]}" -rss_limit_mb=512 -timeout=10 -print_final_stats=1 "${dict[@]}" >"$log" 2>&1; then
    outcome=ok
  else
    outcome="CRASH (see $log and fuzz/artifacts/$t/)"
    status=1
  fi
  runs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  took=$(grep -ao 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1 || true)
  results+=("$(printf '%-14s %12s executions %6ss  %s' "$t" "${runs:-?}" "${took:-?}" "$outcome")")
done

printf '%s\n' "${results[@]}"
exit "$status"
