//! The trace writer thread: receives encoded records, cuts them into compressed frames, and
//! writes them to the trace file. Frames are flushed at least every `flush_every`, so a killed
//! recorder loses only the last fraction of a second.

use std::fs::File;
use std::io::BufWriter;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use crate::trace::{Record, TraceWriter};

pub enum SinkMsg {
    /// Encoded records to append.
    Bytes(Vec<u8>),
    /// Write everything received so far to the file, then answer.
    Flush(Sender<()>),
}

/// Handle used by the other recorder threads.
#[derive(Clone)]
pub struct Sink {
    tx: Sender<SinkMsg>,
    /// Buffers the writer is done with, for [`Sink::buffer`].
    spare: Receiver<Vec<u8>>,
}

/// Capacity of the buffers [`Sink::buffer`] hands out.
const BUFFER_CAPACITY: usize = 1 << 20;
/// Spare buffers kept for reuse (beyond them, buffers are freed).
const SPARE_BUFFERS: usize = 8;

impl Sink {
    pub fn send_bytes(&self, b: Vec<u8>) {
        let _ = self.tx.send(SinkMsg::Bytes(b));
    }

    /// An empty buffer to encode records into and pass to [`Sink::send_bytes`]: one the writer
    /// already consumed when there is one. Reusing them keeps the recorder's memory mapped: a
    /// fresh megabyte each time costs 256 page faults, as much CPU as copying the events in.
    pub fn buffer(&self) -> Vec<u8> {
        self.spare.try_recv().unwrap_or_else(|_| Vec::with_capacity(BUFFER_CAPACITY))
    }

    /// Send what `buf` holds to the writer and leave `buf` an empty [`Sink::buffer`].
    pub fn send_buffer(&self, buf: &mut Vec<u8>) {
        self.send_bytes(std::mem::replace(buf, self.buffer()));
    }
    pub fn send(&self, r: &Record) {
        let mut b = Vec::with_capacity(64);
        r.encode(&mut b);
        self.send_bytes(b);
    }
    /// Block until everything sent before is in the file.
    pub fn flush(&self) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(SinkMsg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

pub struct SinkThread {
    pub sink: Sink,
    handle: std::thread::JoinHandle<Result<u64>>,
}

impl SinkThread {
    pub fn start(file: File, flush_every: Duration) -> Result<SinkThread> {
        let (tx, rx) = crossbeam_channel::bounded::<SinkMsg>(256);
        let (spare_tx, spare) = crossbeam_channel::bounded::<Vec<u8>>(SPARE_BUFFERS);
        let mut writer = TraceWriter::new(BufWriter::with_capacity(1 << 20, file), 1 << 20).context("writing the trace header")?;
        // The header reaches the file now, as every frame does once made: a recorder killed at
        // any moment leaves a file that reads as an mtrace trace, up to its last whole frame.
        writer.flush_frame().context("writing the trace header")?;
        let handle = std::thread::Builder::new().name("mtrace-sink".into()).spawn(move || run(writer, rx, spare_tx, flush_every))?;
        Ok(SinkThread { sink: Sink { tx, spare }, handle })
    }

    /// Close the channel and wait for the file to be complete. Returns bytes written.
    pub fn finish(self) -> Result<u64> {
        drop(self.sink);
        self.handle.join().map_err(|_| anyhow::anyhow!("the trace writer thread panicked"))?
    }
}

fn run(mut w: TraceWriter<BufWriter<File>>, rx: Receiver<SinkMsg>, spare: Sender<Vec<u8>>, flush_every: Duration) -> Result<u64> {
    let mut last = Instant::now();
    loop {
        match rx.recv_timeout(flush_every) {
            Ok(SinkMsg::Bytes(mut b)) => {
                w.push_encoded(&b).context("writing the trace")?;
                if b.capacity() == BUFFER_CAPACITY {
                    b.clear();
                    let _ = spare.try_send(b);
                }
            }
            Ok(SinkMsg::Flush(ack)) => {
                w.flush_frame().context("writing the trace")?;
                last = Instant::now();
                let _ = ack.send(());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if last.elapsed() >= flush_every && w.buffered() > 0 {
            w.flush_frame().context("writing the trace")?;
            last = Instant::now();
        }
    }
    let mut out = w.finish().context("writing the trace")?;
    std::io::Write::flush(&mut out).context("writing the trace")?;
    let file = out.into_inner().map_err(|e| e.into_error()).context("writing the trace")?;
    // Not fsynced: the trace is whole in the page cache for whoever reads it next, and a killed
    // recorder loses nothing written; only a crash of the machine could lose its end. An fsync
    // of a 180 MB trace took 78 ms, 6% of a 1.4 s recording.
    Ok(file.metadata().map_or(0, |m| m.len()))
}
