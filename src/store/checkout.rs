//! Checkouts: materialising a stored tree as a read-only directory.
//!
//! Each distinct (file content, permission bits) pair is decompressed once into
//! `checkouts/files/XX/CONTENT-PERM` and hard-linked into every checkout that
//! needs it, so identical files share one inode and one copy in the page cache.
//! Because those inodes are shared, a checkout is read-only: files and
//! directories get exactly the tree's permission bits *minus every write bit*.
//! Contents and symlink targets are restored exactly. A destination on another
//! filesystem gets copies instead of links.
//!
//! Every reader of a file's content ([`Store::open_file`]: layers, build
//! sources, a checkout needing another mode) reads a cached copy when there
//! is one, verified chunk by chunk, rather than decompress it again. A
//! build's output files become cached copies as they are
//! ([`Store::keep_as_checkout_cache`]), so a package just built is not
//! decompressed again to be checked out or layered.
//!
//! Cached files are decompressed from chunks that are verified as they are
//! read (or are a build's output, hashed by its ingest moments before), so a
//! checkout either fails with an error naming the bad object or holds exactly
//! the stored bytes. The ones a checkout creates are written as
//! temp files in `tmp/` (the checkout links those very inodes) and made
//! durable together, with the checkout's own directories, by one `syncfs` of
//! the store's filesystem (instead of two fsyncs per file); only then do they
//! get their names in `checkouts/files`, and only then is a shared checkout
//! renamed into place. So a name there always holds complete, durable
//! content; a crash before it only leaves temp files (a cache miss).
//!
//! [`Store::shared_checkout`] keeps one checkout per tree under
//! `checkouts/trees/HEX` for `pkg run`, which stacks them as overlayfs lower
//! layers. It is built in `tmp/` and renamed into place whole, so a name there
//! always holds a complete checkout; concurrent callers agree on one. It keeps
//! the tree's exact permission bits (an image's `/tmp` stays `1777`, a user's
//! `0644` file stays writable by that user in the container): overlayfs never
//! writes to a lower layer, so the inodes are only ever written by copy-up
//! into the upper layer. Its files are cached inodes too, kept apart from the
//! read-only ones by the mode in their names, and shared by every such checkout.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::ingest::unwrap_store_error;
use super::tree::{FileNode, Node};
use super::{IoContext, Result, Store, StoreError};
use crate::digest::Digest;

/// Linux's "too many links"; `io::ErrorKind::TooManyLinks` is not stable yet.
const EMLINK: i32 = 31;

/// Write bits, which a checkout never grants.
const WRITE_BITS: u32 = 0o222;

