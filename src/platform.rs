//! Target platforms in the OCI spelling: `os/arch[/variant]`, e.g. `linux/arm64`.
//!
//! Only combinations pkg can build for and run are accepted; the spelling of the
//! architecture and variant follows the OCI image index (`amd64`, not `x86_64`).

use std::fmt;
use std::str::FromStr;

/// A platform that pkg knows how to build for.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Platform {
    os: String,
    arch: Arch,
    variant: Option<String>,
}

/// CPU architectures, named as in OCI image indexes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Arch {
    Amd64,
    Arm64,
    Arm,
    I386,
    Ppc64le,
    S390x,
    Riscv64,
}

impl Arch {
    pub const ALL: [Arch; 7] = [
        Arch::Amd64,
        Arch::Arm64,
        Arch::Arm,
        Arch::I386,
        Arch::Ppc64le,
        Arch::S390x,
        Arch::Riscv64,
    ];

    /// The OCI / Go name (`GOARCH`).
    pub const fn oci_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Arm => "arm",
            Arch::I386 => "386",
            Arch::Ppc64le => "ppc64le",
            Arch::S390x => "s390x",
            Arch::Riscv64 => "riscv64",
        }
    }

    /// The GNU name used in target triples and by qemu-user (`aarch64`).
    pub const fn gnu_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
            Arch::Arm => "arm",
            Arch::I386 => "i686",
            Arch::Ppc64le => "powerpc64le",
            Arch::S390x => "s390x",
            Arch::Riscv64 => "riscv64",
        }
    }

    fn variants(self) -> &'static [&'static str] {
        match self {
            Arch::Arm => &["v6", "v7"],
            Arch::Arm64 => &["v8"],
            _ => &[],
        }
    }
}

impl Platform {
    /// `linux/amd64`, the platform of the machines pkg is developed on.
    pub fn linux_amd64() -> Self {
        Platform { os: "linux".into(), arch: Arch::Amd64, variant: None }
    }

    /// The Linux platform of the given architecture, without variant.
    pub fn linux(arch: Arch) -> Self {
        Platform { os: "linux".into(), arch, variant: None }
    }

    pub fn os(&self) -> &str {
        &self.os
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }

    /// The GNU target triple of a Linux platform, e.g. `aarch64-linux-gnu`.
    pub fn gnu_triple(&self) -> String {
        match (self.arch, self.variant.as_deref()) {
            (Arch::Arm, _) => "arm-linux-gnueabihf".to_string(),
            (arch, _) => format!("{}-linux-gnu", arch.gnu_name()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch.oci_name())?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a platform; the message is written to be shown to users.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParsePlatformError {
    #[error("a platform is written `os/arch` or `os/arch/variant`")]
    Shape,
    #[error("unsupported operating system `{0}`: pkg builds for `linux` only")]
    Os(String),
    #[error("unknown architecture `{0}`")]
    Arch(String),
    #[error("architecture `{arch}` has no variant `{variant}`")]
    Variant { arch: &'static str, variant: String },
}

impl FromStr for Platform {
    type Err = ParsePlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('/');
        let (Some(os), Some(arch)) = (parts.next(), parts.next()) else {
            return Err(ParsePlatformError::Shape);
        };
        let variant = parts.next();
        if parts.next().is_some() || os.is_empty() || arch.is_empty() {
            return Err(ParsePlatformError::Shape);
        }
        if os != "linux" {
            return Err(ParsePlatformError::Os(os.to_string()));
        }
        let arch = Arch::ALL
            .into_iter()
            .find(|a| a.oci_name() == arch)
            .ok_or_else(|| ParsePlatformError::Arch(arch.to_string()))?;
        if let Some(v) = variant
            && !arch.variants().contains(&v)
        {
            return Err(ParsePlatformError::Variant {
                arch: arch.oci_name(),
                variant: v.to_string(),
            });
        }
        Ok(Platform { os: os.to_string(), arch, variant: variant.map(str::to_string) })
    }
}

/// The architecture names accepted in platform strings, for "did you mean" help.
pub fn known_arch_names() -> impl Iterator<Item = &'static str> {
    Arch::ALL.into_iter().map(Arch::oci_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in ["linux/amd64", "linux/arm64", "linux/arm/v7", "linux/arm64/v8", "linux/386"] {
            assert_eq!(s.parse::<Platform>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad() {
        assert_eq!("linux".parse::<Platform>(), Err(ParsePlatformError::Shape));
        assert_eq!("linux/amd64/v9/x".parse::<Platform>(), Err(ParsePlatformError::Shape));
        assert!(matches!("darwin/arm64".parse::<Platform>(), Err(ParsePlatformError::Os(_))));
        assert!(matches!("linux/x86_64".parse::<Platform>(), Err(ParsePlatformError::Arch(_))));
        assert!(matches!(
            "linux/amd64/v7".parse::<Platform>(),
            Err(ParsePlatformError::Variant { .. })
        ));
    }

    #[test]
    fn triples() {
        assert_eq!("linux/arm64".parse::<Platform>().unwrap().gnu_triple(), "aarch64-linux-gnu");
        assert_eq!(Platform::linux_amd64().gnu_triple(), "x86_64-linux-gnu");
    }
}
