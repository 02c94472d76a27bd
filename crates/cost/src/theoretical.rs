//! The paper's theoretical prefill cost, `c(x) = 2 x_T (x_M x_W + x_N x_V)`.
//!
//! Text tokens, attention's quadratic term, the projector and decode are ignored, as in the paper.

use serde::{Deserialize, Serialize};

/// Constants of the paper's cost formula: the vision model's parameters `x_M` and visual features
/// per frame `x_W`. Defaults are the paper's SoViT-400m/14 values (0.43e9, 768).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PaperCost {
    pub vision_params: f64,
    pub vision_features: f64,
}

impl Default for PaperCost {
    fn default() -> Self {
        Self {
            vision_params: 0.43e9,
            vision_features: 768.0,
        }
    }
}

impl PaperCost {
    /// FLOPs of one request: `lm_params` in parameters (not billions).
    pub fn flops(&self, lm_params: f64, frames: f64, tokens_per_frame: f64) -> f64 {
        let (vision, lm) = self.split(lm_params, frames, tokens_per_frame);
        vision + lm
    }

    /// Vision and LM parts of [`Self::flops`] separately.
    pub fn split(&self, lm_params: f64, frames: f64, tokens_per_frame: f64) -> (f64, f64) {
        (
            2.0 * frames * self.vision_params * self.vision_features,
            2.0 * frames * lm_params * tokens_per_frame,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's Table 6 isoFLOP sweep: (target TFLOPs, LM params, [(frames, tokens/frame)]).
    #[allow(clippy::type_complexity)]
    const ISOFLOP: &[(f64, f64, &[(u32, u32)])] = &[
        (2.0, 1.0e9, &[(2, 196), (3, 9), (3, 16)]),
        (2.0, 2.8e9, &[(2, 64), (3, 4)]),
        (2.0, 7.5e9, &[(2, 25), (3, 1)]),
        (5.0, 1.0e9, &[(4, 289), (5, 169), (6, 81), (7, 25)]),
        (5.0, 2.8e9, &[(3, 169), (4, 100), (5, 64), (6, 25), (7, 9)]),
        (5.0, 7.5e9, &[(2, 121), (3, 64), (6, 9), (7, 4)]),
        (
            15.0,
            1.0e9,
            &[(8, 625), (11, 361), (16, 144), (20, 49), (22, 16)],
        ),
        (
            15.0,
            2.8e9,
            &[(6, 324), (11, 121), (16, 49), (19, 25), (20, 16)],
        ),
        (
            15.0,
            7.5e9,
            &[(7, 100), (8, 81), (15, 25), (19, 9), (21, 4)],
        ),
        (
            30.0,
            1.0e9,
            &[(16, 625), (26, 256), (32, 144), (37, 81), (40, 49)],
        ),
        (
            30.0,
            2.8e9,
            &[(9, 484), (17, 196), (22, 121), (27, 81), (35, 36)],
        ),
        (30.0, 7.5e9, &[(16, 81), (25, 36), (29, 25), (38, 9)]),
    ];

    /// Table 6 with the paper's constants: 48 of the 49 configurations land within 5% of their
    /// target. The exception, (1B, T=2, V=196) at 2 TFLOPs, is 2.105e12 = 5.25% over: the
    /// paper says some points were added after the sweep, and this one is checked to its
    /// actual offset rather than hidden.
    #[test]
    fn every_table6_isoflop_configuration_is_within_5_percent_of_its_target() {
        let cost = PaperCost::default();
        let mut checked = 0;
        for (target, n, configs) in ISOFLOP {
            for (t, v) in configs.iter() {
                let c = cost.flops(*n, *t as f64, *v as f64);
                let rel = (c / (target * 1e12) - 1.0).abs();
                let bound = if (*target, *n, *t, *v) == (2.0, 1.0e9, 2, 196) {
                    0.0525 + 1e-9
                } else {
                    0.05
                };
                assert!(
                    rel <= bound,
                    "N={n} T={t} V={v}: {c:.4e} is {:.1}% off {target}T",
                    rel * 100.0
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 49);
    }

    #[test]
    fn hand_computed_example() {
        // 2 * 2 * (0.43e9 * 768 + 1e9 * 196) = 2.10496e12
        let c = PaperCost::default().flops(1e9, 2.0, 196.0);
        assert!((c - 2.10496e12).abs() < 1e3);
        // Vision 2 * 2 * 0.43e9 * 768 = 1.32096e12; LM 2 * 2 * 1e9 * 196 = 7.84e11.
        let (v, l) = PaperCost::default().split(1e9, 2.0, 196.0);
        assert!((v - 1.32096e12).abs() < 1e3, "{v}");
        assert!((l - 7.84e11).abs() < 1e3, "{l}");
    }
}
