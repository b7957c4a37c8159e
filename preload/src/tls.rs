//! Per-thread state, in initial-exec TLS.
//!
//! Rust's `thread_local!` uses the general-dynamic model in a cdylib: every access calls
//! `__tls_get_addr`, which can allocate after a `dlopen` (DTV resize) and costs ~3 ns per access.
//! We instead declare a 128-byte `.tbss` block in assembly and address it with the initial-exec
//! sequence (`@GOTTPOFF` + `%fs`), which makes the linker mark the library `STATIC_TLS`. The block
//! is zero-initialised by the loader for every thread, has no destructor, and never allocates.
//! Keep it small: a large static TLS block breaks `dlopen` of the library and small-stack threads.

use core::sync::atomic::AtomicU32;

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

/// Everything a thread needs on the hot path. Must stay ≤ 128 bytes and valid when all-zero.
#[repr(C)]
pub struct ThreadState {
    /// Reentrancy guard: non-zero while our own code runs on this thread.
    pub busy: u8,
    pub mode: u8,
    /// This thread is resolving the real functions (its allocations use the bootstrap arena).
    pub resolving: u8,
    /// The thread-exit key has been set for this thread.
    pub key_set: u8,
    pub block: u32,
    /// Next word to write, end of the block, start of the block.
    pub cur: *mut u64,
    pub end: *mut u64,
    pub base: *mut u64,
    /// The block descriptor's published length.
    pub len: *const AtomicU32,
    /// Collector clock value this thread last wrote a `Time` event for.
    pub last_clock: u64,
    /// Program break this thread last reported.
    pub last_brk: u64,
    pub stream: u32,
    pub block_seq: u32,
    /// Thread-arena heap this thread last touched, and the size it last reported for it.
    pub heap: u64,
    pub heap_size: u64,
    /// Events dropped since the last block (lossy mode).
    pub dropped: u64,
    pub tid: u32,
    /// Generation of the ring this state belongs to (see `writer::ring_generation`).
    pub ring_gen: u32,
}

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
