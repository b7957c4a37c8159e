//! `libmtrace.so` — the part of mtrace that runs inside the traced process.
//!
//! It interposes the malloc family (malloc, free, calloc, realloc, reallocarray, memalign,
//! posix_memalign, aligned_alloc, valloc, pvalloc, malloc_usable_size, free_sized,
//! free_aligned_sized), the application's own mmap/mmap64/munmap/mremap/brk/sbrk, malloc_trim and
//! mallopt, and writes one compact event per call into a shared-memory ring read by `mtracer`.
//!
//! Rules this crate lives by (see `shared/DESIGN.md`):
//! * forward to the real function first and unconditionally;
//! * on the hot path: no allocation, no lock, no syscall, no shared read-modify-write;
//! * a per-thread reentrancy guard: what our own code (or libc on our behalf) allocates passes
//!   through untraced;
//! * never panic (`panic = "abort"`, and a panic handler that aborts).
//!
//! The crate is `no_std`: there is no Rust allocator, no `std` thread-local or lock to trip over.
//!
//! Modules:
//! * [`hooks`] — the exported functions.
//! * [`writer`] — appending events to this thread's ring block; pre-init buffering.
//! * [`glibc`] — what is read from glibc's malloc (chunk headers, heap_info, the break).
//! * [`order`] — the ordering cells that order every address's history across threads.
//! * [`real`] — resolving the real functions; the bootstrap arena used while resolving.
//! * [`session`] — registering with the collector, or starting the standalone agent.
//! * [`meta`] — process metadata sent at registration.
//! * [`lifecycle`] — constructor, fork, thread exit, process exit.
//! * [`mallinfo`] — `mallinfo2()` checkpoints (around `malloc_trim`, at exit, periodic sampler).
//! * [`stacks`] — allocation stacks: unwinding, memoisation, interning, sampling.
//! * [`modules`] — the loaded modules (unwinder list, `Module` events, dlopen/dlclose hooks).
//! * [`coldalloc`] — the Rust global allocator, for cold paths only.
//! * [`tls`] — initial-exec thread-local state.
//! * [`sys`] — raw system calls and allocation-free helpers.
#![no_std]

extern crate alloc;

pub mod coldalloc;
pub mod glibc;
pub mod hooks;
pub mod lifecycle;
pub mod mallinfo;
pub mod meta;
pub mod modules;
pub mod order;
pub mod real;
pub mod session;
pub mod stacks;
pub mod sys;
pub mod tls;
pub mod writer;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    sys::write_all(2, b"mtrace: internal error (panic) in libmtrace.so\n");
    // SAFETY: abort never returns.
    unsafe { libc::abort() }
}

// Precompiled `core` leaves a CIE that names `rust_eh_personality`; with BIND_NOW an undefined
// reference would fail at load time. Nothing unwinds here (panic = "abort"), so a hidden,
// never-called definition satisfies the relocation without exporting anything.
core::arch::global_asm!(
    ".globl rust_eh_personality",
    ".hidden rust_eh_personality",
    ".type rust_eh_personality, @function",
    "rust_eh_personality:",
    "ud2",
);
