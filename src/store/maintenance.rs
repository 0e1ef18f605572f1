//! Whole-store operations: statistics, verification and garbage collection.
//!
//! - [`Store::stats`] and [`Store::verify`] only read; they take no lock and may
//!   run beside anything.
//! - [`Store::gc`] takes the store lock exclusively, so no ingest, ref write or
//!   checkout runs while it marks from every ref (builds, images, roots) and
//!   sweeps unreachable trees and blobs, temp files, and cached checkout files no
//!   checkout links to any more. If a reachable tree cannot be read, gc deletes
//!   nothing: without the tree it cannot know what the tree keeps alive.

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::blob;
use super::tree::{Chunk, FileNode, Node, Permissions};
use super::{IoContext, ObjectKind, Result, Store, StoreError};
use crate::digest::Digest;

/// Sizes and ratios of a store; see [`Store::stats`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Blobs plus trees.
    pub objects: u64,
    pub blobs: u64,
    pub trees: u64,
    /// Sum of the sizes of every file entry in every stored tree, as if nothing were shared.
    pub logical_bytes: u64,
    /// Sum of the uncompressed sizes of the distinct blobs.
    pub unique_bytes: u64,
    /// Bytes the blob and tree files take on disk (their lengths).
    pub stored_bytes: u64,
    /// `logical_bytes / unique_bytes`: how much chunk sharing saves.
    pub dedup_ratio: f64,
    /// `unique_bytes / stored blob bytes`: how much zstd saves.
    pub compression_ratio: f64,
    /// Decompressed copies in `checkouts/files` (left by checkouts and
    /// builds; `gc` removes those no checkout links) and their bytes.
    pub cached_files: u64,
    pub cached_bytes: u64,
}

/// One bad object or ref found by [`Store::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What is bad: `blob b3:…`, `tree b3:…`, `ref PATH` or `cached file PATH`.
    pub subject: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.reason)
    }
}

/// What [`Store::verify`] checked and found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub blobs: u64,
    pub trees: u64,
    pub cached_files: u64,
    /// Sorted by subject.
    pub problems: Vec<Problem>,
}

/// What [`Store::gc`] removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub trees: Vec<Digest>,
    pub blobs: Vec<Digest>,
    pub cached_files: u64,
    /// Shared checkouts (`checkouts/trees/`) of trees no ref reaches.
    pub checkouts: u64,
    pub temp_files: u64,
    /// Bytes of all removed files.
    pub bytes: u64,
}

impl Store {
    /// Every object of `kind` on disk with its path, sorted by digest.
    pub(super) fn list_objects(&self, kind: ObjectKind) -> Result<Vec<(Digest, PathBuf)>> {
        let top = self.root.join(match kind {
            ObjectKind::Blob => "blobs",
            ObjectKind::Tree => "trees",
        });
        list_sharded(&top, |name| Digest::from_hex(name).ok())
    }

