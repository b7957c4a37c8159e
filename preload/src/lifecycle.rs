//! The life of a traced image: constructor, fork, thread exit, process exit.
//!
//! * Constructor (`.init_array`, receives argc/argv/envp): resolve real functions, decide what
//!   may be read from glibc, register with the collector, copy the pre-init buffer. In an
//!   `AT_SECURE` process (setuid, setgid, file capabilities) nothing is traced and no `MTRACE_*`
//!   variable is read.
//! * `pthread_atfork`: the parent writes a `Fork` event; the child drops the parent's ring and
//!   registers as a fork child of the parent's image.
//! * A `pthread_key` destructor releases a thread's block when the thread exits.
//! * Destructor (`.fini_array`) and the `_exit` hooks: take the `Exit` mallinfo2 checkpoint and
//!   say Bye to the collector. Events after that still reach the ring (the collector reads it
//!   until the process is gone).
//! * Once registered (constructor, fork child): start the mallinfo2 sampler thread
//!   ([`crate::mallinfo`]).

use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicBool, Ordering};

use mtrace_protocol::event::{self, EventKind};

use crate::glibc::{self, GLIBC};
use crate::mallinfo;
use crate::real;
use crate::session::{self, Registered};
use crate::sys;
use crate::tls;
use crate::writer::{self, ACTIVE, OFF};

static mut THREAD_KEY: libc::pthread_key_t = 0;
static KEY_READY: AtomicBool = AtomicBool::new(false);
static SAID_BYE: AtomicBool = AtomicBool::new(false);

extern "C" fn init(_argc: c_int, argv: *const *const c_char, envp: *const *const c_char) {
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block; the constructor runs once per image.
    unsafe {
        (*t).busy += 1;
        session::ARGV = argv;
        session::ENVP = envp;
    }
    real::ensure_resolved();
    // A setuid or setgid program (or one with file capabilities), started by a user who may
    // have set our environment: every MTRACE_* variable is that user's (a collector to exec, a
    // file to write), so nothing of it is read, and the program is not traced at all. Quietly:
    // its stderr is that user's too.
    // SAFETY: getauxval only reads the auxiliary vector.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 || env_is(c"MTRACE_DISABLE", b"1") {
        writer::STATE.store(OFF, Ordering::Release);
        writer::discard_preinit();
        // SAFETY: as above.
        unsafe { (*t).busy -= 1 };
        return;
    }
    detect_glibc();
    crate::order::init(order_cells());
    crate::stacks::configure();
    // SAFETY: pthread calls with valid arguments; single-threaded initialisation.
    unsafe {
        if libc::pthread_key_create(core::ptr::addr_of_mut!(THREAD_KEY), Some(thread_exit)) == 0 {
            KEY_READY.store(true, Ordering::Release);
        }
        libc::pthread_atfork(Some(fork_prepare), None, Some(fork_child));
    }
    match session::register_start() {
        Registered::Yes => {
            writer::STATE.store(ACTIVE, Ordering::Release);
            // SAFETY: guard held.
            unsafe { writer::drain_preinit(t) };
            // SAFETY: guard held, registered.
            unsafe { crate::stacks::start(t) };
            mallinfo::start_sampler();
            // SAFETY: guard held.
            unsafe { mallinfo::start_checkpoint(t) };
        }
        Registered::No => {
            writer::STATE.store(OFF, Ordering::Release);
            writer::discard_preinit();
        }
    }
    // SAFETY: as above.
    unsafe { (*t).busy -= 1 };
}

extern "C" fn fini() {
    on_exit(-1);
}

#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn(c_int, *const *const c_char, *const *const c_char) = init;

#[used]
#[unsafe(link_section = ".fini_array")]
static FINI: extern "C" fn() = fini;

fn env_is(name: &core::ffi::CStr, value: &[u8]) -> bool {
    // SAFETY: getenv does not allocate; the value is NUL-terminated.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: as above.
    !p.is_null() && unsafe { sys::cstr_bytes(p as *const u8) } == value
}

