//! The compact encoding of a chunk's event words (`chunk_encoding::COMPACT`): what the recorder
//! writes instead of the raw 64-bit words, before the frame is compressed.
//!
//! Raw event words hardly compress: addresses, sizes and chunk headers are 64-bit words whose high
//! bytes repeat and whose low bytes look random to a byte-oriented compressor. This encoding
//! takes out what the model of glibc and of the stream can predict, and writes the rest as
//! variable-length integers, so that the frame compressor (zstd) sees a few bytes per event:
//!
//! * **Chunk headers** of allocations are predicted from the requested size (glibc's
//!   `request2size`) and the flag bits of the previous allocation; only a header that differs is
//!   written.
//! * **Returned addresses** are predicted by a small model of the tcache: each freed address is
//!   pushed on a last-in-first-out list of its chunk size (up to [`BIN_DEPTH`] per size, sizes up
//!   to [`BINS`] × 16 bytes), and an allocation of that size most often gets the most recent one
//!   back. An address not in its list is often the previous allocation's end (a split of the
//!   heap's top, `bump`). Otherwise it is written as the difference from the last address seen.
//! * **Stack ids** (64-bit hashes) are indices into a table of the last [`STACKS`] ids (a new
//!   one takes the slots in turn, so that a site keeps its code while it is used).
//! * **Ordering positions** (`after` words) are differences from the previous one.
//! * Every other event is written word by word, each the difference from the word before it.
//!
//! The model's state starts afresh in every chunk: a chunk decodes alone (as a frame does), and a
//! damaged chunk damages nothing after it. The encoding is exact for *any* word sequence — the
//! ring is written by the traced process and trusted for nothing: an event whose length or flags
//! do not fit its kind goes the generic way, and words that do not parse as events at all are
//! copied raw. [`decode`] checks every byte it reads and never produces more words than the
//! chunk announced.
//!
//! ```text
//! chunk   := op*
//! op      := kind | flags << 5, fields       a call event the model knows (kind 1..=10)
//!          | 0x00, varint len, varint w0, zigzag-delta words...     any whole event
//!          | 0x20, varint n, n raw little-endian words              the rest, unparsed
//! ```
//!
//! Varints are LEB128 (7 bits a byte, least significant first); signed differences are
//! zigzag-encoded first. The fields of each kind are in [`encode`]'s code, read back in the
//! same order by [`decode`].

use mtrace_protocol::event::{AUX_CHUNK_MASK, AUX_HAS_AFTER, AUX_HAS_AFTER_OLD, AUX_HAS_PREV_SIZE, AUX_HAS_STACK, EventKind, chunk};

/// Size lists of the tcache model (chunk sizes 0..BINS*16).
const BINS: usize = 64;
/// Addresses remembered per size (glibc's tcache holds 7).
const BIN_DEPTH: usize = 8;
/// Stack ids in the table.
const STACKS: usize = 7;

const OP_GENERIC: u8 = 0x00;
const OP_RAW: u8 = 0x20;
const KIND_MASK: u8 = 0x1f;
/// Op flag bits of allocation events (the `aux` flags they stand for).
const F_STACK: u8 = 1 << 5;
const F_AFTER: u8 = 1 << 6;
const F_PREV_SIZE: u8 = 1 << 7;
/// Op flag bit of `Free`: the chunk's low bits are the model's (its size follows, in 16s).
const F_FREE_LOW: u8 = 1 << 5;

/// Address modes (the low nibble of an allocation's mode byte).
const PTR_BIN: u8 = 0; // ..BIN_DEPTH: the k-th most recent freed address of its size
const PTR_BUMP: u8 = 8;
const PTR_DELTA: u8 = 9;
const PTR_NULL: u8 = 10;
/// realloc only: the block stayed where it was.
const PTR_SAME: u8 = 11;
/// Mode byte bit: the chunk header is written (it is not the predicted one).
const M_CHUNK: u8 = 1 << 4;
/// Stack modes (the mode byte's top 3 bits): 0..STACKS an index, `STACK_NEW` a new id.
const STACK_NEW: u8 = STACKS as u8;
/// realloc's extra byte: an `after_old` word follows.
const R_AFTER_OLD: u8 = 1;

const FLAG_BITS: u64 = AUX_HAS_AFTER_OLD | AUX_HAS_STACK | AUX_HAS_PREV_SIZE | AUX_HAS_AFTER;

