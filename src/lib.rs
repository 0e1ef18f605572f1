//! pkg: a declarative, daemonless packager for static, reproducible OCI images.
//!
//! The library holds everything; `main.rs` only calls [`cli::main`]. Data flows
//! recipe → [`recipe`] model → [`graph`] → [`key`] → builds → store → images.
//! Nothing in the library reads the clock, the environment, the uid or the
//! hostname: the CLI edge resolves those and passes them in. The only `unsafe`
//! code is the sandbox's syscall layer, `sandbox/sys.rs`.

#![deny(unsafe_code)]
// The library's documentation is for pkg's developers, built with private
// items (`cargo doc --document-private-items`, checked by scripts/test.sh), so
// public items may link to private ones.
#![allow(rustdoc::private_intra_doc_links)]

pub mod build;
pub mod cli;
pub mod digest;
pub mod doctor;
pub mod graph;
pub mod image;
pub mod key;
pub mod platform;
pub mod recipe;
pub mod run;
pub mod sandbox;
pub mod store;
pub mod tool;

/// An error and its sources on one line, `outer: inner: innermost`, for
/// one-line reports (`pkg doctor`, `pkg store verify`).
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
