//! Publishing several files durably while waiting for the disk only three times.
//!
//! Each file is first written in full to a temp file on its destination's
//! filesystem and handed to a [`Staged`] with its final name and a [`Step`];
//! its fsync starts then, on a thread of its own, so files staged early (the
//! first layers of an image) are synced while later ones are still being
//! made. [`Staged::publish`] then
//!
//! 1. waits for every temp file's fsync;
//! 2. renames the [`Step::Content`] files to their names and fsyncs their
//!    directories (and any extra ones given) at once;
//! 3. does the same for the [`Step::Names`] files.
//!
//! A file staged with [`Staged::add_unsynced`] (a cache's index entry) is
//! renamed in its step, but neither it nor its directory is fsynced: after a
//! power loss it may be missing or torn, which its readers treat as absent.
//!
//! A link staged with [`Staged::add_link`] gives a second name to a file
//! published in the same step (or already in place): it is made from the
//! staged file's temp file, the inode just written, before that step's
//! renames (so even when the step keeps an existing file under the name, the
//! link gets the new content), and its directory is synced with theirs. The
//! inode's data was synced in step 1, so the new name is as durable as a copy
//! would be.
//! Where the filesystem refuses the link (another filesystem, a hard-link
//! limit), the file is copied instead, and the copy synced before it is renamed.
//!
//! Invariants: a name appears only with complete content (rename of a synced
//! temp file), and a `Names` file (a layer key, an image record, `index.json`)
//! becomes durable only after every `Content` file it may refer to is durable
//! under its name — the same guarantees as one temp + fsync + rename +
//! directory fsync per file in that order, at the cost of three waits instead of
//! two per file. Nothing is renamed unless every temp file synced; a failure
//! later leaves the files renamed so far in place, each complete.
//!
//! One publication may span filesystems (the store and an OCI layout written
//! beside it): their fsyncs still overlap. Until it is published, a staged
//! file's content is readable through [`Staged::reopen`].
//!
//! Files under an output directory ([`Staged::output_under`], an OCI layout)
//! are the caller's output, not the store's: when one cannot be put in place
//! (a link refused and its copy failing, a full disk), the rest of the
//! publication still happens, the store's records included, except that
//! output's remaining files (its `index.json` could name what is missing);
//! then [`Staged::publish`] returns that first error.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;

use super::{IoContext, Result, StoreError, sync_all_together};

/// When a staged file is renamed into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Files that refer to nothing else staged: blobs, `oci-layout`.
    Content,
    /// Files that may name `Content` files: layer keys, records, `index.json`.
    Names,
}

/// What to do when a staged file's name already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (a ref, `index.json`).
    Replace,
    /// Keep it and drop the new copy (a name that is a hash of the content).
    Keep,
}

struct StagedFile {
    tmp: tempfile::NamedTempFile,
    dest: PathBuf,
    existing: Existing,
    sync: Syncing,
}

/// How a staged file is made durable.
enum Syncing {
    /// Its fsync, running since it was staged; `None` if no thread could be
    /// started for it, so [`Staged::publish`] syncs it.
    Started(Option<JoinHandle<io::Result<()>>>),
    /// Never: see [`Staged::add_unsynced`].
    Never,
}

/// Starts fsyncing `tmp` on a thread of its own.
fn start_sync(tmp: &tempfile::NamedTempFile) -> Syncing {
    let handle = tmp.as_file().try_clone().ok().and_then(|file| {
        std::thread::Builder::new().name("pkg-fsync".into()).spawn(move || file.sync_all()).ok()
    });
    Syncing::Started(handle)
}

/// A second name for a file: see [`Staged::add_link`].
struct StagedLink {
    from: PathBuf,
    dest: PathBuf,
}

#[derive(Default)]
struct StepFiles {
    files: Vec<StagedFile>,
    links: Vec<StagedLink>,
    /// Directories to fsync besides the destinations' parents.
    dirs: BTreeSet<PathBuf>,
}

