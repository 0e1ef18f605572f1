//! Refs: the names that keep trees alive.
//!
//! - build key ([`Digest`]) → tree digest, in `refs/builds/HEX`;
//! - image name ([`RefName`]) → [`ImageRecord`], in `refs/images/NAME`;
//! - gc root name ([`RefName`]) → tree digest, in `refs/roots/NAME`;
//! - imported image manifest (sha256 hex) → [`ImportRecord`], in
//!   `refs/imports/HEX` (see `image::import`).
//!
//! Each ref is one small file replaced atomically. Setting a ref holds a
//! [`Pin`](super::Pin) and checks that the trees it names exist, so a ref never
//! points at something a concurrent `gc` is deleting. `gc` marks from all four.
//! A store created before a ref kind existed lacks its directory: listing treats
//! a missing directory as empty, and setting a ref creates it.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::PathBuf;

use super::{Existing, IoContext, ObjectKind, Result, Staged, Step, Store, StoreError};
use crate::digest::Digest;

/// A validated image or root name: 1–200 bytes of `A-Z a-z 0-9 . _ - + : @ /`,
/// not starting with `.` or `/`. Stored as a file name with `/` written as `%`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RefName(String);

impl RefName {
    pub fn new(name: &str) -> Result<Self> {
        let reason = if name.is_empty() || name.len() > 200 {
            Some("names have 1 to 200 characters")
        } else if name.starts_with('.') || name.starts_with('/') {
            Some("names cannot start with `.` or `/`")
        } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+:@/".contains(&b)) {
            Some("names use only letters, digits and `._-+:@/`")
        } else if name.split('/').any(|part| part.is_empty() || part.starts_with('.')) {
            // Names become paths under refs/: no `..`, no hidden or empty parts.
            Some("each `/`-separated part of a name is non-empty and does not start with `.`")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(StoreError::InvalidRefName { name: name.to_string(), reason }),
            None => Ok(RefName(name.to_string())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn file_name(&self) -> String {
        self.0.replace('/', "%")
    }

    fn from_file_name(file: &str) -> Option<Self> {
        RefName::new(&file.replace('%', "/")).ok()
    }
}

impl fmt::Display for RefName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the store keeps for a built image: the trees `gc` must keep alive and
/// opaque metadata owned by the image module (manifest, config, layer digests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    pub trees: BTreeSet<Digest>,
    pub metadata: serde_json::Value,
}

/// What the store keeps for an image imported from an OCI layout or archive,
/// keyed by the sha256 of its manifest: the trees `gc` must keep alive and
/// opaque metadata owned by the import module (layer stack, config, platform).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRecord {
    pub trees: BTreeSet<Digest>,
    pub metadata: serde_json::Value,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ImageRecordFile {
    version: u32,
    trees: Vec<String>,
    metadata: serde_json::Value,
}

impl Store {
    fn refs_dir(&self, kind: &str) -> PathBuf {
        self.root.join("refs").join(kind)
    }

    fn require_tree(&self, tree: &Digest) -> Result<()> {
        if self.contains(ObjectKind::Tree, tree) {
            Ok(())
        } else {
            Err(StoreError::Missing { kind: ObjectKind::Tree, digest: *tree })
        }
    }

    /// Records that building `key` produced `tree`.
    pub fn set_build(&self, key: &Digest, tree: &Digest) -> Result<()> {
        let _pin = self.pin()?;
        self.require_tree(tree)?;
        let path = self.refs_dir("builds").join(key.to_hex());
        self.write_atomic(&path, format!("{tree}\n").as_bytes(), 0o644)
    }

    /// The tree recorded for build `key`, if any.
    pub fn build(&self, key: &Digest) -> Result<Option<Digest>> {
        self.read_digest_ref(self.refs_dir("builds").join(key.to_hex()))
    }

