//! The timeline as CSV: one row per RSS sample, with the retention categories of the glibc
//! model (zero when it is not modelled).

use std::io::Write;

use anyhow::Result;

use crate::analysis::image::ImageAnalysis;

pub const HEADER: &str = "t_s,live_bytes,heap_bytes,mmapped_bytes,rss_bytes,live,overhead,tcache,fastbins,bins,top,released,metadata,mmapped_rounding";

pub fn write(img: &ImageAnalysis, out: &mut dyn Write) -> Result<()> {
    writeln!(out, "{HEADER}")?;
    for p in &img.samples.timeline {
        let t = p.time_ns.saturating_sub(img.start_ns) as f64 / 1e9;
        write!(out, "{t:.6},{},{},{},{}", p.live_bytes, p.heap_bytes, p.mmapped_bytes, p.rss_bytes)?;
        for (_, v) in p.categories.pairs() {
            write!(out, ",{v}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}