/// Files waiting to be published together; see the module docs. Several
/// threads may stage into one.
#[derive(Default)]
pub struct Staged {
    steps: Mutex<[StepFiles; 2]>,
    /// Output directories: see [`Staged::output_under`].
    outputs: Mutex<Vec<PathBuf>>,
}

impl Staged {
    pub fn new() -> Self {
        Staged::default()
    }

    /// Stages the fully written temp file `tmp` to become `dest` in `step`,
    /// and starts its fsync.
    pub fn add(&self, step: Step, tmp: tempfile::NamedTempFile, dest: PathBuf, existing: Existing) {
        let sync = start_sync(&tmp);
        lock(&self.steps)[step as usize].files.push(StagedFile { tmp, dest, existing, sync });
    }

    /// Stages `tmp` to replace `dest` in `step` without ever fsyncing it or
    /// its directory: for a file whose loss or tearing by a power failure only
    /// costs work, because its readers treat a missing or undecodable one as
    /// absent (a layer cache key). Other processes still see it whole or not
    /// at all, and only after the `Content` files it may name are durable.
    pub fn add_unsynced(&self, step: Step, tmp: tempfile::NamedTempFile, dest: PathBuf) {
        let file = StagedFile { tmp, dest, existing: Existing::Replace, sync: Syncing::Never };
        lock(&self.steps)[step as usize].files.push(file);
    }

    /// Stages `dest` to become a hard link to `from` in `step`: to the file
    /// staged in the same step to become `from` if there is one (its temp
    /// file), else to the durable file named `from`. An existing `dest` is kept (the
    /// name is a hash of the content); where no link can be made, `from` is
    /// copied and the copy synced.
    pub fn add_link(&self, step: Step, from: PathBuf, dest: PathBuf) {
        lock(&self.steps)[step as usize].links.push(StagedLink { from, dest });
    }

    /// Also fsyncs `dir` in `step` (e.g. the parent of a directory just created).
    pub fn sync_dir(&self, step: Step, dir: PathBuf) {
        lock(&self.steps)[step as usize].dirs.insert(dir);
    }

    /// Marks `root` as an output directory (see the module docs). A
    /// directory at or below it whose fsync fails is not an error either: it
    /// may be on a filesystem that refuses to fsync one (the files themselves
    /// are still synced).
    pub fn output_under(&self, root: PathBuf) {
        lock(&self.outputs).push(root);
    }

    /// Whether a file or a link is staged to become `dest`.
    pub fn is_staged(&self, dest: &Path) -> bool {
        let steps = lock(&self.steps);
        steps.iter().flat_map(|s| &s.files).any(|f| f.dest == dest)
            || steps.iter().flat_map(|s| &s.links).any(|l| l.dest == dest)
    }

    /// The content staged to become `dest`, read from its temp file, if any.
    pub fn reopen(&self, dest: &Path) -> Option<std::io::Result<File>> {
        let steps = lock(&self.steps);
        let file = steps.iter().flat_map(|s| &s.files).find(|f| f.dest == dest)?;
        // Read-only: blobs are staged with mode 0444.
        Some(File::open(file.tmp.path()))
    }

