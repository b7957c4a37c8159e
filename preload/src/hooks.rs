//! The exported functions that interpose libc's allocator and memory-mapping calls.
//!
//! Every hook forwards to the real function unconditionally — before our constructor ran, after
//! our destructor ran, when tracing is off, or while our own code is on the stack (the guard).
//! Recording happens after the call for everything that returns a block, and before the call for
//! `free` (the chunk header is only readable while the block is live, and the block's ordering
//! cell must be exchanged before glibc can hand the block to another thread).
//!
//! Each call takes one path, in layers:
//! * the entry point forwards, then hands the result to [`record_alloc`] (or records a free in
//!   [`free`] before forwarding it);
//! * a thread with a fast path (`tls::fast`) records in straight-line code: [`alloc_fast`] and
//!   [`free_fast`], specialised by `CHUNKS` (whether glibc's chunk headers are read). Anything
//!   unusual — not a heap chunk, a thread-arena heap to report, a moved break, a full block, a
//!   clock tick — hands the call, before anything is written, to the general path
//!   ([`record_alloc_held`], [`record_free_held`]), which records every case exactly as the fast
//!   path would;
//! * ordering (see `crate::order`): a free exchanges its block's cell, an allocation loads its
//!   block's cell, and the event carries the other thread's position found there.
//!
//! The reentrancy guard is a value, [`Guard`]: taking it marks our code as running on this
//! thread, dropping it releases it.

use core::ffi::{c_int, c_void};
use core::ptr::null_mut;
use core::sync::atomic::Ordering;

use mtrace_protocol::event::{self, chunk, header, EventKind, AUX_CHUNK_MASK, AUX_HAS_AFTER, AUX_HAS_AFTER_OLD, AUX_HAS_PREV_SIZE, AUX_HAS_STACK};
use mtrace_protocol::order::foreign;

use crate::glibc::{self, g};
use crate::order;
use crate::real;
use crate::stacks;
use crate::tls::{self, fast, ThreadState};
use crate::writer::{self, OFF};

/// This thread's reentrancy guard, held. While it lives, hooked calls on this thread — our own,
/// or libc's on our behalf — forward without recording. Dropping it releases it.
struct Guard(*mut ThreadState);

impl Guard {
    /// The guard, if this call is to be recorded: our own code is not running on this thread and
    /// tracing is not off.
    #[inline(always)]
    fn take() -> Option<Guard> {
        let t = tls::state();
        // SAFETY: `t` is this thread's TLS block.
        unsafe {
            if (*t).busy != 0 {
                return None;
            }
            if writer::STATE.load(Ordering::Acquire) == OFF {
                writer::count_untraced(t);
                return None;
            }
            (*t).busy = 1;
        }
        Some(Guard(t))
    }

    /// The guard of a thread whose hook found it free with a fast path set (`tls::fast_ready`).
    ///
    /// # Safety
    /// `t` is this thread's state and its guard is free.
    #[inline(always)]
    unsafe fn take_ready(t: *mut ThreadState) -> Guard {
        // SAFETY: per the contract.
        unsafe { (*t).busy = 1 };
        Guard(t)
    }

    #[inline(always)]
    fn thread(&self) -> *mut ThreadState {
        self.0
    }

    /// Release it at the end of fast path `mode` (`busy` and `fast` in one store: see
    /// `tls::release_fast`).
    #[inline(always)]
    fn release_fast(self, mode: u8) {
        let t = self.0;
        core::mem::forget(self);
        // SAFETY: `t` is this thread's state, whose fast path is `mode` (it took this one).
        unsafe { tls::release_fast(t, mode) }
    }
}

impl Drop for Guard {
    #[inline(always)]
    fn drop(&mut self) {
        // SAFETY: `self.0` is this thread's TLS block.
        unsafe { (*self.0).busy = 0 };
    }
}

/// Is this call to be recorded? (The guard free and tracing not off; nothing taken.)
#[inline(always)]
fn recording() -> bool {
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block.
    unsafe { (*t).busy == 0 && writer::STATE.load(Ordering::Relaxed) != OFF }
}

/// `p`, in a way the optimiser cannot see through. The out-of-line tails of the hooks return the
/// block they were given: without this, LLVM infers that they return their argument and keeps a
/// copy of it in the hook across the call (a callee-saved register and a stack frame) instead of
/// making the call a tail call. Costs no instruction.
#[inline(always)]
fn opaque(p: *mut c_void) -> *mut c_void {
    let mut v = p as usize;
    // SAFETY: an empty asm that "computes" `v` in place: touches no memory, no other register.
    unsafe { core::arch::asm!("/* {0} */", inout(reg) v, options(pure, nomem, nostack, preserves_flags)) };
    v as *mut c_void
}

// ---------------------------------------------------------------------------------------------
// Allocations.

/// Record an allocation call that returned `p` (null on failure) and return `p`: on the
/// thread's fast path if it has one and the call is a malloc or calloc, else on the general
/// path. `sid`: the allocation's stack id, taken before forwarding ([`stacks::before`]; 0: none).
/// Everything after a check is a tail call, so that the hook keeps no state across calls.
///
/// # Safety
/// `p` is null or the live block the real allocator just returned.
#[inline(always)]
unsafe fn record_alloc(kind: EventKind, p: *mut c_void, size: u64, align: u64, sid: u64) -> *mut c_void {
    let t = tls::state();
    // SAFETY: `t` is this thread's state; the guard is checked before anything else is read.
    unsafe {
        let v = tls::guard_and_fast(t);
        if kind.base_words() == 3 && v == tls::ready(fast::CHUNKS) {
            return alloc_fast::<true>(Guard::take_ready(t), kind, p, size, sid);
        }
        // Not tracing: nothing more to do (a load and a count, no call).
        if writer::STATE.load(Ordering::Relaxed) == OFF {
            if v == tls::ready(fast::NONE) {
                writer::count_untraced(t);
            }
            return p;
        }
        if kind.base_words() == 3 && v == tls::ready(fast::PLAIN) {
            return alloc_fast::<false>(Guard::take_ready(t), kind, p, size, sid);
        }
        alloc_unready(kind, p, size, align, sid)
    }
}

