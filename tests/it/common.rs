//! Shared test fixtures: a [`TestContext`] owning a temp store and working dir,
//! and helpers to run the `pkg` binary against it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary working directory and store, removed on drop.
pub struct TestContext {
    pub dir: tempfile::TempDir,
}

impl TestContext {
    pub fn new() -> Self {
        TestContext { dir: tempfile::tempdir().expect("create temp dir") }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn store(&self) -> PathBuf {
        self.root().join("store")
    }

    /// Writes `contents` to `rel` under the root, creating parent directories.
    pub fn write(&self, rel: &str, contents: &str) -> PathBuf {
        let path = self.root().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// A `pkg` command running in the root with this context's store and a clean environment.
    pub fn pkg(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pkg"));
        cmd.current_dir(self.root())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.root())
            .env("PKG_STORE", self.store())
            .env("NO_COLOR", "1");
        cmd
    }

    /// Runs `pkg ARGS` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.pkg().args(args).output().expect("spawn pkg")
    }

    /// Replaces the temp root in `text` with `[TEMP]` so snapshots are stable.
    pub fn redact(&self, text: &str) -> String {
        let root = self.root().to_string_lossy().into_owned();
        let canonical = self.root().canonicalize().unwrap().to_string_lossy().into_owned();
        text.replace(&canonical, "[TEMP]").replace(&root, "[TEMP]")
    }
}

/// Runs a peer tool and insists on success; a missing tool fails with the package to install.
pub fn tool(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `{program}` ({e}): install it with `apt-get install {program}` (scripts/test.sh does)")
    });
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// Text of a process's stdout.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Text of a process's stderr.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The unprivileged account rootless tests run as when the suite runs as root.
/// `.ci/run` creates it; override with `PKG_TEST_USER`.
pub const DEFAULT_TEST_USER: &str = "pkgtest";

/// Marks the re-executed child so it runs the body instead of re-executing again.
const AS_USER_ENV: &str = "PKG_TEST_AS_UNPRIVILEGED";

/// Runs `body` as an unprivileged user: directly when the suite already runs
/// unprivileged, otherwise (as root, as in CI) by re-executing this test binary
/// for exactly this test under the test user's uid and gid. `test` is the test
/// function's name and `module` its `module_path!()`.
///
/// A missing test user is a failure with instructions, never a skip.
pub fn as_unprivileged(module: &str, test: &str, body: impl FnOnce()) {
    if std::env::var_os(AS_USER_ENV).is_some() || !running_as_root() {
        assert!(!running_as_root(), "rootless test body is running as root");
        body();
        return;
    }
    let user = std::env::var("PKG_TEST_USER").unwrap_or_else(|_| DEFAULT_TEST_USER.to_string());
    let Some((uid, gid)) = lookup_user(&user) else {
        panic!(
            "rootless test `{test}` needs the unprivileged user `{user}`; create it with \
             `useradd --create-home {user}` (as .ci/run does) or set PKG_TEST_USER"
        );
    };
    let name = format!("{}::{test}", module.split_once("::").map_or("", |(_, rest)| rest));
    let name = name.trim_start_matches("::").to_string();
    let exe = std::env::current_exe().expect("current test binary");
    let home = tempfile::tempdir().expect("temp home");
    std::process::Command::new("chown")
        .arg(format!("{uid}:{gid}"))
        .arg(home.path())
        .status()
        .expect("chown temp home");
    let out = Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(&exe)
        .args(["--exact", &name, "--nocapture", "--test-threads=1"])
        .env(AS_USER_ENV, "1")
        .env("HOME", home.path())
        .env("USER", &user)
        .env("TMPDIR", "/tmp")
        .output()
        .expect("spawn setpriv");
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(
        out.status.success() && o.contains("1 passed"),
        "rootless run of `{name}` as `{user}` failed ({}):\n{o}\n{e}",
        out.status
    );
}

