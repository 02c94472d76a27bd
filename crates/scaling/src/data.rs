//! Sweep results: a CSV whose header names the factor columns and `score` (0-100).

use crate::form::Factor;
use crate::ScalingError;

/// One observed configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// Factor values in the dataset's factor order (natural units: billions, frames, tokens,
    /// millions).
    pub x: Vec<f64>,
    /// The modelled error `100 - score`.
    pub error: f64,
}

/// A sweep: which factors it carries and its observations.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub factors: Vec<Factor>,
    pub rows: Vec<Observation>,
    /// Where the data came from (a path, usually).
    pub source: String,
}

impl Dataset {
    /// Parses CSV text. Columns other than the factor columns and `score` are ignored.
    pub fn from_csv(text: &str, source: &str) -> Result<Self, ScalingError> {
        let bad = |line: usize, msg: String| ScalingError::Data(format!("{source}:{line}: {msg}"));
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        let (_, header) = lines.next().ok_or_else(|| bad(1, "empty file".into()))?;
        let cols: Vec<String> = header.split(',').map(|c| c.trim().to_string()).collect();
        let score_col = cols
            .iter()
            .position(|c| c == "score")
            .ok_or_else(|| bad(1, "no `score` column".into()))?;
        let items_col = cols.iter().position(|c| c == "items");
        let mut factors = vec![];
        let mut slots = vec![];
        for f in [Factor::N, Factor::T, Factor::V, Factor::Data] {
            if let Some(i) = cols.iter().position(|c| c == f.column()) {
                factors.push(f);
                slots.push(i);
            }
        }
        if !factors.iter().any(|f| *f != Factor::Data) {
            return Err(bad(
                1,
                "no factor column (expected some of lm_params_b, frames, tokens_per_frame, data_size_m)".into(),
            ));
        }
        let mut rows = vec![];
        for (ln, line) in lines {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != cols.len() {
                return Err(bad(
                    ln + 1,
                    format!("{} cells, header has {}", cells.len(), cols.len()),
                ));
            }
            let num = |i: usize| -> Result<f64, ScalingError> {
                cells[i]
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| {
                        bad(
                            ln + 1,
                            format!("`{}` is not a number in column {}", cells[i], cols[i]),
                        )
                    })
            };
            let mut score = num(score_col)?;
            // A perfect score measured on k items (a sweep from `vvlm eval` names k) is read with
            // the usual continuity correction, as (k - 1/2) / k: the error a power law models
            // cannot be 0, and k items cannot tell 0 from less than 1/k.
            if score == 100.0 {
                if let Some(i) = items_col {
                    let k = num(i)?;
                    if k >= 1.0 {
                        score = 100.0 * (1.0 - 0.5 / k);
                    }
                }
            }
            if !(0.0..100.0).contains(&score) {
                return Err(bad(
                    ln + 1,
                    format!("score {score} is outside [0, 100) (a score of 100 is accepted with an `items` column)"),
                ));
            }
            let mut x = vec![];
            for &s in &slots {
                let v = num(s)?;
                if v <= 0.0 {
                    return Err(bad(
                        ln + 1,
                        format!("{} must be positive, got {v}", cols[s]),
                    ));
                }
                x.push(v);
            }
            rows.push(Observation {
                x,
                error: 100.0 - score,
            });
        }
        if rows.is_empty() {
            return Err(bad(1, "no data rows".into()));
        }
        Ok(Self {
            factors,
            rows,
            source: source.to_string(),
        })
    }

    pub fn from_path(path: &std::path::Path) -> Result<Self, ScalingError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScalingError::Data(format!("cannot read {}: {e}", path.display())))?;
        Self::from_csv(&text, &path.display().to_string())
    }

    /// Writes the dataset back as CSV.
    pub fn to_csv(&self) -> String {
        let mut s: Vec<String> = self
            .factors
            .iter()
            .map(|f| f.column().to_string())
            .collect();
        s.push("score".into());
        let mut out = s.join(",") + "\n";
        for r in &self.rows {
            let mut cells: Vec<String> = r.x.iter().map(|v| format!("{v}")).collect();
            cells.push(format!("{}", 100.0 - r.error));
            out += &(cells.join(",") + "\n");
        }
        out
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            factors: self.factors.clone(),
            rows: idx.iter().map(|&i| self.rows[i].clone()).collect(),
            source: self.source.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_any_subset_of_columns() {
        let d = Dataset::from_csv(
            "lm_params_b,tokens_per_frame,score\n1,4,50\n7.5,196,60.5\n",
            "t",
        )
        .unwrap();
        assert_eq!(d.factors, vec![Factor::N, Factor::V]);
        assert_eq!(d.rows[1].x, vec![7.5, 196.0]);
        assert!((d.rows[1].error - 39.5).abs() < 1e-12);
        let back = Dataset::from_csv(&d.to_csv(), "t").unwrap();
        assert_eq!(back.rows, d.rows);
    }

    #[test]
    fn refuses_bad_data_with_line_numbers() {
        let e = Dataset::from_csv("frames,score\n4,abc\n", "s.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("s.csv:2") && e.contains("abc"), "{e}");
        assert!(Dataset::from_csv("frames\n4\n", "s").is_err());
        assert!(Dataset::from_csv("score\n4\n", "s").is_err());
        assert!(Dataset::from_csv("frames,score\n0,50\n", "s").is_err());
        assert!(Dataset::from_csv("frames,score\n4,150\n", "s").is_err());
        assert!(Dataset::from_csv("frames,score\n", "s").is_err());
        assert!(Dataset::from_csv("frames,score\n4,100\n", "s").is_err());
    }

    #[test]
    fn a_perfect_score_on_k_items_reads_as_half_an_item_short() {
        let d = Dataset::from_csv(
            "model,frames,family,items,score\nx,4,static,50,100\nx,8,static,50,90\n",
            "t",
        )
        .unwrap();
        assert_eq!(d.factors, vec![Factor::T]);
        assert!((d.rows[0].error - 1.0).abs() < 1e-12, "{}", d.rows[0].error);
        assert!((d.rows[1].error - 10.0).abs() < 1e-12);
    }
}
