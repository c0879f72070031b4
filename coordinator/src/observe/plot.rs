//! `loss.svg` and `loss.png` in the checkpoint directory: training loss, held-out loss per
//! dataset and the learning rate over the whole history (every run of the job, replayed steps
//! once), drawn with `plotters` at each checkpoint and at the end, on the history thread.
//!
//! The PNG's labels are drawn with DejaVu Sans embedded in the binary (assets/): a cluster node
//! often has no fonts installed, and a plot without axis labels says little.

use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

pub const SVG: &str = "loss.svg";
pub const PNG: &str = "loss.png";
const SIZE: (u32, u32) = (1000, 680);
const FONT: &str = "sans-serif";

/// The series a plot shows, from resolved history records.
#[derive(Debug, Default, PartialEq)]
pub struct Series {
    pub train: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
    /// Held-out loss per dataset name, in step order.
    pub eval: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Series {
    pub fn from_history(records: &[Value]) -> Series {
        let mut s = Series::default();
        for r in records {
            let step = r["step"].as_f64().unwrap_or(0.0);
            match r["type"].as_str() {
                Some("step") => {
                    if let (Some(loss), Some(lr)) = (r["loss"].as_f64(), r["lr"].as_f64()) {
                        s.train.push((step, loss));
                        s.lr.push((step, lr));
                    }
                }
                Some("eval") => {
                    let tasks = r["tasks"].as_array().filter(|t| !t.is_empty());
                    let named: Vec<(String, f64)> = match tasks {
                        Some(tasks) => tasks
                            .iter()
                            .filter_map(|t| {
                                Some((t["name"].as_str()?.to_string(), t["loss"].as_f64()?))
                            })
                            .collect(),
                        None => r["loss"]
                            .as_f64()
                            .map(|l| ("held-out".to_string(), l))
                            .into_iter()
                            .collect(),
                    };
                    for (name, loss) in named {
                        let points = s.eval.entry(name).or_default();
                        // A resumed run evaluates its checkpoint again: one point per step.
                        points.retain(|p| p.0 != step);
                        points.push((step, loss));
                        points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    }
                }
                _ => {}
            }
        }
        s
    }

    fn losses(&self) -> impl Iterator<Item = f64> + '_ {
        self.train
            .iter()
            .chain(self.eval.values().flatten())
            .map(|p| p.1)
            .filter(|v| v.is_finite() && *v > 0.0)
    }
}

const PALETTE: [RGBColor; 5] = [
    RGBColor(230, 140, 20),
    RGBColor(40, 160, 90),
    RGBColor(180, 60, 160),
    RGBColor(200, 50, 50),
    RGBColor(90, 90, 90),
];
const TRAIN: RGBColor = RGBColor(30, 110, 200);
const LR: RGBColor = RGBColor(60, 150, 60);

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    job: &str,
    s: &Series,
) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let (top, bottom) = root.split_vertically(SIZE.1 * 68 / 100);
    let last = s
        .train
        .iter()
        .chain(s.eval.values().flatten())
        .map(|p| p.0)
        .fold(1.0f64, f64::max);
    let (lo, hi) = s.losses().fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo * 0.9, hi * 1.1)
    } else {
        (0.1, 10.0)
    };
    let mut loss = ChartBuilder::on(&top)
        .caption(format!("{job}: loss"), (FONT, 22))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..last, lo.log10()..hi.log10())
        .map_err(e)?;
    loss.configure_mesh()
        .x_desc("step")
        .y_desc("loss (log scale)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_labels(8)
        .y_label_formatter(&|v| three_digits(10f64.powf(*v)))
        .light_line_style(RGBColor(242, 242, 242))
        .label_style((FONT, 14))
        .draw()
        .map_err(e)?;
    // log10 on a linear axis: plotters' log axis labels only whole numbers, none below 1.
    let log = |p: &(f64, f64)| (p.0, p.1.max(1e-12).log10());
    loss.draw_series(LineSeries::new(
        s.train.iter().map(log),
        TRAIN.stroke_width(2),
    ))
    .map_err(e)?
    .label("train")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN.stroke_width(2)));
    for (i, (name, points)) in s.eval.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        loss.draw_series(LineSeries::new(
            points.iter().map(log),
            color.stroke_width(1),
        ))
        .map_err(e)?;
        loss.draw_series(
            points
                .iter()
                .map(|p| Circle::new(log(p), 5, color.filled())),
        )
        .map_err(e)?
        .label(format!("held-out: {name}"))
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
    }
    loss.configure_series_labels()
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(e)?;

    let top_lr = s.lr.iter().map(|p| p.1).fold(0.0f64, f64::max);
    let mut lr = ChartBuilder::on(&bottom)
        .caption("learning rate", (FONT, 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..last, 0.0..(top_lr * 1.1).max(1e-12))
        .map_err(e)?;
    lr.configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_labels(5)
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .light_line_style(RGBColor(242, 242, 242))
        .label_style((FONT, 14))
        .draw()
        .map_err(e)?;
    lr.draw_series(LineSeries::new(s.lr.iter().copied(), LR.stroke_width(2)))
        .map_err(e)?;
    root.present().map_err(e)
}

