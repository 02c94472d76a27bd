//! The PostgreSQL ledger, shared by replicas.
//!
//! tokio-postgres with a deadpool pool, driven on the ledger's own small runtime: the
//! [`Ledger`] trait stays synchronous (the server already calls it on blocking threads and
//! from its inference workers, which have no runtime), every call is bounded client-side by
//! a timeout (connect + statement + 1 s) as well as by the server's `statement_timeout`, and a
//! call works from any thread. No TLS (loopback, a sidecar or a service mesh); see the README.
//!
//! Admission is one statement (`vvlm_reserve`, a function from the migrations) that takes the
//! tenant's row lock, so reservations of one tenant serialise across replicas.

use crate::batches::{
    self, BatchRecord, BatchStatus, Batches, FileRecord, LineResult, LineUsage, NewBatch, NewFile,
};
use crate::{
    empty_series, exists, fill_series, in_flight, new_key, new_tenant_budgets, no_tenant,
    quota_exhausted, updated_tenant, LeaseSettings, Ledger, LedgerError, Migration, Options,
    Period, RequestRecord, Reservation, Tenant, TenantSettings, Usage, UsagePoint,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Timeouts};
use std::future::Future;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "usage_totals",
        sql: include_str!("../migrations/postgres/0002_usage_totals.sql"),
    },
    Migration {
        version: 3,
        name: "request_plans",
        sql: include_str!("../migrations/postgres/0003_request_plans.sql"),
    },
    Migration {
        version: 4,
        name: "tenant_max_in_flight",
        sql: include_str!("../migrations/postgres/0004_tenant_max_in_flight.sql"),
    },
    Migration {
        version: 5,
        name: "tenant_weight",
        sql: include_str!("../migrations/postgres/0005_tenant_weight.sql"),
    },
    Migration {
        version: 6,
        name: "batches",
        sql: include_str!("../migrations/postgres/0006_batches.sql"),
    },
    Migration {
        version: 7,
        name: "tenant_media_allow",
        sql: include_str!("../migrations/postgres/0007_tenant_media_allow.sql"),
    },
];

/// Advisory lock key that serialises migrations of replicas starting together.
const MIGRATION_LOCK: i64 = 0x7676_6c6d_0001;

pub struct PostgresLedger {
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    lease: LeaseSettings,
    op_timeout: Duration,
}

impl Drop for PostgresLedger {
    fn drop(&mut self) {
        // Never blocks (a ledger may be dropped on an async runtime's thread).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn pg_err(e: tokio_postgres::Error) -> LedgerError {
    if let Some(code) = e.code() {
        let c = code.code();
        // 08: connection exception; 57: operator intervention (shutdown, statement timeout);
        // 53: insufficient resources (too many connections, out of disk); 55P03: a lock not
        // granted within lock_timeout (the database is too slow for us).
        if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") || c == "55P03" {
            return LedgerError::Unavailable(e.to_string());
        }
        return LedgerError::Storage(e.to_string());
    }
    let s = e.to_string();
    if e.is_closed()
        || s.starts_with("error communicating")
        || s.starts_with("error connecting")
        || s.starts_with("timeout")
    {
        LedgerError::Unavailable(s)
    } else {
        LedgerError::Storage(s)
    }
}

impl From<tokio_postgres::Error> for LedgerError {
    fn from(e: tokio_postgres::Error) -> Self {
        pg_err(e)
    }
}

impl From<PoolError> for LedgerError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Backend(e) => pg_err(e),
            other => LedgerError::Unavailable(other.to_string()),
        }
    }
}

fn row_tenant(r: &Row) -> Tenant {
    let period: String = r.get(5);
    Tenant {
        id: r.get(0),
        name: r.get(1),
        default_budget: r.get(2),
        per_request_max: r.get(3),
        quota: r.get(4),
        period: if period == "month" {
            Period::Month
        } else {
            Period::Day
        },
        max_in_flight: r.get::<_, Option<i64>>(6).map(|m| m as u32),
        weight: r.get(7),
        media_allow: crate::json_value(r.get(8)),
    }
}

const TENANT_COLS: &str =
    "id, name, default_budget, per_request_max, quota, period, max_in_flight, weight, media_allow";
const LIVE: &str = "key_hash NOT LIKE 'removed:%'";

