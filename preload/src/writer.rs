//! Writing events: each thread appends words to the ring block it owns.
//!
//! Hot path ([`reserve`] + [`commit`]): one load of the collector clock, a bounds check, plain
//! stores into shared memory, and a release store of the block length. No allocation, lock,
//! syscall or shared read-modify-write.
//!
//! Slow path ([`reserve_slow`]): the clock ticked (write a `Time` event), the block is full or the
//! thread has none (take one from the ring, or wait for the collector in lossless mode, or drop
//! and count in lossy mode).
//!
//! Before the process image is registered with the collector (hooks run before our constructor,
//! e.g. in other libraries' constructors), events go to a static pre-init buffer that the
//! registering thread copies into its own stream.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};

use mtrace_protocol::event::{self, EventKind};
use mtrace_protocol::ring::{self, Ring};
use mtrace_protocol::order;

use crate::sys;
use crate::tls::{mode, ThreadState};

/// Tracing state of this process image.
pub static STATE: AtomicU8 = AtomicU8::new(PREINIT);
/// Not registered yet: events go to the pre-init buffer.
pub const PREINIT: u8 = 0;
/// Registered: events go to the ring.
pub const ACTIVE: u8 = 1;
/// Not tracing (disabled, no collector, collector gone): hooks only forward.
pub const OFF: u8 = 2;

/// Values the hot path reads; written before `STATE` becomes `ACTIVE` (release).
pub struct Hot {
    pub ring: Option<Ring>,
    pub clock: *const AtomicU64,
    pub lossy: bool,
}

pub static mut HOT: Hot = Hot { ring: None, clock: core::ptr::null(), lossy: false };

/// The collector clock as the ring publishes it (0 before the ring is mapped).
pub fn clock_now() -> u64 {
    // SAFETY: `HOT.clock` is null or points into the mapped ring, set before recording starts.
    unsafe {
        let c = (*core::ptr::addr_of!(HOT)).clock;
        if c.is_null() { 0 } else { (*c).load(Ordering::Relaxed) }
    }
}

/// Fork sequence numbers of this image (the child registers with the value current at fork).
pub static FORK_SEQ: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
fn hot() -> &'static Hot {
    // SAFETY: HOT is written only while no other thread can read it (before `STATE` turns
    // ACTIVE with release, or in a fork child that has a single thread).
    unsafe { &*core::ptr::addr_of!(HOT) }
}

/// Reserve `n` words in this thread's block. Null if the event must be dropped.
///
/// # Safety
/// `t` is this thread's state, its guard is held, and `STATE` is `ACTIVE`.
#[inline(always)]
pub unsafe fn reserve(t: *mut ThreadState, n: usize) -> *mut u64 {
    // SAFETY: per the contract, `t` is valid and `HOT.clock` points into the mapped ring.
    unsafe {
        let clock = (*hot().clock).load(Ordering::Relaxed);
        let cur = (*t).cur;
        if clock == (*t).last_clock && (cur as usize).wrapping_add(n * 8) <= (*t).end as usize && !cur.is_null() {
            return cur;
        }
        reserve_slow(t, n, clock)
    }
}

/// The fast paths' reserve: the cursor if `n` words fit in the block and the collector clock has
/// not ticked since the last `Time` event, else `None` (the caller takes the general path, whose
/// [`reserve`] writes the `Time` event or switches blocks). Reads only this thread's state and the
/// clock word.
///
/// # Safety
/// `t` is this thread's state with `fast` not `NONE` (so `clock` is set) and its guard held.
#[inline(always)]
pub unsafe fn reserve_fast(t: *mut ThreadState, n: usize) -> Option<*mut u64> {
    // SAFETY: per the contract `clock` points into the mapped ring. `cur` and `end` are both null
    // or both inside the block, so `cur + n <= end` also rejects a thread without a block.
    unsafe {
        let clock = (*(*t).clock).load(Ordering::Relaxed);
        let cur = (*t).cur;
        if clock == (*t).last_clock && (cur as usize).wrapping_add(n * 8) <= (*t).end as usize { Some(cur) } else { None }
    }
}

/// [`commit`] for a caller that still has the reserved position `w` at hand (saves reloading the
/// cursor after the event's stores).
///
/// # Safety
/// `w` is what a successful `reserve_fast(t, n)` or `reserve(t, n)` returned on this thread, and
/// nothing was committed since.
#[inline(always)]
pub unsafe fn commit_at(t: *mut ThreadState, w: *mut u64, n: usize) {
    // SAFETY: per the contract, `w + n` is within the block; `len` points to our descriptor.
    unsafe {
        let cur = w.add(n);
        (*t).cur = cur;
        let len = (cur as usize - (*t).base as usize) as u32;
        (*(*t).len).store(len, Ordering::Release);
    }
}

