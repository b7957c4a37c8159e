//! The control socket: traced process images connect, say Hello, get a ring (a memfd passed with
//! SCM_RIGHTS), and later say Bye or just disappear. See `mtrace_protocol::control`.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use mtrace_protocol::control::{self, Bye, HelloFixed, Welcome};
use mtrace_protocol::ring::Geometry;
use crate::trace::{ProcessStart, Record};
use nix::sys::socket::{self, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};

use super::Shared;
use super::image::Image;

/// Create the listening socket. `name` is an abstract-namespace name (no leading NUL).
pub fn listen_abstract(name: &str) -> Result<OwnedFd> {
    // Non-blocking: the accept loop takes every pending connection and must not wait for more.
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)
        .context("creating the control socket")?;
    let addr = UnixAddr::new_abstract(name.as_bytes()).context("naming the control socket")?;
    socket::bind(fd.as_raw_fd(), &addr).context("binding the control socket")?;
    socket::listen(&fd, Backlog::new(128).unwrap()).context("listening on the control socket")?;
    Ok(fd)
}

enum ConnState {
    AwaitingHello,
    Registered(Arc<Image>),
}

struct Conn {
    fd: OwnedFd,
    state: ConnState,
}

/// Runs the accept/handshake loop until `shared.stop_control` is set.
pub struct Server {
    /// The socket we were given, then the `@mtrace-agent-<pid>` aliases (standalone agent).
    listeners: Vec<OwnedFd>,
    aliased: std::collections::HashSet<u32>,
    conns: Vec<Conn>,
    buf: Vec<u8>,
    trust: Trust,
    /// Connections refused so far (see [`Trust`]).
    refused: u64,
}

/// Who may register (checked on `SO_PEERCRED` as a connection is accepted, before anything is
/// read from it): a process of the recorder's own user; and, when the recorder runs as root, a
/// process of another user that descends from the command it traces (a service dropping its
/// privileges). Nobody else: a refused peer gets no ring, and nothing it sends is read.
///
/// A process of our own user is not required to descend from the command: it could read our
/// memory with ptrace anyway, so the check would protect nothing, and it would lose daemons that
/// re-parent themselves to init.
pub struct Trust {
    pub uid: u32,
    /// The traced command (`record`) or the process that started the agent; descendants of
    /// these, or of the recorder itself (the subreaper of the command's orphans), may register.
    pub anchors: Vec<u32>,
}

impl Trust {
    pub fn of(anchors: Vec<u32>) -> Trust {
        // SAFETY: geteuid cannot fail.
        Trust { uid: unsafe { libc::geteuid() }, anchors }
    }

    fn admits(&self, uid: u32, pid: u32) -> bool {
        uid == self.uid || (self.uid == 0 && descends_from(pid, &self.anchors))
    }
}

