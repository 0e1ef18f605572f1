//! `pkg build`: build every package the recipe's images need, and `pkg fetch`.
//!
//! This is the edge where the caller's ids, the core count and the Rust
//! toolchain location are read; the library gets them as plain values.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use miette::IntoDiagnostic;

use super::{Settings, load_recipe, write_stdout};
use crate::build::{BuildContext, BuildOptions, BuildReport, Observer, Outcome};
use crate::image::AssembledImage;
use crate::platform::Platform;
use crate::recipe::{Builder, Recipe};
use crate::store::Store;
use crate::tool::HostTools;

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub target: super::TargetArgs,
    /// Rebuild every package and compare with the stored output, naming each file that differs
    #[arg(long)]
    pub check: bool,
    /// Never download: fail naming any source that is not in the store yet
    #[arg(long)]
    pub offline: bool,
    /// Builds to run at once [default: the number of cores]
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    /// Print one JSON result object on stdout
    #[arg(long)]
    pub json: bool,
    /// Also write the images: an OCI layout directory or an oci-archive file
    #[arg(short, long, value_name = "oci:DIR|oci-archive:FILE")]
    pub output: Option<super::images::Output>,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// A .kdl recipe or a directory holding pkg.kdl
    #[arg(default_value = "pkg.kdl", value_name = "RECIPE")]
    pub recipe: PathBuf,
}

/// The `PATH` tools resolve through: the user's, with the real Rust
/// toolchain's `bin` first when the recipe builds with cargo, so `cargo` and
/// `rustc` resolve to the toolchain's own binaries (which the sandbox can
/// mount) rather than to rustup proxies.
fn tool_path(recipe: &Recipe, settings: &Settings) -> Option<std::ffi::OsString> {
    let uses_cargo =
        recipe.packages.values().any(|p| matches!(p.build.value, Builder::Cargo { .. }));
    if !uses_cargo {
        return settings.path.clone();
    }
    // A `rustc` that is a toolchain's own binary names its sysroot by where it
    // is; a rustup proxy is asked (it knows the default toolchain).
    let direct = HostTools::new(settings.path.clone())
        .which("rustc")
        .filter(|p| p.file_name().is_some_and(|n| n == "rustc"))
        .and_then(|p| p.parent()?.parent().map(PathBuf::from));
    let sysroot = direct.or_else(|| {
        std::process::Command::new("rustc")
            .args(["--print", "sysroot"])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    });
    match sysroot {
        Some(root) if root.join("bin/rustc").is_file() => {
            let mut dirs = vec![root.join("bin")];
            dirs.extend(settings.path.iter().flat_map(std::env::split_paths));
            std::env::join_paths(dirs).ok()
        }
        _ => settings.path.clone(),
    }
}

pub fn run(args: BuildArgs, settings: &Settings) -> miette::Result<ExitCode> {
    let (recipe, graph) = args.target.load_and_plan()?;
    let store = Store::open(&settings.store).into_diagnostic()?;
    let jobs = args.jobs.map_or(settings.cores(), |j| j as usize);
    let options = BuildOptions {
        uid: settings.uid,
        gid: settings.gid,
        jobs,
        offline: args.offline,
        check: args.check,
    };
    let report = build(&recipe, &graph, &store, options, settings)?;
    if args.json {
        let mut text = serde_json::to_string_pretty(&report).into_diagnostic()?;
        text.push('\n');
        write_stdout(text.as_bytes())?;
    }
    if args.check {
        let mismatches: Vec<String> = report
            .mismatches()
            .map(|n| format!("{} ({}):\n  {}", n.package, n.platform, n.differences.join("\n  ")))
            .collect();
        if !mismatches.is_empty() {
            return Err(miette::miette!(
                help = "the build is not reproducible: compare the logs of both builds under the store's logs/",
                "--check: rebuilt output differs from the stored one\n{}",
                mismatches.join("\n")
            ));
        }
    }
    if !settings.quiet {
        eprintln!("{}", summary(&report, args.check));
    }
    assemble(&recipe, &graph, &store, &report, jobs, args.output.as_ref(), settings)?;
    Ok(ExitCode::SUCCESS)
}

/// Builds what `target` selects and records its images in the store: what
/// `pkg run RECIPE` does before it runs one of them.
pub(crate) fn build_images(
    target: &super::TargetArgs,
    settings: &Settings,
) -> miette::Result<(Store, Vec<AssembledImage>)> {
    let (recipe, graph) = target.load_and_plan()?;
    let store = Store::open(&settings.store).into_diagnostic()?;
    let options = BuildOptions {
        uid: settings.uid,
        gid: settings.gid,
        jobs: settings.cores(),
        offline: false,
        check: false,
    };
    let report = build(&recipe, &graph, &store, options, settings)?;
    let images = assemble(&recipe, &graph, &store, &report, settings.cores(), None, settings)?;
    Ok((store, images))
}

