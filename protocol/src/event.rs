//! Event records: what one hooked call (or one observation) looks like on the wire.
//!
//! Events are sequences of little-endian `u64` words written by one thread into its own block of
//! the shared-memory ring ([`crate::ring`]) and copied verbatim into trace files. Word 0 is the
//! header:
//!
//! ```text
//! bits 0..8    kind   (EventKind)
//! bits 8..16   length in words, header included (1..=255)
//! bits 16..64  aux    48 kind-specific bits
//! ```
//!
//! For allocation and free events `aux` carries glibc's chunk header word (`size | flags`, see
//! [`chunk`]) as read by the preload, plus two flags of ours that announce optional trailing
//! words. Lengths make the stream self-delimiting: a decoder skips kinds it does not know.
//!
//! Layouts (`w0` is the header):
//!
//! | kind | words |
//! |---|---|
//! | `Malloc`, `Calloc`, `Valloc`, `Pvalloc` | `w0(chunk) ptr size [prev_size] [stack] [after]` |
//! | `Memalign`, `PosixMemalign`, `AlignedAlloc` | `w0(chunk) ptr size align [prev_size] [stack] [after]` |
//! | `Realloc`, `Reallocarray` | `w0(new chunk) old_ptr new_ptr size old_chunk [prev_size] [stack] [after_old] [after]` |
//! | `Free` | `w0(chunk) ptr [after]` |
//! | `FreeSized` | `w0(chunk) ptr size [after]` |
//! | `FreeAlignedSized` | `w0(chunk) ptr align size [after]` |
//! | `UsableSize` | `w0 ptr result` |
//! | `Mmap`, `Mmap64` | `w0(prot \| flags<<8) result len fd offset addr_hint` |
//! | `Munmap` | `w0(result) addr len` |
//! | `Mremap` | `w0(flags) old_addr old_len new_len result new_addr_arg` |
//! | `Brk` | `w0(result) addr` |
//! | `Sbrk` | `w0 increment result` |
//! | `MallocTrim` | `w0(result) pad` |
//! | `Mallopt` | `w0(result) param value` |
//! | `Time` | `w0 clock_ns` |
//! | `ProgramBreak` | `w0(fresh) brk` |
//! | `ArenaHeap` | `w0 heap ar_ptr size prev` |
//! | `HeapSize` | `w0(fresh) heap size` |
//! | `Lost` | `w0 events blocks` |
//! | `ThreadExit` | `w0` |
//! | `Fork` | `w0 fork_seq cut..` |
//! | `Mallinfo` | `w0(reason) arena ordblks smblks hblks hblkhd fsmblks uordblks fordblks keepcost clock_before` |
//! | `Stack` | `w0(depth) id ip[0] .. ip[depth-1]` |
//! | `Module` | `w0(path_len \| build_id_len<<16) bias lo hi build_id_words.. path_words..` |
//! | `ModuleUnload` | `w0 bias` |
//!
//! Ordering (see [`crate::order`]): `after` is a stream position (never 0) of an event of another
//! thread that happened before this one — for an allocation, the last exchange of the ordering
//! cell of the address it returned; for a free, the exchange its own exchange replaced.
//! `after_old` is a realloc's exchange of the old block's cell (made before the real call), and
//! `after` its load of the new block's cell (when the block moved). `AUX_HAS_AFTER` and
//! `AUX_HAS_AFTER_OLD` announce them.
//!
//! Stacks (allocation sites):
//! * `stack` on an allocation is a stack id (non-zero); `AUX_HAS_STACK` announces it. An
//!   allocation without the flag has no stack (stacks off, or not sampled).
//! * A `Stack` event defines an id once per process image: `ip[0]` is the return address into
//!   the function that called the allocator, `ip[1]` its caller's, and so on (return addresses:
//!   a symboliser looks up `ip - 1`). The definition may come from any thread of the image and may
//!   come *after* the first allocation that uses it in merged order: readers resolve ids against
//!   the whole image's stream. A fork child's ids continue its parent's (it inherits the
//!   parent's definitions; a definition the parent was writing as it forked is in the parent's
//!   stream only, after the fork: resolve a child's ids against its ancestors' whole streams too).
//! * The preload's ids are 64-bit hashes of the frames (see `preload/src/stacks.rs`): the same
//!   stack always gets the same id within an image and its fork children. An id is normally
//!   defined once per image, but may be defined again (the preload's intern table is full):
//!   readers must accept repeated, identical definitions of an id.
//! * Allocations made before the image registered (hooks running before the preload's
//!   constructor) and allocations not sampled (`MTRACE_STACK_SAMPLE_BYTES`) carry no stack.
//! * A `Module` event describes one loaded object (the executable, a shared library, the vDSO):
//!   `bias` is the load bias (`dlpi_addr`), `lo..hi` the lowest and highest addresses its
//!   `PT_LOAD` segments map, then the GNU build id (`build_id_len` bytes, 0 if none) and the path
//!   (`path_len` bytes, possibly truncated to fit 255 words), each packed little-endian into words
//!   and padded with zeros. The preload sends every module at registration, and again on each
//!   `dlopen` that adds one; `ModuleUnload` follows a `dlclose` that removed one. The preload
//!   cannot run code right after `dlopen` (glibc resolves the file relative to its caller's
//!   return address, so the hook must tail-jump): a `Module` for a `dlopen`ed object comes at the
//!   next full unwind of any thread after it, and possibly *after* `Stack` events with frames in
//!   it — readers resolve frames against the modules of the whole stream, by time for unloads.
//!   A fork child's stream starts with every module again (`Module` events, as at registration).
//! `size` of `Calloc`/`Reallocarray` is `nmemb * size`, saturated at `u64::MAX` on overflow.
//! A failed allocation has `ptr == 0` (for realloc: `new_ptr == 0` with `size > 0`).

