//! Builders as shell commands: each recipe builder becomes a list of POSIX
//! `sh` commands plus the environment they need, run in order in `/src`.
//!
//! Invariants: the commands are a pure function of the package, the target
//! platform and the resolved toolchain (everything here is in the build key);
//! every path they write is under `$out` or `/tmp`; every value taken from the
//! recipe is single-quoted, so no recipe string is ever re-parsed by the shell
//! except a `script` builder's own `run` lines, which are shell by definition.

use std::path::{Component, Path, PathBuf};

use crate::platform::{Arch, Platform};
use crate::recipe::{Builder, Install, Package};

/// Where the source is inside the sandbox (the build's working directory).
pub const SRC: &str = "/src";
/// Where the build installs its output inside the sandbox.
pub const OUT: &str = "/out";

/// What a builder runs and the environment it adds to the fixed set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildCommands {
    /// Each is run as `sh -eu -c COMMAND` in `/src`; the first failure ends the build.
    pub commands: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Why a builder cannot run for a package.
#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error(
        "the Rust standard library for target `{target}` is not installed in {}; add it with `rustup target add {target}`",
        sysroot.display()
    )]
    MissingRustTarget { target: String, sysroot: PathBuf },
    #[error(
        "cannot find the Rust toolchain: `rustc` did not resolve to a toolchain's own bin directory (check that `rustc --print sysroot` works)"
    )]
    NoRustSysroot,
    #[error("install source `{from}` must be a relative path inside the source")]
    InstallOutsideSource { from: String },
    #[error("output path `{path}` must be absolute and stay inside $out")]
    BadOutput { path: String },
}

/// The host toolchain facts a builder needs beyond the platform.
#[derive(Debug, Clone, Default)]
pub struct Toolchain {
    /// The Rust sysroot (`…/toolchains/NAME`), for cargo builds.
    pub rust_sysroot: Option<PathBuf>,
}

