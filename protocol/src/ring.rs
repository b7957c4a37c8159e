//! The shared-memory ring: one memfd per traced process image, mapped by the process and by the
//! collector.
//!
//! ```text
//! offset 0                  RingHeader (512 B)
//! DESCS_OFFSET              block descriptors:      [BlockDesc; nblocks]     (64 B each)
//! data_offset(..)           block data:             nblocks × block_size    (page aligned)
//! ```
//!
//! * Each application thread owns one block at a time and appends events to it with plain
//!   stores, then publishes the new length with a release store to `BlockDesc::len`. No
//!   read-modify-write happens on the per-event path.
//! * A thread whose block is full marks it `FULL` and takes another: from the free stack, or a
//!   never-used block (`next_unused`). The collector reads every `OWNED` and `FULL` block up to its
//!   published length — partially filled blocks included, so nothing waits for a block to fill —
//!   and returns fully read `FULL` blocks to the free stack, bumping `free_futex`. The stack is
//!   LIFO on purpose: the block a writer gets is the one the collector finished last, already
//!   mapped in the process (no page faults), instead of cycling through the whole ring. The
//!   collector evicts a block's lines from the caches (`clflushopt`) before returning it, so that the
//!   writer's stores do not have to fetch them from the collector's core one by one.
//! * Lossless mode: a thread that finds no free block waits on `free_futex` (a shared futex, not
//!   `FUTEX_PRIVATE`). Lossy mode: it drops its events and counts them instead.
//! * `clock_ns` is written by the collector every tick: it is both the time base of events and
//!   the collector's heartbeat. A waiting thread that sees it stall gives up tracing. The
//!   collector only ever raises it (`fetch_max`). A process that gives up tracing sets it to
//!   `u64::MAX` for good: its threads' fast paths compare it with the clock of their last `Time`
//!   event instead of reading whether tracing is on, and that value sends them all to the slow
//!   path, which sees it is off. No event carries that value.
//!
//! Everything here is `#[repr(C)]`, address-free atomics, valid across processes. The collector
//! must treat every value it reads as untrusted (the application can scribble over the ring).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"MTRING01");
pub const RING_VERSION: u32 = 2;

/// Default block size (bytes). Stamps address words inside a block with 14 bits: ≤ 128 KiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
pub const MAX_BLOCK_SIZE: u32 = 128 << 10;
pub const DEFAULT_RING_SIZE: u64 = 64 << 20;

pub const RING_FLAG_LOSSY: u32 = 1;

pub const COLLECTOR_STARTING: u32 = 0;
pub const COLLECTOR_RUNNING: u32 = 1;
/// The collector is gone or shutting down: writers stop tracing instead of waiting.
pub const COLLECTOR_CLOSED: u32 = 2;

pub const BLOCK_FREE: u32 = 0;
pub const BLOCK_OWNED: u32 = 1;
pub const BLOCK_FULL: u32 = 2;

#[repr(C, align(64))]
pub struct CacheLine<T>(pub T);

#[repr(C)]
pub struct RingHeader {
    pub magic: u64,
    pub version: u32,
    pub block_size: u32,
    pub nblocks: u32,
    pub _r1: u32,
    pub flags: u32,
    pub _r0: u32,
    pub data_offset: u64,
    pub total_size: u64,
    pub _pad0: [u64; 2],
    /// Written by the collector, read by writers.
    pub clock: CacheLine<ClockLine>,
    /// Read-modify-written by writers on their slow path only.
    pub alloc: CacheLine<AllocLine>,
    /// Free stack top: `tag << 32 | (index + 1)`, 0 index = empty; the tag defeats ABA.
    pub free_top: CacheLine<AtomicU64>,
    /// How long writers wait for a stalled collector (written by the collector), and when and
    /// why the process stopped tracing (written by the process, read by the collector).
    pub detach: CacheLine<DetachLine>,
    pub _pad1: [u64; 24],
}

#[repr(C)]
pub struct ClockLine {
    /// CLOCK_MONOTONIC of the collector, in ns; refreshed every tick. `u64::MAX` once the process
    /// stopped tracing (see the module docs).
    pub clock_ns: AtomicU64,
    pub collector_state: AtomicU32,
    /// Incremented by the collector each time it returns blocks to the free queue.
    pub free_futex: AtomicU32,
}

#[repr(C)]
pub struct AllocLine {
    /// Blocks `[next_unused, nblocks)` have never been handed out.
    pub next_unused: AtomicU32,
    /// Stream ids for new threads.
    pub next_stream: AtomicU32,
    /// Writers currently sleeping on `free_futex`.
    pub free_waiters: AtomicU32,
    pub _r: u32,
    pub dropped_events: AtomicU64,
    pub dropped_blocks: AtomicU64,
}

