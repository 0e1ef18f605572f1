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
//! compressed varies. Compressor threads (one per core, started as blocks
//! arrive) each take the next full block from a shared queue as soon as they are
//! free, and a writer thread puts the results back in order, so compression
//! overlaps with producing the tar and keeps every core busy. At most
//! [`WINDOW`] blocks are in flight at once.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use flate2::{Compress, FlushCompress, Status};

/// Bytes per independently compressed block. Costs well under 1% of ratio
/// against one stream (each block restarts with an empty window).
pub const BLOCK: usize = 1024 * 1024;

/// Most blocks in flight (queued, being compressed, or compressed and waiting
/// for an earlier one): bounds memory to about 2 × WINDOW × BLOCK.
const WINDOW: usize = 16;

const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// A block for the compressor threads.
struct Job {
    index: usize,
    data: Vec<u8>,
    last: bool,
}

/// A compressed block for the writer thread.
struct Deflated {
    index: usize,
    last: bool,
    bytes: io::Result<Vec<u8>>,
}

/// A gzip writer that compresses blocks in parallel on threads of its own
/// while the caller produces the next ones; call [`GzWriter::finish`].
///
/// Its threads are plain threads, not rayon's: the producer may itself run on a
/// rayon worker and block on a full window, and compression waiting for those
/// same workers would never finish.
pub struct GzWriter<W: Write + Send + 'static> {
    current: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Input bytes so far, modulo 2^32 (the gzip trailer's ISIZE).
    len: u32,
    level: u32,
    /// Blocks handed to the compressors so far.
    sent: usize,
    jobs: Option<Sender<Job>>,
    queue: Arc<Mutex<Receiver<Job>>>,
    deflated: Option<Sender<Deflated>>,
    /// One message per block the writer has written: room for one more in flight.
    credits: Receiver<()>,
    compressors: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<W>>>,
}

/// Compressor threads per writer: one per core.
fn compressor_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

impl<W: Write + Send + 'static> GzWriter<W> {
    pub fn new(inner: W, level: u32) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (deflated, results) = mpsc::channel::<Deflated>();
        let (credit, credits) = mpsc::channel::<()>();
        let writer = std::thread::spawn(move || write_in_order(inner, results, credit));
        GzWriter {
            current: Vec::with_capacity(BLOCK),
            crc: crc32fast::Hasher::new(),
            len: 0,
            level,
            sent: 0,
            jobs: Some(jobs),
            queue: Arc::new(Mutex::new(queue)),
            deflated: Some(deflated),
            credits,
            compressors: Vec::new(),
            writer: Some(writer),
        }
    }

    fn send(&mut self, data: Vec<u8>, last: bool) -> io::Result<()> {
        // Start compressors as blocks arrive, so a small layer starts only one.
        if self.compressors.len() < compressor_threads().min(self.sent + 1)
            && let Some(deflated) = &self.deflated
        {
            let (queue, deflated, level) = (self.queue.clone(), deflated.clone(), self.level);
            self.compressors.push(std::thread::spawn(move || compress(&queue, &deflated, level)));
        }
        let room = self.sent < WINDOW || self.credits.recv().is_ok();
        let job = Job { index: self.sent, data, last };
        if room && self.jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok()) {
            self.sent += 1;
            return Ok(());
        }
        // The writer stopped early: surface its error.
        self.jobs = None;
        self.deflated = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => Err(e),
            _ => Err(io::Error::other("the gzip writer thread stopped")),
        }
    }

    /// Compresses the rest, writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let last = std::mem::take(&mut self.current);
        self.send(last, true)?;
        // The compressors stop once the queue is empty.
        self.jobs = None;
        self.deflated = None;
        let writer = self.writer.take().expect("finish runs once");
        let mut inner =
            writer.join().map_err(|_| io::Error::other("the gzip writer panicked"))??;
        for compressor in self.compressors.drain(..) {
            compressor.join().map_err(|_| io::Error::other("a gzip compressor panicked"))?;
        }
        inner.write_all(&std::mem::take(&mut self.crc).finalize().to_le_bytes())?;
        inner.write_all(&self.len.to_le_bytes())?;
        Ok(inner)
    }
}

/// A compressor thread: takes the next block from the shared queue, compresses
/// it and hands it to the writer, until the queue closes or the writer stops.
fn compress(queue: &Mutex<Receiver<Job>>, deflated: &Sender<Deflated>, level: u32) {
    loop {
        // The lock is held only while waiting for one job.
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let bytes = deflate_block(&job.data, level, job.last);
        drop(job.data);
        if deflated.send(Deflated { index: job.index, last: job.last, bytes }).is_err() {
            return;
        }
    }
}

/// The writer thread: header, then the blocks in input order, returning one
/// credit per block written.
fn write_in_order<W: Write>(
    mut inner: W,
    results: Receiver<Deflated>,
    credit: Sender<()>,
) -> io::Result<W> {
    inner.write_all(&HEADER)?;
    let mut waiting: BTreeMap<usize, Deflated> = BTreeMap::new();
    let mut next = 0;
    loop {
        let Ok(block) = results.recv() else {
            return Err(io::Error::other("gzip stream ended without its last block"));
        };
        waiting.insert(block.index, block);
        while let Some(block) = waiting.remove(&next) {
            inner.write_all(&block.bytes?)?;
            if block.last {
                return Ok(inner);
            }
            next += 1;
            // The producer may be gone (it dropped the writer): nothing to tell.
            let _ = credit.send(());
        }
    }
}

impl<W: Write + Send + 'static> Write for GzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(BLOCK - self.current.len());
        self.current.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        self.len = self.len.wrapping_add(n as u32);
        if self.current.len() == BLOCK {
            let full = std::mem::replace(&mut self.current, Vec::with_capacity(BLOCK));
            self.send(full, false)?;
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
        for len in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, (WINDOW + 2) * BLOCK + 5] {
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
        let data = vec![7u8; (2 * WINDOW + 1) * BLOCK];
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
