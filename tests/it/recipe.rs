//! Recipe diagnostics as users see them: every kind of recipe error is a
//! report naming the file and line:column, underlining the span, with help.
//! Rendered without colour (NO_COLOR, stderr not a terminal); temp paths redacted.

use crate::assert_snapshot;
use crate::common::{TestContext, stderr};

/// Writes `files` into a fresh directory, runs `pkg graph pkg.kdl` there,
/// checks that it fails, and returns the redacted report.
fn diagnose(files: &[(&str, &str)]) -> String {
    let ctx = TestContext::new();
    for (path, text) in files {
        ctx.write(path, text);
    }
    let out = ctx.run(&["graph", "pkg.kdl"]);
    assert_eq!(out.status.code(), Some(1), "pkg graph should fail:\n{}", stderr(&out));
    let report = ctx.redact(&stderr(&out));
    assert!(!report.contains("panicked"), "{report}");
    report
}

const OK_PACKAGE: &str = r#"package "ok" { build "script" { run "true" } }"#;

macro_rules! diagnostic_test {
    ($name:ident, $text:expr) => {
        #[test]
        fn $name() {
            let report = diagnose(&[("pkg.kdl", $text)]);
            assert!(report.contains("pkg.kdl:"), "no file:line:col in\n{report}");
            // A span is underlined with `^`; an empty span (e.g. "not closed") gets a pointer.
            assert!(report.contains('^') || report.contains("`--"), "no label in\n{report}");
            assert_snapshot!(stringify!($name), report);
        }
    };
}