/// [`record_alloc`] without a fast path: the guard (if the call is to be recorded), the general
/// path. Out of line, reached by a tail call.
#[inline(never)]
unsafe fn alloc_unready(kind: EventKind, p: *mut c_void, size: u64, align: u64, sid: u64) -> *mut c_void {
    if let Some(g) = Guard::take() {
        // SAFETY: per `record_alloc`; the guard is held.
        unsafe { record_alloc_held(g.thread(), kind, p, size, align, sid) };
    }
    opaque(p)
}

/// The fast path of `malloc` and `calloc` (`kind`): the block's chunk header (`CHUNKS`), its
/// ordering cell, and one event of 3 to 5 words — `w0 ptr size [stack] [after]` — in straight
/// line code, reads first. Whatever else is seen hands the call to [`alloc_general`] before
/// anything is written.
///
/// # Safety
/// `g` is this thread's guard, taken on the fast path `CHUNKS`/`PLAIN` that the thread has;
/// `p` is what the real allocator returned.
#[inline(always)]
unsafe fn alloc_fast<const CHUNKS: bool>(g: Guard, kind: EventKind, p: *mut c_void, size: u64, sid: u64) -> *mut c_void {
    let t = g.thread();
    // SAFETY: `p` is null or a live block; `t` is ours, with a block and `pos_base` (fast path).
    unsafe {
        if p.is_null() {
            return alloc_general(g, kind, p, size, sid);
        }
        let hdr = if CHUNKS {
            match fast_header(t, p, true) {
                Some(h) => h,
                None => return alloc_general(g, kind, p, size, sid),
            }
        } else {
            0
        };
        // As `observe_brk` after the event: a moved break is reported by the general path. Also
        // after a thread-arena allocation, which cannot have moved it: glibc moves it without any
        // hook too (a thread's exit frees its tcache with `__libc_free`, which can trim), and the
        // next allocation of any thread is where that is seen.
        if core::ptr::read_volatile((*t).curbrk) != (*t).last_brk {
            return alloc_general(g, kind, p, size, sid);
        }
        let Some(w) = writer::reserve_fast(t, 5) else { return alloc_general(g, kind, p, size, sid) };
        let after = order::load(p as u64);
        // Usually the cell is empty or names this thread's own events: nothing to add. Checked
        // as "not ours, and not empty" so that the common case is one compare.
        if ((after ^ (*t).pos_base) >> order_shift()) != 0 && after >> order_shift() != 0 {
            return alloc_fast_after::<CHUNKS>(g, kind, p, size, sid, hdr, w, after);
        }
        let has_stack = sid != 0;
        let n = 3 + has_stack as usize;
        // The stack word is stored unconditionally (no branch): beyond `n` nothing is committed.
        *w = header(kind, n, (hdr & AUX_CHUNK_MASK) | if has_stack { AUX_HAS_STACK } else { 0 });
        *w.add(1) = p as u64;
        *w.add(2) = size;
        *w.add(3) = sid;
        writer::commit_at(t, w, n);
        g.release_fast(if CHUNKS { fast::CHUNKS } else { fast::PLAIN });
    }
    p
}

/// The bits below a position's stream id (`mtrace_protocol::order`).
#[inline(always)]
const fn order_shift() -> u32 {
    mtrace_protocol::order::SEQ_BITS + mtrace_protocol::order::WORD_BITS
}

/// [`alloc_fast`] when the block's cell names another thread's event: the event with its `after`
/// word, at the reserved `w`.
#[cold]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
unsafe fn alloc_fast_after<const CHUNKS: bool>(g: Guard, kind: EventKind, p: *mut c_void, size: u64, sid: u64, hdr: u64, w: *mut u64, after: u64) -> *mut c_void {
    let t = g.thread();
    let has_stack = sid != 0;
    let n = 4 + has_stack as usize;
    // SAFETY: per `alloc_fast`: `w` has room for 5 words.
    unsafe {
        *w = header(kind, n, (hdr & AUX_CHUNK_MASK) | AUX_HAS_AFTER | if has_stack { AUX_HAS_STACK } else { 0 });
        *w.add(1) = p as u64;
        *w.add(2) = size;
        *w.add(3) = sid;
        *w.add(n - 1) = after;
        writer::commit_at(t, w, n);
    }
    g.release_fast(if CHUNKS { fast::CHUNKS } else { fast::PLAIN });
    opaque(p)
}

/// The general path of an allocation the fast path did not take: record, release the guard,
/// return `p` (a tail call).
#[cold]
#[inline(never)]
unsafe fn alloc_general(g: Guard, kind: EventKind, p: *mut c_void, size: u64, sid: u64) -> *mut c_void {
    // SAFETY: per `alloc_fast`.
    unsafe {
        no_fast_path_when_off(g.thread());
        record_alloc_held(g.thread(), kind, p, size, 0, sid);
    }
    drop(g);
    opaque(p)
}

/// Tracing stopped (the collector went away, see `writer::detach`): this thread's fast path, which
/// reads no `STATE`, has been failing on the poisoned clock since; turn it off so that the hooks
/// go straight to forwarding.
///
/// # Safety
/// `t` is this thread's state, guard held.
#[inline(always)]
unsafe fn no_fast_path_when_off(t: *mut ThreadState) {
    if writer::STATE.load(Ordering::Relaxed) == OFF {
        // SAFETY: per the contract.
        unsafe { (*t).fast = fast::NONE };
    }
}

