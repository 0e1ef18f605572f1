//! Blobs: the on-disk form of one chunk of file content.
//!
//! A blob is named by the blake3 of its *uncompressed* bytes and stored as
//!
//! ```text
//! blob = "pkgB" encoding:u8 raw_len:u64 payload
//! encoding 0: payload is the raw bytes
//! encoding 1: payload is one zstd frame of the raw bytes
//! ```
//!
//! Data that does not compress is stored raw: [`encode`] compresses a chunk's
//! first [`SAMPLE`] bytes as the first block of its frame and only goes on
//! with the rest when that block shrank enough, so incompressible data costs
//! one small block of zstd and compressible data is compressed exactly once.
//! [`decode`] always checks the length and the blake3 of what it produced
//! against the expected digest, so a reader can never receive wrong bytes.

use crate::digest::Digest;

/// Leading bytes of every stored blob.
pub const MAGIC: &[u8; 4] = b"pkgB";
/// Length of the header before the payload.
pub const HEADER_LEN: usize = 4 + 1 + 8;

const RAW: u8 = 0;
const ZSTD: u8 = 1;

/// zstd level for blobs: level 1 is within a few percent of higher levels on
/// build outputs and several times faster.
pub const ZSTD_LEVEL: i32 = 1;
/// How much of a chunk is compressed to decide whether compressing pays.
const SAMPLE: usize = 16 * 1024;
/// A sample must shrink below this fraction (in 1/64ths) to compress the chunk.
const SAMPLE_RATIO_64THS: usize = 60;

/// Content-defined chunking parameters. Files up to [`CHUNK_MAX`] bytes are one chunk.
pub const CHUNK_MIN: usize = 64 * 1024;
pub const CHUNK_AVG: usize = 256 * 1024;
pub const CHUNK_MAX: usize = 1024 * 1024;

/// Bytes read per block by [`Chunker`]: a whole number of chunks is cut from
/// each block and handed out as slices of it, so chunk data is never copied
/// one chunk at a time (fastcdc's `StreamCDC` copies each chunk twice).
const BLOCK: usize = 2 * CHUNK_MAX;

/// Cuts a stream into chunks: the whole stream when it has at most
/// [`CHUNK_MAX`] bytes, else FastCDC 2020 (normalisation level 1) with
/// [`CHUNK_MIN`]/[`CHUNK_AVG`]/[`CHUNK_MAX`]. The cut points are those of
/// `fastcdc::v2020::StreamCDC` with the same parameters: a cut is only searched
/// where at least `CHUNK_MAX` bytes are buffered, or at the end of the stream.
/// Ingest and verification both chunk through this, so chunking is one pure
/// function of the bytes, and it never trusts a file size that may be changing.
pub(crate) struct Chunker<R> {
    reader: R,
    /// Bytes after the last cut, to start the next block with.
    carry: Vec<u8>,
    eof: bool,
    first: bool,
    masks: (u64, u64),
}

/// Consecutive chunks of a stream: `data[range]` for each range in `cuts`.
pub(crate) struct Block {
    pub data: Vec<u8>,
    pub cuts: Vec<std::ops::Range<usize>>,
}

impl Block {
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> {
        self.cuts.iter().map(|r| &self.data[r.clone()])
    }
}

impl<R: std::io::Read> Chunker<R> {
    pub fn new(reader: R) -> Self {
        let masks = fastcdc::v2020::select_masks(CHUNK_AVG, fastcdc::v2020::Normalization::Level1);
        Chunker { reader, carry: Vec::new(), eof: false, first: true, masks }
    }

