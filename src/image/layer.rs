//! Layers: merging package trees, folding them down to a cap, and writing each
//! as a deterministic, compressed tar.
//!
//! Invariants:
//! - A layer's bytes are a pure function of its [`LayerKey`]: the tree digest,
//!   the compression, the ownership, the mtime and [`LAYER_FORMAT`]. Nothing
//!   else (clock, umask, user, thread count, store path) is read.
//! - Tar entries are sorted by their full path bytes (so parents come before
//!   children), have no root entry, mtime = the image's `created`, uid/gid from
//!   [`Ownership`], empty user and group names, no atime/ctime, and GNU headers
//!   (GNU long-name records for paths over 100 bytes): one format for every layer.
//! - gzip: [`super::gzip`]: fixed 256 KiB blocks, each compressed (in
//!   parallel) into one gzip member by libdeflate 1.26 (the libdeflater and
//!   libdeflate-sys crates, pinned with `=` in Cargo.toml) at level
//!   [`GZIP_LEVEL`], header mtime 0, XFL 4, OS byte 255, members concatenated;
//!   zstd: libzstd (bundled with zstd-sys, pinned by Cargo.lock) at level
//!   [`ZSTD_LEVEL`], single-threaded, no checksum. Both give the same bytes on
//!   every machine; the golden-digest test catches any drift.
//! - The diff_id (sha256 of the tar) and the digest (sha256 of the compressed
//!   blob) are computed while streaming; nothing is read back.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::{Compression, ImageError, Ownership};
use crate::digest::Digest;
use crate::store::{CachedLayer, DirNode, Node, PathComponent, Staged, Store, Tree};

/// Version of the tar and compression format; part of every [`LayerKey`], so
/// changing how layers are written can never reuse a stale cached layer.
pub const LAYER_FORMAT: &str = "pkg-layer 3: gnu tar, sorted paths, gzip members of 256 KiB blocks by libdeflate 1.26.1 (libdeflater 1.26.1), zstd 0.14.3";

/// gzip level (libdeflate's scale, 1–12). Level 1 is many times faster than
/// `gzip -6` (see benches/image.rs) at a few per cent larger output, and layers
/// are written once and cached.
pub const GZIP_LEVEL: i32 = 1;

/// zstd level: libzstd's default, fast and already smaller than gzip -6.
pub const ZSTD_LEVEL: i32 = 3;

/// What determines a layer's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerKey {
    pub tree: Digest,
    pub compression: Compression,
    pub owner: Ownership,
    pub mtime: u64,
}

impl LayerKey {
    /// The cache key: blake3 of everything that changes the layer's bytes.
    pub fn digest(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(LAYER_FORMAT.as_bytes());
        h.update(&[0]);
        h.update(self.tree.as_bytes());
        h.update(match self.compression {
            Compression::Gzip => b"gzip",
            Compression::Zstd => b"zstd",
        });
        h.update(&self.owner.uid.to_le_bytes());
        h.update(&self.owner.gid.to_le_bytes());
        h.update(&self.mtime.to_le_bytes());
        h.finalize().into()
    }
}

/// Merges package trees into one, failing on a path that two packages provide
/// with different content. Returns the merged tree's digest; with `write`, the
/// merged trees are stored (the inputs' subtrees already are).
///
/// Subtrees with equal digests are not descended into, so merging a package
/// with itself, or checking packages that share directories, stays cheap.
pub fn merge(store: &Store, sources: &[(&str, Digest)], write: bool) -> Result<Digest, ImageError> {
    merge_at(store, sources, Path::new(""), write)
}

