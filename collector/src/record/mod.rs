//! Recording: launch a command under `libmtrace.so` (or serve a standalone preload as its agent),
//! move events from the shared-memory rings into a trace file, and sample each process's RSS.
//!
//! Threads:
//! * control (the caller's thread) — the control socket: registrations, Bye, disconnects;
//! * drain — reads every ring, writes chunk and Sync records, recycles blocks, acknowledges Bye,
//!   and finishes images whose process is gone;
//! * ticker — writes the clock into every ring (the events' time base and our heartbeat);
//! * sampler — reads `/proc/<pid>/statm` of every traced process;
//! * smaps — reads `/proc/<pid>/smaps` of every traced process, less often ([`smaps`]);
//! * sink — compresses and writes the trace file.

pub mod image;
pub mod launch;
pub mod server;
pub mod sink;
pub mod smaps;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::trace::{end_reason, session_tag, ProcessEnd, Record, NO_IMAGE};

use image::Image;
use sink::Sink;

/// How to record.
#[derive(Clone, Debug)]
pub struct Options {
    pub output: PathBuf,
    pub sample_period: Duration,
    /// Period of the `/proc/<pid>/smaps` samples (zero: none; see [`smaps`]).
    pub smaps_period: Duration,
    pub tick: Duration,
    /// Pause after every pass over the rings. Each pass reads the cache lines a writer is
    /// working on (its block's descriptor and tail, the clock), so passes must not run back to
    /// back: 200 µs keeps writers' lines their own while data still lands within a fraction of a
    /// millisecond (and publication order, see `analysis::merge`, resolves to one period).
    pub drain_interval: Duration,
    pub lossy: bool,
    pub ring_size: u64,
    /// Most images registered at once (a ring each): the limit on the shared memory the traced
    /// processes can make the recorder hold.
    pub max_rings: u32,
    /// What a traced process waits for a stalled recorder before it stops tracing (written
    /// into each ring: `mtrace_protocol::ring::DetachLine`).
    pub detach_timeout_ms: u32,
    pub block_size: u32,
    /// Standalone agent: acknowledge Bye only once the image's events are on disk.
    pub wait_on_exit: bool,
    /// Standalone agent: also listen as `@mtrace-agent-<pid>` for every pid that registers, so
    /// that its exec'd images and its children find this agent.
    pub pid_aliases: bool,
    /// Environment variables set for the command (the preload's stack settings).
    pub child_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            output: PathBuf::from("mtrace.mtr"),
            sample_period: Duration::from_millis(10),
            smaps_period: Duration::from_millis(100),
            tick: Duration::from_millis(1),
            drain_interval: Duration::from_micros(200),
            lossy: false,
            ring_size: mtrace_protocol::ring::DEFAULT_RING_SIZE,
            max_rings: 512,
            detach_timeout_ms: mtrace_protocol::ring::DEFAULT_DETACH_TIMEOUT_MS,
            block_size: mtrace_protocol::ring::DEFAULT_BLOCK_SIZE,
            wait_on_exit: false,
            pid_aliases: false,
            child_env: Vec::new(),
        }
    }
}

/// State shared by the recorder threads.
pub struct Shared {
    pub opts: Options,
    pub sink: Sink,
    /// Images being recorded (registered and not yet finished).
    pub images: Mutex<Vec<Arc<Image>>>,
    pub next_image: AtomicU32,
    /// Latest image id of each pid seen (to find parents of spawned processes).
    pids: Mutex<HashMap<u32, u32>>,
    /// Stop accepting, detach what is still running, finish.
    stop: AtomicBool,
    /// Set when the drain thread must exit (after `stop` and a final drain).
    drain_exit: AtomicBool,
    pub images_seen: AtomicU32,
    pub images_done: AtomicU32,
    /// The smaps reader's buffer; held while a sample is taken and sent (see [`smaps`]).
    smaps_buf: Mutex<Vec<u8>>,
    pub backlog: Arc<Backlog>,
}

