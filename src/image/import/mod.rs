//! Importing foreign OCI images (`oci:DIR[:REF]`, `oci-archive:FILE[:REF]`)
//! into the store, as a stack of trees that `pkg run` mounts with overlayfs.
//!
//! [`import`] reads `index.json`, selects one image manifest (by ref name,
//! then by platform through nested image indexes), reads its config and
//! applies each layer tar in tree space ([`apply`]); nothing is unpacked to
//! disk, and a layout inside an archive is read by seeking, never extracted
//! ([`source`]).
//!
//! What is verified: every blob read (index, manifest, config, layer) against
//! its descriptor's sha256 and size; each layer's uncompressed tar against the
//! config's `rootfs.diff_ids`; the config's os/architecture against the
//! requested platform. Digests must be `sha256:` + 64 lowercase hex digits
//! (so no digest can name a path outside `blobs/sha256/`). Media types: OCI
//! and Docker v2 indexes, manifests and configs; `tar`, `tar+gzip` and
//! `tar+zstd` layers. Anything else is an error, never a guess. A blob that
//! fails to decompress or parse is reported as corrupt when its digest is
//! wrong, so one flipped byte always names the blob.
//!
//! What is skipped or changed, with a warning in [`Imported::warnings`]:
//! device nodes and fifos (a rootless user cannot create them and the store
//! refuses them), setuid/setgid bits (the launcher sets `no_new_privs`
//! anyway), entries of unknown tar types. Owners, times and xattrs are not
//! read: the store has none. Entries with a `..` component refuse the layer.
//!
//! The layer-stack property: stacking [`Imported::layers`] (base first) with
//! overlayfs semantics — the topmost entry at a path wins, a directory merges
//! with the directories below it down to the first non-directory, and no tree
//! holds a whiteout — gives exactly the filesystem the OCI rules give
//! (applying each layer's changeset in order, whiteouts deleting from the
//! layers below). One tree per layer: a layer's own entries (its whiteouts
//! removed) form its tree, unchanged, so layers shared between images share
//! trees. A layer's whiteouts and opaque directories are applied by deleting
//! the paths they name from every tree *below* it ([`apply::Deletions`]): only
//! the directories on the way to a deleted path are rewritten, so lower trees
//! not touched by a deletion stay shared too.
//!
//! Cache: the result is recorded under `refs/imports/<manifest sha256>`
//! ([`Store::set_import`]), which also keeps its trees alive through `gc`. A
//! later import of the same manifest re-reads and verifies `index.json` and
//! the manifest (and any index on the way), checks that the recorded trees
//! and config blob are still in the store, and returns [`Imported::cached`]
//! without reading a layer. The whole import holds a [`Store::pin`], so a
//! concurrent `gc` cannot sweep the new trees before the record names them.

mod apply;
mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::PathBuf;

use serde::Deserialize;

use super::BlobRef;
use crate::digest::Digest;
use crate::platform::Platform;
use crate::store::{Batch, ImportRecord, ObjectKind, Store, StoreError};
pub(crate) use source::HashingReader;
use source::{Sha256, Source, drain};

/// Format tag of the metadata kept in an import record.
const RECORD_FORMAT: &str = "pkg-import 1";
/// Annotation naming an image in `index.json`.
const REF_NAME: &str = super::oci::REF_NAME;
/// The annotation containerd and nerdctl write with the full image name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Most image indexes followed from `index.json` to a manifest.
const MAX_INDEX_DEPTH: usize = 8;

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const CONFIG_TYPES: &[&str] =
    &["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];

/// Where a foreign image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OciSource {
    /// An OCI image layout directory (`oci:DIR`).
    Layout(PathBuf),
    /// A tar of an OCI image layout (`oci-archive:FILE`), as skopeo and buildah write.
    Archive(PathBuf),
}

