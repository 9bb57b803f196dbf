//! Latency plots: the cumulative distribution of one or more benchmark runs on a log-scale
//! latency axis, each run's KVM floors (measured in the same run) as dashed reference lines,
//! p50 and p99 marked, the runs' parameters in a subtitle. SVG, or PNG when the file name ends
//! in `.png`. `mu2 bench --plot` draws its own run; `mu2 plot` overlays runs read back from
//! their CSV files (`report::samples_csv`). Open-loop sweeps (`mu2 bench --rate a,b,c`) plot
//! as latency against offered load instead (`draw_load`), with the knee and the mode's floor;
//! `mu2 plot` reads them back from the sweep's JSON.
//!
//! Text needs a TrueType font (plotters measures and, for PNG, draws the glyphs): the first of
//! `MU2_PLOT_FONT` and a few usual system paths that exists (Debian: fonts-dejavu-core).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mu2_vmm::error::{Classify, FailureKind};
use plotters::coord::Shift;
use plotters::prelude::*;

/// One benchmark run as a plot shows it.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Its name in the legend.
    pub label: String,
    /// Its parameters, in order (`mode`, `function`, …).
    pub params: Vec<(String, String)>,
    /// Request latencies, µs.
    pub latencies: Vec<f64>,
    /// The floors measured in the same run: name (`floor_fresh`, …) and samples, µs.
    pub floors: Vec<(String, Vec<f64>)>,
}

impl Run {
    fn param(&self, key: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{}: a plot is .svg or .png", path.display())]
    Format { path: PathBuf },
    #[error("{}: its directory {} does not exist", path.display(), dir.display())]
    NoDirectory { path: PathBuf, dir: PathBuf },
    #[error("no TrueType font for the plot's text (tried {tried}); install one (Debian: fonts-dejavu-core) or set MU2_PLOT_FONT=FILE.ttf")]
    NoFont { tried: String },
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: line {line}: {message}", path.display())]
    Csv { path: PathBuf, line: usize, message: String },
    #[error("{}: no request samples to plot", path.display())]
    Empty { path: PathBuf },
    #[error("drawing {}: {message}", path.display())]
    Draw { path: PathBuf, message: String },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Classify for PlotError {
    fn kind(&self) -> FailureKind {
        match self {
            PlotError::Draw { .. } => FailureKind::Internal,
            _ => FailureKind::BadInput,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Svg,
    Png,
}

/// Checks that a plot can be written to `path` before the work that feeds it: a known
/// format, an existing directory, a font.
pub fn check_target(path: &Path) -> Result<(), PlotError> {
    format_of(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
        return Err(PlotError::NoDirectory { path: path.to_path_buf(), dir: dir.to_path_buf() });
    }
    font().map(|_| ())
}

fn format_of(path: &Path) -> Result<Format, PlotError> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => Err(PlotError::Format { path: path.to_path_buf() }),
    }
}

/// Where fonts usually are on Linux distributions.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
];

/// Registers the plot font with plotters, once; the path it came from.
fn font() -> Result<&'static Path, PlotError> {
    static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = FONT.get_or_init(|| {
        let chosen = std::env::var_os("MU2_PLOT_FONT").map(PathBuf::from);
        let candidates: Vec<PathBuf> = chosen.into_iter().chain(FONT_PATHS.iter().map(PathBuf::from)).collect();
        for path in &candidates {
            let Ok(bytes) = std::fs::read(path) else { continue };
            // Kept for the process's life: plotters holds registered fonts by reference.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(path.clone());
            }
        }
        Err(candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))
    });
    match found {
        Ok(path) => Ok(path.as_path()),
        Err(tried) => Err(PlotError::NoFont { tried: tried.clone() }),
    }
}

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 620;

/// Draws `runs` to `path`, as SVG or PNG by its extension.
pub fn draw(runs: &[Run], title: &str, path: &Path) -> Result<(), PlotError> {
    render(Figure::Cdf(runs), title, path)
}

