//! A fitted model as a file: form, factors and units, the base models' parameters (one per
//! bootstrap resample, aggregated by the median of their predictions), metrics and provenance.

use crate::fit::Loss;
use crate::form::{Factor, Form, Structure};
use crate::validate::Metrics;
use crate::ScalingError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// How the model was obtained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FitInfo {
    pub source: String,
    pub observations: usize,
    pub restarts: usize,
    pub bootstrap: usize,
    pub seed: u64,
    pub loss: Loss,
}

/// Metrics recorded with a model.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModelMetrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cv: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holdout: Option<Metrics>,
}

/// The file format of a fitted scaling model (`configs/scaling/*.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FittedModel {
    pub form: Form,
    pub factors: Vec<Factor>,
    /// Unit of each factor, by factor name.
    pub units: BTreeMap<String, String>,
    /// Readable parameters (coefficients exponentiated); the median over base models.
    pub params: BTreeMap<String, f64>,
    /// Each base model's readable parameters, in the structure's order.
    pub base_models: Vec<BTreeMap<String, f64>>,
    /// `median` (predictions of base models are aggregated by their median).
    pub aggregation: String,
    #[serde(default)]
    pub metrics: ModelMetrics,
    pub fit: Option<FitInfo>,
    /// Free text: where the parameters come from.
    #[serde(default)]
    pub provenance: String,
    #[serde(skip)]
    compiled: Option<Compiled>,
}

#[derive(Debug, Clone)]
struct Compiled {
    structure: Structure,
    thetas: Vec<Vec<f64>>,
}

impl FittedModel {
    pub fn new(s: &Structure, thetas: Vec<Vec<f64>>, info: FitInfo) -> Self {
        let base_models: Vec<BTreeMap<String, f64>> = thetas
            .iter()
            .map(|t| s.readable(t).into_iter().collect())
            .collect();
        let params = median_params(s, &thetas);
        Self {
            form: s.form,
            factors: s.factors.clone(),
            units: s
                .factors
                .iter()
                .map(|f| (f.name().to_string(), f.unit().to_string()))
                .collect(),
            params,
            base_models,
            aggregation: "median".into(),
            metrics: ModelMetrics::default(),
            fit: Some(info),
            provenance: String::new(),
            compiled: Some(Compiled {
                structure: s.clone(),
                thetas,
            }),
        }
    }

    /// A single (unbagged) model from readable parameters.
    pub fn from_params(
        form: Form,
        factors: &[Factor],
        params: &[(String, f64)],
    ) -> Result<Self, ScalingError> {
        let s = Structure::new(form, factors).map_err(ScalingError::Model)?;
        let theta = s.from_readable(params).map_err(ScalingError::Model)?;
        let mut m = Self::new(
            &s,
            vec![theta],
            FitInfo {
                source: "given parameters".into(),
                observations: 0,
                restarts: 0,
                bootstrap: 0,
                seed: 0,
                loss: Loss::Mse,
            },
        );
        m.fit = None;
        Ok(m)
    }

