//! Images: from package trees in the store to reproducible OCI images.
//!
//! [`assemble`] takes, per image, its runtime configuration, its creation time
//! and, per platform, the image's closure as an ordered list of (package name,
//! tree digest), dependencies first. For each platform it
//!
//! 1. checks that no two packages provide one path with different content
//!    ([`ImageError::Conflict`] names both packages and the path);
//! 2. makes one layer per package, then folds them down to
//!    [`AssembleOptions::max_layers`] by merging the least shared, smallest
//!    layers ([`layer::fold`]); "shared" counts the image targets of this call
//!    that contain the package, so layers common to several images or platforms
//!    stay separate and keep one blob digest across them;
//! 3. writes every layer not already in the store's layer cache, in parallel,
//!    as a deterministic tar ([`layer`]), then the config and manifest, and an
//!    index when the image has several platforms ([`oci`]);
//! 4. records the image in the store under its name.
//!
//! Steps 3 and 4 stage their files in one [`Staged`] publication, made durable
//! at the end: blobs first, then layer keys and image records, with three
//! waits for the disk in all.
//!
//! [`write_oci_layout`] and [`write_oci_archive`] copy the blobs out of the
//! store. [`verify_oci_layout`] re-hashes everything a layout references.
//!
//! Invariants:
//! - The output is a pure function of the inputs: the trees' digests, the
//!   configuration, `created`, the ownership and the layer cap. Thread count,
//!   store path, clock, umask, user and locale do not enter it.
//! - OCI digests are sha256 (registries require it); the store stays blake3.
//! - Default cap [`DEFAULT_MAX_LAYERS`] = 32: containerd and Docker refuse more
//!   than 127 (overlayfs mount options must fit in one page), and images built
//!   `FROM` ours add their own layers on top, so we keep most of that budget free;
//!   32 layers also pull well in parallel without per-layer overhead dominating.

pub mod gzip;
pub mod import;
pub mod layer;
mod layout;
pub mod oci;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use rayon::prelude::*;

use crate::digest::Digest;
use crate::platform::Platform;
pub use crate::recipe::Compression;
use crate::recipe::Port;
use crate::store::{ImageRecord, RefName, Staged, Store, StoreError};
pub use layout::{LayoutReport, verify_oci_layout, write_oci_archive, write_oci_layout};

/// Default most layers per image (see the module docs for why 32).
pub const DEFAULT_MAX_LAYERS: usize = 32;

/// Everything that can go wrong assembling or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("packages `{first}` and `{second}` both provide {} with different content", path.display())]
    Conflict { path: PathBuf, first: String, second: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the layer of tree {tree}")]
    Tar {
        tree: Digest,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build an OCI document")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("invalid image name {name:?}")]
    InvalidName {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("image `{image}` has no platforms")]
    NoPlatforms { image: String },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid OCI layout: {reason}", path.display())]
    InvalidLayout { path: PathBuf, reason: String },
    #[error("blob {digest} in {} is corrupt: {reason}", layout.display())]
    CorruptBlob { layout: PathBuf, digest: String, reason: String },
    #[error(
        "blob {digest} in the store's layer cache is corrupt: {reason}; the cache can go: \
         delete {} and build again",
        cache.display()
    )]
    CorruptCachedBlob { cache: PathBuf, digest: String, reason: String },
    #[error("image `{image}` needs package `{package}` for {platform}, but it has no output tree")]
    MissingOutput { image: String, package: String, platform: String },
    #[error("image record `{name}` is not readable by this pkg: {reason}")]
    BadRecord { name: String, reason: String },
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Owner of every entry in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
}

impl Ownership {
    pub const ROOT: Ownership = Ownership { uid: 0, gid: 0 };
}

/// The runtime configuration of an image (the recipe's `image` node without its contents).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub expose: Vec<Port>,
    pub labels: BTreeMap<String, String>,
    pub compression: Compression,
}

impl ImageConfig {
    pub fn from_recipe(image: &crate::recipe::Image) -> Self {
        ImageConfig {
            entrypoint: image.entrypoint.clone(),
            cmd: image.cmd.clone(),
            env: image.env.clone(),
            workdir: image.workdir.clone(),
            user: image.user.clone(),
            expose: image.expose.clone(),
            labels: image.labels.clone(),
            compression: image.compression,
        }
    }
}