impl PostgresLedger {
    /// Connects (a pool of `options.pool_size`) and applies pending migrations.
    pub fn connect(url: &str, options: &Options) -> Result<Self, LedgerError> {
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| LedgerError::Invalid(format!("database URL: {e}")))?;
        let connect = Duration::from_secs_f64(options.connect_timeout_s.max(0.1));
        let statement = Duration::from_secs_f64(options.statement_timeout_s.max(0.1));
        cfg.connect_timeout(connect);
        cfg.keepalives(true);
        cfg.keepalives_idle(Duration::from_secs(10));
        cfg.application_name(&options.lease.owner);
        cfg.options(format!(
            "-c client_min_messages=warning -c statement_timeout={} -c lock_timeout={}",
            statement.as_millis(),
            statement.as_millis()
        ));
        let mgr = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .timeouts(Timeouts {
                wait: Some(connect),
                create: Some(connect),
                recycle: Some(connect),
            })
            .build()
            .map_err(|e| LedgerError::Invalid(format!("database pool: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vvlm-ledger-pg")
            .enable_all()
            .build()
            .map_err(|e| LedgerError::Storage(format!("ledger runtime: {e}")))?;
        let l = Self {
            rt: Some(rt),
            pool,
            lease: options.lease.clone(),
            op_timeout: connect + statement + Duration::from_secs(1),
        };
        let pool = l.pool.clone();
        l.block(async move { migrate(&pool).await })?;
        Ok(l)
    }

    /// Runs `fut` on the ledger's runtime and waits for it, bounded by the call timeout.
    fn block<T, F>(&self, fut: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, LedgerError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let limit = self.op_timeout;
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the ledger");
        rt.spawn(async move {
            let r = match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Err(LedgerError::Unavailable(format!(
                    "no answer within {limit:?}"
                ))),
            };
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(LedgerError::Unavailable(
                "the ledger runtime stopped".into(),
            ))
        })
    }

    /// Runs one statement and returns the first column of its first row as an i64 (tests
    /// look at stored rows with it).
    #[doc(hidden)]
    pub fn query_i64(&self, sql: &str) -> Result<i64, LedgerError> {
        let pool = self.pool.clone();
        let sql = sql.to_string();
        self.block(async move {
            let c = pool.get().await?;
            Ok(c.query_one(&sql, &[]).await?.get(0))
        })
    }

    /// Creates an empty database on the server `url` names and returns its URL (tests give
    /// each case its own database). Blocking.
    #[doc(hidden)]
    pub fn create_scratch_database(url: &str, prefix: &str) -> Result<String, LedgerError> {
        let mut b = [0u8; 6];
        let _ = getrandom::getrandom(&mut b);
        let name = format!("{prefix}_{}", crate::hex(&b));
        let admin = Self::connect_raw(url)?;
        let (pool, sql) = (admin.pool.clone(), format!("CREATE DATABASE {name}"));
        admin.block(async move {
            let c = pool.get().await?;
            c.batch_execute(&sql).await?;
            Ok(())
        })?;
        Ok(with_database(url, &name))
    }

    fn connect_raw(url: &str) -> Result<Self, LedgerError> {
        let cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| LedgerError::Invalid(format!("database URL: {e}")))?;
        let mgr = Manager::new(cfg, NoTls);
        let pool = Pool::builder(mgr)
            .max_size(1)
            .build()
            .map_err(|e| LedgerError::Invalid(format!("database pool: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| LedgerError::Storage(format!("ledger runtime: {e}")))?;
        Ok(Self {
            rt: Some(rt),
            pool,
            lease: LeaseSettings::new(2),
            op_timeout: Duration::from_secs(30),
        })
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (url, String::new()),
    };
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let host = rest.split_once('/').map_or(rest, |(h, _)| h);
    format!("{scheme}://{host}/{name}{query}")
}

async fn migrate(pool: &Pool) -> Result<(), LedgerError> {
    let mut c = pool.get().await?;
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .await?;
    let have: i64 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await?
        .get(0);
    for m in MIGRATIONS.iter().filter(|m| m.version > have) {
        tx.batch_execute(m.sql).await.map_err(|e| {
            LedgerError::Storage(format!("migration {} {}: {e}", m.version, m.name))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at)
             VALUES ($1, $2, EXTRACT(EPOCH FROM now())::BIGINT)",
            &[&m.version, &m.name],
        )
        .await?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "postgres ledger migrated"
        );
    }
    tx.commit().await?;
    Ok(())
}

impl Ledger for PostgresLedger {
    fn create_tenant(
        &self,
        name: &str,
        s: &TenantSettings,
    ) -> Result<(Tenant, String), LedgerError> {
        let (default_budget, per_request_max) = new_tenant_budgets(name, s)?;
        let key = new_key()?;
        let (pool, name, hash) = (self.pool.clone(), name.to_string(), crate::hash_key(&key));
        let quota = s.quota.flatten();
        let period = s.period.unwrap_or(Period::Day).as_str();
        let max_in_flight = s.max_in_flight.flatten().map(i64::from);
        let weight = s.weight.flatten();
        let media_allow = crate::json_text(&s.media_allow.clone().flatten());
        let t = self.block(async move {
            let c = pool.get().await?;
            let r = c
                .query_one(
                    &format!(
                        "INSERT INTO tenants (name, key_hash, default_budget, per_request_max, quota, period, max_in_flight, weight, media_allow, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, EXTRACT(EPOCH FROM now())::BIGINT)
                         RETURNING {TENANT_COLS}"
                    ),
                    &[&name, &hash, &default_budget, &per_request_max, &quota, &period, &max_in_flight, &weight, &media_allow],
                )
                .await;
            match r {
                Ok(row) => Ok(row_tenant(&row)),
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Err(exists(&name)),
                Err(e) => Err(e.into()),
            }
        })?;
        Ok((t, key))
    }

