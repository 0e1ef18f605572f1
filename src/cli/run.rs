//! `pkg run`: run an image in the rootless sandbox, like `docker run`.
//!
//! This is the edge where the caller's ids, subordinate ranges, terminal
//! and environment are read; [`crate::run`] gets them as plain values. Exit
//! status: the workload's (128+N for signal N); 125 when pkg fails before
//! the workload starts; 126 when it cannot be executed; 127 when not found.

use std::cell::LazyCell;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::Settings;
use crate::platform::Platform;
use crate::run::overlay::{OverlayDriver, OverlayError, run_with_overlay};
use crate::run::{NetworkMode, RunError, RunHost, RunImage, RunOptions, Subordinate, Volume};
use crate::sandbox::{Sandbox, SandboxError};
use crate::store::{RefName, Store};
use crate::tool::HostTools;

/// Exit status when pkg fails before the workload starts (docker's).
pub const FAILED_TO_START: u8 = 125;

// The doc comments are clap's help text, in its notation: `[:ro]` is
// optional there, not a link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Set an environment variable; NAME alone copies yours (repeatable)
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// Read environment variables from a file of NAME=VALUE lines (repeatable)
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_files: Vec<PathBuf>,
    /// Bind-mount a host path: HOST:CONTAINER[:ro] (repeatable)
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR[:ro]")]
    pub volumes: Vec<String>,
    /// Working directory inside the container [default: the image's, else /]
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run this program instead of the image's entrypoint (drops its cmd too)
    #[arg(long, value_name = "PROGRAM")]
    pub entrypoint: Option<String>,
    /// Run as USER[:GROUP], names or numbers [default: the image's user]
    #[arg(short = 'u', long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Network: the host's, or none (only loopback)
    #[arg(long = "net", visible_alias = "network", value_enum, default_value_t = Net::Host)]
    pub net: Net,
    /// Hostname inside [default: the first 12 digits of the image's digest]
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Which platform of the image to run [default: this machine's]; another
    /// architecture runs through qemu-user
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<Platform>,
    /// Keep standard input attached
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Allocate a pseudo-terminal for the workload, relayed to yours (sets TERM)
    #[arg(short = 't', long)]
    pub tty: bool,
    /// How the image's root filesystem is mounted: auto (the kernel's
    /// overlayfs, else fuse-overlayfs where the kernel refuses it in a user
    /// namespace), kernel, or fuse
    #[arg(long, value_enum, env = "PKG_OVERLAY", default_value_t = Overlay::Auto, value_name = "DRIVER")]
    pub overlay: Overlay,
    /// A recipe (.kdl file or directory with pkg.kdl: build, then run its
    /// image), an image name in the store, oci:DIR[:REF] or oci-archive:FILE[:REF]
    #[arg(value_name = "TARGET")]
    pub target: String,
    /// Arguments for the image's entrypoint (replacing its cmd)
    #[arg(value_name = "ARGS", trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Net {
    Host,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Overlay {
    Auto,
    Kernel,
    Fuse,
}

impl From<Overlay> for OverlayDriver {
    fn from(overlay: Overlay) -> Self {
        match overlay {
            Overlay::Auto => OverlayDriver::Auto,
            Overlay::Kernel => OverlayDriver::Kernel,
            Overlay::Fuse => OverlayDriver::Fuse,
        }
    }
}

/// What TARGET names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Recipe(PathBuf),
    Stored(String),
    Layout { dir: PathBuf, reference: Option<String> },
    Archive { file: PathBuf, reference: Option<String> },
}