/// Decide what the preload may read from glibc's malloc.
fn detect_glibc() {
    // SAFETY: single-threaded initialisation writes GLIBC before any hook reads it.
    let gl = unsafe { &mut *core::ptr::addr_of_mut!(GLIBC) };
    // SAFETY: getauxval only reads the auxiliary vector.
    gl.page = unsafe { libc::getauxval(libc::AT_PAGESZ) }.max(4096);
    // SAFETY: Dl_info is plain pointers and integers; all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    let is_glibc = real::malloc().is_some_and(|f| {
        // SAFETY: dladdr on a function address; dli_fname is NUL-terminated.
        unsafe {
            libc::dladdr(f as *const c_void, &mut info) != 0
                && !info.dli_fname.is_null()
                && sys::cstr_bytes(info.dli_fname as *const u8).windows(7).any(|w| w == b"libc.so")
        }
    });
    if is_glibc {
        mallinfo::resolve();
    }
    if !is_glibc || env_is(c"MTRACE_CHUNKS", b"0") {
        return;
    }
    gl.chunks = true;
    // SAFETY: dlsym of glibc's exported data symbol.
    gl.curbrk = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"__curbrk".as_ptr()) } as *const u64;
    let (major, minor) = glibc_version();
    gl.heap_info_size = if (major, minor) >= (2, 35) { 48 } else { 32 };
    // The hugetlb tunable changes heap alignment (2.35–2.41): do not guess where heap_info is.
    // SAFETY: getenv with a NUL-terminated name, during single-threaded initialisation.
    let tunables = unsafe { libc::getenv(c"GLIBC_TUNABLES".as_ptr()) };
    // SAFETY: NUL-terminated environment string.
    let hugetlb = !tunables.is_null() && unsafe { sys::cstr_bytes(tunables as *const u8) }.windows(20).any(|w| w == b"glibc.malloc.hugetlb");
    gl.heap_info = !hugetlb && major == 2 && (26..=42).contains(&minor);
}

/// The ordering cells wanted: log2 of their number (`MTRACE_ORDER_CELLS`, default
/// `order::DEFAULT_CELL_BITS`), or none (`MTRACE_ORDER=0`).
fn order_cells() -> Option<u32> {
    if env_is(c"MTRACE_ORDER", b"0") {
        return None;
    }
    // SAFETY: getenv with a NUL-terminated name, during single-threaded initialisation.
    let v = unsafe { libc::getenv(c"MTRACE_ORDER_CELLS".as_ptr()) };
    if v.is_null() {
        return Some(mtrace_protocol::order::DEFAULT_CELL_BITS);
    }
    // SAFETY: NUL-terminated environment string.
    let digits = unsafe { sys::cstr_bytes(v as *const u8) };
    // A number of 1–3 digits (clamped by `order::init`); anything else: the default, said so.
    if digits.is_empty() || digits.len() > 3 || !digits.iter().all(u8::is_ascii_digit) {
        sys::warn(&[b"MTRACE_ORDER_CELLS is not a number of bits (10..=28): the default is used"]);
        return Some(mtrace_protocol::order::DEFAULT_CELL_BITS);
    }
    Some(digits.iter().fold(0u32, |a, c| a * 10 + (c - b'0') as u32))
}

fn glibc_version() -> (u32, u32) {
    unsafe extern "C" {
        fn gnu_get_libc_version() -> *const c_char;
    }
    // SAFETY: returns a static NUL-terminated string.
    let v = unsafe { sys::cstr_bytes(gnu_get_libc_version() as *const u8) };
    let mut it = v.split(|&b| b == b'.').map(|p| p.iter().take_while(|c| c.is_ascii_digit()).fold(0u32, |a, c| a * 10 + (c - b'0') as u32));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}