impl Store {
    /// Materialises `tree` into `dest`, which must be absent or an empty
    /// directory. `dest` itself ends up mode `0555`.
    pub fn checkout(&self, tree: &Digest, dest: &Path) -> Result<()> {
        let _pin = self.pin()?;
        let created = match std::fs::read_dir(dest) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(StoreError::DestinationExists { path: dest.to_path_buf() });
                }
                false
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dest).ctx("create directory", dest)?;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
                return Err(StoreError::DestinationExists { path: dest.to_path_buf() });
            }
            Err(e) => return Err(e).ctx("list", dest),
        };
        let pending = Pending::default();
        let checked_out = self
            .checkout_dir(tree, dest, Modes::ReadOnly, &pending)
            .and_then(|()| self.publish_cached(pending, false));
        if let Err(e) = checked_out {
            // Leave no half checkout behind that could pass for a whole one.
            if created {
                let _ = remove_checkout(dest);
            }
            return Err(e);
        }
        set_mode(dest, 0o555)
    }

    /// The shared checkout of `tree` (see the module docs), created if
    /// absent, leased: `gc` leaves it alone while the lease lives.
    pub fn shared_checkout(&self, tree: &Digest) -> Result<CheckoutLease> {
        // Held while looking and locking, so no gc is halfway through it.
        let _pin = self.pin()?;
        let dest = self.shared_checkout_path(tree);
        if !dest.is_dir() {
            self.build_shared_checkout(tree, &dest)?;
        }
        let lock = std::fs::File::open(&dest).ctx("open", &dest)?;
        fs4::FileExt::lock_shared(&lock).ctx("lock", &dest)?;
        Ok(CheckoutLease { path: dest, _lock: lock })
    }

    fn build_shared_checkout(&self, tree: &Digest, dest: &Path) -> Result<()> {
        let tmp_dir = self.root.join("tmp");
        let tmp = tempfile::Builder::new()
            .prefix(".t")
            .tempdir_in(&tmp_dir)
            .ctx("create a temp directory in", &tmp_dir)?
            .keep();
        let pending = Pending::default();
        let built = self
            .checkout_dir(tree, &tmp, Modes::Exact, &pending)
            // Its final mode before it gets its name: a name holds a whole checkout.
            .and_then(|()| set_mode(&tmp, 0o755))
            // Its files and directories are durable before it gets its name.
            .and_then(|()| self.publish_cached(pending, true))
            .and_then(|()| {
                let parent = self.root.join("checkouts/trees");
                std::fs::create_dir_all(&parent).ctx("create directory", &parent)?;
                match std::fs::rename(&tmp, dest) {
                    Ok(()) => super::sync_parent(dest),
                    // Another process put its (identical) checkout there first.
                    Err(_) if dest.is_dir() => remove_checkout(&tmp),
                    Err(e) => Err(e).ctx("rename a checkout to", dest),
                }
            });
        if built.is_err() {
            let _ = remove_checkout(&tmp);
        }
        built
    }

    /// Keeps the files of `dir`, just stored as `tree` by [`Store::ingest_dir`],
    /// as the cache's copies of their content, so the first checkout of a tree
    /// holding them links them rather than decompress them again.
    ///
    /// For a directory nothing writes to any more (a finished build's
    /// output), on the store's filesystem, with writable directories; it is
    /// left with holes, to be removed next. A file moves to `checkouts/files`
    /// only if it is a regular file of the tree's size with no other name (one
    /// link, so nothing can change it later) and no extended attribute but an
    /// SELinux label (the store keeps none, and a file capability must not
    /// reach a checkout), whose cached copy is missing. It is made read-only
    /// (the tree's bits minus write bits) and, like a checkout's new cached
    /// files, durable by one `syncfs` before it gets its name. Best effort:
    /// a file left where it is costs only a later decompression.
    pub(crate) fn keep_as_checkout_cache(&self, tree: &Digest, dir: &Path) {
        use std::os::unix::fs::MetadataExt;
        // Held throughout, so no gc is halfway through the cache meanwhile.
        let Ok(_pin) = self.pin() else { return };
        let mut moving = Vec::new();
        for entry in self.walk(tree) {
            let Ok(entry) = entry else { return };
            let Node::File(file) = entry.node else { continue };
            let from = dir.join(&entry.path);
            let mode = Modes::ReadOnly.apply(file.permissions().bits());
            let cached = self.cached_file_path(&file, mode);
            let movable = std::fs::symlink_metadata(&from)
                .is_ok_and(|m| m.is_file() && m.nlink() == 1 && m.len() == file.size())
                && only_selinux_label(&from);
            if movable && !cached.exists() && set_mode(&from, mode).is_ok() {
                moving.push((from, cached));
            }
        }
        if moving.is_empty() || super::sync_filesystem(&self.root).is_err() {
            return;
        }
        for (from, cached) in moving {
            // Another checkout may have named the same content already: same bytes.
            if let Some(parent) = cached.parent()
                && std::fs::create_dir_all(parent).is_ok()
            {
                let _ = std::fs::rename(&from, &cached);
            }
        }
    }

    pub(crate) fn shared_checkout_path(&self, tree: &Digest) -> PathBuf {
        self.root.join("checkouts/trees").join(tree.to_hex())
    }

    fn checkout_dir(
        &self,
        digest: &Digest,
        dir: &Path,
        modes: Modes,
        pending: &Pending,
    ) -> Result<()> {
        let tree = self.read_tree(digest)?;
        tree.entries.par_iter().try_for_each(|(name, node)| {
            let path = dir.join(name.as_os_str());
            match node {
                Node::File(file) => self.link_file(file, &path, modes, pending),
                Node::Symlink(target) => std::os::unix::fs::symlink(target.as_os_str(), &path)
                    .ctx("create symlink", &path),
                Node::Dir(child) => {
                    std::fs::create_dir(&path).ctx("create directory", &path)?;
                    self.checkout_dir(&child.digest, &path, modes, pending)?;
                    let bits = child.permissions.bits();
                    set_mode(&path, modes.apply(bits))
                }
            }
        })
    }

    /// The checkout cache's copy of `file` and its path, if it has one in
    /// either mode and it is a regular file of the file's size (opened
    /// without blocking or following a symlink, so nothing planted there can
    /// hang the reader); one of another size loses its name. Its content is
    /// unverified: see [`Store::open_file`].
    pub(super) fn open_cached_file(&self, file: &FileNode) -> Option<(std::fs::File, PathBuf)> {
        use std::os::unix::fs::OpenOptionsExt;
        let bits = file.permissions().bits();
        let (read_only, exact) = (Modes::ReadOnly.apply(bits), Modes::Exact.apply(bits));
        // One name when the file has no write bits.
        let modes = if read_only == exact { &[read_only][..] } else { &[read_only, exact][..] };
        let hex = file.content_digest().to_hex();
        modes.iter().find_map(|&mode| {
            let path = self.cached_path(&hex, mode);
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
                .open(&path)
                .ok()?;
            let meta = opened.metadata().ok()?;
            if meta.is_file() && meta.len() != file.size() {
                // Cut short or grown.
                forget_damaged_copy(&opened, &path);
            }
            (meta.is_file() && meta.len() == file.size()).then_some((opened, path))
        })
    }

    fn cached_file_path(&self, file: &FileNode, mode: u32) -> PathBuf {
        self.cached_path(&file.content_digest().to_hex(), mode)
    }

    /// `checkouts/files/XX/HEX-MODE`, for content digest `hex`.
    fn cached_path(&self, hex: &str, mode: u32) -> PathBuf {
        self.root.join("checkouts/files").join(&hex[..2]).join(format!("{hex}-{mode:04o}"))
    }

    /// Links the cached copy of `file` to `path`, creating the cached copy
    /// first if needed (pending in `pending` until published).
    fn link_file(
        &self,
        file: &FileNode,
        path: &Path,
        modes: Modes,
        pending: &Pending,
    ) -> Result<()> {
        let mode = modes.apply(file.permissions().bits());
        let cached = self.cached_file_path(file, mode);
        if cached.exists() {
            match link_or_copy(&cached, path, mode) {
                // Gone meanwhile (a reader found it damaged): make it again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                linked => return linked.ctx("hard-link a cached file to", path),
            }
        }
        // One temp file per content and mode, whoever needs it first
        // writes it; the others wait for it and link it too.
        let slot = pending.slot(cached);
        let source = {
            let mut tmp = slot.lock().unwrap_or_else(|e| e.into_inner());
            match &mut *tmp {
                Some(tmp) => tmp.to_path_buf(),
                empty @ None => empty.insert(self.materialise(file, mode)?).to_path_buf(),
            }
        };
        link_or_copy(&source, path, mode).ctx("hard-link a cached file to", path)
    }

    /// A temp file in `tmp/` holding `file`'s content with `mode`, not synced.
    fn materialise(&self, file: &FileNode, mode: u32) -> Result<tempfile::TempPath> {
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::Builder::new()
            .prefix(".c")
            .tempfile_in(&tmp_dir)
            .ctx("create a temp file in", &tmp_dir)?;
        let mut reader = self.open_file(file);
        io::copy(&mut reader, tmp.as_file_mut()).map_err(|e| unwrap_store_error(e, tmp.path()))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .ctx("chmod", tmp.path())?;
        Ok(tmp.into_temp_path())
    }

    /// Makes what a checkout wrote durable (one `syncfs`: its cached files
    /// and, on the store's filesystem, its directories), then gives the new
    /// cached files their names. A lost rename only costs a cache miss, so the
    /// names are not synced. Without new cached files, syncs only if `dirs`.
    ///
    /// `syncfs` also flushes other programs' dirty data on that filesystem;
    /// it replaces two fsyncs per new file, which cost far more on images of
    /// thousands of files.
    fn publish_cached(&self, pending: Pending, dirs: bool) -> Result<()> {
        let pending = pending.into_files();
        if pending.is_empty() && !dirs {
            return Ok(());
        }
        super::sync_filesystem(&self.root)?;
        for (tmp, cached) in pending {
            if let Some(parent) = cached.parent() {
                std::fs::create_dir_all(parent).ctx("create directory", parent)?;
            }
            // Another checkout may have named the same content already: same bytes.
            tmp.persist(&cached).map_err(|e| e.error).ctx("rename a temp file to", &cached)?;
        }
        Ok(())
    }
}

