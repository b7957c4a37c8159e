//! Reading and writing trace files. The format is specified in `mtrace_protocol::tracefile`.

pub mod compact;

use std::io::{self, Read, Write};

pub use mtrace_protocol::tracefile::*;




#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not an mtrace trace file (bad magic at offset 0)")]
    NotATrace,
    #[error("trace format version {found} is not supported (this mtracer reads versions {MIN_FORMAT_VERSION} to {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error(
        "trace format version {found} was written by an earlier mtrace, {} (this one reads version {MIN_FORMAT_VERSION} on): record the program again",
        old_version_why(*found)
    )]
    OldVersion { found: u32 },
    #[error("trace truncated at byte offset {offset}: {what}")]
    Truncated { offset: u64, what: String },
    #[error("trace corrupt at byte offset {offset}: {what}")]
    Corrupt { offset: u64, what: String },
}

/// What an old format lacks, for [`TraceError::OldVersion`].
fn old_version_why(version: u32) -> &'static str {
    if version < LAST_UNSEQUENCED_VERSION {
        "whose cross-thread ordering (free stamps) this one no longer reads"
    } else {
        "whose frames carry no sequence numbers (a duplicated or missing frame would go unnoticed)"
    }
}

impl TraceError {
    /// Offset of a truncation or corruption (`None` for other errors).
    pub fn offset(&self) -> Option<u64> {
        match self {
            TraceError::Truncated { offset, .. } | TraceError::Corrupt { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}



#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessStart {
    pub image: u32,
    pub pid: u32,
    pub ppid: u32,
    pub parent_image: Option<u32>,
    pub origin: u32,
    pub fork_seq: u64,
    pub time_ns: u64,
    /// The Hello message as received (fixed part + metadata TLVs).
    pub hello: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub image: u32,
    pub stream: u32,
    pub tid: u32,
    pub block_seq: u32,
    /// Byte offset of `words[0]` in its block.
    pub offset: u32,
    pub words: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessEnd {
    pub image: u32,
    pub reason: u32,
    pub time_ns: u64,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
    pub dropped_events: u64,
    pub dropped_blocks: u64,
    pub status: i64,
}

/// What a mapping of `/proc/<pid>/smaps` is (from its name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MapKind {
    /// `[heap]`: the brk heap.
    Heap,
    /// Anonymous, without a name: thread-arena heaps, mmapped chunks, the application's own
    /// anonymous mmaps, thread stacks.
    Anon,
    /// A file mapping (a path): executables, libraries, mapped files, shared memory.
    File,
    /// `[stack]`: the main thread's stack.
    Stack,
    /// Anything else: `[vdso]`, `[vvar]`, `[anon:<name>]`, …
    Other,
}

impl MapKind {
    /// The code stored in a `Smaps` record (see `mtrace_protocol::tracefile`).
    pub const fn code(self) -> u64 {
        match self {
            MapKind::Heap => map_kind::HEAP,
            MapKind::Anon => map_kind::ANON,
            MapKind::File => map_kind::FILE,
            MapKind::Stack => map_kind::STACK,
            MapKind::Other => map_kind::OTHER,
        }
    }
    /// Inverse of [`MapKind::code`]; codes this reader does not know are `Other`.
    pub const fn from_code(c: u64) -> MapKind {
        match c {
            map_kind::HEAP => MapKind::Heap,
            map_kind::ANON => MapKind::Anon,
            map_kind::FILE => MapKind::File,
            map_kind::STACK => MapKind::Stack,
            _ => MapKind::Other,
        }
    }
    pub const fn label(self) -> &'static str {
        match self {
            MapKind::Heap => "heap",
            MapKind::Anon => "anon",
            MapKind::File => "file",
            MapKind::Stack => "stack",
            MapKind::Other => "other",
        }
    }
}

/// One mapping of a process and its resident bytes, as `/proc/<pid>/smaps` showed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Page-aligned start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Resident bytes (`Rss:`).
    pub rss: u64,
    pub kind: MapKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Session(Vec<u8>),
    ProcessStart(ProcessStart),
    Chunk(Chunk),
    Rss { image: u32, time_ns: u64, rss_bytes: u64 },
    ProcessEnd(ProcessEnd),
    SessionEnd { time_ns: u64, exit_status: i64 },
    Note { image: u32, text: String },
    Sync { image: u32, time_ns: u64 },
    /// Resident bytes per mapping (`/proc/<pid>/smaps`), sampled by the recorder: mappings with
    /// resident bytes, and every `Heap`/`Anon` mapping even when nothing of it is resident.
    Smaps { image: u32, time_ns: u64, maps: Vec<Mapping> },
    /// The process stopped tracing on its own at `time_ns` (its clock), for `reason` (see
    /// `mtrace_protocol::ring::detach_reason`), and counted at least `untraced_calls` calls
    /// after that (its detach timeout was `timeout_ms`): the image's events end there.
    TracingStopped { image: u32, reason: u32, time_ns: u64, untraced_calls: u64, timeout_ms: u32 },
    /// A record type this reader does not know (skipped by length).
    Unknown(u8),
}

/// The zstd level of frames (1: the fastest of the regular levels; higher ones cost several
/// times the CPU for a few percent on compact chunks, see the README's Performance).
pub const FRAME_ZSTD_LEVEL: i32 = 1;

/// Little-endian words from a chunk's payload.
fn words_of(data: &[u8]) -> Result<Vec<u64>, String> {
    if !data.len().is_multiple_of(8) {
        return Err(format!("chunk data of {} bytes is not whole words", data.len()));
    }
    Ok(data.chunks_exact(8).map(le64).collect())
}