impl Target {
    /// `oci:` and `oci-archive:` prefixes; then a recipe: a `.kdl` file, a
    /// directory holding `pkg.kdl`, a path starting with `.`, or an existing
    /// path with a `/` in it; else an image name (which may hold `/` too).
    fn parse(text: &str, cwd: &Path) -> Target {
        let split = |rest: &str| -> (PathBuf, Option<String>) {
            let whole = cwd.join(rest);
            match rest.rsplit_once(':') {
                Some((path, reference)) if !whole.exists() && !reference.contains('/') => {
                    (cwd.join(path), Some(reference.to_string()))
                }
                _ => (whole, None),
            }
        };
        if let Some(rest) = text.strip_prefix("oci:") {
            let (dir, reference) = split(rest);
            Target::Layout { dir, reference }
        } else if let Some(rest) = text.strip_prefix("oci-archive:") {
            let (file, reference) = split(rest);
            Target::Archive { file, reference }
        } else if text.ends_with(".kdl")
            || text.contains('/') && cwd.join(text).exists()
            || text.starts_with('.')
            || cwd.join(text).join("pkg.kdl").is_file()
        {
            Target::Recipe(cwd.join(text))
        } else {
            Target::Stored(text.to_string())
        }
    }
}

/// Whether the target is an image already in the store (not a recipe to
/// build, nor an OCI image to import), judged from the working directory.
pub fn names_stored_image(args: &RunArgs) -> bool {
    let cwd = std::env::current_dir().unwrap_or_default();
    matches!(Target::parse(&args.target, &cwd), Target::Stored(_))
}

/// Runs `pkg run`; every failure before the workload starts exits 125.
pub fn run(args: RunArgs, settings: &Settings) -> ExitCode {
    match start(args, settings) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("{:?}", failure.report);
            ExitCode::from(failure.code)
        }
    }
}

/// A failure before the workload ran, with its exit status.
struct Failure {
    report: miette::Report,
    code: u8,
}

impl From<miette::Report> for Failure {
    fn from(report: miette::Report) -> Self {
        Failure { report, code: FAILED_TO_START }
    }
}

impl From<RunError> for Failure {
    fn from(error: RunError) -> Self {
        let code = u8::try_from(error.exit_code()).unwrap_or(FAILED_TO_START);
        Failure { report: miette::Report::from_err(error), code }
    }
}

fn start(args: RunArgs, settings: &Settings) -> Result<ExitCode, Failure> {
    let mut host = host_facts(settings);
    let options = options(&args, settings)?;
    let (store, image) = match Target::parse(&args.target, &settings.cwd) {
        Target::Recipe(path) => from_recipe(path, &args.target, args.platform, &host, settings)?,
        Target::Stored(name) => {
            let store = open_store(settings)?;
            let image = from_store(&store, &name, args.platform, &host)?;
            (store, image)
        }
        Target::Layout { dir, reference } => {
            let store = open_store(settings)?;
            let source = crate::image::import::OciSource::Layout(dir);
            let image = foreign(&store, &source, reference.as_deref(), &args, &host, settings)?;
            (store, image)
        }
        Target::Archive { file, reference } => {
            let store = open_store(settings)?;
            let source = crate::image::import::OciSource::Archive(file);
            let image = foreign(&store, &source, reference.as_deref(), &args, &host, settings)?;
            (store, image)
        }
    };
    let (relayed, relays) = relay_terminal(&args)?;
    host.relayed = relayed;
    let mut prepared = crate::run::prepare(&store, &image, &options, &host)?;
    // The spec holds the workload's copies now; the output relays end when
    // those are closed too.
    host.relayed = Default::default();
    let sandbox = Sandbox::new();
    let status = run_with_overlay(
        &mut prepared.spec,
        args.overlay.into(),
        || host.tools.which("fuse-overlayfs"),
        |spec| sandbox.run_forwarding(spec),
        |reason| {
            if !settings.quiet {
                eprintln!("note: {reason}");
            }
        },
    );
    drop(prepared);
    relays.finish();
    match status {
        Ok(status) => Ok(ExitCode::from(status.code().clamp(0, 255) as u8)),
        Err(error) => {
            let code = u8::try_from(error.exit_code()).unwrap_or(FAILED_TO_START);
            let report = match overlay_advice(&error) {
                Some(help) => miette::Report::new(Advised { error, help }),
                None => miette::Report::from_err(error),
            };
            Err(Failure { report, code })
        }
    }
}

/// An error with what to do about it underneath (`help:`).
#[derive(Debug)]
struct Advised {
    error: OverlayError,
    help: String,
}

impl std::fmt::Display for Advised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Advised {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl miette::Diagnostic for Advised {
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new(&self.help))
    }
}

