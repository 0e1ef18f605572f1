//! Content digests: the blake3 hash that names every object pkg stores or computes.
//!
//! A [`Digest`] is 32 bytes and prints as `b3:` followed by 64 lowercase hex digits.
//! Parsing accepts exactly that form, so a printed digest always parses back to itself.

use std::fmt;
use std::str::FromStr;

/// The textual prefix of a printed digest.
pub const PREFIX: &str = "b3:";

/// A blake3 digest.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits without the `b3:` prefix, as used in store file names.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

impl From<blake3::Hash> for Digest {
    fn from(hash: blake3::Hash) -> Self {
        Digest(*hash.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDigestError {
    #[error("a digest starts with `{PREFIX}`")]
    MissingPrefix,
    #[error("a digest has 64 lowercase hex digits after `{PREFIX}`")]
    BadHex,
}

impl FromStr for Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.strip_prefix(PREFIX).ok_or(ParseDigestError::MissingPrefix)?;
        Self::from_hex(hex)
    }
}

impl Digest {
    /// Parses the 64 lowercase hex digits of a digest, without prefix.
    pub fn from_hex(hex: &str) -> Result<Self, ParseDigestError> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(ParseDigestError::BadHex);
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Ok(Digest(out))
    }
}

fn nibble(c: u8) -> Result<u8, ParseDigestError> {
    match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(ParseDigestError::BadHex),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_back() {
        let d = Digest::of(b"hello");
        let text = d.to_string();
        assert!(text.starts_with("b3:"));
        assert_eq!(text.len(), 3 + 64);
        assert_eq!(text.parse::<Digest>(), Ok(d));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!("abc".parse::<Digest>(), Err(ParseDigestError::MissingPrefix));
        assert_eq!("b3:zz".parse::<Digest>(), Err(ParseDigestError::BadHex));
        let upper = Digest::of(b"x").to_string().to_uppercase().replace("B3:", "b3:");
        assert_eq!(upper.parse::<Digest>(), Err(ParseDigestError::BadHex));
    }
}
