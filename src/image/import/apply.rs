//! Applying one OCI layer tar in tree space: the layer's own entries become a
//! store tree, its whiteouts a set of [`Deletions`] to apply to the trees below.
//!
//! Nothing is unpacked to disk. Regular files go through the store's chunking
//! ([`Store::ingest_reader`]), so their content dedups with every other file
//! in the store. The rules (see the parent module for the whole contract):
//! - paths lose a leading `/` and `./` and every `.` part; a `..` part refuses
//!   the layer ([`ImportError::Escape`]); the root entry only carries a mode,
//!   which trees do not hold, so it is ignored;
//! - a later entry replaces an earlier one at the same path, except that a
//!   directory entry over a directory only sets its mode (tar semantics);
//! - a missing parent is created as a directory with the mode the directory
//!   has below (when it is a directory there and not deleted by this layer),
//!   else 0755; a parent that is not a directory in this layer is replaced;
//! - `.wh.NAME` deletes NAME below, `.wh..wh..opq` deletes a directory's
//!   lower content; both are recorded in [`Deletions`], never in the tree;
//!   other `.wh..wh.` names are ignored;
//! - hard links copy the node of their target from this layer or, when this
//!   layer neither holds nor deletes it, from the merged view below;
//! - devices and fifos are skipped, setuid/setgid bits of files dropped, each
//!   with a warning; a directory's setgid bit (which only steers group
//!   inheritance, and the store keeps no groups) is dropped silently; owners,
//!   times and xattrs are not read.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

use super::ImportError;
use crate::digest::Digest;
use crate::store::{
    Batch, DirNode, Node, PathComponent, Permissions, Store, StoreError, SymlinkTarget, Tree,
};

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const DEFAULT_DIR_MODE: u32 = 0o755;
/// Paths named in a warning, at most.
const WARN_PATHS: usize = 3;

/// What a layer deletes from the layers below it.
#[derive(Debug, Default)]
pub struct Deletions {
    kind: Option<Deletion>,
    children: BTreeMap<PathComponent, Deletions>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deletion {
    /// `.wh.NAME`: the path and everything below it.
    Whiteout,
    /// `.wh..wh..opq` inside the directory: its lower content (its mode stays).
    Opaque,
}

impl Deletions {
    pub fn is_empty(&self) -> bool {
        self.kind.is_none() && self.children.is_empty()
    }

    /// Whether the layer deletes everything below it (an opaque root).
    pub fn clears_root(&self) -> bool {
        self.kind.is_some()
    }

    fn insert(&mut self, path: &[PathComponent], kind: Deletion) {
        let mut node = self;
        for c in path {
            node = node.children.entry(c.clone()).or_default();
        }
        // A whiteout of the path covers an opaque marker inside it.
        if node.kind != Some(Deletion::Whiteout) {
            node.kind = Some(kind);
        }
    }

    /// Whether the entry at `path` of the layers below is deleted: whited out
    /// itself or inside a deleted or opaque directory.
    fn hides(&self, path: &[PathComponent]) -> bool {
        let mut node = self;
        for c in path {
            // A deleted or opaque directory strictly above the entry hides it.
            if node.kind.is_some() {
                return true;
            }
            match node.children.get(c) {
                Some(child) => node = child,
                None => return false,
            }
        }
        node.kind == Some(Deletion::Whiteout)
    }

    /// `tree` with every deleted path removed (whole subtrees; an opaque
    /// directory loses its entry too, as the layer holding the marker has it).
    pub fn remove_from(
        &self,
        store: &Store,
        batch: &Batch,
        tree: &Digest,
    ) -> Result<Digest, StoreError> {
        if self.kind.is_some() {
            return store.put_tree_in(&Tree::new(), Some(batch));
        }
        let mut current = store.read_tree(tree)?;
        let mut changed = false;
        for (name, sub) in &self.children {
            if sub.kind.is_some() {
                changed |= current.entries.remove(name).is_some();
            } else if let Some(Node::Dir(dir)) = current.entries.get_mut(name) {
                let digest = sub.remove_from(store, batch, &dir.digest)?;
                if digest != dir.digest {
                    dir.digest = digest;
                    changed = true;
                }
            }
        }
        if changed { store.put_tree_in(&current, Some(batch)) } else { Ok(*tree) }
    }
}

/// The merged view of a stack of trees (base first) with overlayfs semantics:
/// the topmost entry at a path wins; a directory merges with the directories
/// below it down to the first non-directory.
pub struct LowerView<'a> {
    store: &'a Store,
    stack: &'a [Digest],
    cache: HashMap<Digest, Tree>,
}