/// What to do when the root filesystem cannot be mounted.
fn overlay_advice(error: &OverlayError) -> Option<String> {
    let advice = match error {
        OverlayError::Sandbox(SandboxError::OverlayRefused { .. }) => {
            "Linux 5.11 or later allows overlayfs in a user namespace; elsewhere `--overlay auto` \
             (the default) falls back to fuse-overlayfs; `pkg doctor` checks both"
        }
        OverlayError::Sandbox(SandboxError::FuseOverlay { source, .. }) => {
            return Some(format!(
                "{}; `pkg doctor` checks it",
                crate::sandbox::fuse::advice(*source)
            ));
        }
        OverlayError::NoFallback(_) => {
            "install fuse-overlayfs (apt-get install fuse-overlayfs), or use Linux 5.11 or \
             later; `pkg doctor` checks both"
        }
        OverlayError::NoFuseOverlayfs => {
            "install it (apt-get install fuse-overlayfs), or drop `--overlay fuse`"
        }
        OverlayError::Sandbox(_) => return None,
    };
    Some(advice.to_string())
}

fn open_store(settings: &Settings) -> Result<Store, Failure> {
    Ok(Store::open(&settings.store).map_err(miette::Report::from_err)?)
}

/// Builds the recipe, then runs its image (it must have exactly one).
fn from_recipe(
    recipe: PathBuf,
    spelt: &str,
    platform: Option<Platform>,
    host: &RunHost,
    settings: &Settings,
) -> Result<(Store, RunImage), Failure> {
    if !recipe.exists() {
        return Err(miette::miette!(
            help =
                "TARGET is a recipe path, an image name in the store, oci:DIR or oci-archive:FILE",
            "no such recipe: {spelt}"
        )
        .into());
    }
    // As `pkg build` would: the image's platforms, or only `--platform`.
    let platforms = platform.into_iter().collect();
    let target = super::TargetArgs { recipe: recipe.clone(), images: Vec::new(), platforms };
    let quiet = Settings { quiet: true, ..settings.clone() };
    let (store, images) = super::build::build_images(&target, &quiet)?;
    let image = match images.as_slice() {
        [only] => only,
        [] => {
            return Err(miette::miette!("{} defines no image to run", recipe.display()).into());
        }
        several => {
            let names: Vec<&str> = several.iter().map(|i| i.name.as_str()).collect();
            return Err(miette::miette!(
                help = format!("they are built and in the store now: `pkg run {}`", names[0]),
                "{} defines several images ({}): run one by name",
                recipe.display(),
                names.join(", ")
            )
            .into());
        }
    };
    let image = RunImage::from_assembled(&store, image, platform, host.platform)?;
    Ok((store, image))
}

fn from_store(
    store: &Store,
    name: &str,
    platform: Option<Platform>,
    host: &RunHost,
) -> Result<RunImage, Failure> {
    let unknown = || -> Failure {
        let names: Vec<String> =
            store.images().unwrap_or_default().iter().map(|n| n.to_string()).collect();
        let help = if names.is_empty() {
            "the store has no images: build one with `pkg build RECIPE`".to_string()
        } else {
            format!("the store has: {}", names.join(", "))
        };
        miette::miette!(help = help, "no image named `{name}` in the store, and no such file")
            .into()
    };
    let Ok(ref_name) = RefName::new(name) else { return Err(unknown()) };
    let Some(image) = crate::image::load(store, &ref_name).map_err(miette::Report::from_err)?
    else {
        return Err(unknown());
    };
    Ok(RunImage::from_assembled(store, &image, platform, host.platform)?)
}

fn foreign(
    store: &Store,
    source: &crate::image::import::OciSource,
    reference: Option<&str>,
    args: &RunArgs,
    host: &RunHost,
    settings: &Settings,
) -> Result<RunImage, Failure> {
    use crate::image::import::{ImportError, ImportRequest, import};
    let platform = args.platform.unwrap_or(host.platform);
    let imported = match import(store, &ImportRequest { source, reference, platform }) {
        // A single-platform image of another architecture runs as it is
        // (through qemu-user) unless --platform asked for another, as a
        // store image with one platform does.
        Err(ImportError::PlatformMismatch { found, .. }) if args.platform.is_none() => {
            import(store, &ImportRequest { source, reference, platform: found })
        }
        other => other,
    }
    .map_err(miette::Report::from_err)?;
    if !settings.quiet {
        for warning in &imported.warnings {
            eprintln!("warning: {warning}");
        }
    }
    Ok(RunImage::from_imported(store, &args.target, imported)?)
}