/// One package of an image's closure: its name (for messages and history) and output tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageTree {
    pub name: String,
    pub tree: Digest,
}

/// An image's closure on one platform, dependencies first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformContents {
    pub platform: Platform,
    pub packages: Vec<PackageTree>,
}

/// One image to assemble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The image's name: its ref in `index.json` and its name in the store.
    pub name: String,
    pub config: ImageConfig,
    pub platforms: Vec<PlatformContents>,
    /// Seconds since the epoch: the recipe's `created`, else `SOURCE_DATE_EPOCH`,
    /// else 0, resolved by the caller. Stamped as every entry's mtime (clamped
    /// at 0) and as the config's and annotations' creation time.
    pub created: i64,
}

/// How to assemble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssembleOptions {
    /// Most layers per image; packages are folded together beyond it.
    pub max_layers: usize,
    /// Owner of every layer entry (uid/gid 0 unless the recipe sets one).
    pub owner: Ownership,
    /// Layers written at once (0: rayon's default, one per core); each gzip
    /// layer also compresses its blocks on one thread per core. Never changes
    /// the output.
    pub threads: usize,
}

impl Default for AssembleOptions {
    fn default() -> Self {
        AssembleOptions { max_layers: DEFAULT_MAX_LAYERS, owner: Ownership::ROOT, threads: 0 }
    }
}

/// A stored OCI blob: sha256 (hex, no prefix) and size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
}

/// One layer of an assembled image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssembledLayer {
    pub blob: BlobRef,
    /// sha256 of the uncompressed tar, hex.
    pub diff_id: String,
    /// The packages folded into this layer, in closure order.
    pub packages: Vec<String>,
    /// The (merged) tree the layer holds.
    pub tree: Digest,
}

/// One platform of an assembled image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssembledPlatform {
    /// `linux/amd64` form.
    pub platform: String,
    pub manifest: BlobRef,
    pub config: BlobRef,
    pub layers: Vec<AssembledLayer>,
}

/// An image whose blobs are all in the store's layer cache.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssembledImage {
    pub name: String,
    pub created: i64,
    /// Media type of the top-level blob: a manifest (one platform) or an index.
    pub media_type: String,
    /// The top-level blob: what `index.json` names.
    pub top: BlobRef,
    pub platforms: Vec<AssembledPlatform>,
    /// The index blob when there are several platforms.
    pub index: Option<BlobRef>,
}

impl AssembledImage {
    /// Every blob the image references, sorted by digest, each once.
    pub fn blobs(&self) -> Vec<BlobRef> {
        let mut blobs: BTreeMap<&str, u64> = BTreeMap::new();
        for p in &self.platforms {
            for b in [&p.manifest, &p.config].into_iter().chain(p.layers.iter().map(|l| &l.blob)) {
                blobs.insert(&b.digest, b.size);
            }
        }
        if let Some(b) = &self.index {
            blobs.insert(&b.digest, b.size);
        }
        blobs.into_iter().map(|(d, s)| BlobRef { digest: d.to_string(), size: s }).collect()
    }

    /// Total bytes of the image's distinct blobs.
    pub fn size(&self) -> u64 {
        self.blobs().iter().map(|b| b.size).sum()
    }

    /// Every tree the image's layers hold (what keeps them alive in the store).
    pub fn trees(&self) -> BTreeSet<Digest> {
        self.platforms.iter().flat_map(|p| p.layers.iter().map(|l| l.tree)).collect()
    }
}

/// What [`assemble`] did, for progress output and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssembleStats {
    /// Layers tarred and compressed by this call.
    pub layers_built: usize,
    /// Layers found in the layer cache.
    pub layers_cached: usize,
}

