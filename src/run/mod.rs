//! `pkg run`'s library half: from an image and docker-style options to the
//! [`SandboxSpec`] that runs it.
//!
//! [`RunImage`] is what every kind of target comes down to: the image's OCI
//! runtime configuration and its layer trees (base first). [`prepare`] then
//!
//! 1. checks the layers out once each, shared between runs and images
//!    ([`Store::shared_checkout`]), as the read-only lower layers of an
//!    overlay root whose tmpfs upper layer vanishes with the sandbox;
//! 2. resolves the user (`--user`, else the image's) in the image's own
//!    `/etc/passwd` and `/etc/group` ([`user`]), and maps the caller to it:
//!    through a full subordinate range when [`RunHost::subordinate`] has one
//!    (the caller is root inside and the workload switches to the user), else
//!    the caller's single uid and gid become the user's;
//! 3. computes argv, environment and working directory the way `docker run`
//!    does (see [`RunOptions`]);
//! 4. adds volumes, `/etc/hosts` (and the host's `/etc/resolv.conf` when the
//!    network is shared) and, for an image of another architecture, the host's
//!    qemu-user emulator, which then runs the program named by argv;
//! 5. gives the workload a session of its own, never the caller's terminal;
//!    with `-t` and [`RunHost::terminal`], a pseudo-terminal of the sandbox's
//!    own instead ([`crate::sandbox::terminal`]).
//!
//! Nothing here reads the clock or the caller's environment: [`RunHost`]
//! carries what the caller knows about the machine.

pub mod env;
pub mod overlay;
pub mod user;
pub mod view;

use std::cell::LazyCell;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::image::{AssembledImage, ImageError};
use crate::platform::{Arch, Platform};
use crate::sandbox::{
    ExecFailure, IdMapping, IdRange, MapMethod, Mount, Network, RootFs, SandboxSpec, Stdio,
    StdioSource, Terminal,
};
use crate::store::{CheckoutLease, Store, StoreError};
use crate::tool::HostTools;
use view::{Found, RootView};

/// The `PATH` a workload gets when its image sets none (docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the emulator of a foreign-architecture image is mounted.
pub const EMULATOR_PATH: &str = "/.pkg-emulator";

/// Everything that stops an image from starting. All of them exit 125 except
/// [`RunError::Exec`] (127 not found, 126 cannot execute).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("image `{image}` has an unreadable configuration: {reason}")]
    BadConfig { image: String, reason: String },
    #[error("image `{image}` has no {wanted} variant (it has: {})", available.join(", "))]
    NoPlatform { image: String, wanted: String, available: Vec<String> },
    #[error("image `{image}` has no linux/{host} variant (it has: {}); pick one with --platform", available.join(", "))]
    NoHostPlatform { image: String, host: String, available: Vec<String> },
    #[error("image `{image}` has no command: it sets no entrypoint or cmd, and none was given")]
    NoCommand { image: String },
    #[error("image `{image}`: {reason}")]
    User { image: String, reason: user::UserError },
    #[error("a volume cannot replace the container's root directory")]
    VolumeOnRoot,
    #[error("the working directory must be an absolute path, not `{0}`")]
    RelativeWorkdir(String),
    #[error(
        "image `{image}` is {platform} but this machine is {host}, and {emulator} (qemu-user) is not installed"
    )]
    NoEmulator { image: String, platform: String, host: String, emulator: String },
    #[error("`{program}` {failure} in image `{image}`")]
    Exec { image: String, program: String, failure: ExecFailure },
    #[error("cannot duplicate the terminal's descriptor")]
    Terminal(#[source] std::io::Error),
    #[error("cannot duplicate a relayed standard stream's descriptor")]
    Stdio(#[source] std::io::Error),
}

impl RunError {
    /// The docker/podman exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Exec { failure: ExecFailure::NotFound, .. } => 127,
            RunError::Exec { failure: ExecFailure::CannotExecute, .. } => 126,
            _ => 125,
        }
    }
}

pub type Result<T, E = RunError> = std::result::Result<T, E>;

/// The parts of an OCI image configuration that decide how it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `NAME=VALUE` items, in order.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

