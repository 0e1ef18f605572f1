//! The content-addressed store: blobs, trees, refs and checkouts on one directory.
//!
//! ```text
//! ROOT/VERSION                   "pkg-store 1"
//! ROOT/lock                      flock: shared while writing or checking out, exclusive for gc
//! ROOT/tmp/                      temp files; everything is written here first
//! ROOT/unsynced/ingest-*         markers of ingests whose objects are not yet durable ([`batch`])
//! ROOT/blobs/XX/HEX              chunk contents ([`blob`] encoding), named by blake3 of the raw bytes
//! ROOT/trees/XX/HEX              canonical [`tree`] encodings, named by their blake3
//! ROOT/refs/builds/HEX           build key -> tree digest
//! ROOT/refs/images/NAME          image name -> image record (JSON)
//! ROOT/refs/roots/NAME           gc root name -> tree digest
//! ROOT/refs/imports/HEX          sha256 of an imported image's manifest -> import record (JSON)
//! ROOT/checkouts/files/XX/HEX-P  decompressed (or built) files of mode P, hard-linked into checkouts
//! ```
//!
//! Invariants:
//! - Every file is written as temp file in `tmp/` + rename, so each name holds
//!   either nothing or complete content, and a process killed at any moment
//!   leaves the store valid; at worst `tmp/` holds garbage that `gc` removes.
//! - Every file is durable before anything that names it is written. Refs,
//!   image records, layers and objects written outside ingest get an fsync of
//!   the file before the rename and of the directory after it (several at once
//!   through a [`Staged`] publication, which keeps that order); the one
//!   exception is the layer cache's key files, which name nothing that is not
//!   durable yet and whose loss only costs a rebuild (see `store::layers`). Ingest writes its
//!   blobs and trees without either and makes them durable in one batch (a
//!   `syncfs`) before it returns the digest, under a marker that lets the next
//!   [`Store::open`] find and repair what a power loss mid-ingest left torn: see
//!   [`batch`] for why this is sound.
//! - Objects are written children first: a tree is stored only after every blob
//!   and subtree it names, and a ref only after the tree it names exists.
//! - There is no daemon and no long-lived lock. Every operation that writes
//!   objects or refs, or links cached files into a checkout, holds a *shared*
//!   lock on `ROOT/lock`; `gc` takes it *exclusively*. A caller that ingests and
//!   then records a ref holds one [`Pin`] across both so that a concurrent `gc`
//!   cannot sweep the unreferenced result in between.
//! - Every read of a blob or tree verifies its blake3 against its name: a reader
//!   gets the right bytes or an error, never wrong bytes. A file's content read
//!   from its checked-out copy instead is verified chunk by chunk the same way.

mod batch;
pub mod blob;
mod checkout;
mod ingest;
mod layers;
mod maintenance;
mod refs;
mod staged;
pub mod tree;
mod writeback;

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub use batch::Batch;
pub use checkout::{CheckoutLease, remove_checkout};
pub use ingest::Exclude;
pub(crate) use layers::is_sha256_hex;
pub use layers::{CachedLayer, OciBlob, OciBlobWriter, hex};
pub use maintenance::{GcReport, Problem, Stats, VerifyReport};
pub use refs::{ImageRecord, ImportRecord, RefName};
pub use staged::{Existing, Staged, Step};
pub use tree::{Chunk, DirNode, FileNode, Node, PathComponent, Permissions, SymlinkTarget, Tree};

use crate::digest::Digest;

/// The content of `ROOT/VERSION`.
const LAYOUT_VERSION: &str = "pkg-store 1\n";