    /// Every build key and its tree.
    pub fn builds(&self) -> Result<Vec<(Digest, Digest)>> {
        let mut out = Vec::new();
        for (file, path) in self.list_refs("builds")? {
            let key = Digest::from_hex(&file).map_err(|e| StoreError::CorruptRef {
                path: path.clone(),
                reason: format!("its name is not a build key: {e}"),
            })?;
            if let Some(tree) = self.read_digest_ref(path)? {
                out.push((key, tree));
            }
        }
        Ok(out)
    }

    /// Adds or replaces the gc root `name`, keeping `tree` alive.
    pub fn add_root(&self, name: &RefName, tree: &Digest) -> Result<()> {
        let _pin = self.pin()?;
        self.require_tree(tree)?;
        let path = self.refs_dir("roots").join(name.file_name());
        self.write_atomic(&path, format!("{tree}\n").as_bytes(), 0o644)
    }

    /// Removes the gc root `name`; returns whether it existed.
    pub fn remove_root(&self, name: &RefName) -> Result<bool> {
        self.remove_ref(self.refs_dir("roots").join(name.file_name()))
    }

    /// Every gc root and its tree.
    pub fn roots(&self) -> Result<Vec<(RefName, Digest)>> {
        let mut out = Vec::new();
        for (file, path) in self.list_refs("roots")? {
            if let (Some(name), Some(tree)) =
                (RefName::from_file_name(&file), self.read_digest_ref(path)?)
            {
                out.push((name, tree));
            }
        }
        Ok(out)
    }

    /// Records (or replaces) the image `name`.
    pub fn set_image(&self, name: &RefName, record: &ImageRecord) -> Result<()> {
        let _pin = self.pin()?;
        let staged = Staged::new();
        self.stage_image(name, record, &staged)?;
        staged.publish()
    }

    /// Stages the record of image `name` (as `Names`, so after the blobs it
    /// names). Hold a [`Pin`](super::Pin) until `staged` is published.
    pub fn stage_image(&self, name: &RefName, record: &ImageRecord, staged: &Staged) -> Result<()> {
        for tree in &record.trees {
            self.require_tree(tree)?;
        }
        let path = self.refs_dir("images").join(name.file_name());
        let tmp = self.temp_file(&[&record_bytes(&record.trees, &record.metadata)], 0o644)?;
        staged.add(Step::Names, tmp, path, Existing::Replace);
        Ok(())
    }

    /// The image recorded as `name`, if any.
    pub fn image(&self, name: &RefName) -> Result<Option<ImageRecord>> {
        let path = self.refs_dir("images").join(name.file_name());
        Ok(read_record(&path, "image")?.map(|(trees, metadata)| ImageRecord { trees, metadata }))
    }

    /// Removes the image `name`; returns whether it existed.
    pub fn remove_image(&self, name: &RefName) -> Result<bool> {
        self.remove_ref(self.refs_dir("images").join(name.file_name()))
    }

