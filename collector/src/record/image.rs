//! One traced process image as the recorder sees it: its ring (a memfd mapped here and in the
//! process), how far each block has been read, and how the image's life is going.
//!
//! Only the drain thread reads blocks; the control thread creates images and updates their
//! connection state; the ticker writes the clock; the sampler reads `pid` and `touched_bytes`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result};
use memmap2::MmapMut;
use mtrace_protocol::control::Bye;
use mtrace_protocol::ring::{self, Geometry, Ring};
use crate::trace::Record;
use rustc_hash::FxHashMap;
use super::sink::Sink;

/// Encoded bytes at which the drain thread hands its buffer to the writer.
pub const SEND_AT: usize = 256 << 10;

pub struct Image {
    pub id: u32,
    pub pid: u32,
    lossy: bool,
    ring: Ring,
    _map: MmapMut,
    /// A pidfd for the process (None if the kernel has none): readable once it exited.
    pidfd: Option<OwnedFd>,
    /// The control connection (a duplicate the drain uses to send ByeAck).
    pub conn: Mutex<Option<OwnedFd>>,
    pub bye: Mutex<Option<Bye>>,
    /// The image asked to be acknowledged once its events are on disk.
    pub ack_wanted: AtomicBool,
    /// The connection is closed (exit, crash, exec, or the program closed our descriptor).
    pub disconnected: AtomicBool,
    /// A new image with the same pid registered: this one was replaced by exec.
    pub superseded: AtomicBool,
    /// Bytes of the ring the process has touched (resident in its RSS; subtracted from samples).
    pub touched_bytes: AtomicU64,
    /// The preload's ordering cells in the process, (address, bytes): their resident pages are
    /// ours too, left out of the RSS samples (see `record::sampler_loop`).
    pub order_table: Option<(u64, u64)>,
    /// Their resident bytes when the sampler last read them.
    pub order_resident: AtomicU64,
    pub drain: Mutex<DrainState>,
}

/// The drain thread's read position in each block, and each stream's next block.
pub struct DrainState {
    blocks: Vec<BlockCursor>,
    streams: FxHashMap<u32, u32>,
    high_water: Vec<u32>,
    /// Nanoseconds of the last Sync record written for this image.
    pub last_sync_ns: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Default)]
struct BlockCursor {
    /// (stream, seq) this cursor follows; None: not reading this block.
    owner: Option<(u32, u32)>,
    read: u32,
}

/// What one pass over a ring found.
#[derive(Default)]
pub struct Pass {
    pub bytes: u64,
    pub recycled: u32,
}

