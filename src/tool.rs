//! Host tools a build may run, and their identity for build keys.
//!
//! A tool's identity is its resolved path (symlinks followed), the blake3 of
//! the binary, and the first line its `--version` prints: upgrading the Go
//! toolchain changes the key of every Go build, as it should. Resolution uses
//! the `PATH` the caller passes in; this module never reads the environment.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::digest::Digest;

/// What identifies a tool for a build key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ToolIdentity {
    pub name: String,
    pub path: PathBuf,
    pub digest: Digest,
    pub version: String,
}

/// Why a tool cannot be identified.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("tool `{name}` is not on PATH")]
    NotFound { name: String },
    #[error("tool `{name}` must be a bare name found on PATH or an absolute path")]
    RelativePath { name: String },
    #[error("tool `{name}` resolves to a path that is not UTF-8: {}", path.display())]
    NonUtf8Path { name: String, path: PathBuf },
    #[error("cannot read tool `{name}` at {}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Turns a tool name into its identity.
pub trait ToolResolver: Sync {
    fn resolve(&self, name: &str) -> Result<ToolIdentity, ToolError>;
}

/// Resolves tools on the host through a given `PATH`, caching each answer.
#[derive(Debug)]
pub struct HostTools {
    search_path: Vec<PathBuf>,
    cache: Mutex<HashMap<String, ToolIdentity>>,
}

impl HostTools {
    /// Resolves through `path`, a `PATH`-style list of directories.
    pub fn new(path: Option<OsString>) -> Self {
        let search_path = path.map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        HostTools { search_path, cache: Mutex::new(HashMap::new()) }
    }

    /// The first executable named `name` on the search path (or `name` itself
    /// when absolute), symlinks followed.
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        if name.contains('/') {
            let path = Path::new(name);
            return (path.is_absolute() && is_executable(path))
                .then(|| std::fs::canonicalize(path).ok())?;
        }
        self.search_path
            .iter()
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
            .and_then(|p| std::fs::canonicalize(p).ok())
    }
}

impl ToolResolver for HostTools {
    fn resolve(&self, name: &str) -> Result<ToolIdentity, ToolError> {
        if let Some(known) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(known.clone());
        }
        if name.contains('/') && !name.starts_with('/') {
            // Relative to what? Not the process's working directory: that would
            // make keys depend on where pkg was started.
            return Err(ToolError::RelativePath { name: name.to_string() });
        }
        let path =
            self.which(name).ok_or_else(|| ToolError::NotFound { name: name.to_string() })?;
        if path.to_str().is_none() {
            // Keys encode paths as UTF-8 text.
            return Err(ToolError::NonUtf8Path { name: name.to_string(), path });
        }
        let read_error =
            |source| ToolError::Read { name: name.to_string(), path: path.clone(), source };
        let mut hasher = blake3::Hasher::new();
        let file = std::fs::File::open(&path).map_err(read_error)?;
        hasher.update_reader(file).map_err(read_error)?;
        let identity = ToolIdentity {
            name: name.to_string(),
            version: version_line(name, &path),
            digest: hasher.finalize().into(),
            path,
        };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), identity.clone());
        Ok(identity)
    }
}

/// The first non-empty line of `TOOL --version` (`go version` for Go, which
/// has no such flag), or empty when the tool gives none. The tool runs from `/`
/// with an empty environment and no input, so the answer depends on neither
/// pkg's working directory nor its environment; one that has not answered after
/// ten seconds is killed. No other argument is tried: `sh version`, for one,
/// would run a file named `version`.
///
/// Its output is drained while it runs, so a chatty tool never blocks on a
/// full pipe, and read without waiting once it exits, so a process it left
/// behind holding the pipe cannot hang pkg.
fn version_line(name: &str, path: &Path) -> String {
    let arg = if name == "go" || path.file_name().is_some_and(|f| f == "go") {
        "version"
    } else {
        "--version"
    };
    let child = Command::new(path)
        .arg(arg)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else { return String::new() };
    // Both are there: they were asked for as pipes.
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return String::new();
    };
    let (mut stdout, mut stderr) = (Capture::new(stdout), Capture::new(stderr));
    let mut exited = None;
    for _ in 0..VERSION_TICKS {
        stdout.drain();
        stderr.drain();
        match child.try_wait() {
            Ok(Some(status)) => {
                exited = Some(status);
                break;
            }
            Ok(None) => std::thread::sleep(VERSION_TICK),
            // Not ours to wait for any more: nothing to kill either.
            Err(_) => return String::new(),
        }
    }
    let Some(status) = exited else {
        let _ = child.kill();
        let _ = child.wait();
        return String::new();
    };
    if !status.success() {
        return String::new();
    }
    // What the tool wrote before it exited is still in the pipes.
    stdout.drain();
    stderr.drain();
    let text = if stdout.kept.is_empty() { stderr.kept } else { stdout.kept };
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string()
}