/// Which kind of object a digest names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Blob,
    Tree,
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ObjectKind::Blob => "blob",
            ObjectKind::Tree => "tree",
        })
    }
}

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a pkg store (its VERSION file says {found:?})", root.display())]
    NotAStore { root: PathBuf, found: String },
    #[error("{kind} {digest} is not in the store")]
    Missing { kind: ObjectKind, digest: Digest },
    #[error("blob {digest} is corrupt")]
    CorruptBlob {
        digest: Digest,
        #[source]
        source: blob::BlobError,
    },
    #[error("tree {digest} is corrupt")]
    CorruptTree {
        digest: Digest,
        #[source]
        source: tree::TreeError,
    },
    #[error("tree {digest} is corrupt: its bytes hash to {actual}")]
    TreeHashMismatch { digest: Digest, actual: Digest },
    #[error("cannot ingest {}: {kind} are not supported", path.display())]
    SpecialFile { path: PathBuf, kind: &'static str },
    #[error("cannot ingest {}: setuid and setgid bits are refused", path.display())]
    Privileged { path: PathBuf },
    #[error("cannot ingest {}", path.display())]
    InvalidEntry {
        path: PathBuf,
        #[source]
        source: tree::TreeError,
    },
    #[error("cannot check out into {}: it exists and is not an empty directory", path.display())]
    DestinationExists { path: PathBuf },
    #[error("invalid ref name {name:?}: {reason}")]
    InvalidRefName { name: String, reason: &'static str },
    #[error("ref {} is corrupt: {reason}", path.display())]
    CorruptRef { path: PathBuf, reason: String },
    #[error("cannot collect garbage: {digest} is reachable from a ref but cannot be read")]
    Unmarkable {
        digest: Digest,
        #[source]
        source: Box<StoreError>,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attaches the failed action and path to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| StoreError::Io { action, path: path.to_path_buf(), source })
    }
}

/// A store on disk. Cheap to clone; holds no lock and no open files.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A shared hold on the store that keeps `gc` from running until dropped.
///
/// Take one around "ingest, then record a ref" so the new, not yet referenced
/// objects survive a concurrent `gc`. Individual store operations take their own.
#[derive(Debug)]
pub struct Pin {
    _lock: File,
}

impl Store {
    /// Opens the store at `root`, creating its layout if absent.
    pub fn open(root: &Path) -> Result<Store> {
        let store = Store { root: root.to_path_buf() };
        let version = root.join("VERSION");
        match std::fs::read_to_string(&version) {
            Ok(found) if found == LAYOUT_VERSION => {
                batch::recover(&store)?;
                return Ok(store);
            }
            Ok(found) => return Err(StoreError::NotAStore { root: root.to_path_buf(), found }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx("read", &version),
        }
        // Creating directories is idempotent, so racing creators agree; VERSION is
        // written last and atomically, so its presence means the layout is complete.
        for dir in ["tmp", "refs/builds", "refs/images", "refs/roots", "refs/imports"] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path).ctx("create directory", &path)?;
        }
        for top in ["blobs", "trees", "checkouts/files"] {
            for shard in 0..=255u8 {
                let path = root.join(top).join(format!("{shard:02x}"));
                std::fs::create_dir_all(&path).ctx("create directory", &path)?;
            }
        }
        let lock = root.join("lock");
        File::options().create(true).append(true).open(&lock).ctx("create", &lock)?;
        // Pinned like any write, so a gc cleaning `tmp/` cannot take our temp file.
        let _pin = store.pin()?;
        store.write_atomic(&version, LAYOUT_VERSION.as_bytes(), 0o644)?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes a shared lock: `gc` waits until every [`Pin`] is dropped.
    pub fn pin(&self) -> Result<Pin> {
        let path = self.root.join("lock");
        let file = File::open(&path).ctx("open", &path)?;
        fs4::FileExt::lock_shared(&file).ctx("lock", &path)?;
        Ok(Pin { _lock: file })
    }

    /// Takes the exclusive lock that `gc` holds while it marks and sweeps.
    fn lock_exclusive(&self) -> Result<File> {
        let path = self.root.join("lock");
        let file = File::open(&path).ctx("open", &path)?;
        fs4::FileExt::lock(&file).ctx("lock", &path)?;
        Ok(file)
    }

    pub(crate) fn object_path(&self, kind: ObjectKind, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        let top = match kind {
            ObjectKind::Blob => "blobs",
            ObjectKind::Tree => "trees",
        };
        self.root.join(top).join(&hex[..2]).join(hex)
    }