/// The [`ImageSpec`]s of a planned graph, one per image with all its planned
/// platforms, in the graph's order. `outputs` gives each built node's tree;
/// `default_created` is what an image without `created` gets (the caller
/// resolves `SOURCE_DATE_EPOCH`, else 0).
pub fn specs_from_graph(
    recipe: &crate::recipe::Recipe,
    graph: &crate::graph::BuildGraph,
    outputs: &HashMap<crate::graph::NodeId, Digest>,
    default_created: i64,
) -> Result<Vec<ImageSpec>> {
    let mut specs: Vec<ImageSpec> = Vec::new();
    for target in &graph.images {
        let image = &recipe.images[&target.image];
        let packages = target
            .closure
            .iter()
            .map(|&id| {
                let node = &graph.nodes[id];
                let tree = outputs.get(&id).ok_or_else(|| ImageError::MissingOutput {
                    image: target.image.clone(),
                    package: node.package.clone(),
                    platform: node.platform.to_string(),
                })?;
                Ok(PackageTree { name: node.package.clone(), tree: *tree })
            })
            .collect::<Result<Vec<_>>>()?;
        let contents = PlatformContents { platform: target.platform, packages };
        match specs.iter_mut().find(|s| s.name == target.image) {
            Some(spec) => spec.platforms.push(contents),
            None => specs.push(ImageSpec {
                name: target.image.clone(),
                config: ImageConfig::from_recipe(image),
                platforms: vec![contents],
                created: image.created.unwrap_or(default_created),
            }),
        }
    }
    Ok(specs)
}

/// Format tag of the metadata pkg keeps in an image record.
const RECORD_FORMAT: &str = "pkg-image 1";

/// A layer to produce: where it comes from and its key.
struct PlannedLayer {
    packages: Vec<String>,
    key: layer::LayerKey,
}

/// Assembles `images` (see the module docs) and records each in the store.
pub fn assemble(
    store: &Store,
    images: &[ImageSpec],
    options: &AssembleOptions,
) -> Result<(Vec<AssembledImage>, AssembleStats)> {
    let _pin = store.pin()?;
    let staged = Staged::new();
    let assembled = assemble_staged(store, images, options, &staged, None)?;
    staged.publish()?;
    Ok(assembled)
}

/// [`assemble`], then [`write_oci_layout`] of the images into `dir`, in one
/// publication: the layout's fsyncs overlap the store's (three waits for the
/// disk in all). On the store's filesystem the blobs are hard links to the
/// store's copies ([`layout::links_to_store`]; cached ones hashed first);
/// elsewhere, blobs built now are written into the layout as they are
/// compressed and the others are copied from the store.
pub fn assemble_into_layout(
    store: &Store,
    images: &[ImageSpec],
    options: &AssembleOptions,
    dir: &std::path::Path,
) -> Result<(Vec<AssembledImage>, AssembleStats)> {
    let _pin = store.pin()?;
    let staged = Staged::new();
    let blobs = layout::blobs_dir(dir);
    // Directories created here, deepest first: removed again if assembly fails.
    let created: Vec<&std::path::Path> = blobs.ancestors().take_while(|d| !d.exists()).collect();
    // If the layout cannot be created, stage_oci_layout says so below.
    let copy_to = std::fs::create_dir_all(&blobs).is_ok().then_some(blobs.as_path());
    let copy_to = copy_to.filter(|blobs| !layout::links_to_store(store, blobs));
    let assembled = match assemble_staged(store, images, options, &staged, copy_to) {
        Ok(assembled) => assembled,
        Err(e) => {
            drop(staged);
            for d in created {
                let _ = std::fs::remove_dir(d);
            }
            return Err(e);
        }
    };
    // The images are recorded even when the layout cannot be written.
    let layout = layout::stage_oci_layout(store, dir, &assembled.0, &staged);
    staged.publish()?;
    layout?;
    Ok(assembled)
}