/// The position (see `mtrace_protocol::order`) of an event reserved at `w` in this thread's
/// block: 0 if the stream id does not fit one.
///
/// # Safety
/// `t` is this thread's state and `w` a reserved position in its current block.
#[inline(always)]
pub unsafe fn position(t: *mut ThreadState, w: *mut u64) -> u64 {
    // SAFETY: per the contract, `w` lies in the block starting at `base`.
    unsafe {
        let base = (*t).pos_base;
        if base == 0 { 0 } else { base | ((w as usize - (*t).base as usize) / 8) as u64 }
    }
}

/// Publish the `n` words just written at the reserved position.
///
/// # Safety
/// Must follow a successful `reserve(t, n)` on the same thread.
#[inline(always)]
pub unsafe fn commit(t: *mut ThreadState, n: usize) {
    // SAFETY: `reserve` guaranteed room for `n` words; `len` points to our block's descriptor.
    unsafe {
        let cur = (*t).cur.add(n);
        (*t).cur = cur;
        let len = (cur as usize - (*t).base as usize) as u32;
        (*(*t).len).store(len, Ordering::Release);
    }
}

#[cold]
#[inline(never)]
unsafe fn reserve_slow(t: *mut ThreadState, n: usize, clock: u64) -> *mut u64 {
    // SAFETY: per `reserve`'s contract.
    unsafe {
        if clock == POISONED_CLOCK {
            return core::ptr::null_mut();
        }
        // Room for the event plus a Time event.
        let need = (n + 2) * 8;
        if (*t).mode != mode::WRITING || ((*t).end as usize - (*t).cur as usize) < need {
            if !switch_block(t) {
                return core::ptr::null_mut();
            }
        }
        if clock != (*t).last_clock {
            let p = (*t).cur;
            *p = event::header(EventKind::Time, 2, 0);
            *p.add(1) = clock;
            (*t).last_clock = clock;
            commit(t, 2);
        }
        (*t).cur
    }
}

