//! What configuration a policy runs at a budget: the naive rules a user without a planner would
//! write, and the oracle that knows the measured accuracy of every grid configuration. The
//! planner's own choice comes from `vvlm-planner`; this module only ranks configurations that
//! the caller has already priced and found to fit.

use crate::GridPoint;
use serde::Serialize;
use std::cmp::Ordering;

/// One configuration: a checkpoint at a grid point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    pub model: String,
    /// LM parameters `x_N`.
    pub lm_params: f64,
    pub point: GridPoint,
}

impl Choice {
    /// `model T8 V16`.
    pub fn label(&self) -> String {
        format!(
            "{} T{} V{}",
            self.model,
            self.point.frames,
            self.point.tokens_per_frame()
        )
    }
}

/// Budget rules without a scaling law. Each picks among the configurations that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NaivePolicy {
    /// The most frames; then the fewest tokens per frame; then the biggest model.
    MostFrames,
    /// The most tokens per frame; then the most frames; then the biggest model.
    MostTokens,
    /// The biggest model; then the most visual tokens in all (`x_T x_V`); then more frames.
    BiggestModel,
    /// `x_T = 8`, the largest `s` that fits, on the biggest model at that `s` (none if 8 frames
    /// do not fit).
    FixedDefault,
}

impl NaivePolicy {
    pub const ALL: [NaivePolicy; 4] = [
        NaivePolicy::MostFrames,
        NaivePolicy::MostTokens,
        NaivePolicy::BiggestModel,
        NaivePolicy::FixedDefault,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NaivePolicy::MostFrames => "most-frames",
            NaivePolicy::MostTokens => "most-tokens",
            NaivePolicy::BiggestModel => "biggest-model",
            NaivePolicy::FixedDefault => "fixed-default",
        }
    }

    /// `Greater` when `a` is preferred to `b`.
    fn prefer(self, a: &Choice, b: &Choice) -> Ordering {
        let (pa, pb) = (a.point, b.point);
        let model = a.lm_params.total_cmp(&b.lm_params);
        match self {
            NaivePolicy::MostFrames => pa
                .frames
                .cmp(&pb.frames)
                .then(pb.side.cmp(&pa.side))
                .then(model),
            NaivePolicy::MostTokens => pa
                .side
                .cmp(&pb.side)
                .then(pa.frames.cmp(&pb.frames))
                .then(model),
            NaivePolicy::BiggestModel => model
                .then((pa.frames * pa.tokens_per_frame()).cmp(&(pb.frames * pb.tokens_per_frame())))
                .then(pa.frames.cmp(&pb.frames)),
            NaivePolicy::FixedDefault => pa.side.cmp(&pb.side).then(model),
        }
    }

    /// The policy's pick among configurations that fit the budget.
    pub fn pick<'a>(self, fitting: impl IntoIterator<Item = &'a Choice>) -> Option<&'a Choice> {
        fitting
            .into_iter()
            .filter(|c| self != NaivePolicy::FixedDefault || c.point.frames == 8)
            .max_by(|a, b| self.prefer(a, b))
    }
}

/// The oracle: the configuration with the best measured mean score among those that fit, ties
/// to the cheaper (`cost`). `score` is `None` where a configuration was not measured.
pub fn oracle<'a>(
    fitting: impl IntoIterator<Item = &'a Choice>,
    score: impl Fn(&Choice) -> Option<f64>,
    cost: impl Fn(&Choice) -> f64,
) -> Option<(&'a Choice, f64)> {
    fitting
        .into_iter()
        .filter_map(|c| score(c).map(|s| (c, s)))
        .max_by(|a, b| a.1.total_cmp(&b.1).then(cost(b.0).total_cmp(&cost(a.0))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(model: &str, n: f64, frames: usize, side: usize) -> Choice {
        Choice {
            model: model.into(),
            lm_params: n,
            point: GridPoint { frames, side },
        }
    }

    fn grid() -> Vec<Choice> {
        let mut g = vec![];
        for (m, n) in [("s", 1.0), ("l", 9.0)] {
            for t in [1, 8, 32] {
                for s in [1, 4] {
                    g.push(c(m, n, t, s));
                }
            }
        }
        g
    }

    #[test]
    fn naive_policies_follow_their_rule() {
        let g = grid();
        let pick = |p: NaivePolicy, f: &dyn Fn(&Choice) -> bool| {
            p.pick(g.iter().filter(|c| f(c))).map(Choice::label)
        };
        let all = |_: &Choice| true;
        assert_eq!(pick(NaivePolicy::MostFrames, &all).unwrap(), "l T32 V1");
        assert_eq!(pick(NaivePolicy::MostTokens, &all).unwrap(), "l T32 V16");
        assert_eq!(pick(NaivePolicy::BiggestModel, &all).unwrap(), "l T32 V16");
        assert_eq!(pick(NaivePolicy::FixedDefault, &all).unwrap(), "l T8 V16");
        // Under a budget that only small configurations fit.
        let small = |c: &Choice| {
            c.point.frames * c.point.tokens_per_frame() <= 16 && c.model == "s"
                || c.model == "l" && c.point.frames == 1 && c.point.side == 1
        };
        assert_eq!(pick(NaivePolicy::MostFrames, &small).unwrap(), "s T8 V1");
        assert_eq!(pick(NaivePolicy::MostTokens, &small).unwrap(), "s T1 V16");
        assert_eq!(pick(NaivePolicy::BiggestModel, &small).unwrap(), "l T1 V1");
        assert_eq!(pick(NaivePolicy::FixedDefault, &small).unwrap(), "s T8 V1");
        // Nothing with 8 frames fits: the fixed default has no answer, the others do.
        let tiny = |c: &Choice| c.point.frames == 1;
        assert_eq!(pick(NaivePolicy::FixedDefault, &tiny), None);
        assert_eq!(pick(NaivePolicy::MostFrames, &tiny).unwrap(), "l T1 V1");
        assert_eq!(NaivePolicy::MostFrames.pick(std::iter::empty()), None);
    }

    #[test]
    fn the_oracle_takes_the_best_measured_and_the_cheaper_on_ties() {
        let g = grid();
        let score = |c: &Choice| match (c.model.as_str(), c.point.frames, c.point.side) {
            ("s", 8, 4) => Some(70.0),
            ("l", 8, 4) => Some(70.0),
            ("l", 32, 4) => Some(90.0),
            ("l", 32, 1) => None,
            _ => Some(10.0),
        };
        let cost = |c: &Choice| c.lm_params * (c.point.frames * c.point.tokens_per_frame()) as f64;
        let (best, s) = oracle(&g, score, cost).unwrap();
        assert_eq!((best.label(), s), ("l T32 V16".to_string(), 90.0));
        let (best, s) = oracle(g.iter().filter(|c| c.point.frames <= 8), score, cost).unwrap();
        assert_eq!((best.label(), s), ("s T8 V16".to_string(), 70.0));
        assert!(oracle(g.iter().filter(|_| false), score, cost).is_none());
    }
}
