//! Per-request planning: which checkpoint (LM size `x_N`), how many frames (`x_T`) and how many
//! visual tokens per frame (`x_V = s*s`) minimise the predicted error under a FLOPs budget.
//!
//! Owns the model registry (`models/*.toml`), the candidate grid, the cost modes (the paper's
//! theoretical FLOPs, or the exact analytic count of the real architecture with the prompt's text
//! tokens and the expected decode) and the choice rule (lowest predicted error whose cost fits;
//! ties to the cheaper). Must not know about tensors, HTTP, tenants or how budgets are charged.

mod registry;

pub use registry::{ModelEntry, Registry};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use vvlm_cost::{ArchSpec, FlopBreakdown, PaperCost, Workload};
use vvlm_scaling::{Config, FittedModel};

/// Errors of planning.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("budget {budget:.4e} FLOPs is too small: the cheapest allowed configuration costs {min_budget:.4e} FLOPs")]
    BudgetTooSmall { budget: f64, min_budget: f64 },
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    #[error("unknown task `{0}`")]
    UnknownTask(String),
    #[error("invalid pin: {0}")]
    InvalidPin(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error("the request needs {needed} tokens (prompt, visual tokens and max_tokens) but the longest context of any allowed configuration is {limit}: shorten the prompt or lower max_tokens")]
    ContextTooLong { needed: usize, limit: usize },
}

/// How a configuration is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CostMode {
    /// `2 x_T (x_M x_W + x_N x_V)`: the paper's prefill formula.
    #[default]
    Theoretical,
    /// The exact analytic count of the checkpoint's architecture: vision, projector, prefill of
    /// text + visual tokens (attention's quadratic term included) and the expected decode.
    Exact,
}

/// Restrictions a request puts on the search (they narrow it; the budget still applies).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pins {
    pub model: Option<String>,
    pub frames: Option<u32>,
    pub tokens_per_frame: Option<u32>,
}

/// What the planner needs to know about one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PlanRequest {
    pub budget_flops: f64,
    pub task: String,
    /// Text tokens of the formatted prompt (used by the exact cost mode and the context
    /// check), for models not in `text_tokens_by_model`.
    pub text_tokens: usize,
    /// The prompt's text tokens under each model's own tokenizer and chat template (models
    /// differ); absent models use `text_tokens`.
    #[serde(default)]
    pub text_tokens_by_model: BTreeMap<String, usize>,
    /// No video or images: the request is text alone. Candidates are the models at zero frames,
    /// priced for their text (prefill and decode) and ranked by the task's law at its smallest
    /// visual input (one frame of one token), where the fitted law is defined: among models
    /// that fit, the law's preference in `x_N`.
    #[serde(default)]
    pub text_only: bool,
    /// Configurations whose vision features this request's video already has in the cache:
    /// their vision and projector cost nothing more, so they are priced at their marginal cost.
    #[serde(default)]
    pub cached_vision: Vec<CachedVision>,
    /// Text alone: prompt tokens whose KV each model already has cached (a shared system
    /// message): their prefill costs nothing more, so the model is priced at its marginal cost.
    #[serde(default)]
    pub cached_text_tokens_by_model: BTreeMap<String, usize>,
    /// Generated tokens to price (used by the exact cost mode).
    pub expected_decode_tokens: usize,
    /// The prompt's own log-probabilities are asked (a completion's `echo` with `logprobs`):
    /// the LM head runs over every prompt position but the last, 2 (t - 1) hidden vocab more
    /// prefill FLOPs, priced in either cost mode for models whose architecture is known.
    #[serde(default)]
    pub scored_prompt: bool,
    #[serde(default)]
    pub pins: Pins,
}

/// A video's frames already encoded by a checkpoint (any pooled side reuses them), and the
/// pooled side whose LM prefill of [text before the video + visual tokens] is cached too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedVision {
    pub model: String,
    pub frames: u32,
    /// The LM's KV of the prompt up to the video at this pooled side is cached: that prefill
    /// costs nothing more either.
    #[serde(default)]
    pub prefilled_side: Option<u32>,
    /// Positions of that cached prefix (the prompt up to and including the video: the text
    /// before it and the visual tokens), priced exactly in the exact cost mode; absent, the
    /// visual tokens alone are counted as saved (an estimate that never prices below what runs).
    #[serde(default)]
    pub prefix_tokens: Option<usize>,
}

/// One priced and scored configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub model: String,
    pub lm_params: f64,
    pub frames: u32,
    pub tokens_per_frame: u32,
    pub side: u32,
    pub predicted_error: f64,
    pub predicted_score: f64,
    /// What it costs given the cache (what is reserved and compared with the budget).
    pub cost_flops: f64,
    /// What it would cost with nothing cached.
    #[serde(default)]
    pub cold_cost_flops: f64,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    #[serde(flatten)]
    pub choice: Candidate,
    pub budget_flops: f64,
    pub cost_mode: CostMode,
    pub task: String,
    /// The next best feasible configurations (up to 5), best first.
    pub runners_up: Vec<Candidate>,
    /// Candidates considered after pins.
    pub considered: usize,
}

