//! Build keys: every input changes the key, nothing else does, and the keys of
//! a fixed recipe are pinned by a golden snapshot (a change in the canonical
//! encoding must bump `KEY_FORMAT_VERSION` and update the snapshot knowingly).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pkg::digest::Digest;
use pkg::graph::{BuildGraph, Selection};
use pkg::key::{BuildKey, KeyInputs, Outputs, SourceIdentity};
use pkg::platform::Platform;
use pkg::recipe::{Recipe, load_str};
use pkg::tool::{ToolError, ToolIdentity, ToolResolver};

use crate::assert_snapshot;

/// Tools with fixed identities, so keys do not depend on this machine.
struct FixedTools {
    salt: &'static str,
}

impl ToolResolver for FixedTools {
    fn resolve(&self, name: &str) -> Result<ToolIdentity, ToolError> {
        Ok(ToolIdentity {
            name: name.to_string(),
            path: PathBuf::from(format!("/usr/bin/{name}")),
            digest: Digest::of(format!("{name}{}", self.salt).as_bytes()),
            version: format!("{name} version 1.0"),
        })
    }
}

const RECIPE: &str = r#"
package "app" version="1.0.0" {
    description "an app"
    license "MIT"
    build "script" {
        run "mkdir -p $out/usr/bin"
        run "cp app $out/usr/bin/app"
    }
    env MODE="release"
    depends "certs"
    build-depends "zlib"
    tools "make"
}
package "zlib" version="1.3" { build "cc" { sources "zlib.c" } }
package "certs" version="2024" { build "files" { install "ca.pem" "/etc/ssl/ca.pem" mode="0644" } }
image "app" { contents "app"; platforms "linux/amd64" "linux/arm64" }
"#;

/// Keys of every node, computing each build's inputs from its dependencies'
/// outputs; a built package's output digest is derived from its key here.
fn keys_with(
    recipe: &Recipe,
    source: impl Fn(&str) -> SourceIdentity,
    output_salt: &str,
    tools: &dyn ToolResolver,
) -> BTreeMap<String, BuildKey> {
    let graph = BuildGraph::plan(recipe, &Selection::all(Platform::linux_amd64())).unwrap();
    let mut outputs = Outputs::new(&graph);
    let mut keys = BTreeMap::new();
    for id in 0..graph.nodes.len() {
        let node = &graph.nodes[id];
        let inputs =
            KeyInputs::for_node(recipe, &graph, id, source(&node.package), &mut outputs, tools)
                .unwrap()
                .expect("topological order makes every input known");
        let key = BuildKey::compute(&inputs);
        outputs.record(id, Digest::of(format!("{key}{output_salt}").as_bytes()));
        keys.insert(format!("{} {}", node.package, node.platform), key);
    }
    keys
}

fn keys_of(text: &str) -> BTreeMap<String, BuildKey> {
    let recipe = load_str(Path::new("pkg.kdl"), text).unwrap();
    keys_with(
        &recipe,
        |p| SourceIdentity::Tree(Digest::of(p.as_bytes())),
        "",
        &FixedTools { salt: "" },
    )
}

fn key(keys: &BTreeMap<String, BuildKey>, node: &str) -> BuildKey {
    keys[node]
}

#[test]
fn golden_keys() {
    let keys = keys_of(RECIPE);
    let text: String = keys.iter().map(|(node, key)| format!("{node} {key}\n")).collect();
    assert_snapshot!("golden_keys", text);
}

#[test]
fn builder_option_changes_key() {
    let base = keys_of(RECIPE);
    let changed = keys_of(&RECIPE.replace("cp app", "cp -p app"));
    assert_ne!(key(&base, "app linux/amd64"), key(&changed, "app linux/amd64"));
    assert_eq!(key(&base, "zlib linux/amd64"), key(&changed, "zlib linux/amd64"));
}

#[test]
fn env_value_changes_key() {
    let base = keys_of(RECIPE);
    let changed = keys_of(&RECIPE.replace("MODE=\"release\"", "MODE=\"debug\""));
    assert_ne!(key(&base, "app linux/amd64"), key(&changed, "app linux/amd64"));
}

#[test]
fn version_and_name_change_key() {
    let base = keys_of(RECIPE);
    let changed = keys_of(&RECIPE.replace("version=\"1.3\"", "version=\"1.3.1\""));
    assert_ne!(key(&base, "zlib linux/amd64"), key(&changed, "zlib linux/amd64"));
}