impl<'a> LowerView<'a> {
    pub fn new(store: &'a Store, stack: &'a [Digest]) -> Self {
        LowerView { store, stack, cache: HashMap::new() }
    }

    fn entry(&mut self, dir: &Digest, name: &PathComponent) -> Result<Option<Node>, StoreError> {
        if !self.cache.contains_key(dir) {
            let tree = self.store.read_tree(dir)?;
            self.cache.insert(*dir, tree);
        }
        Ok(self.cache.get(dir).and_then(|t| t.get(name)).cloned())
    }

    /// The node at `path` (non-empty) in the merged view, if any.
    pub fn lookup(&mut self, path: &[PathComponent]) -> Result<Option<Node>, StoreError> {
        // The directories merged at the current depth, topmost first.
        let mut dirs: Vec<Digest> = self.stack.iter().rev().copied().collect();
        for (i, name) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            let mut found: Option<Node> = None;
            let mut below = Vec::new();
            for dir in &dirs {
                match (self.entry(dir, name)?, &found) {
                    (None, _) => {}
                    (Some(Node::Dir(d)), None) => {
                        below.push(d.digest);
                        found = Some(Node::Dir(d));
                    }
                    (Some(Node::Dir(d)), Some(Node::Dir(_))) => below.push(d.digest),
                    (Some(node), None) => {
                        found = Some(node);
                        break;
                    }
                    // A non-directory under a directory ends the merge.
                    (Some(_), Some(_)) => break,
                }
            }
            match found {
                None => return Ok(None),
                Some(node) if last => return Ok(Some(node)),
                Some(Node::Dir(_)) => dirs = below,
                Some(_) => return Ok(None),
            }
        }
        Ok(None)
    }
}

/// A directory of the layer being applied.
#[derive(Default)]
struct LayerDir {
    /// `None` for a directory created only as a parent of other entries.
    permissions: Option<Permissions>,
    entries: BTreeMap<PathComponent, LayerNode>,
}

enum LayerNode {
    Leaf(Node),
    Dir(LayerDir),
}

impl LayerDir {
    /// The directory at `path`, creating missing ones and replacing non-directories.
    fn dir_mut(&mut self, path: &[PathComponent]) -> &mut LayerDir {
        let mut dir = self;
        for c in path {
            let node =
                dir.entries.entry(c.clone()).or_insert_with(|| LayerNode::Dir(LayerDir::default()));
            if let LayerNode::Leaf(_) = node {
                *node = LayerNode::Dir(LayerDir::default());
            }
            dir = match node {
                LayerNode::Dir(d) => d,
                LayerNode::Leaf(_) => unreachable!("replaced by a directory just above"),
            };
        }
        dir
    }

    /// This layer's node at `path`: `Some(Some(node))` when the layer holds a
    /// non-directory there, `Some(None)` when it holds a directory or something
    /// that makes the path impossible, `None` when the layer says nothing.
    fn find(&self, path: &[PathComponent]) -> Option<Option<Node>> {
        let (last, parents) = path.split_last()?;
        let mut dir = self;
        for c in parents {
            match dir.entries.get(c)? {
                LayerNode::Dir(d) => dir = d,
                LayerNode::Leaf(_) => return Some(None),
            }
        }
        match dir.entries.get(last)? {
            LayerNode::Leaf(node) => Some(Some(node.clone())),
            LayerNode::Dir(_) => Some(None),
        }
    }
}

/// The result of applying one layer.
pub struct AppliedLayer {
    /// The layer's entries (no whiteouts), stored.
    pub tree: Digest,
    /// What it deletes from the layers below.
    pub deletions: Deletions,
    pub warnings: Vec<String>,
}

/// Paths of entries skipped or changed, for one warning line.
#[derive(Default)]
struct Noted {
    count: usize,
    paths: Vec<String>,
}

impl Noted {
    fn add(&mut self, path: String) {
        self.count += 1;
        if self.paths.len() < WARN_PATHS {
            self.paths.push(path);
        }
    }

    /// `"{verb} {count} {what} in layer {layer} ({paths}){why}"`, when anything was noted.
    fn warning(&self, verb: &str, what: &str, layer: &str, why: &str) -> Option<String> {
        (self.count > 0).then(|| {
            let more = if self.count > self.paths.len() { ", …" } else { "" };
            let paths = self.paths.join(", ");
            format!("{verb} {} {what} in layer {layer} ({paths}{more}){why}", self.count)
        })
    }
}