    /// Whether an object is present (not whether it is intact: see [`Store::verify`]).
    pub fn contains(&self, kind: ObjectKind, digest: &Digest) -> bool {
        self.object_path(kind, digest).exists()
    }

    /// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync directory.
    pub(crate) fn write_atomic(&self, path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
        self.write_atomic_parts(path, &[bytes], mode)
    }

    /// [`Store::write_atomic`] of the concatenation of `parts`.
    pub(crate) fn write_atomic_parts(&self, path: &Path, parts: &[&[u8]], mode: u32) -> Result<()> {
        let tmp = self.temp_file(parts, mode)?;
        tmp.as_file().sync_all().ctx("sync", tmp.path())?;
        tmp.persist(path).map_err(|e| e.error).ctx("rename a temp file to", path)?;
        sync_parent(path)
    }

    /// A temp file in `tmp/` holding the concatenation of `parts` (not synced).
    pub(crate) fn temp_file(&self, parts: &[&[u8]], mode: u32) -> Result<tempfile::NamedTempFile> {
        use std::os::unix::fs::PermissionsExt;
        let tmp_dir = self.root.join("tmp");
        let mut tmp = tempfile::Builder::new()
            .prefix(".w")
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(&tmp_dir)
            .ctx("create a temp file in", &tmp_dir)?;
        for part in parts {
            tmp.write_all(part).ctx("write", tmp.path())?;
        }
        Ok(tmp)
    }

    /// Writes the concatenation of `parts` to `path` as temp file + rename with no
    /// fsync: durable only once `batch` finishes (see [`batch`]).
    fn write_unsynced(&self, path: &Path, parts: &[&[u8]], batch: &batch::Batch) -> Result<()> {
        let tmp = self.temp_file(parts, 0o444)?;
        tmp.persist(path).map_err(|e| e.error).ctx("rename a temp file to", path)?;
        batch.wrote(parts.iter().map(|p| p.len() as u64).sum());
        Ok(())
    }

    /// Stores one chunk of content (at most [`blob::CHUNK_MAX`] bytes); returns its
    /// digest. Already-present blobs are not rewritten. Callers outside ingest hold
    /// a [`Pin`] until a tree that names the blob is referenced.
    pub fn put_blob(&self, raw: &[u8]) -> Result<Digest> {
        self.put_blob_in(raw, None)
    }

    /// [`Store::put_blob`], durable now or, with a batch, when the batch finishes.
    fn put_blob_in(&self, raw: &[u8], batch: Option<&batch::Batch>) -> Result<Digest> {
        let digest = Digest::of(raw);
        let path = self.object_path(ObjectKind::Blob, &digest);
        if !path.exists() {
            let encoded = blob::encode(raw);
            match batch {
                Some(batch) => self.write_unsynced(&path, &encoded.parts(), batch)?,
                None => self.write_atomic_parts(&path, &encoded.parts(), 0o444)?,
            }
        }
        Ok(digest)
    }

