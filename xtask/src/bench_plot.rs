//! The peer benchmark's plot: the exec round trip distribution of every peer as an empirical
//! CDF on a logarithmic time axis, one curve each, drawn with `plotters` into a PNG.
//!
//! Text needs a font: plotters' `ab_glyph` backend takes one as bytes, so the build needs no
//! system development package (fontconfig, freetype) and the font (DejaVu Sans, Debian's
//! fonts-dejavu-core) is read at run time.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// Points per curve: enough for a smooth line, few enough for a small PNG.
const POINTS: usize = 400;
const SIZE: (u32, u32) = (1100, 650);

/// The samples as `(milliseconds, fraction of samples at or below)`, sorted, at most `max`
/// points (always the first and the last).
pub fn ecdf_points(samples: &[Duration], max: usize) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 || max == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(max).max(1);
    let mut points: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (sorted[i], (i + 1) as f64 / n as f64))
        .collect();
    if points.last().map(|p| p.1) != Some(1.0) {
        points.push((sorted[n - 1], 1.0));
    }
    points
}

/// The 1-2-5 steps between `lo` and `hi` (milliseconds): the log axis's labels.
pub fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 1e-3;
    while decade <= hi && ticks.len() < 60 {
        for step in [1.0, 2.0, 5.0] {
            // Rounded to the decade's digits, so labels print as 0.2, not 0.20000000000000004.
            let tick = format!("{:.3}", decade * step)
                .parse::<f64>()
                .unwrap_or(decade * step);
            if tick >= lo && tick <= hi {
                ticks.push(tick);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// Writes the ECDF plot of `series` (label, samples) to `path`, with the font at `font`.
pub fn latency_ecdf(path: &Path, font: &Path, series: &[(String, Vec<Duration>)]) -> Result<()> {
    let font_bytes = std::fs::read(font).with_context(|| format!("reading {}", font.display()))?;
    // plotters keeps fonts for the process's life.
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font_bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{} is not a font plotters can use", font.display()))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let curves: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(label, samples)| (label.clone(), ecdf_points(samples, POINTS)))
        .filter(|(_, points)| !points.is_empty())
        .collect();
    let (lo, hi) = curves
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold((f64::INFINITY, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if !(lo.is_finite() && hi > 0.0) {
        return Err(anyhow!("no samples to plot"));
    }
    // The slowest sample at 60% of the width: the legend gets the lower right to itself.
    let lo = lo / 1.2;
    let hi = (lo.ln() + (hi.ln() - lo.ln()) / 0.6).exp();
    let runs = series.first().map_or(0, |(_, s)| s.len());

    let mut pixels = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    draw_ecdf(&mut pixels, &curves, (lo, hi), runs)?;
    write_png(path, &pixels)
}

/// RGB pixels, [`SIZE`], into a PNG file.
fn write_png(path: &Path, pixels: &[u8]) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    let mut writer = encoder
        .write_header()
        .with_context(|| format!("writing {}", path.display()))?;
    writer
        .write_image_data(pixels)
        .with_context(|| format!("writing {}", path.display()))?;
    writer
        .finish()
        .with_context(|| format!("writing {}", path.display()))
}

fn draw_ecdf(
    pixels: &mut [u8],
    curves: &[(String, Vec<(f64, f64)>)],
    (lo, hi): (f64, f64),
    runs: usize,
) -> Result<()> {
    let root = BitMapBackend::with_buffer(pixels, SIZE).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<_>| anyhow!("drawing the plot: {e:?}");
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("exec /bin/true round trip, {runs} interleaved rounds (ECDF)"),
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            0f64..1f64,
        )
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("round trip (ms, log scale)")
        .y_desc("fraction of round trips ≤ x")
        .x_label_formatter(&|x| format!("{x}"))
        .light_line_style(RGBColor(240, 240, 240))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()
        .map_err(draw)?;
    let colors = [
        RGBColor(90, 90, 90),
        RGBColor(0, 114, 178),
        RGBColor(86, 180, 233),
        RGBColor(230, 159, 0),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
    ];
    for (i, (label, points)) in curves.iter().enumerate() {
        let color = colors[i % colors.len()];
        let p50 = points.iter().find(|p| p.1 >= 0.5).map_or(f64::NAN, |p| p.0);
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                ShapeStyle::from(&color).stroke_width(2),
            ))
            .map_err(draw)?
            .label(format!("{label} (p50 {p50:.2} ms)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_step_one_two_five() {
        assert_eq!(log_ticks(0.4, 25.0), [0.5, 1.0, 2.0, 5.0, 10.0, 20.0]);
        assert_eq!(log_ticks(0.15, 0.3), [0.2]);
        assert!(log_ticks(3.0, 4.0).is_empty());
    }

    #[test]
    fn ecdf_is_sorted_and_ends_at_one() {
        let samples: Vec<Duration> = [5, 1, 3, 2, 4]
            .iter()
            .map(|&ms| Duration::from_millis(ms))
            .collect();
        assert_eq!(
            ecdf_points(&samples, 10),
            [(1.0, 0.2), (2.0, 0.4), (3.0, 0.6), (4.0, 0.8), (5.0, 1.0)]
        );
        // Thinned: the last sample is always there.
        let many: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let points = ecdf_points(&many, 100);
        assert!(points.len() <= 101, "{}", points.len());
        assert_eq!(points.first().map(|p| p.1), Some(0.001));
        assert_eq!(points.last(), Some(&(1.0, 1.0)));
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert!(ecdf_points(&[], 10).is_empty());
    }

    #[test]
    fn the_plot_is_a_png() {
        // The system's DejaVu Sans, or the package unpacked under target/ (as the bench does).
        let font = crate::bench_peers::ensure_font().unwrap();
        let dir = crate::util::project_root()
            .join("target")
            .join(format!("plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plot.png");
        let series = vec![
            (
                "a".to_owned(),
                (1..500).map(Duration::from_micros).collect(),
            ),
            (
                "b".to_owned(),
                (100..900).map(|i| Duration::from_micros(i * 20)).collect(),
            ),
        ];
        latency_ecdf(&path, &font, &series).unwrap();
        let png = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.len() > 10_000, "{} bytes", png.len());
    }
}
