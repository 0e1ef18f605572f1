//! Loading a recipe: read the root file, follow imports, decode each file,
//! then check what only the whole set can show (duplicates, references,
//! dependency cycles, source paths on disk).
//!
//! Every file is read once, however many files import it. Paths in a file are
//! relative to that file's directory. All problems found are returned together.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::decode::decode_file;
use super::diagnostic::{Issue, Problem, RecipeError, did_you_mean};
use super::model::{FileId, Image, Package, Recipe, Source, SourceFile, SourceMap, Span, Spanned};

/// The file a RECIPE argument names: the path itself, or `pkg.kdl` inside a directory.
pub fn recipe_file(path: &Path) -> PathBuf {
    if path.is_dir() { path.join("pkg.kdl") } else { path.to_path_buf() }
}

/// Loads the recipe at `path` (a `.kdl` file or a directory holding `pkg.kdl`).
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    let root = normalize(&recipe_file(path));
    let text = read_recipe_file(&root)
        .map_err(|source| RecipeError::Read { path: root.clone(), source })?;
    let mut loader = Loader::default();
    loader.visit(root, text, &mut Vec::new());
    loader.finish()
}

/// Loads a recipe from text, as if read from `path` (which need not exist; source
/// paths still resolve against its directory). Imports are read from disk.
pub fn load_str(path: &Path, text: &str) -> Result<Recipe, RecipeError> {
    let mut loader = Loader::default();
    loader.visit(normalize(path), text.to_string(), &mut Vec::new());
    loader.finish()
}

#[derive(Default)]
struct Loader {
    sources: SourceMap,
    issues: Vec<Issue>,
    /// Files already loaded, by canonical path (or the given path when it has none).
    loaded: HashMap<PathBuf, FileId>,
    packages: Vec<Package>,
    images: Vec<Image>,
    /// Packages that failed to decode; referring to them is not another error.
    broken_packages: HashSet<String>,
}

impl Loader {
    /// Decodes one file and, depth first, the files it imports. `stack` holds
    /// the chain of files being imported, to detect cycles.
    fn visit(&mut self, path: PathBuf, text: String, stack: &mut Vec<(PathBuf, PathBuf)>) {
        let identity = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let file = self.sources.add(SourceFile { path: path.clone(), text: Arc::new(text) });
        self.loaded.insert(identity.clone(), file);
        let text = self.sources.get(file).text.clone();
        let items = decode_file(file, &text, &mut self.issues);
        stack.push((identity, path.clone()));
        for import in items.imports {
            let target = normalize(&path.parent().unwrap_or(Path::new("")).join(&import.value));
            let target_identity = std::fs::canonicalize(&target).unwrap_or_else(|_| target.clone());
            if let Some(start) = stack.iter().position(|(id, _)| *id == target_identity) {
                let chain: Vec<String> = stack[start..]
                    .iter()
                    .map(|(_, p)| p.display().to_string())
                    .chain(std::iter::once(target.display().to_string()))
                    .collect();
                self.issues.push(
                    Issue::new(Problem::ImportCycle(chain.join(" → ")), import.span, "imports a file that imports this one")
                        .help("remove one of these imports; a file's definitions are visible to every file once imported anywhere"),
                );
                continue;
            }
            if self.loaded.contains_key(&target_identity) {
                continue;
            }
            match read_recipe_file(&target) {
                Ok(text) => self.visit(target, text, stack),
                Err(e) => {
                    let dir = path.parent().map(|p| p.display().to_string()).unwrap_or_default();
                    self.issues.push(
                        Issue::new(
                            Problem::ImportNotFound {
                                path: target.display().to_string(),
                                reason: io_reason(&e),
                            },
                            import.span,
                            "imported here",
                        )
                        .help(format!(
                            "import paths are relative to the importing file's directory (`{}`)",
                            if dir.is_empty() { "." } else { &dir }
                        )),
                    );
                }
            }
        }
        stack.pop();
        self.packages.extend(items.packages);
        self.broken_packages.extend(items.broken_packages);
        self.images.extend(items.images);
    }

    fn finish(mut self) -> Result<Recipe, RecipeError> {
        let mut packages: BTreeMap<String, Package> = BTreeMap::new();
        for package in std::mem::take(&mut self.packages) {
            let name = package.name.value.clone();
            if let Some(first) = packages.get(&name) {
                let first = self.sources.location(first.name.span);
                self.issues.push(
                    Issue::new(
                        Problem::DuplicatePackage(name),
                        package.name.span,
                        "defined again here",
                    )
                    .help(format!("first defined at {first}; rename one of them")),
                );
            } else {
                self.check_source(&package);
                packages.insert(name, package);
            }
        }
        let mut images: BTreeMap<String, Image> = BTreeMap::new();
        for image in std::mem::take(&mut self.images) {
            let name = image.name.value.clone();
            if let Some(first) = images.get(&name) {
                let first = self.sources.location(first.name.span);
                self.issues.push(
                    Issue::new(
                        Problem::DuplicateImage(name),
                        image.name.span,
                        "defined again here",
                    )
                    .help(format!("first defined at {first}; rename one of them")),
                );
            } else {
                images.insert(name, image);
            }
        }
        self.check_references(&packages, &images);
        self.check_cycles(&packages);
        if !self.issues.is_empty() {
            return Err(RecipeError::invalid(&self.sources, self.issues));
        }
        Ok(Recipe { sources: self.sources, packages, images })
    }

