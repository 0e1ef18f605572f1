//! Parse a generated 2,000-package recipe, plan its graph and compute every
//! build key. Target (issue 2): under 50 ms on a 2-core machine.
//!
//! Tools resolve to fixed identities and outputs are derived from keys, so the
//! bench measures pkg's own work, not the disk or the host's toolchains.

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use pkg::digest::Digest;
use pkg::graph::{BuildGraph, Selection};
use pkg::key::{BuildKey, KeyInputs, Outputs, SourceIdentity};
use pkg::platform::Platform;
use pkg::tool::{ToolError, ToolIdentity, ToolResolver};

const PACKAGES: usize = 2_000;

/// A layered recipe: each package depends on up to three earlier ones at
/// runtime and one at build time; 20 images of 100 packages, two platforms each.
fn generate() -> String {
    let mut text = String::new();
    for i in 0..PACKAGES {
        let _ = writeln!(text, "package \"pkg-{i}\" version=\"1.{i}.0\" {{");
        let _ = writeln!(text, "    description \"generated package {i}\"");
        let _ = writeln!(
            text,
            "    build \"script\" {{\n        run \"mkdir -p $out/usr/share/{i}\"\n        run \"echo {i} > $out/usr/share/{i}/id\"\n    }}"
        );
        let _ = writeln!(text, "    env LEVEL=\"{}\"", i % 7);
        let deps: Vec<String> = [i / 2, i / 3, i.saturating_sub(1)]
            .iter()
            .filter(|&&d| d < i)
            .map(|d| format!("\"pkg-{d}\""))
            .collect();
        if !deps.is_empty() {
            let _ = writeln!(text, "    depends {}", deps.join(" "));
        }
        if i >= 10 {
            let _ = writeln!(text, "    build-depends \"pkg-{}\"", i / 10);
        }
        let _ = writeln!(text, "}}");
    }
    for img in 0..20 {
        let contents: Vec<String> =
            (0..100).map(|k| format!("\"pkg-{}\"", img * 100 + k)).collect();
        let _ = writeln!(
            text,
            "image \"img-{img}\" {{\n    contents {}\n    platforms \"linux/amd64\" \"linux/arm64\"\n}}",
            contents.join(" ")
        );
    }
    text
}

struct FixedTools;

impl ToolResolver for FixedTools {
    fn resolve(&self, name: &str) -> Result<ToolIdentity, ToolError> {
        Ok(ToolIdentity {
            name: name.to_string(),
            path: PathBuf::from(format!("/usr/bin/{name}")),
            digest: Digest::of(name.as_bytes()),
            version: format!("{name} 1.0"),
        })
    }
}

fn parse_plan_and_key(text: &str) -> usize {
    let recipe =
        pkg::recipe::load_str(Path::new("bench/pkg.kdl"), text).expect("generated recipe is valid");
    let graph = BuildGraph::plan(&recipe, &Selection::all(Platform::linux_amd64())).expect("plan");
    let mut outputs = Outputs::new(&graph);
    for id in 0..graph.nodes.len() {
        let source = SourceIdentity::None;
        let inputs = KeyInputs::for_node(&recipe, &graph, id, source, &mut outputs, &FixedTools)
            .expect("fixed tools resolve")
            .expect("topological order");
        let key = BuildKey::compute(&inputs);
        outputs.record(id, Digest::of(key.digest().as_bytes()));
    }
    graph.nodes.len()
}

fn bench(c: &mut Criterion) {
    let text = generate();
    assert_eq!(parse_plan_and_key(&text), 2 * PACKAGES, "every package on both platforms");
    let mut group = c.benchmark_group("recipe");
    group.sample_size(20);
    group.bench_function("parse+graph+keys 2000 packages", |b| {
        b.iter(|| parse_plan_and_key(black_box(&text)))
    });
    group.bench_function("parse 2000 packages", |b| {
        b.iter(|| {
            pkg::recipe::load_str(Path::new("bench/pkg.kdl"), black_box(&text))
                .map(|r| r.packages.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
