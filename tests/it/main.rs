//! pkg's integration tests: one binary, a module per command.

mod common;
mod rootless;
mod store;
