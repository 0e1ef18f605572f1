//! Trees: the directory model of the store and its one canonical encoding.
//!
//! A [`Tree`] is a `BTreeMap<PathComponent, Node>`, so its entries are sorted by
//! name bytes and unique by construction. A [`PathComponent`] can never be `""`,
//! `.`, `..`, or contain `/` or NUL. A node is a [`FileNode`] (content chunks,
//! size, permission bits), a symlink (its target bytes) or a [`DirNode`] (the
//! digest of the child tree, permission bits). There are no owners and no times:
//! those are image-assembly parameters.
//!
//! Invariants a reader must keep:
//! - The encoding is versioned ([`FORMAT_VERSION`]) and canonical: [`Tree::encode`]
//!   is a pure function of the tree, and [`Tree::decode`] accepts exactly the
//!   byte strings `encode` produces (sorted unique names, sizes that add up, no
//!   trailing bytes), so `decode(b)` succeeding implies `encode(decode(b)) == b`.
//! - The tree digest is the blake3 of the encoding ([`Tree::digest`]).
//! - Permission bits are the low 12 mode bits minus setuid and setgid, which the
//!   store refuses everywhere ([`Permissions`]).
//!
//! The encoding is written by hand rather than through postcard/serde: it is
//! the hash input for every build key and image, so it must not move when a
//! dependency or a `derive` changes, and it is small enough to read in full
//! below. All integers are little-endian.
//!
//! ```text
//! tree    = MAGIC version:u8 count:u32 entry*
//! entry   = name_len:u32 name kind:u8 body
//! file    = kind 0: perm:u16 size:u64 chunk_count:u32 (digest:[u8;32] len:u32)*
//! symlink = kind 1: target_len:u32 target
//! dir     = kind 2: perm:u16 digest:[u8;32]
//! ```

use std::collections::BTreeMap;
use std::fmt;

use crate::digest::Digest;

/// Leading bytes of every encoded tree.
pub const MAGIC: &[u8; 8] = b"pkgtree\0";
/// The version of the encoding written by this code.
pub const FORMAT_VERSION: u8 = 1;

/// One name inside a directory: non-empty, not `.` or `..`, no `/`, no NUL.
///
/// Names are bytes, as on Unix; they need not be UTF-8.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathComponent(Vec<u8>);

/// Why a name or a tree is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid permission bits {bits:#o}: {reason}")]
    InvalidPermissions { bits: u32, reason: &'static str },
    #[error("invalid symlink target {target:?}: {reason}")]
    InvalidSymlink { target: String, reason: &'static str },
    #[error("file size {size} does not match the sum of its chunk sizes {sum}")]
    SizeMismatch { size: u64, sum: u64 },
    #[error("a file chunk has length zero")]
    EmptyChunk,
    #[error("not a tree: bad magic bytes")]
    BadMagic,
    #[error("tree format version {0} is not supported (this pkg reads version {FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    #[error("tree encoding ends early")]
    Truncated,
    #[error("tree encoding has {0} bytes after its last entry")]
    TrailingBytes(usize),
    #[error("unknown node kind {0}")]
    UnknownKind(u8),
    #[error("tree entries are not sorted and unique at {0:?}")]
    Unsorted(String),
}

impl PathComponent {
    /// Validates `bytes` as a single name.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, TreeError> {
        let bytes = bytes.into();
        let reason = match bytes.as_slice() {
            b"" => Some("names cannot be empty"),
            b"." | b".." => Some("names cannot be `.` or `..`"),
            b if b.contains(&b'/') => Some("names cannot contain `/`"),
            b if b.contains(&0) => Some("names cannot contain NUL"),
            _ => None,
        };
        match reason {
            Some(reason) => Err(TreeError::InvalidName {
                name: String::from_utf8_lossy(&bytes).into_owned(),
                reason,
            }),
            None => Ok(PathComponent(bytes)),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name as an `OsStr`, for joining onto filesystem paths.
    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }
}

impl TryFrom<&str> for PathComponent {
    type Error = TreeError;
    fn try_from(s: &str) -> Result<Self, TreeError> {
        PathComponent::new(s.as_bytes())
    }
}

impl TryFrom<&std::ffi::OsStr> for PathComponent {
    type Error = TreeError;
    fn try_from(s: &std::ffi::OsStr) -> Result<Self, TreeError> {
        use std::os::unix::ffi::OsStrExt;
        PathComponent::new(s.as_bytes())
    }
}

impl fmt::Display for PathComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for PathComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(&self.0), f)
    }
}

/// Permission bits of a file or directory: `rwx` for user, group, other and the
/// sticky bit. Setuid and setgid are refused: a store tree never grants privilege.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Permissions(u16);

impl Permissions {
    /// Bits a tree may hold: `0o1777`.
    pub const ALLOWED: u32 = 0o1777;
    /// Setuid and setgid.
    pub const PRIVILEGED: u32 = 0o6000;

