//! The mutations: what a damaged variant of a trace differs by, how one is drawn at random
//! (deterministically, from a seed), and how it is applied to a [`Layout`].
//!
//! Three levels: the file's bytes (what a bad disk or a bad copy does: caught by the checksums
//! and sequence numbers, so every such change must be an error), whole frames (duplicated,
//! swapped, moved, removed: the sequence numbers must catch them), and edits inside decompressed
//! payloads — record headers and bodies, event words and headers — compressed again with the
//! checksum right, so that they reach the decoder and the analysis (what a buggy or hostile
//! writer does: no error is owed, only no panic, no hang and bounded memory).

use std::fmt;

use mtrace_protocol::event::{self, EventKind};
use mtrace_protocol::tracefile::FRAME_HEADER_LEN;

use super::layout::Layout;

/// A small deterministic generator (splitmix64): the same seed gives the same variants.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

/// Which length of a frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenField {
    Raw,
    Stored,
}

/// One change to a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// XOR the byte at `pos` of the file with `mask`.
    FlipBits { pos: usize, mask: u8 },
    /// Overwrite `len` bytes from `pos` with `byte` (0: a zeroed region).
    ByteRun { pos: usize, len: usize, byte: u8 },
    /// Keep the first `len` bytes.
    Truncate { len: usize },
    /// Set a frame header's length field; `fix_crc`: with the checksum made to match.
    FrameLen { frame: usize, field: LenField, value: u32, fix_crc: bool },
    /// Frame `frame` again, inserted before frame `before` (the frame count: at the end).
    DupFrame { frame: usize, before: usize },
    SwapFrames { a: usize, b: usize },
    RemoveFrame { frame: usize },
    /// Frame `frame` taken out and put back before what was frame `before`.
    MoveFrame { frame: usize, before: usize },
    /// Inside frame `frame`'s payload (compressed again, checksum right): XOR a byte.
    PayloadFlip { frame: usize, pos: usize, mask: u8 },
    /// Inside a payload: overwrite a run of bytes.
    PayloadRun { frame: usize, pos: usize, len: usize, byte: u8 },
    /// Inside a payload: keep its first `len` bytes.
    PayloadCut { frame: usize, len: usize },
    /// Set a record's `body_len`.
    RecordLen { frame: usize, record: usize, value: u32 },
    /// Set a record's type byte.
    RecordType { frame: usize, record: usize, ty: u8 },
    /// Write `value` (`width` bytes, little-endian) at byte `at` of a record's body.
    RecordField { frame: usize, record: usize, at: usize, width: usize, value: u64 },
    /// Duplicate, remove or swap whole records of a payload.
    DupRecord { frame: usize, record: usize },
    DropRecord { frame: usize, record: usize },
    SwapRecords { frame: usize, a: usize, b: usize },
    /// Set word `word` of a chunk's event words (the chunk encoded again as it was).
    EventWord { frame: usize, record: usize, word: usize, value: u64 },
    /// Duplicate or remove the event at word `word` of a chunk (`len` words), or cut the chunk's
    /// words to `word`.
    DupEvent { frame: usize, record: usize, word: usize, len: usize },
    DropEvent { frame: usize, record: usize, word: usize, len: usize },
    CutEvents { frame: usize, record: usize, word: usize },
}

impl fmt::Display for Mutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Mutation {
    /// Damage an honest file never has, that a reader must report as an error: the file's bytes
    /// changed or its frames moved (`out`: the mutated file), other than a cut at a frame
    /// boundary (a recording that stopped there). Edits inside payloads are owed no error.
    pub fn owes_error(&self, l: &Layout, out: &[u8]) -> bool {
        let clean_cut = l.bytes.starts_with(out) && l.boundaries().contains(&out.len());
        self.is_file_level() && out != l.bytes && !clean_cut
    }