impl fmt::Display for OciSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OciSource::Layout(dir) => write!(f, "oci:{}", dir.display()),
            OciSource::Archive(file) => write!(f, "oci-archive:{}", file.display()),
        }
    }
}

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportRequest<'a> {
    pub source: &'a OciSource,
    /// The image's ref name in `index.json`; `None` takes the only image.
    pub reference: Option<&'a str>,
    /// The platform wanted (from an index) or required (of a single manifest).
    pub platform: Platform,
}

/// An image in the store, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// sha256 hex of the selected image manifest.
    pub manifest: String,
    /// The image's platform, from its config.
    pub platform: Platform,
    /// The config JSON, stored with [`Store::put_oci_blob`].
    pub config: BlobRef,
    /// Store trees, base first, to stack as overlayfs lower dirs (see the module docs).
    pub layers: Vec<Digest>,
    /// What was skipped or changed, one line each, for the user.
    pub warnings: Vec<String>,
    /// Served from the import record without reading any layer.
    pub cached: bool,
}

/// Everything that can go wrong importing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{}/index.json is missing: not an OCI image layout", dir.display())]
    NotALayout { dir: PathBuf },
    #[error("{} is not an oci-archive: {reason}", path.display())]
    NotAnArchive { path: PathBuf, reason: String },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid: {reason}")]
    InvalidDocument { what: String, reason: String },
    #[error("{what} is too large for a JSON document ({size} bytes)")]
    TooLarge { what: String, size: u64 },
    #[error("{source_name} has no images (its index.json lists no manifests)")]
    NoImages { source_name: String },
    #[error(
        "{source_name} has no image named `{reference}` ({})",
        list_or(available, "it has no named images")
    )]
    UnknownRef { source_name: String, reference: String, available: Vec<String> },
    #[error("{source_name} holds several images ({}): name one, as in {source_name}:{}", refs.join(", "), refs.first().map_or("REF", String::as_str))]
    AmbiguousRef { source_name: String, refs: Vec<String> },
    #[error(
        "{source_name} has no image for {wanted} ({})",
        list_or(available, "its index lists no platforms")
    )]
    NoMatchingPlatform { source_name: String, wanted: Platform, available: Vec<String> },
    #[error("image is {found}, not {wanted} (use --platform {found})")]
    PlatformMismatch { found: Platform, wanted: Platform },
    #[error("image is {found}, which pkg cannot run")]
    UnsupportedPlatform { found: String },
    #[error(
        "unsupported digest `{digest}`: pkg reads sha256 digests (`sha256:` and 64 lowercase hex digits)"
    )]
    BadDigest { digest: String },
    #[error("blob {digest} is missing from {location}")]
    MissingBlob { digest: String, location: String },
    #[error("cannot read {}: it is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("blob {digest} in {location} is corrupt: {reason}")]
    CorruptBlob { digest: String, location: String, reason: String },
    #[error("blob {digest} has media type `{media_type}`, which is not {expected}")]
    UnknownMediaType { digest: String, media_type: String, expected: &'static str },
    #[error("{what} nests image indexes more than {MAX_INDEX_DEPTH} deep")]
    TooDeep { what: String },
    #[error(
        "manifest sha256:{manifest} lists {layers} layers but its config has {diff_ids} diff_ids"
    )]
    LayerCount { manifest: String, layers: usize, diff_ids: usize },
    #[error(
        "layer {layer} is corrupt: its uncompressed tar hashes to sha256:{actual}, but the config's diff_id is {expected}"
    )]
    DiffIdMismatch { layer: String, expected: String, actual: String },
    #[error("cannot read layer {layer}")]
    Layer {
        layer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer} entry `{entry}` escapes the image root")]
    Escape { layer: String, entry: String },
    #[error("layer {layer} entry `{entry}` is invalid: {reason}")]
    InvalidEntry { layer: String, entry: String, reason: String },
    #[error("layer {layer} entry `{entry}` is a hard link to `{target}`, which does not exist")]
    MissingLinkTarget { layer: String, entry: String, target: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn list_or(items: &[String], empty: &str) -> String {
    if items.is_empty() { empty.to_string() } else { format!("it has: {}", items.join(", ")) }
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    platform: Option<DescriptorPlatform>,
}

impl Descriptor {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

#[derive(Debug, Clone, Deserialize)]
struct DescriptorPlatform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

impl DescriptorPlatform {
    fn spelling(&self) -> String {
        spell(&self.os, &self.architecture, self.variant.as_deref())
    }
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(flatten)]
    platform: DescriptorPlatform,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// What the import record's metadata holds.
#[derive(serde::Serialize, Deserialize)]
struct RecordMetadata {
    format: String,
    layers: Vec<String>,
    config: BlobRef,
    platform: String,
    warnings: Vec<String>,
}

fn spell(os: &str, arch: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) if !v.is_empty() => format!("{os}/{arch}/{v}"),
        _ => format!("{os}/{arch}"),
    }
}