/// The backlog at the start of the drain's last pass over the rings: bytes published and not
/// read yet (what that pass then read), and the traced threads waiting for a free block.
#[derive(Default)]
pub struct Backlog {
    pub bytes: AtomicU64,
    pub writers_waiting: AtomicU64,
}

impl Shared {
    pub fn new(opts: Options, sink: Sink) -> Shared {
        Shared {
            opts,
            sink,
            images: Mutex::new(Vec::new()),
            next_image: AtomicU32::new(0),
            pids: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            drain_exit: AtomicBool::new(false),
            images_seen: AtomicU32::new(0),
            images_done: AtomicU32::new(0),
            smaps_buf: Mutex::new(Vec::new()),
            backlog: Arc::default(),
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn note(&self, image: Option<u32>, text: &str) {
        self.sink.send(&Record::Note { image: image.unwrap_or(NO_IMAGE), text: text.to_string() });
    }

    pub fn remember_pid(&self, pid: u32, image: u32) {
        self.pids.lock().unwrap().insert(pid, image);
        self.images_seen.fetch_add(1, Ordering::AcqRel);
    }

    pub fn last_image_of_pid(&self, _images: &[Arc<Image>], pid: u32) -> Option<u32> {
        self.pids.lock().unwrap().get(&pid).copied()
    }

    pub fn live_images(&self) -> usize {
        self.images.lock().unwrap().len()
    }
}

/// Session record written first in every trace.
pub fn session_record(opts: &Options, command: &[String]) -> Record {
    let mut w = Vec::new();
    let mut tlv = |tag: u16, v: &[u8]| {
        w.extend_from_slice(&tag.to_le_bytes());
        w.extend_from_slice(&(v.len() as u32).to_le_bytes());
        w.extend_from_slice(v);
    };
    tlv(session_tag::MTRACER_VERSION, env!("CARGO_PKG_VERSION").as_bytes());
    for a in command {
        tlv(session_tag::COMMAND_ARG, a.as_bytes());
    }
    tlv(session_tag::START_REALTIME_NS, &crate::clock::realtime_ns().to_le_bytes());
    tlv(session_tag::START_MONOTONIC_NS, &crate::clock::now_ns().to_le_bytes());
    tlv(session_tag::SAMPLE_PERIOD_NS, &(opts.sample_period.as_nanos() as u64).to_le_bytes());
    tlv(session_tag::SMAPS_PERIOD_NS, &(opts.smaps_period.as_nanos() as u64).to_le_bytes());
    tlv(session_tag::LOSSY, &[opts.lossy as u8]);
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        tlv(session_tag::HOSTNAME, h.trim().as_bytes());
    }
    Record::Session(w)
}

/// The background threads of a recording.
pub struct Workers {
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    pub fn start(shared: &Arc<Shared>) -> std::io::Result<Workers> {
        let mut handles = Vec::new();
        let s = shared.clone();
        handles.push(std::thread::Builder::new().name("mtrace-drain".into()).spawn(move || drain_loop(&s))?);
        let s = shared.clone();
        handles.push(std::thread::Builder::new().name("mtrace-ticker".into()).spawn(move || ticker_loop(&s))?);
        let s = shared.clone();
        handles.push(std::thread::Builder::new().name("mtrace-sampler".into()).spawn(move || sampler_loop(&s))?);
        if !shared.opts.smaps_period.is_zero() {
            let s = shared.clone();
            handles.push(std::thread::Builder::new().name("mtrace-smaps".into()).spawn(move || smaps::smaps_loop(&s))?);
        }
        Ok(Workers { handles })
    }