    /// A mutation of the file's bytes or frames (checked by the frame checksums and sequence
    /// numbers) rather than of what is inside a payload.
    pub fn is_file_level(&self) -> bool {
        matches!(
            self,
            Mutation::FlipBits { .. }
                | Mutation::ByteRun { .. }
                | Mutation::Truncate { .. }
                | Mutation::FrameLen { .. }
                | Mutation::DupFrame { .. }
                | Mutation::SwapFrames { .. }
                | Mutation::RemoveFrame { .. }
                | Mutation::MoveFrame { .. }
        )
    }

    /// The file with this mutation applied (`None`: it does not apply to this layout).
    pub fn apply(&self, l: &Layout) -> Option<Vec<u8>> {
        let mut b = l.bytes.clone();
        let n = l.frames.len();
        match *self {
            Mutation::FlipBits { pos, mask } => *b.get_mut(pos)? ^= mask,
            Mutation::ByteRun { pos, len, byte } => {
                let end = pos.checked_add(len)?.min(b.len());
                b.get_mut(pos..end)?.fill(byte);
            }
            Mutation::Truncate { len } => b.truncate(len),
            Mutation::FrameLen { frame, field, value, fix_crc } => return frame_len(l, frame, field, value, fix_crc),
            Mutation::DupFrame { frame, before } => {
                let mut order: Vec<usize> = (0..n).collect();
                order.insert(before.min(n), frame.min(n.checked_sub(1)?));
                return Some(l.with_frames(&order));
            }
            Mutation::SwapFrames { a, b: c } => {
                let mut order: Vec<usize> = (0..n).collect();
                if a >= n || c >= n {
                    return None;
                }
                order.swap(a, c);
                return Some(l.with_frames(&order));
            }
            Mutation::RemoveFrame { frame } => return Some(l.with_frames(&(0..n).filter(|&i| i != frame).collect::<Vec<_>>())),
            Mutation::MoveFrame { frame, before } => {
                let mut order: Vec<usize> = (0..n).filter(|&i| i != frame).collect();
                order.insert(before.min(order.len()), frame);
                return Some(l.with_frames(&order));
            }
            _ => return self.apply_payload(l),
        }
        Some(b)
    }

    /// Mutations inside a frame's payload.
    fn apply_payload(&self, l: &Layout) -> Option<Vec<u8>> {
        let frame = match *self {
            Mutation::PayloadFlip { frame, .. }
            | Mutation::PayloadRun { frame, .. }
            | Mutation::PayloadCut { frame, .. }
            | Mutation::RecordLen { frame, .. }
            | Mutation::RecordType { frame, .. }
            | Mutation::RecordField { frame, .. }
            | Mutation::DupRecord { frame, .. }
            | Mutation::DropRecord { frame, .. }
            | Mutation::SwapRecords { frame, .. }
            | Mutation::EventWord { frame, .. }
            | Mutation::DupEvent { frame, .. }
            | Mutation::DropEvent { frame, .. }
            | Mutation::CutEvents { frame, .. } => frame,
            _ => return None,
        };
        let f = l.frames.get(frame)?;
        let mut raw = f.raw.clone();
        let rec = |i: usize| f.records.get(i);
        match *self {
            Mutation::PayloadFlip { pos, mask, .. } => *raw.get_mut(pos)? ^= mask,
            Mutation::PayloadRun { pos, len, byte, .. } => {
                let end = pos.checked_add(len)?.min(raw.len());
                raw.get_mut(pos..end)?.fill(byte);
            }
            Mutation::PayloadCut { len, .. } => raw.truncate(len),
            Mutation::RecordLen { record, value, .. } => raw[rec(record)?.at + 4..][..4].copy_from_slice(&value.to_le_bytes()),
            Mutation::RecordType { record, ty, .. } => raw[rec(record)?.at] = ty,
            Mutation::RecordField { record, at, width, value, .. } => {
                let r = rec(record)?;
                let start = r.at + 8 + at;
                raw.get_mut(start..start + width)?.copy_from_slice(&value.to_le_bytes()[..width]);
            }
            Mutation::DupRecord { record, .. } => {
                let r = rec(record)?;
                let copy = raw[r.at..r.end].to_vec();
                raw.splice(r.end..r.end, copy);
            }
            Mutation::DropRecord { record, .. } => {
                let r = rec(record)?;
                raw.drain(r.at..r.end);
            }
            Mutation::SwapRecords { a, b, .. } => {
                let (x, y) = (rec(a.min(b))?, rec(a.max(b))?);
                if a == b {
                    return None;
                }
                let mut out = raw[..x.at].to_vec();
                out.extend_from_slice(&raw[y.at..y.end]);
                out.extend_from_slice(&raw[x.end..y.at]);
                out.extend_from_slice(&raw[x.at..x.end]);
                out.extend_from_slice(&raw[y.end..]);
                raw = out;
            }
            _ => return self.apply_events(l, frame),
        }
        Some(l.with_payload(frame, &raw))
    }

