//! The rootless test mechanism itself: bodies really run unprivileged.

use crate::common::running_as_root;

crate::rootless_test! {
    fn body_runs_without_root() {
        assert!(!running_as_root());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
    }
}
