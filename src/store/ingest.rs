//! Ingest: turning a directory or file on disk into stored blobs and trees.
//!
//! - Directory entries are processed in parallel (rayon); each directory's tree
//!   is stored after all of its children, so a tree never names a missing object.
//! - A file of at most `CHUNK_MAX` bytes is one chunk; a larger one is split by
//!   FastCDC (see [`Chunker`]) one block of a few MiB at a time, and a block's
//!   chunks are hashed, compressed and written in parallel while the next block
//!   is read. Memory therefore stays at two 2 MiB blocks (plus their compressed
//!   forms) per file in flight, and at most one file per ingest thread is in
//!   flight, whatever the file sizes.
//! - Blobs and trees are written unsynced under one [`Batch`] per ingest, which
//!   makes them durable together before the digest is returned: with no fsync
//!   per object, the ingest threads never wait for the disk, and the disk gets
//!   large writes while they hash and compress (see [`super::batch`]).
//! - Only regular files, directories and symlinks are accepted. Devices, fifos
//!   and sockets, and setuid/setgid bits, are errors naming the path. Hard links
//!   are read as the regular files they are (dedup stores their content once).
//! - Owners and times are not read.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use rayon::prelude::*;

use super::batch::Batch;
use super::blob::Chunker;
use super::tree::{
    Chunk, DirNode, FileNode, Node, PathComponent, Permissions, SymlinkTarget, Tree,
};
use super::{IoContext, Result, Store, StoreError};
use crate::digest::Digest;

/// Decides which entries a directory ingest leaves out.
///
/// Called with each entry's path relative to the ingested root and its
/// (non-followed) metadata; returning `true` excludes the entry (and, for a
/// directory, everything below it). Any `Fn(&Path, &Metadata) -> bool + Sync`
/// is an `Exclude`.
pub trait Exclude: Sync {
    fn exclude(&self, relative: &Path, metadata: &Metadata) -> bool;
}

impl<F: Fn(&Path, &Metadata) -> bool + Sync> Exclude for F {
    fn exclude(&self, relative: &Path, metadata: &Metadata) -> bool {
        self(relative, metadata)
    }
}

/// Ingest threads per CPU. Object writes do not wait for the disk (see
/// [`Batch`]); the spare thread per core covers reads of source files that are
/// not in the page cache.
const THREADS_PER_CPU: usize = 2;

/// Runs `f` on a thread pool sized for ingest (see [`THREADS_PER_CPU`]).
fn in_ingest_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    match rayon::ThreadPoolBuilder::new().num_threads(cpus * THREADS_PER_CPU).build() {
        Ok(pool) => pool.install(f),
        // Without a pool of its own, ingest still works on the global one.
        Err(_) => f(),
    }
}

impl Store {
    /// Ingests the directory `dir` (not following symlinks), leaving out what
    /// `exclude` selects; returns the tree digest. Hold a [`Pin`](super::Pin)
    /// until the result is referenced by a ref if `gc` may run concurrently.
    pub fn ingest_dir(&self, dir: &Path, exclude: &dyn Exclude) -> Result<Digest> {
        let _pin = self.pin()?;
        let batch = Batch::begin(self)?;
        let digest = in_ingest_pool(|| self.ingest_dir_at(dir, Path::new(""), exclude, &batch))?;
        batch.finish()?;
        Ok(digest)
    }

    /// Ingests one regular file; returns its node (chunks, size, permission bits).
    pub fn ingest_file(&self, path: &Path) -> Result<FileNode> {
        let _pin = self.pin()?;
        let metadata = std::fs::symlink_metadata(path).ctx("read metadata of", path)?;
        let batch = Batch::begin(self)?;
        let node = in_ingest_pool(|| self.ingest_regular(path, &metadata, &batch))?;
        batch.finish()?;
        Ok(node)
    }

