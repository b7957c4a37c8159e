//! Allocation stacks: unwinding, memoisation, interning, sampling.
//!
//! **When.** With stacks on, an allocation hook takes the stack *before* forwarding to the real
//! function ([`before`]: the guard taken and released around it; nothing happens before the
//! image registered), then forwards and records the event with the id at once. Taking it after
//! the call would delay the event by an unwind, and the collector orders other threads' calls
//! and `mallinfo2` checkpoints against it by time marks and publication. A new stack's `Stack`
//! event (and new modules' `Module` events) precede the allocation's event in the stream.
//!
//! **Where unwinding starts.** The allocation entry points (malloc, calloc, realloc,
//! reallocarray, memalign, aligned_alloc, posix_memalign, valloc, pvalloc) are small naked
//! trampolines (see `hooks.rs`) that store the caller's frame — its CFA (`rsp + 8` at entry,
//! the return address sits just below it) and its `rbp` — into this thread's [`StackState`]
//! (when it has one) and jump to the Rust hook. Unwinding starts at the caller's frame, so no
//! frame of ours is ever unwound on the common path, and `ip[0]` is the return address into the
//! caller. (When the state was not there yet — a thread's first stack — or the stored frame is
//! not plausible, [`capture`] unwinds from its own registers through our frames instead, and
//! drops them.)
//!
//! **Unwinding** uses framehop with `.eh_frame` in place ([`crate::modules`]), a per-thread
//! framehop cache (allocated once per thread by the cold allocator, pooled at thread exit) and a
//! `read_stack` that only reads `[cfa - 8, stack top)` of this thread's stack (found once per
//! thread without allocating: main thread, the page above `__libc_stack_end` (no `/proc` read);
//! other threads, glibc's stack block in the thread descriptor, see [`stack_bounds`]). A frame
//! on another stack (sigaltstack, a coroutine) is unwound from our own registers and may only
//! read up to the end of the current page: a short stack. Whatever was unwound before a failure
//! is the stack.
//!
//! **Memoisation** (per thread, 32 entries in 16 sets of two, keyed by the caller's CFA and the
//! return address): a full
//! unwind logs every stack word it read. A later call with the same return address, the same
//! CFA and all logged words unchanged (and the same module-list generation) gets the same
//! stack: the unwinder is deterministic in those inputs. `rbp` is the catch: code without frame
//! pointers keeps anything in it (a loop counter), and pushes it in prologues. So every frame is
//! first unwound with `rbp` poisoned (a kernel address: any use of it reads out of bounds or
//! fails); a frame that succeeds does not depend on `rbp`. A frame that fails is unwound again
//! with the real value, and only then does that value become an input: the caller's `rbp`
//! (part of the memo key) or the stack word it was restored from (logged). Words read only to
//! restore an `rbp` that no later frame uses are not logged. A tight loop calling malloc from
//! one place thus costs a few compares and loads.
//!
//! **Interning**: the stack id is a 64-bit hash of the frames (never 0). A process-wide,
//! fixed-size, lock-free open-addressed table (2^17 ids, 1 MiB of anonymous memory touched as
//! ids land in it, inherited by fork children) holds the ids already defined; the thread whose compare-and-swap inserts an id
//! writes its `Stack` event into its own stream. When 64 probes find no room (table full) the
//! definition is written again each time the stack is seen unmemoised (a duplicate, identical
//! definition, see `event.rs`). Two different stacks with the same 64-bit hash would share an id
//! (odds ~n²/2^65).
//!
//! **Memory** of ours in the process (all anonymous, named `[anon:mtrace]` where the kernel
//! supports it, so the collector can tell it from the program's): the intern table (≤ 1 MiB
//! resident), per thread a ~55 KiB state and a ~40 KiB framehop cache, the module lists.
//!
//! **Sampling** (`MTRACE_STACK_SAMPLE_BYTES=N`): a per-thread byte counter; the allocation
//! that makes it reach N gets a stack (the counter keeps the remainder), the others none.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64};
use framehop::{FrameAddress, MustNotAllocateDuringUnwind, Unwinder};
use mtrace_protocol::event::{header, EventKind, MAX_STACK_DEPTH};

use crate::modules::{self, ModList};
use crate::sys;
use crate::tls::ThreadState;
use crate::writer;

