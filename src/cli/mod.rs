//! The command line: clap types, resolution of global settings, dispatch.
//!
//! Parse, then resolve, then run: [`Cli`] is what the user typed, [`Settings`]
//! is what it means once the environment and defaults are applied, and each
//! command is a function of its arguments and the settings. Reading the
//! environment happens here and nowhere else in the crate.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod build;
mod doctor;
mod graph;
mod images;
mod run;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

pub mod store;

use crate::graph::{BuildGraph, GraphError, Selection};
use crate::platform::Platform;
use crate::recipe::Recipe;

/// Declarative, daemonless packager for static, reproducible OCI images.
#[derive(Debug, Parser)]
#[command(name = "pkg", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Store directory [default: $XDG_DATA_HOME/pkg or ~/.local/share/pkg]
    #[arg(long, global = true, env = "PKG_STORE", hide_env_values = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print less: only results and errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Print more about what pkg is doing (repeat for more; `-v` before the command)
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// `-v` is `--verbose` before the command only: after it, `pkg run -v`
    /// is a volume, as in `docker run`.
    #[arg(short = 'v', action = clap::ArgAction::Count, hide = true)]
    pub verbose_short: u8,
    /// When to use colour in messages
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

// The doc comments are clap's help text, in its notation: `[:REF]` is
// optional there, not a link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build every package the recipe's images need, each in a hermetic sandbox
    Build(build::BuildArgs),
    /// Run an image rootless, like `docker run`: a recipe (built first), an
    /// image in the store, oci:DIR[:REF] or oci-archive:FILE[:REF]
    Run(run::RunArgs),
    /// Download every source of a recipe into the store, for offline builds
    Fetch(build::FetchArgs),
    /// Print the build graph of a recipe: images, packages and their dependencies
    Graph(graph::GraphArgs),
    /// Check that this machine can build and run images rootless, and say how to fix what is missing
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
    /// List the images recorded in the store: name, platforms, digest, size
    Images(images::ImagesArgs),
    /// Assemble an OCI image from package trees already in the store (plumbing)
    #[command(hide = true)]
    Assemble(images::AssembleArgs),
    /// Inspect and maintain the content-addressed store
    #[command(subcommand)]
    Store(store::StoreCommand),
}

/// What a command works on: a recipe, and optionally some of its images and
/// other platforms (shared by `pkg build` and `pkg graph`).
#[derive(Debug, Args)]
pub struct TargetArgs {
    /// A .kdl recipe or a directory holding pkg.kdl
    #[arg(default_value = "pkg.kdl", value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Only this image and what it needs (repeatable)
    #[arg(long = "image", value_name = "NAME")]
    pub images: Vec<String>,
    /// Use these platforms instead of each image's own (repeatable)
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platforms: Vec<Platform>,
}

impl TargetArgs {
    /// Loads the recipe and plans the selected images on the selected platforms.
    pub(crate) fn load_and_plan(&self) -> miette::Result<(Recipe, BuildGraph)> {
        let recipe = load_recipe(&self.recipe)?;
        let graph = plan(&recipe, &selection(self.images.clone(), self.platforms.clone()))?;
        Ok((recipe, graph))
    }
}

/// Global settings once the environment and defaults are applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub store: PathBuf,
    pub quiet: bool,
    pub verbose: u8,
    pub color: bool,
    /// The working directory, against which relative arguments resolve.
    pub cwd: PathBuf,
    /// The `PATH` used to resolve declared tools.
    pub path: Option<std::ffi::OsString>,
    /// The caller's real uid and gid, mapped to root inside build sandboxes.
    pub uid: u32,
    pub gid: u32,
}

impl Settings {
    /// Cores available to this process: the default number of parallel
    /// builds. Asked for when needed (it reads the cgroup's CPU quota).
    pub fn cores(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    fn resolve(global: &GlobalArgs) -> miette::Result<Self> {
        use std::io::IsTerminal;
        let cwd = std::env::current_dir()
            .map_err(|e| miette::miette!("cannot read the current directory: {e}"))?;
        let store = match &global.store {
            Some(dir) => cwd.join(dir),
            None => default_store(
                std::env::var_os("XDG_DATA_HOME").map(PathBuf::from),
                std::env::var_os("HOME").map(PathBuf::from),
            )
            .ok_or_else(|| {
                miette::miette!(
                    help = "pass --store DIR or set PKG_STORE",
                    "cannot choose a store directory: neither XDG_DATA_HOME nor HOME is set"
                )
            })?,
        };
        let color = match global.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        };
        Ok(Settings {
            store,
            quiet: global.quiet,
            verbose: global.verbose + global.verbose_short,
            color,
            cwd,
            path: std::env::var_os("PATH"),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        })
    }
}

/// `$XDG_DATA_HOME/pkg`, else `~/.local/share/pkg`.
fn default_store(xdg_data_home: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    xdg_data_home
        .filter(|p| p.is_absolute())
        .map(|p| p.join("pkg"))
        .or_else(|| home.map(|h| h.join(".local/share/pkg")))
}

