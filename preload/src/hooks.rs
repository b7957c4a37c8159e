//! The exported functions that interpose libc's allocator and memory-mapping calls.
//!
//! Every hook forwards to the real function unconditionally — before our constructor ran, after
//! our destructor ran, when tracing is off, or while our own code is on the stack (the guard).
//! Recording happens after the call for everything that returns a block, and before the call for
//! `free` (the chunk header and the stamp slot are only readable while the block is live).

use core::ffi::{c_int, c_void};
use core::ptr::null_mut;

use mtrace_protocol::event::{self, chunk, header, EventKind, AUX_CHUNK_MASK, AUX_HAS_PREV_SIZE, AUX_HAS_STACK, AUX_HAS_STAMP};
use mtrace_protocol::stamp;

use crate::glibc::{self, g};
use crate::real;
use crate::stacks;
use crate::tls::{self, fast, ThreadState};
use crate::writer::{self, ACTIVE, OFF};

/// Take the guard if this call should be recorded.
#[inline(always)]
fn enter() -> Option<*mut ThreadState> {
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block.
    unsafe {
        if (*t).busy != 0 || writer::STATE.load(core::sync::atomic::Ordering::Acquire) == OFF {
            return None;
        }
        (*t).busy = 1;
    }
    Some(t)
}

/// Write an event of `n` words: into the ring when registered, through the pre-init buffer
/// before (see [`writer::emit`]).
#[inline(always)]
unsafe fn put(t: *mut ThreadState, n: usize, fill: impl FnOnce(*mut u64)) {
    // SAFETY: guard held by the caller.
    unsafe { writer::emit(t, n, fill) }
}

#[inline(always)]
fn leave(t: *mut ThreadState) {
    // SAFETY: `t` is this thread's TLS block.
    unsafe { (*t).busy = 0 };
}

/// Is this call to be recorded? Inlined into every hook: a TLS byte and one load, so that the
/// hook itself stays a small function and the recording work (with its larger frame) lives out of
/// line.
#[inline(always)]
fn recording() -> bool {
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block.
    unsafe { (*t).busy == 0 && writer::STATE.load(core::sync::atomic::Ordering::Relaxed) != OFF }
}

/// Record an allocation that returned `p` (null on failure).
#[inline(never)]
unsafe fn record_alloc(kind: EventKind, p: *mut c_void, size: u64, align: u64, sid: u64) {
    let Some(t) = enter() else { return };
    // SAFETY: per the caller; guard held.
    unsafe { record_alloc_held(t, kind, p, size, align, sid) };
    leave(t);
}

/// [`record_alloc`] with the guard already held (the general path, also the fast path's
/// fallback). `sid`: the allocation's stack id (0: none), taken before forwarding
/// ([`stacks::before`]).
#[inline(never)]
unsafe fn record_alloc_held(t: *mut ThreadState, kind: EventKind, p: *mut c_void, size: u64, align: u64, sid: u64) {
    // SAFETY: `p` is null or a live block the real allocator just returned; guard held.
    unsafe {
        let (mut aux, prev_size, stamp) = inspect_new_block(t, kind, p as *const u8);
        if sid != 0 {
            aux |= AUX_HAS_STACK;
        }
        let base = kind.base_words();
        let n = base + (aux & AUX_HAS_PREV_SIZE != 0) as usize + (sid != 0) as usize + (aux & AUX_HAS_STAMP != 0) as usize;
        put(t, n, |w| {
            *w = header(kind, n, aux);
            *w.add(1) = p as u64;
            *w.add(2) = size;
            if base == 4 {
                *w.add(3) = align;
            }
            let mut i = base;
            if aux & AUX_HAS_PREV_SIZE != 0 {
                *w.add(i) = prev_size;
                i += 1;
            }
            if sid != 0 {
                *w.add(i) = sid;
                i += 1;
            }
            if aux & AUX_HAS_STAMP != 0 {
                *w.add(i) = stamp;
            }
        });
        glibc::observe_brk(t);
    }
}