/// 6.31, 0.251, 12.6: three significant digits.
fn three_digits(v: f64) -> String {
    // 10^0 comes back as 0.99999…: nudged, so that it prints as 1.00, not 1.000.
    let decimals = (2 - (v * (1.0 + 1e-9)).log10().floor() as i32).max(0) as usize;
    format!("{v:.decimals$}")
}

fn register_font() {
    static FONT_ONCE: Once = Once::new();
    FONT_ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/DejaVuSans.ttf");
        if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_err() {
            tracing::warn!("the embedded font did not load: loss.png has no labels");
        }
    });
}

/// Writes loss.svg and loss.png into `dir` (each through a temporary file and a rename, so a
/// reader never sees half a plot). Nothing is written before the first step.
pub fn write(dir: &Path, job: &str, s: &Series) -> Result<(), String> {
    if s.train.is_empty() {
        return Ok(());
    }
    register_font();
    let mut svg = String::new();
    draw(
        SVGBackend::with_string(&mut svg, SIZE).into_drawing_area(),
        job,
        s,
    )?;
    let tmp = dir.join(format!(".{SVG}.tmp"));
    std::fs::write(&tmp, svg).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, dir.join(SVG)).map_err(|e| e.to_string())?;
    // The encoder picks the format from the extension.
    let tmp = dir.join(format!(".tmp.{PNG}"));
    draw(BitMapBackend::new(&tmp, SIZE).into_drawing_area(), job, s)?;
    std::fs::rename(&tmp, dir.join(PNG)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_have_three_significant_digits() {
        assert_eq!(three_digits(10f64.powf(0.0)), "1.00");
        assert_eq!(three_digits(0.2512), "0.251");
        assert_eq!(three_digits(6.3096), "6.31");
        assert_eq!(three_digits(125.9), "126");
    }

    #[test]
    fn series_keep_one_point_per_step_and_name_datasets() {
        let records = vec![
            json!({"type": "eval", "step": 0, "loss": 3.0, "tasks": [{"name": "a", "loss": 3.0}]}),
            json!({"type": "step", "step": 1, "loss": 2.5, "lr": 1e-3}),
            json!({"type": "step", "step": 2, "loss": 2.0, "lr": 2e-3}),
            json!({"type": "eval", "step": 2, "loss": 2.2, "tasks": [{"name": "a", "loss": 2.2}]}),
            json!({"type": "eval", "step": 2, "loss": 2.1, "tasks": [{"name": "a", "loss": 2.1}]}),
        ];
        let s = Series::from_history(&records);
        assert_eq!(s.train, [(1.0, 2.5), (2.0, 2.0)]);
        assert_eq!(s.lr, [(1.0, 1e-3), (2.0, 2e-3)]);
        assert_eq!(s.eval["a"], [(0.0, 3.0), (2.0, 2.1)]);
    }

    #[test]
    fn writes_a_valid_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let mut records: Vec<Value> = (1..=20)
            .map(|i| json!({"type": "step", "step": i, "loss": 8.0 / i as f64, "lr": 1e-3}))
            .collect();
        records.push(json!({"type": "eval", "step": 20, "loss": 0.5, "tasks": []}));
        write(dir.path(), "job", &Series::from_history(&records)).unwrap();
        let svg = std::fs::read_to_string(dir.path().join(SVG)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("held-out") && svg.contains("learning rate"));
        let png = std::fs::read(dir.path().join(PNG)).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(!dir.path().join(format!(".tmp.{PNG}")).exists());
    }
}