/// [`assemble`] with everything it writes to the store staged in `staged`,
/// and the layers it builds also into `copy_to`. The caller holds a
/// [`Pin`](crate::store::Pin) until it publishes.
fn assemble_staged(
    store: &Store,
    images: &[ImageSpec],
    options: &AssembleOptions,
    staged: &Staged,
    copy_to: Option<&std::path::Path>,
) -> Result<(Vec<AssembledImage>, AssembleStats)> {
    for image in images {
        RefName::new(&image.name)
            .map_err(|source| ImageError::InvalidName { name: image.name.clone(), source })?;
        if image.platforms.is_empty() {
            return Err(ImageError::NoPlatforms { image: image.name.clone() });
        }
    }
    // How many image targets (image × platform) contain each package tree.
    let mut shared: HashMap<Digest, usize> = HashMap::new();
    for contents in images.iter().flat_map(|i| &i.platforms) {
        let distinct: BTreeSet<Digest> = contents.packages.iter().map(|p| p.tree).collect();
        for tree in distinct {
            *shared.entry(tree).or_default() += 1;
        }
    }
    // Plan every target's layers (checking conflicts), sequentially: cheap, and
    // it makes errors deterministic.
    let mut plans: Vec<Vec<Vec<PlannedLayer>>> = Vec::new();
    for image in images {
        let mut per_platform = Vec::new();
        for contents in &image.platforms {
            per_platform.push(plan_layers(store, image, contents, &shared, options)?);
        }
        plans.push(per_platform);
    }
    // Build each distinct layer once, in parallel.
    let mut jobs: BTreeMap<Digest, layer::LayerKey> = BTreeMap::new();
    for planned in plans.iter().flatten().flatten() {
        jobs.insert(planned.key.digest(), planned.key);
    }
    let jobs: Vec<(Digest, layer::LayerKey)> = jobs.into_iter().collect();
    // Everything this call writes to the store is published at once at the end:
    // layer and document blobs first, then layer keys and image records.
    let build = || {
        jobs.par_iter()
            .map(|(id, key)| {
                layer::build_layer(store, key, staged, copy_to).map(|built| (*id, built))
            })
            .collect::<Result<Vec<_>>>()
    };
    let built = match options.threads {
        0 => build()?,
        n => match rayon::ThreadPoolBuilder::new().num_threads(n).build() {
            Ok(pool) => pool.install(build)?,
            Err(_) => build()?,
        },
    };
    let mut stats = AssembleStats::default();
    let mut layers = HashMap::new();
    for (id, (cached, was_built)) in built {
        if was_built {
            stats.layers_built += 1;
        } else {
            stats.layers_cached += 1;
        }
        layers.insert(id, cached);
    }
    let mut out = Vec::new();
    for (image, plan) in images.iter().zip(plans) {
        let assembled = finish_image(store, image, plan, &layers, staged)?;
        let record = ImageRecord {
            trees: assembled.trees(),
            metadata: serde_json::json!({ "format": RECORD_FORMAT, "image": assembled }),
        };
        let name = RefName::new(&image.name)
            .map_err(|source| ImageError::InvalidName { name: image.name.clone(), source })?;
        store.stage_image(&name, &record, staged)?;
        out.push(assembled);
    }
    Ok((out, stats))
}

fn plan_layers(
    store: &Store,
    image: &ImageSpec,
    contents: &PlatformContents,
    shared: &HashMap<Digest, usize>,
    options: &AssembleOptions,
) -> Result<Vec<PlannedLayer>> {
    let sources: Vec<(&str, Digest)> =
        contents.packages.iter().map(|p| (p.name.as_str(), p.tree)).collect();
    layer::merge(store, &sources, false)?;
    let mut groups = Vec::new();
    let folding = contents.packages.len() > options.max_layers;
    for (i, package) in contents.packages.iter().enumerate() {
        let size = if folding { layer::tree_size(store, &package.tree)? } else { 0 };
        groups.push(layer::LayerGroup {
            members: vec![i],
            size,
            shared: shared.get(&package.tree).copied().unwrap_or(1),
        });
    }
    let groups = layer::fold(groups, options.max_layers);
    let mtime = u64::try_from(image.created).unwrap_or(0);
    groups
        .into_iter()
        .map(|group| {
            let members: Vec<(&str, Digest)> = group.members.iter().map(|&i| sources[i]).collect();
            let tree = match members.as_slice() {
                [(_, tree)] => *tree,
                _ => layer::merge(store, &members, true)?,
            };
            Ok(PlannedLayer {
                packages: members.iter().map(|(name, _)| name.to_string()).collect(),
                key: layer::LayerKey {
                    tree,
                    compression: image.config.compression,
                    owner: options.owner,
                    mtime,
                },
            })
        })
        .collect()
}

