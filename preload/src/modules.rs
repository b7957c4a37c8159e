//! The loaded modules: the unwinder's module list and the `Module` / `ModuleUnload` events.
//!
//! Modules come from `dl_iterate_phdr`: the `PT_LOAD` extent, `PT_GNU_EH_FRAME` (`.eh_frame_hdr`,
//! whose `eh_frame_ptr` locates `.eh_frame`), and the GNU build id from `PT_NOTE` — all read in
//! place in memory, no file I/O. The executable's path is `/proc/self/exe` (its `dlpi_name` is
//! empty).
//!
//! Publication: the list is immutable once published. A change builds a new [`ModList`] (with a
//! new framehop unwinder) and swaps [`CURRENT`] (release); unwinding threads load it (acquire) and
//! may keep using the old one. Old lists are **leaked**, never freed, so no thread can see one
//! freed under it (a few hundred bytes per module per change; framehop's per-module index data is
//! shared between lists). [`GEN`] counts changes: memoised stacks of an older generation are void.
//!
//! [`refresh`] re-reads and publishes the list; [`announce`] writes the `Module` /
//! `ModuleUnload` events for the difference between the list last announced and the current one
//! (so they are never written in the middle of another event). The list is refreshed (always on
//! a cold path, guard held, under a spin lock):
//! * at registration (every module is sent), and again in a fork child (its stream gets the
//!   whole list again);
//! * after `dlclose` returned (the hook calls the real one, then refreshes: `ModuleUnload`);
//! * after `dlopen`/`dlmopen`: these hooks cannot run code after the real call — glibc uses the
//!   caller's return address to pick the calling object's namespace, `RUNPATH` and `$ORIGIN` —
//!   so they bump [`DL_EPOCH`] and tail-jump to the real function. The next full unwind (a memo
//!   miss) of any thread sees the epoch moved and refreshes;
//! * when a full unwind meets a return address outside every known module (libraries loaded
//!   behind our back, e.g. by glibc's internal `__libc_dlopen` for NSS), at most at the 1st, 2nd,
//!   4th, 8th… such unwind of a thread (JIT code is in no module, and must not make every miss
//!   rescan).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use framehop::x86_64::UnwinderX86_64;
use framehop::{ExplicitModuleSectionInfo, Module, MustNotAllocateDuringUnwind, Unwinder};
use mtrace_protocol::event::{self, EventKind, MAX_EVENT_WORDS};

use crate::real;
use crate::tls::ThreadState;
use crate::writer;

pub type Unw = UnwinderX86_64<&'static [u8], MustNotAllocateDuringUnwind>;

/// One loaded object, as sent in its `Module` event.
pub struct Entry {
    pub bias: u64,
    pub lo: u64,
    pub hi: u64,
    pub build_id: Vec<u8>,
    pub path: Vec<u8>,
    fh: Module<&'static [u8]>,
}

/// An immutable module list and the unwinder built from it.
pub struct ModList {
    pub unw: Unw,
    /// Sorted by `lo`.
    pub mods: Vec<Entry>,
    pub generation: u64,
}

impl ModList {
    /// Is `ip` inside a known module?
    pub fn knows(&self, ip: u64) -> bool {
        let i = self.mods.partition_point(|m| m.lo <= ip);
        i > 0 && ip < self.mods[i - 1].hi
    }
}

/// The published list (null before registration).
pub static CURRENT: AtomicPtr<ModList> = AtomicPtr::new(core::ptr::null_mut());
/// Generation of [`CURRENT`].
pub static GEN: AtomicU64 = AtomicU64::new(0);
/// Bumped by the `dlopen`/`dlmopen`/`dlclose` hooks.
pub static DL_EPOCH: AtomicU64 = AtomicU64::new(0);
/// The epoch the last refresh started from.
pub static SEEN_EPOCH: AtomicU64 = AtomicU64::new(0);
/// libmtrace.so's own extent: its frames are dropped from stacks.
pub static SELF_LO: AtomicU64 = AtomicU64::new(0);
pub static SELF_HI: AtomicU64 = AtomicU64::new(0);

static LOCK: AtomicBool = AtomicBool::new(false);

pub fn after_fork_child() {
    LOCK.store(false, Ordering::Release);
}

