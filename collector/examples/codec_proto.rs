use mtrace_collector::trace::{Record, TraceReader, compact};
use std::time::Instant;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let mut r = TraceReader::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
    let mut chunks = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        for rec in f.records() {
            if let Record::Chunk(c) = rec.unwrap() { chunks.push(c.words); }
        }
    }
    let events: usize = chunks.iter().map(|w| mtrace_protocol::event::Events::new(w).count()).sum();
    let raw: usize = chunks.iter().map(|w| w.len() * 8).sum();
    println!("{} chunks, {events} events, raw {:.2} B/event", chunks.len(), raw as f64 / events as f64);
    for _ in 0..3 {
        let t = Instant::now();
        let mut e = Vec::with_capacity(1 << 20);
        let mut n = 0;
        for w in &chunks { e.clear(); compact::encode(w, &mut e); n += e.len(); }
        println!("encode only {:.2} ns/event ({n})", t.elapsed().as_secs_f64() * 1e9 / events as f64);
    }
    let t = Instant::now();
    let mut enc = Vec::new();
    let mut encs = Vec::new();
    for w in &chunks { enc.clear(); compact::encode(w, &mut enc); encs.push(enc.clone()); }
    let dt = t.elapsed().as_secs_f64();
    let total: usize = encs.iter().map(|e| e.len()).sum();
    println!("compact {:.2} B/event, encode {:.2} ns/event", total as f64 / events as f64, dt * 1e9 / events as f64);
    let t = Instant::now();
    let mut back = Vec::new();
    for (e, w) in encs.iter().zip(&chunks) { back.clear(); compact::decode(e, w.len(), &mut back).unwrap(); assert_eq!(&back, w); }
    println!("decode {:.2} ns/event", t.elapsed().as_secs_f64() * 1e9 / events as f64);
    let all: Vec<u8> = encs.concat();
    if let Some(f) = std::env::args().nth(2) {
        if let Ok(old) = std::fs::read(&f) { assert!(old == all, "the encoding changed"); println!("same bytes as {f}"); } else { std::fs::write(&f, &all).unwrap(); }
    }
    let rawall: Vec<u8> = chunks.iter().flat_map(|w| w.iter().flat_map(|x| x.to_le_bytes())).collect();
    for (name, data) in [("compact", &all), ("raw", &rawall)] {
        for level in [-3, -1, 1, 2, 3] {
            let t = Instant::now();
            let mut out = 0;
            let mut cctx = zstd::bulk::Compressor::new(level).unwrap();
            for frame in data.chunks(1 << 20) { out += cctx.compress(frame).unwrap().len(); }
            let dt = t.elapsed().as_secs_f64();
            println!("{name} zstd {level}: {:.2} B/event, {:.2} ns/event", out as f64 / events as f64, dt * 1e9 / events as f64);
        }
        let t = Instant::now();
        let mut out = 0;
        for frame in data.chunks(1 << 20) { out += lz4_flex::block::compress(frame).len(); }
        println!("{name} lz4: {:.2} B/event, {:.2} ns/event", out as f64 / events as f64, t.elapsed().as_secs_f64() * 1e9 / events as f64);
    }
}