    /// What `pkg store add PATH` does: a directory becomes its tree; a file or
    /// symlink becomes a one-entry tree holding it under its own name, so that
    /// checking the digest out into `DIR` recreates `DIR/NAME`.
    pub fn ingest_path(&self, path: &Path) -> Result<Digest> {
        let _pin = self.pin()?;
        let batch = Batch::begin(self)?;
        let digest = in_ingest_pool(|| self.ingest_path_pinned(path, &batch))?;
        batch.finish()?;
        Ok(digest)
    }

    fn ingest_path_pinned(&self, path: &Path, batch: &Batch) -> Result<Digest> {
        let metadata = std::fs::symlink_metadata(path).ctx("read metadata of", path)?;
        if metadata.is_dir() {
            let none = |_: &Path, _: &Metadata| false;
            return self.ingest_dir_at(path, Path::new(""), &none, batch);
        }
        let name = path.file_name().ok_or_else(|| StoreError::InvalidEntry {
            path: path.to_path_buf(),
            source: super::tree::TreeError::InvalidName {
                name: path.display().to_string(),
                reason: "a single file needs a file name",
            },
        })?;
        let name = PathComponent::try_from(name)
            .map_err(|source| StoreError::InvalidEntry { path: path.to_path_buf(), source })?;
        let none = |_: &Path, _: &Metadata| false;
        let node = self.ingest_node(path, &metadata, Path::new(""), &none, batch)?;
        let mut tree = Tree::new();
        tree.insert(name, node);
        self.put_tree_in(&tree, Some(batch))
    }

