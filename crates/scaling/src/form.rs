//! Parametric forms of the error `f = 100 - score`, written as log-sum-exp of log-linear terms.
//!
//! Every term is `exp(c + sum_j s_j * p_j * log x_j)` where `c` is a log-coefficient parameter
//! and `p_j` exponent parameters; the model is `f = sum_terms exp(...)`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The scaling factors a dataset may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Factor {
    /// Language-model parameters, billions.
    N,
    /// Frames per video.
    T,
    /// Visual tokens per frame.
    V,
    /// Finetuning data size, millions of examples.
    #[serde(rename = "n")]
    Data,
}

impl Factor {
    pub const MODEL_FACTORS: [Factor; 3] = [Factor::N, Factor::T, Factor::V];

    pub fn name(self) -> &'static str {
        match self {
            Factor::N => "N",
            Factor::T => "T",
            Factor::V => "V",
            Factor::Data => "n",
        }
    }

    /// The CSV column that carries this factor.
    pub fn column(self) -> &'static str {
        match self {
            Factor::N => "lm_params_b",
            Factor::T => "frames",
            Factor::V => "tokens_per_frame",
            Factor::Data => "data_size_m",
        }
    }

    /// The unit a fitted model stores the factor in.
    pub fn unit(self) -> &'static str {
        match self {
            Factor::N => "billions of LM parameters",
            Factor::T => "frames",
            Factor::V => "visual tokens per frame",
            Factor::Data => "millions of finetuning examples",
        }
    }
}

/// The four forms of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Form {
    #[serde(rename = "mult")]
    Mult,
    #[serde(rename = "add")]
    Add,
    #[serde(rename = "add-interact-s")]
    AddInteractS,
    #[serde(rename = "add-interact")]
    AddInteract,
}

impl Form {
    pub const ALL: [Form; 4] = [Form::Mult, Form::Add, Form::AddInteractS, Form::AddInteract];

    pub fn name(self) -> &'static str {
        match self {
            Form::Mult => "mult",
            Form::Add => "add",
            Form::AddInteractS => "add-interact-s",
            Form::AddInteract => "add-interact",
        }
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Form {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Form::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                format!("unknown form `{s}` (expected mult, add, add-interact-s or add-interact)")
            })
    }
}

/// Whether a parameter is a log-coefficient (reported as `exp(value)`) or an exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    LogCoefficient,
    Exponent,
}

/// One log-linear term.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    pub coef: usize,
    /// (factor slot in the data row, exponent parameter index, sign)
    pub exps: Vec<(usize, usize, f64)>,
}

/// A form instantiated over a concrete factor list: its parameters and terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Structure {
    pub form: Form,
    /// Factor order of a data row.
    pub factors: Vec<Factor>,
    pub names: Vec<String>,
    pub kinds: Vec<ParamKind>,
    pub terms: Vec<Term>,
}

