//! The real functions behind our hooks, resolved with `dlsym(RTLD_NEXT)`, and the bootstrap arena
//! that serves allocations made while resolving (a failing `dlsym` allocates its error message,
//! and glibc < 2.34 allocates even on success).
//!
//! Resolution happens on the first hooked call, whichever thread and whenever that is (often in
//! another library's constructor, before ours). The thread that resolves marks itself in TLS; its
//! nested allocations come from the arena. Other threads wait for the resolver to finish.

use core::ffi::{c_int, c_void};
use core::ptr::null_mut;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};

use crate::tls;

macro_rules! real_fns {
    ($($name:ident : $ty:ty = $sym:literal;)*) => {
        /// Addresses of the real functions (null until resolved, or if absent).
        pub struct Real { $(pub $name: AtomicPtr<c_void>,)* }
        pub static REAL: Real = Real { $($name: AtomicPtr::new(null_mut()),)* };
        fn resolve_all() {
            $(
                // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT names the next object.
                let f = unsafe { libc::dlsym(libc::RTLD_NEXT, concat!($sym, "\0").as_ptr() as *const libc::c_char) };
                REAL.$name.store(f, Ordering::Release);
            )*
        }
        $(
            #[inline(always)]
            #[allow(dead_code)]
            pub fn $name() -> Option<$ty> {
                // Relaxed: a pointer is written once, before `STATE` publishes it (Release); a
                // thread that sees null resolves (and synchronises) through `ensure_resolved`.
                let p = REAL.$name.load(Ordering::Relaxed);
                if p.is_null() { return None; }
                // SAFETY: `p` came from dlsym for this symbol, whose C type is `$ty`.
                Some(unsafe { core::mem::transmute::<*mut c_void, $ty>(p) })
            }
        )*
    };
}

/// The real `free`, for a caller that knows it is resolved and present (a thread with a chunk
/// fast path: `writer::switch_block` sets one only then).
///
/// # Safety
/// [`free()`] is `Some`.
#[inline(always)]
pub unsafe fn free_present() -> FreeFn {
    // SAFETY: per the contract.
    unsafe { free().unwrap_unchecked() }
}

pub type MallocFn = unsafe extern "C" fn(usize) -> *mut c_void;
pub type FreeFn = unsafe extern "C" fn(*mut c_void);
pub type CallocFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
pub type ReallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
pub type ReallocarrayFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
pub type MemalignFn = unsafe extern "C" fn(usize, usize) -> *mut c_void;
pub type PosixMemalignFn = unsafe extern "C" fn(*mut *mut c_void, usize, usize) -> c_int;
pub type UsableFn = unsafe extern "C" fn(*mut c_void) -> usize;
pub type FreeSizedFn = unsafe extern "C" fn(*mut c_void, usize);
pub type FreeAlignedSizedFn = unsafe extern "C" fn(*mut c_void, usize, usize);
pub type MmapFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, i64) -> *mut c_void;
pub type MunmapFn = unsafe extern "C" fn(*mut c_void, usize) -> c_int;
pub type MremapFn = unsafe extern "C" fn(*mut c_void, usize, usize, c_int, *mut c_void) -> *mut c_void;
pub type BrkFn = unsafe extern "C" fn(*mut c_void) -> c_int;
pub type SbrkFn = unsafe extern "C" fn(isize) -> *mut c_void;
pub type TrimFn = unsafe extern "C" fn(usize) -> c_int;
pub type MalloptFn = unsafe extern "C" fn(c_int, c_int) -> c_int;
pub type ExitFn = unsafe extern "C" fn(c_int) -> !;
pub type DlcloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;

