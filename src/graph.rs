//! The build graph: which packages to build for which platforms, in what order,
//! and which packages make up each image.
//!
//! A node is a (package, platform) pair. Nodes are stored in topological order:
//! every node comes after all the nodes it depends on (through `depends` or
//! `build-depends`), so a builder can walk them front to back. Order is fully
//! determined by the recipe (images by name, then platforms and dependency lists
//! as written), never by hashing or discovery order.

use std::collections::{BTreeSet, HashMap};

use crate::platform::Platform;
use crate::recipe::{Package, Recipe};

/// Index of a node in [`BuildGraph::nodes`].
pub type NodeId = usize;

/// One package built for one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildNode {
    pub package: String,
    pub platform: Platform,
    /// Direct runtime dependencies (`depends`).
    pub runtime: Vec<NodeId>,
    /// Direct build dependencies (`build-depends`).
    pub build: Vec<NodeId>,
}

/// One image on one platform and the packages it contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTarget {
    pub image: String,
    pub platform: Platform,
    /// The runtime closure of the image's contents, dependencies before dependents.
    pub closure: Vec<NodeId>,
}

/// What to plan: which images, for which platforms.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Only these images; all images when `None`.
    pub images: Option<Vec<String>>,
    /// Replaces every image's `platforms` when not empty (`--platform`).
    pub platforms: Vec<Platform>,
    /// Used for images that name no platforms.
    pub default_platform: Platform,
}

impl Selection {
    /// Every image, each for its own platforms or the default one.
    pub fn all(default_platform: Platform) -> Self {
        Selection { images: None, platforms: Vec::new(), default_platform }
    }
}

/// Why a graph cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("no image named `{name}` in the recipe")]
    UnknownImage { name: String, available: Vec<String> },
}

/// Packages × platforms in build order, and the images made of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildGraph {
    pub nodes: Vec<BuildNode>,
    pub images: Vec<ImageTarget>,
}