impl RuntimeConfig {
    /// Reads the runtime configuration from an OCI image config document.
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let doc =
            oci_spec::image::ImageConfiguration::from_reader(bytes).map_err(|e| e.to_string())?;
        let Some(config) = doc.config() else { return Ok(RuntimeConfig::default()) };
        let env = config
            .env()
            .iter()
            .flatten()
            .map(|item| match item.split_once('=') {
                Some((n, v)) => (n.to_string(), v.to_string()),
                None => (item.clone(), String::new()),
            })
            .collect();
        Ok(RuntimeConfig {
            entrypoint: config.entrypoint().clone().unwrap_or_default(),
            cmd: config.cmd().clone().unwrap_or_default(),
            env,
            workdir: config.working_dir().clone().filter(|w| !w.is_empty()),
            user: config.user().clone().filter(|u| !u.is_empty()),
        })
    }
}

/// An image ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunImage {
    /// How the user named it (for messages).
    pub name: String,
    /// sha256 (hex) of its manifest for the chosen platform.
    pub id: String,
    pub platform: Platform,
    pub config: RuntimeConfig,
    /// Layer trees, base first; stacked with overlayfs semantics.
    pub layers: Vec<Digest>,
}

impl RunImage {
    /// A foreign image ingested by [`crate::image::import`], named `name`.
    pub fn from_imported(
        store: &Store,
        name: &str,
        imported: crate::image::import::Imported,
    ) -> Result<Self> {
        let path = store.oci_blob_path(&imported.config.digest);
        let bytes = std::fs::read(&path).map_err(|e| StoreError::Io {
            action: "read",
            path: path.clone(),
            source: e,
        })?;
        let config = RuntimeConfig::from_json(&bytes)
            .map_err(|reason| RunError::BadConfig { image: name.to_string(), reason })?;
        Ok(RunImage {
            name: name.to_string(),
            id: imported.manifest,
            platform: imported.platform,
            config,
            layers: imported.layers,
        })
    }

    /// The platform variant of an image assembled by pkg: `wanted`, else the
    /// host's, else its only one.
    pub fn from_assembled(
        store: &Store,
        image: &AssembledImage,
        wanted: Option<Platform>,
        host: Platform,
    ) -> Result<Self> {
        let available: Vec<String> = image.platforms.iter().map(|p| p.platform.clone()).collect();
        let chosen = match wanted {
            Some(wanted) => {
                image.platforms.iter().find(|p| p.platform == wanted.to_string()).ok_or_else(
                    || RunError::NoPlatform {
                        image: image.name.clone(),
                        wanted: wanted.to_string(),
                        available: available.clone(),
                    },
                )?
            }
            None => match image.platforms.iter().find(|p| p.platform == host.to_string()) {
                Some(p) => p,
                None if image.platforms.len() == 1 => &image.platforms[0],
                None => {
                    return Err(RunError::NoHostPlatform {
                        image: image.name.clone(),
                        host: host.arch().oci_name().to_string(),
                        available,
                    });
                }
            },
        };
        let bad = |reason: String| RunError::BadConfig { image: image.name.clone(), reason };
        let platform = chosen.platform.parse::<Platform>().map_err(|e| bad(e.to_string()))?;
        let path = store.oci_blob_path(&chosen.config.digest);
        let bytes = std::fs::read(&path).map_err(|e| StoreError::Io {
            action: "read",
            path: path.clone(),
            source: e,
        })?;
        Ok(RunImage {
            name: image.name.clone(),
            id: chosen.manifest.digest.clone(),
            platform,
            config: RuntimeConfig::from_json(&bytes).map_err(bad)?,
            layers: chosen.layers.iter().map(|l| l.tree).collect(),
        })
    }
}

/// The network a run gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// The host's network (and its `/etc/resolv.conf` and `/etc/hosts`).
    #[default]
    Host,
    /// A network namespace holding only `lo`.
    None,
}

/// A `-v HOST:CTR[:ro]` volume; `host` is absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub container: PathBuf,
    pub read_only: bool,
}

