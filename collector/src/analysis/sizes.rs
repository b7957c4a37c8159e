//! Request sizes of allocations: an HDR histogram (3 significant digits, so every power-of-two
//! bucket's count is exact) plus the exact bytes requested per power-of-two bucket.

use hdrhistogram::Histogram;

/// Buckets: `[0]` holds size 0, `[k]` (k ≥ 1) holds sizes in `[2^(k-1), 2^k)`.
pub const BUCKETS: usize = 65;

#[derive(Clone, Debug)]
pub struct SizeHistogram {
    hist: Option<Histogram<u64>>,
    /// Exact bytes requested per bucket.
    bytes: [u64; BUCKETS],
    /// Exact counts per bucket.
    counts: [u64; BUCKETS],
}

impl Default for SizeHistogram {
    fn default() -> Self {
        SizeHistogram { hist: Histogram::new(3).ok(), bytes: [0; BUCKETS], counts: [0; BUCKETS] }
    }
}

/// One power-of-two bucket: sizes in `[lo, hi]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SizeBucket {
    pub lo: u64,
    pub hi: u64,
    pub count: u64,
    pub bytes: u64,
}

/// The bucket of a request size.
pub fn bucket_of(size: u64) -> usize {
    (64 - size.leading_zeros()) as usize
}

impl SizeHistogram {
    /// Record one allocation of `size` requested bytes.
    pub fn record(&mut self, size: u64) {
        let b = bucket_of(size);
        self.counts[b] += 1;
        self.bytes[b] = self.bytes[b].saturating_add(size);
        if let Some(h) = &mut self.hist {
            // Auto-resizing: cannot fail for any u64 but the last few bits of range; ignore then.
            let _ = h.record(size);
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The non-empty buckets, smallest sizes first.
    pub fn buckets(&self) -> Vec<SizeBucket> {
        (0..BUCKETS)
            .filter(|&b| self.counts[b] > 0)
            .map(|b| {
                let (lo, hi) = if b == 0 { (0, 0) } else { (1u64 << (b - 1), if b == 64 { u64::MAX } else { (1u64 << b) - 1 }) };
                SizeBucket { lo, hi, count: self.counts[b], bytes: self.bytes[b] }
            })
            .collect()
    }

    /// The request size at quantile `q` (0..=1), to 3 significant digits (the lowest size of
    /// its HDR bucket); 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        match &self.hist {
            Some(h) if h.len() > 0 => h.lowest_equivalent(h.value_at_quantile(q)),
            _ => 0,
        }
    }

    pub fn max(&self) -> u64 {
        self.hist.as_ref().map_or(0, |h| if h.len() > 0 { h.lowest_equivalent(h.max()) } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_with_exact_counts_and_bytes() {
        let mut h = SizeHistogram::default();
        for s in [0, 1, 2, 3, 32, 32, 63, 64, 100_000, 100_000] {
            h.record(s);
        }
        let b = h.buckets();
        let got: Vec<(u64, u64, u64, u64)> = b.iter().map(|b| (b.lo, b.hi, b.count, b.bytes)).collect();
        assert_eq!(got, vec![(0, 0, 1, 0), (1, 1, 1, 1), (2, 3, 2, 5), (32, 63, 3, 127), (64, 127, 1, 64), (65536, 131071, 2, 200_000)]);
        assert_eq!(h.count(), 10);
        assert_eq!(h.quantile(0.5), 32);
        // Above 2048 the HDR buckets are wider than 1: 100000 lies in [99968, 100031].
        assert_eq!(h.max(), 99_968);
        assert_eq!(bucket_of(u64::MAX), 64);
    }
}