    fn update_tenant(&self, name: &str, s: &TenantSettings) -> Result<Tenant, LedgerError> {
        let t = updated_tenant(self.tenant_by_name(name)?, s)?;
        let (pool, t2) = (self.pool.clone(), t.clone());
        self.block(async move {
            let c = pool.get().await?;
            let max_in_flight = t2.max_in_flight.map(i64::from);
            c.execute(
                "UPDATE tenants SET default_budget = $1, per_request_max = $2, quota = $3, period = $4,
                 max_in_flight = $5, weight = $6, media_allow = $7 WHERE id = $8",
                &[&t2.default_budget, &t2.per_request_max, &t2.quota, &t2.period.as_str(), &max_in_flight, &t2.weight, &crate::json_text(&t2.media_allow), &t2.id],
            )
            .await?;
            Ok(())
        })?;
        Ok(t)
    }

    fn remove_tenant(&self, name: &str) -> Result<(), LedgerError> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.block(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            let id: i64 = tx
                .query_opt(
                    &format!("SELECT id FROM tenants WHERE name = $1 AND {LIVE} FOR UPDATE"),
                    &[&name],
                )
                .await?
                .ok_or_else(|| no_tenant(&name))?
                .get(0);
            let open: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM reservations WHERE tenant_id = $1 AND state = 'open'",
                    &[&id],
                )
                .await?
                .get(0);
            if open > 0 {
                return Err(in_flight(&name, open));
            }
            // A tombstone (see the SQLite ledger): the history stays, key and name are free.
            tx.execute(
                "UPDATE tenants SET name = name || '~removed~' || id::text, key_hash = 'removed:' || id::text WHERE id = $1",
                &[&id],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn tenants(&self) -> Result<Vec<Tenant>, LedgerError> {
        let pool = self.pool.clone();
        self.block(async move {
            let c = pool.get().await?;
            let rows = c
                .query(
                    &format!("SELECT {TENANT_COLS} FROM tenants WHERE {LIVE} ORDER BY name"),
                    &[],
                )
                .await?;
            Ok(rows.iter().map(row_tenant).collect())
        })
    }

    fn tenant_by_name(&self, name: &str) -> Result<Tenant, LedgerError> {
        let (pool, name) = (self.pool.clone(), name.to_string());
        self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(&format!(
                    "SELECT {TENANT_COLS} FROM tenants WHERE name = $1 AND {LIVE}"
                ))
                .await?;
            c.query_opt(&st, &[&name])
                .await?
                .map(|r| row_tenant(&r))
                .ok_or_else(|| no_tenant(&name))
        })
    }

