//! Calibrates the shipped default scaling model (configs/scaling/default.json).
//!
//! The paper publishes neither per-run scores nor fitted parameters, so the default cannot be a
//! fit to its data. Instead this searches add-interact parameters (N in billions, T frames,
//! V tokens per frame, n in millions) whose frontier reproduces the paper's published findings:
//! - the frontier's elasticities with respect to data: e_N = -0.22, e_T = +0.17, e_V = +0.79
//!   (computed exactly as `vvlm elasticity` does, with its defaults);
//! - joint scaling: N*, T* and V* all grow from 1e12 to 1e14 FLOPs;
//! - plausible scores: 40-75 at the paper's star-sweep centre (7.5B, 32, 196, n = 1M).
//!
//! Random search (seeded) then a (1+1) evolution strategy. Reproduce with
//! `cargo run --release -p vvlm-scaling --example calibrate_default -- configs/scaling/default.json`.

use rayon::prelude::*;
use vvlm_cost::PaperCost;
use vvlm_scaling::fit::SplitMix;
use vvlm_scaling::frontier::log_space;
use vvlm_scaling::{
    elasticity, frontier, CandidateSet, Config, ElasticityOptions, Factor, FittedModel, Form,
};

const NAMES: [&str; 15] = [
    "alpha_N", "a_N", "alpha_T", "a_T", "alpha_V", "a_V", "beta_N", "b_N", "beta_T", "b_T",
    "beta_V", "b_V", "d", "xi", "eps",
];
const LO: [f64; 15] = [
    1.0, 0.05, 1.0, 0.05, 1.0, 0.05, 0.05, -1.0, 0.05, -1.0, 0.05, -1.0, 0.05, 0.05, 5.0,
];
const HI: [f64; 15] = [
    100.0, 1.0, 100.0, 1.0, 100.0, 1.0, 30.0, 1.0, 30.0, 1.0, 30.0, 1.0, 1.0, 30.0, 45.0,
];
const TARGET: [f64; 3] = [-0.22, 0.17, 0.79];

fn model(p: &[f64]) -> FittedModel {
    let named: Vec<(String, f64)> = NAMES
        .iter()
        .zip(p)
        .map(|(n, v)| (n.to_string(), *v))
        .collect();
    FittedModel::from_params(
        Form::AddInteract,
        &[Factor::N, Factor::T, Factor::V, Factor::Data],
        &named,
    )
    .unwrap()
}

fn cost(c: &Config) -> f64 {
    PaperCost::default().flops(c.lm_params_b * 1e9, c.frames, c.tokens_per_frame)
}

fn score(p: &[f64], opt: &ElasticityOptions) -> (f64, [f64; 3]) {
    let m = model(p);
    let centre = 100.0
        - m.predict(&Config {
            lm_params_b: 7.5,
            frames: 32.0,
            tokens_per_frame: 196.0,
            data_size_m: 1.0,
        });
    let mut penalty = 0.0;
    if !(40.0..=75.0).contains(&centre) {
        penalty += 1.0 + (centre - 57.5).abs() / 10.0;
    }
    let cs = CandidateSet::default();
    let f = frontier(&m, &cs, &cost, 2.0, &[1e12, 1e14]);
    if let (Some(a), Some(b)) = (f[0], f[1]) {
        for (x, y) in [
            (a.config.lm_params_b, b.config.lm_params_b),
            (a.config.frames, b.config.frames),
            (a.config.tokens_per_frame, b.config.tokens_per_frame),
        ] {
            if y <= x {
                penalty += 1.0;
            }
        }
    } else {
        penalty += 3.0;
    }
    let e = elasticity(&m, &cs, &cost, opt);
    let got = [e.e_n, e.e_t, e.e_v];
    let d: f64 = got.iter().zip(TARGET).map(|(g, t)| (g - t) * (g - t)).sum();
    (d + penalty, got)
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "configs/scaling/default.json".into());
    let coarse = ElasticityOptions {
        budgets: log_space(1e12, 1e14, 60),
        data_sizes_m: (1..=100).step_by(5).map(|i| 0.1 * i as f64).collect(),
        delta_m: 5.0,
    };
    let sample = |seed: u64| -> Vec<f64> {
        let mut r = SplitMix::from_parts(&[7, seed]);
        (0..15)
            .map(|i| {
                if LO[i] > 0.0 && HI[i] / LO[i] > 5.0 {
                    (LO[i].ln() + (HI[i].ln() - LO[i].ln()) * r.uniform()).exp()
                } else {
                    LO[i] + (HI[i] - LO[i]) * r.uniform()
                }
            })
            .collect()
    };
    let mut best: Vec<(f64, Vec<f64>)> = (0..3000u64)
        .into_par_iter()
        .map(|s| {
            let p = sample(s);
            (score(&p, &coarse).0, p)
        })
        .collect();
    best.sort_by(|a, b| a.0.total_cmp(&b.0));
    eprintln!("random search best {:.4}", best[0].0);
    // (1+1)-ES from the 4 best, in parallel, on the full `vvlm elasticity` defaults.
    let full_opt = ElasticityOptions::default();
    let coarse = &full_opt;
    let refined: Vec<(f64, Vec<f64>)> = best[..6]
        .par_iter()
        .enumerate()
        .map(|(k, (s0, p0))| {
            let mut rng = SplitMix::from_parts(&[11, k as u64]);
            let (mut s, mut p) = (*s0, p0.clone());
            let mut step = 0.2;
            for _ in 0..500 {
                let q: Vec<f64> = p
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let n = rng.normal() * step;
                        let x = if LO[i] > 0.0 { v * n.exp() } else { v + n };
                        x.clamp(LO[i], HI[i])
                    })
                    .collect();
                let sq = score(&q, coarse).0;
                if sq < s {
                    s = sq;
                    p = q;
                    step *= 1.5;
                } else {
                    step *= 0.9;
                }
                step = step.clamp(0.01, 0.5);
            }
            (s, p)
        })
        .collect();
    let (s, p) = refined
        .into_iter()
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap();
    let (full, e) = score(&p, &ElasticityOptions::default());
    eprintln!(
        "refined coarse objective {s:.4}; full-default elasticities {e:?} (objective {full:.4})"
    );
    let mut m = model(&p);
    m.provenance = format!(
        "NOT fitted to data: the paper publishes no per-run scores or parameters. Calibrated by \
         `cargo run --release -p vvlm-scaling --example calibrate_default` so that its frontier \
         reproduces the paper's published findings: elasticities w.r.t. data e_N={:+.3}, e_T={:+.3}, \
         e_V={:+.3} (paper: -0.22, +0.17, +0.79; `vvlm elasticity` defaults), N*, T*, V* all growing \
         with budget (joint scaling), and scores of 40-75 at the star-sweep centre. Replace it with \
         `vvlm fit` on your own sweep.",
        e[0], e[1], e[2]
    );
    std::fs::write(&out, m.to_json() + "\n").unwrap();
    eprintln!("wrote {out}");
}
