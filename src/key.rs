//! Build keys: nix-style input addressing.
//!
//! `BuildKey = blake3(DOMAIN ‖ postcard(KeyMaterial))`. [`KeyMaterial`] is the
//! one canonical encoding of every input that can change a build's output:
//! the key format version, package name and version, builder and options,
//! build env, the source's digest, the output digests of everything the build
//! mounts, the target platform, and each tool's identity.
//!
//! A build mounts each build dependency with its runtime closure. Rather than
//! list every mounted output, the key holds one [closure digest](Outputs::closure)
//! per direct build dependency: a Merkle hash over that dependency's output and
//! the closure digests of its runtime dependencies. It changes exactly when
//! any mounted output changes, and keeps each key O(direct dependencies). Maps are ordered
//! (`BTreeMap`) and tools sorted, so the encoding is a function of the inputs
//! alone. Anything not in `KeyMaterial` (time, user, store path, working
//! directory, host environment, description, license) cannot change a key.
//! Changing the encoding requires bumping [`KEY_FORMAT_VERSION`].

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::digest::Digest;
use crate::graph::{BuildGraph, NodeId};
use crate::platform::Platform;
use crate::recipe::{Builder, Package, Recipe};
use crate::tool::{ToolError, ToolIdentity, ToolResolver};

/// Version of the canonical encoding below.
pub const KEY_FORMAT_VERSION: u32 = 1;

/// Separates build-key hashes from every other blake3 use.
const DOMAIN: &[u8] = b"pkg build key\0";

/// The key of one package build for one platform.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BuildKey(Digest);

impl BuildKey {
    pub fn digest(&self) -> Digest {
        self.0
    }
}

impl fmt::Display for BuildKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for BuildKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildKey({})", self.0)
    }
}

/// What a build reads from its source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum SourceIdentity {
    /// No source.
    None,
    /// A local source, by the digest of its tree as the store ingests it.
    Tree(Digest),
    /// A pinned archive, by its sha256 (which fixes every byte of it).
    Archive { sha256: String },
}

/// Everything that determines a build's output.
#[derive(Debug, Clone)]
pub struct KeyInputs<'a> {
    pub package: &'a Package,
    pub platform: &'a Platform,
    pub source: SourceIdentity,
    /// Closure digests of the direct build dependencies, by package name.
    pub build_inputs: BTreeMap<String, Digest>,
    pub tools: Vec<ToolIdentity>,
}

impl<'a> KeyInputs<'a> {
    /// The inputs of `node`'s build, or `None` while the output of something it
    /// mounts is not yet in `outputs`.
    pub fn for_node(
        recipe: &'a Recipe,
        graph: &'a BuildGraph,
        node: NodeId,
        source: SourceIdentity,
        outputs: &mut Outputs,
        tools: &dyn ToolResolver,
    ) -> Result<Option<KeyInputs<'a>>, ToolError> {
        let n = &graph.nodes[node];
        let package = &recipe.packages[&n.package];
        let mut build_inputs = BTreeMap::new();
        for &dep in &n.build {
            let Some(digest) = outputs.closure(graph, dep) else { return Ok(None) };
            build_inputs.insert(graph.nodes[dep].package.clone(), digest);
        }
        let tools = tool_names(package, &n.platform)
            .iter()
            .map(|name| tools.resolve(name))
            .collect::<Result<_, _>>()?;
        Ok(Some(KeyInputs { package, platform: &n.platform, source, build_inputs, tools }))
    }
}

/// Output digests of built nodes, and the closure digests derived from them.
#[derive(Debug, Clone)]
pub struct Outputs {
    output: Vec<Option<Digest>>,
    closure: Vec<Option<Digest>>,
}

/// Separates closure digests from other blake3 uses.
const CLOSURE_DOMAIN: &[u8] = b"pkg closure\0";

impl Outputs {
    /// No outputs known yet, for the nodes of `graph`.
    pub fn new(graph: &BuildGraph) -> Self {
        Outputs { output: vec![None; graph.nodes.len()], closure: vec![None; graph.nodes.len()] }
    }