/// The little-endian u64 that `b` starts with (0 if `b` is shorter: callers pass whole words).
fn le64(b: &[u8]) -> u64 {
    b.get(..8).and_then(|w| w.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// The little-endian u32 that `b` starts with (0 if `b` is shorter: callers pass whole fields).
fn le32(b: &[u8]) -> u32 {
    b.get(..4).and_then(|w| w.try_into().ok()).map_or(0, u32::from_le_bytes)
}

fn put_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

impl Record {
    /// Append this record's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        let ty = match self {
            Record::Session(tlvs) => {
                out.extend_from_slice(tlvs);
                record_type::SESSION
            }
            Record::ProcessStart(p) => {
                put_u32(out, p.image);
                put_u32(out, p.pid);
                put_u32(out, p.ppid);
                put_u32(out, p.parent_image.unwrap_or(NO_IMAGE));
                put_u32(out, p.origin);
                put_u32(out, 0);
                put_u64(out, p.fork_seq);
                put_u64(out, p.time_ns);
                out.extend_from_slice(&p.hello);
                record_type::PROCESS_START
            }
            Record::Chunk(c) => {
                Self::put_chunk_body(out, c.image, c.stream, c.tid, c.block_seq, c.offset, &c.words);
                record_type::CHUNK
            }
            Record::Rss { image, time_ns, rss_bytes } => {
                put_u32(out, *image);
                put_u32(out, 0);
                put_u64(out, *time_ns);
                put_u64(out, *rss_bytes);
                record_type::RSS
            }
            Record::ProcessEnd(e) => {
                put_u32(out, e.image);
                put_u32(out, e.reason);
                put_u64(out, e.time_ns);
                put_u64(out, e.rss_bytes);
                put_u64(out, e.hwm_bytes);
                put_u64(out, e.dropped_events);
                put_u64(out, e.dropped_blocks);
                put_u64(out, e.status as u64);
                record_type::PROCESS_END
            }
            Record::SessionEnd { time_ns, exit_status } => {
                put_u64(out, *time_ns);
                put_u64(out, *exit_status as u64);
                record_type::SESSION_END
            }
            Record::Note { image, text } => {
                put_u32(out, *image);
                put_u32(out, 0);
                out.extend_from_slice(text.as_bytes());
                record_type::NOTE
            }
            Record::Sync { image, time_ns } => {
                put_u32(out, *image);
                put_u32(out, 0);
                put_u64(out, *time_ns);
                record_type::SYNC
            }
            Record::TracingStopped { image, reason, time_ns, untraced_calls, timeout_ms } => {
                put_u32(out, *image);
                put_u32(out, *reason);
                put_u64(out, *time_ns);
                put_u64(out, *untraced_calls);
                put_u32(out, *timeout_ms);
                put_u32(out, 0);
                record_type::TRACING_STOPPED
            }
            Record::Smaps { image, time_ns, maps } => {
                put_u32(out, *image);
                put_u32(out, maps.len() as u32);
                put_u64(out, *time_ns);
                out.reserve(maps.len() * SMAPS_ENTRY_LEN);
                for m in maps {
                    put_u64(out, (m.start & !SMAPS_KIND_MASK) | m.kind.code());
                    put_u64(out, m.end);
                    put_u64(out, m.rss);
                }
                record_type::SMAPS
            }
            Record::Unknown(t) => *t,
        };
        Self::finish(out, start, ty);
    }

    /// The fixed part of a `Chunk` body.
    #[allow(clippy::too_many_arguments)]
    fn put_chunk_head(out: &mut Vec<u8>, image: u32, stream: u32, tid: u32, block_seq: u32, offset: u32, encoding: u32) {
        for v in [image, stream, tid, block_seq, offset, encoding] {
            put_u32(out, v);
        }
    }

    /// Encode a chunk of event words ([`chunk_encoding::COMPACT`]) without building a `Record`:
    /// the recorder's hot path, `words` read once, straight from the ring.
    pub fn encode_chunk(out: &mut Vec<u8>, image: u32, stream: u32, tid: u32, block_seq: u32, offset: u32, words: &[u64]) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        Self::put_chunk_body(out, image, stream, tid, block_seq, offset, words);
        Self::finish(out, start, record_type::CHUNK);
    }

    /// A `Chunk` body: compact, or as words when longer than a compact chunk may be (never a
    /// ring's chunk).
    fn put_chunk_body(out: &mut Vec<u8>, image: u32, stream: u32, tid: u32, block_seq: u32, offset: u32, words: &[u64]) {
        if words.len() > (chunk_encoding::MAX_RAW / 8) as usize {
            Self::put_chunk_words_body(out, image, stream, tid, block_seq, offset, words);
        } else {
            Self::put_chunk_head(out, image, stream, tid, block_seq, offset, chunk_encoding::COMPACT);
            put_u32(out, words.len() as u32);
            compact::encode(words, out);
        }
    }

    /// Encode a chunk as plain words ([`chunk_encoding::WORDS`]; readers take it in any
    /// version: for tools and tests that build traces by hand).
    pub fn encode_chunk_words(out: &mut Vec<u8>, image: u32, stream: u32, tid: u32, block_seq: u32, offset: u32, words: &[u64]) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 8]);
        Self::put_chunk_words_body(out, image, stream, tid, block_seq, offset, words);
        Self::finish(out, start, record_type::CHUNK);
    }

    fn put_chunk_words_body(out: &mut Vec<u8>, image: u32, stream: u32, tid: u32, block_seq: u32, offset: u32, words: &[u64]) {
        Self::put_chunk_head(out, image, stream, tid, block_seq, offset, chunk_encoding::WORDS);
        for w in words {
            put_u64(out, *w);
        }
    }

    fn finish(out: &mut Vec<u8>, start: usize, ty: u8) {
        let body_len = (out.len() - start - 8) as u32;
        out[start] = ty;
        out[start + 4..start + 8].copy_from_slice(&body_len.to_le_bytes());
        while out.len() % 8 != 0 {
            out.push(0);
        }
    }

    /// Decode one record from `raw[at..]`; returns it and the offset of the next record.
    /// Errors carry an offset relative to `raw`.
    pub fn decode(raw: &[u8], at: usize) -> Result<(Record, usize), (usize, String)> {
        let hdr = raw.get(at..at + 8).ok_or((at, "record header cut short".to_string()))?;
        let ty = hdr[0];
        let len = le32(&hdr[4..]) as usize;
        let body = raw.get(at + 8..at + 8 + len).ok_or((at, format!("record body of {len} bytes runs past the frame")))?;
        let next = (at + 8 + len).div_ceil(8) * 8;
        let mut r = mtrace_protocol::control::Reader::new(body);
        let short = || (at, format!("record type {ty} too short ({len} bytes)"));
        let rec = match ty {
            record_type::SESSION => Record::Session(body.to_vec()),
            record_type::PROCESS_START => {
                let image = r.u32().ok_or_else(short)?;
                let pid = r.u32().ok_or_else(short)?;
                let ppid = r.u32().ok_or_else(short)?;
                let parent = r.u32().ok_or_else(short)?;
                let origin = r.u32().ok_or_else(short)?;
                r.u32().ok_or_else(short)?;
                let fork_seq = r.u64().ok_or_else(short)?;
                let time_ns = r.u64().ok_or_else(short)?;
                Record::ProcessStart(ProcessStart {
                    image,
                    pid,
                    ppid,
                    parent_image: (parent != NO_IMAGE).then_some(parent),
                    origin,
                    fork_seq,
                    time_ns,
                    hello: body[r.pos..].to_vec(),
                })
            }
            record_type::CHUNK => {
                let image = r.u32().ok_or_else(short)?;
                let stream = r.u32().ok_or_else(short)?;
                let tid = r.u32().ok_or_else(short)?;
                let block_seq = r.u32().ok_or_else(short)?;
                let offset = r.u32().ok_or_else(short)?;
                let encoding = r.u32().ok_or_else(short)?;
                let words = match encoding {
                    chunk_encoding::WORDS => words_of(&body[r.pos..]).map_err(|e| (at, e))?,
                    chunk_encoding::COMPACT => {
                        let n = r.u32().ok_or_else(short)?;
                        if n > chunk_encoding::MAX_RAW / 8 {
                            return Err((at, format!("compact chunk claims {n} words")));
                        }
                        let mut words = Vec::with_capacity(n as usize);
                        compact::decode(&body[r.pos..], n as usize, &mut words).map_err(|e| (at, e))?;
                        words
                    }
                    chunk_encoding::LZ4 => {
                        let raw_len = r.u32().ok_or_else(short)?;
                        if raw_len > chunk_encoding::MAX_RAW {
                            return Err((at, format!("compressed chunk claims {raw_len} bytes")));
                        }
                        let raw = lz4_flex::block::decompress(&body[r.pos..], raw_len as usize).map_err(|e| (at, format!("compressed chunk does not decompress: {e}")))?;
                        if raw.len() != raw_len as usize {
                            return Err((at, "compressed chunk decompressed to the wrong size".to_string()));
                        }
                        words_of(&raw).map_err(|e| (at, e))?
                    }
                    e => return Err((at, format!("unknown chunk encoding {e}"))),
                };
                Record::Chunk(Chunk { image, stream, tid, block_seq, offset, words })
            }
            record_type::RSS => {
                let image = r.u32().ok_or_else(short)?;
                r.u32().ok_or_else(short)?;
                Record::Rss { image, time_ns: r.u64().ok_or_else(short)?, rss_bytes: r.u64().ok_or_else(short)? }
            }
            record_type::PROCESS_END => Record::ProcessEnd(ProcessEnd {
                image: r.u32().ok_or_else(short)?,
                reason: r.u32().ok_or_else(short)?,
                time_ns: r.u64().ok_or_else(short)?,
                rss_bytes: r.u64().ok_or_else(short)?,
                hwm_bytes: r.u64().ok_or_else(short)?,
                dropped_events: r.u64().ok_or_else(short)?,
                dropped_blocks: r.u64().ok_or_else(short)?,
                status: r.u64().ok_or_else(short)? as i64,
            }),
            record_type::SESSION_END => {
                Record::SessionEnd { time_ns: r.u64().ok_or_else(short)?, exit_status: r.u64().ok_or_else(short)? as i64 }
            }
            record_type::NOTE => {
                let image = r.u32().ok_or_else(short)?;
                r.u32().ok_or_else(short)?;
                Record::Note { image, text: String::from_utf8_lossy(&body[r.pos..]).into_owned() }
            }
            record_type::SYNC => {
                let image = r.u32().ok_or_else(short)?;
                r.u32().ok_or_else(short)?;
                Record::Sync { image, time_ns: r.u64().ok_or_else(short)? }
            }
            record_type::TRACING_STOPPED => Record::TracingStopped {
                image: r.u32().ok_or_else(short)?,
                reason: r.u32().ok_or_else(short)?,
                time_ns: r.u64().ok_or_else(short)?,
                untraced_calls: r.u64().ok_or_else(short)?,
                timeout_ms: r.u32().ok_or_else(short)?,
            },
            record_type::SMAPS => {
                let image = r.u32().ok_or_else(short)?;
                let count = r.u32().ok_or_else(short)? as usize;
                let time_ns = r.u64().ok_or_else(short)?;
                let data = &body[r.pos..];
                if Some(data.len()) != count.checked_mul(SMAPS_ENTRY_LEN) {
                    return Err((at, format!("smaps record announces {count} mappings but carries {} bytes of them", data.len())));
                }
                let word = |i: usize| le64(&data[i * 8..]);
                let mut maps = Vec::with_capacity(count);
                for i in 0..count {
                    let (first, end, rss) = (word(3 * i), word(3 * i + 1), word(3 * i + 2));
                    let start = first & !SMAPS_KIND_MASK;
                    if end < start {
                        return Err((at, format!("smaps mapping {i} ends ({end:#x}) before it starts ({start:#x})")));
                    }
                    maps.push(Mapping { start, end, rss, kind: MapKind::from_code(first & SMAPS_KIND_MASK) });
                }
                Record::Smaps { image, time_ns, maps }
            }
            other => Record::Unknown(other),
        };
        Ok((rec, next))
    }
}

