//! Process metadata sent once per image in Hello: what the collector needs to explain memory
//! behaviour (glibc version, page size, CPUs, malloc environment, where the brk heap starts) and
//! to symbolise later (executable, loaded modules).

use core::ffi::{c_char, c_int, c_void};

use mtrace_protocol::control::{tag, Writer};

use crate::glibc::g;
use crate::session;
use crate::sys;

/// Write the metadata TLVs. A fork child sends only what changed (its parent's metadata is
/// inherited by the collector).
pub fn write(w: &mut Writer, full: bool) {
    w.tlv_u64(tag::START_REALTIME_NS, sys::clock_ns(libc::CLOCK_REALTIME));
    w.tlv_u64(tag::START_MONOTONIC_NS, sys::clock_ns(libc::CLOCK_MONOTONIC));
    if !g().curbrk.is_null() {
        // SAFETY: `curbrk` is glibc's exported `__curbrk`.
        w.tlv_u64(tag::BRK_AT_INIT, unsafe { core::ptr::read_volatile(g().curbrk) });
    }
    if !full {
        return;
    }
    let mut buf = [0u8; 4096];
    // SAFETY: readlink into a local buffer.
    let n = unsafe { libc::readlink(c"/proc/self/exe".as_ptr(), buf.as_mut_ptr() as *mut c_char, buf.len()) };
    if n > 0 {
        w.tlv(tag::EXE, &buf[..n as usize]);
    }
    // SAFETY: getcwd into a local buffer.
    if !unsafe { libc::getcwd(buf.as_mut_ptr() as *mut c_char, buf.len()) }.is_null() {
        // SAFETY: getcwd NUL-terminated it.
        w.tlv(tag::CWD, unsafe { sys::cstr_bytes(buf.as_ptr()) });
    }
    // SAFETY: the argv/envp arrays the loader passed to our constructor, NUL-terminated.
    unsafe {
        let mut a = session::ARGV;
        while !a.is_null() && !(*a).is_null() {
            w.tlv(tag::ARG, sys::cstr_bytes(*a as *const u8));
            a = a.add(1);
        }
        let mut e = session::ENVP;
        while !e.is_null() && !(*e).is_null() {
            let s = sys::cstr_bytes(*e as *const u8);
            if s.starts_with(b"MALLOC_") || s.starts_with(b"GLIBC_TUNABLES=") || s.starts_with(b"LD_PRELOAD=") {
                w.tlv(tag::ENV, s);
            }
            e = e.add(1);
        }
        let v = gnu_get_libc_version();
        if !v.is_null() {
            w.tlv(tag::GLIBC_VERSION, sys::cstr_bytes(v as *const u8));
        }
        w.tlv_u64(tag::PAGE_SIZE, libc::getauxval(libc::AT_PAGESZ));
        w.tlv_u64(tag::NCPUS, get_nprocs() as u64);
        let mut info: libc::Dl_info = core::mem::zeroed();
        if let Some(f) = crate::real::malloc() {
            if libc::dladdr(f as *const c_void, &mut info) != 0 && !info.dli_fname.is_null() {
                w.tlv(tag::ALLOCATOR, sys::cstr_bytes(info.dli_fname as *const u8));
            }
        }
    }
    if let Some(b) = start_brk() {
        w.tlv_u64(tag::START_BRK, b);
    }
    // SAFETY: dl_iterate_phdr calls back with valid entries; `w` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(module_cb), w as *mut Writer as *mut c_void) };
}

unsafe extern "C" fn module_cb(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
    // SAFETY: `data` is the Writer passed above; `info` is valid during the callback.
    unsafe {
        let w = &mut *(data as *mut Writer);
        let name = sys::cstr_bytes((*info).dlpi_name as *const u8);
        w.tlv2(tag::MODULE, &((*info).dlpi_addr as u64).to_le_bytes(), name);
    }
    0
}

unsafe extern "C" {
    fn gnu_get_libc_version() -> *const c_char;
    fn get_nprocs() -> c_int;
}

/// The kernel's `start_brk` (field 47 of `/proc/self/stat`): where the brk heap begins.
fn start_brk() -> Option<u64> {
    let mut buf = [0u8; 2048];
    let n = sys::read_file(c"/proc/self/stat", &mut buf);
    let s = &buf[..n];
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let after = s.iter().rposition(|&b| b == b')')? + 2;
    // Field 3 is the first after ')'; start_brk is field 47.
    let field = s.get(after..)?.split(|&b| b == b' ').nth(47 - 3)?;
    parse_u64(field)
}

fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v = 0u64;
    for &c in s {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

/// Resident bytes now (statm) and at peak (VmHWM), for Bye.
pub fn rss_and_hwm() -> (u64, u64) {
    let page = g().page;
    let mut buf = [0u8; 4096];
    let n = sys::read_file(c"/proc/self/statm", &mut buf);
    let rss = buf[..n].split(|&b| b == b' ').nth(1).and_then(parse_u64).map_or(0, |p| p * page);
    let n = sys::read_file(c"/proc/self/status", &mut buf);
    let hwm = buf[..n]
        .split(|&b| b == b'\n')
        .find(|l| l.starts_with(b"VmHWM:"))
        .and_then(|l| {
            let digits = l[6..].iter().skip_while(|c| !c.is_ascii_digit()).copied().collect_fixed();
            parse_u64(digits.as_bytes())
        })
        .map_or(0, |kb| kb * 1024);
    (rss, hwm)
}

trait CollectFixed {
    fn collect_fixed(self) -> sys::FixedBuf<32>;
}

impl<I: Iterator<Item = u8>> CollectFixed for I {
    fn collect_fixed(self) -> sys::FixedBuf<32> {
        let mut b = sys::FixedBuf::<32>::new();
        for c in self {
            b.push(&[c]);
        }
        b
    }
}