/// `docker run`'s options, already parsed.
///
/// argv: `--entrypoint` replaces the image's entrypoint *and* drops its cmd
/// (an empty one leaves just `args`); otherwise the image's entrypoint is
/// followed by `args`, or by the image's cmd when there are none. The
/// environment is the image's, then `PATH` (if unset), `HOSTNAME`, `HOME` (if
/// unset) and `TERM` (with `tty`, if unset), then `env` in order.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub args: Vec<String>,
    pub entrypoint: Option<String>,
    pub env: Vec<(String, String)>,
    pub volumes: Vec<Volume>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub network: NetworkMode,
    pub hostname: Option<String>,
    /// Keep standard input attached (`-i`); without it the workload reads
    /// `/dev/null` (or, with a terminal, a terminal where nothing arrives).
    pub interactive: bool,
    /// `-t`: sets `TERM`; with [`RunHost::terminal`], the workload gets a
    /// pseudo-terminal of its own, relayed to it (see
    /// [`crate::sandbox::terminal`]); without, the streams pass through as
    /// they are.
    pub tty: bool,
}

/// Subordinate id ranges the caller may map, with the helpers that map them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subordinate {
    pub uids: (u32, u32),
    pub gids: (u32, u32),
    pub newuidmap: PathBuf,
    pub newgidmap: PathBuf,
}

/// The caller's subordinate ranges and the helpers that map them, looked up
/// on first use: only a root workload needs them, and the lookup (the
/// caller's name, `/etc/subuid`, `/etc/subgid`, `PATH`) is a good share of
/// a non-root run's start-up.
pub type LazySubordinate = LazyCell<Option<Subordinate>, Box<dyn FnOnce() -> Option<Subordinate>>>;

/// What the caller knows about this machine.
#[derive(Debug)]
pub struct RunHost {
    pub uid: u32,
    pub gid: u32,
    pub subordinate: LazySubordinate,
    pub platform: Platform,
    /// Finds qemu-user emulators.
    pub tools: HostTools,
    /// The host's `/etc/resolv.conf` and `/etc/hosts`, where they exist.
    pub resolv_conf: Option<PathBuf>,
    pub hosts: Option<PathBuf>,
    /// The caller's `TERM`, for `-t`.
    pub term: Option<String>,
    /// The caller's terminal, when its stdin is one: `-t` gives the workload
    /// a pseudo-terminal that follows it.
    pub terminal: Option<OwnedFd>,
    /// What the workload gets instead of the caller's own stdin (with `-i`),
    /// stdout and stderr; inherited when `None`. The CLI relays a terminal
    /// through a pipe, as docker and podman do, so that no workload ever holds
    /// the caller's terminal: it can neither read keystrokes meant for the
    /// shell through it nor compete with the shell while pkg is stopped.
    pub relayed: [Option<OwnedFd>; 3],
}

/// A sandbox ready to start, and the leases on its layers' checkouts: keep
/// them until the sandbox has ended, so `gc` cannot remove a mounted layer.
#[derive(Debug)]
pub struct Prepared {
    pub spec: SandboxSpec,
    pub leases: Vec<CheckoutLease>,
}

