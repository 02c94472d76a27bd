//! The embedded SQLite ledger (WAL mode): one server, or tools beside it, on one machine.
//! Every write is a transaction that takes SQLite's write lock first (`BEGIN IMMEDIATE`), so
//! admission is atomic across the processes that share the file.

use crate::batches::{
    self, BatchRecord, BatchStatus, Batches, FileRecord, LineResult, LineUsage, NewBatch, NewFile,
};
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
    Migration {
        version: 7,
        name: "batches",
        sql: include_str!("../migrations/sqlite/0007_batches.sql"),
    },
    Migration {
        version: 8,
        name: "tenant_media_allow",
        sql: include_str!("../migrations/sqlite/0008_tenant_media_allow.sql"),
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
    "id, name, default_budget, per_request_max, quota, period, max_in_flight, weight, media_allow";
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
            media_allow: crate::json_value(r.get(8)?),
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
            "INSERT INTO tenants (name, key_hash, default_budget, per_request_max, quota, period, max_in_flight, weight, media_allow, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, strftime('%s','now'))",
            params![
                name,
                crate::hash_key(&key),
                default_budget,
                per_request_max,
                s.quota.flatten(),
                s.period.unwrap_or(Period::Day).as_str(),
                s.max_in_flight.flatten(),
                s.weight.flatten(),
                crate::json_text(&s.media_allow.clone().flatten())
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
             max_in_flight = ?5, weight = ?6, media_allow = ?7 WHERE id = ?8",
            params![
                t.default_budget,
                t.per_request_max,
                t.quota,
                t.period.as_str(),
                t.max_in_flight,
                t.weight,
                crate::json_text(&t.media_allow),
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

fn row_file(r: &rusqlite::Row) -> rusqlite::Result<FileRecord> {
    Ok(FileRecord {
        id: r.get(0)?,
        tenant_id: r.get(1)?,
        filename: r.get(2)?,
        purpose: r.get(3)?,
        bytes: r.get(4)?,
        created_at: r.get(5)?,
    })
}

fn row_result(r: &rusqlite::Row) -> rusqlite::Result<LineResult> {
    Ok(LineResult {
        line: r.get(0)?,
        custom_id: r.get(1)?,
        status_code: r.get(2)?,
        request_id: r.get(3)?,
        body: r.get(4)?,
        finished_at: r.get(5)?,
        usage: LineUsage {
            prompt_tokens: r.get(6)?,
            completion_tokens: r.get(7)?,
            measured_flops: r.get(8)?,
        },
    })
}

/// A batch row (status kept as text until checked).
fn row_batch(r: &rusqlite::Row) -> rusqlite::Result<(BatchRecord, String)> {
    let status: String = r.get(5)?;
    Ok((
        BatchRecord {
            id: r.get(0)?,
            tenant_id: r.get(1)?,
            tenant: r.get(19)?,
            endpoint: r.get(2)?,
            input_file_id: r.get(3)?,
            completion_window: r.get(4)?,
            status: BatchStatus::InProgress,
            total: r.get(6)?,
            completed: r.get(7)?,
            failed: r.get(8)?,
            usage: LineUsage {
                prompt_tokens: r.get(9)?,
                completion_tokens: r.get(10)?,
                measured_flops: r.get(11)?,
            },
            metadata: crate::json_value(r.get(12)?),
            created_at: r.get(13)?,
            expires_at: r.get(14)?,
            cancelling_at: r.get(15)?,
            closed_at: r.get(16)?,
            output_file_id: r.get(17)?,
            error_file_id: r.get(18)?,
        },
        status,
    ))
}

fn checked((mut b, status): (BatchRecord, String)) -> Result<BatchRecord, LedgerError> {
    b.status = BatchStatus::parse(&status)?;
    Ok(b)
}

fn batch_where(
    conn: &Connection,
    cond: &str,
    p: impl rusqlite::Params,
) -> Result<Option<BatchRecord>, LedgerError> {
    conn.query_row(
        &format!("{} WHERE {cond}", batches::BATCH_SELECT),
        p,
        row_batch,
    )
    .optional()?
    .map(checked)
    .transpose()
}

fn insert_file(
    conn: &Connection,
    tenant_id: i64,
    filename: &str,
    purpose: &str,
    content: &[u8],
    now: i64,
) -> Result<FileRecord, LedgerError> {
    let id = batches::new_id("file-")?;
    conn.execute(
        "INSERT INTO files (id, tenant_id, filename, purpose, bytes, created_at, content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            id,
            tenant_id,
            filename,
            purpose,
            content.len() as i64,
            now,
            content
        ],
    )?;
    Ok(FileRecord {
        id,
        tenant_id,
        filename: filename.to_string(),
        purpose: purpose.to_string(),
        bytes: content.len() as i64,
        created_at: now,
    })
}

impl Batches for SqliteLedger {
    fn create_file(
        &self,
        tenant_id: i64,
        filename: &str,
        purpose: &str,
        content: &[u8],
        max_tenant_bytes: i64,
        now: i64,
    ) -> Result<FileRecord, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored: i64 = tx.query_row(
            "SELECT COALESCE(SUM(bytes), 0) FROM files WHERE tenant_id = ?1 AND purpose = 'batch'",
            params![tenant_id],
            |r| r.get(0),
        )?;
        if stored + content.len() as i64 > max_tenant_bytes {
            return Err(batches::storage_full(
                max_tenant_bytes,
                stored,
                content.len(),
            ));
        }
        let f = insert_file(&tx, tenant_id, filename, purpose, content, now)?;
        tx.commit()?;
        Ok(f)
    }

    fn file(&self, tenant_id: i64, id: &str) -> Result<FileRecord, LedgerError> {
        self.lock()
            .query_row(
                &format!(
                    "SELECT {} FROM files WHERE id = ?1 AND tenant_id = ?2",
                    batches::FILE_COLS
                ),
                params![id, tenant_id],
                row_file,
            )
            .optional()?
            .ok_or_else(|| batches::no_file(id))
    }

    fn file_content(&self, tenant_id: i64, id: &str) -> Result<Vec<u8>, LedgerError> {
        self.lock()
            .query_row(
                "SELECT content FROM files WHERE id = ?1 AND tenant_id = ?2",
                params![id, tenant_id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| batches::no_file(id))
    }

    fn files(
        &self,
        tenant_id: i64,
        purpose: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<FileRecord>, LedgerError> {
        let conn = self.lock();
        let mut st = conn.prepare(&format!(
            "SELECT {} FROM files f WHERE tenant_id = ?1 AND (?2 IS NULL OR purpose = ?2)
               AND (?3 IS NULL OR (created_at, id) < (SELECT created_at, id FROM files WHERE id = ?3 AND tenant_id = ?1))
             ORDER BY created_at DESC, id DESC LIMIT ?4",
            batches::FILE_COLS
        ))?;
        let rows = st.query_map(params![tenant_id, purpose, after, limit as i64], row_file)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn delete_file(&self, tenant_id: i64, id: &str) -> Result<(), LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let open: i64 = tx.query_row(
            "SELECT COUNT(*) FROM batches WHERE input_file_id = ?1 AND tenant_id = ?2
               AND status IN ('in_progress', 'cancelling')",
            params![id, tenant_id],
            |r| r.get(0),
        )?;
        if open > 0 {
            return Err(batches::input_in_use(id));
        }
        let n = tx.execute(
            "DELETE FROM files WHERE id = ?1 AND tenant_id = ?2",
            params![id, tenant_id],
        )?;
        if n == 0 {
            return Err(batches::no_file(id));
        }
        tx.commit()?;
        Ok(())
    }

    fn create_batch(
        &self,
        tenant_id: i64,
        b: &NewBatch,
        now: i64,
    ) -> Result<BatchRecord, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let purpose: String = tx
            .query_row(
                "SELECT purpose FROM files WHERE id = ?1 AND tenant_id = ?2",
                params![b.input_file_id, tenant_id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| batches::no_file(&b.input_file_id))?;
        if purpose != "batch" {
            return Err(batches::not_batch_input(&b.input_file_id, &purpose));
        }
        let open: i64 = tx.query_row(
            "SELECT COUNT(*) FROM batches WHERE tenant_id = ?1 AND status IN ('in_progress', 'cancelling')",
            params![tenant_id],
            |r| r.get(0),
        )?;
        if open >= b.max_open {
            return Err(batches::too_many_open(open));
        }
        let id = batches::new_id("batch_")?;
        tx.execute(
            "INSERT INTO batches (id, tenant_id, endpoint, input_file_id, completion_window, status,
                 total, metadata, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 'in_progress', ?6, ?7, ?8, ?9)",
            params![
                id,
                tenant_id,
                b.endpoint,
                b.input_file_id,
                b.completion_window,
                b.total,
                crate::json_text(&b.metadata),
                now,
                now + b.window_s
            ],
        )?;
        let r =
            batch_where(&tx, "b.id = ?1", params![id])?.ok_or_else(|| batches::no_batch(&id))?;
        tx.commit()?;
        Ok(r)
    }

    fn batch(&self, tenant_id: i64, id: &str) -> Result<BatchRecord, LedgerError> {
        batch_where(
            &self.lock(),
            "b.id = ?1 AND b.tenant_id = ?2",
            params![id, tenant_id],
        )?
        .ok_or_else(|| batches::no_batch(id))
    }

    fn batches(
        &self,
        tenant_id: i64,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<BatchRecord>, LedgerError> {
        let conn = self.lock();
        let mut st = conn.prepare(&format!(
            "{} WHERE b.tenant_id = ?1
               AND (?2 IS NULL OR (b.created_at, b.id) < (SELECT created_at, id FROM batches WHERE id = ?2 AND tenant_id = ?1))
             ORDER BY b.created_at DESC, b.id DESC LIMIT ?3",
            batches::BATCH_SELECT
        ))?;
        let rows = st.query_map(params![tenant_id, after, limit as i64], row_batch)?;
        rows.map(|r| checked(r?)).collect()
    }

    fn cancel_batch(&self, tenant_id: i64, id: &str, now: i64) -> Result<BatchRecord, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let b = batch_where(
            &tx,
            "b.id = ?1 AND b.tenant_id = ?2",
            params![id, tenant_id],
        )?
        .ok_or_else(|| batches::no_batch(id))?;
        match b.status {
            BatchStatus::Cancelling => return Ok(b),
            BatchStatus::InProgress => {}
            _ => return Err(batches::cannot_cancel(&b)),
        }
        tx.execute(
            "UPDATE batches SET status = 'cancelling', cancelling_at = ?2 WHERE id = ?1",
            params![id, now],
        )?;
        let b = batch_where(&tx, "b.id = ?1", params![id])?.ok_or_else(|| batches::no_batch(id))?;
        tx.commit()?;
        Ok(b)
    }

    fn claim_batch(&self, now: i64) -> Result<Option<BatchRecord>, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id: Option<String> = tx
            .query_row(
                &format!(
                    "SELECT b.id FROM batches b WHERE b.status IN ('in_progress', 'cancelling')
                       AND (b.lease_until < ?1 OR b.owner = ?2) {} LIMIT 1",
                    batches::CLAIM_ORDER
                ),
                params![now, self.lease.owner],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        tx.execute(
            "UPDATE batches SET owner = ?2, lease_until = ?3, last_run_at = ?4 WHERE id = ?1",
            params![id, self.lease.owner, now + self.lease.lease_s, now],
        )?;
        let b = batch_where(&tx, "b.id = ?1", params![id])?;
        tx.commit()?;
        Ok(b)
    }

    fn yield_batch(&self, id: &str, now: i64) -> Result<bool, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let waiting: i64 = tx.query_row(
            "SELECT COUNT(*) FROM batches WHERE status IN ('in_progress', 'cancelling')
               AND lease_until < ?1 AND id <> ?2",
            params![now, id],
            |r| r.get(0),
        )?;
        if waiting == 0 {
            return Ok(false);
        }
        let n = tx.execute(
            "UPDATE batches SET owner = NULL, lease_until = 0, last_run_at = ?3
             WHERE id = ?1 AND owner = ?2",
            params![id, self.lease.owner, now],
        )?;
        tx.commit()?;
        Ok(n == 1)
    }

    fn renew_batch(&self, id: &str, now: i64) -> Result<Option<BatchStatus>, LedgerError> {
        let conn = self.lock();
        let n = conn.execute(
            "UPDATE batches SET lease_until = ?3 WHERE id = ?1 AND owner = ?2
               AND status IN ('in_progress', 'cancelling')",
            params![id, self.lease.owner, now + self.lease.lease_s],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let s: String = conn.query_row(
            "SELECT status FROM batches WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )?;
        Ok(Some(BatchStatus::parse(&s)?))
    }

    fn record_line(&self, batch_id: &str, r: &LineResult) -> Result<bool, LedgerError> {
        Ok(self.lock().execute(
            "INSERT INTO batch_results (batch_id, line, custom_id, status_code, request_id, body, finished_at,
                 prompt_tokens, completion_tokens, measured_flops)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10 WHERE EXISTS (SELECT 1 FROM batches
                 WHERE id = ?1 AND status IN ('in_progress', 'cancelling'))
             ON CONFLICT (batch_id, line) DO NOTHING",
            params![
                batch_id,
                r.line,
                r.custom_id,
                r.status_code,
                r.request_id,
                r.body,
                r.finished_at,
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                r.usage.measured_flops
            ],
        )? == 1)
    }

    fn line_results(&self, batch_id: &str) -> Result<Vec<LineResult>, LedgerError> {
        let conn = self.lock();
        let mut st = conn.prepare(&format!(
            "SELECT {} FROM batch_results WHERE batch_id = ?1 ORDER BY line",
            batches::RESULT_COLS
        ))?;
        let rows = st.query_map(params![batch_id], row_result)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn backlog(&self) -> Result<(i64, i64), LedgerError> {
        Ok(self
            .lock()
            .query_row(batches::BACKLOG, [], |r| Ok((r.get(0)?, r.get(1)?)))?)
    }

    fn purge(&self, before: i64) -> Result<(u64, u64), LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let [results, closed, files] = batches::purge_statements("?1");
        tx.execute(&results, params![before])?;
        let b = tx.execute(&closed, params![before])? as u64;
        let f = tx.execute(&files, params![before])? as u64;
        tx.commit()?;
        Ok((b, f))
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
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let b = batch_where(
            &tx,
            "b.id = ?1 AND b.owner = ?2 AND b.status IN ('in_progress', 'cancelling')",
            params![id, self.lease.owner],
        )?
        .ok_or_else(|| batches::not_held(id))?;
        let file = |f: Option<NewFile>| -> Result<Option<String>, LedgerError> {
            f.map(|f| {
                insert_file(
                    &tx,
                    b.tenant_id,
                    &f.filename,
                    "batch_output",
                    &f.content,
                    now,
                )
                .map(|r| r.id)
            })
            .transpose()
        };
        let (out, err) = (file(output)?, file(errors)?);
        for sql in batches::keep_totals("?1") {
            tx.execute(&sql, params![id])?;
        }
        tx.execute(
            "UPDATE batches SET status = ?2, closed_at = ?3, output_file_id = ?4, error_file_id = ?5,
                 owner = NULL, lease_until = 0 WHERE id = ?1",
            params![id, status.as_str(), now, out, err],
        )?;
        let b = batch_where(&tx, "b.id = ?1", params![id])?.ok_or_else(|| batches::no_batch(id))?;
        tx.commit()?;
        Ok(b)
    }
}
