//! Unconstrained L-BFGS with a strong-Wolfe line search (Nocedal & Wright, algorithms 7.4, 3.5
//! and 3.6). Stopping rules follow scipy's L-BFGS-B defaults: relative reduction
//! `(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= ftol` or `max |g| <= gtol`.

/// Options of one minimisation.
#[derive(Debug, Clone, Copy)]
pub struct LbfgsOptions {
    pub history: usize,
    pub max_iters: usize,
    pub gtol: f64,
    pub ftol: f64,
}

impl Default for LbfgsOptions {
    fn default() -> Self {
        Self {
            history: 10,
            max_iters: 1000,
            gtol: 1e-8,
            ftol: 1e7 * f64::EPSILON,
        }
    }
}

/// Result of a minimisation.
#[derive(Debug, Clone)]
pub struct Minimum {
    pub x: Vec<f64>,
    pub f: f64,
    pub iters: usize,
    pub evals: usize,
}

/// Minimises `fg(x, grad) -> f`, which writes the gradient into `grad`.
pub fn minimize<F>(mut fg: F, x0: &[f64], opt: &LbfgsOptions) -> Minimum
where
    F: FnMut(&[f64], &mut [f64]) -> f64,
{
    let n = x0.len();
    let mut x = x0.to_vec();
    let mut g = vec![0.0; n];
    let mut f = fg(&x, &mut g);
    let mut evals = 1;
    let mut s_hist: Vec<Vec<f64>> = Vec::with_capacity(opt.history);
    let mut y_hist: Vec<Vec<f64>> = Vec::with_capacity(opt.history);
    let mut rho: Vec<f64> = Vec::with_capacity(opt.history);
    let mut d = vec![0.0; n];
    let mut alpha_buf = vec![0.0; opt.history];
    let mut x_new = vec![0.0; n];
    let mut g_new = vec![0.0; n];
    let mut iters = 0;
    if !f.is_finite() {
        return Minimum { x, f, iters, evals };
    }
    while iters < opt.max_iters {
        if inf_norm(&g) <= opt.gtol {
            break;
        }
        // Two-loop recursion: d = -H g.
        d.copy_from_slice(&g);
        let k = s_hist.len();
        for i in (0..k).rev() {
            let a = rho[i] * dot(&s_hist[i], &d);
            alpha_buf[i] = a;
            axpy(-a, &y_hist[i], &mut d);
        }
        if k > 0 {
            let gamma = dot(&s_hist[k - 1], &y_hist[k - 1]) / dot(&y_hist[k - 1], &y_hist[k - 1]);
            d.iter_mut().for_each(|v| *v *= gamma);
        }
        for i in 0..k {
            let b = rho[i] * dot(&y_hist[i], &d);
            axpy(alpha_buf[i] - b, &s_hist[i], &mut d);
        }
        d.iter_mut().for_each(|v| *v = -*v);
        let mut dg = dot(&d, &g);
        if dg >= 0.0 || !dg.is_finite() {
            // Not a descent direction: restart from steepest descent.
            s_hist.clear();
            y_hist.clear();
            rho.clear();
            d.iter_mut().zip(&g).for_each(|(d, g)| *d = -g);
            dg = dot(&d, &g);
        }
        let step0 = if k == 0 {
            (1.0 / inf_norm(&g)).min(1.0)
        } else {
            1.0
        };
        let ls = line_search(&mut fg, &x, f, &g, &d, dg, step0, &mut x_new, &mut g_new);
        evals += ls.evals;
        let Some(f_new) = ls.f else { break };
        iters += 1;
        let mut s = vec![0.0; n];
        let mut y = vec![0.0; n];
        for i in 0..n {
            s[i] = x_new[i] - x[i];
            y[i] = g_new[i] - g[i];
        }
        let sy = dot(&s, &y);
        let rel = (f - f_new) / f.abs().max(f_new.abs()).max(1.0);
        x.copy_from_slice(&x_new);
        g.copy_from_slice(&g_new);
        f = f_new;
        if sy > 1e-12 * dot(&y, &y).max(1e-300) {
            if s_hist.len() == opt.history {
                s_hist.remove(0);
                y_hist.remove(0);
                rho.remove(0);
            }
            s_hist.push(s);
            y_hist.push(y);
            rho.push(1.0 / sy);
        }
        if rel <= opt.ftol {
            break;
        }
    }
    Minimum { x, f, iters, evals }
}

struct LineSearch {
    f: Option<f64>,
    evals: usize,
}