/// The sandbox that runs `image` with `options`.
pub fn prepare(
    store: &Store,
    image: &RunImage,
    options: &RunOptions,
    host: &RunHost,
) -> Result<Prepared> {
    let view = RootView::new(store, &image.layers);
    let user_spec = options.user.as_deref().or(image.config.user.as_deref()).unwrap_or("");
    let user = resolve_user(&view, image, user_spec)?;
    let hostname = options.hostname.clone().unwrap_or_else(|| image.id.chars().take(12).collect());
    let workdir = options.workdir.as_deref().or(image.config.workdir.as_deref()).unwrap_or("/");
    if !workdir.starts_with('/') {
        return Err(RunError::RelativeWorkdir(workdir.to_string()));
    }
    let workdir = &normalize(workdir);

    let mut env_vars = image.config.env.clone();
    if !env_vars.iter().any(|(n, _)| n == "PATH") {
        env_vars.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    env::set(&mut env_vars, "HOSTNAME", hostname.clone());
    if !env_vars.iter().any(|(n, _)| n == "HOME") {
        env_vars.push(("HOME".into(), user.home.clone()));
    }
    if options.tty && !env_vars.iter().any(|(n, _)| n == "TERM") {
        env_vars.push(("TERM".into(), host.term.clone().unwrap_or_else(|| "xterm".into())));
    }
    for (name, value) in &options.env {
        env::set(&mut env_vars, name, value.clone());
    }

    let mut argv: Vec<String> = match &options.entrypoint {
        Some(entrypoint) if entrypoint.is_empty() => options.args.clone(),
        Some(entrypoint) => {
            std::iter::once(entrypoint.clone()).chain(options.args.clone()).collect()
        }
        None if options.args.is_empty() => {
            image.config.entrypoint.iter().chain(&image.config.cmd).cloned().collect()
        }
        None => image.config.entrypoint.iter().chain(&options.args).cloned().collect(),
    };
    if argv.is_empty() {
        return Err(RunError::NoCommand { image: image.name.clone() });
    }

    let mut mounts = Vec::new();
    let mut files = Vec::new();
    if let Some(emulator) = emulator_for(image, host)? {
        let path = env_vars.iter().find(|(n, _)| n == "PATH").map(|(_, v)| v.as_str());
        let program = find_program(&view, image, &argv[0], path, workdir)?;
        mounts.push(Mount::bind_ro(emulator, EMULATOR_PATH));
        let argv0 = std::mem::replace(&mut argv[0], program);
        argv.splice(0..0, [EMULATOR_PATH.to_string(), "-0".into(), argv0]);
    }
    // What a volume covers is the user's: no host or generated file there.
    let covered =
        |target: &str| options.volumes.iter().any(|v| Path::new(target).starts_with(&v.container));
    let network = match options.network {
        NetworkMode::Host => {
            for (file, target) in
                [(&host.resolv_conf, "/etc/resolv.conf"), (&host.hosts, "/etc/hosts")]
            {
                if let Some(file) = file.as_ref().filter(|_| !covered(target)) {
                    mounts.push(Mount::bind_ro(file, target));
                }
            }
            Network::Host
        }
        NetworkMode::None => {
            if !covered("/etc/hosts") {
                let hosts = format!(
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
                );
                files.push((PathBuf::from("/etc/hosts"), hosts.into_bytes()));
            }
            Network::None
        }
    };
    for volume in &options.volumes {
        if volume.container == Path::new("/") {
            return Err(RunError::VolumeOnRoot);
        }
        mounts.push(if volume.read_only {
            Mount::bind_ro(&volume.host, &volume.container)
        } else {
            Mount::bind_rw(&volume.host, &volume.container)
        });
    }

    let leases = image
        .layers
        .iter()
        .map(|tree| store.shared_checkout(tree))
        .collect::<Result<Vec<_>, _>>()?;
    let layers = leases.iter().map(|lease| lease.path().to_path_buf()).collect();
    let (id_mapping, switch_to) = id_mapping(host, &user);
    let mut spec = SandboxSpec::new(id_mapping, argv.into_iter().map(OsString::from).collect());
    if let Some(switch) = switch_to {
        spec.user = Some((switch.uid, switch.gid));
        spec.groups = switch.groups;
    }
    spec.root = RootFs::Overlay { layers };
    spec.network = network;
    spec.mounts = mounts;
    spec.files = files;
    spec.hostname = Some(hostname);
    spec.env = env_vars;
    spec.cwd = PathBuf::from(workdir);
    let relayed = |fd: &Option<OwnedFd>| match fd {
        Some(fd) => fd.try_clone().map(StdioSource::Fd).map_err(RunError::Stdio),
        None => Ok(StdioSource::Inherit),
    };
    spec.stdio = Stdio {
        stdin: if options.interactive { relayed(&host.relayed[0])? } else { StdioSource::Null },
        stdout: relayed(&host.relayed[1])?,
        stderr: relayed(&host.relayed[2])?,
    };
    // The workload never shares the caller's terminal as its controlling
    // terminal: it could open it as /dev/tty and push input into the
    // caller's shell (TIOCSTI). With -t on a terminal it gets one of its own.
    spec.new_session = true;
    // Signals from the caller's terminal reach pkg alone, which forwards
    // them once.
    spec.own_process_group = true;
    if let Some(host) = host.terminal.as_ref().filter(|_| options.tty) {
        spec.terminal = Some(Terminal {
            host: host.try_clone().map_err(RunError::Terminal)?,
            forward_input: options.interactive,
        });
    }
    Ok(Prepared { spec, leases })
}

fn resolve_user(view: &RootView<'_>, image: &RunImage, spec: &str) -> Result<user::User> {
    let read = |path: &str| -> Result<String> {
        Ok(view
            .read_file(path)?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    };
    let (passwd, group) = (read("/etc/passwd")?, read("/etc/group")?);
    user::resolve(spec, &passwd, &group)
        .map_err(|reason| RunError::User { image: image.name.clone(), reason })
}

/// The caller's mapping and the user (ids, supplementary groups) the
/// workload switches to, if any.
///
/// The caller's own uid and gid always become the user's, so the image's
/// files (which the store keeps without owners, as the caller's) belong to
/// the user that runs, whatever it is. A workload running as root gets the
/// subordinate range too, if there is one: every other id inside comes from
/// it, in order, as with podman's `--userns=keep-id`, so it can switch to
/// other users (`su`, a server dropping privileges). A non-root workload
/// could never use other ids (it has no capabilities after exec, and
/// `no_new_privs` disarms setuid programs), so it gets its own ids only and
/// starts without running the newuidmap/newgidmap helpers; its supplementary
/// groups stay the caller's, as a single-id mapping denies `setgroups`.
fn id_mapping(host: &RunHost, user: &user::User) -> (IdMapping, Option<SwitchTo>) {
    // The caller is mapped to the user's ids: nothing to switch.
    let single = || (IdMapping::single(user.uid, user.gid, host.uid, host.gid), None);
    // Looked up only here, for a root workload.
    let Some(sub) = (user.uid == 0).then(|| host.subordinate.as_ref()).flatten() else {
        return single();
    };
    let (Some(uids), Some(gids)) =
        (around(user.uid, host.uid, sub.uids), around(user.gid, host.gid, sub.gids))
    else {
        return single();
    };
    let method =
        MapMethod::Helpers { newuidmap: sub.newuidmap.clone(), newgidmap: sub.newgidmap.clone() };
    // The image's groups for the user, in place of the caller's (those the
    // mapping cannot represent left out), as docker and podman set them.
    let groups = user.groups.iter().copied().filter(|&g| g <= sub.gids.1).collect();
    let switch = SwitchTo { uid: user.uid, gid: user.gid, groups };
    (IdMapping { uids, gids, method }, Some(switch))
}

/// The ids and supplementary groups the workload switches to before exec.
struct SwitchTo {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

/// Inside id `id` is the caller's `own`; inside ids `0..id` and
/// `id+1..=count` come from the subordinate range `(start, count)`, in order.
/// `None` when the range is too small to reach `id`.
fn around(id: u32, own: u32, (start, count): (u32, u32)) -> Option<Vec<IdRange>> {
    if id > count {
        return None;
    }
    let mut ranges = Vec::new();
    if id > 0 {
        ranges.push(IdRange { inside: 0, outside: start, count: id });
    }
    ranges.push(IdRange { inside: id, outside: own, count: 1 });
    if count > id {
        ranges.push(IdRange { inside: id + 1, outside: start + id, count: count - id });
    }
    Some(ranges)
}

/// An absolute path with `.`, `..` and repeated `/` resolved lexically, as
/// docker does for `-w` (`..` stops at `/`).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// The host emulator an image of another architecture needs, if it needs one.
fn emulator_for(image: &RunImage, host: &RunHost) -> Result<Option<PathBuf>> {
    let (arch, host_arch) = (image.platform.arch(), host.platform.arch());
    if arch == host_arch || (arch == Arch::I386 && host_arch == Arch::Amd64) {
        return Ok(None);
    }
    // Only a static emulator: a dynamic one would look for its libraries
    // inside the foreign image.
    let emulator = format!("qemu-{}-static", qemu_name(arch));
    host.tools.which(&emulator).map(Some).ok_or_else(|| RunError::NoEmulator {
        image: image.name.clone(),
        platform: image.platform.to_string(),
        host: host.platform.to_string(),
        emulator,
    })
}

/// qemu-user's name for an architecture.
fn qemu_name(arch: Arch) -> &'static str {
    match arch {
        Arch::I386 => "i386",
        Arch::Ppc64le => "ppc64le",
        other => other.gnu_name(),
    }
}

/// The absolute path of `program` in the image, found as `execvp` would
/// (which the emulator cannot do for its guest).
fn find_program(
    view: &RootView<'_>,
    image: &RunImage,
    program: &str,
    path: Option<&str>,
    workdir: &str,
) -> Result<String> {
    let candidates: Vec<String> = if program.contains('/') {
        let absolute = if program.starts_with('/') {
            program.to_string()
        } else {
            format!("{}/{program}", workdir.trim_end_matches('/'))
        };
        vec![absolute]
    } else {
        path.unwrap_or(DEFAULT_PATH)
            .split(':')
            .filter(|dir| dir.starts_with('/'))
            .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
            .collect()
    };
    let mut failure = ExecFailure::NotFound;
    for candidate in candidates {
        match view.lookup(&candidate)? {
            Some(Found::File(file)) if file.permissions().bits() & 0o111 != 0 => {
                return Ok(candidate);
            }
            Some(_) => failure = ExecFailure::CannotExecute,
            None => {}
        }
    }
    Err(RunError::Exec { image: image.name.clone(), program: program.to_string(), failure })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_with_range() -> RunHost {
        let range = Subordinate {
            uids: (100_000, 65_536),
            gids: (100_000, 65_536),
            newuidmap: "/usr/bin/newuidmap".into(),
            newgidmap: "/usr/bin/newgidmap".into(),
        };
        RunHost {
            uid: 1000,
            gid: 1000,
            subordinate: LazyCell::new(Box::new(move || Some(range))),
            platform: Platform::host(),
            tools: HostTools::new(None),
            resolv_conf: None,
            hosts: None,
            term: None,
            terminal: None,
            relayed: Default::default(),
        }
    }

    #[test]
    fn a_root_workload_with_the_range_switches_to_the_groups_the_range_holds() {
        let host = host_with_range();
        let root = user::User {
            uid: 0,
            gid: 0,
            home: "/root".into(),
            groups: vec![0, 10, 65_536, 65_537],
        };
        let (mapping, switch) = id_mapping(&host, &root);
        assert!(mapping.allows_setgroups());
        let switch = switch.expect("a root workload with the range switches ids and groups");
        assert_eq!((switch.uid, switch.gid), (0, 0));
        // Inside gids reach 65,536: the one beyond the range is left out.
        assert_eq!(switch.groups, [0, 10, 65_536]);
        // A non-root user gets one id, written directly, and nothing to switch.
        let user = user::User { uid: 1000, gid: 1000, home: "/".into(), groups: vec![1000, 10] };
        let (mapping, switch) = id_mapping(&host, &user);
        assert!(!mapping.allows_setgroups() && switch.is_none());
    }

    fn ranges(list: &[(u32, u32, u32)]) -> Vec<IdRange> {
        list.iter().map(|&(inside, outside, count)| IdRange { inside, outside, count }).collect()
    }

    #[test]
    fn working_directories_are_normalized_like_dockers() {
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize("/a/./b//c/"), "/a/b/c");
        assert_eq!(normalize("/a/../b"), "/b");
        assert_eq!(normalize("/../.."), "/");
    }

    #[test]
    fn the_caller_becomes_the_user_and_the_range_fills_the_other_ids() {
        let range = (100_000, 65_536);
        assert_eq!(around(0, 1000, range), Some(ranges(&[(0, 1000, 1), (1, 100_000, 65_536)])));
        assert_eq!(
            around(65_532, 1000, range),
            Some(ranges(&[(0, 100_000, 65_532), (65_532, 1000, 1), (65_533, 165_532, 4)]))
        );
        assert_eq!(
            around(65_536, 1000, range),
            Some(ranges(&[(0, 100_000, 65_536), (65_536, 1000, 1)]))
        );
        assert_eq!(around(65_537, 1000, range), None, "beyond the range: one id only");
    }
}
