//! The rootless sandbox shared by builds and `pkg run`.
//!
//! [`Sandbox::run`] starts a launcher in new user, mount, PID, UTS, IPC and
//! (with [`Network::None`]) network namespaces, maps the caller's ids, builds
//! a new root from the [`SandboxSpec`], and runs the workload under it. The
//! launcher is PID 1 of the new PID namespace: it forwards signals, reaps
//! every zombie, and exits with the workload's status; when it exits the
//! kernel kills whatever is left in the namespace, so no process of the
//! sandbox survives [`Running::wait`].
//!
//! How the pieces fit:
//! - [`plan`] computes the whole setup as data before anything forks;
//! - [`sys`] is the only code that talks to the kernel ([`sys::Syscall`]);
//! - [`launcher`] interprets the plan in the cloned child without allocating
//!   (the caller may be multi-threaded; see its module docs);
//! - [`channel`] is the typed handshake between caller, launcher and workload;
//! - [`fuse`] serves an overlay root with fuse-overlayfs, for kernels that
//!   refuse overlayfs in a user namespace;
//! - [`terminal`] gives the workload a pseudo-terminal of the sandbox's own
//!   devpts ([`SandboxSpec::terminal`]) and relays it to the caller's.
//!
//! Network: with [`Network::None`] the sandbox has its own network namespace
//! holding only `lo`, which the launcher brings up (like `docker run
//! --network none`); nothing outside is reachable. [`Network::Disconnected`]
//! leaves `lo` down as well, so every address, 127.0.0.1 included, is
//! unreachable: builds use it ("no network at all").
//!
//! A build (`$out` and a private copy of the source read-write, host
//! toolchain read-only, output to a log):
//!
//! ```no_run
//! # use pkg::sandbox::*;
//! # fn build(uid: u32, gid: u32, out: &std::path::Path, src: &std::path::Path,
//! #          log: std::fs::File) -> Result<(), Box<dyn std::error::Error>> {
//! let argv = vec!["/bin/sh".into(), "-eu".into(), "-c".into(), "make install".into()];
//! let mut spec = SandboxSpec::new(IdMapping::single(0, 0, uid, gid), argv);
//! for dir in ["/usr", "/bin", "/lib", "/lib64", "/etc/alternatives"] {
//!     spec.mounts.push(Mount::bind_ro(dir, dir)); // symlinks are resolved
//! }
//! spec.mounts.push(Mount::bind_rw(src, "/src"));
//! spec.mounts.push(Mount::bind_rw(out, "/out"));
//! spec.mounts.push(Mount::tmpfs("/tmp"));
//! spec.env = vec![("PATH".into(), "/usr/bin:/bin".into()), ("TZ".into(), "UTC".into())];
//! spec.cwd = "/src".into();
//! spec.hostname = Some("pkg".into());
//! spec.new_session = true;
//! spec.stdio = Stdio::log_to(log.into())?;
//! let status = Sandbox::new().run(&spec)?;
//! # Ok(()) }
//! ```
//!
//! `pkg run` (overlay of the image's layer checkouts, standard streams
//! passed through, the image's user; the CLI exits with [`ExitStatus::code`]
//! or [`SandboxError::exit_code`]; `-t` adds a [`Terminal`]):
//!
//! ```no_run
//! # use pkg::sandbox::*;
//! # fn run(uid: u32, gid: u32, layers: Vec<std::path::PathBuf>,
//! #        argv: Vec<std::ffi::OsString>) -> i32 {
//! let mut spec = SandboxSpec::new(IdMapping::single(65532, 65532, uid, gid), argv);
//! spec.root = RootFs::Overlay { layers }; // base layer first
//! spec.network = Network::Host;
//! spec.mounts.push(Mount::bind_ro("/etc/resolv.conf", "/etc/resolv.conf"));
//! spec.mounts.push(Mount::bind_rw("/home/me/data", "/data")); // -v /home/me/data:/data
//! match Sandbox::new().run(&spec) {
//!     Ok(status) => status.code(),
//!     Err(err) => err.exit_code(),
//! }
//! # }
//! ```
//!
//! With `/etc/subuid` granting a range, [`IdMapping::subordinate`] maps a
//! full range of ids through newuidmap/newgidmap and [`SandboxSpec::user`]
//! switches the workload to the image's user.
//!
//! Mount points inside the new root are created by path once the host's root
//! is detached (see [`plan`]), so symlinks in image layers cannot lead the
//! launcher to host files. They can still point a mount point into another
//! bind mount of the same sandbox (e.g. a read-write volume); full
//! containment would need `openat2(RESOLVE_IN_ROOT)` or `open_tree` fds.

