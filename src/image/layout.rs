//! Writing assembled images out of the store: an OCI image layout directory or
//! an oci-archive tar, and an fsck-style check of a layout.
//!
//! Invariants:
//! - On the store's filesystem a blob is a hard link to the store's copy (see
//!   [`links_to_store`]): a temp name linked to that inode, which is hashed
//!   and checked against its name before it is staged. Elsewhere blobs are
//!   copied into a temp file next to their destination, hashed while copying
//!   and checked against their name. The exception is a blob staged in the
//!   same publication (a layer just built): it was hashed as it was written,
//!   moments ago, by this process, so it is linked (to its temp file) or, on
//!   another filesystem, copied by the kernel (`copy_file_range`) with only
//!   its size checked. A blob already present is left alone (its name is its
//!   content; a damaged one is what [`verify_oci_layout`] reports).
//! - `index.json` is written canonically, replacing the old one atomically, so a
//!   reader sees the old or the new layout, never a half-written one. Entries
//!   of other refs already in it are kept; entries with the refs being written
//!   are replaced; entries are sorted by ref name.
//! - All of it is one [`Staged`] publication: every temp file is fsynced at
//!   once, then the blobs and `oci-layout` are renamed and their directories
//!   synced, and only then is `index.json` renamed (and its directory synced),
//!   so it never names a blob that is not durable. Directories that refuse
//!   fsync are tolerated.
//! - The archive is a deterministic tar of the same files (sorted paths, mtime
//!   = the latest `created` of its images, uid/gid 0, mode 0644/0755), written
//!   to a temp file and renamed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::oci::{REF_NAME, canonical_json};
use super::{AssembledImage, BlobRef, ImageError, Result};
use crate::store::{Existing, Staged, Step, Store};

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError + use<> {
    let path = path.to_path_buf();
    move |source| ImageError::Io { action, path, source }
}

/// The `index.json` descriptor naming `image`.
fn top_descriptor(image: &AssembledImage) -> serde_json::Value {
    let mut d = serde_json::json!({
        "mediaType": image.media_type,
        "digest": format!("sha256:{}", image.top.digest),
        "size": image.top.size,
        "annotations": {
            REF_NAME: image.name,
            super::oci::CREATED: super::oci::rfc3339(image.created),
        },
    });
    if let [only] = image.platforms.as_slice()
        && let Ok(platform) = only.platform.parse::<crate::platform::Platform>()
        && let Ok(p) = super::oci::oci_platform(&platform)
    {
        d["platform"] = serde_json::to_value(p).expect("platforms serialize");
    }
    d
}

fn ref_name(descriptor: &serde_json::Value) -> Option<&str> {
    descriptor.get("annotations")?.get(REF_NAME)?.as_str()
}

fn index_json(manifests: Vec<serde_json::Value>) -> Vec<u8> {
    let mut bytes = canonical_json(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": manifests,
    }));
    bytes.push(b'\n');
    bytes
}

/// Every distinct blob of `images`, sorted by digest.
fn all_blobs(images: &[AssembledImage]) -> Vec<BlobRef> {
    let mut blobs = BTreeMap::new();
    for image in images {
        for blob in image.blobs() {
            blobs.insert(blob.digest.clone(), blob);
        }
    }
    blobs.into_values().collect()
}

/// Opens a stored blob, checking its size (its content is verified while copied).
fn open_blob(store: &Store, blob: &BlobRef) -> Result<File> {
    let path = store.oci_blob_path(&blob.digest);
    let file = File::open(&path).map_err(io_err("open the stored blob", &path))?;
    check_size(file, blob, store)
}

/// `file`, the content of `blob` in `store`, unless its length is not the blob's size.
fn check_size(file: File, blob: &BlobRef, store: &Store) -> Result<File> {
    let path = store.oci_blob_path(&blob.digest);
    let len = file.metadata().map_err(io_err("read metadata of", &path))?.len();
    if len != blob.size {
        return Err(corrupt_in_cache(store, blob, format!("{len} bytes, expected {}", blob.size)));
    }
    Ok(file)
}

/// The store's layer cache holds a damaged copy of `blob`.
fn corrupt_in_cache(store: &Store, blob: &BlobRef, reason: String) -> ImageError {
    let cache = store.root().join("layers");
    ImageError::CorruptCachedBlob { cache, digest: blob.digest.clone(), reason }
}

