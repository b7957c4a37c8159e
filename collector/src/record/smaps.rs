//! Sampling `/proc/<pid>/smaps`: resident bytes per mapping of every traced process (the OS
//! view the glibc model is checked against), written as `Record::Smaps`.
//!
//! * A thread of its own (`mtrace-smaps`) samples every image every `--smaps-interval-ms`
//!   (default 100; 0: never). Reading smaps walks the page tables of every mapping under the
//!   process's mmap lock: ~10 µs for a small process, milliseconds for hundreds of MiB; the
//!   process's own mmap/munmap calls and page faults may wait for it meanwhile. It is kept off
//!   the 10 ms RSS sampler so that RSS samples stay on time.
//! * One more sample is taken when the process says Bye (in its destructor or `_exit`, after
//!   its exit checkpoint): under the standalone agent the process waits for it; under
//!   `mtracer record` it races with the exit and is kept only if the process had not begun
//!   exiting when the read ended. So the last sample is up to one period older than the exit.
//! * A sample is dropped when the process was exiting by the end of the read (its address space
//!   may have been torn down in the middle): smaps must not show mappings vanishing that the
//!   process never unmapped.
//! * Times are the collector's clock (as RSS samples) when the read began.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::trace::{MapKind, Mapping, Record};

use super::Shared;
use super::image::Image;

/// The memfd name of the trace ring (its mapping in the process is ours, not the program's).
const RING_NAME: &[u8] = b"/memfd:mtrace-ring";

/// `PF_EXITING` in the flags of `/proc/<pid>/stat`: the thread has begun exiting.
const PF_EXITING: u64 = 0x4;

/// Sample every image each period until the recording ends.
pub fn smaps_loop(shared: &Shared) {
    let period = shared.opts.smaps_period;
    let mut next = Instant::now();
    while !shared.drain_exit.load(Ordering::Acquire) {
        let images: Vec<Arc<Image>> = shared.images.lock().unwrap().clone();
        for img in images.iter().filter(|i| !i.superseded.load(Ordering::Acquire)) {
            sample_and_send(shared, img);
        }
        next += period;
        // Sleep in short slices: the end of the recording must not wait a whole period.
        loop {
            let now = Instant::now();
            if next <= now {
                next = now;
                break;
            }
            if shared.drain_exit.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep((next - now).min(Duration::from_millis(10)));
        }
    }
}

/// Sample one image now and send the record (if the sample is good). Samples of one recording
/// are taken one at a time, so that each image's samples are in time order in the trace.
pub fn sample_and_send(shared: &Shared, img: &Image) {
    let mut buf = shared.smaps_buf.lock().unwrap_or_else(|e| e.into_inner());
    let time_ns = crate::clock::now_ns();
    if let Some(maps) = sample(img.pid, &mut buf) {
        if img.superseded.load(Ordering::Acquire) {
            return; // exec'd during the read: which image the mappings belong to is unclear
        }
        shared.sink.send(&Record::Smaps { image: img.id, time_ns, maps });
    }
}

/// Read and parse `/proc/<pid>/smaps`; `None` if it cannot be read or the process was exiting.
pub fn sample(pid: u32, buf: &mut Vec<u8>) -> Option<Vec<Mapping>> {
    buf.clear();
    let mut f = std::fs::File::open(format!("/proc/{pid}/smaps")).ok()?;
    f.read_to_end(buf).ok()?;
    if buf.is_empty() || exiting(pid) {
        return None;
    }
    Some(parse(buf))
}

/// Has the process (its main thread) begun exiting, or is it gone?
fn exiting(pid: u32) -> bool {
    let Ok(s) = std::fs::read(format!("/proc/{pid}/stat")) else { return true };
    // Fields after the command name (which may hold spaces and parentheses) follow the last ')':
    // state, ppid, pgrp, session, tty_nr, tpgid, flags.
    let Some(close) = s.iter().rposition(|&b| b == b')') else { return true };
    let flags = s[close + 1..].split(|b| b.is_ascii_whitespace()).filter(|f| !f.is_empty()).nth(6);
    match flags.and_then(|f| std::str::from_utf8(f).ok()).and_then(|f| f.parse::<u64>().ok()) {
        Some(flags) => flags & PF_EXITING != 0,
        None => true,
    }
}