fn merge_at(
    store: &Store,
    sources: &[(&str, Digest)],
    path: &Path,
    write: bool,
) -> Result<Digest, ImageError> {
    let Some((_, first)) = sources.first() else {
        let empty = Tree::new();
        return if write { Ok(store.put_tree(&empty)?) } else { Ok(empty.digest()) };
    };
    if sources.iter().all(|(_, d)| d == first) {
        return Ok(*first);
    }
    let mut names: BTreeMap<PathComponent, Vec<(&str, Node)>> = BTreeMap::new();
    for (package, digest) in sources {
        for (name, node) in store.read_tree(digest)?.entries {
            names.entry(name).or_default().push((package, node));
        }
    }
    let mut merged = Tree::new();
    for (name, nodes) in names {
        let child = path.join(name.as_os_str());
        let (first_pkg, first_node) = &nodes[0];
        let differing = nodes.iter().find(|(_, n)| match (n, first_node) {
            (Node::Dir(a), Node::Dir(b)) => a.permissions != b.permissions,
            (a, b) => a != b,
        });
        if let Some((other_pkg, _)) = differing {
            return Err(ImageError::Conflict {
                path: Path::new("/").join(&child),
                first: first_pkg.to_string(),
                second: other_pkg.to_string(),
            });
        }
        let node = match first_node {
            Node::Dir(dir) => {
                let subs: Vec<(&str, Digest)> = nodes
                    .iter()
                    .map(|(p, n)| match n {
                        Node::Dir(d) => (*p, d.digest),
                        _ => unreachable!("all nodes are directories: checked above"),
                    })
                    .collect();
                let digest = merge_at(store, &subs, &child, write)?;
                Node::Dir(DirNode { digest, permissions: dir.permissions })
            }
            other => other.clone(),
        };
        merged.insert(name, node);
    }
    if write { Ok(store.put_tree(&merged)?) } else { Ok(merged.digest()) }
}

/// A writer that hashes (sha256) and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: sha2::Sha256::new(), size: 0 }
    }

    /// The inner writer, the sha256 (hex) and the byte count of what was written.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, crate::store::hex(&self.hasher.finalize()), self.size)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Every entry of a tree with its full relative path, sorted by path bytes.
fn sorted_entries(store: &Store, tree: &Digest) -> Result<Vec<(PathBuf, Node)>, ImageError> {
    use std::os::unix::ffi::OsStrExt;
    let mut entries: Vec<(PathBuf, Node)> =
        store.walk(tree).map(|e| e.map(|e| (e.path, e.node))).collect::<Result<_, _>>()?;
    entries.sort_by(|a, b| a.0.as_os_str().as_bytes().cmp(b.0.as_os_str().as_bytes()));
    Ok(entries)
}

/// Writes the deterministic tar of `tree` to `out`.
pub fn write_tar(
    store: &Store,
    tree: &Digest,
    owner: Ownership,
    mtime: u64,
    out: impl Write,
) -> Result<(), ImageError> {
    let tar_err = |source: io::Error| ImageError::Tar { tree: *tree, source };
    let mut builder = tar::Builder::new(out);
    for (path, node) in sorted_entries(store, tree)? {
        let mut header = tar::Header::new_gnu();
        header.set_uid(owner.uid.into());
        header.set_gid(owner.gid.into());
        header.set_mtime(mtime);
        match node {
            Node::Dir(dir) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(dir.permissions.bits());
                header.set_size(0);
                let mut name = path.into_os_string();
                name.push("/");
                builder.append_data(&mut header, name, io::empty()).map_err(tar_err)?;
            }
            Node::File(file) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(file.permissions().bits());
                header.set_size(file.size());
                let reader = store.open_file(&file);
                builder.append_data(&mut header, &path, reader).map_err(tar_err)?;
            }
            Node::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, &path, target.as_os_str()).map_err(tar_err)?;
            }
        }
    }
    builder.into_inner().map_err(tar_err)?.flush().map_err(tar_err)?;
    Ok(())
}