    fn tenant_by_key(&self, key: &str) -> Result<Option<Tenant>, LedgerError> {
        let (pool, hash) = (self.pool.clone(), crate::hash_key(key));
        self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(&format!(
                    "SELECT {TENANT_COLS} FROM tenants WHERE key_hash = $1"
                ))
                .await?;
            Ok(c.query_opt(&st, &[&hash]).await?.map(|r| row_tenant(&r)))
        })
    }

    fn usage(&self, t: &Tenant, now: i64) -> Result<Usage, LedgerError> {
        let (start, _) = t.period.bounds(now);
        let (pool, id) = (self.pool.clone(), t.id);
        let (charged, reserved, n) = self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "SELECT COALESCE((SELECT charged FROM usage_totals WHERE tenant_id = $1 AND period_start = $2), 0)::float8,
                            COALESCE((SELECT SUM(reserved) FROM reservations
                                       WHERE tenant_id = $1 AND period_start = $2 AND state = 'open' AND lease_until >= $3), 0)::float8,
                            COALESCE((SELECT requests FROM usage_totals WHERE tenant_id = $1 AND period_start = $2), 0)::int8",
                )
                .await?;
            let r = c.query_one(&st, &[&id, &start, &now]).await?;
            Ok((r.get::<_, f64>(0), r.get::<_, f64>(1), r.get::<_, i64>(2)))
        })?;
        Ok(Usage::new(t, now, charged, reserved, n as u64))
    }

    fn reserve(
        &self,
        t: &Tenant,
        flops: f64,
        request_id: &str,
        now: i64,
    ) -> Result<Reservation, LedgerError> {
        let (start, reset) = t.period.bounds(now);
        let pool = self.pool.clone();
        let (id, rid, owner) = (t.id, request_id.to_string(), self.lease.owner.clone());
        let until = now + self.lease.lease_s;
        let (got, used, quota) = self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "SELECT reservation_id, used, quota FROM vvlm_reserve($1, $2, $3, $4, $5, $6, $7)",
                )
                .await?;
            match c
                .query_one(&st, &[&id, &rid, &start, &flops, &owner, &now, &until])
                .await
            {
                Ok(r) => Ok((
                    r.get::<_, Option<i64>>(0),
                    r.get::<_, f64>(1),
                    r.get::<_, Option<f64>>(2),
                )),
                Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    Err(LedgerError::Conflict(format!(
                        "request id `{rid}` already has a reservation"
                    )))
                }
                Err(e) if e.code() == Some(&SqlState::NO_DATA_FOUND) => {
                    Err(LedgerError::NotFound(format!("no tenant with id {id}")))
                }
                Err(e) => Err(e.into()),
            }
        })?;
        match got {
            Some(id) => Ok(Reservation {
                id,
                request_id: request_id.to_string(),
                tenant_id: t.id,
                flops,
            }),
            None => Err(quota_exhausted(t, quota.unwrap_or(0.0), used, flops, reset)),
        }
    }

    fn settle(&self, request_id: &str, measured: f64, now: i64) -> Result<bool, LedgerError> {
        let (pool, rid) = (self.pool.clone(), request_id.to_string());
        self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "WITH s AS (
                         UPDATE reservations SET state = 'settled', charged = LEAST($1, reserved), closed_at = $2
                          WHERE request_id = $3 AND state IN ('open', 'expired')
                         RETURNING tenant_id, period_start, charged)
                     INSERT INTO usage_totals (tenant_id, period_start, charged, requests)
                     SELECT tenant_id, period_start, charged, 1 FROM s
                     ON CONFLICT (tenant_id, period_start) DO UPDATE
                        SET charged = usage_totals.charged + EXCLUDED.charged,
                            requests = usage_totals.requests + 1",
                )
                .await?;
            Ok(c.execute(&st, &[&measured, &now, &rid]).await? == 1)
        })
    }

    fn release(&self, request_id: &str, now: i64) -> Result<bool, LedgerError> {
        let (pool, rid) = (self.pool.clone(), request_id.to_string());
        self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "UPDATE reservations SET state = 'released', closed_at = $1
                     WHERE request_id = $2 AND state IN ('open', 'expired')",
                )
                .await?;
            Ok(c.execute(&st, &[&now, &rid]).await? == 1)
        })
    }

    fn renew(&self, request_ids: &[String], now: i64) -> Result<u64, LedgerError> {
        if request_ids.is_empty() {
            return Ok(0);
        }
        let (pool, ids, owner) = (
            self.pool.clone(),
            request_ids.to_vec(),
            self.lease.owner.clone(),
        );
        let until = now + self.lease.lease_s;
        self.block(async move {
            let c = pool.get().await?;
            Ok(c.execute(
                "UPDATE reservations SET lease_until = $1, state = 'open', closed_at = NULL
                 WHERE request_id = ANY($2) AND owner = $3 AND state IN ('open', 'expired')",
                &[&until, &ids, &owner],
            )
            .await?)
        })
    }

    fn expire(&self, now: i64) -> Result<u64, LedgerError> {
        let pool = self.pool.clone();
        self.block(async move {
            let c = pool.get().await?;
            Ok(c.execute(
                "UPDATE reservations SET state = 'expired', closed_at = $1 WHERE state = 'open' AND lease_until < $1",
                &[&now],
            )
            .await?)
        })
    }

    fn rotate_key(&self, name: &str) -> Result<(Tenant, String), LedgerError> {
        let key = new_key()?;
        let (pool, name, hash) = (self.pool.clone(), name.to_string(), crate::hash_key(&key));
        let t = self.block(async move {
            let c = pool.get().await?;
            c.query_opt(
                &format!(
                    "UPDATE tenants SET key_hash = $1 WHERE name = $2 AND {LIVE} RETURNING {TENANT_COLS}"
                ),
                &[&hash, &name],
            )
            .await?
            .map(|r| row_tenant(&r))
            .ok_or_else(|| no_tenant(&name))
        })?;
        Ok((t, key))
    }

    fn record_plan(&self, r: &Reservation, plan: &serde_json::Value) -> Result<(), LedgerError> {
        let (pool, id, plan) = (self.pool.clone(), r.id, plan.to_string());
        self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "INSERT INTO request_plans (reservation_id, plan) VALUES ($1, $2::text::jsonb)
                     ON CONFLICT (reservation_id) DO UPDATE SET plan = EXCLUDED.plan",
                )
                .await?;
            c.execute(&st, &[&id, &plan]).await?;
            Ok(())
        })
    }

    fn recent_requests(&self, t: &Tenant, limit: usize) -> Result<Vec<RequestRecord>, LedgerError> {
        let (pool, id) = (self.pool.clone(), t.id);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "SELECT r.request_id, r.state, r.reserved,
                            CASE WHEN r.state = 'settled' THEN r.charged END,
                            r.created_at, r.closed_at, p.plan::text
                     FROM reservations r LEFT JOIN request_plans p ON p.reservation_id = r.id
                     WHERE r.tenant_id = $1 ORDER BY r.id DESC LIMIT $2",
                )
                .await?;
            let rows = c.query(&st, &[&id, &limit]).await?;
            Ok(rows
                .iter()
                .map(|r| RequestRecord {
                    request_id: r.get(0),
                    state: r.get(1),
                    reserved_flops: r.get(2),
                    charged_flops: r.get(3),
                    created_at: r.get(4),
                    closed_at: r.get(5),
                    plan: r
                        .get::<_, Option<String>>(6)
                        .and_then(|p| serde_json::from_str(&p).ok()),
                })
                .collect())
        })
    }

    fn usage_series(
        &self,
        t: &Tenant,
        now: i64,
        bucket_s: i64,
        buckets: usize,
    ) -> Result<Vec<UsagePoint>, LedgerError> {
        let mut points = empty_series(now, bucket_s, buckets)?;
        let first = points[0].start;
        let end = points[points.len() - 1].start + bucket_s;
        let (pool, id) = (self.pool.clone(), t.id);
        let rows = self.block(async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "SELECT (closed_at - $2) / $3, SUM(charged)::float8, COUNT(*)::int8 FROM reservations
                     WHERE tenant_id = $1 AND state = 'settled' AND closed_at >= $2 AND closed_at < $4
                     GROUP BY 1",
                )
                .await?;
            let rows = c.query(&st, &[&id, &first, &bucket_s, &end]).await?;
            Ok(rows
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, f64>(1), r.get::<_, i64>(2)))
                .collect::<Vec<_>>())
        })?;
        fill_series(&mut points, rows);
        Ok(points)
    }

    fn lease(&self) -> &LeaseSettings {
        &self.lease
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }
}

