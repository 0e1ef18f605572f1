//! The launcher's setup as pure data, computed in the caller before any clone.
//!
//! [`Plan::new`] turns a [`SandboxSpec`] into an ordered list of [`Step`]s,
//! every path already a `CString`, so the launcher only interprets the list
//! ([`run_steps`]) and never allocates. Invariants the order keeps:
//!
//! 1. propagation is made private before anything is mounted;
//! 2. a staging tmpfs becomes the root first, with the host's root at
//!    [`OLD_ROOT`]: every host path is read through that prefix, so sources
//!    under the host's `/tmp` stay reachable;
//! 3. the new root is assembled at [`NEW_ROOT`]: root filesystem, bind
//!    sources staged at `/staged/N`, `/proc` and `/dev`;
//! 4. the host root is detached before any mount point is created inside
//!    the new root (a symlink in an image layer cannot reach host files),
//!    then the caller's mounts follow, parents before children;
//! 5. the staging root is detached after the final `pivot_root`, so nothing
//!    of the host stays reachable except what was bind-mounted;
//! 6. hostname, loopback, working directory, umask and `no_new_privs` come
//!    last, once the process lives in its final root.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::unistd::Gid;

use super::fuse::FuseOverlay;
use super::sys::{CStringArray, Syscall};
use super::{MountKind, Network, RootFs, SandboxError, SandboxSpec};

/// Where the staging tmpfs is mounted, in the host's (private copy of the)
/// mount tree. It must exist on the host; `/tmp` always does.
pub const STAGING: &str = "/tmp";
/// The host's root, once the staging tmpfs is the root.
pub const OLD_ROOT: &str = "/oldroot";
/// The sandbox's future root, inside the staging tmpfs.
pub const NEW_ROOT: &str = "/newroot";

/// The longest option string `mount(2)` passes on whole (one page, NUL included).
const MOUNT_DATA_MAX: usize = 4096;

/// Host device nodes bound into the minimal `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The default `PATH` used to find a bare program name when the given
/// environment has none (the one docker and podman use).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether a bind mount source is a directory or something else (a file or
/// a device), which decides what the launcher creates as the mount point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Directory,
    File,
}

/// A host path as it will be mounted: symlinks resolved by the caller (the
/// launcher resolves paths below [`OLD_ROOT`], where a host's absolute
/// symlink would point into the staging root instead), and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSource {
    pub path: PathBuf,
    pub kind: SourceKind,
}

/// One operation of the launcher's setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    SetUmask(u32),
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: MsFlags,
        data: Option<CString>,
    },
    /// Recursively read-only, other mount flags kept.
    SetReadOnly(CString),
    /// Lazily detach the mount (`MNT_DETACH`).
    Detach(CString),
    /// Create a directory (mode 0755); an existing one is fine.
    Mkdir(CString),
    /// Create an empty file as a mount point; an existing one is fine.
    Touch(CString),
    /// Replace a regular file's contents.
    WriteFile {
        path: CString,
        contents: Vec<u8>,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    PivotRoot {
        new_root: CString,
        put_old: CString,
    },
    Chdir(CString),
    SetHostname(CString),
    LoopbackUp,
    NoNewPrivs,
    /// Mount the overlay root with fuse-overlayfs and start its daemon.
    FuseOverlay(Box<FuseOverlay>),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Step::SetUmask(mode) => write!(f, "set umask {mode:03o}"),
            Step::Mount { source, target, fstype, flags, data } => {
                let source = source.as_ref().map_or("none".into(), s);
                write!(f, "mount {source} on {}", s(target))?;
                if let Some(fstype) = fstype {
                    write!(f, " type {}", s(fstype))?;
                }
                write!(f, " ({})", flag_names(*flags))?;
                if let Some(data) = data {
                    write!(f, " [{}]", s(data))?;
                }
                Ok(())
            }
            Step::SetReadOnly(target) => write!(f, "make {} read-only", s(target)),
            Step::Detach(target) => write!(f, "detach {}", s(target)),
            Step::Mkdir(path) => write!(f, "create directory {}", s(path)),
            Step::Touch(path) => write!(f, "create file {}", s(path)),
            Step::WriteFile { path, contents } => {
                write!(f, "write {} bytes to {}", contents.len(), s(path))
            }
            Step::Symlink { target, link } => write!(f, "link {} -> {}", s(link), s(target)),
            Step::PivotRoot { new_root, put_old } => {
                write!(f, "pivot_root to {} (old root at {})", s(new_root), s(put_old))
            }
            Step::Chdir(path) => write!(f, "change directory to {}", s(path)),
            Step::SetHostname(name) => write!(f, "set hostname {}", s(name)),
            Step::LoopbackUp => write!(f, "bring loopback up"),
            Step::NoNewPrivs => write!(f, "set no_new_privs"),
            Step::FuseOverlay(fuse) => {
                let (program, target, device) =
                    (s(&fuse.program), s(&fuse.target), s(&fuse.device));
                write!(f, "start {program} on {target} through {device}")
            }
        }
    }
}

