//! The model registry: one TOML file per checkpoint the planner may choose.
//!
//! ```toml
//! name = "demo-smollm2"
//! path = "cache/demo-smollm2"     # relative to the TOML file's folder, or absolute
//! lm_params = 1.35e8               # x_N, parameters
//! min_frames = 1
//! max_frames = 32
//! max_side = 27                    # tokens per frame s*s for s in 1..=max_side
//! description = "..."
//! ```

use crate::PlanError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn one() -> u32 {
    1
}
fn default_max_frames() -> u32 {
    64
}
fn default_side() -> u32 {
    27
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    /// Checkpoint directory (resolved against the registry file's folder).
    pub path: PathBuf,
    pub lm_params: f64,
    #[serde(default = "one")]
    pub min_frames: u32,
    #[serde(default = "default_max_frames")]
    pub max_frames: u32,
    #[serde(default = "default_side")]
    pub max_side: u32,
    #[serde(default)]
    pub description: String,
    /// Finetuning data size of the checkpoint, millions of examples (the scaling law's `n`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_size_m: Option<f64>,
    /// The instruction a caption request without a prompt sends this checkpoint, in its own
    /// training's words (absent: the server's `caption_prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_prompt: Option<String>,
}

impl ModelEntry {
    /// An entry with no checkpoint on disk (for planning what-ifs and tests).
    pub fn synthetic(
        name: &str,
        lm_params: f64,
        min_frames: u32,
        max_frames: u32,
        max_side: u32,
    ) -> Self {
        Self {
            name: name.into(),
            path: PathBuf::new(),
            lm_params,
            min_frames,
            max_frames,
            max_side,
            description: String::new(),
            data_size_m: None,
            caption_prompt: None,
        }
    }

    fn validate(&self, file: &Path) -> Result<(), PlanError> {
        let bad = |m: String| Err(PlanError::Registry(format!("{}: {m}", file.display())));
        if self.name.trim().is_empty() {
            return bad("empty name".into());
        }
        if !(self.lm_params.is_finite() && self.lm_params > 0.0) {
            return bad(format!(
                "lm_params must be positive, got {}",
                self.lm_params
            ));
        }
        if self.min_frames == 0 || self.min_frames > self.max_frames {
            return bad(format!(
                "frames range {}..={} is empty or starts at 0",
                self.min_frames, self.max_frames
            ));
        }
        if let Some(d) = self.data_size_m {
            if !(d.is_finite() && d > 0.0) {
                return bad(format!("data_size_m must be positive, got {d}"));
            }
        }
        if self.max_side == 0 || self.max_side > 64 {
            return bad(format!("max_side {} must be in 1..=64", self.max_side));
        }
        Ok(())
    }
}

/// All registered checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Registry {
    pub models: Vec<ModelEntry>,
}

impl Registry {
    /// Reads every `*.toml` in a folder (not recursive), sorted by file name.
    pub fn load_dir(dir: &Path) -> Result<Self, PlanError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| PlanError::Registry(format!("{}: {e}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut models = vec![];
        for f in files {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| PlanError::Registry(format!("{}: {e}", f.display())))?;
            let mut e: ModelEntry = toml::from_str(&text)
                .map_err(|e| PlanError::Registry(format!("{}: {e}", f.display())))?;
            e.validate(&f)?;
            if e.path.is_relative() {
                e.path = f.parent().unwrap_or(Path::new(".")).join(&e.path);
            }
            if models.iter().any(|m: &ModelEntry| m.name == e.name) {
                return Err(PlanError::Registry(format!(
                    "duplicate model name `{}`",
                    e.name
                )));
            }
            models.push(e);
        }
        if models.is_empty() {
            return Err(PlanError::Registry(format!(
                "no *.toml model entries in {}",
                dir.display()
            )));
        }
        Ok(Self { models })
    }

    pub fn get(&self, name: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_validates_entries() {
        let d = std::env::temp_dir().join(format!("vvlm-reg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("a.toml"),
            "name = \"a\"\npath = \"ck\"\nlm_params = 1e9\nmax_frames = 8\n",
        )
        .unwrap();
        let r = Registry::load_dir(&d).unwrap();
        assert_eq!(r.models[0].path, d.join("ck"));
        assert_eq!(
            (
                r.models[0].min_frames,
                r.models[0].max_frames,
                r.models[0].max_side
            ),
            (1, 8, 27)
        );
        std::fs::write(
            d.join("b.toml"),
            "name = \"b\"\npath = \"x\"\nlm_params = -1\n",
        )
        .unwrap();
        assert!(Registry::load_dir(&d)
            .unwrap_err()
            .to_string()
            .contains("lm_params"));
        std::fs::write(
            d.join("b.toml"),
            "name = \"a\"\npath = \"x\"\nlm_params = 1\n",
        )
        .unwrap();
        assert!(Registry::load_dir(&d)
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
        std::fs::write(
            d.join("b.toml"),
            "name = \"b\"\npath = \"x\"\nlm_params = 1\ntypo = 3\n",
        )
        .unwrap();
        assert!(Registry::load_dir(&d).is_err());
        std::fs::remove_dir_all(&d).ok();
    }
}