    /// Counts objects and bytes. Reads every tree and every blob header.
    pub fn stats(&self) -> Result<Stats> {
        let blobs = self.list_objects(ObjectKind::Blob)?;
        let trees = self.list_objects(ObjectKind::Tree)?;
        let (unique_bytes, blob_stored) = blobs
            .par_iter()
            .map(|(_, path)| {
                let mut file = std::fs::File::open(path).ctx("open", path)?;
                let stored = file.metadata().ctx("read metadata of", path)?.len();
                let mut header = [0u8; blob::HEADER_LEN];
                // A corrupt header counts as nothing; `verify` is where it gets named.
                let raw =
                    file.read_exact(&mut header).ok().and_then(|()| blob::raw_len(&header).ok());
                Ok((raw.unwrap_or(0), stored))
            })
            .try_reduce(|| (0, 0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))?;
        let (logical_bytes, tree_stored) = trees
            .par_iter()
            .map(|(digest, path)| {
                let stored = std::fs::metadata(path).ctx("read metadata of", path)?.len();
                let logical = match self.read_tree(digest) {
                    Ok(tree) => tree
                        .iter()
                        .map(|(_, n)| match n {
                            Node::File(f) => f.size(),
                            _ => 0,
                        })
                        .sum(),
                    Err(_) => 0,
                };
                Ok((logical, stored))
            })
            .try_reduce(|| (0, 0), |a, b| Ok((a.0 + b.0, a.1 + b.1)))?;
        let cached = self.list_cached_files()?;
        let cached_bytes = cached
            .iter()
            // One gone meanwhile (a reader found it damaged) counts as nothing.
            .filter_map(|(_, path)| std::fs::symlink_metadata(path).ok())
            .map(|meta| meta.len())
            .sum();
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        Ok(Stats {
            cached_files: cached.len() as u64,
            cached_bytes,
            objects: (blobs.len() + trees.len()) as u64,
            blobs: blobs.len() as u64,
            trees: trees.len() as u64,
            logical_bytes,
            unique_bytes,
            stored_bytes: blob_stored + tree_stored,
            dedup_ratio: ratio(logical_bytes, unique_bytes),
            compression_ratio: ratio(unique_bytes, blob_stored),
        })
    }

    /// Re-hashes every blob, tree and cached checkout file, and checks that every
    /// tree and ref names objects that exist.
    pub fn verify(&self) -> Result<VerifyReport> {
        let blobs = self.list_objects(ObjectKind::Blob)?;
        let trees = self.list_objects(ObjectKind::Tree)?;
        let present_blobs: HashSet<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        let present_trees: HashSet<Digest> = trees.iter().map(|(d, _)| *d).collect();
        let mut problems: Vec<Problem> = blobs
            .par_iter()
            .filter_map(|(digest, _)| {
                self.read_blob(digest)
                    .err()
                    .map(|e| Problem { subject: format!("blob {digest}"), reason: reason(&e) })
            })
            .collect();
        problems.par_extend(trees.par_iter().flat_map_iter(|(digest, _)| {
            let subject = format!("tree {digest}");
            match self.read_tree(digest) {
                Err(e) => vec![Problem { subject, reason: reason(&e) }],
                Ok(tree) => {
                    let mut out = Vec::new();
                    for (name, node) in tree.iter() {
                        match node {
                            Node::File(f) => {
                                for c in
                                    f.chunks().iter().filter(|c| !present_blobs.contains(&c.digest))
                                {
                                    out.push(Problem {
                                        subject: subject.clone(),
                                        reason: format!(
                                            "entry {name:?} names missing blob {}",
                                            c.digest
                                        ),
                                    });
                                }
                            }
                            Node::Dir(d) if !present_trees.contains(&d.digest) => {
                                out.push(Problem {
                                    subject: subject.clone(),
                                    reason: format!(
                                        "entry {name:?} names missing tree {}",
                                        d.digest
                                    ),
                                })
                            }
                            _ => {}
                        }
                    }
                    out
                }
            }
        }));
        match self.ref_targets() {
            Ok(targets) => {
                for (subject, tree) in targets {
                    if !present_trees.contains(&tree) {
                        problems.push(Problem {
                            subject,
                            reason: format!("names missing tree {tree}"),
                        });
                    }
                }
            }
            Err(e) => problems.push(Problem { subject: "refs".into(), reason: reason(&e) }),
        }
        let cached = self.list_cached_files()?;
        problems.par_extend(cached.par_iter().filter_map(|(name, path)| {
            let bad = |reason: String| {
                Some(Problem { subject: format!("cached file {}", path.display()), reason })
            };
            match cached_file_matches(name, path) {
                Ok(true) => None,
                Ok(false) => bad("content or mode does not match its name".into()),
                Err(e) => bad(reason(&e)),
            }
        }));
        problems.sort_by(|a, b| (&a.subject, &a.reason).cmp(&(&b.subject, &b.reason)));
        Ok(VerifyReport {
            blobs: blobs.len() as u64,
            trees: trees.len() as u64,
            cached_files: cached.len() as u64,
            problems,
        })
    }