/// Longest entry path accepted: Linux's `PATH_MAX`. It also bounds the depth
/// of the recursive tree code below.
const PATH_MAX: usize = 4096;

/// Splits an entry path into validated components: no leading `/` or `./`,
/// no `.` parts; `..` refuses the layer.
fn components(raw: &[u8], layer: &str) -> Result<Vec<PathComponent>, ImportError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.len() > PATH_MAX {
        return Err(ImportError::InvalidEntry {
            layer: layer.to_string(),
            entry: format!("{}…", String::from_utf8_lossy(&raw[..64])),
            reason: format!("its path has {} bytes, more than {PATH_MAX}", raw.len()),
        });
    }
    let mut out = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(ImportError::Escape { layer: layer.to_string(), entry: shown() }),
            name => out.push(PathComponent::new(name).map_err(|e| ImportError::InvalidEntry {
                layer: layer.to_string(),
                entry: shown(),
                reason: e.to_string(),
            })?),
        }
    }
    Ok(out)
}

fn display(path: &[PathComponent]) -> String {
    path.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("/")
}

/// Read errors stay `Layer` errors (so the caller can check the blob's digest);
/// store errors carried inside `io::Error`s come back out.
fn read_error(layer: &str, e: std::io::Error) -> ImportError {
    if e.get_ref().is_some_and(|inner| inner.is::<StoreError>()) {
        let inner = e.into_inner().expect("has an inner error");
        return ImportError::Store(*inner.downcast::<StoreError>().expect("is a StoreError"));
    }
    ImportError::Layer { layer: layer.to_string(), source: e }
}

/// Applies the layer tar read from `tar` over `lower` (base first); `layer`
/// names it in messages. Reads up to the tar's end-of-archive marker. What
/// it stores is durable once `batch` finishes.
pub fn apply(
    store: &Store,
    batch: &Batch,
    lower: &[Digest],
    layer: &str,
    tar: impl Read,
) -> Result<AppliedLayer, ImportError> {
    let invalid = |entry: &[PathComponent], reason: String| ImportError::InvalidEntry {
        layer: layer.to_string(),
        entry: display(entry),
        reason,
    };
    let mut root = LayerDir::default();
    let mut deletions = Deletions::default();
    let mut view = LowerView::new(store, lower);
    let (mut special, mut privileged, mut unknown) =
        (Noted::default(), Noted::default(), Noted::default());
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().map_err(|e| read_error(layer, e))? {
        let mut entry = entry.map_err(|e| read_error(layer, e))?;
        let kind = entry.header().entry_type();
        let path = components(&entry.path_bytes(), layer)?;
        let Some((name, parents)) = path.split_last() else {
            if kind.is_dir() || kind.is_pax_global_extensions() {
                continue; // The root's mode: trees do not hold one.
            }
            return Err(invalid(&path, "it replaces the image root".into()));
        };
        if kind.is_pax_global_extensions() {
            continue;
        }
        if name.as_bytes() == OPAQUE {
            deletions.insert(parents, Deletion::Opaque);
            root.dir_mut(parents);
            continue;
        }
        if name.as_bytes().starts_with(b".wh..wh.") {
            continue; // Reserved for other whiteout kinds; the spec says to ignore them.
        }
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT) {
            let hidden = PathComponent::new(hidden)
                .map_err(|e| invalid(&path, format!("bad whiteout: {e}")))?;
            let mut target = parents.to_vec();
            target.push(hidden);
            deletions.insert(&target, Deletion::Whiteout);
            continue;
        }
        let mode = entry.header().mode().map_err(|e| invalid(&path, e.to_string()))?;
        let mut bits = mode & 0o7777;
        let node = match kind {
            tar::EntryType::Directory => {
                let permissions =
                    Permissions::new(bits & !Permissions::PRIVILEGED & Permissions::ALLOWED)
                        .map_err(|e| invalid(&path, e.to_string()))?;
                let parent = root.dir_mut(parents);
                match parent.entries.get_mut(name) {
                    Some(LayerNode::Dir(dir)) => dir.permissions = Some(permissions),
                    _ => {
                        let dir =
                            LayerDir { permissions: Some(permissions), ..LayerDir::default() };
                        parent.entries.insert(name.clone(), LayerNode::Dir(dir));
                    }
                }
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if bits & Permissions::PRIVILEGED != 0 {
                    privileged.add(display(&path));
                    bits &= !Permissions::PRIVILEGED;
                }
                let permissions =
                    Permissions::new(bits).map_err(|e| invalid(&path, e.to_string()))?;
                let file = store
                    .ingest_reader(&mut entry, permissions, batch)
                    .map_err(|e| read_error(layer, e))?;
                Node::File(file)
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default();
                Node::Symlink(
                    SymlinkTarget::new(target.into_owned())
                        .map_err(|e| invalid(&path, e.to_string()))?,
                )
            }
            tar::EntryType::Link => {
                let raw = entry.link_name_bytes().unwrap_or_default().into_owned();
                let target = components(&raw, layer).map_err(|e| match e {
                    ImportError::Escape { .. } => invalid(
                        &path,
                        format!(
                            "its hard-link target `{}` escapes the image root",
                            String::from_utf8_lossy(&raw)
                        ),
                    ),
                    other => other,
                })?;
                let missing = || ImportError::MissingLinkTarget {
                    layer: layer.to_string(),
                    entry: display(&path),
                    target: String::from_utf8_lossy(&raw).into_owned(),
                };
                let node = match root.find(&target) {
                    Some(Some(node)) => node,
                    Some(None) => return Err(missing()),
                    None if target.is_empty() || deletions.hides(&target) => return Err(missing()),
                    None => view.lookup(&target)?.ok_or_else(missing)?,
                };
                if let Node::Dir(_) = node {
                    return Err(invalid(&path, "it is a hard link to a directory".into()));
                }
                node
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                special.add(display(&path));
                continue;
            }
            _ => {
                unknown.add(display(&path));
                continue;
            }
        };
        root.dir_mut(parents).entries.insert(name.clone(), LayerNode::Leaf(node));
    }
    let mut path = Vec::new();
    let tree = store_dir((store, batch), root, &mut path, &deletions, &mut view)?;
    let warnings = [
        special.warning(
            "skipped",
            "device nodes and fifos",
            layer,
            ": a rootless container cannot create them",
        ),
        privileged.warning("dropped the setuid/setgid bits of", "files", layer, ""),
        unknown.warning("skipped", "entries of unknown tar types", layer, ""),
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok(AppliedLayer { tree, deletions, warnings })
}

