//! Where things are in a trace file: its frames (offsets, sequence numbers, decompressed
//! payloads), the records of each payload, and the events of each `Chunk` — what the mutations
//! aim at, and how an edited payload is put back (compressed again, with its checksum right).

use mtrace_collector::trace::{self, Record, TraceReader};
use mtrace_protocol::tracefile::{FILE_HEADER_LEN, chunk_encoding};

/// One record of a frame's payload.
#[derive(Clone, Debug)]
pub struct RecordSpan {
    /// Offset of its 8-byte header in the payload.
    pub at: usize,
    /// Offset of the next record (its body padded to 8 bytes).
    pub end: usize,
    pub ty: u8,
    /// For a `Chunk`: its words and where each event starts.
    pub chunk: Option<ChunkSpan>,
}

#[derive(Clone, Debug)]
pub struct ChunkSpan {
    /// The chunk as it decodes (its header fields and words).
    pub chunk: trace::Chunk,
    /// How it is stored ([`chunk_encoding`]).
    pub encoding: u32,
    /// (first word, length in words) of each event that decodes.
    pub events: Vec<(usize, usize)>,
}

/// One frame of the file.
#[derive(Clone, Debug)]
pub struct FrameSpan {
    /// Offset of its header in the file, and its length (header and payload).
    pub offset: usize,
    pub len: usize,
    pub seq: u64,
    pub raw: Vec<u8>,
    pub records: Vec<RecordSpan>,
}

/// A whole trace file, taken apart.
#[derive(Clone, Debug)]
pub struct Layout {
    pub bytes: Vec<u8>,
    pub frames: Vec<FrameSpan>,
}

impl Layout {
    /// Take a (valid) trace apart. `None` if it does not read cleanly.
    pub fn parse(bytes: Vec<u8>) -> Option<Layout> {
        let mut r = TraceReader::new(&bytes[..]).ok()?;
        let mut frames = Vec::new();
        loop {
            let offset = r.offset() as usize;
            let Some(f) = r.next_frame().ok()? else { break };
            let len = r.offset() as usize - offset;
            let records = records_of(&f.raw)?;
            frames.push(FrameSpan { offset, len, seq: f.seq, raw: f.raw, records });
        }
        Some(Layout { bytes, frames })
    }

    /// The file offsets where frames start, and the file's end: every clean cut.
    pub fn boundaries(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.frames.iter().map(|f| f.offset).collect();
        v.push(self.bytes.len());
        v
    }

    /// The file with frame `i`'s payload replaced by `raw` (compressed again, same sequence
    /// number, checksum right).
    pub fn with_payload(&self, i: usize, raw: &[u8]) -> Vec<u8> {
        let f = &self.frames[i];
        let mut out = self.bytes[..f.offset].to_vec();
        out.extend_from_slice(&trace::encode_frame(f.seq, raw).expect("zstd compresses a frame"));
        out.extend_from_slice(&self.bytes[f.offset + f.len..]);
        out
    }

    /// The file with its frames in the order `order` (indices, repeats allowed), bytes unchanged.
    pub fn with_frames(&self, order: &[usize]) -> Vec<u8> {
        let mut out = self.bytes[..FILE_HEADER_LEN].to_vec();
        for &i in order {
            let f = &self.frames[i];
            out.extend_from_slice(&self.bytes[f.offset..f.offset + f.len]);
        }
        out
    }

    /// Every (frame, record) pair holding a chunk with at least one event.
    pub fn chunks(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for (fi, f) in self.frames.iter().enumerate() {
            for (ri, r) in f.records.iter().enumerate() {
                if r.chunk.as_ref().is_some_and(|c| !c.events.is_empty()) {
                    v.push((fi, ri));
                }
            }
        }
        v
    }

    /// The `nth` event (0: the first) that `pred` accepts, in file order: (frame, record, word
    /// of the event's header in the chunk). For regression recipes that name an event by what it
    /// is rather than by where it is.
    pub fn find_event(&self, pred: impl Fn(&mtrace_protocol::event::Event) -> bool, nth: usize) -> Option<(usize, usize, usize)> {
        let mut found = 0;
        for (fi, ri) in self.chunks() {
            let c = self.frames[fi].records[ri].chunk.as_ref()?;
            for &(at, _) in &c.events {
                let Ok((ev, _)) = mtrace_protocol::event::decode(&c.chunk.words, at) else { continue };
                if pred(&ev) {
                    if found == nth {
                        return Some((fi, ri, at));
                    }
                    found += 1;
                }
            }
        }
        None
    }

    /// Every word of every chunk that is the first data word of an allocation or a free (a
    /// pointer): addresses that mean something to this trace.
    pub fn addresses(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (fi, ri) in self.chunks() {
            let c = self.frames[fi].records[ri].chunk.as_ref().expect("a chunk");
            for &(at, len) in &c.events {
                if len >= 2 && c.chunk.words[at] & 0xff <= 12 {
                    v.push(c.chunk.words[at + 1]);
                }
            }
        }
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// The records of a payload.
fn records_of(raw: &[u8]) -> Option<Vec<RecordSpan>> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let (rec, end) = Record::decode(raw, at).ok()?;
        let ty = raw[at];
        let chunk = match rec {
            Record::Chunk(c) => {
                let encoding = raw.get(at + 8 + 20..at + 8 + 24).map_or(chunk_encoding::WORDS, |b| u32::from_le_bytes(b.try_into().unwrap_or_default()));
                Some(ChunkSpan { events: events_of(&c.words), chunk: c, encoding })
            }
            _ => None,
        };
        v.push(RecordSpan { at, end, ty, chunk });
        at = end;
    }
    Some(v)
}

/// (first word, length) of each event of `words` that decodes, up to the first that does not.
pub fn events_of(words: &[u64]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < words.len() {
        match mtrace_protocol::event::decode(words, at) {
            Ok((_, len)) => {
                v.push((at, len));
                at += len;
            }
            Err(_) => break,
        }
    }
    v
}

impl ChunkSpan {
    /// This chunk's record (same header fields) holding `words` instead: as plain words if it
    /// was, else in the compact encoding (what the recorder writes).
    pub fn encode(&self, words: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        let c = &self.chunk;
        if self.encoding == chunk_encoding::WORDS {
            Record::encode_chunk_words(&mut out, c.image, c.stream, c.tid, c.block_seq, c.offset, words);
        } else {
            Record::encode_chunk(&mut out, c.image, c.stream, c.tid, c.block_seq, c.offset, words);
        }
        out
    }
}