/// Whether an image of `os/arch[/variant]` serves a request for `wanted`: same
/// OS and architecture, and the same variant when `wanted` names one (`arm64`
/// without variant is `arm64/v8`).
fn platform_matches(wanted: Platform, os: &str, arch: &str, variant: Option<&str>) -> bool {
    let variant = match (arch, variant) {
        ("arm64", None | Some("")) => Some("v8"),
        (_, Some("")) => None,
        (_, v) => v,
    };
    os == wanted.os()
        && arch == wanted.arch().oci_name()
        && wanted.variant().is_none_or(|w| variant == Some(w))
}

/// Checks an image's os/architecture against the request; returns the image's platform.
fn check_platform(
    wanted: Platform,
    os: &str,
    arch: &str,
    variant: Option<&str>,
) -> Result<Platform, ImportError> {
    let spelled = spell(os, arch, variant);
    let Ok(found) = spelled.parse::<Platform>() else {
        return Err(ImportError::UnsupportedPlatform { found: spelled });
    };
    if !platform_matches(wanted, os, arch, variant) {
        return Err(ImportError::PlatformMismatch { found, wanted });
    }
    Ok(found)
}

fn parse<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: impl Fn() -> String,
) -> Result<T, ImportError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ImportError::InvalidDocument { what: what(), reason: e.to_string() })
}

/// What a descriptor points at.
enum Kind {
    Index(Index),
    Manifest,
}

/// Reads what `d` points at far enough to know whether it is an index (then
/// parsed) or a manifest. Descriptors without a media type are sniffed.
fn classify(source: &Source, d: &Descriptor) -> Result<Kind, ImportError> {
    let digest = Sha256::parse(&d.digest)?;
    let what = || format!("blob {digest} in {}", source.location());
    let is_index = if INDEX_TYPES.contains(&d.media_type.as_str()) {
        true
    } else if MANIFEST_TYPES.contains(&d.media_type.as_str()) {
        false
    } else if d.media_type.is_empty() {
        let bytes = source.read_blob(&digest, d.size)?;
        let doc: serde_json::Value = parse(&bytes, what)?;
        if doc.get("manifests").is_some() {
            return Ok(Kind::Index(parse(&bytes, what)?));
        }
        false
    } else {
        return Err(ImportError::UnknownMediaType {
            digest: digest.to_string(),
            media_type: d.media_type.clone(),
            expected: "an image index or manifest",
        });
    };
    if is_index {
        let bytes = source.read_blob(&digest, d.size)?;
        Ok(Kind::Index(parse(&bytes, what)?))
    } else {
        Ok(Kind::Manifest)
    }
}