diagnostic_test!(syntax_error, "package \"a\" {\n    build \"script\" { run \"true\" }\n");
diagnostic_test!(syntax_error_bare_bool, "package \"a\" {\n    build \"script\" { run true }\n}\n");
diagnostic_test!(
    unknown_top_level_node,
    "pakage \"a\" {\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    unknown_package_node,
    "package \"a\" {\n    bulid \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    unknown_option,
    "package \"a\" versoin=\"1.0\" {\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    unknown_builder_option,
    "package \"a\" {\n    source path=\".\"\n    build \"go\" mian=\"./cmd/a\"\n}\n"
);
diagnostic_test!(
    wrong_value_type,
    "package \"a\" version=1.0 {\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(missing_package_name, "package {\n    build \"script\" { run \"true\" }\n}\n");
diagnostic_test!(missing_build, "package \"a\" {\n    description \"no builder\"\n}\n");
diagnostic_test!(unknown_builder, "package \"a\" {\n    build \"scirpt\" { run \"true\" }\n}\n");
diagnostic_test!(
    duplicate_package,
    "package \"a\" { build \"script\" { run \"true\" } }\npackage \"a\" { build \"script\" { run \"false\" } }\n"
);
diagnostic_test!(
    duplicate_image,
    "package \"a\" { build \"script\" { run \"true\" } }\nimage \"i\" { contents \"a\" }\nimage \"i\" { contents \"a\" }\n"
);
diagnostic_test!(
    duplicate_build_node,
    "package \"a\" {\n    build \"script\" { run \"true\" }\n    build \"go\"\n}\n"
);
diagnostic_test!(
    unknown_dependency,
    "package \"ca-certs\" { build \"script\" { run \"true\" } }\npackage \"a\" {\n    build \"script\" { run \"true\" }\n    depends \"ca-cert\"\n}\n"
);
diagnostic_test!(
    dependency_cycle,
    "package \"a\" {\n    build \"script\" { run \"true\" }\n    depends \"b\"\n}\npackage \"b\" {\n    build \"script\" { run \"true\" }\n    build-depends \"c\"\n}\npackage \"c\" {\n    build \"script\" { run \"true\" }\n    depends \"a\"\n}\n"
);
diagnostic_test!(
    invalid_platform,
    "package \"a\" { build \"script\" { run \"true\" } }\nimage \"a\" {\n    contents \"a\"\n    platforms \"linux/amd64\" \"linux/x86_64\"\n}\n"
);
diagnostic_test!(
    unsupported_os,
    "package \"a\" { build \"script\" { run \"true\" } }\nimage \"a\" {\n    contents \"a\"\n    platforms \"darwin/arm64\"\n}\n"
);
diagnostic_test!(
    import_not_found,
    "import \"../common/missing.kdl\"\npackage \"a\" { build \"script\" { run \"true\" } }\n"
);
diagnostic_test!(
    source_path_missing,
    "package \"a\" {\n    source path=\"src\"\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    url_without_sha256,
    "package \"a\" {\n    source url=\"https://example.org/a.tar.gz\"\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    bad_sha256,
    "package \"a\" {\n    source url=\"https://example.org/a.tar.gz\" sha256=\"abc123\"\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    path_and_url,
    "package \"a\" {\n    source path=\".\" url=\"https://example.org/a.tar.gz\"\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    too_many_values,
    "package \"a\" {\n    description \"one\" \"two\"\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    unexpected_block,
    "package \"a\" {\n    depends \"b\" { nested }\n    build \"script\" { run \"true\" }\n}\n"
);
diagnostic_test!(
    invalid_mode,
    "package \"a\" {\n    source path=\".\"\n    build \"files\" {\n        install \"a\" \"/a\" mode=\"4755\"\n    }\n}\n"
);
diagnostic_test!(
    relative_install_destination,
    "package \"a\" {\n    source path=\".\"\n    build \"files\" {\n        install \"a\" \"etc/a\"\n    }\n}\n"
);
diagnostic_test!(
    invalid_port,
    "package \"a\" { build \"script\" { run \"true\" } }\nimage \"a\" {\n    contents \"a\"\n    expose \"80/http\"\n}\n"
);
diagnostic_test!(
    invalid_compression,
    "package \"a\" { build \"script\" { run \"true\" } }\nimage \"a\" {\n    contents \"a\"\n    compression \"zstandard\"\n}\n"
);
diagnostic_test!(
    env_without_name,
    "package \"a\" {\n    build \"script\" { run \"true\" }\n    env \"GOFLAGS=-mod=vendor\"\n}\n"
);
diagnostic_test!(
    invalid_image_name,
    "package \"a\" { build \"script\" { run \"true\" } }\nimage \"my app/../x\" { contents \"a\" }\n"
);
diagnostic_test!(
    duplicate_contents,
    "package \"a\" { build \"script\" { run \"true\" } }\nimage \"i\" { contents \"a\" \"a\"; platforms \"linux/amd64\" \"linux/amd64\" }\n"
);
diagnostic_test!(image_without_contents, "image \"empty\" {\n    entrypoint \"/bin/sh\"\n}\n");

#[test]
fn several_errors_are_reported_together() {
    let report = diagnose(&[(
        "pkg.kdl",
        "package \"a\" versoin=\"1\" {\n    build \"script\" { run \"true\" }\n    depends \"nope\"\n}\nimage \"a\" {\n    contents \"a\"\n    platforms \"linux/arm\" \"windows/amd64\"\n}\n",
    )]);
    assert!(report.contains("the recipe has 3 errors"), "{report}");
    assert_snapshot!("several_errors", report);
}

#[test]
fn import_cycle() {
    let report = diagnose(&[
        (
            "pkg.kdl",
            "import \"lib/a.kdl\"\npackage \"main\" { build \"script\" { run \"true\" } }\n",
        ),
        ("lib/a.kdl", "import \"b.kdl\"\n"),
        ("lib/b.kdl", "import \"../pkg.kdl\"\n"),
    ]);
    assert!(report.contains("pkg.kdl → lib/a.kdl → lib/b.kdl → pkg.kdl"), "{report}");
    assert_snapshot!("import_cycle", report);
}

#[test]
fn duplicate_across_imports_names_both_files() {
    let report = diagnose(&[
        (
            "pkg.kdl",
            "import \"common/certs.kdl\"\npackage \"certs\" { build \"script\" { run \"true\" } }\n",
        ),
        ("common/certs.kdl", "package \"certs\" {\n    build \"script\" { run \"true\" }\n}\n"),
    ]);
    assert!(report.contains("common/certs.kdl:1:9"), "{report}");
    assert_snapshot!("duplicate_across_imports", report);
}

#[test]
fn error_in_imported_file_names_that_file() {
    let report = diagnose(&[
        ("pkg.kdl", "import \"common/x.kdl\"\n"),
        (
            "common/x.kdl",
            "package \"x\" {\n    build \"script\" { run \"true\" }\n    tools 42\n}\n",
        ),
    ]);
    assert!(report.contains("common/x.kdl:3:11"), "{report}");
}

#[test]
fn diamond_imports_load_each_file_once() {
    let ctx = TestContext::new();
    ctx.write("pkg.kdl", "import \"a.kdl\"\nimport \"b.kdl\"\nimage \"i\" { contents \"top\" }\n");
    ctx.write("a.kdl", "import \"common.kdl\"\npackage \"top\" { build \"script\" { run \"true\" }; depends \"base\" }\n");
    ctx.write("b.kdl", "import \"common.kdl\"\n");
    ctx.write("common.kdl", "package \"base\" { build \"script\" { run \"true\" } }\n");
    let out = ctx.run(&["graph"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn missing_recipe_file() {
    let ctx = TestContext::new();
    let out = ctx.run(&["graph", "nope.kdl"]);
    assert_eq!(out.status.code(), Some(1));
    assert_snapshot!("missing_recipe_file", ctx.redact(&stderr(&out)));
}

#[test]
fn directory_without_pkg_kdl() {
    let ctx = TestContext::new();
    std::fs::create_dir(ctx.root().join("empty")).unwrap();
    let out = ctx.run(&["graph", "empty"]);
    assert_eq!(out.status.code(), Some(1));
    let report = stderr(&out);
    assert!(report.contains("empty/pkg.kdl"), "{report}");
}

#[test]
fn unknown_image_selection() {
    let ctx = TestContext::new();
    ctx.write("pkg.kdl", &format!("{OK_PACKAGE}\nimage \"hello\" {{ contents \"ok\" }}\n"));
    let out = ctx.run(&["graph", "--image", "helo"]);
    assert_eq!(out.status.code(), Some(1));
    assert_snapshot!("unknown_image_selection", ctx.redact(&stderr(&out)));
}

#[test]
fn every_shipped_recipe_loads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut count = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path().join("pkg.kdl");
        if path.exists() {
            pkg::recipe::load(&path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
            count += 1;
        }
    }
    assert!(count >= 1, "no recipes found under {}", root.display());
}

#[test]
fn unrelated_error_does_not_hide_missing_build() {
    let report = diagnose(&[("pkg.kdl", "package \"a\" version=1 {\n    license \"MIT\"\n}\n")]);
    assert!(report.contains("the recipe has 2 errors"), "{report}");
    assert!(report.contains("missing `build` in package `a`"), "{report}");
}

#[test]
fn deep_nesting_is_a_diagnostic_not_a_crash() {
    let text = format!("package \"a\" {}{} 0x", "{ b ".repeat(2000), "}".repeat(2000));
    let report = diagnose(&[("pkg.kdl", &text)]);
    assert!(
        report.contains("nested more than 128 levels deep"),
        "{}",
        &report[..report.len().min(400)]
    );
}

#[test]
fn long_dependency_chains_do_not_exhaust_the_stack() {
    use std::fmt::Write as _;
    let n = 20_000;
    let mut text = String::new();
    for i in 0..n {
        let _ = writeln!(
            text,
            "package \"p{i}\" {{ build \"script\" {{ run \"x\" }}; depends \"p{}\" }}",
            i + 1
        );
    }
    let _ = writeln!(
        text,
        "package \"p{n}\" {{ build \"script\" {{ run \"x\" }} }}\nimage \"i\" {{ contents \"p0\" }}"
    );
    let ctx = TestContext::new();
    ctx.write("pkg.kdl", &text);
    let out = ctx.run(&["graph", "--format", "dot"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A cycle closing the same chain is found and reported, not a crash.
    ctx.write(
        "pkg.kdl",
        &text.replace(
            &format!("package \"p{n}\" {{ build \"script\" {{ run \"x\" }} }}"),
            &format!("package \"p{n}\" {{ build \"script\" {{ run \"x\" }}; depends \"p0\" }}"),
        ),
    );
    let out = ctx.run(&["graph", "--format", "dot"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("dependency cycle"),
        "{}",
        &stderr(&out)[..400.min(stderr(&out).len())]
    );
}

#[test]
fn cycles_are_reported_with_other_errors() {
    let report = diagnose(&[(
        "pkg.kdl",
        "package \"a\" { build \"script\" { run \"true\" }; depends \"b\" \"nope\" }\npackage \"b\" { build \"script\" { run \"true\" }; depends \"a\" }\n",
    )]);
    assert!(report.contains("unknown package `nope`"), "{report}");
    assert!(report.contains("dependency cycle: a → b → a"), "{report}");
}
