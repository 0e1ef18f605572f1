//! hello-rust: a static greeting, built by pkg.

fn main() {
    println!("Hello from Rust on linux/{}!", std::env::consts::ARCH);
}