/// Record an allocation that returned `p` (null on failure), guard held: every case.
/// `w0(chunk) ptr size [align] [prev_size] [stack] [after]` (see `mtrace_protocol::event`).
///
/// # Safety
/// `t` is this thread's state with the guard held; `p` is null or a live block the real
/// allocator just returned.
#[inline(never)]
unsafe fn record_alloc_held(t: *mut ThreadState, kind: EventKind, p: *mut c_void, size: u64, align: u64, sid: u64) {
    // SAFETY: per the contract.
    unsafe {
        let (mut aux, prev_size) = inspect_new_block(t, p as *const u8);
        if sid != 0 {
            aux |= AUX_HAS_STACK;
        }
        let base = kind.base_words();
        writer::emit_ordered(t, base + 3, |w, _| {
            let after = if !p.is_null() && order::enabled() { order::load(p as u64) } else { 0 };
            let has_after = foreign(after, (*t).pos_base);
            let aux = if has_after { aux | AUX_HAS_AFTER } else { aux };
            let mut i = 1;
            let mut put = |v: u64| {
                *w.add(i) = v;
                i += 1;
            };
            put(p as u64);
            put(size);
            if base == 4 {
                put(align);
            }
            if aux & AUX_HAS_PREV_SIZE != 0 {
                put(prev_size);
            }
            if sid != 0 {
                put(sid);
            }
            if has_after {
                put(after);
            }
            *w = header(kind, i, aux);
            i
        });
        glibc::observe_brk(t);
    }
}

/// What glibc left on a block we are about to report: its chunk header and `prev_size` if it is
/// mmapped (`aux` bits and the word); reports its thread-arena heap if that is new or changed.
///
/// # Safety
/// Guard held; `p` is null or a live block of the real allocator.
#[inline(always)]
unsafe fn inspect_new_block(t: *mut ThreadState, p: *const u8) -> (u64, u64) {
    // SAFETY: per the contract.
    unsafe {
        let hdr = glibc::chunk_header(p);
        let mut aux = hdr & AUX_CHUNK_MASK;
        let mut prev_size = 0;
        if hdr != 0 {
            if chunk::is_mmapped(hdr) {
                aux |= AUX_HAS_PREV_SIZE;
                prev_size = glibc::mmapped_prev_size(p);
            } else if chunk::non_main_arena(hdr) {
                glibc::observe_heap(t, p as u64);
            }
        }
        (aux, prev_size)
    }
}

/// The chunk header of block `p`, if the fast paths may record it; `None`: take the general path
/// (not a heap chunk, or something to report about its thread-arena heap — any heap other than
/// the thread's current one if `any_heap`, as allocations do, else only a size change of the
/// current one, as frees do).
///
/// # Safety
/// `t` is this thread's state with `fast == CHUNKS` (chunk headers may be read); `p` is a non-null
/// live block of the real allocator.
#[inline(always)]
unsafe fn fast_header(t: *mut ThreadState, p: *mut c_void, any_heap: bool) -> Option<u64> {
    // SAFETY: per the contract.
    unsafe {
        let hdr = *(p as *const u64).sub(1);
        // A heap chunk's header: not 0 (the general path's "unknown", and the bootstrap arena's
        // blocks), not mmapped, and within `AUX_CHUNK_MASK` (so it is its own `aux` chunk bits).
        if hdr & !(AUX_CHUNK_MASK & !chunk::IS_MMAPPED) != 0 || hdr == 0 {
            return None;
        }
        if chunk::non_main_arena(hdr) && g().heap_info {
            // As `observe_heap`: a heap other than the thread's current one (allocations), or a
            // size change of the current one, is reported by the general path.
            let base = p as u64 & !(chunk::HEAP_MAX_SIZE - 1);
            if base != (*t).heap {
                if any_heap {
                    return None;
                }
            } else if core::ptr::read_volatile((base + 16) as *const u64) != (*t).heap_size {
                return None;
            }
        }
        Some(hdr)
    }
}

// ---------------------------------------------------------------------------------------------
// Frees.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    let t = tls::state();
    // SAFETY: `t` is this thread's state; the guard is checked before anything else is read.
    // `p` is the application's block, a bootstrap arena block, or null, about to be freed.
    unsafe {
        let v = tls::guard_and_fast(t);
        // The fast paths need no check of `STATE` (see `fast::CHUNKS`).
        if v == tls::ready(fast::CHUNKS) {
            return free_fast::<true>(Guard::take_ready(t), p);
        }
        if v == tls::ready(fast::PLAIN) {
            return free_fast::<false>(Guard::take_ready(t), p);
        }
        // Not tracing: forward (bootstrap blocks never reach the real free).
        if writer::STATE.load(Ordering::Relaxed) == OFF && !real::is_bootstrap(p) {
            if v == tls::ready(fast::NONE) {
                writer::count_untraced(t);
            }
            if let Some(f) = real::free() {
                return f(p);
            }
        }
        free_unready(EventKind::Free, p, 0, 0)
    }
}

/// Record a free without a fast path (the guard if the call is to be recorded, the general
/// path), then forward it. `kind` with its extra arguments `a`, `b` (free_sized's size, …).
/// Out of line, reached by a tail call.
#[inline(never)]
unsafe fn free_unready(kind: EventKind, p: *mut c_void, a: u64, b: u64) {
    if real::is_bootstrap(p) {
        // Never recorded, never given to the real free.
        return;
    }
    if writer::STATE.load(Ordering::Acquire) == OFF && kind == EventKind::Free {
        // Not tracing: nothing to record, nor to observe after the free.
        // SAFETY: forwarding to the real free.
        return unsafe {
            match real::free() {
                Some(f) => f(p),
                None => free_forward(p),
            }
        };
    }
    if let Some(g) = Guard::take() {
        // SAFETY: `p` is the application's block (or null), about to be freed; guard held.
        unsafe { record_free_held(g.thread(), kind, p, a, b) };
    }
    // SAFETY: as above.
    unsafe { forward_free(kind, p, a, b) }
}

