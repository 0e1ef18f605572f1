//! Builds: every node of a [`BuildGraph`], each in a hermetic rootless
//! sandbox, recorded in the store as build key → output tree.
//!
//! [`build`] walks the graph with up to `jobs` builds at once. A node starts
//! once every output it mounts (its build inputs) is known; its key is then
//! computed from its source's content digest, those outputs' closure digests
//! and its tools' identities ([`crate::key`]). A key the store already maps
//! to a tree is a cache hit and runs nothing (unless `check`, which rebuilds
//! and names every file that differs from the stored output). After the first
//! failure no new build starts; running ones finish and the first error is
//! returned.
//!
//! Invariants: nothing here reads the clock, the environment or the caller's
//! ids (they come in [`BuildOptions`]); the only output of a build is the
//! tree ingested from its `$out`; a build key is recorded only after its
//! output tree is fully stored, under a store [`Pin`](crate::store::Pin) held
//! for the whole run so that `gc` cannot sweep in between.

pub mod builders;
pub mod compare;
pub mod exec;
pub mod source;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;

use serde::Serialize;

use crate::digest::Digest;
use crate::graph::{BuildGraph, NodeId};
use crate::key::{BuildKey, KeyInputs, Outputs};
use crate::platform::Platform;
use crate::recipe::{Recipe, Source};
use crate::sandbox::SandboxError;
use crate::store::{Store, StoreError};
use crate::tool::{ToolError, ToolResolver};

pub use builders::BuilderError;
pub use source::SourceError;

/// What a build run may do, resolved by the caller (the CLI edge).
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The caller's uid and gid, mapped to root inside the sandbox.
    pub uid: u32,
    pub gid: u32,
    /// Builds at once (at least 1).
    pub jobs: usize,
    /// Refuse every download.
    pub offline: bool,
    /// Rebuild even on a cache hit and compare with the stored output.
    pub check: bool,
}

/// Everything a build run reads.
pub struct BuildContext<'a> {
    pub recipe: &'a Recipe,
    pub graph: &'a BuildGraph,
    pub store: &'a Store,
    pub tools: &'a dyn ToolResolver,
    pub observer: &'a dyn Observer,
    pub options: BuildOptions,
}

/// Progress events of a build run; every method defaults to doing nothing.
pub trait Observer: Sync {
    /// The run has `total` nodes.
    fn planned(&self, _total: usize) {}
    fn build_started(&self, _package: &str, _platform: &Platform) {}
    fn build_finished(&self, _package: &str, _platform: &Platform, _outcome: Outcome) {}
    fn download_started(&self, _url: &str, _total: Option<u64>) {}
    fn download_progress(&self, _url: &str, _done: u64) {}
    fn download_finished(&self, _url: &str) {}
}

/// How one node ended, for [`Observer::build_finished`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Cached,
    Built,
    Failed,
}

/// An [`Observer`] that ignores everything.
#[derive(Debug, Default)]
pub struct Quiet;

impl Observer for Quiet {}

/// The result of a build run, one entry per graph node (in graph order), for
/// `--json`, image assembly and `--check`.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub nodes: Vec<NodeReport>,
}

impl BuildReport {
    /// Nodes served from the store without running a build.
    pub fn cache_hits(&self) -> usize {
        self.nodes.iter().filter(|n| n.cached).count()
    }

    /// Nodes whose `--check` rebuild differed from the stored output.
    pub fn mismatches(&self) -> impl Iterator<Item = &NodeReport> {
        self.nodes.iter().filter(|n| !n.differences.is_empty())
    }

    /// The output tree of a node.
    pub fn output(&self, node: NodeId) -> Digest {
        self.nodes[node].output
    }
}

/// One package built (or found) for one platform.
#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    /// Index in [`BuildGraph::nodes`].
    pub node: NodeId,
    pub package: String,
    pub platform: Platform,
    #[serde(serialize_with = "display")]
    pub key: BuildKey,
    #[serde(serialize_with = "display")]
    pub output: Digest,
    /// Served from the store (no build ran).
    pub cached: bool,
    /// Where the log of the build that ran is (none for a cache hit).
    pub log: Option<PathBuf>,
    /// With `--check`: every file of the rebuild that differs from the stored output.
    pub differences: Vec<String>,
}

fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Why a build run failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot prepare the source of `{package}`")]
    Source {
        package: String,
        #[source]
        source: Box<SourceError>,
    },
    #[error("cannot resolve the tools of `{package}`")]
    Tool {
        package: String,
        #[source]
        source: ToolError,
    },
    #[error("cannot build `{package}` for {platform}")]
    Builder {
        package: String,
        platform: Platform,
        #[source]
        source: BuilderError,
    },
    #[error("cannot {step} of `{package}` for {platform}: {}", path.display())]
    Workspace {
        package: String,
        platform: Platform,
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {step} of `{package}`")]
    Store {
        package: String,
        step: &'static str,
        #[source]
        source: Box<StoreError>,
    },
    #[error("cannot run the build of `{package}` for {platform} (log: {})", log.display())]
    Sandbox {
        package: String,
        platform: Platform,
        log: PathBuf,
        #[source]
        source: Box<SandboxError>,
    },
    #[error(
        "build of `{package}` for {platform} failed with exit code {code}\n{tail}\n(full log: {})",
        log.display()
    )]
    Failed { package: String, platform: Platform, code: i32, tail: String, log: PathBuf },
}

