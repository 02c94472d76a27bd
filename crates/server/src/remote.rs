//! Videos and images by `http(s)://` URL, fetched only from the prefixes the operator allows
//! (`url_allow`; empty, the default: the server fetches nothing from the network). A request's
//! remote URLs are fetched before it is parsed, each into a `data:` URL in its place, so the rest
//! of the server sees media exactly as if the client had uploaded it (one validation path, one
//! cache key: the bytes' hash).
//!
//! Guarded as a server that fetches on a client's behalf must be: a URL is allowed only under a
//! configured prefix, compared as a parsed URL (scheme, host, port, then path by segments: no
//! `cdn.example.com.evil.net` or `/videos-private/` passes for `https://cdn.example.com/videos/`),
//! with no user name or password in it; the host's addresses are resolved here and refused when
//! any is loopback, private, link-local, shared (CGNAT), unspecified or multicast (unless
//! `url_private`; the connection goes to the addresses checked, so a name cannot be rebound
//! between the check and the connection); redirects are not followed (a 3xx names its target);
//! the body is read up to the media byte limit and no further; the whole fetch has a deadline.
//!
//! Owns the policy and the fetch (counted in the server's metrics). It must not know the engine,
//! planning or the ledger.

use crate::error::ApiError;
use crate::ledger::Tenant;
use crate::metrics::Metrics;
use serde_json::{Map, Value};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// What may be fetched, and how.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    /// Allowed prefixes, parsed (`scheme://host[:port]/path/`).
    allow: Vec<url::Url>,
    /// Addresses inside the machine or its private networks may be fetched.
    private: bool,
    timeout: Duration,
    max_bytes: u64,
    /// Which lists `allow` came from (named in refusals).
    origin: String,
}