    /// Resolves a `source path=` against its file and checks that it exists.
    fn check_source(&mut self, package: &Package) {
        let Some(Spanned { value: Source::Path { path, .. }, span }) = &package.source else {
            return;
        };
        let resolved = self.resolve(span.file, path);
        if !resolved.exists() {
            let dir = self
                .sources
                .get(span.file)
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            self.issues.push(
                Issue::new(
                    Problem::SourcePathMissing { path: resolved.display().to_string() },
                    *span,
                    "no such file or directory",
                )
                .help(format!(
                    "source paths are relative to the recipe file's directory (`{}`)",
                    if dir.as_os_str().is_empty() { ".".into() } else { dir.display().to_string() }
                )),
            );
        }
    }

    fn resolve(&self, file: FileId, path: &Path) -> PathBuf {
        let base = self.sources.get(file).path.parent().unwrap_or(Path::new(""));
        normalize(&base.join(path))
    }

    fn check_references(
        &mut self,
        packages: &BTreeMap<String, Package>,
        images: &BTreeMap<String, Image>,
    ) {
        let names: Vec<&str> = packages.keys().map(String::as_str).collect();
        let defined: HashSet<&str> = names.iter().copied().collect();
        let broken = std::mem::take(&mut self.broken_packages);
        let unknown = |name: &Spanned<String>, relation: &str, issues: &mut Vec<Issue>| {
            if defined.contains(name.value.as_str()) || broken.contains(&name.value) {
                return;
            }
            let help = did_you_mean(&name.value, names.iter().copied()).unwrap_or_else(|| {
                format!("define `package \"{}\"` or import the file that does", name.value)
            });
            issues.push(
                Issue::new(
                    Problem::UnknownPackage(name.value.clone()),
                    name.span,
                    format!("{relation} a package that is not defined"),
                )
                .help(help),
            );
        };
        for package in packages.values() {
            for dep in &package.depends {
                unknown(dep, "depends on", &mut self.issues);
            }
            for dep in &package.build_depends {
                unknown(dep, "build-depends on", &mut self.issues);
            }
        }
        for image in images.values() {
            for content in &image.contents {
                unknown(content, "contains", &mut self.issues);
            }
        }
    }

    /// Reports each cycle of `depends` ∪ `build-depends` once, at the edge that
    /// closes it. Iterative depth-first search over package indices, so long
    /// dependency chains cannot exhaust the stack.
    fn check_cycles(&mut self, packages: &BTreeMap<String, Package>) {
        let names: Vec<&str> = packages.keys().map(String::as_str).collect();
        let ids: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        // Each package's edges as (target index, span); unknown names are
        // check_references's business and are skipped here.
        let edges: Vec<Vec<(usize, Span)>> = packages
            .values()
            .map(|p| {
                p.depends
                    .iter()
                    .chain(&p.build_depends)
                    .filter_map(|d| ids.get(d.value.as_str()).map(|&i| (i, d.span)))
                    .collect()
            })
            .collect();
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Active,
            Done,
        }
        let mut marks = vec![Mark::New; names.len()];
        let mut found: Vec<(Vec<usize>, Span)> = Vec::new();
        for root in 0..names.len() {
            if marks[root] != Mark::New {
                continue;
            }
            // The current path, each with the index of its next edge to follow.
            let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
            marks[root] = Mark::Active;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                let Some(&(dep, span)) = edges[node].get(*next) else {
                    marks[node] = Mark::Done;
                    stack.pop();
                    continue;
                };
                *next += 1;
                match marks[dep] {
                    Mark::Active => {
                        let start = stack.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        let mut cycle: Vec<usize> =
                            stack[start..].iter().map(|(n, _)| *n).collect();
                        cycle.push(dep);
                        found.push((cycle, span));
                    }
                    Mark::Done => {}
                    Mark::New => {
                        marks[dep] = Mark::Active;
                        stack.push((dep, 0));
                    }
                }
            }
        }
        let mut seen = HashSet::new();
        for (cycle, span) in found {
            let mut members = cycle[..cycle.len() - 1].to_vec();
            members.sort_unstable();
            if seen.insert(members) {
                let path: Vec<&str> = cycle.iter().map(|&i| names[i]).collect();
                self.issues.push(
                    Issue::new(
                        Problem::DependencyCycle(path.join(" → ")),
                        span,
                        "this dependency closes the cycle",
                    )
                    .help("packages cannot depend on themselves, directly or through others; remove one of these dependencies"),
                );
            }
        }
    }
}

/// Recipes larger than this are refused rather than read into memory.
const MAX_RECIPE_BYTES: u64 = 16 << 20;

/// Reads a recipe file, refusing what is not a regular file (a FIFO or
/// `/dev/zero` would hang or exhaust memory) and files over [`MAX_RECIPE_BYTES`].
fn read_recipe_file(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(Error::new(ErrorKind::IsADirectory, "it is a directory"));
    }
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    if meta.len() > MAX_RECIPE_BYTES {
        return Err(Error::new(ErrorKind::InvalidData, "larger than 16 MiB"));
    }
    let mut text = String::new();
    file.take(MAX_RECIPE_BYTES + 1).read_to_string(&mut text)?;
    Ok(text)
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        std::io::ErrorKind::InvalidData if e.get_ref().is_none() => "not UTF-8 text".to_string(),
        _ => e.to_string(),
    }
}

/// Removes `.` and resolvable `..` components without touching the filesystem,
/// so messages show `recipes/common/x.kdl`, not `recipes/hello/../common/x.kdl`.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                let last_is_normal =
                    matches!(out.components().next_back(), Some(Component::Normal(_)));
                if last_is_normal {
                    out.pop();
                } else if !matches!(out.components().next_back(), Some(Component::RootDir)) {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_lexically() {
        assert_eq!(normalize(Path::new("a/./b/../c.kdl")), PathBuf::from("a/c.kdl"));
        assert_eq!(normalize(Path::new("../x/../../y")), PathBuf::from("../../y"));
        assert_eq!(normalize(Path::new("/../etc")), PathBuf::from("/etc"));
    }
}