    /// Makes every staged file durable under its name, in step order.
    pub fn publish(self) -> Result<()> {
        // Wait for every fsync (all of them, even after a failure, so none
        // outlives the publication), then sync what got no thread.
        let mut steps = self.steps.into_inner().unwrap_or_else(|e| e.into_inner());
        let outputs = self.outputs.into_inner().unwrap_or_else(|e| e.into_inner());
        let mut failed = None;
        let mut unstarted = Vec::new();
        for file in steps.iter_mut().flat_map(|s| &mut s.files) {
            let Syncing::Started(handle) = &mut file.sync else { continue };
            let synced = match handle.take() {
                Some(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("an fsync thread panicked"))),
                None => {
                    unstarted.push(&file.tmp);
                    Ok(())
                }
            };
            if let (None, Err(e)) = (&failed, synced) {
                failed = Some((e, file.tmp.path().to_path_buf()));
            }
        }
        if let Some((e, path)) = failed {
            return Err(e).ctx("sync", &path);
        }
        let files: Vec<&File> = unstarted.iter().map(|t| t.as_file()).collect();
        if let Err((i, e)) = sync_all_together(&files) {
            return Err(e).ctx("sync", unstarted[i].path());
        }
        let mut failures = OutputFailures { outputs: &outputs, broken: Vec::new(), first: None };
        for step in steps {
            let mut dirs = step.dirs;
            // Links first, from a file staged under `from` when there is one:
            // its temp file is the inode just written and synced, whatever
            // `from` holds now (a kept older copy).
            for link in step.links {
                if failures.is_broken(&link.dest) {
                    continue;
                }
                let staged = step.files.iter().find(|f| f.dest == link.from);
                let linked = link_or_copy(staged.map_or(&link.from, |f| f.tmp.path()), &link.dest);
                if failures.settle(&link.dest, linked)?
                    && let Some(parent) = link.dest.parent()
                {
                    dirs.insert(parent.to_path_buf());
                }
            }
            for file in step.files {
                if failures.is_broken(&file.dest)
                    || (file.existing == Existing::Keep && file.dest.exists())
                {
                    continue;
                }
                let dest = file.dest;
                // Keep: never over a name made meanwhile (a rename between two
                // links of one inode would do nothing and leave the temp name).
                let renamed = match file.existing {
                    Existing::Replace => file.tmp.persist(&dest).map(drop),
                    Existing::Keep => file.tmp.persist_noclobber(&dest).map(drop).or_else(|e| {
                        if e.error.kind() == io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) }
                    }),
                };
                let renamed = renamed.map_err(|e| e.error).ctx("rename a temp file to", &dest);
                if failures.settle(&dest, renamed)?
                    && let (Syncing::Started(_), Some(parent)) = (file.sync, dest.parent())
                {
                    dirs.insert(parent.to_path_buf());
                }
            }
            sync_dirs(&dirs, &outputs)?;
        }
        failures.first.map_or(Ok(()), Err)
    }
}

/// Files of output directories that could not be put in place (see the
/// module docs).
struct OutputFailures<'a> {
    outputs: &'a [PathBuf],
    /// Output directories with such a file: nothing more goes there.
    broken: Vec<&'a PathBuf>,
    /// The first such failure, returned once the rest is published.
    first: Option<StoreError>,
}

impl OutputFailures<'_> {
    /// Whether placing `dest` went well; a store file's failure is an error
    /// at once, an output file's is kept for the end.
    fn settle(&mut self, dest: &Path, result: Result<()>) -> Result<bool> {
        let Err(e) = result else { return Ok(true) };
        let Some(root) = self.outputs.iter().find(|root| dest.starts_with(root)) else {
            return Err(e);
        };
        self.broken.push(root);
        self.first.get_or_insert(e);
        Ok(false)
    }

    fn is_broken(&self, dest: &Path) -> bool {
        self.broken.iter().any(|root| dest.starts_with(root))
    }
}

/// Makes `dest` a hard link to `from`, keeping an existing `dest`; where the
/// filesystem refuses, a synced copy of `from` (mode included) renamed to `dest`.
fn link_or_copy(from: &Path, dest: &Path) -> Result<()> {
    match std::fs::hard_link(from, dest) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e).ctx("link", from),
        Err(_) => {}
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".pkg")
        .tempfile_in(dir)
        .ctx("create a temp file in", dir)?;
    std::fs::copy(from, tmp.path()).ctx("copy", from)?;
    tmp.as_file().sync_all().ctx("sync", tmp.path())?;
    match tmp.persist_noclobber(dest) {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.error).ctx("rename a temp file to", dest),
    }
}

