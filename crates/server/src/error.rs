//! One error enum for the API, mapped to HTTP status in one place.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Validation(String),
    /// A request field with a bad value (422, the field named in `param`).
    #[error("{message}")]
    Invalid { param: String, message: String },
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(String),
    /// An unknown model (404, as OpenAI and vLLM answer).
    #[error("{0}")]
    ModelNotFound(String),
    /// A request field the server does not implement (400, named in `param`).
    #[error("`{param}` is not supported by this server")]
    Unsupported { param: String },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMedia(String),
    #[error("{message}")]
    BudgetExhausted {
        message: String,
        reset_at: Option<i64>,
    },
    #[error("{message}")]
    Overloaded { message: String, retry_after_s: u64 },
    /// The tenant has as many requests in flight as its limit (429).
    #[error("{message}")]
    TenantLimit { message: String, retry_after_s: u64 },
    #[error("{0}")]
    NotReady(String),
    /// The ledger's database cannot be reached: new work is refused (503).
    #[error("{message}")]
    LedgerUnavailable { message: String, retry_after_s: u64 },
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Validation(_) | ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unsupported { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BudgetExhausted { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::Overloaded { .. } | ApiError::TenantLimit { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::NotReady(_) | ApiError::LedgerUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Validation(_) | ApiError::Invalid { .. } => "validation_error",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unsupported { .. } => "unsupported_parameter",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMedia(_) => "unsupported_media",
            ApiError::BudgetExhausted { .. } => "budget_exhausted",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::TenantLimit { .. } => "concurrency_limit",
            ApiError::NotReady(_) => "not_ready",
            ApiError::LedgerUnavailable { .. } => "ledger_unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// The request field the error is about, when there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { param, .. } | ApiError::Unsupported { param } => Some(param),
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// A bad value of a named field.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            param: param.to_string(),
            message: message.into(),
        }
    }

    /// The JSON body, as OpenAI's: `{"error": {"type", "code", "message", "param"}}` (`type`
    /// and `code` are the same machine-readable kind; `param` names the field or is null). SSE
    /// streams send the same object as their error event.
    pub fn body(&self) -> serde_json::Value {
        let mut e = json!({
            "type": self.kind(),
            "code": self.kind(),
            "message": self.to_string(),
            "param": self.param(),
        });
        if let ApiError::BudgetExhausted {
            reset_at: Some(t), ..
        } = self
        {
            e["reset_at"] = json!(t);
        }
        json!({ "error": e })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if let ApiError::Overloaded { retry_after_s, .. }
        | ApiError::TenantLimit { retry_after_s, .. }
        | ApiError::LedgerUnavailable { retry_after_s, .. } = &self
        {
            if let Ok(v) = HeaderValue::from_str(&retry_after_s.to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp
    }
}

impl From<vvlm_video::VideoError> for ApiError {
    fn from(e: vvlm_video::VideoError) -> Self {
        use vvlm_video::VideoError as V;
        match e {
            V::TooLarge { .. } => ApiError::PayloadTooLarge(format!("video: {e}")),
            V::UnsupportedCodec(_) => ApiError::UnsupportedMedia(format!("video: {e}")),
            V::Timeout(_) => ApiError::Validation(format!("video: {e}")),
            V::Io(m) => ApiError::Internal(format!("video i/o: {m}")),
            other => ApiError::Validation(format!("video: {other}")),
        }
    }
}

impl From<vvlm_planner::PlanError> for ApiError {
    fn from(e: vvlm_planner::PlanError) -> Self {
        match e {
            vvlm_planner::PlanError::Registry(m) => ApiError::Internal(m),
            vvlm_planner::PlanError::UnknownModel(m) => {
                ApiError::ModelNotFound(format!("the model `{m}` does not exist"))
            }
            other => ApiError::Validation(other.to_string()),
        }
    }
}

impl ApiError {
    /// A ledger error; an unavailable database asks clients to retry after `retry_after_s`.
    pub fn from_ledger(e: crate::ledger::LedgerError, retry_after_s: u64) -> Self {
        let mut a = ApiError::from(e);
        if let ApiError::LedgerUnavailable {
            retry_after_s: r, ..
        } = &mut a
        {
            *r = retry_after_s;
        }
        a
    }
}

impl From<crate::ledger::LedgerError> for ApiError {
    fn from(e: crate::ledger::LedgerError) -> Self {
        use crate::ledger::LedgerError as L;
        match e {
            L::Unavailable(m) => ApiError::LedgerUnavailable {
                message: format!(
                    "the ledger database is unavailable, so no new work is admitted ({m}); retry later"
                ),
                retry_after_s: 5,
            },
            L::QuotaExhausted { message, reset_at } => {
                ApiError::BudgetExhausted { message, reset_at }
            }
            L::NotFound(m) => ApiError::NotFound(m),
            L::Invalid(m) => ApiError::Validation(m),
            L::Conflict(m) => ApiError::Conflict(m),
            L::Storage(m) => ApiError::Internal(format!("ledger: {m}")),
        }
    }
}

impl From<vvlm_engine::EngineError> for ApiError {
    fn from(e: vvlm_engine::EngineError) -> Self {
        match e {
            vvlm_engine::EngineError::Request(m) => ApiError::Validation(m),
            vvlm_engine::EngineError::Cancelled => {
                ApiError::Timeout("the request was cancelled before it finished".into())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_ledger_is_a_503_with_retry_after() {
        let e = ApiError::from_ledger(
            crate::ledger::LedgerError::Unavailable("connection refused".into()),
            7,
        );
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.body()["error"]["code"], "ledger_unavailable");
        assert!(e.to_string().contains("no new work is admitted"));
        let r = e.into_response();
        assert_eq!(r.headers()["retry-after"], "7");
        // Other ledger errors keep their own status.
        let e = ApiError::from_ledger(crate::ledger::LedgerError::Storage("disk".into()), 7);
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
