//! The ledger's test suite, one for every backend: each backend's test file implements
//! [`Harness`] (a fresh database per case) and expands [`crate::ledger_suite!`], which makes
//! one `#[test]` per case below. Times are synthetic unix seconds.

use crate::{
    journal::Entry, Closed, LeaseSettings, Leases, Ledger, LedgerError, Period, Reservation,
    Tenant, TenantSettings,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A backend under test: one fresh database per case.
pub trait Harness {
    /// Another handle on this case's database, as the replica `lease.owner`.
    fn open(&self, lease: LeaseSettings) -> Arc<dyn Ledger>;
    /// The first column of the first row of `sql` (an integer): reads stored rows.
    fn count(&self, sql: &str) -> i64;
}

/// One `#[test]` per case of the suite, each on a fresh database from `$harness`.
#[macro_export]
macro_rules! ledger_suite {
    ($harness:expr) => {
        $crate::ledger_suite!(@cases $harness;
            keys_are_hashed_and_tenants_isolated,
            settings_are_validated,
            settling_is_keyed_by_request_id_and_happens_once,
            a_dead_replicas_lease_runs_out_and_a_live_one_is_renewed,
            replicas_never_admit_past_the_quota,
            settlements_survive_the_database_being_down,
            keys_rotate_and_requests_keep_their_plans_and_charges,
            migrations_are_applied_once,
            files_are_a_tenants_own_and_capped,
            a_tenants_media_allow_is_kept_and_cleared,
            tenants_take_turns_and_open_batches_are_capped,
            old_batches_and_files_are_purged,
            a_batch_outlives_its_replica_and_closes_once);
    };
    (@cases $harness:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                $crate::suite::$case(&$harness);
            }
        )*
    };
}

/// The settled totals kept per (tenant, period) equal the settled rows they summarise.
fn assert_totals_consistent(h: &dyn Harness) {
    assert_eq!(
        h.count(
            "SELECT COUNT(*) FROM (
                 SELECT tenant_id, period_start, SUM(charged) AS c, COUNT(*) AS n
                 FROM reservations WHERE state = 'settled' GROUP BY tenant_id, period_start) s
             FULL OUTER JOIN usage_totals u USING (tenant_id, period_start)
             WHERE s.c IS NULL OR u.charged IS NULL OR ABS(s.c - u.charged) > 1e-6 * ABS(s.c) OR s.n <> u.requests"
        ),
        0,
        "usage_totals disagrees with the settled reservations"
    );
}

fn replica(name: &str, lease_s: i64) -> LeaseSettings {
    LeaseSettings {
        owner: name.to_string(),
        lease_s,
    }
}

fn quota(q: f64) -> TenantSettings {
    TenantSettings {
        quota: Some(Some(q)),
        ..Default::default()
    }
}

pub fn keys_are_hashed_and_tenants_isolated(h: &dyn Harness) {
    let l = h.open(replica("r1", 30));
    let (a, ka) = l.create_tenant("a", &quota(100.0)).unwrap();
    let (b, kb) = l.create_tenant("b", &TenantSettings::default()).unwrap();
    assert_ne!(ka, kb);
    assert_eq!(l.tenant_by_key(&ka).unwrap().unwrap().name, "a");
    assert!(l.tenant_by_key("vvlm_wrong").unwrap().is_none());
    assert_eq!(
        h.count(&format!(
            "SELECT COUNT(*) FROM tenants WHERE name = 'a' AND key_hash = '{}'",
            crate::hash_key(&ka)
        )),
        1,
        "the key is stored hashed"
    );
    assert_eq!(
        h.count(&format!(
            "SELECT COUNT(*) FROM tenants WHERE key_hash LIKE '%{}%'",
            &ka[5..]
        )),
        0
    );
    let r = l.reserve(&a, 60.0, "r1", 10).unwrap();
    assert!(matches!(
        l.reserve(&a, 50.0, "r2", 10),
        Err(LedgerError::QuotaExhausted {
            reset_at: Some(86_400),
            ..
        })
    ));
    // b is unlimited and unaffected by a.
    l.reserve(&b, 1e20, "r3", 10).unwrap();
    assert!(l.settle(&r.request_id, 40.0, 11).unwrap());
    assert!(
        !l.settle(&r.request_id, 40.0, 12).unwrap(),
        "settling twice charges once"
    );
    let u = l.usage(&a, 12).unwrap();
    assert_eq!(
        (u.charged_flops, u.reserved_flops, u.remaining),
        (40.0, 0.0, Some(60.0))
    );
    // A request that measures more than it reserved is charged its reservation: the quota
    // (100) is never overrun, however many such requests were admitted at once.
    let r1 = l.reserve(&a, 30.0, "r4", 13).unwrap();
    let r2 = l.reserve(&a, 30.0, "r5", 13).unwrap();
    assert!(l.settle(&r1.request_id, 45.0, 14).unwrap());
    assert!(l.settle(&r2.request_id, 1e9, 14).unwrap());
    let u = l.usage(&a, 14).unwrap();
    assert_eq!((u.charged_flops, u.remaining), (100.0, Some(0.0)));
    assert_eq!(u.requests, 3);
    let u = l.usage(&a, 86_399).unwrap();
    assert_eq!(u.charged_flops, 100.0);
    // Next day: quota is back.
    let u = l.usage(&a, 86_400 + 1).unwrap();
    assert_eq!(u.remaining, Some(100.0));
    assert!(l.create_tenant("a", &TenantSettings::default()).is_err());
    for bad in ["", "../x", "a/b", "a\0b", "x y", ".hidden", &"n".repeat(65)] {
        assert!(
            l.create_tenant(bad, &TenantSettings::default()).is_err(),
            "{bad:?} accepted"
        );
    }
    l.create_tenant("team-a_1.prod", &TenantSettings::default())
        .unwrap();
    // Removing a tenant with a request in flight is refused; afterwards its key fails, its
    // name is free, and its history is still in the database.
    let (c, kc) = l.create_tenant("c", &TenantSettings::default()).unwrap();
    let open = l.reserve(&c, 5.0, "rc1", 20).unwrap();
    assert!(matches!(
        l.remove_tenant("c"),
        Err(LedgerError::Conflict(_))
    ));
    l.settle(&open.request_id, 5.0, 21).unwrap();
    l.remove_tenant("c").unwrap();
    assert!(l.tenant_by_key(&kc).unwrap().is_none());
    assert!(matches!(
        l.tenant_by_name("c"),
        Err(LedgerError::NotFound(_))
    ));
    assert!(l
        .tenants()
        .unwrap()
        .iter()
        .all(|t| t.name != "c" && !t.name.contains('~')));
    assert_eq!(
        h.count(&format!(
            "SELECT COUNT(*) FROM reservations WHERE tenant_id = {}",
            c.id
        )),
        1,
        "the accounting history is kept"
    );
    let (c2, _) = l.create_tenant("c", &TenantSettings::default()).unwrap();
    assert_ne!(c2.id, c.id);
    assert_eq!(l.usage(&c2, 22).unwrap().charged_flops, 0.0);
    assert_totals_consistent(h);
}

