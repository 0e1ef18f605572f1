//! `pkg build --check`: which files differ between two output trees.
//!
//! Two trees are compared entry by entry over their whole walk; the result
//! names every path that is missing on one side or differs in kind,
//! content, permission bits or symlink target, in path order.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::digest::Digest;
use crate::store::{Node, Store, StoreError};

/// What identifies one entry for comparison.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File { content: Digest, mode: u32 },
    Symlink(Vec<u8>),
    Dir { mode: u32 },
}

fn entries(store: &Store, tree: &Digest) -> Result<BTreeMap<PathBuf, Entry>, StoreError> {
    let mut map = BTreeMap::new();
    for entry in store.walk(tree) {
        let entry = entry?;
        let value = match &entry.node {
            Node::File(f) => {
                Entry::File { content: f.content_digest(), mode: f.permissions().bits() }
            }
            Node::Symlink(t) => Entry::Symlink(t.as_bytes().to_vec()),
            Node::Dir(d) => Entry::Dir { mode: d.permissions.bits() },
        };
        map.insert(entry.path, value);
    }
    Ok(map)
}

/// Every path that differs between the trees `a` and `b`, each with why.
pub fn differences(store: &Store, a: &Digest, b: &Digest) -> Result<Vec<String>, StoreError> {
    if a == b {
        return Ok(Vec::new());
    }
    let (left, right) = (entries(store, a)?, entries(store, b)?);
    let mut out = Vec::new();
    for (path, l) in &left {
        match right.get(path) {
            None => out.push(format!("{}: only in the stored output", path.display())),
            Some(r) if r != l => {
                let why = match (l, r) {
                    (Entry::File { content: c1, .. }, Entry::File { content: c2, .. })
                        if c1 != c2 =>
                    {
                        "content differs"
                    }
                    (Entry::File { .. }, Entry::File { .. })
                    | (Entry::Dir { .. }, Entry::Dir { .. }) => "permissions differ",
                    (Entry::Symlink(_), Entry::Symlink(_)) => "symlink target differs",
                    _ => "kind differs",
                };
                out.push(format!("{}: {why}", path.display()));
            }
            Some(_) => {}
        }
    }
    for path in right.keys().filter(|p| !left.contains_key(*p)) {
        out.push(format!("{}: only in the rebuilt output", path.display()));
    }
    Ok(out)
}