fn flag_names(flags: MsFlags) -> String {
    let names: Vec<&str> = [
        (MsFlags::MS_BIND, "bind"),
        (MsFlags::MS_REC, "rec"),
        (MsFlags::MS_PRIVATE, "private"),
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_NOSUID, "nosuid"),
        (MsFlags::MS_NODEV, "nodev"),
        (MsFlags::MS_NOEXEC, "noexec"),
    ]
    .into_iter()
    .filter(|(flag, _)| flags.contains(*flag))
    .map(|(_, name)| name)
    .collect();
    if names.is_empty() { "defaults".into() } else { names.join(",") }
}

/// What the workload does between the launcher's fork and `execve`.
#[derive(Debug)]
pub struct ExecPlan {
    /// Paths to try in order (`PATH` search done up front); the first that
    /// does not fail with ENOENT decides.
    pub candidates: Vec<CString>,
    pub argv: CStringArray,
    pub env: CStringArray,
    /// Switch to these ids (and supplementary groups, where allowed).
    pub credentials: Option<Credentials>,
    /// The program as the caller named it, for error messages.
    pub program: String,
    /// Start the workload in a new session, away from the caller's terminal
    /// (always with [`SandboxSpec::terminal`]).
    pub new_session: bool,
    /// The launcher starts a process group of its own.
    pub own_process_group: bool,
}

/// Process ids the workload switches to before exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// The supplementary groups to set, where `setgroups` is allowed (a
    /// mapping written by newgidmap, not a single-id mapping): `None` leaves
    /// them as they are.
    pub groups: Option<Vec<Gid>>,
}

/// The launcher's whole setup.
#[derive(Debug)]
pub struct Plan {
    /// The namespaces the launcher is cloned into: a user namespace, whose
    /// id maps the caller writes, and the PID namespace it is PID 1 of.
    pub clone_flags: CloneFlags,
    /// The namespaces the launcher unshares itself while the caller writes
    /// its id maps (a network namespace alone takes about half a
    /// millisecond to make, as long as newuidmap takes to start).
    pub unshare_flags: CloneFlags,
    pub steps: Vec<Step>,
    pub exec: ExecPlan,
}

fn cstring(bytes: &[u8], what: &str) -> Result<CString, SandboxError> {
    CString::new(bytes)
        .map_err(|_| SandboxError::InvalidSpec(format!("{what} contains a NUL byte")))
}

fn path_cstring(path: &Path) -> Result<CString, SandboxError> {
    cstring(path.as_os_str().as_bytes(), &format!("path {}", path.display()))
}

/// Checks that `path` is absolute with no `..`, and returns its normal components.
fn absolute_components<'p>(path: &'p Path, what: &str) -> Result<Vec<&'p OsStr>, SandboxError> {
    if !path.is_absolute() {
        return Err(SandboxError::InvalidSpec(format!(
            "{what} {} is not an absolute path",
            path.display()
        )));
    }
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => parts.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(SandboxError::InvalidSpec(format!(
                    "{what} {} must not contain `..`",
                    path.display()
                )));
            }
        }
    }
    Ok(parts)
}