/// The ref names in `index.json` that `reference` selects: an exact ref name
/// (or containerd image name), else a `NAME:TAG` ref whose tag it is.
fn select_by_ref<'a>(
    source: &Source,
    descriptors: &'a [Descriptor],
    reference: Option<&str>,
) -> Result<Vec<&'a Descriptor>, ImportError> {
    let refs: BTreeSet<&str> = descriptors.iter().filter_map(|d| d.annotation(REF_NAME)).collect();
    let Some(reference) = reference else {
        if refs.len() > 1 {
            return Err(ImportError::AmbiguousRef {
                source_name: source.name.clone(),
                refs: refs.iter().map(|r| r.to_string()).collect(),
            });
        }
        return Ok(descriptors.iter().collect());
    };
    let exact: Vec<&Descriptor> = descriptors
        .iter()
        .filter(|d| {
            d.annotation(REF_NAME) == Some(reference)
                || d.annotation(CONTAINERD_NAME) == Some(reference)
        })
        .collect();
    if !exact.is_empty() {
        return Ok(exact);
    }
    let tag = format!(":{reference}");
    let tagged: Vec<&Descriptor> = descriptors
        .iter()
        .filter(|d| d.annotation(REF_NAME).is_some_and(|r| r.ends_with(&tag)))
        .collect();
    if tagged.is_empty() {
        return Err(ImportError::UnknownRef {
            source_name: source.name.clone(),
            reference: reference.to_string(),
            available: refs.iter().map(|r| r.to_string()).collect(),
        });
    }
    Ok(tagged)
}

/// Follows `candidates` (one image's descriptors) down to one manifest: a
/// single index is opened, several descriptors are chosen between by platform.
fn resolve(
    source: &Source,
    candidates: Vec<&Descriptor>,
    wanted: Platform,
    depth: usize,
) -> Result<Descriptor, ImportError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(ImportError::TooDeep { what: source.name.clone() });
    }
    match candidates.as_slice() {
        [] => Err(ImportError::NoImages { source_name: source.name.clone() }),
        [only] => match classify(source, only)? {
            Kind::Manifest => Ok((*only).clone()),
            Kind::Index(index) => {
                resolve(source, index.manifests.iter().collect(), wanted, depth + 1)
            }
        },
        several => {
            let chosen = several.iter().find(|d| {
                d.platform.as_ref().is_some_and(|p| {
                    platform_matches(wanted, &p.os, &p.architecture, p.variant.as_deref())
                })
            });
            match chosen {
                Some(d) => resolve(source, vec![*d], wanted, depth + 1),
                None => {
                    let available: BTreeSet<String> = several
                        .iter()
                        .filter_map(|d| d.platform.as_ref())
                        .filter(|p| p.os != "unknown")
                        .map(DescriptorPlatform::spelling)
                        .collect();
                    Err(ImportError::NoMatchingPlatform {
                        source_name: source.name.clone(),
                        wanted,
                        available: available.into_iter().collect(),
                    })
                }
            }
        }
    }
}

