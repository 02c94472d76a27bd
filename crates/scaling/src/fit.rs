//! Fitting as the paper did: MSE of log-error (log-sum-exp in log space), L-BFGS from random
//! starts (best of R), optional Huber loss, bootstrap bagging with median aggregation.
//! Deterministic under a seed whatever the thread count: every restart draws from its own
//! generator seeded by (seed, bootstrap index, restart index).

use crate::data::Dataset;
use crate::form::{Form, ParamKind, Structure};
use crate::lbfgs::{minimize, LbfgsOptions};
use crate::model::{FitInfo, FittedModel};
use crate::ScalingError;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// The per-residual loss on `log f_hat - log f`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Loss {
    /// Squared error (the paper's choice).
    Mse,
    /// Huber loss with threshold `delta`.
    Huber { delta: f64 },
}

/// Fitting options. Defaults are the paper's: 500 restarts, 100 bootstrap resamples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitOptions {
    pub restarts: usize,
    /// Bootstrap resamples; 0 fits the full data once (no bagging).
    pub bootstrap: usize,
    pub seed: u64,
    pub loss: Loss,
    /// Log-coefficients start uniform in this range.
    pub coef_init: (f64, f64),
    /// Exponents start uniform in this range.
    pub exp_init: (f64, f64),
    pub max_iters: usize,
    /// L-BFGS stops when the relative reduction of the loss falls below this (scipy's
    /// L-BFGS-B default, `factr = 1e7`, is 2.2e-9).
    pub ftol: f64,
}

impl Default for FitOptions {
    fn default() -> Self {
        Self {
            restarts: 500,
            bootstrap: 100,
            seed: 0,
            loss: Loss::Mse,
            coef_init: (-5.0, 5.0),
            exp_init: (-1.0, 1.0),
            max_iters: 1000,
            ftol: 1e7 * f64::EPSILON,
        }
    }
}

/// SplitMix64: a small deterministic generator for initial points and resamples.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn from_parts(parts: &[u64]) -> Self {
        let mut s = SplitMix(0x9E37_79B9_7F4A_7C15);
        for p in parts {
            s.0 ^= p.wrapping_mul(0xD1B5_4A32_D192_ED03);
            s.next_u64();
        }
        s
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
}

/// Rows prepared for the objective: log-factors and log-errors.
pub struct Prepared {
    log_x: Vec<f64>,
    log_y: Vec<f64>,
    width: usize,
}

impl Prepared {
    pub fn new(data: &Dataset, idx: &[usize]) -> Self {
        let width = data.factors.len();
        let mut log_x = Vec::with_capacity(idx.len() * width);
        let mut log_y = Vec::with_capacity(idx.len());
        for &i in idx {
            log_x.extend(data.rows[i].x.iter().map(|v| v.ln()));
            log_y.push(data.rows[i].error.ln());
        }
        Self {
            log_x,
            log_y,
            width,
        }
    }

    /// Mean loss and its gradient.
    pub fn objective(&self, s: &Structure, loss: Loss, theta: &[f64], grad: &mut [f64]) -> f64 {
        grad.iter_mut().for_each(|g| *g = 0.0);
        let m = self.log_y.len() as f64;
        let mut total = 0.0;
        for (i, ly) in self.log_y.iter().enumerate() {
            let lx = &self.log_x[i * self.width..(i + 1) * self.width];
            // Residual first (without gradient), then the gradient weighted by dloss/dr.
            let r = s.log_predict(theta, lx) - ly;
            let (l, dl) = match loss {
                Loss::Mse => (r * r, 2.0 * r),
                Loss::Huber { delta } => {
                    if r.abs() <= delta {
                        (0.5 * r * r, r)
                    } else {
                        (delta * (r.abs() - 0.5 * delta), delta * r.signum())
                    }
                }
            };
            total += l;
            s.log_predict_grad(theta, lx, dl / m, grad);
        }
        total / m
    }
}

