//! What the preload reads from glibc's malloc, when the real allocator is glibc's.
//!
//! * The chunk header word below every block (`size | IS_MMAPPED | NON_MAIN_ARENA`), read only on
//!   pointers glibc returned and that are live (after malloc returns, before free runs).
//! * `prev_size` of mmapped chunks (their offset in the mapping), only when IS_MMAPPED is set.
//! * `heap_info` of thread-arena heaps (`ar_ptr`, `size`), after validating the heap: the heap
//!   base must be mapped (checked with `mincore` once per heap) and `ar_ptr` must name an arena we
//!   know or the heap's own arena. Disabled when the hugetlb tunable changes heap alignment.
//! * `__curbrk`, glibc's cached program break (a plain load).

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use mtrace_protocol::event::{self, chunk, EventKind};

use crate::tls::ThreadState;
use crate::writer;

pub struct Glibc {
    /// Chunk headers may be read (the real malloc is glibc's).
    pub chunks: bool,
    /// `heap_info` of thread-arena heaps may be read.
    pub heap_info: bool,
    /// `&__curbrk`, or null.
    pub curbrk: *const u64,
    /// `sizeof(heap_info)`: 48 since glibc 2.35, 32 before.
    pub heap_info_size: u64,
    pub page: u64,
}

pub static mut GLIBC: Glibc =
    Glibc { chunks: false, heap_info: false, curbrk: core::ptr::null(), heap_info_size: 48, page: 4096 };

#[inline(always)]
pub fn g() -> &'static Glibc {
    // SAFETY: written only during initialisation (constructor / fork child), before hooks record.
    unsafe { &*core::ptr::addr_of!(GLIBC) }
}

/// The chunk header word of a live block (0 when unknown).
///
/// # Safety
/// `p` is null or a live pointer returned by the real allocator (not a bootstrap pointer).
#[inline(always)]
pub unsafe fn chunk_header(p: *const u8) -> u64 {
    if p.is_null() || !g().chunks {
        return 0;
    }
    // SAFETY: glibc keeps the size word right below every live block.
    unsafe { *(p as *const u64).sub(1) }
}

/// `prev_size` of an mmapped chunk: its offset inside its mapping.
///
/// # Safety
/// `hdr` has IS_MMAPPED and `p` is that live chunk.
#[inline(always)]
pub unsafe fn mmapped_prev_size(p: *const u8) -> u64 {
    // SAFETY: for mmapped chunks the word at p-16 is the chunk's own prev_size field.
    unsafe { *(p as *const u64).sub(2) }
}

/// A word that stays 0: the fast paths' `curbrk` when glibc's is unknown (`observe_brk` never
/// reports a break then, so `last_brk` stays 0 too and the comparison always passes).
static NO_BRK: u64 = 0;

/// `&__curbrk`, or a word that stays 0 (for the fast paths, which compare without a null check).
pub fn curbrk_or_zero() -> *const u64 {
    let cb = g().curbrk;
    if cb.is_null() { &NO_BRK } else { cb }
}

/// Observe the program break; emit `ProgramBreak` if it moved since this thread last looked.
///
/// # Safety
/// Guard held, `t` this thread's state.
#[inline(always)]
pub unsafe fn observe_brk(t: *mut ThreadState) {
    let cb = g().curbrk;
    if cb.is_null() {
        return;
    }
    // SAFETY: `cb` is glibc's exported `__curbrk`.
    unsafe {
        let b = core::ptr::read_volatile(cb);
        if b != (*t).last_brk {
            (*t).last_brk = b;
            writer::emit(t, 2, |w| {
                *w = event::header(EventKind::ProgramBreak, 2, 0);
                *w.add(1) = b;
            });
        }
    }
}

/// Report the program break even if this thread saw the same value last time: other threads
/// may have moved it and glibc may have moved it back (a thread's exit trims the heap with
/// frees the hooks never see), so only a fresh report is sure to be current.
///
/// # Safety
/// Guard held, `t` this thread's state.
pub unsafe fn report_brk(t: *mut ThreadState) {
    let cb = g().curbrk;
    if cb.is_null() {
        return;
    }
    // SAFETY: `cb` is glibc's exported `__curbrk`; guard held per the contract.
    unsafe {
        let b = core::ptr::read_volatile(cb);
        (*t).last_brk = b;
        writer::emit(t, 2, |w| {
            *w = event::header(EventKind::ProgramBreak, 2, event::PROGRAM_BREAK_FRESH);
            *w.add(1) = b;
        });
    }
}