static ON: AtomicBool = AtomicBool::new(false);
static WANTED: AtomicBool = AtomicBool::new(true);
static DEPTH: AtomicU64 = AtomicU64::new(32);
static SAMPLE: AtomicU64 = AtomicU64::new(0);
static LIBC_STACK_END: AtomicU64 = AtomicU64::new(0);
static MAIN_LIMIT: AtomicU64 = AtomicU64::new(8 << 20);

/// Stacks are being recorded.
#[inline(always)]
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

const MEMO: usize = 32;
const MEMO_READS: usize = 96;
/// Read slots a memo entry always checks, used or not (unused ones are [`pad_read`]): the memo
/// hit compares them without a loop, and loops only over the rest.
const MEMO_FIXED: usize = 2;
/// The word an unused fixed read slot reads (and expects): always 0.
static PAD_WORD: u64 = 0;
/// Set in a memo entry's key (`Memo::cfa`) when stacks are sampled: a real CFA is 8-aligned, so
/// such an entry never matches in [`memo_hit`] (which must not answer when sampling decides)
/// and only [`capture`], which adds the mark, finds it.
const SAMPLED_KEY: u64 = 1;
/// Frames unwound at most (the depth plus room for our own frames on the fallback path).
const MAX_UNWIND: usize = MAX_STACK_DEPTH + 16;
/// `rbp` while a frame is tried without it.
const POISON: u64 = 0xffff_8000_0000_0000;

#[repr(C)]
struct Memo {
    ra: u64,
    /// The caller's CFA, with [`SAMPLED_KEY`] when sampling; 0: unused.
    cfa: u64,
    bp: u64,
    generation: u64,
    id: u64,
    /// The caller's `rbp` is an input (compare `bp`).
    bp_dep: u32,
    n: u32,
    reads: [(u64, u64); MEMO_READS],
}

/// A thread's stack state, in its own anonymous mapping (never in TLS).
#[repr(C)]
pub struct StackState {
    /// Written by the trampolines: the caller's CFA and `rbp` (0: not set).
    pub cfa: u64,
    pub bp: u64,
    counter: u64,
    lo: u64,
    hi: u64,
    unknown: u64,
    /// A new stack to define once the allocation event is written: its id, frames in `frames`.
    pending_id: u64,
    pending_n: usize,
    cache: CacheX86_64<MustNotAllocateDuringUnwind>,
    frames: [u64; MAX_UNWIND],
    log: [(u64, u64); MEMO_READS],
    nlog: usize,
    overflow: bool,
    oob: bool,
    /// Which way of a full set the next memoised stack replaces (alternating).
    memo_turn: u8,
    memo: [Memo; MEMO],
}

/// Offset of `StackState::cfa` / `bp` for the trampolines.
pub const CFA_OFFSET: usize = core::mem::offset_of!(StackState, cfa);

fn env_u64(name: &core::ffi::CStr) -> Option<u64> {
    // SAFETY: getenv does not allocate; the value is NUL-terminated.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: as above.
    let b = unsafe { sys::cstr_bytes(p as *const u8) };
    if b.is_empty() || !b.iter().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(b.iter().fold(0u64, |a, c| a.saturating_mul(10).saturating_add((c - b'0') as u64)))
}

/// Read the configuration (constructor, single-threaded).
pub fn configure() {
    if env_u64(c"MTRACE_STACKS") == Some(0) {
        WANTED.store(false, Ordering::Relaxed);
    }
    if let Some(d) = env_u64(c"MTRACE_STACK_DEPTH") {
        DEPTH.store(d.clamp(1, MAX_STACK_DEPTH as u64), Ordering::Relaxed);
    }
    if let Some(s) = env_u64(c"MTRACE_STACK_SAMPLE_BYTES") {
        SAMPLE.store(s, Ordering::Relaxed);
    }
}

static TABLE: AtomicPtr<AtomicU64> = AtomicPtr::new(core::ptr::null_mut());
const TABLE_BITS: u32 = 17;
const PROBES: usize = 64;

