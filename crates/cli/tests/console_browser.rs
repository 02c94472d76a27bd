//! The web console in a real browser: Debian's headless Chromium, driven over the W3C WebDriver
//! protocol (chromedriver; a small client below on `ureq`), against a real `vvlm serve` on
//! 127.0.0.1 serving the committed suite ladder. Covers what a user does: enter a key (a wrong
//! one first), upload a suite video, move the budget slider and see the plan change, run side by
//! side with the naive configuration and see the streamed answers and the FLOPs tables; on the
//! tenants page see the charges appear, create a tenant, change a quota and rotate a key. The
//! browser's log must hold no error but the expected 401. With `VVLM_SCREENSHOTS=DIR` it writes
//! the README's screenshots there.
//!
//! Needs `chromium` and `chromium-driver` (scripts/setup-system installs them); set
//! `VVLM_CHROMEDRIVER` / `VVLM_CHROMIUM` for other locations.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN: &str = "console-admin-key";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ready() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// `vvlm serve` on the embedded default configuration (the suite ladder), from the repository.
fn serve(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_vvlm"))
        .current_dir(repo())
        .args(["serve", "--bind", &format!("127.0.0.1:{port}"), "--db"])
        .arg(dir.join("vvlm.db"))
        .args(["--admin-key", ADMIN])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_for("vvlm serve ready", Duration::from_secs(120), || {
        ureq::get(&format!("{base}/health"))
            .call()
            .is_ok_and(|r| r.status() == 200)
    });
    (p, base)
}

fn api(method: &str, url: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let r = ureq::request(method, url).set("Authorization", &format!("Bearer {key}"));
    let r = match body {
        Some(b) => r.send_json(b),
        None => r.call(),
    };
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    (status, resp.into_json().unwrap_or(Value::Null))
}