    /// Mutations of a chunk's event words.
    fn apply_events(&self, l: &Layout, frame: usize) -> Option<Vec<u8>> {
        let record = match *self {
            Mutation::EventWord { record, .. } | Mutation::DupEvent { record, .. } | Mutation::DropEvent { record, .. } | Mutation::CutEvents { record, .. } => record,
            _ => return None,
        };
        let f = &l.frames[frame];
        let r = f.records.get(record)?;
        let c = r.chunk.as_ref()?;
        let mut words = c.chunk.words.clone();
        match *self {
            Mutation::EventWord { word, value, .. } => *words.get_mut(word)? = value,
            Mutation::DupEvent { word, len, .. } => {
                let copy = words.get(word..word.checked_add(len)?)?.to_vec();
                words.splice(word..word, copy);
            }
            Mutation::DropEvent { word, len, .. } => {
                words.get(word..word.checked_add(len)?)?;
                words.drain(word..word + len);
            }
            Mutation::CutEvents { word, .. } => words.truncate(word),
            _ => return None,
        }
        let mut raw = f.raw[..r.at].to_vec();
        raw.extend_from_slice(&c.encode(&words));
        raw.extend_from_slice(&f.raw[r.end..]);
        Some(l.with_payload(frame, &raw))
    }
}

/// [`Mutation::FrameLen`].
fn frame_len(l: &Layout, frame: usize, field: LenField, value: u32, fix_crc: bool) -> Option<Vec<u8>> {
    let f = l.frames.get(frame)?;
    let mut b = l.bytes.clone();
    let at = f.offset + if field == LenField::Raw { 4 } else { 8 };
    b[at..at + 4].copy_from_slice(&value.to_le_bytes());
    if fix_crc {
        // The checksum of the header as it is now, over as many payload bytes as it claims.
        let h: [u8; FRAME_HEADER_LEN] = b[f.offset..f.offset + FRAME_HEADER_LEN].try_into().ok()?;
        let stored_len = u32::from_le_bytes(h[8..12].try_into().ok()?) as usize;
        let start = f.offset + FRAME_HEADER_LEN;
        let end = start.saturating_add(stored_len).min(b.len());
        let crc = mtrace_collector::trace::frame_crc(&h, &b[start..end]);
        b[f.offset + 12..f.offset + 16].copy_from_slice(&crc.to_le_bytes());
    }
    Some(b)
}

/// Values worth writing over a word that was `old`: the extremes, small numbers, the word off by
/// one, one bit flipped, and addresses the trace uses (so that blocks collide).
fn word_value(rng: &mut Rng, old: u64, addresses: &[u64]) -> u64 {
    match rng.below(12) {
        0 | 1 => u64::MAX,
        2 => 0,
        3 => rng.below(64) as u64,
        4 => old.wrapping_add(1),
        5 => old.wrapping_sub(1),
        6 | 7 => old ^ (1 << rng.below(64)),
        8 => 1 << rng.below(64),
        9 if !addresses.is_empty() => rng.pick(addresses),
        10 => old.wrapping_add((rng.below(8) as u64 + 1) * 16),
        _ => rng.next(),
    }
}

