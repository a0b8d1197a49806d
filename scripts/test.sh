#!/usr/bin/env bash
# The test command: installs the real clients and registry the integration tests drive (when any is missing),
# then runs the whole test suite. Extra arguments go to `cargo test`, e.g. `scripts/test.sh --test clients`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Each tool is COMMAND or COMMAND:PACKAGE (its Debian 12 package, when the names differ).
tools=(docker-registry skopeo umoci podman containerd curl htpasswd:apache2-utils chromium chromedriver:chromium-driver)

have() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/bin/$1" ] || [ -x "/usr/sbin/$1" ]
}

missing=()
packages=()
for tool in "${tools[@]}"; do
  cmd="${tool%%:*}"
  packages+=("${tool#*:}")
  have "$cmd" || missing+=("$cmd")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "test.sh: installing missing tools: ${missing[*]}" >&2
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: apt-get not found; install the Debian 12 packages ${packages[*]}" >&2
    exit 1
  fi
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "test.sh: not root and no sudo; cannot install ${missing[*]}" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
  for tool in "${tools[@]}"; do
    cmd="${tool%%:*}"
    have "$cmd" || { echo "test.sh: $cmd still missing after apt-get install" >&2; exit 1; }
  done
fi

# The S3 server of the storage tests (tests/storage.rs, tests/s3.rs): s3s-fs checks SigV4 signatures. Built once
# into ~/.cargo/bin (about two minutes); 0.14.1 is the last release that builds with this toolchain.
if ! have s3s-fs || [ "$(s3s-fs --version 2>/dev/null)" != "s3s-fs 0.14.1" ]; then
  echo "test.sh: installing s3s-fs 0.14.1" >&2
  cargo install s3s-fs@0.14.1 --features binary --locked
fi

exec cargo test --locked "$@"