/// A minimal W3C WebDriver client: one session of headless Chromium.
struct Browser {
    _driver: Proc,
    base: String,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        let driver = std::env::var("VVLM_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let chromium =
            std::env::var("VVLM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let port = free_port();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {driver}: {e}; install chromium and chromium-driver (scripts/setup-system)")
            });
        let driver = Proc(child);
        let url = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver ready", Duration::from_secs(30), || {
            ureq::get(&format!("{url}/status"))
                .call()
                .ok()
                .and_then(|r| r.into_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true)
        });
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--force-device-scale-factor=1", "--hide-scrollbars", "--no-first-run",
                         "--disable-extensions", "--lang=en-GB",
                         format!("--user-data-dir={}", profile.display())],
            },
        }}});
        let v: Value = ureq::post(&format!("{url}/session"))
            .send_json(caps)
            .expect("a new browser session")
            .into_json()
            .unwrap();
        let id = v["value"]["sessionId"].as_str().unwrap().to_string();
        Browser {
            _driver: driver,
            base: format!("{url}/session/{id}"),
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let r = ureq::request(method, &url);
        let r = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        match r {
            Ok(r) => r.into_json::<Value>().unwrap()["value"].take(),
            Err(ureq::Error::Status(code, r)) => {
                panic!(
                    "webdriver {method} {path}: {code} {}",
                    r.into_string().unwrap_or_default()
                )
            }
            Err(e) => panic!("webdriver {method} {path}: {e}"),
        }
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn size(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        match v[ELEMENT].as_str() {
            Some(e) => e.to_string(),
            None => panic!("no element {css}: {v}"),
        }
    }

    fn click(&self, css: &str) {
        let e = self.find(css);
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    fn keys(&self, css: &str, text: &str) {
        let e = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn select(&self, css: &str, value: &str) {
        self.js(
            "const s = document.querySelector(arguments[0]); s.value = arguments[1]; \
             s.dispatchEvent(new Event('change', {bubbles: true}));",
            json!([css, value]),
        );
    }

    fn text(&self, css: &str) -> String {
        self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            json!([css]),
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    /// Waits until `css` matches an element whose text contains `want`; returns the text.
    fn wait_text(&self, css: &str, want: &str, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            let got = self.text(css);
            if got.contains(want) {
                return got;
            }
            assert!(
                t.elapsed() < limit,
                "{css}: wanted {want:?} within {limit:?}, got {got:?}"
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn wait_js(&self, what: &str, script: &str, limit: Duration) {
        let t = Instant::now();
        while self.js(script, json!([])) != json!(true) {
            assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// The browser's console and network log since the last call.
    fn log(&self) -> Vec<Value> {
        match self.cmd("POST", "/se/log", Some(json!({"type": "browser"}))) {
            Value::Array(v) => v,
            other => panic!("browser log: {other}"),
        }
    }

    fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let png = self.cmd("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(path, bytes).unwrap();
        // Smaller files for the README when pngquant is installed (lossy palette, not needed
        // for the test).
        let small = Command::new("pngquant")
            .args([
                "--quality=70-95",
                "--speed",
                "1",
                "--force",
                "--ext",
                ".png",
            ])
            .arg(path)
            .status();
        if !small.is_ok_and(|s| s.success()) {
            eprintln!(
                "pngquant not run: {} left as Chromium wrote it",
                path.display()
            );
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&self.base).call();
    }
}

/// Errors in the browser log, except the lines `allowed` accepts.
fn errors(log: &[Value], allowed: impl Fn(&str) -> bool) -> Vec<String> {
    log.iter()
        .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .filter(|m| !allowed(m))
        .collect()
}

/// Fails when the page scrolls sideways at this window size (phone width, 200% zoom).
fn assert_fits(b: &Browser, width: u32) {
    b.size(width, 900);
    std::thread::sleep(Duration::from_millis(300));
    let v = b.js(
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth];",
        json!([]),
    );
    let (scroll, client) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
    if scroll > client {
        let wide = b.js(
            "return [...document.querySelectorAll('body *')] \
               .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1) \
               .filter(e => !e.parentElement.closest('.scroll')) \
               .concat([...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null \
                 && getComputedStyle(e).overflowX === 'visible' && e.scrollWidth > e.clientWidth + 1 \
                 && e.clientWidth > 0 && !e.closest('.scroll'))) \
               .slice(0, 8).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right));",
            json!([]),
        );
        let page = b.js("return location.hash;", json!([]));
        panic!("at {width} px wide {page} scrolls sideways ({scroll} > {client}): {wide}");
    }
}

/// Sizes the window to the whole page, scrolled to the top (a screenshot shows the viewport).
fn full_page(b: &Browser) {
    b.js("window.scrollTo(0, 0);", json!([]));
    b.size(1024, 900);
    std::thread::sleep(Duration::from_millis(300));
    let h = b.js("return document.documentElement.scrollHeight;", json!([]));
    // The window's frame takes some height from the viewport.
    b.size(1024, h.as_u64().unwrap() as u32 + 140);
    std::thread::sleep(Duration::from_millis(500));
    b.js("window.scrollTo(0, 0);", json!([]));
}

const LONG: Duration = Duration::from_secs(180);
const SHORT: Duration = Duration::from_secs(20);

#[test]
fn console_in_a_real_browser() {
    let dir = std::env::temp_dir().join(format!("vvlm-console-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (_server, base) = serve(&dir);
    // A tenant made through the API (the console must show what the API did).
    let (status, made) = api(
        "POST",
        &format!("{base}/admin/tenants"),
        ADMIN,
        Some(json!({"name": "acme", "quota": "1P", "per_request_max": "1T"})),
    );
    assert_eq!(status, 201, "{made}");
    let key = made["api_key"].as_str().unwrap().to_string();

    let b = Browser::start(&dir.join("profile"));
    b.size(1280, 900);
    b.goto(&format!("{base}/"));
    b.wait_text("#health", "server ready", SHORT);
    assert_eq!(b.text("#pg-title"), "Playground");

    // Every control has a label; nothing the page loads came from elsewhere.
    let unlabelled = b.js(
        "return [...document.querySelectorAll('input, select, textarea, output')] \
         .filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id);",
        json!([]),
    );
    assert_eq!(unlabelled, json!([]), "controls without a label");
    let foreign = b.js(
        "return performance.getEntriesByType('resource').map(r => r.name) \
         .filter(n => !n.startsWith(location.origin));",
        json!([]),
    );
    assert_eq!(foreign, json!([]));

    // A wrong key: a clear error, nothing planned.
    b.keys("#tenant-key", "vvlm_not_a_key\u{E007}"); // typed, then Enter (keyboard submit)
    let msg = b.wait_text("#tenant-key-status", "refused the key", SHORT);
    assert!(msg.contains("401"), "{msg}");
    assert_eq!(
        b.js(
            "return sessionStorage.getItem('vvlm.tenantKey');",
            json!([])
        ),
        Value::Null,
        "a refused key is not kept"
    );
    let log = b.log();
    assert!(
        log.iter().any(|e| e["message"]
            .as_str()
            .unwrap_or("")
            .contains("status of 401")),
        "the browser log is read (it shows the refused request): {log:?}"
    );
    let bad = errors(&log, |m| m.contains("status of 401"));
    assert!(bad.is_empty(), "browser errors: {bad:?}");

    // The right key: kept in sessionStorage only, never in the URL.
    b.keys("#tenant-key", &key);
    b.click("#tenant-key-save");
    b.wait_text("#tenant-key-status", "Key accepted: tenant acme", SHORT);
    let stored = b.js(
        "return [sessionStorage.getItem('vvlm.tenantKey'), localStorage.length, location.href];",
        json!([]),
    );
    assert_eq!(stored[0], json!(key));
    assert_eq!(stored[1], json!(0));
    assert!(!stored[2].as_str().unwrap().contains(&key[5..]));

    // Upload a suite video through the file input, ask about the flash.
    let video = repo().join("crates/server/console/samples/suite-00007.mp4");
    b.keys("#video-file", video.to_str().unwrap());
    b.wait_text("#video-name", "suite-00007.mp4", SHORT);
    b.select("#task", "temporal");
    b.js(
        "const q = document.getElementById('question'); q.value = ''; q.focus();",
        json!([]),
    );
    b.keys("#question", "what colour is the flash ?");
    b.wait_text("#plan-status", "Planned for", SHORT);
    b.wait_js(
        "the frontier plot",
        "return document.querySelectorAll('#frontier svg .front').length === 3 \
         && !!document.querySelector('#frontier svg .choice');",
        SHORT,
    );

    // The slider, by keyboard: Home (cheapest) and End (dearest) give different plans.
    let plan_text = |b: &Browser| {
        format!(
            "{} | {} | {} | {}",
            b.text("#plan-model"),
            b.text("#plan-frames"),
            b.text("#plan-tokens"),
            b.text("#plan-cost-total")
        )
    };
    b.keys("#budget", "\u{E011}"); // Home
    let low_budget = b.text("#budget-value");
    b.wait_text(
        "#plan-status",
        &format!("Planned for {low_budget} FLOPs"),
        SHORT,
    );
    let low = plan_text(&b);
    b.keys("#budget", "\u{E010}"); // End
    let high_budget = b.text("#budget-value");
    assert_ne!(low_budget, high_budget);
    b.wait_text(
        "#plan-status",
        &format!("Planned for {high_budget} FLOPs"),
        SHORT,
    );
    let high = plan_text(&b);
    assert_ne!(low, high, "the plan did not change with the budget");
    eprintln!("plan at the lowest budget: {low}\nplan at the highest: {high}");
    // A middle budget for the run (3 GFLOPs), as a drag would leave it.
    b.js(
        "const s = document.getElementById('budget'); s.value = '9.5'; \
         s.dispatchEvent(new Event('input', {bubbles: true}));",
        json!([]),
    );
    b.wait_text("#budget-value", "3.16G", SHORT);
    b.wait_text("#plan-status", "Planned for 3.16G", SHORT);
    assert!(b.text("#plan-cost").contains("LM prefill"));

    // Run side by side with the naive configuration, the answer held to three colours: both
    // answers stream (each exactly one of them), then the tables.
    b.keys("#choices", "white, red, blue");
    b.click("#side-by-side");
    b.wait_js(
        "the naive point",
        "return !!document.querySelector('#frontier svg .naive');",
        SHORT,
    );
    b.click("#run");
    b.wait_js(
        "two finished runs",
        "return document.querySelectorAll('#results .result.done').length === 2;",
        LONG,
    );
    assert_eq!(b.text("#run-error"), "");
    let results = b.js(
        "return [...document.querySelectorAll('#results .result')].map(r => ({ \
           title: r.querySelector('h3').textContent, answer: r.querySelector('.answer').textContent, \
           flops: [...r.querySelectorAll('table.flops tbody tr')].map(tr => [...tr.children].map(c => c.textContent)), \
           times: r.querySelector('table.times').textContent }));",
        json!([]),
    );
    eprintln!("runs: {results:#}");
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["title"], "Plan");
    assert_eq!(results[1]["title"], "Naive");
    for r in results {
        let answer = r["answer"].as_str().unwrap();
        assert!(["white", "red", "blue"].contains(&answer), "{r}");
        let rows = r["flops"].as_array().unwrap();
        assert_eq!(rows.len(), 5, "{r}");
        let total = rows[4].as_array().unwrap();
        assert_eq!(total[0], "total");
        assert_ne!(total[2], "-");
        assert!(r["times"].as_str().unwrap().contains("LM prefill"));
    }
    if let Ok(out) = std::env::var("VVLM_SCREENSHOTS") {
        let out = repo().join(out);
        std::fs::create_dir_all(&out).unwrap();
        full_page(&b);
        b.screenshot(&out.join("console-playground.png"));
        b.size(1280, 900);
    }

    // The plan again on the same video: the server's video cache supplies its vision features
    // (neither run nor charged), and the console says so.
    b.click("#side-by-side");
    b.click("#run");
    b.wait_js(
        "the rerun",
        "return document.querySelectorAll('#results .result.done').length === 1;",
        LONG,
    );
    let again = b.text("#results .result");
    assert!(again.contains("from the video cache"), "{again}");
    assert!(again.contains("vision tower (cached)"), "{again}");

    // The tenants page: a wrong admin key is refused clearly, the right one shows the charges.
    b.goto(&format!("{base}/#tenants"));
    b.wait_text("#tn-title", "Tenants", SHORT);
    b.keys("#admin-key", "wrong-admin-key");
    b.click("#admin-key-save");
    b.wait_text("#tenants-error", "refused the key (401", SHORT);
    b.keys("#admin-key", ADMIN);
    b.click("#admin-key-save");
    b.wait_text("#tenant-list", "acme", SHORT);
    assert_eq!(b.text("#tenants-error"), "");
    let row = b.js(
        "const tr = [...document.querySelectorAll('#tenant-list tbody tr')] \
           .find(r => r.textContent.includes('acme')); return [...tr.children].map(c => c.textContent);",
        json!([]),
    );
    eprintln!("acme: {row}");
    assert_eq!(row[6], "3", "three requests charged: {row}");
    assert_eq!(row[9], "0", "none in flight now: {row}");
    assert_ne!(row[2], "0", "used: {row}");
    let (_, usage) = api("GET", &format!("{base}/v1/usage"), &key, None);
    assert_eq!(usage["requests"], 3);
    b.click("#tenant-list tbody button");
    b.wait_text("#td-title", "Tenant acme", SHORT);
    b.wait_js(
        "recent requests",
        "return document.querySelectorAll('#requests tbody tr').length === 3;",
        SHORT,
    );
    let reqs = b.text("#requests");
    assert!(
        reqs.contains("settled") && reqs.contains("suite-"),
        "{reqs}"
    );
    b.wait_js(
        "a bar in the usage chart",
        "return document.querySelectorAll('#usage-chart svg .bar').length >= 1;",
        SHORT,
    );

    // Change the quota, rotate the key (the old one stops working), create a tenant.
    b.js("document.getElementById('quota').value = '';", json!([]));
    b.keys("#quota", "2P");
    b.click("#quota-form button[type=submit]");
    b.wait_text("#tenant-list", "2.00P", SHORT);
    // Its limit of requests in flight: 0 is refused before it is sent, 4 is kept and shown.
    b.keys("#in-flight", "0");
    b.click("#in-flight-form button[type=submit]");
    b.wait_text("#tenants-error", "1 or more", SHORT);
    b.js(
        "document.getElementById('in-flight').value = '';",
        json!([]),
    );
    b.keys("#in-flight", "4");
    b.keys("#weight", "2.5");
    b.click("#in-flight-form button[type=submit]");
    b.wait_js(
        "the limit in the list",
        "const tr = [...document.querySelectorAll('#tenant-list tbody tr')] \
           .find(r => r.textContent.includes('acme')); return tr && tr.lastElementChild.textContent === '4';",
        SHORT,
    );
    assert_eq!(b.text("#tenants-error"), "");
    let (_, acme) = api("GET", &format!("{base}/admin/tenants/acme"), ADMIN, None);
    assert_eq!(
        (&acme["max_in_flight"], &acme["weight"]),
        (&json!(4), &json!(2.5)),
        "{acme}"
    );
    // Where its media may be read from: a bad prefix is refused before it is sent; two
    // lines are kept; emptied, the tenant is back on the server's lists.
    b.keys("#media-allow", "ftp://nowhere/");
    b.click("#media-form button[type=submit]");
    b.wait_text("#tenants-error", "media prefixes", SHORT);
    b.js(
        "document.getElementById('media-allow').value = '';",
        json!([]),
    );
    b.keys(
        "#media-allow",
        "https://cdn.example.com/acme/\nfile:///srv/acme/",
    );
    b.click("#media-form button[type=submit]");
    wait_for("the media prefixes kept", SHORT, || {
        let (_, t) = api("GET", &format!("{base}/admin/tenants/acme"), ADMIN, None);
        t["media_allow"] == json!(["https://cdn.example.com/acme/", "file:///srv/acme/"])
    });
    b.wait_js(
        "the refusal cleared",
        "return document.getElementById('tenants-error').textContent === '';",
        SHORT,
    );
    b.js(
        "document.getElementById('media-allow').value = '';",
        json!([]),
    );
    b.click("#media-form button[type=submit]");
    wait_for("the media prefixes cleared", SHORT, || {
        let (_, t) = api("GET", &format!("{base}/admin/tenants/acme"), ADMIN, None);
        t["media_allow"].is_null()
    });
    b.click("#rotate");
    b.wait_text("#tenant-key-out", "shown once", SHORT);
    let new_key = b.text("#tenant-key-out code");
    assert!(new_key.starts_with("vvlm_") && new_key != key);
    assert_eq!(api("GET", &format!("{base}/v1/usage"), &key, None).0, 401);
    assert_eq!(
        api("GET", &format!("{base}/v1/usage"), &new_key, None).0,
        200
    );
    b.keys("#new-name", "beta-team");
    b.keys("#new-quota", "5T");
    b.keys("#new-in-flight", "2");
    b.keys("#new-weight", "0.5");
    b.click("#create");
    b.wait_text("#created-key-out", "API key of beta-team", SHORT);
    b.wait_text("#tenant-list", "beta-team", SHORT);
    let (status, beta) = api(
        "GET",
        &format!("{base}/admin/tenants/beta-team"),
        ADMIN,
        None,
    );
    assert_eq!(
        (
            status,
            beta["quota"].as_f64(),
            beta["max_in_flight"].as_u64(),
            beta["weight"].as_f64()
        ),
        (200, Some(5e12), Some(2), Some(0.5))
    );
    if let Ok(out) = std::env::var("VVLM_SCREENSHOTS") {
        // Hide the freshly shown keys from the picture.
        b.js(
            "document.querySelectorAll('.keyout').forEach(e => e.replaceChildren());",
            json!([]),
        );
        full_page(&b);
        b.screenshot(&repo().join(out).join("console-tenants.png"));
    }

    // The API the console used, as documented: the history, refused to a tenant's key.
    let (status, h) = api(
        "GET",
        &format!("{base}/admin/tenants/acme/requests?limit=1&bucket_s=60&buckets=5"),
        ADMIN,
        None,
    );
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["requests"].as_array().unwrap().len(), 1);
    let last = &h["requests"][0];
    assert_eq!(last["state"], "settled");
    assert!(last["charged_flops"].as_f64().unwrap() > 0.0);
    assert_eq!(last["plan"]["task"], "temporal");
    assert!(last["plan"].get("runners_up").is_none());
    let points = h["series"]["points"].as_array().unwrap();
    assert_eq!(points.len(), 5);
    let charged: f64 = points
        .iter()
        .map(|p| p["charged_flops"].as_f64().unwrap())
        .sum();
    assert!(charged > 0.0, "{h}");
    let bad = format!("{base}/admin/tenants/acme/requests?limit=0");
    assert_eq!(api("GET", &bad, ADMIN, None).0, 422);
    let history = format!("{base}/admin/tenants/acme/requests");
    assert_eq!(api("GET", &history, &new_key, None).0, 401);
    let rotate = format!("{base}/admin/tenants/acme/key");
    assert_eq!(api("POST", &rotate, &new_key, None).0, 401);
    assert_eq!(
        api(
            "GET",
            &format!("{base}/admin/tenants/nobody/requests"),
            ADMIN,
            None
        )
        .0,
        404
    );
    // /v1/plan: the price by component adds up; the candidates hold the choice.
    let (status, p) = api(
        "POST",
        &format!("{base}/v1/plan"),
        &new_key,
        Some(
            json!({"budget": "1G", "task": "caption", "prompt": "describe the video .", "candidates": true}),
        ),
    );
    assert_eq!(status, 200, "{p}");
    let parts = &p["cost_by_component"];
    let sum: f64 = ["vision", "projector", "lm_prefill", "lm_decode"]
        .iter()
        .map(|k| parts[k].as_f64().unwrap())
        .sum();
    let cost = p["cost_flops"].as_f64().unwrap();
    assert!((sum - cost).abs() <= 1e-6 * cost, "{parts} vs {cost}");
    let cands = p["candidates"].as_array().unwrap();
    assert_eq!(cands.len() as u64, p["considered"].as_u64().unwrap());
    assert!(cands.iter().any(|c| c["model"] == p["model"]
        && c["frames"] == p["frames"]
        && c["tokens_per_frame"] == p["tokens_per_frame"]));
    assert!(cands
        .iter()
        .any(|c| c["cost_flops"].as_f64().unwrap() > 1e9));

    // The batches page: a JSONL file chosen in the file input runs as a batch; the table
    // follows it to `completed`; its answers and its refused line are shown.
    let jsonl = dir.join("requests.jsonl");
    let line = |id: &str, body: Value| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions", "body": body})
            .to_string()
    };
    let chat = |text: &str| json!([{"role": "user", "content": text}]);
    std::fs::write(
        &jsonl,
        [
            line(
                "flash",
                json!({"messages": chat("what colour is the flash ?"), "max_tokens": 3}),
            ),
            line("too-hot", json!({"messages": chat("hi"), "temperature": 9})),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    b.goto(&format!("{base}/#batches"));
    b.keys("#batch-key", &format!("{new_key}\u{E007}"));
    b.wait_text("#batch-list", "No batch yet", SHORT);
    b.keys("#batch-file", jsonl.to_str().unwrap());
    b.click("#batch-run");
    b.wait_text("#batch-status", "2 requests to /v1/chat/completions", SHORT);
    b.wait_text("#batch-list", "completed", LONG);
    let list = b.text("#batch-list");
    assert!(list.contains("2/2 answered, 1 failed"), "{list}");
    b.click("#batch-list button.output");
    b.wait_text("#batch-lines", "flash", SHORT);
    if let Ok(out) = std::env::var("VVLM_SCREENSHOTS") {
        full_page(&b);
        b.screenshot(&repo().join(&out).join("console-batches.png"));
    }
    b.click("#batch-list button.errors");
    b.wait_text("#batch-lines", "temperature", SHORT);
    let (_, listed) = api("GET", &format!("{base}/v1/batches"), &new_key, None);
    assert_eq!(
        listed["data"][0]["request_counts"],
        json!({"total": 2, "completed": 1, "failed": 1})
    );

    // Phone width and 200% zoom (a 1280 px window at 200% is 640 CSS px): no sideways scroll.
    for page in ["#tenants", "#batches", "#playground"] {
        b.goto(&format!("{base}/{page}"));
        for w in [360, 640] {
            assert_fits(&b, w);
        }
    }

    // No console errors, CSP violations or failed loads but the wrong keys' 401s.
    let bad = errors(&b.log(), |m| m.contains("status of 401"));
    assert!(bad.is_empty(), "browser errors: {bad:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