/// glibc chunk header facts (x86_64, glibc 2.26 – 2.42).
pub mod chunk {
    /// The chunk was obtained with mmap.
    pub const IS_MMAPPED: u64 = 0x2;
    /// The chunk belongs to a thread arena (valid on in-use chunks only).
    pub const NON_MAIN_ARENA: u64 = 0x4;
    /// `PREV_INUSE` is rewritten by neighbours at any time; never trust it.
    pub const PREV_INUSE: u64 = 0x1;
    pub const FLAG_MASK: u64 = 0x7;

    /// Chunk size from a header word.
    pub const fn size(hdr: u64) -> u64 {
        hdr & !FLAG_MASK
    }
    pub const fn is_mmapped(hdr: u64) -> bool {
        hdr & IS_MMAPPED != 0
    }
    pub const fn non_main_arena(hdr: u64) -> bool {
        hdr & NON_MAIN_ARENA != 0
    }
    /// glibc's `request2size`: the chunk a heap request of `n` bytes needs.
    pub const fn request2size(n: u64) -> u64 {
        let s = (n + 8 + 15) & !15;
        if s < 32 { 32 } else { s }
    }
    /// Heap alignment of thread-arena heaps (`HEAP_MAX_SIZE`, 64 MiB on x86_64).
    pub const HEAP_MAX_SIZE: u64 = 64 << 20;
}

/// Mask of the chunk header bits kept in `aux` (chunks below 16 TiB).
pub const AUX_CHUNK_MASK: u64 = (1 << 44) - 1;
/// `aux` flag of `Realloc`/`Reallocarray`: an `after_old` word follows the stack id (see the
/// module docs).
pub const AUX_HAS_AFTER_OLD: u64 = 1 << 44;
/// `aux` flag of allocation events: a stack id word follows `prev_size` (see the module docs).
pub const AUX_HAS_STACK: u64 = 1 << 45;
/// `aux` flag: a `prev_size` word (offset of an mmapped chunk in its mapping) follows the base words.
pub const AUX_HAS_PREV_SIZE: u64 = 1 << 46;
/// `aux` flag: an `after` word (a position, see [`crate::order`]) is the last word.
pub const AUX_HAS_AFTER: u64 = 1 << 47;

/// `aux` flag of `ProgramBreak` and `HeapSize`: a fresh report (see [`Event::ProgramBreak`]).
pub const PROGRAM_BREAK_FRESH: u64 = 1;

/// The longest event, in words (the header's length field has 8 bits).
pub const MAX_EVENT_WORDS: usize = 255;
/// The most frames a `Stack` event can carry.
pub const MAX_STACK_DEPTH: usize = MAX_EVENT_WORDS - 2;

macro_rules! kinds {
    ($($name:ident = $val:literal, $base:literal, $label:literal;)*) => {
        /// Event kinds. Values are part of the trace format: never renumber.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind { $($name = $val,)* }
        impl EventKind {
            pub const fn from_u8(v: u8) -> Option<Self> {
                match v { $($val => Some(Self::$name),)* _ => None }
            }
            /// Words of the fixed part, header included.
            pub const fn base_words(self) -> usize {
                match self { $(Self::$name => $base,)* }
            }
            /// The name users know (the C function, or what was observed).
            pub const fn label(self) -> &'static str {
                match self { $(Self::$name => $label,)* }
            }
            pub const ALL: &'static [EventKind] = &[$(Self::$name,)*];
        }
    };
}

kinds! {
    Malloc = 1, 3, "malloc";
    Calloc = 2, 3, "calloc";
    Realloc = 3, 5, "realloc";
    Reallocarray = 4, 5, "reallocarray";
    Memalign = 5, 4, "memalign";
    PosixMemalign = 6, 4, "posix_memalign";
    AlignedAlloc = 7, 4, "aligned_alloc";
    Valloc = 8, 3, "valloc";
    Pvalloc = 9, 3, "pvalloc";
    Free = 10, 2, "free";
    FreeSized = 11, 3, "free_sized";
    FreeAlignedSized = 12, 4, "free_aligned_sized";
    UsableSize = 13, 3, "malloc_usable_size";
    Mmap = 14, 6, "mmap";
    Mmap64 = 15, 6, "mmap64";
    Munmap = 16, 3, "munmap";
    Mremap = 17, 6, "mremap";
    Brk = 18, 2, "brk";
    Sbrk = 19, 3, "sbrk";
    MallocTrim = 20, 2, "malloc_trim";
    Mallopt = 21, 3, "mallopt";
    Time = 32, 2, "time";
    ProgramBreak = 33, 2, "program break";
    ArenaHeap = 34, 5, "arena heap";
    HeapSize = 35, 3, "heap size";
    Lost = 36, 3, "lost";
    ThreadExit = 37, 1, "thread exit";
    Fork = 38, 2, "fork";
    Mallinfo = 39, 11, "mallinfo2";
    Stack = 40, 2, "stack";
    Module = 41, 4, "module";
    ModuleUnload = 42, 2, "module unload";
}