/// Imports the image `request` names (see the module docs).
pub fn import(store: &Store, request: &ImportRequest<'_>) -> Result<Imported, ImportError> {
    let source = Source::open(request.source)?;
    let index_bytes = source.read_index()?;
    let index: Index = parse(&index_bytes, || source.index_location())?;
    if index.manifests.is_empty() {
        return Err(ImportError::NoImages { source_name: source.name.clone() });
    }
    let candidates = select_by_ref(&source, &index.manifests, request.reference)?;
    let selected = resolve(&source, candidates, request.platform, 0)?;
    let manifest_digest = Sha256::parse(&selected.digest)?;
    let manifest_bytes = source.read_blob(&manifest_digest, selected.size)?;
    let manifest: Manifest =
        parse(&manifest_bytes, || format!("manifest {manifest_digest} in {}", source.location()))?;
    let hex = manifest_digest.hex().to_string();
    if let Some(cached) = cached(store, &hex, request.platform)? {
        return Ok(cached);
    }
    let _pin = store.pin()?;
    let config_digest = Sha256::parse(&manifest.config.digest)?;
    if !manifest.config.media_type.is_empty()
        && !CONFIG_TYPES.contains(&manifest.config.media_type.as_str())
    {
        return Err(ImportError::UnknownMediaType {
            digest: config_digest.to_string(),
            media_type: manifest.config.media_type.clone(),
            expected: "an image config",
        });
    }
    let config_bytes = source.read_blob(&config_digest, manifest.config.size)?;
    let config: Config =
        parse(&config_bytes, || format!("config {config_digest} in {}", source.location()))?;
    let platform = check_platform(
        request.platform,
        &config.platform.os,
        &config.platform.architecture,
        config.platform.variant.as_deref(),
    )?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(ImportError::LayerCount {
            manifest: hex,
            layers: manifest.layers.len(),
            diff_ids: config.rootfs.diff_ids.len(),
        });
    }
    // Layer contents are written unsynced and made durable together before
    // the record names them (see `store::batch`).
    let batch = Batch::begin(store)?;
    let stored = store.put_oci_blob(&config_bytes)?;
    let config_ref = BlobRef { digest: stored.digest, size: stored.size };
    let mut stack: Vec<Digest> = Vec::new();
    let mut warnings = Vec::new();
    for (descriptor, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        let digest = Sha256::parse(&descriptor.digest)?;
        let diff_id = Sha256::parse(diff_id)?;
        let compression = layer_compression(&descriptor.media_type).ok_or_else(|| {
            ImportError::UnknownMediaType {
                digest: digest.to_string(),
                media_type: descriptor.media_type.clone(),
                expected: "a tar, tar+gzip or tar+zstd layer",
            }
        })?;
        let blob = source.open_blob(&digest, descriptor.size)?;
        let applied = apply_blob(store, &batch, &stack, blob, compression, &diff_id)?;
        if applied.deletions.clears_root() {
            let empty = store.put_tree_in(&crate::store::Tree::new(), Some(&batch))?;
            stack.iter_mut().for_each(|t| *t = empty);
        } else if !applied.deletions.is_empty() {
            for tree in &mut stack {
                *tree = applied.deletions.remove_from(store, &batch, tree)?;
            }
        }
        stack.push(applied.tree);
        warnings.extend(applied.warnings);
    }
    if stack.is_empty() {
        // A runnable stack needs one lower dir; an image without layers is empty.
        stack.push(store.put_tree_in(&crate::store::Tree::new(), Some(&batch))?);
    }
    batch.finish()?;
    let metadata = RecordMetadata {
        format: RECORD_FORMAT.to_string(),
        layers: stack.iter().map(Digest::to_string).collect(),
        config: config_ref.clone(),
        platform: platform.to_string(),
        warnings: warnings.clone(),
    };
    let record = ImportRecord {
        trees: stack.iter().copied().collect(),
        metadata: serde_json::to_value(&metadata).expect("import records serialize"),
    };
    store.set_import(&hex, &record)?;
    Ok(Imported {
        manifest: hex,
        platform,
        config: config_ref,
        layers: stack,
        warnings,
        cached: false,
    })
}

