//! Parallel, deterministic gzip (the pigz idea, without shared dictionaries).
//!
//! The input is cut into fixed [`BLOCK`]-byte blocks at fixed offsets. Each block
//! is compressed on its own into raw deflate by miniz_oxide (through flate2,
//! versions pinned in Cargo.toml) at a fixed level; every block but the last ends
//! with a sync flush (an empty stored block, so it ends on a byte boundary and
//! carries no BFINAL bit), the last with BFINAL. Their concatenation is one valid
//! deflate stream, wrapped in a single gzip member (header mtime 0, XFL 0, OS 255;
//! trailer CRC-32 and length of the whole input).
//!
//! Invariant: the output is a pure function of the input bytes and the level.
//! Block boundaries never depend on how `write` is called or on the number of
//! threads, and blocks are written in input order; only *where* a block is
//! compressed varies. A background thread takes full blocks from a bounded
//! queue and compresses whatever is queued (up to [`BATCH`]) in parallel on
//! scoped threads (one per core), so compression overlaps with producing the tar.

use std::io::{self, Write};

use flate2::{Compress, FlushCompress, Status};

/// Bytes per independently compressed block. Costs well under 1% of ratio
/// against one stream (each block restarts with an empty window).
pub const BLOCK: usize = 1024 * 1024;

/// Most blocks queued or compressed together (bounds memory to about 3 × BATCH × BLOCK).
const BATCH: usize = 16;

const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// What the producer sends to the compressing thread.
enum Message {
    Block(Vec<u8>),
    Last(Vec<u8>),
}

/// A gzip writer that compresses blocks in parallel on a background thread
/// (which fans batches out to rayon) while the caller produces the next ones;
/// call [`GzWriter::finish`].
pub struct GzWriter<W: Write + Send + 'static> {
    current: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Input bytes so far, modulo 2^32 (the gzip trailer's ISIZE).
    len: u32,
    sender: Option<std::sync::mpsc::SyncSender<Message>>,
    worker: Option<std::thread::JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> GzWriter<W> {
    pub fn new(inner: W, level: u32) -> Self {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Message>(BATCH);
        let worker = std::thread::spawn(move || compress_stream(inner, level, receiver));
        GzWriter {
            current: Vec::with_capacity(BLOCK),
            crc: crc32fast::Hasher::new(),
            len: 0,
            sender: Some(sender),
            worker: Some(worker),
        }
    }

    fn send(&mut self, message: Message) -> io::Result<()> {
        let sent = self.sender.as_ref().map(|s| s.send(message).is_ok()).unwrap_or(false);
        if sent {
            return Ok(());
        }
        // The worker stopped early: surface its error.
        self.sender = None;
        match self.worker.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => Err(e),
            _ => Err(io::Error::other("the gzip worker thread stopped")),
        }
    }

    /// Compresses the rest, writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let last = std::mem::take(&mut self.current);
        self.send(Message::Last(last))?;
        self.sender = None;
        let worker = self.worker.take().expect("finish runs once");
        let mut inner =
            worker.join().map_err(|_| io::Error::other("the gzip worker panicked"))??;
        inner.write_all(&self.crc.clone().finalize().to_le_bytes())?;
        inner.write_all(&self.len.to_le_bytes())?;
        Ok(inner)
    }
}