/// Draws latency-vs-load curves (open-loop sweeps) to `path`, as SVG or PNG by its extension.
pub fn draw_load(curves: &[LoadCurve], title: &str, path: &Path) -> Result<(), PlotError> {
    render(Figure::Load(curves), title, path)
}

/// What a plot shows.
#[derive(Clone, Copy)]
enum Figure<'a> {
    /// Latency CDFs of closed-loop runs.
    Cdf(&'a [Run]),
    /// Latency percentiles against the offered rate.
    Load(&'a [LoadCurve]),
}

fn render(figure: Figure<'_>, title: &str, path: &Path) -> Result<(), PlotError> {
    let format = format_of(path)?;
    font()?;
    let fail = |message: String| PlotError::Draw { path: path.to_path_buf(), message };
    let bytes = match format {
        Format::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
                draw_figure(&root, figure, title).map_err(fail)?;
                // The backend borrows `svg` until dropped; present() completes the document.
                root.present().map_err(|e| fail(e.to_string()))?;
            }
            svg.into_bytes()
        }
        Format::Png => {
            let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
                draw_figure(&root, figure, title).map_err(fail)?;
                root.present().map_err(|e| fail(e.to_string()))?;
            }
            encode_png(&rgb).map_err(|e| fail(e.to_string()))?
        }
    };
    std::fs::write(path, bytes).map_err(|source| PlotError::Write { path: path.to_path_buf(), source })
}

fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    figure: Figure<'_>,
    title: &str,
) -> Result<(), String> {
    match figure {
        Figure::Cdf(runs) => draw_on(root, runs, title),
        Figure::Load(curves) => draw_load_on(root, curves, title),
    }
}

fn encode_png(rgb: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(rgb)?;
    Ok(out)
}