/// Fits one parameter vector: best of `restarts` L-BFGS runs on the rows `idx`.
pub fn fit_best_of(
    s: &Structure,
    data: &Dataset,
    idx: &[usize],
    opt: &FitOptions,
    stream: u64,
    progress: &(dyn Fn(u64) + Sync),
) -> (Vec<f64>, f64) {
    let prep = Prepared::new(data, idx);
    let lb = LbfgsOptions {
        max_iters: opt.max_iters,
        ftol: opt.ftol,
        ..Default::default()
    };
    let best = (0..opt.restarts.max(1))
        .into_par_iter()
        .map(|r| {
            let mut rng = SplitMix::from_parts(&[opt.seed, stream, r as u64]);
            let x0: Vec<f64> = s
                .kinds
                .iter()
                .map(|k| match k {
                    ParamKind::LogCoefficient => rng.range(opt.coef_init.0, opt.coef_init.1),
                    ParamKind::Exponent => rng.range(opt.exp_init.0, opt.exp_init.1),
                })
                .collect();
            let m = minimize(|t, g| prep.objective(s, opt.loss, t, g), &x0, &lb);
            progress(1);
            // A solution whose written form is not finite (a coefficient exp(theta) that
            // overflows) cannot be saved or reloaded: it loses to any finite one.
            let writable = s.readable(&m.x).iter().all(|(_, v)| v.is_finite());
            let f = if m.f.is_finite() && writable {
                m.f
            } else {
                f64::INFINITY
            };
            (f, r, m.x)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
        .expect("at least one restart");
    (best.2, best.0)
}

/// Fits a model (bagged when `opt.bootstrap > 0`) and records training metrics.
pub fn fit(
    form: Form,
    data: &Dataset,
    opt: &FitOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<FittedModel, ScalingError> {
    let s = Structure::new(form, &data.factors).map_err(ScalingError::Data)?;
    if data.len() < 2 {
        return Err(ScalingError::Data(
            "need at least 2 observations to fit".into(),
        ));
    }
    let all: Vec<usize> = (0..data.len()).collect();
    let base: Vec<Vec<f64>> = if opt.bootstrap == 0 {
        vec![fit_best_of(&s, data, &all, opt, u64::MAX, progress).0]
    } else {
        (0..opt.bootstrap)
            .into_par_iter()
            .map(|b| {
                let mut rng = SplitMix::from_parts(&[opt.seed, 0xB007, b as u64]);
                let idx: Vec<usize> = (0..data.len()).map(|_| rng.below(data.len())).collect();
                fit_best_of(&s, data, &idx, opt, b as u64, progress).0
            })
            .collect()
    };
    let mut model = FittedModel::new(
        &s,
        base,
        FitInfo {
            source: data.source.clone(),
            observations: data.len(),
            restarts: opt.restarts,
            bootstrap: opt.bootstrap,
            seed: opt.seed,
            loss: opt.loss,
        },
    );
    model.metrics.train = Some(crate::validate::evaluate(&model, data));
    Ok(model)
}

/// Total L-BFGS runs a fit performs (for progress bars).
pub fn total_runs(opt: &FitOptions) -> u64 {
    (opt.restarts.max(1) * opt.bootstrap.max(1)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Observation;
    use crate::form::Factor;

    #[test]
    fn splitmix_is_deterministic_and_uniform() {
        let mut a = SplitMix::from_parts(&[1, 2, 3]);
        let mut b = SplitMix::from_parts(&[1, 2, 3]);
        assert_eq!(a.next_u64(), b.next_u64());
        let mean: f64 = (0..10000).map(|_| a.uniform()).sum::<f64>() / 10000.0;
        assert!((mean - 0.5).abs() < 0.02);
        assert_ne!(
            SplitMix::from_parts(&[1, 2, 4]).next_u64(),
            SplitMix::from_parts(&[1, 2, 3]).next_u64()
        );
    }

    #[test]
    fn objective_gradient_matches_finite_differences() {
        let data = Dataset {
            factors: vec![Factor::N, Factor::T, Factor::Data],
            rows: (0..12)
                .map(|i| Observation {
                    x: vec![
                        1.0 + i as f64,
                        4.0 * (1 + i % 3) as f64,
                        0.25 * (1 + i % 4) as f64,
                    ],
                    error: 30.0 + i as f64,
                })
                .collect(),
            source: "t".into(),
        };
        let s = Structure::new(Form::AddInteract, &data.factors).unwrap();
        let p = Prepared::new(&data, &(0..12).collect::<Vec<_>>());
        for loss in [Loss::Mse, Loss::Huber { delta: 0.1 }] {
            let theta: Vec<f64> = (0..s.n_params())
                .map(|i| 0.2 * (i as f64 + 1.0).cos())
                .collect();
            let mut g = vec![0.0; theta.len()];
            p.objective(&s, loss, &theta, &mut g);
            let mut tmp = vec![0.0; theta.len()];
            for i in 0..theta.len() {
                let mut a = theta.clone();
                a[i] += 1e-6;
                let mut b = theta.clone();
                b[i] -= 1e-6;
                let fd = (p.objective(&s, loss, &a, &mut tmp)
                    - p.objective(&s, loss, &b, &mut tmp))
                    / 2e-6;
                assert!(
                    (fd - g[i]).abs() < 1e-6,
                    "{loss:?} param {i}: {fd} vs {}",
                    g[i]
                );
            }
        }
    }
}