    /// The next block of whole chunks; one with no cuts means the stream is done.
    pub fn next_block(&mut self) -> std::io::Result<Block> {
        let mut data = Vec::with_capacity(BLOCK.max(self.carry.len()));
        data.append(&mut self.carry);
        if !self.eof {
            use std::io::Read;
            let want = BLOCK.saturating_sub(data.len());
            let got = (&mut self.reader).take(want as u64).read_to_end(&mut data)?;
            self.eof = got < want;
        }
        let first = std::mem::replace(&mut self.first, false);
        if first && self.eof && data.len() <= CHUNK_MAX {
            let cuts =
                if data.is_empty() { Vec::new() } else { std::iter::once(0..data.len()).collect() };
            return Ok(Block { data, cuts });
        }
        let (mask_s, mask_l) = self.masks;
        let mut cuts = Vec::new();
        let mut pos = 0;
        while data.len() - pos >= CHUNK_MAX || (self.eof && pos < data.len()) {
            let (_, n) = fastcdc::v2020::cut(
                &data[pos..],
                CHUNK_MIN,
                CHUNK_AVG,
                CHUNK_MAX,
                mask_s,
                mask_l,
                mask_s << 1,
                mask_l << 1,
            );
            cuts.push(pos..pos + n);
            pos += n;
        }
        self.carry = data[pos..].to_vec();
        data.truncate(pos);
        Ok(Block { data, cuts })
    }
}

/// Why a stored blob is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("not a blob: bad header")]
    BadHeader,
    #[error("unknown blob encoding {0}")]
    UnknownEncoding(u8),
    #[error("zstd payload does not decompress: {0}")]
    Zstd(String),
    #[error("length is {actual} bytes, header says {expected}")]
    LengthMismatch { expected: u64, actual: u64 },
    #[error("content hashes to {actual}, not to its name")]
    HashMismatch { actual: Digest },
}

/// A blob ready to be written: header, then either the raw bytes (borrowed, not
/// copied) or a zstd frame.
pub struct Encoded<'a> {
    header: [u8; HEADER_LEN],
    payload: std::borrow::Cow<'a, [u8]>,
}

impl Encoded<'_> {
    /// The stored form, in the order to write it.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.header, &self.payload]
    }

    pub fn to_vec(&self) -> Vec<u8> {
        [&self.header[..], &self.payload].concat()
    }
}

use zstd::zstd_safe::{self, CCtx, InBuffer, OutBuffer, zstd_sys::ZSTD_EndDirective};

thread_local! {
    /// One zstd context per thread: creating one per chunk shows up in profiles.
    static COMPRESSOR: std::cell::RefCell<Option<CCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// One zstd frame of `raw` (not empty), or `None` when its first [`SAMPLE`]
/// bytes do not shrink below [`SAMPLE_RATIO_64THS`]/64 (or zstd fails). The
/// sample is flushed as the frame's first block and judged by the bytes out so
/// far, so a chunk worth compressing is compressed in one pass.
fn compress_if_worth_it(raw: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            let mut cctx = CCtx::try_create()?;
            cctx.set_parameter(zstd_safe::CParameter::CompressionLevel(ZSTD_LEVEL)).ok()?;
            *cell = Some(cctx);
        }
        let cctx = cell.as_mut()?;
        // Drops whatever frame a previous early exit left open.
        cctx.reset(zstd_safe::ResetDirective::SessionOnly).ok()?;
        cctx.set_pledged_src_size(Some(raw.len() as u64)).ok()?;
        let mut frame = Vec::with_capacity(zstd_safe::compress_bound(raw.len()));
        let mut out = OutBuffer::around(&mut frame);
        let sample = raw.len().min(SAMPLE);
        if sample == raw.len() {
            stream(cctx, &mut out, raw, ZSTD_EndDirective::ZSTD_e_end)?;
            if out.pos() * 64 >= sample * SAMPLE_RATIO_64THS {
                return None;
            }
        } else {
            stream(cctx, &mut out, &raw[..sample], ZSTD_EndDirective::ZSTD_e_flush)?;
            if out.pos() * 64 >= sample * SAMPLE_RATIO_64THS {
                return None;
            }
            stream(cctx, &mut out, &raw[sample..], ZSTD_EndDirective::ZSTD_e_end)?;
        }
        Some(frame)
    })
}