/// Cached files a checkout created, as temp files waiting for
/// [`Store::publish_cached`], by cached path; dropped unpublished, they are
/// deleted. One slot per cached path, so identical files of one checkout
/// share one inode even before the cache names it.
#[derive(Default)]
struct Pending(Mutex<HashMap<PathBuf, Slot>>);

/// The temp file of one cached path, once written (empty after a failure,
/// so the next one needing it tries again and meets its own error).
type Slot = Arc<Mutex<Option<tempfile::TempPath>>>;

impl Pending {
    fn slot(&self, cached: PathBuf) -> Slot {
        let mut slots = self.0.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(slots.entry(cached).or_default())
    }

    /// The temp files written, with their cached paths. Call once nothing
    /// else holds a slot.
    fn into_files(self) -> Vec<(tempfile::TempPath, PathBuf)> {
        let slots = self.0.into_inner().unwrap_or_else(|e| e.into_inner());
        slots
            .into_iter()
            .filter_map(|(cached, slot)| {
                let tmp = Arc::into_inner(slot)?.into_inner().unwrap_or_else(|e| e.into_inner());
                Some((tmp?, cached))
            })
            .collect()
    }
}

/// A shared checkout in use (see [`Store::shared_checkout`]): a shared
/// `flock` on its directory, which `gc` tries to take exclusively first.
#[derive(Debug)]
pub struct CheckoutLease {
    path: PathBuf,
    _lock: std::fs::File,
}

