#!/usr/bin/env bash
# Side by side, in one hyperfine run (warm): start-to-exit of a static /hello
#   pkg run --net none IMAGE /hello          the image's user is root, so its ids 1… map to the
#                                            caller's subordinate range (newuidmap, newgidmap)
#   pkg run --user 1000 --net none IMAGE /hello   one id mapped, written directly, as bwrap does
#   bwrap --unshare-all --ro-bind ROOTFS / --proc /proc --dev /dev /hello   (the same root filesystem;
#                                            maps the caller's uid only)
#   podman run --rm --runtime runc --network none IMAGE /hello   (the same image, copied in once;
#                                            maps the subordinate range, as pkg's first row)
# Targets: pkg run no slower than bwrap, at least 30x faster than podman.
#
# Rootless is measured rootless: run as a normal user, or as root to have the
# script build pkg, install what it needs and measure as PKG_BENCH_USER
# (default pkgtest, which scripts/test.sh creates).
# Usage: benches/run-vs-bwrap-podman.sh   (RUNS=N, default 100; ROUNDS=N alternating rounds, default 15)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-100}

if [ "$(id -u)" = 0 ] && [ -z "${PKG_BENCH_WORK:-}" ]; then
    missing=()
    for p in hyperfine bubblewrap podman runc skopeo uidmap musl-tools jq; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    user=${PKG_BENCH_USER:-pkgtest}
    id "$user" >/dev/null 2>&1 || { echo "no user $user: run scripts/test.sh once, or set PKG_BENCH_USER" >&2; exit 1; }
    cargo build --release --quiet
    work=$(mktemp -d /tmp/pkg-run-bench.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    cp target/release/pkg "$work/pkg"
    cp "$0" "$work/bench.sh"
    musl-gcc -static -O2 -s -o "$work/hello" recipes/hello/src/hello.c
    chown -R "$user" "$work"
    su "$user" -s /bin/bash -c "cd '$work' && PKG_BENCH_WORK='$work' RUNS=$runs bash ./bench.sh"
    exit
fi

work=${PKG_BENCH_WORK:-}
if [ -z "$work" ]; then
    cargo build --release --quiet
    work=$(mktemp -d /tmp/pkg-run-bench.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    cp target/release/pkg "$work/pkg"
    musl-gcc -static -O2 -s -o "$work/hello" recipes/hello/src/hello.c
fi
for tool in hyperfine bwrap podman skopeo jq; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install hyperfine bubblewrap podman runc skopeo jq" >&2; exit 1; }
done
cd "$work"
export PKG_STORE=$work/store

# One root filesystem: /hello plus the mount points bwrap needs on a read-only root.
mkdir -p rootfs/proc rootfs/dev
cp hello rootfs/hello
tree=$(./pkg store add rootfs)
./pkg assemble hello-bench --package "hello=$tree" -o "oci:$work/oci" 2>/dev/null
podman_image=localhost/pkg-bench-hello:latest
skopeo copy -q "oci:$work/oci:hello-bench" "containers-storage:$podman_image"
# Warm: checkouts made, image imported, everything in the page cache.
./pkg run --net none hello-bench /hello >/dev/null

hyperfine -N --warmup 10 --runs "$runs" \
    --command-name "pkg run" "./pkg run --net none hello-bench /hello" \
    --command-name "pkg run --user 1000" "./pkg run --user 1000 --net none hello-bench /hello" \
    --command-name "bwrap" "bwrap --unshare-all --ro-bind $work/rootfs / --proc /proc --dev /dev /hello" \
    --command-name "podman run" "podman run --rm --runtime runc --network none $podman_image /hello"
podman rmi -f "$podman_image" >/dev/null 2>&1 || true

# Other work on a shared machine shifts the load between one command's runs
# and the next's, so pkg and bwrap are also timed in ROUNDS short rounds of
# alternating order; the median of the rounds' ratios (of median times) is
# printed last.
rounds=${ROUNDS:-15}
pkg_root="./pkg run --net none hello-bench /hello"
pkg_user="./pkg run --user 1000 --net none hello-bench /hello"
bwrap_cmd="bwrap --unshare-all --ro-bind $work/rootfs / --proc /proc --dev /dev /hello"
: >ratios
for round in $(seq "$rounds"); do
    if [ $((round % 2)) = 0 ]; then order=("$bwrap_cmd" "$pkg_user" "$pkg_root"); else order=("$pkg_root" "$pkg_user" "$bwrap_cmd"); fi
    hyperfine -N --warmup 3 --runs 20 --export-json round.json "${order[@]}" >/dev/null 2>&1
    median() { jq -r --arg c "$1" '.results[] | select(.command == $c) | .median' round.json; }
    echo "$(median "$pkg_user") $(median "$pkg_root") $(median "$bwrap_cmd")" >>ratios
done
sort_median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "median of $rounds alternating rounds (ratio of median times; < 1 means pkg is faster):"
echo "  pkg run --user 1000 / bwrap: $(awk '{ print $1 / $3 }' ratios | sort_median)"
echo "  pkg run (root)      / bwrap: $(awk '{ print $2 / $3 }' ratios | sort_median)"