impl Structure {
    /// Builds the terms of `form` over `factors` (any non-empty subset of N, T, V, plus
    /// optionally n). Without n the `n^-d` factors and the `xi` term drop out.
    pub fn new(form: Form, factors: &[Factor]) -> Result<Self, String> {
        let mut fs: Vec<Factor> = factors.to_vec();
        fs.sort();
        fs.dedup();
        let model: Vec<Factor> = fs.iter().copied().filter(|f| *f != Factor::Data).collect();
        if model.is_empty() {
            return Err("a scaling model needs at least one of N, T, V".into());
        }
        let data_slot = fs.iter().position(|f| *f == Factor::Data);
        let slot = |f: Factor| fs.iter().position(|g| *g == f).unwrap();
        let mut s = Structure {
            form,
            factors: fs.clone(),
            names: vec![],
            kinds: vec![],
            terms: vec![],
        };
        let param = |s: &mut Structure, name: String, kind: ParamKind| {
            s.names.push(name);
            s.kinds.push(kind);
            s.names.len() - 1
        };
        let d = data_slot.map(|_| param(&mut s, "d".into(), ParamKind::Exponent));
        match form {
            Form::Mult => {
                let c = param(&mut s, "alpha".into(), ParamKind::LogCoefficient);
                let mut exps = vec![];
                for f in &model {
                    let a = param(&mut s, format!("a_{}", f.name()), ParamKind::Exponent);
                    exps.push((slot(*f), a, -1.0));
                }
                if let (Some(ds), Some(d)) = (data_slot, d) {
                    exps.push((ds, d, -1.0));
                }
                s.terms.push(Term { coef: c, exps });
            }
            Form::Add | Form::AddInteractS | Form::AddInteract => {
                for f in &model {
                    let c = param(
                        &mut s,
                        format!("alpha_{}", f.name()),
                        ParamKind::LogCoefficient,
                    );
                    let a = param(&mut s, format!("a_{}", f.name()), ParamKind::Exponent);
                    s.terms.push(Term {
                        coef: c,
                        exps: vec![(slot(*f), a, -1.0)],
                    });
                }
                if form != Form::Add {
                    for f in &model {
                        let c = param(
                            &mut s,
                            format!("beta_{}", f.name()),
                            ParamKind::LogCoefficient,
                        );
                        let b = param(&mut s, format!("b_{}", f.name()), ParamKind::Exponent);
                        let mut exps = vec![(slot(*f), b, 1.0)];
                        if let (Some(ds), Some(d)) = (data_slot, d) {
                            exps.push((ds, d, -1.0));
                        }
                        s.terms.push(Term { coef: c, exps });
                    }
                }
                if form != Form::AddInteractS {
                    if let (Some(ds), Some(d)) = (data_slot, d) {
                        let c = param(&mut s, "xi".into(), ParamKind::LogCoefficient);
                        s.terms.push(Term {
                            coef: c,
                            exps: vec![(ds, d, -1.0)],
                        });
                    }
                }
            }
        }
        let e = param(&mut s, "eps".into(), ParamKind::LogCoefficient);
        s.terms.push(Term {
            coef: e,
            exps: vec![],
        });
        Ok(s)
    }

    pub fn n_params(&self) -> usize {
        self.names.len()
    }

    /// `log f_hat` at one row of log-factors.
    pub fn log_predict(&self, theta: &[f64], log_x: &[f64]) -> f64 {
        let mut max = f64::NEG_INFINITY;
        let mut z = [0.0f64; 16];
        let nt = self.terms.len();
        debug_assert!(nt <= 16);
        for (t, term) in self.terms.iter().enumerate() {
            let mut v = theta[term.coef];
            for &(slot, p, sign) in &term.exps {
                v += sign * theta[p] * log_x[slot];
            }
            z[t] = v;
            max = max.max(v);
        }
        let s: f64 = z[..nt].iter().map(|v| (v - max).exp()).sum();
        max + s.ln()
    }

    /// `log f_hat` and its gradient with respect to `theta` (added into `grad` scaled by `w`).
    pub fn log_predict_grad(&self, theta: &[f64], log_x: &[f64], w: f64, grad: &mut [f64]) -> f64 {
        let nt = self.terms.len();
        let mut z = [0.0f64; 16];
        let mut max = f64::NEG_INFINITY;
        for (t, term) in self.terms.iter().enumerate() {
            let mut v = theta[term.coef];
            for &(slot, p, sign) in &term.exps {
                v += sign * theta[p] * log_x[slot];
            }
            z[t] = v;
            max = max.max(v);
        }
        let mut s = 0.0;
        for v in z[..nt].iter_mut() {
            *v = (*v - max).exp();
            s += *v;
        }
        if w != 0.0 {
            for (t, term) in self.terms.iter().enumerate() {
                let wt = w * z[t] / s;
                grad[term.coef] += wt;
                for &(slot, p, sign) in &term.exps {
                    grad[p] += wt * sign * log_x[slot];
                }
            }
        }
        max + s.ln()
    }

    /// Parameters by name as a user reads them: coefficients exponentiated, exponents as is.
    pub fn readable(&self, theta: &[f64]) -> Vec<(String, f64)> {
        self.names
            .iter()
            .zip(&self.kinds)
            .zip(theta)
            .map(|((n, k), v)| {
                (
                    n.clone(),
                    match k {
                        ParamKind::LogCoefficient => v.exp(),
                        ParamKind::Exponent => *v,
                    },
                )
            })
            .collect()
    }