    /// Each ref (described as `ref PATH`) and a tree it names.
    fn ref_targets(&self) -> Result<Vec<(String, Digest)>> {
        let mut out = Vec::new();
        for (key, tree) in self.builds()? {
            out.push((format!("ref refs/builds/{}", key.to_hex()), tree));
        }
        for (name, tree) in self.roots()? {
            out.push((format!("ref refs/roots/{name}"), tree));
        }
        for name in self.images()? {
            for tree in self.image(&name)?.map(|r| r.trees).unwrap_or_default() {
                out.push((format!("ref refs/images/{name}"), tree));
            }
        }
        for manifest in self.imports()? {
            for tree in self.import_record(&manifest)?.map(|r| r.trees).unwrap_or_default() {
                out.push((format!("ref refs/imports/{manifest}"), tree));
            }
        }
        Ok(out)
    }

    fn list_cached_files(&self) -> Result<Vec<(String, PathBuf)>> {
        list_sharded(&self.root.join("checkouts/files"), |name| Some(name.to_string()))
    }

    /// Marks everything reachable from a ref and deletes the rest. With
    /// `dry_run`, deletes nothing and reports what it would delete.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        let _lock = self.lock_exclusive()?;
        let mut live_trees = HashSet::new();
        let mut live_blobs = HashSet::new();
        let mut stack: Vec<Digest> = self.referenced_trees()?.into_iter().collect();
        while let Some(digest) = stack.pop() {
            if !live_trees.insert(digest) {
                continue;
            }
            let tree = self
                .read_tree(&digest)
                .map_err(|e| StoreError::Unmarkable { digest, source: Box::new(e) })?;
            for (_, node) in tree.iter() {
                match node {
                    Node::File(f) => live_blobs.extend(f.chunks().iter().map(|c| c.digest)),
                    Node::Dir(d) => stack.push(d.digest),
                    Node::Symlink(_) => {}
                }
            }
        }
        let mut report = GcReport::default();
        // A cached file may go meanwhile (a reader that found it damaged
        // removes it): what is gone is not an error.
        let remove = |path: &Path, report: &mut GcReport| -> Result<()> {
            let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
            match std::fs::symlink_metadata(path) {
                Err(e) if gone(&e) => return Ok(()),
                meta => report.bytes += meta.ctx("read metadata of", path)?.len(),
            }
            if !dry_run
                && let Err(e) = std::fs::remove_file(path)
                && !gone(&e)
            {
                return Err(e).ctx("remove", path);
            }
            Ok(())
        };
        // Trees first: a crash mid-sweep must never leave a tree whose blobs are gone.
        for (digest, path) in self.list_objects(ObjectKind::Tree)? {
            if !live_trees.contains(&digest) {
                remove(&path, &mut report)?;
                report.trees.push(digest);
            }
        }
        for (digest, path) in self.list_objects(ObjectKind::Blob)? {
            if !live_blobs.contains(&digest) {
                remove(&path, &mut report)?;
                report.blobs.push(digest);
            }
        }
        // Shared checkouts of dead trees go before the cached files they link.
        let trees_dir = self.root.join("checkouts/trees");
        for (digest, path) in list_dir(&trees_dir, |name| Digest::from_hex(name).ok())? {
            if live_trees.contains(&digest) {
                continue;
            }
            // A running `pkg run` holds a lease (a shared flock): keep it.
            let dir = std::fs::File::open(&path).ctx("open", &path)?;
            match fs4::FileExt::try_lock(&dir) {
                Ok(()) => {}
                Err(fs4::TryLockError::WouldBlock) => continue,
                Err(fs4::TryLockError::Error(e)) => return Err(e).ctx("lock", &path),
            }
            report.bytes += dir_size(&path);
            if !dry_run {
                super::remove_checkout(&path)?;
            }
            report.checkouts += 1;
        }
        // A cached file with one link is in no checkout: nothing shares it any more.
        for (_, path) in self.list_cached_files()? {
            let meta = match std::fs::symlink_metadata(&path) {
                // A reader that found it damaged removed it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                meta => meta.ctx("read metadata of", &path)?,
            };
            if meta.nlink() == 1 {
                remove(&path, &mut report)?;
                report.cached_files += 1;
            }
        }
        // Holding the exclusive lock, no writer exists: every temp file is debris.
        let tmp = self.root.join("tmp");
        for entry in std::fs::read_dir(&tmp).ctx("list", &tmp)? {
            let path = entry.ctx("list", &tmp)?.path();
            if std::fs::symlink_metadata(&path).ctx("read metadata of", &path)?.is_dir() {
                // An interrupted shared checkout.
                report.bytes += dir_size(&path);
                if !dry_run {
                    super::remove_checkout(&path)?;
                }
            } else {
                remove(&path, &mut report)?;
            }
            report.temp_files += 1;
        }
        Ok(report)
    }
}