    pub fn load(path: &Path) -> Result<Self, ScalingError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScalingError::Model(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| ScalingError::Model(format!("{}: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> Result<Self, ScalingError> {
        let mut m: FittedModel =
            serde_json::from_str(text).map_err(|e| ScalingError::Model(e.to_string()))?;
        m.compile()?;
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a model serialises")
    }

    pub fn save(&self, path: &Path) -> Result<(), ScalingError> {
        std::fs::write(path, self.to_json() + "\n")
            .map_err(|e| ScalingError::Model(format!("cannot write {}: {e}", path.display())))
    }

    fn compile(&mut self) -> Result<(), ScalingError> {
        let s = Structure::new(self.form, &self.factors).map_err(ScalingError::Model)?;
        let bases = if self.base_models.is_empty() {
            vec![self.params.clone()]
        } else {
            self.base_models.clone()
        };
        let thetas = bases
            .iter()
            .map(|b| {
                let named: Vec<(String, f64)> = b.iter().map(|(k, v)| (k.clone(), *v)).collect();
                s.from_readable(&named).map_err(ScalingError::Model)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.compiled = Some(Compiled {
            structure: s,
            thetas,
        });
        Ok(())
    }

    fn compiled(&self) -> &Compiled {
        self.compiled
            .as_ref()
            .expect("models are compiled on construction")
    }

    pub fn structure(&self) -> &Structure {
        &self.compiled().structure
    }

    pub fn base_thetas(&self) -> &[Vec<f64>] {
        &self.compiled().thetas
    }

    pub fn has_factor(&self, f: Factor) -> bool {
        self.factors.contains(&f)
    }

    /// Predicted error at a row of factor values in the model's factor order.
    pub fn predict_row(&self, x: &[f64]) -> f64 {
        let c = self.compiled();
        let lx: Vec<f64> = x.iter().map(|v| v.ln()).collect();
        let mut preds: Vec<f64> = c
            .thetas
            .iter()
            .map(|t| c.structure.log_predict(t, &lx).exp())
            .collect();
        median(&mut preds)
    }

    /// Predicted error for a configuration; factors the model lacks are ignored.
    pub fn predict(&self, x: &Config) -> f64 {
        let row: Vec<f64> = self
            .factors
            .iter()
            .map(|f| match f {
                Factor::N => x.lm_params_b,
                Factor::T => x.frames,
                Factor::V => x.tokens_per_frame,
                Factor::Data => x.data_size_m,
            })
            .collect();
        self.predict_row(&row)
    }

    /// Predicted score `100 - error`.
    pub fn predict_score(&self, x: &Config) -> f64 {
        100.0 - self.predict(x)
    }
}

/// A configuration in the model's natural units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub lm_params_b: f64,
    pub frames: f64,
    pub tokens_per_frame: f64,
    pub data_size_m: f64,
}

fn median_params(s: &Structure, thetas: &[Vec<f64>]) -> BTreeMap<String, f64> {
    let readable: Vec<Vec<(String, f64)>> = thetas.iter().map(|t| s.readable(t)).collect();
    (0..s.n_params())
        .map(|i| {
            let mut v: Vec<f64> = readable.iter().map(|r| r[i].1).collect();
            (s.names[i].clone(), median(&mut v))
        })
        .collect()
}

/// Median (mean of the middle two for even lengths).
pub fn median(v: &mut [f64]) -> f64 {
    assert!(!v.is_empty());
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switched_off_term_loads_and_adds_nothing() {
        // A fit can drive a log-coefficient so low that exp() underflows to 0 when written.
        let p = |alpha: f64| -> Vec<(String, f64)> {
            vec![
                ("alpha_T".into(), alpha),
                ("a_T".into(), 0.5),
                ("eps".into(), 5.0),
            ]
        };
        let m = FittedModel::from_params(Form::Add, &[Factor::T], &p(0.0)).unwrap();
        let back = FittedModel::from_json(&m.to_json()).unwrap();
        let x = Config {
            lm_params_b: 1.0,
            frames: 8.0,
            tokens_per_frame: 16.0,
            data_size_m: 1.0,
        };
        assert!(
            (back.predict(&x) - 5.0).abs() < 1e-12,
            "{}",
            back.predict(&x)
        );
        assert!(FittedModel::from_params(Form::Add, &[Factor::T], &p(-1.0)).is_err());
        assert!(FittedModel::from_params(Form::Add, &[Factor::T], &p(f64::NAN)).is_err());
    }

    #[test]
    fn round_trips_through_json_and_predicts_median() {
        let s = Structure::new(Form::Add, &[Factor::N]).unwrap();
        let thetas = vec![
            vec![0.0, 0.5, 1.0f64.ln()],
            vec![1.0, 0.5, 1.0f64.ln()],
            vec![2.0, 0.5, 1.0f64.ln()],
        ];
        let m = FittedModel::new(
            &s,
            thetas,
            FitInfo {
                source: "x".into(),
                observations: 3,
                restarts: 1,
                bootstrap: 3,
                seed: 1,
                loss: Loss::Mse,
            },
        );
        // base predictions at N=1: e^0+1, e^1+1, e^2+1 -> median e+1
        let p = m.predict_row(&[1.0]);
        assert!((p - (std::f64::consts::E + 1.0)).abs() < 1e-12);
        let back = FittedModel::from_json(&m.to_json()).unwrap();
        assert!((back.predict_row(&[1.0]) - p).abs() < 1e-12);
        assert!((back.params["alpha_N"] - std::f64::consts::E).abs() < 1e-12);
        assert!(FittedModel::from_json("{\"form\": \"nope\"}").is_err());
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
