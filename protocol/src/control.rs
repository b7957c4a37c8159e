//! The control socket handshake between a traced process image and the collector.
//!
//! Transport: a unix `SOCK_SEQPACKET` socket whose address is in `MTRACE_SOCK` (a leading `@`
//! means the abstract namespace). One connection per process image; its EOF tells the collector
//! the image is gone (exit, crash, SIGKILL or exec).
//!
//! ```text
//! preload                                   collector
//!    ── Hello (fixed part + metadata TLVs) ──▶
//!    ◀── Welcome (+ memfd by SCM_RIGHTS) ────   (or Welcome with ring_size 0 and a reason)
//!        … events flow through the ring …
//!    ── Bye (at exit, optional) ─────────────▶
//!    ◀── ByeAck (only if Welcome asked) ─────   everything published so far is on disk
//! ```
//!
//! Messages are little-endian. Metadata is a sequence of TLVs `[tag u16][len u32][bytes]`.

pub const PROTOCOL_VERSION: u32 = 2;

pub const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"MTRH");
pub const WELCOME_MAGIC: u32 = u32::from_le_bytes(*b"MTRW");
pub const BYE_MAGIC: u32 = u32::from_le_bytes(*b"MTRB");
pub const BYE_ACK_MAGIC: u32 = u32::from_le_bytes(*b"MTRA");

/// Environment variable naming the collector's socket.
pub const ENV_SOCK: &str = "MTRACE_SOCK";
/// Output path used by the agent the preload starts when no collector is named.
pub const ENV_OUTPUT: &str = "MTRACE_OUTPUT";
/// Path of the `mtracer` binary the preload starts in standalone mode.
pub const ENV_COLLECTOR: &str = "MTRACE_COLLECTOR";
/// `MTRACE_DISABLE=1`: the preload forwards every call and records nothing.
pub const ENV_DISABLE: &str = "MTRACE_DISABLE";

/// How a process image came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Origin {
    /// A program start (the launched command, or an exec'd image).
    Start = 0,
    /// The child of a `fork()` in a traced image; it inherits its parent's heap.
    Fork = 1,
}

/// Fixed part of Hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloFixed {
    pub version: u32,
    pub origin: u32,
    pub pid: u32,
    pub ppid: u32,
    /// For `Origin::Fork`: the parent's image id (from its Welcome).
    pub parent_image: u64,
    /// For `Origin::Fork`: the sequence number of the parent's `Fork` event.
    pub fork_seq: u64,
    /// Where this image's ordering cells are (see [`crate::order`]): the table's page-aligned
    /// address with the log2 of its number of cells in the low 12 bits; 0 if it has none.
    pub order_table: u64,
    pub flags: u64,
}

pub const HELLO_FIXED_LEN: usize = 48;

impl HelloFixed {
    /// The ordering cell table: (address, log2 of its cells), if the image has one.
    pub fn order_cells(&self) -> Option<(u64, u32)> {
        (self.order_table != 0).then_some((self.order_table & !0xfff, (self.order_table & 0xfff) as u32))
    }
}

/// Hello flags.
pub const HELLO_GLIBC_CHUNKS: u64 = 1; // chunk headers are read (real malloc is glibc's)
pub const HELLO_HEAP_INFO: u64 = 2; // thread-arena heap_info is read
pub const HELLO_ORDER: u64 = 4; // ordering cells are written (see `order`)
pub const HELLO_META_TRUNCATED: u64 = 8; // metadata did not fit; some TLVs are missing