/// Appends records, cutting them into compressed frames.
pub struct TraceWriter<W: Write> {
    out: W,
    raw: Vec<u8>,
    /// The compressed frame (kept across frames: no allocation per frame).
    stored: Vec<u8>,
    /// The frame compressor (its context kept across frames).
    zstd: zstd::bulk::Compressor<'static>,
    frame_target: usize,
    bytes_written: u64,
    frames: u64,
}

impl<W: Write> TraceWriter<W> {
    /// Write the file header. `frame_target` is the raw size at which a frame is cut.
    pub fn new(mut out: W, frame_target: usize) -> io::Result<Self> {
        let mut h = [0u8; FILE_HEADER_LEN];
        h[..8].copy_from_slice(&FILE_MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(FILE_HEADER_LEN as u32).to_le_bytes());
        out.write_all(&h)?;
        let zstd = zstd::bulk::Compressor::new(FRAME_ZSTD_LEVEL)?;
        Ok(TraceWriter { out, raw: Vec::with_capacity(frame_target + 4096), stored: Vec::new(), zstd, frame_target, bytes_written: FILE_HEADER_LEN as u64, frames: 0 })
    }

    pub fn push(&mut self, rec: &Record) -> io::Result<()> {
        rec.encode(&mut self.raw);
        self.maybe_cut()
    }