/// Report the size of every thread-arena heap met so far (0 for one no longer mapped: glibc
/// deleted it), fresh: at exit, when glibc may have trimmed heaps with frees the hooks never saw.
///
/// # Safety
/// Guard held, `t` this thread's state.
pub unsafe fn report_heaps(t: *mut ThreadState) {
    if !g().heap_info {
        return;
    }
    let n = NHEAPS.load(Ordering::Acquire).min(MAX_HEAPS);
    for h in &HEAPS[..n] {
        let base = h.load(Ordering::Relaxed);
        if base == 0 {
            continue;
        }
        let size = if crate::sys::page_is_mapped(base, g().page) {
            // SAFETY: the page at `base` is mapped (just checked) and holds the heap's
            // `heap_info`, whose `size` is the third word.
            unsafe { core::ptr::read_volatile((base + 16) as *const u64) }
        } else {
            0
        };
        // SAFETY: guard held per the contract.
        unsafe {
            writer::emit(t, 3, |w| {
                *w = event::header(EventKind::HeapSize, 3, event::PROGRAM_BREAK_FRESH);
                *w.add(1) = base;
                *w.add(2) = size;
            });
        }
    }
}

// Known thread-arena heaps and arenas, so each heap is validated once per process.
const MAX_HEAPS: usize = 1024;
static HEAPS: [AtomicU64; MAX_HEAPS] = [const { AtomicU64::new(0) }; MAX_HEAPS];
static ARENAS: [AtomicU64; MAX_HEAPS] = [const { AtomicU64::new(0) }; MAX_HEAPS];
static NHEAPS: AtomicUsize = AtomicUsize::new(0);

fn known_heap(base: u64) -> bool {
    let n = NHEAPS.load(Ordering::Acquire).min(MAX_HEAPS);
    HEAPS[..n].iter().any(|h| h.load(Ordering::Relaxed) == base)
}

fn known_arena(ar: u64) -> bool {
    let n = NHEAPS.load(Ordering::Acquire).min(MAX_HEAPS);
    ARENAS[..n].iter().any(|a| a.load(Ordering::Relaxed) == ar)
}

fn remember(base: u64, ar: u64) {
    let i = NHEAPS.fetch_add(1, Ordering::AcqRel);
    if i < MAX_HEAPS {
        ARENAS[i].store(ar, Ordering::Relaxed);
        HEAPS[i].store(base, Ordering::Release);
    }
}

#[repr(C)]
struct HeapInfo {
    ar_ptr: u64,
    prev: u64,
    size: u64,
    mprotect_size: u64,
}

/// Is `base` the first heap of arena `ar` (`ar_ptr` just past `heap_info`)?
fn is_first_heap(base: u64, ar: u64) -> bool {
    ar == base + g().heap_info_size
}

/// Validate a heap base seen for the first time. Slow path (one `mincore` per new heap).
fn validate_heap(base: u64, p: u64) -> Option<HeapInfo> {
    let page = g().page;
    if !crate::sys::page_is_mapped(base, page) {
        return None;
    }
    // SAFETY: the page at `base` is mapped (checked just above).
    let hi = unsafe { core::ptr::read_volatile(base as *const HeapInfo) };
    if hi.size == 0 || hi.size > chunk::HEAP_MAX_SIZE || p - base >= hi.size {
        return None;
    }
    let ar = hi.ar_ptr;
    let ok = is_first_heap(base, ar) || known_arena(ar) || {
        // A later heap of an arena we have not met: the arena lives in its first heap.
        let first = ar & !(chunk::HEAP_MAX_SIZE - 1);
        crate::sys::page_is_mapped(first, page) && {
            // SAFETY: `first` is mapped (checked just above).
            let fh = unsafe { core::ptr::read_volatile(first as *const HeapInfo) };
            is_first_heap(first, fh.ar_ptr) && fh.ar_ptr == ar
        }
    };
    ok.then_some(hi)
}

/// Observe the thread-arena heap holding chunk `p`: announce new heaps and size changes.
///
/// # Safety
/// Guard held; `p` is a live non-main-arena, non-mmapped chunk.
#[inline(always)]
pub unsafe fn observe_heap(t: *mut ThreadState, p: u64) {
    if !g().heap_info {
        return;
    }
    let base = p & !(chunk::HEAP_MAX_SIZE - 1);
    // SAFETY: `t` is this thread's state; the heap holding a live chunk is mapped.
    unsafe {
        if base != (*t).heap {
            if !new_heap_for_thread(t, base, p) {
                return;
            }
        }
        let size = core::ptr::read_volatile((base + 16) as *const u64);
        if size != (*t).heap_size {
            (*t).heap_size = size;
            writer::emit(t, 3, |w| {
                *w = event::header(EventKind::HeapSize, 3, 0);
                *w.add(1) = base;
                *w.add(2) = size;
            });
        }
    }
}

#[cold]
#[inline(never)]
unsafe fn new_heap_for_thread(t: *mut ThreadState, base: u64, p: u64) -> bool {
    if !known_heap(base) {
        let Some(hi) = validate_heap(base, p) else { return false };
        remember(base, hi.ar_ptr);
        // SAFETY: guard held by the caller.
        unsafe {
            writer::emit(t, 5, |w| {
                *w = event::header(EventKind::ArenaHeap, 5, 0);
                *w.add(1) = base;
                *w.add(2) = hi.ar_ptr;
                *w.add(3) = hi.size;
                *w.add(4) = hi.prev;
            });
        }
    }
    // SAFETY: `t` is this thread's state.
    unsafe {
        (*t).heap = base;
        (*t).heap_size = u64::MAX;
    }
    true
}