/// The runs' colors: distinct, and readable on white.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn draw_on<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[Run], title: &str) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let (header, body) = root.split_vertically(86);
    header.draw(&Text::new(title.to_string(), (60, 12), ("sans-serif", 24).into_font().color(&BLACK))).map_err(err)?;
    header
        .draw(&Text::new(subtitle(runs), (60, 44), ("sans-serif", 14).into_font().color(&RGBColor(90, 90, 90))))
        .map_err(err)?;
    header
        .draw(&Text::new(key(runs), (60, 64), ("sans-serif", 13).into_font().color(&RGBColor(120, 120, 120))))
        .map_err(err)?;

    let (lo, hi) = latency_range(runs);
    let mut chart = ChartBuilder::on(&body)
        .margin_left(20)
        .margin_right(30)
        .margin_bottom(10)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_labels(6)
        .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
        .y_desc("requests at or below")
        .label_style(("sans-serif", 14))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err)?;

    // The latency axis: grid lines and labels at 1-2-5 steps, which log scales otherwise
    // label only at powers of ten.
    let grid = RGBColor(215, 215, 215);
    for tick in ticks(lo, hi) {
        chart.draw_series(LineSeries::new([(tick, 0.0), (tick, 1.0)], grid)).map_err(err)?;
        let (x, y) = chart.backend_coord(&(tick, 0.0));
        let label = format_us(tick);
        let style = ("sans-serif", 14).into_font().color(&BLACK).pos(text_anchor_top_center());
        body.draw(&Text::new(label, (x - body.get_base_pixel().0, y - body.get_base_pixel().1 + 8), style))
            .map_err(err)?;
    }
    let (x_mid, y_axis) = chart.backend_coord(&((lo * hi).sqrt(), 0.0));
    body.draw(&Text::new(
        "latency (log scale)".to_string(),
        (x_mid - body.get_base_pixel().0, y_axis - body.get_base_pixel().1 + 30),
        ("sans-serif", 15).into_font().color(&BLACK).pos(text_anchor_top_center()),
    ))
    .map_err(err)?;

    for (i, run) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut sorted = run.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len().max(1) as f64;
        let cdf = sorted.iter().enumerate().map(|(k, v)| (*v, (k + 1) as f64 / n));
        let (p50, p99) = (quantile(&sorted, 0.50), quantile(&sorted, 0.99));
        chart
            .draw_series(LineSeries::new(cdf, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{}: p50 {}, p99 {}", run.label, format_us(p50), format_us(p99)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
        // p50 a dot, p99 a ring; named beside the curve when there is one curve (the legend
        // names them when there are several, where labels on the curves would collide).
        for (q, value, name) in [(0.50, p50, "p50"), (0.99, p99, "p99")] {
            let style = if q < 0.9 { color.filled() } else { color.stroke_width(2) };
            let marker = EmptyElement::at((value, q)) + Circle::new((0, 0), 5, style);
            if runs.len() == 1 {
                let text = format!("{name} {}", format_us(value));
                let font = ("sans-serif", 14).into_font().color(&color).pos(text_anchor_right());
                chart.draw_series(std::iter::once(marker + Text::new(text, (-10, 0), font))).map_err(err)?;
            } else {
                chart.draw_series(std::iter::once(marker)).map_err(err)?;
            }
        }
        for (f, (name, samples)) in run.floors.iter().enumerate() {
            let mut floor = samples.clone();
            floor.sort_by(f64::total_cmp);
            let p50 = quantile(&floor, 0.5);
            let style = color.mix(0.7).stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new([(p50, 0.0), (p50, 1.0)], 6, 4, style))
                .map_err(err)?
                .label(format!("{name} p50 {}", format_us(p50)))
                .legend(move |(x, y)| {
                    plotters::element::DashedPathElement::new(
                        [(x, y), (x + 24, y)],
                        4,
                        3,
                        color.mix(0.7).stroke_width(1),
                    )
                });
            // The floor's name at the top of its line, staggered so that two do not overlap.
            let y = 0.97 - 0.05 * (f + i * 2) as f64;
            let label = Text::new(
                format!("{name} {}", format_us(p50)),
                (4, 0),
                ("sans-serif", 12).into_font().color(&color.mix(0.9)).pos(text_anchor_left()),
            );
            chart.draw_series(std::iter::once(EmptyElement::at((p50, y)) + label)).map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .margin(12)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn text_anchor_top_center() -> plotters::style::text_anchor::Pos {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    Pos::new(HPos::Center, VPos::Top)
}

fn text_anchor_right() -> plotters::style::text_anchor::Pos {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    Pos::new(HPos::Right, VPos::Center)
}

fn text_anchor_left() -> plotters::style::text_anchor::Pos {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    Pos::new(HPos::Left, VPos::Center)
}

/// The parameters every run shares (what tells several apart is in the legend).
fn subtitle(runs: &[Run]) -> String {
    let Some(first) = runs.first() else { return String::new() };
    let shared: Vec<String> = first
        .params
        .iter()
        .filter(|(k, v)| runs.iter().all(|r| r.param(k) == Some(v.as_str())))
        .map(|(k, v)| format!("{} {v}", k.replace('_', " ")))
        .collect();
    shared.join(", ")
}

/// What the marks mean.
fn key(runs: &[Run]) -> String {
    let mut text = String::from("dot: p50, ring: p99");
    if runs.iter().any(|r| !r.floors.is_empty()) {
        text.push_str("; dashed: the KVM floors (p50) measured in the same run as the curve of their color");
    }
    text
}

/// The largest latency drawn, µs (a year).
const MAX_LATENCY_US: f64 = 3.2e13;

/// The latency axis's range: every sample and floor, with a margin, at least a factor 4.
fn latency_range(runs: &[Run]) -> (f64, f64) {
    let values = runs.iter().flat_map(|r| r.latencies.iter().chain(r.floors.iter().flat_map(|(_, s)| s.iter())));
    // Latencies are microseconds: anything beyond a year is not a measurement, and would push
    // the axis to infinity.
    let positive = values.copied().filter(|v| *v > 0.0 && *v <= MAX_LATENCY_US);
    let (min, max) = positive.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if max <= 0.0 {
        return (1.0, 10.0);
    }
    let (mut lo, mut hi) = (min / 1.3, max * 1.3);
    if hi / lo < 4.0 {
        let mid = (lo * hi).sqrt();
        (lo, hi) = (mid / 2.0, mid * 2.0);
    }
    (lo, hi)
}

/// Tick values at 1, 2 and 5 times powers of ten within `[lo, hi]`; only powers of ten when
/// that would crowd the axis.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut all = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    // Bounded whatever the range: a decade per step, at most a few hundred of them.
    for _ in 0..400 {
        if decade > hi || !decade.is_finite() {
            break;
        }
        for step in [1.0, 2.0, 5.0] {
            let v = decade * step;
            if v >= lo && v <= hi {
                all.push(v);
            }
        }
        decade *= 10.0;
    }
    if all.len() > 12 {
        all.retain(|v| (v.log10() - v.log10().round()).abs() < 1e-9);
    }
    all
}

/// `850 µs`, `1.2 ms`, `12 ms`, `1.5 s`: a latency as people read it.
pub fn format_us(us: f64) -> String {
    let (value, unit) = match us {
        u if u >= 1e6 => (u / 1e6, "s"),
        u if u >= 1e3 => (u / 1e3, "ms"),
        u => (u, "µs"),
    };
    // Three significant digits at most, without trailing zeros.
    let decimals = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    let number = format!("{value:.decimals$}");
    let number = if number.contains('.') { number.trim_end_matches('0').trim_end_matches('.') } else { &number };
    format!("{number} {unit}")
}

/// The `q` quantile (0..1) of sorted values, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A run read back from the CSV `mu2 bench --csv` wrote (`report::samples_csv`).
pub fn read_csv(path: &Path) -> Result<Run, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read { path: path.to_path_buf(), source })?;
    let bad = |line: usize, message: &str| PlotError::Csv { path: path.to_path_buf(), line, message: message.into() };
    let mut run = Run::default();
    let mut columns: Option<(usize, usize)> = None;
    for (n, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim_end())) {
        if let Some(params) = line.strip_prefix("# mu2 bench") {
            run.params = params
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        let Some((series, latency)) = columns else {
            let find = |name| fields.iter().position(|f| *f == name);
            match (find("series"), find("latency_us")) {
                (Some(s), Some(l)) => columns = Some((s, l)),
                _ => return Err(bad(n, "the header needs the columns series and latency_us")),
            }
            continue;
        };
        let (Some(name), Some(value)) = (fields.get(series), fields.get(latency)) else {
            return Err(bad(n, "too few fields"));
        };
        let value: f64 = value.parse().map_err(|_| bad(n, "latency_us is not a number"))?;
        match *name {
            "request" => run.latencies.push(value),
            floor => match run.floors.iter_mut().find(|(f, _)| f == floor) {
                Some((_, samples)) => samples.push(value),
                None => run.floors.push((floor.to_string(), vec![value])),
            },
        }
    }
    if run.latencies.is_empty() {
        return Err(PlotError::Empty { path: path.to_path_buf() });
    }
    let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    run.label = match (run.param("mode"), run.param("concurrency")) {
        (Some(mode), Some(c)) => format!("{stem}: {mode}, concurrency {c}"),
        (Some(mode), None) => format!("{stem}: {mode}"),
        _ => stem,
    };
    Ok(run)
}

