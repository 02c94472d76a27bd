//! The web console: a playground (a video, a question and a budget slider that re-plans as it
//! moves, the frontier plot, a streamed run with measured FLOPs and timings, side by side with a
//! naive configuration) and a tenants page (quotas, usage over time, recent requests, create,
//! change quota, rotate key).
//!
//! Owns serving the console's static assets (`crates/server/console/`, embedded in the binary:
//! nothing is fetched from elsewhere at run time) with a strict Content-Security-Policy. The
//! console is a client of the documented API only: it holds no state here and needs no route
//! of its own beyond its files. Keys are typed by the user, kept in the browser's
//! sessionStorage and sent only as the `Authorization` header.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The policy of every console response: scripts, styles and connections from this server
/// only, no inline script or `eval`, media from this server or the page's own blobs.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; object-src 'none'; \
base-uri 'none'; frame-ancestors 'none'";

const JS: &str = "text/javascript; charset=utf-8";

/// `(path under /console/, content type, bytes)`.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("../console/style.css"),
    ),
    ("app.js", JS, include_bytes!("../console/app.js")),
    ("api.js", JS, include_bytes!("../console/api.js")),
    ("format.js", JS, include_bytes!("../console/format.js")),
    ("charts.js", JS, include_bytes!("../console/charts.js")),
    (
        "playground.js",
        JS,
        include_bytes!("../console/playground.js"),
    ),
    ("batches.js", JS, include_bytes!("../console/batches.js")),
    ("tenants.js", JS, include_bytes!("../console/tenants.js")),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../console/icon.svg"),
    ),
    (
        "samples/samples.json",
        "application/json",
        include_bytes!("../console/samples/samples.json"),
    ),
    (
        "samples/suite-00001.mp4",
        "video/mp4",
        include_bytes!("../console/samples/suite-00001.mp4"),
    ),
    (
        "samples/suite-00003.mp4",
        "video/mp4",
        include_bytes!("../console/samples/suite-00003.mp4"),
    ),
    (
        "samples/suite-00007.mp4",
        "video/mp4",
        include_bytes!("../console/samples/suite-00007.mp4"),
    ),
];

const INDEX: &[u8] = include_bytes!("../console/index.html");

/// The console's routes: `/` (the page) and `/console/{file}` (its assets). Open, like
/// `/health`: they carry no data, and every API call the page makes is authenticated.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route("/console/{*file}", get(console_file))
}

async fn console_file(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, ct, bytes)) => asset(ct, bytes),
        None => {
            let mut r =
                crate::error::ApiError::NotFound("no such console file".into()).into_response();
            secure(&mut r);
            r
        }
    }
}

fn asset(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let mut r = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        bytes,
    )
        .into_response();
    secure(&mut r);
    r
}

/// Security headers of every console response.
fn secure(r: &mut Response) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    async fn fetch(path: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let r = routes::<()>()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let body = axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap();
        (status, headers, body.to_vec())
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    /// Every `/console/...` path a page or script names, as written.
    fn referenced(src: &str) -> Vec<String> {
        let mut out = vec![];
        for quote in ['"', '\''] {
            let pat = format!("{quote}/console/");
            let mut rest = src;
            while let Some(i) = rest.find(&pat) {
                let tail = &rest[i + 1..];
                let end = tail.find(quote).unwrap();
                out.push(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
        // Relative ES module imports: `from './x.js'`.
        let mut rest = src;
        while let Some(i) = rest.find("from './") {
            let tail = &rest[i + 8..];
            let end = tail.find('\'').unwrap();
            out.push(format!("/console/{}", &tail[..end]));
            rest = &tail[end..];
        }
        out
    }

    #[tokio::test]
    async fn every_asset_is_served_with_the_policy_and_nothing_else_is_needed() {
        let (status, h, index) = fetch("/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let index = text(&index);
        // No inline script, handler or style: the policy would refuse them.
        assert!(!index.contains("<script>") && !index.contains("<script type=\"module\">"));
        assert!(!index.contains(" style=") && !index.contains("<style"));
        assert!(!index.contains(" onclick=") && !index.contains(" onload="));
        // Nothing from another origin.
        for page in std::iter::once(index.clone()).chain(
            ASSETS
                .iter()
                .filter(|(n, _, _)| n.ends_with(".js") || n.ends_with(".css"))
                .map(|(_, _, b)| text(b)),
        ) {
            let page = page.replace("http://www.w3.org/2000/svg", "");
            assert!(!page.contains("http://") && !page.contains("https://"));
            assert!(!page.contains("eval(") && !page.contains("new Function"));
            assert!(
                !page.contains("innerHTML"),
                "build DOM nodes, never HTML strings"
            );
            for path in referenced(&page) {
                let (status, h, _) = fetch(&path).await;
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{path} is referenced but not served"
                );
                assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
            }
        }
        let (status, h, _) = fetch("/console/app.js").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h[header::CONTENT_TYPE], JS);
        let (status, h, body) = fetch("/console/samples/suite-00003.mp4").await;
        assert_eq!(
            (status, &h[header::CONTENT_TYPE]),
            (StatusCode::OK, &HeaderValue::from_static("video/mp4"))
        );
        assert_eq!(&body[4..8], b"ftyp");
        let (status, h, _) = fetch("/console/../Cargo.toml").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
    }

    #[test]
    fn samples_manifest_names_served_videos() {
        let (_, _, bytes) = ASSETS
            .iter()
            .find(|(n, _, _)| *n == "samples/samples.json")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        let list = v.as_array().unwrap();
        assert_eq!(list.len(), 3);
        for s in list {
            let file = format!("samples/{}", s["file"].as_str().unwrap());
            assert!(ASSETS.iter().any(|(n, _, _)| *n == file), "{file}");
            assert!(!s["items"].as_array().unwrap().is_empty());
        }
    }
}