/// The current list, if any.
#[inline(always)]
pub fn current() -> Option<&'static ModList> {
    let p = CURRENT.load(Ordering::Acquire);
    // SAFETY: published lists are never freed.
    if p.is_null() { None } else { Some(unsafe { &*p }) }
}

/// What `dl_iterate_phdr` told about one object.
struct Found {
    bias: u64,
    lo: u64,
    hi: u64,
    eh_hdr: u64,
    eh_hdr_len: u64,
    eh: u64,
    eh_len: u64,
    build_id: Vec<u8>,
    path: Vec<u8>,
}

/// Decode the `eh_frame_ptr` of the `.eh_frame_hdr` at `hdr` (`None` if absent or unknown).
unsafe fn eh_frame_ptr(hdr: u64, len: u64) -> Option<u64> {
    if len < 12 {
        return None;
    }
    // SAFETY: `hdr..hdr+len` is the mapped PT_GNU_EH_FRAME segment.
    unsafe {
        let b = hdr as *const u8;
        if *b != 1 {
            return None;
        }
        let enc = *b.add(1);
        if enc == 0xff {
            return None;
        }
        let field = hdr + 4;
        let v: u64 = match enc & 0x0f {
            0x00 | 0x04 | 0x0c => core::ptr::read_unaligned(field as *const u64),
            0x03 => core::ptr::read_unaligned(field as *const u32) as u64,
            0x0b => core::ptr::read_unaligned(field as *const i32) as i64 as u64,
            _ => return None,
        };
        match enc & 0x70 {
            0x00 => Some(v),
            0x10 => Some(field.wrapping_add(v)),
            0x30 => Some(hdr.wrapping_add(v)),
            _ => None,
        }
    }
}

/// The GNU build id in the notes at `p..p+len`.
unsafe fn build_id(p: u64, len: u64, out: &mut Vec<u8>) {
    let mut at = p;
    let end = p + len;
    // SAFETY: the note segment is mapped; every access is bounds-checked against `end`.
    unsafe {
        while at + 12 <= end {
            let namesz = *(at as *const u32) as u64;
            let descsz = *((at + 4) as *const u32) as u64;
            let ty = *((at + 8) as *const u32);
            let name = at + 12;
            let desc = name + namesz.div_ceil(4) * 4;
            let next = desc + descsz.div_ceil(4) * 4;
            if next > end {
                return;
            }
            if ty == 3 && namesz == 4 && core::slice::from_raw_parts(name as *const u8, 4) == b"GNU\0" {
                out.extend_from_slice(core::slice::from_raw_parts(desc as *const u8, descsz as usize));
                return;
            }
            at = next;
        }
    }
}

unsafe extern "C" fn collect(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
    // SAFETY: glibc hands a valid info; `data` is our Vec.
    unsafe {
        let out = &mut *(data as *mut Vec<Found>);
        let info = &*info;
        let bias = info.dlpi_addr;
        let phdrs = core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
        let (mut lo, mut hi) = (u64::MAX, 0u64);
        let (mut eh_hdr, mut eh_hdr_len) = (0u64, 0u64);
        for ph in phdrs {
            if ph.p_type == libc::PT_LOAD {
                lo = lo.min(bias + ph.p_vaddr);
                hi = hi.max(bias + ph.p_vaddr + ph.p_memsz);
            } else if ph.p_type == libc::PT_GNU_EH_FRAME {
                eh_hdr = bias + ph.p_vaddr;
                eh_hdr_len = ph.p_memsz;
            }
        }
        if hi == 0 {
            return 0;
        }
        let mut f = Found { bias, lo, hi, eh_hdr, eh_hdr_len, eh: 0, eh_len: 0, build_id: Vec::new(), path: Vec::new() };
        if eh_hdr != 0 {
            if let Some(eh) = eh_frame_ptr(eh_hdr, eh_hdr_len) {
                // `.eh_frame` runs at most to the end of the PT_LOAD segment holding it.
                for ph in phdrs {
                    let s = bias + ph.p_vaddr;
                    if ph.p_type == libc::PT_LOAD && s <= eh && eh < s + ph.p_filesz {
                        f.eh = eh;
                        f.eh_len = s + ph.p_filesz - eh;
                    }
                }
            }
        }
        for ph in phdrs {
            if ph.p_type == libc::PT_NOTE && f.build_id.is_empty() {
                build_id(bias + ph.p_vaddr, ph.p_memsz, &mut f.build_id);
            }
        }
        let name = if info.dlpi_name.is_null() { &[][..] } else { crate::sys::cstr_bytes(info.dlpi_name as *const u8) };
        f.path.extend_from_slice(name);
        out.push(f);
        0
    }
}