    /// Every image name, sorted.
    pub fn images(&self) -> Result<Vec<RefName>> {
        let mut names: Vec<RefName> = self
            .list_refs("images")?
            .into_iter()
            .filter_map(|(file, _)| RefName::from_file_name(&file))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Records (or replaces) the import of the image whose manifest has sha256 `manifest`.
    pub fn set_import(&self, manifest: &str, record: &ImportRecord) -> Result<()> {
        let path = self.import_path(manifest)?;
        let _pin = self.pin()?;
        for tree in &record.trees {
            self.require_tree(tree)?;
        }
        let dir = self.refs_dir("imports");
        std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        self.write_atomic(&path, &record_bytes(&record.trees, &record.metadata), 0o644)
    }

    /// The import recorded for the manifest with sha256 `manifest`, if any.
    pub fn import_record(&self, manifest: &str) -> Result<Option<ImportRecord>> {
        let path = self.import_path(manifest)?;
        Ok(read_record(&path, "import")?.map(|(trees, metadata)| ImportRecord { trees, metadata }))
    }

    /// Removes the import of manifest `manifest`; returns whether it existed.
    pub fn remove_import(&self, manifest: &str) -> Result<bool> {
        self.remove_ref(self.import_path(manifest)?)
    }

    /// The sha256 (hex) of every imported manifest, sorted.
    pub fn imports(&self) -> Result<Vec<String>> {
        Ok(self
            .list_refs("imports")?
            .into_iter()
            .map(|(file, _)| file)
            .filter(|file| super::layers::is_sha256_hex(file))
            .collect())
    }

    fn import_path(&self, manifest: &str) -> Result<PathBuf> {
        if !super::layers::is_sha256_hex(manifest) {
            return Err(StoreError::InvalidRefName {
                name: manifest.to_string(),
                reason: "an import is named by 64 lowercase hex digits (a sha256)",
            });
        }
        Ok(self.refs_dir("imports").join(manifest))
    }

    /// Every tree digest any ref names: the roots of `gc`'s mark phase.
    pub fn referenced_trees(&self) -> Result<BTreeSet<Digest>> {
        let mut out: BTreeSet<Digest> = self.builds()?.into_iter().map(|(_, t)| t).collect();
        out.extend(self.roots()?.into_iter().map(|(_, t)| t));
        for name in self.images()? {
            if let Some(record) = self.image(&name)? {
                out.extend(record.trees);
            }
        }
        for manifest in self.imports()? {
            if let Some(record) = self.import_record(&manifest)? {
                out.extend(record.trees);
            }
        }
        Ok(out)
    }

    fn list_refs(&self, kind: &str) -> Result<Vec<(String, PathBuf)>> {
        let dir = self.refs_dir(kind);
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).ctx("list", &dir),
        };
        for entry in entries {
            let entry = entry.ctx("list", &dir)?;
            if let Some(name) = entry.file_name().to_str() {
                out.push((name.to_string(), entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn read_digest_ref(&self, path: PathBuf) -> Result<Option<Digest>> {
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim_end()
                .parse::<Digest>()
                .map(Some)
                .map_err(|e| StoreError::CorruptRef { path, reason: format!("not a digest: {e}") }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("read", &path),
        }
    }

    fn remove_ref(&self, path: PathBuf) -> Result<bool> {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                super::sync_parent(&path)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).ctx("remove", &path),
        }
    }
}

/// The file contents of an image or import record.
fn record_bytes(trees: &BTreeSet<Digest>, metadata: &serde_json::Value) -> Vec<u8> {
    let file = ImageRecordFile {
        version: 1,
        trees: trees.iter().map(Digest::to_string).collect(),
        metadata: metadata.clone(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).expect("JSON values serialize");
    bytes.push(b'\n');
    bytes
}

/// The trees and metadata of the record file at `path` (an image or import
/// record, named `what` in errors), if it exists.
fn read_record(
    path: &std::path::Path,
    what: &str,
) -> Result<Option<(BTreeSet<Digest>, serde_json::Value)>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx("read", path),
    };
    let corrupt = |reason: String| StoreError::CorruptRef { path: path.to_path_buf(), reason };
    let file: ImageRecordFile =
        serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if file.version != 1 {
        return Err(corrupt(format!("unsupported {what} record version {}", file.version)));
    }
    let trees = file
        .trees
        .iter()
        .map(|t| t.parse::<Digest>().map_err(|e| corrupt(format!("{t:?}: {e}"))))
        .collect::<Result<_>>()?;
    Ok(Some((trees, file.metadata)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_names_are_validated_and_round_trip_through_file_names() {
        for good in ["hello", "ghcr.io/a/b:1.0", "x@y+z_w-1"] {
            let name = RefName::new(good).unwrap();
            assert_eq!(RefName::from_file_name(&name.file_name()), Some(name));
        }
        for bad in ["", ".hidden", "/abs", "a b", "a%b", "a/../b", "a//b", "a/", &"x".repeat(201)] {
            assert!(RefName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