fn row_file(r: &Row) -> FileRecord {
    FileRecord {
        id: r.get(0),
        tenant_id: r.get(1),
        filename: r.get(2),
        purpose: r.get(3),
        bytes: r.get(4),
        created_at: r.get(5),
    }
}

fn row_result(r: &Row) -> LineResult {
    LineResult {
        line: r.get(0),
        custom_id: r.get(1),
        status_code: r.get(2),
        request_id: r.get(3),
        body: r.get(4),
        finished_at: r.get(5),
        usage: LineUsage {
            prompt_tokens: r.get(6),
            completion_tokens: r.get(7),
            measured_flops: r.get(8),
        },
    }
}

fn row_batch(r: &Row) -> Result<BatchRecord, LedgerError> {
    Ok(BatchRecord {
        id: r.get(0),
        tenant_id: r.get(1),
        tenant: r.get(19),
        endpoint: r.get(2),
        input_file_id: r.get(3),
        completion_window: r.get(4),
        status: BatchStatus::parse(r.get(5))?,
        total: r.get(6),
        completed: r.get(7),
        failed: r.get(8),
        usage: LineUsage {
            prompt_tokens: r.get(9),
            completion_tokens: r.get(10),
            measured_flops: r.get(11),
        },
        metadata: crate::json_value(r.get(12)),
        created_at: r.get(13),
        expires_at: r.get(14),
        cancelling_at: r.get(15),
        closed_at: r.get(16),
        output_file_id: r.get(17),
        error_file_id: r.get(18),
    })
}

async fn batch_by_id(
    c: &impl deadpool_postgres::GenericClient,
    id: &str,
) -> Result<BatchRecord, LedgerError> {
    let r = c
        .query_opt(
            &format!("{} WHERE b.id = $1", batches::BATCH_SELECT),
            &[&id],
        )
        .await?
        .ok_or_else(|| batches::no_batch(id))?;
    row_batch(&r)
}

/// One of the tenant's batches (another tenant's is not found, as a missing one).
async fn tenant_batch(
    c: &impl deadpool_postgres::GenericClient,
    tenant_id: i64,
    id: &str,
) -> Result<BatchRecord, LedgerError> {
    let r = c
        .query_opt(
            &format!(
                "{} WHERE b.id = $1 AND b.tenant_id = $2",
                batches::BATCH_SELECT
            ),
            &[&id, &tenant_id],
        )
        .await?
        .ok_or_else(|| batches::no_batch(id))?;
    row_batch(&r)
}