fn exe_path(out: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    // SAFETY: readlink into a local buffer.
    let n = unsafe { libc::readlink(c"/proc/self/exe".as_ptr(), buf.as_mut_ptr() as *mut c_char, buf.len()) };
    if n > 0 {
        out.extend_from_slice(&buf[..n as usize]);
    }
}

fn framehop_module(f: &Found) -> Module<&'static [u8]> {
    let mut info = ExplicitModuleSectionInfo::<&'static [u8]> { base_svma: 0, ..Default::default() };
    if f.eh != 0 && f.eh_len > 0 {
        // SAFETY: both ranges lie in the object's mapped read-only segments, which stay mapped
        // while it is loaded (see the module docs for unloading).
        unsafe {
            info.eh_frame_hdr_svma = Some(f.eh_hdr - f.bias..f.eh_hdr - f.bias + f.eh_hdr_len);
            info.eh_frame_hdr = Some(core::slice::from_raw_parts(f.eh_hdr as *const u8, f.eh_hdr_len as usize));
            info.eh_frame_svma = Some(f.eh - f.bias..f.eh - f.bias + f.eh_len);
            info.eh_frame = Some(core::slice::from_raw_parts(f.eh as *const u8, f.eh_len as usize));
        }
    }
    Module::new(String::new(), f.lo..f.hi, f.bias, info)
}

/// Write one `Module` event.
///
/// # Safety
/// Guard held, `STATE` is `ACTIVE`.
unsafe fn emit_module(t: *mut ThreadState, e: &Entry) {
    let mut out = [0u64; MAX_EVENT_WORDS];
    let n = event::encode_module(e.bias, e.lo, e.hi, &e.build_id, &e.path, &mut out);
    // SAFETY: per the contract; `n` words are copied.
    unsafe { writer::emit(t, n, |w| core::ptr::copy_nonoverlapping(out.as_ptr(), w, n)) };
}

/// Re-read the module list; publish a new one if it changed (its `Module` / `ModuleUnload`
/// events are written by [`announce`], outside any event being written). Returns whether it
/// changed. From an unwind: if another thread is refreshing, returns `false` at once and the
/// current list stays — never waits. Waiting could deadlock: that thread holds our lock while
/// `dl_iterate_phdr` waits for glibc's loader lock, which this thread may hold (an allocation
/// inside a `dl_iterate_phdr` callback of the program's).
///
/// # Safety
/// Guard held.
pub unsafe fn refresh() -> bool {
    if LOCK.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return false;
    }
    // SAFETY: per the contract; the lock is ours.
    unsafe { refresh_locked() }
}

/// [`refresh`], waiting for another thread's refresh to end first: for the image's start and
/// after `dlclose` returned (no loader lock is held then).
///
/// # Safety
/// Guard held; not inside a `dl_iterate_phdr` callback.
pub unsafe fn refresh_waiting() -> bool {
    while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        core::hint::spin_loop();
    }
    // SAFETY: per the contract; the lock is ours.
    unsafe { refresh_locked() }
}