impl Image {
    pub fn new(id: u32, pid: u32, geo: Geometry, lossy: bool, detach_timeout_ms: u32, memfd: &OwnedFd, order_table: Option<(u64, u64)>) -> Result<Image> {
        nix::unistd::ftruncate(memfd, geo.total_size as i64).context("sizing the trace ring")?;
        // Sealed at its size before the process gets it: nobody can shrink it under our mapping
        // (a read past its end would be a SIGBUS) or grow it, or remove the seals.
        // SAFETY: fcntl on a memfd of our own, created with MFD_ALLOW_SEALING.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sealing the trace ring");
        }
        let file = std::fs::File::from(memfd.try_clone().context("duplicating the ring descriptor")?);
        // SAFETY: a memfd of `total_size` bytes, sealed against shrinking (above): the mapping
        // stays backed whatever the traced process does. Its contents are untrusted: the drain
        // validates what it reads.
        let mut map = unsafe { memmap2::MmapOptions::new().len(geo.total_size as usize).map_mut(&file) }.context("mapping the trace ring")?;
        // SAFETY: the mapping is page aligned, `total_size` long and not used by anyone yet.
        let ring = unsafe { Ring::init(map.as_mut_ptr(), geo, if lossy { ring::RING_FLAG_LOSSY } else { 0 }) };
        ring.header().clock.0.clock_ns.store(crate::clock::now_ns(), Ordering::Relaxed);
        ring.header().detach.0.timeout_ms.store(detach_timeout_ms, Ordering::Relaxed);
        // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        let pidfd = (pidfd >= 0).then(|| {
            // SAFETY: a descriptor pidfd_open just returned, owned by nobody else.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd as i32) }
        });
        Ok(Image {
            id,
            pid,
            lossy,
            ring,
            _map: map,
            pidfd,
            conn: Mutex::new(None),
            bye: Mutex::new(None),
            ack_wanted: AtomicBool::new(false),
            disconnected: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            touched_bytes: AtomicU64::new(geo.data_offset),
            order_table,
            order_resident: AtomicU64::new(0),
            drain: Mutex::new(DrainState {
                blocks: vec![BlockCursor::default(); geo.nblocks as usize],
                streams: FxHashMap::default(),
                high_water: vec![0; geo.nblocks as usize],
                last_sync_ns: 0,
                bytes: 0,
            }),
        })
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Has the process exited (zombie or reaped)?
    pub fn process_gone(&self) -> bool {
        if let Some(fd) = &self.pidfd {
            let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, zero timeout.
            let r = unsafe { libc::poll(&mut p, 1, 0) };
            return r > 0;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Err(_) => true,
            Ok(s) => matches!(s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()), Some('Z') | Some('X')),
        }
    }

    /// Read everything newly published in the ring, appending (compressed) chunk records to `out`,
    /// which is handed to `sink` whenever it holds [`SEND_AT`] bytes (so that it keeps its
    /// capacity: a pass that finds many blocks does not grow it). Full blocks that were read
    /// completely go back to the free queue.
    pub fn drain(&self, st: &mut DrainState, out: &mut Vec<u8>, sink: &Sink) -> Pass {
        let ring = &self.ring;
        let geo = ring.geometry();
        let used = ring.used_blocks();
        let mut pass = Pass::default();
        // Everything published before this pass must be read in this pass (the analysis relies on
        // it: see `Sync`). A stream's blocks must be read in sequence order, and a thread may have
        // filled several since the last pass, at any ring indices: visit blocks sorted by
        // (stream, seq).
        let mut order: Vec<(u32, u32, u32)> = Vec::new();
        for i in 0..used {
            let d = ring.desc(i);
            let state = d.state.load(Ordering::Acquire);
            if state == ring::BLOCK_OWNED || state == ring::BLOCK_FULL {
                order.push((d.stream.load(Ordering::Relaxed), d.seq.load(Ordering::Relaxed), i));
            }
        }
        order.sort_unstable();
        for &(stream, seq, i) in &order {
            let d = ring.desc(i);
            let tid = d.tid.load(Ordering::Relaxed);
            let next = *st.streams.entry(stream).or_insert(0);
            if seq != next {
                continue;
            }
            let cur = &mut st.blocks[i as usize];
            if cur.owner != Some((stream, seq)) {
                *cur = BlockCursor { owner: Some((stream, seq)), read: 0 };
            }
            // FULL is published after the last length: read the state first, then the length.
            let full = d.state.load(Ordering::Acquire) == ring::BLOCK_FULL;
            let len = d.len.load(Ordering::Acquire).min(geo.block_size) & !7;
            if len > cur.read {
                let at = ring.block_data(i).wrapping_add(cur.read as usize);
                if !at.cast::<u64>().is_aligned() {
                    // Blocks are page aligned and lengths whole words: not reached.
                    break;
                }
                // SAFETY: `[read, len)` of block `i` was published by its owner (acquire on
                // `len`), lies inside our mapping, is word aligned (checked above) and is never
                // written again while we hold the block (a process that scribbles on it anyway
                // changes only the words we encode: they are validated by whoever decodes them).
                let words = unsafe { std::slice::from_raw_parts(at.cast::<u64>(), ((len - cur.read) / 8) as usize) };
                if out.len() >= SEND_AT {
                    sink.send_buffer(out);
                }
                // Encoded as it is read: the events are not copied first (on a busy machine,
                // the copy and a second pass over it were most of what the recorder cost the
                // program, see the README's Performance). The sink thread compresses the frame.
                Record::encode_chunk(out, self.id, stream, tid, seq, cur.read, words);
                pass.bytes += words.len() as u64 * 8;
                cur.read = len;
                if len > st.high_water[i as usize] {
                    let old = st.high_water[i as usize].div_ceil(4096);
                    st.high_water[i as usize] = len;
                    let new = len.div_ceil(4096);
                    self.touched_bytes.fetch_add((new - old) as u64 * 4096, Ordering::Relaxed);
                }
            }
            if full && cur.read >= len {
                st.streams.insert(stream, seq.wrapping_add(1));
                *cur = BlockCursor::default();
                // SAFETY: `[0, len)` of block `i` lies inside our mapping; nobody writes it until
                // it is back on the free stack (below).
                unsafe { evict(ring.block_data(i), len as usize) };
                d.len.store(0, Ordering::Relaxed);
                d.state.store(ring::BLOCK_FREE, Ordering::Release);
                if ring.push_free(i) {
                    pass.recycled += 1;
                }
            }
        }
        if pass.recycled > 0 {
            let c = &ring.header().clock.0;
            c.free_futex.fetch_add(1, Ordering::Release);
            if ring.header().alloc.0.free_waiters.load(Ordering::Acquire) > 0 {
                // SAFETY: FUTEX_WAKE on a word in our shared mapping (not private: the waiters
                // are in another process).
                unsafe {
                    libc::syscall(libc::SYS_futex, c.free_futex.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32);
                }
            }
        }
        st.bytes += pass.bytes;
        pass
    }

    /// Events the process dropped in lossy mode, and blocks it could not get. A lossless ring
    /// drops nothing: counters there mean the process wrote over its ring, and are `Err` (the
    /// values read, for a note).
    pub fn dropped(&self) -> Result<(u64, u64), (u64, u64)> {
        let a = &self.ring.header().alloc.0;
        let counts = (a.dropped_events.load(Ordering::Relaxed), a.dropped_blocks.load(Ordering::Relaxed));
        if self.lossy || counts == (0, 0) { Ok(counts) } else { Err(counts) }
    }

    /// When and why the process stopped tracing on its own (`writer::detach` in the preload),
    /// and the calls it counted since; `None` while it traces. Untrusted, like the whole ring.
    pub fn detached(&self) -> Option<(u32, u64, u64)> {
        let d = &self.ring.header().detach.0;
        let reason = d.reason.load(Ordering::Acquire);
        (reason != 0).then(|| (reason, d.at_ns.load(Ordering::Relaxed), d.untraced_calls.load(Ordering::Relaxed)))
    }

    /// Tell writers that nobody will read this ring any more.
    pub fn close_ring(&self) {
        let c = &self.ring.header().clock.0;
        c.collector_state.store(ring::COLLECTOR_CLOSED, Ordering::Release);
        c.free_futex.fetch_add(1, Ordering::Release);
        // SAFETY: as in `drain`.
        unsafe {
            libc::syscall(libc::SYS_futex, c.free_futex.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32);
        }
    }
}