/// `prefix` joined with the normal components of `path`.
fn under(prefix: &str, parts: &[&OsStr]) -> PathBuf {
    let mut out = PathBuf::from(prefix);
    out.extend(parts);
    out
}

/// A host path as the launcher sees it after the first pivot.
fn host_path(path: &Path, what: &str) -> Result<CString, SandboxError> {
    path_cstring(&under(OLD_ROOT, &absolute_components(path, what)?))
}

struct Builder {
    steps: Vec<Step>,
    /// Directories already created, so shared parents are created once.
    made: std::collections::HashSet<CString>,
}

impl Builder {
    fn push(&mut self, step: Step) {
        if let Step::Mkdir(path) = &step
            && !self.made.insert(path.clone())
        {
            return;
        }
        self.steps.push(step);
    }

    fn mount(&mut self, source: &str, target: CString, fstype: &str, flags: MsFlags, data: &str) {
        self.push(Step::Mount {
            source: Some(CString::new(source).expect("static source")),
            target,
            fstype: Some(CString::new(fstype).expect("static fstype")),
            flags,
            data: (!data.is_empty()).then(|| CString::new(data).expect("static data")),
        });
    }

    fn mkdir(&mut self, path: &str) {
        self.push(Step::Mkdir(CString::new(path).expect("static path")));
    }

    /// Creates every directory of `parts` below the new root, and the last
    /// one as `kind` (a directory, or an empty file for a file mount).
    fn mount_point(&mut self, parts: &[&OsStr], kind: SourceKind) -> Result<CString, SandboxError> {
        for depth in 1..parts.len() {
            self.push(Step::Mkdir(path_cstring(&under(NEW_ROOT, &parts[..depth]))?));
        }
        let target = path_cstring(&under(NEW_ROOT, parts))?;
        match kind {
            SourceKind::Directory if !parts.is_empty() => self.push(Step::Mkdir(target.clone())),
            SourceKind::Directory => {}
            SourceKind::File => self.push(Step::Touch(target.clone())),
        }
        Ok(target)
    }
}