/// Why a process stopped tracing ([`DetachLine::reason`]).
pub mod detach_reason {
    /// The collector closed the ring (it is shutting down or detached this image).
    pub const COLLECTOR_CLOSED: u32 = 1;
    /// A writer waited for a free block and the collector's clock did not move for the timeout.
    pub const NO_HEARTBEAT: u32 = 2;
}

#[repr(C)]
pub struct DetachLine {
    /// Milliseconds a writer waits for a free block while the collector's clock stands still
    /// before the process stops tracing (0: the default, [`DEFAULT_DETACH_TIMEOUT_MS`]). Set by the
    /// collector before the process maps the ring.
    pub timeout_ms: AtomicU32,
    /// [`detach_reason`], 0 while tracing.
    pub reason: AtomicU32,
    /// CLOCK_MONOTONIC of the process when it stopped tracing, in ns (the events' time base).
    pub at_ns: AtomicU64,
    /// Calls the process made after it stopped tracing, as counted by its threads that have
    /// exited since and by the thread that called `exit` (threads still running then are not in
    /// it, nor each thread's call in flight as tracing stopped: a lower bound).
    pub untraced_calls: AtomicU64,
}

/// How long writers wait for a stalled collector by default.
pub const DEFAULT_DETACH_TIMEOUT_MS: u32 = 3000;

/// Per-block descriptor. `stream`, `seq`, `tid` are written by the owner before it publishes
/// `state = OWNED` (release).
#[repr(C, align(64))]
pub struct BlockDesc {
    pub state: AtomicU32,
    /// Bytes of events published in this block.
    pub len: AtomicU32,
    pub stream: AtomicU32,
    /// The owner's block sequence number in its stream (0, 1, 2, …).
    pub seq: AtomicU32,
    pub tid: AtomicU32,
    /// Next block on the free stack (index + 1; 0 = none).
    pub next_free: AtomicU32,
    pub _r: [u32; 10],
}

pub const HEADER_SIZE: usize = core::mem::size_of::<RingHeader>();
pub const DESCS_OFFSET: usize = HEADER_SIZE;

const _: () = assert!(HEADER_SIZE == 512);
const _: () = assert!(core::mem::size_of::<BlockDesc>() == 64);

pub const fn data_offset(nblocks: u32, page: usize) -> usize {
    let end = DESCS_OFFSET + nblocks as usize * core::mem::size_of::<BlockDesc>();
    (end + page - 1) / page * page
}

/// Geometry of a ring: computed by the collector, validated by both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub nblocks: u32,
    pub data_offset: u64,
    pub total_size: u64,
}

impl Geometry {
    /// A ring of about `ring_size` bytes of block data.
    pub fn new(ring_size: u64, block_size: u32) -> Option<Geometry> {
        if block_size < 4096 || block_size > MAX_BLOCK_SIZE || !block_size.is_power_of_two() {
            return None;
        }
        let nblocks = (ring_size / block_size as u64).clamp(4, 1 << 20) as u32;
        let data = data_offset(nblocks, 4096) as u64;
        Some(Geometry {
            block_size,
            nblocks,
            data_offset: data,
            total_size: data + nblocks as u64 * block_size as u64,
        })
    }
}

/// A view of a mapped ring. Both sides build one over their own mapping.
#[derive(Clone, Copy)]
pub struct Ring {
    base: *mut u8,
    geo: Geometry,
}

// SAFETY: the ring only holds a pointer to shared memory that is accessed through atomics (or,
// for block data, by the single owner of a block); it is as thread-safe as the memory it names.
unsafe impl Send for Ring {}
// SAFETY: see `Send`.
unsafe impl Sync for Ring {}

impl Ring {
    /// Initialise a fresh (zeroed) mapping. Collector side.
    ///
    /// # Safety
    /// `base` must point to a writable mapping of at least `geo.total_size` bytes, aligned to a
    /// page, that nobody else uses yet.
    pub unsafe fn init(base: *mut u8, geo: Geometry, flags: u32) -> Ring {
        // SAFETY: the caller guarantees the mapping is ours and large enough.
        unsafe {
            let h = base as *mut RingHeader;
            core::ptr::write_bytes(base, 0, geo.data_offset as usize);
            (*h).magic = RING_MAGIC;
            (*h).version = RING_VERSION;
            (*h).block_size = geo.block_size;
            (*h).nblocks = geo.nblocks;
            (*h).flags = flags;
            (*h).data_offset = geo.data_offset;
            (*h).total_size = geo.total_size;
            let ring = Ring { base, geo };
            (*h).clock.0.collector_state.store(COLLECTOR_RUNNING, Ordering::Release);
            ring
        }
    }

