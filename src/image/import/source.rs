//! Reading an OCI image layout, from a directory or from an oci-archive tar,
//! one verified blob at a time.
//!
//! An archive is never extracted: opening it lists its tar entries once (data
//! offset and size of each regular file, with GNU and PAX long names), and a
//! blob is then read by seeking to its entry. Every blob read is checked
//! against its descriptor: the size before reading, the sha256 once read (a
//! streamed blob is checked by its reader's caller, see [`Blob`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::{ImportError, OciSource};

/// Largest JSON document (index, manifest, config) read into memory.
pub const MAX_DOCUMENT: u64 = 16 << 20;

/// A descriptor's sha256, validated as 64 lowercase hex digits, so it is safe
/// to join onto a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256(String);

impl Sha256 {
    /// Parses `sha256:HEX`; other algorithms and malformed digests are refused.
    pub fn parse(digest: &str) -> Result<Self, ImportError> {
        match digest.strip_prefix("sha256:") {
            Some(hex) if crate::store::is_sha256_hex(hex) => Ok(Sha256(hex.to_string())),
            _ => Err(ImportError::BadDigest { digest: digest.to_string() }),
        }
    }

    pub fn hex(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// A file of the layout and its size.
type SizedReader = (Box<dyn Read>, u64);

/// An opened layout or archive.
pub struct Source {
    kind: Kind,
    /// `oci:/x` or `oci-archive:/x.tar`, for messages.
    pub name: String,
}

enum Kind {
    Layout(PathBuf),
    /// The archive's path and, per normalised entry path, (data offset, size).
    Archive(PathBuf, HashMap<String, (u64, u64)>),
}

/// A blob being streamed: its reader and what it must hash to. The caller
/// reads it to the end and calls [`Blob::check`].
pub struct Blob {
    pub reader: HashingReader<Box<dyn Read>>,
    pub digest: Sha256,
    pub size: u64,
    /// Where the blob is, for messages.
    pub location: String,
}

impl Blob {
    /// Fails unless everything read so far hashes to the blob's digest and size.
    /// Call after reading to the end (see [`drain`]).
    pub fn check(self) -> Result<(), ImportError> {
        let (actual, size) = self.reader.finish();
        if actual != self.digest.hex() || size != self.size {
            return Err(ImportError::CorruptBlob {
                digest: self.digest.to_string(),
                location: self.location,
                reason: format!("its content hashes to sha256:{actual} ({size} bytes)"),
            });
        }
        Ok(())
    }
}

/// A reader that hashes (sha256) and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    size: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: sha2::Sha256::new(), size: 0 }
    }