impl Plan {
    /// Computes the launcher's setup for `spec`. `resolve` canonicalises a
    /// host path and says whether it is a directory (the caller asks the
    /// filesystem; tests fake it).
    pub fn new(
        spec: &SandboxSpec,
        resolve: &dyn Fn(&Path) -> std::io::Result<HostSource>,
    ) -> Result<Plan, SandboxError> {
        let mut b = Builder { steps: Vec::new(), made: Default::default() };
        let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;

        // Predictable modes for what the setup creates; the spec's umask is set last.
        b.push(Step::SetUmask(0o022));
        b.push(Step::Mount {
            source: None,
            target: c"/".into(),
            fstype: None,
            flags: MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            data: None,
        });
        b.mount(
            "tmpfs",
            CString::new(STAGING).expect("static"),
            "tmpfs",
            nosuid_nodev,
            "mode=0755",
        );
        b.push(Step::Chdir(CString::new(STAGING).expect("static")));
        b.mkdir(&format!("{STAGING}{OLD_ROOT}"));
        b.mkdir(&format!("{STAGING}{NEW_ROOT}"));
        b.push(Step::PivotRoot {
            new_root: CString::new(STAGING).expect("static"),
            put_old: CString::new(format!("{STAGING}{OLD_ROOT}")).expect("static"),
        });
        b.push(Step::Chdir(c"/".into()));

        let new_root = CString::new(NEW_ROOT).expect("static");
        match &spec.root {
            RootFs::Tmpfs => b.mount("tmpfs", new_root, "tmpfs", nosuid_nodev, "mode=0755"),
            RootFs::Overlay { layers } | RootFs::FuseOverlay { layers, .. } => {
                if layers.is_empty() {
                    return Err(SandboxError::InvalidSpec(
                        "an overlay root needs at least one layer".into(),
                    ));
                }
                // Short staging paths keep the option string well under the
                // kernel's one-page limit and free of `:` and `,` from host paths.
                b.mkdir("/layers");
                for (i, layer) in layers.iter().enumerate() {
                    absolute_components(layer, "overlay layer")?;
                    let resolved = resolve(layer).map_err(|e| SandboxError::MountSource {
                        path: layer.clone(),
                        source: e,
                    })?;
                    let staged = format!("/layers/{i}");
                    b.mkdir(&staged);
                    b.push(Step::Mount {
                        source: Some(host_path(&resolved.path, "overlay layer")?),
                        target: CString::new(staged).expect("digits"),
                        fstype: None,
                        flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                        data: None,
                    });
                }
                b.mkdir("/upper");
                b.mkdir("/work");
                if let RootFs::FuseOverlay { program, .. } = &spec.root {
                    // fuse-overlayfs reads the (shared) layers through these
                    // binds, as the caller's user: read-only, then.
                    for i in 0..layers.len() {
                        let staged = CString::new(format!("/layers/{i}")).expect("digits");
                        b.push(Step::SetReadOnly(staged));
                    }
                    let fuse = FuseOverlay::new(program, layers.len())?;
                    b.push(Step::FuseOverlay(Box::new(fuse)));
                } else {
                    // overlayfs lists the topmost layer first; OCI lists the base first.
                    let lower: Vec<String> =
                        (0..layers.len()).rev().map(|i| format!("/layers/{i}")).collect();
                    let data =
                        format!("lowerdir={},upperdir=/upper,workdir=/work", lower.join(":"));
                    // mount(2) copies one page of options: the kernel would
                    // cut the rest off and mount fewer layers without a word.
                    if data.len() >= MOUNT_DATA_MAX {
                        return Err(SandboxError::InvalidSpec(format!(
                            "{} layers are more than one overlay mount takes (about 340); \
                             `--overlay fuse` has no such limit",
                            layers.len()
                        )));
                    }
                    b.mount("overlay", new_root, "overlay", nosuid_nodev, &data);
                }
                // The overlay holds its own references to its layers: detach
                // the writable binds of the (shared) layer directories, so no
                // later path, however an image's symlinks point, reaches them.
                for i in 0..layers.len() {
                    b.push(Step::Detach(CString::new(format!("/layers/{i}")).expect("digits")));
                }
            }
        }

        // Host sources of bind mounts are staged under /staged first: the
        // mount points inside the new root are created only once the host's
        // root is detached, so a symlink in an image layer cannot make the
        // launcher create files or directories on the host.
        // Parents before children, so `/a` never hides `/a/b`; stable for equal depths.
        let mut mounts: Vec<&super::Mount> = spec.mounts.iter().collect();
        mounts.sort_by_key(|m| m.target.components().count());
        let mut staged = Vec::with_capacity(mounts.len());
        for (i, mount) in mounts.iter().enumerate() {
            let MountKind::Bind { source, .. } = &mount.kind else {
                staged.push(None);
                continue;
            };
            absolute_components(source, "mount source")?;
            let resolved = resolve(source)
                .map_err(|e| SandboxError::MountSource { path: source.clone(), source: e })?;
            b.mkdir("/staged");
            let stage = CString::new(format!("/staged/{i}")).expect("digits");
            b.push(match resolved.kind {
                SourceKind::Directory => Step::Mkdir(stage.clone()),
                SourceKind::File => Step::Touch(stage.clone()),
            });
            b.push(Step::Mount {
                source: Some(host_path(&resolved.path, "mount source")?),
                target: stage.clone(),
                fstype: None,
                flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                data: None,
            });
            // Read-only from the start: mount points are created while the
            // staging root is the root, and must not be able to write here.
            if matches!(mount.kind, MountKind::Bind { read_only: true, .. }) {
                b.push(Step::SetReadOnly(stage.clone()));
            }
            staged.push(Some((stage, resolved.kind)));
        }

        // /proc needs a visible proc mount in this namespace (the host's),
        // so it comes before the host's root is detached; it and /dev are
        // top-level names, created without following any image symlink.
        let proc_dir = b.mount_point(&[OsStr::new("proc")], SourceKind::Directory)?;
        b.mount("proc", proc_dir, "proc", nosuid_nodev | MsFlags::MS_NOEXEC, "");

        let dev = b.mount_point(&[OsStr::new("dev")], SourceKind::Directory)?;
        b.mount("tmpfs", dev, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, "mode=0755");
        for device in DEVICES {
            let target =
                b.mount_point(&[OsStr::new("dev"), OsStr::new(device)], SourceKind::File)?;
            b.push(Step::Mount {
                source: Some(CString::new(format!("{OLD_ROOT}/dev/{device}")).expect("static")),
                target,
                fstype: None,
                flags: MsFlags::MS_BIND,
                data: None,
            });
        }
        let pts = b.mount_point(&[OsStr::new("dev"), OsStr::new("pts")], SourceKind::Directory)?;
        b.mount(
            "devpts",
            pts,
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620",
        );
        let shm = b.mount_point(&[OsStr::new("dev"), OsStr::new("shm")], SourceKind::Directory)?;
        b.mount("tmpfs", shm, "tmpfs", nosuid_nodev | MsFlags::MS_NOEXEC, "mode=1777");
        for (link, target) in [
            ("ptmx", "pts/ptmx"),
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            b.push(Step::Symlink {
                target: CString::new(target).expect("static"),
                link: CString::new(format!("{NEW_ROOT}/dev/{link}")).expect("static"),
            });
        }

        b.push(Step::Detach(CString::new(OLD_ROOT).expect("static")));

        for (mount, stage) in mounts.iter().zip(staged) {
            let parts = absolute_components(&mount.target, "mount target")?;
            match (&mount.kind, stage) {
                (MountKind::Bind { read_only, .. }, Some((stage, kind))) => {
                    let target = b.mount_point(&parts, kind)?;
                    b.push(Step::Mount {
                        source: Some(stage),
                        target: target.clone(),
                        fstype: None,
                        flags: MsFlags::MS_BIND | MsFlags::MS_REC,
                        data: None,
                    });
                    if *read_only {
                        b.push(Step::SetReadOnly(target));
                    }
                }
                _ => {
                    let target = b.mount_point(&parts, SourceKind::Directory)?;
                    b.mount("tmpfs", target, "tmpfs", nosuid_nodev, "mode=1777");
                }
            }
        }

        b.push(Step::Chdir(CString::new(NEW_ROOT).expect("static")));
        // pivot_root(".", ".") stacks the staging root on top of the new
        // one; detaching "." then removes the staging root.
        b.push(Step::PivotRoot { new_root: c".".into(), put_old: c".".into() });
        b.push(Step::Detach(c".".into()));
        b.push(Step::Chdir(c"/".into()));

        // In the final root, where an image's symlinks resolve inside it.
        for (path, contents) in &spec.files {
            let parts = absolute_components(path, "file")?;
            for depth in 1..parts.len() {
                b.push(Step::Mkdir(path_cstring(&under("/", &parts[..depth]))?));
            }
            let path = path_cstring(&under("/", &parts))?;
            b.push(Step::WriteFile { path, contents: contents.clone() });
        }
        let cwd_parts = absolute_components(&spec.cwd, "working directory")?;
        for depth in 1..=cwd_parts.len() {
            b.push(Step::Mkdir(path_cstring(&under("/", &cwd_parts[..depth]))?));
        }

        if let Some(hostname) = &spec.hostname {
            b.push(Step::SetHostname(cstring(hostname.as_bytes(), "hostname")?));
        }
        if spec.network == Network::None {
            b.push(Step::LoopbackUp);
        }
        b.push(Step::Chdir(path_cstring(&under("/", &cwd_parts))?));
        b.push(Step::SetUmask(spec.umask));
        b.push(Step::NoNewPrivs);

        let clone_flags = CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID;
        let mut unshare_flags =
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
        if spec.network != Network::Host {
            unshare_flags |= CloneFlags::CLONE_NEWNET;
        }

        Ok(Plan { clone_flags, unshare_flags, steps: b.steps, exec: exec_plan(spec)? })
    }
}