/// Read what glibc and earlier frees left on a block we are about to report: its chunk header,
/// `prev_size` if mmapped, and a stamp naming another thread's free. Returns (aux, prev, stamp).
#[inline(always)]
unsafe fn inspect_new_block(t: *mut ThreadState, kind: EventKind, p: *const u8) -> (u64, u64, u64) {
    // SAFETY: per the caller.
    unsafe {
        let hdr = glibc::chunk_header(p);
        let mut aux = hdr & AUX_CHUNK_MASK;
        let mut prev_size = 0;
        let mut st = 0;
        if hdr != 0 {
            if chunk::is_mmapped(hdr) {
                aux |= AUX_HAS_PREV_SIZE;
                prev_size = glibc::mmapped_prev_size(p);
            } else {
                if chunk::non_main_arena(hdr) {
                    glibc::observe_heap(t, p as u64);
                }
                // calloc zeroes the block: nothing to find.
                if g().stamps && kind != EventKind::Calloc {
                    if let Some(w) = find_stamp(t, p, chunk::size(hdr), kind == EventKind::Realloc || kind == EventKind::Reallocarray) {
                        aux |= AUX_HAS_STAMP;
                        st = w;
                    }
                }
            }
        }
        (aux, prev_size, st)
    }
}

/// A stamp another thread's free left in the block at `p`, if any: in the front slot — or, for a
/// moved realloc (whose front holds a copy of the old block), in the end slot first.
#[inline(always)]
unsafe fn find_stamp(t: *mut ThreadState, p: *const u8, size: u64, realloc: bool) -> Option<u64> {
    let key = g().stamp_key;
    // SAFETY: `t` is this thread's state; both slots lie inside the live block.
    unsafe {
        let me = (*t).stream;
        let genuine = |w: u64| stamp::looks_genuine(key, w) && stamp::decode(key, w).is_some_and(|r| r.stream != me);
        if realloc {
            if let Some(end) = chunk::stamp_end(size) {
                let w = *(p.add(end) as *const u64);
                if genuine(w) {
                    return Some(w);
                }
            }
        }
        let w = *(p.add(chunk::stamp_front(size)) as *const u64);
        genuine(w).then_some(w)
    }
}

/// Record a free of `p` (before the real free runs) and leave a stamp in the block. A stamp of
/// another thread's earlier free still in the block is recorded too (an ordering edge).
#[inline(never)]
unsafe fn record_free(kind: EventKind, p: *mut c_void, a: u64, b: u64) {
    let Some(t) = enter() else { return };
    // SAFETY: per the caller; guard held.
    unsafe { record_free_held(t, kind, p, a, b) };
    leave(t);
}

/// [`record_free`] with the guard already held (the general path, also the fast path's fallback).
#[inline(never)]
unsafe fn record_free_held(t: *mut ThreadState, kind: EventKind, p: *mut c_void, a: u64, b: u64) {
    // SAFETY: `p` is null or a live block about to be freed; guard held.
    unsafe {
        let hdr = glibc::chunk_header(p as *const u8);
        let mut aux = hdr & AUX_CHUNK_MASK;
        let stampable = hdr != 0 && g().stamps && !chunk::is_mmapped(hdr);
        let size = chunk::size(hdr);
        let mut found = 0;
        // Only the thread's own current heap: frees of other arenas' chunks (cross-thread frees)
        // would make the one-entry cache thrash. Shrinks show up at the next allocation.
        if hdr != 0 && !chunk::is_mmapped(hdr) && chunk::non_main_arena(hdr) && (p as u64 & !(chunk::HEAP_MAX_SIZE - 1)) == (*t).heap {
            glibc::observe_heap(t, p as u64);
        }
        if stampable {
            if let Some(w) = find_stamp(t, p as *const u8, size, false) {
                aux |= AUX_HAS_STAMP;
                found = w;
            }
        }
        let n = kind.base_words() + (aux & AUX_HAS_STAMP != 0) as usize;
        put(t, n, |w| {
            // The ring position of this very event names it in the stamp (pre-init events have
            // no position: their `base` is null and no stamp is left).
            if stampable && !(*t).base.is_null() && writer::STATE.load(core::sync::atomic::Ordering::Relaxed) == ACTIVE {
                let word = (w as usize - (*t).base as usize) / 8;
                let st = stamp::encode(g().stamp_key, (*t).stream, (*t).block_seq, word as u32);
                *((p as *mut u8).add(chunk::stamp_front(size)) as *mut u64) = st;
                if let Some(end) = chunk::stamp_end(size) {
                    *((p as *mut u8).add(end) as *mut u64) = st;
                }
            }
            fill_free(w, kind, n, aux, p, a, b, found)
        });
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn fill_free(w: *mut u64, kind: EventKind, n: usize, aux: u64, p: *mut c_void, a: u64, b: u64, found: u64) {
    // SAFETY: `w` has room for `n` words.
    unsafe {
        *w = header(kind, n, aux);
        *w.add(1) = p as u64;
        let base = kind.base_words();
        if base > 2 {
            *w.add(2) = a;
        }
        if base > 3 {
            *w.add(3) = b;
        }
        if aux & AUX_HAS_STAMP != 0 {
            *w.add(base) = found;
        }
    }
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
            if let Some(t) = enter() {
                glibc::observe_brk(t);
                leave(t);
            }
        }
    }
}