fn finish_image(
    store: &Store,
    image: &ImageSpec,
    plan: Vec<Vec<PlannedLayer>>,
    built: &HashMap<Digest, crate::store::CachedLayer>,
    staged: &Staged,
) -> Result<AssembledImage> {
    // Every document is made in memory first (each names the ones before by
    // digest), then all are staged at once.
    let mut documents: Vec<Vec<u8>> = Vec::new();
    let mut platforms = Vec::new();
    for (contents, planned) in image.platforms.iter().zip(plan) {
        let layers: Vec<AssembledLayer> = planned
            .into_iter()
            .map(|p| {
                let cached = &built[&p.key.digest()];
                AssembledLayer {
                    blob: BlobRef { digest: cached.digest.clone(), size: cached.size },
                    diff_id: cached.diff_id.clone(),
                    packages: p.packages,
                    tree: p.key.tree,
                }
            })
            .collect();
        let docs: Vec<oci::LayerDoc<'_>> = layers
            .iter()
            .map(|l| oci::LayerDoc {
                digest: &l.blob.digest,
                diff_id: &l.diff_id,
                size: l.blob.size,
                created_by: format!("pkg: {}", l.packages.join(", ")),
            })
            .collect();
        let config_doc = oci::config(&image.config, &contents.platform, image.created, &docs)?;
        let config = blob_ref(&config_doc);
        let manifest_doc = oci::manifest(
            &config.digest,
            config.size,
            &docs,
            image.config.compression,
            image.created,
        )?;
        let manifest = blob_ref(&manifest_doc);
        documents.extend([config_doc, manifest_doc]);
        platforms.push(AssembledPlatform {
            platform: contents.platform.to_string(),
            manifest,
            config,
            layers,
        });
    }
    let (media_type, top, index) = if let [only] = platforms.as_slice() {
        (oci_spec::image::MediaType::ImageManifest, only.manifest.clone(), None)
    } else {
        let manifests = image
            .platforms
            .iter()
            .zip(&platforms)
            .map(|(c, p)| {
                oci::platform_manifest_descriptor(&p.manifest.digest, p.manifest.size, &c.platform)
            })
            .collect::<Result<Vec<_>>>()?;
        let annotations = HashMap::from([(oci::CREATED.to_string(), oci::rfc3339(image.created))]);
        let index_doc = oci::index(manifests, annotations)?;
        let index = blob_ref(&index_doc);
        documents.push(index_doc);
        (oci_spec::image::MediaType::ImageIndex, index.clone(), Some(index))
    };
    let documents: Vec<&[u8]> = documents.iter().map(Vec::as_slice).collect();
    store.stage_oci_blobs(&documents, staged)?;
    Ok(AssembledImage {
        name: image.name.clone(),
        created: image.created,
        media_type: media_type.to_string(),
        top,
        platforms,
        index,
    })
}

/// The sha256 and size of an OCI document, as the store will name it.
fn blob_ref(bytes: &[u8]) -> BlobRef {
    use sha2::Digest as _;
    BlobRef { digest: crate::store::hex(&sha2::Sha256::digest(bytes)), size: bytes.len() as u64 }
}

/// The assembled image recorded in the store as `name`, if any.
pub fn load(store: &Store, name: &RefName) -> Result<Option<AssembledImage>> {
    let Some(record) = store.image(name)? else { return Ok(None) };
    decode_record(name, &record).map(Some)
}

fn decode_record(name: &RefName, record: &ImageRecord) -> Result<AssembledImage> {
    let bad = |reason: String| ImageError::BadRecord { name: name.to_string(), reason };
    if record.metadata.get("format").and_then(|f| f.as_str()) != Some(RECORD_FORMAT) {
        return Err(bad(format!("its format is not {RECORD_FORMAT:?}")));
    }
    let image = record.metadata.get("image").cloned().unwrap_or_default();
    serde_json::from_value(image).map_err(|e| bad(e.to_string()))
}

/// Every image recorded in the store, by name.
pub fn list(store: &Store) -> Result<Vec<AssembledImage>> {
    let mut out = Vec::new();
    for name in store.images()? {
        if let Some(image) = load(store, &name)? {
            out.push(image);
        }
    }
    Ok(out)
}