/// Copies `reader`, the store's copy of `blob` at `from`, into `out`,
/// failing unless it hashes to `blob`.
fn copy_verified(
    reader: impl Read,
    mut out: impl Write,
    blob: &BlobRef,
    from: &Path,
    store: &Store,
) -> Result<()> {
    let mut hashing = super::layer::HashingWriter::new(&mut out);
    io::copy(&mut io::BufReader::with_capacity(256 * 1024, reader), &mut hashing)
        .map_err(io_err("copy", from))?;
    let (_, digest, size) = hashing.finish();
    if digest != blob.digest || size != blob.size {
        let reason = format!("its content hashes to sha256:{digest} ({size} bytes)");
        return Err(corrupt_in_cache(store, blob, reason));
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("set permissions of", path))
}

/// Where the layout at `dir` keeps its blobs.
pub(super) fn blobs_dir(dir: &Path) -> PathBuf {
    dir.join("blobs/sha256")
}

/// Whether the blobs of a layout in `blobs_dir` are hard links to the
/// store's copies rather than copies: when both are on one filesystem.
///
/// A layer just built is then written once, not twice, and a cached one is
/// only read (to hash it), not written again. The layout's file
/// and the store's layer cache are one inode, read-only (0444) like every
/// blob: OCI tools never write a blob in place (they write new blobs under
/// new names), and a blob damaged in place anyway is caught the next time the
/// cache's copy goes into a layout or an archive, since both hash it on the
/// way (and `umoci`, `skopeo` and registries check digests too).
pub(super) fn links_to_store(store: &Store, blobs_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    dev(store.root()).is_some_and(|store| dev(blobs_dir) == Some(store))
}

/// Writes `images` into the OCI image layout at `dir` (created if absent),
/// each named in `index.json` by its name.
pub fn write_oci_layout(store: &Store, dir: &Path, images: &[AssembledImage]) -> Result<()> {
    let staged = Staged::new();
    stage_oci_layout(store, dir, images, &staged)?;
    staged.publish()?;
    Ok(())
}

/// Stages in `staged` what [`write_oci_layout`] writes; the blobs may be in
/// the store or staged in `staged` to be stored.
pub(super) fn stage_oci_layout(
    store: &Store,
    dir: &Path,
    images: &[AssembledImage],
    staged: &Staged,
) -> Result<()> {
    let blobs_dir = blobs_dir(dir);
    std::fs::create_dir_all(&blobs_dir).map_err(io_err("create directory", &blobs_dir))?;
    staged.output_under(dir.to_path_buf());
    let link = links_to_store(store, &blobs_dir);
    for blob in all_blobs(images) {
        let dest = blobs_dir.join(&blob.digest);
        // Present, or written while its layer was built.
        if dest.exists() || staged.is_staged(&dest) {
            continue;
        }
        let from = store.oci_blob_path(&blob.digest);
        if link && staged.is_staged(&from) {
            staged.add_link(Step::Content, from, dest);
            continue;
        }
        if link && let Some(tmp) = linked_temp(&from, &blobs_dir) {
            // The very inode that gets the name is hashed: a copy damaged in
            // place goes no further.
            let linked = tmp.as_file().try_clone().map_err(io_err("open", &from))?;
            copy_verified(check_size(linked, &blob, store)?, io::sink(), &blob, &from, store)?;
            staged.add(Step::Content, tmp, dest, Existing::Keep);
            continue;
        }
        let mut tmp = temp_in(&blobs_dir)?;
        match staged.reopen(&from) {
            Some(fresh) => {
                let mut fresh = check_size(fresh.map_err(io_err("open", &from))?, &blob, store)?;
                io::copy(&mut fresh, tmp.as_file_mut()).map_err(io_err("copy", &from))?;
            }
            None => {
                copy_verified(open_blob(store, &blob)?, tmp.as_file_mut(), &blob, &from, store)?
            }
        }
        set_mode(tmp.path(), 0o444)?;
        staged.add(Step::Content, tmp, dest, Existing::Keep);
    }
    let layout_file = dir.join("oci-layout");
    if std::fs::read(&layout_file).ok().as_deref() != Some(OCI_LAYOUT) {
        staged.add(Step::Content, temp_with(dir, OCI_LAYOUT)?, layout_file, Existing::Replace);
    }
    // The directories may be new: their entries, too, are durable before
    // index.json names anything below them.
    staged.sync_dir(Step::Content, blobs_dir);
    staged.sync_dir(Step::Content, dir.join("blobs"));
    staged.sync_dir(Step::Content, dir.to_path_buf());
    // Keep other refs of an existing index.json.
    let index_path = dir.join("index.json");
    let mut manifests: Vec<(String, serde_json::Value)> = match std::fs::read(&index_path) {
        Ok(bytes) => {
            let invalid =
                |reason: String| ImageError::InvalidLayout { path: dir.to_path_buf(), reason };
            let old: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| invalid(format!("index.json: {e}")))?;
            let list = old.get("manifests").and_then(|m| m.as_array()).cloned().unwrap_or_default();
            list.into_iter()
                .filter(|d| ref_name(d).is_none_or(|r| !images.iter().any(|i| i.name == r)))
                .map(|d| (ref_name(&d).unwrap_or("").to_string(), d))
                .collect()
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err("read", &index_path)(e)),
    };
    for image in images {
        manifests.push((image.name.clone(), top_descriptor(image)));
    }
    manifests.sort_by(|a, b| a.0.cmp(&b.0));
    let manifests = manifests.into_iter().map(|(_, d)| d).collect();
    staged.add(Step::Names, temp_with(dir, &index_json(manifests))?, index_path, Existing::Replace);
    Ok(())
}

