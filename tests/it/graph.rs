//! `pkg graph`: the indented tree and Graphviz output.

use std::fmt::Write as _;
use std::io::Read as _;
use std::process::Stdio;

use crate::assert_snapshot;
use crate::common::{TestContext, stderr, stdout};

const RECIPE: &str = r#"
package "app" version="2.1" {
    build "go" main="./cmd/app"
    depends "certs" "tzdata"
    build-depends "zlib"
}
package "tool" { build "script" { run "true" }; depends "certs" }
package "certs" version="2024" { build "files" { install "ca.pem" "/etc/ssl/ca.pem" } }
package "tzdata" { build "script" { run "true" } }
package "zlib" version="1.3" { build "cc" { sources "z.c" }; depends "zdata" }
package "zdata" { build "script" { run "true" } }
package "orphan" { build "script" { run "true" } }
image "app" {
    contents "app" "tool"
    platforms "linux/amd64" "linux/arm64"
}
image "certs" { contents "certs" }
"#;

#[test]
fn tree() {
    let ctx = TestContext::new();
    ctx.write("pkg.kdl", RECIPE);
    let out = ctx.run(&["graph"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_snapshot!("tree", stdout(&out));
}

#[test]
fn tree_of_the_demo_recipe() {
    let ctx = TestContext::new();
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/hello");
    let out = ctx.run(&["graph", recipe]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_snapshot!("demo_tree", stdout(&out));
}

#[test]
fn platform_and_image_selection() {
    let ctx = TestContext::new();
    ctx.write("pkg.kdl", RECIPE);
    let out = ctx.run(&["graph", "--image", "certs", "--platform", "linux/arm64"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("image certs [linux/arm64]\n"), "{text}");
    assert!(!text.contains("image app"), "{text}");
    // With a selection, packages of other images are not "in no image".
    assert!(!text.contains("not in any image"), "{text}");
}

#[test]
fn dot() {
    let ctx = TestContext::new();
    ctx.write("pkg.kdl", RECIPE);
    let out = ctx.run(&["graph", "--format", "dot"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_snapshot!("dot", text);
    // Graphviz accepts it.
    let dot = ctx.write("graph.dot", &text);
    let check = std::process::Command::new("dot").arg("-Tsvg").arg(&dot).output();
    let check = check.expect(
        "graphviz `dot` is needed by this test: apt-get install graphviz (scripts/test.sh does)",
    );
    assert!(check.status.success(), "{}", stderr(&check));
}

#[test]
fn closed_stdout_is_not_an_error() {
    // Enough output to fill the pipe, so pkg writes after the reader is gone.
    let mut recipe = String::new();
    for i in 0..3000 {
        let _ = writeln!(recipe, "package \"p{i}\" {{ build \"script\" {{ run \"true\" }} }}");
    }
    let contents: Vec<String> = (0..3000).map(|i| format!("\"p{i}\"")).collect();
    let _ = writeln!(recipe, "image \"big\" {{ contents {} }}", contents.join(" "));
    let ctx = TestContext::new();
    ctx.write("pkg.kdl", &recipe);
    let mut child =
        ctx.pkg().arg("graph").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {err}");
    assert_eq!(err, "");
}
