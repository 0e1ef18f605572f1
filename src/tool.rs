//! Host tools a build may run, and their identity for build keys.
//!
//! A tool's identity is its resolved path (symlinks followed), the blake3 of
//! the binary, and the first line its `--version` prints: upgrading the Go
//! toolchain changes the key of every Go build, as it should. Resolution uses
//! the `PATH` the caller passes in; this module never reads the environment.

use std::collections::HashMap;
use std::ffi::OsString;
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

    /// The first executable named `name` on the search path, symlinks followed.
    pub fn which(&self, name: &str) -> Option<PathBuf> {
        if name.contains('/') {
            return is_executable(Path::new(name)).then(|| PathBuf::from(name));
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
        let path =
            self.which(name).ok_or_else(|| ToolError::NotFound { name: name.to_string() })?;
        let read_error =
            |source| ToolError::Read { name: name.to_string(), path: path.clone(), source };
        let mut hasher = blake3::Hasher::new();
        let file = std::fs::File::open(&path).map_err(read_error)?;
        hasher.update_reader(file).map_err(read_error)?;
        let identity = ToolIdentity {
            name: name.to_string(),
            version: version_line(&path),
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

/// The first non-empty line of `TOOL --version`, or of `TOOL version` for tools
/// like `go` that have no `--version` flag; empty when neither answers. The
/// tool runs with an empty environment so the answer does not depend on ours.
fn version_line(path: &Path) -> String {
    for arg in ["--version", "version"] {
        let output = Command::new(path).arg(arg).env_clear().stdin(Stdio::null()).output();
        if let Ok(out) = output
            && out.status.success()
        {
            let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
            if let Some(line) =
                String::from_utf8_lossy(&text).lines().map(str::trim).find(|l| !l.is_empty())
            {
                return line.to_string();
            }
        }
    }
    String::new()
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
    fn reads_version_lines() {
        let tools = HostTools::new(Some("/usr/bin:/bin".into()));
        let env = tools.resolve("env").unwrap();
        assert!(env.version.contains("env"), "{env:?}");
    }
}
