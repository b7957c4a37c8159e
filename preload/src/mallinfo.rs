//! glibc's own books as ground truth: `mallinfo2()` checkpoints (`EventKind::Mallinfo`), so that
//! the collector's glibc model can be checked against what glibc says instead of being trusted.
//!
//! Checkpoints are taken only when the real allocator is glibc's and it has `mallinfo2` (2.33+):
//!
//! * around every `malloc_trim` of the application ([`crate::hooks::malloc_trim`]), on the
//!   calling thread: `BeforeTrim`, the `MallocTrim` event, `AfterTrim`, in that order;
//! * at exit ([`crate::lifecycle::on_exit`], from the library destructor: `exit()` or a return
//!   from `main`, not `_exit`/`_Exit`, which signal handlers and vfork children call), on the
//!   exiting thread, once per process image, before the Bye;
//! * periodically (`Periodic`), from a sampler thread of ours, every `MTRACE_MALLINFO_MS`
//!   milliseconds when that is set (default `0`: no sampler thread at all, see
//!   [`DEFAULT_PERIOD_MS`] for why). It starts when the image
//!   registers with the collector and again in every fork child (in the atfork child handler,
//!   since threads do not survive fork).
//!
//! Never from the malloc/free hooks: `mallinfo2` takes every arena's lock in turn and walks every
//! bin — 67 ns with one arena, 1.1 µs with 16, **26 ms** with 1.5 M free chunks (see
//! `docs/glibc-malloc-facts.md` §6–7), during which the application's threads wait for those
//! locks. That is the price of each checkpoint, periodic ones included: a program with a very
//! fragmented heap pays it every period.
//!
//! The sampler thread:
//! * never allocates (glibc gives it no arena and no tcache), has every signal blocked, holds our
//!   reentrancy guard for its whole life (whatever libc might allocate on its behalf passes
//!   through untraced) and never sets the thread-exit key (`pthread_setspecific` may allocate);
//! * is not counted by glibc as a thread that keeps the process alive: glibc ends the process
//!   with `exit(0)` when its last thread leaves (`pthread_exit` of every thread, main included),
//!   counting threads in `__nptl_nthreads`; we take ours out of that count. Without that symbol
//!   (not glibc's nptl) there is no sampler. At `exit`/`_exit` the kernel ends it with the
//!   process: it never delays exit. It stops writing once the exiting thread took the `Exit`
//!   checkpoint, and it never exits itself (a thread that exits has its DTV freed later by an
//!   application thread: an unmatched free);
//! * writes only `Periodic` checkpoints (and the `Time` marks every stream has), on a stream of
//!   its own: the collector does not count a stream carrying a `Periodic` checkpoint as an
//!   application thread (`analysis::merge::Merger::stream_count`).
//!
//! Side effects of the sampler thread (why it is off unless `MTRACE_MALLINFO_MS` asks for it):
//! * A credential change that succeeds in the program's thread but fails in ours aborts the
//!   program (glibc's `setxid` broadcast): dropping privileges in steps with capabilities kept
//!   in the calling thread only does that.
//! * `pthread_create` allocates the thread's DTV with `calloc` in the creating thread; that
//!   block (a few hundred bytes in the main arena) is not recorded, so glibc's books count it and
//!   the live set does not. Its 64 KiB stack (plus a guard page) is an anonymous mapping.
//! * The process becomes multi-threaded from the start: glibc then takes its locks for real
//!   (atomic instructions in every malloc/free), `__libc_single_threaded` is false, and calls
//!   that demand a single-threaded process (`unshare(CLONE_NEWUSER)`, `setns` into a user
//!   namespace) fail with `EINVAL`; programs that check before forking see a second thread
//!   (Python ≥ 3.12 warns that `fork()` in a multi-threaded process may deadlock).
//! * A fork child gets its own sampler (one `pthread_create`, tens of µs, even when it is about
//!   to exec).

use core::ffi::{c_int, c_void};
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use mtrace_protocol::event::{Mallinfo2, MallinfoReason};

use crate::sys;
use crate::tls::{self, ThreadState};
use crate::writer::{self, ACTIVE};

/// glibc's `struct mallinfo2` (ten `size_t`).
#[repr(C)]
#[derive(Clone, Copy)]
struct CMallinfo2 {
    arena: usize,
    ordblks: usize,
    smblks: usize,
    hblks: usize,
    hblkhd: usize,
    usmblks: usize,
    fsmblks: usize,
    uordblks: usize,
    fordblks: usize,
    keepcost: usize,
}

