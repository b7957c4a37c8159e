//! Synthetic traces: small, fully deterministic trace files built record by record with the
//! collector's own writer — a recording with two threads, a fork child, stacks, a module, an
//! mmapped chunk, a thread arena, `malloc_trim` with its `mallinfo2` checkpoints, RSS and smaps
//! samples, spread over many frames. The fuzz harness mutates it (and recorded traces), and the
//! regression tests rebuild each crashing input from it and a recipe, byte for byte.

use mtrace_collector::trace::{Chunk, MapKind, Mapping, ProcessEnd, ProcessStart, Record, TraceWriter, end_reason, session_tag};
use mtrace_protocol::control::{self, HelloFixed, Origin, tag};
use mtrace_protocol::event::{self, EventKind, Mallinfo2, MallinfoReason, chunk, header};
use mtrace_protocol::order;

/// Where the synthetic brk heap starts.
pub const HEAP: u64 = 0x5555_5555_9000;
/// The synthetic thread arena's heap.
pub const ARENA_HEAP: u64 = 0x7f00_0000_0000;
/// The synthetic executable's load bias.
pub const BIAS: u64 = 0x5555_5555_4000;
/// The one stack id the synthetic allocations carry.
pub const STACK: u64 = 0xabc0_0000_0000_0001;
/// Start of the synthetic clock.
pub const T0: u64 = 1_000_000_000;
/// malloc/free pairs of the main thread's loop.
pub const CHURN: u64 = 1500;

/// A thread's event words, built call by call.
#[derive(Default)]
struct Words(Vec<u64>);

impl Words {
    fn ev(&mut self, words: &[u64]) -> &mut Self {
        self.0.extend_from_slice(words);
        self
    }
    fn time(&mut self, t: u64) -> &mut Self {
        self.ev(&[header(EventKind::Time, 2, 0), t])
    }
    fn malloc(&mut self, kind: EventKind, ptr: u64, size: u64, chunk_hdr: u64) -> &mut Self {
        self.ev(&[header(kind, 4, chunk_hdr | event::AUX_HAS_STACK), ptr, size, STACK])
    }
    fn free(&mut self, ptr: u64, chunk_hdr: u64) -> &mut Self {
        self.ev(&[header(EventKind::Free, 2, chunk_hdr), ptr])
    }
    fn free_after(&mut self, ptr: u64, chunk_hdr: u64, after: u64) -> &mut Self {
        self.ev(&[header(EventKind::Free, 3, chunk_hdr | event::AUX_HAS_AFTER), ptr, after])
    }
    fn mallinfo(&mut self, reason: MallinfoReason, mi: Mallinfo2, clock: u64) -> &mut Self {
        self.ev(&mi.encode(reason, clock))
    }
}

/// The chunk header glibc writes for a heap request of `n` bytes.
fn heap_chunk(n: u64) -> u64 {
    chunk::request2size(n) | chunk::PREV_INUSE
}

/// A Hello as the preload sends it: fixed part and metadata.
fn hello(pid: u32, ppid: u32, origin: Origin, parent_image: u64, fork_seq: u64, start_ns: u64) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let fixed = HelloFixed {
        version: control::PROTOCOL_VERSION,
        origin: origin as u32,
        pid,
        ppid,
        parent_image,
        fork_seq,
        order_table: 0x7ff0_0000_0000 | 10,
        flags: control::HELLO_GLIBC_CHUNKS | control::HELLO_HEAP_INFO | control::HELLO_ORDER,
    };
    let n = fixed.encode(&mut buf);
    let mut w = control::Writer::new(&mut buf[n..]);
    w.tlv(tag::EXE, b"/nonexistent/synth");
    w.tlv(tag::ARG, b"synth");
    w.tlv(tag::ARG, b"--fuzz");
    w.tlv(tag::CWD, b"/");
    w.tlv(tag::ENV, b"MALLOC_ARENA_MAX=2");
    w.tlv(tag::GLIBC_VERSION, b"2.36");
    w.tlv_u64(tag::PAGE_SIZE, 4096);
    w.tlv_u64(tag::NCPUS, 2);
    w.tlv_u64(tag::START_MONOTONIC_NS, start_ns);
    w.tlv_u64(tag::START_BRK, HEAP);
    w.tlv_u64(tag::BRK_AT_INIT, HEAP + 0x21000);
    w.tlv(tag::ALLOCATOR, b"/lib/x86_64-linux-gnu/libc.so.6");
    let m = w.pos;
    buf.truncate(n + m);
    buf
}

