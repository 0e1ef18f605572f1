//! OCI documents: image config, manifest and index, built with oci-spec's types
//! and serialised canonically.
//!
//! Invariants:
//! - Every JSON document pkg writes goes through [`canonical_json`]: object keys
//!   sorted by bytes at every depth, no insignificant whitespace. oci-spec keeps
//!   annotations, labels and exposed ports in `HashMap`s, whose iteration order
//!   changes from run to run, so its own serialisation is never written as is.
//! - Times come from the caller (`created`) and are printed as RFC 3339 UTC with
//!   second precision; nothing here reads the clock.

use std::collections::HashMap;
use std::str::FromStr;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, HistoryBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
};

use super::{Compression, ImageConfig, ImageError};
use crate::platform::Platform;

/// Annotation naming an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation holding the creation time.
pub const CREATED: &str = "org.opencontainers.image.created";

/// Serialises `value` with sorted keys and no whitespace.
pub fn canonical_json(value: &impl serde::Serialize) -> Vec<u8> {
    let value = serde_json::to_value(value).expect("OCI documents serialize to JSON");
    let mut out = Vec::new();
    write_canonical(&value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("strings serialize");
                out.push(b':');
                write_canonical(value, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("scalars serialize"),
    }
}

/// `seconds` since the Unix epoch as RFC 3339 UTC, e.g. `1970-01-01T00:00:00Z`.
pub fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// An `oci_spec` digest from a sha256 hex string.
pub fn sha256(hex: &str) -> Result<oci_spec::image::Digest, ImageError> {
    Ok(oci_spec::image::Sha256Digest::from_str(hex)?.into())
}

/// The media type of a layer with `compression`.
pub fn layer_media_type(compression: Compression) -> MediaType {
    match compression {
        Compression::Gzip => MediaType::ImageLayerGzip,
        Compression::Zstd => MediaType::ImageLayerZstd,
    }
}

pub fn oci_platform(platform: &Platform) -> Result<oci_spec::image::Platform, ImageError> {
    let mut builder = PlatformBuilder::default()
        .architecture(Arch::from(platform.arch().oci_name()))
        .os(Os::Linux);
    if let Some(variant) = platform.variant() {
        builder = builder.variant(variant.to_string());
    }
    Ok(builder.build()?)
}

/// One layer as the config and manifest see it.
pub struct LayerDoc<'a> {
    pub digest: &'a str,
    pub diff_id: &'a str,
    pub size: u64,
    pub created_by: String,
}

/// The image config for one platform.
pub fn config(
    image: &ImageConfig,
    platform: &Platform,
    created: i64,
    layers: &[LayerDoc<'_>],
) -> Result<Vec<u8>, ImageError> {
    let mut run = ConfigBuilder::default();
    if let Some(user) = &image.user {
        run = run.user(user.clone());
    }
    if !image.expose.is_empty() {
        run = run.exposed_ports(image.expose.iter().map(|p| p.to_string()).collect::<Vec<_>>());
    }
    if !image.env.is_empty() {
        run = run.env(image.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>());
    }
    if !image.entrypoint.is_empty() {
        run = run.entrypoint(image.entrypoint.clone());
    }
    if !image.cmd.is_empty() {
        run = run.cmd(image.cmd.clone());
    }
    if let Some(workdir) = &image.workdir {
        run = run.working_dir(workdir.clone());
    }
    if !image.labels.is_empty() {
        run = run.labels(image.labels.clone().into_iter().collect::<HashMap<_, _>>());
    }
    let created = rfc3339(created);
    let history = layers
        .iter()
        .map(|l| {
            HistoryBuilder::default()
                .created(created.clone())
                .created_by(l.created_by.clone())
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(layers.iter().map(|l| format!("sha256:{}", l.diff_id)).collect::<Vec<_>>())
        .build()?;
    let mut builder = ImageConfigurationBuilder::default()
        .created(created)
        .architecture(Arch::from(platform.arch().oci_name()))
        .os(Os::Linux)
        .config(run.build()?)
        .rootfs(rootfs)
        .history(history);
    if let Some(variant) = platform.variant() {
        builder = builder.variant(variant.to_string());
    }
    Ok(canonical_json(&builder.build()?))
}

/// The manifest of one platform's image.
pub fn manifest(
    config_digest: &str,
    config_size: u64,
    layers: &[LayerDoc<'_>],
    compression: Compression,
    created: i64,
) -> Result<Vec<u8>, ImageError> {
    let layers = layers
        .iter()
        .map(|l| Ok(Descriptor::new(layer_media_type(compression), l.size, sha256(l.digest)?)))
        .collect::<Result<Vec<_>, ImageError>>()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(MediaType::ImageConfig, config_size, sha256(config_digest)?))
        .layers(layers)
        .annotations(HashMap::from([(CREATED.to_string(), rfc3339(created))]))
        .build()?;
    Ok(canonical_json(&manifest))
}

/// A descriptor of a manifest for one platform, as an index lists it.
pub fn platform_manifest_descriptor(
    digest: &str,
    size: u64,
    platform: &Platform,
) -> Result<Descriptor, ImageError> {
    Ok(DescriptorBuilder::default()
        .media_type(MediaType::ImageManifest)
        .digest(sha256(digest)?)
        .size(size)
        .platform(oci_platform(platform)?)
        .build()?)
}

/// An image index listing `manifests`, with `annotations`.
pub fn index(
    manifests: Vec<Descriptor>,
    annotations: HashMap<String, String>,
) -> Result<Vec<u8>, ImageError> {
    let mut builder = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests);
    if !annotations.is_empty() {
        builder = builder.annotations(annotations);
    }
    Ok(canonical_json(&builder.build()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let value = serde_json::json!({"b": {"z": 1, "a": [ {"y": 2, "x": 3} ]}, "a": "é"});
        assert_eq!(
            String::from_utf8(canonical_json(&value)).unwrap(),
            r#"{"a":"é","b":{"a":[{"x":3,"y":2}],"z":1}}"#
        );
    }
}