impl EventKind {
    /// A call of the application (as opposed to an observation mtrace adds to the stream).
    pub const fn is_call(self) -> bool {
        (self as u8) < 32
    }
    /// Calls whose `aux` is a chunk header and which may carry `prev_size` and `after` words.
    pub const fn is_allocation(self) -> bool {
        matches!(
            self,
            Self::Malloc
                | Self::Calloc
                | Self::Realloc
                | Self::Reallocarray
                | Self::Memalign
                | Self::PosixMemalign
                | Self::AlignedAlloc
                | Self::Valloc
                | Self::Pvalloc
        )
    }
}

/// How many events `words` holds, by their lengths alone (a length of 0 counts as one word: the
/// decoder reports it; this only counts).
pub fn count_events(words: &[u64]) -> u64 {
    let (mut i, mut n) = (0usize, 0u64);
    while i < words.len() {
        i += (((words[i] >> 8) & 0xff) as usize).max(1);
        n += 1;
    }
    n
}

/// Build a header word.
#[inline(always)]
pub const fn header(kind: EventKind, words: usize, aux: u64) -> u64 {
    (kind as u64) | ((words as u64) << 8) | (aux << 16)
}

/// Split a header word into (kind byte, length in words, aux).
#[inline(always)]
pub const fn split_header(w: u64) -> (u8, usize, u64) {
    ((w & 0xff) as u8, ((w >> 8) & 0xff) as usize, w >> 16)
}

/// One decoded event. Addresses and sizes are raw `u64`s as the application saw them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Any call that creates a block: malloc, calloc, memalign family, valloc, pvalloc.
    /// `stack`: the allocation site's stack id, 0 if none. `after`: the other thread's event it
    /// comes after (see [`crate::order`]).
    Alloc { kind: EventKind, ptr: u64, size: u64, align: u64, chunk: u64, prev_size: u64, stack: u64, after: Option<u64> },
    /// realloc / reallocarray.
    Realloc {
        kind: EventKind,
        old_ptr: u64,
        new_ptr: u64,
        size: u64,
        old_chunk: u64,
        chunk: u64,
        prev_size: u64,
        stack: u64,
        /// The other thread's event this realloc's exchange of the old block's cell replaced.
        after_old: Option<u64>,
        /// The other thread's event found in the new block's cell (a moved block).
        after: Option<u64>,
    },
    /// free, free_sized, free_aligned_sized. `ptr` may be 0 (`free(NULL)`). `after`: the other
    /// thread's event this free's exchange of the block's ordering cell replaced.
    Free { kind: EventKind, ptr: u64, chunk: u64, after: Option<u64> },
    UsableSize { ptr: u64, result: u64 },
    Mmap { kind: EventKind, result: u64, len: u64, prot: u32, flags: u32, fd: i64, offset: u64, addr_hint: u64 },
    Munmap { addr: u64, len: u64, result: i64 },
    Mremap { old_addr: u64, old_len: u64, new_len: u64, flags: u32, result: u64, new_addr_arg: u64 },
    Brk { addr: u64, result: i64 },
    Sbrk { increment: i64, result: u64 },
    MallocTrim { pad: u64, result: i64 },
    Mallopt { param: i32, value: i32, result: i64 },
    /// The collector's clock (CLOCK_MONOTONIC ns) as this thread saw it change.
    Time { clock_ns: u64 },
    /// The program break, observed to have moved — or, `fresh`, reported at a point where no
    /// other thread runs (the image's start and exit), whether it moved or not.
    ProgramBreak { brk: u64, fresh: bool },
    /// A thread-arena heap seen for the first time (validated `heap_info`).
    ArenaHeap { heap: u64, ar_ptr: u64, size: u64, prev: u64 },
    /// A thread-arena heap's `heap_info.size` changed.
    /// `fresh`: reported at the image's exit for every heap (0: unmapped), see `ProgramBreak`.
    HeapSize { heap: u64, size: u64, fresh: bool },
    /// Events dropped in lossy mode right before this point.
    Lost { events: u64, blocks: u64 },
    ThreadExit,
    /// The thread is about to fork; the child registers with this sequence number. `cut`: how
    /// many words of cut follow ([`fork_cut`]).
    Fork { seq: u64, cut: usize },
    /// glibc's own books (`mallinfo2()`), taken by the preload as ground truth for the model.
    /// `clock_before`: the collector clock read right before `mallinfo2()` was called (the
    /// event's own time mark is read after it returned): glibc's books are of an instant
    /// between the two.
    Mallinfo { reason: MallinfoReason, mi: Mallinfo2, clock_before: u64 },
    /// A stack definition: `depth` frames follow in the event's words ([`stack_frames`]).
    Stack { id: u64, depth: usize },
    /// A loaded module; its build id and path are in the event's words ([`module_build_id`],
    /// [`module_path`]).
    Module { bias: u64, lo: u64, hi: u64, build_id_len: usize, path_len: usize },
    /// The module with this load bias was unloaded (dlclose).
    ModuleUnload { bias: u64 },
    /// A kind this decoder does not know (written by a newer preload).
    Unknown { kind: u8 },
}

