//! Request parsing and validation: media sources, prompts, budgets, pins and sampling options.
//! Everything here runs before a request is planned, charged or queued.

use crate::error::ApiError;
use base64::Engine as _;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A budget given as a number or a string (`5e12`, `5T`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Budget {
    Number(f64),
    Text(String),
}

impl Budget {
    /// A quota: like a budget, and 0 is allowed (a tenant that may not spend, as the CLI
    /// allows).
    pub fn quota_flops(&self) -> Result<f64, ApiError> {
        let v = match self {
            Budget::Number(v) => Some(*v),
            Budget::Text(s) => vvlm_cost::parse_si(s),
        };
        match v {
            Some(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(ApiError::Validation(format!(
                "quota must be a number of FLOPs >= 0 such as 1e15 or \"1P\", got {self:?}"
            ))),
        }
    }

    pub fn flops(&self) -> Result<f64, ApiError> {
        let v = match self {
            Budget::Number(v) => Some(*v),
            Budget::Text(s) => vvlm_cost::parse_si(s),
        };
        match v {
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            _ => Err(ApiError::Validation(format!(
                "budget must be a positive number of FLOPs such as 5e12 or \"5T\", got {self:?}"
            ))),
        }
    }
}

/// Where the frames come from.
#[derive(Debug, Clone, Default)]
pub enum Media {
    VideoBytes(Vec<u8>),
    VideoPath(PathBuf),
    Images(Vec<Vec<u8>>),
    #[default]
    None,
}

/// A validated video request (caption, QA or chat).
#[derive(Debug, Clone, Default)]
pub struct VideoRequest {
    pub task: String,
    pub prompt: String,
    pub system: Option<String>,
    pub budget: Option<f64>,
    pub model: Option<String>,
    pub frames: Option<u32>,
    pub tokens_per_frame: Option<u32>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    /// Stop strings (at most 4, 1-64 characters each).
    pub stop: Vec<String>,
    pub media: Option<Media>,
}

/// Decodes a `data:` URL (base64) or resolves a `file://` URL under the allow-list.
pub fn resolve_url(url: &str, allow: &[PathBuf]) -> Result<Media, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::Validation("malformed data: URL (no comma)".into()))?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::Validation(
                "data: URLs must be base64-encoded".into(),
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::Validation(format!("data: URL is not valid base64: {e}")))?;
        return Ok(if meta.starts_with("image/") {
            Media::Images(vec![bytes])
        } else {
            Media::VideoBytes(bytes)
        });
    }
    if let Some(path) = url.strip_prefix("file://") {
        if allow.is_empty() {
            return Err(ApiError::Forbidden(
                "file:// URLs are disabled on this server (file_allow is empty)".into(),
            ));
        }
        // One answer whether the file is missing or outside the allow-list: a different status
        // would tell a client which paths exist anywhere on the machine.
        let refused = || {
            ApiError::Forbidden(format!(
                "{path} is not an existing file under the allowed folders"
            ))
        };
        let p = Path::new(path).canonicalize().map_err(|_| refused())?;
        let allowed = allow
            .iter()
            .filter_map(|a| a.canonicalize().ok())
            .any(|a| p.starts_with(&a));
        if !allowed || !p.is_file() {
            return Err(refused());
        }
        return Ok(Media::VideoPath(p));
    }
    Err(ApiError::Validation(
        "video URLs must be data: (base64) or file:// (allow-listed); this server fetches nothing from the network".into(),
    ))
}

/// JSON body of `/v1/videos/caption` and `/v1/videos/qa`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonVideoBody {
    pub video: Option<String>,
    #[serde(default)]
    pub images: Vec<String>,
    pub prompt: Option<String>,
    pub question: Option<String>,
    pub system: Option<String>,
    pub budget: Option<Budget>,
    pub task: Option<String>,
    pub model: Option<String>,
    pub frames: Option<u32>,
    pub tokens_per_frame: Option<u32>,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
}

