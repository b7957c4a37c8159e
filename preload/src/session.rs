//! Registering this process image with the collector.
//!
//! * `MTRACE_SOCK` names the collector's socket (set by `mtracer record`, or by us in standalone
//!   mode so exec'd children join the same trace).
//! * Without it (plain `LD_PRELOAD=libmtrace.so app`), we start `mtracer agent` — found next to
//!   this library, or at `MTRACE_COLLECTOR` — as a detached grandchild that owns a listening socket
//!   we created, and register with it. It writes `mtrace.<pid>.mtr` (or `MTRACE_OUTPUT`).
//!
//! Everything here runs at initialisation, in a fork child, or at exit — never on the hot path —
//! and uses only raw libc calls and static buffers: no allocation.

use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::Ordering;

use mtrace_protocol::control::{self, Bye, HelloFixed, Welcome, Writer};
use mtrace_protocol::ring::Ring;

use crate::glibc::g;
use crate::sys::{self, FixedBuf};
use crate::writer;

/// Our control socket (moved to a high descriptor number), or -1.
pub static mut SOCK_FD: c_int = -1;
/// Inode of that socket, to make sure the descriptor is still ours before writing to it.
static mut SOCK_INO: u64 = 0;
/// The collector's address (`@name` = abstract), kept for fork children.
static mut SOCK_ADDR: FixedBuf<108> = FixedBuf::new();
pub static mut IMAGE_ID: u64 = 0;
pub static mut WELCOME_FLAGS: u32 = 0;
/// Our ring mapping (to unmap it in fork children).
pub static mut MAPPING: (usize, usize) = (0, 0);

/// argv / envp as given to our constructor.
pub static mut ARGV: *const *const c_char = core::ptr::null();
pub static mut ENVP: *const *const c_char = core::ptr::null();

static mut HELLO_BUF: [u8; 128 << 10] = [0; 128 << 10];

/// How registration went.
pub enum Registered {
    Yes,
    /// No collector could be reached; the reason was printed.
    No,
}

fn getenv(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv reads the environment without allocating; the string lives as long as the
    // environment entry (we copy what we keep).
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() { None } else { Some(unsafe { sys::cstr_bytes(p as *const u8) }) }
}

/// Register a process image that starts (constructor of a program or of an exec'd image).
///
/// Without `MTRACE_SOCK` (plain `LD_PRELOAD`), the agent of a standalone recording listens under
/// `@mtrace-agent-<pid>` for every pid it traces: an exec'd image finds it under its own pid, a
/// child under its parent's. Only a process with neither starts an agent of its own. (The
/// environment of the traced program is never modified.)
pub fn register_start() -> Registered {
    // SAFETY: single-threaded initialisation owns SOCK_ADDR.
    let set_addr = |parts: &[&[u8]], n: Option<u64>| unsafe {
        let a = &mut *core::ptr::addr_of_mut!(SOCK_ADDR);
        a.len = 0;
        for p in parts {
            a.push(p);
        }
        if let Some(n) = n {
            a.push_u64(n);
        }
    };
    if let Some(addr) = getenv(c"MTRACE_SOCK") {
        set_addr(&[addr], None);
        return register(control::Origin::Start, 0, 0);
    }
    for pid in [sys::getpid(), sys::getppid()] {
        set_addr(&[b"@mtrace-agent-"], Some(pid as u64));
        if let Some(fd) = connect() {
            // SAFETY: `fd` is ours; we only probed that an agent listens there.
            unsafe { libc::close(fd) };
            return register(control::Origin::Start, 0, 0);
        }
    }
    match spawn_agent() {
        Some(()) => register(control::Origin::Start, 0, 0),
        None => Registered::No,
    }
}

/// Register a fork child (the parent's state is inherited and must be dropped first).
pub fn register_fork(parent_image: u64, fork_seq: u64) -> Registered {
    register(control::Origin::Fork, parent_image, fork_seq)
}