/// Why the preload took a `mallinfo2()` checkpoint. Values are part of the trace format.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MallinfoReason {
    /// The periodic sampler thread (`MTRACE_MALLINFO_MS`). Other threads may be running.
    /// Only that thread writes these, and it writes nothing else: a stream that carries one is
    /// the preload's own thread, not the application's (the collector does not count it).
    Periodic = 1,
    /// Right before the application's `malloc_trim` call, on its thread.
    BeforeTrim = 2,
    /// Right after the application's `malloc_trim` call returned, on its thread.
    AfterTrim = 3,
    /// At process exit, on the exiting thread.
    Exit = 4,
    /// When the image starts recording (after registration and the sampler thread's start):
    /// what glibc holds that the trace never showed.
    Start = 5,
    Other = 255,
}

impl MallinfoReason {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Periodic,
            2 => Self::BeforeTrim,
            3 => Self::AfterTrim,
            4 => Self::Exit,
            5 => Self::Start,
            _ => Self::Other,
        }
    }
    pub const fn label(self) -> &'static str {
        match self {
            Self::Periodic => "periodic",
            Self::BeforeTrim => "before malloc_trim",
            Self::AfterTrim => "after malloc_trim",
            Self::Exit => "exit",
            Self::Start => "start",
            Self::Other => "other",
        }
    }
}

/// The fields of glibc's `struct mallinfo2` that carry information (`usmblks` is always 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mallinfo2 {
    /// Bytes obtained from the OS for arenas (brk heap + thread-arena heaps), mmapped chunks excluded.
    pub arena: u64,
    /// Free chunks in bins, plus one per arena for its top.
    pub ordblks: u64,
    /// Fastbin chunks.
    pub smblks: u64,
    /// mmapped chunks.
    pub hblks: u64,
    /// Bytes in mmapped chunks (whole mappings).
    pub hblkhd: u64,
    /// Bytes in fastbin chunks.
    pub fsmblks: u64,
    /// `arena - fordblks`: in-use chunks, tcache'd chunks, metadata.
    pub uordblks: u64,
    /// Free bytes: top + fastbins + bins.
    pub fordblks: u64,
    /// The main arena's top chunk.
    pub keepcost: u64,
}

impl Mallinfo2 {
    /// The event words (header included) for a checkpoint taken after the collector clock read
    /// `clock_before`.
    pub const fn encode(&self, reason: MallinfoReason, clock_before: u64) -> [u64; 11] {
        [
            header(EventKind::Mallinfo, 11, reason as u64),
            self.arena,
            self.ordblks,
            self.smblks,
            self.hblks,
            self.hblkhd,
            self.fsmblks,
            self.uordblks,
            self.fordblks,
            self.keepcost,
            clock_before,
        ]
    }
}

/// Why a word sequence is not a valid event stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A header with length 0, or a length shorter than the kind's fixed part.
    BadLength { word: usize, kind: u8, len: usize },
    /// The event runs past the end of the data.
    Truncated { word: usize, len: usize, available: usize },
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            DecodeError::BadLength { word, kind, len } => {
                write!(f, "event at word {word}: kind {kind} with invalid length {len}")
            }
            DecodeError::Truncated { word, len, available } => {
                write!(f, "event at word {word}: needs {len} words, only {available} present")
            }
        }
    }
}

