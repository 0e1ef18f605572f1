//! Package sources: what a build reads, identified by content.
//!
//! - A `path` source is ingested into the store (so it is hashed by content,
//!   never by mtime), leaving out `.git`, `target` and the recipe's `exclude`
//!   globs; its identity is the tree digest, and the build's `/src` is a fresh
//!   copy of exactly that tree.
//! - A `url` source is an archive pinned by sha256. It is downloaded once,
//!   verified, and kept in the store as a one-file tree under the gc root
//!   `source/sha256-HEX`, so later builds (and `--offline` ones) need no
//!   network. Its identity is the sha256; `/src` is the unpacked archive
//!   (`.tar`, `.tar.gz`/`.tgz`) or the file itself.
//!
//! Nothing here reads the clock or the environment; downloads report progress
//! through [`super::Observer`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use sha2::Digest as _;

use super::Observer;
use crate::digest::Digest;
use crate::key::SourceIdentity;
use crate::recipe::Source;
use crate::store::{Node, PathComponent, RefName, Store, StoreError, Tree};

/// Most bytes a source download may have (archives are pinned, not streamed media).
pub const MAX_DOWNLOAD: u64 = 4 << 30;

/// How long a download may take to resolve the host, and then to connect
/// (TLS included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a download may go without a byte coming or going: a server that
/// stops answering fails the build instead of hanging it. The whole download
/// has no limit, so a slow link still finishes a large archive.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a source cannot be read, fetched or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid exclude glob `{glob}`")]
    Glob {
        glob: String,
        #[source]
        source: globset::Error,
    },
    #[error("cannot ingest source {}", path.display())]
    Ingest {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error(
        "source {url} is not downloaded and --offline forbids downloading it (run `pkg fetch` first)"
    )]
    Offline { url: String },
    #[error("cannot download {url}")]
    Download {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("cannot download {url}: reading the body failed")]
    DownloadRead {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot download {url}: no connection to the server within {} s", after.as_secs())]
    Unreachable { url: String, after: Duration },
    #[error("cannot download {url}: the connection stalled for {} s", after.as_secs())]
    Stalled { url: String, after: Duration },
    #[error("cannot download {url}: it is larger than {MAX_DOWNLOAD} bytes")]
    TooLarge { url: String },
    #[error("download of {url} has sha256 {actual}, but the recipe pins {expected}")]
    Sha256Mismatch { url: String, expected: String, actual: String },
    #[error("cannot store the archive of {url}")]
    Store {
        url: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot unpack the archive of {url}")]
    Unpack {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot copy the source into {}", path.display())]
    Materialize {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the stored source")]
    Read(#[source] StoreError),
}

/// A source as the build key sees it, and the stored tree that `/src` is made from.
#[derive(Debug, Clone)]
pub struct PreparedSource {
    pub identity: SourceIdentity,
    /// The stored tree (a path source's content, or a one-file tree holding an archive).
    pub tree: Option<Digest>,
    /// For archives: the URL (the archive's file name decides how to unpack it).
    pub url: Option<String>,
}

impl PreparedSource {
    pub fn none() -> Self {
        PreparedSource { identity: SourceIdentity::None, tree: None, url: None }
    }
}

/// The glob set a path source leaves out: `.git`, `target` and `exclude`.
pub fn exclude_set(exclude: &[String]) -> Result<GlobSet, SourceError> {
    let mut builder = GlobSetBuilder::new();
    for glob in [".git", "**/.git", "target", "**/target"].iter().map(|s| s.to_string()).chain(
        exclude.iter().flat_map(|g| {
            let g = g.trim_end_matches('/').to_string();
            // `foo` also excludes `foo` at any depth when written without a slash.
            if g.contains('/') { vec![g] } else { vec![g.clone(), format!("**/{g}")] }
        }),
    ) {
        let compiled = Glob::new(&glob).map_err(|source| SourceError::Glob { glob, source })?;
        builder.add(compiled);
    }
    builder.build().map_err(|source| SourceError::Glob { glob: exclude.join(" "), source })
}

/// Ingests or locates a package's source. `path` is the source path resolved
/// against its recipe file.
pub fn prepare(
    store: &Store,
    source: &Source,
    path: Option<&Path>,
    offline: bool,
    observer: &dyn Observer,
) -> Result<PreparedSource, SourceError> {
    match source {
        Source::Path { exclude, .. } => {
            let path = path.expect("path sources have a resolved path");
            let ingest_error = |source| SourceError::Ingest { path: path.to_path_buf(), source };
            let meta = std::fs::metadata(path).map_err(|e| {
                ingest_error(StoreError::Io {
                    action: "read metadata of",
                    path: path.to_path_buf(),
                    source: e,
                })
            })?;
            let tree = if meta.is_dir() {
                let set = exclude_set(exclude)?;
                let filter = move |rel: &Path, _: &std::fs::Metadata| set.is_match(rel);
                store.ingest_dir(path, &filter).map_err(ingest_error)?
            } else {
                store.ingest_path(path).map_err(ingest_error)?
            };
            Ok(PreparedSource { identity: SourceIdentity::Tree(tree), tree: Some(tree), url: None })
        }
        Source::Url { url, sha256 } => {
            let tree = fetch(store, url, sha256, offline, observer)?;
            Ok(PreparedSource {
                identity: SourceIdentity::Archive { sha256: sha256.to_ascii_lowercase() },
                tree: Some(tree),
                url: Some(url.clone()),
            })
        }
    }
}

fn root_name(sha256: &str) -> RefName {
    RefName::new(&format!("source/sha256-{}", sha256.to_ascii_lowercase()))
        .expect("hex digests make valid ref names")
}

/// The stored archive tree of a pinned source, if already downloaded.
pub fn cached(store: &Store, sha256: &str) -> Result<Option<Digest>, StoreError> {
    let name = root_name(sha256);
    Ok(store.roots()?.into_iter().find(|(n, _)| *n == name).map(|(_, tree)| tree))
}

/// Makes sure the archive pinned by `sha256` is in the store, downloading it
/// unless it already is; returns its one-file tree.
pub fn fetch(
    store: &Store,
    url: &str,
    sha256: &str,
    offline: bool,
    observer: &dyn Observer,
) -> Result<Digest, SourceError> {
    let store_error = |source| SourceError::Store { url: url.to_string(), source };
    if let Some(tree) = cached(store, sha256).map_err(store_error)? {
        return Ok(tree);
    }
    if offline {
        return Err(SourceError::Offline { url: url.to_string() });
    }
    let tmp_dir = store.root().join("tmp");
    let dir = tempfile::Builder::new()
        .prefix("fetch-")
        .tempdir_in(&tmp_dir)
        .map_err(|e| SourceError::DownloadRead { url: url.to_string(), source: e })?;
    let file_path = dir.path().join("archive");
    let actual = download(url, &file_path, observer, STALL_TIMEOUT)?;
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(SourceError::Sha256Mismatch {
            url: url.to_string(),
            expected: sha256.to_ascii_lowercase(),
            actual,
        });
    }
    let _pin = store.pin().map_err(store_error)?;
    let file = store.ingest_file(&file_path).map_err(store_error)?;
    let mut tree = Tree::new();
    tree.insert(PathComponent::try_from("archive").expect("valid name"), Node::File(file));
    let digest = store.put_tree(&tree).map_err(store_error)?;
    store.add_root(&root_name(sha256), &digest).map_err(store_error)?;
    Ok(digest)
}

/// Streams `url` into `dest`, returning the sha256 (hex) of what was written;
/// fails when no byte comes or goes for `stall`.
fn download(
    url: &str,
    dest: &Path,
    observer: &dyn Observer,
    stall: Duration,
) -> Result<String, SourceError> {
    let read_error = |source| SourceError::DownloadRead { url: url.to_string(), source };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_resolve(Some(CONNECT_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_per_read(Some(stall))
        .timeout_per_write(Some(stall))
        .build()
        .into();
    let stalled = || SourceError::Stalled { url: url.to_string(), after: stall };
    let mut response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Timeout(ureq::Timeout::Resolve | ureq::Timeout::Connect) => {
            SourceError::Unreachable { url: url.to_string(), after: CONNECT_TIMEOUT }
        }
        ureq::Error::Timeout(ureq::Timeout::PerRead | ureq::Timeout::PerWrite) => stalled(),
        e => SourceError::Download { url: url.to_string(), source: Box::new(e) },
    })?;
    let total = response.body().content_length();
    observer.download_started(url, total);
    let mut reader = response.body_mut().with_config().limit(MAX_DOWNLOAD + 1).reader();
    let mut out = File::create(dest).map_err(read_error)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_stall(&e) => return Err(stalled()),
            Err(e) => return Err(read_error(e)),
        };
        done += n as u64;
        if done > MAX_DOWNLOAD {
            return Err(SourceError::TooLarge { url: url.to_string() });
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(read_error)?;
        observer.download_progress(url, done);
    }
    out.sync_all().map_err(read_error)?;
    observer.download_finished(url);
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether a body read failed because nothing came or went for the stall
/// timeout.
fn is_stall(e: &io::Error) -> bool {
    e.get_ref().and_then(|inner| inner.downcast_ref::<ureq::Error>()).is_some_and(|e| {
        matches!(e, ureq::Error::Timeout(ureq::Timeout::PerRead | ureq::Timeout::PerWrite))
    })
}

/// Writes a private, writable copy of the prepared source into `dest` (an
/// existing empty directory): a path source's tree, or an unpacked archive.
pub fn materialize(store: &Store, source: &PreparedSource, dest: &Path) -> Result<(), SourceError> {
    let Some(tree) = source.tree else { return Ok(()) };
    match &source.url {
        None => write_tree(store, &tree, dest),
        Some(url) => {
            let unpack_error = |source| SourceError::Unpack { url: url.clone(), source };
            let root = store.read_tree(&tree).map_err(SourceError::Read)?;
            let Some((_, Node::File(file))) = root.iter().next() else {
                return Err(unpack_error(io::Error::other("the stored archive tree is malformed")));
            };
            let reader = store.open_file(file);
            let name = url.rsplit('/').next().unwrap_or("archive").split('?').next().unwrap_or("");
            if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
                // Every member: pigz, bgzip and others write several.
                unpack_tar(flate2::read::MultiGzDecoder::new(reader), dest).map_err(unpack_error)
            } else if name.ends_with(".tar") {
                unpack_tar(reader, dest).map_err(unpack_error)
            } else {
                let name = if name.is_empty() { "archive" } else { name };
                let mut out = File::create(dest.join(name)).map_err(unpack_error)?;
                io::copy(&mut { reader }, &mut out).map(drop).map_err(unpack_error)
            }
        }
    }
}

/// Unpacks a tar stream, refusing entries that would land outside `dest`
/// (the `tar` crate's `unpack_in` checks each path) and not restoring owners or times.
fn unpack_tar(reader: impl Read, dest: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_mtime(false);
    archive.set_preserve_permissions(true);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries()? {
        let mut entry = entry?;
        entry.unpack_in(dest)?;
    }
    Ok(())
}

/// Copies a stored tree into `dest` as fresh, writable files (never hard links
/// into the store: the build may modify its source).
pub fn write_tree(store: &Store, tree: &Digest, dest: &Path) -> Result<(), SourceError> {
    for entry in store.walk(tree) {
        let entry = entry.map_err(SourceError::Read)?;
        let path = dest.join(&entry.path);
        let io_error = |source| SourceError::Materialize { path: path.clone(), source };
        match &entry.node {
            Node::Dir(dir) => {
                std::fs::create_dir(&path).map_err(io_error)?;
                let mode = dir.permissions.bits() | 0o700;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(io_error)?;
            }
            Node::File(file) => {
                let mut out = File::create(&path).map_err(io_error)?;
                io::copy(&mut store.open_file(file), &mut out).map_err(io_error)?;
                let mode = file.permissions().bits() | 0o200;
                out.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io_error)?;
            }
            Node::Symlink(target) => {
                std::os::unix::fs::symlink(target.as_os_str(), &path).map_err(io_error)?
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::net::TcpListener;

    use super::*;

    /// Downloads from a server on 127.0.0.1 that sends `reply`, then nothing,
    /// with a one-second stall timeout.
    fn download_stalling_after(reply: &'static [u8]) -> (String, Result<String, SourceError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/stalls.tar", listener.local_addr().unwrap());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = io::BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while request.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            // On a loaded machine the client may have given up already.
            let _ = conn.write_all(reply);
            // Holds the connection open, sending nothing, until the client gave up.
            let _ = released.recv_timeout(Duration::from_secs(60));
        });
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("archive");
        let result = download(&url, &archive, &super::super::Quiet, Duration::from_secs(1));
        release.send(()).unwrap();
        server.join().unwrap();
        (url, result)
    }

    #[test]
    fn a_download_that_stalls_fails() {
        let replies: [&[u8]; 2] = [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npart"];
        for reply in replies {
            let (url, result) = download_stalling_after(reply);
            let e = result.unwrap_err();
            assert!(matches!(e, SourceError::Stalled { .. }), "{e:?}");
            assert_eq!(
                e.to_string(),
                format!("cannot download {url}: the connection stalled for 1 s")
            );
        }
    }

    #[test]
    fn default_and_recipe_excludes() {
        let set = exclude_set(&["*.log".into(), "build/".into(), "docs/*.md".into()]).unwrap();
        for excluded in
            [".git", "a/.git", "target", "x/target", "a.log", "x/y.log", "build", "docs/a.md"]
        {
            assert!(set.is_match(excluded), "{excluded}");
        }
        for kept in ["src/main.rs", "targets", "docs/a.txt", "README.md"] {
            assert!(!set.is_match(kept), "{kept}");
        }
    }
}