/// Once registered: the intern table, the module list (every module sent), then stacks on.
///
/// # Safety
/// Guard held, `STATE` is `ACTIVE`.
pub unsafe fn start(t: *mut ThreadState) {
    if !WANTED.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: dlsym of ld.so's exported data symbol; a fresh anonymous mapping.
    unsafe {
        let p = libc::dlsym(libc::RTLD_DEFAULT, c"__libc_stack_end".as_ptr()) as *const u64;
        if !p.is_null() {
            LIBC_STACK_END.store(*p, Ordering::Relaxed);
        }
        let mut rl: libc::rlimit = core::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_STACK, &mut rl) == 0 {
            MAIN_LIMIT.store((rl.rlim_cur as u64).clamp(1 << 20, 128 << 20), Ordering::Relaxed);
        }
        let len = (8usize << TABLE_BITS) as usize;
        let m = sys::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if m != libc::MAP_FAILED && !m.is_null() {
            sys::name_mapping(m, len);
            TABLE.store(m as *mut AtomicU64, Ordering::Release);
        }
        modules::refresh_waiting();
        modules::announce(t);
    }
    if modules::current().is_some() {
        ON.store(true, Ordering::Release);
    }
}

/// In a registered fork child: the child's stream gets the module list again. Its intern table
/// and module list are the parent's (copied memory): its stack ids continue the parent's.
///
/// # Safety
/// Guard held, `STATE` is `ACTIVE`, single-threaded.
pub unsafe fn fork_child(t: *mut ThreadState) {
    crate::coldalloc::after_fork_child();
    modules::after_fork_child();
    if enabled() {
        // SAFETY: per the contract.
        unsafe { modules::resend_all(t) };
    }
}

/// Pool of states of exited threads.
static POOL: [AtomicPtr<StackState>; 64] = [const { AtomicPtr::new(core::ptr::null_mut()) }; 64];

/// A thread exits: its state goes to the pool (or is unmapped when the pool is full; its
/// framehop cache then leaks in the cold allocator).
///
/// # Safety
/// `t` is this thread's state; guard held.
pub unsafe fn thread_exit(t: *mut ThreadState) {
    // SAFETY: `t` is ours.
    let st = unsafe { (*t).stk };
    if st.is_null() {
        return;
    }
    // SAFETY: as above.
    unsafe { (*t).stk = core::ptr::null_mut() };
    for slot in &POOL {
        if slot.compare_exchange(core::ptr::null_mut(), st, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            return;
        }
    }
    // SAFETY: `st` is our mapping, no longer reachable.
    unsafe { sys::munmap(st as *mut libc::c_void, core::mem::size_of::<StackState>()) };
}