/// The compressing thread: header, then blocks in input order, each batch of
/// already-queued blocks compressed in parallel.
fn compress_stream<W: Write>(
    mut inner: W,
    level: u32,
    receiver: std::sync::mpsc::Receiver<Message>,
) -> io::Result<W> {
    inner.write_all(&HEADER)?;
    loop {
        let Ok(first) = receiver.recv() else {
            return Err(io::Error::other("gzip stream ended without its last block"));
        };
        let mut batch = vec![first];
        while batch.len() < BATCH && !matches!(batch.last(), Some(Message::Last(_))) {
            match receiver.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let done = matches!(batch.last(), Some(Message::Last(_)));
        let compressed = compress_batch(&batch, level);
        for block in compressed {
            inner.write_all(&block?)?;
        }
        if done {
            return Ok(inner);
        }
    }
}

/// Compresses a batch on scoped threads of its own, not on rayon: the producer
/// may itself run on a rayon worker and block on the full queue, and a batch
/// waiting for those same workers would never finish.
fn compress_batch(batch: &[Message], level: u32) -> Vec<io::Result<Vec<u8>>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(batch.len());
    let compress = |m: &Message| match m {
        Message::Block(b) => deflate_block(b, level, false),
        Message::Last(b) => deflate_block(b, level, true),
    };
    if threads <= 1 {
        return batch.iter().map(compress).collect();
    }
    let mut results: Vec<Option<io::Result<Vec<u8>>>> = (0..batch.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..batch.len())
                        .step_by(threads)
                        .map(|i| (i, compress(&batch[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (i, result) in handle.join().expect("deflate does not panic") {
                results[i] = Some(result);
            }
        }
    });
    results.into_iter().map(|r| r.expect("every block is compressed once")).collect()
}

impl<W: Write + Send + 'static> Write for GzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.current.len());
        self.current.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        self.len = self.len.wrapping_add(n as u32);
        if self.current.len() == BLOCK {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(BLOCK));
            self.send(Message::Block(full))?;
        }
        Ok(n)
    }

    /// Blocks are only complete at fixed offsets, so there is nothing to flush early.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raw deflate of one block: sync-flushed, or finished when `last`.
fn deflate_block(block: &[u8], level: u32, last: bool) -> io::Result<Vec<u8>> {
    let mut compress = Compress::new(flate2::Compression::new(level), false);
    let mut out = Vec::with_capacity(block.len() / 2 + 1024);
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    loop {
        let consumed = compress.total_in() as usize;
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        let status = compress.compress_vec(&block[consumed..], &mut out, flush)?;
        let done_input = compress.total_in() as usize == block.len();
        match status {
            Status::StreamEnd => return Ok(out),
            // Like zlib: a flush is complete once all input is taken and the
            // output buffer was not filled.
            _ if !last && done_input && out.len() < out.capacity() => return Ok(out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn gzip(data: &[u8], chunk: usize) -> Vec<u8> {
        let mut w = GzWriter::new(Vec::new(), 1);
        for piece in data.chunks(chunk.max(1)) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap()
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data).read_to_end(&mut out).unwrap();
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new().update(b"gz").finalize_xof().fill(&mut out);
        // Half random, half repetitive text.
        for (i, b) in out.iter_mut().enumerate().skip(len / 2) {
            *b = b"layer tar bytes "[i % 16];
        }
        out
    }

    #[test]
    fn round_trips_and_does_not_depend_on_write_sizes_or_threads() {
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, (BATCH + 2) * BLOCK + 5] {
            let data = sample(len);
            let one = gzip(&data, usize::MAX);
            assert_eq!(gunzip(&one), data, "len {len}");
            assert_eq!(gzip(&data, 4097), one, "len {len}");
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            assert_eq!(pool.install(|| gzip(&data, 65_536)), one, "len {len}");
        }
    }

    /// Producers on every rayon worker, each blocking on a full queue, must not
    /// starve the compression they wait for.
    #[test]
    fn producers_on_all_rayon_workers_make_progress() {
        use rayon::prelude::*;
        let data = vec![7u8; (2 * BATCH + 1) * BLOCK];
        let outputs: Vec<Vec<u8>> = (0..rayon::current_num_threads().max(2))
            .into_par_iter()
            .map(|_| gzip(&data, BLOCK))
            .collect();
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(gunzip(&outputs[0]), data);
    }

    #[test]
    fn gzip_command_reads_it() {
        let data = sample(2 * BLOCK + 3);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.gz");
        std::fs::write(&file, gzip(&data, 1000)).unwrap();
        let out = std::process::Command::new("gzip").arg("-dc").arg(&file).output().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, data);
    }
}