/// How often a version probe is looked at ...
const VERSION_TICK: std::time::Duration = std::time::Duration::from_millis(10);
/// ... and how many times: ten seconds, plus the time its output takes to read.
const VERSION_TICKS: u32 = 1000;

/// How much of a version probe's output is kept: the first line is in it.
const VERSION_KEPT: usize = 64 << 10;

/// Most bytes one look reads from a pipe, so that a tool (or a process it
/// left behind) writing without end cannot keep the probe reading.
const VERSION_READ_PER_TICK: usize = 1 << 20;

/// One output pipe of a version probe, read without blocking.
struct Capture<R> {
    pipe: Option<R>,
    kept: Vec<u8>,
}

impl<R: Read + AsFd> Capture<R> {
    fn new(pipe: R) -> Capture<R> {
        let pipe = rustix::io::ioctl_fionbio(&pipe, true).is_ok().then_some(pipe);
        Capture { pipe, kept: Vec::new() }
    }

    /// Reads what the pipe holds now, up to [`VERSION_READ_PER_TICK`] bytes,
    /// keeping the first [`VERSION_KEPT`]; at its end, or on an error, the
    /// pipe is dropped.
    fn drain(&mut self) {
        let Some(pipe) = &mut self.pipe else { return };
        let mut buf = [0; 8192];
        let mut read = 0;
        while read < VERSION_READ_PER_TICK {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    read += n;
                    let room = VERSION_KEPT - self.kept.len().min(VERSION_KEPT);
                    self.kept.extend_from_slice(&buf[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => break,
            }
        }
        if read < VERSION_READ_PER_TICK {
            self.pipe = None;
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_a_host_tool() {
        let tools = HostTools::new(Some("/nonexistent:/usr/bin:/bin".into()));
        let sh = tools.resolve("sh").unwrap();
        assert!(sh.path.is_absolute());
        assert_eq!(tools.resolve("sh").unwrap(), sh);
        assert!(matches!(tools.resolve("no-such-tool-pkg"), Err(ToolError::NotFound { .. })));
    }

    #[test]
    fn never_runs_files_from_the_working_directory() {
        // dash rejects `--version`; a fallback to `sh version` would run ./version.
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let script = format!("#!/bin/sh\ntouch {}\necho hijacked\n", marker.display());
        std::fs::write(dir.path().join("version"), script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("version"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        // Each test runs in its own process under nextest, so moving it is safe.
        std::env::set_current_dir(dir.path()).unwrap();
        let line = version_line("sh", Path::new("/bin/sh"));
        assert!(!line.contains("hijacked"));
        assert!(!marker.exists());
    }

    #[test]
    fn relative_tool_paths_are_refused() {
        let tools = HostTools::new(Some("/usr/bin:/bin".into()));
        assert!(matches!(tools.resolve("bin/gen"), Err(ToolError::RelativePath { .. })));
        assert!(tools.resolve("/bin/sh").is_ok());
    }

    /// Writes an executable script at `dir/name`.
    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_tool_printing_more_than_a_pipe_holds_still_gives_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let tool =
            script(dir.path(), "chatty", "echo chatty 1.2\n/usr/bin/head -c 1000000 /dev/zero\n");
        assert_eq!(version_line("chatty", &tool), "chatty 1.2");
    }

    #[test]
    fn a_process_left_holding_the_output_does_not_hang_the_probe() {
        let dir = tempfile::tempdir().unwrap();
        let pid = dir.path().join("pid");
        let body = format!("/bin/sleep 120 &\necho $! >{}\necho forks 3.4\n", pid.display());
        let tool = script(dir.path(), "forks", &body);
        let (sent, line) = std::sync::mpsc::channel();
        std::thread::spawn(move || sent.send(version_line("forks", &tool)));
        // Far more than a probe takes, far less than the sleep it left behind.
        let line = line.recv_timeout(std::time::Duration::from_secs(60));
        let pid: i32 = std::fs::read_to_string(&pid).unwrap().trim().parse().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        assert_eq!(line.as_deref(), Ok("forks 3.4"));
    }

    #[test]
    fn a_tool_writing_without_end_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let tool = script(dir.path(), "endless", "echo endless 5.6\nexec /usr/bin/yes\n");
        let (sent, line) = std::sync::mpsc::channel();
        std::thread::spawn(move || sent.send(version_line("endless", &tool)));
        // The probe gives up after its ten seconds of looks; a hang would not.
        let line = line.recv_timeout(std::time::Duration::from_secs(120));
        assert_eq!(line.as_deref(), Ok(""));
    }

    #[test]
    fn a_tool_failing_gives_no_version() {
        let dir = tempfile::tempdir().unwrap();
        let tool = script(dir.path(), "fails", "echo fails 1.0\nexit 3\n");
        assert_eq!(version_line("fails", &tool), "");
    }

    #[test]
    fn reads_version_lines() {
        let tools = HostTools::new(Some("/usr/bin:/bin".into()));
        let env = tools.resolve("env").unwrap();
        assert!(env.version.contains("env"), "{env:?}");
    }
}