    /// Append records already encoded with [`Record::encode`]. A batch of at least a quarter
    /// frame that arrives when nothing is buffered is compressed as its own frame, in place (the
    /// recorder's drain thread sends its events in such batches: no copy on the way).
    pub fn push_encoded(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.raw.is_empty() && !bytes.is_empty() && bytes.len() >= self.frame_target / 4 && bytes.len() <= MAX_FRAME_RAW {
            return self.write_frame(bytes);
        }
        self.raw.extend_from_slice(bytes);
        self.maybe_cut()
    }

    fn maybe_cut(&mut self) -> io::Result<()> {
        if self.raw.len() >= self.frame_target { self.flush_frame() } else { Ok(()) }
    }

    /// Compress and write what is buffered as one frame, then flush the output.
    pub fn flush_frame(&mut self) -> io::Result<()> {
        if self.raw.is_empty() {
            return self.out.flush();
        }
        let raw = std::mem::take(&mut self.raw);
        let r = self.write_frame(&raw);
        self.raw = raw;
        self.raw.clear();
        r
    }

    /// Compress `raw` (whole records) and write it as one frame, then flush the output.
    fn write_frame(&mut self, raw: &[u8]) -> io::Result<()> {
        self.stored.clear();
        self.stored.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        self.zstd.compress_to_buffer(raw, &mut self.stored)?;
        let stored = &self.stored[..];
        let h = frame_header(self.frames, raw.len(), stored);
        self.out.write_all(&h)?;
        self.out.write_all(stored)?;
        self.out.flush()?;
        self.bytes_written += (FRAME_HEADER_LEN + stored.len()) as u64;
        self.frames += 1;
        Ok(())
    }

    /// Frames written so far (the next frame's `seq`).
    pub fn frames(&self) -> u64 {
        self.frames
    }

    pub fn buffered(&self) -> usize {
        self.raw.len()
    }
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.flush_frame()?;
        Ok(self.out)
    }
}

/// The header of the frame number `seq` whose payload is `stored` (`raw_len` bytes compressed).
pub fn frame_header(seq: u64, raw_len: usize, stored: &[u8]) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[..4].copy_from_slice(&FRAME_MAGIC);
    h[4..8].copy_from_slice(&(raw_len as u32).to_le_bytes());
    h[8..12].copy_from_slice(&(stored.len() as u32).to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    let crc = frame_crc(&h, stored);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The checksum a frame header `h` should hold for its payload `stored` (see the format).
pub fn frame_crc(h: &[u8; FRAME_HEADER_LEN], stored: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[4..12]);
    c.update(&h[16..24]);
    c.update(stored);
    c.finalize()
}

/// One whole frame as the file holds it: `raw` (whole encoded records) compressed, with the
/// header of frame number `seq` (for tools and tests that build or repair traces).
pub fn encode_frame(seq: u64, raw: &[u8]) -> io::Result<Vec<u8>> {
    let stored = zstd::bulk::compress(raw, FRAME_ZSTD_LEVEL)?;
    let mut v = frame_header(seq, raw.len(), &stored).to_vec();
    v.extend_from_slice(&stored);
    Ok(v)
}

/// One decompressed frame.
pub struct Frame {
    /// File offset of the frame header.
    pub offset: u64,
    /// Its sequence number (its position among the file's frames).
    pub seq: u64,
    pub raw: Vec<u8>,
}

impl Frame {
    /// Iterate the frame's records. A malformed record ends the iteration with an error naming
    /// the file offset of the frame.
    pub fn records(&self) -> impl Iterator<Item = Result<Record, TraceError>> + '_ {
        let mut at = 0usize;
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed || at >= self.raw.len() {
                return None;
            }
            match Record::decode(&self.raw, at) {
                Ok((rec, next)) => {
                    at = next;
                    Some(Ok(rec))
                }
                Err((pos, what)) => {
                    failed = true;
                    Some(Err(TraceError::Corrupt {
                        offset: self.offset,
                        what: format!("frame record at raw offset {pos}: {what}"),
                    }))
                }
            }
        })
    }
}

/// Print every record of a trace, with chunk events decoded (debugging aid: `mtracer dump`).
pub fn dump(path: &std::path::Path, out: &mut impl Write) -> Result<(), TraceError> {
    let mut r = TraceReader::new(std::io::BufReader::new(std::fs::File::open(path)?))?;
    use mtrace_protocol::event::Event;
    let afters = |e: &Event| match *e {
        Event::Alloc { after, .. } | Event::Free { after, .. } => [None, after],
        Event::Realloc { after_old, after, .. } => [after_old, after],
        _ => [None, None],
    };
    while let Some(frame) = r.next_frame()? {
        writeln!(out, "frame {} @{} ({} bytes)", frame.seq, frame.offset, frame.raw.len())?;
        for rec in frame.records() {
            match rec? {
                Record::Chunk(c) => {
                    writeln!(out, "chunk image {} stream {} tid {} block {} offset {} ({} words)", c.image, c.stream, c.tid, c.block_seq, c.offset, c.words.len())?;
                    for ev in mtrace_protocol::event::Events::new(&c.words) {
                        match ev {
                            Ok((at, e)) => {
                                let st: String = afters(&e)
                                    .into_iter()
                                    .flatten()
                                    .filter_map(mtrace_protocol::order::decode)
                                    .map(|r| format!(" after stream {} {}:{}", r.stream, r.seq_low, r.word))
                                    .collect();
                                writeln!(out, "  {}:{} {:?}{st}", c.block_seq, c.offset / 8 + at as u32, e)?
                            }
                            Err(e) => writeln!(out, "  undecodable: {e}")?,
                        }
                    }
                }
                Record::ProcessStart(p) => {
                    let cells = mtrace_protocol::control::HelloFixed::decode(&p.hello).and_then(|(h, _)| h.order_cells());
                    writeln!(
                        out,
                        "process-start image {} pid {} ppid {} parent {:?} origin {} fork_seq {} t {} order-cells {cells:x?}",
                        p.image, p.pid, p.ppid, p.parent_image, p.origin, p.fork_seq, p.time_ns
                    )?
                }
                Record::Smaps { image, time_ns, maps } => {
                    writeln!(out, "smaps image {image} t {time_ns} ({} mappings)", maps.len())?;
                    for m in maps {
                        writeln!(out, "  {:#x}-{:#x} {} rss {}", m.start, m.end, m.kind.label(), m.rss)?;
                    }
                }
                other => writeln!(out, "{other:?}")?,
            }
        }
    }
    Ok(())
}