/// A new header word for an event whose header was `old`: another kind, another length, an
/// optional-word flag toggled, other chunk bits.
fn header_value(rng: &mut Rng, old: u64) -> u64 {
    let (k, len, aux) = event::split_header(old);
    let kinds = EventKind::ALL;
    let with = |k: u8, len: usize, aux: u64| k as u64 | ((len as u64) & 0xff) << 8 | aux << 16;
    match rng.below(8) {
        0 => with(rng.pick(kinds) as u8, len, aux),
        1 => with(rng.below(256) as u8, len, aux),
        2 => with(k, rng.pick(&[0, 1, 2, 255, len + 1, len.saturating_sub(1)]), aux),
        3 => with(k, len, aux ^ rng.pick(&[event::AUX_HAS_AFTER, event::AUX_HAS_STACK, event::AUX_HAS_PREV_SIZE, event::AUX_HAS_AFTER_OLD])),
        4 => with(k, len, aux ^ rng.pick(&[mtrace_protocol::event::chunk::IS_MMAPPED, mtrace_protocol::event::chunk::NON_MAIN_ARENA])),
        5 => with(k, len, aux & !event::AUX_CHUNK_MASK | (rng.next() & event::AUX_CHUNK_MASK)),
        6 => with(k, len, (1 << 48) - 1),
        _ => old ^ (1 << (16 + rng.below(48))),
    }
}

/// Draw one mutation of `l` (`None` when the draw does not fit this trace; draw again).
pub fn draw(rng: &mut Rng, l: &Layout) -> Option<Mutation> {
    let n = l.frames.len();
    let size = l.bytes.len();
    let frame = rng.below(n);
    let m = match rng.below(100) {
        0..=7 => Mutation::FlipBits { pos: rng.below(size), mask: 1 << rng.below(8) },
        8..=11 => Mutation::ByteRun { pos: rng.below(size), len: 1 + rng.below(64), byte: rng.pick(&[0xff, 0x55, 0x80, 0x01]) },
        12..=15 => Mutation::ByteRun { pos: rng.below(size), len: 1 + rng.below(4096), byte: 0 },
        16..=19 => Mutation::Truncate { len: in_frame(rng, l) },
        20..=22 => frame_len_mutation(rng, l, frame),
        23..=24 => Mutation::DupFrame { frame, before: rng.below(n + 1) },
        25..=26 => Mutation::SwapFrames { a: frame, b: rng.below(n) },
        27 => Mutation::RemoveFrame { frame },
        28 => Mutation::MoveFrame { frame, before: rng.below(n) },
        29..=35 => return draw_payload(rng, l, frame),
        36..=49 => return draw_record(rng, l, frame),
        _ => return draw_event(rng, l),
    };
    Some(m)
}

/// A length inside a frame (its header or its payload).
fn in_frame(rng: &mut Rng, l: &Layout) -> usize {
    let f = &l.frames[rng.below(l.frames.len())];
    f.offset + 1 + rng.below(f.len - 1)
}

fn frame_len_mutation(rng: &mut Rng, l: &Layout, frame: usize) -> Mutation {
    let f = &l.frames[frame];
    let stored = (f.len - 24) as u32;
    let raw = f.raw.len() as u32;
    let max_raw = mtrace_protocol::tracefile::MAX_FRAME_RAW as u32;
    let field = if rng.chance(50) { LenField::Raw } else { LenField::Stored };
    let old = if field == LenField::Raw { raw } else { stored };
    let random = rng.next() as u32;
    let value = rng.pick(&[u32::MAX, 0, max_raw, max_raw + 1, old + 1, old.wrapping_sub(1), old.wrapping_mul(2), random]);
    Mutation::FrameLen { frame, field, value, fix_crc: rng.chance(60) }
}

