//! `pkg doctor`: reports what works and how to fix what does not.

use crate::assert_snapshot;
use crate::common::{TestContext, stderr, stdout};

#[test]
fn healthy_machine_as_root() {
    let ctx = TestContext::new();
    let out = ctx.run(&["doctor"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("ok    user namespaces"), "{text}");
    assert!(text.contains("ok    overlay"), "{text}");
    assert!(text.contains("ok    fuse-overlayfs"), "{text}");
}

crate::rootless_test! {
    fn healthy_machine_rootless() {
        let ctx = TestContext::new();
        let out = ctx.run(&["doctor", "--json"]);
        assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let status = |name: &str| {
            checks.as_array().unwrap().iter().find(|c| c["name"] == name).map(|c| c["status"].clone())
        };
        assert_eq!(status("user namespaces"), Some("ok".into()), "{checks:#}");
        assert_eq!(status("overlay"), Some("ok".into()), "{checks:#}");
        // scripts/test.sh installs fuse-overlayfs and opens /dev/fuse to all.
        assert_eq!(status("fuse-overlayfs"), Some("ok".into()), "{checks:#}");
        // .ci/run gives the test user a subordinate range.
        assert_eq!(status("subordinate ids"), Some("ok".into()), "{checks:#}");
    }
}

#[test]
fn missing_tools_come_with_fixes() {
    let ctx = TestContext::new();
    let out = ctx.pkg().arg("doctor").env("PATH", "/nonexistent").output().unwrap();
    // Missing tools are warnings: pkg still works for what does not need them.
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    // The subordinate-ids line depends on who runs the suite; the rest must not.
    let report: String = ctx
        .redact(&stdout(&out))
        .lines()
        .filter(|l| !l.contains("subordinate ids") && !l.contains("usermod"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_snapshot!("missing_tools", report);
}

#[test]
fn unwritable_store_fails() {
    let ctx = TestContext::new();
    let out = ctx.pkg().arg("doctor").env("PKG_STORE", "/proc/pkg-store").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("FAIL  store"), "{}", stdout(&out));
}