fn session() -> Record {
    let mut buf = vec![0u8; 512];
    let mut w = control::Writer::new(&mut buf);
    w.tlv(session_tag::MTRACER_VERSION, b"synth");
    w.tlv(session_tag::COMMAND_ARG, b"synth");
    w.tlv_u64(session_tag::START_MONOTONIC_NS, T0);
    w.tlv_u64(session_tag::SAMPLE_PERIOD_NS, 10_000_000);
    w.tlv_u64(session_tag::SMAPS_PERIOD_NS, 100_000_000);
    let n = w.pos;
    buf.truncate(n);
    Record::Session(buf)
}

fn chunk_rec(image: u32, stream: u32, tid: u32, block_seq: u32, offset: u32, words: Vec<u64>) -> Record {
    Record::Chunk(Chunk { image, stream, tid, block_seq, offset, words })
}

/// The module and stack definitions a thread sends first.
fn definitions(w: &mut Words) {
    let mut m = [0u64; event::MAX_EVENT_WORDS];
    let n = event::encode_module(BIAS, BIAS + 0x1000, BIAS + 0x9000, &[0xde, 0xad, 0xbe, 0xef], b"/nonexistent/synth", &mut m);
    w.ev(&m[..n]);
    w.ev(&[header(EventKind::Stack, 5, 3), STACK, BIAS + 0x1234, BIAS + 0x2345, BIAS + 0x3456]);
}

fn mi(arena: u64, uord: u64) -> Mallinfo2 {
    Mallinfo2 { arena, ordblks: 1, uordblks: uord, fordblks: arena - uord, keepcost: arena - uord, ..Default::default() }
}