fn connect() -> Option<c_int> {
    // SAFETY: plain socket calls on a sockaddr_un we build; descriptors are closed on failure.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut sa: libc::sockaddr_un = core::mem::zeroed();
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let a = (*core::ptr::addr_of!(SOCK_ADDR)).as_bytes();
        let (name, abstract_) = if a.first() == Some(&b'@') { (&a[1..], true) } else { (a, false) };
        let off = abstract_ as usize;
        if name.len() + off >= sa.sun_path.len() {
            libc::close(fd);
            return None;
        }
        for (i, b) in name.iter().enumerate() {
            sa.sun_path[i + off] = *b as c_char;
        }
        let len = core::mem::size_of::<libc::sa_family_t>() + off + name.len() + (!abstract_) as usize;
        if libc::connect(fd, &sa as *const _ as *const libc::sockaddr, len as libc::socklen_t) != 0 {
            libc::close(fd);
            return None;
        }
        // Before a single byte goes out (the Hello holds argv and the environment): the server
        // must be this user's, or root's. An abstract name can be taken by anyone first.
        let mut cred: libc::ucred = core::mem::zeroed();
        let mut cred_len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
        let ok = libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, &mut cred as *mut _ as *mut c_void, &mut cred_len) == 0;
        if !ok || !server_trusted(cred.uid) {
            libc::close(fd);
            let mut uid = FixedBuf::<24>::new();
            uid.push_u64(cred.uid as u64);
            sys::warn(&[b"ignoring ", a, b": it belongs to uid ", uid.as_bytes(), b", not to this user"]);
            return None;
        }
        // Move out of the low descriptor numbers programs assume are theirs.
        let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 800);
        let fd = if high >= 0 {
            libc::close(fd);
            high
        } else {
            fd
        };
        let tv = libc::timeval { tv_sec: 30, tv_usec: 0 };
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const c_void, core::mem::size_of::<libc::timeval>() as u32);
        Some(fd)
    }
}