/// The process entry point. Commands that walk recipes' graphs or trees run
/// on a thread with a large stack: dependency graphs are walked recursively,
/// and a recipe may chain tens of thousands of packages (only the pages a
/// walk touches are ever allocated). The few that never do stay on the main
/// thread, which keeps `pkg run IMAGE` from paying for a thread and its
/// malloc arena.
pub fn main() -> ExitCode {
    const STACK: usize = 512 << 20;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return match error.exit_code() {
                0 => ExitCode::SUCCESS,
                // `docker run` exits 125 for its own usage errors too.
                _ if run::invoked(&argv) => ExitCode::from(run::FAILED_TO_START),
                code => ExitCode::from(u8::try_from(code).unwrap_or(2)),
            };
        }
    };
    if !cli.command.walks_deep() {
        return execute(cli);
    }
    let worker = std::thread::Builder::new().name("pkg".into()).stack_size(STACK);
    match worker.spawn(move || execute(cli)) {
        Ok(worker) => worker.join().unwrap_or(ExitCode::FAILURE),
        // No room for the stack: parse again (it parsed once) and stay here.
        Err(_) => Cli::try_parse_from(&argv).map_or(ExitCode::FAILURE, execute),
    }
}

impl Command {
    /// Whether the command may recurse deeply: through a recipe's graph, or
    /// through trees (building, assembling, importing, store maintenance).
    fn walks_deep(&self) -> bool {
        match self {
            Command::Run(args) => !run::names_stored_image(args),
            Command::Doctor(_) | Command::Completions { .. } | Command::Images(_) => false,
            Command::Build(_)
            | Command::Fetch(_)
            | Command::Graph(_)
            | Command::Assemble(_)
            | Command::Store(_) => true,
        }
    }
}

fn execute(cli: Cli) -> ExitCode {
    let color = cli.global.color;
    let failed = if matches!(cli.command, Command::Run(_)) { run::FAILED_TO_START } else { 1 };
    let result = Settings::resolve(&cli.global).and_then(|settings| {
        install_report_handler(settings.color);
        dispatch(cli.command, &settings)
    });
    match result {
        Ok(code) => code,
        Err(report) => {
            if color == ColorChoice::Never {
                install_report_handler(false);
            }
            eprintln!("{report:?}");
            ExitCode::from(failed)
        }
    }
}

fn install_report_handler(color: bool) {
    // A second install (tests, repeated calls) is refused by miette; the first wins.
    let _ = miette::set_hook(Box::new(move |_| {
        Box::new(miette::MietteHandlerOpts::new().color(color).unicode(color).build())
    }));
}

fn dispatch(command: Command, settings: &Settings) -> miette::Result<ExitCode> {
    match command {
        Command::Run(args) => Ok(run::run(args, settings)),
        Command::Build(args) => build::run(args, settings),
        Command::Fetch(args) => build::fetch(args, settings),
        Command::Graph(args) => graph::run(args, settings),
        Command::Doctor(args) => doctor::run(args, settings),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "pkg", &mut out);
            write_stdout(&out)
        }
        Command::Store(command) => store::run(command, settings),
        Command::Images(args) => images::run(args, settings),
        Command::Assemble(args) => images::assemble(args, settings),
    }
}

/// Loads the recipe a RECIPE argument names, relative to the working directory.
/// Relative paths stay as the user spelt them (they resolve against the process's
/// working directory, which is `Settings::cwd`),
/// so diagnostics name files the way the user wrote them.
pub(crate) fn load_recipe(path: &Path) -> miette::Result<Recipe> {
    Ok(crate::recipe::load(path)?)
}

/// Plans the build graph, turning a bad `--image` into a report with help.
pub(crate) fn plan(recipe: &Recipe, selection: &Selection) -> miette::Result<BuildGraph> {
    BuildGraph::plan(recipe, selection).map_err(|e| match &e {
        GraphError::UnknownImage { name, available } => {
            let help = crate::recipe::did_you_mean(name, available.iter().map(String::as_str))
                .unwrap_or_else(|| format!("images in this recipe: {}", available.join(", ")));
            miette::miette!(help = help, "{e}")
        }
    })
}

/// The images and platforms a command works on.
pub(crate) fn selection(mut images: Vec<String>, mut platforms: Vec<Platform>) -> Selection {
    // `--image a --image a` means one image; keep first-given order.
    let mut seen = std::collections::HashSet::new();
    images.retain(|i| seen.insert(i.clone()));
    let mut seen = std::collections::HashSet::new();
    platforms.retain(|p| seen.insert(*p));
    Selection {
        images: (!images.is_empty()).then_some(images),
        platforms,
        default_platform: Platform::host(),
    }
}

/// Writes a command's result to stdout; a closed pipe (`pkg graph | head`) is not an error.
pub(crate) fn write_stdout(bytes: &[u8]) -> miette::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(miette::miette!("cannot write to standard output: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn store_defaults() {
        let xdg = Some(PathBuf::from("/x"));
        let home = Some(PathBuf::from("/h"));
        assert_eq!(default_store(xdg.clone(), home.clone()), Some(PathBuf::from("/x/pkg")));
        assert_eq!(default_store(None, home.clone()), Some(PathBuf::from("/h/.local/share/pkg")));
        // XDG says relative values are invalid and must be ignored.
        assert_eq!(
            default_store(Some(PathBuf::from("rel")), home),
            Some(PathBuf::from("/h/.local/share/pkg"))
        );
        assert_eq!(default_store(None, None), None);
    }
}