/// Metadata tags.
pub mod tag {
    pub const EXE: u16 = 1;
    pub const ARG: u16 = 2;
    /// `NAME=VALUE` of a malloc-related variable (`MALLOC_*`, `GLIBC_TUNABLES`, `LD_PRELOAD`).
    pub const ENV: u16 = 3;
    pub const GLIBC_VERSION: u16 = 4;
    pub const PAGE_SIZE: u16 = 5;
    pub const NCPUS: u16 = 6;
    pub const START_REALTIME_NS: u16 = 7;
    pub const START_MONOTONIC_NS: u16 = 8;
    /// The kernel's `start_brk`: where the brk heap begins.
    pub const START_BRK: u16 = 9;
    /// Object that provides the real `malloc` (e.g. `/lib/x86_64-linux-gnu/libc.so.6`).
    pub const ALLOCATOR: u16 = 10;
    /// A loaded module: `[base u64][path bytes]`.
    pub const MODULE: u16 = 11;
    pub const CWD: u16 = 12;
    /// The program break when the preload initialised.
    pub const BRK_AT_INIT: u16 = 13;
}

impl HelloFixed {
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let mut w = Writer::new(out);
        w.u32(HELLO_MAGIC);
        w.u32(self.version);
        w.u32(self.origin);
        w.u32(self.pid);
        w.u32(self.ppid);
        w.u32(0);
        w.u64(self.parent_image);
        w.u64(self.fork_seq);
        w.u64(self.order_table);
        w.u64(self.flags);
        debug_assert_eq!(w.pos, HELLO_FIXED_LEN + 8);
        w.pos
    }

    /// Parse the fixed part; returns it and the metadata bytes that follow.
    pub fn decode(msg: &[u8]) -> Option<(HelloFixed, &[u8])> {
        let mut r = Reader::new(msg);
        if r.u32()? != HELLO_MAGIC {
            return None;
        }
        let version = r.u32()?;
        let origin = r.u32()?;
        let pid = r.u32()?;
        let ppid = r.u32()?;
        r.u32()?;
        let h = HelloFixed {
            version,
            origin,
            pid,
            ppid,
            parent_image: r.u64()?,
            fork_seq: r.u64()?,
            order_table: r.u64()?,
            flags: r.u64()?,
        };
        Some((h, &msg[r.pos..]))
    }
}

/// Welcome flags.
pub const WELCOME_LOSSY: u32 = 1;
/// The preload waits for ByeAck at exit (standalone mode: the trace is complete on exit).
pub const WELCOME_WAIT_ON_EXIT: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u32,
    pub flags: u32,
    pub image_id: u64,
    /// 0: tracing refused (see the reason that follows the fixed part).
    pub ring_size: u64,
}

pub const WELCOME_LEN: usize = 32;

impl Welcome {
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let mut w = Writer::new(out);
        w.u32(WELCOME_MAGIC);
        w.u32(self.version);
        w.u32(self.flags);
        w.u32(0);
        w.u64(self.image_id);
        w.u64(self.ring_size);
        w.pos
    }
    pub fn decode(msg: &[u8]) -> Option<(Welcome, &[u8])> {
        let mut r = Reader::new(msg);
        if r.u32()? != WELCOME_MAGIC {
            return None;
        }
        let version = r.u32()?;
        let flags = r.u32()?;
        r.u32()?;
        let w = Welcome { version, flags, image_id: r.u64()?, ring_size: r.u64()? };
        Some((w, &msg[r.pos..]))
    }
}

/// Sent by the preload when its image ends normally (exit / `_exit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bye {
    /// Resident bytes at exit (statm), 0 if unknown.
    pub rss_bytes: u64,
    /// Peak resident bytes (VmHWM), 0 if unknown.
    pub hwm_bytes: u64,
    /// The status passed to `_exit`, or -1 when leaving through `exit`'s destructors.
    pub status: i64,
}

pub const BYE_LEN: usize = 32;

impl Bye {
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let mut w = Writer::new(out);
        w.u32(BYE_MAGIC);
        w.u32(0);
        w.u64(self.rss_bytes);
        w.u64(self.hwm_bytes);
        w.u64(self.status as u64);
        w.pos
    }
    pub fn decode(msg: &[u8]) -> Option<Bye> {
        let mut r = Reader::new(msg);
        if r.u32()? != BYE_MAGIC {
            return None;
        }
        r.u32()?;
        Some(Bye { rss_bytes: r.u64()?, hwm_bytes: r.u64()?, status: r.u64()? as i64 })
    }
}

