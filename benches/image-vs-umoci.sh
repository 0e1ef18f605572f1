#!/usr/bin/env bash
# Side by side: packing one directory into a single-layer gzip OCI image with
#   pkg     store add + assemble -o oci:DIR     (cold: empty store; warm: layer cached)
#   umoci   init, new, unpack, copy, repack
#   buildah from scratch, copy, commit (vfs storage, oci: output)
# Usage: benches/image-vs-umoci.sh [CONTENT_DIR]
# Without CONTENT_DIR, copies MIB (default 256) MiB of /usr/bin executables.
# Prints wall-clock seconds per tool (best of RUNS, default 3) and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${RUNS:-3}
mib=${MIB:-256}
work=$(mktemp -d /tmp/pkg-image-bench.XXXXXX)
trap 'rm -rf "$work" 2>/dev/null || true' EXIT

for tool in umoci buildah; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install umoci buildah" >&2; exit 1; }
done
cargo build --release --quiet
pkg=$PWD/target/release/pkg

content=${1:-}
if [ -z "$content" ]; then
    content=$work/content
    mkdir -p "$content/usr/bin"
    total=0
    for f in $(find /usr/bin -maxdepth 1 -type f | sort); do
        size=$(stat -c %s "$f")
        cp "$f" "$content/usr/bin/"
        total=$((total + size))
        [ "$total" -ge $((mib * 1024 * 1024)) ] && break
    done
fi
echo "content: $content ($(du -sh "$content" | cut -f1)), best of $runs runs" >&2

now() { date +%s.%N; }
measure() { # NAME COMMAND...: runs COMMAND (a function) RUNS times, prints the best time
    local name=$1; shift
    local best=999999
    for _ in $(seq "$runs"); do
        local t0 t1
        t0=$(now)
        "$@" >/dev/null 2>&1 || { echo "$name failed" >&2; "$@"; exit 1; }
        t1=$(now)
        best=$(awk -v a="$t0" -v z="$t1" -v b="$best" 'BEGIN { d = z - a; print (d < b) ? d : b }')
    done
    printf '%s\n' "$best"
}

pkg_cold() {
    rm -rf "$work/pkg-store" "$work/pkg-oci"
    local tree
    tree=$(PKG_STORE=$work/pkg-store "$pkg" store add "$content")
    PKG_STORE=$work/pkg-store "$pkg" assemble bench --package content="$tree" -o "oci:$work/pkg-oci"
}
pkg_layers_cold() { # trees already stored (as after pkg build), layer cache empty
    rm -rf "$work/pkg-store/layers" "$work/pkg-oci"
    local tree
    tree=$(PKG_STORE=$work/pkg-store "$pkg" store add "$content")
    PKG_STORE=$work/pkg-store "$pkg" assemble bench --package content="$tree" -o "oci:$work/pkg-oci"
}
pkg_warm() {
    rm -rf "$work/pkg-oci"
    local tree
    tree=$(PKG_STORE=$work/pkg-store "$pkg" store add "$content")
    PKG_STORE=$work/pkg-store "$pkg" assemble bench --package content="$tree" -o "oci:$work/pkg-oci"
}
umoci_all() {
    rm -rf "$work/umoci" "$work/bundle"
    umoci init --layout "$work/umoci"
    umoci new --image "$work/umoci:bench"
    umoci unpack --rootless --image "$work/umoci:bench" "$work/bundle"
    cp -a "$content/." "$work/bundle/rootfs/"
    umoci repack --image "$work/umoci:bench" "$work/bundle"
}
buildah_all() {
    local b=(buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver vfs)
    rm -rf "$work/buildah-oci"
    local ctr
    ctr=$("${b[@]}" from scratch)
    "${b[@]}" copy "$ctr" "$content" /
    "${b[@]}" commit --disable-compression=false "$ctr" "oci:$work/buildah-oci:bench"
    "${b[@]}" rm "$ctr"
}

t_pkg_cold=$(measure pkg-cold pkg_cold)
t_pkg_layers=$(measure pkg-layers-cold pkg_layers_cold)
t_pkg_warm=$(measure pkg-warm pkg_warm)
t_umoci=$(measure umoci umoci_all)
t_buildah=$(measure buildah buildah_all)
buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver vfs rm --all >/dev/null 2>&1 || true

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }
printf '%-34s %8s %14s\n' tool seconds "umoci / tool"
printf '%-34s %8.2f %14s\n' "pkg: empty store (add + assemble)" "$t_pkg_cold" "$(ratio "$t_umoci" "$t_pkg_cold")"
printf '%-34s %8.2f %14s\n' "pkg: trees stored, layers cold" "$t_pkg_layers" "$(ratio "$t_umoci" "$t_pkg_layers")"
printf '%-34s %8.2f %14s\n' "pkg: layers cached" "$t_pkg_warm" "$(ratio "$t_umoci" "$t_pkg_warm")"
printf '%-34s %8.2f %14s\n' "umoci" "$t_umoci" 1.0
printf '%-34s %8.2f %14s\n' "buildah" "$t_buildah" "$(ratio "$t_umoci" "$t_buildah")"