pub mod channel;
pub mod fuse;
pub mod idmap;
pub mod launcher;
pub mod plan;
pub mod sys;
pub mod terminal;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::SigmaskHow;
use nix::unistd::Pid;

pub use idmap::{IdMapping, IdRange, MapMethod, subordinate_range};
pub use terminal::Terminal;

use channel::{CallerEnd, ChannelError, LaunchStep, LauncherEnd, Report};
use launcher::{Launch, launcher_main, launcher_signals};
use plan::{HostSource, Plan, SourceKind, Step};
use sys::{Forked, LinuxSyscall, Syscall};
use terminal::Relay;

/// Everything that defines one sandboxed process.
#[derive(Debug)]
pub struct SandboxSpec {
    /// How the caller's ids (and subordinate ranges) appear inside.
    pub id_mapping: IdMapping,
    /// Ids (uid, gid) the workload switches to before exec; `None` keeps the
    /// launcher's (the inside id the caller is mapped to).
    pub user: Option<(u32, u32)>,
    /// The supplementary groups the workload switches to along with `user`,
    /// where the mapping allows `setgroups` (one written by newgidmap; a
    /// single-id mapping denies it, and the groups stay as they are).
    pub groups: Vec<u32>,
    pub network: Network,
    pub root: RootFs,
    /// Bind and tmpfs mounts, applied parents first whatever their order.
    pub mounts: Vec<Mount>,
    /// Files (absolute path, contents) written into the new root after the
    /// mounts, mode 0644, parents created as needed; on an overlay root they
    /// land in the upper layer and vanish with the sandbox.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// `None` keeps the (new UTS namespace's copy of the) host's hostname.
    pub hostname: Option<String>,
    /// The workload's whole environment, in order; nothing else is passed.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox; created if missing.
    pub cwd: PathBuf,
    /// The command line. A program without `/` is looked up in the `PATH` of
    /// `env` (or the usual default) inside the sandbox.
    pub argv: Vec<OsString>,
    pub stdio: Stdio,
    pub umask: u32,
    /// Run the workload in a new session without a controlling terminal
    /// (builds, `pkg run`), so it cannot reach the caller's terminal through
    /// `/dev/tty`. `false` keeps the caller's session and process group, so
    /// the caller's terminal passes through with job control. A
    /// [`SandboxSpec::terminal`] always has a session of its own.
    pub new_session: bool,
    /// Give the workload a new pseudo-terminal of the sandbox's own devpts
    /// as controlling terminal and fds 0–2, relayed to the caller's
    /// (`pkg run -t`); see [`terminal`].
    pub terminal: Option<Terminal>,
    /// Put the launcher (and so the workload) in a process group of its own
    /// (`pkg run` without a terminal): a signal sent to the caller's whole
    /// group then reaches the workload once, forwarded, not twice.
    pub own_process_group: bool,
}

impl SandboxSpec {
    /// A spec with a tmpfs root, no network, `/` as working directory,
    /// umask 022, inherited stdio, running `argv` with an empty environment.
    pub fn new(id_mapping: IdMapping, argv: Vec<OsString>) -> Self {
        SandboxSpec {
            id_mapping,
            user: None,
            groups: Vec::new(),
            network: Network::None,
            root: RootFs::Tmpfs,
            mounts: Vec::new(),
            files: Vec::new(),
            hostname: None,
            env: Vec::new(),
            cwd: PathBuf::from("/"),
            argv,
            stdio: Stdio::inherit(),
            umask: 0o022,
            new_session: false,
            own_process_group: false,
            terminal: None,
        }
    }
}