/// Builds the layer for `key` into the store's layer cache, unless it is already
/// there: its blob and key are staged in `staged`, and in the cache once it is
/// published. A layer it builds is also staged as a blob in `copy_to`, if
/// given (an OCI layout's `blobs/sha256`). Returns the layer and whether it
/// had to be built.
pub fn build_layer(
    store: &Store,
    key: &LayerKey,
    staged: &Staged,
    copy_to: Option<&Path>,
) -> Result<(CachedLayer, bool), ImageError> {
    let cache_key = key.digest();
    if let Some(layer) = store.cached_layer(&cache_key)? {
        return Ok((layer, false));
    }
    let blob = store.oci_blob_writer(copy_to)?;
    let io_err = |source: io::Error| ImageError::Tar { tree: key.tree, source };
    let (blob, diff_id) = match key.compression {
        Compression::Gzip => {
            // No BufWriter: the gzip writer collects whole blocks itself.
            let gz = super::gzip::GzWriter::new(blob, GZIP_LEVEL).map_err(io_err)?;
            let mut tar = HashingWriter::new(gz);
            write_tar(store, &key.tree, key.owner, key.mtime, &mut tar)?;
            let (gz, diff_id, _) = tar.finish();
            (gz.finish().map_err(io_err)?, diff_id)
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::Encoder::new(blob, ZSTD_LEVEL).map_err(io_err)?;
            enc.include_checksum(false).map_err(io_err)?;
            enc.include_contentsize(false).map_err(io_err)?;
            let mut tar = HashingWriter::new(io::BufWriter::with_capacity(256 * 1024, enc));
            write_tar(store, &key.tree, key.owner, key.mtime, &mut tar)?;
            let (buf, diff_id, _) = tar.finish();
            let enc = buf.into_inner().map_err(|e| io_err(e.into_error()))?;
            (enc.finish().map_err(io_err)?, diff_id)
        }
    };
    let stored = blob.finish(staged)?;
    let layer = CachedLayer { digest: stored.digest, diff_id, size: stored.size };
    store.stage_cached_layer(&cache_key, &layer, staged)?;
    Ok((layer, true))
}

/// One layer in an image before folding: the packages it holds and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerGroup {
    /// Indices into the closure, ascending.
    pub members: Vec<usize>,
    /// Bytes of file content (a proxy for the layer's size).
    pub size: u64,
    /// How many image targets of this assembly contain every member.
    pub shared: usize,
}

/// Folds `groups` (one per package, in closure order) down to at most `cap`
/// layers: repeatedly merges the two groups that are least shared and, among
/// those, smallest (ties broken by position), keeping closure order.
pub fn fold(mut groups: Vec<LayerGroup>, cap: usize) -> Vec<LayerGroup> {
    let cap = cap.max(1);
    while groups.len() > cap {
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&i| (groups[i].shared, groups[i].size, i));
        let (a, b) = (order[0].min(order[1]), order[0].max(order[1]));
        let taken = groups.remove(b);
        let kept = &mut groups[a];
        kept.members.extend(taken.members);
        kept.members.sort_unstable();
        kept.size += taken.size;
        kept.shared = kept.shared.min(taken.shared);
    }
    groups
}

/// Total file bytes in a tree (each file counted once per path).
pub fn tree_size(store: &Store, tree: &Digest) -> Result<u64, ImageError> {
    let mut size = 0;
    for entry in store.walk(tree) {
        if let Node::File(f) = entry?.node {
            size += f.size();
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(member: usize, size: u64, shared: usize) -> LayerGroup {
        LayerGroup { members: vec![member], size, shared }
    }

    #[test]
    fn fold_merges_least_shared_smallest_first_and_keeps_order() {
        let groups = vec![g(0, 100, 3), g(1, 5, 1), g(2, 50, 1), g(3, 1, 2)];
        let folded = fold(groups.clone(), 3);
        assert_eq!(
            folded.iter().map(|g| g.members.clone()).collect::<Vec<_>>(),
            vec![vec![0], vec![1, 2], vec![3]]
        );
        let folded = fold(groups.clone(), 1);
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].members, vec![0, 1, 2, 3]);
        assert_eq!(folded[0].size, 156);
        assert_eq!(fold(groups.clone(), 10), groups);
    }

    #[test]
    fn layer_keys_differ_in_every_input() {
        let base = LayerKey {
            tree: Digest::of(b"t"),
            compression: Compression::Gzip,
            owner: Ownership::ROOT,
            mtime: 0,
        };
        let variants = [
            LayerKey { tree: Digest::of(b"u"), ..base },
            LayerKey { compression: Compression::Zstd, ..base },
            LayerKey { owner: Ownership { uid: 1, gid: 0 }, ..base },
            LayerKey { owner: Ownership { uid: 0, gid: 1 }, ..base },
            LayerKey { mtime: 1, ..base },
        ];
        for v in variants {
            assert_ne!(v.digest(), base.digest(), "{v:?}");
        }
    }
}
