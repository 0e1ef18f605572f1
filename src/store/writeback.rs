//! Early writeback: a large file's data starts going to disk while the file is
//! still being written, so the fsync that later makes it durable (in a
//! [`Staged`](super::Staged) publication) has little left to write.
//!
//! Linux's `sync_file_range(SYNC_FILE_RANGE_WRITE)` would start writeback
//! without waiting, but neither nix nor rustix wraps it and the crate allows no
//! `unsafe` outside the sandbox; instead a background thread calls `fdatasync`
//! on a second handle of the file. Requests made while one runs collapse into
//! the next. Nothing relies on these syncs (durability still comes from the
//! publication's own fsync), so the thread is never waited for: it ends after
//! its current sync once the [`Writeback`] is dropped, and a failure to start
//! it or to sync only loses the head start.

use std::fs::File;
use std::sync::mpsc::{self, SyncSender, TrySendError};

/// Bytes written between two writeback requests: enough for the disk to get
/// sizeable writes, little enough that the final fsync has little left.
pub(crate) const EVERY: u64 = 512 * 1024;

/// Writeback of one file being written; see the module docs.
#[derive(Default)]
pub(crate) struct Writeback {
    /// Bytes written since the last request.
    pending: u64,
    /// Wakes the syncing thread, once started.
    wake: Option<SyncSender<()>>,
    /// Starting the thread failed: do not try again.
    failed: bool,
}

impl Writeback {
    /// Counts `n` more bytes written; true when [`EVERY`] bytes have piled up
    /// since the last request, i.e. when the caller should flush its buffers
    /// and call [`Writeback::start`].
    pub fn wrote(&mut self, n: usize) -> bool {
        self.pending += n as u64;
        self.pending >= EVERY
    }

    /// Asks for what `file` holds so far to be written to disk in the background.
    pub fn start(&mut self, file: &File) {
        self.pending = 0;
        if self.wake.is_none() && !self.failed {
            self.wake = spawn(file);
            self.failed = self.wake.is_none();
        }
        if let Some(wake) = &self.wake
            && let Err(TrySendError::Disconnected(_)) = wake.try_send(())
        {
            self.wake = None;
            self.failed = true;
        }
    }
}

/// The syncing thread for `file`, if a second handle and a thread can be had.
fn spawn(file: &File) -> Option<SyncSender<()>> {
    let file = file.try_clone().ok()?;
    // Room for one request: more, while a sync runs, add nothing.
    let (wake, requests) = mpsc::sync_channel::<()>(1);
    std::thread::Builder::new()
        .name("pkg-writeback".into())
        .spawn(move || {
            while requests.recv().is_ok() {
                if file.sync_data().is_err() {
                    return;
                }
            }
        })
        .ok()?;
    Some(wake)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn asks_every_so_many_bytes_and_never_changes_the_file() {
        let mut file = tempfile::tempfile().unwrap();
        let mut writeback = Writeback::default();
        let chunk = vec![7u8; 64 * 1024];
        let mut requests = 0;
        for _ in 0..32 {
            file.write_all(&chunk).unwrap();
            if writeback.wrote(chunk.len()) {
                writeback.start(&file);
                requests += 1;
            }
        }
        assert_eq!(requests, 32 * chunk.len() as u64 / EVERY);
        drop(writeback);
        assert_eq!(file.metadata().unwrap().len(), 32 * chunk.len() as u64);
    }
}