/// Network access of the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// A new network namespace with only `lo` (up): no access outside.
    None,
    /// A new network namespace with `lo` down: no address is reachable.
    Disconnected,
    /// The host's network namespace.
    Host,
}

/// The filesystem mounted as the sandbox's `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootFs {
    /// An empty tmpfs; everything else comes from [`Mount`]s.
    Tmpfs,
    /// An overlay of read-only host directories with a tmpfs upper layer:
    /// writes vanish when the sandbox ends. `layers` in OCI order: the base
    /// layer first.
    Overlay { layers: Vec<PathBuf> },
    /// The same overlay served by fuse-overlayfs (`program`, an absolute host
    /// path), for kernels that refuse overlayfs in a user namespace. Its
    /// daemon runs in the sandbox's user and PID namespaces (the workload
    /// sees it in `/proc`) and ends with the sandbox; see [`fuse`].
    FuseOverlay { layers: Vec<PathBuf>, program: PathBuf },
}

impl RootFs {
    /// An [`RootFs::Overlay`] served by fuse-overlayfs (`program`) instead
    /// of the kernel; any other root as it is.
    pub fn with_fuse_overlayfs(self, program: &Path) -> RootFs {
        match self {
            RootFs::Overlay { layers } => {
                RootFs::FuseOverlay { layers, program: program.to_path_buf() }
            }
            other => other,
        }
    }
}

/// One mount inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    pub kind: MountKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountKind {
    /// A recursive bind mount of an absolute host path (directory or file).
    Bind { source: PathBuf, read_only: bool },
    /// A fresh tmpfs (mode 1777).
    Tmpfs,
}

impl Mount {
    pub fn bind_ro(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        Mount {
            target: target.into(),
            kind: MountKind::Bind { source: source.into(), read_only: true },
        }
    }

    pub fn bind_rw(source: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        Mount {
            target: target.into(),
            kind: MountKind::Bind { source: source.into(), read_only: false },
        }
    }

    pub fn tmpfs(target: impl Into<PathBuf>) -> Self {
        Mount { target: target.into(), kind: MountKind::Tmpfs }
    }
}

/// A terminal's window size, in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// The workload's standard streams.
#[derive(Debug)]
pub struct Stdio {
    pub stdin: StdioSource,
    pub stdout: StdioSource,
    pub stderr: StdioSource,
}

impl Stdio {
    /// The caller's streams (what `pkg run` passes through).
    pub fn inherit() -> Self {
        Stdio {
            stdin: StdioSource::Inherit,
            stdout: StdioSource::Inherit,
            stderr: StdioSource::Inherit,
        }
    }

    /// `/dev/null` for all three.
    pub fn null() -> Self {
        Stdio { stdin: StdioSource::Null, stdout: StdioSource::Null, stderr: StdioSource::Null }
    }

    /// No input; stdout and stderr both to `log` (what builds use).
    pub fn log_to(log: OwnedFd) -> std::io::Result<Self> {
        let stderr = log.try_clone()?;
        Ok(Stdio {
            stdin: StdioSource::Null,
            stdout: StdioSource::Fd(log),
            stderr: StdioSource::Fd(stderr),
        })
    }
}

#[derive(Debug)]
pub enum StdioSource {
    Inherit,
    /// `/dev/null`.
    Null,
    /// A file, pipe or socket of the caller's. The workload gets a duplicate;
    /// a pipe's reader sees EOF once the workload's processes and the
    /// caller's own copy (this value) are closed. [`Sandbox::run`] blocks, so
    /// drain a pipe from another thread (or use [`Sandbox::spawn`]).
    Fd(OwnedFd),
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled(i32),
}

impl ExitStatus {
    /// The docker/podman exit code: the workload's code, or 128+N for signal N.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(signal) => 128 + signal,
        }
    }

    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

/// Why exec of the workload failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecFailure {
    /// No such program (exit code 127).
    NotFound,
    /// Found but not executable: permissions, format (exit code 126).
    CannotExecute,
}