/// An empty temp file in `dir`, to be renamed to a name in it.
fn temp_in(dir: &Path) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".pkg")
        .tempfile_in(dir)
        .map_err(io_err("create a temp file in", dir))
}

/// A temp name in `dir` hard-linked to the store's blob `from`; `None` where
/// the link is refused (another filesystem, the inode's link limit, a blob
/// missing from the cache), for the caller to copy instead.
fn linked_temp(from: &Path, dir: &Path) -> Option<tempfile::NamedTempFile> {
    let link = |name: &Path| {
        std::fs::hard_link(from, name)?;
        File::open(name).inspect_err(|_| {
            let _ = std::fs::remove_file(name);
        })
    };
    tempfile::Builder::new().prefix(".pkg").make_in(dir, link).ok()
}

/// A temp file in `dir` holding `bytes`, mode 0644 (not synced).
fn temp_with(dir: &Path, bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
    let mut tmp = temp_in(dir)?;
    tmp.write_all(bytes).map_err(io_err("write", tmp.path()))?;
    set_mode(tmp.path(), 0o644)?;
    Ok(tmp)
}

/// Writes `images` as one deterministic oci-archive tar at `path`.
pub fn write_oci_archive(store: &Store, path: &Path, images: &[AssembledImage]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".pkg")
        .tempfile_in(&dir)
        .map_err(io_err("create a temp file in", &dir))?;
    let mtime = images.iter().map(|i| i.created).max().unwrap_or(0).max(0) as u64;
    let mut manifests: Vec<(String, serde_json::Value)> =
        images.iter().map(|i| (i.name.clone(), top_descriptor(i))).collect();
    manifests.sort_by(|a, b| a.0.cmp(&b.0));
    let index = index_json(manifests.into_iter().map(|(_, d)| d).collect());
    {
        let tar_err = io_err("write", path);
        let mut tar =
            tar::Builder::new(io::BufWriter::with_capacity(256 * 1024, tmp.as_file_mut()));
        let header = |kind: tar::EntryType, mode: u32, size: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_mtime(mtime);
            h.set_uid(0);
            h.set_gid(0);
            h
        };
        let mut corrupt = None;
        let result = (|| -> io::Result<()> {
            // Sorted by path bytes: blobs/ < blobs/sha256/ < blobs/sha256/HEX < index.json < oci-layout.
            tar.append_data(
                &mut header(tar::EntryType::Directory, 0o755, 0),
                "blobs/",
                io::empty(),
            )?;
            tar.append_data(
                &mut header(tar::EntryType::Directory, 0o755, 0),
                "blobs/sha256/",
                io::empty(),
            )?;
            for blob in all_blobs(images) {
                let file = open_blob(store, &blob).map_err(io::Error::other)?;
                let name = format!("blobs/sha256/{}", blob.digest);
                let mut h = header(tar::EntryType::Regular, 0o444, blob.size);
                // The size was checked on open; the tar crate fails if the file
                // changes length. The content is hashed on the way.
                let mut hashing = super::import::HashingReader::new(file);
                tar.append_data(&mut h, name, &mut hashing)?;
                let (digest, _) = hashing.finish();
                if digest != blob.digest {
                    let reason = format!("its content hashes to sha256:{digest}");
                    corrupt = Some(corrupt_in_cache(store, &blob, reason));
                    return Err(io::Error::other("a corrupt blob"));
                }
            }
            tar.append_data(
                &mut header(tar::EntryType::Regular, 0o644, index.len() as u64),
                "index.json",
                index.as_slice(),
            )?;
            tar.append_data(
                &mut header(tar::EntryType::Regular, 0o644, OCI_LAYOUT.len() as u64),
                "oci-layout",
                OCI_LAYOUT,
            )?;
            tar.into_inner()?.flush()
        })();
        if let Some(corrupt) = corrupt {
            return Err(corrupt);
        }
        result.map_err(tar_err)?;
    }
    tmp.as_file().sync_all().map_err(io_err("sync", path))?;
    set_mode(tmp.path(), 0o644)?;
    tmp.persist(path).map_err(|e| e.error).map_err(io_err("rename a temp file to", path))?;
    Ok(())
}