/// Pipes in place of the caller's terminal, as docker and podman have
/// without `-t`: a stream that is a terminal reaches the workload through a
/// pipe that a thread of pkg fills or drains, so the workload never holds the
/// terminal (it could read keystrokes meant for the shell through any of its
/// descriptors, which are read-write). Not with `-t` on a terminal, where the
/// workload's streams are its own pseudo-terminal. Input (`-i`) is relayed
/// while pkg runs, so stopping pkg (Ctrl-Z) stops it; its thread ends at the
/// terminal's end of input, or with pkg.
fn relay_terminal(args: &RunArgs) -> Result<([Option<OwnedFd>; 3], Relays), Failure> {
    let mut relayed: [Option<OwnedFd>; 3] = Default::default();
    let mut relays = Relays(Vec::new());
    let stdin_terminal = std::io::stdin().is_terminal();
    if args.tty && stdin_terminal {
        return Ok((relayed, relays));
    }
    let failed = |e: std::io::Error| miette::miette!("cannot relay the terminal: {e}");
    if args.interactive && stdin_terminal {
        let (reader, mut writer) = std::io::pipe().map_err(failed)?;
        // Ends when the workload closes its end (EPIPE) or input ends; not waited for.
        std::thread::Builder::new()
            .name("pkg-stdin".into())
            .spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut writer);
            })
            .map_err(failed)?;
        relayed[0] = Some(reader.into());
    }
    if std::io::stdout().is_terminal() {
        let (writer, relay) =
            output_relay("pkg-stdout", || std::io::stdout().lock()).map_err(failed)?;
        relays.0.push(relay);
        // stderr on the same terminal shares the pipe, so what the workload
        // writes to both keeps its order, as on a terminal.
        if same_terminal(std::io::stdout().as_fd(), std::io::stderr().as_fd()) {
            relayed[2] = Some(writer.try_clone().map_err(failed)?);
        }
        relayed[1] = Some(writer);
    }
    if relayed[2].is_none() && std::io::stderr().is_terminal() {
        let (writer, relay) =
            output_relay("pkg-stderr", || std::io::stderr().lock()).map_err(failed)?;
        relays.0.push(relay);
        relayed[2] = Some(writer);
    }
    Ok((relayed, relays))
}

/// A pipe whose read end a thread named `name` copies to `out()` until every
/// copy of its write end (returned) is closed.
fn output_relay<W: std::io::Write + 'static>(
    name: &str,
    out: fn() -> W,
) -> std::io::Result<(OwnedFd, std::thread::JoinHandle<()>)> {
    let (mut reader, writer) = std::io::pipe()?;
    let relay = std::thread::Builder::new().name(name.into()).spawn(move || {
        let _ = std::io::copy(&mut reader, &mut out());
    })?;
    Ok((writer.into(), relay))
}

/// Whether `a` and `b` are both terminals and the same one.
fn same_terminal(a: std::os::fd::BorrowedFd<'_>, b: std::os::fd::BorrowedFd<'_>) -> bool {
    let device = |fd| nix::sys::stat::fstat(fd).ok().map(|st| (st.st_dev, st.st_rdev));
    a.is_terminal() && b.is_terminal() && device(a).is_some() && device(a) == device(b)
}

/// The output relays of [`relay_terminal`].
struct Relays(Vec<std::thread::JoinHandle<()>>);

impl Relays {
    /// Waits until the output relays have passed on everything: call once
    /// every copy of the pipes' write ends is closed (the sandbox has ended
    /// and its spec is dropped).
    fn finish(self) {
        for relay in self.0 {
            let _ = relay.join();
        }
    }
}