/// The main thread's words, in three chunks; `cut`: the second thread's position at the fork.
/// Also returns the word offset of its realloc (whose old block the second thread frees).
fn main_thread(cut: u64) -> ([Vec<u64>; 3], u32) {
    let mut a = Words::default();
    a.time(T0 + 1_000_000);
    definitions(&mut a);
    a.ev(&[header(EventKind::ProgramBreak, 2, event::PROGRAM_BREAK_FRESH), HEAP + 0x21000]);
    a.mallinfo(MallinfoReason::Start, mi(0x21000, 0x290), T0 + 1_000_000);
    a.malloc(EventKind::Malloc, HEAP + 0x2a0, 100, heap_chunk(100));
    a.malloc(EventKind::Calloc, HEAP + 0x310, 4000, heap_chunk(4000));
    a.time(T0 + 2_000_000);
    let realloc_at = a.0.len() as u32;
    // realloc of the first block, moved past the second.
    a.ev(&[
        header(EventKind::Realloc, 6, heap_chunk(300) | event::AUX_HAS_STACK),
        HEAP + 0x2a0,
        HEAP + 0x12c0,
        300,
        heap_chunk(100),
        STACK,
    ]);
    a.ev(&[header(EventKind::Memalign, 5, heap_chunk(300 + 64) | event::AUX_HAS_STACK), HEAP + 0x1400, 300, 64, STACK]);
    let mut b = Words::default();
    b.time(T0 + 3_000_000);
    // An mmapped chunk: 200000 bytes in a 0x31000-byte mapping.
    let mmapped = 0x31000 | chunk::IS_MMAPPED | event::AUX_HAS_PREV_SIZE | event::AUX_HAS_STACK;
    b.ev(&[header(EventKind::Malloc, 5, mmapped), 0x7f10_0000_0010, 200_000, 0, STACK]);
    b.free(HEAP + 0x310, heap_chunk(4000));
    b.mallinfo(MallinfoReason::BeforeTrim, mi(0x21000, 0x6b0), T0 + 3_000_000);
    b.ev(&[header(EventKind::MallocTrim, 2, 1), 0]);
    b.mallinfo(MallinfoReason::AfterTrim, mi(0x2000, 0x6b0), T0 + 3_100_000);
    b.ev(&[header(EventKind::ProgramBreak, 2, 0), HEAP + 0x2000]);
    b.ev(&[header(EventKind::Mallopt, 3, 1), (-3i32) as u32 as u64, 65536]);
    // The fork: its cut says what stream 2 had published.
    b.ev(&[header(EventKind::Fork, 3, 0), 1, cut]);
    let mut c = Words::default();
    c.time(T0 + 5_000_000);
    // A loop that allocates and frees one small block: thousands of changes to the sites' series.
    for i in 0..CHURN {
        if i % 100 == 0 {
            c.time(T0 + 5_000_000 + i * 200);
        }
        c.malloc(EventKind::Malloc, HEAP + 0x1600, 40, heap_chunk(40));
        c.free(HEAP + 0x1600, heap_chunk(40));
    }
    c.ev(&[header(EventKind::Free, 2, 0x31000 | chunk::IS_MMAPPED), 0x7f10_0000_0010]);
    c.ev(&[header(EventKind::Free, 2, 0), 0]);
    c.ev(&[header(EventKind::Mmap, 6, 3 | 0x22 << 8), 0x7f20_0000_0000, 8192, u64::MAX, 0, 0]);
    c.ev(&[header(EventKind::Munmap, 3, 0), 0x7f20_0000_0000, 8192]);
    c.mallinfo(MallinfoReason::Exit, mi(0x2000, 0x5b0), T0 + 6_000_000);
    c.ev(&[header(EventKind::ProgramBreak, 2, event::PROGRAM_BREAK_FRESH), HEAP + 0x2000]);
    ([a.0, b.0, c.0], realloc_at)
}

/// The second thread's words: a thread arena, its own blocks, a free of the main thread's block
/// (its realloc's old block, at word `realloc_at` of the main thread's stream).
fn second_thread(realloc_at: u32) -> (Vec<u64>, Vec<u64>) {
    let mut a = Words::default();
    a.time(T0 + 2_500_000);
    a.ev(&[header(EventKind::ArenaHeap, 5, 0), ARENA_HEAP, ARENA_HEAP + 0x20, 0x21000, 0]);
    let arena_chunk = |n: u64| heap_chunk(n) | chunk::NON_MAIN_ARENA;
    a.malloc(EventKind::Malloc, ARENA_HEAP + 0x8b0, 500, arena_chunk(500));
    let mut b = Words::default();
    b.time(T0 + 4_000_000);
    b.malloc(EventKind::Malloc, ARENA_HEAP + 0xab0, 64, arena_chunk(64));
    b.free_after(HEAP + 0x12c0, heap_chunk(300), order::position(1, 0, realloc_at));
    b.free(ARENA_HEAP + 0x8b0, arena_chunk(500));
    b.ev(&[header(EventKind::HeapSize, 3, 0), ARENA_HEAP, 0x22000]);
    b.ev(&[header(EventKind::ThreadExit, 1, 0)]);
    (a.0, b.0)
}

/// The fork child's words: it frees an inherited block and allocates its own.
fn child_thread() -> Vec<u64> {
    let mut a = Words::default();
    a.time(T0 + 4_500_000);
    a.free(HEAP + 0x1400, heap_chunk(364));
    a.malloc(EventKind::Malloc, HEAP + 0x1400, 24, heap_chunk(24));
    a.ev(&[header(EventKind::Lost, 3, 0), 0, 0]);
    a.0
}

