//! `pkg build` and `pkg fetch`: builders, sandboxing, sources, the build
//! cache, `--check`, reproducibility and cross builds, through the binary.
//!
//! Tests that need a host tool fail (naming the Debian package) when it is
//! missing; none skips. Builder and sandbox tests run as an unprivileged
//! user (`rootless_test!`). The cargo tests too: when the suite runs as root,
//! the test user builds with the copy of root's Rust toolchain that
//! scripts/test.sh makes (see [`crate::common::rust_sysroot`]).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

use crate::common::{TestContext, path_with_rust, stderr, stdout};

/// Fails (never skips) when `tool` is not installed, naming its Debian package.
fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{tool}`: install the Debian package `{package}` (scripts/test.sh does)"
    );
}

/// Where rustup keeps toolchains, for `pkg` runs with a temporary HOME: the
/// CLI asks `rustc --print sysroot`, which the rustup proxy answers from here.
fn toolchain_env() -> Vec<(&'static str, std::ffi::OsString)> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut env = Vec::new();
    for (var, default) in [("RUSTUP_HOME", ".rustup"), ("CARGO_HOME", ".cargo")] {
        let value = std::env::var_os(var).or_else(|| {
            home.as_ref().map(|h| h.join(default)).filter(|p| p.is_dir()).map(Into::into)
        });
        if let Some(value) = value {
            env.push((var, value));
        }
    }
    env
}

/// `ctx.pkg()` that can find this test's Rust toolchain.
fn pkg_with_toolchain(ctx: &TestContext) -> Command {
    let mut cmd = ctx.pkg();
    cmd.envs(toolchain_env()).env("PATH", path_with_rust());
    cmd
}

fn recipes() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes")
}

fn ok(out: &Output) -> &Output {
    assert!(out.status.success(), "pkg failed ({}):\n{}\n{}", out.status, stdout(out), stderr(out));
    out
}

/// `pkg build ARGS --json` in `ctx`, returning the parsed report.
fn build_json(ctx: &TestContext, args: &[&str]) -> Value {
    let mut all = vec!["build", "--json"];
    all.extend_from_slice(args);
    let out = ctx.run(&all);
    ok(&out);
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

/// (package, platform) → output digest of a report.
fn outputs(report: &Value) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["package"].as_str().unwrap().to_string(),
                n["platform"].as_str().unwrap().to_string(),
                n["output"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

fn cached(report: &Value, package: &str) -> bool {
    report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["package"] == package)
        .unwrap_or_else(|| panic!("{package} in {report}"))["cached"]
        .as_bool()
        .unwrap()
}

fn output_of(report: &Value, package: &str, platform: &str) -> String {
    report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["package"] == package && n["platform"] == platform)
        .unwrap_or_else(|| panic!("{package} {platform} in {report}"))["output"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Checks out a stored tree into `ctx`'s `name/` and returns the directory.
fn checkout(ctx: &TestContext, digest: &str, name: &str) -> PathBuf {
    let dest = ctx.root().join(name);
    ok(&ctx.run(&["store", "checkout", digest, dest.to_str().unwrap()]));
    dest
}

/// Runs `pkg ARGS` with a different wall clock (faketime), time zone, umask
/// and locale than the default run.
fn run_skewed(ctx: &TestContext, store: &Path, path: &std::ffi::OsStr, args: &[&str]) -> Output {
    require("faketime", "faketime");
    let mut cmd = Command::new("faketime");
    cmd.arg("-f")
        .arg("@2003-04-05 06:07:08")
        .arg("sh")
        .arg("-c")
        .arg("umask 077 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_pkg"))
        .args(args)
        .current_dir(ctx.root())
        .env_clear()
        .env("PATH", path)
        .env("HOME", ctx.root())
        .env("PKG_STORE", store)
        .env("TZ", "Pacific/Kiritimati")
        .env("LANG", "de_DE.UTF-8")
        .env("LC_ALL", "de_DE.UTF-8")
        .env("NO_COLOR", "1")
        // A faked monotonic clock makes some programs (rustc) spin forever.
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .envs(toolchain_env());
    cmd.output().expect("spawn faketime")
}

/// Builds `recipe` twice, in two stores, with different clock, TZ, umask and
/// locale; asserts identical outputs and that `--check` passes. Returns the report.
/// `path` is the `PATH` both builds get.
fn assert_reproducible(recipe: &Path, path: &std::ffi::OsStr, extra: &[&str]) -> Value {
    let ctx = TestContext::new();
    let recipe = recipe.to_str().unwrap();
    let mut args = vec!["build", "--json", recipe];
    args.extend_from_slice(extra);
    let first = ctx
        .pkg()
        .envs(toolchain_env())
        .env("PATH", path)
        .args(&args)
        .env("TZ", "UTC")
        .env("LANG", "C")
        .output()
        .unwrap();
    let first: Value = serde_json::from_slice(&ok(&first).stdout).unwrap();
    // A later wall clock too, besides the faked one.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let other_store = ctx.root().join("other-store");
    let second = run_skewed(&ctx, &other_store, path, &args);
    let second: Value = serde_json::from_slice(&ok(&second).stdout).unwrap();
    assert_eq!(outputs(&first), outputs(&second), "outputs differ between the two builds");
    assert!(first["nodes"].as_array().unwrap().iter().all(|n| n["cached"] == false));
    let mut check = vec!["build", recipe, "--check"];
    check.extend_from_slice(extra);
    let out = ctx.pkg().envs(toolchain_env()).env("PATH", path).args(&check).output().unwrap();
    assert!(stderr(ok(&out)).contains("check passed"), "{}", stderr(&out));
    // Stored trees carry no mtimes: a checkout's files all get the checkout's
    // own times, never the build's wall clock (2003 under faketime).
    for (package, platform, digest) in outputs(&second) {
        let dir = checkout(&ctx, &digest, &format!("co-{package}-{}", platform.replace('/', "-")));
        for entry in walk(&dir) {
            let mtime = std::fs::symlink_metadata(&entry).unwrap().modified().unwrap();
            let year_2010 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_262_304_000);
            assert!(mtime > year_2010, "{} has the faked build time", entry.display());
        }
    }
    first
}

/// The log path a failed build names, unwrapped from the report's line breaks.
fn log_path_in(err: &str) -> PathBuf {
    let after = err.split("full log: ").nth(1).unwrap_or_else(|| panic!("no log path in {err}"));
    let raw = after.split(')').next().unwrap();
    raw.chars().filter(|c| !c.is_whitespace() && *c != '|').collect::<String>().into()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

crate::rootless_test! {
    fn c_go_and_files_recipes_build_reproducibly() {
        require("musl-gcc", "musl-tools");
        require("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu");
        require("go", "golang-go");
        for recipe in ["hello", "hello-c", "hello-go", "ca-certs"] {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let report = assert_reproducible(&recipes().join(recipe), &path, &[]);
            assert!(!report["nodes"].as_array().unwrap().is_empty(), "{recipe}");
        }
    }
}

crate::rootless_test! {
    fn rust_recipe_builds_reproducibly() {
        let report = assert_reproducible(&recipes().join("hello-rust"), &path_with_rust(), &[]);
        let ctx = TestContext::new();
        let digest = output_of(&report, "hello-rust", "linux/amd64");
        // The report came from another context's store: build it here too.
        let out = pkg_with_toolchain(&ctx)
            .args(["build", "--json", recipes().join("hello-rust").to_str().unwrap()])
            .output()
            .unwrap();
        let here: Value = serde_json::from_slice(&ok(&out).stdout).unwrap();
        assert_eq!(output_of(&here, "hello-rust", "linux/amd64"), digest);
        let dir = checkout(&ctx, &digest, "co");
        let bin = dir.join("usr/bin/hello-rust");
        let run = Command::new(&bin).env_clear().output().unwrap();
        assert_eq!(stdout(&run), "Hello from Rust on linux/x86_64!\n");
        assert!(!has_interpreter(&std::fs::read(&bin).unwrap()), "hello-rust is dynamically linked");
    }
}

/// `pkg build --json RECIPE` as `user` (uid, gid) in a fresh store under
/// `root`, whose `PATH` starts with `sysroot`'s `bin`; returns the report.
fn build_json_as(root: &Path, user: Option<(u32, u32)>, sysroot: &Path, recipe: &Path) -> Value {
    std::fs::create_dir_all(root).unwrap();
    let mut cmd = match user {
        Some((uid, gid)) => {
            let status = Command::new("chown").arg(format!("{uid}:{gid}")).arg(root).status();
            assert!(status.unwrap().success(), "chown {}", root.display());
            let mut c = Command::new("setpriv");
            c.args([&format!("--reuid={uid}"), &format!("--regid={gid}"), "--clear-groups", "--"]);
            c.arg(env!("CARGO_BIN_EXE_pkg"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_pkg")),
    };
    let out = cmd
        .args(["build", "--json", recipe.to_str().unwrap()])
        .current_dir(root)
        .env_clear()
        .env("PATH", crate::common::path_with_rust_at(sysroot))
        .env("HOME", root)
        .env("PKG_STORE", root.join("store"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    serde_json::from_slice(&ok(&out).stdout).expect("--json prints one JSON object")
}

/// The cargo builder's output does not depend on who builds or where the
/// (identical) toolchain lives: root with its own rustup toolchain and, when
/// the suite runs as root, the test user with scripts/test.sh's copy of it
/// build the same bytes. Their build keys differ, as they should: a tool's
/// identity includes its path (see `pkg::tool`).
#[test]
fn rust_recipe_output_is_the_same_for_root_and_the_test_user() {
    use crate::common::{DEFAULT_TEST_USER, lookup_user, running_as_root, rust_sysroot};
    let recipe = recipes().join("hello-rust");
    let dir = tempfile::tempdir().unwrap();
    // The test user must reach its own directory inside.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mine = rust_sysroot();
    let first = build_json_as(&dir.path().join("invoker"), None, &mine, &recipe);
    let (user, theirs) = if running_as_root() {
        let user = lookup_user(DEFAULT_TEST_USER)
            .expect("user pkgtest exists (scripts/test.sh creates it)");
        (Some(user), crate::common::test_user_rust_sysroot())
    } else {
        (None, mine.clone())
    };
    let second = build_json_as(&dir.path().join("test-user"), user, &theirs, &recipe);
    let output = |r: &Value| output_of(r, "hello-rust", "linux/amd64");
    assert_eq!(
        output(&first),
        output(&second),
        "hello-rust differs between {} and {}",
        mine.display(),
        theirs.display()
    );
    let key = |r: &Value| r["nodes"][0]["key"].clone();
    assert_eq!(
        key(&first) == key(&second),
        mine == theirs,
        "keys: {} and {}",
        key(&first),
        key(&second)
    );
}

/// Whether a 64-bit little-endian ELF file has a PT_INTERP program header
/// (names a dynamic loader): static and static-pie binaries have none.
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

crate::rootless_test! {
    fn cargo_without_target_std_names_the_target() {
        let ctx = TestContext::new();
        let out = pkg_with_toolchain(&ctx)
            .args([
                "build",
                recipes().join("hello-rust").to_str().unwrap(),
                "--platform",
                "linux/arm64",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = stderr(&out);
        // The report wraps long lines (where depends on the sysroot's path).
        let unwrapped: String = err.split_whitespace().collect();
        assert!(unwrapped.contains("rustuptargetaddaarch64-unknown-linux-gnu"), "{err}");
    }
}

crate::rootless_test! {
    fn arm64_binaries_run_under_qemu() {
        require("qemu-aarch64-static", "qemu-user-static");
        require("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu");
        require("go", "golang-go");
        let ctx = TestContext::new();
        for (recipe, bin, greeting, args) in [
            ("hello-c", "usr/bin/hello-c", "Hello from C on linux/", &[][..]),
            ("hello-go", "usr/bin/hello-go", "Hello from Go on linux/", &["--once"][..]),
        ] {
            let path = recipes().join(recipe);
            let report = build_json(
                &ctx,
                &[path.to_str().unwrap(), "--platform", "linux/arm64", "--platform", "linux/amd64"],
            );
            let arm = checkout(&ctx, &output_of(&report, recipe, "linux/arm64"), &format!("{recipe}-arm64"));
            let amd = checkout(&ctx, &output_of(&report, recipe, "linux/amd64"), &format!("{recipe}-amd64"));
            let file = std::fs::read(arm.join(bin)).unwrap();
            // ELF e_machine 183 = AArch64.
            assert_eq!(u16::from_le_bytes([file[18], file[19]]), 183, "{recipe} is not arm64");
            let out = Command::new("qemu-aarch64-static").arg(arm.join(bin)).args(args).env_clear().output().unwrap();
            assert_eq!(stdout(&out), format!("{greeting}arm64!\n"), "{}", stderr(&out));
            assert!(!has_interpreter(&std::fs::read(amd.join(bin)).unwrap()), "{recipe} is not static");
            let out = Command::new(amd.join(bin)).args(args).env_clear().output().unwrap();
            assert_eq!(stdout(&out), format!("{greeting}amd64!\n"), "{}", stderr(&out));
        }
    }
}

/// A recipe of three script packages: `a` and `b` with path sources, `c`
/// build-depending on `a`.
fn cache_recipe(ctx: &TestContext) {
    ctx.write("a/data.txt", "alpha\n");
    ctx.write("b/data.txt", "beta\n");
    ctx.write(
        "pkg.kdl",
        r#"
        package "a" {
            source path="a" { exclude "*.log" "scratch/"; }
            build "script" { run "mkdir -p $out/share && cat data.txt > $out/share/a"; }
        }
        package "b" {
            source path="b"
            build "script" { run "mkdir -p $out/share && cat data.txt > $out/share/b"; }
        }
        package "c" {
            build "script" { run "mkdir -p $out/share && cat /deps/a/share/a > $out/share/c"; }
            build-depends "a"
        }
        image "all" { contents "b" "c"; }
        "#,
    );
}

crate::rootless_test! {
    fn a_builds_output_files_become_its_cached_checkout() {
        use std::os::unix::fs::MetadataExt;
        let ctx = TestContext::new();
        ctx.write(
            "pkg.kdl",
            r#"
            package "out" {
                build "script" {
                    run "mkdir -p $out/bin $out/share && printf 'hi\\n' > $out/share/a"
                    run "ln $out/share/a $out/share/b"
                    run "printf '#!/bin/sh\\n' > $out/bin/x && chmod 755 $out/bin/x"
                }
            }
            image "out" { contents "out"; }
            "#,
        );
        let report = build_json(&ctx, &[]);
        let tree = output_of(&report, "out", "linux/amd64");
        // bin/x is kept, read-only; share/a and share/b (two names of one
        // inode) are not.
        let cache = ctx.store().join("checkouts/files");
        let cached: Vec<PathBuf> = walk(&cache).into_iter().filter(|p| p.is_file()).collect();
        let [kept] = cached.as_slice() else { panic!("one cached file: {cached:?}") };
        assert!(kept.to_str().unwrap().ends_with("-0555"), "{kept:?}");
        assert_eq!(std::fs::read(kept).unwrap(), b"#!/bin/sh\n");
        let meta = std::fs::metadata(kept).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.nlink()), (0o555, 1));
        // A checkout links it as it is, and gets the other files from the blobs.
        let dir = checkout(&ctx, &tree, "co");
        assert_eq!(std::fs::metadata(dir.join("bin/x")).unwrap().ino(), meta.ino());
        assert_eq!(std::fs::read(dir.join("share/a")).unwrap(), b"hi\n");
        assert_eq!(std::fs::read(dir.join("share/b")).unwrap(), b"hi\n");
    }
}

crate::rootless_test! {
    fn unchanged_recipe_builds_nothing_and_one_byte_rebuilds_dependents() {
        let ctx = TestContext::new();
        cache_recipe(&ctx);
        let first = build_json(&ctx, &[]);
        assert!(["a", "b", "c"].iter().all(|p| !cached(&first, p)), "{first}");

        let out = ctx.run(&["build"]);
        assert!(stderr(ok(&out)).contains("nothing to build"), "{}", stderr(&out));
        let second = build_json(&ctx, &[]);
        assert!(["a", "b", "c"].iter().all(|p| cached(&second, p)), "{second}");
        assert_eq!(outputs(&first), outputs(&second));

        // mtimes, .git, target/ and excluded paths do not count.
        let data = ctx.root().join("a/data.txt");
        std::fs::File::options().append(true).open(&data).unwrap().set_modified(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400),
        ).unwrap();
        ctx.write("a/.git/HEAD", "ref: x\n");
        ctx.write("a/target/junk", "x\n");
        ctx.write("a/build.log", "x\n");
        ctx.write("a/scratch/tmp", "x\n");
        let third = build_json(&ctx, &[]);
        assert!(["a", "b", "c"].iter().all(|p| cached(&third, p)), "{third}");

        ctx.write("a/data.txt", "alphA\n");
        let fourth = build_json(&ctx, &["-j", "2"]);
        assert!(!cached(&fourth, "a") && !cached(&fourth, "c") && cached(&fourth, "b"), "{fourth}");
        let c = checkout(&ctx, &output_of(&fourth, "c", "linux/amd64"), "c");
        assert_eq!(std::fs::read_to_string(c.join("share/c")).unwrap(), "alphA\n");
    }
}

crate::rootless_test! {
    fn build_environment_is_fixed_and_described() {
        let ctx = TestContext::new();
        ctx.write(
            "pkg.kdl",
            r#"
            package "env" {
                env GREETING="hi there"
                build "script" {
                    run "mkdir -p $out/etc && env | sort > $out/etc/env"
                    run "umask > $out/etc/umask && id -u > $out/etc/uid && pwd > $out/etc/pwd"
                    run "hostname > $out/etc/hostname 2>/dev/null || cat /proc/sys/kernel/hostname > $out/etc/hostname"
                }
            }
            image "env" { contents "env"; platforms "linux/arm64"; }
            "#,
        );
        let out = ctx.pkg().arg("build").arg("--json").env("LEAKED", "1").env("TZ", "Asia/Tokyo").output().unwrap();
        let report: Value = serde_json::from_slice(&ok(&out).stdout).unwrap();
        let dir = checkout(&ctx, &output_of(&report, "env", "linux/arm64"), "env");
        let env = std::fs::read_to_string(dir.join("etc/env")).unwrap();
        let names: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
        for expected in [
            "CC=aarch64-linux-gnu-gcc",
            "GREETING=hi there",
            "HOME=/tmp",
            "LC_ALL=C.UTF-8",
            "SOURCE_DATE_EPOCH=0",
            "TARGET_ARCH=arm64",
            "TARGET_OS=linux",
            "TARGET_TRIPLE=aarch64-linux-gnu",
            "TZ=UTC",
            "out=/out",
            "src=/src",
        ] {
            assert!(env.lines().any(|l| l == expected), "missing {expected} in\n{env}");
        }
        assert!(!names.contains(&"LEAKED"), "{env}");
        assert!(names.iter().all(|n| [
            "CC", "GREETING", "HOME", "LC_ALL", "PATH", "SOURCE_DATE_EPOCH", "TARGET_ARCH",
            "TARGET_OS", "TARGET_TRIPLE", "TMPDIR", "TZ", "out", "src", "PWD", "SHLVL", "_", "OLDPWD"
        ].contains(n)), "unexpected variables in\n{env}");
        assert_eq!(std::fs::read_to_string(dir.join("etc/umask")).unwrap().trim(), "0022");
        assert_eq!(std::fs::read_to_string(dir.join("etc/uid")).unwrap().trim(), "0");
        assert_eq!(std::fs::read_to_string(dir.join("etc/pwd")).unwrap().trim(), "/src");
    }
}

crate::rootless_test! {
    fn network_is_unreachable_from_builds() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let ctx = TestContext::new();
        ctx.write(
            "pkg.kdl",
            &format!(
                r#"
                package "net" {{
                    build "script" {{
                        run "bash -c 'echo > /dev/tcp/192.0.2.1/80' || echo outside-unreachable"
                        run "bash -c 'echo hello > /dev/tcp/127.0.0.1/{port}' && echo CONN''ECTED"
                    }}
                }}
                image "net" {{ contents "net"; }}
                "#
            ),
        );
        let out = ctx.run(&["build"]);
        assert!(!out.status.success(), "a build reached the network:\n{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("build of `net` for linux/amd64 failed"), "{err}");
        assert!(err.contains("Network is unreachable"), "{err}");
        // Not even the sandbox's own loopback answers: 127.0.0.1 is unreachable too.
        assert!(!err.contains("Connection refused"), "{err}");
        assert!(!err.contains("outside-unreachable\nCONN"), "{err}");
        assert!(!err.contains("CONNECTED"), "{err}");
        let log = std::fs::read_to_string(log_path_in(&err)).unwrap();
        assert!(log.contains("Network is unreachable"), "{log}");
        assert!(
            log.contains(&format!("/dev/tcp/127.0.0.1/{port}: Network is unreachable")),
            "{log}"
        );
        match listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the host's listener saw a connection: {other:?}"),
        }
    }
}

crate::rootless_test! {
    fn writes_outside_out_leave_nothing_on_the_host() {
        let ctx = TestContext::new();
        let home = ctx.root().join("home");
        std::fs::create_dir(&home).unwrap();
        let canary = home.join("leak");
        ctx.write(
            "pkg.kdl",
            &format!(
                r#"
                package "leak" {{
                    build "script" {{
                        run "mkdir -p {home} && echo x > {canary} || true"
                        run "echo x > $HOME/leak && echo x > /tmp/leak && (echo x > /usr/leak || true)"
                        run "(sleep 300 &) && mkdir -p $out/ok && echo kept > $out/ok/file"
                    }}
                }}
                image "leak" {{ contents "leak"; }}
                "#,
                home = home.display(),
                canary = canary.display()
            ),
        );
        let report = build_json(&ctx, &[]);
        assert!(!canary.exists(), "the build wrote {}", canary.display());
        assert!(!Path::new("/usr/leak").exists());
        assert!(std::fs::read_dir(&home).unwrap().next().is_none());
        let dir = checkout(&ctx, &output_of(&report, "leak", "linux/amd64"), "out");
        let files: Vec<_> = walk(&dir).into_iter().map(|p| p.strip_prefix(&dir).unwrap().to_path_buf()).collect();
        assert_eq!(files, [PathBuf::from("ok/file"), PathBuf::from("ok")]);
        // Every process of the build was reaped with it.
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if cmdline == b"sleep\x00300\x00" {
                // What it is, for whoever meets this: its state, parents and namespaces.
                let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
                let facts: Vec<&str> = status
                    .lines()
                    .filter(|l| ["State", "PPid", "NSpid", "Uid"].iter().any(|k| l.starts_with(k)))
                    .collect();
                let pid_ns = std::fs::read_link(entry.path().join("ns/pid")).ok();
                panic!("a build process survived: {:?} {facts:?} pid ns {pid_ns:?}", entry.path());
            }
        }
    }
}

crate::rootless_test! {
    fn failed_build_shows_its_last_40_lines_and_keeps_the_log() {
        let ctx = TestContext::new();
        ctx.write(
            "pkg.kdl",
            r#"
            package "fails" {
                build "script" { run "for i in $(seq 1 60); do echo line-$i; done; exit 3"; }
            }
            image "fails" { contents "fails"; }
            "#,
        );
        let out = ctx.run(&["build"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("failed with exit code 3"), "{err}");
        assert!(err.contains("line-60") && err.contains("line-21"), "{err}");
        assert!(!err.contains("line-20\n"), "more than 40 lines shown:\n{err}");
        let log = log_path_in(&err);
        assert!(log.starts_with(ctx.store()), "{}", log.display());
        let text = std::fs::read_to_string(log).unwrap();
        assert!(text.contains("line-1\n") && text.contains("line-60\n"), "{text}");
    }
}

crate::rootless_test! {
    fn files_builder_installs_files_and_directories() {
        let ctx = TestContext::new();
        ctx.write("src/conf", "c\n");
        ctx.write("src/tool.sh", "#!/bin/sh\n");
        ctx.write("src/static/index.html", "<p>\n");
        ctx.write("src/static/css/site.css", "p{}\n");
        ctx.write(
            "pkg.kdl",
            r#"
            package "files" {
                source path="src"
                build "files" {
                    install "conf" "/etc/app/conf" mode="0600"
                    install "tool.sh" "/usr/bin/tool" mode="0755"
                    install "static/" "/usr/share/app/"
                }
            }
            image "files" { contents "files"; }
            "#,
        );
        let report = build_json(&ctx, &[]);
        let dir = checkout(&ctx, &output_of(&report, "files", "linux/amd64"), "out");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o7777;
        // Checkouts are read-only: compare the executable bits the tree records.
        assert_eq!(mode("etc/app/conf") & 0o111, 0);
        assert_eq!(mode("usr/bin/tool") & 0o111, 0o111);
        assert_eq!(std::fs::read_to_string(dir.join("usr/share/app/css/site.css")).unwrap(), "p{}\n");
        assert_eq!(std::fs::read_to_string(dir.join("usr/share/app/index.html")).unwrap(), "<p>\n");
    }
}

/// An HTTP server on 127.0.0.1 serving `body` for at most `limit` requests,
/// counting them; stopped when dropped.
struct ArchiveServer {
    port: u16,
    hits: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ArchiveServer {
    fn start(body: Vec<u8>, limit: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !s.load(Ordering::SeqCst)
                && std::time::Instant::now() < deadline
                && h.load(Ordering::SeqCst) < limit
            {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        let mut req = [0u8; 4096];
                        let _ = conn.read(&mut req);
                        h.fetch_add(1, Ordering::SeqCst);
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = conn.write_all(head.as_bytes());
                        let _ = conn.write_all(&body);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        ArchiveServer { port, hits, stop, thread: Some(thread) }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for ArchiveServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A .tar.gz holding `hello-1.0/greeting`, in two gzip members as pigz and
/// bgzip write them (the file's contents are in the second).
fn archive(ctx: &TestContext) -> Vec<u8> {
    use std::io::Write;
    ctx.write("archive/hello-1.0/greeting", "from an archive\n");
    let tar = ctx.root().join("hello-1.0.tar");
    let status = Command::new("tar")
        .args([
            "-cf",
            tar.to_str().unwrap(),
            "-C",
            ctx.root().join("archive").to_str().unwrap(),
            "hello-1.0",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let tar = std::fs::read(tar).unwrap();
    let mut tgz = Vec::new();
    for part in [&tar[..1024], &tar[1024..]] {
        let mut member = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        member.write_all(part).unwrap();
        tgz.extend(member.finish().unwrap());
    }
    tgz
}

fn url_recipe(ctx: &TestContext, port: u16, sha256: &str, suffix: &str) {
    ctx.write(
        "pkg.kdl",
        &format!(
            r#"
            package "fetched" {{
                source url="http://127.0.0.1:{port}/hello-1.0.tar.gz" sha256="{sha256}"
                build "script" {{ run "mkdir -p $out/share && cat hello-1.0/greeting > $out/share/greeting{suffix}"; }}
            }}
            image "fetched" {{ contents "fetched"; }}
            "#
        ),
    );
}

crate::rootless_test! {
    fn url_sources_are_verified_cached_and_fetched_ahead() {
        let ctx = TestContext::new();
        let body = archive(&ctx);
        let sha = sha256_hex(&body);
        let server = ArchiveServer::start(body.clone(), 3);

        // --offline refuses to download, naming the source.
        url_recipe(&ctx, server.port, &sha, "");
        let out = ctx.run(&["build", "--offline"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(&format!("http://127.0.0.1:{}/hello-1.0.tar.gz", server.port)), "{}", stderr(&out));
        assert_eq!(server.hits(), 0);

        let report = build_json(&ctx, &[]);
        assert_eq!(server.hits(), 1);
        let dir = checkout(&ctx, &output_of(&report, "fetched", "linux/amd64"), "out");
        assert_eq!(std::fs::read_to_string(dir.join("share/greeting")).unwrap(), "from an archive\n");

        // A wrong pin is refused, naming both digests.
        let wrong = "0".repeat(64);
        let other = TestContext::new();
        url_recipe(&other, server.port, &wrong, "");
        let out = other.run(&["build"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(&sha) && stderr(&out).contains(&wrong), "{}", stderr(&out));
        assert_eq!(server.hits(), 2);

        // `pkg fetch` ahead of time, then builds need no network at all.
        let third = TestContext::new();
        url_recipe(&third, server.port, &sha, "");
        ok(&third.run(&["fetch"]));
        assert_eq!(server.hits(), 3);
        drop(server);
        url_recipe(&ctx, 9, &sha, "-changed");
        let report = build_json(&ctx, &["--offline"]);
        assert!(!cached(&report, "fetched"));
        url_recipe(&third, 9, &sha, "");
        let report = build_json(&third, &["--offline"]);
        let dir = checkout(&third, &output_of(&report, "fetched", "linux/amd64"), "out");
        assert_eq!(std::fs::read_to_string(dir.join("share/greeting")).unwrap(), "from an archive\n");
    }
}

crate::rootless_test! {
    fn check_names_every_file_that_differs() {
        let ctx = TestContext::new();
        ctx.write(
            "pkg.kdl",
            r#"
            package "stamped" {
                build "script" {
                    run "mkdir -p $out/etc && echo same > $out/etc/same"
                    run "cat /proc/sys/kernel/random/uuid > $out/etc/stamp"
                    run "cat /proc/sys/kernel/random/uuid > $out/etc/other"
                }
            }
            image "stamped" { contents "stamped"; }
            "#,
        );
        ok(&ctx.run(&["build"]));
        let out = ctx.run(&["build", "--check"]);
        assert!(!out.status.success(), "--check passed on a non-reproducible build");
        let err = stderr(&out);
        assert!(err.contains("etc/stamp: content differs"), "{err}");
        assert!(err.contains("etc/other: content differs"), "{err}");
        assert!(!err.contains("etc/same"), "{err}");
    }
}

/// Records how many builds ran at once.
#[derive(Default)]
struct Concurrency {
    running: AtomicUsize,
    most: AtomicUsize,
}

impl pkg::build::Observer for Concurrency {
    fn build_started(&self, _: &str, _: &pkg::platform::Platform) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
    }
    fn build_finished(&self, _: &str, _: &pkg::platform::Platform, outcome: pkg::build::Outcome) {
        if outcome != pkg::build::Outcome::Cached {
            self.running.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

crate::rootless_test! {
    fn independent_packages_build_in_parallel_up_to_jobs() {
        use pkg::build::{BuildContext, BuildOptions, build};
        let (uid, gid) = {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let id = |f: &str| -> u32 {
                status.lines().find(|l| l.starts_with(f)).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
            };
            (id("Uid:"), id("Gid:"))
        };
        for (jobs, expected) in [(1, 1), (3, 3)] {
            let ctx = TestContext::new();
            let recipe_text: String = (0..3)
                .map(|i| format!("package \"p{i}\" {{ build \"script\" {{ run \"sleep 1; mkdir -p $out/{i}\"; }} }}\n"))
                .collect::<String>()
                + "image \"all\" { contents \"p0\" \"p1\" \"p2\"; }\n";
            let path = ctx.write("pkg.kdl", &recipe_text);
            let recipe = pkg::recipe::load(&path).unwrap();
            let graph = pkg::graph::BuildGraph::plan(
                &recipe,
                &pkg::graph::Selection::all(pkg::platform::Platform::host()),
            )
            .unwrap();
            let store = pkg::store::Store::open(&ctx.store()).unwrap();
            let tools = pkg::tool::HostTools::new(std::env::var_os("PATH"));
            let observer = Concurrency::default();
            let report = build(&BuildContext {
                recipe: &recipe,
                graph: &graph,
                store: &store,
                tools: &tools,
                observer: &observer,
                options: BuildOptions { uid, gid, jobs, offline: true, check: false },
            })
            .unwrap();
            assert_eq!(report.nodes.len(), 3);
            assert_eq!(observer.most.load(Ordering::SeqCst), expected, "with -j {jobs}");
        }
    }
}