pub fn settings_are_validated(h: &dyn Harness) {
    let l = h.open(replica("r1", 30));
    assert!(l.create_tenant("", &TenantSettings::default()).is_err());
    assert!(l
        .create_tenant(
            "x",
            &TenantSettings {
                per_request_max: Some(-1.0),
                ..Default::default()
            }
        )
        .is_err());
    assert!(l
        .create_tenant(
            "y",
            &TenantSettings {
                per_request_max: Some(1e12),
                default_budget: Some(2e12),
                ..Default::default()
            }
        )
        .is_err());
    l.create_tenant("z", &TenantSettings::default()).unwrap();
    let t = l
        .update_tenant(
            "z",
            &TenantSettings {
                quota: Some(Some(5.0)),
                period: Some(Period::Month),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((t.quota, t.period), (Some(5.0), Period::Month));
    assert_eq!(l.tenant_by_name("z").unwrap(), t);
    // A tenant's own limit of requests in flight: set, kept when other settings change,
    // cleared by null (back to the server's default), never 0 or absurd.
    assert_eq!(t.max_in_flight, None);
    let limit = |m: Option<u32>| TenantSettings {
        max_in_flight: Some(m),
        ..Default::default()
    };
    let t = l.update_tenant("z", &limit(Some(3))).unwrap();
    assert_eq!(t.max_in_flight, Some(3));
    let t = l
        .update_tenant(
            "z",
            &TenantSettings {
                default_budget: Some(7.0),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(l.tenant_by_name("z").unwrap().max_in_flight, Some(3));
    for bad in [0, crate::MAX_IN_FLIGHT_LIMIT + 1] {
        assert!(matches!(
            l.update_tenant("z", &limit(Some(bad))),
            Err(LedgerError::Invalid(m)) if m.contains("max_in_flight")
        ));
        assert!(l.create_tenant("w", &limit(Some(bad))).is_err());
    }
    let (w, key) = l.create_tenant("w", &limit(Some(2))).unwrap();
    assert_eq!(w.max_in_flight, Some(2));
    assert_eq!(
        l.tenant_by_key(&key).unwrap().unwrap().max_in_flight,
        Some(2)
    );
    assert_eq!(
        l.update_tenant("z", &limit(None)).unwrap().max_in_flight,
        None
    );
    assert_eq!(l.tenant_by_name("z").unwrap().max_in_flight, None);
    // Its weight: set and read back, cleared by null, in range.
    let weight = |w: Option<f64>| TenantSettings {
        weight: Some(w),
        ..Default::default()
    };
    assert_eq!(
        l.update_tenant("z", &weight(Some(2.5))).unwrap().weight,
        Some(2.5)
    );
    assert_eq!(l.tenant_by_name("z").unwrap().weight, Some(2.5));
    for bad in [0.0, -1.0, 100.5, f64::NAN] {
        assert!(matches!(
            l.update_tenant("z", &weight(Some(bad))),
            Err(LedgerError::Invalid(m)) if m.contains("weight")
        ));
    }
    assert_eq!(l.update_tenant("z", &weight(None)).unwrap().weight, None);
    let (v, _) = l.create_tenant("v", &weight(Some(0.5))).unwrap();
    assert_eq!(
        (v.weight, l.tenant_by_name("v").unwrap().weight),
        (Some(0.5), Some(0.5))
    );
    // A changed quota binds at once (admission reads the stored quota, not the caller's copy).
    let stale = Tenant {
        quota: None,
        ..t.clone()
    };
    assert!(matches!(
        l.reserve(&stale, 6.0, "z1", 10),
        Err(LedgerError::QuotaExhausted { .. })
    ));
    assert!(l.remove_tenant("z").is_ok());
    assert!(matches!(
        l.remove_tenant("z"),
        Err(LedgerError::NotFound(_))
    ));
}

pub fn settling_is_keyed_by_request_id_and_happens_once(h: &dyn Harness) {
    let l = h.open(replica("r1", 30));
    let (a, _) = l.create_tenant("a", &quota(100.0)).unwrap();
    let r = l.reserve(&a, 10.0, "same", 10).unwrap();
    assert!(matches!(
        l.reserve(&a, 10.0, "same", 10),
        Err(LedgerError::Conflict(_))
    ));
    // Another replica's handle settles the same request id: still once.
    let other = h.open(replica("r2", 30));
    assert!(other.settle(&r.request_id, 7.0, 11).unwrap());
    assert!(!l.settle(&r.request_id, 9.0, 12).unwrap());
    assert!(
        !l.release(&r.request_id, 12).unwrap(),
        "settled stays settled"
    );
    let u = l.usage(&a, 12).unwrap();
    assert_eq!(
        (u.charged_flops, u.reserved_flops, u.requests),
        (7.0, 0.0, 1)
    );
    // Released is final: no later settlement charges it.
    let r2 = l.reserve(&a, 10.0, "rel", 13).unwrap();
    assert!(l.release(&r2.request_id, 14).unwrap());
    assert!(!l.settle(&r2.request_id, 10.0, 15).unwrap());
    assert!(!l.settle("never-reserved", 10.0, 15).unwrap());
    assert_eq!(l.usage(&a, 15).unwrap().charged_flops, 7.0);
    assert_totals_consistent(h);
}

pub fn a_dead_replicas_lease_runs_out_and_a_live_one_is_renewed(h: &dyn Harness) {
    let dead = h.open(replica("dead", 10));
    let live = h.open(replica("live", 10));
    let (a, _) = dead.create_tenant("a", &quota(100.0)).unwrap();
    let orphan = dead.reserve(&a, 60.0, "orphan", 100).unwrap();
    let long = live.reserve(&a, 30.0, "long", 100).unwrap();
    assert!(matches!(
        live.reserve(&a, 20.0, "x", 105),
        Err(LedgerError::QuotaExhausted { .. })
    ));
    // The live replica renews (every third of a lease); the dead one does not. Renewing
    // another owner's reservation does nothing.
    assert_eq!(
        live.renew(&["long".into(), "orphan".into()], 104).unwrap(),
        1
    );
    assert_eq!(live.renew(&["long".into()], 108).unwrap(), 1);
    // Lease ends at 110: still held at 110, gone at 111 (usage and admission both ignore it).
    assert_eq!(live.usage(&a, 110).unwrap().reserved_flops, 90.0);
    let u = live.usage(&a, 111).unwrap();
    assert_eq!((u.reserved_flops, u.remaining), (30.0, Some(70.0)));
    assert_eq!(live.renew(&["long".into()], 112).unwrap(), 1);
    let r = live.reserve(&a, 60.0, "after", 112).unwrap();
    assert_eq!(live.usage(&a, 112).unwrap().reserved_flops, 90.0);
    // Any replica marks dead leases expired; a live lease is never expired under its owner.
    assert_eq!(
        h.count(
            "SELECT COUNT(*) FROM reservations WHERE request_id = 'orphan' AND state = 'expired'"
        ),
        1,
        "admission expired the tenant's dead lease"
    );
    assert_eq!(live.expire(115).unwrap(), 0);
    assert_eq!(
        h.count("SELECT COUNT(*) FROM reservations WHERE state = 'open'"),
        2
    );
    // Long past the orphan's lease, the long request settles to what it measured.
    assert!(live.settle(&long.request_id, 25.0, 120).unwrap());
    assert!(live.settle(&r.request_id, 50.0, 120).unwrap());
    let u = live.usage(&a, 120).unwrap();
    assert_eq!((u.charged_flops, u.reserved_flops), (75.0, 0.0));
    // A late settlement of an expired lease (its owner lost the database for longer than a
    // lease) charges the work done, once.
    assert!(dead.settle(&orphan.request_id, 10.0, 130).unwrap());
    assert!(!dead.settle(&orphan.request_id, 10.0, 131).unwrap());
    assert_eq!(live.usage(&a, 131).unwrap().charged_flops, 85.0);
    // expire() reaps leases of every tenant.
    let (b, _) = live.create_tenant("b", &quota(10.0)).unwrap();
    dead.reserve(&b, 5.0, "b1", 200).unwrap();
    assert_eq!(live.expire(205).unwrap(), 0);
    assert_eq!(live.expire(211).unwrap(), 1);
    assert_eq!(live.usage(&b, 211).unwrap().reserved_flops, 0.0);
    // The owner renewing an expired lease revives it (it was alive after all).
    assert_eq!(dead.renew(&["b1".into()], 212).unwrap(), 1);
    assert_eq!(live.usage(&b, 212).unwrap().reserved_flops, 5.0);
    assert_totals_consistent(h);
}

pub fn replicas_never_admit_past_the_quota(h: &dyn Harness) {
    const K: usize = 5;
    let price = 1.1e12;
    let replicas: Vec<Arc<dyn Ledger>> = (0..3)
        .map(|i| h.open(replica(&format!("r{i}"), 30)))
        .collect();
    let (t, _) = replicas[0]
        .create_tenant("k", &quota(K as f64 * price + price / 2.0))
        .unwrap();
    let now = 1_000;
    let admitted: Vec<Reservation> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4 * K)
            .map(|i| {
                let l = replicas[i % 3].clone();
                let t = t.clone();
                s.spawn(move || l.reserve(&t, price, &format!("c{i}"), now))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join().unwrap() {
                Ok(r) => Some(r),
                Err(LedgerError::QuotaExhausted { .. }) => None,
                Err(e) => panic!("{e}"),
            })
            .collect()
    });
    assert_eq!(admitted.len(), K, "exactly k fit");
    for (i, r) in admitted.iter().enumerate() {
        // Two replicas race to settle each; every request is charged once, capped at its
        // reservation.
        let a = replicas[i % 3].settle(&r.request_id, price * 2.0, now + 1);
        let b = replicas[(i + 1) % 3].settle(&r.request_id, price * 2.0, now + 1);
        assert!(a.unwrap() ^ b.unwrap());
    }
    for l in &replicas {
        let u = l.usage(&t, now + 2).unwrap();
        assert_eq!(
            u.charged_flops,
            K as f64 * price,
            "every replica reads the same"
        );
        assert!(u.charged_flops <= t.quota.unwrap());
        assert_eq!(u.requests, K as u64);
    }
    assert_totals_consistent(h);
}

/// A ledger whose database can be switched off.
struct Switch {
    inner: Arc<dyn Ledger>,
    down: AtomicBool,
}

impl Switch {
    fn check(&self) -> Result<(), LedgerError> {
        if self.down.load(Ordering::SeqCst) {
            Err(LedgerError::Unavailable("switched off".into()))
        } else {
            Ok(())
        }
    }
}

impl crate::Batches for Switch {
    fn create_file(
        &self,
        tenant_id: i64,
        filename: &str,
        purpose: &str,
        content: &[u8],
        max_tenant_bytes: i64,
        now: i64,
    ) -> Result<crate::FileRecord, LedgerError> {
        self.check()?;
        self.inner
            .create_file(tenant_id, filename, purpose, content, max_tenant_bytes, now)
    }
    fn file(&self, tenant_id: i64, id: &str) -> Result<crate::FileRecord, LedgerError> {
        self.check()?;
        self.inner.file(tenant_id, id)
    }
    fn file_content(&self, tenant_id: i64, id: &str) -> Result<Vec<u8>, LedgerError> {
        self.check()?;
        self.inner.file_content(tenant_id, id)
    }
    fn files(
        &self,
        tenant_id: i64,
        purpose: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<crate::FileRecord>, LedgerError> {
        self.check()?;
        self.inner.files(tenant_id, purpose, limit, after)
    }
    fn delete_file(&self, tenant_id: i64, id: &str) -> Result<(), LedgerError> {
        self.check()?;
        self.inner.delete_file(tenant_id, id)
    }
    fn create_batch(
        &self,
        tenant_id: i64,
        b: &crate::NewBatch,
        now: i64,
    ) -> Result<crate::BatchRecord, LedgerError> {
        self.check()?;
        self.inner.create_batch(tenant_id, b, now)
    }
    fn batch(&self, tenant_id: i64, id: &str) -> Result<crate::BatchRecord, LedgerError> {
        self.check()?;
        self.inner.batch(tenant_id, id)
    }
    fn batches(
        &self,
        tenant_id: i64,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<crate::BatchRecord>, LedgerError> {
        self.check()?;
        self.inner.batches(tenant_id, limit, after)
    }
    fn cancel_batch(
        &self,
        tenant_id: i64,
        id: &str,
        now: i64,
    ) -> Result<crate::BatchRecord, LedgerError> {
        self.check()?;
        self.inner.cancel_batch(tenant_id, id, now)
    }
    fn claim_batch(&self, now: i64) -> Result<Option<crate::BatchRecord>, LedgerError> {
        self.check()?;
        self.inner.claim_batch(now)
    }
    fn yield_batch(&self, id: &str, now: i64) -> Result<bool, LedgerError> {
        self.check()?;
        self.inner.yield_batch(id, now)
    }
    fn renew_batch(&self, id: &str, now: i64) -> Result<Option<crate::BatchStatus>, LedgerError> {
        self.check()?;
        self.inner.renew_batch(id, now)
    }
    fn record_line(&self, batch_id: &str, r: &crate::LineResult) -> Result<bool, LedgerError> {
        self.check()?;
        self.inner.record_line(batch_id, r)
    }
    fn line_results(&self, batch_id: &str) -> Result<Vec<crate::LineResult>, LedgerError> {
        self.check()?;
        self.inner.line_results(batch_id)
    }
    fn backlog(&self) -> Result<(i64, i64), LedgerError> {
        self.check()?;
        self.inner.backlog()
    }
    fn purge(&self, before: i64) -> Result<(u64, u64), LedgerError> {
        self.check()?;
        self.inner.purge(before)
    }
    fn finish_batch(
        &self,
        id: &str,
        status: crate::BatchStatus,
        output: Option<crate::NewFile>,
        errors: Option<crate::NewFile>,
        now: i64,
    ) -> Result<crate::BatchRecord, LedgerError> {
        self.check()?;
        self.inner.finish_batch(id, status, output, errors, now)
    }
}

impl Ledger for Switch {
    fn create_tenant(
        &self,
        name: &str,
        s: &TenantSettings,
    ) -> Result<(Tenant, String), LedgerError> {
        self.check()?;
        self.inner.create_tenant(name, s)
    }
    fn update_tenant(&self, name: &str, s: &TenantSettings) -> Result<Tenant, LedgerError> {
        self.check()?;
        self.inner.update_tenant(name, s)
    }
    fn remove_tenant(&self, name: &str) -> Result<(), LedgerError> {
        self.check()?;
        self.inner.remove_tenant(name)
    }
    fn tenants(&self) -> Result<Vec<Tenant>, LedgerError> {
        self.check()?;
        self.inner.tenants()
    }
    fn tenant_by_name(&self, name: &str) -> Result<Tenant, LedgerError> {
        self.check()?;
        self.inner.tenant_by_name(name)
    }
    fn tenant_by_key(&self, key: &str) -> Result<Option<Tenant>, LedgerError> {
        self.check()?;
        self.inner.tenant_by_key(key)
    }
    fn usage(&self, t: &Tenant, now: i64) -> Result<crate::Usage, LedgerError> {
        self.check()?;
        self.inner.usage(t, now)
    }
    fn reserve(
        &self,
        t: &Tenant,
        flops: f64,
        request_id: &str,
        now: i64,
    ) -> Result<Reservation, LedgerError> {
        self.check()?;
        self.inner.reserve(t, flops, request_id, now)
    }
    fn settle(&self, request_id: &str, measured: f64, now: i64) -> Result<bool, LedgerError> {
        self.check()?;
        self.inner.settle(request_id, measured, now)
    }
    fn release(&self, request_id: &str, now: i64) -> Result<bool, LedgerError> {
        self.check()?;
        self.inner.release(request_id, now)
    }
    fn renew(&self, request_ids: &[String], now: i64) -> Result<u64, LedgerError> {
        self.check()?;
        self.inner.renew(request_ids, now)
    }
    fn expire(&self, now: i64) -> Result<u64, LedgerError> {
        self.check()?;
        self.inner.expire(now)
    }
    fn rotate_key(&self, name: &str) -> Result<(Tenant, String), LedgerError> {
        self.check()?;
        self.inner.rotate_key(name)
    }
    fn record_plan(&self, r: &Reservation, plan: &serde_json::Value) -> Result<(), LedgerError> {
        self.check()?;
        self.inner.record_plan(r, plan)
    }
    fn recent_requests(
        &self,
        t: &Tenant,
        limit: usize,
    ) -> Result<Vec<crate::RequestRecord>, LedgerError> {
        self.check()?;
        self.inner.recent_requests(t, limit)
    }
    fn usage_series(
        &self,
        t: &Tenant,
        now: i64,
        bucket_s: i64,
        buckets: usize,
    ) -> Result<Vec<crate::UsagePoint>, LedgerError> {
        self.check()?;
        self.inner.usage_series(t, now, bucket_s, buckets)
    }
    fn lease(&self) -> &LeaseSettings {
        self.inner.lease()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

pub fn settlements_survive_the_database_being_down(h: &dyn Harness) {
    let dir = std::env::temp_dir().join(format!(
        "vvlm-journal-{}-{}",
        std::process::id(),
        crate::new_key().unwrap()
    ));
    let journal = dir.join("settle.journal");
    let sw = Arc::new(Switch {
        inner: h.open(replica("r1", 10)),
        down: AtomicBool::new(false),
    });
    let leases = Leases::new(sw.clone(), &journal).unwrap();
    let (a, _) = sw.create_tenant("a", &quota(100.0)).unwrap();
    let r1 = leases.hold(&a, 30.0, "j1", 100).unwrap();
    let r2 = leases.hold(&a, 30.0, "j2", 100).unwrap();
    let r3 = leases.hold(&a, 30.0, "j3", 100).unwrap();
    assert_eq!(leases.held().len(), 3);
    // Down: new work is refused as unavailable (the server's 503); in-flight requests that
    // finish go to the journal, durably.
    sw.down.store(true, Ordering::SeqCst);
    assert!(matches!(
        leases.hold(&a, 1.0, "j4", 101),
        Err(LedgerError::Unavailable(_))
    ));
    assert_eq!(leases.close(&r1, 20.0, 102).unwrap(), Closed::Journaled);
    assert_eq!(leases.close(&r2, 0.0, 102).unwrap(), Closed::Journaled);
    let t = leases.tick(103);
    assert!(!t.available);
    assert_eq!(t.pending, 2);
    assert_eq!(
        leases.journal().pending().unwrap(),
        vec![
            Entry::Settle {
                request_id: "j1".into(),
                measured: 20.0,
                at: 102
            },
            Entry::Release {
                request_id: "j2".into(),
                at: 102
            }
        ]
    );
    // The process restarts while the database is still down: the journal is read back.
    drop(leases);
    let leases = Leases::new(sw.clone(), &journal).unwrap();
    assert_eq!(leases.held(), vec!["j1".to_string(), "j2".to_string()]);
    // Back (after more than a lease: j3's lease ran out meanwhile). The first tick replays the
    // journal; j1 is charged once, j2 not at all.
    sw.down.store(false, Ordering::SeqCst);
    let t = leases.tick(120);
    assert!(t.available, "{t:?}");
    assert_eq!((t.replayed, t.pending), (2, 0));
    assert!(leases.held().is_empty());
    let u = sw.usage(&a, 120).unwrap();
    assert_eq!(
        (u.charged_flops, u.reserved_flops, u.requests),
        (20.0, 0.0, 1)
    );
    // Replaying the same entries again (a crash between applying and rewriting the file)
    // charges nothing more.
    for e in [
        Entry::Settle {
            request_id: "j1".into(),
            measured: 20.0,
            at: 102,
        },
        Entry::Release {
            request_id: "j2".into(),
            at: 102,
        },
    ] {
        leases.journal().append(&e).unwrap();
    }
    assert_eq!(leases.tick(121).replayed, 2);
    assert_eq!(sw.usage(&a, 121).unwrap().charged_flops, 20.0);
    // j3's lease ran out while the database was down; its late settlement still charges.
    assert_eq!(leases.close(&r3, 25.0, 122).unwrap(), Closed::Done);
    assert_eq!(leases.close(&r3, 25.0, 122).unwrap(), Closed::AlreadyClosed);
    assert_eq!(sw.usage(&a, 122).unwrap().charged_flops, 45.0);
    std::fs::remove_dir_all(&dir).ok();
    assert_totals_consistent(h);
}

pub fn keys_rotate_and_requests_keep_their_plans_and_charges(h: &dyn Harness) {
    let l = h.open(replica("r1", 30));
    let (a, old) = l.create_tenant("a", &TenantSettings::default()).unwrap();
    let (a2, new) = l.rotate_key("a").unwrap();
    assert_eq!(a2, a);
    assert_ne!(old, new);
    assert!(l.tenant_by_key(&old).unwrap().is_none());
    assert_eq!(l.tenant_by_key(&new).unwrap().unwrap().name, "a");
    assert_eq!(
        h.count(&format!(
            "SELECT COUNT(*) FROM tenants WHERE key_hash = '{}'",
            crate::hash_key(&new)
        )),
        1,
        "the new key is stored hashed"
    );
    assert!(matches!(
        l.rotate_key("nope"),
        Err(LedgerError::NotFound(_))
    ));
    // Two requests in one bucket, one in the next; one released (never charged), one whose
    // replica died (expired: reported as such, not charged).
    let t0 = 1_000_000;
    let r1 = l.reserve(&a, 100.0, "r1", t0).unwrap();
    l.record_plan(&r1, &serde_json::json!({"model": "m", "frames": 8}))
        .unwrap();
    l.settle(&r1.request_id, 80.0, t0 + 1).unwrap();
    let r2 = l.reserve(&a, 50.0, "r2", t0).unwrap();
    l.settle(&r2.request_id, 70.0, t0 + 2).unwrap();
    let r3 = l.reserve(&a, 30.0, "r3", t0).unwrap();
    l.settle(&r3.request_id, 30.0, t0 + 65).unwrap();
    let r4 = l.reserve(&a, 10.0, "r4", t0).unwrap();
    l.release(&r4.request_id, t0 + 66).unwrap();
    let recent = l.recent_requests(&a, 3).unwrap();
    let ids: Vec<_> = recent.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids, ["r4", "r3", "r2"]);
    assert_eq!(recent[0].state, "released");
    assert_eq!(recent[0].charged_flops, None);
    assert_eq!(recent[0].closed_at, Some(t0 + 66));
    assert_eq!(recent[2].charged_flops, Some(50.0)); // capped at the reservation
    assert_eq!(recent[2].plan, None);
    let first = &l.recent_requests(&a, 10).unwrap()[3];
    assert_eq!(first.request_id, "r1");
    assert_eq!(first.state, "settled");
    assert_eq!(first.plan.as_ref().unwrap()["frames"], 8);
    assert_eq!(first.charged_flops, Some(80.0));
    assert_eq!((first.reserved_flops, first.created_at), (100.0, t0));
    // Buckets of 60 s ending with the one holding t0 + 70.
    let series = l.usage_series(&a, t0 + 70, 60, 3).unwrap();
    assert_eq!(series.len(), 3);
    let start = (t0 + 70) / 60 * 60;
    assert_eq!(series[2].start, start);
    assert_eq!(series[0].start, start - 120);
    let charged: Vec<f64> = series.iter().map(|p| p.charged_flops).collect();
    let in_bucket = |t: i64| ((t - series[0].start) / 60) as usize;
    let mut want = [0.0; 3];
    want[in_bucket(t0 + 1)] += 80.0;
    want[in_bucket(t0 + 2)] += 50.0;
    want[in_bucket(t0 + 65)] += 30.0;
    assert_eq!(charged, want);
    assert_eq!(series.iter().map(|p| p.requests).sum::<u64>(), 3);
    // Empty buckets are included; before anything was settled, all are empty.
    let earlier = l.usage_series(&a, t0 - 600, 60, 4).unwrap();
    assert_eq!(earlier.len(), 4);
    assert!(earlier
        .iter()
        .all(|p| p.charged_flops == 0.0 && p.requests == 0));
    assert!(matches!(
        l.usage_series(&a, t0, 0, 3),
        Err(LedgerError::Invalid(_))
    ));
    assert!(l.usage_series(&a, t0, -60, 3).is_err());
    assert!(l.usage_series(&a, t0, 60, 0).is_err());
    // A dead replica's request: its lease runs out and it is reported as expired, uncharged.
    let dead = h.open(replica("dead", 5));
    let r5 = dead.reserve(&a, 20.0, "r5", t0 + 100).unwrap();
    dead.record_plan(&r5, &serde_json::json!({"frames": 4}))
        .unwrap();
    drop(dead);
    assert_eq!(l.expire(t0 + 200).unwrap(), 1);
    let recent = l.recent_requests(&a, 1).unwrap();
    assert_eq!(recent[0].request_id, "r5");
    assert_eq!(recent[0].state, "expired");
    assert_eq!(recent[0].charged_flops, None);
    assert_eq!(recent[0].plan.as_ref().unwrap()["frames"], 4);
    // Another tenant's history is its own.
    let (b, _) = l.create_tenant("b", &TenantSettings::default()).unwrap();
    assert!(l.recent_requests(&b, 10).unwrap().is_empty());
    assert_totals_consistent(h);
}

pub fn migrations_are_applied_once(h: &dyn Harness) {
    let l = h.open(replica("r1", 30));
    let (a, _) = l.create_tenant("a", &quota(10.0)).unwrap();
    l.reserve(&a, 1.0, "m1", 10).unwrap();
    let versions = h.count("SELECT COUNT(*) FROM schema_migrations");
    assert!(versions >= 1);
    // Reopening (another replica starting) applies nothing again and keeps the data.
    let again = h.open(replica("r2", 30));
    assert_eq!(h.count("SELECT COUNT(*) FROM schema_migrations"), versions);
    assert_eq!(again.usage(&a, 10).unwrap().reserved_flops, 1.0);
}

fn line(i: i64, status: i64, request_id: &str) -> crate::LineResult {
    crate::LineResult {
        line: i,
        custom_id: format!("c{i}"),
        status_code: status,
        request_id: request_id.to_string(),
        body: format!("{{\"n\": {i}}}"),
        finished_at: 100 + i,
        usage: crate::LineUsage {
            prompt_tokens: 10 + i,
            completion_tokens: i,
            measured_flops: 0.5 * (i + 1) as f64,
        },
    }
}

fn new_batch(file: &str, total: i64) -> crate::NewBatch {
    crate::NewBatch {
        endpoint: "/v1/chat/completions".into(),
        input_file_id: file.into(),
        total,
        completion_window: "24h".into(),
        window_s: 86_400,
        metadata: Some(serde_json::json!({"job": "nightly"})),
        max_open: 100,
    }
}

pub fn files_are_a_tenants_own_and_capped(h: &dyn Harness) {
    let l = h.open(replica("r1", 30));
    let (a, _) = l.create_tenant("a", &TenantSettings::default()).unwrap();
    let (b, _) = l.create_tenant("b", &TenantSettings::default()).unwrap();
    let f1 = l
        .create_file(a.id, "one.jsonl", "batch", b"0123456789", 25, 10)
        .unwrap();
    assert_eq!(
        (f1.bytes, f1.created_at, f1.purpose.as_str()),
        (10, 10, "batch")
    );
    assert!(f1.id.starts_with("file-") && f1.id.len() == 29, "{}", f1.id);
    // 10 + 10 <= 25; then 20 + 10 > 25 is refused, naming the limit.
    let f2 = l
        .create_file(a.id, "two.jsonl", "batch", &[0xff; 10], 25, 11)
        .unwrap();
    match l.create_file(a.id, "three.jsonl", "batch", b"0123456789", 25, 12) {
        Err(LedgerError::Invalid(m)) => assert!(m.contains("30 bytes") && m.contains("25"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Another tenant's limit is its own; its files are invisible to `a`, as missing ones.
    let g = l
        .create_file(b.id, "b.jsonl", "batch", b"xyz", 25, 12)
        .unwrap();
    assert!(matches!(l.file(a.id, &g.id), Err(LedgerError::NotFound(_))));
    assert!(matches!(
        l.file_content(a.id, &g.id),
        Err(LedgerError::NotFound(_))
    ));
    assert!(matches!(
        l.delete_file(a.id, &g.id),
        Err(LedgerError::NotFound(_))
    ));
    assert_eq!(l.file_content(b.id, &g.id).unwrap(), b"xyz");
    // Bytes come back as stored (not text).
    assert_eq!(l.file_content(a.id, &f2.id).unwrap(), vec![0xff; 10]);
    assert_eq!(l.file(a.id, &f1.id).unwrap(), f1);
    // Newest first, paged after an id, filtered by purpose.
    let ids = |v: Vec<crate::FileRecord>| v.into_iter().map(|f| f.id).collect::<Vec<_>>();
    assert_eq!(
        ids(l.files(a.id, None, 10, None).unwrap()),
        [f2.id.clone(), f1.id.clone()]
    );
    assert_eq!(ids(l.files(a.id, None, 1, None).unwrap()), [f2.id.as_str()]);
    assert_eq!(
        ids(l.files(a.id, None, 10, Some(&f2.id)).unwrap()),
        [f1.id.as_str()]
    );
    assert!(l
        .files(a.id, Some("batch_output"), 10, None)
        .unwrap()
        .is_empty());
    // Deleting frees the tenant's room.
    l.delete_file(a.id, &f1.id).unwrap();
    assert!(matches!(
        l.file(a.id, &f1.id),
        Err(LedgerError::NotFound(_))
    ));
    l.create_file(a.id, "three.jsonl", "batch", b"0123456789", 25, 13)
        .unwrap();
}

pub fn a_batch_outlives_its_replica_and_closes_once(h: &dyn Harness) {
    let r1 = h.open(replica("r1", 10));
    let r2 = h.open(replica("r2", 10));
    let (a, _) = r1.create_tenant("a", &TenantSettings::default()).unwrap();
    let (b, _) = r1.create_tenant("b", &TenantSettings::default()).unwrap();
    let input = r1
        .create_file(a.id, "in.jsonl", "batch", b"{}\n{}\n{}\n", 1 << 20, 100)
        .unwrap();
    assert!(matches!(
        r1.create_batch(a.id, &new_batch("file-nope", 3), 100),
        Err(LedgerError::NotFound(_))
    ));
    assert!(matches!(
        r1.create_batch(b.id, &new_batch(&input.id, 3), 100),
        Err(LedgerError::NotFound(_))
    ));
    let batch = r1
        .create_batch(a.id, &new_batch(&input.id, 3), 100)
        .unwrap();
    assert!(batch.id.starts_with("batch_"));
    assert_eq!(batch.tenant.as_deref(), Some("a"));
    assert_eq!(batch.status, crate::BatchStatus::InProgress);
    assert_eq!((batch.total, batch.completed, batch.failed), (3, 0, 0));
    assert_eq!((batch.created_at, batch.expires_at), (100, 86_500));
    assert_eq!(batch.metadata, Some(serde_json::json!({"job": "nightly"})));
    assert!(matches!(
        r1.batch(b.id, &batch.id),
        Err(LedgerError::NotFound(_))
    ));
    assert_eq!(
        r2.backlog().unwrap(),
        (1, 3),
        "one batch, three lines to run"
    );
    // Its input cannot be deleted while it runs.
    assert!(matches!(
        r1.delete_file(a.id, &input.id),
        Err(LedgerError::Conflict(_))
    ));
    // r1 takes it; r2 finds nothing while r1's lease holds.
    assert_eq!(r1.claim_batch(101).unwrap().unwrap().id, batch.id);
    assert!(r2.claim_batch(105).unwrap().is_none());
    assert_eq!(
        r1.renew_batch(&batch.id, 108).unwrap(),
        Some(crate::BatchStatus::InProgress)
    );
    assert!(r2.claim_batch(117).unwrap().is_none(), "renewed until 118");
    assert!(r1.record_line(&batch.id, &line(0, 200, "q0")).unwrap());
    assert!(r1.record_line(&batch.id, &line(2, 422, "q2")).unwrap());
    assert_eq!(r2.backlog().unwrap(), (1, 1));
    // r1 dies: one lease later r2 takes the batch and sees r1's answers.
    let b2 = r2.claim_batch(119).unwrap().unwrap();
    assert_eq!(
        (b2.id.as_str(), b2.completed, b2.failed),
        (batch.id.as_str(), 1, 1)
    );
    assert_eq!(
        r1.renew_batch(&batch.id, 120).unwrap(),
        None,
        "no longer r1's"
    );
    assert!(matches!(
        r1.finish_batch(&batch.id, crate::BatchStatus::Completed, None, None, 120),
        Err(LedgerError::Conflict(_))
    ));
    let done: Vec<i64> = r2
        .line_results(&batch.id)
        .unwrap()
        .iter()
        .map(|r| r.line)
        .collect();
    assert_eq!(done, [0, 2]);
    // A line answers once: the first answer is kept.
    assert!(!r2.record_line(&batch.id, &line(0, 500, "other")).unwrap());
    assert!(r2.record_line(&batch.id, &line(1, 200, "q1")).unwrap());
    let results = r2.line_results(&batch.id).unwrap();
    assert_eq!(results[0], line(0, 200, "q0"));
    assert_eq!(results.len(), 3);
    // Cancelling: in progress -> cancelling, again the same; the owner keeps its lease.
    let c = r1.cancel_batch(a.id, &batch.id, 121).unwrap();
    assert_eq!(
        (c.status, c.cancelling_at),
        (crate::BatchStatus::Cancelling, Some(121))
    );
    assert_eq!(
        r1.cancel_batch(a.id, &batch.id, 122).unwrap().cancelling_at,
        Some(121)
    );
    assert!(matches!(
        r1.cancel_batch(b.id, &batch.id, 122),
        Err(LedgerError::NotFound(_))
    ));
    assert_eq!(
        r2.renew_batch(&batch.id, 122).unwrap(),
        Some(crate::BatchStatus::Cancelling)
    );
    assert!(matches!(
        r2.finish_batch(&batch.id, crate::BatchStatus::InProgress, None, None, 123),
        Err(LedgerError::Invalid(_))
    ));
    let out = crate::NewFile {
        filename: "out.jsonl".into(),
        content: b"o\n".to_vec(),
    };
    let err = crate::NewFile {
        filename: "err.jsonl".into(),
        content: b"e\n".to_vec(),
    };
    // Usage sums the answered lines (0, 1 and 2: prompts 10 + 11 + 12, completions 0 + 1 + 2).
    let b3 = r1.batch(a.id, &batch.id).unwrap();
    assert_eq!(
        b3.usage,
        crate::LineUsage {
            prompt_tokens: 33,
            completion_tokens: 3,
            measured_flops: 3.0
        }
    );
    let closed = r2
        .finish_batch(
            &batch.id,
            crate::BatchStatus::Cancelled,
            Some(out),
            Some(err),
            124,
        )
        .unwrap();
    assert_eq!(closed.status, crate::BatchStatus::Cancelled);
    // The answers live on in the files: the rows are gone, the counts and usage kept; a late
    // answer is not recorded.
    assert!(r2.line_results(&batch.id).unwrap().is_empty());
    assert_eq!(closed.usage, b3.usage);
    assert!(!r1.record_line(&batch.id, &line(5, 200, "late")).unwrap());
    assert_eq!(
        (closed.completed, closed.failed, closed.closed_at),
        (2, 1, Some(124))
    );
    let (o, e) = (
        closed.output_file_id.unwrap(),
        closed.error_file_id.unwrap(),
    );
    assert_eq!(r1.file_content(a.id, &o).unwrap(), b"o\n");
    assert_eq!(r1.file_content(a.id, &e).unwrap(), b"e\n");
    let of = r1.file(a.id, &o).unwrap();
    assert_eq!(
        (of.purpose.as_str(), of.filename.as_str(), of.created_at),
        ("batch_output", "out.jsonl", 124)
    );
    assert_eq!(
        r2.backlog().unwrap(),
        (0, 0),
        "closed (cancelling ones have nothing to run)"
    );
    // Closed once: no second close, no cancel, nobody claims it again.
    assert!(matches!(
        r2.finish_batch(&batch.id, crate::BatchStatus::Completed, None, None, 125),
        Err(LedgerError::Conflict(_))
    ));
    assert!(matches!(
        r1.cancel_batch(a.id, &batch.id, 125),
        Err(LedgerError::Conflict(_))
    ));
    assert!(r1.claim_batch(1000).unwrap().is_none());
    assert!(r2.renew_batch(&batch.id, 126).unwrap().is_none());
    // Output files do not count against the upload limit; the input can go now.
    r1.create_file(a.id, "more.jsonl", "batch", b"x", 10, 127)
        .unwrap();
    r1.delete_file(a.id, &input.id).unwrap();
    // Listing: newest first, paged.
    let in2 = r1
        .create_file(a.id, "in2.jsonl", "batch", b"{}", 1 << 20, 130)
        .unwrap();
    let second = r1.create_batch(a.id, &new_batch(&in2.id, 1), 130).unwrap();
    let out_file = r1.create_batch(a.id, &new_batch(&o, 1), 131);
    assert!(matches!(out_file, Err(LedgerError::Invalid(m)) if m.contains("batch_output")));
    let ids: Vec<String> = r1
        .batches(a.id, 10, None)
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(ids, [second.id.clone(), batch.id.clone()]);
    let after: Vec<String> = r1
        .batches(a.id, 10, Some(&second.id))
        .unwrap()
        .into_iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(after, [batch.id.as_str()]);
    assert!(r1.batches(b.id, 10, None).unwrap().is_empty());
    // The oldest open batch is claimed first; its holder gives it up only while another waits.
    assert_eq!(r2.claim_batch(200).unwrap().unwrap().id, second.id);
    assert!(
        !r2.yield_batch(&second.id, 201).unwrap(),
        "none waits: kept"
    );
    assert_eq!(
        r2.renew_batch(&second.id, 201).unwrap(),
        Some(crate::BatchStatus::InProgress)
    );
    let in3 = r1
        .create_file(a.id, "in3.jsonl", "batch", b"{}", 1 << 20, 202)
        .unwrap();
    let third = r1.create_batch(a.id, &new_batch(&in3.id, 1), 202).unwrap();
    assert_eq!(
        r1.claim_batch(203).unwrap().unwrap().id,
        third.id,
        "the third is free"
    );
    assert!(
        !r2.yield_batch(&second.id, 204).unwrap(),
        "the third is held: none waits"
    );
    // The third's holder dies; now it waits, so `second` is given up and the third is taken
    // before `second` again (least recently run first), although `second` is older.
    assert!(r2.yield_batch(&second.id, 214).unwrap());
    assert!(
        !r1.yield_batch(&second.id, 214).unwrap(),
        "no longer held by r1"
    );
    assert_eq!(r2.renew_batch(&second.id, 214).unwrap(), None, "released");
    assert_eq!(r2.claim_batch(215).unwrap().unwrap().id, third.id);
    assert_eq!(r1.claim_batch(215).unwrap().unwrap().id, second.id);
}

pub fn a_tenants_media_allow_is_kept_and_cleared(h: &dyn Harness) {
    let l = h.open(replica("r1", 30));
    let list = vec![
        "https://cdn.example.com/acme/".to_string(),
        "file:///data/acme/".to_string(),
    ];
    let s = TenantSettings {
        media_allow: Some(Some(list.clone())),
        ..Default::default()
    };
    let (t, key) = l.create_tenant("acme", &s).unwrap();
    assert_eq!(t.media_allow.as_ref(), Some(&list));
    assert_eq!(
        l.tenant_by_key(&key).unwrap().unwrap().media_allow.as_ref(),
        Some(&list)
    );
    // Another change keeps it; an empty list (nothing but uploads) is kept as empty.
    let t = l.update_tenant("acme", &quota(5.0)).unwrap();
    assert_eq!(t.media_allow.as_ref(), Some(&list));
    let empty = TenantSettings {
        media_allow: Some(Some(vec![])),
        ..Default::default()
    };
    assert_eq!(
        l.update_tenant("acme", &empty).unwrap().media_allow,
        Some(vec![])
    );
    assert_eq!(l.tenant_by_name("acme").unwrap().media_allow, Some(vec![]));
    let clear = TenantSettings {
        media_allow: Some(None),
        ..Default::default()
    };
    assert_eq!(l.update_tenant("acme", &clear).unwrap().media_allow, None);
    assert_eq!(l.tenant_by_name("acme").unwrap().media_allow, None);
    // At most 32 prefixes of 1-1024 characters without spaces.
    for bad in [
        vec!["a b".to_string()],
        vec![String::new()],
        vec!["x".repeat(1025)],
        vec!["p".to_string(); 33],
    ] {
        let s = TenantSettings {
            media_allow: Some(Some(bad)),
            ..Default::default()
        };
        assert!(matches!(
            l.update_tenant("acme", &s),
            Err(LedgerError::Invalid(_))
        ));
        assert!(matches!(
            l.create_tenant("other", &s),
            Err(LedgerError::Invalid(_))
        ));
    }
}

pub fn tenants_take_turns_and_open_batches_are_capped(h: &dyn Harness) {
    let r1 = h.open(replica("r1", 10));
    let r2 = h.open(replica("r2", 10));
    let (a, _) = r1.create_tenant("a", &TenantSettings::default()).unwrap();
    let (b, _) = r1.create_tenant("b", &TenantSettings::default()).unwrap();
    let fa = r1
        .create_file(a.id, "a.jsonl", "batch", b"{}", 1 << 20, 1)
        .unwrap();
    let fb = r1
        .create_file(b.id, "b.jsonl", "batch", b"{}", 1 << 20, 1)
        .unwrap();
    let capped = |f: &str| crate::NewBatch {
        max_open: 2,
        ..new_batch(f, 1)
    };
    // `a` opens two batches (its most), then `b` one.
    let a1 = r1.create_batch(a.id, &capped(&fa.id), 10).unwrap();
    let a2 = r1.create_batch(a.id, &capped(&fa.id), 11).unwrap();
    match r1.create_batch(a.id, &capped(&fa.id), 12) {
        Err(LedgerError::Conflict(m)) => assert!(m.contains("2 open batches"), "{m}"),
        other => panic!("{other:?}"),
    }
    let b1 = r1.create_batch(b.id, &capped(&fb.id), 13).unwrap();
    // r1 runs a1; r2 takes b's batch next, although a2 is older: a's batches ran more recently.
    assert_eq!(r1.claim_batch(20).unwrap().unwrap().id, a1.id);
    assert_eq!(r2.claim_batch(21).unwrap().unwrap().id, b1.id);
    assert!(r2.yield_batch(&b1.id, 25).unwrap(), "a2 waits");
    assert_eq!(r2.claim_batch(26).unwrap().unwrap().id, a2.id);
    // A closed batch frees a place.
    r1.finish_batch(&a1.id, crate::BatchStatus::Completed, None, None, 27)
        .unwrap();
    r1.create_batch(a.id, &capped(&fa.id), 28).unwrap();
}

pub fn old_batches_and_files_are_purged(h: &dyn Harness) {
    let l = h.open(replica("r1", 10));
    let (a, _) = l.create_tenant("a", &TenantSettings::default()).unwrap();
    let old_in = l
        .create_file(a.id, "old.jsonl", "batch", b"{}", 1 << 20, 100)
        .unwrap();
    let open_in = l
        .create_file(a.id, "open.jsonl", "batch", b"{}", 1 << 20, 100)
        .unwrap();
    let done = l
        .create_batch(a.id, &new_batch(&old_in.id, 1), 100)
        .unwrap();
    assert_eq!(l.claim_batch(101).unwrap().unwrap().id, done.id);
    let out = crate::NewFile {
        filename: "o.jsonl".into(),
        content: b"o".to_vec(),
    };
    let closed = l
        .finish_batch(
            &done.id,
            crate::BatchStatus::Completed,
            Some(out),
            None,
            102,
        )
        .unwrap();
    let running = l
        .create_batch(a.id, &new_batch(&open_in.id, 1), 103)
        .unwrap();
    let young = l
        .create_file(a.id, "young.jsonl", "batch", b"{}", 1 << 20, 500)
        .unwrap();
    // Before 102 nothing closed: only files older than that no open batch reads (old_in).
    assert_eq!(l.purge(102).unwrap(), (0, 1));
    assert!(matches!(
        l.file(a.id, &old_in.id),
        Err(LedgerError::NotFound(_))
    ));
    // Before 400: the batch closed at 102 and its output; the open batch and its input stay.
    assert_eq!(l.purge(400).unwrap(), (1, 1));
    assert!(matches!(
        l.batch(a.id, &done.id),
        Err(LedgerError::NotFound(_))
    ));
    let output = closed.output_file_id.unwrap();
    assert!(matches!(
        l.file(a.id, &output),
        Err(LedgerError::NotFound(_))
    ));
    assert_eq!(
        l.batch(a.id, &running.id).unwrap().status,
        crate::BatchStatus::InProgress
    );
    assert!(l.file(a.id, &open_in.id).is_ok());
    assert!(l.file(a.id, &young.id).is_ok());
    assert_eq!(l.purge(400).unwrap(), (0, 0));
}