/// The planner: registry, one scaling model per task, cost settings.
#[derive(Debug, Clone)]
pub struct Planner {
    registry: Arc<Registry>,
    tasks: BTreeMap<String, Arc<FittedModel>>,
    pub paper_cost: PaperCost,
    pub cost_mode: CostMode,
    /// Finetuning data size the checkpoints were trained with (millions), for models with `n`.
    pub data_size_m: f64,
    /// Exact architectures by model name (needed for [`CostMode::Exact`]).
    archs: BTreeMap<String, ArchSpec>,
    /// Context length (`max_position_embeddings`) by model name; unknown: unlimited.
    contexts: BTreeMap<String, usize>,
}

impl PlanRequest {
    /// The prompt's text tokens for one model.
    pub fn text_tokens_for(&self, model: &str) -> usize {
        self.text_tokens_by_model
            .get(model)
            .copied()
            .unwrap_or(self.text_tokens)
    }
}

impl Planner {
    pub fn new(
        registry: Registry,
        tasks: BTreeMap<String, Arc<FittedModel>>,
    ) -> Result<Self, PlanError> {
        if registry.models.is_empty() {
            return Err(PlanError::Registry("the model registry is empty".into()));
        }
        if tasks.is_empty() {
            return Err(PlanError::Registry("no scaling model for any task".into()));
        }
        Ok(Self {
            registry: Arc::new(registry),
            tasks,
            paper_cost: PaperCost::default(),
            cost_mode: CostMode::Theoretical,
            data_size_m: 2.0,
            archs: BTreeMap::new(),
            contexts: BTreeMap::new(),
        })
    }

    /// Registers a model's context length: configurations whose prompt, visual tokens and
    /// expected decode do not fit are not candidates.
    pub fn set_context(&mut self, model: &str, tokens: usize) {
        self.contexts.insert(model.to_string(), tokens);
    }