impl JsonVideoBody {
    pub fn into_request(
        self,
        default_task: &str,
        allow: &[PathBuf],
    ) -> Result<VideoRequest, ApiError> {
        let media = match (self.video, self.images.is_empty()) {
            (Some(_), false) => {
                return Err(ApiError::Validation(
                    "send `video` or `images`, not both".into(),
                ))
            }
            (Some(v), true) => Some(resolve_url(&v, allow)?),
            (None, false) => {
                let mut imgs = vec![];
                for u in &self.images {
                    match resolve_url(u, allow)? {
                        Media::Images(mut i) => imgs.append(&mut i),
                        _ => {
                            return Err(ApiError::Validation(
                                "`images` must be data:image/... URLs".into(),
                            ))
                        }
                    }
                }
                Some(Media::Images(imgs))
            }
            (None, true) => None,
        };
        Ok(VideoRequest {
            task: self.task.unwrap_or_else(|| default_task.to_string()),
            prompt: self.question.or(self.prompt).unwrap_or_default(),
            system: self.system,
            budget: self.budget.map(|b| b.flops()).transpose()?,
            model: self.model,
            frames: self.frames,
            tokens_per_frame: self.tokens_per_frame,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop: vec![],
            media,
        })
    }
}

/// Reads a multipart form (fields `video`, `image` (repeatable), `prompt` / `question`, `system`,
/// `budget`, `task`, `model`, `frames`, `tokens_per_frame`, `max_tokens`, `temperature`,
/// `top_p`, `seed`).
pub async fn from_multipart(
    mut mp: axum::extract::Multipart,
    default_task: &str,
) -> Result<VideoRequest, ApiError> {
    let mut r = VideoRequest {
        task: default_task.to_string(),
        ..Default::default()
    };
    let mut images = vec![];
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!(
                "the request body is over the limit: {}",
                e.body_text()
            ))
        } else {
            ApiError::Validation(format!("multipart: {}", e.body_text()))
        }
    };
    while let Some(field) = mp.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "video" => {
                r.media = Some(Media::VideoBytes(
                    field.bytes().await.map_err(bad)?.to_vec(),
                ))
            }
            "image" | "images" => images.push(field.bytes().await.map_err(bad)?.to_vec()),
            _ => {
                let text = field.text().await.map_err(bad)?;
                let num = |what: &str| {
                    ApiError::Validation(format!("`{what}` must be a number, got `{text}`"))
                };
                match name.as_str() {
                    "prompt" | "question" => r.prompt = text,
                    "system" => r.system = Some(text),
                    "task" => r.task = text,
                    "model" => r.model = Some(text),
                    "budget" => r.budget = Some(Budget::Text(text.clone()).flops()?),
                    "frames" => r.frames = Some(text.trim().parse().map_err(|_| num("frames"))?),
                    "tokens_per_frame" => {
                        r.tokens_per_frame =
                            Some(text.trim().parse().map_err(|_| num("tokens_per_frame"))?)
                    }
                    "max_tokens" => {
                        r.max_tokens = Some(text.trim().parse().map_err(|_| num("max_tokens"))?)
                    }
                    "temperature" => {
                        r.temperature = Some(text.trim().parse().map_err(|_| num("temperature"))?)
                    }
                    "top_p" => r.top_p = Some(text.trim().parse().map_err(|_| num("top_p"))?),
                    "seed" => r.seed = Some(text.trim().parse().map_err(|_| num("seed"))?),
                    other => {
                        return Err(ApiError::Validation(format!(
                            "unknown form field `{other}`"
                        )))
                    }
                }
            }
        }
    }
    if !images.is_empty() {
        if r.media.is_some() {
            return Err(ApiError::Validation(
                "send `video` or `image` fields, not both".into(),
            ));
        }
        r.media = Some(Media::Images(images));
    }
    Ok(r)
}