/// Feeds all of `input` to `cctx` and flushes or ends as `end` says.
fn stream(
    cctx: &mut CCtx<'_>,
    out: &mut OutBuffer<'_, Vec<u8>>,
    input: &[u8],
    end: ZSTD_EndDirective,
) -> Option<()> {
    let mut input = InBuffer::around(input);
    loop {
        let left = cctx.compress_stream2(out, &mut input, end).ok()?;
        if left == 0 && input.pos() == input.src.len() {
            return Some(());
        }
    }
}

/// Encodes `raw` for storage, compressing it only when that saves space.
pub fn encode(raw: &[u8]) -> Encoded<'_> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = RAW;
    header[5..].copy_from_slice(&(raw.len() as u64).to_le_bytes());
    let frame = if raw.is_empty() { None } else { compress_if_worth_it(raw) };
    match frame.filter(|f| f.len() < raw.len()) {
        Some(frame) => {
            header[4] = ZSTD;
            Encoded { header, payload: frame.into() }
        }
        None => Encoded { header, payload: raw.into() },
    }
}

/// The uncompressed length a stored blob claims, from its header alone.
pub fn raw_len(stored: &[u8]) -> Result<u64, BlobError> {
    header(stored).map(|(_, len)| len)
}

fn header(stored: &[u8]) -> Result<(u8, u64), BlobError> {
    if stored.len() < HEADER_LEN || &stored[..4] != MAGIC {
        return Err(BlobError::BadHeader);
    }
    let len = u64::from_le_bytes(stored[5..HEADER_LEN].try_into().expect("8 bytes"));
    Ok((stored[4], len))
}

/// Decodes a stored blob and checks that it is the content named `expected`.
pub fn decode(stored: &[u8], expected: &Digest) -> Result<Vec<u8>, BlobError> {
    let mut raw = Vec::new();
    decode_into(stored, expected, &mut Decoder::default(), &mut raw)?;
    Ok(raw)
}

