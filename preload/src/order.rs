//! This image's ordering cells: the table, and the two operations the hooks make on it.
//!
//! What the cells are and why they make every address's history exact is in
//! `mtrace_protocol::order`. Here:
//!
//! * **The table** is `2^bits` 64-bit cells (default 2^18: 2 MiB) of private anonymous memory,
//!   reserved without swap (`MAP_NORESERVE`) and resident only where blocks are freed (a load of
//!   a cell never written maps the shared zero page): one page of cells covers 128 KiB of heap,
//!   the whole table 8 MiB (farther blocks share cells). It is made in the constructor, before the
//!   image registers (events written before that carry no position and touch no cell), named
//!   `[anon:mtrace]`, and its address goes to the collector in the Hello so that the recorder can
//!   leave its resident pages out of the program's RSS. `MADV_WIPEONFORK` gives a fork child a
//!   zeroed table (its streams are new: the parent's positions mean nothing there); where the
//!   kernel lacks it, the child zeroes it with `MADV_DONTNEED`. `MTRACE_ORDER=0` makes none (the
//!   collector then orders threads by liveness and time alone, and says so); `MTRACE_ORDER_CELLS=N`
//!   sets `bits` (10..=28).
//! * **free** ([`exchange`]): one `xchg` of the block's cell with the free event's position,
//!   before the real `free`. `realloc` does the same for its old block before the real call.
//! * **allocation** ([`load`]): one load of the returned block's cell, after the real call.
//!
//! Why an atomic exchange and not a plain load and store: with plain stores, two threads freeing
//! blocks whose addresses share a cell can both read the same predecessor and both store, and the
//! chain loses one of them — a free the next allocation of its address is no longer ordered
//! after. A tag of the address in the cell would detect that, but only as a guess to fall back
//! from. The exchange makes collisions harmless by construction, so the table can stay small.
//! Measured on the 2-core development VM (malloc(32)+free churn, `bench/run` and interleaved
//! A/B runs): the exchange and a plain load + store execute the same number of instructions
//! (303 per pair without stacks, 361 with), and over two series of 9 and 11 interleaved runs their
//! best and median ns per pair differed by at most 2.5 ns in either direction — no measurable cost
//! on this VM, whose speed drifts more than that. Correctness decides: the exchange. The whole
//! ordering (index, exchange or load, the check for another stream) costs 11 instructions per
//! pair over the free stamps it replaced (README, Performance).

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use mtrace_protocol::order;

use crate::sys;

/// The table. Written once, in the constructor, before the image registers (so before any event
/// carries a position and any hook touches a cell); read by every hook after. Atomics (relaxed
/// loads are plain loads on x86_64), so that even a thread another library's constructor started
/// earlier reads no torn value: `CELLS` is stored last, and a reader that saw it but not yet the
/// new `MASK` (0) would use cell 0 — in the table still.
static CELLS: AtomicPtr<AtomicU64> = AtomicPtr::new(core::ptr::null_mut());
/// `2^bits - 1`.
static MASK: AtomicU64 = AtomicU64::new(0);
static BITS: AtomicU32 = AtomicU32::new(0);
/// The kernel wipes the table in a fork child by itself (`MADV_WIPEONFORK`).
static WIPED_ON_FORK: AtomicBool = AtomicBool::new(false);

/// Make the table (the constructor, single-threaded, before registration). `bits`: log2 of the
/// number of cells, `None`: no ordering cells. Leaves the program's `errno` as it was.
pub fn init(bits: Option<u32>) {
    let Some(bits) = bits else { return };
    let errno = sys::errno();
    let bits = bits.clamp(order::MIN_CELL_BITS, order::MAX_CELL_BITS);
    let len = 8usize << bits;
    // SAFETY: a fresh private anonymous mapping of our own.
    let p = unsafe {
        sys::mmap(core::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    };
    if p == libc::MAP_FAILED || p.is_null() {
        sys::warn(&[b"no memory for the ordering cells: threads are ordered by time alone"]);
        sys::set_errno(errno);
        return;
    }
    sys::name_mapping(p, len);
    // SAFETY: madvise on our own mapping.
    let wiped = unsafe { libc::syscall(libc::SYS_madvise, p, len, libc::MADV_WIPEONFORK) } == 0;
    MASK.store((1u64 << bits) - 1, Ordering::Relaxed);
    BITS.store(bits, Ordering::Relaxed);
    WIPED_ON_FORK.store(wiped, Ordering::Relaxed);
    CELLS.store(p as *mut AtomicU64, Ordering::Release);
    sys::set_errno(errno);
}

/// The cells exist (fast paths are allowed only then; see `writer::switch_block`).
#[inline(always)]
pub fn enabled() -> bool {
    !CELLS.load(Ordering::Relaxed).is_null()
}

/// The Hello's `order_table` word: the table's address with `bits` in the low 12 bits (0: none).
pub fn hello_word() -> u64 {
    let cells = CELLS.load(Ordering::Acquire);
    if cells.is_null() { 0 } else { cells as u64 | BITS.load(Ordering::Relaxed) as u64 }
}

/// A fork child: its streams start afresh, so the parent's positions must go.
pub fn fork_child() {
    let cells = CELLS.load(Ordering::Acquire);
    if !cells.is_null() && !WIPED_ON_FORK.load(Ordering::Relaxed) {
        // SAFETY: madvise on our own private anonymous mapping: its pages read as zero again.
        unsafe { libc::syscall(libc::SYS_madvise, cells, 8usize << BITS.load(Ordering::Relaxed), libc::MADV_DONTNEED) };
    }
}

/// The cell of the block at `p`.
///
/// # Safety
/// [`enabled`].
#[inline(always)]
unsafe fn cell(p: u64) -> &'static AtomicU64 {
    // Relaxed: a hook gets here only with a position, from the registration that followed
    // `init`; and any mask read indexes inside the table (see `CELLS`).
    let cells = CELLS.load(Ordering::Relaxed);
    // SAFETY: the index is masked to the table, which lives as long as the process.
    unsafe { &*cells.add(order::cell_index_masked(p, MASK.load(Ordering::Relaxed))) }
}

/// A free (or a realloc's old block): put the position of its event into the block's cell and
/// return what it replaced. Before the real call.
///
/// # Safety
/// [`enabled`].
#[inline(always)]
pub unsafe fn exchange(p: u64, pos: u64) -> u64 {
    // SAFETY: per the contract.
    unsafe { cell(p).swap(pos, Ordering::AcqRel) }
}

/// Start fetching the cell of `p` into the cache, without waiting: a free issues it before it
/// reads the block's chunk header, so that the two cache misses overlap instead of the
/// exchange's (a locked instruction, which waits for every earlier load) coming after the
/// header's.
///
/// # Safety
/// [`enabled`].
#[inline(always)]
pub unsafe fn prefetch(p: u64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: per the contract the cell is inside the table; a prefetch never faults anyway.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(cell(p).as_ptr() as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// An allocation: what the cell of the block it returned holds. After the real call (Acquire:
/// not before the call that handed the block out).
///
/// # Safety
/// [`enabled`].
#[inline(always)]
pub unsafe fn load(p: u64) -> u64 {
    // SAFETY: per the contract.
    unsafe { cell(p).load(Ordering::Acquire) }
}