    /// Validates the permission part of a mode; file-type bits must already be masked off.
    pub fn new(bits: u32) -> Result<Self, TreeError> {
        if bits & Self::PRIVILEGED != 0 {
            return Err(TreeError::InvalidPermissions {
                bits,
                reason: "setuid and setgid are refused",
            });
        }
        if bits & !Self::ALLOWED != 0 {
            return Err(TreeError::InvalidPermissions { bits, reason: "not permission bits" });
        }
        Ok(Permissions(bits as u16))
    }

    pub const fn bits(self) -> u32 {
        self.0 as u32
    }

    /// Whether any execute bit is set.
    pub const fn is_executable(self) -> bool {
        self.0 & 0o111 != 0
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#o}", self.0)
    }
}

/// One content-defined chunk of a file: the blob that holds it and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub digest: Digest,
    pub size: u32,
}

/// A regular file: its content as a list of chunks, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileNode {
    chunks: Vec<Chunk>,
    size: u64,
    permissions: Permissions,
}

impl FileNode {
    /// A file made of `chunks`; their sizes must add up to `size` and none may be empty.
    pub fn new(chunks: Vec<Chunk>, size: u64, permissions: Permissions) -> Result<Self, TreeError> {
        if chunks.iter().any(|c| c.size == 0) {
            return Err(TreeError::EmptyChunk);
        }
        let sum = chunks.iter().map(|c| u64::from(c.size)).sum();
        if sum != size {
            return Err(TreeError::SizeMismatch { size, sum });
        }
        Ok(FileNode { chunks, size, permissions })
    }

    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn permissions(&self) -> Permissions {
        self.permissions
    }

    /// A digest naming this file's content (not its permissions): the blake3 of
    /// its chunk list. Two files with equal bytes have equal chunk lists, since
    /// chunking is a pure function of the bytes, and so equal content digests.
    pub fn content_digest(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"pkgfile\0");
        h.update(&self.size.to_le_bytes());
        for c in &self.chunks {
            h.update(c.digest.as_bytes());
            h.update(&c.size.to_le_bytes());
        }
        h.finalize().into()
    }
}

/// A symbolic link: its target, stored verbatim (non-empty, no NUL).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SymlinkTarget(Vec<u8>);

impl SymlinkTarget {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, TreeError> {
        let bytes = bytes.into();
        let reason = if bytes.is_empty() {
            Some("targets cannot be empty")
        } else if bytes.contains(&0) {
            Some("targets cannot contain NUL")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(TreeError::InvalidSymlink {
                target: String::from_utf8_lossy(&bytes).into_owned(),
                reason,
            }),
            None => Ok(SymlinkTarget(bytes)),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }
}

impl fmt::Debug for SymlinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(&self.0), f)
    }
}

/// A subdirectory: the digest of its tree and its permission bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirNode {
    pub digest: Digest,
    pub permissions: Permissions,
}

/// One entry of a tree.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Node {
    File(FileNode),
    Symlink(SymlinkTarget),
    Dir(DirNode),
}

/// A directory: names mapped to nodes, sorted by name bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub entries: BTreeMap<PathComponent, Node>,
}

impl Tree {
    pub fn new() -> Self {
        Tree::default()
    }

    pub fn insert(&mut self, name: PathComponent, node: Node) -> Option<Node> {
        self.entries.insert(name, node)
    }