/// What [`decode_into`] keeps between blobs: a zstd context, made on first use.
#[derive(Default)]
pub struct Decoder(Option<zstd::bulk::Decompressor<'static>>);

/// [`decode`] into `raw` (replacing its content), reusing `decoder` and `raw`'s
/// allocation: a reader of many chunks allocates neither per chunk. On error,
/// `raw` holds no unverified byte (it is left empty).
pub fn decode_into(
    stored: &[u8],
    expected: &Digest,
    decoder: &mut Decoder,
    raw: &mut Vec<u8>,
) -> Result<(), BlobError> {
    raw.clear();
    let result = decode_unverified(stored, decoder, raw).and_then(|()| {
        let actual = Digest::of(raw);
        if actual == *expected { Ok(()) } else { Err(BlobError::HashMismatch { actual }) }
    });
    if result.is_err() {
        raw.clear();
    }
    result
}

/// The raw bytes of `stored` into the empty `raw`, length checked, not hashed.
fn decode_unverified(
    stored: &[u8],
    decoder: &mut Decoder,
    raw: &mut Vec<u8>,
) -> Result<(), BlobError> {
    let (encoding, len) = header(stored)?;
    let payload = &stored[HEADER_LEN..];
    match encoding {
        RAW => raw.extend_from_slice(payload),
        ZSTD => {
            // Never allocate more than the header claims, and never trust a claim
            // larger than a chunk can be.
            if len > CHUNK_MAX as u64 {
                return Err(BlobError::LengthMismatch { expected: len, actual: CHUNK_MAX as u64 });
            }
            let zstd_err = |e: std::io::Error| BlobError::Zstd(e.to_string());
            let zstd = match &mut decoder.0 {
                Some(zstd) => zstd,
                empty => empty.insert(zstd::bulk::Decompressor::new().map_err(zstd_err)?),
            };
            raw.reserve(len as usize);
            zstd.decompress_to_buffer(payload, raw).map_err(zstd_err)?;
        }
        other => return Err(BlobError::UnknownEncoding(other)),
    }
    if raw.len() as u64 != len {
        return Err(BlobError::LengthMismatch { expected: len, actual: raw.len() as u64 });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_decoder_and_buffer_serve_many_blobs_and_keep_nothing_unverified() {
        let text = b"hello world ".repeat(1000);
        let random: Vec<u8> =
            (0..50_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let (mut decoder, mut raw) = (Decoder::default(), Vec::new());
        for data in [&text[..], &random, &text, b""] {
            let stored = encode(data).to_vec();
            decode_into(&stored, &Digest::of(data), &mut decoder, &mut raw).unwrap();
            assert_eq!(raw, data);
        }
        let stored = encode(&text).to_vec();
        let err = decode_into(&stored, &Digest::of(b"other"), &mut decoder, &mut raw).unwrap_err();
        assert!(matches!(err, BlobError::HashMismatch { .. }), "{err:?}");
        assert!(raw.is_empty());
    }

    #[test]
    fn text_is_compressed_and_round_trips() {
        let raw = b"hello world ".repeat(1000);
        let stored = encode(&raw).to_vec();
        assert_eq!(stored[4], ZSTD);
        assert!(stored.len() < raw.len() / 10);
        assert_eq!(decode(&stored, &Digest::of(&raw)).unwrap(), raw);
        assert_eq!(raw_len(&stored).unwrap(), raw.len() as u64);
    }

    #[test]
    fn random_data_is_stored_raw() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let raw: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let stored = encode(&raw).to_vec();
        assert_eq!(stored[4], RAW);
        assert_eq!(decode(&stored, &Digest::of(&raw)).unwrap(), raw);
    }

    fn chunk_all(data: &[u8]) -> Vec<Vec<u8>> {
        let mut chunker = Chunker::new(data);
        let mut out = Vec::new();
        loop {
            let block = chunker.next_block().unwrap();
            if block.cuts.is_empty() {
                return out;
            }
            out.extend(block.chunks().map(<[u8]>::to_vec));
        }
    }

    #[test]
    fn chunker_cuts_where_fastcdc_streaming_cuts() {
        let mut data = vec![0u8; 9_000_000];
        blake3::Hasher::new().finalize_xof().fill(&mut data);
        let ours = chunk_all(&data);
        let theirs: Vec<Vec<u8>> =
            fastcdc::v2020::StreamCDC::new(&data[..], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                .map(|c| c.unwrap().data)
                .collect();
        assert!(ours.len() > 10);
        let lens = |v: &Vec<Vec<u8>>| v.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(lens(&ours), lens(&theirs));
        assert!(ours == theirs, "cut points differ");
    }

    #[test]
    fn small_streams_are_one_chunk() {
        assert!(chunk_all(b"").is_empty());
        assert_eq!(chunk_all(b"abc"), [b"abc".to_vec()]);
        let limit = vec![7u8; CHUNK_MAX];
        assert_eq!(chunk_all(&limit).len(), 1);
        assert!(chunk_all(&vec![7u8; CHUNK_MAX + 1]).len() > 1);
    }

    #[test]
    fn empty_round_trips() {
        let stored = encode(b"").to_vec();
        assert_eq!(decode(&stored, &Digest::of(b"")).unwrap(), b"");
    }

    #[test]
    fn any_flipped_byte_is_detected() {
        for raw in [b"abc".repeat(5000), b"xyz".to_vec()] {
            let stored = encode(&raw).to_vec();
            let digest = Digest::of(&raw);
            for i in 0..stored.len() {
                let mut bad = stored.clone();
                bad[i] ^= 0x01;
                assert!(decode(&bad, &digest).is_err(), "flip at {i} not detected");
            }
        }
    }
}