/// The fast path of `free`: the block's chunk header (`CHUNKS`), the exchange of its ordering
/// cell with this event's position, and one event of 2 or 3 words — `w0 ptr [after]` — then
/// the real free, a tail call. Whatever else is seen hands the call to [`free_general`] before
/// anything is written.
///
/// # Safety
/// As [`alloc_fast`]; `p` is the application's block, a bootstrap arena block, or null, about
/// to be freed.
#[inline(always)]
unsafe fn free_fast<const CHUNKS: bool>(g: Guard, p: *mut c_void) {
    let t = g.thread();
    // SAFETY: `p` is null or a live block; `t` is ours, with a block and `pos_base` (fast path).
    unsafe {
        if p.is_null() {
            return free_general(g, p);
        }
        // The cell's cache miss overlaps the header's (see `order::prefetch`).
        order::prefetch(p as u64);
        // A bootstrap block's "chunk header" is 0, which `fast_header` rejects; without headers it
        // is looked for.
        let hdr = if CHUNKS {
            // As `record_free_held`: only the thread's current heap is looked at.
            match fast_header(t, p, false) {
                Some(h) => h,
                None => return free_general(g, p),
            }
        } else {
            if real::is_bootstrap(p) {
                return free_general(g, p);
            }
            0
        };
        let Some(w) = writer::reserve_fast(t, 3) else { return free_general(g, p) };
        // This event's position goes into the cell before the block goes back to glibc.
        let pos = (*t).pos_base | ((w as usize - (*t).base as usize) / 8) as u64;
        let prev = order::exchange(p as u64, pos);
        // As in `alloc_fast`: usually empty or ours.
        if ((prev ^ pos) >> order_shift()) != 0 && prev >> order_shift() != 0 {
            return free_fast_after::<CHUNKS>(g, p, hdr, w, prev);
        }
        *w = header(EventKind::Free, 2, hdr & AUX_CHUNK_MASK);
        *w.add(1) = p as u64;
        writer::commit_at(t, w, 2);
        g.release_fast(if CHUNKS { fast::CHUNKS } else { fast::PLAIN });
        free_recorded(p, hdr)
    }
}

/// [`free_fast`] when the exchange replaced another thread's position: the event with its
/// `after` word, at the reserved `w`; then the real free.
#[cold]
#[inline(never)]
unsafe fn free_fast_after<const CHUNKS: bool>(g: Guard, p: *mut c_void, hdr: u64, w: *mut u64, prev: u64) {
    let t = g.thread();
    // SAFETY: per `free_fast`: `w` has room for 3 words.
    unsafe {
        *w = header(EventKind::Free, 3, (hdr & AUX_CHUNK_MASK) | AUX_HAS_AFTER);
        *w.add(1) = p as u64;
        *w.add(2) = prev;
        writer::commit_at(t, w, 3);
        g.release_fast(if CHUNKS { fast::CHUNKS } else { fast::PLAIN });
        free_recorded(p, hdr)
    }
}

/// The general path of a `free` the fast path did not take: record, release the guard, forward.
#[cold]
#[inline(never)]
unsafe fn free_general(g: Guard, p: *mut c_void) {
    // SAFETY: per `free_fast`.
    unsafe {
        if real::is_bootstrap(p) {
            // Never recorded, never given to the real free (the fast path let it through).
            return;
        }
        no_fast_path_when_off(g.thread());
        record_free_held(g.thread(), EventKind::Free, p, 0, 0);
        drop(g);
        free_forward(p)
    }
}

/// Record a free of `p` (before the real free runs), guard held: every case. Exchanges the
/// block's ordering cell with the event's position. `w0(chunk) ptr [a] [b] [after]`.
///
/// # Safety
/// `t` is this thread's state with the guard held; `p` is null or a live block about to be freed.
#[inline(never)]
unsafe fn record_free_held(t: *mut ThreadState, kind: EventKind, p: *mut c_void, a: u64, b: u64) {
    // SAFETY: per the contract.
    unsafe {
        let hdr = glibc::chunk_header(p as *const u8);
        // Only the thread's own current heap: frees of other arenas' chunks (cross-thread frees)
        // would make the one-entry cache thrash. Shrinks show up at the next allocation.
        if hdr != 0 && !chunk::is_mmapped(hdr) && chunk::non_main_arena(hdr) && (p as u64 & !(chunk::HEAP_MAX_SIZE - 1)) == (*t).heap {
            glibc::observe_heap(t, p as u64);
        }
        let base = kind.base_words();
        writer::emit_ordered(t, base + 1, |w, pos| {
            let prev = if pos != 0 && !p.is_null() { order::exchange(p as u64, pos) } else { 0 };
            let has_after = foreign(prev, pos);
            let n = base + has_after as usize;
            *w = header(kind, n, (hdr & AUX_CHUNK_MASK) | if has_after { AUX_HAS_AFTER } else { 0 });
            *w.add(1) = p as u64;
            if base > 2 {
                *w.add(2) = a;
            }
            if base > 3 {
                *w.add(3) = b;
            }
            *w.add(base) = prev;
            n
        });
    }
}

/// Forward a recorded free of the chunk with header `hdr`. A thread-arena chunk's free cannot
/// move the program break (glibc trims thread-arena heaps with `mmap`/`madvise`, and only the
/// main arena with `sbrk`): nothing to observe after it, so the real free is a tail call. (A move
/// made meanwhile, by another thread or by glibc without a hook, is seen at the next allocation.)
///
/// # Safety
/// `p` is the application's block, recorded on this thread's fast path, guard released.
#[inline(always)]
unsafe fn free_recorded(p: *mut c_void, hdr: u64) {
    if chunk::non_main_arena(hdr) {
        // SAFETY: forwarding to the real free, present on a fast path (see `real::free_present`).
        return unsafe { real::free_present()(p) };
    }
    // SAFETY: per the contract.
    unsafe { free_forward(p) }
}

/// Forward a `free` to the real one, then report a program break it moved. Out of line: the
/// `free` hook jumps here, and so keeps no stack frame of its own.
#[inline(never)]
unsafe fn free_forward(p: *mut c_void) {
    match real::free() {
        // SAFETY: forwarding to the real free.
        Some(f) => unsafe { f(p) },
        None => {
            if real::ensure_resolved() {
                // SAFETY: resolved now.
                if let Some(f) = real::free() {
                    unsafe { f(p) }
                }
            }
        }
    }
    after_free();
}