impl CheckoutLease {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes the name of a damaged cached copy, open as `file`, so no checkout
/// links it any more (those that did keep it); not if the name holds another
/// copy by now.
pub(super) fn forget_damaged_copy(file: &std::fs::File, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(open), Ok(named)) = (file.metadata(), std::fs::symlink_metadata(path))
        && (open.dev(), open.ino()) == (named.dev(), named.ino())
    {
        let _ = std::fs::remove_file(path);
    }
}

/// Hard-links `source` to `path`; on another filesystem, or for an inode at
/// its link limit (EMLINK), copies it with `mode` instead.
fn link_or_copy(source: &Path, path: &Path, mode: u32) -> io::Result<()> {
    match std::fs::hard_link(source, path) {
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices || e.raw_os_error() == Some(EMLINK) => {
            std::fs::copy(source, path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        }
        linked => linked,
    }
}

/// Whether `path` has no extended attribute but an SELinux label (which
/// every file has where SELinux runs); false when they cannot be listed.
fn only_selinux_label(path: &Path) -> bool {
    let mut names = [0u8; 256];
    rustix::fs::llistxattr(path, &mut names[..]).is_ok_and(|len| {
        names[..len].split(|&b| b == 0).all(|name| name.is_empty() || name == b"security.selinux")
    })
}

/// Which permission bits a checkout's files and directories get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Modes {
    /// The tree's bits minus every write bit.
    ReadOnly,
    /// Exactly the tree's bits.
    Exact,
}

impl Modes {
    fn apply(self, bits: u32) -> u32 {
        match self {
            Modes::ReadOnly => bits & !WRITE_BITS,
            Modes::Exact => bits,
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).ctx("chmod", path)
}

/// Deletes a checkout (or any directory tree), first restoring the owner's
/// write and search permission on its read-only directories.
pub fn remove_checkout(dir: &Path) -> Result<()> {
    fn unlock(dir: &Path) -> Result<()> {
        set_mode(dir, 0o700)?;
        for entry in std::fs::read_dir(dir).ctx("list", dir)? {
            let entry = entry.ctx("list", dir)?;
            if entry.file_type().ctx("read metadata of", &entry.path())?.is_dir() {
                unlock(&entry.path())?;
            }
        }
        Ok(())
    }
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx("read metadata of", dir),
        Ok(_) => {}
    }
    unlock(dir)?;
    std::fs::remove_dir_all(dir).ctx("remove", dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_build_outputs_are_plain_files_of_one_link_without_xattrs() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::open(&root.path().join("store")).unwrap();
        let out = root.path().join("out");
        std::fs::create_dir_all(out.join("bin")).unwrap();
        for name in ["plain", "labelled", "linked", "bin/tool"] {
            std::fs::write(out.join(name), name).unwrap();
        }
        set_mode(&out.join("bin/tool"), 0o755).unwrap();
        rustix::fs::lsetxattr(
            out.join("labelled"),
            "user.x",
            b"1",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("user xattrs on the temp directory's filesystem");
        std::fs::hard_link(out.join("linked"), out.join("second")).unwrap();
        std::os::unix::fs::symlink("plain", out.join("link")).unwrap();
        let tree = store.ingest_dir(&out, &|_: &Path, _: &std::fs::Metadata| false).unwrap();

        store.keep_as_checkout_cache(&tree, &out);
        let mut left: Vec<String> = ["plain", "labelled", "linked", "second", "link", "bin/tool"]
            .into_iter()
            .filter(|name| out.join(name).symlink_metadata().is_ok())
            .map(String::from)
            .collect();
        left.sort();
        assert_eq!(left, ["labelled", "link", "linked", "second"]);
        let read_tree = store.read_tree(&tree).unwrap();
        let cached = |name: &str, mode: u32| {
            let Some(Node::File(file)) = read_tree
                .entries
                .iter()
                .find_map(|(n, node)| (n.as_os_str() == name).then_some(node.clone()))
            else {
                panic!("{name} is a file of the tree")
            };
            store.cached_file_path(&file, mode)
        };
        let plain = cached("plain", 0o444);
        assert_eq!(std::fs::read(&plain).unwrap(), b"plain");
        assert_eq!(std::fs::metadata(&plain).unwrap().permissions().mode() & 0o7777, 0o444);
        assert!(!cached("labelled", 0o444).exists());
        assert!(!cached("linked", 0o444).exists());
        // Kept before, so not again: the output file stays.
        std::fs::write(out.join("plain"), "plain").unwrap();
        let again = store.ingest_dir(&out, &|_: &Path, _: &std::fs::Metadata| false).unwrap();
        store.keep_as_checkout_cache(&again, &out);
        assert!(out.join("plain").exists());
    }
}