    /// Internal parameters from readable ones (inverse of [`Self::readable`]).
    pub fn from_readable(&self, named: &[(String, f64)]) -> Result<Vec<f64>, String> {
        self.names
            .iter()
            .zip(&self.kinds)
            .map(|(n, k)| {
                let v = named
                    .iter()
                    .find(|(m, _)| m == n)
                    .map(|(_, v)| *v)
                    .ok_or_else(|| format!("parameter `{n}` is missing"))?;
                match k {
                    // 0 is a term the fit switched off (exp of a very negative log-coefficient
                    // underflows when written): it stays off (log 0 = -inf adds nothing).
                    ParamKind::LogCoefficient if v.is_nan() || v < 0.0 || v.is_infinite() => Err(
                        format!("coefficient `{n}` must be a finite number >= 0, got {v}"),
                    ),
                    ParamKind::LogCoefficient => Ok(v.ln()),
                    ParamKind::Exponent => Ok(v),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Factor::*;

    #[test]
    fn add_interact_names_and_terms() {
        let s = Structure::new(Form::AddInteract, &[N, T, V, Data]).unwrap();
        assert_eq!(
            s.names,
            [
                "d", "alpha_N", "a_N", "alpha_T", "a_T", "alpha_V", "a_V", "beta_N", "b_N",
                "beta_T", "b_T", "beta_V", "b_V", "xi", "eps"
            ]
        );
        assert_eq!(s.terms.len(), 8);
        let s = Structure::new(Form::AddInteractS, &[N, T, V, Data]).unwrap();
        assert_eq!(s.terms.len(), 7);
        let s = Structure::new(Form::Add, &[N, V]).unwrap();
        assert_eq!(s.names, ["alpha_N", "a_N", "alpha_V", "a_V", "eps"]);
        let s = Structure::new(Form::Mult, &[T, Data]).unwrap();
        assert_eq!(s.names, ["d", "alpha", "a_T", "eps"]);
        assert!(Structure::new(Form::Add, &[Data]).is_err());
    }

    #[test]
    fn predicts_the_closed_form() {
        // f = 2 N^-0.5 + 3 T^-0.2 + 0.5 N^0.1 n^-0.3 + 0.25 T^0.4 n^-0.3 + 1.5 n^-0.3 + 0.7
        let s = Structure::new(Form::AddInteract, &[N, T, Data]).unwrap();
        let named: Vec<(String, f64)> = [
            ("d", 0.3),
            ("alpha_N", 2.0),
            ("a_N", 0.5),
            ("alpha_T", 3.0),
            ("a_T", 0.2),
            ("beta_N", 0.5),
            ("b_N", 0.1),
            ("beta_T", 0.25),
            ("b_T", 0.4),
            ("xi", 1.5),
            ("eps", 0.7),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), *v))
        .collect();
        let theta = s.from_readable(&named).unwrap();
        let (n, t, d): (f64, f64, f64) = (2.8, 16.0, 0.5);
        let want = 2.0 * n.powf(-0.5)
            + 3.0 * t.powf(-0.2)
            + 0.5 * n.powf(0.1) * d.powf(-0.3)
            + 0.25 * t.powf(0.4) * d.powf(-0.3)
            + 1.5 * d.powf(-0.3)
            + 0.7;
        let got = s.log_predict(&theta, &[n.ln(), t.ln(), d.ln()]).exp();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        let back = s.readable(&theta);
        assert!((back[1].1 - 2.0).abs() < 1e-12);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let s = Structure::new(Form::AddInteract, &[N, T, V, Data]).unwrap();
        let theta: Vec<f64> = (0..s.n_params()).map(|i| 0.3 * (i as f64).sin()).collect();
        let lx = [0.5, 2.0, 3.0, -0.7];
        let mut g = vec![0.0; s.n_params()];
        s.log_predict_grad(&theta, &lx, 1.0, &mut g);
        for i in 0..theta.len() {
            let mut p = theta.clone();
            p[i] += 1e-6;
            let mut m = theta.clone();
            m[i] -= 1e-6;
            let fd = (s.log_predict(&p, &lx) - s.log_predict(&m, &lx)) / 2e-6;
            assert!((fd - g[i]).abs() < 1e-6, "param {i}: {fd} vs {}", g[i]);
        }
    }
}