/// Forward `free`, `free_sized` or `free_aligned_sized` (the latter two to `free` where the libc
/// has none), then report a program break that moved.
///
/// # Safety
/// `p` is the application's block (or null), about to be freed.
unsafe fn forward_free(kind: EventKind, p: *mut c_void, a: u64, b: u64) {
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: per the contract.
    unsafe {
        match kind {
            EventKind::FreeSized if real::free_sized().is_some() => real::free_sized().unwrap_unchecked()(p, a as usize),
            EventKind::FreeAlignedSized if real::free_aligned_sized().is_some() => real::free_aligned_sized().unwrap_unchecked()(p, a as usize, b as usize),
            _ => return free_forward(p),
        }
    }
    after_free();
}

/// After a free: report a program break that moved (systrim). A load and a compare.
#[inline(always)]
fn after_free() {
    let cb = g().curbrk;
    if cb.is_null() {
        return;
    }
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block; `cb` is glibc's `__curbrk`.
    unsafe {
        if core::ptr::read_volatile(cb) != (*t).last_brk && (*t).busy == 0 {
            if let Some(g) = Guard::take() {
                glibc::observe_brk(g.thread());
            }
        }
    }
}

/// Record a call with fixed words (mmap family, mallopt, …).
#[inline(always)]
fn record_words<const N: usize>(words: [u64; N]) {
    if let Some(g) = Guard::take() {
        // SAFETY: guard held; `emit` gets exactly N words.
        unsafe {
            writer::emit(g.thread(), N, |w| core::ptr::copy_nonoverlapping(words.as_ptr(), w, N));
            glibc::observe_brk(g.thread());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The malloc family's entry points.

#[cold]
fn unresolved_alloc(size: usize, align: usize) -> Option<*mut c_void> {
    if real::ensure_resolved() { None } else { Some(real::bootstrap_alloc(size, align)) }
}

/// `malloc` before the real functions are resolved.
#[cold]
#[inline(never)]
unsafe fn malloc_unresolved(size: usize) -> *mut c_void {
    let p = match unresolved_alloc(size, 16) {
        Some(p) => return p,
        // SAFETY: resolved now.
        None => unsafe { real::malloc().map_or(null_mut(), |f| f(size)) },
    };
    // SAFETY: `p` came from the real malloc.
    unsafe { record_alloc(EventKind::Malloc, p, size as u64, 0, 0) }
}

unsafe extern "C" fn malloc_impl(size: usize) -> *mut c_void {
    if stacks::enabled() {
        // SAFETY: the caller's argument.
        return unsafe { malloc_stacked(size) };
    }
    let p = match real::malloc() {
        // SAFETY: forwarding to the real malloc.
        Some(f) => unsafe { f(size) },
        // SAFETY: forwarded and recorded there.
        None => return unsafe { malloc_unresolved(size) },
    };
    // SAFETY: `p` came from the real malloc.
    unsafe { record_alloc(EventKind::Malloc, p, size as u64, 0, 0) }
}

unsafe extern "C" fn calloc_impl(nmemb: usize, size: usize) -> *mut c_void {
    if stacks::enabled() {
        // SAFETY: the caller's arguments.
        return unsafe { calloc_stacked(nmemb, size) };
    }
    let total = nmemb.checked_mul(size);
    let p = match real::calloc() {
        // SAFETY: forwarding to the real calloc.
        Some(f) => unsafe { f(nmemb, size) },
        None => match unresolved_alloc(total.unwrap_or(usize::MAX), 16) {
            Some(p) => return p, // the arena is zeroed and never reused
            // SAFETY: resolved now.
            None => unsafe { real::calloc().map_or(null_mut(), |f| f(nmemb, size)) },
        },
    };
    // SAFETY: `p` came from the real calloc.
    unsafe { record_alloc(EventKind::Calloc, p, total.map_or(u64::MAX, |t| t as u64), 0, 0) }
}

/// [`stacks::before`] for the malloc and calloc hooks with stacks on: when a fast path will record
/// the call (guard free, a block), the memo hit inline.
#[inline(always)]
fn stacked_before(size: u64) -> u64 {
    let t = tls::state();
    // SAFETY: `t` is this thread's state; the checks are `before_ready`'s contract (stacks are on
    // in the callers).
    unsafe {
        if tls::fast_ready(t) {
            return stacks::before_ready(t, size);
        }
    }
    stacks::before(size)
}

/// `malloc` with stacks on. The stack is taken *before* forwarding ([`stacks::before`]: guard
/// taken and released around it, nothing done before registration), so that the allocation's
/// event is written and published right after the real call, as without stacks: the collector
/// orders other threads' calls (and `mallinfo2` checkpoints) against it by time marks and
/// publication, and an unwind between the call and its event would put it out of order. Also the
/// trampoline's target for a thread with a stack state.
#[inline(never)]
unsafe extern "C" fn malloc_stacked(size: usize) -> *mut c_void {
    let sid = stacked_before(size as u64);
    // SAFETY: forwarding to the real malloc (resolved: stacks are on only once registered).
    let p = unsafe { real::malloc().map_or(null_mut(), |f| f(size)) };
    // SAFETY: `p` came from the real malloc.
    unsafe { record_alloc(EventKind::Malloc, p, size as u64, 0, sid) }
}

/// `calloc` with stacks on: the stack first (see [`malloc_stacked`]). Also the trampoline's
/// target for a thread with a stack state.
#[inline(never)]
unsafe extern "C" fn calloc_stacked(nmemb: usize, size: usize) -> *mut c_void {
    let bytes = nmemb.checked_mul(size).map_or(u64::MAX, |t| t as u64);
    let sid = stacked_before(bytes);
    // SAFETY: forwarding to the real calloc (resolved: stacks are on only once registered).
    let p = unsafe { real::calloc().map_or(null_mut(), |f| f(nmemb, size)) };
    // SAFETY: `p` came from the real calloc.
    unsafe { record_alloc(EventKind::Calloc, p, bytes, 0, sid) }
}

/// realloc and reallocarray: one event, `w0(new chunk) old new size old_chunk [prev_size]
/// [stack] [after_old] [after]`. With the guard held throughout — glibc's inner calls are not
/// recorded twice, and nothing else is written on this thread between the exchange of the old
/// block's cell (before the real call: the old block may go to another thread inside it, named
/// by the position of the event to come, `writer::next_position`) and the event.
#[inline(always)]
unsafe fn realloc_common(kind: EventKind, old: *mut c_void, size: u64, call: impl FnOnce() -> *mut c_void) -> *mut c_void {
    let sid = stacks::before(size);
    // SAFETY: `old` is null or a live block of the application (not a bootstrap one).
    let old_hdr = unsafe { glibc::chunk_header(old as *const u8) };
    let Some(g) = Guard::take() else { return call() };
    let t = g.thread();
    // SAFETY: guard held; `old` is live until the real call.
    let (after_old, dropped) = unsafe {
        match if old.is_null() { Some(0) } else { writer::next_position(t) } {
            None => (0, true),
            Some(0) => (0, false),
            Some(pos) => (Some(order::exchange(old as u64, pos)).filter(|&v| foreign(v, pos)).unwrap_or(0), false),
        }
    };
    let p = call();
    if dropped {
        // Lossy mode, no room: this event is counted lost already (by the reserve that failed);
        // written without its exchange it would leave the old block's next user unordered.
        return p;
    }
    // SAFETY: `p` is null or the live block the real realloc returned; guard held.
    unsafe {
        let (aux, prev_size) = if p.is_null() {
            (0, 0)
        } else if p == old {
            let hdr = glibc::chunk_header(p as *const u8);
            let prev = if chunk::is_mmapped(hdr) { glibc::mmapped_prev_size(p as *const u8) } else { 0 };
            (hdr & AUX_CHUNK_MASK | if chunk::is_mmapped(hdr) { AUX_HAS_PREV_SIZE } else { 0 }, prev)
        } else {
            inspect_new_block(t, p as *const u8)
        };
        writer::emit_ordered(t, 9, |w, _| {
            let after = if !p.is_null() && p != old && order::enabled() { order::load(p as u64) } else { 0 };
            let has_after = foreign(after, (*t).pos_base);
            let aux = aux
                | if sid != 0 { AUX_HAS_STACK } else { 0 }
                | if after_old != 0 { AUX_HAS_AFTER_OLD } else { 0 }
                | if has_after { AUX_HAS_AFTER } else { 0 };
            let mut i = 5;
            let mut put = |v: u64| {
                *w.add(i) = v;
                i += 1;
            };
            if aux & AUX_HAS_PREV_SIZE != 0 {
                put(prev_size);
            }
            if sid != 0 {
                put(sid);
            }
            if after_old != 0 {
                put(after_old);
            }
            if has_after {
                put(after);
            }
            *w = header(kind, i, aux);
            *w.add(1) = old as u64;
            *w.add(2) = p as u64;
            *w.add(3) = size;
            *w.add(4) = old_hdr & AUX_CHUNK_MASK;
            i
        });
        glibc::observe_brk(t);
    }
    drop(g);
    p
}

/// realloc of a bootstrap-arena block: move it to the real heap.
#[cold]
unsafe fn realloc_bootstrap(old: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: `old` is an arena block of `bootstrap_size(old)` bytes; `malloc` is our hook.
    unsafe {
        let n = real::bootstrap_size(old).min(size);
        let p = malloc(size);
        if !p.is_null() {
            core::ptr::copy_nonoverlapping(old as *const u8, p as *mut u8, n);
        }
        p
    }
}

unsafe extern "C" fn realloc_impl(old: *mut c_void, size: usize) -> *mut c_void {
    if real::is_bootstrap(old) {
        // SAFETY: see realloc_bootstrap.
        return unsafe { realloc_bootstrap(old, size) };
    }
    if real::realloc().is_none() {
        if let Some(p) = unresolved_alloc(size, 16) {
            return p; // only reached for realloc(NULL, n) during resolution
        }
    }
    // SAFETY: forwarding to the real realloc.
    unsafe { realloc_common(EventKind::Realloc, old, size as u64, || real::realloc().map_or(null_mut(), |f| f(old, size))) }
}

unsafe extern "C" fn reallocarray_impl(old: *mut c_void, nmemb: usize, size: usize) -> *mut c_void {
    let total = nmemb.checked_mul(size);
    if real::is_bootstrap(old) {
        let Some(n) = total else {
            crate::sys::set_errno(libc::ENOMEM);
            return null_mut();
        };
        // SAFETY: see realloc_bootstrap.
        return unsafe { realloc_bootstrap(old, n) };
    }
    if !real::resolved() {
        real::ensure_resolved();
    }
    let bytes = total.map_or(u64::MAX, |t| t as u64);
    // SAFETY: forwarding to the real reallocarray (or realloc when the libc has none).
    unsafe {
        realloc_common(EventKind::Reallocarray, old, bytes, || match real::reallocarray() {
            Some(f) => f(old, nmemb, size),
            None => match total {
                Some(n) => real::realloc().map_or(null_mut(), |f| f(old, n)),
                None => {
                    crate::sys::set_errno(libc::ENOMEM);
                    null_mut()
                }
            },
        })
    }
}

macro_rules! aligned_hook {
    ($name:ident, $imp:ident, $kind:expr, ($($arg:ident : $ty:ty),*), $align:expr, $size:expr) => {
        unsafe extern "C" fn $imp($($arg: $ty),*) -> *mut c_void {
            let sid = stacks::before($size as u64);
            let p = match real::$name() {
                // SAFETY: forwarding to the real function.
                Some(f) => unsafe { f($($arg),*) },
                None => match unresolved_alloc($size, $align) {
                    Some(p) => return p,
                    // SAFETY: resolved now.
                    None => unsafe { real::$name().map_or(null_mut(), |f| f($($arg),*)) },
                },
            };
            // SAFETY: `p` came from the real allocator.
            unsafe { record_alloc($kind, p, $size as u64, $align as u64, sid) }
        }
    };
}

aligned_hook!(memalign, memalign_impl, EventKind::Memalign, (align: usize, size: usize), align, size);
aligned_hook!(aligned_alloc, aligned_alloc_impl, EventKind::AlignedAlloc, (align: usize, size: usize), align, size);

// ---------------------------------------------------------------------------------------------
// Allocation entry points: naked trampolines that note the caller's frame for the stack
// unwinder (see `stacks`) and jump to the hook, arguments untouched. With a stack state for the
// thread: its `cfa` = rsp + 8 (the caller's stack pointer after the return) and `bp` = rbp (the
// caller's, untouched so far). Without one: nothing but the jump. rax and r11 are scratch.
// A thread has a stack state only once stacks are on (`stacks::state`; never turned off, and a
// fork child clears its thread's), so `malloc` and `calloc` then jump straight to their stacked
// hooks.

macro_rules! trampoline {
    ($name:ident => $imp:ident ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        trampoline!($name => $imp, $imp ($($arg: $ty),*) -> $ret);
    };
    // `$stacked`: where to go with a stack state (stacks are on; the hook's check is skipped).
    ($name:ident => $imp:ident, $stacked:ident ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        #[allow(unused_variables)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            // CFI by hand (rustc emits none for naked functions): the stack is never touched,
            // so the initial rule (CFA = rsp + 8, return address below it) holds throughout —
            // debuggers, profilers and crash handlers unwind through the trampoline.
            core::arch::naked_asm!(
                ".cfi_startproc",
                "mov rax, qword ptr [rip + mtrace_thread_state@GOTTPOFF]",
                "mov rax, qword ptr fs:[rax + {stk}]",
                "test rax, rax",
                "jz 2f",
                "lea r11, [rsp + 8]",
                "mov qword ptr [rax + {cfa}], r11",
                "mov qword ptr [rax + {cfa} + 8], rbp",
                "jmp {stacked}",
                "2:",
                "jmp {imp}",
                ".cfi_endproc",
                stk = const crate::tls::STK_OFFSET,
                cfa = const crate::stacks::CFA_OFFSET,
                imp = sym $imp,
                stacked = sym $stacked,
            )
        }
    };
}

trampoline!(malloc => malloc_impl, malloc_stacked(size: usize) -> *mut c_void);
trampoline!(calloc => calloc_impl, calloc_stacked(nmemb: usize, size: usize) -> *mut c_void);
trampoline!(realloc => realloc_impl(old: *mut c_void, size: usize) -> *mut c_void);
trampoline!(reallocarray => reallocarray_impl(old: *mut c_void, nmemb: usize, size: usize) -> *mut c_void);
trampoline!(memalign => memalign_impl(align: usize, size: usize) -> *mut c_void);
trampoline!(aligned_alloc => aligned_alloc_impl(align: usize, size: usize) -> *mut c_void);
trampoline!(valloc => valloc_impl(size: usize) -> *mut c_void);
trampoline!(pvalloc => pvalloc_impl(size: usize) -> *mut c_void);
trampoline!(posix_memalign => posix_memalign_impl(out: *mut *mut c_void, align: usize, size: usize) -> c_int);

unsafe extern "C" fn valloc_impl(size: usize) -> *mut c_void {
    let sid = stacks::before(size as u64);
    let p = match real::valloc() {
        // SAFETY: forwarding to the real valloc.
        Some(f) => unsafe { f(size) },
        None => match unresolved_alloc(size, 4096) {
            Some(p) => return p,
            // SAFETY: resolved now.
            None => unsafe { real::valloc().map_or(null_mut(), |f| f(size)) },
        },
    };
    // SAFETY: `p` came from the real valloc.
    unsafe { record_alloc(EventKind::Valloc, p, size as u64, 0, sid) }
}

unsafe extern "C" fn pvalloc_impl(size: usize) -> *mut c_void {
    let sid = stacks::before(size as u64);
    let p = match real::pvalloc() {
        // SAFETY: forwarding to the real pvalloc.
        Some(f) => unsafe { f(size) },
        None => match unresolved_alloc(size.div_ceil(4096).max(1) * 4096, 4096) {
            Some(p) => return p,
            // SAFETY: resolved now.
            None => unsafe { real::pvalloc().map_or(null_mut(), |f| f(size)) },
        },
    };
    // SAFETY: `p` came from the real pvalloc.
    unsafe { record_alloc(EventKind::Pvalloc, p, size as u64, 0, sid) }
}

unsafe extern "C" fn posix_memalign_impl(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    let sid = stacks::before(size as u64);
    let rc = match real::posix_memalign() {
        // SAFETY: forwarding to the real posix_memalign.
        Some(f) => unsafe { f(out, align, size) },
        None => match unresolved_alloc(size, align) {
            Some(p) => {
                if p.is_null() {
                    return libc::ENOMEM;
                }
                // SAFETY: `out` is the caller's out-pointer.
                unsafe { *out = p };
                return 0;
            }
            // SAFETY: resolved now.
            None => unsafe { real::posix_memalign().map_or(libc::ENOMEM, |f| f(out, align, size)) },
        },
    };
    // SAFETY: on success `*out` is the new block; on failure it is untouched.
    let p = if rc == 0 { unsafe { *out } } else { null_mut() };
    // SAFETY: `p` came from the real allocator (or is null).
    unsafe { record_alloc(EventKind::PosixMemalign, p, size as u64, align as u64, sid) };
    rc
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if real::is_bootstrap(p) {
        return real::bootstrap_size(p);
    }
    if !real::resolved() && !real::ensure_resolved() {
        return 0;
    }
    // SAFETY: forwarding to the real function.
    let r = unsafe { real::malloc_usable_size().map_or(0, |f| f(p)) };
    record_words([header(EventKind::UsableSize, 3, 0), p as u64, r as u64]);
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn free_sized(p: *mut c_void, size: usize) {
    // SAFETY: `p` is the application's block, about to be freed.
    unsafe { free_unready(EventKind::FreeSized, p, size as u64, 0) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn free_aligned_sized(p: *mut c_void, align: usize, size: usize) {
    // SAFETY: `p` is the application's block, about to be freed.
    unsafe { free_unready(EventKind::FreeAlignedSized, p, align as u64, size as u64) }
}

/// `malloc_trim`, recorded as `MallocTrim` — between two `mallinfo2` checkpoints (`BeforeTrim`,
/// `AfterTrim`, see [`crate::mallinfo`]) when glibc has `mallinfo2`: what the trim released, in
/// glibc's own books. The one hook that does something before forwarding: `mallinfo2` right
/// before the call (no lock of glibc's is held here).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc_trim(pad: usize) -> c_int {
    if !real::resolved() {
        real::ensure_resolved();
    }
    if crate::mallinfo::available() && recording() {
        // SAFETY: forwards to the real malloc_trim.
        return unsafe { malloc_trim_checkpointed(pad) };
    }
    // SAFETY: forwarding to the real malloc_trim.
    let r = unsafe { real::malloc_trim().map_or(0, |f| f(pad)) };
    record_words([header(EventKind::MallocTrim, 2, event::aux_i48(r as i64)), pad as u64]);
    r
}

/// `malloc_trim` with its checkpoints, all on this thread, in this order in its stream:
/// `Mallinfo(BeforeTrim)`, `MallocTrim`, `Mallinfo(AfterTrim)`.
#[cold]
#[inline(never)]
unsafe fn malloc_trim_checkpointed(pad: usize) -> c_int {
    // SAFETY: forwarding to the real malloc_trim.
    let trim = || unsafe { real::malloc_trim().map_or(0, |f| f(pad)) };
    let Some(g) = Guard::take() else { return trim() };
    let t = g.thread();
    // SAFETY: guard held; glibc's malloc_trim calls none of our hooks (its system calls are
    // internal), so holding the guard across it hides nothing.
    unsafe {
        if let Some(mi) = crate::mallinfo::take() {
            crate::mallinfo::emit(t, event::MallinfoReason::BeforeTrim, &mi);
        }
        let r = trim();
        let after = crate::mallinfo::take();
        writer::emit(t, 2, |w| {
            *w = header(EventKind::MallocTrim, 2, event::aux_i48(r as i64));
            *w.add(1) = pad as u64;
        });
        glibc::observe_brk(t);
        if let Some(mi) = after {
            crate::mallinfo::emit(t, event::MallinfoReason::AfterTrim, &mi);
        }
        r
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mallopt(param: c_int, value: c_int) -> c_int {
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real mallopt.
    let r = unsafe { real::mallopt().map_or(0, |f| f(param, value)) };
    record_words([header(EventKind::Mallopt, 3, event::aux_i48(r as i64)), param as i64 as u64, value as i64 as u64]);
    r
}

// ---------------------------------------------------------------------------------------------
// The application's own memory mappings and break.

/// `mmap` and `mmap64` (one function on 64-bit): forward to `real` (the raw system call if the
/// libc has none), then record the call as `kind`.
#[inline(always)]
unsafe fn mmap_hook(
    kind: EventKind,
    real: fn() -> Option<real::MmapFn>,
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: i64,
) -> *mut c_void {
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real mmap (the raw syscall if it is missing).
    let r = unsafe {
        match real() {
            Some(f) => f(addr, len, prot, flags, fd, off),
            None => crate::sys::mmap(addr, len, prot, flags, fd, off),
        }
    };
    let aux = (prot as u64 & 0xff) | ((flags as u32 as u64) << 8);
    record_words([header(kind, 6, aux), r as u64, len as u64, fd as i64 as u64, off as u64, addr as u64]);
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on unchanged.
    unsafe { mmap_hook(EventKind::Mmap, real::mmap, addr, len, prot, flags, fd, off) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void {
    // SAFETY: the caller's arguments, passed on unchanged.
    unsafe { mmap_hook(EventKind::Mmap64, real::mmap64, addr, len, prot, flags, fd, off) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real munmap (the raw syscall if it is missing).
    let r = unsafe {
        match real::munmap() {
            Some(f) => f(addr, len),
            None => crate::sys::munmap(addr, len),
        }
    };
    record_words([header(EventKind::Munmap, 3, event::aux_i48(r as i64)), addr as u64, len as u64]);
    r
}

/// `mremap` is variadic in C; the optional fifth argument is passed in a register under the
/// SysV ABI, so a fixed fifth parameter receives it correctly.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mremap(old: *mut c_void, old_len: usize, new_len: usize, flags: c_int, new_addr: *mut c_void) -> *mut c_void {
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real mremap.
    let r = unsafe {
        match real::mremap() {
            Some(f) => f(old, old_len, new_len, flags, new_addr),
            None => libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) as *mut c_void,
        }
    };
    record_words([
        header(EventKind::Mremap, 6, flags as u32 as u64),
        old as u64,
        old_len as u64,
        new_len as u64,
        r as u64,
        new_addr as u64,
    ]);
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn brk(addr: *mut c_void) -> c_int {
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real brk.
    let r = unsafe { real::brk().map_or(-1, |f| f(addr)) };
    record_words([header(EventKind::Brk, 2, event::aux_i48(r as i64)), addr as u64]);
    r
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn sbrk(increment: isize) -> *mut c_void {
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real sbrk.
    let r = unsafe { real::sbrk().map_or(usize::MAX as *mut c_void, |f| f(increment)) };
    record_words([header(EventKind::Sbrk, 3, 0), increment as i64 as u64, r as u64]);
    r
}

// ---------------------------------------------------------------------------------------------
// Leaving without running destructors.

/// `_exit` and `_Exit`: flush what this process recorded, then leave through `real` (the raw
/// `exit_group` if the libc has none).
fn exit_hook(status: c_int, real: fn() -> Option<real::ExitFn>) -> ! {
    crate::lifecycle::on_exit(status as i64);
    if !real::resolved() {
        real::ensure_resolved();
    }
    if let Some(f) = real() {
        // SAFETY: forwarding to the real _exit / _Exit.
        unsafe { f(status) }
    }
    // SAFETY: exit_group never returns.
    unsafe { libc::syscall(libc::SYS_exit_group, status) };
    loop {}
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn _exit(status: c_int) -> ! {
    exit_hook(status, real::exit_)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn _Exit(status: c_int) -> ! {
    exit_hook(status, real::exit_upper)
}