/// Parse smaps text: mappings with resident bytes, and `Heap`/`Anon` mappings whatever their
/// residency; the trace ring's mapping left out.
pub fn parse(text: &[u8]) -> Vec<Mapping> {
    let mut out = Vec::new();
    // The mapping being read: (start, end, kind, is the trace ring).
    let mut cur: Option<(u64, u64, MapKind, bool)> = None;
    let mut rss = 0u64;
    let flush = |cur: &mut Option<(u64, u64, MapKind, bool)>, rss: u64, out: &mut Vec<Mapping>| {
        if let Some((start, end, kind, false)) = cur.take()
            && (rss > 0 || matches!(kind, MapKind::Heap | MapKind::Anon))
        {
            out.push(Mapping { start, end, rss, kind });
        }
    };
    for line in text.split(|&b| b == b'\n') {
        match line.first() {
            // Mapping header lines start with the (lowercase hex) start address; field lines
            // ("Rss:", "VmFlags:") with an uppercase letter.
            Some(c) if c.is_ascii_digit() || (b'a'..=b'f').contains(c) => {
                if let Some(h) = header(line) {
                    flush(&mut cur, rss, &mut out);
                    rss = 0;
                    cur = Some(h);
                }
            }
            Some(b'R') if line.starts_with(b"Rss:") => rss = kib_field(&line[4..]).saturating_mul(1024),
            _ => {}
        }
    }
    flush(&mut cur, rss, &mut out);
    out
}

/// `start-end perms offset dev inode [name]` → (start, end, kind, is the trace ring).
fn header(line: &[u8]) -> Option<(u64, u64, MapKind, bool)> {
    let mut fields = line.splitn(6, |&b| b == b' ');
    let range = fields.next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    for _ in 0..4 {
        fields.next()?; // perms, offset, dev, inode
    }
    let name = fields.next().map_or(&b""[..], |n| n.trim_ascii());
    let kind = match name {
        b"" => MapKind::Anon,
        b"[heap]" => MapKind::Heap,
        b"[stack]" => MapKind::Stack,
        n if n.starts_with(b"/") => MapKind::File,
        _ => MapKind::Other,
    };
    Some((start, end.max(start), kind, name.starts_with(RING_NAME)))
}

fn hex(s: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// `   1234 kB` → 1234.
fn kib_field(s: &[u8]) -> u64 {
    s.iter().skip_while(|b| b.is_ascii_whitespace()).take_while(|b| b.is_ascii_digit()).fold(0u64, |a, &b| a.saturating_mul(10).saturating_add((b - b'0') as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d4a3a00000-55d4a3a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
KernelPageSize:        4 kB
MMUPageSize:           4 kB
Rss:                  12 kB
Pss:                  12 kB
VmFlags: rd wr mr mw me ac sd
7f0000000000-7f0004000000 ---p 00000000 00:00 0 
Size:              65536 kB
Rss:                   0 kB
VmFlags: mr mw me nr sd
7f1000000000-7f1000002000 r--p 00000000 08:01 1234                       /usr/lib/x86_64-linux-gnu/libc.so.6
Size:                  8 kB
Rss:                   8 kB
VmFlags: rd mr mw me sd
7f1000002000-7f1000004000 r-xp 00002000 08:01 1234                       /usr/lib/x86_64-linux-gnu/libm.so.6
Size:                  8 kB
Rss:                   0 kB
VmFlags: rd ex mr mw me sd
7f2000000000-7f2004000000 rw-s 00000000 00:01 77                         /memfd:mtrace-ring (deleted)
Size:              65536 kB
Rss:                 128 kB
VmFlags: rd wr sh mr mw me ms sd
7f3000000000-7f3000001000 rw-p 00000000 00:00 0                          [anon:glibc: malloc]
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd wr mr mw me ac sd
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  16 kB
VmFlags: rd wr mr mw me gd ac
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
Size:                  4 kB
Rss:                   0 kB
VmFlags: ex
";

    #[test]
    fn parses_kinds_rss_and_leaves_out_the_ring_and_empty_file_mappings() {
        let m = parse(SAMPLE.as_bytes());
        let want = vec![
            Mapping { start: 0x55d4a3a00000, end: 0x55d4a3a21000, rss: 12 << 10, kind: MapKind::Heap },
            Mapping { start: 0x7f0000000000, end: 0x7f0004000000, rss: 0, kind: MapKind::Anon },
            Mapping { start: 0x7f1000000000, end: 0x7f1000002000, rss: 8 << 10, kind: MapKind::File },
            Mapping { start: 0x7f3000000000, end: 0x7f3000001000, rss: 4 << 10, kind: MapKind::Other },
            Mapping { start: 0x7ffc00000000, end: 0x7ffc00021000, rss: 16 << 10, kind: MapKind::Stack },
        ];
        assert_eq!(m, want);
    }

    #[test]
    fn garbage_does_not_panic() {
        for s in ["", "\n\n", "zzzz", "1-", "1-2 r", "abc-def rw-p 0 0 0", "Rss: 99999999999999999999999 kB", "0-1 a b c d [heap]\nRss: 4 kB"] {
            let _ = parse(s.as_bytes());
        }
        assert_eq!(parse(b"0-1000 rw-p 0 0:0 0 [heap]\nRss: 4 kB")[0].rss, 4096);
    }

    #[test]
    fn samples_this_process() {
        let mut buf = Vec::new();
        let maps = sample(std::process::id(), &mut buf).expect("own smaps");
        assert!(maps.iter().any(|m| m.kind == MapKind::File && m.rss > 0), "{maps:?}");
        assert!(maps.iter().any(|m| m.kind == MapKind::Stack), "{maps:?}");
    }
}