/// Record a call with fixed words (mmap family, mallopt, …).
#[inline(always)]
fn record_words<const N: usize>(words: [u64; N]) {
    if let Some(t) = enter() {
        // SAFETY: guard held; `emit` gets exactly N words.
        unsafe {
            writer::emit(t, N, |w| core::ptr::copy_nonoverlapping(words.as_ptr(), w, N));
            glibc::observe_brk(t);
        }
        leave(t);
    }
}

// ---------------------------------------------------------------------------------------------
// Fast paths of malloc and free.
//
// The common case — a live heap chunk, nothing new to report about the thread's heap or the
// program break, the clock unchanged since the last `Time` event, room in the block — in straight
// line code inlined into the hooks: reads first, then the stores of one event. Whatever else is
// seen (before anything is written) hands the call to the general path, which records it exactly
// as it would have without the fast path. Event layouts and stamp semantics are the general
// path's: see `record_alloc_held`, `inspect_new_block`, `find_stamp`, `record_free_held`.

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

/// A word found in a block is a genuine stamp of another stream (see `ThreadState::stamp_xor`;
/// `fast::CHUNKS` guarantees that the stream id fits the stamp, as `find_stamp` compares it).
#[inline(always)]
fn foreign_stamp(w: u64, stamp_xor: u64) -> bool {
    ((w ^ stamp_xor) >> 32).wrapping_sub(1) < (1 << stamp::STREAM_BITS) - 1
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
        // A heap chunk's header: not 0 (the general path's "unknown"), not mmapped, and within
        // `AUX_CHUNK_MASK` (so it is its own `aux` chunk bits).
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

/// The event kind of [`malloc_fast`]: `Calloc` or `Malloc`.
#[inline(always)]
const fn alloc_kind(calloc: bool) -> EventKind {
    if calloc { EventKind::Calloc } else { EventKind::Malloc }
}

/// Write a `Malloc` or `Calloc` event (`FOUND`: with the stamp `st`; `STACK`: with the stack id `sid`,
/// not 0). `false`: no room, nothing written.
///
/// # Safety
/// As [`malloc_fast`], after its checks.
#[inline(always)]
unsafe fn malloc_event<const CALLOC: bool, const FOUND: bool, const STACK: bool>(t: *mut ThreadState, p: *mut c_void, size: u64, hdr: u64, st: u64, sid: u64) -> bool {
    let n = 3 + STACK as usize + FOUND as usize;
    // SAFETY: `reserve_fast` gave room for `n` words.
    unsafe {
        let Some(w) = writer::reserve_fast(t, n) else { return false };
        let aux = (hdr & AUX_CHUNK_MASK) | if FOUND { AUX_HAS_STAMP } else { 0 } | if STACK { AUX_HAS_STACK } else { 0 };
        *w = header(alloc_kind(CALLOC), n, aux);
        *w.add(1) = p as u64;
        *w.add(2) = size;
        if STACK {
            *w.add(3) = sid;
        }
        if FOUND {
            *w.add(n - 1) = st;
        }
        writer::commit_at(t, w, n);
    }
    true
}

/// [`malloc_fast`] when the block holds another stream's stamp.
#[cold]
#[inline(never)]
unsafe fn malloc_fast_found<const STACK: bool>(t: *mut ThreadState, p: *mut c_void, size: u64, hdr: u64, st: u64, sid: u64) -> *mut c_void {
    // SAFETY: per `malloc_fast`.
    unsafe {
        if !malloc_event::<false, true, STACK>(t, p, size, hdr, st, sid) {
            return malloc_general(t, EventKind::Malloc, p, size, sid);
        }
        tls::release_fast(t, fast::CHUNKS);
    }
    opaque(p)
}

/// Record `malloc(size) = p` (`CALLOC`: `calloc` of `size` bytes in all) — on the fast path if
/// it applies, else on the general one — release the guard and return `p`. Everything after a
/// check is a tail call, so that the hook keeps no state across calls (no callee-saved
/// registers).
///
/// # Safety
/// `t` is this thread's state with `fast == CHUNKS`, guard held, `STATE` is `ACTIVE`; `p` is what
/// the real allocator returned.
#[inline(always)]
unsafe fn malloc_fast<const CALLOC: bool>(t: *mut ThreadState, p: *mut c_void, size: u64) -> *mut c_void {
    // SAFETY: per the contract.
    unsafe { malloc_fast_with::<CALLOC>(t, p, size, 0) }
}

/// [`malloc_fast`] with the stack id `sid` (0: none) already taken.
#[inline(always)]
unsafe fn malloc_fast_with<const CALLOC: bool>(t: *mut ThreadState, p: *mut c_void, size: u64, sid: u64) -> *mut c_void {
    // Two copies, so that the event's layout is a constant in each (no arithmetic on `sid`).
    // SAFETY: per the contract.
    unsafe {
        if sid != 0 { malloc_fast_stack::<CALLOC, true>(t, p, size, sid) } else { malloc_fast_stack::<CALLOC, false>(t, p, size, 0) }
    }
}

/// [`malloc_fast_with`] knowing whether there is a stack id (`STACK`: `sid` is not 0).
#[inline(always)]
unsafe fn malloc_fast_stack<const CALLOC: bool, const STACK: bool>(t: *mut ThreadState, p: *mut c_void, size: u64, sid: u64) -> *mut c_void {
    let kind = alloc_kind(CALLOC);
    // SAFETY: `p` is null or a live block; `t` is ours.
    unsafe {
        if p.is_null() {
            return malloc_general(t, kind, p, size, sid);
        }
        let Some(hdr) = fast_header(t, p, true) else { return malloc_general(t, kind, p, size, sid) };
        // As `observe_brk` after the event: a moved break is reported by the general path. Also
        // after a thread-arena allocation, which cannot have moved it: glibc moves it without any
        // hook too (a thread's exit frees its tcache with `__libc_free`, which can trim), and
        // the next allocation of any thread is where that is seen.
        if core::ptr::read_volatile((*t).curbrk) != (*t).last_brk {
            return malloc_general(t, kind, p, size, sid);
        }
        // calloc zeroes the block: nothing to find (as `inspect_new_block`).
        if !CALLOC {
            let w = *((p as *const u8).add(chunk::stamp_front(chunk::size(hdr))) as *const u64);
            if foreign_stamp(w, (*t).stamp_xor) {
                return malloc_fast_found::<STACK>(t, p, size, hdr, w, sid);
            }
        }
        if !malloc_event::<CALLOC, false, STACK>(t, p, size, hdr, 0, sid) {
            return malloc_general(t, kind, p, size, sid);
        }
        tls::release_fast(t, fast::CHUNKS);
    }
    p
}

/// Write a `Free` event (`FOUND`: with the stamp `found` that was in the block) and leave this
/// free's stamp in the block (when stamps are on). `false`: no room, nothing written.
///
/// # Safety
/// As [`free_fast`], after its checks.
#[inline(always)]
unsafe fn free_event<const FOUND: bool>(t: *mut ThreadState, p: *mut c_void, hdr: u64, front: *mut u64, found: u64) -> bool {
    let n = 2 + FOUND as usize;
    // SAFETY: `reserve_fast` gave room for `n` words; the stamp slots lie inside the live block.
    unsafe {
        let Some(w) = writer::reserve_fast(t, n) else { return false };
        // The ring position of this very event names it (`stamp::encode` of its word offset).
        let word = ((w as usize - (*t).base as usize) / 8) as u64 & ((1 << stamp::WORD_BITS) - 1);
        let st = (*t).stamp_xor ^ word;
        *front = st;
        if let Some(end) = chunk::stamp_end(chunk::size(hdr)) {
            *((p as *mut u8).add(end) as *mut u64) = st;
        }
        let aux = (hdr & AUX_CHUNK_MASK) | if FOUND { AUX_HAS_STAMP } else { 0 };
        *w = header(EventKind::Free, n, aux);
        *w.add(1) = p as u64;
        if FOUND {
            *w.add(2) = found;
        }
        writer::commit_at(t, w, n);
    }
    true
}

/// [`free_fast`] when the block holds another stream's stamp.
#[cold]
#[inline(never)]
unsafe fn free_fast_found(t: *mut ThreadState, p: *mut c_void, hdr: u64, front: *mut u64, found: u64) {
    // SAFETY: per `free_fast`.
    unsafe {
        if !free_event::<true>(t, p, hdr, front, found) {
            return free_general(t, p);
        }
        tls::release_fast(t, fast::CHUNKS);
        free_recorded(p, hdr)
    }
}

/// Forward a recorded free of the chunk with header `hdr`. A thread-arena chunk's free cannot
/// move the program break (glibc trims thread-arena heaps with `mmap`/`madvise`, and only the
/// main arena with `sbrk`): nothing to observe after it, so the real free is a tail call. (A move
/// made meanwhile, by another thread or by glibc without a hook, is seen at the next allocation.)
///
/// # Safety
/// `p` is the application's block, recorded on this thread's chunk fast path, guard released.
#[inline(always)]
unsafe fn free_recorded(p: *mut c_void, hdr: u64) {
    if chunk::non_main_arena(hdr) {
        // SAFETY: forwarding to the real free, present on a fast path (see `real::free_present`).
        return unsafe { real::free_present()(p) };
    }
    // SAFETY: per the contract.
    unsafe { free_forward(p) }
}

/// Record `free(p)` and leave the stamp — on the fast path if it applies, else on the general
/// one — release the guard and forward to the real free. Tail calls only, as [`malloc_fast`].
///
/// # Safety
/// As [`malloc_fast`]; `p` is the application's block, or a bootstrap arena block (its "chunk
/// header" is 0: `fast_header` sends it to `free_general`), or null, about to be freed.
#[inline(always)]
unsafe fn free_fast(t: *mut ThreadState, p: *mut c_void) {
    // SAFETY: `p` is null or a live block; `t` is ours.
    unsafe {
        if p.is_null() {
            return free_general(t, p);
        }
        // As `record_free_held`: only the thread's current heap is looked at.
        let Some(hdr) = fast_header(t, p, false) else { return free_general(t, p) };
        let front = (p as *mut u8).add(chunk::stamp_front(chunk::size(hdr))) as *mut u64;
        let w = *front;
        if foreign_stamp(w, (*t).stamp_xor) {
            return free_fast_found(t, p, hdr, front, w);
        }
        if !free_event::<false>(t, p, hdr, front, 0) {
            return free_general(t, p);
        }
        tls::release_fast(t, fast::CHUNKS);
        free_recorded(p, hdr)
    }
}

/// The fast path of `malloc` without chunk headers (`fast::PLAIN`): the general path's event when
/// it reads no header (no chunk, stamp or heap information). Tail calls only, as [`malloc_fast`].
///
/// # Safety
/// As [`malloc_fast`], with `fast == PLAIN`.
#[inline(always)]
unsafe fn malloc_plain(t: *mut ThreadState, p: *mut c_void, size: u64) -> *mut c_void {
    // SAFETY: `t` is ours; `reserve_fast` gave room for 3 words.
    unsafe {
        // As `observe_brk` after the event (a word that stays 0 when the break is not known).
        if core::ptr::read_volatile((*t).curbrk) != (*t).last_brk {
            return malloc_general(t, EventKind::Malloc, p, size, 0);
        }
        let Some(w) = writer::reserve_fast(t, 3) else { return malloc_general(t, EventKind::Malloc, p, size, 0) };
        *w = header(EventKind::Malloc, 3, 0);
        *w.add(1) = p as u64;
        *w.add(2) = size;
        writer::commit_at(t, w, 3);
        tls::release_fast(t, fast::PLAIN);
    }
    p
}

/// The fast path of `free` without chunk headers (`fast::PLAIN`), as [`malloc_plain`].
///
/// # Safety
/// As [`free_fast`], with `fast == PLAIN`.
#[inline(always)]
unsafe fn free_plain(t: *mut ThreadState, p: *mut c_void) {
    // SAFETY: `t` is ours; `reserve_fast` gave room for 2 words.
    unsafe {
        let Some(w) = writer::reserve_fast(t, 2) else { return free_general(t, p) };
        *w = header(EventKind::Free, 2, 0);
        *w.add(1) = p as u64;
        writer::commit_at(t, w, 2);
        tls::release_fast(t, fast::PLAIN);
        if g().curbrk.is_null() {
            // No break to observe after the free.
            if let Some(f) = real::free() {
                return f(p);
            }
        }
        free_forward(p)
    }
}

/// The general path of a `malloc` or `calloc` the fast path did not take, guard held: record,
/// release the guard, return `p` (a tail call, so that the hook keeps no state across calls).
#[cold]
#[inline(never)]
unsafe fn malloc_general(t: *mut ThreadState, kind: EventKind, p: *mut c_void, size: u64, sid: u64) -> *mut c_void {
    // SAFETY: per `malloc_fast`.
    unsafe {
        no_fast_path_when_off(t);
        record_alloc_held(t, kind, p, size, 0, sid);
        (*t).busy = 0;
    }
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
    if writer::STATE.load(core::sync::atomic::Ordering::Relaxed) == OFF {
        // SAFETY: per the contract.
        unsafe { (*t).fast = fast::NONE };
    }
}

/// `malloc` when the chunk fast path is not available: the plain fast path, or the general one
/// (guard taken, not registered, not tracing). Out of line, reached by a tail call.
#[inline(never)]
unsafe fn malloc_other(size: usize, p: *mut c_void) -> *mut c_void {
    let t = tls::state();
    // SAFETY: `t` is this thread's state; the guard is taken before anything is read or written.
    if unsafe { tls::guard_and_fast(t) } == tls::ready(fast::PLAIN)
        && writer::STATE.load(core::sync::atomic::Ordering::Acquire) == ACTIVE
        && !stacks::enabled()
    {
        // SAFETY: as above; `p` came from the real malloc.
        unsafe {
            (*t).busy = 1;
            return malloc_plain(t, p, size as u64);
        }
    }
    if recording() {
        // SAFETY: `p` came from the real malloc.
        unsafe { record_alloc(EventKind::Malloc, p, size as u64, 0, 0) };
    }
    opaque(p)
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
    unsafe { malloc_other(size, p) }
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

/// The general path of a `free` the fast path did not take, guard held: record, release the
/// guard, forward.
#[cold]
#[inline(never)]
unsafe fn free_general(t: *mut ThreadState, p: *mut c_void) {
    // SAFETY: per `free_fast`.
    unsafe {
        if real::is_bootstrap(p) {
            // Never recorded, never given to the real free (the fast path let it through).
            (*t).busy = 0;
            return;
        }
        no_fast_path_when_off(t);
        record_free_held(t, EventKind::Free, p, 0, 0);
        (*t).busy = 0;
        free_forward(p)
    }
}

/// `free` when the chunk fast path is not available: the plain fast path, or the general one
/// (guard taken, not registered, not tracing). Out of line, reached by a tail call.
#[inline(never)]
unsafe fn free_other(p: *mut c_void) {
    let t = tls::state();
    // SAFETY: `t` is this thread's state; the guard is taken before anything is read or written.
    if unsafe { tls::guard_and_fast(t) } == tls::ready(fast::PLAIN) && writer::STATE.load(core::sync::atomic::Ordering::Acquire) == ACTIVE {
        // SAFETY: as above; `p` is the application's block (or null), about to be freed.
        unsafe {
            (*t).busy = 1;
            return free_plain(t, p);
        }
    }
    if recording() {
        // SAFETY: `p` is the application's block (or null), about to be freed.
        unsafe { record_free(EventKind::Free, p, 0, 0) };
    }
    // SAFETY: as above.
    unsafe { free_forward(p) }
}

// ---------------------------------------------------------------------------------------------
// malloc family

#[cold]
fn unresolved_alloc(size: usize, align: usize) -> Option<*mut c_void> {
    if real::ensure_resolved() { None } else { Some(real::bootstrap_alloc(size, align)) }
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
    let t = tls::state();
    // SAFETY: `t` is this thread's state; the guard is taken before anything is read or written.
    // `p` came from the real malloc.
    unsafe {
        // No check of `STATE` on the fast path: see `fast::CHUNKS`.
        if tls::guard_and_fast(t) == tls::ready(fast::CHUNKS) {
            (*t).busy = 1;
            return malloc_fast::<false>(t, p, size as u64);
        }
        if writer::STATE.load(core::sync::atomic::Ordering::Relaxed) == OFF {
            return p;
        }
        malloc_other(size, p)
    }
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
    let bytes = total.map_or(u64::MAX, |t| t as u64);
    let t = tls::state();
    // SAFETY: as in `malloc`; `p` came from the real calloc.
    unsafe {
        if tls::guard_and_fast(t) == tls::ready(fast::CHUNKS) {
            (*t).busy = 1;
            return malloc_fast::<true>(t, p, bytes);
        }
        record_alloc(EventKind::Calloc, p, bytes, 0, 0);
    }
    p
}

/// [`stacks::before`] for the malloc and calloc hooks with stacks on: when the chunk fast path
/// will record the call (guard free, a block), the memo hit inline.
#[inline(always)]
fn stacked_before(size: u64) -> u64 {
    let t = tls::state();
    // SAFETY: `t` is this thread's state; the checks are `before_ready`'s contract (stacks are on
    // in the callers).
    unsafe {
        if tls::guard_and_fast(t) == tls::ready(fast::CHUNKS) {
            return stacks::before_ready(t, size);
        }
    }
    stacks::before(size)
}

/// `calloc` with stacks on: the stack first (see [`malloc_stacked`]). Also the trampoline's
/// target for a thread with a stack state.
#[inline(never)]
unsafe extern "C" fn calloc_stacked(nmemb: usize, size: usize) -> *mut c_void {
    let bytes = nmemb.checked_mul(size).map_or(u64::MAX, |t| t as u64);
    let sid = stacked_before(bytes);
    // SAFETY: forwarding to the real calloc (resolved: stacks are on only once registered).
    let p = unsafe { real::calloc().map_or(null_mut(), |f| f(nmemb, size)) };
    let t = tls::state();
    // SAFETY: as in `calloc`.
    unsafe {
        if tls::guard_and_fast(t) == tls::ready(fast::CHUNKS) {
            (*t).busy = 1;
            return malloc_fast_with::<true>(t, p, bytes, sid);
        }
        record_alloc(EventKind::Calloc, p, bytes, 0, sid);
    }
    p
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
    let t = tls::state();
    // SAFETY: as in `malloc`.
    unsafe {
        if tls::guard_and_fast(t) == tls::ready(fast::CHUNKS) {
            (*t).busy = 1;
            return malloc_fast_with::<false>(t, p, size as u64, sid);
        }
        if recording() {
            record_alloc(EventKind::Malloc, p, size as u64, 0, sid);
        }
    }
    opaque(p)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    let t = tls::state();
    // SAFETY: `t` is this thread's state; the guard is taken before anything is read or written.
    // `p` is the application's block, a bootstrap arena block, or null, about to be freed.
    unsafe {
        // The fast path needs no check of `STATE` (see `fast::CHUNKS`) nor of the bootstrap
        // arena: an arena block's "chunk header" is 0, which sends it to `free_general`.
        if tls::guard_and_fast(t) == tls::ready(fast::CHUNKS) {
            (*t).busy = 1;
            return free_fast(t, p);
        }
        if real::is_bootstrap(p) {
            return;
        }
        match writer::STATE.load(core::sync::atomic::Ordering::Acquire) {
            // Not tracing: nothing to record, nor to observe after the free.
            OFF => match real::free() {
                Some(f) => f(p),
                None => free_forward(p),
            },
            _ => free_other(p),
        }
    }
}

/// realloc and reallocarray: read the old header, forward (guarded, so glibc's inner calls are
/// not recorded twice), then record one event.
#[inline(always)]
unsafe fn realloc_common(kind: EventKind, old: *mut c_void, size: u64, call: impl FnOnce() -> *mut c_void) -> *mut c_void {
    let sid = stacks::before(size);
    // SAFETY: `old` is null or a live block of the application (not a bootstrap one).
    let old_hdr = unsafe { glibc::chunk_header(old as *const u8) };
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block.
    unsafe { (*t).busy += 1 };
    let p = call();
    // SAFETY: as above.
    unsafe { (*t).busy -= 1 };
    let Some(t) = enter() else { return p };
    // SAFETY: `p` is null or the live block the real realloc returned; guard held.
    unsafe {
        let (aux, prev_size, st) =
            if p.is_null() || p == old { (glibc::chunk_header(p as *const u8) & AUX_CHUNK_MASK, 0, 0) } else { inspect_new_block(t, kind, p as *const u8) };
        let (aux, prev_size) = if aux & chunk::IS_MMAPPED != 0 && aux & AUX_HAS_PREV_SIZE == 0 && !p.is_null() {
            (aux | AUX_HAS_PREV_SIZE, glibc::mmapped_prev_size(p as *const u8))
        } else {
            (aux, prev_size)
        };
        let aux = if sid != 0 { aux | AUX_HAS_STACK } else { aux };
        let n = 5 + (aux & AUX_HAS_PREV_SIZE != 0) as usize + (sid != 0) as usize + (aux & AUX_HAS_STAMP != 0) as usize;
        writer::emit(t, n, |w| {
            *w = header(kind, n, aux);
            *w.add(1) = old as u64;
            *w.add(2) = p as u64;
            *w.add(3) = size;
            *w.add(4) = old_hdr & AUX_CHUNK_MASK;
            let mut i = 5;
            if aux & AUX_HAS_PREV_SIZE != 0 {
                *w.add(i) = prev_size;
                i += 1;
            }
            if sid != 0 {
                *w.add(i) = sid;
                i += 1;
            }
            if aux & AUX_HAS_STAMP != 0 {
                *w.add(i) = st;
            }
        });
        glibc::observe_brk(t);
    }
    leave(t);
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
            unsafe { record_alloc($kind, p, $size as u64, $align as u64, sid) };
            p
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
    unsafe { record_alloc(EventKind::Valloc, p, size as u64, 0, sid) };
    p
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
    unsafe { record_alloc(EventKind::Pvalloc, p, size as u64, 0, sid) };
    p
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
    if real::is_bootstrap(p) {
        return;
    }
    // SAFETY: `p` is the application's block, about to be freed.
    unsafe { record_free(EventKind::FreeSized, p, size as u64, 0) };
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real free_sized, or free where the libc has none.
    unsafe {
        match real::free_sized() {
            Some(f) => f(p, size),
            None => {
                if let Some(f) = real::free() {
                    f(p)
                }
            }
        }
    }
    after_free();
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn free_aligned_sized(p: *mut c_void, align: usize, size: usize) {
    if real::is_bootstrap(p) {
        return;
    }
    // SAFETY: `p` is the application's block, about to be freed.
    unsafe { record_free(EventKind::FreeAlignedSized, p, align as u64, size as u64) };
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real function, or free where the libc has none.
    unsafe {
        match real::free_aligned_sized() {
            Some(f) => f(p, align, size),
            None => {
                if let Some(f) = real::free() {
                    f(p)
                }
            }
        }
    }
    after_free();
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
    let Some(t) = enter() else { return trim() };
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
        leave(t);
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