/// A bounded little-endian writer that never panics: writes past the end are dropped and
/// remembered in `overflow`.
pub struct Writer<'a> {
    pub buf: &'a mut [u8],
    pub pos: usize,
    pub overflow: bool,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, pos: 0, overflow: false }
    }
    pub fn bytes(&mut self, b: &[u8]) {
        if self.buf.len() - self.pos < b.len() {
            self.overflow = true;
            return;
        }
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes())
    }
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes())
    }
    /// Append one TLV; all or nothing.
    pub fn tlv(&mut self, tag: u16, value: &[u8]) -> bool {
        self.tlv2(tag, &[], value)
    }
    /// Append one TLV whose value is `a ++ b`; all or nothing.
    pub fn tlv2(&mut self, tag: u16, a: &[u8], b: &[u8]) -> bool {
        let n = a.len() + b.len();
        if self.buf.len() - self.pos < 6 + n {
            self.overflow = true;
            return false;
        }
        self.u16(tag);
        self.u32(n as u32);
        self.bytes(a);
        self.bytes(b);
        true
    }
    pub fn tlv_u64(&mut self, tag: u16, v: u64) -> bool {
        self.tlv(tag, &v.to_le_bytes())
    }
}

/// A bounds-checked little-endian reader.
pub struct Reader<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return None;
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Some(s)
    }
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// Iterate over TLVs. Stops (yielding `Err(offset)`) at the first malformed one.
pub struct Tlvs<'a> {
    r: Reader<'a>,
    failed: bool,
}

impl<'a> Tlvs<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Tlvs { r: Reader::new(buf), failed: false }
    }
}

impl<'a> Iterator for Tlvs<'a> {
    type Item = Result<(u16, &'a [u8]), usize>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.r.remaining() == 0 {
            return None;
        }
        let at = self.r.pos;
        let item = (|| {
            let tag = self.r.u16()?;
            let len = self.r.u32()? as usize;
            Some((tag, self.r.take(len)?))
        })();
        match item {
            Some(t) => Some(Ok(t)),
            None => {
                self.failed = true;
                Some(Err(at))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip_with_metadata() {
        let mut buf = [0u8; 256];
        let h = HelloFixed {
            version: PROTOCOL_VERSION,
            origin: Origin::Fork as u32,
            pid: 10,
            ppid: 9,
            parent_image: 3,
            fork_seq: 2,
            order_table: 0x7f00_0000_0000 | 21,
            flags: HELLO_ORDER,
        };
        let n = h.encode(&mut buf);
        let mut w = Writer::new(&mut buf[n..]);
        assert!(w.tlv(tag::EXE, b"/bin/true"));
        assert!(w.tlv_u64(tag::PAGE_SIZE, 4096));
        let m = w.pos;
        let (d, meta) = HelloFixed::decode(&buf[..n + m]).unwrap();
        assert_eq!(d, h);
        let tlvs: Vec<_> = Tlvs::new(meta).collect();
        assert_eq!(tlvs, vec![Ok((tag::EXE, &b"/bin/true"[..])), Ok((tag::PAGE_SIZE, &4096u64.to_le_bytes()[..]))]);
    }

    #[test]
    fn writer_never_overflows() {
        let mut buf = [0u8; 10];
        let mut w = Writer::new(&mut buf);
        assert!(!w.tlv(1, b"this is longer than ten bytes"));
        assert!(w.overflow);
        assert_eq!(w.pos, 0);
        assert!(w.tlv(1, b"abcd"));
        assert_eq!(w.pos, 10);
    }

    #[test]
    fn malformed_tlv_is_reported_once() {
        let bad = [1u8, 0, 100, 0, 0, 0, 1, 2];
        let v: Vec<_> = Tlvs::new(&bad).collect();
        assert_eq!(v, vec![Err(0)]);
    }
}