/// Checks what does not depend on the tenant or the plan.
pub fn check_request(
    r: &VideoRequest,
    max_prompt_chars: usize,
    max_tokens: usize,
) -> Result<(), ApiError> {
    if r.prompt.trim().is_empty() {
        return Err(ApiError::Validation(
            "`prompt` (or `question`) is required".into(),
        ));
    }
    if r.prompt.chars().count() > max_prompt_chars {
        return Err(ApiError::Validation(format!(
            "prompt is longer than {max_prompt_chars} characters"
        )));
    }
    if r.system
        .as_deref()
        .is_some_and(|x| x.chars().count() > max_prompt_chars)
    {
        return Err(ApiError::Validation(format!(
            "system is longer than {max_prompt_chars} characters"
        )));
    }
    if matches!(r.media, None | Some(Media::None)) {
        return Err(ApiError::Validation(
            "a video is required (`video` field, data: URL or file:// URL)".into(),
        ));
    }
    if let Some(m) = r.max_tokens {
        if m == 0 || m > max_tokens {
            return Err(ApiError::Validation(format!(
                "max_tokens must be in 1..={max_tokens}, got {m}"
            )));
        }
    }
    if let Some(t) = r.temperature {
        if !(0.0..=5.0).contains(&t) {
            return Err(ApiError::Validation(format!(
                "temperature must be in [0, 5], got {t}"
            )));
        }
    }
    if let Some(p) = r.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::Validation(format!(
                "top_p must be in (0, 1], got {p}"
            )));
        }
    }
    if let Some(f) = r.frames {
        if f == 0 {
            return Err(ApiError::Validation("frames must be at least 1".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_with_suffixes() {
        assert_eq!(Budget::Text("5T".into()).flops().unwrap(), 5e12);
        assert_eq!(Budget::Number(5e12).flops().unwrap(), 5e12);
        assert!(Budget::Text("lots".into()).flops().is_err());
        assert!(Budget::Number(-1.0).flops().is_err());
        assert!(Budget::Number(0.0).flops().is_err());
        assert_eq!(Budget::Number(0.0).quota_flops().unwrap(), 0.0);
        assert_eq!(Budget::Text("0".into()).quota_flops().unwrap(), 0.0);
        assert!(Budget::Number(-1.0).quota_flops().is_err());
    }

    #[test]
    fn urls_are_data_or_allow_listed_files() {
        assert!(
            matches!(resolve_url("data:video/mp4;base64,AAAA", &[]), Ok(Media::VideoBytes(b)) if b == vec![0, 0, 0])
        );
        assert!(matches!(
            resolve_url("data:image/png;base64,AAAA", &[]),
            Ok(Media::Images(_))
        ));
        assert!(resolve_url("data:video/mp4,AAAA", &[]).is_err());
        assert!(resolve_url("data:video/mp4;base64,@@@", &[]).is_err());
        assert!(matches!(
            resolve_url("https://example.com/v.mp4", &[]),
            Err(ApiError::Validation(_))
        ));
        assert!(matches!(
            resolve_url("file:///etc/passwd", &[]),
            Err(ApiError::Forbidden(_))
        ));
        let tmp = std::env::temp_dir();
        let f = tmp.join(format!("vvlm-allow-{}.mp4", std::process::id()));
        std::fs::write(&f, b"x").unwrap();
        assert!(matches!(
            resolve_url(
                &format!("file://{}", f.display()),
                std::slice::from_ref(&tmp)
            ),
            Ok(Media::VideoPath(_))
        ));
        // Missing, outside, or a folder: the same answer (no existence oracle).
        let answer = |url: &str| match resolve_url(url, std::slice::from_ref(&tmp)) {
            Err(ApiError::Forbidden(m)) => m.replace(url.trim_start_matches("file://"), "P"),
            other => panic!("{url}: {other:?}"),
        };
        let missing = answer(&format!("file://{}/vvlm-no-such-file.mp4", tmp.display()));
        assert_eq!(answer("file:///etc/passwd"), missing);
        assert_eq!(answer("file:///no/such/file.mp4"), missing);
        assert_eq!(answer(&format!("file://{}", tmp.display())), missing);
        std::fs::remove_file(f).ok();
    }
}