/// Runs the build of every planned package, with progress bars on a terminal.
fn build(
    recipe: &Recipe,
    graph: &crate::graph::BuildGraph,
    store: &Store,
    options: BuildOptions,
    settings: &Settings,
) -> miette::Result<BuildReport> {
    let tools = HostTools::new(tool_path(recipe, settings));
    let progress = Progress::new(settings.quiet || !std::io::stderr().is_terminal());
    let ctx = BuildContext { recipe, graph, store, tools: &tools, observer: &progress, options };
    let result = crate::build::build(&ctx);
    progress.finish();
    result.into_diagnostic()
}

/// Assembles the planned images from the build's outputs, records them in the
/// store under their names and writes them to `output`, if any.
fn assemble(
    recipe: &Recipe,
    graph: &crate::graph::BuildGraph,
    store: &Store,
    report: &BuildReport,
    jobs: usize,
    output: Option<&super::images::Output>,
    settings: &Settings,
) -> miette::Result<Vec<AssembledImage>> {
    let outputs: std::collections::HashMap<crate::graph::NodeId, crate::digest::Digest> =
        report.nodes.iter().map(|n| (n.node, n.output)).collect();
    let created = super::images::source_date_epoch()?;
    let specs =
        crate::image::specs_from_graph(recipe, graph, &outputs, created).into_diagnostic()?;
    let options = crate::image::AssembleOptions { threads: jobs, ..Default::default() };
    let images = super::images::assemble_and_write(store, &specs, &options, output, settings)?;
    if !settings.quiet {
        for image in &images {
            eprintln!("image {} sha256:{}", image.name, image.top.digest);
        }
    }
    Ok(images)
}

fn summary(report: &BuildReport, check: bool) -> String {
    let total = report.nodes.len();
    let hits = report.cache_hits();
    if check {
        format!("check passed: {total} package builds rebuilt with identical output")
    } else if hits == total {
        format!("nothing to build: all {total} package builds are up to date")
    } else {
        format!("built {} package builds, {hits} up to date", total - hits)
    }
}

pub fn fetch(args: FetchArgs, settings: &Settings) -> miette::Result<ExitCode> {
    let recipe = load_recipe(&args.recipe)?;
    let store = Store::open(&settings.store).into_diagnostic()?;
    let progress = Progress::new(settings.quiet || !std::io::stderr().is_terminal());
    let fetched = crate::build::fetch_all(&recipe, &store, &progress);
    progress.finish();
    let fetched = fetched.into_diagnostic()?;
    if !settings.quiet {
        eprintln!("fetched {fetched} sources; every source of the recipe is in the store");
    }
    Ok(ExitCode::SUCCESS)
}

/// indicatif bars: one overall bar and a spinner per running build or download.
struct Progress {
    multi: MultiProgress,
    overall: ProgressBar,
    running: Mutex<Vec<(String, ProgressBar)>>,
}

impl Progress {
    fn new(hidden: bool) -> Self {
        let target =
            if hidden { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} packages {msg}")
                .expect("valid template"),
        );
        Progress { multi, overall, running: Mutex::new(Vec::new()) }
    }

    fn start(&self, id: String, message: String, bar: ProgressBar) {
        let bar = self.multi.add(bar);
        bar.set_message(message);
        bar.enable_steady_tick(Duration::from_millis(120));
        self.running.lock().unwrap_or_else(|e| e.into_inner()).push((id, bar));
    }

    fn stop(&self, id: &str) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = running.iter().position(|(k, _)| k == id) {
            let (_, bar) = running.remove(i);
            bar.finish_and_clear();
            self.multi.remove(&bar);
        }
    }

    fn finish(&self) {
        for (_, bar) in self.running.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            bar.finish_and_clear();
        }
        self.overall.finish_and_clear();
    }
}

impl Observer for Progress {
    fn planned(&self, total: usize) {
        self.overall.set_length(total as u64);
    }

    fn build_started(&self, package: &str, platform: &Platform) {
        let spinner = ProgressBar::new_spinner();
        spinner.set_style(
            ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
        );
        self.start(
            format!("{package} {platform}"),
            format!("building {package} ({platform})"),
            spinner,
        );
    }

    fn build_finished(&self, package: &str, platform: &Platform, outcome: Outcome) {
        self.stop(&format!("{package} {platform}"));
        if outcome != Outcome::Failed {
            self.overall.inc(1);
        }
    }

    fn download_started(&self, url: &str, total: Option<u64>) {
        let bar = match total {
            Some(len) => ProgressBar::new(len).with_style(
                ProgressStyle::with_template("{msg} {bytes}/{total_bytes} {bar:20}")
                    .expect("valid template"),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {msg} {bytes}").expect("valid template"),
            ),
        };
        self.start(url.to_string(), format!("downloading {url}"), bar);
    }

    fn download_progress(&self, url: &str, done: u64) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, bar)) = running.iter().find(|(k, _)| k == url) {
            bar.set_position(done);
        }
    }

    fn download_finished(&self, url: &str) {
        self.stop(url);
    }
}
