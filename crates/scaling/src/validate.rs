//! Validation: metrics on the error scale, k-fold cross-validation and train-on-one-set /
//! evaluate-on-another (the paper's star -> isoFLOP extrapolation).
//!
//! Metrics are computed on the modelled error `f = 100 - score`, in score points:
//! `mse = mean (f_hat - f)^2`, `e_pct = 100 * mean |f_hat - f| / f`, `r2 = 1 - SS_res / SS_tot`.

use crate::data::Dataset;
use crate::fit::{fit, FitOptions, SplitMix};
use crate::form::Form;
use crate::model::FittedModel;
use crate::ScalingError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub mse: f64,
    pub e_pct: f64,
    pub r2: f64,
    pub n: usize,
}

/// Metrics of predictions against observed errors.
pub fn metrics(predicted: &[f64], observed: &[f64]) -> Metrics {
    assert_eq!(predicted.len(), observed.len());
    let n = observed.len();
    let m = n as f64;
    let mean = observed.iter().sum::<f64>() / m;
    let mut ss_res = 0.0;
    let mut ss_tot = 0.0;
    let mut rel = 0.0;
    for (p, o) in predicted.iter().zip(observed) {
        ss_res += (p - o) * (p - o);
        ss_tot += (o - mean) * (o - mean);
        rel += (p - o).abs() / o.abs();
    }
    Metrics {
        mse: ss_res / m,
        e_pct: 100.0 * rel / m,
        r2: if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            f64::NAN
        },
        n,
    }
}

/// A model's metrics on a dataset (its factors must match the model's).
pub fn evaluate(model: &FittedModel, data: &Dataset) -> Metrics {
    let pred: Vec<f64> = data.rows.iter().map(|r| model.predict_row(&r.x)).collect();
    let obs: Vec<f64> = data.rows.iter().map(|r| r.error).collect();
    metrics(&pred, &obs)
}

/// Checks that two datasets carry the same factors.
pub fn same_factors(model: &FittedModel, data: &Dataset) -> Result<(), ScalingError> {
    if model.factors != data.factors {
        return Err(ScalingError::Data(format!(
            "{} has factors {:?}, the model was fitted on {:?}",
            data.source, data.factors, model.factors
        )));
    }
    Ok(())
}

/// The fold of each row for k-fold CV: a seeded shuffle cut into k near-equal folds.
pub fn fold_assignment(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix::from_parts(&[seed, 0xC0F0]);
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    let mut fold = vec![0; n];
    for (pos, &row) in order.iter().enumerate() {
        fold[row] = pos * k / n;
    }
    fold
}

/// k-fold cross-validation: out-of-fold predictions pooled into one set of metrics.
pub fn cross_validate(
    form: Form,
    data: &Dataset,
    k: usize,
    opt: &FitOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Metrics, ScalingError> {
    if k < 2 || k > data.len() {
        return Err(ScalingError::Data(format!(
            "k-fold needs 2 <= k <= {} observations, got k = {k}",
            data.len()
        )));
    }
    let fold = fold_assignment(data.len(), k, opt.seed);
    let mut pred = vec![0.0; data.len()];
    for f in 0..k {
        let train: Vec<usize> = (0..data.len()).filter(|&i| fold[i] != f).collect();
        let model = fit(form, &data.subset(&train), opt, progress)?;
        for i in (0..data.len()).filter(|&i| fold[i] == f) {
            pred[i] = model.predict_row(&data.rows[i].x);
        }
    }
    let obs: Vec<f64> = data.rows.iter().map(|r| r.error).collect();
    Ok(metrics(&pred, &obs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_metrics() {
        // observed 10, 20, 30; predicted 11, 18, 30
        // mse = (1 + 4 + 0)/3 = 5/3; e% = 100*(0.1 + 0.1 + 0)/3 = 6.667; mean 20, ss_tot = 200,
        // r2 = 1 - 5/200 = 0.975
        let m = metrics(&[11.0, 18.0, 30.0], &[10.0, 20.0, 30.0]);
        assert!((m.mse - 5.0 / 3.0).abs() < 1e-12);
        assert!((m.e_pct - 20.0 / 3.0).abs() < 1e-12);
        assert!((m.r2 - 0.975).abs() < 1e-12);
        assert_eq!(m.n, 3);
    }

    #[test]
    fn folds_partition_the_rows() {
        let f = fold_assignment(23, 5, 7);
        for k in 0..5 {
            let c = f.iter().filter(|&&x| x == k).count();
            assert!((4..=5).contains(&c), "fold {k} has {c}");
        }
        assert_eq!(f, fold_assignment(23, 5, 7));
        assert_ne!(f, fold_assignment(23, 5, 8));
    }
}