/// The body of [`refresh`]: `LOCK` is held, and released here.
///
/// # Safety
/// Guard held, `LOCK` taken by the caller.
unsafe fn refresh_locked() -> bool {
    SEEN_EPOCH.store(DL_EPOCH.load(Ordering::Acquire), Ordering::Release);
    let mut found: Vec<Found> = Vec::with_capacity(64);
    // SAFETY: the callback only reads the program headers glibc hands it.
    unsafe { libc::dl_iterate_phdr(Some(collect), &mut found as *mut Vec<Found> as *mut c_void) };
    let old = current();
    // The same object: same place, and same build id and name (another object unloaded behind
    // our back and mapped at the same addresses must not keep the old one's `.eh_frame`). The
    // executable's empty name is filled in only below.
    let same = |a: &Found, e: &Entry| {
        a.bias == e.bias && a.lo == e.lo && a.hi == e.hi && a.build_id == e.build_id && (a.path.is_empty() || a.path == e.path)
    };
    let mut changed = old.is_none();
    let mut mods: Vec<Entry> = Vec::with_capacity(found.len());
    for mut f in found {
        if let Some(e) = old.and_then(|o| o.mods.iter().find(|e| same(&f, e))) {
            mods.push(Entry { bias: e.bias, lo: e.lo, hi: e.hi, build_id: e.build_id.clone(), path: e.path.clone(), fh: e.fh.clone() });
            continue;
        }
        changed = true;
        if f.path.is_empty() && mods.is_empty() {
            // The first object without a name is the executable.
            exe_path(&mut f.path);
        }
        let fh = framehop_module(&f);
        let me = refresh as *const () as usize as u64;
        if f.lo <= me && me < f.hi {
            SELF_LO.store(f.lo, Ordering::Relaxed);
            SELF_HI.store(f.hi, Ordering::Relaxed);
        }
        mods.push(Entry { bias: f.bias, lo: f.lo, hi: f.hi, build_id: core::mem::take(&mut f.build_id), path: core::mem::take(&mut f.path), fh });
    }
    if let Some(o) = old {
        changed |= o.mods.len() != mods.len();
    }
    if changed {
        mods.sort_unstable_by_key(|m| m.lo);
        let mut unw = Unw::new();
        for m in &mods {
            unw.add_module(m.fh.clone());
        }
        let generation = GEN.load(Ordering::Relaxed) + 1;
        let list = Box::into_raw(Box::new(ModList { unw, mods, generation }));
        CURRENT.store(list, Ordering::Release);
        GEN.store(generation, Ordering::Release);
    }
    LOCK.store(false, Ordering::Release);
    changed
}

/// The list whose modules this image's streams have been told about.
static ANNOUNCED: AtomicPtr<ModList> = AtomicPtr::new(core::ptr::null_mut());

/// Something for [`announce`] to write?
#[inline(always)]
pub fn unannounced() -> bool {
    CURRENT.load(Ordering::Relaxed) != ANNOUNCED.load(Ordering::Relaxed)
}

/// Write `Module` events for the modules the current list has and the announced one had not,
/// `ModuleUnload` for the reverse. Never waits for the lock (see [`refresh`]): if another thread
/// holds it, the list stays unannounced and a later call (the next stack written) announces it;
/// the collector resolves frames against `Module` events that come late.
///
/// # Safety
/// Guard held, `STATE` is `ACTIVE`, no event half-written.
pub unsafe fn announce(t: *mut ThreadState) {
    if LOCK.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        return;
    }
    let cur = CURRENT.load(Ordering::Acquire);
    let old = ANNOUNCED.load(Ordering::Acquire);
    if cur != old && !cur.is_null() {
        // SAFETY: published lists are never freed.
        let (cur_l, old_l) = unsafe { (&*cur, if old.is_null() { None } else { Some(&*old) }) };
        let same = |a: &Entry, b: &Entry| a.bias == b.bias && a.lo == b.lo && a.hi == b.hi && a.build_id == b.build_id && a.path == b.path;
        // Unloads first: an object replaced at the same load bias is unloaded, then loaded.
        if let Some(o) = old_l {
            for e in &o.mods {
                if !cur_l.mods.iter().any(|m| same(m, e)) {
                    // SAFETY: per the contract.
                    unsafe {
                        writer::emit(t, 2, |w| {
                            *w = event::header(EventKind::ModuleUnload, 2, 0);
                            *w.add(1) = e.bias;
                        })
                    };
                }
            }
        }
        for e in &cur_l.mods {
            if !old_l.is_some_and(|o| o.mods.iter().any(|m| same(m, e))) {
                // SAFETY: per the contract.
                unsafe { emit_module(t, e) };
            }
        }
        ANNOUNCED.store(cur, Ordering::Release);
    }
    LOCK.store(false, Ordering::Release);
}

