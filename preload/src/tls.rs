//! Per-thread state, in initial-exec TLS.
//!
//! Rust's `thread_local!` uses the general-dynamic model in a cdylib: every access calls
//! `__tls_get_addr`, which can allocate after a `dlopen` (DTV resize) and costs ~3 ns per access.
//! We instead declare a 128-byte `.tbss` block in assembly and address it with the initial-exec
//! sequence (`@GOTTPOFF` + `%fs`), which makes the linker mark the library `STATIC_TLS`. The block
//! is zero-initialised by the loader for every thread, has no destructor, and never allocates.
//! Keep it small: a large static TLS block breaks `dlopen` of the library and small-stack threads.

use core::sync::atomic::{AtomicU32, AtomicU64};

core::arch::global_asm!(
    ".section .tbss,\"awT\",@nobits",
    ".p2align 6",
    ".globl mtrace_thread_state",
    ".hidden mtrace_thread_state",
    ".type mtrace_thread_state, @object",
    ".size mtrace_thread_state, 128",
    "mtrace_thread_state:",
    ".zero 128",
    ".text",
);

/// What a thread is doing with the ring.
pub mod mode {
    /// No block yet (new thread, or its block was released at thread exit).
    pub const IDLE: u8 = 0;
    /// Owns a block and writes events into it.
    pub const WRITING: u8 = 1;
    /// Lossy mode, ring exhausted: events are counted and dropped until a block frees up.
    pub const DROPPING: u8 = 2;
}

/// Values of `ThreadState::fast`.
pub mod fast {
    /// No fast path: the hooks take the general one.
    pub const NONE: u8 = 0;
    /// Chunk headers may be read (glibc's malloc), the ordering cells exist and the stream id fits
    /// a position (`pos_base` is set).
    ///
    /// The hooks take this fast path without reading `writer::STATE`: `fast` is set only while
    /// `STATE` is `ACTIVE` (in `switch_block`), and when tracing stops (`writer::detach`) the
    /// ring's clock is poisoned, which fails every thread's `reserve_fast` and sends it to the
    /// general path, which checks `STATE` and clears `fast`. A fork child resets its one thread's
    /// state before anything else.
    pub const CHUNKS: u8 = 1;
    /// Chunk headers are not read (`MTRACE_CHUNKS=0`, or another allocator): events carry no
    /// chunk or heap information (they carry ordering, as with `CHUNKS`).
    pub const PLAIN: u8 = 2;
}

/// Everything a thread needs on the hot path. Must stay ≤ 128 bytes and valid when all-zero.
///
/// The fields the malloc/free fast paths read come first (`busy` and `fast` are read together as
/// one 16-bit word, see [`guard_and_fast`]).
#[repr(C)]
pub struct ThreadState {
    /// Reentrancy guard: non-zero while our own code runs on this thread.
    pub busy: u8,
    /// Which malloc/free fast path may run for this thread ([`fast`]); non-zero only while it
    /// owns a block (`mode` is `WRITING`) and `clock`, `pos_base` and `curbrk` are set for it.
    pub fast: u8,
    pub mode: u8,
    /// This thread is resolving the real functions (its allocations use the bootstrap arena).
    pub resolving: u8,
    pub block: u32,
    /// Next word to write, end of the block, start of the block.
    pub cur: *mut u64,
    pub end: *mut u64,
    pub base: *mut u64,
    /// The block descriptor's published length.
    pub len: *const AtomicU32,
    /// The collector clock (a copy of `writer::HOT.clock`, valid while `fast` is not `NONE`).
    pub clock: *const AtomicU64,
    /// Collector clock value this thread last wrote a `Time` event for.
    pub last_clock: u64,
    /// `order::position(stream, block_seq, 0)` for the current block, 0 if the stream id does not
    /// fit a position: an event's position is this OR its word offset in the block (see
    /// `writer::position`).
    pub pos_base: u64,
    /// Program break this thread last reported.
    pub last_brk: u64,
    /// `glibc::GLIBC.curbrk`, or a word holding 0 where that is null (valid while `fast` is not `NONE`).
    pub curbrk: *const u64,
    /// Thread-arena heap this thread last touched, and the size it last reported for it.
    pub heap: u64,
    pub heap_size: u64,
    pub stream: u32,
    pub block_seq: u32,
    /// Events dropped since the last block (lossy mode; flushed to the ring at 256).
    pub dropped: u32,
    /// Calls made after tracing stopped (`writer::detach`), not yet added to the ring's count
    /// (`writer::flush_untraced`).
    pub untraced: u32,
    pub tid: u32,
    /// The thread-exit key has been set for this thread.
    pub key_set: u8,
    /// This thread's stack state ([`crate::stacks`]; null until its first stack). Read by the
    /// allocation trampolines at a fixed offset ([`STK_OFFSET`]).
    pub stk: *mut crate::stacks::StackState,
}

/// Offset of `ThreadState::stk`.
pub const STK_OFFSET: usize = core::mem::offset_of!(ThreadState, stk);

const _: () = assert!(core::mem::size_of::<ThreadState>() <= 128);

/// This thread's state. Valid for the whole life of the thread, including its destructors.
#[inline(always)]
pub fn state() -> *mut ThreadState {
    let p: *mut ThreadState;
    // SAFETY: initial-exec TLS access: load our block's offset from the GOT and add the thread
    // pointer. Reads no memory but the GOT slot and %fs:0; valid on every thread.
    unsafe {
        core::arch::asm!(
            "mov {p}, qword ptr [rip + mtrace_thread_state@GOTTPOFF]",
            "add {p}, qword ptr fs:0",
            p = out(reg) p,
            options(nostack, preserves_flags, readonly, pure),
        );
    }
    p
}

/// `busy` and `fast` in one load: `ready(fast::X)` means "not busy, fast path X".
///
/// # Safety
/// `t` is this thread's state.
#[inline(always)]
pub unsafe fn guard_and_fast(t: *mut ThreadState) -> u16 {
    // SAFETY: `busy` and `fast` are the first two bytes of the (8-aligned) state, read as one
    // little-endian u16; only this thread writes them.
    unsafe { *(t as *const u16) }
}

/// Release the guard at the end of fast path `mode` (`fast` is `mode`): `busy` and `fast` in one
/// 16-bit store, the width of the [`guard_and_fast`] load that the next hook makes. A 1-byte store
/// of `busy` cannot be forwarded to that wider load, which then waits until the store reaches the
/// cache — behind the event's stores to a ring line that may still be on its way from the
/// collector's core: the next hook would stall for the whole transfer.
///
/// # Safety
/// `t` is this thread's state and `fast` is `mode`.
#[inline(always)]
pub unsafe fn release_fast(t: *mut ThreadState, mode: u8) {
    // SAFETY: as `guard_and_fast`; `fast` keeps its value.
    unsafe { *(t as *mut u16) = ready(mode) }
}

/// The guard is free and the thread has a fast path (either).
///
/// # Safety
/// `t` is this thread's state.
#[inline(always)]
pub unsafe fn fast_ready(t: *mut ThreadState) -> bool {
    // SAFETY: per the contract.
    let v = unsafe { guard_and_fast(t) };
    v == ready(fast::CHUNKS) || v == ready(fast::PLAIN)
}

/// The value of [`guard_and_fast`] when the guard is free and the fast path is `mode`.
#[inline(always)]
pub const fn ready(mode: u8) -> u16 {
    (mode as u16) << 8
}
