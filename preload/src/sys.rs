//! Raw system calls and small libc helpers that are safe to use from inside our hooks.
//!
//! Calls from this library to `mmap`, `munmap`, `brk`, `sbrk`, `_exit` or any malloc-family
//! function would bind to our own exported hooks, so those go through `syscall(2)` here. Other
//! libc functions used by the preload (socket calls, `open`, `read`, `readlink`, …) neither
//! allocate nor come back into our hooks.

use core::ffi::{c_int, c_long, c_void};

/// `mmap` without going through our hook.
pub unsafe fn mmap(addr: *mut c_void, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> *mut c_void {
    // SAFETY: a plain mmap system call; the caller owns the consequences for `addr`.
    unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot as c_long, flags as c_long, fd as c_long, off) as *mut c_void }
}

/// Name an anonymous mapping of ours `[anon:mtrace]` in `/proc/<pid>/maps` (Linux 5.17+ with
/// `CONFIG_ANON_VMA_NAME`; best effort), so that it can be told from the program's memory.
pub fn name_mapping(addr: *mut c_void, len: usize) {
    // SAFETY: prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME) only labels our own mapping.
    unsafe { libc::prctl(0x5356_4d41, 0, addr as libc::c_ulong, len as libc::c_ulong, c"mtrace".as_ptr() as libc::c_ulong) };
}

pub unsafe fn munmap(addr: *mut c_void, len: usize) -> c_int {
    // SAFETY: the caller unmaps only what it mapped.
    unsafe { libc::syscall(libc::SYS_munmap, addr, len) as c_int }
}

/// Is the page holding `addr` mapped? (`mincore` fails with ENOMEM on unmapped ranges.)
pub fn page_is_mapped(addr: u64, page: u64) -> bool {
    let mut vec = [0u8; 1];
    let start = addr & !(page - 1);
    // SAFETY: mincore only reads the page tables and writes one byte into `vec`.
    unsafe { libc::syscall(libc::SYS_mincore, start as usize, page as usize, vec.as_mut_ptr()) == 0 }
}

pub fn gettid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

pub fn getpid() -> u32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::syscall(libc::SYS_getpid) as u32 }
}

pub fn getppid() -> u32 {
    // SAFETY: getppid cannot fail.
    unsafe { libc::syscall(libc::SYS_getppid) as u32 }
}

/// CLOCK_MONOTONIC or CLOCK_REALTIME in nanoseconds (vDSO, no allocation).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wait on a futex word in shared memory (not `FUTEX_PRIVATE`: the word is shared with the
/// collector process). Returns when woken, on timeout, or on a value mismatch.
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, expected: u32, timeout_ns: u64) {
    let ts = libc::timespec { tv_sec: (timeout_ns / 1_000_000_000) as _, tv_nsec: (timeout_ns % 1_000_000_000) as _ };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; `ts` is valid.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, expected, &ts as *const libc::timespec, 0usize, 0u32);
    }
}

pub fn nanosleep(ns: u64) {
    let ts = libc::timespec { tv_sec: (ns / 1_000_000_000) as _, tv_nsec: (ns % 1_000_000_000) as _ };
    // SAFETY: valid timespec, no remainder requested.
    unsafe { libc::nanosleep(&ts, core::ptr::null_mut()) };
}

/// Write all of `buf` to `fd`, ignoring errors (used for our one-line messages on stderr).
pub fn write_all(fd: c_int, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid slice.
        let n = unsafe { libc::write(fd, buf.as_ptr() as *const c_void, buf.len()) };
        if n <= 0 {
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return;
        }
        buf = &buf[n as usize..];
    }
}

pub fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(v: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = v }
}

/// Read a whole small file into `buf` (e.g. `/proc/self/stat`); returns the bytes read.
pub fn read_file(path: &core::ffi::CStr, buf: &mut [u8]) -> usize {
    // SAFETY: `path` is NUL-terminated; the fd is closed before returning.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return 0;
        }
        let mut n = 0;
        while n < buf.len() {
            let r = libc::read(fd, buf[n..].as_mut_ptr() as *mut c_void, buf.len() - n);
            if r <= 0 {
                if r < 0 && errno() == libc::EINTR {
                    continue;
                }
                break;
            }
            n += r as usize;
        }
        libc::close(fd);
        n
    }
}

/// Length of a NUL-terminated C string.
pub unsafe fn cstr_len(p: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the caller passes a NUL-terminated string.
    unsafe {
        while *p.add(n) != 0 {
            n += 1;
        }
    }
    n
}

/// Borrow a NUL-terminated C string as bytes (without the NUL).
pub unsafe fn cstr_bytes<'a>(p: *const u8) -> &'a [u8] {
    if p.is_null() {
        return &[];
    }
    // SAFETY: the caller passes a NUL-terminated string that outlives `'a`.
    unsafe { core::slice::from_raw_parts(p, cstr_len(p)) }
}

/// A tiny fixed-capacity byte buffer for formatting messages and paths without allocation.
pub struct FixedBuf<const N: usize> {
    pub buf: [u8; N],
    pub len: usize,
}

impl<const N: usize> FixedBuf<N> {
    pub const fn new() -> Self {
        FixedBuf { buf: [0; N], len: 0 }
    }
    pub fn push(&mut self, b: &[u8]) -> &mut Self {
        let n = b.len().min(N.saturating_sub(1) - self.len.min(N - 1));
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
        self
    }
    pub fn push_u64(&mut self, mut v: u64) -> &mut Self {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&tmp[i..]);
        self
    }
    pub fn push_hex(&mut self, mut v: u64) -> &mut Self {
        let mut tmp = [0u8; 16];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b"0123456789abcdef"[(v & 15) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(&tmp[i..]);
        self
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    /// NUL-terminated pointer (there is always room for the NUL: `push` keeps one byte free).
    pub fn as_cstr_ptr(&mut self) -> *const libc::c_char {
        self.buf[self.len] = 0;
        self.buf.as_ptr() as *const libc::c_char
    }
}

/// Print `mtrace: <msg>` on stderr.
pub fn warn(parts: &[&[u8]]) {
    let mut b = FixedBuf::<512>::new();
    b.push(b"mtrace: ");
    for p in parts {
        b.push(p);
    }
    b.push(b"\n");
    write_all(2, b.as_bytes());
}