/// What encoder and decoder both know of the stream so far (one chunk's worth). Both sides call
/// the same update methods with the same values, so they predict alike by construction.
struct Model {
    last_addr: u64,
    last_after: u64,
    /// The previous allocation's chunk flag bits (`chunk & 7`).
    low_flags: u64,
    /// The previous allocation's end: where a split of the top would start.
    bump: u64,
    /// Each list's entries, oldest first, and a scratch slot (index `BIN_DEPTH`) that
    /// branch-free updates write when they have nothing to write.
    bins: [[u64; BIN_DEPTH + 1]; BINS],
    bin_len: [u8; BINS],
    stacks: [u64; STACKS],
    /// The stack slot a new id takes next (round robin).
    next_stack: u8,
}

impl Model {
    fn new() -> Model {
        Model { last_addr: 0, last_after: 0, low_flags: chunk::PREV_INUSE, bump: 0, bins: [[0; BIN_DEPTH + 1]; BINS], bin_len: [0; BINS], stacks: [0; STACKS], next_stack: 0 }
    }

    /// The list of chunk header `hdr`'s size, if the model keeps one.
    fn bin_of(hdr: u64) -> Option<usize> {
        let b = (chunk::size(hdr) >> 4) as usize;
        (!chunk::is_mmapped(hdr) && b < BINS).then_some(b)
    }

    /// glibc's `request2size` (wrapping: any size word must encode), with the flag bits of the
    /// previous allocation.
    fn predicted_chunk(&self, size: u64) -> u64 {
        (size.wrapping_add(8 + 15) & !15).max(32) | self.low_flags
    }

    /// The address mode that gives `ptr` for an allocation of chunk `hdr` (without changing
    /// anything): null, else the most recent entry of its list, else bump, else `PTR_DELTA`
    /// (write it). Without branches on the data (cmov, no early exits).
    #[inline(always)]
    fn ptr_mode(&self, ptr: u64, hdr: u64) -> u8 {
        let mut mode = if ptr == self.bump { PTR_BUMP } else { PTR_DELTA };
        if let Some(b) = Self::bin_of(hdr) {
            let n = self.bin_len[b] as usize;
            for (i, &x) in self.bins[b][..BIN_DEPTH].iter().enumerate() {
                if i < n && x == ptr {
                    mode = PTR_BIN + (n - 1 - i) as u8;
                }
            }
        }
        if ptr == 0 { PTR_NULL } else { mode }
    }

    /// An allocation of `hdr` returned `ptr` (found with `mode`): a list entry it came from
    /// leaves its list (the list's newest entry takes its place). Without branches on the data.
    #[inline(always)]
    fn allocated(&mut self, mode: u8, ptr: u64, hdr: u64) {
        if let Some(b) = Self::bin_of(hdr) {
            let n = self.bin_len[b] as usize;
            let hit = (mode as usize) < BIN_DEPTH;
            // A hit has n >= 1; a miss moves the scratch slot onto itself.
            let i = if hit { n.wrapping_sub(1 + mode as usize) } else { BIN_DEPTH };
            let last = if hit { n - 1 } else { BIN_DEPTH };
            self.bins[b][i] = self.bins[b][last];
            self.bin_len[b] -= hit as u8;
        }
        let live = ptr != 0;
        self.last_addr = if live { ptr } else { self.last_addr };
        self.low_flags = if live { hdr & chunk::FLAG_MASK } else { self.low_flags };
        self.bump = if live { ptr.wrapping_add(chunk::size(hdr)) } else { self.bump };
    }

    /// The address a (non-delta) mode stands for, or `None` if the mode is invalid here.
    fn ptr_of(&self, mode: u8, hdr: u64) -> Option<u64> {
        match mode {
            PTR_NULL => Some(0),
            PTR_BUMP => Some(self.bump),
            k if (k as usize) < BIN_DEPTH => {
                let b = Self::bin_of(hdr)?;
                let n = self.bin_len[b] as usize;
                ((k as usize) < n).then(|| self.bins[b][n - 1 - k as usize])
            }
            _ => None,
        }
    }

    /// `ptr`, of chunk `hdr`, was freed.
    fn freed(&mut self, ptr: u64, hdr: u64) {
        self.last_addr = ptr;
        if ptr == 0 {
            return;
        }
        if let Some(b) = Self::bin_of(hdr) {
            let n = self.bin_len[b] as usize;
            if n == BIN_DEPTH {
                self.bins[b].copy_within(1..BIN_DEPTH, 0);
                self.bins[b][BIN_DEPTH - 1] = ptr;
            } else {
                self.bins[b][n] = ptr;
                self.bin_len[b] += 1;
            }
        }
    }

    /// The stack mode of `id` (its slot, or `STACK_NEW`: it is written out), the table updated.
    fn stack_slot(&mut self, id: u64) -> u8 {
        let s = self.find_stack(id);
        self.used_stack(s, id);
        s
    }