/// The recorded import of manifest `hex`, if it is complete in the store and
/// of the wanted platform. A record this pkg cannot read is treated as absent
/// (the import then rewrites it); a platform mismatch is the same error a
/// fresh import gives.
fn cached(store: &Store, hex: &str, wanted: Platform) -> Result<Option<Imported>, ImportError> {
    let Ok(Some(record)) = store.import_record(hex) else { return Ok(None) };
    let Ok(meta) = serde_json::from_value::<RecordMetadata>(record.metadata) else {
        return Ok(None);
    };
    if meta.format != RECORD_FORMAT {
        return Ok(None);
    }
    let Ok(platform) = meta.platform.parse::<Platform>() else { return Ok(None) };
    let variant = platform.variant();
    check_platform(wanted, platform.os(), platform.arch().oci_name(), variant)?;
    let Ok(layers) = meta.layers.iter().map(|l| l.parse::<Digest>()).collect::<Result<Vec<_>, _>>()
    else {
        return Ok(None);
    };
    if layers.is_empty() || !layers.iter().all(|t| store.contains(ObjectKind::Tree, t)) {
        return Ok(None);
    }
    let config_ok = crate::store::is_sha256_hex(&meta.config.digest)
        && std::fs::metadata(store.oci_blob_path(&meta.config.digest))
            .is_ok_and(|m| m.len() == meta.config.size);
    if !config_ok {
        return Ok(None);
    }
    Ok(Some(Imported {
        manifest: hex.to_string(),
        platform,
        config: meta.config,
        layers,
        warnings: meta.warnings,
        cached: true,
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

fn layer_compression(media_type: &str) -> Option<LayerCompression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(LayerCompression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            Some(LayerCompression::Gzip)
        }
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(LayerCompression::Zstd),
        _ => None,
    }
}

/// Applies one layer blob, verifying its digest and diff_id. When applying
/// fails and the blob's digest is also wrong, the corrupt blob is reported:
/// it is the cause.
fn apply_blob(
    store: &Store,
    batch: &Batch,
    lower: &[Digest],
    mut blob: source::Blob,
    compression: LayerCompression,
    diff_id: &Sha256,
) -> Result<apply::AppliedLayer, ImportError> {
    let layer = blob.digest.to_string();
    let raw = &mut blob.reader;
    let applied = match compression {
        LayerCompression::None => apply_tar(store, batch, lower, &layer, raw),
        LayerCompression::Gzip => {
            apply_tar(store, batch, lower, &layer, flate2::read::MultiGzDecoder::new(raw))
        }
        LayerCompression::Zstd => match zstd::stream::read::Decoder::new(raw) {
            Ok(decoder) => apply_tar(store, batch, lower, &layer, decoder),
            Err(source) => Err(ImportError::Layer { layer: layer.clone(), source }),
        },
    };
    // Whatever the decoder left unread (padding, a failed tail) still counts.
    let drained = drain(&mut blob.reader);
    blob.check()?;
    drained.map_err(|source| ImportError::Layer { layer: layer.clone(), source })?;
    let (applied, actual) = applied?;
    if actual != diff_id.hex() {
        return Err(ImportError::DiffIdMismatch { layer, expected: diff_id.to_string(), actual });
    }
    Ok(applied)
}

/// Applies the tar read from `reader` and returns it with the tar's sha256.
fn apply_tar(
    store: &Store,
    batch: &Batch,
    lower: &[Digest],
    layer: &str,
    reader: impl Read,
) -> Result<(apply::AppliedLayer, String), ImportError> {
    let mut tar = HashingReader::new(reader);
    let applied = apply::apply(store, batch, lower, layer, &mut tar)?;
    drain(&mut tar).map_err(|source| ImportError::Layer { layer: layer.to_string(), source })?;
    Ok((applied, tar.finish().0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_match_on_os_arch_and_a_requested_variant() {
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let arm64v8: Platform = "linux/arm64/v8".parse().unwrap();
        let armv7: Platform = "linux/arm/v7".parse().unwrap();
        assert!(platform_matches(amd64, "linux", "amd64", None));
        assert!(!platform_matches(amd64, "linux", "arm64", None));
        assert!(!platform_matches(amd64, "windows", "amd64", None));
        assert!(platform_matches(arm64, "linux", "arm64", Some("v8")));
        assert!(platform_matches(arm64v8, "linux", "arm64", None));
        assert!(platform_matches(armv7, "linux", "arm", Some("v7")));
        assert!(!platform_matches(armv7, "linux", "arm", Some("v6")));
    }

    #[test]
    fn only_sha256_digests_are_accepted() {
        assert!(Sha256::parse(&format!("sha256:{}", "a".repeat(64))).is_ok());
        for bad in
            ["sha256:../../etc/passwd", "sha512:abc", "", &format!("sha256:{}", "A".repeat(64))]
        {
            assert!(matches!(Sha256::parse(bad), Err(ImportError::BadDigest { .. })), "{bad}");
        }
    }
}
