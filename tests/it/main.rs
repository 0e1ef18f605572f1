//! pkg's integration tests: one binary, a module per command.

mod build;
mod cli;
mod common;
mod doctor;
mod fuzz;
mod graph;
mod image;
mod import;
mod keys;
mod recipe;
mod rootless;
mod run;
mod sandbox;
mod store;