async fn insert_file(
    c: &impl deadpool_postgres::GenericClient,
    tenant_id: i64,
    filename: &str,
    purpose: &str,
    content: &[u8],
    now: i64,
) -> Result<FileRecord, LedgerError> {
    let id = batches::new_id("file-")?;
    let bytes = content.len() as i64;
    c.execute(
        "INSERT INTO files (id, tenant_id, filename, purpose, bytes, created_at, content)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&id, &tenant_id, &filename, &purpose, &bytes, &now, &content],
    )
    .await?;
    Ok(FileRecord {
        id,
        tenant_id,
        filename: filename.to_string(),
        purpose: purpose.to_string(),
        bytes,
        created_at: now,
    })
}

impl Batches for PostgresLedger {
    fn create_file(
        &self,
        tenant_id: i64,
        filename: &str,
        purpose: &str,
        content: &[u8],
        max_tenant_bytes: i64,
        now: i64,
    ) -> Result<FileRecord, LedgerError> {
        let (pool, filename, purpose, content) = (
            self.pool.clone(),
            filename.to_string(),
            purpose.to_string(),
            content.to_vec(),
        );
        self.block(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            // The tenant's row lock serialises its uploads across replicas.
            tx.execute("SELECT id FROM tenants WHERE id = $1 FOR UPDATE", &[&tenant_id])
                .await?;
            let stored: i64 = tx
                .query_one(
                    "SELECT COALESCE(SUM(bytes), 0)::BIGINT FROM files WHERE tenant_id = $1 AND purpose = 'batch'",
                    &[&tenant_id],
                )
                .await?
                .get(0);
            if stored + content.len() as i64 > max_tenant_bytes {
                return Err(batches::storage_full(max_tenant_bytes, stored, content.len()));
            }
            let f = insert_file(&tx, tenant_id, &filename, &purpose, &content, now).await?;
            tx.commit().await?;
            Ok(f)
        })
    }

    fn file(&self, tenant_id: i64, id: &str) -> Result<FileRecord, LedgerError> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.block(async move {
            let c = pool.get().await?;
            c.query_opt(
                &format!(
                    "SELECT {} FROM files WHERE id = $1 AND tenant_id = $2",
                    batches::FILE_COLS
                ),
                &[&id, &tenant_id],
            )
            .await?
            .map(|r| row_file(&r))
            .ok_or_else(|| batches::no_file(&id))
        })
    }

    fn file_content(&self, tenant_id: i64, id: &str) -> Result<Vec<u8>, LedgerError> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.block(async move {
            let c = pool.get().await?;
            c.query_opt(
                "SELECT content FROM files WHERE id = $1 AND tenant_id = $2",
                &[&id, &tenant_id],
            )
            .await?
            .map(|r| r.get(0))
            .ok_or_else(|| batches::no_file(&id))
        })
    }

    fn files(
        &self,
        tenant_id: i64,
        purpose: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<FileRecord>, LedgerError> {
        let (pool, purpose, after) = (
            self.pool.clone(),
            purpose.map(str::to_string),
            after.map(str::to_string),
        );
        let limit = limit as i64;
        self.block(async move {
            let c = pool.get().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {} FROM files WHERE tenant_id = $1 AND ($2::TEXT IS NULL OR purpose = $2)
                           AND ($3::TEXT IS NULL OR (created_at, id) < (SELECT created_at, id FROM files WHERE id = $3 AND tenant_id = $1))
                         ORDER BY created_at DESC, id DESC LIMIT $4",
                        batches::FILE_COLS
                    ),
                    &[&tenant_id, &purpose, &after, &limit],
                )
                .await?;
            Ok(rows.iter().map(row_file).collect())
        })
    }

    fn delete_file(&self, tenant_id: i64, id: &str) -> Result<(), LedgerError> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.block(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            let open: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM batches WHERE input_file_id = $1 AND tenant_id = $2
                       AND status IN ('in_progress', 'cancelling')",
                    &[&id, &tenant_id],
                )
                .await?
                .get(0);
            if open > 0 {
                return Err(batches::input_in_use(&id));
            }
            let n = tx
                .execute(
                    "DELETE FROM files WHERE id = $1 AND tenant_id = $2",
                    &[&id, &tenant_id],
                )
                .await?;
            if n == 0 {
                return Err(batches::no_file(&id));
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn create_batch(
        &self,
        tenant_id: i64,
        b: &NewBatch,
        now: i64,
    ) -> Result<BatchRecord, LedgerError> {
        let (pool, b) = (self.pool.clone(), b.clone());
        self.block(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            // Locked, so that the file cannot be deleted before the batch reads it.
            let purpose: String = tx
                .query_opt(
                    "SELECT purpose FROM files WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
                    &[&b.input_file_id, &tenant_id],
                )
                .await?
                .ok_or_else(|| batches::no_file(&b.input_file_id))?
                .get(0);
            if purpose != "batch" {
                return Err(batches::not_batch_input(&b.input_file_id, &purpose));
            }
            // The tenant's row lock serialises its batch creations across replicas.
            tx.execute("SELECT id FROM tenants WHERE id = $1 FOR UPDATE", &[&tenant_id])
                .await?;
            let open: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM batches WHERE tenant_id = $1 AND status IN ('in_progress', 'cancelling')",
                    &[&tenant_id],
                )
                .await?
                .get(0);
            if open >= b.max_open {
                return Err(batches::too_many_open(open));
            }
            let id = batches::new_id("batch_")?;
            tx.execute(
                "INSERT INTO batches (id, tenant_id, endpoint, input_file_id, completion_window, status,
                     total, metadata, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, 'in_progress', $6, $7, $8, $9)",
                &[
                    &id,
                    &tenant_id,
                    &b.endpoint,
                    &b.input_file_id,
                    &b.completion_window,
                    &b.total,
                    &crate::json_text(&b.metadata),
                    &now,
                    &(now + b.window_s),
                ],
            )
            .await?;
            let r = batch_by_id(&tx, &id).await?;
            tx.commit().await?;
            Ok(r)
        })
    }

    fn batch(&self, tenant_id: i64, id: &str) -> Result<BatchRecord, LedgerError> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.block(async move {
            let c = pool.get().await?;
            tenant_batch(&c, tenant_id, &id).await
        })
    }

    fn batches(
        &self,
        tenant_id: i64,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<BatchRecord>, LedgerError> {
        let (pool, after) = (self.pool.clone(), after.map(str::to_string));
        let limit = limit as i64;
        self.block(async move {
            let c = pool.get().await?;
            let rows = c
                .query(
                    &format!(
                        "{} WHERE b.tenant_id = $1
                           AND ($2::TEXT IS NULL OR (b.created_at, b.id) < (SELECT created_at, id FROM batches WHERE id = $2 AND tenant_id = $1))
                         ORDER BY b.created_at DESC, b.id DESC LIMIT $3",
                        batches::BATCH_SELECT
                    ),
                    &[&tenant_id, &after, &limit],
                )
                .await?;
            rows.iter().map(row_batch).collect()
        })
    }

    fn cancel_batch(&self, tenant_id: i64, id: &str, now: i64) -> Result<BatchRecord, LedgerError> {
        let (pool, id) = (self.pool.clone(), id.to_string());
        self.block(async move {
            let c = pool.get().await?;
            let n = c
                .execute(
                    "UPDATE batches SET status = 'cancelling', cancelling_at = $3
                     WHERE id = $1 AND tenant_id = $2 AND status = 'in_progress'",
                    &[&id, &tenant_id, &now],
                )
                .await?;
            let b = tenant_batch(&c, tenant_id, &id).await?;
            if n == 0 && b.status != BatchStatus::Cancelling {
                return Err(batches::cannot_cancel(&b));
            }
            Ok(b)
        })
    }

    fn claim_batch(&self, now: i64) -> Result<Option<BatchRecord>, LedgerError> {
        let (pool, owner) = (self.pool.clone(), self.lease.owner.clone());
        let until = now + self.lease.lease_s;
        self.block(async move {
            let c = pool.get().await?;
            let id: Option<String> = c
                .query_opt(
                    &format!(
                        "UPDATE batches SET owner = $2, lease_until = $3, last_run_at = $1 WHERE id = (
                             SELECT b.id FROM batches b WHERE b.status IN ('in_progress', 'cancelling')
                               AND (b.lease_until < $1 OR b.owner = $2)
                             {} LIMIT 1 FOR UPDATE SKIP LOCKED)
                         RETURNING id",
                        batches::CLAIM_ORDER
                    ),
                    &[&now, &owner, &until],
                )
                .await?
                .map(|r| r.get(0));
            match id {
                Some(id) => Ok(Some(batch_by_id(&c, &id).await?)),
                None => Ok(None),
            }
        })
    }

    fn yield_batch(&self, id: &str, now: i64) -> Result<bool, LedgerError> {
        let (pool, id, owner) = (self.pool.clone(), id.to_string(), self.lease.owner.clone());
        self.block(async move {
            let c = pool.get().await?;
            // One statement: released only while another open batch's lease is free.
            let n = c
                .execute(
                    "UPDATE batches SET owner = NULL, lease_until = 0, last_run_at = $3
                     WHERE id = $1 AND owner = $2 AND EXISTS (
                         SELECT 1 FROM batches o WHERE o.status IN ('in_progress', 'cancelling')
                           AND o.lease_until < $3 AND o.id <> $1)",
                    &[&id, &owner, &now],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn renew_batch(&self, id: &str, now: i64) -> Result<Option<BatchStatus>, LedgerError> {
        let (pool, id, owner) = (self.pool.clone(), id.to_string(), self.lease.owner.clone());
        let until = now + self.lease.lease_s;
        self.block(async move {
            let c = pool.get().await?;
            let r = c
                .query_opt(
                    "UPDATE batches SET lease_until = $3 WHERE id = $1 AND owner = $2
                       AND status IN ('in_progress', 'cancelling') RETURNING status",
                    &[&id, &owner, &until],
                )
                .await?;
            r.map(|r| BatchStatus::parse(r.get(0))).transpose()
        })
    }

    fn record_line(&self, batch_id: &str, r: &LineResult) -> Result<bool, LedgerError> {
        let (pool, id, r) = (self.pool.clone(), batch_id.to_string(), r.clone());
        self.block(async move {
            let c = pool.get().await?;
            Ok(c.execute(
                "INSERT INTO batch_results (batch_id, line, custom_id, status_code, request_id, body, finished_at,
                     prompt_tokens, completion_tokens, measured_flops)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 WHERE EXISTS (SELECT 1 FROM batches
                     WHERE id = $1 AND status IN ('in_progress', 'cancelling'))
                 ON CONFLICT (batch_id, line) DO NOTHING",
                &[
                    &id,
                    &r.line,
                    &r.custom_id,
                    &r.status_code,
                    &r.request_id,
                    &r.body,
                    &r.finished_at,
                    &r.usage.prompt_tokens,
                    &r.usage.completion_tokens,
                    &r.usage.measured_flops,
                ],
            )
            .await?
                == 1)
        })
    }

    fn line_results(&self, batch_id: &str) -> Result<Vec<LineResult>, LedgerError> {
        let (pool, id) = (self.pool.clone(), batch_id.to_string());
        self.block(async move {
            let c = pool.get().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {} FROM batch_results WHERE batch_id = $1 ORDER BY line",
                        batches::RESULT_COLS
                    ),
                    &[&id],
                )
                .await?;
            Ok(rows.iter().map(row_result).collect())
        })
    }

    fn backlog(&self) -> Result<(i64, i64), LedgerError> {
        let pool = self.pool.clone();
        self.block(async move {
            let c = pool.get().await?;
            let r = c.query_one(batches::BACKLOG, &[]).await?;
            Ok((r.get(0), r.get(1)))
        })
    }

    fn purge(&self, before: i64) -> Result<(u64, u64), LedgerError> {
        let pool = self.pool.clone();
        self.block(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            let [results, closed, files] = batches::purge_statements("$1");
            tx.execute(&results, &[&before]).await?;
            let b = tx.execute(&closed, &[&before]).await?;
            let f = tx.execute(&files, &[&before]).await?;
            tx.commit().await?;
            Ok((b, f))
        })
    }

    fn finish_batch(
        &self,
        id: &str,
        status: BatchStatus,
        output: Option<NewFile>,
        errors: Option<NewFile>,
        now: i64,
    ) -> Result<BatchRecord, LedgerError> {
        batches::check_closing(status)?;
        let (pool, id, owner) = (self.pool.clone(), id.to_string(), self.lease.owner.clone());
        self.block(async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            let tenant_id: i64 = tx
                .query_opt(
                    "SELECT tenant_id FROM batches WHERE id = $1 AND owner = $2
                       AND status IN ('in_progress', 'cancelling') FOR UPDATE",
                    &[&id, &owner],
                )
                .await?
                .ok_or_else(|| batches::not_held(&id))?
                .get(0);
            let mut files = [None, None];
            for (slot, f) in files.iter_mut().zip([output, errors]) {
                if let Some(f) = f {
                    let r = insert_file(&tx, tenant_id, &f.filename, "batch_output", &f.content, now)
                        .await?;
                    *slot = Some(r.id);
                }
            }
            let [out, err] = files;
            for sql in batches::keep_totals("$1") {
                tx.execute(&sql, &[&id]).await?;
            }
            tx.execute(
                "UPDATE batches SET status = $2, closed_at = $3, output_file_id = $4, error_file_id = $5,
                     owner = NULL, lease_until = 0 WHERE id = $1",
                &[&id, &status.as_str(), &now, &out, &err],
            )
            .await?;
            let b = batch_by_id(&tx, &id).await?;
            tx.commit().await?;
            Ok(b)
        })
    }
}