impl std::fmt::Display for ExecFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExecFailure::NotFound => "not found",
            ExecFailure::CannotExecute => "not executable",
        })
    }
}

/// Everything that can go wrong before or around the workload.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    #[error("cannot inspect mount source {}", path.display())]
    MountSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the workload's standard streams")]
    Stdio(#[source] std::io::Error),
    #[error("cannot create the handshake pipes")]
    Pipe(#[source] Errno),
    #[error("cannot block the launcher's signals before the clone")]
    SignalMask(#[source] Errno),
    #[error("cannot forward signals to the sandbox")]
    Forward(#[source] Errno),
    #[error(
        "cannot clone a process into new namespaces (are unprivileged user namespaces enabled?)"
    )]
    Clone(#[source] Errno),
    #[error("cannot write the id mapping of the sandbox")]
    IdMap(#[source] idmap::IdMapError),
    /// The kernel would not mount an [`RootFs::Overlay`] root.
    #[error("the kernel refuses overlayfs in a user namespace: {step}")]
    OverlayRefused {
        step: String,
        #[source]
        source: Errno,
    },
    /// fuse-overlayfs could not serve a [`RootFs::FuseOverlay`] root.
    #[error("fuse-overlayfs cannot serve the root filesystem: {step}")]
    FuseOverlay {
        step: String,
        #[source]
        source: Errno,
    },
    #[error("sandbox setup failed: {step}")]
    Setup {
        step: String,
        #[source]
        source: Errno,
    },
    #[error("cannot execute `{program}`: {failure}")]
    Exec {
        program: String,
        failure: ExecFailure,
        #[source]
        source: Errno,
    },
    #[error("handshake with the sandbox launcher failed")]
    Handshake(#[source] ChannelError),
    #[error("waiting for the sandbox launcher failed")]
    Wait(#[source] Errno),
    #[error("the sandbox launcher ended without a report ({0:?})")]
    LauncherDied(ExitStatus),
    #[error("cannot relay the workload's terminal")]
    Terminal(#[source] Errno),
}

impl SandboxError {
    /// The docker/podman exit code for this failure: 127 not found, 126
    /// cannot execute, 125 for every failure of the sandbox itself.
    pub fn exit_code(&self) -> i32 {
        match self {
            SandboxError::Exec { failure: ExecFailure::NotFound, .. } => 127,
            SandboxError::Exec { failure: ExecFailure::CannotExecute, .. } => 126,
            _ => 125,
        }
    }
}

/// Starts sandboxes. Holds the host paths the caller may redirect in tests.
#[derive(Debug, Clone)]
pub struct Sandbox {
    proc_root: PathBuf,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox { proc_root: PathBuf::from("/proc") }
    }
}

impl Sandbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the caller's `/proc` is (for `/proc/PID/uid_map`).
    pub fn with_proc_root(mut self, proc_root: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self
    }

    /// Runs `spec` to completion (relaying its terminal, if it has one).
    pub fn run(&self, spec: &SandboxSpec) -> Result<ExitStatus, SandboxError> {
        self.spawn(spec)?.wait()
    }

    /// [`Sandbox::run`], forwarding the caller's SIGINT, SIGTERM, SIGHUP,
    /// SIGQUIT, SIGUSR1 and SIGUSR2 to the workload from before the sandbox
    /// starts until it has ended (what `pkg run` does, like `docker run`'s
    /// signal proxy; see [`sys::forward`]), and relaying its terminal, if it
    /// has one, until the workload's side of it is closed.
    pub fn run_forwarding(&self, spec: &SandboxSpec) -> Result<ExitStatus, SandboxError> {
        use nix::sys::wait::{Id, WaitPidFlag, waitid};
        // In the caller's process group, the terminal's signals reach the
        // workload directly; in its own, only what is forwarded does.
        let forward_kernel = spec.own_process_group;
        let forwarder = sys::forward::Forwarder::install(&launcher::FORWARDED, forward_kernel)
            .map_err(SandboxError::Forward)?;
        let mut running = self.spawn(spec)?;
        let pid = running.pid.expect("a running sandbox has a launcher");
        forwarder.attach(pid);
        if let Err(error) = running.relay_terminal() {
            // No forwarding to a launcher that dropping `running` reaps.
            forwarder.detach();
            return Err(error);
        }
        // Wait without reaping: the pid stays ours until forwarding stops.
        loop {
            match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(SandboxError::Wait(errno)),
                Ok(_) => break,
            }
        }
        forwarder.detach();
        running.wait()
    }

    /// Starts `spec` and returns once the workload has been exec'd. The
    /// sandbox is killed when the calling thread exits. A
    /// [`SandboxSpec::terminal`] is relayed by [`Running::wait`]: until
    /// then, a workload that fills its terminal waits.
    pub fn spawn(&self, spec: &SandboxSpec) -> Result<Running, SandboxError> {
        let plan = Plan::new(spec, &resolve_host_source)?;
        self.start(spec, &plan, false)
    }

    fn start(
        &self,
        spec: &SandboxSpec,
        plan: &Plan,
        setup_only: bool,
    ) -> Result<Running, SandboxError> {
        let sys = LinuxSyscall;
        let mut relay = match &spec.terminal {
            Some(terminal) => {
                Some(Relay::new(terminal, &spec.stdio.stdout).map_err(SandboxError::Stdio)?)
            }
            None => None,
        };
        // With a terminal, the launcher's own fds 0–2 (see launcher.rs).
        let stdio = if relay.is_some() { &Stdio::null() } else { &spec.stdio };
        let stdio = PreparedStdio::new(stdio).map_err(SandboxError::Stdio)?;
        let (launcher_read, caller_write) = sys.pipe().map_err(SandboxError::Pipe)?;
        let (caller_read, launcher_write) = sys.socket_pair().map_err(SandboxError::Pipe)?;
        let signals = launcher_signals();
        let launch = Launch {
            plan,
            channel: LauncherEnd::new(&launcher_read, &launcher_write),
            stdio: stdio.raw(),
            setup_only,
            signals: &signals,
            terminal: relay.as_ref().map(Relay::size),
        };

        // Blocked before the clone so the launcher inherits the mask and no
        // forwarded signal or SIGCHLD is lost before it waits for them.
        let mut old_mask = nix::sys::signal::SigSet::empty();
        sys.sigmask(SigmaskHow::SIG_BLOCK, &signals, Some(&mut old_mask))
            .map_err(SandboxError::SignalMask)?;
        let forked = sys.clone_process(plan.clone_flags);
        if let Ok(Forked::Child) = forked {
            // Nothing in the launcher may panic; should it anyway, never
            // unwind into the caller's code in this copy of its process.
            let _guard = ExitOnUnwind;
            launcher_main(&sys, &launch);
        }
        // Restoring the mask of a thread that had it a moment ago cannot fail.
        let _ = sys.sigmask(SigmaskHow::SIG_SETMASK, &old_mask, None);
        let Forked::Parent { child } = forked.map_err(SandboxError::Clone)? else {
            unreachable!("the child branch never returns")
        };
        drop((launcher_read, launcher_write));

        let mut running = Running {
            pid: Some(child),
            channel: CallerEnd::new(caller_write, caller_read),
            program: plan.exec.program.clone(),
            terminal: None,
        };
        let mapped = idmap::write_id_maps(&self.proc_root, child.as_raw(), &spec.id_mapping)
            .map_err(SandboxError::IdMap)
            .and_then(|()| running.channel.ack_mapping().map_err(SandboxError::Handshake));
        let report =
            mapped.and_then(|()| running.channel.wait_for_start().map_err(SandboxError::Handshake));
        drop(stdio);
        let failure = match report {
            Ok((Report::Started, master)) => {
                if let (Some(relay), Some(master)) = (&mut relay, master) {
                    relay.attach(master);
                }
                if relay.as_ref().is_none_or(Relay::has_master) {
                    running.terminal = relay;
                    return Ok(running);
                }
                SandboxError::Handshake(ChannelError::Garbled)
            }
            Ok((Report::SetupFailed { step, errno }, _)) => {
                let failed = match step {
                    LaunchStep::Plan(i) => plan.steps.get(i as usize),
                    _ => None,
                };
                let step = describe(plan, step);
                match failed {
                    Some(Step::Mount { fstype: Some(fstype), .. }) if **fstype == *c"overlay" => {
                        SandboxError::OverlayRefused { step, source: errno }
                    }
                    Some(Step::FuseOverlay(_)) => SandboxError::FuseOverlay { step, source: errno },
                    _ => SandboxError::Setup { step, source: errno },
                }
            }
            Ok((Report::ExecFailed { errno }, _)) => SandboxError::Exec {
                program: plan.exec.program.clone(),
                failure: if errno == Errno::ENOENT {
                    ExecFailure::NotFound
                } else {
                    ExecFailure::CannotExecute
                },
                source: errno,
            },
            Ok((Report::Exited { .. }, _)) => SandboxError::Handshake(ChannelError::Garbled),
            Err(e) => e,
        };
        running.kill();
        Err(failure)
    }
}

/// Ends a cloned child that unwinds instead of letting it return.
struct ExitOnUnwind;

impl Drop for ExitOnUnwind {
    fn drop(&mut self) {
        LinuxSyscall.exit(125)
    }
}

fn describe(plan: &Plan, step: LaunchStep) -> String {
    match step {
        LaunchStep::Plan(i) => {
            plan.steps.get(i as usize).map_or_else(|| format!("step {i}"), ToString::to_string)
        }
        LaunchStep::CreateExecPipe => "create the exec pipe".into(),
        LaunchStep::ForkWorkload => "fork the workload".into(),
        LaunchStep::SwitchUser => "switch to the workload's user".into(),
        LaunchStep::RedirectStdio => "redirect the workload's standard streams".into(),
        LaunchStep::ResetSignals => "reset the workload's signal state".into(),
        LaunchStep::Exec => "exec the workload".into(),
        LaunchStep::NewSession => "start a new session for the workload".into(),
        LaunchStep::Unshare => format!("unshare the namespaces {:?}", plan.unshare_flags),
        LaunchStep::OpenTerminal => "open a pseudo-terminal in /dev/pts".into(),
        LaunchStep::ControllingTerminal => "make the pseudo-terminal the workload's".into(),
    }
}

fn resolve_host_source(path: &Path) -> std::io::Result<HostSource> {
    let path = std::fs::canonicalize(path)?;
    let kind =
        if std::fs::metadata(&path)?.is_dir() { SourceKind::Directory } else { SourceKind::File };
    Ok(HostSource { path, kind })
}

/// The workload's stdio as descriptors numbered 3 or more (so redirecting
/// one never clobbers another), kept open until the workload has started.
struct PreparedStdio {
    fds: [Option<OwnedFd>; 3],
}

impl PreparedStdio {
    fn new(stdio: &Stdio) -> std::io::Result<Self> {
        let prepare = |source: &StdioSource| -> std::io::Result<Option<OwnedFd>> {
            Ok(match source {
                StdioSource::Inherit => None,
                StdioSource::Null => {
                    Some(OwnedFd::from(File::options().read(true).write(true).open("/dev/null")?))
                }
                // try_clone duplicates with F_DUPFD_CLOEXEC from 3 up.
                StdioSource::Fd(fd) => Some(fd.try_clone()?),
            })
        };
        Ok(PreparedStdio {
            fds: [prepare(&stdio.stdin)?, prepare(&stdio.stdout)?, prepare(&stdio.stderr)?],
        })
    }

    fn raw(&self) -> [Option<std::os::fd::RawFd>; 3] {
        [0, 1, 2].map(|i| self.fds[i].as_ref().map(AsRawFd::as_raw_fd))
    }
}

/// A started sandbox. Dropping it without [`Running::wait`] kills it.
#[derive(Debug)]
pub struct Running {
    pid: Option<Pid>,
    channel: CallerEnd,
    program: String,
    /// The workload's terminal, until relayed.
    terminal: Option<Relay>,
}

impl Running {
    /// The launcher's process id in the caller's PID namespace. Signals sent
    /// to it that the launcher forwards reach the workload.
    pub fn pid(&self) -> u32 {
        self.pid.map_or(0, |p| p.as_raw() as u32)
    }

    /// Waits for the workload to end (relaying its terminal, if it has
    /// one, until then); every process of the sandbox is gone when this
    /// returns.
    pub fn wait(mut self) -> Result<ExitStatus, SandboxError> {
        self.relay_terminal()?;
        let pid = self.pid.take().expect("a running sandbox has a launcher");
        let status = match LinuxSyscall.wait_pid(pid, false) {
            Ok(Some((_, status))) => status,
            Ok(None) => unreachable!("a blocking waitpid returns a status"),
            Err(errno) => return Err(SandboxError::Wait(errno)),
        };
        match self.channel.wait_for_exit().map_err(SandboxError::Handshake)? {
            Some(wait_status) => Ok(sys::decode_wait_status(wait_status)),
            None => Err(SandboxError::LauncherDied(sys::decode_wait_status(status))),
        }
    }

    /// Relays the workload's terminal, if it has one, until the workload's
    /// side of it is closed (see [`terminal`]); then returns at once.
    fn relay_terminal(&mut self) -> Result<(), SandboxError> {
        match self.terminal.take() {
            Some(relay) => relay.run().map_err(SandboxError::Terminal),
            None => Ok(()),
        }
    }

    /// The program the sandbox runs, as named in the spec.
    pub fn program(&self) -> &str {
        &self.program
    }

    fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = LinuxSyscall.kill(pid, nix::sys::signal::Signal::SIGKILL as i32);
            let _ = LinuxSyscall.wait_pid(pid, false);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What [`probe`] found out about this host.
#[derive(Debug)]
pub struct Probe {
    /// Unprivileged user namespaces with the full mount setup (tmpfs root,
    /// `/proc`, `/dev`, pivot_root).
    pub user_namespaces: Result<(), SandboxError>,
    /// An overlay root inside such a namespace.
    pub overlay: Result<(), SandboxError>,
}

/// Checks that sandboxes work here (for `pkg doctor`): runs the launcher's
/// whole setup without a workload, once with a tmpfs root and once with an
/// overlay root whose single layer is a directory created under `scratch`.
pub fn probe(id_mapping: &IdMapping, scratch: &Path) -> Probe {
    let user_namespaces = probe_root(id_mapping, RootFs::Tmpfs);
    let overlay = probe_layer(scratch)
        .and_then(|layer| probe_root(id_mapping, RootFs::Overlay { layers: vec![layer] }));
    Probe { user_namespaces, overlay }
}

/// Checks that fuse-overlayfs (`program`) serves an overlay root here, as
/// [`probe`] checks the kernel's overlayfs (for `pkg doctor`).
pub fn probe_fuse_overlay(
    id_mapping: &IdMapping,
    scratch: &Path,
    program: &Path,
) -> Result<(), SandboxError> {
    let layers = vec![probe_layer(scratch)?];
    probe_root(id_mapping, RootFs::FuseOverlay { layers, program: program.to_path_buf() })
}

/// The launcher's whole setup with `root`, without a workload.
fn probe_root(id_mapping: &IdMapping, root: RootFs) -> Result<(), SandboxError> {
    let mut spec = SandboxSpec::new(id_mapping.clone(), vec!["/probe".into()]);
    spec.root = root;
    let plan = Plan::new(&spec, &resolve_host_source)?;
    Sandbox::new().start(&spec, &plan, true)?.wait().map(drop)
}

/// An empty directory under `scratch`, the probes' single layer.
fn probe_layer(scratch: &Path) -> Result<PathBuf, SandboxError> {
    let layer = scratch.join("probe-layer");
    std::fs::create_dir_all(&layer)
        .map_err(|e| SandboxError::MountSource { path: layer.clone(), source: e })?;
    Ok(layer)
}
