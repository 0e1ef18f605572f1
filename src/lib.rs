//! pkg: a declarative, daemonless packager for static, reproducible OCI images.
//!
//! The library holds everything; `main.rs` only calls [`cli::main`]. Data flows
//! recipe → [`recipe`] model → [`graph`] → [`key`] → builds → store → images.
//! Nothing in the library reads the clock, the environment, the uid or the
//! hostname: the CLI edge resolves those and passes them in.

#![deny(unsafe_code)]

pub mod cli;
pub mod digest;
pub mod platform;
pub mod store;