    fn ingest_dir_at(
        &self,
        dir: &Path,
        relative: &Path,
        exclude: &dyn Exclude,
        batch: &Batch,
    ) -> Result<Digest> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir).ctx("list", dir)? {
            let entry = entry.ctx("list", dir)?;
            entries.push(entry.file_name());
        }
        let nodes: Vec<Option<(PathComponent, Node)>> = entries
            .into_par_iter()
            .map(|name| {
                let path = dir.join(&name);
                let relative = relative.join(&name);
                let metadata = std::fs::symlink_metadata(&path).ctx("read metadata of", &path)?;
                if exclude.exclude(&relative, &metadata) {
                    return Ok(None);
                }
                let component = PathComponent::try_from(name.as_os_str())
                    .map_err(|source| StoreError::InvalidEntry { path: path.clone(), source })?;
                let node = self.ingest_node(&path, &metadata, &relative, exclude, batch)?;
                Ok(Some((component, node)))
            })
            .collect::<Result<_>>()?;
        let mut tree = Tree::new();
        tree.entries.extend(nodes.into_iter().flatten());
        self.put_tree_in(&tree, Some(batch))
    }

    fn ingest_node(
        &self,
        path: &Path,
        metadata: &Metadata,
        relative: &Path,
        exclude: &dyn Exclude,
        batch: &Batch,
    ) -> Result<Node> {
        let kind = metadata.file_type();
        if kind.is_dir() {
            let permissions = permissions(path, metadata)?;
            let digest = self.ingest_dir_at(path, relative, exclude, batch)?;
            Ok(Node::Dir(DirNode { digest, permissions }))
        } else if kind.is_file() {
            Ok(Node::File(self.ingest_regular(path, metadata, batch)?))
        } else if kind.is_symlink() {
            use std::os::unix::ffi::OsStrExt;
            let target = std::fs::read_link(path).ctx("read symlink", path)?;
            let target = SymlinkTarget::new(target.as_os_str().as_bytes())
                .map_err(|source| StoreError::InvalidEntry { path: path.to_path_buf(), source })?;
            Ok(Node::Symlink(target))
        } else {
            let kind = if kind.is_block_device() {
                "block devices"
            } else if kind.is_char_device() {
                "character devices"
            } else if kind.is_fifo() {
                "fifos"
            } else if kind.is_socket() {
                "sockets"
            } else {
                "special files"
            };
            Err(StoreError::SpecialFile { path: path.to_path_buf(), kind })
        }
    }

    fn ingest_regular(&self, path: &Path, metadata: &Metadata, batch: &Batch) -> Result<FileNode> {
        if !metadata.is_file() {
            return Err(StoreError::SpecialFile {
                path: path.to_path_buf(),
                kind: "non-regular files",
            });
        }
        let permissions = permissions(path, metadata)?;
        let file = File::open(path).ctx("open", path)?;
        let (chunks, size) =
            self.store_content(file, batch).map_err(|e| unwrap_store_error(e, path))?;
        FileNode::new(chunks, size, permissions)
            .map_err(|source| StoreError::InvalidEntry { path: path.to_path_buf(), source })
    }

    /// Stores the content of `reader` as a file with `permissions`, chunked like
    /// any ingested file (so identical content dedups with files ingested from
    /// disk). Used for content that is not a file on disk, e.g. a tar entry.
    ///
    /// The reader is read on the calling thread (it need not be `Send`); chunks
    /// are compressed and written in parallel. Errors from reading are
    /// `io::Error`s; store errors travel inside them (`io::Error::other`), as
    /// for [`Read`]-shaped code elsewhere. The chunks are durable once `batch`
    /// finishes; hold a [`Pin`](super::Pin) until a ref names a tree holding
    /// the file.
    pub fn ingest_reader(
        &self,
        reader: impl Read,
        permissions: Permissions,
        batch: &Batch,
    ) -> std::io::Result<FileNode> {
        let mut chunker = Chunker::new(reader);
        let mut chunks = Vec::new();
        loop {
            let block = chunker.next_block()?;
            if block.cuts.is_empty() {
                break;
            }
            let stored = block
                .cuts
                .par_iter()
                .map(|range| {
                    let data = &block.data[range.clone()];
                    let digest = self.put_blob_in(data, Some(batch))?;
                    Ok(Chunk { digest, size: data.len() as u32 })
                })
                .collect::<Result<Vec<_>>>()
                .map_err(std::io::Error::other)?;
            chunks.extend(stored);
        }
        let size = chunks.iter().map(|c| u64::from(c.size)).sum();
        FileNode::new(chunks, size, permissions).map_err(std::io::Error::other)
    }

    /// Chunks, stores and lists the content of `reader`. Errors from reading are
    /// `io::Error`s; store errors travel inside them (`io::Error::other`).
    fn store_content(
        &self,
        reader: impl Read + Send,
        batch: &Batch,
    ) -> std::io::Result<(Vec<Chunk>, u64)> {
        let mut chunker = Chunker::new(reader);
        let mut chunks = Vec::new();
        let mut block = chunker.next_block()?;
        while !block.cuts.is_empty() {
            // Store this block's chunks while the next block is read.
            let (stored, next) = rayon::join(
                || {
                    block
                        .cuts
                        .par_iter()
                        .map(|range| {
                            let data = &block.data[range.clone()];
                            let digest = self.put_blob_in(data, Some(batch))?;
                            Ok(Chunk { digest, size: data.len() as u32 })
                        })
                        .collect::<Result<Vec<_>>>()
                },
                || chunker.next_block(),
            );
            chunks.extend(stored.map_err(std::io::Error::other)?);
            block = next?;
        }
        let size = chunks.iter().map(|c| u64::from(c.size)).sum();
        Ok((chunks, size))
    }
}

fn permissions(path: &Path, metadata: &Metadata) -> Result<Permissions> {
    let bits = metadata.permissions().mode() & 0o7777;
    if bits & Permissions::PRIVILEGED != 0 {
        return Err(StoreError::Privileged { path: path.to_path_buf() });
    }
    Permissions::new(bits)
        .map_err(|source| StoreError::InvalidEntry { path: path.to_path_buf(), source })
}

/// Store errors cross [`Read`]-shaped code inside `io::Error`s; take them back out.
pub(crate) fn unwrap_store_error(e: std::io::Error, path: &Path) -> StoreError {
    if e.get_ref().is_some_and(|inner| inner.is::<StoreError>()) {
        let inner = e.into_inner().expect("has an inner error");
        return *inner.downcast::<StoreError>().expect("is a StoreError");
    }
    StoreError::Io { action: "read", path: path.to_path_buf(), source: e }
}