impl UrlPolicy {
    /// The policy from the configuration: `allow` are URL prefixes (http or https).
    pub fn new(
        allow: &[String],
        private: bool,
        timeout_s: f64,
        max_bytes: u64,
    ) -> Result<Self, String> {
        let allow = allow
            .iter()
            .map(|a| {
                let u = url::Url::parse(a).map_err(|e| format!("url_allow entry `{a}`: {e}"))?;
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return Err(format!(
                        "url_allow entry `{a}` must be an http:// or https:// URL with a host"
                    ));
                }
                if !u.username().is_empty() || u.password().is_some() {
                    return Err(format!("url_allow entry `{a}` must not hold credentials"));
                }
                Ok(u)
            })
            .collect::<Result<Vec<_>, String>>()?;
        if !(timeout_s > 0.0 && timeout_s.is_finite()) {
            return Err(format!("url_timeout_s must be positive, got {timeout_s}"));
        }
        Ok(Self {
            allow,
            private,
            timeout: Duration::from_secs_f64(timeout_s),
            max_bytes,
            origin: "url_allow".into(),
        })
    }

    /// The policy for a tenant: with a `media_allow`, a URL must be under a prefix of the
    /// server's list and one of the tenant's (of each overlapping pair, the narrower).
    pub fn for_tenant(&self, t: &Tenant) -> std::borrow::Cow<'_, UrlPolicy> {
        let Some(mine) = &t.media_allow else {
            return std::borrow::Cow::Borrowed(self);
        };
        let mine: Vec<url::Url> = mine
            .iter()
            .filter_map(|p| url::Url::parse(p).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .collect();
        let mut allow = Vec::new();
        for a in &self.allow {
            for m in &mine {
                if under(m, a) {
                    allow.push(m.clone());
                } else if under(a, m) {
                    allow.push(a.clone());
                }
            }
        }
        std::borrow::Cow::Owned(UrlPolicy {
            allow,
            origin: format!("url_allow and tenant `{}`'s media_allow", t.name),
            ..self.clone()
        })
    }

    /// Whether any remote URL may be fetched.
    pub fn enabled(&self) -> bool {
        !self.allow.is_empty()
    }

    /// The URL parsed, if it is under an allowed prefix; else why not (403).
    pub fn check(&self, raw: &str) -> Result<url::Url, ApiError> {
        if !self.enabled() {
            return Err(ApiError::Forbidden(format!(
                "http(s):// URLs are not allowed here (no prefix in {}): send the media as a \
                 data: URL or an upload",
                self.origin
            )));
        }
        let u = url::Url::parse(raw)
            .map_err(|e| ApiError::Validation(format!("`{raw}` is not a valid URL: {e}")))?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err(ApiError::Forbidden(
                "media URLs must not carry a user name or password".into(),
            ));
        }
        if !self.allow.iter().any(|a| under(&u, a)) {
            return Err(ApiError::Forbidden(format!(
                "{} is not under an allowed URL prefix ({})",
                shown(&u),
                self.origin
            )));
        }
        Ok(u)
    }

    /// Fetches an allowed URL's body, at most `cap` bytes (blocking: call off the async
    /// threads).
    pub fn fetch(&self, u: &url::Url, param: &str, cap: u64) -> Result<Vec<u8>, ApiError> {
        let failed = |why: String| ApiError::invalid(param, format!("{}: {why}", shown(u)));
        let host = u
            .host_str()
            .ok_or_else(|| failed("no host".into()))?
            .to_string();
        let port = u
            .port_or_known_default()
            .ok_or_else(|| failed("no port".into()))?;
        let addrs = self.resolve(&host, port).map_err(|e| match e {
            Resolved::Refused(ip) => ApiError::Forbidden(format!(
                "{} resolves to {ip}, a private or local address (url_private is off)",
                shown(u)
            )),
            Resolved::Failed(why) => failed(why),
        })?;
        // The connection goes to the addresses checked above, whatever the name resolves to now.
        let agent = ureq::AgentBuilder::new()
            .timeout(self.timeout)
            .redirects(0)
            .resolver(move |_: &str| Ok(addrs.clone()))
            .build();
        let resp = match agent.request_url("GET", u).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                return Err(failed(format!(
                    "the server answered {code} {}",
                    r.status_text()
                )))
            }
            // The transport error's kind and message, not its Display (which holds the whole
            // URL, a presigned query included).
            Err(ureq::Error::Transport(t)) => {
                let detail = t.message().map(|m| format!(": {m}")).unwrap_or_default();
                return Err(failed(format!("fetching: {}{detail}", t.kind())));
            }
        };
        if (300..400).contains(&resp.status()) {
            let to = resp.header("location").unwrap_or("nowhere");
            return Err(failed(format!(
                "redirects ({} to {to}), which are not followed: send the final URL",
                resp.status()
            )));
        }
        let too_large = || {
            ApiError::PayloadTooLarge(format!(
                "{} is larger than the media limit of {} bytes (for all of a request's media URLs \
                 together; {cap} were left)",
                shown(u),
                self.max_bytes
            ))
        };
        if resp
            .header("content-length")
            .and_then(|l| l.parse::<u64>().ok())
            .is_some_and(|l| l > cap)
        {
            return Err(too_large());
        }
        let mut body = vec![];
        resp.into_reader()
            .take(cap + 1)
            .read_to_end(&mut body)
            .map_err(|e| failed(format!("reading the body: {e}")))?;
        if body.len() as u64 > cap {
            return Err(too_large());
        }
        Ok(body)
    }

    fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Resolved> {
        let addrs: Vec<SocketAddr> = (host.trim_start_matches('[').trim_end_matches(']'), port)
            .to_socket_addrs()
            .map_err(|e| Resolved::Failed(format!("resolving {host}: {e}")))?
            .collect();
        if addrs.is_empty() {
            return Err(Resolved::Failed(format!("{host} has no address")));
        }
        if !self.private {
            if let Some(a) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(Resolved::Refused(a.ip()));
            }
        }
        Ok(addrs)
    }
}

enum Resolved {
    Refused(IpAddr),
    Failed(String),
}

/// The URL for messages: without its query (a presigned URL's signature stays out of logs).
fn shown(u: &url::Url) -> String {
    let mut s = u.clone();
    s.set_query(None);
    s.set_fragment(None);
    s.to_string()
}

/// Whether `u` is under the prefix `a`: same scheme, host and port, and `a`'s path segments
/// lead `u`'s (a prefix without a trailing slash names one file or folder whole).
fn under(u: &url::Url, a: &url::Url) -> bool {
    if u.scheme() != a.scheme()
        || u.host_str().map(str::to_ascii_lowercase) != a.host_str().map(str::to_ascii_lowercase)
        || u.port_or_known_default() != a.port_or_known_default()
    {
        return false;
    }
    let segments = |x: &url::Url| -> Vec<String> {
        x.path_segments()
            .map(|s| s.map(String::from).collect())
            .unwrap_or_default()
    };
    let (mut want, got) = (segments(a), segments(u));
    // `https://host/videos/` allows everything below `videos`; `https://host/` everything.
    if want.last().is_some_and(|s| s.is_empty()) {
        want.pop();
    }
    // A dot segment is resolved by the parser; an encoded one (`%2e%2e`) is refused outright.
    if got
        .iter()
        .any(|s| s.eq_ignore_ascii_case("%2e%2e") || s.eq_ignore_ascii_case("%2e"))
    {
        return false;
    }
    got.len() >= want.len() && got[..want.len()] == want[..]
}

