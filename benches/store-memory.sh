#!/usr/bin/env bash
# Peak memory of `pkg store add` on one large file (default 2 GiB of random
# data), measured with GNU time's "Maximum resident set size". Fails when the
# peak reaches the limit (default 128 MiB): ingest must stream whatever the size.
#
#   benches/store-memory.sh [SIZE_MIB [LIMIT_MIB]]
#
# Work files go under $PKG_BENCH_DIR (default: target/store-memory), and are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-2048}
limit_mib=${2:-128}
[ -x /usr/bin/time ] || { echo "store-memory.sh: needs GNU time (Debian package: time)" >&2; exit 2; }

cargo build --release --quiet --bin pkg
work=${PKG_BENCH_DIR:-target/store-memory}
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# Random data: nothing dedups or compresses, so every byte goes through the pipeline.
head -c "$((size_mib * 1024 * 1024))" /dev/urandom > "$work/big"
sync
/usr/bin/time -v target/release/pkg --store "$work/store" store add "$work/big" \
    > "$work/digest" 2> "$work/time.txt"
peak_kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time.txt")
elapsed=$(awk -F'): ' '/Elapsed \(wall clock\)/ {print $2}' "$work/time.txt")
echo "ingested ${size_mib} MiB as $(cat "$work/digest") in ${elapsed}"
echo "peak RSS: $((peak_kib / 1024)) MiB (${peak_kib} KiB), limit ${limit_mib} MiB"
target/release/pkg --store "$work/store" store stats
if [ "$peak_kib" -ge "$((limit_mib * 1024))" ]; then
    echo "store-memory.sh: peak RSS over the limit" >&2
    exit 1
fi