fn exec_plan(spec: &SandboxSpec) -> Result<ExecPlan, SandboxError> {
    let Some(program) = spec.argv.first() else {
        return Err(SandboxError::InvalidSpec("the command line is empty".into()));
    };
    let program_bytes = program.as_bytes();
    if program_bytes.is_empty() {
        return Err(SandboxError::InvalidSpec("the program name is empty".into()));
    }
    let mut env = Vec::new();
    let mut path_var = None;
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') {
            return Err(SandboxError::InvalidSpec(format!(
                "invalid environment variable name `{key}`"
            )));
        }
        if key == "PATH" {
            path_var = Some(value.as_str());
        }
        env.push(cstring(format!("{key}={value}").as_bytes(), "environment variable")?);
    }
    let candidates = if program_bytes.contains(&b'/') {
        vec![cstring(program_bytes, "program")?]
    } else {
        path_var
            .unwrap_or(DEFAULT_PATH)
            .split(':')
            .map(|dir| if dir.is_empty() { "." } else { dir })
            .map(|dir| {
                let mut path = dir.as_bytes().to_vec();
                path.push(b'/');
                path.extend_from_slice(program_bytes);
                cstring(&path, "program path")
            })
            .collect::<Result<_, _>>()?
    };
    let argv =
        spec.argv.iter().map(|a| cstring(a.as_bytes(), "argument")).collect::<Result<_, _>>()?;
    let credentials = spec.user.map(|(uid, gid)| Credentials {
        uid,
        gid,
        groups: spec
            .id_mapping
            .allows_setgroups()
            .then(|| spec.groups.iter().copied().map(Gid::from_raw).collect()),
    });
    Ok(ExecPlan {
        candidates,
        argv: CStringArray::new(argv),
        env: CStringArray::new(env),
        credentials,
        program: program.to_string_lossy().into_owned(),
        // A terminal is the controlling terminal of a session of its own.
        new_session: spec.new_session || spec.terminal.is_some(),
        own_process_group: spec.own_process_group,
    })
}

