//! Small SVG charts (axes, ticks, labels, legend): lines, steps, scatter and stacked bars.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    /// Horizontal then vertical segments (a staggered frontier).
    Step,
    Scatter,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
    /// Draw y = x (for measured-vs-theoretical plots).
    pub diagonal: bool,
    /// Stacked bars: (category label, [(segment name, value)]). Used instead of `series`.
    pub bars: Vec<(String, Vec<(String, f64)>)>,
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const W: f64 = 760.0;
const H: f64 = 360.0;
const ML: f64 = 80.0;
const MR: f64 = 170.0;
const MT: f64 = 40.0;
const MB: f64 = 55.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e4).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn nice_ticks(lo: f64, hi: f64, log: bool) -> Vec<f64> {
    if log {
        let (a, b) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        let step = (((b - a) as f64) / 8.0).ceil().max(1.0) as i32;
        return (a..=b)
            .step_by(step as usize)
            .map(|e| 10f64.powi(e))
            .filter(|t| *t >= lo * 0.999 && *t <= hi * 1.001)
            .collect();
    }
    let span = (hi - lo).max(1e-12);
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 7.0)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + 1e-9 * step {
        out.push(t);
        t += step;
    }
    out
}

impl Chart {
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let pts = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|(x, y)| {
                x.is_finite()
                    && y.is_finite()
                    && (!self.log_x || *x > 0.0)
                    && (!self.log_y || *y > 0.0)
            });
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            return ((1.0, 10.0), (1.0, 10.0));
        }
        if self.diagonal {
            let (a, b) = (x0.min(y0), x1.max(y1));
            (x0, x1, y0, y1) = (a, b, a, b);
        }
        let pad = |a: f64, b: f64, log: bool| {
            if log {
                if a == b {
                    (a / 2.0, b * 2.0)
                } else {
                    (a / 1.1, b * 1.1)
                }
            } else {
                let p = if a == b {
                    a.abs().max(1.0) * 0.1
                } else {
                    (b - a) * 0.05
                };
                (if a >= 0.0 && a - p < 0.0 { 0.0 } else { a - p }, b + p)
            }
        };
        (pad(x0, x1, self.log_x), pad(y0, y1, self.log_y))
    }

    /// Renders this chart as an SVG group at vertical offset `dy`.
    fn render_into(&self, out: &mut String, dy: f64) {
        let _ = write!(out, r#"<g transform="translate(0,{dy})">"#);
        let _ = write!(
            out,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
            (ML + W - MR) / 2.0,
            esc(&self.title)
        );
        let (pw, ph) = (W - ML - MR, H - MT - MB);
        let _ = write!(
            out,
            r##"<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        if !self.bars.is_empty() {
            self.render_bars(out, pw, ph);
        } else {
            self.render_xy(out, pw, ph);
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
            ML + pw / 2.0,
            H - 12.0,
            esc(&self.x_label)
        );
        let _ = write!(
            out,
            r#"<text x="18" y="{}" text-anchor="middle" font-size="13" transform="rotate(-90 18 {})">{}</text>"#,
            MT + ph / 2.0,
            MT + ph / 2.0,
            esc(&self.y_label)
        );
        out.push_str("</g>");
    }

    fn render_xy(&self, out: &mut String, pw: f64, ph: f64) {
        let ((x0, x1), (y0, y1)) = self.ranges();
        let tx = |v: f64| {
            let f = if self.log_x {
                (v.ln() - x0.ln()) / (x1.ln() - x0.ln())
            } else {
                (v - x0) / (x1 - x0)
            };
            ML + f * pw
        };
        let ty = |v: f64| {
            let f = if self.log_y {
                (v.ln() - y0.ln()) / (y1.ln() - y0.ln())
            } else {
                (v - y0) / (y1 - y0)
            };
            MT + ph - f * ph
        };
        for t in nice_ticks(x0, x1, self.log_x) {
            let x = tx(t);
            let _ = write!(
                out,
                r##"<line x1="{x}" y1="{MT}" x2="{x}" y2="{}" stroke="#ddd"/>"##,
                MT + ph
            );
            let _ = write!(
                out,
                r#"<text x="{x}" y="{}" text-anchor="middle" font-size="11">{}</text>"#,
                MT + ph + 16.0,
                fmt_tick(t)
            );
        }
        for t in nice_ticks(y0, y1, self.log_y) {
            let y = ty(t);
            let _ = write!(
                out,
                r##"<line x1="{ML}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
                ML + pw
            );
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" text-anchor="end" font-size="11">{}</text>"#,
                ML - 6.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
        if self.diagonal {
            let _ = write!(
                out,
                r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#888" stroke-dasharray="5,4"/>"##,
                tx(x0.max(y0)),
                ty(x0.max(y0)),
                tx(x1.min(y1)),
                ty(x1.min(y1))
            );
        }
        let mut legend: Vec<(String, &str)> = vec![];
        for (i, s) in self.series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            legend.push((s.name.clone(), c));
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            match s.style {
                Style::Scatter => {
                    for (x, y) in pts {
                        let _ = write!(
                            out,
                            r#"<circle cx="{:.2}" cy="{:.2}" r="3.5" fill="{c}" fill-opacity="0.8"/>"#,
                            tx(x),
                            ty(y)
                        );
                    }
                }
                Style::Step => {
                    let mut d = String::new();
                    let mut prev: Option<f64> = None;
                    for (j, (x, y)) in pts.iter().enumerate() {
                        if let Some(py) = prev {
                            let _ = write!(d, " L{:.2},{:.2}", tx(*x), ty(py));
                        }
                        let _ = write!(
                            d,
                            "{}{:.2},{:.2}",
                            if j == 0 { "M" } else { " L" },
                            tx(*x),
                            ty(*y)
                        );
                        prev = Some(*y);
                    }
                    let _ = write!(
                        out,
                        r#"<path d="{d}" fill="none" stroke="{c}" stroke-width="2"/>"#
                    );
                }
            }
        }
        if self.diagonal {
            legend.push(("y = x".into(), "#888"));
        }
        render_legend(out, &legend);
    }

    fn render_bars(&self, out: &mut String, pw: f64, ph: f64) {
        let totals: Vec<f64> = self
            .bars
            .iter()
            .map(|(_, segs)| segs.iter().map(|s| s.1).sum())
            .collect();
        let ymax = totals.iter().copied().fold(0.0, f64::max).max(1e-12) * 1.05;
        let ty = |v: f64| MT + ph - v / ymax * ph;
        for t in nice_ticks(0.0, ymax, false) {
            let y = ty(t);
            let _ = write!(
                out,
                r##"<line x1="{ML}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/>"##,
                ML + pw
            );
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" text-anchor="end" font-size="11">{}</text>"#,
                ML - 6.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
        let n = self.bars.len().max(1) as f64;
        let slot = pw / n;
        let mut names: Vec<String> = vec![];
        for (i, (label, segs)) in self.bars.iter().enumerate() {
            let x = ML + slot * (i as f64 + 0.15);
            let mut base = 0.0;
            for (name, v) in segs {
                let k = match names.iter().position(|n| n == name) {
                    Some(k) => k,
                    None => {
                        names.push(name.clone());
                        names.len() - 1
                    }
                };
                let (y_top, y_bot) = (ty(base + v), ty(base));
                let _ = write!(
                    out,
                    r#"<rect x="{x:.2}" y="{y_top:.2}" width="{:.2}" height="{:.2}" fill="{}"/>"#,
                    slot * 0.7,
                    (y_bot - y_top).max(0.0),
                    COLORS[k % COLORS.len()]
                );
                base += v;
            }
            let cx = x + slot * 0.35;
            let _ = write!(
                out,
                r#"<text x="{cx:.2}" y="{}" text-anchor="end" font-size="9" transform="rotate(-35 {cx:.2} {})">{}</text>"#,
                MT + ph + 12.0,
                MT + ph + 12.0,
                esc(label)
            );
        }
        let legend: Vec<(String, &str)> = names
            .iter()
            .enumerate()
            .map(|(k, n)| (n.clone(), COLORS[k % COLORS.len()]))
            .collect();
        render_legend(out, &legend);
    }
}

fn render_legend(out: &mut String, items: &[(String, &str)]) {
    for (i, (name, c)) in items.iter().enumerate() {
        let y = MT + 10.0 + 20.0 * i as f64;
        let x = W - MR + 12.0;
        let _ = write!(
            out,
            r#"<rect x="{x}" y="{}" width="14" height="10" fill="{c}"/>"#,
            y - 8.0
        );
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-size="12">{}</text>"#,
            x + 20.0,
            y + 1.0,
            esc(name)
        );
    }
}

/// Renders charts stacked vertically into one SVG document.
pub fn render(charts: &[Chart]) -> String {
    let total_h = H * charts.len() as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" viewBox="0 0 {W} {total_h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, c) in charts.iter().enumerate() {
        c.render_into(&mut out, H * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_axes_labels_and_legend() {
        let c = Chart {
            title: "T".into(),
            x_label: "budget".into(),
            y_label: "frames".into(),
            log_x: true,
            series: vec![Series {
                name: "frames".into(),
                points: vec![(1e12, 4.0), (1e13, 16.0), (1e14, 32.0)],
                style: Style::Step,
            }],
            ..Default::default()
        };
        let svg = render(&[c]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains(">budget<") && svg.contains(">frames<") && svg.contains("<path"));
        assert!(svg.contains(">1e13<"), "log ticks: {svg}");
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(
            nice_ticks(0.0, 10.0, false),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(nice_ticks(1e12, 1e14, true), vec![1e12, 1e13, 1e14]);
    }
}