/// Stores `dir` (at `path`) children first; a directory created only as a
/// parent takes the mode of the directory below, else 0755.
fn store_dir(
    (store, batch): (&Store, &Batch),
    dir: LayerDir,
    path: &mut Vec<PathComponent>,
    deletions: &Deletions,
    view: &mut LowerView<'_>,
) -> Result<Digest, ImportError> {
    let mut tree = Tree::new();
    for (name, node) in dir.entries {
        path.push(name.clone());
        let node = match node {
            LayerNode::Leaf(node) => node,
            LayerNode::Dir(sub) => {
                let permissions = match sub.permissions {
                    Some(p) => p,
                    None => lower_dir_mode(path, deletions, view)?,
                };
                let digest = store_dir((store, batch), sub, path, deletions, view)?;
                Node::Dir(DirNode { digest, permissions })
            }
        };
        path.pop();
        tree.insert(name, node);
    }
    Ok(store.put_tree_in(&tree, Some(batch))?)
}

fn lower_dir_mode(
    path: &[PathComponent],
    deletions: &Deletions,
    view: &mut LowerView<'_>,
) -> Result<Permissions, ImportError> {
    if !deletions.hides(path)
        && let Some(Node::Dir(d)) = view.lookup(path)?
    {
        return Ok(d.permissions);
    }
    Ok(Permissions::new(DEFAULT_DIR_MODE).expect("0755 is valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(path: &str) -> Vec<PathComponent> {
        components(path.as_bytes(), "l").unwrap()
    }

    #[test]
    fn paths_are_normalised_and_dotdot_refused() {
        assert_eq!(p("./a//b/./c/"), p("a/b/c"));
        assert_eq!(p("/etc/passwd"), p("etc/passwd"));
        assert!(p("./").is_empty());
        assert!(matches!(components(b"a/../../x", "l"), Err(ImportError::Escape { .. })));
    }

    #[test]
    fn deletions_hide_paths_under_whiteouts_and_inside_opaque_dirs() {
        let mut d = Deletions::default();
        d.insert(&p("a/b"), Deletion::Whiteout);
        d.insert(&p("o"), Deletion::Opaque);
        assert!(d.hides(&p("a/b")));
        assert!(d.hides(&p("a/b/c")));
        assert!(!d.hides(&p("a")));
        assert!(!d.hides(&p("a/c")));
        assert!(!d.hides(&p("o")));
        assert!(d.hides(&p("o/x")));
    }
}
