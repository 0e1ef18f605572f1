//! The `pkg` binary: a shim over the library's CLI entry point.

fn main() -> std::process::ExitCode {
    pkg::cli::main()
}