/// Send every known module again (a fork child's stream).
///
/// # Safety
/// Guard held, `STATE` is `ACTIVE`.
pub unsafe fn resend_all(t: *mut ThreadState) {
    if let Some(l) = current() {
        for e in &l.mods {
            // SAFETY: per the contract.
            unsafe { emit_module(t, e) };
        }
        // What was just sent is what this image's stream has announced (the parent may not
        // have announced its latest list yet).
        ANNOUNCED.store(l as *const ModList as *mut ModList, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------
// dlopen / dlmopen / dlclose

/// The real `dlopen` / `dlmopen`, for the trampolines (null until resolved).
pub static DLOPEN_REAL: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());
pub static DLMOPEN_REAL: AtomicPtr<c_void> = AtomicPtr::new(core::ptr::null_mut());

extern "C" fn resolve_dlopen() -> *mut c_void {
    real::ensure_resolved();
    let p = real::REAL.dlopen.load(Ordering::Acquire);
    DLOPEN_REAL.store(p, Ordering::Release);
    p
}

extern "C" fn resolve_dlmopen() -> *mut c_void {
    real::ensure_resolved();
    let p = real::REAL.dlmopen.load(Ordering::Acquire);
    DLMOPEN_REAL.store(p, Ordering::Release);
    p
}

/// A loader entry point (`dlopen`, `dlmopen`) that notes the module list may change, then jumps
/// to the real function with the caller's return address still on the stack (glibc resolves the
/// file, RUNPATH, `$ORIGIN` and the namespace relative to its caller, so no wrapper frame may sit
/// in between). Until the real function is known it is resolved first (the argument registers
/// saved around the call); if it cannot be, the call returns null.
macro_rules! loader_trampoline {
    ($(#[$doc:meta])* $name:ident ($($arg:ident : $ty:ty),*), $real:ident, $resolve:ident) => {
        $(#[$doc])*
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> *mut c_void {
            core::arch::naked_asm!(
                // CFI by hand (rustc emits none for naked functions), following the pushes.
                ".cfi_startproc",
                "mov rax, qword ptr [rip + {real}]",
                "test rax, rax",
                "jz 2f",
                "1:",
                "lock inc qword ptr [rip + {epoch}]",
                "jmp rax",
                "2:",
                "push rdi",
                ".cfi_adjust_cfa_offset 8",
                "push rsi",
                ".cfi_adjust_cfa_offset 8",
                "push rdx",
                ".cfi_adjust_cfa_offset 8",
                "call {resolve}",
                "pop rdx",
                ".cfi_adjust_cfa_offset -8",
                "pop rsi",
                ".cfi_adjust_cfa_offset -8",
                "pop rdi",
                ".cfi_adjust_cfa_offset -8",
                "test rax, rax",
                "jnz 1b",
                "ret",
                ".cfi_endproc",
                real = sym $real,
                epoch = sym DL_EPOCH,
                resolve = sym $resolve,
            )
        }
    };
}

loader_trampoline!(
    /// `dlopen`, see [`loader_trampoline`].
    dlopen(_file: *const c_char, _mode: c_int), DLOPEN_REAL, resolve_dlopen
);
loader_trampoline!(
    /// `dlmopen`, see [`loader_trampoline`].
    dlmopen(_lmid: libc::c_long, _file: *const c_char, _mode: c_int), DLMOPEN_REAL, resolve_dlmopen
);

/// `dlclose`: forward, then refresh the list (`ModuleUnload` for what it unloaded).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    if !real::resolved() {
        real::ensure_resolved();
    }
    // SAFETY: forwarding to the real dlclose.
    let r = unsafe { real::dlclose().map_or(-1, |f| f(handle)) };
    DL_EPOCH.fetch_add(1, Ordering::AcqRel);
    if crate::stacks::enabled() {
        let t = crate::tls::state();
        // SAFETY: `t` is this thread's TLS block; guard taken around the refresh.
        unsafe {
            if (*t).busy == 0 && writer::STATE.load(Ordering::Acquire) == writer::ACTIVE {
                (*t).busy = 1;
                let errno = *libc::__errno_location();
                refresh_waiting();
                announce(t);
                *libc::__errno_location() = errno;
                (*t).busy = 0;
            }
        }
    }
    r
}