/// What this machine offers the sandbox.
fn host_facts(settings: &Settings) -> RunHost {
    let (uid, gid, path) = (settings.uid, settings.gid, settings.path.clone());
    let existing = |path: &str| Some(PathBuf::from(path)).filter(|p| p.exists());
    RunHost {
        uid,
        gid,
        subordinate: LazyCell::new(Box::new(move || subordinate(uid, gid, path))),
        platform: Platform::host(),
        tools: HostTools::new(settings.path.clone()),
        resolv_conf: existing("/etc/resolv.conf"),
        hosts: existing("/etc/hosts"),
        term: std::env::var("TERM").ok(),
        terminal: std::io::stdin()
            .is_terminal()
            .then(|| std::io::stdin().as_fd().try_clone_to_owned().ok())
            .flatten(),
        relayed: Default::default(),
    }
}

/// The subordinate ranges `/etc/subuid` and `/etc/subgid` grant the caller
/// (by name or number), if both do and newuidmap and newgidmap are on `PATH`.
fn subordinate(uid: u32, gid: u32, path: Option<OsString>) -> Option<Subordinate> {
    let user = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    let range = |file: &str, id: u32| {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|text| crate::sandbox::subordinate_range(&text, &user, id))
    };
    let tools = HostTools::new(path);
    Some(Subordinate {
        uids: range("/etc/subuid", uid)?,
        gids: range("/etc/subgid", gid)?,
        newuidmap: tools.which("newuidmap")?,
        newgidmap: tools.which("newgidmap")?,
    })
}

/// The docker-style options, with env files read and volumes resolved.
fn options(args: &RunArgs, settings: &Settings) -> Result<RunOptions, Failure> {
    let caller = |name: &str| std::env::var(name).ok();
    let mut env = Vec::new();
    for file in &args.env_files {
        let path = settings.cwd.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| miette::miette!("cannot read the env file {}: {e}", path.display()))?;
        let items = crate::run::env::parse_file(&file.display().to_string(), &text, &caller)
            .map_err(miette::Report::from_err)?;
        env.extend(items);
    }
    for item in &args.env {
        env.extend(crate::run::env::parse_item(item, &caller).map_err(miette::Report::from_err)?);
    }
    let volumes = args
        .volumes
        .iter()
        .map(|spec| volume(spec, &settings.cwd))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RunOptions {
        args: args.args.clone(),
        entrypoint: args.entrypoint.clone(),
        env,
        volumes,
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        network: match args.net {
            Net::Host => NetworkMode::Host,
            Net::None => NetworkMode::None,
        },
        hostname: args.hostname.clone(),
        interactive: args.interactive,
        tty: args.tty,
    })
}

/// `HOST:CTR[:ro|rw]`; HOST is absolute or relative to the working directory
/// (starting with `.`) and must exist; CTR is absolute.
fn volume(spec: &str, cwd: &Path) -> Result<Volume, Failure> {
    let bad = |reason: &str| -> Failure {
        miette::miette!(help = "use -v HOST:CONTAINER[:ro]", "invalid volume `{spec}`: {reason}")
            .into()
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [host, container] => (*host, *container, false),
        [host, container, "ro"] => (*host, *container, true),
        [host, container, "rw"] => (*host, *container, false),
        [_, _, other] => return Err(bad(&format!("unknown option `{other}` (ro or rw)"))),
        _ => return Err(bad("expected HOST:CONTAINER")),
    };
    if !host.starts_with('/') && !host.starts_with('.') {
        return Err(bad("named volumes are not supported: give an absolute host path"));
    }
    if !container.starts_with('/') {
        return Err(bad("the container path must be absolute"));
    }
    let host = cwd.join(host);
    if !host.exists() {
        return Err(bad(&format!("{} does not exist", host.display())));
    }
    Ok(Volume { host, container: PathBuf::from(container), read_only })
}

/// Whether the raw command line invokes `pkg run` (so a usage error exits 125).
pub fn invoked(args: &[OsString]) -> bool {
    let mut words = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(word) = words.next() {
        match word.as_ref() {
            // Global options that take a separate value.
            "--store" | "--color" => {
                words.next();
            }
            w if w.starts_with('-') => {}
            w => return w == "run",
        }
    }
    false
}
