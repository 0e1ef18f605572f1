//! The sandbox, called as a library from this (multi-threaded) test process,
//! with host programs (/bin/sh, /bin/cat, …) bind-mounted read-only.
//!
//! Tests that need an unprivileged user run through `rootless_test!`; a few
//! run plainly too, as root in CI, where the sandbox must behave the same.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use pkg::sandbox::{
    ExecFailure, ExitStatus, IdMapping, Mount, Network, RootFs, Sandbox, SandboxError, SandboxSpec,
    Stdio, StdioSource, probe, subordinate_range,
};

/// The caller's uid and gid, from /proc (the library reads no ids itself).
fn caller_ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

fn build_mapping() -> IdMapping {
    let (uid, gid) = caller_ids();
    IdMapping::single(0, 0, uid, gid)
}

/// A build-like spec: host toolchain directories read-only, tmpfs /tmp,
/// running `sh -c SCRIPT`, stdout and stderr into `log`.
fn sh_spec(script: &str, log: &Path) -> SandboxSpec {
    let argv = vec!["/bin/sh".into(), "-c".into(), script.into()];
    let mut spec = SandboxSpec::new(build_mapping(), argv);
    for dir in ["/usr", "/bin", "/lib", "/lib64", "/sbin"] {
        // /bin and /lib are symlinks into /usr on merged-/usr systems: bind
        // the directory they resolve to.
        let path = Path::new(dir);
        if path.exists() {
            spec.mounts.push(Mount::bind_ro(path.canonicalize().unwrap(), dir));
        }
    }
    spec.mounts.push(Mount::tmpfs("/tmp"));
    spec.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
    spec.stdio = Stdio::log_to(OwnedFd::from(File::create(log).unwrap())).unwrap();
    spec
}

fn run(spec: &SandboxSpec) -> Result<ExitStatus, SandboxError> {
    Sandbox::new().run(spec)
}

struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        Case { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn log(&self) -> PathBuf {
        self.path("log")
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
    fn spec(&self, script: &str) -> SandboxSpec {
        sh_spec(script, &self.log())
    }
    fn run_ok(&self, script: &str) -> String {
        let status = run(&self.spec(script)).unwrap();
        assert_eq!(status, ExitStatus::Exited(0), "log:\n{}", self.log_text());
        self.log_text()
    }
}

crate::rootless_test! {
    fn sandbox_exit_code_passes_through() {
        let case = Case::new();
        assert_eq!(run(&case.spec("exit 3")).unwrap(), ExitStatus::Exited(3));
        assert_eq!(run(&case.spec("exit 3")).unwrap().code(), 3);
    }
}

crate::rootless_test! {
    fn sandbox_signal_death_is_128_plus_n() {
        let case = Case::new();
        let status = run(&case.spec("kill -TERM $$; sleep 5")).unwrap();
        assert_eq!(status, ExitStatus::Signaled(15));
        assert_eq!(status.code(), 143);
    }
}

crate::rootless_test! {
    fn sandbox_runs_as_root_inside_with_caller_mapped() {
        let case = Case::new();
        let out = case.run_ok("id -u; id -g; cat /proc/self/uid_map; hostname");
        let (uid, _) = caller_ids();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "0");
        assert_eq!(lines[1], "0");
        assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["0", &uid.to_string(), "1"]);
    }
}