real_fns! {
    malloc: MallocFn = "malloc";
    free: FreeFn = "free";
    calloc: CallocFn = "calloc";
    realloc: ReallocFn = "realloc";
    reallocarray: ReallocarrayFn = "reallocarray";
    memalign: MemalignFn = "memalign";
    posix_memalign: PosixMemalignFn = "posix_memalign";
    aligned_alloc: MemalignFn = "aligned_alloc";
    valloc: MallocFn = "valloc";
    pvalloc: MallocFn = "pvalloc";
    malloc_usable_size: UsableFn = "malloc_usable_size";
    mmap: MmapFn = "mmap";
    mmap64: MmapFn = "mmap64";
    munmap: MunmapFn = "munmap";
    mremap: MremapFn = "mremap";
    brk: BrkFn = "brk";
    sbrk: SbrkFn = "sbrk";
    malloc_trim: TrimFn = "malloc_trim";
    mallopt: MalloptFn = "mallopt";
    exit_: ExitFn = "_exit";
    exit_upper: ExitFn = "_Exit";
    free_sized: FreeSizedFn = "free_sized";
    free_aligned_sized: FreeAlignedSizedFn = "free_aligned_sized";
    dlopen: MallocFn = "dlopen";
    dlmopen: MallocFn = "dlmopen";
    dlclose: DlcloseFn = "dlclose";
}

const UNRESOLVED: u8 = 0;
const RESOLVING: u8 = 1;
const RESOLVED: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNRESOLVED);

/// Make sure the real functions are resolved. Returns `false` if the caller is the resolving
/// thread itself (a nested call from dlsym): it must use the bootstrap arena.
#[cold]
#[inline(never)]
pub fn ensure_resolved() -> bool {
    let t = tls::state();
    loop {
        match STATE.compare_exchange(UNRESOLVED, RESOLVING, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // SAFETY: `t` is this thread's TLS block.
                unsafe {
                    (*t).resolving = 1;
                    (*t).busy += 1;
                }
                resolve_all();
                // SAFETY: as above.
                unsafe {
                    (*t).busy -= 1;
                    (*t).resolving = 0;
                }
                STATE.store(RESOLVED, Ordering::Release);
                return true;
            }
            Err(RESOLVED) => return true,
            Err(_) => {
                // SAFETY: as above.
                if unsafe { (*t).resolving } != 0 {
                    return false;
                }
                core::hint::spin_loop();
            }
        }
    }
}

/// True once `ensure_resolved` has finished.
#[inline(always)]
pub fn resolved() -> bool {
    STATE.load(Ordering::Acquire) == RESOLVED
}

// ---------------------------------------------------------------------------------------------
// Bootstrap arena: a static bump allocator for allocations made while resolving.

const ARENA_SIZE: usize = 256 << 10;

#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);

static mut ARENA: Arena = Arena([0; ARENA_SIZE]);
static ARENA_NEXT: AtomicUsize = AtomicUsize::new(0);

fn arena_base() -> usize {
    core::ptr::addr_of_mut!(ARENA) as usize
}

/// Is `p` a pointer handed out by the bootstrap arena?
#[inline(always)]
pub fn is_bootstrap(p: *const c_void) -> bool {
    // One unsigned compare: below the arena wraps around to a huge offset.
    (p as usize).wrapping_sub(arena_base()) < ARENA_SIZE
}

/// Allocate from the arena (zeroed: the arena is never reused). Null when exhausted.
pub fn bootstrap_alloc(size: usize, align: usize) -> *mut c_void {
    let align = align.max(16);
    if !align.is_power_of_two() || size > ARENA_SIZE {
        return null_mut();
    }
    let base = arena_base();
    let mut cur = ARENA_NEXT.load(Ordering::Relaxed);
    loop {
        // 16 bytes of header right below the returned pointer: the size, then a word that stays
        // 0 (the arena is zeroed and never reused). The hooks' fast paths read that word as a
        // chunk header, and 0 sends the call to the general path, which knows arena pointers.
        let start = (base + cur + 16 + align - 1) & !(align - 1);
        let end = start + size.max(1);
        if end > base + ARENA_SIZE {
            return null_mut();
        }
        match ARENA_NEXT.compare_exchange_weak(cur, end - base, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: `start - 16` lies inside the arena, in the header gap we reserved.
                unsafe { *((start - 16) as *mut usize) = size };
                return start as *mut c_void;
            }
            Err(c) => cur = c,
        }
    }
}

/// Size recorded for an arena pointer.
pub fn bootstrap_size(p: *const c_void) -> usize {
    // SAFETY: `p` is an arena pointer; its size sits 16 bytes below it.
    unsafe { *((p as usize - 16) as *const usize) }
}