    /// Stop accepting images, finish every image still running (as detached), join.
    pub fn stop(self, shared: &Shared) {
        shared.stop.store(true, Ordering::Release);
        shared.drain_exit.store(true, Ordering::Release);
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Read all rings until told to exit; finish images whose process is gone.
fn drain_loop(shared: &Shared) {
    // Precise short sleeps: the default 50 µs timer slack would stretch a 200 µs period.
    // SAFETY: prctl on the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000usize, 0usize, 0usize, 0usize) };
    let mut buf = shared.sink.buffer();
    loop {
        let exiting = shared.drain_exit.load(Ordering::Acquire);
        let images: Vec<Arc<Image>> = shared.images.lock().unwrap().clone();
        let (mut backlog, mut waiting) = (0u64, 0u64);
        for img in &images {
            waiting += u64::from(img.ring().header().alloc.0.free_waiters.load(Ordering::Relaxed));
            // Each pass also advances the clock: under load, events are time-marked to the pass
            // (tens of µs) instead of the 1 ms tick. The Sync record carries this pass-start clock
            // (see `merge` for how the analysis orders events with it).
            // fetch_max: the ticker may store a value it read before this one; never go back.
            let pass_start = crate::clock::now_ns();
            img.ring().header().clock.0.clock_ns.fetch_max(pass_start, Ordering::AcqRel);
            let mut st = img.drain.lock().unwrap();
            // Decide before reading: a process that is gone publishes nothing more, so what this
            // pass reads is all there is.
            let gone = img.disconnected.load(Ordering::Acquire) && (img.process_gone() || img.superseded.load(Ordering::Acquire));
            let finishing = gone || exiting;
            let pass = img.drain(&mut st, &mut buf, &shared.sink);
            backlog += pass.bytes;
            let now = crate::clock::now_ns();
            if pass.bytes > 0 || now.saturating_sub(st.last_sync_ns) >= 10_000_000 || finishing {
                Record::Sync { image: img.id, time_ns: pass_start }.encode(&mut buf);
                st.last_sync_ns = now;
            }
            if buf.len() >= image::SEND_AT {
                shared.sink.send_buffer(&mut buf);
            }
            if img.ack_wanted.load(Ordering::Acquire) {
                shared.sink.send_buffer(&mut buf);
                shared.sink.flush();
                if let Some(c) = img.conn.lock().unwrap().as_ref() {
                    server::send_bye_ack(std::os::fd::AsRawFd::as_raw_fd(c));
                }
                img.ack_wanted.store(false, Ordering::Release);
            }
            if finishing {
                drop(st);
                finish_image(shared, img, gone, &mut buf);
            }
        }
        shared.backlog.bytes.store(backlog, Ordering::Relaxed);
        shared.backlog.writers_waiting.store(waiting, Ordering::Relaxed);
        if !buf.is_empty() {
            shared.sink.send_buffer(&mut buf);
        }
        if exiting {
            break;
        }
        std::thread::sleep(shared.opts.drain_interval);
    }
}

fn finish_image(shared: &Shared, img: &Arc<Image>, gone: bool, buf: &mut Vec<u8>) {
    img.close_ring();
    let bye = *img.bye.lock().unwrap();
    let (dropped_events, dropped_blocks) = img.dropped().unwrap_or_else(|(e, b)| {
        shared.note(Some(img.id), &format!("the ring's drop counters read {e} events and {b} blocks, though this recording is lossless: the process wrote over its ring (counters ignored)"));
        (0, 0)
    });
    let reason = if img.superseded.load(Ordering::Acquire) {
        end_reason::EXECED
    } else {
        match (gone, bye.is_some()) {
            (true, true) => end_reason::EXITED,
            (true, false) => end_reason::VANISHED,
            (false, _) => end_reason::DETACHED,
        }
    };
    // A process that stopped tracing while we did not answer (stopped, starved): say when, why
    // and what it missed, before its end. (When we closed its ring ourselves, `reason` says so.)
    if let Some((reason, at_ns, untraced_calls)) = img.detached() {
        if reason == mtrace_protocol::ring::detach_reason::NO_HEARTBEAT {
            Record::TracingStopped { image: img.id, reason, time_ns: at_ns, untraced_calls, timeout_ms: shared.opts.detach_timeout_ms }.encode(buf);
        }
    }
    Record::ProcessEnd(ProcessEnd {
        image: img.id,
        reason,
        time_ns: crate::clock::now_ns(),
        // What the process measured at exit, minus what of it is ours, as in the samples.
        // (0, "unknown", if that leaves nothing: the report then takes the last sample.)
        rss_bytes: bye.map_or(0, |b| b.rss_bytes.saturating_sub(img.touched_bytes.load(Ordering::Relaxed) + img.order_resident.load(Ordering::Relaxed))),
        hwm_bytes: bye.map_or(0, |b| b.hwm_bytes),
        dropped_events,
        dropped_blocks,
        status: bye.map_or(-1, |b| b.status),
    })
    .encode(buf);
    shared.images.lock().unwrap().retain(|i| !Arc::ptr_eq(i, img));
    shared.images_done.fetch_add(1, Ordering::AcqRel);
}

/// Write the clock into every ring each tick.
fn ticker_loop(shared: &Shared) {
    // A precise sleeper: the default 50 µs timer slack would make 1 ms ticks ragged.
    // SAFETY: prctl on the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000usize, 0usize, 0usize, 0usize) };
    while !shared.drain_exit.load(Ordering::Acquire) {
        let now = crate::clock::now_ns();
        for img in shared.images.lock().unwrap().iter() {
            img.ring().header().clock.0.clock_ns.fetch_max(now, Ordering::AcqRel);
        }
        std::thread::sleep(shared.opts.tick);
    }
}

/// Sample each traced process's RSS, minus what of it is ours: the ring pages it touched and the
/// resident pages of its ordering cells (read from `/proc/<pid>/pagemap` at most every 100 ms:
/// the table only grows, so between two reads the RSS is over-stated by at most what it grew).
fn sampler_loop(shared: &Shared) {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    let mut next = Instant::now();
    let mut buf = Vec::new();
    // Per image: when its cells were last read, and their resident bytes then.
    let mut cells: rustc_hash::FxHashMap<u32, (Instant, u64)> = Default::default();
    let mut pagemap = Vec::new();
    while !shared.drain_exit.load(Ordering::Acquire) {
        let images: Vec<Arc<Image>> = shared.images.lock().unwrap().clone();
        for img in images.iter().filter(|i| !i.superseded.load(Ordering::Acquire)) {
            if let Some(rss) = read_statm_rss(img.pid, page) {
                let table = match img.order_table {
                    Some((addr, len)) => {
                        let e = cells.entry(img.id).or_insert((Instant::now() - Duration::from_secs(1), 0));
                        if e.0.elapsed() >= Duration::from_millis(100) {
                            *e = (Instant::now(), resident_bytes(img.pid, addr, len, page, &mut pagemap).unwrap_or(e.1));
                            img.order_resident.store(e.1, Ordering::Relaxed);
                        }
                        e.1
                    }
                    None => 0,
                };
                let ours = img.touched_bytes.load(Ordering::Relaxed) + table;
                Record::Rss { image: img.id, time_ns: crate::clock::now_ns(), rss_bytes: rss.saturating_sub(ours) }.encode(&mut buf);
            }
        }
        if !buf.is_empty() {
            shared.sink.send_bytes(std::mem::take(&mut buf));
        }
        next += shared.opts.sample_period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
}

/// Resident bytes of `[addr, addr + len)` in process `pid`, from `/proc/<pid>/pagemap`: pages
/// present (bit 63 of each page's entry) and mapped by this process alone (bit 56) — a page only
/// ever read maps the kernel's shared zero page, which is present but counts in no RSS.
fn resident_bytes(pid: u32, addr: u64, len: u64, page: u64, buf: &mut Vec<u8>) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap")).ok()?;
    let pages = len.div_ceil(page) as usize;
    buf.resize(pages * 8, 0);
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], (addr / page) * 8 + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return None,
        }
    }
    const PRESENT: u64 = 1 << 63;
    const EXCLUSIVE: u64 = 1 << 56;
    let present = buf[..got - got % 8].chunks_exact(8).filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) & (PRESENT | EXCLUSIVE) == PRESENT | EXCLUSIVE).count() as u64;
    Some(present * page)
}

fn read_statm_rss(pid: u32, page: u64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    (pages > 0).then_some(pages * page)
}