    /// Tokens a configuration occupies: prompt text, visual tokens (with the video newline
    /// where the architecture has one) and the expected decode.
    pub fn tokens_needed(
        &self,
        entry: &ModelEntry,
        frames: u32,
        tokens_per_frame: u32,
        req: &PlanRequest,
    ) -> usize {
        let w = Workload {
            frames: frames as usize,
            tokens_per_frame: tokens_per_frame as usize,
            text_tokens: req.text_tokens_for(&entry.name),
            decode_steps: 0,
        };
        let prefill = match self.archs.get(&entry.name) {
            Some(a) => a.prefill_len(&w),
            None => w.text_tokens + w.frames * w.tokens_per_frame,
        };
        prefill + req.expected_decode_tokens
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn tasks(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(|s| s.as_str())
    }

    /// Registers the exact architecture of a model (for the exact cost mode).
    pub fn set_arch(&mut self, model: &str, arch: ArchSpec) {
        self.archs.insert(model.to_string(), arch);
    }

    /// The vision tower's and projector's part of a configuration's price (what cached
    /// features save).
    pub fn vision_cost(&self, entry: &ModelEntry, frames: u32) -> f64 {
        match (self.cost_mode, self.archs.get(&entry.name)) {
            (CostMode::Exact, Some(arch)) => {
                let b = arch.flops(&Workload {
                    frames: frames as usize,
                    tokens_per_frame: 1,
                    text_tokens: 0,
                    decode_steps: 0,
                });
                b.vision + b.projector
            }
            _ => self.paper_cost.split(entry.lm_params, frames as f64, 0.0).0,
        }
    }

    /// Prices one configuration given the cache: (marginal, cold).
    pub fn marginal_cost(
        &self,
        entry: &ModelEntry,
        frames: u32,
        tokens_per_frame: u32,
        req: &PlanRequest,
    ) -> (f64, f64) {
        let cold = self.cost(entry, frames, tokens_per_frame, req);
        let Some(hit) = req
            .cached_vision
            .iter()
            .find(|c| frames > 0 && c.model == entry.name && c.frames == frames)
        else {
            return (cold, cold);
        };
        let side = (tokens_per_frame as f64).sqrt().round() as u32;
        let prefilled = side * side == tokens_per_frame && hit.prefilled_side == Some(side);
        let marginal = if prefilled {
            // Only the question's prefill (over the cached context) and the decode remain.
            match (self.cost_mode, self.archs.get(&entry.name)) {
                (CostMode::Exact, Some(arch)) => {
                    let prompt = |text_tokens| {
                        arch.prefill_len(&Workload {
                            frames: frames as usize,
                            tokens_per_frame: tokens_per_frame as usize,
                            text_tokens,
                            decode_steps: 0,
                        })
                    };
                    let cached = hit
                        .prefix_tokens
                        .unwrap_or_else(|| prompt(0))
                        .min(prompt(req.text_tokens_for(&entry.name)));
                    cold - self.vision_cost(entry, frames) - arch.lm.cached_prefix_flops(cached)
                }
                // The paper's formula prices visual tokens only: what is left is text.
                _ => {
                    2.0 * entry.lm_params
                        * (req.text_tokens_for(&entry.name) + req.expected_decode_tokens) as f64
                }
            }
        } else {
            cold - self.vision_cost(entry, frames)
        };
        (marginal.max(0.0), cold)
    }

    /// Prices a text-only request on one model given the cache: (marginal, cold). The prefill
    /// of the cached prompt tokens (the first ones: causal attention makes their cost that of a
    /// prompt of their own) is what the cache saves.
    pub fn marginal_text_cost(&self, entry: &ModelEntry, req: &PlanRequest) -> (f64, f64) {
        let cold = self.cost(entry, 0, 0, req);
        let cached = req
            .cached_text_tokens_by_model
            .get(&entry.name)
            .copied()
            .unwrap_or(0)
            .min(req.text_tokens_for(&entry.name));
        if cached == 0 {
            return (cold, cold);
        }
        let saved = match (self.cost_mode, self.archs.get(&entry.name)) {
            (CostMode::Exact, Some(arch)) => arch.lm.cached_prefix_flops(cached),
            // Text is 2 N per token in the paper's formula.
            _ => 2.0 * entry.lm_params * cached as f64,
        };
        ((cold - saved).max(0.0), cold)
    }

    /// The LM head over the prompt's positions but the last, when its log-probabilities are
    /// asked ([`PlanRequest::scored_prompt`]); 0 otherwise, or when the architecture is unknown.
    fn scoring_cost(&self, entry: &ModelEntry, req: &PlanRequest) -> f64 {
        match self.archs.get(&entry.name) {
            Some(a) if req.scored_prompt => {
                let positions = req.text_tokens_for(&entry.name).saturating_sub(1) as f64;
                2.0 * positions * a.lm.hidden_size as f64 * a.lm.vocab_size as f64
            }
            _ => 0.0,
        }
    }

    /// Prices one configuration with nothing cached.
    pub fn cost(
        &self,
        entry: &ModelEntry,
        frames: u32,
        tokens_per_frame: u32,
        req: &PlanRequest,
    ) -> f64 {
        self.scoring_cost(entry, req) + self.cost_unscored(entry, frames, tokens_per_frame, req)
    }

    fn cost_unscored(
        &self,
        entry: &ModelEntry,
        frames: u32,
        tokens_per_frame: u32,
        req: &PlanRequest,
    ) -> f64 {
        match (self.cost_mode, self.archs.get(&entry.name)) {
            (CostMode::Exact, Some(arch)) => arch
                .flops(&Workload {
                    frames: frames as usize,
                    tokens_per_frame: tokens_per_frame as usize,
                    text_tokens: req.text_tokens_for(&entry.name),
                    decode_steps: req.expected_decode_tokens.saturating_sub(1),
                })
                .total(),
            // The paper's formula prices visual tokens only; text alone is 2 N per token.
            _ if frames == 0 => {
                2.0 * entry.lm_params
                    * (req.text_tokens_for(&entry.name) + req.expected_decode_tokens) as f64
            }
            _ => self
                .paper_cost
                .flops(entry.lm_params, frames as f64, tokens_per_frame as f64),
        }
    }

    /// FLOPs of one configuration by component: the exact analytic count of the architecture
    /// (exact cost mode), or the paper's formula split into vision and LM prefill. Sums to
    /// [`Self::cost`] (up to rounding).
    pub fn cost_breakdown(
        &self,
        entry: &ModelEntry,
        frames: u32,
        tokens_per_frame: u32,
        req: &PlanRequest,
    ) -> FlopBreakdown {
        let mut b = self.breakdown_unscored(entry, frames, tokens_per_frame, req);
        b.lm_prefill += self.scoring_cost(entry, req);
        b
    }

    fn breakdown_unscored(
        &self,
        entry: &ModelEntry,
        frames: u32,
        tokens_per_frame: u32,
        req: &PlanRequest,
    ) -> FlopBreakdown {
        match (self.cost_mode, self.archs.get(&entry.name)) {
            (CostMode::Exact, Some(arch)) => arch.flops(&Workload {
                frames: frames as usize,
                tokens_per_frame: tokens_per_frame as usize,
                text_tokens: req.text_tokens_for(&entry.name),
                decode_steps: req.expected_decode_tokens.saturating_sub(1),
            }),
            _ if frames == 0 => FlopBreakdown {
                lm_prefill: 2.0 * entry.lm_params * req.text_tokens_for(&entry.name) as f64,
                lm_decode: 2.0 * entry.lm_params * req.expected_decode_tokens as f64,
                ..Default::default()
            },
            _ => {
                let (vision, lm_prefill) =
                    self.paper_cost
                        .split(entry.lm_params, frames as f64, tokens_per_frame as f64);
                FlopBreakdown {
                    vision,
                    lm_prefill,
                    ..Default::default()
                }
            }
        }
    }

    /// Plans one request.
    pub fn plan(&self, req: &PlanRequest) -> Result<Plan, PlanError> {
        if !(req.budget_flops.is_finite() && req.budget_flops > 0.0) {
            return Err(PlanError::InvalidPin(format!(
                "budget must be positive, got {}",
                req.budget_flops
            )));
        }
        let (mut feasible, considered, min_cost) = self.search(req, req.budget_flops)?;
        if feasible.is_empty() {
            return Err(PlanError::BudgetTooSmall {
                budget: req.budget_flops,
                min_budget: min_cost,
            });
        }
        feasible.sort_by(|a, b| {
            a.predicted_error
                .total_cmp(&b.predicted_error)
                .then(a.cost_flops.total_cmp(&b.cost_flops))
        });
        let runners_up = feasible.iter().skip(1).take(5).cloned().collect();
        Ok(Plan {
            choice: feasible.swap_remove(0),
            budget_flops: req.budget_flops,
            cost_mode: self.cost_mode,
            task: req.task.clone(),
            runners_up,
            considered,
        })
    }

    /// Every configuration the request allows (pins and context respected), priced and scored
    /// whatever its cost: the budget is ignored. In the registry's order, then frames, then side.
    /// What a frontier plot draws: [`Self::plan`] picks the lowest predicted error among those
    /// whose cost fits the budget.
    pub fn candidates(&self, req: &PlanRequest) -> Result<Vec<Candidate>, PlanError> {
        Ok(self.search(req, f64::INFINITY)?.0)
    }

    /// The candidates costing at most `budget`, how many were considered after pins, and the
    /// cheapest cost of any that fits the context.
    fn search(
        &self,
        req: &PlanRequest,
        budget: f64,
    ) -> Result<(Vec<Candidate>, usize, f64), PlanError> {
        let scaling = self
            .tasks
            .get(&req.task)
            .ok_or_else(|| PlanError::UnknownTask(req.task.clone()))?;
        if let Some(m) = &req.pins.model {
            if !self.registry.models.iter().any(|e| &e.name == m) {
                return Err(PlanError::UnknownModel(m.clone()));
            }
        }
        let side_pin = match req.pins.tokens_per_frame {
            Some(v) => {
                let s = (v as f64).sqrt().round() as u32;
                if v == 0 || s * s != v {
                    return Err(PlanError::InvalidPin(format!(
                        "tokens_per_frame must be a perfect square s*s, got {v}"
                    )));
                }
                Some(s)
            }
            None => None,
        };
        if req.text_only && (req.pins.frames.is_some() || req.pins.tokens_per_frame.is_some()) {
            return Err(PlanError::InvalidPin(
                "frames and tokens_per_frame apply to requests with a video or images".into(),
            ));
        }
        let mut feasible: Vec<Candidate> = vec![];
        let mut min_cost = f64::INFINITY;
        let mut considered = 0;
        // The shortest request any candidate makes, against the longest context it may use.
        let (mut min_needed, mut max_context, mut fits_some) = (usize::MAX, 0usize, false);
        for entry in &self.registry.models {
            if req.pins.model.as_ref().is_some_and(|m| m != &entry.name) {
                continue;
            }
            if req.text_only {
                considered += 1;
                if let Some(&ctx) = self.contexts.get(&entry.name) {
                    let needed = self.tokens_needed(entry, 0, 0, req);
                    min_needed = min_needed.min(needed);
                    max_context = max_context.max(ctx);
                    if needed > ctx {
                        continue;
                    }
                }
                fits_some = true;
                let (cost, cold) = self.marginal_text_cost(entry, req);
                min_cost = min_cost.min(cost);
                if cost > budget {
                    continue;
                }
                let err = scaling.predict(&Config {
                    lm_params_b: entry.lm_params / 1e9,
                    frames: 1.0,
                    tokens_per_frame: 1.0,
                    data_size_m: self.data_size_m,
                });
                feasible.push(Candidate {
                    model: entry.name.clone(),
                    lm_params: entry.lm_params,
                    frames: 0,
                    tokens_per_frame: 0,
                    side: 0,
                    predicted_error: err,
                    predicted_score: 100.0 - err,
                    cost_flops: cost,
                    cold_cost_flops: cold,
                });
                continue;
            }
            if let Some(f) = req.pins.frames {
                if f < entry.min_frames || f > entry.max_frames {
                    return Err(PlanError::InvalidPin(format!(
                        "frames {f} is outside {}..={} for model {}",
                        entry.min_frames, entry.max_frames, entry.name
                    )));
                }
            }
            if let Some(s) = side_pin {
                if s > entry.max_side {
                    return Err(PlanError::InvalidPin(format!(
                        "tokens_per_frame {} exceeds {} for model {}",
                        s * s,
                        entry.max_side * entry.max_side,
                        entry.name
                    )));
                }
            }
            let frames: Vec<u32> = match req.pins.frames {
                Some(f) => vec![f],
                None => (entry.min_frames..=entry.max_frames).collect(),
            };
            let sides: Vec<u32> = match side_pin {
                Some(s) => vec![s],
                None => (1..=entry.max_side).collect(),
            };
            for &t in &frames {
                for &s in &sides {
                    considered += 1;
                    let v = s * s;
                    if let Some(&ctx) = self.contexts.get(&entry.name) {
                        let needed = self.tokens_needed(entry, t, v, req);
                        min_needed = min_needed.min(needed);
                        max_context = max_context.max(ctx);
                        if needed > ctx {
                            continue;
                        }
                    }
                    fits_some = true;
                    let (cost, cold) = self.marginal_cost(entry, t, v, req);
                    min_cost = min_cost.min(cost);
                    if cost > budget {
                        continue;
                    }
                    let err = scaling.predict(&Config {
                        lm_params_b: entry.lm_params / 1e9,
                        frames: t as f64,
                        tokens_per_frame: v as f64,
                        data_size_m: self.data_size_m,
                    });
                    feasible.push(Candidate {
                        model: entry.name.clone(),
                        lm_params: entry.lm_params,
                        frames: t,
                        tokens_per_frame: v,
                        side: s,
                        predicted_error: err,
                        predicted_score: 100.0 - err,
                        cost_flops: cost,
                        cold_cost_flops: cold,
                    });
                }
            }
        }
        if !fits_some && considered > 0 {
            return Err(PlanError::ContextTooLong {
                needed: min_needed,
                limit: max_context,
            });
        }
        Ok((feasible, considered, min_cost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vvlm_scaling::{Factor, Form};

    fn scaling() -> Arc<FittedModel> {
        // Error falls with N, T and V; V saturates.
        let p: Vec<(String, f64)> = [
            ("alpha_N", 20.0),
            ("a_N", 0.5),
            ("alpha_T", 20.0),
            ("a_T", 0.5),
            ("alpha_V", 20.0),
            ("a_V", 0.5),
            ("eps", 10.0),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        Arc::new(
            FittedModel::from_params(Form::Add, &[Factor::N, Factor::T, Factor::V], &p).unwrap(),
        )
    }

    fn planner() -> Planner {
        let reg = Registry {
            models: vec![
                ModelEntry::synthetic("small", 1e9, 1, 32, 27),
                ModelEntry::synthetic("large", 7.5e9, 1, 32, 27),
            ],
        };
        let mut tasks = BTreeMap::new();
        tasks.insert("caption".into(), scaling());
        Planner::new(reg, tasks).unwrap()
    }

    fn req(budget: f64) -> PlanRequest {
        PlanRequest {
            budget_flops: budget,
            task: "caption".into(),
            text_tokens: 20,
            text_tokens_by_model: BTreeMap::new(),
            text_only: false,
            cached_vision: vec![],
            cached_text_tokens_by_model: BTreeMap::new(),
            expected_decode_tokens: 32,
            scored_prompt: false,
            pins: Pins::default(),
        }
    }

    /// Brute force over the same grid.
    fn brute(p: &Planner, r: &PlanRequest) -> (f64, f64) {
        let m = scaling();
        let mut best = (f64::INFINITY, f64::INFINITY);
        for e in &p.registry().models {
            for t in 1..=32u32 {
                for s in 1..=27u32 {
                    let c = p.cost(e, t, s * s, r);
                    if c > r.budget_flops {
                        continue;
                    }
                    let err = m.predict(&Config {
                        lm_params_b: e.lm_params / 1e9,
                        frames: t as f64,
                        tokens_per_frame: (s * s) as f64,
                        data_size_m: 2.0,
                    });
                    if err < best.0 || (err == best.0 && c < best.1) {
                        best = (err, c);
                    }
                }
            }
        }
        best
    }

    #[test]
    fn picks_the_lowest_predicted_error_within_budget() {
        let p = planner();
        for b in [2e12, 5e12, 15e12, 30e12] {
            let plan = p.plan(&req(b)).unwrap();
            assert!(plan.choice.cost_flops <= b);
            let (err, cost) = brute(&p, &req(b));
            assert_eq!(plan.choice.predicted_error, err);
            assert_eq!(plan.choice.cost_flops, cost);
            assert!(plan
                .runners_up
                .iter()
                .all(|c| c.predicted_error >= plan.choice.predicted_error));
            assert_eq!(plan.considered, 2 * 32 * 27);
        }
        // More budget never predicts worse.
        let a = p.plan(&req(5e12)).unwrap().choice.predicted_error;
        let b = p.plan(&req(30e12)).unwrap().choice.predicted_error;
        assert!(b <= a);
    }

    #[test]
    fn candidates_are_the_whole_grid_and_the_plan_is_their_best_within_budget() {
        let p = planner();
        let all = p.candidates(&req(1.0)).unwrap();
        assert_eq!(all.len(), 2 * 32 * 27);
        for b in [2e12, 15e12] {
            let plan = p.plan(&req(b)).unwrap();
            let best = all
                .iter()
                .filter(|c| c.cost_flops <= b)
                .min_by(|x, y| {
                    x.predicted_error
                        .total_cmp(&y.predicted_error)
                        .then(x.cost_flops.total_cmp(&y.cost_flops))
                })
                .unwrap();
            assert_eq!(&plan.choice, best);
        }
        let mut r = req(1.0);
        r.pins.model = Some("large".into());
        assert!(p.candidates(&r).unwrap().iter().all(|c| c.model == "large"));
        // The breakdown adds up to the price.
        let e = &p.registry().models[1];
        let parts = p.cost_breakdown(e, 8, 49, &req(1.0));
        let total = p.cost(e, 8, 49, &req(1.0));
        assert!(
            (parts.total() - total).abs() <= 1e-9 * total,
            "{parts:?} {total}"
        );
        assert!(parts.vision > 0.0 && parts.lm_prefill > 0.0);
    }

    #[test]
    fn pins_restrict_the_search_and_the_budget_still_applies() {
        let p = planner();
        let mut r = req(30e12);
        r.pins.model = Some("small".into());
        r.pins.frames = Some(8);
        let plan = p.plan(&r).unwrap();
        assert_eq!(
            (plan.choice.model.as_str(), plan.choice.frames),
            ("small", 8)
        );
        assert_eq!(plan.considered, 27);
        r.pins.tokens_per_frame = Some(196);
        assert_eq!(p.plan(&r).unwrap().choice.side, 14);
        r.pins.tokens_per_frame = Some(200);
        assert!(matches!(p.plan(&r), Err(PlanError::InvalidPin(_))));
        r.pins.tokens_per_frame = None;
        r.pins.model = Some("nope".into());
        assert!(matches!(p.plan(&r), Err(PlanError::UnknownModel(_))));
        // A pinned configuration over budget is refused, naming the smallest workable budget.
        let mut r = req(1e12);
        r.pins.model = Some("large".into());
        r.pins.frames = Some(32);
        r.pins.tokens_per_frame = Some(729);
        match p.plan(&r) {
            Err(PlanError::BudgetTooSmall { min_budget, .. }) => {
                let want = PaperCost::default().flops(7.5e9, 32.0, 729.0);
                assert!((min_budget - want).abs() < 1.0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tiny_budgets_name_the_smallest_that_works() {
        let p = planner();
        match p.plan(&req(1e9)) {
            Err(PlanError::BudgetTooSmall { min_budget, .. }) => {
                assert_eq!(min_budget, PaperCost::default().flops(1e9, 1.0, 1.0));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p.plan(&PlanRequest {
                task: "x".into(),
                ..req(1e13)
            }),
            Err(PlanError::UnknownTask(_))
        ));
        assert!(p.plan(&req(f64::NAN)).is_err());
    }

    #[test]
    fn configurations_over_the_context_length_are_not_candidates() {
        let mut p = planner();
        // 1000 tokens of context: 20 text + 32 decode leave 948 visual tokens.
        p.set_context("small", 1000);
        p.set_context("large", 1000);
        let plan = p.plan(&req(1e15)).unwrap();
        let c = &plan.choice;
        assert!(c.frames * c.tokens_per_frame + 20 + 32 <= 1000, "{c:?}");
        assert!(plan
            .runners_up
            .iter()
            .all(|c| c.frames * c.tokens_per_frame <= 948));
        // Nothing fits: a prompt of 2000 tokens.
        let mut r = req(1e15);
        r.text_tokens = 2000;
        match p.plan(&r) {
            Err(PlanError::ContextTooLong { needed, limit }) => {
                assert_eq!((needed, limit), (2000 + 1 + 32, 1000));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exact_mode_prices_text_and_decode_by_hand() {
        // A tiny architecture priced by hand from its matrix shapes (2 FLOPs per multiply-add):
        // vision (image 4, patch 2, 1 channel, hidden 2, MLP 4, 1 layer): 4 patches;
        //   patch embedding 2*4*(1*2*2)*2 = 64; q,k,v,o 2*4*2*2*4 = 128; scores and AV
        //   2*4*4*2*2 = 128; MLP 2*4*2*4*2 = 128: 448 per frame, x2 frames = 896.
        // projector (2 -> 3 -> 2) on every patch: 2*(2*3 + 3*2) = 24 per patch, x4 x2 = 192.
        // LM (hidden 2, MLP 3, 1 layer, 1 head of 2, 1 KV head, vocab 5): linear per token
        //   2*(2*2 + 2*2*2 + 2*2 + 3*2*3) = 68; causal attention 2*2*2 = 8 per visible
        //   (query, key) pair; head 2*2*5 = 20.
        //   prefill of 3 text + 2 frames x 1 token + 1 newline = 6, 6*7/2 = 21 pairs:
        //   6*68 + 8*21 + 20 = 596.
        //   decode: 3 expected tokens = 2 steps after prefill, at kv 7 and 8:
        //   (68 + 56 + 20) + (68 + 64 + 20) = 296.
        // Total 896 + 192 + 596 + 296 = 1980.
        let mut p = planner();
        let arch = ArchSpec {
            vision: vvlm_cost::VisionSpec {
                image_size: 4,
                patch_size: 2,
                num_channels: 1,
                hidden_size: 2,
                intermediate_size: 4,
                num_attention_heads: 1,
                layers_run: 1,
            },
            projector: vvlm_cost::ProjectorSpec {
                in_features: 2,
                hidden: 3,
                out_features: 2,
            },
            lm: vvlm_cost::LmSpec {
                hidden_size: 2,
                intermediate_size: 3,
                num_hidden_layers: 1,
                num_attention_heads: 1,
                num_key_value_heads: 1,
                head_dim: 2,
                vocab_size: 5,
            },
            video_newline: true,
        };
        p.set_arch("small", arch);
        p.cost_mode = CostMode::Exact;
        let mut r = req(15e12);
        r.expected_decode_tokens = 3;
        // The prompt is 3 tokens under small's tokenizer (20 under the others').
        r.text_tokens_by_model.insert("small".into(), 3);
        r.pins = Pins {
            model: Some("small".into()),
            frames: Some(2),
            tokens_per_frame: Some(1),
        };
        let plan = p.plan(&r).unwrap();
        assert_eq!(plan.choice.cost_flops, 1980.0);
        assert_eq!(plan.cost_mode, CostMode::Exact);
        assert_eq!(p.tokens_needed(&p.registry().models[0], 2, 1, &r), 6 + 3);
        // The prompt's log-probabilities: the head over 2 of its 3 positions, 2*2*2*5 = 40 more
        // prefill FLOPs, in the total and in the breakdown.
        r.scored_prompt = true;
        let scored = p.plan(&r).unwrap();
        assert_eq!(scored.choice.cost_flops, 2020.0);
        // The video's frames encoded and its KV at side 1 cached: the tower and projector
        // (896 + 192) and the visual positions' prefill (3 of them: 3*68 + 8*6 = 252, no head)
        // are saved: 1980 + 40 - 1088 - 252 = 680.
        r.cached_vision.push(CachedVision {
            model: "small".into(),
            frames: 2,
            prefilled_side: Some(1),
            prefix_tokens: None,
        });
        let warm = p.plan(&r).unwrap().choice;
        assert_eq!((warm.cost_flops, warm.cold_cost_flops), (680.0, 2020.0));
        // The cache says how many positions its prefix holds (2 text tokens before the video
        // and the 3 visual ones): 5*68 + 8*15 = 460 saved, exactly what the engine skips.
        r.cached_vision[0].prefix_tokens = Some(5);
        let warm = p.plan(&r).unwrap().choice;
        assert_eq!(warm.cost_flops, 2020.0 - 1088.0 - 460.0);
        // Never more than the prompt holds (6 positions: all of it, the head still runs).
        r.cached_vision[0].prefix_tokens = Some(60);
        let warm = p.plan(&r).unwrap().choice;
        assert_eq!(warm.cost_flops, 2020.0 - 1088.0 - (6.0 * 68.0 + 8.0 * 21.0));
        r.cached_vision.clear();
        let e = &p.registry().models[0];
        assert_eq!(p.cost_breakdown(e, 2, 1, &r).lm_prefill, 596.0 + 40.0);
        // Theoretical mode prices text at 2 N per token (3 prompt + 3 decode), the head apart.
        p.cost_mode = CostMode::Theoretical;
        r.text_only = true;
        r.pins.frames = None;
        r.pins.tokens_per_frame = None;
        assert_eq!(
            p.plan(&r).unwrap().choice.cost_flops,
            2.0 * 1e9 * 6.0 + 40.0
        );
        // Text alone, exact: prefill of 3, 3*68 + 8*6 + 20 = 272; decode at kv 4 and 5,
        // (68 + 32 + 20) + (68 + 40 + 20) = 248: cold 520. With the first 2 positions' KV
        // cached, what runs is 1 position after them, 68 + 8*3 + 20 = 112, and the decode:
        // 360 (the head still runs on the prompt's last position: not 340).
        p.cost_mode = CostMode::Exact;
        r.scored_prompt = false;
        r.cached_text_tokens_by_model.insert("small".into(), 2);
        let warm = p.plan(&r).unwrap().choice;
        assert_eq!((warm.cost_flops, warm.cold_cost_flops), (360.0, 520.0));
    }

    #[test]
    fn text_only_requests_plan_the_model_on_text_cost() {
        let p = planner();
        let mut r = req(5e11);
        r.text_only = true;
        // Theoretical mode prices text at 2 N per token: 20 prompt + 32 decode.
        // small: 2 * 1e9 * 52 = 1.04e11 fits; large: 2 * 7.5e9 * 52 = 7.8e11 does not.
        let plan = p.plan(&r).unwrap();
        assert_eq!(
            (plan.choice.model.as_str(), plan.choice.frames),
            ("small", 0)
        );
        assert_eq!(plan.choice.cost_flops, 1.04e11);
        assert_eq!(plan.considered, 2);
        // With room for both, the law prefers the larger LM.
        r.budget_flops = 1e12;
        let plan = p.plan(&r).unwrap();
        assert_eq!(plan.choice.model, "large");
        assert_eq!(plan.choice.cost_flops, 7.8e11);
        r.budget_flops = 1e10;
        match p.plan(&r) {
            Err(PlanError::BudgetTooSmall { min_budget, .. }) => assert_eq!(min_budget, 1.04e11),
            other => panic!("{other:?}"),
        }
        r.budget_flops = 1e12;
        r.pins.frames = Some(4);
        assert!(matches!(p.plan(&r), Err(PlanError::InvalidPin(_))));
    }

    #[test]
    fn cached_vision_is_priced_at_its_marginal_cost() {
        let p = planner();
        // Theoretical mode: the vision part of T frames is 2 T x_M x_W = 2 T 0.43e9 768.
        let mut r = req(3e12);
        r.pins = Pins {
            model: Some("large".into()),
            frames: Some(4),
            tokens_per_frame: Some(25),
        };
        // Cold: 2 * 4 * (0.43e9 * 768 + 7.5e9 * 25) = 4.14192e12, over the 3e12 budget.
        assert!(matches!(p.plan(&r), Err(PlanError::BudgetTooSmall { .. })));
        r.cached_vision.push(CachedVision {
            model: "large".into(),
            frames: 4,
            prefilled_side: None,
            prefix_tokens: None,
        });
        let warm = p.plan(&r).unwrap().choice;
        // Marginal: 2 * 4 * 7.5e9 * 25 = 1.5e12, which fits.
        assert!(
            (warm.cost_flops - 1.5e12).abs() < 1.0,
            "{}",
            warm.cost_flops
        );
        assert!(
            (warm.cold_cost_flops - 4.14192e12).abs() < 1e3,
            "{}",
            warm.cold_cost_flops
        );
        // Unpinned, a cached video lets the planner afford what it could not cold.
        let mut free = req(2e12);
        let cold_plan = p.plan(&free).unwrap().choice;
        assert_eq!(cold_plan.cost_flops, cold_plan.cold_cost_flops);
        free.cached_vision = (1..=32)
            .flat_map(|t| {
                ["small", "large"].map(|m| CachedVision {
                    model: m.into(),
                    frames: t,
                    prefilled_side: None,
                    prefix_tokens: None,
                })
            })
            .collect();
        let warm_plan = p.plan(&free).unwrap().choice;
        assert!(warm_plan.predicted_error < cold_plan.predicted_error);
        assert!(warm_plan.cold_cost_flops > 2e12);
    }

    #[test]
    fn a_cached_prefix_leaves_only_the_question_and_the_answer_to_price() {
        let p = planner();
        let mut r = req(3e12);
        r.pins = Pins {
            model: Some("large".into()),
            frames: Some(4),
            tokens_per_frame: Some(25),
        };
        r.text_tokens = 40;
        r.expected_decode_tokens = 10;
        // The prefix KV at side 5 (25 tokens per frame) is cached: by the paper's formula,
        // what remains is 2 N (text + decode) = 2 * 7.5e9 * 50 = 7.5e11.
        r.cached_vision.push(CachedVision {
            model: "large".into(),
            frames: 4,
            prefilled_side: Some(5),
            prefix_tokens: None,
        });
        let c = p.plan(&r).unwrap().choice;
        assert!((c.cost_flops - 7.5e11).abs() < 1.0, "{}", c.cost_flops);
        assert!((c.cold_cost_flops - 4.14192e12).abs() < 1e3);
        // A prefix at another side saves only the vision part: 2 * 4 * 7.5e9 * 25 = 1.5e12.
        r.cached_vision[0].prefilled_side = Some(4);
        let c = p.plan(&r).unwrap().choice;
        assert!((c.cost_flops - 1.5e12).abs() < 1.0, "{}", c.cost_flops);
    }

    #[test]
    fn a_cached_system_prompt_is_priced_at_its_marginal_cost() {
        let p = planner();
        let mut r = req(5e11);
        r.text_only = true;
        r.text_tokens = 120;
        // Theoretical mode: 2 N (120 + 32); large: 2 * 7.5e9 * 152 = 2.28e12, over the budget.
        assert_eq!(p.plan(&r).unwrap().choice.model, "small");
        // 100 of large's prompt tokens cached: 2 * 7.5e9 * (20 + 32) = 7.8e11, still over;
        // then at a 1e12 budget large fits only warm.
        r.cached_text_tokens_by_model.insert("large".into(), 100);
        r.budget_flops = 1e12;
        let c = p.plan(&r).unwrap().choice;
        assert_eq!(c.model, "large");
        assert_eq!((c.cost_flops, c.cold_cost_flops), (7.8e11, 2.28e12));
        // More cached than the prompt has (another template): at most the prompt.
        r.cached_text_tokens_by_model.insert("large".into(), 1000);
        let c = p.plan(&r).unwrap().choice;
        assert_eq!(c.cost_flops, 2.0 * 7.5e9 * 32.0);
    }
}
