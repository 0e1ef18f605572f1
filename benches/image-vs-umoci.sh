#!/usr/bin/env bash
# Issue 5, side by side in one run: the hello-go image (recipes/hello-go for
# linux/amd64: hello-go + base-files) made from an already-built package by
#   pkg cold   pkg assemble from the stored trees, layer cache emptied before
#              each run (rm -rf STORE/layers), so both layers are tarred,
#              gzipped and written; the files are read from the store's
#              decompressed copies, which a build leaves (and a checkout makes)
#   pkg warm   the same with both layers in the layer cache
#   umoci      init, new, unpack, copy, repack
#   buildah    from scratch, copy, commit (vfs storage)
#   pkg cold, blobs only
#              pkg cold without those copies (rm -rf STORE/checkouts/files
#              too, as after a gc), so every file is decompressed from its
#              blobs; run last, then the copies are made again
# Every tool writes an OCI image layout directory with gzip layers. The package
# is built once into the bench store (outside the timing); umoci and buildah
# copy the same trees, checked out once with `pkg store checkout`.
#
# Then, unless LARGE_MIB=0, the same four for one package of LARGE_MIB
# (default 256) MiB of /usr/bin executables, to show how each scales.
#
# Usage: benches/image-vs-umoci.sh
#   RUNS (default 15), LARGE_RUNS (default 3): timed runs per tool; the figure
#     is the fastest run (best of N: the machine is shared, noise only adds)
#   PAIRS (default 20; LARGE_RUNS for the large image): alternating pkg cold /
#     umoci runs whose median ratio is printed last
#   BENCH_STORE (default target/image-bench-store): kept between runs, so the
#     Go build happens once
#   PKG_BENCH_LOCK: a file to flock around each timing (e.g. /tmp/pkg-bench.lock)
# Needs hyperfine, jq, umoci, buildah, golang-go.
set -euo pipefail
export LC_ALL=C # $EPOCHREALTIME with a decimal point, for awk
cd "$(dirname "$0")/.."