/// A thread took its first block: arrange for its block to be released when it exits.
pub fn on_thread_first_block() {
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS; pthread_setspecific with our key (guard held by caller,
    // so an allocation it may make is not recorded).
    unsafe {
        if (*t).key_set == 0 && KEY_READY.load(Ordering::Acquire) {
            (*t).key_set = 1;
            libc::pthread_setspecific(THREAD_KEY, 1 as *const c_void);
        }
    }
}

unsafe extern "C" fn thread_exit(_: *mut c_void) {
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block.
    unsafe {
        if (*t).busy != 0 {
            return;
        }
        (*t).busy = 1;
        crate::stacks::thread_exit(t);
        writer::flush_untraced(t);
        writer::release_block(t);
        (*t).key_set = 0;
        (*t).busy = 0;
    }
}

unsafe extern "C" fn fork_prepare() {
    if writer::STATE.load(Ordering::Acquire) != ACTIVE {
        return;
    }
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block.
    unsafe {
        if (*t).busy != 0 {
            return;
        }
        (*t).busy = 1;
        let seq = writer::FORK_SEQ.fetch_add(1, Ordering::AcqRel) + 1;
        // What the other threads have published by now is in the child's heap: the cut.
        let mut cut = [0u64; event::MAX_EVENT_WORDS - 2];
        let n = writer::fork_cut(&mut cut);
        writer::emit(t, 2 + n, |w| {
            *w = event::header(EventKind::Fork, 2 + n, 0);
            *w.add(1) = seq;
            core::ptr::copy_nonoverlapping(cut.as_ptr(), w.add(2), n);
        });
        (*t).busy = 0;
    }
}

unsafe extern "C" fn fork_child() {
    if writer::STATE.load(Ordering::Acquire) != ACTIVE {
        return;
    }
    let t = tls::state();
    // SAFETY: the child has one thread: this one. Its TLS and our statics are ours alone.
    unsafe {
        (*t).busy += 1;
        let parent = session::image_id();
        let seq = writer::FORK_SEQ.load(Ordering::Acquire);
        writer::forget_ring(t);
        session::unmap_parent_ring();
        // The parent's connection stays open until ours is, so a collector waiting for the
        // last process never sees zero connections in between.
        let parent_fd = session::SOCK_FD;
        SAID_BYE.store(false, Ordering::Release);
        crate::order::fork_child();
        match session::register_fork(parent, seq) {
            Registered::Yes => {
                if parent_fd >= 0 && parent_fd != session::SOCK_FD {
                    libc::close(parent_fd);
                }
                writer::STATE.store(ACTIVE, Ordering::Release);
                crate::stacks::fork_child(t);
                // The parent's sampler thread did not survive the fork.
                mallinfo::start_sampler();
                // SAFETY: guard held (`busy` raised above).
                mallinfo::start_checkpoint(t);
            }
            Registered::No => {
                if parent_fd >= 0 && parent_fd != session::SOCK_FD {
                    libc::close(parent_fd);
                }
                session::SOCK_FD = -1;
                writer::STATE.store(OFF, Ordering::Release);
            }
        }
        (*t).busy -= 1;
    }
}

/// Leaving (destructor or `_exit`): the `Exit` checkpoint, then tell the collector. Only once per
/// image.
pub fn on_exit(status: i64) {
    if writer::STATE.load(Ordering::Acquire) != ACTIVE {
        // Tracing stopped early (`writer::detach`): no events, but the count of calls made since
        // and a Bye without waiting for its answer, so that a collector that comes back knows
        // the process exited, with what status, and what it missed.
        if writer::DETACHED.load(Ordering::Acquire) && !SAID_BYE.swap(true, Ordering::AcqRel) {
            // SAFETY: `t` is this thread's TLS block.
            unsafe { writer::flush_untraced(tls::state()) };
            session::bye_no_wait(status);
        }
        return;
    }
    if SAID_BYE.swap(true, Ordering::AcqRel) {
        return;
    }
    let t = tls::state();
    // SAFETY: `t` is this thread's TLS block.
    unsafe {
        // Not from inside our own code (an `_exit` from a signal handler that interrupted a hook).
        let nested = (*t).busy != 0;
        (*t).busy += 1;
        // The break and the heaps first: the model must know where they end before it compares.
        glibc::report_brk(t);
        if status == -1 {
            glibc::report_heaps(t);
        }
        // Only on the way out through exit() (the destructor, status -1): `_exit` may be called
        // from a signal handler that interrupted malloc holding an arena lock (mallinfo2 would
        // wait for it forever), or from a vfork child sharing the parent's memory.
        if !nested && status == -1 {
            mallinfo::exit_checkpoint(t);
        }
        writer::flush_dropped(t);
        session::bye(status);
        (*t).busy -= 1;
    }
}
