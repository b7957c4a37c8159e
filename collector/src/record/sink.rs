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
}

impl Sink {
    pub fn send_bytes(&self, b: Vec<u8>) {
        let _ = self.tx.send(SinkMsg::Bytes(b));
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
        let writer = TraceWriter::new(BufWriter::with_capacity(1 << 20, file), 1 << 20).context("writing the trace header")?;
        let handle = std::thread::Builder::new().name("mtrace-sink".into()).spawn(move || run(writer, rx, flush_every))?;
        Ok(SinkThread { sink: Sink { tx }, handle })
    }

    /// Close the channel and wait for the file to be complete. Returns bytes written.
    pub fn finish(self) -> Result<u64> {
        drop(self.sink);
        self.handle.join().map_err(|_| anyhow::anyhow!("the trace writer thread panicked"))?
    }
}

fn run(mut w: TraceWriter<BufWriter<File>>, rx: Receiver<SinkMsg>, flush_every: Duration) -> Result<u64> {
    let mut last = Instant::now();
    loop {
        match rx.recv_timeout(flush_every) {
            Ok(SinkMsg::Bytes(b)) => w.push_encoded(&b).context("writing the trace")?,
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
    file.sync_all().ok();
    Ok(file.metadata().map_or(0, |m| m.len()))
}