    fn find_stack(&self, id: u64) -> u8 {
        let mut hit = STACK_NEW;
        for (i, &s) in self.stacks.iter().enumerate() {
            if s == id {
                hit = i as u8;
            }
        }
        hit
    }

    /// Stack `id` was used (from slot `mode`, or new: it takes the next slot round robin, so
    /// that a site keeps its slot and its code while it is used).
    fn used_stack(&mut self, mode: u8, id: u64) {
        if mode == STACK_NEW {
            self.stacks[self.next_stack as usize] = id;
            self.next_stack = if self.next_stack as usize + 1 == STACKS { 0 } else { self.next_stack + 1 };
        }
    }
}

/// Word `i` of `ev`, read exactly once (volatile): the words may be in the ring, which its owner
/// can write while we read, and the model must follow the value written out, not a second load.
#[inline(always)]
fn rd(ev: &[u64], i: usize) -> u64 {
    let w = &ev[i];
    // SAFETY: a reference to an initialised, aligned u64.
    unsafe { core::ptr::read_volatile(w) }
}

/// The varint of `v < 2^28` as the 4 bytes of a little-endian u32 (the first `len` of them are
/// the varint), and `len`. Without a loop (the lengths of random values would mispredict it): the
/// 7-bit groups spread over 4 bytes, the continuation bits on all but the last; the length and
/// the continuation bits from three independent compares (not from the bit length: a longer
/// chain of dependent instructions, which every later field's position waits for).
#[inline(always)]
fn short_varint(v: u64) -> (u32, usize) {
    debug_assert!(v < 1 << 28);
    let spread = (v & 0x7f) | ((v << 1) & 0x7f00) | ((v << 2) & 0x7f_0000) | ((v << 3) & 0x7f00_0000);
    let (c1, c2, c3) = (v >= 1 << 7, v >= 1 << 14, v >= 1 << 21);
    let cont = (c1 as u64) << 7 | (c2 as u64) << 15 | (c3 as u64) << 23;
    ((spread | cont) as u32, 1 + c1 as usize + c2 as usize + c3 as usize)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    if v < 1 << 28 {
        let (bytes, len) = short_varint(v);
        out.extend_from_slice(&bytes.to_le_bytes()[..len]);
        return;
    }
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

const fn zigzag(d: u64) -> u64 {
    (d << 1) ^ (((d as i64) >> 63) as u64)
}

const fn unzigzag(z: u64) -> u64 {
    (z >> 1) ^ (z & 1).wrapping_neg()
}

fn put_delta(out: &mut Vec<u8>, v: u64, base: u64) {
    put_varint(out, zigzag(v.wrapping_sub(base)));
}

/// Bytes reserved for one call event (a realloc writes at most 3 + 8 × 10 + 8 bytes, and a
/// varint's 4-byte store may reach 3 bytes past the last one).
const FAST_ROOM: usize = 112;

/// Writes one call event into [`FAST_ROOM`] bytes reserved at the end of a `Vec`, without
/// capacity checks or branches on the lengths of what it writes; [`Cursor::finish`] makes them
/// part of the `Vec`.
struct Cursor {
    base: *mut u8,
    n: usize,
}

impl Cursor {
    fn new(out: &mut Vec<u8>) -> Cursor {
        out.reserve(FAST_ROOM);
        // SAFETY: `len` is within the allocation (capacity >= len + FAST_ROOM).
        Cursor { base: unsafe { out.as_mut_ptr().add(out.len()) }, n: 0 }
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) {
        debug_assert!(self.n < FAST_ROOM);
        // SAFETY: a call event writes fewer than FAST_ROOM bytes in all (see FAST_ROOM).
        unsafe { self.base.add(self.n).write(b) };
        self.n += 1;
    }

    #[inline(always)]
    fn word(&mut self, w: u64) {
        debug_assert!(self.n + 8 <= FAST_ROOM);
        // SAFETY: as in `byte`.
        unsafe { self.base.add(self.n).cast::<u64>().write_unaligned(w.to_le()) };
        self.n += 8;
    }

    /// `v` as a varint (as [`put_varint`] writes it), kept only if `keep`.
    #[inline(always)]
    fn varint_if(&mut self, v: u64, keep: bool) {
        if v < 1 << 28 {
            let (bytes, len) = short_varint(v);
            debug_assert!(self.n + 4 <= FAST_ROOM);
            // SAFETY: as in `byte` (the 4-byte store is inside FAST_ROOM).
            unsafe { self.base.add(self.n).cast::<u32>().write_unaligned(bytes.to_le()) };
            self.n += if keep { len } else { 0 };
        } else if keep {
            let mut v = v;
            while v >= 0x80 {
                self.byte(v as u8 | 0x80);
                v >>= 7;
            }
            self.byte(v as u8);
        }
    }

    #[inline(always)]
    fn varint(&mut self, v: u64) {
        self.varint_if(v, true);
    }

    /// Overwrite byte `i` already written (an event's mode byte, known last).
    #[inline(always)]
    fn set(&mut self, i: usize, b: u8) {
        assert!(i < self.n);
        // SAFETY: `i < n`: inside what was written.
        unsafe { self.base.add(i).write(b) };
    }

    fn finish(self, out: &mut Vec<u8>) {
        debug_assert!(self.n <= FAST_ROOM);
        // SAFETY: the `n` bytes after `len` were written, and lie within the capacity.
        unsafe { out.set_len(out.len() + self.n) };
    }
}

/// A `Free` whose length fits its flags.
#[inline(always)]
fn encode_free(m: &mut Model, aux: u64, ev: &[u64], out: &mut Vec<u8>) {
    let hdr = aux & AUX_CHUNK_MASK;
    let ptr = rd(ev, 1);
    let low = hdr & 15 == m.low_flags;
    let after = aux & AUX_HAS_AFTER != 0;
    let mut c = Cursor::new(out);
    c.byte(EventKind::Free as u8 | if after { F_AFTER } else { 0 } | if low { F_FREE_LOW } else { 0 });
    c.varint(zigzag(ptr.wrapping_sub(m.last_addr)));
    c.varint(if low { hdr >> 4 } else { hdr });
    if after {
        let a = rd(ev, 2);
        c.varint(zigzag(a.wrapping_sub(m.last_after)));
        m.last_after = a;
    }
    c.finish(out);
    m.freed(ptr, hdr);
}

/// A `Malloc`, `Calloc`, `Valloc` or `Pvalloc` whose length fits its flags (the most common
/// events: the address mode and the list update without branches on the data).
#[inline(always)]
fn encode_alloc(m: &mut Model, kind: u8, aux: u64, ev: &[u64], out: &mut Vec<u8>) {
    let hdr = aux & AUX_CHUNK_MASK;
    let (ptr, size) = (rd(ev, 1), rd(ev, 2));
    let mut c = Cursor::new(out);
    c.byte(kind | alloc_flags(aux));
    c.byte(0);
    c.varint(size);
    let pmode = m.ptr_mode(ptr, hdr);
    let chunk_written = hdr != m.predicted_chunk(size);
    c.varint_if(hdr, chunk_written);
    c.varint_if(zigzag(ptr.wrapping_sub(m.last_addr)), pmode == PTR_DELTA);
    let mut mode = pmode | if chunk_written { M_CHUNK } else { 0 };
    m.allocated(pmode, ptr, hdr);
    mode |= encode_tail(m, &mut c, aux, ev, 3);
    c.set(1, mode);
    c.finish(out);
}

/// The optional words of an allocation event from word `rest` on — `[prev_size] [stack]
/// [after_old] [after]` (only realloc kinds have `after_old`: [`expected_len`]) — written to
/// `c`; returns the stack mode's bits of the mode byte.
#[inline(always)]
fn encode_tail(m: &mut Model, c: &mut Cursor, aux: u64, ev: &[u64], mut rest: usize) -> u8 {
    let mut bits = 0;
    if aux & AUX_HAS_PREV_SIZE != 0 {
        c.varint(rd(ev, rest));
        rest += 1;
    }
    if aux & AUX_HAS_STACK != 0 {
        let id = rd(ev, rest);
        rest += 1;
        let s = m.stack_slot(id);
        bits = s << 5;
        if s == STACK_NEW {
            c.word(id);
        }
    }
    for flag in [AUX_HAS_AFTER_OLD, AUX_HAS_AFTER] {
        if aux & flag != 0 {
            let a = rd(ev, rest);
            rest += 1;
            c.varint(zigzag(a.wrapping_sub(m.last_after)));
            m.last_after = a;
        }
    }
    bits
}

/// The words a call event of `kind` must have for the flags in `aux`, if the compact form
/// covers it.
fn expected_len(kind: u8, aux: u64) -> Option<usize> {
    let flags = aux & FLAG_BITS;
    let bit = |f: u64| (flags & f != 0) as usize;
    match EventKind::from_u8(kind)? {
        EventKind::Malloc | EventKind::Calloc | EventKind::Valloc | EventKind::Pvalloc | EventKind::Memalign | EventKind::PosixMemalign | EventKind::AlignedAlloc => {
            (flags & AUX_HAS_AFTER_OLD == 0).then(|| EventKind::from_u8(kind).map_or(0, EventKind::base_words) + bit(AUX_HAS_PREV_SIZE) + bit(AUX_HAS_STACK) + bit(AUX_HAS_AFTER))
        }
        EventKind::Realloc | EventKind::Reallocarray => Some(5 + bit(AUX_HAS_PREV_SIZE) + bit(AUX_HAS_STACK) + bit(AUX_HAS_AFTER_OLD) + bit(AUX_HAS_AFTER)),
        EventKind::Free => (flags & !AUX_HAS_AFTER == 0).then(|| 2 + bit(AUX_HAS_AFTER)),
        _ => None,
    }
}

/// Append the compact encoding of `words` to `out`.
pub fn encode(words: &[u64], out: &mut Vec<u8>) {
    out.reserve(words.len() * 3);
    let mut m = Model::new();
    let mut i = 0;
    while i < words.len() {
        let w0 = rd(words, i);
        let (kind, len, aux) = mtrace_protocol::event::split_header(w0);
        if len == 0 || len > words.len() - i {
            out.push(OP_RAW);
            put_varint(out, (words.len() - i) as u64);
            for w in &words[i..] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            return;
        }
        let ev = &words[i..i + len];
        if expected_len(kind, aux) == Some(len) {
            // The encoders read each word once ([`rd`]).
            match kind {
                k if k == EventKind::Free as u8 => encode_free(&mut m, aux, ev, out),
                k if k == EventKind::Malloc as u8 || k == EventKind::Calloc as u8 || k == EventKind::Valloc as u8 || k == EventKind::Pvalloc as u8 => encode_alloc(&mut m, kind, aux, ev, out),
                _ => encode_call(&mut m, kind, aux, ev, out),
            }
        } else {
            out.push(OP_GENERIC);
            put_varint(out, len as u64);
            put_varint(out, w0);
            let mut prev = 0u64;
            for k in 1..len {
                let w = rd(ev, k);
                put_delta(out, w, prev);
                prev = w;
            }
        }
        i += len;
    }
}

/// The op byte's allocation flags for `aux`.
fn alloc_flags(aux: u64) -> u8 {
    (if aux & AUX_HAS_STACK != 0 { F_STACK } else { 0 }) | (if aux & AUX_HAS_AFTER != 0 { F_AFTER } else { 0 }) | (if aux & AUX_HAS_PREV_SIZE != 0 { F_PREV_SIZE } else { 0 })
}

/// A realloc, reallocarray or memalign-family event whose length fits its kind and flags
/// ([`expected_len`]).
fn encode_call(m: &mut Model, kind: u8, aux: u64, ev: &[u64], out: &mut Vec<u8>) {
    let hdr = aux & AUX_CHUNK_MASK;
    let realloc = kind == EventKind::Realloc as u8 || kind == EventKind::Reallocarray as u8;
    let mut c = Cursor::new(out);
    c.byte(kind | alloc_flags(aux));
    c.byte(0);
    // Fields in event order: realloc's old_ptr, new_ptr, size, old_chunk; the others' ptr, size,
    // align; then the tail.
    let (ptr, size, rest) = if realloc { (rd(ev, 2), rd(ev, 3), 5) } else { (rd(ev, 1), rd(ev, 2), 4) };
    let mut mode;
    if realloc {
        let (old, old_chunk) = (rd(ev, 1), rd(ev, 4));
        c.byte(if aux & AUX_HAS_AFTER_OLD != 0 { R_AFTER_OLD } else { 0 });
        c.varint(zigzag(old.wrapping_sub(m.last_addr)));
        c.varint(old_chunk);
        c.varint(size);
        mode = if ptr == old && ptr != 0 { PTR_SAME } else { m.ptr_mode(ptr, hdr) };
        if hdr != m.predicted_chunk(size) {
            mode |= M_CHUNK;
            c.varint(hdr);
        }
        if mode & 15 == PTR_DELTA {
            c.varint(zigzag(ptr.wrapping_sub(old)));
        }
        // The old block is free if it moved (or was freed by realloc(p, 0)).
        if old != 0 && ptr != old {
            m.freed(old, old_chunk);
        }
        m.last_addr = old;
    } else {
        c.varint(size);
        mode = m.ptr_mode(ptr, hdr);
        if hdr != m.predicted_chunk(size) {
            mode |= M_CHUNK;
            c.varint(hdr);
        }
        c.varint(rd(ev, 3));
        if mode & 15 == PTR_DELTA {
            c.varint(zigzag(ptr.wrapping_sub(m.last_addr)));
        }
    }
    m.allocated(mode & 15, ptr, hdr);
    mode |= encode_tail(m, &mut c, aux, ev, rest);
    c.set(1, mode);
    c.finish(out);
}

/// Reads what [`encode`] wrote, checking every byte.
struct Input<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.pos).ok_or("compact chunk cut short")?;
        self.pos += 1;
        Ok(v)
    }
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                if shift == 63 && b > 1 {
                    break;
                }
                return Ok(v);
            }
        }
        Err(format!("compact chunk: a number at byte {} is longer than 64 bits", self.pos))
    }
    fn delta(&mut self, base: u64) -> Result<u64, String> {
        Ok(base.wrapping_add(unzigzag(self.varint()?)))
    }
    fn word(&mut self) -> Result<u64, String> {
        let b = self.b.get(self.pos..self.pos + 8).ok_or("compact chunk cut short")?;
        self.pos += 8;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "compact chunk cut short")?))
    }
}