/// Give up the current block (if any) and take a new one. `false`: no block, the event is dropped.
unsafe fn switch_block(t: *mut ThreadState) -> bool {
    let Some(ring) = hot().ring else { return false };
    // SAFETY: `t` is this thread's state and `ring` is mapped while STATE is ACTIVE.
    unsafe {
        // From the first attempt, not the first success: a thread that starts when the ring is
        // exhausted (lossy mode) drops events from the start, and its count must still be
        // flushed when it exits.
        if (*t).key_set == 0 {
            crate::lifecycle::on_thread_first_block();
        }
        let first = (*t).stream == 0;
        give_up_block(t, &ring);
        let mut waited_since = 0u64;
        let mut clock_seen = 0u64;
        let clock = &ring.header().clock.0;
        loop {
            if STATE.load(Ordering::Acquire) != ACTIVE {
                return false;
            }
            // Read the futex word before looking for a block: a recycle that happens after a
            // failed look changes it, and the wait below returns at once.
            let futex_seen = clock.free_futex.load(Ordering::Acquire);
            if let Some(i) = ring.take_block() {
                if first {
                    // Stream 0 means "none yet": ids start at 1.
                    (*t).stream = ring.header().alloc.0.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
                    (*t).block_seq = 0;
                    (*t).tid = sys::gettid();
                } else {
                    (*t).block_seq = (*t).block_seq.wrapping_add(1);
                }
                let d = ring.desc(i);
                d.len.store(0, Ordering::Relaxed);
                d.stream.store((*t).stream, Ordering::Relaxed);
                d.seq.store((*t).block_seq, Ordering::Relaxed);
                d.tid.store((*t).tid, Ordering::Relaxed);
                d.state.store(ring::BLOCK_OWNED, Ordering::Release);
                let base = ring.block_data(i) as *mut u64;
                (*t).block = i;
                (*t).base = base;
                (*t).cur = base;
                (*t).end = base.add(ring.geometry().block_size as usize / 8);
                (*t).len = &d.len;
                (*t).mode = mode::WRITING;
                (*t).clock = hot().clock;
                let ordered = (*t).stream < order::MAX_STREAMS && crate::order::enabled();
                (*t).pos_base = if ordered { order::position((*t).stream, (*t).block_seq, 0) } else { 0 };
                (*t).curbrk = crate::glibc::curbrk_or_zero();
                // The fast paths always exchange and load ordering cells with positions made of
                // `pos_base`, and call the real free without checking it (`real::free_present`).
                (*t).fast = if !ordered || crate::real::free().is_none() {
                    crate::tls::fast::NONE
                } else if crate::glibc::g().chunks {
                    crate::tls::fast::CHUNKS
                } else {
                    crate::tls::fast::PLAIN
                };
                // Every block starts with the time, so it can be read on its own.
                let clock = (*hot().clock).load(Ordering::Relaxed);
                if clock == POISONED_CLOCK {
                    // Tracing stopped since `STATE` was read: hand the empty block back.
                    give_up_block(t, &ring);
                    return false;
                }
                *base = event::header(EventKind::Time, 2, 0);
                *base.add(1) = clock;
                (*t).last_clock = clock;
                commit(t, 2);
                if (*t).dropped != 0 {
                    let p = (*t).cur;
                    *p = event::header(EventKind::Lost, 3, 0);
                    *p.add(1) = (*t).dropped as u64;
                    *p.add(2) = 1;
                    commit(t, 3);
                    flush_dropped(t);
                }
                return true;
            }
            if clock.collector_state.load(Ordering::Acquire) == ring::COLLECTOR_CLOSED {
                detach(ring::detach_reason::COLLECTOR_CLOSED, b"the collector has stopped");
                return false;
            }
            if hot().lossy {
                if (*t).mode != mode::DROPPING {
                    ring.header().alloc.0.dropped_blocks.fetch_add(1, Ordering::Relaxed);
                }
                (*t).mode = mode::DROPPING;
                (*t).dropped += 1;
                // Publish the count as it grows (we are dropping anyway: the cost is moot), so
                // a program that ends while dropping cannot under-report.
                if (*t).dropped >= 256 {
                    flush_dropped(t);
                }
                return false;
            }
            // Lossless: wait for the collector to recycle a block. A collector whose clock
            // stops for the detach timeout (3 s unless it asked otherwise) is gone or stuck;
            // stop tracing rather than hang the application.
            let now = sys::clock_ns(libc::CLOCK_MONOTONIC);
            let c = clock.clock_ns.load(Ordering::Relaxed);
            let timeout_ms = DETACH_TIMEOUT_MS.load(Ordering::Relaxed);
            if c != clock_seen || waited_since == 0 {
                clock_seen = c;
                waited_since = now;
            } else if now - waited_since > timeout_ms as u64 * 1_000_000 {
                let mut why = sys::FixedBuf::<96>::new();
                why.push(b"the collector stopped responding (no heartbeat for ").push_u64(timeout_ms as u64).push(b" ms)");
                detach(ring::detach_reason::NO_HEARTBEAT, why.as_bytes());
                return false;
            }
            let a = &ring.header().alloc.0;
            a.free_waiters.fetch_add(1, Ordering::AcqRel);
            sys::futex_wait(&clock.free_futex, futex_seen, 20_000_000);
            a.free_waiters.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Add this thread's count of dropped events to the ring's total. The ring total is what the
/// report counts; `Lost` events in the stream only mark where the gaps are.
///
/// # Safety
/// `t` is this thread's state.
pub unsafe fn flush_dropped(t: *mut ThreadState) {
    // SAFETY: per the contract.
    unsafe {
        if (*t).dropped == 0 {
            return;
        }
        if let Some(ring) = hot().ring {
            ring.header().alloc.0.dropped_events.fetch_add((*t).dropped as u64, Ordering::Relaxed);
        }
        (*t).dropped = 0;
    }
}

/// Stop tracing this image (the application keeps running untraced). `reason` is one of
/// `ring::detach_reason`: with the time, it goes into the ring's detach line, where a collector
/// that comes back (a stopped one) reads when and why the trace ends early.
pub fn detach(reason: u32, why: &[u8]) {
    if STATE.swap(OFF, Ordering::AcqRel) == ACTIVE {
        DETACHED.store(true, Ordering::Release);
        // The fast paths read no `STATE`: a clock that can never equal a thread's last one sends
        // every thread to the general path, which sees `OFF` (see `tls::fast::CHUNKS`). Nobody
        // reads this ring any more, or ever will in earnest: the collector is gone or stuck.
        if let Some(ring) = hot().ring {
            let d = &ring.header().detach.0;
            d.at_ns.store(sys::clock_ns(libc::CLOCK_MONOTONIC), Ordering::Relaxed);
            d.reason.store(reason, Ordering::Release);
            ring.header().clock.0.clock_ns.store(POISONED_CLOCK, Ordering::Release);
        }
        sys::warn(&[b"tracing stopped: ", why]);
    }
}

/// Count one call made while tracing is off (it goes to the ring only if the image [`detach`]ed).
///
/// # Safety
/// `t` is this thread's state.
#[inline(always)]
pub unsafe fn count_untraced(t: *mut ThreadState) {
    // SAFETY: per the contract.
    unsafe {
        (*t).untraced = (*t).untraced.wrapping_add(1);
        if (*t).untraced >= 1 << 31 {
            flush_untraced(t);
        }
    }
}

/// The detach timeout, read from the ring once as the image registers ([`set_detach_timeout`]):
/// a program that later scribbles over its ring cannot make its threads wait for ever.
pub static DETACH_TIMEOUT_MS: AtomicU32 = AtomicU32::new(ring::DEFAULT_DETACH_TIMEOUT_MS);

/// Take the collector's detach timeout from a freshly mapped ring (0: the default).
pub fn set_detach_timeout(r: &Ring) {
    let ms = match r.header().detach.0.timeout_ms.load(Ordering::Relaxed) {
        0 => ring::DEFAULT_DETACH_TIMEOUT_MS,
        ms => ms.min(86_400_000),
    };
    DETACH_TIMEOUT_MS.store(ms, Ordering::Relaxed);
}

/// This image was traced and stopped ([`detach`]): its calls since are counted, not recorded.
pub static DETACHED: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Add this thread's count of calls made untraced after [`detach`] to the ring's detach line
/// (thread exit, process exit, and whenever it reaches 2^31).
///
/// # Safety
/// `t` is this thread's state.
pub unsafe fn flush_untraced(t: *mut ThreadState) {
    // SAFETY: per the contract.
    unsafe {
        let n = core::mem::take(&mut (*t).untraced);
        if n != 0 && DETACHED.load(Ordering::Acquire) {
            if let Some(ring) = hot().ring {
                ring.header().detach.0.untraced_calls.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// The collector clock after [`detach`]: the collector only ever raises the clock (`fetch_max`),
/// so it stays, and no `Time` event carries it ([`reserve_slow`] drops the event).
pub const POISONED_CLOCK: u64 = u64::MAX;

/// Release this thread's block at thread exit (so the ring does not fill with dead threads'
/// blocks). Later events of the thread take a new block.
///
/// # Safety
/// `t` is this thread's state with the guard held.
pub unsafe fn release_block(t: *mut ThreadState) {
    // SAFETY: per the contract.
    unsafe {
        flush_dropped(t);
        if STATE.load(Ordering::Acquire) != ACTIVE || (*t).mode != mode::WRITING {
            return;
        }
        let p = reserve(t, 1);
        if !p.is_null() {
            *p = event::header(EventKind::ThreadExit, 1, 0);
            commit(t, 1);
        }
        if let Some(ring) = hot().ring {
            give_up_block(t, &ring);
        }
        // A thread that was dropping events (lossy, ring exhausted) ends idle too.
        (*t).mode = mode::IDLE;
    }
}

/// Publish the block this thread writes into (if it writes) as full, for the collector to drain
/// and recycle, and leave the thread idle: its next event takes a new block.
///
/// # Safety
/// `t` is this thread's state with the guard held; `ring` is the mapped ring.
unsafe fn give_up_block(t: *mut ThreadState, ring: &Ring) {
    // SAFETY: per the contract.
    unsafe {
        if (*t).mode == mode::WRITING {
            ring.desc((*t).block).state.store(ring::BLOCK_FULL, Ordering::Release);
            (*t).fast = crate::tls::fast::NONE;
            (*t).mode = mode::IDLE;
            (*t).cur = core::ptr::null_mut();
            (*t).end = core::ptr::null_mut();
        }
    }
}

/// The cut of a fork (see `mtrace_protocol::event::fork_cut`): for each stream with a block in
/// the ring, the position right after the events it has published, into `out`; returns how
/// many. Taken by the forking thread just before `fork` (streams beyond `out` are left out, and
/// then ordered against the fork by time marks alone).
///
/// # Safety
/// `STATE` is `ACTIVE` (the ring is mapped).
pub unsafe fn fork_cut(out: &mut [u64]) -> usize {
    let Some(ring) = hot().ring else { return 0 };
    let (mut n, cap) = (0, out.len());
    for i in 0..ring.used_blocks() {
        let d = ring.desc(i);
        // A descriptor changes owner when a writer takes the block: read it twice around its
        // fields and keep it only if nothing moved (a block changing hands now holds nothing
        // published yet by its new owner).
        let read = || (d.state.load(Ordering::Acquire), d.stream.load(Ordering::Acquire), d.seq.load(Ordering::Acquire), d.len.load(Ordering::Acquire));
        let (state, stream, seq, len) = read();
        if (state, stream, seq) != { let (s2, st2, q2, _) = read(); (s2, st2, q2) } {
            continue;
        }
        if stream == 0 || stream >= order::MAX_STREAMS {
            continue;
        }
        // An owned block up to what is published; a full or recycled one whole (its last owner
        // published all of it: the next block's start). A word offset that does not fit a
        // position (a full 128 KiB block) is the next block's start too.
        let word = len / 8;
        let pos = if state == ring::BLOCK_OWNED && word < 1 << order::WORD_BITS {
            order::position(stream, seq, word)
        } else {
            order::position(stream, seq.wrapping_add(1), 0)
        };
        // The latest block of each stream: within one stream, positions order as (block, word).
        match out[..n].iter_mut().find(|v| **v >> 40 == pos >> 40) {
            Some(v) => *v = (*v).max(pos),
            None if n < cap => {
                out[n] = pos;
                n += 1;
            }
            None => {}
        }
    }
    n
}

/// Forget the ring (fork child: the blocks belong to the parent).
///
/// # Safety
/// Only in a fork child (single thread), with `t` its state.
pub unsafe fn forget_ring(t: *mut ThreadState) {
    // SAFETY: per the contract; nobody else reads HOT in a one-thread child.
    unsafe {
        let busy = (*t).busy;
        core::ptr::write_bytes(t as *mut u8, 0, core::mem::size_of::<ThreadState>());
        (*t).busy = busy;
        (*t).key_set = 1;
        (*core::ptr::addr_of_mut!(HOT)).ring = None;
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-init buffer.

const PRE_WORDS: usize = 64 << 10;
static mut PRE: [u64; PRE_WORDS] = [0; PRE_WORDS];
static PRE_RESERVED: AtomicUsize = AtomicUsize::new(0);
static PRE_COMMITTED: AtomicUsize = AtomicUsize::new(0);
static PRE_LOST: AtomicU64 = AtomicU64::new(0);
const PRE_CLOSED: usize = 1 << 48;

/// Reserve `n` words of the pre-init buffer (null if full or closed; the event is counted lost).
pub fn pre_reserve(n: usize) -> *mut u64 {
    let at = PRE_RESERVED.fetch_add(n, Ordering::AcqRel);
    if at + n > PRE_WORDS {
        PRE_COMMITTED.fetch_add(n, Ordering::AcqRel);
        if at < PRE_CLOSED {
            PRE_LOST.fetch_add(1, Ordering::Relaxed);
        }
        return core::ptr::null_mut();
    }
    // SAFETY: `at + n <= PRE_WORDS`: the range is ours alone.
    unsafe { (core::ptr::addr_of_mut!(PRE) as *mut u64).add(at) }
}

pub fn pre_commit(n: usize) {
    PRE_COMMITTED.fetch_add(n, Ordering::AcqRel);
}

/// Close the pre-init buffer and copy it into this thread's stream. Called by the registering
/// thread right after `STATE` became `ACTIVE`.
///
/// # Safety
/// `t` is this thread's state, guard held, `STATE` is `ACTIVE`.
pub unsafe fn drain_preinit(t: *mut ThreadState) {
    let total = PRE_RESERVED.swap(PRE_CLOSED, Ordering::AcqRel);
    let words = total.min(PRE_WORDS);
    // Wait (briefly) for writers that reserved before the switch to finish their stores.
    let mut spins = 0u32;
    while PRE_COMMITTED.load(Ordering::Acquire) < total && spins < 1_000_000 {
        core::hint::spin_loop();
        spins += 1;
    }
    // SAFETY: writers are done with `[0, words)`; nobody writes the buffer after closing.
    let pre = unsafe { core::slice::from_raw_parts(core::ptr::addr_of!(PRE) as *const u64, words) };
    let mut i = 0;
    while i < words {
        let (_, len, _) = event::split_header(pre[i]);
        if len == 0 || i + len > words {
            break;
        }
        // SAFETY: per the contract.
        unsafe {
            let p = reserve(t, len);
            if !p.is_null() {
                core::ptr::copy_nonoverlapping(pre.as_ptr().add(i), p, len);
                commit(t, len);
            }
        }
        i += len;
    }
    let lost = PRE_LOST.swap(0, Ordering::AcqRel);
    if lost != 0 {
        // SAFETY: per the contract.
        unsafe {
            let p = reserve(t, 3);
            if !p.is_null() {
                *p = event::header(EventKind::Lost, 3, 0);
                *p.add(1) = lost;
                *p.add(2) = 0;
                commit(t, 3);
            }
            if let Some(ring) = hot().ring {
                ring.header().alloc.0.dropped_events.fetch_add(lost, Ordering::Relaxed);
            }
        }
    }
}

/// Discard the pre-init buffer (tracing is off).
pub fn discard_preinit() {
    PRE_RESERVED.swap(PRE_CLOSED, Ordering::AcqRel);
}

/// Write one event of at most `max` words (≤ 16) that takes part in the ordering of its address:
/// `fill(w, pos)` writes it at `w` and returns its length; `pos` is the event's position in the
/// ring, or 0 where it has none (the pre-init buffer, a stream id beyond positions, no ordering
/// cells) — then it must touch no ordering cell.
///
/// # Safety
/// `t` is this thread's state with the guard held; `fill` writes at most `max` words.
#[inline(always)]
pub unsafe fn emit_ordered(t: *mut ThreadState, max: usize, fill: impl FnOnce(*mut u64, u64) -> usize) {
    // SAFETY: per the contract.
    unsafe {
        match STATE.load(Ordering::Acquire) {
            ACTIVE => {
                let p = reserve(t, max);
                if p.is_null() {
                    return;
                }
                let pos = if crate::order::enabled() { position(t, p) } else { 0 };
                let n = fill(p, pos);
                commit(t, n);
            }
            PREINIT => {
                let mut tmp = [0u64; 16];
                let n = fill(tmp.as_mut_ptr(), 0);
                let p = pre_reserve(n);
                if !p.is_null() {
                    core::ptr::copy_nonoverlapping(tmp.as_ptr(), p, n);
                    pre_commit(n);
                }
            }
            _ => {}
        }
    }
}

/// The position the next event of this thread will be written at, for a call whose ordering
/// cell must be exchanged before its event can be written (a realloc exchanges its old block's
/// cell before the real call and writes its event after): `Some(0)` if it has none (not
/// registered, no ordering cells, a stream id beyond positions), `None` if the event would be
/// dropped now (lossy mode, no block): the caller then drops it too, so that no event is recorded
/// whose exchange was not made. The collector resolves a position to the first *call* event at
/// or after it (see `mtrace_protocol::order`), so observations written in between (a `Time`, a
/// heap's size) keep it right — as long as the guard is held from here to the event. Room is
/// made for the event and such observations, so that the event lands in this block.
///
/// # Safety
/// `t` is this thread's state with the guard held.
#[inline(always)]
pub unsafe fn next_position(t: *mut ThreadState) -> Option<u64> {
    // SAFETY: per the contract; `reserve` only makes room (and may write a `Time` event).
    unsafe {
        if STATE.load(Ordering::Acquire) != ACTIVE || !crate::order::enabled() {
            return Some(0);
        }
        let p = reserve(t, NEXT_EVENT_ROOM);
        if p.is_null() { None } else { Some(position(t, p)) }
    }
}

/// Words [`next_position`] makes room for: the longest realloc event (9), the heap observations
/// the call may add before it (`ArenaHeap` and `HeapSize`, 8) and time marks (2 each).
const NEXT_EVENT_ROOM: usize = 24;

/// Write one event of `n` words, built by `fill`, to the ring or the pre-init buffer.
///
/// `fill` is called in one place only, so that it is inlined (a closure called from two branches
/// is compiled out of line, with its captures spilled to the stack).
///
/// # Safety
/// `t` is this thread's state with the guard held; `fill` writes exactly `n` words.
#[inline(always)]
pub unsafe fn emit(t: *mut ThreadState, n: usize, fill: impl FnOnce(*mut u64)) {
    // SAFETY: per the contract.
    unsafe {
        let active = match STATE.load(Ordering::Acquire) {
            ACTIVE => true,
            PREINIT => false,
            _ => return,
        };
        let p = if active { reserve(t, n) } else { pre_reserve(n) };
        if p.is_null() {
            return;
        }
        fill(p);
        if active {
            commit(t, n);
        } else {
            pre_commit(n);
        }
    }
}
