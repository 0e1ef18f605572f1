//! Running one build in the sandbox and ingesting what it installed.
//!
//! A build gets a fresh workspace under the store's `tmp/`: `src/` (a
//! private, writable copy of the source), `out/` (empty), `deps/NAME`
//! (read-only checkouts of what it mounts) and the log. The sandbox sees
//! them as `/src`, `/out`, `/deps/NAME`; the host's toolchain directories
//! are mounted read-only at their own paths, `/tmp` is a tmpfs, and the
//! environment is exactly [`environment`]. Only `out/` is ingested, and its
//! files then become the store's cached checkout of the output
//! ([`Store::keep_as_checkout_cache`]); the rest of the workspace is removed
//! whether the build succeeds or not, and the log is kept in the store under
//! `logs/`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::builders::{self, BuildCommands, OUT, SRC};
use super::source::{self, PreparedSource};
use super::{BuildError, BuildOptions};
use crate::digest::Digest;
use crate::platform::Platform;
use crate::recipe::Package;
use crate::sandbox::{IdMapping, Mount, Network, Sandbox, SandboxSpec, Stdio};
use crate::store::Store;
use crate::tool::ToolIdentity;

/// Host directories every build sees read-only (where they exist).
const HOST_DIRS: [&str; 6] = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc/alternatives"];

/// Directories whose programs are already on the fixed `PATH`.
const FIXED_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// The value of `SOURCE_DATE_EPOCH` unless the recipe's `env` sets one (then it is in the key).
pub const DEFAULT_SOURCE_DATE_EPOCH: &str = "0";

/// Lines of a failed build's log shown in its error.
pub const LOG_TAIL_LINES: usize = 40;

/// One build to run.
pub struct Job<'a> {
    pub package: &'a Package,
    pub platform: &'a Platform,
    pub key: Digest,
    pub source: &'a PreparedSource,
    pub tools: &'a [ToolIdentity],
    /// Output trees mounted read-only at `/deps/NAME`.
    pub deps: Vec<(String, Digest)>,
    /// `logs/HEX.check.log` instead of `logs/HEX.log` (a `--check` rebuild).
    pub check: bool,
}

/// Where a build's log is kept.
pub fn log_path(store: &Store, key: &Digest, check: bool) -> PathBuf {
    let suffix = if check { "check.log" } else { "log" };
    store.root().join("logs").join(format!("{}.{suffix}", key.to_hex()))
}

/// The Rust sysroot, when `rustc` resolved to a toolchain's own binary
/// (`SYSROOT/bin/rustc`) rather than a rustup proxy.
pub fn rust_sysroot(tools: &[ToolIdentity]) -> Option<PathBuf> {
    let rustc = tools.iter().find(|t| t.name == "rustc")?;
    (rustc.path.file_name()? == "rustc")
        .then(|| rustc.path.parent()?.parent().map(Path::to_path_buf))?
}

/// The whole environment of a build: the fixed set, the target description,
/// the builder's variables, then the recipe's `env` (which wins).
pub fn environment(
    package: &Package,
    platform: &Platform,
    commands: &BuildCommands,
    tools: &[ToolIdentity],
) -> Vec<(String, String)> {
    let mut path_dirs: Vec<String> = Vec::new();
    for tool in tools {
        if let Some(dir) = tool.path.parent().map(|d| d.display().to_string())
            && !FIXED_PATH.split(':').any(|fixed| fixed == dir)
            && !path_dirs.contains(&dir)
        {
            path_dirs.push(dir);
        }
    }
    path_dirs.push(FIXED_PATH.to_string());
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in [
        ("PATH", path_dirs.join(":")),
        ("HOME", "/tmp".to_string()),
        ("TMPDIR", "/tmp".to_string()),
        ("TZ", "UTC".to_string()),
        ("LC_ALL", "C.UTF-8".to_string()),
        ("SOURCE_DATE_EPOCH", DEFAULT_SOURCE_DATE_EPOCH.to_string()),
        ("src", SRC.to_string()),
        ("out", OUT.to_string()),
    ] {
        env.insert(k.to_string(), v);
    }
    for (k, v) in builders::target_env(platform).into_iter().chain(commands.env.iter().cloned()) {
        env.insert(k, v);
    }
    for (k, v) in &package.env {
        env.insert(k.clone(), v.clone());
    }
    env.into_iter().collect()
}

