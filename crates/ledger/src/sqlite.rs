//! The embedded SQLite ledger (WAL mode): one server, or tools beside it, on one machine.
//! Every write is a transaction that takes SQLite's write lock first (`BEGIN IMMEDIATE`), so
//! admission is atomic across the processes that share the file.

use crate::{
    empty_series, exists, fill_series, in_flight, new_key, new_tenant_budgets, no_tenant,
    quota_exhausted, updated_tenant, LeaseSettings, Ledger, LedgerError, Migration, Period,
    RequestRecord, Reservation, Tenant, TenantSettings, Usage, UsagePoint,
};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::Mutex;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "leases",
        sql: include_str!("../migrations/sqlite/0002_leases.sql"),
    },
    Migration {
        version: 3,
        name: "usage_totals",
        sql: include_str!("../migrations/sqlite/0003_usage_totals.sql"),
    },
    Migration {
        version: 4,
        name: "request_plans",
        sql: include_str!("../migrations/sqlite/0004_request_plans.sql"),
    },
    Migration {
        version: 5,
        name: "tenant_max_in_flight",
        sql: include_str!("../migrations/sqlite/0005_tenant_max_in_flight.sql"),
    },
    Migration {
        version: 6,
        name: "tenant_weight",
        sql: include_str!("../migrations/sqlite/0006_tenant_weight.sql"),
    },
];

pub struct SqliteLedger {
    conn: Mutex<Connection>,
    lease: LeaseSettings,
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            // The file is locked by another writer for longer than the busy timeout.
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(
                    f.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                LedgerError::Unavailable(e.to_string())
            }
            _ => LedgerError::Storage(e.to_string()),
        }
    }
}

const TENANT_COLS: &str =
    "id, name, default_budget, per_request_max, quota, period, max_in_flight, weight";
/// Removed tenants are tombstones (see `remove_tenant`).
const LIVE: &str = "key_hash NOT LIKE 'removed:%'";

impl SqliteLedger {
    /// Opens (creating if needed) the file and applies pending migrations.
    pub fn open(path: &Path, lease: LeaseSettings) -> Result<Self, LedgerError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            lease,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a read-only query on the connection (tests look at the stored rows).
    #[doc(hidden)]
    pub fn query_i64(&self, sql: &str) -> Result<i64, LedgerError> {
        Ok(self.lock().query_row(sql, [], |r| r.get(0))?)
    }

    fn row_tenant(r: &rusqlite::Row) -> rusqlite::Result<Tenant> {
        let period: String = r.get(5)?;
        Ok(Tenant {
            id: r.get(0)?,
            name: r.get(1)?,
            default_budget: r.get(2)?,
            per_request_max: r.get(3)?,
            quota: r.get(4)?,
            period: if period == "month" {
                Period::Month
            } else {
                Period::Day
            },
            max_in_flight: r.get::<_, Option<i64>>(6)?.map(|m| m as u32),
            weight: r.get(7)?,
        })
    }

    /// (charged, held by live leases, settled requests) in the period starting at `start`.
    fn used(
        conn: &Connection,
        tenant: i64,
        start: i64,
        now: i64,
    ) -> rusqlite::Result<(f64, f64, i64)> {
        conn.query_row(
            "SELECT COALESCE((SELECT charged FROM usage_totals WHERE tenant_id = ?1 AND period_start = ?2), 0),
                    COALESCE((SELECT SUM(reserved) FROM reservations
                               WHERE tenant_id = ?1 AND period_start = ?2 AND state = 'open' AND lease_until >= ?3), 0),
                    COALESCE((SELECT requests FROM usage_totals WHERE tenant_id = ?1 AND period_start = ?2), 0)",
            params![tenant, start, now],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }
}

fn migrate(conn: &mut Connection) -> Result<(), LedgerError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )?;
    let have: i64 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    for m in MIGRATIONS.iter().filter(|m| m.version > have) {
        tx.execute_batch(m.sql).map_err(|e| {
            LedgerError::Storage(format!("migration {} {}: {e}", m.version, m.name))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, strftime('%s','now'))",
            params![m.version, m.name],
        )?;
        tracing::info!(version = m.version, name = m.name, "sqlite ledger migrated");
    }
    tx.commit()?;
    Ok(())
}