/// Locks `m`; a panic elsewhere while it was held leaves the lists whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Fsyncs directories at once (one thread each), failing on the first that
/// cannot be synced unless it is at or below one of `outputs`.
fn sync_dirs(dirs: &BTreeSet<PathBuf>, outputs: &[PathBuf]) -> Result<()> {
    let results: Vec<(&PathBuf, Result<()>)> = std::thread::scope(|scope| {
        let spawned: Vec<_> =
            dirs.iter().map(|dir| (dir, scope.spawn(move || super::sync_dir(dir)))).collect();
        spawned
            .into_iter()
            .map(|(dir, handle)| {
                let result = handle.join().unwrap_or_else(|_| {
                    Err(std::io::Error::other("an fsync thread panicked"))
                        .ctx("sync directory", dir)
                });
                (dir, result)
            })
            .collect()
    });
    for (dir, result) in results {
        if result.is_err() && outputs.iter().any(|root| dir.starts_with(root)) {
            continue;
        }
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn temp_with(dir: &Path, bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
        tmp.write_all(bytes).unwrap();
        tmp
    }

    #[test]
    fn publishes_every_file_replacing_or_keeping_existing_names() {
        let dir = tempfile::tempdir().unwrap();
        let (blob, key, kept) =
            (dir.path().join("blob"), dir.path().join("key"), dir.path().join("kept"));
        std::fs::write(&key, b"old key").unwrap();
        std::fs::write(&kept, b"first").unwrap();
        let staged = Staged::new();
        staged.add(Step::Names, temp_with(dir.path(), b"key"), key.clone(), Existing::Replace);
        staged.add(Step::Content, temp_with(dir.path(), b"blob"), blob.clone(), Existing::Keep);
        staged.add(Step::Content, temp_with(dir.path(), b"second"), kept.clone(), Existing::Keep);
        staged.sync_dir(Step::Content, dir.path().to_path_buf());
        staged.publish().unwrap();
        assert_eq!(std::fs::read(&blob).unwrap(), b"blob");
        assert_eq!(std::fs::read(&key).unwrap(), b"key");
        assert_eq!(std::fs::read(&kept).unwrap(), b"first");
        // Only the three names are left: kept copies and temp files are gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn staged_content_can_be_read_before_it_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Staged::new();
        let blob = dir.path().join("blob");
        staged.add(Step::Content, temp_with(dir.path(), b"blob"), blob.clone(), Existing::Keep);
        let mut read = String::new();
        std::io::Read::read_to_string(&mut staged.reopen(&blob).unwrap().unwrap(), &mut read)
            .unwrap();
        assert_eq!(read, "blob");
        assert!(staged.reopen(&dir.path().join("other")).is_none());
    }

    #[test]
    fn only_output_directories_may_fail_to_sync() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let staged = Staged::new();
        staged.sync_dir(Step::Content, gone.clone());
        assert!(staged.publish().is_err());
        let staged = Staged::new();
        staged.sync_dir(Step::Content, gone.clone());
        staged.output_under(dir.path().to_path_buf());
        staged.publish().unwrap();
    }

    #[test]
    fn unsynced_files_are_published_too() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, b"old").unwrap();
        let staged = Staged::new();
        staged.add_unsynced(Step::Names, temp_with(dir.path(), b"new"), key.clone());
        staged.publish().unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"new");
    }

    #[test]
    fn links_name_the_published_file_and_keep_existing_names() {
        let dir = tempfile::tempdir().unwrap();
        let (blob, link, kept) =
            (dir.path().join("blob"), dir.path().join("link"), dir.path().join("kept"));
        std::fs::write(&kept, b"first").unwrap();
        let staged = Staged::new();
        staged.add(Step::Content, temp_with(dir.path(), b"blob"), blob.clone(), Existing::Keep);
        staged.add_link(Step::Content, blob.clone(), link.clone());
        staged.add_link(Step::Content, blob.clone(), kept.clone());
        assert!(staged.is_staged(&link));
        staged.publish().unwrap();
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&link), ino(&blob));
        assert_eq!(std::fs::read(&kept).unwrap(), b"first");
    }

    /// A link names the inode just staged, not an older file kept under `from`.
    #[test]
    fn links_name_the_staged_inode_even_when_an_older_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (blob, link) = (dir.path().join("blob"), dir.path().join("link"));
        std::fs::write(&blob, b"older").unwrap();
        let staged = Staged::new();
        staged.add(Step::Content, temp_with(dir.path(), b"fresh"), blob.clone(), Existing::Keep);
        staged.add_link(Step::Content, blob.clone(), link.clone());
        staged.publish().unwrap();
        assert_eq!(std::fs::read(&blob).unwrap(), b"older");
        assert_eq!(std::fs::read(&link).unwrap(), b"fresh");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_refused_link_becomes_a_copy() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // A tmpfs and the temp directory's filesystem: no link between them.
        let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs at /dev/shm");
        let dir = tempfile::tempdir().unwrap();
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        assert_ne!(dev(shm.path()), dev(dir.path()), "/dev/shm must be another filesystem");
        let from = shm.path().join("from");
        std::fs::write(&from, b"bytes").unwrap();
        std::fs::set_permissions(&from, std::fs::Permissions::from_mode(0o444)).unwrap();
        let copy = dir.path().join("copy");
        let staged = Staged::new();
        staged.add_link(Step::Content, from.clone(), copy.clone());
        staged.publish().unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"bytes");
        assert_eq!(std::fs::metadata(&copy).unwrap().mode() & 0o777, 0o444);
        // Only the copy is left: no temp file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A link to nothing is an error, not an empty file.
        let staged = Staged::new();
        staged.add_link(Step::Content, dir.path().join("absent"), dir.path().join("y"));
        assert!(staged.publish().is_err());
        assert!(!dir.path().join("y").exists());
    }

    #[test]
    fn a_name_that_cannot_be_written_leaves_the_content_published() {
        let dir = tempfile::tempdir().unwrap();
        let staged = Staged::new();
        let blob = dir.path().join("blob");
        staged.add(Step::Content, temp_with(dir.path(), b"blob"), blob.clone(), Existing::Keep);
        let missing = dir.path().join("missing/key");
        staged.add(Step::Names, temp_with(dir.path(), b"key"), missing, Existing::Replace);
        assert!(staged.publish().is_err());
        // The content step completed; the name that could not be written is absent.
        assert_eq!(std::fs::read(&blob).unwrap(), b"blob");
    }

    /// An output file that cannot be placed fails the publication, but only
    /// after the store's files (records included) are in place; the output's
    /// later files, which could name it, are not published.
    #[test]
    fn an_output_that_cannot_be_placed_leaves_the_store_published() {
        let store = tempfile::tempdir().unwrap();
        let output = tempfile::tempdir().unwrap();
        let (blob, record) = (store.path().join("blob"), store.path().join("record"));
        let (copy, index) = (output.path().join("blob"), output.path().join("index.json"));
        let staged = Staged::new();
        staged.output_under(output.path().to_path_buf());
        staged.add(Step::Content, temp_with(store.path(), b"blob"), blob.clone(), Existing::Keep);
        staged.add(Step::Names, temp_with(store.path(), b"rec"), record.clone(), Existing::Replace);
        // Its source is gone: neither a link nor a copy can be made.
        staged.add_link(Step::Content, store.path().join("absent"), copy.clone());
        staged.add(Step::Names, temp_with(output.path(), b"idx"), index.clone(), Existing::Replace);
        let err = staged.publish().unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
        assert_eq!(std::fs::read(&blob).unwrap(), b"blob");
        assert_eq!(std::fs::read(&record).unwrap(), b"rec");
        assert!(!copy.exists() && !index.exists());
        // No temp file is left behind in either directory.
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 2);
        assert_eq!(std::fs::read_dir(output.path()).unwrap().count(), 0);
    }
}