/// This thread's state, made on first use (pool or a fresh mapping; stack bounds read here).
#[cold]
#[inline(never)]
unsafe fn new_state(t: *mut ThreadState, sp: u64) -> *mut StackState {
    let mut st: *mut StackState = core::ptr::null_mut();
    for slot in &POOL {
        let p = slot.swap(core::ptr::null_mut(), Ordering::AcqRel);
        if !p.is_null() {
            st = p;
            break;
        }
    }
    // SAFETY: a fresh anonymous mapping (all-zero is a valid state but for the cache, which is
    // written in place) or a pooled state that no thread uses any more.
    unsafe {
        if st.is_null() {
            let m = sys::mmap(
                core::ptr::null_mut(),
                core::mem::size_of::<StackState>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if m == libc::MAP_FAILED || m.is_null() {
                return core::ptr::null_mut();
            }
            sys::name_mapping(m, core::mem::size_of::<StackState>());
            st = m as *mut StackState;
            core::ptr::write(core::ptr::addr_of_mut!((*st).cache), CacheX86_64::new_in());
        } else {
            for m in (*st).memo.iter_mut() {
                m.cfa = 0;
                m.n = 0;
            }
            (*st).counter = 0;
            (*st).unknown = 0;
            (*st).pending_n = 0;
        }
        (*st).cfa = 0;
        let (lo, hi) = stack_bounds(sp);
        (*st).lo = lo;
        (*st).hi = hi;
        (*t).stk = st;
    }
    st
}

/// This thread's stack `[lo, hi)`.
unsafe fn stack_bounds(sp: u64) -> (u64, u64) {
    let end = LIBC_STACK_END.load(Ordering::Relaxed);
    let limit = MAIN_LIMIT.load(Ordering::Relaxed);
    if end != 0 && sp <= end && end - sp < limit {
        // The main thread: `__libc_stack_end` is argc's address; the page holding argv[0] is
        // mapped. (No /proc/self/maps read, which pthread_getattr_np would do.)
        let hi = (end + 8 + 4095) & !4095;
        return (end.saturating_sub(limit), hi);
    }
    // Another thread: not `pthread_getattr_np`, which allocates (untraced allocations would put
    // glibc's arenas out of step with the model). glibc keeps the thread's stack block in its
    // `struct pthread` (the thread pointer), as `stackblock, stackblock_size`, and puts the
    // descriptor at the top of that block (the block's end lies just above the descriptor).
    // Find that pair: the only adjacent words (a, s) with a page-aligned, a <= sp < a + s, and
    // the block ending within a page above the descriptor (offset 0x690 in glibc 2.36; the
    // descriptor is larger than the 0x800 bytes scanned). Above `sp`, up to the descriptor,
    // everything is mapped.
    // SAFETY: pthread_self reads the thread pointer; the words read lie inside the descriptor.
    unsafe {
        let tp = libc::pthread_self() as u64;
        if tp > sp {
            let mut off = 0;
            while off < 0x800 {
                let a = *((tp + off) as *const u64);
                let s = *((tp + off + 8) as *const u64);
                if a != 0 && a & 4095 == 0 && a <= sp && s < 1 << 40 && sp < a + s && a + s > tp && a + s - tp <= 4096 {
                    return (a, tp);
                }
                off += 8;
            }
        }
    }
    (0, 0)
}

/// The memo set (its first entry; a set is two entries) of a call from return address `ra` with
/// CFA `cfa`. Both are in the key: sibling helpers (`make_node`, `make_buffer` called from one
/// function) call the allocator with the same CFA and different return addresses, and must not
/// evict each other; two ways make the hot sites of a loop collide rarely. Measured on
/// `bench/mixed` (5 hot sites): 16 direct-mapped entries missed on every call in about a third
/// of runs (address layouts), 8 sets of two in one run of six; 16 sets of two leave 3 of 5 sites
/// in one set in about 4% of layouts.
#[inline(always)]
fn memo_set(cfa: u64, ra: u64) -> usize {
    const SET_BITS: u32 = MEMO.trailing_zeros() - 1;
    (((cfa ^ ra.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SET_BITS)) as usize) << 1
}

/// The entry of `memo` for key `key` (a CFA, marked when sampling) and `ra`: the way of its set
/// that holds it, else the set's first (which then does not match).
#[inline(always)]
fn memo_way(memo: *const Memo, key: u64, ra: u64, set: usize) -> *const Memo {
    // SAFETY: `set + 1 < MEMO` (`memo_set`); `memo` points to the state's `MEMO` entries.
    unsafe {
        let m = memo.add(set);
        if (*m).cfa == key && (*m).ra == ra { m } else if (*memo.add(set + 1)).cfa == key && (*memo.add(set + 1)).ra == ra { memo.add(set + 1) } else { m }
    }
}

/// An unused fixed read slot of a memo entry: reads [`PAD_WORD`], expects 0.
#[inline(always)]
fn pad_read() -> (u64, u64) {
    (&raw const PAD_WORD as u64, 0)
}

/// A memo entry's key for the caller's CFA `cfa`: see [`SAMPLED_KEY`].
#[inline(always)]
fn memo_key(cfa: u64) -> u64 {
    if SAMPLE.load(Ordering::Relaxed) != 0 { cfa | SAMPLED_KEY } else { cfa }
}

#[inline(always)]
fn own_sp() -> u64 {
    let sp: u64;
    // SAFETY: reads the stack pointer.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    sp
}

/// The stack id for an allocation of `size` bytes that is about to be forwarded (0: none —
/// stacks off, not registered, our own call, not sampled, nothing unwound). Called *before* the
/// real function, so that the allocation's event follows the real call at once (the collector
/// orders calls of different threads, and `mallinfo2` checkpoints, by their time marks and
/// publication; an unwind in between put checkpoints out of order). A new stack's `Stack`
/// event (and new modules' `Module` events) are written here, before the allocation event.
#[inline(always)]
pub fn before(size: u64) -> u64 {
    if !enabled() {
        return 0;
    }
    before_slow(size)
}

/// [`before`] out of line: the memo hit, else [`before_cold`].
#[inline(never)]
fn before_slow(size: u64) -> u64 {
    let t = crate::tls::state();
    // SAFETY: `t` is this thread's state.
    unsafe {
        if (*t).busy != 0 || writer::STATE.load(Ordering::Acquire) != writer::ACTIVE {
            return 0;
        }
        before_ready(t, size)
    }
}

/// [`before`] for a hook that already checked that the guard is free and that the thread is
/// recording (`STATE` is `ACTIVE`, or the thread has a fast path: see `tls::fast::CHUNKS`): the
/// memo hit inline (no call, no guard needed: nothing but this thread's state is touched), else
/// [`before_cold`], which checks `STATE`.
///
/// # Safety
/// `t` is this thread's state, its guard free, the thread recording as above, stacks are on.
#[inline(always)]
pub unsafe fn before_ready(t: *mut ThreadState, size: u64) -> u64 {
    // SAFETY: per the contract.
    unsafe {
        match memo_hit(t) {
            0 => before_cold(t, size),
            id => id,
        }
    }
}

/// The id of the caller's stack if the memo has it (0: no — then the trampoline's frame is
/// left for [`before_cold`]). No sampling, a state that exists.
///
/// The caller's CFA must lie above our own stack pointer (a frame the trampoline noted for a
/// call that never came here is below it, popped); everything else about it is vouched for by
/// the entry it matches, whose CFA was checked against the stack bounds when it was filled.
///
/// # Safety
/// `t` is this thread's state, its guard free.
#[inline(always)]
unsafe fn memo_hit(t: *mut ThreadState) -> u64 {
    // SAFETY: `st` is this thread's stack state. A memo entry's words were read from this
    // thread's stack between the same CFA and the stack top: still mapped.
    unsafe {
        let st = (*t).stk;
        if st.is_null() {
            return 0;
        }
        let cfa = (*st).cfa;
        let bp = (*st).bp;
        if cfa <= own_sp() || cfa & 7 != 0 || !((*st).lo < cfa && cfa <= (*st).hi) {
            return 0;
        }
        // Inside this thread's stack and above our frame: mapped.
        let ra = *((cfa - 8) as *const u64);
        // An entry with `SAMPLED_KEY` (sampling) never equals `cfa`.
        let m = &*memo_way((&raw const (*st).memo).cast::<Memo>(), cfa, ra, memo_set(cfa, ra));
        if m.cfa != cfa || m.ra != ra || m.generation != modules::GEN.load(Ordering::Relaxed) || (m.bp_dep != 0 && m.bp != bp) {
            return 0;
        }
        // A used entry's first `MEMO_FIXED` slots are reads or `pad_read()`s (`full`), without a
        // loop; then the rest of its `n` ≤ MEMO_READS.
        let r = m.reads.as_ptr();
        let (r0, r1) = (*r, *r.add(1));
        if (*(r0.0 as *const u64) ^ r0.1) | (*(r1.0 as *const u64) ^ r1.1) != 0 {
            return 0;
        }
        let n = m.n as usize;
        if n > MEMO_FIXED {
            let mut i = MEMO_FIXED;
            while i < n {
                let (a, v) = *r.add(i);
                if *(a as *const u64) != v {
                    return 0;
                }
                i += 1;
            }
        }
        (*st).cfa = 0;
        m.id
    }
}

/// Everything but a memo hit: the thread's first stack, sampling, a full unwind, definitions.
#[cold]
#[inline(never)]
fn before_cold(t: *mut ThreadState, size: u64) -> u64 {
    // SAFETY: `t` is this thread's state; the guard is taken around our work.
    unsafe {
        // The malloc hooks reach us without checking `STATE` (see `tls::fast::CHUNKS`).
        if writer::STATE.load(Ordering::Acquire) != writer::ACTIVE {
            return 0;
        }
        (*t).busy = 1;
        // The program's errno is not ours to change (naming our mappings may fail, say).
        let errno = *libc::__errno_location();
        let mut sid = 0;
        if wanted(t, size) {
            sid = capture(t);
            flush(t);
        }
        *libc::__errno_location() = errno;
        (*t).busy = 0;
        sid
    }
}

/// Does an allocation of `size` bytes on this thread get a stack (stacks on, sampled)?
///
/// # Safety
/// `t` is this thread's state, guard held.
#[inline(always)]
unsafe fn wanted(t: *mut ThreadState, size: u64) -> bool {
    if !enabled() {
        return false;
    }
    let sample = SAMPLE.load(Ordering::Relaxed);
    if sample == 0 {
        return true;
    }
    // SAFETY: per the contract.
    unsafe { sampled(t, size, sample) }
}

#[inline(never)]
unsafe fn sampled(t: *mut ThreadState, size: u64, sample: u64) -> bool {
    // SAFETY: per `wanted`.
    unsafe {
        let st = state(t);
        if st.is_null() {
            return false;
        }
        let c = (*st).counter.saturating_add(size);
        if c < sample {
            (*st).counter = c;
            return false;
        }
        (*st).counter = c % sample;
        true
    }
}

#[inline(always)]
unsafe fn state(t: *mut ThreadState) -> *mut StackState {
    // SAFETY: `t` is this thread's state.
    unsafe {
        let st = (*t).stk;
        if !st.is_null() {
            return st;
        }
        new_state(t, own_sp())
    }
}

/// Write what [`capture`] left to define: new modules, a new stack.
///
/// # Safety
/// `t` is this thread's state, guard held, `STATE` is `ACTIVE`, no event half-written.
/// Returns whether it wrote anything.
#[inline(always)]
unsafe fn flush(t: *mut ThreadState) -> bool {
    // SAFETY: per the contract.
    unsafe {
        let st = (*t).stk;
        if (!st.is_null() && (*st).pending_n != 0) || modules::unannounced() {
            flush_slow(t, st);
            return true;
        }
        false
    }
}

#[cold]
#[inline(never)]
unsafe fn flush_slow(t: *mut ThreadState, st: *mut StackState) {
    // SAFETY: per `flush`.
    unsafe {
        if modules::unannounced() {
            modules::announce(t);
        }
        if !st.is_null() && (*st).pending_n != 0 {
            let d = (*st).pending_n;
            let id = (*st).pending_id;
            (*st).pending_n = 0;
            let frames = (*st).frames.as_ptr();
            writer::emit(t, 2 + d, |w| {
                *w = header(EventKind::Stack, 2 + d, d as u64);
                *w.add(1) = id;
                core::ptr::copy_nonoverlapping(frames, w.add(2), d);
            });
        }
    }
}

/// The stack id of the allocation being recorded on this thread, or 0 for none (nothing
/// unwound). Writes no event: a new id's definition waits in the state for [`flush`].
///
/// # Safety
/// `t` is this thread's state, guard held, [`wanted`] said yes.
#[inline(never)]
unsafe fn capture(t: *mut ThreadState) -> u64 {
    // SAFETY: per the contract; `st` is this thread's state; memo words were read before from
    // this thread's live stack, between the same CFA and the stack top (so still mapped).
    unsafe {
        let st = state(t);
        if st.is_null() {
            return 0;
        }
        let Some(list) = modules::current() else { return 0 };
        let cfa = (*st).cfa;
        let bp = (*st).bp;
        (*st).cfa = 0;
        let sp = own_sp();
        if cfa <= sp || cfa & 7 != 0 || !((*st).lo < cfa && cfa <= (*st).hi) {
            // Not from a trampoline, or a stale frame (a signal handler's): from our registers.
            return from_here(st, list);
        }
        let ra = *((cfa - 8) as *const u64);
        let m = &*memo_way((&raw const (*st).memo).cast::<Memo>(), memo_key(cfa), ra, memo_set(cfa, ra));
        if m.cfa == memo_key(cfa) && m.ra == ra && m.generation == list.generation && (m.bp_dep == 0 || m.bp == bp) {
            let mut i = 0;
            let n = m.n as usize;
            while i < n {
                let (a, v) = m.reads[i];
                if *(a as *const u64) != v {
                    break;
                }
                i += 1;
            }
            if i == n {
                return m.id;
            }
        }
        full(st, list, ra, cfa, bp)
    }
}

/// Where the true `rbp` of the frame being unwound comes from.
#[derive(Clone, Copy)]
enum BpSource {
    /// The caller's `rbp` (a memo key input once used).
    Caller,
    /// A stack word (logged once used).
    Read(u64, u64),
    /// Derived from inputs already accounted for.
    Value(u64),
}

/// A full unwind from the caller's frame; memoised when every word read fits the log.
#[cold]
#[inline(never)]
unsafe fn full(st: *mut StackState, mut list: &'static ModList, ra: u64, cfa: u64, bp: u64) -> u64 {
    // SAFETY: per `capture`.
    unsafe {
        if modules::DL_EPOCH.load(Ordering::Acquire) != modules::SEEN_EPOCH.load(Ordering::Acquire) {
            modules::refresh();
            list = modules::current().unwrap_or(list);
        }
        let depth = DEPTH.load(Ordering::Relaxed) as usize;
        let (mut n, mut bp_dep) = unwind(st, list, ra, cfa, bp, depth);
        if n > 0 && (1..n).any(|i| !list.knows((*st).frames[i])) || n > 0 && !list.knows((*st).frames[0]) {
            // A module loaded behind our back? Re-read the list (1st, 2nd, 4th… time per thread).
            (*st).unknown += 1;
            if (*st).unknown.is_power_of_two() && modules::refresh() {
                list = modules::current().unwrap_or(list);
                (n, bp_dep) = unwind(st, list, ra, cfa, bp, depth);
            }
        }
        if n == 0 {
            return 0;
        }
        let id = intern(st, n);
        let s = &mut *st;
        if !s.overflow {
            // The way that holds this key, else an empty one, else one in turn.
            let set = memo_set(cfa, ra);
            let key = memo_key(cfa);
            let holds = |m: &Memo| m.cfa == key && m.ra == ra;
            let way = if holds(&s.memo[set]) {
                set
            } else if holds(&s.memo[set + 1]) {
                set + 1
            } else if s.memo[set].cfa == 0 {
                set
            } else if s.memo[set + 1].cfa == 0 {
                set + 1
            } else {
                s.memo_turn ^= 1;
                set + s.memo_turn as usize
            };
            let m = &mut s.memo[way];
            m.ra = ra;
            m.cfa = memo_key(cfa);
            m.bp = bp;
            m.bp_dep = bp_dep as u32;
            m.generation = list.generation;
            m.id = id;
            m.n = s.nlog as u32;
            m.reads[..s.nlog].copy_from_slice(&s.log[..s.nlog]);
            for r in m.reads.iter_mut().take(MEMO_FIXED).skip(s.nlog) {
                *r = pad_read();
            }
        }
        id
    }
}

/// Unwind from the caller's frame into `st.frames`; returns (frames, caller's rbp used). The
/// words the result depends on are in `st.log` (unless `st.overflow`).
unsafe fn unwind(st: *mut StackState, list: &ModList, ra: u64, cfa: u64, bp: u64, depth: usize) -> (usize, bool) {
    // SAFETY: per `capture`.
    unsafe {
        let s = &mut *st;
        s.nlog = 0;
        s.overflow = false;
        s.oob = false;
        let lo = cfa - 8;
        let hi = if s.lo < cfa && cfa <= s.hi { s.hi } else { (cfa + 4095) & !4095 };
        let self_lo = modules::SELF_LO.load(Ordering::Relaxed);
        let self_hi = modules::SELF_HI.load(Ordering::Relaxed);
        let mut n = 0;
        let mut bp_dep = false;
        let mut src = BpSource::Caller;
        let mut regs = UnwindRegsX86_64::new(ra, cfa, POISON);
        let mut addr = ra;
        let log = core::ptr::addr_of_mut!(s.log);
        let nlog = core::ptr::addr_of_mut!(s.nlog);
        let overflow = core::ptr::addr_of_mut!(s.overflow);
        let oob = core::ptr::addr_of_mut!(s.oob);
        let mut read = move |a: u64| -> Result<u64, ()> {
            if a < lo || a > hi - 8 {
                *oob = true;
                return Err(());
            }
            let v = core::ptr::read_unaligned(a as *const u64);
            if *nlog < MEMO_READS {
                (*log)[*nlog] = (a, v);
                *nlog += 1;
            } else {
                *overflow = true;
            }
            Ok(v)
        };
        let max = depth.min(MAX_UNWIND);
        loop {
            // Frames of libmtrace itself (calls from our own code) are dropped.
            if n > 0 || !(self_lo <= addr && addr < self_hi) {
                s.frames[n] = addr;
                n += 1;
            }
            if n >= max {
                break;
            }
            let Some(fa) = FrameAddress::from_return_address(addr) else { break };
            let mark = *nlog;
            let before = regs;
            regs.set_bp(POISON);
            let mut r = list.unw.unwind_frame(fa, &mut regs, &mut s.cache, &mut read);
            let poisoned_ok = r.is_ok() && !*oob;
            if !poisoned_ok {
                // The frame needs rbp: try again with the real one, which becomes an input.
                *nlog = mark;
                *oob = false;
                regs = before;
                let real = match src {
                    BpSource::Caller => {
                        bp_dep = true;
                        bp
                    }
                    BpSource::Read(a, v) => {
                        if *nlog < MEMO_READS {
                            (*log)[*nlog] = (a, v);
                            *nlog += 1;
                        } else {
                            *overflow = true;
                        }
                        v
                    }
                    BpSource::Value(v) => v,
                };
                regs.set_bp(real);
                r = list.unw.unwind_frame(fa, &mut regs, &mut s.cache, &mut read);
            }
            let next = match r {
                Ok(Some(next)) => next,
                _ => break,
            };
            if poisoned_ok {
                if regs.bp() != POISON {
                    // rbp was restored from the stack: defer that word until a frame uses it.
                    let new_bp = regs.bp();
                    let hits = (mark..*nlog).filter(|&i| (*log)[i].1 == new_bp).count();
                    if hits == 1 {
                        let i = (mark..*nlog).find(|&i| (*log)[i].1 == new_bp).unwrap_or(mark);
                        let (a, v) = (*log)[i];
                        for j in i..*nlog - 1 {
                            (*log)[j] = (*log)[j + 1];
                        }
                        *nlog -= 1;
                        src = BpSource::Read(a, v);
                    } else {
                        src = BpSource::Value(new_bp);
                    }
                }
            } else {
                src = BpSource::Value(regs.bp());
            }
            addr = next;
        }
        (n, bp_dep)
    }
}

/// No usable trampoline frame: unwind from here, through our own frames (dropped). Not memoised.
#[cold]
#[inline(never)]
unsafe fn from_here(st: *mut StackState, list: &'static ModList) -> u64 {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads rip, rsp and rbp.
    unsafe {
        core::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp", ip = out(reg) ip, sp = out(reg) sp, bp = out(reg) bp, options(nomem, nostack, preserves_flags));
    }
    // SAFETY: per `capture`.
    unsafe {
        let s = &mut *st;
        let hi = if s.lo <= sp && sp < s.hi { s.hi } else { (sp + 4096) & !4095 };
        let mut read = |a: u64| -> Result<u64, ()> {
            if a < sp || a > hi - 8 {
                return Err(());
            }
            Ok(core::ptr::read_unaligned(a as *const u64))
        };
        let self_lo = modules::SELF_LO.load(Ordering::Relaxed);
        let self_hi = modules::SELF_HI.load(Ordering::Relaxed);
        let depth = (DEPTH.load(Ordering::Relaxed) as usize).min(MAX_UNWIND);
        let mut regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut fa = FrameAddress::InstructionPointer(ip);
        let mut n = 0;
        while n < depth {
            let next = match list.unw.unwind_frame(fa, &mut regs, &mut s.cache, &mut read) {
                Ok(Some(next)) => next,
                _ => break,
            };
            if n > 0 || !(self_lo <= next && next < self_hi) {
                s.frames[n] = next;
                n += 1;
            }
            let Some(f) = FrameAddress::from_return_address(next) else { break };
            fa = f;
        }
        if n == 0 {
            return 0;
        }
        intern(st, n)
    }
}

fn hash(frames: &[u64]) -> u64 {
    let mut h = frames.len() as u64 ^ 0x6a09_e667_f3bc_c909;
    for &f in frames {
        h = (h ^ f).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(31);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The id of the `n` frames in `st.frames`; if this thread is the first to see it, its
/// definition is left pending for [`flush`].
unsafe fn intern(st: *mut StackState, n: usize) -> u64 {
    // SAFETY: `st` is this thread's state.
    let frames = unsafe { &(&(*st).frames)[..n] };
    let h = hash(frames);
    let id = if h == 0 { 1 } else { h };
    let tab = TABLE.load(Ordering::Acquire);
    if !tab.is_null() {
        let mask = (1usize << TABLE_BITS) - 1;
        let mut i = id as usize & mask;
        for _ in 0..PROBES {
            // SAFETY: `i` is within the table.
            let slot = unsafe { &*tab.add(i) };
            let v = slot.load(Ordering::Acquire);
            if v == id {
                return id;
            }
            if v == 0 {
                match slot.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(v) if v == id => return id,
                    Err(_) => {}
                }
            }
            i = (i + 1) & mask;
        }
    }
    // SAFETY: as above.
    unsafe {
        (*st).pending_id = id;
        (*st).pending_n = n;
    }
    id
}