/// What [`verify_oci_layout`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayoutReport {
    /// Refs named in `index.json`.
    pub refs: Vec<String>,
    /// Distinct blobs re-hashed.
    pub blobs: usize,
}

/// Re-hashes every blob reachable from `index.json` (indexes, manifests,
/// configs, layers) and checks its size; fails on the first problem.
pub fn verify_oci_layout(dir: &Path) -> Result<LayoutReport> {
    let invalid = |reason: String| ImageError::InvalidLayout { path: dir.to_path_buf(), reason };
    let index_path = dir.join("index.json");
    let bytes = std::fs::read(&index_path).map_err(io_err("read", &index_path))?;
    let index: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("index.json: {e}")))?;
    let mut report = LayoutReport::default();
    let mut seen = std::collections::BTreeSet::new();
    let mut stack: Vec<serde_json::Value> = Vec::new();
    for d in index.get("manifests").and_then(|m| m.as_array()).into_iter().flatten() {
        if let Some(r) = ref_name(d) {
            report.refs.push(r.to_string());
        }
        stack.push(d.clone());
    }
    while let Some(descriptor) = stack.pop() {
        let digest = descriptor.get("digest").and_then(|d| d.as_str()).unwrap_or_default();
        let size = descriptor.get("size").and_then(|s| s.as_u64());
        let (Some(hex), Some(size)) = (digest.strip_prefix("sha256:"), size) else {
            return Err(invalid(format!("bad descriptor {descriptor}")));
        };
        if !seen.insert(hex.to_string()) {
            continue;
        }
        let path = dir.join("blobs/sha256").join(hex);
        let bytes = std::fs::read(&path).map_err(io_err("read", &path))?;
        let actual = crate::store::hex(&sha2::Sha256::digest(&bytes));
        if actual != hex || bytes.len() as u64 != size {
            return Err(ImageError::CorruptBlob {
                layout: dir.to_path_buf(),
                digest: format!("sha256:{hex}"),
                reason: format!("its content hashes to sha256:{actual} ({} bytes)", bytes.len()),
            });
        }
        report.blobs += 1;
        let media_type = descriptor.get("mediaType").and_then(|m| m.as_str()).unwrap_or_default();
        if media_type.ends_with("manifest.v1+json") || media_type.ends_with("index.v1+json") {
            let doc: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("blob sha256:{hex}: {e}")))?;
            for key in ["manifests", "layers"] {
                for d in doc.get(key).and_then(|m| m.as_array()).into_iter().flatten() {
                    stack.push(d.clone());
                }
            }
            if let Some(config) = doc.get("config") {
                stack.push(config.clone());
            }
        }
    }
    Ok(report)
}