/// Whether an address is on the public internet (not loopback, private, link-local, shared
/// address space, unspecified, multicast, documentation or benchmarking ranges, or an IPv6
/// unique-local or IPv4-mapped form of those).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}

/// Where a request body names media by URL: the parameter to name in errors, the URL, and
/// the kind of media ("video" or "image").
fn remote_urls(body: &Map<String, Value>) -> Vec<(String, String, &'static str)> {
    let remote = |v: &Value| {
        v.as_str()
            .is_some_and(|s| s.starts_with("http://") || s.starts_with("https://"))
    };
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let mut found = vec![];
    for (key, value) in body.iter() {
        match (key.as_str(), value) {
            // `/v1/videos/*`'s JSON: `video` and `images`.
            ("video", v) if remote(v) => found.push(("video".to_string(), text(v), "video")),
            ("images", Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    if remote(v) {
                        found.push((format!("images[{i}]"), text(v), "image"));
                    }
                }
            }
            // Chat: `video_url` and `image_url` parts, `{"url": ...}` or the URL alone.
            ("messages", Value::Array(messages)) => {
                for m in messages.iter() {
                    let Some(Value::Array(parts)) = m.get("content") else {
                        continue;
                    };
                    for p in parts.iter() {
                        let (field, kind) = if p.get("video_url").is_some() {
                            ("video_url", "video")
                        } else if p.get("image_url").is_some() {
                            ("image_url", "image")
                        } else {
                            continue;
                        };
                        let slot = match p.get(field) {
                            Some(Value::Object(o)) => match o.get("url") {
                                Some(u) => u,
                                None => continue,
                            },
                            Some(other) => other,
                            None => continue,
                        };
                        if remote(slot) {
                            found.push((field.to_string(), text(slot), kind));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    found
}

/// Checks a tenant's `media_allow` (the admin API's and the CLI's): each an `http(s)://` URL
/// with a host and no credentials, or a `file:///` URL of an absolute folder.
pub fn check_media_allow(list: &[String]) -> Result<(), String> {
    for p in list {
        let u = url::Url::parse(p).map_err(|e| format!("media_allow: `{p}` is not a URL: {e}"))?;
        let ok = match u.scheme() {
            "http" | "https" => {
                u.host_str().is_some() && u.username().is_empty() && u.password().is_none()
            }
            "file" => u.host_str().is_none_or(str::is_empty) && u.to_file_path().is_ok(),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "media_allow: `{p}` must be an http(s):// URL with a host and no credentials, \
                 or a file:/// folder"
            ));
        }
    }
    Ok(())
}

/// The folders `file://` URLs may read from for a tenant: the server's `file_allow`, narrowed
/// by the tenant's `file:///` prefixes when it has a `media_allow` (of each overlapping pair,
/// the narrower folder).
pub fn tenant_folders<'a>(
    server: &'a [std::path::PathBuf],
    t: &Tenant,
) -> std::borrow::Cow<'a, [std::path::PathBuf]> {
    let Some(mine) = &t.media_allow else {
        return std::borrow::Cow::Borrowed(server);
    };
    let canonical = |p: &std::path::Path| p.canonicalize().ok();
    let mine: Vec<std::path::PathBuf> = mine
        .iter()
        .filter_map(|p| url::Url::parse(p).ok())
        .filter(|u| u.scheme() == "file")
        .filter_map(|u| u.to_file_path().ok())
        .filter_map(|p| canonical(&p))
        .collect();
    let mut folders = Vec::new();
    for s in server.iter().filter_map(|s| canonical(s)) {
        for m in &mine {
            if m.starts_with(&s) {
                folders.push(m.clone());
            } else if s.starts_with(m) {
                folders.push(s.clone());
            }
        }
    }
    std::borrow::Cow::Owned(folders)
}

/// Where a request's media may come from, for its tenant: the `http(s)://` URLs it names,
/// fetched under the tenant's URL policy, and `file://` under the tenant's folders. Every route
/// that takes media by URL reads it through this (so the tenant's `media_allow` applies to all).
pub async fn media_sources<'a>(
    s: &'a crate::AppState,
    t: &Tenant,
    body: &Map<String, Value>,
) -> Result<crate::validation::MediaSources<'a>, ApiError> {
    let fetched = fetch_media(&s.url_policy.for_tenant(t), &s.metrics, body).await?;
    let folders = tenant_folders(&s.config.file_allow, t);
    Ok(crate::validation::MediaSources::new(folders, fetched))
}

/// The most media URLs one request may name.
pub const MAX_MEDIA_URLS: usize = 64;

