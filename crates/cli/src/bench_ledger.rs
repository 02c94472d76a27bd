//! `vvlm bench ledger`: admissions per second through the ledger (reserve, then settle: what
//! every admitted request costs it), from R replicas (independent ledger handles, each with its
//! own connections and replica id) with C clients each, all charging one tenant with a quota.

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vvlm_server::ledger::{self, LeaseSettings, Ledger, Options, TenantSettings};

#[derive(Args, Debug)]
pub struct LedgerBenchArgs {
    /// The ledger: a SQLite file path or a postgres:// URL.
    #[arg(long, env = "VVLM_DB", hide_env_values = true)]
    pub db: String,
    /// Replicas: independent ledger handles (own connections, own replica id).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Concurrent clients per replica (each reserves, then settles, in a loop).
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    backend: &'static str,
    replicas: usize,
    clients_per_replica: usize,
    seconds: f64,
    admissions: u64,
    admissions_per_s: f64,
    reserve_p50_ms: f64,
    reserve_p99_ms: f64,
    settle_p50_ms: f64,
    settle_p99_ms: f64,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize] * 1e3
}

pub fn run(a: LedgerBenchArgs) -> Result<()> {
    let replicas: Vec<Arc<dyn Ledger>> = (0..a.replicas.max(1))
        .map(|_| {
            let mut o = Options::new(LeaseSettings::new(30));
            o.pool_size = a.clients.max(1);
            ledger::open(&a.db, &o)
        })
        .collect::<Result<_, _>>()?;
    let name = format!("bench-{}-{}", std::process::id(), ledger::now());
    // A quota far above what the run can use: the quota check runs on every reservation.
    let (tenant, _) = replicas[0].create_tenant(
        &name,
        &TenantSettings {
            quota: Some(Some(1e30)),
            ..Default::default()
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let t0 = Instant::now();
    let results: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = replicas
            .iter()
            .enumerate()
            .flat_map(|(r, l)| (0..a.clients.max(1)).map(move |c| (r, c, l.clone())))
            .map(|(r, c, l)| {
                let t = tenant.clone();
                let owner = l.lease().owner.clone();
                s.spawn(move || {
                    let (mut res, mut set) = (vec![], vec![]);
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        let id = format!("{owner}-{r}-{c}-{i}");
                        i += 1;
                        let t1 = Instant::now();
                        let rv = l.reserve(&t, 1e9, &id, ledger::now());
                        res.push(t1.elapsed().as_secs_f64());
                        if rv.is_err() {
                            continue;
                        }
                        let t2 = Instant::now();
                        let _ = l.settle(&id, 9e8, ledger::now());
                        set.push(t2.elapsed().as_secs_f64());
                    }
                    (res, set)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = t0.elapsed().as_secs_f64();
    let (mut res, mut set): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    for (r, s) in results {
        res.extend(r);
        set.extend(s);
    }
    let u = replicas[0].usage(&tenant, ledger::now())?;
    anyhow::ensure!(
        u.requests as usize == set.len() && u.reserved_flops == 0.0,
        "the ledger disagrees with the benchmark: {u:?}, {} settled",
        set.len()
    );
    let r = Report {
        backend: replicas[0].backend(),
        replicas: replicas.len(),
        clients_per_replica: a.clients.max(1),
        seconds: secs,
        admissions: set.len() as u64,
        admissions_per_s: set.len() as f64 / secs,
        reserve_p50_ms: pct(&mut res, 0.5),
        reserve_p99_ms: pct(&mut res, 0.99),
        settle_p50_ms: pct(&mut set, 0.5),
        settle_p99_ms: pct(&mut set, 0.99),
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{:<8} replicas {} x {} clients: {:>8.0} admissions/s ({} in {:.1} s); reserve p50 {:.2} ms p99 {:.2} ms; settle p50 {:.2} ms p99 {:.2} ms",
            r.backend, r.replicas, r.clients_per_replica, r.admissions_per_s, r.admissions, r.seconds,
            r.reserve_p50_ms, r.reserve_p99_ms, r.settle_p50_ms, r.settle_p99_ms
        );
    }
    Ok(())
}