    /// Reads one chunk, verified against its digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let stored = self.read_object(ObjectKind::Blob, digest)?;
        blob::decode(&stored, digest)
            .map_err(|source| StoreError::CorruptBlob { digest: *digest, source })
    }

    /// Stores a tree whose children are already stored; returns its digest.
    /// Hold a [`Pin`] until a ref names it (see [`Store::pin`]).
    pub fn put_tree(&self, tree: &Tree) -> Result<Digest> {
        self.put_tree_in(tree, None)
    }

    /// [`Store::put_tree`], durable now or, with a batch, when the batch finishes.
    pub fn put_tree_in(&self, tree: &Tree, batch: Option<&batch::Batch>) -> Result<Digest> {
        let bytes = tree.encode();
        let digest = Digest::of(&bytes);
        let path = self.object_path(ObjectKind::Tree, &digest);
        if !path.exists() {
            match batch {
                Some(batch) => self.write_unsynced(&path, &[&bytes], batch)?,
                None => self.write_atomic(&path, &bytes, 0o444)?,
            }
        }
        Ok(digest)
    }

    /// Reads a tree, verified against its digest.
    pub fn read_tree(&self, digest: &Digest) -> Result<Tree> {
        let bytes = self.read_object(ObjectKind::Tree, digest)?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(StoreError::TreeHashMismatch { digest: *digest, actual });
        }
        Tree::decode(&bytes).map_err(|source| StoreError::CorruptTree { digest: *digest, source })
    }

    fn read_object(&self, kind: ObjectKind, digest: &Digest) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        self.read_object_into(kind, digest, &mut bytes)?;
        Ok(bytes)
    }

    /// Reads an object's stored bytes into `bytes`, replacing its content.
    fn read_object_into(
        &self,
        kind: ObjectKind,
        digest: &Digest,
        bytes: &mut Vec<u8>,
    ) -> Result<()> {
        let path = self.object_path(kind, digest);
        bytes.clear();
        let read = File::open(&path).and_then(|mut f| f.read_to_end(bytes));
        match read {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::Missing { kind, digest: *digest })
            }
            Err(e) => Err(e).ctx("read", &path),
        }
    }

    /// A reader over a file's content that verifies each chunk before yielding it.
    ///
    /// Where the checkout cache holds a copy of the file (`checkouts/files`,
    /// left by a checkout or a build), its chunks are read from there rather
    /// than decompressed from their blobs: each is verified against its digest
    /// all the same, and from the first that fails (a copy changed in place
    /// through a shared checkout, or cut short), the rest come from the blobs
    /// and the copy loses its name, so no later checkout links it.
    ///
    /// A corrupt or missing chunk surfaces as an `io::Error` whose inner error is
    /// the [`StoreError`]; no byte of an unverified chunk is ever returned.
    pub fn open_file(&self, file: &FileNode) -> FileReader {
        FileReader {
            store: self.clone(),
            chunks: file.chunks().to_vec(),
            next: 0,
            stored: Vec::new(),
            decoder: blob::Decoder::default(),
            buf: Vec::new(),
            pos: 0,
            cached: self.open_cached_file(file),
        }
    }

    /// Walks a tree depth-first: each directory's entries in name-byte order, a
    /// directory before its contents. Paths are relative to the tree's root.
    pub fn walk(&self, tree: &Digest) -> Walk {
        Walk { store: self.clone(), stack: vec![], pending_root: Some(*tree) }
    }
}