/// Quotes `s` for POSIX sh: `'…'` with each `'` written as `'\''`.
pub fn quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b)) {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The C compiler for `platform`: musl-gcc natively, the GNU cross compiler otherwise.
pub fn c_compiler(platform: &Platform) -> String {
    if platform.arch() == Platform::host().arch() {
        "musl-gcc".to_string()
    } else {
        format!("{}-gcc", platform.gnu_triple())
    }
}

/// The Rust target triple of `platform` (glibc targets, linked statically).
pub fn rust_target(platform: &Platform) -> String {
    match platform.arch() {
        Arch::Arm => "armv7-unknown-linux-gnueabihf".to_string(),
        Arch::I386 => "i686-unknown-linux-gnu".to_string(),
        arch => format!("{}-unknown-linux-gnu", arch.gnu_name()),
    }
}

/// The environment every builder gets describing the target platform.
pub fn target_env(platform: &Platform) -> Vec<(String, String)> {
    vec![
        ("TARGET_OS".into(), platform.os().into()),
        ("TARGET_ARCH".into(), platform.arch().oci_name().into()),
        ("TARGET_TRIPLE".into(), platform.gnu_triple()),
        ("CC".into(), c_compiler(platform)),
    ]
}

/// The commands and environment that build `package` for `platform`.
pub fn commands(
    package: &Package,
    platform: &Platform,
    toolchain: &Toolchain,
) -> Result<BuildCommands, BuilderError> {
    let default_output = format!("/usr/bin/{}", package.name.value);
    match &package.build.value {
        Builder::Files { install } => files(install),
        Builder::Script { run } => Ok(BuildCommands { commands: run.clone(), env: vec![] }),
        Builder::Cc { sources, output, cflags, ldflags } => {
            let output = checked_output(output.as_deref().unwrap_or(&default_output))?;
            let mut cc = vec![c_compiler(platform), "-static".into()];
            cc.extend(cflags.iter().cloned());
            cc.extend(sources.iter().cloned());
            cc.extend(["-o".into(), format!("{OUT}{output}")]);
            cc.extend(ldflags.iter().cloned());
            Ok(BuildCommands { commands: vec![mkdir_parent(&output), join(&cc)], env: vec![] })
        }
        Builder::Go { main, output, ldflags, tags } => {
            let output = checked_output(output.as_deref().unwrap_or(&default_output))?;
            let mut go: Vec<String> =
                ["go", "build", "-trimpath", "-buildvcs=false"].map(String::from).into();
            if let Some(flags) = ldflags {
                go.push(format!("-ldflags={flags}"));
            }
            if !tags.is_empty() {
                go.push(format!("-tags={}", tags.join(",")));
            }
            go.extend(["-o".into(), format!("{OUT}{output}"), main.clone()]);
            let mut env: Vec<(String, String)> = [
                ("CGO_ENABLED", "0"),
                ("GOOS", "linux"),
                ("GOARCH", platform.arch().oci_name()),
                ("GOFLAGS", "-mod=vendor"),
                ("GOPROXY", "off"),
                ("GOTOOLCHAIN", "local"),
                ("GOCACHE", "/tmp/go-cache"),
                ("GOPATH", "/tmp/go"),
                ("GOENV", "off"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
            if let Some(v) = platform.variant().and_then(|v| v.strip_prefix('v'))
                && platform.arch() == Arch::Arm
            {
                env.push(("GOARM".into(), v.into()));
            }
            Ok(BuildCommands { commands: vec![mkdir_parent(&output), join(&go)], env })
        }
        Builder::Cargo { bin, features } => {
            let sysroot = toolchain.rust_sysroot.as_ref().ok_or(BuilderError::NoRustSysroot)?;
            let target = rust_target(platform);
            if !sysroot.join("lib/rustlib").join(&target).join("lib").is_dir() {
                return Err(BuilderError::MissingRustTarget { target, sysroot: sysroot.clone() });
            }
            let bin = bin.clone().unwrap_or_else(|| package.name.value.clone());
            let mut cargo: Vec<String> =
                ["cargo", "build", "--release", "--locked", "--offline"].map(String::from).into();
            cargo.extend(["--target".into(), target.clone(), "--bin".into(), bin.clone()]);
            if !features.is_empty() {
                cargo.push(format!("--features={}", features.join(",")));
            }
            let rustflags = format!(
                "-C target-feature=+crt-static --remap-path-prefix={SRC}=/build/{name} \
                 --remap-path-prefix=/tmp/cargo-home=/cargo",
                name = package.name.value
            );
            let linker_var =
                format!("CARGO_TARGET_{}_LINKER", target.to_uppercase().replace('-', "_"));
            let linker = if platform.arch() == Platform::host().arch() {
                "cc".to_string()
            } else {
                format!("{}-gcc", platform.gnu_triple())
            };
            let env = vec![
                ("CARGO_HOME".into(), "/tmp/cargo-home".into()),
                ("CARGO_TARGET_DIR".into(), "/tmp/target".into()),
                ("CARGO_INCREMENTAL".into(), "0".into()),
                ("RUSTFLAGS".into(), rustflags),
                (linker_var, linker),
            ];
            let built = format!("/tmp/target/{target}/release/{bin}");
            let install = join(&[
                "install".into(),
                "-D".into(),
                "-m".into(),
                "0755".into(),
                built,
                format!("{OUT}/usr/bin/{bin}"),
            ]);
            Ok(BuildCommands { commands: vec![join(&cargo), install], env })
        }
    }
}

/// `install SRC DST mode=`: a file (parents created), or with a trailing `/`
/// a directory copied recursively.
fn files(install: &[Install]) -> Result<BuildCommands, BuilderError> {
    let mut commands = Vec::new();
    for item in install {
        let from = item.from.trim_end_matches('/');
        let inside = !from.is_empty()
            && Path::new(from).components().all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(BuilderError::InstallOutsideSource { from: item.from.clone() });
        }
        let to = checked_output(&item.to)?;
        let dest = format!("{OUT}{}", to.trim_end_matches('/'));
        if item.from.ends_with('/') {
            commands.push(join(&["mkdir".into(), "-p".into(), dest.clone()]));
            commands.push(join(&["cp".into(), "-R".into(), format!("{from}/."), dest.clone()]));
            if let Some(mode) = item.mode {
                let mode = format!("{mode:o}");
                commands.push(format!(
                    "find {} -type f -exec chmod {} {{}} +",
                    quote(&dest),
                    quote(&mode)
                ));
            }
        } else {
            let mode = item.mode.map_or_else(|| "0644".to_string(), |m| format!("{m:04o}"));
            let mode = if item.mode.is_none() {
                // Keep the source's executable bit when no mode is given.
                format!("$(if [ -x {} ]; then echo 0755; else echo {mode}; fi)", quote(from))
            } else {
                quote(&mode)
            };
            commands.push(format!("install -D -m {mode} {} {}", quote(from), quote(&dest)));
        }
    }
    Ok(BuildCommands { commands, env: vec![] })
}

/// An absolute output path without `..`, so that `$out/PATH` stays in `$out`.
fn checked_output(path: &str) -> Result<String, BuilderError> {
    let p = Path::new(path);
    let ok = p.is_absolute() && p.components().all(|c| !matches!(c, Component::ParentDir));
    if ok { Ok(path.to_string()) } else { Err(BuilderError::BadOutput { path: path.to_string() }) }
}

fn mkdir_parent(output: &str) -> String {
    let parent = Path::new(output).parent().map_or("/".into(), |p| p.display().to_string());
    join(&["mkdir".into(), "-p".into(), format!("{OUT}{parent}")])
}

fn join(words: &[String]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(quote("abc/d.c"), "abc/d.c");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("$out"), "'$out'");
    }

    #[test]
    fn compilers_per_platform() {
        let arm64: Platform = "linux/arm64".parse().unwrap();
        assert_eq!(c_compiler(&Platform::host()), "musl-gcc");
        if Platform::host().arch() != Arch::Arm64 {
            assert_eq!(c_compiler(&arm64), "aarch64-linux-gnu-gcc");
        }
        assert_eq!(rust_target(&arm64), "aarch64-unknown-linux-gnu");
        assert_eq!(rust_target(&Platform::linux_amd64()), "x86_64-unknown-linux-gnu");
    }

    #[test]
    fn outputs_stay_in_out() {
        assert!(checked_output("/usr/bin/x").is_ok());
        assert!(checked_output("usr/bin/x").is_err());
        assert!(checked_output("/usr/../../x").is_err());
    }
}
