//! The compute-optimal frontier `x*(c; n) = argmin_{x in X, c(x) <= c} f(x, n)` by exhaustive
//! search over a finite candidate set, and the frontier's elasticity with respect to data.
//! Ties in predicted error go to the cheaper candidate. The frontier is staggered and may be
//! non-monotone: nothing is smoothed.

use crate::model::{Config, FittedModel};
use serde::{Deserialize, Serialize};

/// A finite candidate set: the Cartesian product of the listed values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateSet {
    pub lm_params_b: Vec<f64>,
    pub frames: Vec<u32>,
    pub tokens_per_frame: Vec<u32>,
}

impl Default for CandidateSet {
    /// The paper's LM ladder (1, 2.8, 7.5 B), 1..=64 frames, every square s*s for s in 1..=27.
    fn default() -> Self {
        Self {
            lm_params_b: vec![1.0, 2.8, 7.5],
            frames: (1..=64).collect(),
            tokens_per_frame: (1..=27).map(|s| s * s).collect(),
        }
    }
}

impl CandidateSet {
    pub fn configs(&self, data_size_m: f64) -> Vec<Config> {
        let mut out = Vec::with_capacity(
            self.lm_params_b.len() * self.frames.len() * self.tokens_per_frame.len(),
        );
        for &n in &self.lm_params_b {
            for &t in &self.frames {
                for &v in &self.tokens_per_frame {
                    out.push(Config {
                        lm_params_b: n,
                        frames: t as f64,
                        tokens_per_frame: v as f64,
                        data_size_m,
                    });
                }
            }
        }
        out
    }
}

/// One frontier point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FrontierPoint {
    pub budget: f64,
    pub config: Config,
    pub cost: f64,
    pub predicted_error: f64,
}

/// The optimum at each budget (None where no candidate fits). `budgets` may be in any order.
pub fn frontier(
    model: &FittedModel,
    candidates: &CandidateSet,
    cost: &dyn Fn(&Config) -> f64,
    data_size_m: f64,
    budgets: &[f64],
) -> Vec<Option<FrontierPoint>> {
    let mut scored: Vec<(f64, f64, Config)> = candidates
        .configs(data_size_m)
        .into_iter()
        .map(|c| (cost(&c), model.predict(&c), c))
        .collect();
    // Ascending cost; among equal costs the lower error first.
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let mut order: Vec<usize> = (0..budgets.len()).collect();
    order.sort_by(|&a, &b| budgets[a].total_cmp(&budgets[b]));
    let mut out = vec![None; budgets.len()];
    let mut best: Option<(f64, f64, Config)> = None;
    let mut next = 0;
    for bi in order {
        let b = budgets[bi];
        while next < scored.len() && scored[next].0 <= b {
            let cand = scored[next];
            // Strictly lower error replaces; a tie keeps the cheaper incumbent.
            if best.is_none_or(|cur| cand.1 < cur.1) {
                best = Some(cand);
            }
            next += 1;
        }
        out[bi] = best.map(|(c, e, config)| FrontierPoint {
            budget: b,
            config,
            cost: c,
            predicted_error: e,
        });
    }
    out
}

/// `n` values spaced evenly in log space from `lo` to `hi` inclusive.
pub fn log_space(lo: f64, hi: f64, steps: usize) -> Vec<f64> {
    if steps <= 1 {
        return vec![lo];
    }
    let (a, b) = (lo.ln(), hi.ln());
    (0..steps)
        .map(|i| (a + (b - a) * i as f64 / (steps - 1) as f64).exp())
        .collect()
}

/// Options of the elasticity average.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ElasticityOptions {
    pub budgets: Vec<f64>,
    pub data_sizes_m: Vec<f64>,
    /// Forward-difference step, in the data unit (millions).
    pub delta_m: f64,
}

impl Default for ElasticityOptions {
    /// 300 budgets log-spaced over 1e12..1e14 FLOPs, 100 data sizes evenly over 0.1..10 M, and
    /// the paper's step of 5 (read as millions, the data unit).
    fn default() -> Self {
        Self {
            budgets: log_space(1e12, 1e14, 300),
            data_sizes_m: (1..=100).map(|i| 0.1 * i as f64).collect(),
            delta_m: 5.0,
        }
    }
}

/// Average elasticities of the frontier's N, T and V with respect to data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Elasticity {
    pub e_n: f64,
    pub e_t: f64,
    pub e_v: f64,
    /// (budget, data size) pairs averaged over.
    pub points: usize,
}