/// An open-loop sweep as a plot shows it: latency percentiles against the offered rate.
#[derive(Debug, Clone, Default)]
pub struct LoadCurve {
    /// Its name in the legend.
    pub label: String,
    /// Offered rate (requests/s) and latency p50, p99 (µs), in increasing rate.
    pub points: Vec<(f64, f64, f64)>,
    /// The rate where p99 left its low-load value.
    pub knee: Option<f64>,
    /// The mode's floor (name, p50 µs).
    pub floor: Option<(String, f64)>,
    /// What the run was: mode, arrivals, served at once.
    pub params: Vec<(String, String)>,
}

impl LoadCurve {
    /// The curve of a `mu2 bench --rate … --json` report; `None` if it has no rates.
    pub fn of_report(json: &serde_json::Value) -> Option<LoadCurve> {
        let num = |v: &serde_json::Value, key: &str| v[key].as_f64().filter(|x| x.is_finite());
        let points: Vec<(f64, f64, f64)> = json["rates"]
            .as_array()?
            .iter()
            .filter_map(|p| Some((num(p, "rate_rps")?, num(p, "p50_us")?, num(p, "p99_us")?)))
            .collect();
        if points.is_empty() {
            return None;
        }
        let text =
            |key: &str| json[key].as_str().map(str::to_string).or_else(|| json[key].as_u64().map(|n| n.to_string()));
        let floor = json["floor"].as_str().and_then(|name| {
            let key = name.strip_prefix("floor_")?;
            Some((name.to_string(), num(&json["floors"][key], "p50_us")?))
        });
        let params: Vec<(String, String)> = ["mode", "arrivals", "concurrency", "mem_mib", "pool_size"]
            .iter()
            .filter_map(|k| Some((k.to_string(), text(k)?)))
            .collect();
        let label =
            format!("{}, {} at once", text("mode").unwrap_or_default(), text("concurrency").unwrap_or_default());
        Some(LoadCurve { label, points, knee: num(&json["knee"], "rate_rps"), floor, params })
    }
}