type Mallinfo2Fn = unsafe extern "C" fn() -> CMallinfo2;
type StartFn = extern "C" fn(*mut c_void) -> *mut c_void;
type PthreadCreateFn = unsafe extern "C" fn(*mut libc::pthread_t, *const libc::pthread_attr_t, StartFn, *mut c_void) -> c_int;
type AttrFn = unsafe extern "C" fn(*mut libc::pthread_attr_t) -> c_int;
type AttrSizeFn = unsafe extern "C" fn(*mut libc::pthread_attr_t, usize) -> c_int;
type AttrIntFn = unsafe extern "C" fn(*mut libc::pthread_attr_t, c_int) -> c_int;

/// `mallinfo2` of glibc (null: no checkpoints).
static MALLINFO2: AtomicPtr<c_void> = AtomicPtr::new(null_mut());
/// Sampler period in milliseconds (0: no sampler).
static PERIOD_MS: AtomicU64 = AtomicU64::new(DEFAULT_PERIOD_MS);
/// The process is exiting: the sampler writes nothing more.
static STOP: AtomicBool = AtomicBool::new(false);

/// No sampler unless asked for: a thread of ours changes what the program may do. glibc applies a
/// credential change (`setresuid`, `setresgid`, …) to every thread of the process and aborts when
/// one of them fails; capabilities are per thread, so a program that keeps capabilities in its
/// own thread to drop privileges in steps (`setpriv --reuid … --regid …`, services using
/// libcap) was measured to abort (134) as soon as our thread, without them, failed the second
/// step. And `unshare(CLONE_NEWUSER)` and `setns` refuse a multi-threaded process.
const DEFAULT_PERIOD_MS: u64 = 0;
/// The sampler's stack (glibc adds the static TLS, the thread descriptor and a guard page).
const SAMPLER_STACK: usize = 64 << 10;

/// What starting the sampler needs, resolved at initialisation (all null: no sampler).
struct Threads {
    create: AtomicPtr<c_void>,
    attr_init: AtomicPtr<c_void>,
    attr_destroy: AtomicPtr<c_void>,
    attr_stacksize: AtomicPtr<c_void>,
    attr_detach: AtomicPtr<c_void>,
    /// glibc's `__nptl_nthreads` (an `unsigned int`).
    nthreads: AtomicPtr<c_void>,
}

static THREADS: Threads = Threads {
    create: AtomicPtr::new(null_mut()),
    attr_init: AtomicPtr::new(null_mut()),
    attr_destroy: AtomicPtr::new(null_mut()),
    attr_stacksize: AtomicPtr::new(null_mut()),
    attr_detach: AtomicPtr::new(null_mut()),
    nthreads: AtomicPtr::new(null_mut()),
};

fn dlsym(handle: *mut c_void, name: &core::ffi::CStr) -> *mut c_void {
    // SAFETY: dlsym with a NUL-terminated name. A failing lookup allocates its error message:
    // callers hold the reentrancy guard, so that passes through untraced.
    unsafe { libc::dlsym(handle, name.as_ptr()) }
}

/// Resolve `mallinfo2` (and what the sampler thread needs) and read `MTRACE_MALLINFO_MS`.
/// Called once at initialisation, guard held, only when the real allocator is glibc's.
pub fn resolve() {
    let mi = dlsym(libc::RTLD_NEXT, c"mallinfo2");
    MALLINFO2.store(mi, Ordering::Release);
    if mi.is_null() {
        return;
    }
    // SAFETY: getenv does not allocate; the value is NUL-terminated.
    let v = unsafe { libc::getenv(c"MTRACE_MALLINFO_MS".as_ptr()) };
    if !v.is_null() {
        // SAFETY: as above.
        let s = unsafe { sys::cstr_bytes(v as *const u8) };
        match parse_ms(s) {
            Some(ms) => PERIOD_MS.store(ms, Ordering::Relaxed),
            None => sys::warn(&[b"MTRACE_MALLINFO_MS=", s, b" is not a number of milliseconds; no periodic mallinfo2 checkpoints"]),
        }
    }
    if PERIOD_MS.load(Ordering::Relaxed) == 0 {
        return;
    }
    let d = libc::RTLD_DEFAULT;
    let syms = [
        (&THREADS.create, dlsym(d, c"pthread_create")),
        (&THREADS.attr_init, dlsym(d, c"pthread_attr_init")),
        (&THREADS.attr_destroy, dlsym(d, c"pthread_attr_destroy")),
        (&THREADS.attr_stacksize, dlsym(d, c"pthread_attr_setstacksize")),
        (&THREADS.attr_detach, dlsym(d, c"pthread_attr_setdetachstate")),
        (&THREADS.nthreads, dlsym(d, c"__nptl_nthreads")),
    ];
    if syms.iter().all(|(_, p)| !p.is_null()) {
        for (slot, p) in syms {
            slot.store(p, Ordering::Release);
        }
    }
}

fn parse_ms(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 12 || !s.iter().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(s.iter().fold(0u64, |a, &c| a * 10 + (c - b'0') as u64))
}

