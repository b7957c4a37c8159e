//! Metadata of a recording session and of each process image, decoded from the trace.

use mtrace_protocol::control::{self, tag, HelloFixed, Tlvs};
use crate::trace::session_tag;
use serde::Serialize;

/// What `mtracer record` wrote about itself.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionMeta {
    pub mtracer_version: String,
    pub command: Vec<String>,
    pub start_realtime_ns: u64,
    pub start_monotonic_ns: u64,
    pub sample_period_ns: u64,
    /// Period of the `Smaps` samples (0: none, or a trace older than them).
    pub smaps_period_ns: u64,
    pub lossy: bool,
    pub hostname: String,
}

impl SessionMeta {
    pub fn parse(tlvs: &[u8]) -> SessionMeta {
        let mut m = SessionMeta::default();
        for (t, v) in Tlvs::new(tlvs).flatten() {
            match t {
                session_tag::MTRACER_VERSION => m.mtracer_version = lossy(v),
                session_tag::COMMAND_ARG => m.command.push(lossy(v)),
                session_tag::START_REALTIME_NS => m.start_realtime_ns = u64le(v),
                session_tag::START_MONOTONIC_NS => m.start_monotonic_ns = u64le(v),
                session_tag::SAMPLE_PERIOD_NS => m.sample_period_ns = u64le(v),
                session_tag::SMAPS_PERIOD_NS => m.smaps_period_ns = u64le(v),
                session_tag::LOSSY => m.lossy = v.first() == Some(&1),
                session_tag::HOSTNAME => m.hostname = lossy(v),
                _ => {}
            }
        }
        m
    }
}

/// A loaded module (for symbolisation).
#[derive(Clone, Debug, Serialize)]
pub struct Module {
    pub base: u64,
    pub path: String,
}

/// What a process image told us when it registered.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessMeta {
    pub exe: String,
    pub args: Vec<String>,
    pub cwd: String,
    /// `NAME=VALUE` of malloc-related variables.
    pub env: Vec<String>,
    pub glibc_version: String,
    pub page_size: u64,
    pub ncpus: u64,
    pub start_realtime_ns: u64,
    pub start_monotonic_ns: u64,
    /// Where the brk heap begins (kernel `start_brk`), 0 if unknown.
    pub start_brk: u64,
    pub brk_at_init: u64,
    pub allocator: String,
    #[serde(skip)]
    pub modules: Vec<Module>,
    /// The preload read glibc chunk headers.
    pub glibc_chunks: bool,
    pub heap_info: bool,
    /// The image has ordering cells (see `mtrace_protocol::order`): cross-thread order is exact.
    pub order_cells: bool,
    /// Where they are: (address, bytes), for leaving them out of the RSS.
    #[serde(skip)]
    pub order_table: Option<(u64, u64)>,
    pub metadata_truncated: bool,
}

impl ProcessMeta {
    /// Decode a Hello message. Returns `None` if its fixed part is malformed.
    pub fn from_hello(hello: &[u8]) -> Option<(HelloFixed, ProcessMeta)> {
        let (fixed, meta) = HelloFixed::decode(hello)?;
        let mut m = ProcessMeta {
            glibc_chunks: fixed.flags & control::HELLO_GLIBC_CHUNKS != 0,
            heap_info: fixed.flags & control::HELLO_HEAP_INFO != 0,
            order_cells: fixed.flags & control::HELLO_ORDER != 0,
            metadata_truncated: fixed.flags & control::HELLO_META_TRUNCATED != 0,
            order_table: fixed.order_cells().map(|(a, bits)| (a, 8u64 << bits.min(40))),
            ..Default::default()
        };
        for (t, v) in Tlvs::new(meta).flatten() {
            match t {
                tag::EXE => m.exe = lossy(v),
                tag::ARG => m.args.push(lossy(v)),
                tag::CWD => m.cwd = lossy(v),
                tag::ENV => m.env.push(lossy(v)),
                tag::GLIBC_VERSION => m.glibc_version = lossy(v),
                tag::PAGE_SIZE => m.page_size = u64le(v),
                tag::NCPUS => m.ncpus = u64le(v),
                tag::START_REALTIME_NS => m.start_realtime_ns = u64le(v),
                tag::START_MONOTONIC_NS => m.start_monotonic_ns = u64le(v),
                tag::START_BRK => m.start_brk = u64le(v),
                tag::BRK_AT_INIT => m.brk_at_init = u64le(v),
                tag::ALLOCATOR => m.allocator = lossy(v),
                tag::MODULE if v.len() >= 8 => m.modules.push(Module { base: u64le(&v[..8]), path: lossy(&v[8..]) }),
                _ => {}
            }
        }
        Some((fixed, m))
    }

    /// A fork child's metadata: its parent's, with the child's own start time and break.
    pub fn inherit(&mut self, parent: &ProcessMeta) {
        let (rt, mono, brk) = (self.start_realtime_ns, self.start_monotonic_ns, self.brk_at_init);
        let (table, chunks, heap_info, cells) = (self.order_table, self.glibc_chunks, self.heap_info, self.order_cells);
        *self = parent.clone();
        self.start_realtime_ns = rt;
        self.start_monotonic_ns = mono;
        self.brk_at_init = brk;
        self.order_table = table;
        self.glibc_chunks = chunks;
        self.heap_info = heap_info;
        self.order_cells = cells;
    }
}

fn lossy(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn u64le(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    u64::from_le_bytes(b)
}