    /// The sha256 (hex) and byte count of what was read.
    pub fn finish(self) -> (String, u64) {
        (crate::store::hex(&self.hasher.finalize()), self.size)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Reads `reader` to its end, discarding the bytes.
pub fn drain(reader: &mut impl Read) -> io::Result<()> {
    io::copy(reader, &mut io::sink()).map(|_| ())
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImportError + use<> {
    let path = path.to_path_buf();
    move |source| ImportError::Io { action, path, source }
}

/// Normalises a path inside an archive: no leading `./` or `/`, no `.` parts.
fn normalise(path: &[u8]) -> String {
    String::from_utf8_lossy(path)
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/")
}

impl Source {
    /// Opens the layout or archive; an archive's entries are listed here.
    pub fn open(source: &OciSource) -> Result<Source, ImportError> {
        let name = source.to_string();
        match source {
            OciSource::Layout(dir) => {
                if !dir.join("index.json").is_file() {
                    return Err(ImportError::NotALayout { dir: dir.clone() });
                }
                Ok(Source { kind: Kind::Layout(dir.clone()), name })
            }
            OciSource::Archive(path) => {
                let entries = list_archive(path)?;
                if !entries.contains_key("index.json") {
                    return Err(ImportError::NotAnArchive {
                        path: path.clone(),
                        reason: "it has no index.json".into(),
                    });
                }
                Ok(Source { kind: Kind::Archive(path.clone(), entries), name })
            }
        }
    }

    /// Where the blobs are, for messages: the layout dir or the archive file.
    pub fn location(&self) -> String {
        match &self.kind {
            Kind::Layout(dir) => dir.display().to_string(),
            Kind::Archive(path, _) => path.display().to_string(),
        }
    }

    /// Where `index.json` is, for messages.
    pub fn index_location(&self) -> String {
        match &self.kind {
            Kind::Layout(dir) => dir.join("index.json").display().to_string(),
            Kind::Archive(path, _) => format!("index.json in {}", path.display()),
        }
    }

    /// Opens the file at `rel` (a layout-relative path) and returns it with its size.
    fn open_file(&self, rel: &str) -> Result<Option<SizedReader>, ImportError> {
        match &self.kind {
            Kind::Layout(dir) => {
                let path = dir.join(rel);
                // Non-blocking, so a fifo planted in the layout is refused
                // below instead of blocking the import (and its pin) forever.
                let file = match File::options()
                    .read(true)
                    .custom_flags(nix::libc::O_NONBLOCK)
                    .open(&path)
                {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err("open", &path)(e)),
                };
                let meta = file.metadata().map_err(io_err("read metadata of", &path))?;
                if !meta.is_file() {
                    return Err(ImportError::NotAFile { path });
                }
                Ok(Some((Box::new(io::BufReader::with_capacity(256 * 1024, file)), meta.len())))
            }
            Kind::Archive(path, entries) => {
                let Some(&(offset, size)) = entries.get(rel) else { return Ok(None) };
                let mut file = File::open(path).map_err(io_err("open", path))?;
                file.seek(SeekFrom::Start(offset)).map_err(io_err("seek in", path))?;
                let reader = io::BufReader::with_capacity(256 * 1024, file).take(size);
                Ok(Some((Box::new(reader), size)))
            }
        }
    }

    /// The bytes of `index.json`.
    pub fn read_index(&self) -> Result<Vec<u8>, ImportError> {
        let Some((reader, size)) = self.open_file("index.json")? else {
            return Err(match &self.kind {
                Kind::Layout(dir) => ImportError::NotALayout { dir: dir.clone() },
                Kind::Archive(path, _) => ImportError::NotAnArchive {
                    path: path.clone(),
                    reason: "it has no index.json".into(),
                },
            });
        };
        if size > MAX_DOCUMENT {
            return Err(ImportError::TooLarge { what: self.index_location(), size });
        }
        let mut bytes = Vec::new();
        reader.take(MAX_DOCUMENT).read_to_end(&mut bytes).map_err(|source| ImportError::Io {
            action: "read",
            path: PathBuf::from(self.index_location()),
            source,
        })?;
        Ok(bytes)
    }

    /// Opens the blob `digest` of `size` bytes for streaming; its size is checked here.
    pub fn open_blob(&self, digest: &Sha256, size: u64) -> Result<Blob, ImportError> {
        let location = self.location();
        let Some((reader, actual)) = self.open_file(&format!("blobs/sha256/{}", digest.hex()))?
        else {
            return Err(ImportError::MissingBlob { digest: digest.to_string(), location });
        };
        if actual != size {
            return Err(ImportError::CorruptBlob {
                digest: digest.to_string(),
                location,
                reason: format!("it has {actual} bytes, its descriptor says {size}"),
            });
        }
        Ok(Blob { reader: HashingReader::new(reader), digest: digest.clone(), size, location })
    }

    /// Reads a whole (small) blob and verifies it.
    pub fn read_blob(&self, digest: &Sha256, size: u64) -> Result<Vec<u8>, ImportError> {
        if size > MAX_DOCUMENT {
            return Err(ImportError::TooLarge { what: format!("blob {digest}"), size });
        }
        let mut blob = self.open_blob(digest, size)?;
        let mut bytes = Vec::new();
        blob.reader.read_to_end(&mut bytes).map_err(|source| ImportError::Io {
            action: "read",
            path: PathBuf::from(format!("blob {digest} in {}", blob.location)),
            source,
        })?;
        blob.check()?;
        Ok(bytes)
    }
}

/// Lists the regular files of the tar at `path`: normalised path → (data offset, size).
fn list_archive(path: &Path) -> Result<HashMap<String, (u64, u64)>, ImportError> {
    let not_archive =
        |reason: String| ImportError::NotAnArchive { path: path.to_path_buf(), reason };
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(io_err("read", path))?;
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        return Err(not_archive("it is gzip-compressed; decompress it first (gunzip)".into()));
    }
    if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(not_archive("it is zstd-compressed; decompress it first (unzstd)".into()));
    }
    file.rewind().map_err(io_err("seek in", path))?;
    let mut archive = tar::Archive::new(file);
    let mut out = HashMap::new();
    let entries = archive.entries_with_seek().map_err(|e| not_archive(e.to_string()))?;
    for (i, entry) in entries.enumerate() {
        let entry = entry.map_err(|e| {
            // The tar crate's first-header errors ("numeric field was not a
            // number") say nothing useful to a user who passed the wrong file.
            not_archive(if i == 0 {
                "it is not a tar file".into()
            } else {
                format!("tar entry {} cannot be read: {e}", i + 1)
            })
        })?;
        let kind = entry.header().entry_type();
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let rel = normalise(&entry.path_bytes());
            out.insert(rel, (entry.raw_file_position(), entry.size()));
        }
    }
    Ok(out)
}