/// A collector this process may talk to: one of its own user, or root's (`mtracer record` run
/// as root traces the programs it starts even after they dropped privileges).
fn server_trusted(uid: libc::uid_t) -> bool {
    // SAFETY: geteuid cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

fn register(origin: control::Origin, parent_image: u64, fork_seq: u64) -> Registered {
    let Some(fd) = connect() else {
        // SAFETY: reading our own static.
        let a = unsafe { (*core::ptr::addr_of!(SOCK_ADDR)).as_bytes() };
        sys::warn(&[b"cannot reach the collector at ", a, b"; running untraced"]);
        return Registered::No;
    };
    // SAFETY: single-threaded (initialisation or fork child): the static buffer is ours.
    let buf = unsafe { &mut *core::ptr::addr_of_mut!(HELLO_BUF) };
    let mut flags = 0;
    if g().chunks {
        flags |= control::HELLO_GLIBC_CHUNKS;
    }
    if g().heap_info {
        flags |= control::HELLO_HEAP_INFO;
    }
    if crate::order::enabled() {
        flags |= control::HELLO_ORDER;
    }
    let fixed = HelloFixed {
        version: control::PROTOCOL_VERSION,
        origin: origin as u32,
        pid: sys::getpid(),
        ppid: sys::getppid(),
        parent_image,
        fork_seq,
        order_table: crate::order::hello_word(),
        flags,
    };
    let n = fixed.encode(buf);
    let (meta_len, truncated) = {
        let mut w = Writer::new(&mut buf[n..]);
        crate::meta::write(&mut w, origin == control::Origin::Start);
        (w.pos, w.overflow)
    };
    if truncated {
        // Patch the flag in place (flags are the last 8 bytes of the fixed part).
        let f = flags | control::HELLO_META_TRUNCATED;
        buf[n - 8..n].copy_from_slice(&f.to_le_bytes());
    }
    // SAFETY: `fd` is our connected socket; buffers are valid for their lengths.
    unsafe {
        let sent = libc::send(fd, buf.as_ptr() as *const c_void, n + meta_len, libc::MSG_NOSIGNAL);
        if sent < 0 {
            libc::close(fd);
            sys::warn(&[b"the collector closed the connection; running untraced"]);
            return Registered::No;
        }
        let mut reply = [0u8; 512];
        let mut memfd: c_int = -1;
        let got = recv_with_fd(fd, &mut reply, &mut memfd);
        let Some((w, reason)) = (if got > 0 { Welcome::decode(&reply[..got as usize]) } else { None }) else {
            libc::close(fd);
            if memfd >= 0 {
                libc::close(memfd);
            }
            sys::warn(&[b"no answer from the collector; running untraced"]);
            return Registered::No;
        };
        if w.ring_size == 0 || memfd < 0 {
            libc::close(fd);
            if memfd >= 0 {
                libc::close(memfd);
            }
            sys::warn(&[b"the collector refused this process: ", reason]);
            return Registered::No;
        }
        let base = sys::mmap(core::ptr::null_mut(), w.ring_size as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, memfd, 0);
        libc::close(memfd);
        if base as isize == -1 || base.is_null() {
            libc::close(fd);
            sys::warn(&[b"cannot map the trace ring; running untraced"]);
            return Registered::No;
        }
        let Some(ring) = Ring::attach(base as *mut u8, w.ring_size) else {
            sys::munmap(base, w.ring_size as usize);
            libc::close(fd);
            sys::warn(&[b"the trace ring has an unknown layout; running untraced"]);
            return Registered::No;
        };
        let mut st: libc::stat = core::mem::zeroed();
        libc::fstat(fd, &mut st);
        SOCK_INO = st.st_ino;
        SOCK_FD = fd;
        IMAGE_ID = w.image_id;
        WELCOME_FLAGS = w.flags;
        MAPPING = (base as usize, w.ring_size as usize);
        let hot = &mut *core::ptr::addr_of_mut!(writer::HOT);
        hot.clock = &ring.header().clock.0.clock_ns;
        hot.lossy = w.flags & control::WELCOME_LOSSY != 0;
        writer::set_detach_timeout(&ring);
        hot.ring = Some(ring);
    }
    Registered::Yes
}

/// `recvmsg` one message and at most one descriptor.
unsafe fn recv_with_fd(fd: c_int, buf: &mut [u8], out_fd: &mut c_int) -> isize {
    // SAFETY: msghdr/cmsg built over local buffers of the right sizes.
    unsafe {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut c_void, iov_len: buf.len() };
        let mut cbuf = [0u64; 8];
        let mut msg: libc::msghdr = core::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut c_void;
        msg.msg_controllen = core::mem::size_of_val(&cbuf);
        let n = loop {
            let n = libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n < 0 && sys::errno() == libc::EINTR {
                continue;
            }
            break n;
        };
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fds = libc::CMSG_DATA(c) as *const c_int;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / core::mem::size_of::<c_int>();
                for i in 0..count {
                    let f = *fds.add(i);
                    if *out_fd < 0 { *out_fd = f } else { libc::close(f); }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        n
    }
}

/// Is `SOCK_FD` still the socket we connected (the application may have closed or reused it)?
fn socket_still_ours() -> bool {
    // SAFETY: fstat on a descriptor number; harmless if it is not ours.
    unsafe {
        let fd = SOCK_FD;
        if fd < 0 {
            return false;
        }
        let mut st: libc::stat = core::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK && st.st_ino == SOCK_INO
    }
}

/// Say goodbye at exit; in standalone mode wait until the collector has saved our events.
pub fn bye(status: i64) {
    send_bye(status, true);
}

/// [`bye`] without waiting for the answer (the collector stopped answering: see
/// `writer::detach`), and without blocking on a full socket.
pub fn bye_no_wait(status: i64) {
    send_bye(status, false);
}

fn send_bye(status: i64, wait: bool) {
    if !socket_still_ours() {
        return;
    }
    let (rss, hwm) = crate::meta::rss_and_hwm();
    let mut buf = [0u8; control::BYE_LEN];
    let n = Bye { rss_bytes: rss, hwm_bytes: hwm, status }.encode(&mut buf);
    // SAFETY: `SOCK_FD` is our socket (checked above).
    unsafe {
        let flags = libc::MSG_NOSIGNAL | if wait { 0 } else { libc::MSG_DONTWAIT };
        if libc::send(SOCK_FD, buf.as_ptr() as *const c_void, n, flags) < 0 {
            return;
        }
        if wait && WELCOME_FLAGS & control::WELCOME_WAIT_ON_EXIT != 0 {
            let mut ack = [0u8; 16];
            loop {
                let r = libc::recv(SOCK_FD, ack.as_mut_ptr() as *mut c_void, ack.len(), 0);
                if r < 0 && sys::errno() == libc::EINTR {
                    continue;
                }
                break;
            }
        }
    }
}

/// Close our control socket (fork child: it is the parent's connection).
pub fn close_socket() {
    // SAFETY: closing our own descriptor if it still is ours.
    unsafe {
        if socket_still_ours() {
            libc::close(SOCK_FD);
        }
        SOCK_FD = -1;
    }
}

// ---------------------------------------------------------------------------------------------
// Standalone mode: start `mtracer agent`.

static mut AGENT_PATH: FixedBuf<4096> = FixedBuf::new();
static mut OUTPUT_PATH: FixedBuf<4096> = FixedBuf::new();
static mut ARG_BUFS: [FixedBuf<64>; 4] = [const { FixedBuf::new() }; 4];
static mut AGENT_ARGV: [*const c_char; 16] = [core::ptr::null(); 16];
static mut AGENT_ENVP: [*const c_char; 1024] = [core::ptr::null(); 1024];

/// Find `mtracer`: `$MTRACE_COLLECTOR`, else next to this library, else `../bin/mtracer`.
fn find_agent() -> bool {
    // SAFETY: single-threaded initialisation owns these statics.
    let path = unsafe { &mut *core::ptr::addr_of_mut!(AGENT_PATH) };
    let executable = |p: &mut FixedBuf<4096>| {
        // SAFETY: NUL-terminated path.
        unsafe { libc::access(p.as_cstr_ptr(), libc::X_OK) == 0 }
    };
    if let Some(c) = getenv(c"MTRACE_COLLECTOR") {
        path.len = 0;
        path.push(c);
        return executable(path);
    }
    // SAFETY: Dl_info is plain pointers and integers; all-zero is a valid value.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr on the address of one of our functions.
    if unsafe { libc::dladdr(find_agent as *const c_void, &mut info) } == 0 || info.dli_fname.is_null() {
        return false;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the loader.
    let lib = unsafe { sys::cstr_bytes(info.dli_fname as *const u8) };
    let dir = match lib.iter().rposition(|&b| b == b'/') {
        Some(i) => &lib[..i],
        None => b".",
    };
    for tail in [&b"/mtracer"[..], b"/../bin/mtracer"] {
        path.len = 0;
        path.push(dir).push(tail);
        if executable(path) {
            return true;
        }
    }
    false
}

fn spawn_agent() -> Option<()> {
    if !find_agent() {
        sys::warn(&[b"no collector: run under `mtracer record`, or put `mtracer` next to libmtrace.so (or set MTRACE_COLLECTOR); running untraced"]);
        return None;
    }
    let pid = sys::getpid();
    // SAFETY: single-threaded initialisation owns these statics; raw calls only.
    unsafe {
        // The trace file: $MTRACE_OUTPUT, else ./mtrace.<pid>.mtr; made absolute for the message.
        let out = &mut *core::ptr::addr_of_mut!(OUTPUT_PATH);
        out.len = 0;
        let rel = getenv(c"MTRACE_OUTPUT");
        if rel.map_or(true, |r| r.first() != Some(&b'/')) {
            let mut cwd = [0u8; 4096];
            if !libc::getcwd(cwd.as_mut_ptr() as *mut c_char, cwd.len()).is_null() {
                out.push(sys::cstr_bytes(cwd.as_ptr())).push(b"/");
            }
        }
        match rel {
            Some(r) if !r.is_empty() => {
                out.push(r);
            }
            _ => {
                out.push(b"mtrace.").push_u64(pid as u64).push(b".mtr");
            }
        }
        // A listening socket in the abstract namespace, handed to the agent.
        let lfd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        if lfd < 0 {
            return None;
        }
        let addr = &mut *core::ptr::addr_of_mut!(SOCK_ADDR);
        addr.len = 0;
        addr.push(b"@mtrace-agent-").push_u64(pid as u64);
        let mut sa: libc::sockaddr_un = core::mem::zeroed();
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let name = &addr.as_bytes()[1..];
        for (i, b) in name.iter().enumerate() {
            sa.sun_path[i + 1] = *b as c_char;
        }
        let len = core::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
        if libc::bind(lfd, &sa as *const _ as *const libc::sockaddr, len as libc::socklen_t) != 0 || libc::listen(lfd, 128) != 0 {
            libc::close(lfd);
            // Someone took the name first (see `connect`): no agent of ours can be found there.
            sys::warn(&[b"cannot listen as ", addr.as_bytes(), b" (the name is taken); running untraced"]);
            return None;
        }
        // argv: mtracer agent --listen-fd N --pid P --output PATH
        let bufs = &mut *core::ptr::addr_of_mut!(ARG_BUFS);
        bufs[0].len = 0;
        bufs[0].push_u64(lfd as u64);
        bufs[1].len = 0;
        bufs[1].push_u64(pid as u64);
        let argv = &mut *core::ptr::addr_of_mut!(AGENT_ARGV);
        let agent = &mut *core::ptr::addr_of_mut!(AGENT_PATH);
        argv[0] = agent.as_cstr_ptr();
        argv[1] = c"agent".as_ptr();
        argv[2] = c"--listen-fd".as_ptr();
        argv[3] = bufs[0].as_cstr_ptr();
        argv[4] = c"--pid".as_ptr();
        argv[5] = bufs[1].as_cstr_ptr();
        argv[6] = c"--output".as_ptr();
        argv[7] = out.as_cstr_ptr();
        argv[8] = core::ptr::null();
        // envp: ours without LD_PRELOAD (the agent must not trace itself).
        let envp = &mut *core::ptr::addr_of_mut!(AGENT_ENVP);
        let mut k = 0;
        let mut e = ENVP;
        while !e.is_null() && !(*e).is_null() && k + 2 < envp.len() {
            let s = sys::cstr_bytes(*e as *const u8);
            if !s.starts_with(b"LD_PRELOAD=") && !s.starts_with(b"MTRACE_SOCK=") {
                envp[k] = *e;
                k += 1;
            }
            e = e.add(1);
        }
        envp[k] = c"MTRACE_DISABLE=1".as_ptr();
        envp[k + 1] = core::ptr::null();

        // Double fork with raw clone (no atfork handlers, no locks): the agent is reparented to
        // init, so the application never sees it as its child (no SIGCHLD, no stray wait()).
        let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as usize, 0usize, 0usize, 0usize, 0usize);
        if child == 0 {
            let grandchild = libc::syscall(libc::SYS_clone, libc::SIGCHLD as usize, 0usize, 0usize, 0usize, 0usize);
            if grandchild == 0 {
                libc::setsid();
                // Keep the application's stdout/stdin free (a pipe reader must see EOF when the
                // application exits); stderr stays for the agent's messages.
                let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if devnull >= 0 {
                    libc::dup2(devnull, 0);
                    libc::dup2(devnull, 1);
                    if devnull > 2 {
                        libc::close(devnull);
                    }
                }
                libc::fcntl(lfd, libc::F_SETFD, 0);
                libc::syscall(libc::SYS_execve, argv[0], argv.as_ptr(), envp.as_ptr());
                libc::syscall(libc::SYS_exit_group, 127);
            }
            libc::syscall(libc::SYS_exit_group, if grandchild > 0 { 0 } else { 1 });
        }
        if child < 0 {
            libc::close(lfd);
            return None;
        }
        let mut status: c_int = 0;
        while libc::syscall(libc::SYS_wait4, child, &mut status as *mut c_int, 0, 0usize) < 0 && sys::errno() == libc::EINTR {}
        libc::close(lfd);
        if status != 0 {
            sys::warn(&[b"cannot start the collector agent; running untraced"]);
            return None;
        }
        sys::warn(&[b"recording to ", out.as_bytes()]);
    }
    Some(())
}

/// Current image id (for fork children).
pub fn image_id() -> u64 {
    // SAFETY: plain read of a value written at registration.
    unsafe { IMAGE_ID }
}

/// Fork child: drop the parent's mapping.
pub fn unmap_parent_ring() {
    // SAFETY: the mapping is the parent's ring, unused by this (single-threaded) child now.
    unsafe {
        let (b, l) = MAPPING;
        if b != 0 {
            sys::munmap(b as *mut c_void, l);
        }
        MAPPING = (0, 0);
    }
    writer::STATE.store(writer::PREINIT, Ordering::Release);
}