#[allow(clippy::too_many_arguments)]
fn line_search<F>(
    fg: &mut F,
    x: &[f64],
    f0: f64,
    _g0: &[f64],
    d: &[f64],
    dg0: f64,
    step0: f64,
    x_out: &mut [f64],
    g_out: &mut [f64],
) -> LineSearch
where
    F: FnMut(&[f64], &mut [f64]) -> f64,
{
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    let mut evals = 0;
    let mut eval = |a: f64, xo: &mut [f64], go: &mut [f64], evals: &mut usize| -> (f64, f64) {
        for i in 0..x.len() {
            xo[i] = x[i] + a * d[i];
        }
        *evals += 1;
        let f = fg(xo, go);
        (f, dot(go, d))
    };
    let mut a_prev = 0.0;
    let mut f_prev = f0;
    let mut dg_prev = dg0;
    let mut a = step0;
    for i in 0..40 {
        let (fa, dga) = eval(a, x_out, g_out, &mut evals);
        if !fa.is_finite() {
            a = 0.5 * (a_prev + a);
            continue;
        }
        if fa > f0 + C1 * a * dg0 || (i > 0 && fa >= f_prev) {
            return zoom(
                &mut eval, f0, dg0, a_prev, f_prev, dg_prev, a, fa, dga, x_out, g_out, evals,
            );
        }
        if dga.abs() <= -C2 * dg0 {
            return LineSearch { f: Some(fa), evals };
        }
        if dga >= 0.0 {
            return zoom(
                &mut eval, f0, dg0, a, fa, dga, a_prev, f_prev, dg_prev, x_out, g_out, evals,
            );
        }
        a_prev = a;
        f_prev = fa;
        dg_prev = dga;
        a *= 2.0;
    }
    LineSearch { f: None, evals }
}

#[allow(clippy::too_many_arguments)]
fn zoom<E>(
    eval: &mut E,
    f0: f64,
    dg0: f64,
    mut lo: f64,
    mut f_lo: f64,
    mut dg_lo: f64,
    mut hi: f64,
    mut f_hi: f64,
    mut dg_hi: f64,
    x_out: &mut [f64],
    g_out: &mut [f64],
    mut evals: usize,
) -> LineSearch
where
    E: FnMut(f64, &mut [f64], &mut [f64], &mut usize) -> (f64, f64),
{
    const C1: f64 = 1e-4;
    const C2: f64 = 0.9;
    let mut best: Option<(f64, f64)> = None; // (a, f) of the best sufficient-decrease point
    for _ in 0..30 {
        let a = cubic_min(lo, f_lo, dg_lo, hi, f_hi, dg_hi);
        let (fa, dga) = eval(a, x_out, g_out, &mut evals);
        if !fa.is_finite() || fa > f0 + C1 * a * dg0 || fa >= f_lo {
            hi = a;
            f_hi = if fa.is_finite() { fa } else { f64::MAX };
            dg_hi = if dga.is_finite() { dga } else { 0.0 };
        } else {
            if dga.abs() <= -C2 * dg0 {
                return LineSearch { f: Some(fa), evals };
            }
            best = Some((a, fa));
            if dga * (hi - lo) >= 0.0 {
                hi = lo;
                f_hi = f_lo;
                dg_hi = dg_lo;
            }
            lo = a;
            f_lo = fa;
            dg_lo = dga;
        }
        if (hi - lo).abs() < 1e-14 * lo.abs().max(1.0) {
            break;
        }
    }
    // Accept the best point with sufficient decrease if curvature was never met.
    match best.or(if lo > 0.0 && f_lo < f0 {
        Some((lo, f_lo))
    } else {
        None
    }) {
        Some((a, _)) => {
            let (fa, _) = eval(a, x_out, g_out, &mut evals);
            LineSearch { f: Some(fa), evals }
        }
        None => LineSearch { f: None, evals },
    }
}

/// Minimiser of the cubic interpolating (a, fa, ga), (b, fb, gb), safeguarded into the interval.
fn cubic_min(a: f64, fa: f64, ga: f64, b: f64, fb: f64, gb: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let mid = 0.5 * (a + b);
    if !(fa.is_finite() && fb.is_finite() && ga.is_finite() && gb.is_finite()) || fb == f64::MAX {
        return mid;
    }
    let d1 = ga + gb - 3.0 * (fa - fb) / (a - b);
    let disc = d1 * d1 - ga * gb;
    if disc < 0.0 {
        return mid;
    }
    let d2 = (b - a).signum() * disc.sqrt();
    let t = b - (b - a) * ((gb + d2 - d1) / (gb - ga + 2.0 * d2));
    let margin = 0.1 * (hi - lo);
    if t.is_finite() && t > lo + margin && t < hi - margin {
        t
    } else {
        mid
    }
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(a: f64, x: &[f64], y: &mut [f64]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

fn inf_norm(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimises_rosenbrock() {
        let rosen = |x: &[f64], g: &mut [f64]| {
            let (a, b) = (x[0], x[1]);
            g[0] = -2.0 * (1.0 - a) - 400.0 * a * (b - a * a);
            g[1] = 200.0 * (b - a * a);
            (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2)
        };
        let m = minimize(rosen, &[-1.2, 1.0], &LbfgsOptions::default());
        assert!(
            (m.x[0] - 1.0).abs() < 1e-5 && (m.x[1] - 1.0).abs() < 1e-5,
            "{:?}",
            m
        );
        assert!(m.iters < 100);
    }

    #[test]
    fn minimises_an_ill_conditioned_quadratic() {
        let q = |x: &[f64], g: &mut [f64]| {
            let mut f = 0.0;
            for i in 0..x.len() {
                let c = 10f64.powi(i as i32);
                f += 0.5 * c * (x[i] - 1.0).powi(2);
                g[i] = c * (x[i] - 1.0);
            }
            f
        };
        let m = minimize(q, &[0.0; 5], &LbfgsOptions::default());
        for v in &m.x {
            assert!((v - 1.0).abs() < 1e-6, "{:?}", m.x);
        }
    }
}