/// Decode the event that starts at `words[at]`; returns it and its length in words. Any words
/// give an event or an error, never a panic (`at` past the end: `Truncated`).
pub fn decode(words: &[u64], at: usize) -> Result<(Event, usize), DecodeError> {
    let Some(&w0) = words.get(at) else {
        return Err(DecodeError::Truncated { word: at, len: 1, available: 0 });
    };
    let (k, len, aux) = split_header(w0);
    let available = words.len() - at;
    let Some(kind) = EventKind::from_u8(k) else {
        if len == 0 {
            return Err(DecodeError::BadLength { word: at, kind: k, len });
        }
        if len > available {
            return Err(DecodeError::Truncated { word: at, len, available });
        }
        return Ok((Event::Unknown { kind: k }, len));
    };
    let base = kind.base_words();
    if len < base || len > MAX_EVENT_WORDS {
        return Err(DecodeError::BadLength { word: at, kind: k, len });
    }
    if len > available {
        return Err(DecodeError::Truncated { word: at, len, available });
    }
    let w = &words[at..at + len];
    // Optional trailing words of allocation events.
    // (prev_size, stack, after_old, after); `allocation`: the event may carry prev_size and a
    // stack; `realloc`: it may carry after_old.
    let extras = |mut i: usize, allocation: bool, realloc: bool| -> Result<(u64, u64, Option<u64>, Option<u64>), DecodeError> {
        let bad = DecodeError::BadLength { word: at, kind: k, len };
        let mut take = |flag: u64| -> Result<Option<u64>, DecodeError> {
            if aux & flag == 0 {
                return Ok(None);
            }
            if i >= len {
                return Err(bad);
            }
            i += 1;
            Ok(Some(w[i - 1]))
        };
        let prev_size = if allocation { take(AUX_HAS_PREV_SIZE)?.unwrap_or(0) } else { 0 };
        let stack = if allocation { take(AUX_HAS_STACK)?.unwrap_or(0) } else { 0 };
        let after_old = if realloc { take(AUX_HAS_AFTER_OLD)? } else { None };
        let after = take(AUX_HAS_AFTER)?;
        // A position names a stream (0 is "none", never written).
        if after_old.is_some_and(|v| crate::order::decode(v).is_none()) || after.is_some_and(|v| crate::order::decode(v).is_none()) {
            return Err(bad);
        }
        Ok((prev_size, stack, after_old, after))
    };
    let chunk = aux & AUX_CHUNK_MASK;
    let ev = match kind {
        EventKind::Malloc | EventKind::Calloc | EventKind::Valloc | EventKind::Pvalloc => {
            let (prev_size, stack, _, after) = extras(3, true, false)?;
            Event::Alloc { kind, ptr: w[1], size: w[2], align: 0, chunk, prev_size, stack, after }
        }
        EventKind::Memalign | EventKind::PosixMemalign | EventKind::AlignedAlloc => {
            let (prev_size, stack, _, after) = extras(4, true, false)?;
            Event::Alloc { kind, ptr: w[1], size: w[2], align: w[3], chunk, prev_size, stack, after }
        }
        EventKind::Realloc | EventKind::Reallocarray => {
            let (prev_size, stack, after_old, after) = extras(5, true, true)?;
            Event::Realloc {
                kind,
                old_ptr: w[1],
                new_ptr: w[2],
                size: w[3],
                old_chunk: w[4] & AUX_CHUNK_MASK,
                chunk,
                prev_size,
                stack,
                after_old,
                after,
            }
        }
        EventKind::Free | EventKind::FreeSized | EventKind::FreeAlignedSized => {
            let (_, _, _, after) = extras(base, false, false)?;
            Event::Free { kind, ptr: w[1], chunk, after }
        }
        EventKind::UsableSize => Event::UsableSize { ptr: w[1], result: w[2] },
        EventKind::Mmap | EventKind::Mmap64 => Event::Mmap {
            kind,
            result: w[1],
            len: w[2],
            prot: (aux & 0xff) as u32,
            flags: ((aux >> 8) & 0xffff_ffff) as u32,
            fd: w[3] as i64,
            offset: w[4],
            addr_hint: w[5],
        },
        EventKind::Munmap => Event::Munmap { addr: w[1], len: w[2], result: sign_extend48(aux) },
        EventKind::Mremap => Event::Mremap {
            old_addr: w[1],
            old_len: w[2],
            new_len: w[3],
            flags: (aux & 0xffff_ffff) as u32,
            result: w[4],
            new_addr_arg: w[5],
        },
        EventKind::Brk => Event::Brk { addr: w[1], result: sign_extend48(aux) },
        EventKind::Sbrk => Event::Sbrk { increment: w[1] as i64, result: w[2] },
        EventKind::MallocTrim => Event::MallocTrim { pad: w[1], result: sign_extend48(aux) },
        EventKind::Mallopt => Event::Mallopt { param: w[1] as i32, value: w[2] as i32, result: sign_extend48(aux) },
        EventKind::Time => Event::Time { clock_ns: w[1] },
        EventKind::ProgramBreak => Event::ProgramBreak { brk: w[1], fresh: aux & PROGRAM_BREAK_FRESH != 0 },
        EventKind::ArenaHeap => Event::ArenaHeap { heap: w[1], ar_ptr: w[2], size: w[3], prev: w[4] },
        EventKind::HeapSize => Event::HeapSize { heap: w[1], size: w[2], fresh: aux & PROGRAM_BREAK_FRESH != 0 },
        EventKind::Lost => Event::Lost { events: w[1], blocks: w[2] },
        EventKind::ThreadExit => Event::ThreadExit,
        EventKind::Fork => Event::Fork { seq: w[1], cut: len - 2 },
        EventKind::Mallinfo => Event::Mallinfo {
            reason: MallinfoReason::from_u8((aux & 0xff) as u8),
            mi: Mallinfo2 {
                arena: w[1],
                ordblks: w[2],
                smblks: w[3],
                hblks: w[4],
                hblkhd: w[5],
                fsmblks: w[6],
                uordblks: w[7],
                fordblks: w[8],
                keepcost: w[9],
            },
            clock_before: w[10],
        },
        EventKind::Stack => {
            let depth = (aux & 0xff) as usize;
            if depth != len - 2 {
                return Err(DecodeError::BadLength { word: at, kind: k, len });
            }
            Event::Stack { id: w[1], depth }
        }
        EventKind::Module => {
            let (path_len, build_id_len) = ((aux & 0xffff) as usize, ((aux >> 16) & 0xff) as usize);
            if len != 4 + build_id_len.div_ceil(8) + path_len.div_ceil(8) {
                return Err(DecodeError::BadLength { word: at, kind: k, len });
            }
            Event::Module { bias: w[1], lo: w[2], hi: w[3], build_id_len, path_len }
        }
        EventKind::ModuleUnload => Event::ModuleUnload { bias: w[1] },
    };
    Ok((ev, len))
}