#[test]
fn source_changes_key() {
    let recipe = load_str(Path::new("pkg.kdl"), RECIPE).unwrap();
    let tools = FixedTools { salt: "" };
    let base = keys_with(&recipe, |p| SourceIdentity::Tree(Digest::of(p.as_bytes())), "", &tools);
    let changed = keys_with(
        &recipe,
        |p| {
            SourceIdentity::Tree(Digest::of(if p == "app" {
                b"app, one byte changed"
            } else {
                p.as_bytes()
            }))
        },
        "",
        &tools,
    );
    assert_ne!(key(&base, "app linux/amd64"), key(&changed, "app linux/amd64"));
    assert_eq!(key(&base, "zlib linux/amd64"), key(&changed, "zlib linux/amd64"));
}

#[test]
fn build_dependency_output_changes_key() {
    let recipe = load_str(Path::new("pkg.kdl"), RECIPE).unwrap();
    let tools = FixedTools { salt: "" };
    let source = |p: &str| SourceIdentity::Tree(Digest::of(p.as_bytes()));
    let base = keys_with(&recipe, source, "", &tools);
    // Same keys everywhere, but zlib's build produced different bytes.
    let changed = keys_with(&recipe, source, "other output", &tools);
    assert_eq!(key(&base, "zlib linux/amd64"), key(&changed, "zlib linux/amd64"));
    assert_ne!(key(&base, "app linux/amd64"), key(&changed, "app linux/amd64"));
    // A runtime-only dependency's output does not enter the key: certs is not mounted.
    assert_eq!(key(&base, "certs linux/amd64"), key(&changed, "certs linux/amd64"));
}

#[test]
fn runtime_dependency_of_a_build_dependency_changes_key() {
    // zlib's runtime dependency zdata is mounted with zlib when app builds.
    let text = RECIPE.replace("package \"zlib\" version=\"1.3\" { build \"cc\" { sources \"zlib.c\" } }",
        "package \"zlib\" version=\"1.3\" { build \"cc\" { sources \"zlib.c\" }; depends \"zdata\" }\npackage \"zdata\" { build \"script\" { run \"true\" } }");
    let recipe = load_str(Path::new("pkg.kdl"), &text).unwrap();
    let graph = BuildGraph::plan(&recipe, &Selection::all(Platform::linux_amd64())).unwrap();
    let tools = FixedTools { salt: "" };
    let app_key = |zdata_output: &[u8]| {
        let mut outputs = Outputs::new(&graph);
        let mut app = None;
        for id in 0..graph.nodes.len() {
            let node = &graph.nodes[id];
            let inputs = KeyInputs::for_node(
                &recipe,
                &graph,
                id,
                SourceIdentity::None,
                &mut outputs,
                &tools,
            )
            .unwrap()
            .unwrap();
            let key = BuildKey::compute(&inputs);
            let out = if node.package == "zdata" {
                Digest::of(zdata_output)
            } else {
                Digest::of(key.digest().as_bytes())
            };
            outputs.record(id, out);
            if node.package == "app" && node.platform == Platform::linux_amd64() {
                app = Some(key);
            }
        }
        app.unwrap()
    };
    assert_ne!(app_key(b"zdata v1"), app_key(b"zdata v2"));
}

#[test]
fn key_waits_for_unbuilt_inputs() {
    let recipe = load_str(Path::new("pkg.kdl"), RECIPE).unwrap();
    let graph = BuildGraph::plan(&recipe, &Selection::all(Platform::linux_amd64())).unwrap();
    let app = graph.nodes.iter().position(|n| n.package == "app").unwrap();
    let mut outputs = Outputs::new(&graph);
    let inputs = KeyInputs::for_node(
        &recipe,
        &graph,
        app,
        SourceIdentity::None,
        &mut outputs,
        &FixedTools { salt: "" },
    );
    assert!(inputs.unwrap().is_none(), "zlib is not built yet");
}

#[test]
fn platform_changes_key() {
    let keys = keys_of(RECIPE);
    assert_ne!(key(&keys, "app linux/amd64"), key(&keys, "app linux/arm64"));
    assert_ne!(key(&keys, "certs linux/amd64"), key(&keys, "certs linux/arm64"));
}

