//! FLOP accounting for video VLM inference.
//!
//! Owns three ways of counting what a request costs:
//! - [`theoretical`]: the paper's prefill formula `c(x) = 2 x_T (x_M x_W + x_N x_V)`;
//! - [`analytic`]: an exact count of the matrix products a concrete architecture (read from its
//!   `config.json`) executes for a workload, by component;
//! - [`counter`]: the [`FlopCounter`] the engine feeds as it executes ("measured").
//!
//! Conventions everywhere: a multiply-add is 2 FLOPs; only matrix products count (linear
//! layers, the patch-embedding convolution as a matmul, attention's `QK^T` and `AV`, the LM head);
//! norms, activations, softmax, RoPE and the bilinear pooling are not counted. Attention is
//! counted **as executed**: prefill computes the full `q_len x kv_len` score matrix and masks it,
//! so the causal half is not subtracted.
//!
//! This crate must not know about tensors, devices, HTTP or scaling laws.

pub mod analytic;
pub mod counter;
pub mod theoretical;

pub use analytic::{ArchSpec, LmSpec, ProjectorSpec, VisionSpec, Workload};
pub use counter::{Component, FlopBreakdown, FlopCounter};
pub use theoretical::PaperCost;

/// Errors raised while reading an architecture description.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config.json is missing `{0}`")]
    Missing(&'static str),
}

/// Parses numbers written as `5e12`, `5T`, `2.5G`, `300M`, `1.2P`, `7.5B` (B = 1e9) or plain digits.
pub fn parse_si(text: &str) -> Option<f64> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    let (num, mult) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1e3),
        'M' => (&t[..t.len() - 1], 1e6),
        'G' | 'B' => (&t[..t.len() - 1], 1e9),
        'T' => (&t[..t.len() - 1], 1e12),
        'P' => (&t[..t.len() - 1], 1e15),
        _ => (t, 1.0),
    };
    let v: f64 = num.trim().parse().ok()?;
    let v = v * mult;
    v.is_finite().then_some(v)
}

/// Formats a FLOP count with an SI suffix (`5.02T`).
pub fn format_si(v: f64) -> String {
    let a = v.abs();
    let (d, s) = if a >= 1e15 {
        (1e15, "P")
    } else if a >= 1e12 {
        (1e12, "T")
    } else if a >= 1e9 {
        (1e9, "G")
    } else if a >= 1e6 {
        (1e6, "M")
    } else if a >= 1e3 {
        (1e3, "k")
    } else {
        (1.0, "")
    };
    format!("{:.3}{}", v / d, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_si_suffixes() {
        assert_eq!(parse_si("5T"), Some(5e12));
        assert_eq!(parse_si("5e12"), Some(5e12));
        assert_eq!(parse_si("2.5G"), Some(2.5e9));
        assert_eq!(parse_si("7.5B"), Some(7.5e9));
        assert_eq!(parse_si("1000"), Some(1000.0));
        assert_eq!(parse_si("abc"), None);
        assert_eq!(parse_si(""), None);
        assert_eq!(parse_si("T"), None);
        assert_eq!(format_si(5.02e12), "5.020T");
    }
}
