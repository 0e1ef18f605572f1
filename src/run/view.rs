//! Read-only lookups in an image's root filesystem without mounting it.
//!
//! A [`RootView`] stacks the image's layer trees the way overlayfs stacks
//! their checkouts: the topmost layer holding a name decides what it is; a
//! directory merges with the directories of the same name below it, down to
//! the first layer where that name is not a directory. Symlinks resolve
//! inside the view (an absolute target starts again at the image's root, `..`
//! stops at it), at most [`MAX_SYMLINKS`] of them per lookup, so a lookup
//! never leaves the image and always ends.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::rc::Rc;

use crate::digest::Digest;
use crate::store::{FileNode, Node, PathComponent, Result, Store, Tree};

/// Symlinks followed in one lookup before it gives up (Linux's limit).
pub const MAX_SYMLINKS: usize = 40;

/// Largest file [`RootView::read_file`] reads (`/etc/passwd` and friends).
const MAX_READ: u64 = 16 << 20;

/// What a path names in the view, symlinks followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    File(FileNode),
    Dir,
}

/// An image's root filesystem as its stacked layer trees.
pub struct RootView<'s> {
    store: &'s Store,
    /// Layer trees, topmost first.
    layers: Vec<Digest>,
    /// Trees read so far (each lookup walks the same few directories).
    trees: RefCell<HashMap<Digest, Rc<Tree>>>,
}

impl<'s> RootView<'s> {
    /// `layers` in OCI order: the base layer first.
    pub fn new(store: &'s Store, layers: &[Digest]) -> Self {
        RootView {
            store,
            layers: layers.iter().rev().copied().collect(),
            trees: RefCell::default(),
        }
    }

    /// What `path` names (absolute, or relative to `/`), following symlinks.
    pub fn lookup(&self, path: &str) -> Result<Option<Found>> {
        let mut pending: VecDeque<Vec<u8>> = components(path.as_bytes()).collect();
        let mut resolved: Vec<PathComponent> = Vec::new();
        let mut hops = 0;
        while let Some(part) = pending.pop_front() {
            match part.as_slice() {
                b"." => continue,
                b".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            let Ok(name) = PathComponent::new(part) else { return Ok(None) };
            let node = match self.entry(&resolved, &name)? {
                None => return Ok(None),
                Some(node) => node,
            };
            match node {
                Node::Dir(_) => resolved.push(name),
                Node::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_SYMLINKS {
                        return Ok(None);
                    }
                    let target = target.as_bytes();
                    if target.starts_with(b"/") {
                        resolved.clear();
                    }
                    for (i, part) in components(target).enumerate() {
                        pending.insert(i, part);
                    }
                }
                Node::File(file) => {
                    return Ok(pending.is_empty().then_some(Found::File(file)));
                }
            }
        }
        Ok(Some(Found::Dir))
    }

    /// The contents of the regular file at `path`, if there is one (files over
    /// 16 MiB count as absent: only small configuration files are read).
    pub fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let Some(Found::File(file)) = self.lookup(path)? else { return Ok(None) };
        if file.size() > MAX_READ {
            return Ok(None);
        }
        let mut bytes = Vec::with_capacity(file.size() as usize);
        self.store.open_file(&file).read_to_end(&mut bytes).map_err(|e| {
            crate::store::StoreError::Io { action: "read", path: path.into(), source: e }
        })?;
        Ok(Some(bytes))
    }

    /// The entry `name` in the merged directory `dir` (already resolved, so
    /// every component is a directory in the topmost layer holding it).
    fn entry(&self, dir: &[PathComponent], name: &PathComponent) -> Result<Option<Node>> {
        for tree in self.merged_dir(dir)? {
            if let Some(node) = self.tree(&tree)?.get(name) {
                return Ok(Some(node.clone()));
            }
        }
        Ok(None)
    }

    fn tree(&self, digest: &Digest) -> Result<Rc<Tree>> {
        if let Some(tree) = self.trees.borrow().get(digest) {
            return Ok(Rc::clone(tree));
        }
        let tree = Rc::new(self.store.read_tree(digest)?);
        self.trees.borrow_mut().insert(*digest, Rc::clone(&tree));
        Ok(tree)
    }

    /// The trees that make up the merged directory `dir`, topmost first.
    fn merged_dir(&self, dir: &[PathComponent]) -> Result<Vec<Digest>> {
        let mut stack = self.layers.clone();
        for name in dir {
            let mut next = Vec::new();
            for tree in &stack {
                match self.tree(tree)?.get(name) {
                    Some(Node::Dir(child)) => next.push(child.digest),
                    // A non-directory hides the directories below it.
                    Some(_) => break,
                    None => {}
                }
            }
            stack = next;
        }
        Ok(stack)
    }
}

/// The non-empty `/`-separated components of `path`.
fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/').filter(|p| !p.is_empty()).map(<[u8]>::to_vec)
}
