//! Scale-out end to end: three `vvlm serve` replicas on loopback sharing one real PostgreSQL
//! (`VVLM_TEST_POSTGRES_URL`, from scripts/with-postgres; without it this test fails, it is
//! never skipped), serving the demo checkpoint (SmolLM2-135M from GGUF).
//!
//! One test, in phases, because it stops the database: (0) two batches run over the replicas,
//! each line once; (1) a tenant whose quota fits exactly k
//! requests sends 4k at once, spread over the replicas; (2) a replica is killed (-9) mid-request
//! while another runs a request longer than the lease; (3) PostgreSQL is stopped mid-request and
//! started again.

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN: &str = "replica-admin-key";
/// Short leases, so that the test sees them run out (renewed every second).
const LEASE_S: &str = "3";

mod common;
use common::{custom_ids, get_text, models_dir, scratch, upload_batch_file, vvlm};

struct Replica {
    child: Child,
    base: String,
}

impl Replica {
    fn start(db: &str, i: usize) -> Replica {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = vvlm()
            .arg("serve")
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--db", db])
            .arg("--ledger-journal")
            .arg(scratch().join(format!("replica-{i}.journal")))
            .args(["--lease-s", LEASE_S])
            .arg("--models-dir")
            .arg(models_dir())
            .args(["--admin-key", ADMIN])
            .args(["--cost-mode", "theoretical"])
            .args(["--workers", "1", "--threads-per-worker", "1"])
            .args(["--queue-depth", "32", "--queue-wait-s", "30"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Replica {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let t = Instant::now();
        while !matches!(ureq::get(&r.url("/health")).call(), Ok(x) if x.status() == 200) {
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "replica {i} did not become ready"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        r
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let text = ureq::get(&self.url("/metrics"))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (status, Retry-After, JSON body)
fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Option<String>, Value) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("retry-after").map(String::from);
    let text = resp.into_string().unwrap();
    (
        status,
        retry,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn post(r: &Replica, path: &str, key: &str, body: Value) -> (u16, Option<String>, Value) {
    answer(
        ureq::post(&r.url(path))
            .set("Authorization", &format!("Bearer {key}"))
            .timeout(Duration::from_secs(300))
            .send_json(body),
    )
}

fn usage(r: &Replica, key: &str) -> Value {
    let (status, _, body) = answer(
        ureq::get(&r.url("/v1/usage"))
            .set("Authorization", &format!("Bearer {key}"))
            .call(),
    );
    assert_eq!(status, 200, "{body}");
    body
}

fn tenant(r: &Replica, name: &str, quota: f64) -> String {
    let (status, _, body) = answer(
        ureq::post(&r.url("/admin/tenants"))
            .set("Authorization", &format!("Bearer {ADMIN}"))
            .send_json(
                json!({"name": name, "quota": quota, "per_request_max": "10T",
                              "default_budget": "2T"}),
            ),
    );
    assert_eq!(status, 201, "{body}");
    body["api_key"].as_str().unwrap().to_string()
}

fn chat(max_tokens: u64) -> Value {
    json!({"model": "auto", "max_tokens": max_tokens, "budget_flops": "2T",
           "messages": [{"role": "user", "content": "Tell me a story about a cat."}]})
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn postgres_ctl(action: &str) {
    let ctl = std::env::var("VVLM_TEST_POSTGRES_CTL")
        .expect("VVLM_TEST_POSTGRES_CTL is not set: run under scripts/with-postgres");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("{ctl} -m fast {action} >/dev/null"))
        .status()
        .unwrap();
    assert!(st.success(), "pg_ctl {action}");
}

#[test]
fn three_replicas_share_one_quota_survive_a_kill_and_the_database_going_away() {
    let server = std::env::var("VVLM_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!("VVLM_TEST_POSTGRES_URL is not set: run under scripts/with-postgres (scripts/test does)")
    });
    let db =
        vvlm_server::ledger::PostgresLedger::create_scratch_database(&server, "vvlm_e2e").unwrap();
    models_dir();
    let replicas: Vec<Replica> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let db = db.clone();
                s.spawn(move || Replica::start(&db, i))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });

    // The planned price of one request, from /v1/plan, checked against a real run.
    let free = tenant(&replicas[0], "calibration", 1e18);
    let (status, _, plan) = post(
        &replicas[1],
        "/v1/plan",
        &free,
        json!({"budget": "2T", "prompt": "Tell me a story about a cat.", "text_only": true,
               "max_tokens": 2}),
    );
    assert_eq!(status, 200, "{plan}");
    let price = f(&plan["cost_flops"]);
    let (status, _, c) = post(&replicas[2], "/v1/chat/completions", &free, chat(2));
    assert_eq!(status, 200, "{c}");
    assert_eq!(f(&c["usage"]["theoretical_flops"]), price, "{c}");

    // (0) Batches over the replicas: two batches of six lines, uploaded on one replica and
    // created on another, are taken by the replicas (one each at a time, under a lease in the
    // shared database) and closed with every line answered exactly once.
    let batcher = tenant(&replicas[0], "batcher", 1e18);
    let jsonl: String = (0..6)
        .map(|i| {
            json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": chat(3)})
            .to_string()
                + "\n"
        })
        .collect();
    let (status, file) = upload_batch_file(&replicas[0].base, &batcher, &jsonl);
    assert_eq!(status, 200, "{file}");
    let create = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                        "completion_window": "24h"});
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let (status, _, b) = post(&replicas[1], "/v1/batches", &batcher, create.clone());
            assert_eq!(status, 200, "{b}");
            b["id"].as_str().unwrap().to_string()
        })
        .collect();
    for id in &ids {
        let path = format!("/v1/batches/{id}");
        let mut b = Value::Null;
        wait_for("a batch to close", Duration::from_secs(240), || {
            b = ureq::get(&replicas[2].url(&path))
                .set("Authorization", &format!("Bearer {batcher}"))
                .call()
                .unwrap()
                .into_json()
                .unwrap();
            b["status"] != "in_progress"
        });
        assert_eq!(b["status"], "completed", "{b}");
        assert_eq!(
            b["request_counts"],
            json!({"total": 6, "completed": 6, "failed": 0})
        );
        let output = get_text(
            &replicas[0].base,
            &format!(
                "/v1/files/{}/content",
                b["output_file_id"].as_str().unwrap()
            ),
            &batcher,
        );
        assert_eq!(
            custom_ids(&output),
            (0..6).map(|i| format!("line-{i}")).collect::<Vec<_>>()
        );
    }
    let ran: Vec<f64> = replicas
        .iter()
        .map(|r| {
            r.metric("vvlm_batch_lines_total{result=\"ok\"}")
                .unwrap_or(0.0)
        })
        .collect();
    assert_eq!(ran.iter().sum::<f64>(), 12.0, "each line ran once: {ran:?}");
    assert_eq!(usage(&replicas[2], &batcher)["requests"].as_u64(), Some(12));
    eprintln!("batch lines run per replica: {ran:?}");

    // (1) A quota that fits exactly k requests; 4k at once over the three replicas.
    const K: usize = 3;
    let quota = K as f64 * price + price / 2.0;
    let key = tenant(&replicas[1], "k-tenant", quota);
    let answers: Vec<(u16, Option<String>, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4 * K)
            .map(|i| {
                let (r, key) = (&replicas[i % 3], key.clone());
                s.spawn(move || post(r, "/v1/chat/completions", &key, chat(2)))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<&Value> = answers
        .iter()
        .filter(|a| a.0 == 200)
        .map(|a| &a.2)
        .collect();
    for a in answers.iter().filter(|a| a.0 != 200) {
        assert_eq!(a.0, 402, "refused only for the quota: {}", a.2);
    }
    assert_eq!(ok.len(), K, "exactly k admitted over the replicas");
    // Each admitted request is charged once: its measured FLOPs capped at its reservation.
    let expected: f64 = ok
        .iter()
        .map(|b| f(&b["usage"]["measured_flops"]["total"]).min(price))
        .sum();
    for r in &replicas {
        let u = usage(r, &key);
        assert!(f(&u["charged_flops"]) <= quota, "{u}");
        assert!(
            (f(&u["charged_flops"]) - expected).abs() <= 1e-9 * expected,
            "every replica reads the same usage: {u} vs {expected}"
        );
        assert_eq!(u["requests"].as_u64(), Some(K as u64), "{u}");
        assert_eq!(f(&u["reserved_flops"]), 0.0, "{u}");
    }
    // /metrics reads the shared ledger too.
    for r in &replicas {
        let text = ureq::get(&r.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("vvlm_tenant_charged_flops{tenant=\"k-tenant\"}"))
            .unwrap_or_else(|| panic!("no tenant usage in /metrics:\n{text}"));
        let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((v - expected).abs() <= 1e-9 * expected, "{line}");
    }

    // (2) kill -9 a replica mid-request, while another runs a request longer than the lease.
    // Two tenants, so that the killed request's reservation and the live one are observed apart
    // (with one, the live request finishing early read the same as the dead lease running out).
    let dead = tenant(&replicas[0], "killed-runner", 1e18);
    let big = tenant(&replicas[0], "long-runner", 1e18);
    let long_body = chat(400);
    let mut replicas = replicas;
    let doomed = replicas.pop().unwrap();
    let (k2, url) = (dead.clone(), doomed.url("/v1/chat/completions"));
    let b2 = long_body.clone();
    let killed = std::thread::spawn(move || {
        ureq::post(&url)
            .set("Authorization", &format!("Bearer {k2}"))
            .timeout(Duration::from_secs(120))
            .send_json(b2)
            .is_ok()
    });
    wait_for("the doomed request starts", Duration::from_secs(60), || {
        doomed.metric("vvlm_in_flight") == Some(1.0)
    });
    let (k3, url) = (big.clone(), replicas[0].url("/v1/chat/completions"));
    let survivor = std::thread::spawn(move || {
        let t = Instant::now();
        let a = answer(
            ureq::post(&url)
                .set("Authorization", &format!("Bearer {k3}"))
                .timeout(Duration::from_secs(300))
                .send_json(long_body),
        );
        (a, t.elapsed())
    });
    wait_for(
        "the surviving request starts",
        Duration::from_secs(60),
        || replicas[0].metric("vvlm_in_flight") == Some(1.0),
    );
    let mut doomed = doomed;
    doomed.child.kill().unwrap(); // SIGKILL
    doomed.child.wait().unwrap();
    assert!(!killed.join().unwrap(), "the killed request cannot succeed");
    assert!(
        f(&usage(&replicas[1], &dead)["reserved_flops"]) > 0.0,
        "the killed request's reservation is held at the kill"
    );
    // Within a lease (3 s, whole seconds, plus a renewal period) it stops counting.
    let t_kill = Instant::now();
    wait_for(
        "the killed replica's lease runs out",
        Duration::from_secs(10),
        || f(&usage(&replicas[1], &dead)["reserved_flops"]) == 0.0,
    );
    assert!(
        t_kill.elapsed() <= Duration::from_secs(6),
        "released within a lease: {:?}",
        t_kill.elapsed()
    );
    // A live replica's request is never expired under it, however long it runs.
    let states = |name: &str| -> Vec<String> {
        let (status, _, body) = answer(
            ureq::get(&replicas[1].url(&format!("/admin/tenants/{name}/requests")))
                .set("Authorization", &format!("Bearer {ADMIN}"))
                .call(),
        );
        assert_eq!(status, 200, "{body}");
        body["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["state"].as_str().unwrap().to_string())
            .collect()
    };
    let live = states("long-runner");
    assert!(
        live == ["open"] || live == ["settled"],
        "the live request: {live:?}"
    );
    // The others keep serving, and agree.
    let (status, _, _) = post(&replicas[1], "/v1/chat/completions", &big, chat(2));
    assert_eq!(status, 200);
    let ((status, _, done), took) = survivor.join().unwrap();
    assert_eq!(status, 200, "{done}");
    eprintln!("the surviving request took {took:?} (lease {LEASE_S} s)");
    assert_eq!(states("long-runner"), ["settled", "settled"]);
    let u0 = usage(&replicas[0], &big);
    let u1 = usage(&replicas[1], &big);
    assert_eq!(u0, u1);
    assert_eq!(f(&u0["reserved_flops"]), 0.0, "{u0}");
    assert_eq!(u0["requests"].as_u64(), Some(2), "{u0}");
    // The killed request is not charged; any replica marks its lease expired.
    wait_for("the dead lease is marked", Duration::from_secs(5), || {
        states("killed-runner") == ["expired"]
    });
    let d = usage(&replicas[0], &dead);
    assert_eq!(f(&d["charged_flops"]), 0.0, "{d}");
    assert_eq!(
        d["requests"].as_u64(),
        Some(0),
        "the killed request is not charged: {d}"
    );

    // (3) PostgreSQL stops while a request runs on replica 0.
    let before = usage(&replicas[1], &big);
    let (k4, url) = (big.clone(), replicas[0].url("/v1/chat/completions"));
    let inflight = std::thread::spawn(move || {
        answer(
            ureq::post(&url)
                .set("Authorization", &format!("Bearer {k4}"))
                .timeout(Duration::from_secs(300))
                .send_json(chat(120)),
        )
    });
    wait_for("the request starts", Duration::from_secs(60), || {
        replicas[0].metric("vvlm_in_flight") == Some(1.0)
    });
    postgres_ctl("stop");
    // New work is refused with 503 ledger_unavailable and a Retry-After, on every replica.
    for r in &replicas {
        let (status, retry, body) = post(r, "/v1/chat/completions", &big, chat(2));
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "ledger_unavailable", "{body}");
        assert!(retry.is_some());
    }
    // The request in flight still finishes; its settlement waits in replica 0's journal.
    let (status, _, done) = inflight.join().unwrap();
    assert_eq!(status, 200, "{done}");
    wait_for(
        "the settlement is journaled",
        Duration::from_secs(10),
        || replicas[0].metric("vvlm_ledger_journal_pending") == Some(1.0),
    );
    assert_eq!(replicas[1].metric("vvlm_ledger_available"), Some(0.0));
    postgres_ctl("start");
    // Back: the journal is replayed; the request is charged once, nothing is lost.
    let charged = f(&before["charged_flops"])
        + f(&done["usage"]["measured_flops"]["total"]).min(f(&done["usage"]["theoretical_flops"]));
    wait_for("the journal is replayed", Duration::from_secs(20), || {
        replicas[0].metric("vvlm_ledger_journal_pending") == Some(0.0)
            && ureq::get(&replicas[1].url("/v1/usage"))
                .set("Authorization", &format!("Bearer {big}"))
                .call()
                .is_ok()
    });
    for r in &replicas {
        let u = usage(r, &big);
        assert!(
            (f(&u["charged_flops"]) - charged).abs() <= 1e-9 * charged,
            "{u} vs {charged}"
        );
        assert_eq!(u["requests"].as_u64(), Some(3), "{u}");
        assert_eq!(f(&u["reserved_flops"]), 0.0, "{u}");
    }
    let (status, _, body) = post(&replicas[1], "/v1/chat/completions", &big, chat(2));
    assert_eq!(status, 200, "serving again: {body}");
}
