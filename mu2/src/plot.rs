//! The benchmark's latency plot: a cumulative distribution, drawn as SVG.

use plotters::prelude::*;

/// The CDF of `latencies` (µs) as an SVG document; an error is plotters' message.
pub fn latency_cdf_svg(latencies: &[f64], title: &str) -> Result<String, String> {
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let max = sorted.last().copied().unwrap_or(1.0).max(1.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max * 1.05, 0.0..1.0)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("latency (µs)")
            .y_desc("fraction of requests")
            .draw()
            .map_err(|e| e.to_string())?;
        let n = sorted.len().max(1) as f64;
        chart
            .draw_series(LineSeries::new(sorted.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)), &BLUE))
            .map_err(|e| e.to_string())?;
        // The backend borrows `svg` until it is dropped; present() completes the document.
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_complete_document() {
        let svg = latency_cdf_svg(&[3.0, 1.0, 2.0], "test").expect("drawn");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
        assert!(svg.contains("test"));
    }
}