    /// Attach to a mapping initialised by the collector. Returns `None` if the header does not
    /// describe a ring of this version that fits in `len` bytes.
    ///
    /// # Safety
    /// `base` must point to a mapping of at least `len` bytes that stays mapped while the
    /// returned `Ring` (or a copy) is used.
    pub unsafe fn attach(base: *mut u8, len: u64) -> Option<Ring> {
        if len < HEADER_SIZE as u64 {
            return None;
        }
        // SAFETY: `len` covers the header.
        let h = unsafe { &*(base as *const RingHeader) };
        if h.magic != RING_MAGIC || h.version != RING_VERSION {
            return None;
        }
        let geo = Geometry::new(h.nblocks as u64 * h.block_size as u64, h.block_size)?;
        if geo.nblocks != h.nblocks
            || geo.data_offset != h.data_offset
            || geo.total_size != h.total_size
            || geo.total_size > len
        {
            return None;
        }
        Some(Ring { base, geo })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    pub fn base(&self) -> *mut u8 {
        self.base
    }
    pub fn header(&self) -> &RingHeader {
        // SAFETY: `attach`/`init` checked that the mapping holds the header.
        unsafe { &*(self.base as *const RingHeader) }
    }
    pub fn flags(&self) -> u32 {
        self.header().flags
    }
    /// Descriptor of block `i` (`i < nblocks`).
    pub fn desc(&self, i: u32) -> &BlockDesc {
        assert!(i < self.geo.nblocks);
        // SAFETY: bounds checked above; descriptors lie inside the mapping.
        unsafe { &*(self.base.add(DESCS_OFFSET) as *const BlockDesc).add(i as usize) }
    }
    /// Start of block `i`'s data (`i < nblocks`).
    pub fn block_data(&self, i: u32) -> *mut u8 {
        assert!(i < self.geo.nblocks);
        // SAFETY: bounds checked above; data lies inside the mapping.
        unsafe { self.base.add(self.geo.data_offset as usize + i as usize * self.geo.block_size as usize) }
    }

    pub fn clock_ns(&self) -> u64 {
        self.header().clock.0.clock_ns.load(Ordering::Relaxed)
    }

    /// Push a block on the free stack (collector side). `false` if `v` is out of range, or if
    /// the top kept changing for 4096 tries (writers take blocks rarely: only a process
    /// scribbling on its ring can do that, and the collector must not spin for it).
    pub fn push_free(&self, v: u32) -> bool {
        if v >= self.geo.nblocks {
            return false;
        }
        let top = &self.header().free_top.0;
        let mut old = top.load(Ordering::Acquire);
        for _ in 0..4096 {
            self.desc(v).next_free.store((old & 0xffff_ffff) as u32, Ordering::Relaxed);
            let new = ((old >> 32).wrapping_add(1) << 32) | (v as u64 + 1);
            match top.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(cur) => old = cur,
            }
        }
        false
    }