/// Builds every node of `ctx.graph` (or finds it in the store).
pub fn build(ctx: &BuildContext<'_>) -> Result<BuildReport, BuildError> {
    let graph = ctx.graph;
    let count = graph.nodes.len();
    let _pin = ctx.store.pin().map_err(|source| BuildError::Store {
        package: String::new(),
        step: "lock the store",
        source: Box::new(source),
    })?;
    ctx.observer.planned(count);
    let inputs: Vec<Vec<NodeId>> = (0..count).map(|n| graph.build_inputs(n)).collect();
    let mut outputs = Outputs::new(graph);
    let mut reports: Vec<Option<NodeReport>> = vec![None; count];
    let mut started = vec![false; count];
    let mut first_error: Option<BuildError> = None;
    let jobs = ctx.options.jobs.max(1);

    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(NodeId, Result<NodeReport, BuildError>)>();
        let mut running = 0usize;
        loop {
            if first_error.is_none() {
                for node in 0..count {
                    if running >= jobs {
                        break;
                    }
                    let ready =
                        !started[node] && inputs[node].iter().all(|&d| reports[d].is_some());
                    if ready {
                        started[node] = true;
                        running += 1;
                        let snapshot = outputs.clone();
                        let tx = tx.clone();
                        scope.spawn(move || {
                            let result = build_node(ctx, node, snapshot);
                            let _ = tx.send((node, result));
                        });
                    }
                }
            }
            if running == 0 {
                break;
            }
            let Ok((node, result)) = rx.recv() else { break };
            running -= 1;
            match result {
                Ok(report) => {
                    outputs.record(node, report.output);
                    reports[node] = Some(report);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(BuildReport {
        nodes: reports.into_iter().map(|r| r.expect("every node is built or failed")).collect(),
    })
}

/// Prepares, keys and (on a miss or `--check`) builds one node.
fn build_node(
    ctx: &BuildContext<'_>,
    node: NodeId,
    mut outputs: Outputs,
) -> Result<NodeReport, BuildError> {
    let n = &ctx.graph.nodes[node];
    let package = &ctx.recipe.packages[&n.package];
    let name = n.package.clone();
    let prepared = match &package.source {
        None => source::PreparedSource::none(),
        Some(spanned) => {
            let path = match &spanned.value {
                Source::Path { .. } => ctx.recipe.source_path(package),
                Source::Url { .. } => None,
            };
            source::prepare(
                ctx.store,
                &spanned.value,
                path.as_deref(),
                ctx.options.offline,
                ctx.observer,
            )
            .map_err(|source| BuildError::Source {
                package: name.clone(),
                source: Box::new(source),
            })?
        }
    };
    let inputs = KeyInputs::for_node(
        ctx.recipe,
        ctx.graph,
        node,
        prepared.identity.clone(),
        &mut outputs,
        ctx.tools,
    )
    .map_err(|source| BuildError::Tool { package: name.clone(), source })?
    .expect("a node is scheduled only once its build inputs are recorded");
    let key = BuildKey::compute(&inputs);
    let store_error =
        |step, source| BuildError::Store { package: name.clone(), step, source: Box::new(source) };
    let stored =
        ctx.store.build(&key.digest()).map_err(|e| store_error("look up the build key", e))?;
    let report = |output, cached, log, differences| NodeReport {
        node,
        package: name.clone(),
        platform: n.platform,
        key,
        output,
        cached,
        log,
        differences,
    };
    if let Some(output) = stored
        && !ctx.options.check
    {
        ctx.observer.build_finished(&name, &n.platform, Outcome::Cached);
        return Ok(report(output, true, None, Vec::new()));
    }

    ctx.observer.build_started(&name, &n.platform);
    let toolchain = builders::Toolchain { rust_sysroot: exec::rust_sysroot(&inputs.tools) };
    let result = builders::commands(package, &n.platform, &toolchain)
        .map_err(|source| BuildError::Builder {
            package: name.clone(),
            platform: n.platform,
            source,
        })
        .and_then(|commands| {
            let deps = ctx
                .graph
                .build_inputs(node)
                .into_iter()
                .map(|d| {
                    let dep = &ctx.graph.nodes[d];
                    (dep.package.clone(), outputs.output(d).expect("build inputs are recorded"))
                })
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect();
            let job = exec::Job {
                package,
                platform: &n.platform,
                key: key.digest(),
                source: &prepared,
                tools: &inputs.tools,
                deps,
                check: stored.is_some(),
            };
            exec::run(ctx.store, &ctx.options, &job, &commands)
        });
    let output = match result {
        Ok(output) => output,
        Err(e) => {
            ctx.observer.build_finished(&name, &n.platform, Outcome::Failed);
            return Err(e);
        }
    };
    let log = Some(exec::log_path(ctx.store, &key.digest(), stored.is_some()));
    let differences = match stored {
        Some(previous) => compare::differences(ctx.store, &previous, &output)
            .map_err(|e| store_error("compare with the stored output", e))?,
        None => {
            ctx.store
                .set_build(&key.digest(), &output)
                .map_err(|e| store_error("record the build", e))?;
            Vec::new()
        }
    };
    ctx.observer.build_finished(&name, &n.platform, Outcome::Built);
    Ok(report(output, false, log, differences))
}

/// Downloads every `url` source of the recipe's packages that is not yet in
/// the store (`pkg fetch`); returns how many were downloaded.
pub fn fetch_all(
    recipe: &Recipe,
    store: &Store,
    observer: &dyn Observer,
) -> Result<usize, BuildError> {
    let mut fetched = 0;
    for package in recipe.packages.values() {
        let Some(spanned) = &package.source else { continue };
        let Source::Url { url, sha256 } = &spanned.value else { continue };
        let source_error = |source| BuildError::Source {
            package: package.name.value.clone(),
            source: Box::new(source),
        };
        let present = source::cached(store, sha256)
            .map_err(|e| source_error(SourceError::Store { url: url.clone(), source: e }))?;
        if present.is_none() {
            source::fetch(store, url, sha256, false, observer).map_err(source_error)?;
            fetched += 1;
        }
    }
    Ok(fetched)
}
