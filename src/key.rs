//! Build keys: nix-style input addressing.
//!
//! `BuildKey = blake3(DOMAIN ‖ postcard(KeyMaterial))`. [`KeyMaterial`] is the
//! one canonical encoding of every input that can change a build's output:
//! the key format version, package name and version, builder and options,
//! build env, the source's digest, the output digests of everything the build
//! mounts, the target platform, and each tool's identity. Maps are ordered
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
    /// Output tree digests of everything mounted for the build, by package name.
    pub build_inputs: BTreeMap<String, Digest>,
    pub tools: Vec<ToolIdentity>,
}

impl<'a> KeyInputs<'a> {
    /// The inputs of `node`'s build, or `None` while the output of something it
    /// mounts is not known yet (`output` answers for built nodes).
    pub fn for_node(
        recipe: &'a Recipe,
        graph: &'a BuildGraph,
        node: NodeId,
        source: SourceIdentity,
        output: impl Fn(NodeId) -> Option<Digest>,
        tools: &dyn ToolResolver,
    ) -> Result<Option<KeyInputs<'a>>, ToolError> {
        let n = &graph.nodes[node];
        let package = &recipe.packages[&n.package];
        let mut build_inputs = BTreeMap::new();
        for input in graph.build_inputs(node) {
            let Some(digest) = output(input) else { return Ok(None) };
            build_inputs.insert(graph.nodes[input].package.clone(), digest);
        }
        let tools = tool_names(package, &n.platform)
            .iter()
            .map(|name| tools.resolve(name))
            .collect::<Result<_, _>>()?;
        Ok(Some(KeyInputs { package, platform: &n.platform, source, build_inputs, tools }))
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
/// architecture and the cross `TRIPLE-gcc` otherwise.
fn builder_tools(builder: &Builder, platform: &Platform) -> Vec<String> {
    match builder {
        Builder::Files { .. } => vec![],
        Builder::Script { .. } => vec!["sh".into()],
        Builder::Cc { .. } if platform.arch() == Platform::host().arch() => vec!["musl-gcc".into()],
        Builder::Cc { .. } => vec![format!("{}-gcc", platform.gnu_triple())],
        Builder::Go { .. } => vec!["go".into()],
        Builder::Cargo { .. } => vec!["cargo".into(), "rustc".into()],
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