/// Why [`run_steps`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepFailure {
    pub index: usize,
    pub errno: Errno,
}

/// Interprets `steps` in order. Allocation-free: it runs in the launcher.
pub fn run_steps(sys: &impl Syscall, steps: &[Step]) -> Result<(), StepFailure> {
    for (index, step) in steps.iter().enumerate() {
        let result = match step {
            Step::SetUmask(mode) => {
                sys.umask(*mode);
                Ok(())
            }
            Step::Mount { source, target, fstype, flags, data } => {
                sys.mount(source.as_deref(), target, fstype.as_deref(), *flags, data.as_deref())
            }
            Step::SetReadOnly(target) => sys.set_read_only(target),
            Step::Detach(target) => sys.umount(target, MntFlags::MNT_DETACH),
            Step::Mkdir(path) => match sys.mkdir(path, 0o755) {
                Err(Errno::EEXIST) => Ok(()),
                other => other,
            },
            Step::Touch(path) => sys.touch(path),
            Step::WriteFile { path, contents } => sys.write_file(path, contents),
            Step::Symlink { target, link } => match sys.symlink(target, link) {
                Err(Errno::EEXIST) => Ok(()),
                other => other,
            },
            Step::PivotRoot { new_root, put_old } => sys.pivot_root(new_root, put_old),
            Step::Chdir(path) => sys.chdir(path),
            Step::SetHostname(name) => sys.sethostname(name),
            Step::LoopbackUp => sys.loopback_up(),
            Step::NoNewPrivs => sys.set_no_new_privs(),
            Step::FuseOverlay(fuse) => super::fuse::start(sys, fuse),
        };
        result.map_err(|errno| StepFailure { index, errno })?;
    }
    Ok(())
}
