//! `pkg graph`: print a recipe's build graph as an indented tree or Graphviz dot.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::{Settings, write_stdout};
use crate::graph::{BuildGraph, NodeId};
use crate::recipe::Recipe;

#[derive(Debug, Args)]
pub struct GraphArgs {
    #[command(flatten)]
    pub target: super::TargetArgs,
    /// Output format
    #[arg(long, value_enum, default_value_t = Format::Tree)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An indented tree per image, like `cargo tree`
    Tree,
    /// Graphviz dot (`pkg graph --format dot | dot -Tsvg`)
    Dot,
}

pub fn run(args: GraphArgs, _settings: &Settings) -> miette::Result<ExitCode> {
    let (recipe, graph) = args.target.load_and_plan()?;
    let text = match args.format {
        Format::Tree if args.target.images.is_empty() => render_tree(&recipe, &graph, true),
        Format::Tree => render_tree(&recipe, &graph, false),
        Format::Dot => render_dot(&recipe, &graph),
    };
    write_stdout(text.as_bytes())
}

fn label(recipe: &Recipe, name: &str) -> String {
    let package = &recipe.packages[name];
    match &package.version {
        Some(v) => format!("{name} {v} ({})", package.build.value.name()),
        None => format!("{name} ({})", package.build.value.name()),
    }
}

/// Images with their platforms, each content package with its dependencies
/// below it; a subtree already printed under the same image shows as `(*)`.
/// With `list_unused`, packages no image needs are listed at the end (only
/// meaningful when every image was planned).
pub fn render_tree(recipe: &Recipe, graph: &BuildGraph, list_unused: bool) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < graph.images.len() {
        let name = &graph.images[i].image;
        let same: Vec<_> = graph.images[i..].iter().take_while(|t| &t.image == name).collect();
        let platforms: Vec<String> = same.iter().map(|t| t.platform.to_string()).collect();
        let _ = writeln!(out, "image {name} [{}]", platforms.join(", "));
        // Contents are the same packages on every platform: print the tree of the first.
        let first = same[0];
        let roots: Vec<NodeId> = recipe.images[name]
            .contents
            .iter()
            .filter_map(|c| {
                first.closure.iter().copied().find(|&n| graph.nodes[n].package == c.value)
            })
            .collect();
        let mut printed = std::collections::HashSet::new();
        for (k, &root) in roots.iter().enumerate() {
            tree_node(recipe, graph, root, "", k + 1 == roots.len(), None, &mut printed, &mut out);
        }
        i += same.len();
    }
    let used: std::collections::HashSet<&str> =
        graph.nodes.iter().map(|n| n.package.as_str()).collect();
    let unused: Vec<&String> =
        recipe.packages.keys().filter(|p| !used.contains(p.as_str())).collect();
    if list_unused && !unused.is_empty() {
        let _ = writeln!(out, "not in any image:");
        for name in unused {
            let _ = writeln!(out, "  {}", label(recipe, name));
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn tree_node(
    recipe: &Recipe,
    graph: &BuildGraph,
    node: NodeId,
    prefix: &str,
    last: bool,
    relation: Option<&str>,
    printed: &mut std::collections::HashSet<NodeId>,
    out: &mut String,
) {
    let n = &graph.nodes[node];
    let branch = if last { "└── " } else { "├── " };
    let tag = relation.map(|r| format!("[{r}] ")).unwrap_or_default();
    let children: Vec<(NodeId, &str)> = n
        .runtime
        .iter()
        .map(|&c| (c, "runtime"))
        .chain(n.build.iter().map(|&c| (c, "build")))
        .collect();
    let repeat = !children.is_empty() && !printed.insert(node);
    let _ = writeln!(
        out,
        "{prefix}{branch}{tag}{}{}",
        label(recipe, &n.package),
        if repeat { " (*)" } else { "" }
    );
    if repeat {
        return;
    }
    let child_prefix = format!("{prefix}{}", if last { "    " } else { "│   " });
    for (k, &(child, relation)) in children.iter().enumerate() {
        tree_node(
            recipe,
            graph,
            child,
            &child_prefix,
            k + 1 == children.len(),
            Some(relation),
            printed,
            out,
        );
    }
}

/// A dot digraph: images as boxes, runtime edges solid, build edges dashed.
pub fn render_dot(recipe: &Recipe, graph: &BuildGraph) -> String {
    let mut out = String::from("digraph pkg {\n  rankdir=LR;\n  node [shape=ellipse];\n");
    let mut edges = std::collections::BTreeSet::new();
    let mut images = std::collections::BTreeSet::new();
    for target in &graph.images {
        images.insert(target.image.as_str());
        for content in &recipe.images[&target.image].contents {
            edges.insert((format!("image:{}", target.image), content.value.clone(), "contents"));
        }
    }
    for node in &graph.nodes {
        for &d in &node.runtime {
            edges.insert((node.package.clone(), graph.nodes[d].package.clone(), "runtime"));
        }
        for &d in &node.build {
            edges.insert((node.package.clone(), graph.nodes[d].package.clone(), "build"));
        }
    }
    for image in images {
        let _ = writeln!(
            out,
            "  {} [shape=box, label={}];",
            quote(&format!("image:{image}")),
            quote(&format!("image {image}"))
        );
    }
    let packages: std::collections::BTreeSet<&str> =
        graph.nodes.iter().map(|n| n.package.as_str()).collect();
    for p in packages {
        let _ = writeln!(out, "  {} [label={}];", quote(p), quote(&label(recipe, p)));
    }
    for (from, to, kind) in edges {
        let style = if kind == "build" { " [style=dashed, label=\"build\"]" } else { "" };
        let _ = writeln!(out, "  {} -> {}{style};", quote(&from), quote(&to));
    }
    out.push_str("}\n");
    out
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
