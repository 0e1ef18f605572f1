//! The command line itself: version, help, completions, global options.

use crate::assert_snapshot;
use crate::common::{TestContext, stderr, stdout};

#[test]
fn version() {
    let ctx = TestContext::new();
    let out = ctx.run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), format!("pkg {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn help_lists_commands() {
    let ctx = TestContext::new();
    let out = ctx.run(&["--help"]);
    assert!(out.status.success());
    assert_snapshot!("help", stdout(&out));
}

#[test]
fn help_does_not_touch_the_store() {
    let ctx = TestContext::new();
    let out = ctx
        .pkg()
        .args(["graph", "--help"])
        .env("PKG_STORE", "/nonexistent/store")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!ctx.store().exists());
}

#[test]
fn completions_for_each_shell() {
    let ctx = TestContext::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = ctx.run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(script.contains("graph") && script.contains("completions"), "{shell}:\n{script}");
    }
}

#[test]
fn bash_completion_loads_and_completes() {
    let ctx = TestContext::new();
    let out = ctx.run(&["completions", "bash"]);
    let script = ctx.write("pkg.bash", &stdout(&out));
    let check = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && COMP_WORDS=(pkg gr) COMP_CWORD=1 COMP_LINE='pkg gr' COMP_POINT=6 && _pkg pkg gr pkg && echo \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(stdout(&check).contains("graph"), "{}", stdout(&check));
}

#[test]
fn unknown_command_is_a_usage_error() {
    let ctx = TestContext::new();
    let out = ctx.run(&["bulid"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unrecognized subcommand"), "{}", stderr(&out));
}

#[test]
fn bad_platform_argument_is_a_usage_error() {
    let ctx = TestContext::new();
    let out = ctx.run(&["graph", "--platform", "linux/x86_64"]);
    assert_eq!(out.status.code(), Some(2));
    assert_snapshot!("bad_platform_argument", stderr(&out));
}

#[test]
fn store_without_home_is_a_clear_error() {
    let ctx = TestContext::new();
    ctx.write("pkg.kdl", "package \"a\" { build \"script\" { run \"true\" } }\n");
    let out =
        ctx.pkg().args(["graph"]).env_remove("HOME").env_remove("PKG_STORE").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pass --store DIR or set PKG_STORE"), "{}", stderr(&out));
}