/// A sweep read back from the JSON `mu2 bench --rate … --json` printed.
pub fn read_load_json(path: &Path) -> Result<LoadCurve, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read { path: path.to_path_buf(), source })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| PlotError::Csv {
        path: path.to_path_buf(),
        line: e.line(),
        message: e.to_string(),
    })?;
    let mut curve = LoadCurve::of_report(&json).ok_or_else(|| PlotError::Empty { path: path.to_path_buf() })?;
    let stem = path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    curve.label = format!("{stem}: {}", curve.label);
    Ok(curve)
}

fn draw_load_on<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    curves: &[LoadCurve],
    title: &str,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let (header, body) = root.split_vertically(86);
    header.draw(&Text::new(title.to_string(), (60, 12), ("sans-serif", 24).into_font().color(&BLACK))).map_err(err)?;
    let shared: Vec<String> = curves
        .first()
        .map(|first| {
            first
                .params
                .iter()
                .filter(|(k, v)| curves.iter().all(|c| c.params.iter().any(|(k2, v2)| k2 == k && v2 == v)))
                .map(|(k, v)| format!("{} {v}", k.replace('_', " ")))
                .collect()
        })
        .unwrap_or_default();
    header
        .draw(&Text::new(shared.join(", "), (60, 44), ("sans-serif", 14).into_font().color(&RGBColor(90, 90, 90))))
        .map_err(err)?;
    let key = "solid: p50, thick: p99 (from when each request was due); dotted: the mode's floor; dashed: the knee";
    header
        .draw(&Text::new(key, (60, 64), ("sans-serif", 13).into_font().color(&RGBColor(120, 120, 120))))
        .map_err(err)?;

    let rate_max = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).fold(1.0f64, f64::max) * 1.05;
    let values = curves
        .iter()
        .flat_map(|c| c.points.iter().flat_map(|p| [p.1, p.2]).chain(c.floor.iter().map(|f| f.1)))
        .filter(|v| *v > 0.0 && *v <= MAX_LATENCY_US);
    let (lo, hi) = values.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi <= 0.0 { (1.0, 10.0) } else { (lo / 1.5, (hi * 1.5).max(lo * 4.0)) };
    let mut chart = ChartBuilder::on(&body)
        .margin_left(20)
        .margin_right(30)
        .margin_bottom(10)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..rate_max, (lo..hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("offered load, requests/s")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_desc("latency (log scale)")
        .y_label_formatter(&|v| format_us(*v))
        .label_style(("sans-serif", 14))
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(err)?;
    for (i, curve) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let p50 = curve.points.iter().map(|p| (p.0, p.1));
        let p99 = curve.points.iter().map(|p| (p.0, p.2));
        chart
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{}: p50", curve.label))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
        chart.draw_series(p50.map(|p| Circle::new(p, 4, color.filled()))).map_err(err)?;
        chart
            .draw_series(LineSeries::new(p99.clone(), color.stroke_width(4)))
            .map_err(err)?
            .label(format!("{}: p99", curve.label))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(4)));
        chart.draw_series(p99.map(|p| Circle::new(p, 5, color.stroke_width(2)))).map_err(err)?;
        if let Some((name, us)) = &curve.floor {
            let style = color.mix(0.6).stroke_width(1);
            chart.draw_series(DashedLineSeries::new([(0.0, *us), (rate_max, *us)], 2, 4, style)).map_err(err)?;
            let font = ("sans-serif", 12).into_font().color(&color.mix(0.9)).pos(text_anchor_left());
            let label = Text::new(format!("{name} {}", format_us(*us)), (4, -8), font);
            chart.draw_series(std::iter::once(EmptyElement::at((0.0, *us)) + label)).map_err(err)?;
        }
        if let Some(knee) = curve.knee {
            let style = color.mix(0.8).stroke_width(1);
            chart.draw_series(DashedLineSeries::new([(knee, lo), (knee, hi)], 8, 4, style)).map_err(err)?;
            let font = ("sans-serif", 13).into_font().color(&color).pos(text_anchor_left());
            let label = Text::new(format!("knee {knee:.0}/s"), (4, 10 + 16 * i as i32), font);
            chart.draw_series(std::iter::once(EmptyElement::at((knee, hi)) + label)).map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .margin(12)
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_read_as_people_write_them() {
        assert_eq!(format_us(850.0), "850 µs");
        assert_eq!(format_us(47.25), "47.2 µs");
        assert_eq!(format_us(1200.0), "1.2 ms");
        assert_eq!(format_us(2000.0), "2 ms");
        assert_eq!(format_us(12_500.0), "12.5 ms");
        assert_eq!(format_us(1.5e6), "1.5 s");
        assert_eq!(format_us(5.0), "5 µs");
    }

    #[test]
    fn absurd_ranges_end() {
        // A CSV is a file anyone can write: an infinite or zero bound must not hang the plot.
        assert!(ticks(1.0, f64::INFINITY).len() <= 400 * 3);
        assert!(ticks(0.0, 10.0).len() <= 400 * 3);
        assert!(ticks(f64::NAN, f64::NAN).is_empty());
    }

    #[test]
    fn ticks_step_1_2_5_and_thin_out_over_many_decades() {
        assert_eq!(ticks(30.0, 1100.0), [50.0, 100.0, 200.0, 500.0, 1000.0]);
        assert_eq!(ticks(1.0, 1e7), [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7]);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&sorted, 0.5), 50.0);
        assert_eq!(quantile(&sorted, 0.99), 99.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn a_csv_reads_back_with_its_parameters_and_floors() {
        let dir = std::env::temp_dir().join(format!("mu2-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("fresh.csv");
        let csv = "# mu2 bench mode=fresh function=echo concurrency=2\nseries,index,latency_us,fork_us\n\
                   request,0,100.0,40.0\nrequest,1,120.0,41.0\nfloor_fresh,0,800.0,\nfloor_reuse,0,45.0,\n";
        std::fs::write(&path, csv).expect("write");
        let run = read_csv(&path).expect("parsed");
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(run.label, "fresh: fresh, concurrency 2");
        assert_eq!(run.latencies, [100.0, 120.0]);
        assert_eq!(run.floors, [("floor_fresh".to_string(), vec![800.0]), ("floor_reuse".to_string(), vec![45.0])]);
        assert_eq!(run.param("function"), Some("echo"));
    }

    #[test]
    fn a_plot_is_svg_or_png_in_an_existing_directory() {
        assert!(matches!(check_target(Path::new("x.pdf")), Err(PlotError::Format { .. })));
        assert!(matches!(check_target(Path::new("/nonexistent-mu2/x.svg")), Err(PlotError::NoDirectory { .. })));
    }
}