/// The innermost useful message of a store error, for one-line problem reports.
fn reason(e: &StoreError) -> String {
    match e {
        StoreError::CorruptBlob { source, .. } => source.to_string(),
        StoreError::CorruptTree { source, .. } => source.to_string(),
        StoreError::TreeHashMismatch { actual, .. } => {
            format!("content hashes to {actual}, not to its name")
        }
        StoreError::Missing { .. } => "missing".into(),
        other => crate::error_chain(other),
    }
}

/// Entries of `dir` (absent: none) whose names `parse` accepts, sorted.
fn list_dir<T: Ord>(dir: &Path, parse: impl Fn(&str) -> Option<T>) -> Result<Vec<(T, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx("list", dir),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.ctx("list", dir)?;
        if let Some(parsed) = entry.file_name().to_str().and_then(&parse) {
            out.push((parsed, entry.path()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Bytes of the regular files and symlinks below `dir` that only it links
/// (a hard link shared with the file cache is counted there); what cannot be
/// read counts as nothing (it is only a report).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut total = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            total += dir_size(&path);
        } else if meta.nlink() == 1 {
            total += meta.len();
        }
    }
    total
}

/// Files under `top/XX/` whose names `parse` accepts, sorted.
fn list_sharded<T: Ord>(
    top: &Path,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<(T, PathBuf)>> {
    let mut out = Vec::new();
    for shard in 0..=255u8 {
        out.extend(list_dir(&top.join(format!("{shard:02x}")), &parse)?);
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Whether a cached checkout file named `CONTENT-MODE` still holds that content and mode.
fn cached_file_matches(name: &str, path: &Path) -> Result<bool> {
    let Some((hex, mode)) = name.split_once('-') else { return Ok(false) };
    let (Ok(expected), Ok(mode)) = (Digest::from_hex(hex), u32::from_str_radix(mode, 8)) else {
        return Ok(false);
    };
    let file = std::fs::File::open(path).ctx("open", path)?;
    let actual_mode = file.metadata().ctx("read metadata of", path)?.mode() & 0o7777;
    let (chunks, size) = chunk_digests(file).ctx("read", path)?;
    let Ok(perm) = Permissions::new(mode) else { return Ok(false) };
    let node = FileNode::new(chunks, size, perm).ok();
    Ok(actual_mode == mode && node.is_some_and(|n| n.content_digest() == expected))
}

/// The chunk list ingest would produce for `reader`, without storing anything.
fn chunk_digests(reader: impl Read) -> io::Result<(Vec<Chunk>, u64)> {
    let mut chunker = blob::Chunker::new(reader);
    let mut chunks = Vec::new();
    loop {
        let block = chunker.next_block()?;
        if block.cuts.is_empty() {
            break;
        }
        chunks
            .extend(block.chunks().map(|c| Chunk { digest: Digest::of(c), size: c.len() as u32 }));
    }
    let size = chunks.iter().map(|c| u64::from(c.size)).sum();
    Ok((chunks, size))
}