/// Reads frames sequentially from any reader.
pub struct TraceReader<R: Read> {
    inp: R,
    offset: u64,
    stored: Vec<u8>,
    /// The sequence number the next frame must carry.
    next_seq: u64,
    /// The file's format version (its frames' codec: lz4 up to 4, zstd from 5).
    version: u32,
    /// The frame decompressor, made at the first zstd frame (its context kept across frames).
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl<R: Read> TraceReader<R> {
    pub fn new(mut inp: R) -> Result<Self, TraceError> {
        let mut h = [0u8; FILE_HEADER_LEN];
        let n = read_full(&mut inp, &mut h)?;
        if n < 8 || h[..8] != FILE_MAGIC {
            return Err(TraceError::NotATrace);
        }
        if n < FILE_HEADER_LEN {
            return Err(TraceError::Truncated { offset: n as u64, what: "file header cut short".into() });
        }
        let version = le32(&h[8..]);
        if (1..MIN_FORMAT_VERSION).contains(&version) {
            return Err(TraceError::OldVersion { found: version });
        }
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(TraceError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
        }
        let hlen = le32(&h[12..]) as usize;
        if hlen < FILE_HEADER_LEN || hlen > 4096 {
            return Err(TraceError::Corrupt { offset: 12, what: format!("file header length {hlen}") });
        }
        let mut rest = vec![0u8; hlen - FILE_HEADER_LEN];
        let got = read_full(&mut inp, &mut rest)?;
        if got < rest.len() {
            return Err(TraceError::Truncated { offset: (FILE_HEADER_LEN + got) as u64, what: "file header cut short".into() });
        }
        Ok(TraceReader { inp, offset: hlen as u64, stored: Vec::new(), next_seq: 0, version, zstd: None })
    }

    /// Current file offset (the next frame's header).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next frame, `Ok(None)` at a clean end of file. A frame cut short, damaged (its
    /// checksum) or out of place (its sequence number) is an error naming its offset.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, TraceError> {
        let at = self.offset;
        let mut h = [0u8; FRAME_HEADER_LEN];
        let n = read_full(&mut self.inp, &mut h)?;
        if n == 0 {
            return Ok(None);
        }
        if n < FRAME_HEADER_LEN {
            return Err(TraceError::Truncated { offset: at, what: format!("frame header has {n} of {FRAME_HEADER_LEN} bytes") });
        }
        if h[..4] != FRAME_MAGIC {
            return Err(TraceError::Corrupt { offset: at, what: "bad frame magic".into() });
        }
        let (raw_len, stored_len, crc) = (le32(&h[4..]) as usize, le32(&h[8..]) as usize, le32(&h[12..]));
        if raw_len > MAX_FRAME_RAW || stored_len > max_stored(raw_len) {
            return Err(TraceError::Corrupt { offset: at, what: format!("implausible frame sizes (raw {raw_len}, stored {stored_len})") });
        }
        // Read what the file has, not what the header claims (a damaged length must not make
        // us allocate more than the file holds).
        self.stored.clear();
        let got = (&mut self.inp).take(stored_len as u64).read_to_end(&mut self.stored)?;
        if got < stored_len {
            return Err(TraceError::Truncated {
                offset: at,
                what: format!("frame needs {stored_len} bytes after its header, the file has {got}"),
            });
        }
        if frame_crc(&h, &self.stored) != crc {
            return Err(TraceError::Corrupt { offset: at, what: "frame checksum mismatch".into() });
        }
        let seq = le64(&h[16..]);
        self.check_seq(at, seq)?;
        let raw = self.decompress(raw_len).map_err(|e| TraceError::Corrupt { offset: at, what: format!("frame does not decompress: {e}") })?;
        if raw.len() != raw_len {
            return Err(TraceError::Corrupt { offset: at, what: "frame decompressed to the wrong size".into() });
        }
        self.offset += (FRAME_HEADER_LEN + stored_len) as u64;
        self.next_seq += 1;
        Ok(Some(Frame { offset: at, seq, raw }))
    }