fn smaps(image: u32, time_ns: u64, heap_rss: u64) -> Record {
    let maps = vec![
        Mapping { start: HEAP, end: HEAP + 0x21000, rss: heap_rss, kind: MapKind::Heap },
        Mapping { start: ARENA_HEAP, end: ARENA_HEAP + 0x400_0000, rss: 0x22000, kind: MapKind::Anon },
        Mapping { start: BIAS, end: BIAS + 0x9000, rss: 0x9000, kind: MapKind::File },
        Mapping { start: 0x7ffc_0000_0000, end: 0x7ffc_0002_1000, rss: 0x3000, kind: MapKind::Stack },
    ];
    Record::Smaps { image, time_ns, maps }
}

fn end(image: u32, time_ns: u64) -> Record {
    Record::ProcessEnd(ProcessEnd { image, reason: end_reason::EXITED, time_ns, rss_bytes: 3 << 20, hwm_bytes: 4 << 20, dropped_events: 0, dropped_blocks: 0, status: 0 })
}

/// The records of the synthetic recording, in the order a recorder writes them.
pub fn records() -> Vec<Record> {
    // The second thread's first chunk is what it had published at the fork.
    let cut_word = second_thread(0).0.len() as u32;
    let ([m0, m1, m2], realloc_at) = main_thread(order::position(2, 0, cut_word));
    let (s0, s1) = second_thread(realloc_at);
    let (m0_len, s0_len) = ((m0.len() * 8) as u32, (s0.len() * 8) as u32);
    let m1_len = (m1.len() * 8) as u32;
    let sync = |time_ns| Record::Sync { image: 0, time_ns };
    vec![
        session(),
        Record::ProcessStart(ProcessStart { image: 0, pid: 1000, ppid: 1, parent_image: None, origin: 0, fork_seq: 0, time_ns: T0, hello: hello(1000, 1, Origin::Start, u64::MAX, 0, T0) }),
        Record::Rss { image: 0, time_ns: T0 + 500_000, rss_bytes: 1 << 20 },
        chunk_rec(0, 1, 1000, 0, 0, m0),
        sync(T0 + 2_000_000),
        chunk_rec(0, 2, 1001, 0, 0, s0),
        Record::Rss { image: 0, time_ns: T0 + 2_600_000, rss_bytes: 2 << 20 },
        smaps(0, T0 + 2_700_000, 0x21000),
        sync(T0 + 3_000_000),
        chunk_rec(0, 1, 1000, 0, m0_len, m1),
        Record::ProcessStart(ProcessStart {
            image: 1,
            pid: 1002,
            ppid: 1000,
            parent_image: Some(0),
            origin: Origin::Fork as u32,
            fork_seq: 1,
            time_ns: T0 + 4_400_000,
            hello: hello(1002, 1000, Origin::Fork, 0, 1, T0 + 4_400_000),
        }),
        chunk_rec(0, 2, 1001, 0, s0_len, s1),
        sync(T0 + 4_000_000),
        chunk_rec(1, 1, 1002, 0, 0, child_thread()),
        Record::Sync { image: 1, time_ns: T0 + 4_600_000 },
        Record::Rss { image: 0, time_ns: T0 + 4_700_000, rss_bytes: 3 << 20 },
        chunk_rec(0, 1, 1000, 0, m0_len + m1_len, m2),
        smaps(0, T0 + 5_500_000, 0x2000),
        sync(T0 + 6_000_000),
        Record::Note { image: 0, text: "a synthetic note".into() },
        end(1, T0 + 6_100_000),
        end(0, T0 + 6_500_000),
        Record::SessionEnd { time_ns: T0 + 7_000_000, exit_status: 0 },
    ]
}

/// The synthetic trace file: [`records`] in frames of about `frame_target` raw bytes (a small
/// target gives a frame every record or two).
pub fn trace(frame_target: usize) -> Vec<u8> {
    let mut w = TraceWriter::new(Vec::new(), frame_target).expect("writing to memory");
    for r in records() {
        w.push(&r).expect("writing to memory");
    }
    w.finish().expect("writing to memory")
}