/// Checkpoints can be taken (glibc with `mallinfo2`).
#[inline(always)]
pub fn available() -> bool {
    !MALLINFO2.load(Ordering::Relaxed).is_null()
}

/// `mallinfo2()` now, with the collector clock read right before the call (0 before the ring is
/// mapped): glibc's books describe an instant between that and the event's own time mark.
/// Takes every arena lock in turn: never call it from the allocation hooks.
pub fn take() -> Option<(Mallinfo2, u64)> {
    let p = MALLINFO2.load(Ordering::Acquire);
    if p.is_null() {
        return None;
    }
    let before = writer::clock_now();
    // SAFETY: `p` is glibc's `mallinfo2`, whose C type is `Mallinfo2Fn`.
    let m = unsafe { core::mem::transmute::<*mut c_void, Mallinfo2Fn>(p)() };
    Some((Mallinfo2 {
        arena: m.arena as u64,
        ordblks: m.ordblks as u64,
        smblks: m.smblks as u64,
        hblks: m.hblks as u64,
        hblkhd: m.hblkhd as u64,
        fsmblks: m.fsmblks as u64,
        uordblks: m.uordblks as u64,
        fordblks: m.fordblks as u64,
        keepcost: m.keepcost as u64,
    }, before))
}

/// Write a checkpoint into this thread's stream.
///
/// # Safety
/// `t` is this thread's state with the guard held.
pub unsafe fn emit(t: *mut ThreadState, reason: MallinfoReason, (mi, clock_before): &(Mallinfo2, u64)) {
    let words = mi.encode(reason, *clock_before);
    // SAFETY: guard held per the contract; exactly `words.len()` words are written.
    unsafe { writer::emit(t, words.len(), |w| core::ptr::copy_nonoverlapping(words.as_ptr(), w, words.len())) };
}

/// The exit checkpoint, on the exiting thread. Skipped when the thread is probably running a
/// signal handler: it may have interrupted glibc's malloc while it held an arena lock, and
/// `mallinfo2` would then wait for that lock forever.
///
/// # Safety
/// `t` is this thread's state with the guard held.
pub unsafe fn exit_checkpoint(t: *mut ThreadState) {
    STOP.store(true, Ordering::Release);
    if !available() || in_signal_handler() {
        return;
    }
    if let Some(mi) = take() {
        // SAFETY: per the contract.
        unsafe { emit(t, MallinfoReason::Exit, &mi) };
    }
}

/// The `Start` checkpoint: once the image is registered (and its sampler thread started), what
/// glibc already holds that the trace never showed — allocations made before recording began or
/// by our own code (the sampler's DTV, failing `dlsym` lookups). The model starts from it.
///
/// # Safety
/// `t` is this thread's state with the guard held.
pub unsafe fn start_checkpoint(t: *mut ThreadState) {
    if !available() {
        return;
    }
    if let Some(mi) = take() {
        // SAFETY: per the contract; the break first, so the model knows where the heap ends.
        unsafe {
            crate::glibc::report_brk(t);
            emit(t, MallinfoReason::Start, &mi);
        }
    }
}

/// Does this thread block a signal that has a handler? A handler runs with its own signal
/// blocked (unless installed with `SA_NODEFER`), and a thread that only blocks signals it
/// waits for (`sigwait`, `signalfd`) leaves them at their default action. One system call when
/// nothing is blocked; called once per process, at exit.
fn in_signal_handler() -> bool {
    // SAFETY: sigset_t and sigaction are plain data (all-zero is valid); the calls only read the
    // thread's mask and the signals' dispositions into locals.
    unsafe {
        let mut mask: libc::sigset_t = core::mem::zeroed();
        if libc::pthread_sigmask(libc::SIG_BLOCK, core::ptr::null(), &mut mask) != 0 {
            return false;
        }
        for sig in 1..=64 {
            if libc::sigismember(&mask, sig) != 1 {
                continue;
            }
            let mut sa: libc::sigaction = core::mem::zeroed();
            if libc::sigaction(sig, core::ptr::null(), &mut sa) == 0 && sa.sa_sigaction != libc::SIG_DFL && sa.sa_sigaction != libc::SIG_IGN {
                return true;
            }
        }
    }
    false
}