impl BuildGraph {
    /// Plans the nodes that the selected images need.
    pub fn plan(recipe: &Recipe, selection: &Selection) -> Result<BuildGraph, GraphError> {
        let names: Vec<&String> = match &selection.images {
            None => recipe.images.keys().collect(),
            Some(wanted) => wanted
                .iter()
                .map(|name| {
                    recipe.images.get_key_value(name).map(|(k, _)| k).ok_or_else(|| {
                        GraphError::UnknownImage {
                            name: name.clone(),
                            available: recipe.images.keys().cloned().collect(),
                        }
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let mut planner = Planner::new(recipe);
        for name in names {
            let image = &recipe.images[name];
            let platforms: Vec<Platform> = if !selection.platforms.is_empty() {
                selection.platforms.clone()
            } else if image.platforms.is_empty() {
                vec![selection.default_platform]
            } else {
                image.platforms.iter().map(|p| p.value).collect()
            };
            for platform in platforms {
                let roots: Vec<NodeId> =
                    image.contents.iter().map(|c| planner.node(&c.value, &platform)).collect();
                let closure = planner.graph.runtime_closure(&roots);
                planner.graph.images.push(ImageTarget { image: name.clone(), platform, closure });
            }
        }
        Ok(planner.graph)
    }

    /// Every package of a recipe for one platform, whether or not an image uses it.
    pub fn plan_all_packages(recipe: &Recipe, platform: &Platform) -> BuildGraph {
        let mut planner = Planner::new(recipe);
        for name in recipe.packages.keys() {
            planner.node(name, platform);
        }
        planner.graph
    }

    /// `roots` and everything they depend on at runtime, dependencies first,
    /// each once. The node order is already topological, so sorting by id
    /// gives a deterministic dependencies-first order.
    pub fn runtime_closure(&self, roots: &[NodeId]) -> Vec<NodeId> {
        self.closure(roots, |n| &n.runtime)
    }

    /// What a build of `node` mounts: its build dependencies and their runtime closures.
    pub fn build_inputs(&self, node: NodeId) -> Vec<NodeId> {
        self.runtime_closure(&self.nodes[node].build)
    }

    fn closure<'a>(
        &'a self,
        roots: &[NodeId],
        next: impl Fn(&'a BuildNode) -> &'a Vec<NodeId>,
    ) -> Vec<NodeId> {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<NodeId> = roots.to_vec();
        while let Some(id) = stack.pop() {
            if seen.insert(id) {
                stack.extend(next(&self.nodes[id]).iter().copied());
            }
        }
        seen.into_iter().collect()
    }
}

/// Plans nodes over dense package indices: names are resolved once, so
/// planning compares integers, not strings.
struct Planner<'r> {
    /// Packages in name order; a package's index is its position.
    packages: Vec<(&'r str, &'r Package)>,
    /// Each package's (runtime, build) dependencies as indices.
    edges: Vec<(Vec<usize>, Vec<usize>)>,
    /// Platforms seen so far; a platform's index is its position.
    platforms: Vec<Platform>,
    /// `index[platform][package]`: the node, once planned.
    index: Vec<Vec<Option<NodeId>>>,
    graph: BuildGraph,
}

impl<'r> Planner<'r> {
    fn new(recipe: &'r Recipe) -> Self {
        let packages: Vec<(&'r str, &'r Package)> =
            recipe.packages.iter().map(|(name, p)| (name.as_str(), p)).collect();
        let ids: HashMap<&str, usize> =
            packages.iter().enumerate().map(|(i, (name, _))| (*name, i)).collect();
        // load() checked that every name resolves.
        let resolve = |names: &[crate::recipe::Spanned<String>]| -> Vec<usize> {
            names.iter().filter_map(|d| ids.get(d.value.as_str()).copied()).collect()
        };
        let edges = packages
            .iter()
            .map(|(_, p)| (resolve(&p.depends), resolve(&p.build_depends)))
            .collect();
        Planner {
            packages,
            edges,
            platforms: Vec::new(),
            index: Vec::new(),
            graph: BuildGraph::default(),
        }
    }

    fn package_index(&self, name: &str) -> usize {
        match self.packages.binary_search_by(|(n, _)| (*n).cmp(name)) {
            Ok(i) => i,
            Err(_) => unreachable!("load() checked that `{name}` is defined"),
        }
    }

    fn platform_index(&mut self, platform: Platform) -> usize {
        if let Some(i) = self.platforms.iter().position(|p| *p == platform) {
            return i;
        }
        self.platforms.push(platform);
        self.index.push(vec![None; self.packages.len()]);
        self.platforms.len() - 1
    }

    /// The node of `package` on `platform`, adding it and its dependencies
    /// (post-order, so dependencies get smaller ids) if absent. The recipe is
    /// acyclic and every name resolves: [`crate::recipe::load`] checked both.
    fn node(&mut self, package: &str, platform: &Platform) -> NodeId {
        let package = self.package_index(package);
        let platform = self.platform_index(*platform);
        self.node_at(package, platform)
    }

    fn node_at(&mut self, package: usize, platform: usize) -> NodeId {
        if let Some(id) = self.index[platform][package] {
            return id;
        }
        let mut runtime = Vec::with_capacity(self.edges[package].0.len());
        for k in 0..self.edges[package].0.len() {
            let dep = self.edges[package].0[k];
            runtime.push(self.node_at(dep, platform));
        }
        let mut build = Vec::with_capacity(self.edges[package].1.len());
        for k in 0..self.edges[package].1.len() {
            let dep = self.edges[package].1[k];
            build.push(self.node_at(dep, platform));
        }
        let id = self.graph.nodes.len();
        self.graph.nodes.push(BuildNode {
            package: self.packages[package].0.to_string(),
            platform: self.platforms[platform],
            runtime,
            build,
        });
        self.index[platform][package] = Some(id);
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::load_str;
    use std::path::Path;

    const RECIPE: &str = r#"
        package "app" { build "script" { run "true" }; depends "lib" "certs"; build-depends "zlib" }
        package "lib" { build "script" { run "true" }; depends "certs" }
        package "certs" { build "script" { run "true" } }
        package "zlib" { build "script" { run "true" }; depends "zdata" }
        package "zdata" { build "script" { run "true" } }
        package "unused" { build "script" { run "true" } }
        image "app" { contents "app"; platforms "linux/amd64" "linux/arm64" }
        image "certs" { contents "certs" }
    "#;

    fn graph() -> BuildGraph {
        let recipe = load_str(Path::new("pkg.kdl"), RECIPE).unwrap();
        BuildGraph::plan(&recipe, &Selection::all(Platform::linux_amd64())).unwrap()
    }

    #[test]
    fn nodes_are_topological() {
        let g = graph();
        for (id, node) in g.nodes.iter().enumerate() {
            assert!(node.runtime.iter().chain(&node.build).all(|&d| d < id), "{node:?}");
        }
        // app × 2 platforms: 5 packages each; `certs` image reuses amd64 certs; `unused` is not planned.
        assert_eq!(g.nodes.len(), 10);
        assert!(g.nodes.iter().all(|n| n.package != "unused"));
    }

    #[test]
    fn image_closure_is_runtime_only() {
        let g = graph();
        let app = &g.images[0];
        let names: Vec<&str> = app.closure.iter().map(|&i| g.nodes[i].package.as_str()).collect();
        assert_eq!(names, ["certs", "lib", "app"]);
        assert_eq!(
            g.images.iter().map(|t| t.platform.to_string()).collect::<Vec<_>>(),
            ["linux/amd64", "linux/arm64", "linux/amd64"]
        );
    }

    #[test]
    fn build_inputs_include_runtime_closure_of_build_deps() {
        let g = graph();
        let app = g.nodes.iter().position(|n| n.package == "app").unwrap();
        let names: Vec<&str> =
            g.build_inputs(app).iter().map(|&i| g.nodes[i].package.as_str()).collect();
        assert_eq!(names, ["zdata", "zlib"]);
    }

    #[test]
    fn platform_override_and_selection() {
        let recipe = load_str(Path::new("pkg.kdl"), RECIPE).unwrap();
        let sel = Selection {
            images: Some(vec!["app".into()]),
            platforms: vec!["linux/arm64".parse().unwrap()],
            default_platform: Platform::linux_amd64(),
        };
        let g = BuildGraph::plan(&recipe, &sel).unwrap();
        assert_eq!(g.images.len(), 1);
        assert!(g.nodes.iter().all(|n| n.platform.to_string() == "linux/arm64"));
        let bad = Selection { images: Some(vec!["nope".into()]), ..sel };
        assert!(matches!(BuildGraph::plan(&recipe, &bad), Err(GraphError::UnknownImage { .. })));
    }
}