/// The cut of the `Fork` event whose words start at `w[0]` (already decoded successfully): per
/// stream of the image, the position (see [`crate::order`]) right after the last event it had
/// published when the thread forked — what the fork child's heap includes. Streams not listed had
/// nothing unread in the ring (or did not fit the event).
pub fn fork_cut(w: &[u64]) -> &[u64] {
    event_tail(w)
}

/// Words 2.. of the event whose words start at `w[0]` (empty if `w` does not hold them).
fn event_tail(w: &[u64]) -> &[u64] {
    let len = w.first().map_or(0, |&h| split_header(h).1);
    w.get(2..len).unwrap_or(&[])
}

/// The frames of the `Stack` event whose words start at `w[0]` (already decoded successfully).
pub fn stack_frames(w: &[u64]) -> &[u64] {
    event_tail(w)
}

/// Copy `n` bytes packed little-endian into `words` into `out` (which must hold `n` bytes).
/// (Bytes past the end of `words` or of `out` are left out: callers pass a decoded event.)
fn unpack_bytes(words: &[u64], n: usize, out: &mut [u8]) {
    let n = n.min(out.len()).min(words.len() * 8);
    for (i, b) in out[..n].iter_mut().enumerate() {
        *b = (words[i / 8] >> (8 * (i % 8))) as u8;
    }
}

/// The build id of the `Module` event whose words start at `w[0]`, copied into `out` (at least
/// 255 bytes); returns its length.
pub fn module_build_id(w: &[u64], out: &mut [u8]) -> usize {
    let aux = w.first().map_or(0, |&h| split_header(h).2);
    let n = (((aux >> 16) & 0xff) as usize).min(out.len());
    unpack_bytes(w.get(4..).unwrap_or(&[]), n, out);
    n
}

/// The path of the `Module` event whose words start at `w[0]`, copied into `out` (at least
/// `path_len` bytes); returns its length.
pub fn module_path(w: &[u64], out: &mut [u8]) -> usize {
    let aux = w.first().map_or(0, |&h| split_header(h).2);
    let (n, bid) = (((aux & 0xffff) as usize).min(out.len()), ((aux >> 16) & 0xff) as usize);
    unpack_bytes(w.get(4 + bid.div_ceil(8)..).unwrap_or(&[]), n, out);
    n
}

/// Pack bytes little-endian into words (zero padded); returns the words written.
pub fn pack_bytes(bytes: &[u8], out: &mut [u64]) -> usize {
    let n = bytes.len().div_ceil(8);
    for (i, w) in out[..n].iter_mut().enumerate() {
        let mut v = 0u64;
        for (j, b) in bytes[i * 8..bytes.len().min(i * 8 + 8)].iter().enumerate() {
            v |= (*b as u64) << (8 * j);
        }
        *w = v;
    }
    n
}

/// Encode a `Module` event into `out`; returns its length in words. The path is truncated (from
/// the front, keeping the file name) to fit `MAX_EVENT_WORDS`; the build id to 255 bytes.
pub fn encode_module(bias: u64, lo: u64, hi: u64, build_id: &[u8], path: &[u8], out: &mut [u64; MAX_EVENT_WORDS]) -> usize {
    let build_id = &build_id[..build_id.len().min(255)];
    let room = (MAX_EVENT_WORDS - 4 - build_id.len().div_ceil(8)) * 8;
    let path = if path.len() > room { &path[path.len() - room..] } else { path };
    out[1] = bias;
    out[2] = lo;
    out[3] = hi;
    let mut n = 4;
    n += pack_bytes(build_id, &mut out[n..]);
    n += pack_bytes(path, &mut out[n..]);
    out[0] = header(EventKind::Module, n, path.len() as u64 | (build_id.len() as u64) << 16);
    n
}

/// Encode a small signed result (an `int` return value) into 48 aux bits.
#[inline(always)]
pub const fn aux_i48(v: i64) -> u64 {
    (v as u64) & ((1 << 48) - 1)
}

/// Inverse of [`aux_i48`].
pub const fn sign_extend48(aux: u64) -> i64 {
    ((aux << 16) as i64) >> 16
}

/// Iterate over the events of a word slice, with each event's word offset.
pub struct Events<'a> {
    words: &'a [u64],
    at: usize,
}