impl Ledger for SqliteLedger {
    fn create_tenant(
        &self,
        name: &str,
        s: &TenantSettings,
    ) -> Result<(Tenant, String), LedgerError> {
        let (default_budget, per_request_max) = new_tenant_budgets(name, s)?;
        let key = new_key()?;
        let r = self.lock().execute(
            "INSERT INTO tenants (name, key_hash, default_budget, per_request_max, quota, period, max_in_flight, weight, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, strftime('%s','now'))",
            params![
                name,
                crate::hash_key(&key),
                default_budget,
                per_request_max,
                s.quota.flatten(),
                s.period.unwrap_or(Period::Day).as_str(),
                s.max_in_flight.flatten(),
                s.weight.flatten()
            ],
        );
        match r {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(exists(name));
            }
            other => {
                other?;
            }
        }
        Ok((self.tenant_by_name(name)?, key))
    }

    fn update_tenant(&self, name: &str, s: &TenantSettings) -> Result<Tenant, LedgerError> {
        let t = updated_tenant(self.tenant_by_name(name)?, s)?;
        self.lock().execute(
            "UPDATE tenants SET default_budget = ?1, per_request_max = ?2, quota = ?3, period = ?4,
             max_in_flight = ?5, weight = ?6 WHERE id = ?7",
            params![
                t.default_budget,
                t.per_request_max,
                t.quota,
                t.period.as_str(),
                t.max_in_flight,
                t.weight,
                t.id
            ],
        )?;
        Ok(t)
    }

    fn remove_tenant(&self, name: &str) -> Result<(), LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id: i64 = tx
            .query_row(
                &format!("SELECT id FROM tenants WHERE name = ?1 AND {LIVE}"),
                params![name],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| no_tenant(name))?;
        let open: i64 = tx.query_row(
            "SELECT COUNT(*) FROM reservations WHERE tenant_id = ?1 AND state = 'open'",
            params![id],
            |r| r.get(0),
        )?;
        if open > 0 {
            return Err(in_flight(name, open));
        }
        // A tombstone, not a DELETE: the reservations (its accounting history) stay; the key
        // can never match again (no SHA-256 hex digest starts with `removed:`), and the name
        // (a `~` is not allowed in live names) is free for a new tenant.
        tx.execute(
            "UPDATE tenants SET name = name || '~removed~' || id, key_hash = 'removed:' || id WHERE id = ?1",
            params![id],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn tenants(&self) -> Result<Vec<Tenant>, LedgerError> {
        let conn = self.lock();
        let mut st = conn.prepare(&format!(
            "SELECT {TENANT_COLS} FROM tenants WHERE {LIVE} ORDER BY name"
        ))?;
        let rows = st.query_map([], Self::row_tenant)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn tenant_by_name(&self, name: &str) -> Result<Tenant, LedgerError> {
        self.lock()
            .query_row(
                &format!("SELECT {TENANT_COLS} FROM tenants WHERE name = ?1 AND {LIVE}"),
                params![name],
                Self::row_tenant,
            )
            .optional()?
            .ok_or_else(|| no_tenant(name))
    }

    fn tenant_by_key(&self, key: &str) -> Result<Option<Tenant>, LedgerError> {
        Ok(self
            .lock()
            .query_row(
                &format!("SELECT {TENANT_COLS} FROM tenants WHERE key_hash = ?1"),
                params![crate::hash_key(key)],
                Self::row_tenant,
            )
            .optional()?)
    }

    fn usage(&self, t: &Tenant, now: i64) -> Result<Usage, LedgerError> {
        let (start, _) = t.period.bounds(now);
        let (charged, reserved, n) = Self::used(&self.lock(), t.id, start, now)?;
        Ok(Usage::new(t, now, charged, reserved, n as u64))
    }

    fn reserve(
        &self,
        t: &Tenant,
        flops: f64,
        request_id: &str,
        now: i64,
    ) -> Result<Reservation, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (start, reset) = t.period.bounds(now);
        tx.execute(
            "UPDATE reservations SET state = 'expired', closed_at = ?2
             WHERE tenant_id = ?1 AND state = 'open' AND lease_until < ?2",
            params![t.id, now],
        )?;
        let quota: Option<f64> = tx
            .query_row(
                &format!("SELECT quota FROM tenants WHERE id = ?1 AND {LIVE}"),
                params![t.id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| no_tenant(&t.name))?;
        let (charged, reserved, _) = Self::used(&tx, t.id, start, now)?;
        if let Some(q) = quota {
            if charged + reserved + flops > q {
                return Err(quota_exhausted(t, q, charged + reserved, flops, reset));
            }
        }
        let r = tx.execute(
            "INSERT INTO reservations (tenant_id, request_id, period_start, reserved, state, owner, lease_until, created_at)
             VALUES (?1, ?2, ?3, ?4, 'open', ?5, ?6, ?7)",
            params![t.id, request_id, start, flops, self.lease.owner, now + self.lease.lease_s, now],
        );
        match r {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(LedgerError::Conflict(format!(
                    "request id `{request_id}` already has a reservation"
                )));
            }
            other => {
                other?;
            }
        }
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Reservation {
            id,
            request_id: request_id.to_string(),
            tenant_id: t.id,
            flops,
        })
    }

    fn settle(&self, request_id: &str, measured: f64, now: i64) -> Result<bool, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let settled: Option<(i64, i64, f64)> = tx
            .query_row(
                "UPDATE reservations SET state = 'settled', charged = MIN(?1, reserved), closed_at = ?2
                 WHERE request_id = ?3 AND state IN ('open', 'expired')
                 RETURNING tenant_id, period_start, charged",
                params![measured, now, request_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((tenant, start, charged)) = settled else {
            return Ok(false);
        };
        tx.execute(
            "INSERT INTO usage_totals (tenant_id, period_start, charged, requests) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT (tenant_id, period_start) DO UPDATE
                SET charged = charged + excluded.charged, requests = requests + 1",
            params![tenant, start, charged],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn release(&self, request_id: &str, now: i64) -> Result<bool, LedgerError> {
        let n = self.lock().execute(
            "UPDATE reservations SET state = 'released', closed_at = ?1
             WHERE request_id = ?2 AND state IN ('open', 'expired')",
            params![now, request_id],
        )?;
        Ok(n == 1)
    }

    fn renew(&self, request_ids: &[String], now: i64) -> Result<u64, LedgerError> {
        if request_ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = 0;
        {
            let mut st = tx.prepare(
                "UPDATE reservations SET lease_until = ?1, state = 'open', closed_at = NULL
                 WHERE request_id = ?2 AND owner = ?3 AND state IN ('open', 'expired')",
            )?;
            for id in request_ids {
                n += st.execute(params![now + self.lease.lease_s, id, self.lease.owner])? as u64;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    fn expire(&self, now: i64) -> Result<u64, LedgerError> {
        Ok(self.lock().execute(
            "UPDATE reservations SET state = 'expired', closed_at = ?1 WHERE state = 'open' AND lease_until < ?1",
            params![now],
        )? as u64)
    }

    fn rotate_key(&self, name: &str) -> Result<(Tenant, String), LedgerError> {
        let key = new_key()?;
        let n = self.lock().execute(
            &format!("UPDATE tenants SET key_hash = ?1 WHERE name = ?2 AND {LIVE}"),
            params![crate::hash_key(&key), name],
        )?;
        if n == 0 {
            return Err(no_tenant(name));
        }
        Ok((self.tenant_by_name(name)?, key))
    }

    fn record_plan(&self, r: &Reservation, plan: &serde_json::Value) -> Result<(), LedgerError> {
        self.lock().execute(
            "INSERT OR REPLACE INTO request_plans (reservation_id, plan) VALUES (?1, ?2)",
            params![r.id, plan.to_string()],
        )?;
        Ok(())
    }

    fn recent_requests(&self, t: &Tenant, limit: usize) -> Result<Vec<RequestRecord>, LedgerError> {
        let conn = self.lock();
        let mut st = conn.prepare_cached(
            "SELECT r.request_id, r.state, r.reserved,
                    CASE WHEN r.state = 'settled' THEN r.charged END,
                    r.created_at, r.closed_at, p.plan
             FROM reservations r LEFT JOIN request_plans p ON p.reservation_id = r.id
             WHERE r.tenant_id = ?1 ORDER BY r.id DESC LIMIT ?2",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = st.query_map(params![t.id, limit], |r| {
            let plan: Option<String> = r.get(6)?;
            Ok(RequestRecord {
                request_id: r.get(0)?,
                state: r.get(1)?,
                reserved_flops: r.get(2)?,
                charged_flops: r.get(3)?,
                created_at: r.get(4)?,
                closed_at: r.get(5)?,
                plan: plan.and_then(|p| serde_json::from_str(&p).ok()),
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
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
        let conn = self.lock();
        let mut st = conn.prepare_cached(
            "SELECT (closed_at - ?2) / ?3, SUM(charged), COUNT(*) FROM reservations
             WHERE tenant_id = ?1 AND state = 'settled' AND closed_at >= ?2 AND closed_at < ?4
             GROUP BY 1",
        )?;
        let rows = st
            .query_map(params![t.id, first, bucket_s, end], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        fill_series(&mut points, rows);
        Ok(points)
    }

    fn lease(&self) -> &LeaseSettings {
        &self.lease
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }
}