    /// The frame payload in `stored`, decompressed: at most `raw_len` bytes are ever allocated
    /// (a zstd frame that would give more is an error).
    fn decompress(&mut self, raw_len: usize) -> Result<Vec<u8>, String> {
        if self.version <= LAST_LZ4_VERSION {
            return lz4_flex::block::decompress(&self.stored, raw_len).map_err(|e| e.to_string());
        }
        if self.zstd.is_none() {
            self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        let d = self.zstd.as_mut().ok_or("no decompressor")?;
        let mut raw = Vec::with_capacity(raw_len);
        d.decompress_to_buffer(&self.stored[..], &mut raw).map_err(|e| e.to_string())?;
        Ok(raw)
    }

    /// A frame whose (checksummed) sequence number is not the next one was duplicated, moved or
    /// lost on its way into this file.
    fn check_seq(&self, at: u64, seq: u64) -> Result<(), TraceError> {
        let want = self.next_seq;
        let what = if seq == want {
            return Ok(());
        } else if seq < want {
            format!("frame {seq} again where frame {want} should be (a duplicated or reordered frame)")
        } else {
            format!("frame {seq} where frame {want} should be ({} frames missing or reordered)", seq - want)
        };
        Err(TraceError::Corrupt { offset: at, what })
    }
}

/// The most a frame of `raw_len` bytes can take compressed (by either codec).
fn max_stored(raw_len: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(raw_len).max(zstd::zstd_safe::compress_bound(raw_len))
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record::Session(vec![1, 0, 3, 0, 0, 0, b'a', b'b', b'c']),
            Record::ProcessStart(ProcessStart {
                image: 0,
                pid: 42,
                ppid: 1,
                parent_image: None,
                origin: 0,
                fork_seq: 0,
                time_ns: 5,
                hello: vec![9; 13],
            }),
            Record::Chunk(Chunk { image: 0, stream: 1, tid: 42, block_seq: 0, offset: 0, words: vec![1, 2, 3] }),
            Record::Rss { image: 0, time_ns: 10, rss_bytes: 4096 },
            Record::ProcessEnd(ProcessEnd {
                image: 0,
                reason: end_reason::EXITED,
                time_ns: 11,
                rss_bytes: 1,
                hwm_bytes: 2,
                dropped_events: 0,
                dropped_blocks: 0,
                status: -1,
            }),
            Record::Note { image: NO_IMAGE, text: "hello".into() },
            Record::Sync { image: 0, time_ns: 99 },
            Record::Smaps {
                image: 0,
                time_ns: 100,
                maps: vec![
                    Mapping { start: 0x5555_5555_8000, end: 0x5555_5557_9000, rss: 135168, kind: MapKind::Heap },
                    Mapping { start: 0x7f00_0000_0000, end: 0x7f00_0400_0000, rss: 0, kind: MapKind::Anon },
                    Mapping { start: 0x7f10_0000_0000, end: 0x7f10_0000_2000, rss: 8192, kind: MapKind::File },
                    Mapping { start: 0x7ffc_0000_0000, end: 0x7ffc_0002_1000, rss: 12288, kind: MapKind::Stack },
                    Mapping { start: 0x7ffc_1000_0000, end: 0x7ffc_1000_1000, rss: 4096, kind: MapKind::Other },
                ],
            },
            Record::Smaps { image: 1, time_ns: 101, maps: vec![] },
            Record::SessionEnd { time_ns: 12, exit_status: 3 },
        ]
    }

    fn write(records: &[Record], frame_target: usize) -> Vec<u8> {
        let mut w = TraceWriter::new(Vec::new(), frame_target).unwrap();
        for r in records {
            w.push(r).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<Record>, TraceError> {
        let mut r = TraceReader::new(bytes)?;
        let mut out = Vec::new();
        while let Some(f) = r.next_frame()? {
            for rec in f.records() {
                out.push(rec?);
            }
        }
        Ok(out)
    }

    #[test]
    fn round_trip_one_and_many_frames() {
        let recs = sample();
        assert_eq!(read_all(&write(&recs, 1 << 20)).unwrap(), recs);
        assert_eq!(read_all(&write(&recs, 1)).unwrap(), recs);
    }

    #[test]
    fn truncation_names_the_frame_offset() {
        let bytes = write(&sample(), 1);
        // Cut inside the third frame.
        let mut r = TraceReader::new(&bytes[..]).unwrap();
        r.next_frame().unwrap();
        r.next_frame().unwrap();
        let third = r.offset();
        let cut = &bytes[..third as usize + FRAME_HEADER_LEN + 2];
        let err = read_all(cut).unwrap_err();
        assert_eq!(err.offset(), Some(third));
        assert!(matches!(err, TraceError::Truncated { .. }), "{err}");
    }

    #[test]
    fn corruption_is_detected_by_checksum() {
        let mut bytes = write(&sample(), 1 << 20);
        let n = bytes.len();
        bytes[n - 3] ^= 0x55;
        let err = read_all(&bytes).unwrap_err();
        assert_eq!(err.offset(), Some(FILE_HEADER_LEN as u64));
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    /// The frames of a trace: (offset, length) of each, header included.
    fn frame_spans(bytes: &[u8]) -> Vec<(usize, usize)> {
        let mut r = TraceReader::new(bytes).unwrap();
        let mut v = Vec::new();
        let mut at = r.offset() as usize;
        while r.next_frame().unwrap().is_some() {
            v.push((at, r.offset() as usize - at));
            at = r.offset() as usize;
        }
        v
    }

    /// The trace `bytes` with its frames in the order `order` (indices into its frames).
    fn reframed(bytes: &[u8], order: &[usize]) -> Vec<u8> {
        let spans = frame_spans(bytes);
        let mut out = bytes[..FILE_HEADER_LEN].to_vec();
        for &i in order {
            let (at, len) = spans[i];
            out.extend_from_slice(&bytes[at..at + len]);
        }
        out
    }

    #[test]
    fn frames_carry_their_sequence_number() {
        let bytes = write(&sample(), 1);
        let spans = frame_spans(&bytes);
        assert_eq!(spans.len(), sample().len());
        let mut r = TraceReader::new(&bytes[..]).unwrap();
        for i in 0..spans.len() as u64 {
            assert_eq!(r.next_frame().unwrap().unwrap().seq, i);
        }
        let n = spans.len();
        // Duplicated, swapped, missing: an error at the first frame out of place.
        let cases: [(Vec<usize>, usize, &str); 4] = [
            ((0..n).flat_map(|i| if i == 3 { vec![i, i] } else { vec![i] }).collect(), 4, "frame 3 again where frame 4 should be"),
            ((0..n).map(|i| if i == 2 { 5 } else if i == 5 { 2 } else { i }).collect(), 2, "frame 5 where frame 2 should be (3 frames missing or reordered)"),
            ((0..n).filter(|&i| i != 1).collect(), 1, "frame 2 where frame 1 should be (1 frames missing"),
            ((0..n).chain([0]).collect(), n, "frame 0 again where frame 10 should be"),
        ];
        for (order, bad, what) in cases {
            let b = reframed(&bytes, &order);
            let err = read_all(&b).unwrap_err();
            let offset: usize = FILE_HEADER_LEN + order[..bad].iter().map(|&i| spans[i].1).sum::<usize>();
            assert_eq!(err.offset(), Some(offset as u64), "{err}");
            assert!(err.to_string().contains(what), "{err}");
        }
        // A damaged sequence number is a checksum error, not a reordering.
        let mut b = bytes.clone();
        b[spans[1].0 + 16] ^= 4;
        assert!(read_all(&b).unwrap_err().to_string().contains("checksum"));
        // A frame built by `encode_frame` reads back.
        let mut raw = Vec::new();
        Record::Sync { image: 0, time_ns: 7 }.encode(&mut raw);
        let mut b = write(&[], 1);
        b.extend_from_slice(&encode_frame(0, &raw).unwrap());
        assert_eq!(read_all(&b).unwrap(), vec![Record::Sync { image: 0, time_ns: 7 }]);
    }

    #[test]
    fn a_frame_length_longer_than_the_file_is_truncation_without_a_huge_allocation() {
        let mut b = write(&sample(), 1 << 20);
        let max = lz4_flex::block::get_maximum_output_size(MAX_FRAME_RAW) as u32;
        b[FILE_HEADER_LEN + 4..FILE_HEADER_LEN + 8].copy_from_slice(&(MAX_FRAME_RAW as u32).to_le_bytes());
        b[FILE_HEADER_LEN + 8..FILE_HEADER_LEN + 12].copy_from_slice(&max.to_le_bytes());
        let err = read_all(&b).unwrap_err();
        assert!(matches!(err, TraceError::Truncated { offset, .. } if offset == FILE_HEADER_LEN as u64), "{err}");
        b[FILE_HEADER_LEN + 8..FILE_HEADER_LEN + 12].copy_from_slice(&(max + 1).to_le_bytes());
        assert!(read_all(&b).unwrap_err().to_string().contains("implausible frame sizes"));
    }

    #[test]
    fn wrong_version_and_magic() {
        let mut bytes = write(&sample(), 1 << 20);
        bytes[8] = 99;
        let err = read_all(&bytes).unwrap_err();
        assert!(matches!(err, TraceError::UnsupportedVersion { found: 99, supported: FORMAT_VERSION }), "{err}");
        assert_eq!(err.to_string(), "trace format version 99 is not supported (this mtracer reads versions 4 to 5)");
        bytes[8] = 0;
        assert!(matches!(read_all(&bytes), Err(TraceError::UnsupportedVersion { found: 0, .. })));
        // Versions 1 and 2 (free stamps) and 3 (frames without sequence numbers) are named as an
        // earlier mtrace's.
        for (v, why) in [(1, "free stamps"), (2, "free stamps"), (3, "no sequence numbers")] {
            bytes[8] = v;
            let err = read_all(&bytes).unwrap_err();
            assert!(matches!(err, TraceError::OldVersion { found } if found == v as u32), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("version {v} was written by an earlier mtrace")) && msg.contains(why), "{err}");
            assert!(msg.contains("reads version 4 on") && msg.contains("record the program again"), "{err}");
        }
        bytes[8] = 5;
        assert_eq!(read_all(&bytes).unwrap(), sample());
        // A version 4 file's frames are lz4: zstd frames in a file that says 4 do not decompress.
        bytes[8] = 4;
        assert!(read_all(&bytes).unwrap_err().to_string().contains("frame does not decompress"));
        assert!(matches!(read_all(b"hello world, not a trace"), Err(TraceError::NotATrace)));
        assert!(matches!(read_all(b""), Err(TraceError::NotATrace)));
    }

    /// Event words that compress (a repeated malloc/free pattern), `n` of them.
    fn churn_words(n: usize) -> Vec<u64> {
        (0..n as u64).map(|i| if i % 5 == 0 { 0x0301 | 0x31 << 16 } else { 0x5555_0000_1000 + (i % 5) * 8 }).collect()
    }

    fn le_bytes(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// A version 4 chunk record: the words lz4-compressed ([`chunk_encoding::LZ4`]).
    fn lz4_chunk(words: &[u64]) -> Vec<u8> {
        let bytes = le_bytes(words);
        let mut out = vec![0u8; 8];
        Record::put_chunk_head(&mut out, 0, 1, 1, 0, 0, chunk_encoding::LZ4);
        put_u32(&mut out, bytes.len() as u32);
        out.extend_from_slice(&lz4_flex::block::compress(&bytes));
        Record::finish(&mut out, 0, record_type::CHUNK);
        out
    }

    #[test]
    fn chunks_round_trip_in_every_encoding() {
        let random: Vec<u64> = (0..1024u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) ^ 0xdead_beef).collect();
        for words in [churn_words(8192), random, vec![]] {
            let want = Record::Chunk(Chunk { image: 3, stream: 7, tid: 99, block_seq: 12, offset: 4096, words: words.clone() });
            let mut compact = Vec::new();
            Record::encode_chunk(&mut compact, 3, 7, 99, 12, 4096, &words);
            assert_eq!(u32::from_le_bytes(compact[8 + 20..8 + 24].try_into().unwrap()), chunk_encoding::COMPACT);
            assert_eq!(compact, raw(&want), "Record::encode writes the compact encoding too");
            let mut plain = Vec::new();
            Record::encode_chunk_words(&mut plain, 3, 7, 99, 12, 4096, &words);
            assert_eq!(u32::from_le_bytes(plain[8 + 20..8 + 24].try_into().unwrap()), chunk_encoding::WORDS);
            for b in [compact, plain] {
                let (rec, next) = Record::decode(&b, 0).unwrap();
                assert_eq!(next, b.len());
                assert_eq!(rec, want);
            }
            let (rec, _) = Record::decode(&lz4_chunk(&words), 0).unwrap();
            assert!(matches!(rec, Record::Chunk(c) if c.words == words));
        }
        // malloc(32)/free pairs of one address (the tcache's answer): 3 bytes an event.
        use mtrace_protocol::event::{EventKind, header};
        let pairs: Vec<u64> = (0..1000).flat_map(|_| [header(EventKind::Malloc, 3, 0x31), 0x5555_0000_1010, 32, header(EventKind::Free, 2, 0x31), 0x5555_0000_1010]).collect();
        let mut b = Vec::new();
        Record::encode_chunk(&mut b, 0, 1, 1, 0, 0, &pairs);
        assert!(b.len() <= 3 * 2000 + 64, "{} bytes", b.len());
        assert!(matches!(Record::decode(&b, 0), Ok((Record::Chunk(c), _)) if c.words == pairs));
    }

    #[test]
    fn a_damaged_chunk_is_an_error_with_its_offset() {
        let mut compact = Vec::new();
        Record::encode_chunk(&mut compact, 0, 1, 1, 0, 0, &churn_words(8192));
        for (good, is_lz4) in [(compact, false), (lz4_chunk(&churn_words(8192)), true)] {
            let at = 24; // a record before it (8 bytes of header, 16 of body)
            let mut framed = raw(&Record::Sync { image: 0, time_ns: 1 });
            assert_eq!(framed.len(), at);
            framed.extend_from_slice(&good);
            // A length that does not match the data, one past the limit, an unknown encoding,
            // garbage instead of the encoded bytes.
            let len_at = at + 8 + 24;
            let (wrong, limit): (u32, u32) = if is_lz4 { (1000, chunk_encoding::MAX_RAW + 1) } else { (1000, chunk_encoding::MAX_RAW / 8 + 1) };
            let garbage = if is_lz4 { "decompress" } else { "compact chunk" };
            let damage: [(&dyn Fn(&mut Vec<u8>), &str); 4] = [
                (&|b| b[len_at..len_at + 4].copy_from_slice(&wrong.to_le_bytes()), if is_lz4 { "decompress" } else { "announces" }),
                (&|b| b[len_at..len_at + 4].copy_from_slice(&limit.to_le_bytes()), "claims"),
                (&|b| b[at + 8 + 20..at + 8 + 24].copy_from_slice(&7u32.to_le_bytes()), "unknown chunk encoding 7"),
                (&|b| {
                    let n = b.len();
                    for x in &mut b[len_at + 4..n] {
                        *x = 0xff;
                    }
                }, garbage),
            ];
            for (f, what) in damage {
                let mut b = framed.clone();
                f(&mut b);
                let (_, next) = Record::decode(&b, 0).unwrap();
                let (off, msg) = Record::decode(&b, next).unwrap_err();
                assert_eq!(off, at);
                assert!(msg.contains(what), "{what}: {msg}");
            }
        }
    }

    /// The raw bytes of one record, as a frame holds them.
    fn raw(rec: &Record) -> Vec<u8> {
        let mut v = Vec::new();
        rec.encode(&mut v);
        v
    }

    #[test]
    fn smaps_record_round_trips_and_damage_is_an_error_with_an_offset() {
        let rec = sample().into_iter().find(|r| matches!(r, Record::Smaps { .. })).unwrap();
        let bytes = raw(&rec);
        assert_eq!(bytes.len(), 8 + 16 + 5 * SMAPS_ENTRY_LEN);
        assert_eq!(Record::decode(&bytes, 0).unwrap(), (rec.clone(), bytes.len()));
        // Cut inside the mapping list, with the record length patched to match (a record that
        // lies about its count), and with the frame cut short (the length runs past the end).
        for cut in [8 + 16 + SMAPS_ENTRY_LEN + 5, 8 + 10, 8 + 16 + 4 * SMAPS_ENTRY_LEN] {
            let mut b = bytes[..cut].to_vec();
            let len = (cut - 8) as u32;
            b[4..8].copy_from_slice(&len.to_le_bytes());
            let (at, what) = Record::decode(&b, 0).unwrap_err();
            assert_eq!(at, 0);
            assert!(what.contains("smaps") || what.contains("too short"), "{what}");
            assert!(Record::decode(&bytes[..cut], 0).is_err());
        }
        // A mapping that ends before it starts.
        let mut b = bytes.clone();
        b[8 + 16 + 8..8 + 16 + 16].copy_from_slice(&1u64.to_le_bytes());
        assert!(Record::decode(&b, 0).unwrap_err().1.contains("before it starts"));
        // In a file: the error names the frame's offset.
        let mut file = write(&[Record::Sync { image: 0, time_ns: 1 }], 1);
        let frame_at = file.len() as u64;
        let mut damaged = bytes.clone();
        damaged[12..16].copy_from_slice(&9u32.to_le_bytes());
        file.extend_from_slice(&encode_frame(1, &damaged).unwrap());
        let err = read_all(&file).unwrap_err();
        assert_eq!(err.offset(), Some(frame_at), "{err}");
        assert!(err.to_string().contains("smaps record announces 9 mappings"), "{err}");
    }

    #[test]
    fn map_kinds_survive_and_unknown_kinds_are_other() {
        for k in [MapKind::Heap, MapKind::Anon, MapKind::File, MapKind::Stack, MapKind::Other] {
            assert_eq!(MapKind::from_code(k.code()), k);
            assert!(k.code() <= SMAPS_KIND_MASK && k.code() != 0);
        }
        assert_eq!(MapKind::from_code(0xabc), MapKind::Other);
    }

    proptest::proptest! {
        /// A record of any type with any length and body decodes or is an error at its offset,
        /// never a panic; a decoded one ends within the payload, 8-byte aligned, and encodes
        /// back to what decodes the same.
        #[test]
        fn any_record_decodes_or_is_an_error(ty in 0u8..12, len in proptest::prop_oneof![0u32..200, proptest::num::u32::ANY], body in proptest::collection::vec(proptest::num::u8::ANY, 0..256), encoding in 0u32..4) {
            let mut raw = vec![ty, 0, 0, 0];
            raw.extend_from_slice(&len.to_le_bytes());
            raw.extend_from_slice(&body);
            if ty == record_type::CHUNK && raw.len() >= 8 + 24 {
                raw[8 + 20..8 + 24].copy_from_slice(&encoding.to_le_bytes());
            }
            match Record::decode(&raw, 0) {
                Ok((rec, next)) => {
                    proptest::prop_assert!(next % 8 == 0 && next >= 8 && next <= raw.len() + 7);
                    let mut again = Vec::new();
                    rec.encode(&mut again);
                    if !matches!(rec, Record::Unknown(_)) {
                        proptest::prop_assert_eq!(Record::decode(&again, 0).map(|r| r.0), Ok(rec));
                    }
                }
                Err((at, _)) => proptest::prop_assert_eq!(at, 0),
            }
        }

        /// Any byte soup after a valid header yields an error or records, never a panic.
        #[test]
        fn garbage_never_panics(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..300), cut in 0usize..400) {
            let mut bytes = write(&sample(), 64);
            bytes.truncate(cut.max(FILE_HEADER_LEN).min(bytes.len()));
            bytes.extend_from_slice(&tail);
            let _ = read_all(&bytes);
        }
    }
}
