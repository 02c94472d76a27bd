//! Parametric models of video-VLM error as a function of LM size `N`, frames `T`, visual tokens
//! per frame `V` and finetuning data size `n`.
//!
//! Owns: the paper's four forms ([`form`]), fitting by L-BFGS with restarts and bagging
//! ([`fit`]), validation ([`validate`]), the fitted-model file ([`model`]) and the compute-optimal
//! frontier with its elasticity ([`frontier`]). Inference cost enters only as a function the
//! caller passes in: this crate must not know about FLOP formulas, checkpoints or the engine.

pub mod data;
pub mod fit;
pub mod form;
pub mod frontier;
pub mod lbfgs;
pub mod model;
pub mod validate;

pub use data::{Dataset, Observation};
pub use fit::{fit, FitOptions, Loss};
pub use form::{Factor, Form, Structure};
pub use frontier::{
    elasticity, frontier, CandidateSet, Elasticity, ElasticityOptions, FrontierPoint,
};
pub use model::{Config, FittedModel};
pub use validate::{cross_validate, evaluate, Metrics};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ScalingError {
    #[error("data: {0}")]
    Data(String),
    #[error("model: {0}")]
    Model(String),
}