    /// Records the output tree of a built (or cached) node.
    pub fn record(&mut self, node: NodeId, tree: Digest) {
        self.output[node] = Some(tree);
    }

    pub fn output(&self, node: NodeId) -> Option<Digest> {
        self.output[node]
    }

    /// blake3(domain ‖ output(node) ‖ for each runtime dependency in name order:
    /// name ‖ closure(dep)), or `None` until every output in the closure is known.
    pub fn closure(&mut self, graph: &BuildGraph, node: NodeId) -> Option<Digest> {
        if let Some(known) = self.closure[node] {
            return Some(known);
        }
        let mut deps: Vec<(&str, Digest)> = Vec::new();
        for &dep in &graph.nodes[node].runtime {
            deps.push((graph.nodes[dep].package.as_str(), self.closure(graph, dep)?));
        }
        deps.sort();
        let mut hasher = blake3::Hasher::new();
        hasher.update(CLOSURE_DOMAIN);
        hasher.update(self.output[node]?.as_bytes());
        for (name, digest) in deps {
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(digest.as_bytes());
        }
        let digest = Digest::from(hasher.finalize());
        self.closure[node] = Some(digest);
        Some(digest)
    }
}

/// The host programs a build of `package` for `platform` runs: the recipe's
/// `tools` plus what its builder invokes. Sorted, each once.
pub fn tool_names(package: &Package, platform: &Platform) -> Vec<String> {
    let mut names: Vec<String> = package.tools.iter().map(|t| t.value.clone()).collect();
    names.extend(builder_tools(&package.build.value, platform));
    names.sort();
    names.dedup();
    names
}

/// What each builder runs: cc uses musl-gcc for the build machine's own
/// architecture and the cross `TRIPLE-gcc` otherwise; cargo links with the
/// same cross gcc (or the host `cc`). Must agree with `build::builders`.
fn builder_tools(builder: &Builder, platform: &Platform) -> Vec<String> {
    match builder {
        Builder::Files { .. } => vec![],
        Builder::Script { .. } => vec!["sh".into()],
        Builder::Cc { .. } if platform.arch() == Platform::host().arch() => vec!["musl-gcc".into()],
        Builder::Cc { .. } => vec![format!("{}-gcc", platform.gnu_triple())],
        Builder::Go { .. } => vec!["go".into()],
        // rustc links through the C compiler: `cc` natively, the cross gcc otherwise.
        Builder::Cargo { .. } if platform.arch() == Platform::host().arch() => {
            vec!["cargo".into(), "rustc".into(), "cc".into()]
        }
        Builder::Cargo { .. } => {
            vec!["cargo".into(), "rustc".into(), format!("{}-gcc", platform.gnu_triple())]
        }
    }
}

/// The canonical encoding's shape. Field order is part of the format.
#[derive(Serialize)]
struct KeyMaterial<'a> {
    format: u32,
    name: &'a str,
    version: Option<&'a str>,
    builder: &'a Builder,
    env: &'a BTreeMap<String, String>,
    source: &'a SourceIdentity,
    build_inputs: &'a BTreeMap<String, Digest>,
    platform: String,
    tools: Vec<&'a ToolIdentity>,
}

impl BuildKey {
    /// Computes the key of a build from its inputs.
    pub fn compute(inputs: &KeyInputs<'_>) -> BuildKey {
        let mut tools: Vec<&ToolIdentity> = inputs.tools.iter().collect();
        tools.sort();
        tools.dedup();
        let material = KeyMaterial {
            format: KEY_FORMAT_VERSION,
            name: &inputs.package.name.value,
            version: inputs.package.version.as_deref(),
            builder: &inputs.package.build.value,
            env: &inputs.package.env,
            source: &inputs.source,
            build_inputs: &inputs.build_inputs,
            platform: inputs.platform.to_string(),
            tools,
        };
        let encoded = postcard::to_allocvec(&material)
            .expect("postcard encodes plain structs of strings, maps and integers infallibly");
        let mut hasher = blake3::Hasher::new();
        hasher.update(DOMAIN);
        hasher.update(&encoded);
        BuildKey(hasher.finalize().into())
    }
}