/// Start the periodic sampler thread, if `MTRACE_MALLINFO_MS` asks for one. Called when the
/// image registered (constructor) and in a fork child once it registered, guard held.
pub fn start_sampler() {
    let period = PERIOD_MS.load(Ordering::Relaxed);
    let create = THREADS.create.load(Ordering::Acquire);
    let nthreads = THREADS.nthreads.load(Ordering::Acquire);
    if period == 0 || !available() || create.is_null() || nthreads.is_null() {
        return;
    }
    STOP.store(false, Ordering::Release);
    // glibc initialises malloc on its first use, without a lock: make sure that has happened
    // before a second thread can call mallinfo2.
    let _ = take();
    // SAFETY: the pointers were resolved by `resolve` for these symbols, whose C types are the
    // ones transmuted to. `attr` is initialised by pthread_attr_init before any other use. The
    // signal mask is restored before returning.
    unsafe {
        let create = core::mem::transmute::<*mut c_void, PthreadCreateFn>(create);
        let attr_init = core::mem::transmute::<*mut c_void, AttrFn>(THREADS.attr_init.load(Ordering::Acquire));
        let attr_destroy = core::mem::transmute::<*mut c_void, AttrFn>(THREADS.attr_destroy.load(Ordering::Acquire));
        let attr_stacksize = core::mem::transmute::<*mut c_void, AttrSizeFn>(THREADS.attr_stacksize.load(Ordering::Acquire));
        let attr_detach = core::mem::transmute::<*mut c_void, AttrIntFn>(THREADS.attr_detach.load(Ordering::Acquire));
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        if attr_init(&mut attr) != 0 {
            return;
        }
        attr_detach(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        attr_stacksize(&mut attr, SAMPLER_STACK);
        // The new thread inherits the creator's signal mask: all blocked (glibc keeps its own
        // internal signals deliverable).
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut th: libc::pthread_t = 0;
        let mut rc = create(&mut th, &attr, sampler_main, null_mut());
        if rc == libc::EINVAL {
            // A static TLS too large for our small stack: take the default size.
            attr_destroy(&mut attr);
            attr_init(&mut attr);
            attr_detach(&mut attr, libc::PTHREAD_CREATE_DETACHED);
            rc = create(&mut th, &attr, sampler_main, null_mut());
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, null_mut());
        attr_destroy(&mut attr);
        if rc == 0 {
            // pthread_create counted the thread in `__nptl_nthreads` before starting it; glibc
            // calls exit(0) when a leaving thread brings the count to zero. Ours never leaves:
            // uncounted, it does not keep a process whose threads all left alive.
            // SAFETY: `nthreads` is glibc's `__nptl_nthreads` (resolved by name), an aligned
            // `unsigned int` that lives as long as libc and that glibc itself only updates
            // atomically; viewing it as an AtomicU32 matches those accesses.
            AtomicU32::from_ptr(nthreads as *mut u32).fetch_sub(1, Ordering::AcqRel);
        }
    }
}

extern "C" fn sampler_main(_: *mut c_void) -> *mut c_void {
    let t = tls::state();
    // SAFETY: `t` is this new thread's TLS block (zeroed by the loader). The guard stays held for
    // the thread's whole life; `key_set` keeps `switch_block` from calling pthread_setspecific.
    // prctl(PR_SET_NAME) reads a NUL-terminated name of at most 16 bytes (ours is static).
    unsafe {
        (*t).busy = 1;
        (*t).key_set = 1;
        libc::prctl(libc::PR_SET_NAME, c"mtrace-mallinfo".as_ptr() as usize, 0usize, 0usize, 0usize);
    }
    let period_ns = PERIOD_MS.load(Ordering::Relaxed).saturating_mul(1_000_000);
    // The first checkpoint one period in: the registering thread takes the `Start` one.
    let mut next = sys::clock_ns(libc::CLOCK_MONOTONIC).saturating_add(period_ns);
    sleep_until(next);
    loop {
        if STOP.load(Ordering::Acquire) || writer::STATE.load(Ordering::Acquire) != ACTIVE {
            break;
        }
        if let Some(mi) = take() {
            // `take` may have waited for arena locks until the process began exiting.
            if STOP.load(Ordering::Acquire) {
                break;
            }
            // SAFETY: `t` is this thread's state, guard held.
            unsafe { emit(t, MallinfoReason::Periodic, &mi) };
        }
        next = next.saturating_add(period_ns);
        let now = sys::clock_ns(libc::CLOCK_MONOTONIC);
        if next <= now {
            // Fell behind (stopped, or a slow mallinfo2): no burst of catch-up samples.
            next = now.saturating_add(period_ns);
        }
        sleep_until(next);
    }
    // Tracing ended (exit, or detached from the collector). Never leave: see the module docs.
    loop {
        sys::nanosleep(3600 * 1_000_000_000);
    }
}

fn sleep_until(deadline_ns: u64) {
    let ts = libc::timespec { tv_sec: (deadline_ns / 1_000_000_000) as _, tv_nsec: (deadline_ns % 1_000_000_000) as _ };
    // SAFETY: a valid absolute timespec; no remainder is requested with TIMER_ABSTIME.
    while unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &ts, null_mut()) } == libc::EINTR {}
}