/// Decode a compact chunk into exactly `n_words` words, appended to `out`.
pub fn decode(bytes: &[u8], n_words: usize, out: &mut Vec<u64>) -> Result<(), String> {
    let start = out.len();
    let mut m = Model::new();
    let mut inp = Input { b: bytes, pos: 0 };
    let room = |out: &Vec<u64>, k: usize| -> Result<(), String> {
        if k > n_words - (out.len() - start) { Err(format!("compact chunk holds more than the {n_words} words it announces")) } else { Ok(()) }
    };
    while inp.pos < bytes.len() {
        let at = inp.pos;
        let op = inp.byte()?;
        match op {
            OP_RAW => {
                let n = inp.varint()?;
                room(out, usize::try_from(n).unwrap_or(usize::MAX))?;
                for _ in 0..n {
                    out.push(inp.word()?);
                }
            }
            OP_GENERIC => {
                let len = inp.varint()?;
                if !(1..=255).contains(&len) {
                    return Err(format!("compact chunk: an event of {len} words at byte {at}"));
                }
                room(out, len as usize)?;
                out.push(inp.varint()?);
                let mut prev = 0u64;
                for _ in 1..len {
                    prev = inp.delta(prev)?;
                    out.push(prev);
                }
            }
            _ => decode_call(&mut m, op, &mut inp, out, &room).map_err(|e| format!("{e} (event at byte {at})"))?,
        }
    }
    if out.len() - start != n_words {
        return Err(format!("compact chunk decodes to {} words, not the {n_words} it announces", out.len() - start));
    }
    Ok(())
}