/// Fetches every `http(s)://` media URL a request body names: all are checked against the
/// policy before any is fetched, then each distinct URL is fetched once, one after another off
/// the async threads, the request's URLs together held to the media byte limit (as an upload's
/// body is), at most [`MAX_MEDIA_URLS`] of them; each outcome is counted in `metrics`. The
/// bodies come back by URL for [`crate::validation::resolve_url`] (no copy through base64).
pub async fn fetch_media(
    policy: &UrlPolicy,
    metrics: &Metrics,
    body: &Map<String, Value>,
) -> Result<crate::validation::Fetched, ApiError> {
    let urls = remote_urls(body);
    let mut fetched = crate::validation::Fetched::new();
    if urls.is_empty() {
        return Ok(fetched);
    }
    if urls.len() > MAX_MEDIA_URLS {
        metrics.media_fetch("refused", 0, None);
        return Err(ApiError::Validation(format!(
            "{} media URLs; at most {MAX_MEDIA_URLS} per request",
            urls.len()
        )));
    }
    let checked = urls
        .iter()
        .map(|(_, raw, _)| policy.check(raw))
        .collect::<Result<Vec<_>, _>>()
        .inspect_err(|_| metrics.media_fetch("refused", 0, None))?;
    let mut left = policy.max_bytes;
    for ((param, raw, kind), u) in urls.into_iter().zip(checked) {
        if let Some(body) = fetched.get_mut(&raw) {
            body.uses += 1;
            continue;
        }
        let p = policy.clone();
        let (got, seconds) = tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            (p.fetch(&u, &param, left), t0.elapsed().as_secs_f64())
        })
        .await
        .map_err(|e| ApiError::Internal(format!("fetch task: {e}")))?;
        let bytes = got.inspect_err(|e| {
            let result = match e {
                ApiError::Forbidden(_) => "refused",
                ApiError::PayloadTooLarge(_) => "too_large",
                _ => "failed",
            };
            metrics.media_fetch(result, 0, Some(seconds));
        })?;
        metrics.media_fetch("ok", bytes.len() as u64, Some(seconds));
        left -= bytes.len() as u64;
        let image = kind == "image";
        fetched.insert(
            raw,
            crate::validation::FetchedBody {
                image,
                bytes,
                uses: 1,
            },
        );
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> UrlPolicy {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        UrlPolicy::new(&allow, false, 5.0, 1 << 20).unwrap()
    }

    #[test]
    fn only_urls_under_an_allowed_prefix_pass() {
        let p = policy(&[
            "https://cdn.example.com/videos/",
            "http://store.local:9000/bucket",
        ]);
        for ok in [
            "https://cdn.example.com/videos/a.mp4",
            "https://CDN.example.com/videos/sub/b.mp4?X-Sig=1",
            "https://cdn.example.com:443/videos/a.mp4",
            "http://store.local:9000/bucket",
            "http://store.local:9000/bucket/x.webm",
        ] {
            assert!(p.check(ok).is_ok(), "{ok}");
        }
        for refused in [
            "https://cdn.example.com.evil.net/videos/a.mp4",
            "https://cdn.example.com/videos-private/a.mp4",
            "https://cdn.example.com/video/a.mp4",
            "https://cdn.example.com/videos/../secret/a.mp4",
            "https://cdn.example.com/videos/%2e%2e/secret",
            "http://cdn.example.com/videos/a.mp4",
            "https://cdn.example.com:8443/videos/a.mp4",
            "https://user:pw@cdn.example.com/videos/a.mp4",
            "http://store.local:9001/bucket/x.webm",
            "http://store.local:9000/bucket2/x.webm",
        ] {
            assert!(
                matches!(p.check(refused), Err(ApiError::Forbidden(_))),
                "{refused}"
            );
        }
        assert!(matches!(
            policy(&[]).check("https://cdn.example.com/videos/a.mp4"),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[test]
    fn the_configuration_is_checked() {
        for bad in ["ftp://x/", "not a url", "https://u:p@x/", "file:///etc/"] {
            assert!(
                UrlPolicy::new(&[bad.into()], false, 5.0, 1).is_err(),
                "{bad}"
            );
        }
        assert!(UrlPolicy::new(&["https://x/".into()], false, 0.0, 1).is_err());
    }

    #[test]
    fn local_and_private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "100.128.0.1"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_name_resolving_to_a_local_address_is_refused() {
        let p = policy(&["http://localhost/"]);
        let u = p.check("http://localhost/a.mp4").unwrap();
        let e = p.fetch(&u, "video", 1 << 20).unwrap_err();
        assert!(
            matches!(e, ApiError::Forbidden(ref m) if m.contains("private or local")),
            "{e:?}"
        );
    }
}