/// Whether this CPU has `clflushopt` (CPUID leaf 7, EBX bit 23).
#[cfg(target_arch = "x86_64")]
fn has_clflushopt() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // `__cpuid` is safe from Rust 1.94; the workspace supports 1.88.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only where leaf 0 reports it.
    *HAS.get_or_init(|| unsafe { std::arch::x86_64::__cpuid(0).eax >= 7 && std::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 23) != 0 })
}

/// Push the `len` bytes at `p` (a block just read, about to be recycled) out of every cache
/// (`clflushopt` writes a line back and drops it from all levels, on every core).
///
/// The block goes back to a writer of the traced process, whose next events overwrite it. If its
/// lines were still in our cache, each of the writer's first stores to a line would have to take
/// it from this core (a cross-core transfer the writer's store queue cannot hide: it stalls the
/// application). Evicted lines come from memory, which the writer's hardware prefetcher streams
/// ahead of its stores. Measured on the 2-core VM of the churn benchmark: 15–52 ns per
/// malloc+free pair without this, 10–13 ns with it, for 2 µs of our time per 64 KiB block.
///
/// # Safety
/// `[p, p + len)` is mapped.
unsafe fn evict(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_clflushopt() {
        let mut off = 0;
        while off < len {
            // SAFETY: `p + off` is inside the mapping (per the contract); clflushopt only writes
            // the line back, it changes no memory contents.
            unsafe { std::arch::asm!("clflushopt [{0}]", in(reg) p.add(off), options(nostack, preserves_flags)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}