impl<'a> Events<'a> {
    pub fn new(words: &'a [u64]) -> Self {
        Events { words, at: 0 }
    }
}

impl Iterator for Events<'_> {
    type Item = Result<(usize, Event), DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.words.len() {
            return None;
        }
        match decode(self.words, self.at) {
            Ok((ev, len)) => {
                let at = self.at;
                self.at += len;
                Some(Ok((at, ev)))
            }
            Err(e) => {
                self.at = self.words.len();
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = header(EventKind::Realloc, 7, 0x1234_5678_9abc & AUX_CHUNK_MASK | AUX_HAS_AFTER);
        let (k, len, aux) = split_header(h);
        assert_eq!(k, EventKind::Realloc as u8);
        assert_eq!(len, 7);
        assert_eq!(aux & AUX_CHUNK_MASK, 0x1234_5678_9abc & AUX_CHUNK_MASK);
        assert_ne!(aux & AUX_HAS_AFTER, 0);
    }

    #[test]
    fn alloc_with_extras_decodes() {
        let hdr = 0x21000 | chunk::IS_MMAPPED;
        let after = crate::order::position(9, 3, 100);
        let w = [header(EventKind::Memalign, 6, hdr | AUX_HAS_PREV_SIZE | AUX_HAS_AFTER), 0x7f00_0010, 5000, 4096, 4080, after];
        let (ev, len) = decode(&w, 0).unwrap();
        assert_eq!(len, 6);
        assert_eq!(
            ev,
            Event::Alloc {
                kind: EventKind::Memalign,
                ptr: 0x7f00_0010,
                size: 5000,
                align: 4096,
                chunk: hdr,
                prev_size: 4080,
                stack: 0,
                after: Some(after)
            }
        );
    }

    #[test]
    fn alloc_with_stack_decodes() {
        let hdr = 0x31;
        let after = crate::order::position(2, 0, 7);
        let w = [header(EventKind::Malloc, 5, hdr | AUX_HAS_STACK | AUX_HAS_AFTER), 0x5000, 40, 77, after];
        let (ev, len) = decode(&w, 0).unwrap();
        assert_eq!(len, 5);
        assert_eq!(ev, Event::Alloc { kind: EventKind::Malloc, ptr: 0x5000, size: 40, align: 0, chunk: hdr, prev_size: 0, stack: 77, after: Some(after) });
        // Frees never carry a stack word, whatever the aux bits say about the chunk.
        let w = [header(EventKind::Free, 2, 0x31), 0x5000];
        assert_eq!(decode(&w, 0).unwrap().0, Event::Free { kind: EventKind::Free, ptr: 0x5000, chunk: 0x31, after: None });
    }

    #[test]
    fn realloc_carries_both_orderings() {
        let (old, new) = (crate::order::position(4, 1, 2), crate::order::position(5, 6, 7));
        let aux = 0x41 | AUX_HAS_STACK | AUX_HAS_AFTER_OLD | AUX_HAS_AFTER;
        let w = [header(EventKind::Realloc, 8, aux), 0x1000, 0x2000, 50, 0x31, 99, old, new];
        let ev = decode(&w, 0).unwrap().0;
        assert_eq!(
            ev,
            Event::Realloc { kind: EventKind::Realloc, old_ptr: 0x1000, new_ptr: 0x2000, size: 50, old_chunk: 0x31, chunk: 0x41, prev_size: 0, stack: 99, after_old: Some(old), after: Some(new) }
        );
        // `after_old` alone (an in-place realloc).
        let w = [header(EventKind::Realloc, 6, 0x41 | AUX_HAS_AFTER_OLD), 0x1000, 0x1000, 50, 0x31, old];
        assert!(matches!(decode(&w, 0).unwrap().0, Event::Realloc { after_old: Some(o), after: None, .. } if o == old));
    }

    #[test]
    fn stack_and_module_round_trip() {
        let w = [header(EventKind::Stack, 5, 3), 9, 0x401000, 0x401100, 0x7f00_0000_1234];
        assert_eq!(decode(&w, 0).unwrap(), (Event::Stack { id: 9, depth: 3 }, 5));
        assert_eq!(stack_frames(&w), &[0x401000, 0x401100, 0x7f00_0000_1234]);
        assert!(matches!(decode(&[header(EventKind::Stack, 4, 3), 9, 1, 2], 0), Err(DecodeError::BadLength { .. })));

        let mut out = [0u64; MAX_EVENT_WORDS];
        let bid = [0xab; 20];
        let n = encode_module(0x7f00_0000_0000, 0x7f00_0000_1000, 0x7f00_0002_0000, &bid, b"/usr/lib/libfoo.so.1", &mut out);
        assert_eq!(n, 4 + 3 + 3);
        let (ev, len) = decode(&out[..n], 0).unwrap();
        assert_eq!(len, n);
        assert_eq!(ev, Event::Module { bias: 0x7f00_0000_0000, lo: 0x7f00_0000_1000, hi: 0x7f00_0002_0000, build_id_len: 20, path_len: 20 });
        let mut buf = [0u8; 2048];
        assert_eq!(module_build_id(&out, &mut buf), 20);
        assert_eq!(&buf[..20], &bid);
        assert_eq!(module_path(&out, &mut buf), 20);
        assert_eq!(&buf[..20], b"/usr/lib/libfoo.so.1");
        // A path too long for one event keeps its end.
        let long = [b'x'; 3000];
        let n = encode_module(0, 0, 0, &[], &long, &mut out);
        assert_eq!(n, MAX_EVENT_WORDS);
        assert_eq!(module_path(&out, &mut buf), (MAX_EVENT_WORDS - 4) * 8);
    }

    #[test]
    fn mallinfo_round_trips() {
        let mi = Mallinfo2 { arena: 1, ordblks: 2, smblks: 3, hblks: 4, hblkhd: 5, fsmblks: 6, uordblks: 7, fordblks: 8, keepcost: 9 };
        let w = mi.encode(MallinfoReason::AfterTrim, 77);
        assert_eq!(decode(&w, 0).unwrap(), (Event::Mallinfo { reason: MallinfoReason::AfterTrim, mi, clock_before: 77 }, 11));
    }

    #[test]
    fn signed_aux_round_trips() {
        for v in [-1i64, 0, 1, -22, 1 << 40, -(1 << 40)] {
            assert_eq!(sign_extend48(aux_i48(v)), v);
        }
    }

    #[test]
    fn bad_lengths_are_errors_not_panics() {
        assert!(matches!(decode(&[header(EventKind::Malloc, 2, 0), 1], 0), Err(DecodeError::BadLength { .. })));
        assert!(matches!(decode(&[header(EventKind::Malloc, 3, 0), 1], 0), Err(DecodeError::Truncated { .. })));
        assert!(matches!(decode(&[0], 0), Err(DecodeError::BadLength { .. })));
        // An `after` flag without room for the word, or naming no stream.
        assert!(matches!(decode(&[header(EventKind::Malloc, 3, AUX_HAS_AFTER), 1, 2], 0), Err(DecodeError::BadLength { .. })));
        assert!(matches!(decode(&[header(EventKind::Free, 3, AUX_HAS_AFTER), 1, 77], 0), Err(DecodeError::BadLength { .. })));
        // Unknown kinds are skipped by length.
        let (ev, len) = decode(&[header_raw(200, 2), 9], 0).unwrap();
        assert_eq!((ev, len), (Event::Unknown { kind: 200 }, 2));
    }

    fn header_raw(kind: u8, words: usize) -> u64 {
        kind as u64 | (words as u64) << 8
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_words_never_panic(words in proptest::collection::vec(proptest::num::u64::ANY, 0..64)) {
            for r in Events::new(&words) { let _ = r; }
        }

        /// Headers of real kinds with any length and flags, then any words: every event decodes
        /// or is an error, decoded lengths tile the words, and the helpers that read a decoded
        /// event's words stay inside them.
        #[test]
        fn structured_words_never_panic(
            heads in proptest::collection::vec((0usize..EventKind::ALL.len(), 0usize..256, proptest::num::u64::ANY), 1..24),
            fill in proptest::collection::vec(proptest::num::u64::ANY, 0..300),
            at in 0usize..400,
        ) {
            let mut words = Vec::new();
            let mut fill = fill.into_iter();
            for (k, len, aux) in heads {
                words.push(header(EventKind::ALL[k], len, aux & ((1 << 48) - 1)));
                words.extend(fill.by_ref().take(len.saturating_sub(1) % 8));
            }
            let _ = decode(&words, at);
            let mut end = 0;
            let mut buf = [0u8; 255];
            let mut path = [0u8; 4096];
            for r in Events::new(&words) {
                let Ok((i, ev)) = r else { break };
                proptest::prop_assert_eq!(i, end);
                let (_, len, _) = split_header(words[i]);
                end = i + len;
                proptest::prop_assert!(end <= words.len());
                let w = &words[i..end];
                match ev {
                    Event::Stack { depth, .. } => proptest::prop_assert_eq!(stack_frames(w).len(), depth),
                    Event::Fork { cut, .. } => proptest::prop_assert_eq!(fork_cut(w).len(), cut),
                    Event::Module { build_id_len, path_len, .. } => {
                        proptest::prop_assert_eq!(module_build_id(w, &mut buf), build_id_len);
                        proptest::prop_assert_eq!(module_path(w, &mut path), path_len);
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn helpers_on_short_words_do_not_panic() {
        assert_eq!(decode(&[], 0), Err(DecodeError::Truncated { word: 0, len: 1, available: 0 }));
        assert_eq!(decode(&[header(EventKind::Time, 2, 0), 5], 7).unwrap_err(), DecodeError::Truncated { word: 7, len: 1, available: 0 });
        assert!(stack_frames(&[]).is_empty() && fork_cut(&[header(EventKind::Fork, 9, 0)]).is_empty());
        let mut out = [0u8; 4];
        assert_eq!(module_path(&[header(EventKind::Module, 4, 200)], &mut out), 4);
    }
}