/// Where scripts/test.sh (run as root) keeps a copy of root's Rust toolchain
/// that the test user can read; override with `PKG_TEST_RUST`.
pub const DEFAULT_TEST_RUST: &str = "/opt/pkg-test-rust";

/// The copy of root's Rust toolchain that the test user builds with when the
/// suite runs as root (root's own sits in /root, which that user cannot read).
/// A missing copy is a failure naming the fix, never a skip.
pub fn test_user_rust_sysroot() -> PathBuf {
    let copy = std::env::var_os("PKG_TEST_RUST").map_or(DEFAULT_TEST_RUST.into(), PathBuf::from);
    assert!(
        copy.join("bin/rustc").is_file() && copy.join("bin/cargo").is_file(),
        "cargo tests run as the test user need a Rust toolchain it can read at {0}: run \
         scripts/test.sh as root (it copies root's toolchain there, like \
         `cp -al \"$(rustc --print sysroot)\" {0}`), or set PKG_TEST_RUST to such a toolchain",
        copy.display()
    );
    copy
}

/// The sysroot of the Rust toolchain this test builds with: for a body that
/// root re-executed as the test user, [`test_user_rust_sysroot`]; for anyone
/// else their own, as `rustc --print sysroot` names it.
pub fn rust_sysroot() -> PathBuf {
    if std::env::var_os(AS_USER_ENV).is_some() {
        return test_user_rust_sysroot();
    }
    let out = Command::new("rustc").args(["--print", "sysroot"]).output();
    let sysroot = out.ok().filter(|o| o.status.success()).map(|o| PathBuf::from(stdout(&o).trim()));
    match sysroot {
        Some(s) if s.join("bin/rustc").is_file() => s,
        _ => panic!(
            "this test needs a Rust toolchain: `rustc --print sysroot` must name one \
             (install Rust with rustup, as the README says)"
        ),
    }
}

/// `PATH` with `sysroot`'s `bin` first, so `pkg` resolves `cargo` and `rustc`
/// to that toolchain's own binaries, never to a rustup proxy (which also
/// hangs at start-up under faketime's preload).
pub fn path_with_rust_at(sysroot: &Path) -> std::ffi::OsString {
    let mut dirs = vec![sysroot.join("bin")];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(dirs).unwrap()
}

/// `PATH` with [`rust_sysroot`]'s `bin` first.
pub fn path_with_rust() -> std::ffi::OsString {
    path_with_rust_at(&rust_sysroot())
}

/// The host's fuse-overlayfs, and a `/dev/fuse` this user may open: a
/// failure naming the fix otherwise, never a skip.
pub fn fuse_overlayfs() -> PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("fuse-overlayfs"))
        .find(|path| path.is_file());
    let Some(program) = found else {
        panic!("fuse-overlayfs is missing: `apt-get install fuse-overlayfs` (scripts/test.sh does)")
    };
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        panic!(
            "cannot open /dev/fuse ({e}): it must be mode 0666, as udev makes it; hosts that \
             create it 0600 need `chmod 0666 /dev/fuse` (scripts/test.sh does it)"
        );
    }
    program
}

/// Whether this process runs with effective uid 0.
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The uid and gid of `user` from /etc/passwd.
pub fn lookup_user(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// Declares a test whose body runs as an unprivileged user (see [`as_unprivileged`]).
#[macro_export]
macro_rules! rootless_test {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[test]
        fn $name() {
            $crate::common::as_unprivileged(module_path!(), stringify!($name), || $body);
        }
    };
}

/// `insta::assert_snapshot!` with pkg's conventions: snapshots live in the
/// top-level `snapshots/` directory, named after the test module and `$name`.
/// Redact temp paths first (see [`TestContext::redact`]).
#[macro_export]
macro_rules! assert_snapshot {
    ($name:expr, $value:expr) => {{
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"));
        settings.bind(|| insta::assert_snapshot!($name, $value));
    }};
}
