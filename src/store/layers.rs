//! The layer cache: OCI blobs (sha256-named) and the index that maps a layer
//! key to the compressed layer blob built for it.
//!
//! ```text
//! ROOT/layers/sha256/HEX      an OCI blob (compressed layer, config, manifest, index), named by its sha256
//! ROOT/layers/keys/HEX        layer key (blake3, chosen by the image module) -> JSON {digest, diff_id, size}
//! ```
//!
//! Invariants:
//! - Blobs are streamed into a temp file in `ROOT/tmp/` through an [`OciBlobWriter`]
//!   that hashes and counts as it writes, then fsynced and renamed to their sha256
//!   name: a name holds complete content or nothing. The writer may write a copy
//!   elsewhere at the same time (an OCI layout being written); the copy goes
//!   through the same steps in its own directory.
//! - A key file is written (atomically) only after the blob it names is durable
//!   under its name (a [`Staged`] publication: blobs are its `Content`, keys its
//!   `Names`), and [`Store::cached_layer`] treats a key whose blob is missing as
//!   absent, so deleting `ROOT/layers/` at any time only costs rebuilding layers.
//! - Key files are not fsynced ([`Staged::add_unsynced`]): after a power loss
//!   one may be missing, empty or torn, and [`Store::cached_layer`] treats a key
//!   that does not decode as absent too, so the layer is rebuilt and the key
//!   rewritten. A key that decodes is true, since it was written after its blob
//!   was durable.
//! - The store does not interpret keys: the image module hashes everything that
//!   changes a layer's bytes (tree, compression, ownership, mtime, format) into one.
//! - `gc` does not sweep this directory (it is a cache, not a root); removing it
//!   is always safe.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::writeback::Writeback;
use super::{Existing, IoContext, Result, Staged, Step, Store};
use crate::digest::Digest;

/// What the cache holds for one layer key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CachedLayer {
    /// sha256 of the compressed blob, lowercase hex.
    pub digest: String,
    /// sha256 of the uncompressed tar, lowercase hex.
    pub diff_id: String,
    /// Size of the compressed blob in bytes.
    pub size: u64,
}

/// A blob that [`OciBlobWriter::finish`] stored: its sha256 (hex) and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciBlob {
    pub digest: String,
    pub size: u64,
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Streams one OCI blob into the store (and, if asked, into a copy in another
/// directory, such as an OCI layout's `blobs/sha256`), hashing (sha256) and
/// counting as it writes. Large blobs start going to disk while being written
/// (`store::writeback`).
pub struct OciBlobWriter {
    /// The store's temp file first, then the copy.
    files: Vec<BlobFile>,
    hasher: sha2::Sha256,
    size: u64,
}

/// One temp file an [`OciBlobWriter`] writes, and the directory it goes to.
struct BlobFile {
    file: io::BufWriter<tempfile::NamedTempFile>,
    dir: PathBuf,
    writeback: Writeback,
}

impl Write for OciBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for f in &mut self.files {
            f.file.write_all(buf)?;
            if f.writeback.wrote(buf.len()) {
                f.file.flush()?;
                f.writeback.start(f.file.get_ref().as_file());
            }
        }
        self.hasher.update(buf);
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.files.iter_mut().try_for_each(|f| f.file.flush())
    }
}

impl OciBlobWriter {
    /// Stages the blob (and its copy) to be renamed to its sha256 name (keeping
    /// an existing one) when `staged` is published; until then it is not in the
    /// store.
    pub fn finish(self, staged: &Staged) -> Result<OciBlob> {
        let digest = hex(&self.hasher.finalize());
        for f in self.files {
            let tmp = f.file.into_inner().map_err(|e| e.into_error());
            let tmp = tmp.ctx("write a temp file in", &f.dir)?;
            staged.add(Step::Content, tmp, f.dir.join(&digest), Existing::Keep);
        }
        Ok(OciBlob { digest, size: self.size })
    }
}

/// A read-only temp file in `tmp_dir`, to become a blob in `dir`.
fn blob_file(tmp_dir: &Path, dir: PathBuf) -> Result<BlobFile> {
    let file = tempfile::Builder::new()
        .prefix(".oci")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o444))
        .tempfile_in(tmp_dir)
        .ctx("create a temp file in", tmp_dir)?;
    let file = io::BufWriter::with_capacity(256 * 1024, file);
    Ok(BlobFile { file, dir, writeback: Writeback::default() })
}

impl Store {
    fn layers_dir(&self, sub: &str) -> Result<PathBuf> {
        let dir = self.root.join("layers").join(sub);
        std::fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        Ok(dir)
    }