#[test]
fn tool_identity_changes_key() {
    let recipe = load_str(Path::new("pkg.kdl"), RECIPE).unwrap();
    let source = |p: &str| SourceIdentity::Tree(Digest::of(p.as_bytes()));
    let base = keys_with(&recipe, source, "", &FixedTools { salt: "" });
    let upgraded = keys_with(&recipe, source, "", &FixedTools { salt: "new binary" });
    assert_ne!(key(&base, "app linux/amd64"), key(&upgraded, "app linux/amd64"));
    // The files builder runs no tool.
    assert_eq!(key(&base, "certs linux/amd64"), key(&upgraded, "certs linux/amd64"));
}

#[test]
fn description_license_and_file_location_do_not_change_key() {
    let base = keys_of(RECIPE);
    let edited =
        RECIPE.replace("an app", "a better description").replace("\"MIT\"", "\"Apache-2.0\"");
    assert_eq!(base, keys_of(&edited));
    let elsewhere = load_str(Path::new("/some/other/dir/recipe.kdl"), RECIPE).unwrap();
    let moved = keys_with(
        &elsewhere,
        |p| SourceIdentity::Tree(Digest::of(p.as_bytes())),
        "",
        &FixedTools { salt: "" },
    );
    assert_eq!(base, moved);
}

/// End to end through `pkg build --json`: the same recipe built by root and by
/// an unprivileged user, into different stores, from different working
/// directories (relative vs absolute recipe path), under a faked wall clock,
/// another time zone, locale, umask and stray environment variables, gets
/// the same build key for every package.
#[test]
fn keys_ignore_store_cwd_clock_user_and_environment() {
    use crate::common::{TestContext, lookup_user, running_as_root, stderr};
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    let ctx = TestContext::new();
    let project = ctx.root().join("project");
    ctx.write(
        "project/pkg.kdl",
        r#"
package "greeting" version="1" {
    source path="src"
    build "files" { install "hello.txt" "/usr/share/greeting/hello.txt" mode="0644" }
}
package "shout" version="1" {
    build "script" {
        run "mkdir -p $out/usr/bin"
        run "printf 'echo HI\n' > $out/usr/bin/shout"
    }
    build-depends "greeting"
}
image "shout" { contents "shout" "greeting" }
"#,
    );
    ctx.write("project/src/hello.txt", "hello\n");
    std::fs::create_dir_all(ctx.root().join("elsewhere")).unwrap();
    // The unprivileged run reads the recipe and writes its own store here.
    for dir in [
        ctx.root().to_path_buf(),
        project.clone(),
        project.join("src"),
        ctx.root().join("elsewhere"),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let path = "/usr/local/bin:/usr/bin:/bin";

    let first = ctx
        .pkg()
        .args(["build", "--json", "pkg.kdl"])
        .current_dir(&project)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", stderr(&first));

    let mut second = Command::new("faketime");
    second.args(["-f", "@2003-04-05 06:07:08"]);
    if running_as_root() {
        let (uid, gid) =
            lookup_user("pkgtest").expect("the unprivileged user `pkgtest` (.ci/run creates it)");
        second.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
        ]);
    }
    let recipe = project.join("pkg.kdl");
    let second = second
        .args(["sh", "-c", "umask 077 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_pkg"))
        .args(["build", "--json"])
        .arg(&recipe)
        .current_dir(ctx.root().join("elsewhere"))
        .env_clear()
        .env("PATH", path)
        .env("HOME", ctx.root().join("elsewhere"))
        .env("PKG_STORE", ctx.root().join("elsewhere/other-store"))
        .env("TZ", "Pacific/Kiritimati")
        .env("LANG", "de_DE.UTF-8")
        .env("LC_ALL", "de_DE.UTF-8")
        .env("GOFLAGS", "-mod=mod")
        .env("SOURCE_DATE_EPOCH", "123456789")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("NO_COLOR", "1")
        .output()
        .expect("faketime is needed by this test: apt-get install faketime (scripts/test.sh does)");
    assert!(second.status.success(), "{}", stderr(&second));
    if running_as_root() {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(ctx.root().join("elsewhere/other-store")).unwrap().uid();
        assert_eq!(
            Some(owner),
            lookup_user("pkgtest").map(|(uid, _)| uid),
            "second build ran as pkgtest"
        );
    }

    let keys = |out: &std::process::Output| -> BTreeMap<String, String> {
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json output");
        report["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                (
                    format!("{} {}", n["package"].as_str().unwrap(), n["platform"]),
                    n["key"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let (a, b) = (keys(&first), keys(&second));
    assert_eq!(a.len(), 2, "{a:?}");
    assert_eq!(a, b);
}
