//! What an event's values can be in a real process on x86_64 Linux, checked before the merger
//! queues it: a block, a mapping or a heap lies below [`ADDRESS_LIMIT`] (user space is below
//! 2^47, or 2^56 with five-level page tables) and does not wrap around; glibc's books count
//! bytes of that space. An event outside this is corruption (a damaged or forged trace): the
//! merger counts it (`implausible_events`) and leaves it out, so that no model downstream meets
//! a block of 2^64 bytes or an address range that wraps — whose sums and ranges they were not
//! written for.
//!
//! Failed calls are exempt where their arguments are what the program passed (`malloc(SIZE_MAX)`
//! returns NULL; a failed `munmap` may name any range).

use mtrace_protocol::event::Event;

/// Every address and length of a plausible event is at most this (2^57: above every user
/// address on x86_64, low enough that two of them never overflow a `u64`).
pub const ADDRESS_LIMIT: u64 = 1 << 57;

/// `mmap`'s and `mremap`'s failure value.
const MAP_FAILED: u64 = u64::MAX;

/// `[addr, addr + len)` lies in the address space.
fn span(addr: u64, len: u64) -> bool {
    addr <= ADDRESS_LIMIT && len <= ADDRESS_LIMIT && addr + len <= ADDRESS_LIMIT
}

fn small(v: u64) -> bool {
    v <= ADDRESS_LIMIT
}

/// Could a real process have produced `ev`?
pub fn plausible(ev: &Event) -> bool {
    match *ev {
        Event::Alloc { ptr, size, align, prev_size, .. } => ptr == 0 || (span(ptr, size) && small(align) && small(prev_size)),
        Event::Realloc { old_ptr, new_ptr, size, prev_size, .. } => small(old_ptr) && (new_ptr == 0 || (span(new_ptr, size) && small(prev_size))),
        Event::Free { ptr, .. } => small(ptr),
        Event::Mmap { result, len, .. } => result == MAP_FAILED || span(result, len),
        Event::Munmap { addr, len, result } => result != 0 || span(addr, len),
        Event::Mremap { old_addr, old_len, new_len, result, .. } => result == MAP_FAILED || (span(old_addr, old_len) && span(result, new_len)),
        Event::Brk { addr, result } => result != 0 || small(addr),
        Event::Sbrk { increment, result } => result == MAP_FAILED || (small(result) && small(increment.unsigned_abs()) && span(result, increment.max(0) as u64)),
        Event::ProgramBreak { brk, .. } => small(brk),
        Event::ArenaHeap { heap, ar_ptr, size, prev } => span(heap, size) && small(ar_ptr) && small(prev),
        Event::HeapSize { heap, size, .. } => span(heap, size),
        Event::Lost { events, blocks } => small(events) && small(blocks),
        Event::Mallinfo { mi, .. } => {
            [mi.arena, mi.ordblks, mi.smblks, mi.hblks, mi.hblkhd, mi.fsmblks, mi.uordblks, mi.fordblks, mi.keepcost].into_iter().all(small)
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtrace_protocol::event::EventKind;

    fn malloc(ptr: u64, size: u64) -> Event {
        Event::Alloc { kind: EventKind::Malloc, ptr, size, align: 0, chunk: 0x31, prev_size: 0, stack: 0, after: None }
    }

    #[test]
    fn real_values_pass_and_impossible_ones_do_not() {
        assert!(plausible(&malloc(0x5555_5555_92a0, 100)));
        assert!(plausible(&malloc(0x7fff_f7f0_0010, 1 << 40)));
        // malloc(SIZE_MAX) fails: a real call.
        assert!(plausible(&malloc(0, u64::MAX)));
        assert!(!plausible(&malloc(0x5555_5555_92a0, u64::MAX)));
        assert!(!plausible(&malloc(u64::MAX - 15, 16)));
        assert!(!plausible(&malloc(ADDRESS_LIMIT - 8, 16)));
        assert!(plausible(&Event::Munmap { addr: u64::MAX, len: 5, result: -22 }));
        assert!(!plausible(&Event::Munmap { addr: u64::MAX, len: 5, result: 0 }));
        assert!(plausible(&Event::Mmap { kind: EventKind::Mmap, result: u64::MAX, len: u64::MAX, prot: 0, flags: 0, fd: -1, offset: 0, addr_hint: 0 }));
        assert!(!plausible(&Event::ArenaHeap { heap: 1 << 60, ar_ptr: 0, size: 0x21000, prev: 0 }));
        assert!(plausible(&Event::Sbrk { increment: -4096, result: 0x5555_5557_a000 }));
        assert!(!plausible(&Event::Sbrk { increment: i64::MIN, result: 0x5555_5557_a000 }));
        assert!(!plausible(&Event::Free { kind: EventKind::Free, ptr: u64::MAX, chunk: 0, after: None }));
    }
}
