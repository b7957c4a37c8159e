//! The `size_histogram` section of a process report: request sizes of the image's allocations by
//! power-of-two bucket (see `analysis::sizes`).

use serde::Serialize;

use crate::analysis::image::ImageAnalysis;
use crate::analysis::sizes::SizeBucket;

#[derive(Serialize, Clone, Debug, Default)]
pub struct SizeHistogram {
    /// Allocations counted (successful ones: malloc, calloc, realloc, the memalign family, …).
    pub count: u64,
    /// Request size at the median and the 99th percentile, and the largest (3 significant
    /// digits).
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    /// Non-empty buckets `[lo, hi]`, with exact counts and requested bytes.
    pub buckets: Vec<SizeBucket>,
}

pub fn build(img: &ImageAnalysis) -> SizeHistogram {
    let h = &img.sizes;
    SizeHistogram { count: h.count(), p50: h.quantile(0.5), p99: h.quantile(0.99), max: h.max(), buckets: h.buckets() }
}