    pub fn get(&self, name: &PathComponent) -> Option<&Node> {
        self.entries.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PathComponent, &Node)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The canonical encoding (see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.entries.len() * 64);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        put_u32(&mut out, self.entries.len());
        for (name, node) in &self.entries {
            put_u32(&mut out, name.0.len());
            out.extend_from_slice(&name.0);
            match node {
                Node::File(f) => {
                    out.push(0);
                    out.extend_from_slice(&f.permissions.0.to_le_bytes());
                    out.extend_from_slice(&f.size.to_le_bytes());
                    put_u32(&mut out, f.chunks.len());
                    for c in &f.chunks {
                        out.extend_from_slice(c.digest.as_bytes());
                        out.extend_from_slice(&c.size.to_le_bytes());
                    }
                }
                Node::Symlink(t) => {
                    out.push(1);
                    put_u32(&mut out, t.0.len());
                    out.extend_from_slice(&t.0);
                }
                Node::Dir(d) => {
                    out.push(2);
                    out.extend_from_slice(&d.permissions.0.to_le_bytes());
                    out.extend_from_slice(d.digest.as_bytes());
                }
            }
        }
        out
    }

    /// The tree digest: blake3 of [`Tree::encode`].
    pub fn digest(&self) -> Digest {
        Digest::of(&self.encode())
    }

    /// Parses a canonical encoding, rejecting anything `encode` would not produce.
    pub fn decode(bytes: &[u8]) -> Result<Self, TreeError> {
        let mut r = Reader(bytes);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(TreeError::BadMagic);
        }
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(TreeError::UnsupportedVersion(version));
        }
        let count = r.u32()?;
        let mut entries = BTreeMap::new();
        let mut last: Option<PathComponent> = None;
        for _ in 0..count {
            let len = r.u32()? as usize;
            let name = PathComponent::new(r.take(len)?)?;
            if last.as_ref().is_some_and(|l| *l >= name) {
                return Err(TreeError::Unsorted(name.to_string()));
            }
            let node = match r.u8()? {
                0 => {
                    let permissions = Permissions::new(u32::from(r.u16()?))?;
                    let size = r.u64()?;
                    let n = r.u32()? as usize;
                    // Each chunk takes 36 bytes: refuse counts the input cannot hold
                    // before allocating for them.
                    if n > r.0.len() / 36 {
                        return Err(TreeError::Truncated);
                    }
                    let mut chunks = Vec::with_capacity(n);
                    for _ in 0..n {
                        let digest = Digest::from_bytes(r.array()?);
                        let size = r.u32()?;
                        chunks.push(Chunk { digest, size });
                    }
                    Node::File(FileNode::new(chunks, size, permissions)?)
                }
                1 => {
                    let len = r.u32()? as usize;
                    Node::Symlink(SymlinkTarget::new(r.take(len)?)?)
                }
                2 => {
                    let permissions = Permissions::new(u32::from(r.u16()?))?;
                    Node::Dir(DirNode { permissions, digest: Digest::from_bytes(r.array()?) })
                }
                k => return Err(TreeError::UnknownKind(k)),
            };
            last = Some(name.clone());
            entries.insert(name, node);
        }
        if !r.0.is_empty() {
            return Err(TreeError::TrailingBytes(r.0.len()));
        }
        Ok(Tree { entries })
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("tree lengths fit in u32");
    out.extend_from_slice(&n.to_le_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TreeError> {
        if self.0.len() < n {
            return Err(TreeError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], TreeError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }
    fn u8(&mut self) -> Result<u8, TreeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, TreeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, TreeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, TreeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> PathComponent {
        PathComponent::try_from(s).unwrap()
    }

    fn sample() -> Tree {
        let mut t = Tree::new();
        let chunk = Chunk { digest: Digest::of(b"hi"), size: 2 };
        let perm = Permissions::new(0o755).unwrap();
        t.insert(name("b"), Node::File(FileNode::new(vec![chunk], 2, perm).unwrap()));
        t.insert(name("a"), Node::Symlink(SymlinkTarget::new(&b"../x"[..]).unwrap()));
        t.insert(name("ç"), Node::Dir(DirNode { digest: Tree::new().digest(), permissions: perm }));
        t.insert(name("e"), Node::File(FileNode::new(vec![], 0, perm).unwrap()));
        t
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", ".", "..", "a/b", "/", "a\0b"] {
            assert!(PathComponent::try_from(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "...", ".git", "é", " "] {
            assert!(PathComponent::try_from(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn permissions_refuse_privilege() {
        assert!(Permissions::new(0o4755).is_err());
        assert!(Permissions::new(0o2755).is_err());
        assert!(Permissions::new(0o10644).is_err());
        assert!(Permissions::new(0o1777).is_ok());
    }

    #[test]
    fn encoding_round_trips_and_is_canonical() {
        let t = sample();
        let bytes = t.encode();
        assert_eq!(Tree::decode(&bytes).unwrap(), t);
        assert_eq!(Tree::decode(&bytes).unwrap().encode(), bytes);
        assert_eq!(t.digest(), Digest::of(&bytes));
        let names: Vec<_> = t.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, ["a", "b", "e", "ç"]);
    }

    #[test]
    fn decode_rejects_non_canonical_bytes() {
        let bytes = sample().encode();
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(Tree::decode(&trailing), Err(TreeError::TrailingBytes(1)));
        assert_eq!(Tree::decode(&bytes[..bytes.len() - 1]), Err(TreeError::Truncated));
        let mut version = bytes.clone();
        version[8] = 9;
        assert_eq!(Tree::decode(&version), Err(TreeError::UnsupportedVersion(9)));
        // Swap the names "a" and "b" (both one byte): order is then wrong.
        let mut unsorted = bytes.clone();
        let a = unsorted.iter().position(|&b| b == b'a').unwrap();
        let b = unsorted.iter().position(|&b| b == b'b').unwrap();
        unsorted.swap(a, b);
        assert!(matches!(Tree::decode(&unsorted), Err(TreeError::Unsorted(_))));
    }

    #[test]
    fn file_sizes_must_add_up() {
        let perm = Permissions::new(0o644).unwrap();
        let chunk = Chunk { digest: Digest::of(b"x"), size: 1 };
        assert!(FileNode::new(vec![chunk], 2, perm).is_err());
        assert!(FileNode::new(vec![Chunk { size: 0, ..chunk }], 0, perm).is_err());
    }
}