/// `e_k(c, n) = (x_k*(c; n + delta) - x_k*(c; n)) / delta * n / x_k*(c; n)`, averaged over
/// budgets and data sizes where the frontier exists.
pub fn elasticity(
    model: &FittedModel,
    candidates: &CandidateSet,
    cost: &dyn Fn(&Config) -> f64,
    opt: &ElasticityOptions,
) -> Elasticity {
    let mut sum = [0.0f64; 3];
    let mut points = 0usize;
    for &n in &opt.data_sizes_m {
        let a = frontier(model, candidates, cost, n, &opt.budgets);
        let b = frontier(model, candidates, cost, n + opt.delta_m, &opt.budgets);
        for (pa, pb) in a.iter().zip(&b) {
            let (Some(pa), Some(pb)) = (pa, pb) else {
                continue;
            };
            let k = |c: &Config| [c.lm_params_b, c.frames, c.tokens_per_frame];
            let (xa, xb) = (k(&pa.config), k(&pb.config));
            for i in 0..3 {
                sum[i] += (xb[i] - xa[i]) / opt.delta_m * n / xa[i];
            }
            points += 1;
        }
    }
    let m = points.max(1) as f64;
    Elasticity {
        e_n: sum[0] / m,
        e_t: sum[1] / m,
        e_v: sum[2] / m,
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::form::{Factor, Form};

    fn model() -> FittedModel {
        // f = 10 N^-0.5 + 10 T^-0.5 + 10 V^-0.5 + 1
        let p: Vec<(String, f64)> = [
            ("alpha_N", 10.0),
            ("a_N", 0.5),
            ("alpha_T", 10.0),
            ("a_T", 0.5),
            ("alpha_V", 10.0),
            ("a_V", 0.5),
            ("eps", 1.0),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        FittedModel::from_params(Form::Add, &[Factor::N, Factor::T, Factor::V], &p).unwrap()
    }

    fn brute(
        m: &FittedModel,
        cs: &CandidateSet,
        cost: &dyn Fn(&Config) -> f64,
        b: f64,
    ) -> Option<(f64, f64)> {
        let mut best: Option<(f64, f64)> = None;
        for c in cs.configs(1.0) {
            let k = cost(&c);
            if k > b {
                continue;
            }
            let e = m.predict(&c);
            if best.is_none_or(|(be, bk)| e < be || (e == be && k < bk)) {
                best = Some((e, k));
            }
        }
        best
    }

    #[test]
    fn matches_brute_force_and_respects_budgets() {
        let m = model();
        let cs = CandidateSet {
            lm_params_b: vec![1.0, 2.8, 7.5],
            frames: vec![1, 2, 4, 8, 16, 32],
            tokens_per_frame: vec![1, 4, 16, 64, 196],
        };
        let cost = |c: &Config| {
            2.0 * c.frames * (0.43e9 * 768.0 + c.lm_params_b * 1e9 * c.tokens_per_frame)
        };
        let budgets = log_space(1e11, 1e14, 40);
        let f = frontier(&m, &cs, &cost, 1.0, &budgets);
        for (b, p) in budgets.iter().zip(&f) {
            let want = brute(&m, &cs, &cost, *b);
            match (want, p) {
                (None, None) => {}
                (Some((e, k)), Some(p)) => {
                    assert!(p.cost <= *b);
                    assert_eq!(p.predicted_error, e);
                    assert_eq!(p.cost, k);
                }
                other => panic!("budget {b}: {other:?}"),
            }
        }
        assert!(f[0].is_none(), "1e11 is below the cheapest candidate");
        assert!(f.last().unwrap().is_some());
    }

    #[test]
    fn ties_go_to_the_cheaper_candidate() {
        // Only N matters; T is free in the error, so the frontier must keep T = 1.
        let p: Vec<(String, f64)> = [("alpha_N", 1.0), ("a_N", 1.0), ("eps", 0.5)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        let m = FittedModel::from_params(Form::Add, &[Factor::N], &p).unwrap();
        let cs = CandidateSet {
            lm_params_b: vec![1.0, 2.0],
            frames: vec![1, 2, 3],
            tokens_per_frame: vec![1],
        };
        let cost = |c: &Config| c.lm_params_b * c.frames;
        let f = frontier(&m, &cs, &cost, 1.0, &[10.0]);
        let p = f[0].unwrap();
        assert_eq!((p.config.lm_params_b, p.config.frames), (2.0, 1.0));
    }

    #[test]
    fn elasticity_is_zero_without_data_interaction_and_hand_checked_otherwise() {
        let m = model();
        let cs = CandidateSet {
            lm_params_b: vec![1.0, 2.8],
            frames: vec![1, 2, 4],
            tokens_per_frame: vec![1, 4],
        };
        let cost = |c: &Config| c.lm_params_b * c.frames * c.tokens_per_frame;
        let e = elasticity(
            &m,
            &cs,
            &cost,
            &ElasticityOptions {
                budgets: vec![4.0, 8.0],
                data_sizes_m: vec![1.0, 2.0],
                delta_m: 1.0,
            },
        );
        assert_eq!((e.e_n, e.e_t, e.e_v), (0.0, 0.0, 0.0));
        assert_eq!(e.points, 4);

        // f = N^-1 + beta_T T^1 n^-1 + 1: more data makes frames cheaper in error, so the
        // frontier moves to more frames. Candidates N in {1}, T in {1, 2}; budget allows both.
        // At n = 1: f(T=1) = 1 + 1*1 + 1 = 3.0 ... with alpha_T T^-a_T pulling towards more frames.
        let p: Vec<(String, f64)> = [
            ("d", 1.0),
            ("alpha_T", 1.0),
            ("a_T", 1.0),
            ("beta_T", 0.4),
            ("b_T", 1.0),
            ("eps", 0.1),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        let m =
            FittedModel::from_params(Form::AddInteractS, &[Factor::T, Factor::Data], &p).unwrap();
        // n = 1: T=1 -> 1 + 0.4 = 1.4 (+eps); T=2 -> 0.5 + 0.8 = 1.3 -> T*=2.
        // n = 0.5: T=1 -> 1 + 0.8 = 1.8; T=2 -> 0.5 + 1.6 = 2.1 -> T*=1.
        // e_T at n = 0.5, delta 0.5: (2 - 1)/0.5 * 0.5/1 = 1.0
        let cs = CandidateSet {
            lm_params_b: vec![1.0],
            frames: vec![1, 2],
            tokens_per_frame: vec![1],
        };
        let cost = |c: &Config| c.frames;
        let e = elasticity(
            &m,
            &cs,
            &cost,
            &ElasticityOptions {
                budgets: vec![5.0],
                data_sizes_m: vec![0.5],
                delta_m: 0.5,
            },
        );
        assert!((e.e_t - 1.0).abs() < 1e-12, "{e:?}");
        assert_eq!(e.e_n, 0.0);
    }
}
