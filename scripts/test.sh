#!/usr/bin/env bash
# Runs pkg's whole test suite on Debian 12: installs the system packages the
# tests need, creates the unprivileged user that rootless tests run as (when
# run as root), then runs lints and every test. This is the README's test
# command and exactly what .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages the tests use (see README "Testing").
packages=(util-linux passwd uidmap graphviz skopeo umoci oci-image-tool podman runc musl-tools golang-go gcc-aarch64-linux-gnu libc6-dev qemu-user-static faketime bash tar busybox-static fuse-overlayfs)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "test.sh: installing ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Rootless tests re-execute themselves as this user when the suite runs as root.
test_user=${PKG_TEST_USER:-pkgtest}
if [ "$(id -u)" = 0 ] && ! id "$test_user" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/sh "$test_user"
fi
if [ "$(id -u)" = 0 ]; then
    # Subordinate ids for rootless tests of full-range mappings (newuidmap).
    grep -q "^$test_user:" /etc/subuid 2>/dev/null || usermod --add-subuids 300000-365535 "$test_user"
    grep -q "^$test_user:" /etc/subgid 2>/dev/null || usermod --add-subgids 300000-365535 "$test_user"
fi
if [ "$(id -u)" = 0 ] && [ -c /dev/fuse ]; then
    # `pkg run --overlay fuse` (the fallback for kernels that refuse overlayfs
    # in a user namespace) opens /dev/fuse as the test user. Debian's udev
    # rule makes it mode 0666, but containers and VMs without udev create it
    # 0600 root:root, which only root may open: give it the usual mode. The
    # fuse tests fail, naming this, when /dev/fuse is missing or closed.
    chmod 0666 /dev/fuse
fi
if [ "$(id -u)" = 0 ]; then
    # The test user must reach the test binaries under target/.
    d=$PWD
    while [ "$d" != / ]; do
        chmod o+x "$d" 2>/dev/null || true
        d=$(dirname "$d")
    done
fi

if [ "$(id -u)" = 0 ]; then
    # The test user cannot read root's rustup toolchain (/root is private), so
    # rootless cargo tests use a copy of it at a fixed place, readable by all:
    # hard links when on one filesystem (no space, root's files untouched),
    # else a real copy. Refreshed when the source toolchain changes (rustup
    # update, rustup target add); tests/it/common.rs looks for it there.
    rust_copy=${PKG_TEST_RUST:-/opt/pkg-test-rust}
    sysroot=$(rustc --print sysroot)
    stamp="$sysroot $(find "$sysroot" -printf '%P %y %s %T@ %m\n' | LC_ALL=C sort | sha256sum)"
    if [ "$(cat "$rust_copy.stamp" 2>/dev/null)" != "$stamp" ]; then
        echo "test.sh: copying the Rust toolchain $sysroot to $rust_copy for the test user" >&2
        rm -rf "$rust_copy.new"
        mkdir -p "$(dirname "$rust_copy")"
        # Hard links share modes with root's files: link only when every file
        # is already readable by others, so root's toolchain is never chmod-ed.
        if [ -z "$(find "$sysroot" ! -perm -o+r -print -quit)" ] &&
            cp -al "$sysroot" "$rust_copy.new" 2>/dev/null; then
            :
        else
            rm -rf "$rust_copy.new"
            cp -a "$sysroot" "$rust_copy.new"
            chmod -R a+rX "$rust_copy.new"
        fi
        chmod a+rx "$rust_copy.new"
        rm -rf "$rust_copy"
        mv "$rust_copy.new" "$rust_copy"
        printf '%s\n' "$stamp" >"$rust_copy.stamp"
    fi
    "$rust_copy/bin/rustc" --version >/dev/null
fi

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# The developers' documentation: every intra-doc link resolves.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --document-private-items --locked
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --locked --no-fail-fast
else
    cargo test --locked --no-fail-fast
fi
