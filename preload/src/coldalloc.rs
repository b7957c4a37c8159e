//! The Rust global allocator of the preload: a bump allocator over anonymous mappings.
//!
//! Only cold paths allocate through it: building the module list for the unwinder (at
//! registration, after a `dlopen` or `dlclose`) and a thread's unwinder cache (once per thread,
//! pooled at thread exit, see [`crate::stacks`]). The hot path never allocates. It never calls
//! malloc (the mappings come from the raw `mmap` system call) and never frees: `dealloc` is a
//! no-op, so what cold paths drop is leaked (old module lists are leaked anyway, see
//! [`crate::modules`]).
//!
//! A spin lock serialises the bump pointer (cold paths only). A fork child resets it: if another
//! thread of the parent held it, the child loses at most the bytes being handed out.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::sys;

pub struct ColdAlloc;

#[global_allocator]
static ALLOC: ColdAlloc = ColdAlloc;

const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

static LOCK: AtomicBool = AtomicBool::new(false);
static mut CUR: usize = 0;
static mut END: usize = 0;

fn map(len: usize) -> usize {
    // SAFETY: a fresh private anonymous mapping.
    let p = unsafe {
        sys::mmap(core::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if p == libc::MAP_FAILED || p.is_null() {
        return 0;
    }
    sys::name_mapping(p, len);
    p as usize
}

/// A fork child is single-threaded: a lock held by another thread of the parent is void.
pub fn after_fork_child() {
    LOCK.store(false, Ordering::Release);
}

// SAFETY: hands out disjoint, suitably aligned ranges of mapped memory; never reuses them.
unsafe impl GlobalAlloc for ColdAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let size = l.size().max(1);
        let align = l.align();
        if align > PAGE {
            return core::ptr::null_mut();
        }
        if size >= CHUNK / 4 {
            return map(size.div_ceil(PAGE) * PAGE) as *mut u8;
        }
        while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        // SAFETY: CUR/END are only touched under LOCK.
        let p = unsafe {
            let mut start = (CUR + align - 1) & !(align - 1);
            if CUR == 0 || start + size > END {
                let c = map(CHUNK);
                if c == 0 {
                    LOCK.store(false, Ordering::Release);
                    return core::ptr::null_mut();
                }
                CUR = c;
                END = c + CHUNK;
                start = (CUR + align - 1) & !(align - 1);
            }
            CUR = start + size;
            start
        };
        LOCK.store(false, Ordering::Release);
        p as *mut u8
    }

    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}