/// The driver script: echo each command into the log, then run it with `sh -eu -c`.
pub fn driver(commands: &[String]) -> String {
    let mut script = String::new();
    for command in commands {
        let quoted = builders::quote(command);
        script.push_str(&format!("printf '+ %s\\n' {quoted}\n/bin/sh -eu -c {quoted}\n"));
    }
    script
}

/// Maps an I/O error of workspace step `step` on `path` to a [`BuildError`].
fn workspace_error(
    job: &Job<'_>,
    step: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> BuildError + use<> {
    let (package, platform, path) =
        (job.package.name.value.clone(), *job.platform, path.to_path_buf());
    move |source| BuildError::Workspace { package, platform, step, path, source }
}

/// Runs `job` in the sandbox and ingests its `$out`; returns the output tree.
pub fn run(
    store: &Store,
    options: &BuildOptions,
    job: &Job<'_>,
    commands: &BuildCommands,
) -> Result<Digest, BuildError> {
    let io_error = |step, path: &Path| workspace_error(job, step, path);
    let tmp = store.root().join("tmp");
    let workspace = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&tmp)
        .map_err(io_error("create the workspace in", &tmp))?;
    let result = run_in(store, options, job, commands, workspace.path());
    make_removable(workspace.path());
    drop(workspace);
    result
}

fn run_in(
    store: &Store,
    options: &BuildOptions,
    job: &Job<'_>,
    commands: &BuildCommands,
    dir: &Path,
) -> Result<Digest, BuildError> {
    let package = job.package.name.value.clone();
    let platform = *job.platform;
    let io_error = |step, path: &Path| workspace_error(job, step, path);
    let (src, out, deps) = (dir.join("src"), dir.join("out"), dir.join("deps"));
    for d in [&src, &out, &deps] {
        std::fs::create_dir(d).map_err(io_error("create", d))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(io_error("set permissions of", d))?;
    }
    source::materialize(store, job.source, &src).map_err(|source| BuildError::Source {
        package: package.clone(),
        source: Box::new(source),
    })?;

    let mut spec = SandboxSpec::new(
        IdMapping::single(0, 0, options.uid, options.gid),
        vec!["/bin/sh".into(), "-eu".into(), "-c".into(), driver(&commands.commands).into()],
    );
    // No network at all: not even loopback, so a build cannot reach anything.
    spec.network = Network::Disconnected;
    for host in HOST_DIRS {
        if Path::new(host).exists() {
            spec.mounts.push(Mount::bind_ro(host, host));
        }
    }
    for root in toolchain_roots(job.tools) {
        spec.mounts.push(Mount::bind_ro(&root, &root));
    }
    for (name, tree) in &job.deps {
        let at = deps.join(name);
        store.checkout(tree, &at).map_err(|source| BuildError::Store {
            package: package.clone(),
            step: "check out a build dependency",
            source: Box::new(source),
        })?;
        spec.mounts.push(Mount::bind_ro(&at, Path::new("/deps").join(name)));
    }
    spec.mounts.push(Mount::bind_rw(&src, SRC));
    spec.mounts.push(Mount::bind_rw(&out, OUT));
    spec.mounts.push(Mount::tmpfs("/tmp"));
    spec.env = environment(job.package, job.platform, commands, job.tools);
    spec.cwd = SRC.into();
    spec.hostname = Some("pkg".into());
    spec.umask = 0o022;
    spec.new_session = true;

    let log_path = dir.join("log");
    let mut log = File::create(&log_path).map_err(io_error("create the log", &log_path))?;
    writeln!(log, "pkg: building {package} for {platform}")
        .map_err(io_error("write", &log_path))?;
    let log_fd = OwnedFd::from(log.try_clone().map_err(io_error("open", &log_path))?);
    spec.stdio = Stdio::log_to(log_fd).map_err(io_error("open", &log_path))?;
    let status = Sandbox::new().run(&spec);
    drop(spec);
    let kept = keep_log(store, &log_path, &job.key, job.check)
        .map_err(io_error("keep the log", &log_path))?;
    let status = status.map_err(|source| BuildError::Sandbox {
        package: package.clone(),
        platform,
        log: kept.clone(),
        source: Box::new(source),
    })?;
    if !status.success() {
        return Err(BuildError::Failed {
            package,
            platform,
            code: status.code(),
            tail: tail(&kept, LOG_TAIL_LINES),
            log: kept,
        });
    }
    let tree =
        store.ingest_dir(&out, &|_: &Path, _: &std::fs::Metadata| false).map_err(|source| {
            BuildError::Store { package, step: "ingest the output", source: Box::new(source) }
        })?;
    // The sandbox is gone, so nothing writes to `out/` any more: its files
    // become the cached checkout of the output instead of being deleted.
    let _ = std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755));
    make_removable(&out);
    store.keep_as_checkout_cache(&tree, &out);
    Ok(tree)
}