fn draw_payload(rng: &mut Rng, l: &Layout, frame: usize) -> Option<Mutation> {
    let len = l.frames[frame].raw.len();
    if len == 0 {
        return None;
    }
    Some(match rng.below(4) {
        0 | 1 => Mutation::PayloadFlip { frame, pos: rng.below(len), mask: 1 << rng.below(8) },
        2 => Mutation::PayloadRun { frame, pos: rng.below(len), len: 1 + rng.below(32), byte: rng.pick(&[0, 0xff]) },
        _ => Mutation::PayloadCut { frame, len: rng.below(len) },
    })
}

fn draw_record(rng: &mut Rng, l: &Layout, frame: usize) -> Option<Mutation> {
    let f = &l.frames[frame];
    let nrec = f.records.len();
    let record = rng.below(nrec);
    let r = f.records.get(record)?;
    let body = r.end - r.at - 8;
    let random = rng.next() as u32;
    Some(match rng.below(10) {
        0 => Mutation::RecordLen { frame, record, value: rng.pick(&[0, 1, 7, u32::MAX, (body as u32).wrapping_add(8), (body as u32).wrapping_sub(8), random]) },
        1 => Mutation::RecordType { frame, record, ty: rng.pick(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 255]) },
        2 => Mutation::DupRecord { frame, record },
        3 => Mutation::DropRecord { frame, record },
        4 => Mutation::SwapRecords { frame, a: record, b: rng.below(nrec) },
        _ => {
            // A fixed field of the body (the first 96 bytes hold every record's fixed part and
            // a Hello's), as 4 or 8 bytes.
            if body < 4 {
                return None;
            }
            let width = if body >= 8 && rng.chance(50) { 8 } else { 4 };
            let at = rng.below((body.min(96) - width) / 4 + 1) * 4;
            let old = raw_field(&f.raw, r.at + 8 + at, width);
            let value = word_value(rng, old, &[]);
            Mutation::RecordField { frame, record, at, width, value }
        }
    })
}

fn raw_field(raw: &[u8], at: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..width].copy_from_slice(&raw[at..at + width]);
    u64::from_le_bytes(b)
}

fn draw_event(rng: &mut Rng, l: &Layout) -> Option<Mutation> {
    let chunks = l.chunks();
    if chunks.is_empty() {
        return None;
    }
    let (frame, record) = rng.pick(&chunks);
    let c = l.frames[frame].records[record].chunk.as_ref()?;
    let (at, len) = rng.pick(&c.events);
    Some(match rng.below(20) {
        0..=3 => Mutation::EventWord { frame, record, word: at, value: header_value(rng, c.chunk.words[at]) },
        4 => Mutation::DupEvent { frame, record, word: at, len },
        5 => Mutation::DropEvent { frame, record, word: at, len },
        6 => Mutation::CutEvents { frame, record, word: at + rng.below(len) },
        _ if len < 2 => return None,
        _ => {
            let word = at + 1 + rng.below(len - 1);
            Mutation::EventWord { frame, record, word, value: word_value(rng, c.chunk.words[word], &l.addresses()) }
        }
    })
}

/// Every systematic mutation of `l`: a cut at every frame boundary and inside every frame's
/// header and payload, every frame removed, duplicated and swapped with the next.
pub fn systematic(l: &Layout) -> Vec<Mutation> {
    let mut v = Vec::new();
    for &b in &l.boundaries() {
        v.push(Mutation::Truncate { len: b });
    }
    let n = l.frames.len();
    for (i, f) in l.frames.iter().enumerate() {
        v.push(Mutation::Truncate { len: f.offset + 10 });
        v.push(Mutation::Truncate { len: f.offset + FRAME_HEADER_LEN + (f.len - FRAME_HEADER_LEN) / 2 });
        v.push(Mutation::RemoveFrame { frame: i });
        v.push(Mutation::DupFrame { frame: i, before: i + 1 });
        if i + 1 < n {
            v.push(Mutation::SwapFrames { a: i, b: i + 1 });
        }
    }
    v
}
