#!/usr/bin/env bash
# The main job on the default recipe: installs the compilers the demo needs
# (musl-tools, and gcc-aarch64-linux-gnu for linux/arm64), builds recipes/hello
# in the rootless sandbox, writes its two-platform image as an OCI layout in
# ./hello-oci (inspect it with `skopeo inspect oci:hello-oci:hello`), then
# runs the image with pkg's rootless launcher: no daemon, no root.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for p in musl-tools gcc-aarch64-linux-gnu; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "demo.sh: installing ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo run --release -- build recipes/hello -o oci:hello-oci
cargo run --release -q -- graph recipes/hello
cargo run --release -q -- run hello