/// The host directories holding tools outside the fixed host directories:
/// for `/x/toolchain/bin/tool`, `/x/toolchain` (its libraries sit beside `bin`).
fn toolchain_roots(tools: &[ToolIdentity]) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for tool in tools {
        let covered = HOST_DIRS.iter().any(|h| tool.path.starts_with(h));
        let root = tool.path.parent().and_then(|bin| bin.parent());
        if let Some(root) = root
            && !covered
            && root != Path::new("/")
            && !roots.iter().any(|r| root.starts_with(r))
        {
            roots.push(root.to_path_buf());
        }
    }
    roots
}

/// Moves the workspace log to `logs/`; returns where it is kept.
fn keep_log(store: &Store, log: &Path, key: &Digest, check: bool) -> std::io::Result<PathBuf> {
    let kept = log_path(store, key, check);
    if let Some(parent) = kept.parent() {
        std::fs::create_dir_all(parent)?;
    }
    File::open(log)?.sync_all()?;
    std::fs::rename(log, &kept)?;
    Ok(kept)
}

/// The last `n` lines of a log.
pub fn tail(log: &Path, n: usize) -> String {
    let Ok(file) = File::open(log) else { return String::new() };
    let mut lines: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        if lines.len() == n {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    lines.into_iter().collect::<Vec<_>>().join("\n")
}

/// Gives the owner write access to every directory below `dir`, so a build
/// that left read-only directories cannot make its workspace unremovable.
fn make_removable(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let path = entry.path();
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
            make_removable(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, path: &str) -> ToolIdentity {
        ToolIdentity {
            name: name.into(),
            path: path.into(),
            digest: Digest::of(b""),
            version: String::new(),
        }
    }

    #[test]
    fn toolchains_outside_host_dirs_are_mounted() {
        let tools = [
            tool("cargo", "/root/.rustup/toolchains/x/bin/cargo"),
            tool("rustc", "/root/.rustup/toolchains/x/bin/rustc"),
            tool("go", "/usr/lib/go-1.19/bin/go"),
        ];
        assert_eq!(toolchain_roots(&tools), [PathBuf::from("/root/.rustup/toolchains/x")]);
        assert_eq!(rust_sysroot(&tools), Some(PathBuf::from("/root/.rustup/toolchains/x")));
        assert_eq!(rust_sysroot(&[tool("rustc", "/root/.cargo/bin/rustup")]), None);
    }

    #[test]
    fn driver_quotes_and_echoes() {
        let d = driver(&["echo 'hi' > $out/x".into()]);
        assert_eq!(
            d,
            "printf '+ %s\\n' 'echo '\\''hi'\\'' > $out/x'\n/bin/sh -eu -c 'echo '\\''hi'\\'' > $out/x'\n"
        );
    }
}