/// Checks that `k` more words fit what the chunk announced.
type Room<'a> = dyn Fn(&Vec<u64>, usize) -> Result<(), String> + 'a;

fn decode_call(m: &mut Model, op: u8, inp: &mut Input, out: &mut Vec<u64>, room: &Room) -> Result<(), String> {
    let kind = op & KIND_MASK;
    let k = EventKind::from_u8(kind).filter(|k| k.is_allocation() || *k == EventKind::Free).ok_or_else(|| format!("compact chunk: unknown op {op:#x}"))?;
    if k == EventKind::Free {
        if op & F_PREV_SIZE != 0 {
            return Err(format!("compact chunk: unknown op {op:#x}"));
        }
        let after = op & F_AFTER != 0;
        let ptr = inp.delta(m.last_addr)?;
        let c = inp.varint()?;
        let hdr = if op & F_FREE_LOW != 0 { c.checked_mul(16).filter(|h| *h <= AUX_CHUNK_MASK).ok_or("compact chunk: a free's chunk size is too large")? | m.low_flags } else { c };
        if hdr > AUX_CHUNK_MASK {
            return Err("compact chunk: a free's chunk header is too large".into());
        }
        let aux = hdr | if after { AUX_HAS_AFTER } else { 0 };
        let len = 2 + after as usize;
        room(out, len)?;
        out.push(mtrace_protocol::event::header(k, len, aux));
        out.push(ptr);
        if after {
            m.last_after = inp.delta(m.last_after)?;
            out.push(m.last_after);
        }
        m.freed(ptr, hdr);
        return Ok(());
    }
    let realloc = matches!(k, EventKind::Realloc | EventKind::Reallocarray);
    let mode = inp.byte()?;
    let mut aux_flags = 0;
    if op & F_STACK != 0 {
        aux_flags |= AUX_HAS_STACK;
    }
    if op & F_AFTER != 0 {
        aux_flags |= AUX_HAS_AFTER;
    }
    if op & F_PREV_SIZE != 0 {
        aux_flags |= AUX_HAS_PREV_SIZE;
    }
    let pmode = mode & 15;
    let chunk_written = mode & M_CHUNK != 0;
    let smode = mode >> 5;
    if op & F_STACK == 0 && smode != 0 {
        return Err(format!("compact chunk: a stack mode without a stack ({mode:#x})"));
    }
    let bad_mode = || format!("compact chunk: address mode {pmode} does not apply");
    let mut fields: [u64; 8] = [0; 8];
    let mut n;
    let (ptr, hdr);
    if realloc {
        let r = inp.byte()?;
        if r & !R_AFTER_OLD != 0 {
            return Err(format!("compact chunk: realloc flags {r:#x}"));
        }
        if r & R_AFTER_OLD != 0 {
            aux_flags |= AUX_HAS_AFTER_OLD;
        }
        let old = inp.delta(m.last_addr)?;
        let old_chunk = inp.varint()?;
        let size = inp.varint()?;
        hdr = if chunk_written { inp.varint()? } else { m.predicted_chunk(size) };
        ptr = match pmode {
            PTR_SAME if old != 0 => old,
            PTR_DELTA => inp.delta(old)?,
            _ => m.ptr_of(pmode, hdr).ok_or_else(bad_mode)?,
        };
        if old != 0 && ptr != old {
            m.freed(old, old_chunk);
        }
        m.last_addr = old;
        fields[..4].copy_from_slice(&[old, ptr, size, old_chunk]);
        n = 4;
    } else {
        let size = inp.varint()?;
        hdr = if chunk_written { inp.varint()? } else { m.predicted_chunk(size) };
        fields[0] = 0;
        fields[1] = size;
        n = 2;
        if k.base_words() == 4 {
            fields[2] = inp.varint()?;
            n = 3;
        }
        ptr = match pmode {
            PTR_DELTA => inp.delta(m.last_addr)?,
            _ => m.ptr_of(pmode, hdr).ok_or_else(bad_mode)?,
        };
        fields[0] = ptr;
    }
    if hdr > AUX_CHUNK_MASK {
        return Err("compact chunk: a chunk header is too large".into());
    }
    m.allocated(if pmode == PTR_SAME { PTR_DELTA } else { pmode }, ptr, hdr);
    if op & F_PREV_SIZE != 0 {
        fields[n] = inp.varint()?;
        n += 1;
    }
    if op & F_STACK != 0 {
        let id = if smode == STACK_NEW { inp.word()? } else { m.stacks[smode as usize] };
        m.used_stack(smode, id);
        fields[n] = id;
        n += 1;
    }
    if aux_flags & AUX_HAS_AFTER_OLD != 0 {
        m.last_after = inp.delta(m.last_after)?;
        fields[n] = m.last_after;
        n += 1;
    }
    if aux_flags & AUX_HAS_AFTER != 0 {
        m.last_after = inp.delta(m.last_after)?;
        fields[n] = m.last_after;
        n += 1;
    }
    room(out, n + 1)?;
    out.push(mtrace_protocol::event::header(k, n + 1, hdr | aux_flags));
    out.extend_from_slice(&fields[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(words: &[u64]) -> usize {
        let mut b = Vec::new();
        encode(words, &mut b);
        let mut back = Vec::new();
        decode(&b, words.len(), &mut back).unwrap_or_else(|e| panic!("{e}: {words:x?}"));
        assert_eq!(back, words);
        b.len()
    }

    /// A raw tail claiming 2^64 - 1 words after one word of output: an error, not an overflow of
    /// the room check (found in review), and nothing beyond the announced words.
    #[test]
    fn a_huge_raw_count_is_an_error() {
        let mut bytes = vec![OP_GENERIC, 1, 5, OP_RAW];
        bytes.extend_from_slice(&[0xff; 9]);
        bytes.push(0x01);
        bytes.extend_from_slice(&[7; 16]);
        let mut out = Vec::new();
        let e = decode(&bytes, 1, &mut out).unwrap_err();
        assert!(e.contains("more than the 1 words"), "{e}");
        assert!(out.len() <= 1);
    }

    /// Every kind the model knows takes its own op (not the generic one), with its flags.
    #[test]
    fn call_events_take_their_fast_path() {
        use mtrace_protocol::event::header;
        let cases: [(EventKind, u64, Vec<u64>); 5] = [
            (EventKind::Malloc, 0x31 | AUX_HAS_STACK, vec![0x5555_0000_1010, 32, 77]),
            (EventKind::Calloc, 0x31 | AUX_HAS_AFTER, vec![0x5555_0000_1010, 32, 0x1234]),
            (EventKind::Memalign, 0x51, vec![0x5555_0000_1040, 32, 64]),
            (EventKind::Realloc, 0x51 | AUX_HAS_AFTER_OLD, vec![0x5555_0000_1010, 0x5555_0000_1080, 60, 0x31, 0x4444]),
            (EventKind::Free, 0x31 | AUX_HAS_AFTER, vec![0x5555_0000_1010, 0x4321]),
        ];
        for (kind, aux, rest) in cases {
            let mut words = vec![header(kind, rest.len() + 1, aux)];
            words.extend_from_slice(&rest);
            let mut b = Vec::new();
            encode(&words, &mut b);
            assert_eq!(b[0] & KIND_MASK, kind as u8, "{kind:?}: {b:x?}");
            assert!(b.len() < 20, "{kind:?}: {} bytes", b.len());
            round_trip(&words);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_words_round_trip(words in proptest::collection::vec(proptest::num::u64::ANY, 0..64)) {
            round_trip(&words);
        }

        #[test]
        fn event_like_words_round_trip(evs in proptest::collection::vec((1u8..45, 0u64..1 << 48, proptest::collection::vec(proptest::prop_oneof![proptest::num::u64::ANY, 0u64..4096, 0x5555_0000_0000u64..0x5555_0010_0000], 0..8)), 0..40)) {
            let mut words = Vec::new();
            for (kind, aux, rest) in evs {
                words.push(kind as u64 | ((rest.len() as u64 + 1) << 8) | (aux << 16));
                words.extend_from_slice(&rest);
            }
            round_trip(&words);
        }

        /// Well-formed call events (every kind the model knows, every flag, addresses and stacks
        /// from small pools so that the predictions hit and miss) round-trip.
        #[test]
        fn well_formed_events_round_trip(evs in proptest::collection::vec((0usize..11, 0u64..1100, 0usize..24, 0u8..16, 0usize..10, 0u64..3), 0..300)) {
            use mtrace_protocol::event::header;
            let pool: Vec<u64> = (0..24).map(|i| 0x5555_0000_0000 + i * 48 + (i % 3) * 0x10_0000).collect();
            let stacks = [11u64, 22, 33, 44, 55, 66, 77, 88, 99, 1010];
            let mut words = Vec::new();
            for (k, size, p, flags, st, low) in evs {
                let kinds = [EventKind::Malloc, EventKind::Calloc, EventKind::Valloc, EventKind::Pvalloc, EventKind::Memalign, EventKind::PosixMemalign, EventKind::AlignedAlloc, EventKind::Realloc, EventKind::Reallocarray, EventKind::Free, EventKind::Free];
                let kind = kinds[k];
                let ptr = if size == 1099 { 0 } else { pool[p] };
                let hdr = if size % 7 == 0 { size * 16 + low } else { ((size + 23) & !15).max(32) | low };
                let mut aux = hdr & AUX_CHUNK_MASK;
                let mut ev = vec![0, ];
                match kind {
                    EventKind::Free => {
                        ev.push(ptr);
                        if flags & 1 != 0 { aux |= AUX_HAS_AFTER; ev.push(0x1234_5678 + size); }
                    }
                    _ => {
                        if matches!(kind, EventKind::Realloc | EventKind::Reallocarray) {
                            ev.extend_from_slice(&[pool[(p + 1) % 24], if flags & 8 != 0 { pool[(p + 1) % 24] } else { ptr }, size, 0x51]);
                        } else {
                            ev.extend_from_slice(&[ptr, size]);
                            if kind.base_words() == 4 { ev.push(64); }
                        }
                        if flags & 2 != 0 { aux |= AUX_HAS_PREV_SIZE; ev.push(size * 3); }
                        if flags & 4 != 0 { aux |= AUX_HAS_STACK; ev.push(stacks[st]); }
                        if flags & 8 != 0 && matches!(kind, EventKind::Realloc | EventKind::Reallocarray) { aux |= AUX_HAS_AFTER_OLD; ev.push(0x99_0000 + size); }
                        if flags & 1 != 0 { aux |= AUX_HAS_AFTER; ev.push(0x98_0000 + size); }
                    }
                }
                ev[0] = header(kind, ev.len(), aux);
                words.extend_from_slice(&ev);
            }
            round_trip(&words);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200), n in 0usize..100) {
            let mut out = Vec::new();
            let _ = decode(&bytes, n, &mut out);
            proptest::prop_assert!(out.len() <= n);
        }
    }
}