    /// Pop a free block (writer side; many threads).
    pub fn pop_free(&self) -> Option<u32> {
        let top = &self.header().free_top.0;
        let mut old = top.load(Ordering::Acquire);
        loop {
            let idx = (old & 0xffff_ffff) as u32;
            if idx == 0 || idx > self.geo.nblocks {
                return None;
            }
            // Possibly stale if another thread popped it meanwhile: then the tag changed and
            // the exchange below fails.
            let next = self.desc(idx - 1).next_free.load(Ordering::Relaxed);
            let new = ((old >> 32).wrapping_add(1) << 32) | next as u64;
            match top.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(idx - 1),
                Err(cur) => old = cur,
            }
        }
    }

    /// Take a block: a recycled one, else a never-used one. Writer side.
    pub fn take_block(&self) -> Option<u32> {
        if let Some(i) = self.pop_free() {
            if i < self.geo.nblocks {
                return Some(i);
            }
        }
        let a = &self.header().alloc.0;
        let mut n = a.next_unused.load(Ordering::Relaxed);
        while n < self.geo.nblocks {
            match a.next_unused.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(n),
                Err(cur) => n = cur,
            }
        }
        None
    }

    /// Blocks ever handed out: the collector only scans `[0, used_blocks())`.
    pub fn used_blocks(&self) -> u32 {
        self.header().alloc.0.next_unused.load(Ordering::Acquire).min(self.geo.nblocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[repr(C, align(4096))]
    struct Page([u8; 4096]);

    /// Page-aligned zeroed memory standing in for the memfd mapping.
    fn mapping(geo: Geometry) -> Vec<Page> {
        (0..geo.total_size.div_ceil(4096)).map(|_| Page([0; 4096])).collect()
    }

    #[test]
    fn geometry_is_page_aligned_and_fits() {
        let g = Geometry::new(DEFAULT_RING_SIZE, DEFAULT_BLOCK_SIZE).unwrap();
        assert_eq!(g.nblocks, 1024);
        assert_eq!(g.data_offset % 4096, 0);
        assert_eq!(g.total_size, g.data_offset + 1024 * 65536);
        assert!(Geometry::new(1 << 20, 1000).is_none());
    }

    #[test]
    fn attach_validates_header() {
        let g = Geometry::new(1 << 20, 4096).unwrap();
        let mut m = mapping(g);
        let base = m.as_mut_ptr() as *mut u8;
        // SAFETY: `m` is large enough and outlives the rings.
        unsafe {
            Ring::init(base, g, 0);
            assert!(Ring::attach(base, g.total_size).is_some());
            assert!(Ring::attach(base, g.total_size - 1).is_none());
            *(base as *mut u64) = 0;
            assert!(Ring::attach(base, g.total_size).is_none());
        }
    }

    #[test]
    fn blocks_are_handed_out_once_then_recycled() {
        let g = Geometry::new(16 * 4096, 4096).unwrap();
        let mut m = mapping(g);
        // SAFETY: `m` outlives the ring.
        let ring = unsafe { Ring::init(m.as_mut_ptr() as *mut u8, g, 0) };
        let got: Vec<u32> = (0..16).map(|_| ring.take_block().unwrap()).collect();
        assert_eq!(got, (0..16).collect::<Vec<_>>());
        assert_eq!(ring.take_block(), None);
        assert!(ring.push_free(3));
        assert!(ring.push_free(9));
        // LIFO: the block recycled last comes back first.
        assert_eq!(ring.take_block(), Some(9));
        assert_eq!(ring.take_block(), Some(3));
        assert_eq!(ring.take_block(), None);
        assert!(!ring.push_free(16), "out of range");
    }

    /// Many consumer threads race on the free stack while one producer recycles: every push is
    /// popped exactly once.
    #[test]
    fn free_stack_is_exact_under_contention() {
        let g = Geometry::new(64 * 4096, 4096).unwrap();
        let mut m = mapping(g);
        let base = m.as_mut_ptr() as usize;
        // SAFETY: the mapping lives in `m`, which outlives every thread below.
        let ring = unsafe { Ring::init(base as *mut u8, g, 0) };
        while ring.take_block().is_some() {}
        let done = Arc::new(AtomicBool::new(false));
        let (pending_tx, pending_rx) = std::sync::mpsc::channel::<u32>();
        let rounds = 200_000u32;
        let mut handles = Vec::new();
        for _ in 0..4 {
            let done = done.clone();
            let tx = pending_tx.clone();
            handles.push(std::thread::spawn(move || {
                let mut seen = Vec::new();
                loop {
                    if let Some(v) = ring.pop_free() {
                        seen.push(v);
                        tx.send(v).unwrap();
                    } else if done.load(Ordering::Acquire) {
                        return seen;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }));
        }
        // Push every block index `rounds / nblocks` times; a block is pushed again only once it
        // was popped (as the collector only recycles blocks writers gave back).
        let n = g.nblocks;
        let mut pushes = vec![0u32; n as usize];
        let per = rounds / n;
        let mut outstanding = 0u32;
        let mut total = 0u32;
        let mut seen_pops = vec![0u32; n as usize];
        while total < per * n {
            for i in 0..n {
                if pushes[i as usize] < per && pushes[i as usize] == seen_pops[i as usize] {
                    assert!(ring.push_free(i));
                    pushes[i as usize] += 1;
                    total += 1;
                    outstanding += 1;
                }
            }
            // Learn which blocks consumers took (they report through `pending`).
            while let Ok(i) = pending_rx.try_recv() {
                seen_pops[i as usize] += 1;
                outstanding -= 1;
            }
            std::hint::spin_loop();
        }
        while outstanding > 0 {
            if let Ok(i) = pending_rx.recv_timeout(std::time::Duration::from_secs(10)) {
                seen_pops[i as usize] += 1;
                outstanding -= 1;
            } else {
                panic!("a pushed block was never popped");
            }
        }
        done.store(true, Ordering::Release);
        let all: Vec<u32> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        assert_eq!(all.len() as u32, per * n);
        assert_eq!(seen_pops, vec![per; n as usize]);
        drop(m);
    }
}
