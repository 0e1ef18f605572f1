//! A no-op rebuild of a 20-package recipe: everything is already in the
//! store, so `pkg build` only loads the recipe, plans, ingests (hashes) each
//! package's source, resolves tools, computes keys and finds every output.
//! Target: ≤ 50 ms. Measured as the library does it for the CLI, recipe load
//! and tool resolution included (process start is not).

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use pkg::build::{BuildContext, BuildOptions, Quiet, build};
use pkg::graph::{BuildGraph, Selection};
use pkg::platform::Platform;
use pkg::store::Store;
use pkg::tool::HostTools;

const PACKAGES: usize = 20;

fn caller_ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u32 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

/// 20 script packages in a chain of build dependencies every fifth package,
/// each with a small source directory of 10 files.
fn write_recipe(dir: &Path) {
    let mut kdl = String::new();
    for i in 0..PACKAGES {
        let src = dir.join(format!("p{i}"));
        std::fs::create_dir_all(&src).unwrap();
        for f in 0..10 {
            std::fs::write(src.join(format!("f{f}.txt")), format!("package {i} file {f}\n"))
                .unwrap();
        }
        kdl.push_str(&format!(
            "package \"p{i}\" {{\n  source path=\"p{i}\"\n  build \"script\" {{ run \"mkdir -p $out/share && cp f0.txt $out/share/p{i}\"; }}\n"
        ));
        if i % 5 != 0 {
            kdl.push_str(&format!("  build-depends \"p{}\"\n", i - 1));
        }
        kdl.push_str("}\n");
    }
    let contents: Vec<String> = (0..PACKAGES).map(|i| format!("\"p{i}\"")).collect();
    kdl.push_str(&format!("image \"all\" {{ contents {}; }}\n", contents.join(" ")));
    std::fs::write(dir.join("pkg.kdl"), kdl).unwrap();
}

fn run_once(dir: &Path, store: &Store) -> usize {
    let recipe = pkg::recipe::load(&dir.join("pkg.kdl")).unwrap();
    let graph = BuildGraph::plan(&recipe, &Selection::all(Platform::host())).unwrap();
    let tools = HostTools::new(Some("/usr/bin:/bin".into()));
    let (uid, gid) = caller_ids();
    let ctx = BuildContext {
        recipe: &recipe,
        graph: &graph,
        store,
        tools: &tools,
        observer: &Quiet,
        options: BuildOptions { uid, gid, jobs: 2, offline: true, check: false },
    };
    build(&ctx).unwrap().cache_hits()
}

fn noop_rebuild(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    write_recipe(dir.path());
    let store = Store::open(&dir.path().join("store")).unwrap();
    run_once(dir.path(), &store);
    assert_eq!(run_once(dir.path(), &store), PACKAGES, "the second build must be all cache hits");
    c.bench_function("build/noop_rebuild_20_packages", |b| {
        b.iter(|| assert_eq!(run_once(dir.path(), &store), PACKAGES))
    });
}

criterion_group!(benches, noop_rebuild);
criterion_main!(benches);