runs=${RUNS:-15}
large_runs=${LARGE_RUNS:-3}
large_mib=${LARGE_MIB:-256}
store=$(realpath -m "${BENCH_STORE:-target/image-bench-store}")
work=$(mktemp -d /tmp/pkg-image-bench.XXXXXX)
buildah=(buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver vfs)
cleanup() {
    "${buildah[@]}" rm --all >/dev/null 2>&1 || true
    # Directories only: the checkouts' files are hard links into the store's
    # cache of checked-out files, whose modes are part of their names.
    find "$work" -type d ! -perm -u+w -exec chmod u+w {} + 2>/dev/null || true
    rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

for tool in hyperfine jq umoci buildah go; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
cargo build --release --quiet
pkg=$PWD/target/release/pkg
export PKG_STORE=$store

lock() { if [ -n "${PKG_BENCH_LOCK:-}" ]; then exec 9>>"$PKG_BENCH_LOCK" && flock 9; fi; }
unlock() { if [ -n "${PKG_BENCH_LOCK:-}" ]; then flock -u 9; fi; }

# time_all NAME RUNS PAIRS [--package NAME=TREE]... -- CONTENT_DIR...: times the
# four tools on one image, then pkg cold and umoci in alternating pairs, and
# prints a table of best times and ratios, and the pairs' median ratio.
time_all() {
    local name=$1 n=$2 pairs=$3
    shift 3
    local packages=()
    while [ "$1" != -- ]; do packages+=("$1"); shift; done
    shift
    local dirs=("$@")
    local assemble
    assemble="$pkg assemble $name --platform linux/amd64 ${packages[*]} -o oci:$work/pkg-oci"
    local umoci_copy="" buildah_srcs=""
    for d in "${dirs[@]}"; do
        umoci_copy+="cp -a $d/. $work/bundle/rootfs/ && "
        buildah_srcs+=" $d"
    done
    local umoci_all="umoci init --layout $work/umoci && umoci new --image $work/umoci:$name && umoci unpack --rootless --image $work/umoci:$name $work/bundle && ${umoci_copy}umoci repack --image $work/umoci:$name $work/bundle"
    local umoci_clean="chmod -R u+w $work/bundle 2>/dev/null; rm -rf $work/umoci $work/bundle"
    # Warm the layer cache once (and check the command works).
    $assemble >/dev/null
    lock
    hyperfine --style basic --warmup 1 --runs "$n" --export-json "$work/$name.json" \
        --command-name "pkg cold" --prepare "rm -rf $store/layers $work/pkg-oci" "$assemble" \
        --command-name "pkg warm" --prepare "rm -rf $work/pkg-oci" "$assemble" \
        --command-name umoci --prepare "$umoci_clean" "$umoci_all" \
        --command-name buildah --prepare "${buildah[*]} rm --all; rm -rf $work/buildah-oci" \
        "c=\$(${buildah[*]} from scratch) && ${buildah[*]} copy \$c$buildah_srcs / && ${buildah[*]} commit --disable-compression=false \$c oci:$work/buildah-oci:$name" \
        --command-name "pkg cold, blobs only" \
        --prepare "rm -rf $store/layers $store/checkouts/files $work/pkg-oci" "$assemble" \
        >&2
    # The decompressed copies again, for the pairs below.
    local p
    for p in "${packages[@]}"; do
        [ "$p" = --package ] && continue
        "$pkg" store checkout "${p#*=}" "$(mktemp -d -u "$work/recache.XXXXXX")" >/dev/null
    done
    # hyperfine runs each tool's runs back to back, so load from other work that
    # comes and goes can favour one tool; runs taken in alternating pairs share it.
    local ratios=() t0 t1 t2 t3
    for _ in $(seq "$pairs"); do
        rm -rf "$store/layers" "$work/pkg-oci"
        t0=$EPOCHREALTIME
        $assemble >/dev/null
        t1=$EPOCHREALTIME
        sh -c "$umoci_clean"
        t2=$EPOCHREALTIME
        sh -c "$umoci_all" >/dev/null 2>&1
        t3=$EPOCHREALTIME
        ratios+=("$(awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" 'BEGIN { print (d - c) / (b - a) }')")
    done
    unlock
    local paired
    paired=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{ r[NR] = $1 } END { print r[int((NR + 1) / 2)] }')
    best() { jq -r --arg c "$1" '.results[] | select(.command == $c) | .min' "$work/$name.json"; }
    local cold warm umoci bah blobs
    cold=$(best "pkg cold") warm=$(best "pkg warm") umoci=$(best umoci) bah=$(best buildah)
    blobs=$(best "pkg cold, blobs only")
    printf '\n%s, best of %s runs\n' "$name" "$n"
    printf '%-20s %10s %14s\n' tool ms "umoci / tool"
    local row
    for row in "pkg cold:$cold" "pkg warm:$warm" "umoci:$umoci" "buildah:$bah" \
        "pkg cold, blobs only:$blobs"; do
        awk -v t="${row%%:*}" -v s="${row#*:}" -v u="$umoci" \
            'BEGIN { printf "%-20s %10.1f %13.1fx\n", t, s * 1000, u / s }'
    done
    printf 'umoci / pkg cold, median of %s alternating pairs: %.1fx\n' "$pairs" "$paired"
}

# The hello-go image: build once (cached in the bench store), then its closure's trees.
echo "building recipes/hello-go into $store (cached after the first run)" >&2
"$pkg" build recipes/hello-go --platform linux/amd64 --json --quiet >"$work/build.json"
packages=() dirs=()
while read -r package tree; do
    packages+=(--package "$package=$tree")
    "$pkg" store checkout "$tree" "$work/checkout/$package" >/dev/null
    dirs+=("$work/checkout/$package")
done < <(jq -r '.nodes[] | "\(.package) \(.output)"' "$work/build.json")
echo "hello-go image: ${packages[*]} ($(du -shc "${dirs[@]}" | tail -1 | cut -f1))" >&2
time_all hello-go "$runs" "${PAIRS:-20}" "${packages[@]}" -- "${dirs[@]}"

[ "$large_mib" = 0 ] && exit 0
content=$work/large
mkdir -p "$content/usr/bin"
total=0
while read -r f; do
    cp "$f" "$content/usr/bin/"
    total=$((total + $(stat -c %s "$f")))
    [ "$total" -ge $((large_mib * 1024 * 1024)) ] && break
done < <(find /usr/bin -maxdepth 1 -type f | sort)
tree=$("$pkg" store add "$content")
# The decompressed copies a build of it would have left.
"$pkg" store checkout "$tree" "$work/large-checkout" >/dev/null
echo "large: $(du -sh "$content" | cut -f1) of /usr/bin as one package" >&2
time_all large "$large_runs" "$large_runs" --package "large=$tree" -- "$content"