    /// Where the OCI blob with sha256 `hex` lives (whether or not it exists).
    pub fn oci_blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("layers/sha256").join(hex)
    }

    /// A writer for a new OCI blob, which also writes a copy named by its
    /// sha256 into the existing directory `copy_to`, if given. Hold a
    /// [`Pin`](super::Pin) while writing.
    pub fn oci_blob_writer(&self, copy_to: Option<&Path>) -> Result<OciBlobWriter> {
        let dir = self.layers_dir("sha256")?;
        let mut files = vec![blob_file(&self.root.join("tmp"), dir)?];
        if let Some(copy_to) = copy_to {
            files.push(blob_file(copy_to, copy_to.to_path_buf())?);
        }
        Ok(OciBlobWriter { files, hasher: sha2::Sha256::new(), size: 0 })
    }

    /// Stores a small OCI blob (JSON) and returns its sha256 and size.
    pub fn put_oci_blob(&self, bytes: &[u8]) -> Result<OciBlob> {
        let mut stored = self.put_oci_blobs(&[bytes])?;
        Ok(stored.remove(0))
    }

    /// Stores small OCI blobs (configs, manifests, an index) and returns their
    /// sha256 and size, in order: [`Store::stage_oci_blobs`], published at once.
    pub fn put_oci_blobs(&self, blobs: &[&[u8]]) -> Result<Vec<OciBlob>> {
        let staged = Staged::new();
        let stored = self.stage_oci_blobs(blobs, &staged)?;
        staged.publish()?;
        Ok(stored)
    }

    /// Stages the small OCI blobs not yet stored (as `Content`) and returns the
    /// sha256 and size of each, in order. Hold a [`Pin`](super::Pin) until
    /// `staged` is published.
    pub fn stage_oci_blobs(&self, blobs: &[&[u8]], staged: &Staged) -> Result<Vec<OciBlob>> {
        let stored: Vec<OciBlob> = blobs
            .iter()
            .map(|b| OciBlob { digest: hex(&sha2::Sha256::digest(b)), size: b.len() as u64 })
            .collect();
        let mut missing: Vec<(&[u8], PathBuf)> = Vec::new();
        for (bytes, blob) in blobs.iter().zip(&stored) {
            let path = self.oci_blob_path(&blob.digest);
            if !path.exists() && !missing.iter().any(|(_, p)| *p == path) {
                missing.push((bytes, path));
            }
        }
        if !missing.is_empty() {
            self.layers_dir("sha256")?;
        }
        for (bytes, path) in missing {
            staged.add(Step::Content, self.temp_file(&[bytes], 0o444)?, path, Existing::Keep);
        }
        Ok(stored)
    }

    /// The layer cached under `key`, if both its key file and its blob are present.
    pub fn cached_layer(&self, key: &Digest) -> Result<Option<CachedLayer>> {
        let path = self.root.join("layers/keys").join(key.to_hex());
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("read", &path),
        };
        // Keys are not fsynced: one torn by a power loss is a miss (module docs).
        let Ok(layer) = serde_json::from_slice::<CachedLayer>(&bytes) else { return Ok(None) };
        if !is_sha256_hex(&layer.digest) || !is_sha256_hex(&layer.diff_id) {
            return Ok(None);
        }
        let blob = self.oci_blob_path(&layer.digest);
        match std::fs::metadata(&blob) {
            Ok(meta) if meta.len() == layer.size => Ok(Some(layer)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("read metadata of", &blob),
        }
    }

    /// Records that the layer for `key` is `layer`; its blob must already be stored.
    pub fn set_cached_layer(&self, key: &Digest, layer: &CachedLayer) -> Result<()> {
        let staged = Staged::new();
        self.stage_cached_layer(key, layer, &staged)?;
        staged.publish()
    }

    /// Stages the record that the layer for `key` is `layer` (as `Names`, not
    /// fsynced: see the module docs): its blob must be stored or staged in the
    /// same publication.
    pub fn stage_cached_layer(
        &self,
        key: &Digest,
        layer: &CachedLayer,
        staged: &Staged,
    ) -> Result<()> {
        let dir = self.layers_dir("keys")?;
        let mut bytes = serde_json::to_vec(layer).expect("layer records serialize");
        bytes.push(b'\n');
        let tmp = self.temp_file(&[&bytes], 0o644)?;
        staged.add_unsynced(Step::Names, tmp, dir.join(key.to_hex()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_writer_names_blobs_by_sha256_and_keys_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.oci_blob_writer(None).unwrap();
        w.write_all(b"abc").unwrap();
        let staged = Staged::new();
        let blob = w.finish(&staged).unwrap();
        assert!(!store.oci_blob_path(&blob.digest).exists());
        staged.publish().unwrap();
        assert_eq!(blob.digest, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(std::fs::read(store.oci_blob_path(&blob.digest)).unwrap(), b"abc");
        assert_eq!(store.put_oci_blob(b"abc").unwrap(), blob);

        // A copy written alongside is published with the blob.
        let copies = tempfile::tempdir().unwrap();
        let mut w = store.oci_blob_writer(Some(copies.path())).unwrap();
        w.write_all(b"abcd").unwrap();
        let staged = Staged::new();
        let copied = w.finish(&staged).unwrap();
        staged.publish().unwrap();
        assert_eq!(std::fs::read(store.oci_blob_path(&copied.digest)).unwrap(), b"abcd");
        assert_eq!(std::fs::read(copies.path().join(&copied.digest)).unwrap(), b"abcd");

        let key = Digest::of(b"key");
        assert_eq!(store.cached_layer(&key).unwrap(), None);
        let layer = CachedLayer { digest: blob.digest.clone(), diff_id: blob.digest, size: 3 };
        store.set_cached_layer(&key, &layer).unwrap();
        assert_eq!(store.cached_layer(&key).unwrap(), Some(layer.clone()));
        // A key torn by a power loss (keys are not fsynced) is a miss, not an error.
        let key_file = store.root().join("layers/keys").join(key.to_hex());
        let whole = std::fs::read(&key_file).unwrap();
        for torn in [&b""[..], b"\0\0\0\0", &whole[..whole.len() / 2]] {
            std::fs::write(&key_file, torn).unwrap();
            assert_eq!(store.cached_layer(&key).unwrap(), None);
        }
        std::fs::write(&key_file, whole).unwrap();
        assert_eq!(store.cached_layer(&key).unwrap(), Some(layer.clone()));
        // So is a key whose blob vanished.
        std::fs::remove_file(store.oci_blob_path(&layer.digest)).unwrap();
        assert_eq!(store.cached_layer(&key).unwrap(), None);
    }
}