fn sync_parent(path: &Path) -> Result<()> {
    sync_dir(path.parent().expect("store paths have parents"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).ctx("sync directory", dir)
}

/// Makes everything written to the filesystem of `root` durable (`syncfs`,
/// other programs' writes included).
fn sync_filesystem(root: &Path) -> Result<()> {
    File::open(root)
        .and_then(|root| nix::unistd::syncfs(&root).map_err(io::Error::from))
        .ctx("sync the filesystem of", root)
}

/// Most fsyncs [`sync_all_together`] runs at once.
const SYNC_THREADS: usize = 32;

/// Fsyncs every file before returning, all at once (one thread each, up to
/// [`SYNC_THREADS`]) rather than one after another: a journaling filesystem
/// (ext4, xfs) commits fsyncs that wait at the same time in one journal
/// transaction, and their data writes overlap, so a batch costs about one commit
/// instead of one per file. On failure, returns the index of a failed file and
/// its error.
pub(crate) fn sync_all_together(files: &[&File]) -> std::result::Result<(), (usize, io::Error)> {
    if let [one] = files {
        return one.sync_all().map_err(|e| (0, e));
    }
    for (batch, chunk) in files.chunks(SYNC_THREADS).enumerate() {
        let offset = batch * SYNC_THREADS;
        std::thread::scope(|scope| {
            let spawned: Vec<_> = chunk
                .iter()
                .map(|file| std::thread::Builder::new().spawn_scoped(scope, || file.sync_all()))
                .collect();
            let mut result = Ok(());
            for (i, (spawned, file)) in spawned.into_iter().zip(chunk).enumerate() {
                // A thread that could not start syncs here instead.
                let synced = match spawned {
                    Ok(handle) => handle
                        .join()
                        .unwrap_or_else(|_| Err(io::Error::other("an fsync thread panicked"))),
                    Err(_) => file.sync_all(),
                };
                if let (Ok(()), Err(e)) = (&result, synced) {
                    result = Err((offset + i, e));
                }
            }
            result
        })?;
    }
    Ok(())
}

/// Reads a stored file's content; see [`Store::open_file`]. Its buffers and
/// zstd context serve every chunk of the file.
pub struct FileReader {
    store: Store,
    chunks: Vec<Chunk>,
    next: usize,
    /// The current chunk's stored (encoded) bytes.
    stored: Vec<u8>,
    decoder: blob::Decoder,
    /// The current chunk, verified.
    buf: Vec<u8>,
    pos: usize,
    /// The checkout cache's copy of the file and its name, read in place of
    /// the blobs until a chunk of it fails to verify.
    cached: Option<(File, PathBuf)>,
}

/// Reads the next `chunk.size` bytes of `file` into the empty `buf`, keeping
/// them only if they hash to the chunk's digest.
fn read_verified(file: &mut File, chunk: &Chunk, buf: &mut Vec<u8>) -> bool {
    let size = u64::from(chunk.size);
    // Room for all of it, so it comes in one read.
    buf.reserve(chunk.size as usize);
    let read = file.take(size).read_to_end(buf);
    if read.is_ok_and(|n| n as u64 == size) && Digest::of(buf) == chunk.digest {
        return true;
    }
    buf.clear();
    false
}

impl Read for FileReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            let Some(chunk) = self.chunks.get(self.next) else { return Ok(0) };
            let digest = chunk.digest;
            // Empty until verified: after an error, the next read tries again.
            self.buf.clear();
            self.pos = 0;
            if let Some((cached, path)) = &mut self.cached {
                if read_verified(cached, chunk, &mut self.buf) {
                    self.next += 1;
                    continue;
                }
                // Damaged: the rest comes from the blobs.
                checkout::forget_damaged_copy(cached, path);
                self.cached = None;
            }
            self.store
                .read_object_into(ObjectKind::Blob, &digest, &mut self.stored)
                .and_then(|()| {
                    blob::decode_into(&self.stored, &digest, &mut self.decoder, &mut self.buf)
                        .map_err(|source| StoreError::CorruptBlob { digest, source })
                })
                .map_err(io::Error::other)?;
            self.next += 1;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// One entry met by [`Store::walk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkEntry {
    /// Relative path from the walked tree's root, never empty.
    pub path: PathBuf,
    pub node: Node,
}

/// Iterator returned by [`Store::walk`].
pub struct Walk {
    store: Store,
    /// Directories being listed: their path and remaining entries (reversed).
    stack: Vec<(PathBuf, Vec<(PathComponent, Node)>)>,
    pending_root: Option<Digest>,
}

impl Iterator for Walk {
    type Item = Result<WalkEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(root) = self.pending_root.take() {
            match self.store.read_tree(&root) {
                Ok(tree) => {
                    self.stack.push((PathBuf::new(), tree.entries.into_iter().rev().collect()))
                }
                Err(e) => return Some(Err(e)),
            }
        }
        loop {
            let (dir, entries) = self.stack.last_mut()?;
            let Some((name, node)) = entries.pop() else {
                self.stack.pop();
                continue;
            };
            let path = dir.join(name.as_os_str());
            if let Node::Dir(d) = &node {
                match self.store.read_tree(&d.digest) {
                    Ok(tree) => {
                        self.stack.push((path.clone(), tree.entries.into_iter().rev().collect()))
                    }
                    Err(e) => {
                        self.stack.clear();
                        return Some(Err(e));
                    }
                }
            }
            return Some(Ok(WalkEntry { path, node }));
        }
    }
}