/// Does `pid` descend from one of `anchors` or from this process (by `/proc/<pid>/stat`'s parent
/// links, at most 256 up)?
fn descends_from(pid: u32, anchors: &[u32]) -> bool {
    let me = std::process::id();
    let mut p = pid;
    for _ in 0..256 {
        if anchors.contains(&p) || p == me {
            return true;
        }
        match parent_of(p) {
            Some(pp) if pp > 1 => p = pp,
            _ => return false,
        }
    }
    false
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses; it ends at the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

impl Server {
    /// Serve `listener` (made non-blocking and close-on-exec here).
    pub fn new(listener: OwnedFd, trust: Trust) -> Server {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fd = listener.as_raw_fd();
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        Server { listeners: vec![listener], aliased: Default::default(), conns: Vec::new(), buf: vec![0u8; 256 << 10], trust, refused: 0 }
    }

    /// Also listen as `@mtrace-agent-<pid>` (once per pid; a name already taken is skipped).
    fn alias(&mut self, pid: u32) {
        if self.aliased.insert(pid) {
            if let Ok(fd) = listen_abstract(&format!("mtrace-agent-{pid}")) {
                self.listeners.push(fd);
            }
        }
    }

    /// Connections that have not said Hello yet (a process in the middle of registering).
    pub fn pending(&self) -> usize {
        self.conns.iter().filter(|c| matches!(c.state, ConnState::AwaitingHello)).count()
    }

    /// One round: wait up to `timeout_ms` for activity and handle it.
    pub fn poll_once(&mut self, shared: &Shared, timeout_ms: i32) {
        let nl = self.listeners.len();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.conns.len() + nl);
        for l in &self.listeners {
            fds.push(libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        for c in &self.conns {
            fds.push(libc::pollfd { fd: c.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n <= 0 {
            return;
        }
        for (li, p) in fds.iter().enumerate().take(nl) {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            while let Ok(fd) = socket::accept4(self.listeners[li].as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK) {
                // SAFETY: accept4 returned a new descriptor that nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let why = match socket::getsockopt(&fd, socket::sockopt::PeerCredentials) {
                    Ok(c) if self.trust.admits(c.uid(), c.pid() as u32) => {
                        self.conns.push(Conn { fd, state: ConnState::AwaitingHello });
                        continue;
                    }
                    Ok(c) => format!("pid {} of uid {}: not this user's, nor a process of the traced command", c.pid(), c.uid()),
                    Err(e) => format!("a peer whose credentials cannot be read ({e})"),
                };
                // Closed unread: whatever it sent, or would, never reaches the trace. The first
                // few are noted (in the trace and on stderr), the rest only counted.
                self.refused += 1;
                if self.refused <= 8 {
                    eprintln!("mtracer: refused a connection from {why}");
                    shared.note(None, &format!("refused a connection from {why}"));
                }
            }
        }
        let mut closed = Vec::new();
        for (i, p) in fds.iter().enumerate().skip(nl) {
            if p.revents == 0 {
                continue;
            }
            let ci = i - nl;
            loop {
                match socket::recv(self.conns[ci].fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                    Ok(0) => {
                        closed.push(ci);
                        break;
                    }
                    Ok(len) => {
                        let msg = self.buf[..len].to_vec();
                        if !self.handle(shared, ci, &msg) {
                            closed.push(ci);
                            break;
                        }
                    }
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => {
                        closed.push(ci);
                        break;
                    }
                }
            }
        }
        closed.sort_unstable();
        closed.dedup();
        for ci in closed.into_iter().rev() {
            let c = self.conns.swap_remove(ci);
            if let ConnState::Registered(img) = c.state {
                img.disconnected.store(true, Ordering::Release);
            }
        }
    }

    /// Handle one message; `false` closes the connection.
    fn handle(&mut self, shared: &Shared, ci: usize, msg: &[u8]) -> bool {
        match &self.conns[ci].state {
            ConnState::AwaitingHello => match self.hello(shared, ci, msg) {
                Ok(Some(img)) => {
                    self.conns[ci].state = ConnState::Registered(img);
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    shared.note(None, &format!("registration failed: {e:#}"));
                    false
                }
            },
            ConnState::Registered(img) => {
                if let Some(bye) = Bye::decode(msg) {
                    *img.bye.lock().unwrap() = Some(bye);
                    // The last smaps sample, as late as can be (see `smaps`): before the ack a
                    // waiting process needs to go on exiting.
                    if !shared.opts.smaps_period.is_zero() {
                        super::smaps::sample_and_send(shared, img);
                    }
                    if shared.opts.wait_on_exit {
                        img.ack_wanted.store(true, Ordering::Release);
                    }
                }
                true
            }
        }
    }

    fn hello(&mut self, shared: &Shared, ci: usize, msg: &[u8]) -> Result<Option<Arc<Image>>> {
        let fd = self.conns[ci].fd.as_fd();
        let Some((h, _meta)) = HelloFixed::decode(msg) else {
            refuse(fd, "malformed Hello");
            return Ok(None);
        };
        if h.version != control::PROTOCOL_VERSION {
            refuse(fd, &format!("protocol version {} (this mtracer speaks {})", h.version, control::PROTOCOL_VERSION));
            return Ok(None);
        }
        let creds = socket::getsockopt(&fd, socket::sockopt::PeerCredentials).context("reading peer credentials")?;
        let pid = creds.pid() as u32;
        if shared.stopping() {
            refuse(fd, "the recording is stopping");
            return Ok(None);
        }
        let held = shared.images.lock().unwrap().len();
        if held >= shared.opts.max_rings as usize {
            let why = format!(
                "the recorder holds its limit of {held} rings ({} MiB of shared memory; raise it with --max-rings): pid {pid} runs untraced",
                (held as u64 * shared.opts.ring_size) >> 20
            );
            eprintln!("mtracer: {why}");
            shared.note(None, &why);
            refuse(fd, &why);
            return Ok(None);
        }
        let geo = Geometry::new(shared.opts.ring_size, shared.opts.block_size).context("ring geometry")?;
        let memfd = nix::sys::memfd::memfd_create(c"mtrace-ring", nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING).context("creating the ring memfd")?;
        let id = shared.next_image.fetch_add(1, Ordering::Relaxed);
        // The ordering cells' table: a page-aligned range below the top of user space, or ignored.
        let order_table = h.order_cells().map(|(a, bits)| (a, 8u64 << bits.min(40))).filter(|&(a, len)| a % 4096 == 0 && a.checked_add(len).is_some_and(|e| e <= 1 << 47));
        let img = Arc::new(Image::new(id, pid, geo, shared.opts.lossy, shared.opts.detach_timeout_ms, &memfd, order_table)?);
        *img.conn.lock().unwrap() = Some(self.conns[ci].fd.try_clone()?);

        // Who is the parent? A fork child names it; an exec replaces the image with our pid;
        // otherwise the newest image of the parent pid.
        let parent = {
            let images = shared.images.lock().unwrap();
            if h.origin == control::Origin::Fork as u32 {
                Some(h.parent_image as u32)
            } else if let Some(old) = images.iter().rev().find(|i| i.pid == pid && !i.superseded.load(Ordering::Acquire)) {
                old.superseded.store(true, Ordering::Release);
                Some(old.id)
            } else {
                shared.last_image_of_pid(&images, h.ppid)
            }
        };
        shared.sink.send(&Record::ProcessStart(ProcessStart {
            image: id,
            pid,
            ppid: h.ppid,
            parent_image: parent,
            origin: h.origin,
            fork_seq: h.fork_seq,
            time_ns: crate::clock::now_ns(),
            hello: msg.to_vec(),
        }));
        shared.remember_pid(pid, id);

        let mut flags = 0;
        if shared.opts.lossy {
            flags |= control::WELCOME_LOSSY;
        }
        if shared.opts.wait_on_exit {
            flags |= control::WELCOME_WAIT_ON_EXIT;
        }
        // Before the process can run on (and fork or exec), its alias must exist.
        if shared.opts.pid_aliases {
            self.alias(pid);
        }
        let fd = self.conns[ci].fd.as_fd();
        let mut out = [0u8; control::WELCOME_LEN];
        let n = Welcome { version: control::PROTOCOL_VERSION, flags, image_id: id as u64, ring_size: geo.total_size }.encode(&mut out);
        let fds = [memfd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        socket::sendmsg::<()>(fd.as_raw_fd(), &[IoSlice::new(&out[..n])], &cmsg, MsgFlags::MSG_NOSIGNAL, None).context("sending Welcome")?;
        shared.images.lock().unwrap().push(img.clone());
        Ok(Some(img))
    }
}

fn refuse(fd: BorrowedFd<'_>, why: &str) {
    let mut out = vec![0u8; control::WELCOME_LEN];
    Welcome { version: control::PROTOCOL_VERSION, flags: 0, image_id: 0, ring_size: 0 }.encode(&mut out);
    out.extend_from_slice(why.as_bytes());
    let _ = socket::send(fd.as_raw_fd(), &out, MsgFlags::MSG_NOSIGNAL);
}

/// Send ByeAck on a connection (the image's events are on disk).
pub fn send_bye_ack(fd: RawFd) {
    let _ = socket::send(fd, &control::BYE_ACK_MAGIC.to_le_bytes(), MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT);
}
