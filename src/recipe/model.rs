//! The typed recipe model: what a set of KDL files means once decoded and checked.
//!
//! The model does not depend on KDL. Each item keeps the [`Span`] of the text it
//! came from so later stages (resolution, builds) can point at the recipe when
//! they fail. Invariants once a [`Recipe`] is returned by [`super::load()`]:
//! package and image names are unique and valid (letters, digits and `._-+`;
//! image names may have `/`-separated parts), every `depends`,
//! `build-depends` and `contents` name refers to a package, the dependency
//! graph is acyclic, and every platform string parsed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::platform::Platform;

/// Index of a loaded file in a [`SourceMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId(pub(crate) u32);

/// A byte range in one loaded file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Span {
    pub file: FileId,
    pub offset: usize,
    pub len: usize,
}

/// A value together with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Span) -> Self {
        Spanned { value, span }
    }
}

/// One recipe file as read from disk.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as pkg opened it (the user's path joined with import paths, normalised).
    pub path: PathBuf,
    pub text: std::sync::Arc<String>,
}

/// Every file a recipe was loaded from, indexed by [`FileId`].
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

impl SourceMap {
    pub(crate) fn add(&mut self, file: SourceFile) -> FileId {
        self.files.push(file);
        FileId(u32::try_from(self.files.len() - 1).expect("fewer than 2^32 recipe files"))
    }

    pub fn get(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }

    /// `file:line:column` (1-based) of a span, for messages that cannot underline it.
    pub fn location(&self, span: Span) -> String {
        let file = self.get(span.file);
        let before = &file.text[..span.offset.min(file.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("{}:{line}:{column}", file.path.display())
    }
}

/// A loaded and checked recipe: packages and images from a root file and its imports.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub sources: SourceMap,
    /// Packages by name.
    pub packages: BTreeMap<String, Package>,
    /// Images by name.
    pub images: BTreeMap<String, Image>,
}

/// A package: how to build one output tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Package {
    pub name: Spanned<String>,
    pub version: Option<String>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub source: Option<Spanned<Source>>,
    pub build: Spanned<Builder>,
    /// Build environment added to the sandbox's fixed set, by variable name.
    pub env: BTreeMap<String, String>,
    /// Runtime dependencies: they join every image that contains this package.
    pub depends: Vec<Spanned<String>>,
    /// Build-time dependencies: mounted read-only while this package builds.
    pub build_depends: Vec<Spanned<String>>,
    /// Host programs the build may run.
    pub tools: Vec<Spanned<String>>,
}

/// Where a package's source comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Source {
    /// A local file or directory, hashed by content.
    Path {
        /// As written: relative to the recipe file's directory, or absolute
        /// ([`super::Recipe::source_path`] resolves it).
        path: PathBuf,
        /// Glob patterns of paths to leave out, besides `.git` and `target`.
        exclude: Vec<String>,
    },
    /// A pinned archive.
    Url { url: String, sha256: String },
}

/// A builder and its options.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Builder {
    Files { install: Vec<Install> },
    Script { run: Vec<String> },
    Cc { sources: Vec<String>, output: Option<String>, cflags: Vec<String>, ldflags: Vec<String> },
    Go { main: String, output: Option<String>, ldflags: Option<String>, tags: Vec<String> },
    Cargo { bin: Option<String>, features: Vec<String> },
}

impl Builder {
    /// The builder names a recipe may use.
    pub const NAMES: [&'static str; 5] = ["files", "script", "cc", "go", "cargo"];

    pub fn name(&self) -> &'static str {
        match self {
            Builder::Files { .. } => "files",
            Builder::Script { .. } => "script",
            Builder::Cc { .. } => "cc",
            Builder::Go { .. } => "go",
            Builder::Cargo { .. } => "cargo",
        }
    }
}

/// One `install SRC DST` line of the `files` builder.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Install {
    /// Relative to the source; a trailing `/` copies a directory recursively.
    pub from: String,
    /// Absolute path in the output.
    pub to: String,
    /// Permission bits; `None` keeps the source file's.
    pub mode: Option<u32>,
}

/// An image: the contents and runtime configuration of an OCI image.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub name: Spanned<String>,
    pub contents: Vec<Spanned<String>>,
    /// Empty means "the default platform" chosen by the caller.
    pub platforms: Vec<Spanned<Platform>>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub expose: Vec<Port>,
    pub labels: BTreeMap<String, String>,
    pub compression: Compression,
    /// Seconds since the Unix epoch stamped as the image's creation time.
    pub created: Option<i64>,
}

/// An exposed port, `8080/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Port {
    pub number: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        };
        write!(f, "{}/{proto}", self.number)
    }
}

/// Layer compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
}
