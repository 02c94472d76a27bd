//! Tenants, API keys (stored hashed) and the FLOPs ledger.
//!
//! Accounting: a request reserves its planned FLOPs when admitted, settles to its measured FLOPs
//! when done, and is released on failure. Usage in a period is computed from the reservations
//! themselves (settled charges plus open reservations), so there is no counter to drift. On
//! start-up, reservations left open by a crashed process are released (their requests never
//! finished: nothing is charged), and settling is a conditional update, so nothing is charged
//! twice. Each reservation keeps the plan it was admitted with, for a tenant's request history
//! and usage over time. Storage sits behind [`Ledger`] so a Postgres implementation can serve
//! replicas.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{message}")]
    QuotaExhausted {
        message: String,
        reset_at: Option<i64>,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// The operation conflicts with the current state (e.g. requests still in flight).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Storage(String),
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Storage(e.to_string())
    }
}

/// Quota period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        match s {
            "day" => Ok(Period::Day),
            "month" => Ok(Period::Month),
            other => Err(LedgerError::Invalid(format!(
                "period must be `day` or `month`, got `{other}`"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }
    /// (start, next start) of the period containing `now` (unix seconds, UTC).
    pub fn bounds(self, now: i64) -> (i64, i64) {
        match self {
            Period::Day => {
                let s = now.div_euclid(86_400) * 86_400;
                (s, s + 86_400)
            }
            Period::Month => {
                let (y, m, _) = civil_from_days(now.div_euclid(86_400));
                let start = days_from_civil(y, m, 1) * 86_400;
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (start, days_from_civil(ny, nm, 1) * 86_400)
            }
        }
    }
}

// Howard Hinnant's civil-calendar algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A tenant as stored (never with its key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: i64,
    pub name: String,
    pub default_budget: f64,
    pub per_request_max: f64,
    /// FLOPs per period; None = unlimited.
    pub quota: Option<f64>,
    pub period: Period,
}

/// Settings for a new or changed tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantSettings {
    pub default_budget: Option<f64>,
    pub per_request_max: Option<f64>,
    /// `Some(None)` clears the quota.
    #[serde(default, with = "double_option")]
    pub quota: Option<Option<f64>>,
    pub period: Option<Period>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<Option<f64>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(Some(x)) => s.serialize_f64(*x),
            _ => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
        Ok(Some(Option::<f64>::deserialize(d)?))
    }
}

/// Usage of a tenant in its current period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub tenant: String,
    pub period: Period,
    pub period_start: i64,
    pub reset_at: i64,
    /// Settled (measured) FLOPs.
    pub charged_flops: f64,
    /// FLOPs held by requests in flight.
    pub reserved_flops: f64,
    pub quota: Option<f64>,
    /// Quota minus charged minus reserved (None when unlimited).
    pub remaining: Option<f64>,
    pub requests: u64,
}

/// One request of a tenant as the ledger knows it: its reservation, its charge and the plan it
/// was admitted with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: String,
    /// `open` (in flight), `settled` (charged) or `released` (never ran: not charged).
    pub state: String,
    pub reserved_flops: f64,
    /// Measured FLOPs charged (settled requests only).
    pub charged_flops: Option<f64>,
    pub created_at: i64,
    pub closed_at: Option<i64>,
    /// The plan (checkpoint, frames, tokens per frame, predicted score, cost, budget, task).
    pub plan: Option<serde_json::Value>,
}

/// Charged FLOPs of the requests settled in `[start, start + bucket_s)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsagePoint {
    pub start: i64,
    pub charged_flops: f64,
    pub requests: u64,
}

/// A held reservation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reservation {
    pub id: i64,
    pub tenant_id: i64,
    pub flops: f64,
}

/// Storage of tenants and FLOP accounting.
pub trait Ledger: Send + Sync {
    /// Creates a tenant and returns it with its API key (shown once).
    fn create_tenant(
        &self,
        name: &str,
        s: &TenantSettings,
    ) -> Result<(Tenant, String), LedgerError>;
    fn update_tenant(&self, name: &str, s: &TenantSettings) -> Result<Tenant, LedgerError>;
    /// Removes a tenant: its key stops working at once and its name is free again, while its
    /// accounting history is kept. Refused while it has requests in flight.
    fn remove_tenant(&self, name: &str) -> Result<(), LedgerError>;
    fn tenants(&self) -> Result<Vec<Tenant>, LedgerError>;
    fn tenant_by_name(&self, name: &str) -> Result<Tenant, LedgerError>;
    fn tenant_by_key(&self, key: &str) -> Result<Option<Tenant>, LedgerError>;
    fn usage(&self, tenant: &Tenant, now: i64) -> Result<Usage, LedgerError>;
    /// Holds `flops` against the tenant's quota, or refuses with the period's reset time.
    fn reserve(
        &self,
        tenant: &Tenant,
        flops: f64,
        request_id: &str,
        now: i64,
    ) -> Result<Reservation, LedgerError>;
    /// Charges the measured FLOPs, capped at the reservation (admission only promised the
    /// tenant's quota that much: a request that measures more is charged what was reserved, so
    /// concurrent requests can never overrun a quota); a second call does nothing and returns
    /// false.
    fn settle(&self, r: &Reservation, measured: f64, now: i64) -> Result<bool, LedgerError>;
    /// Releases a reservation without charge; returns false if it was no longer open.
    fn release(&self, r: &Reservation, now: i64) -> Result<bool, LedgerError>;
    /// Replaces a tenant's API key: the old one stops working at once; the new one is returned
    /// (shown once).
    fn rotate_key(&self, name: &str) -> Result<(Tenant, String), LedgerError>;
    /// Records the plan a reservation was admitted with (for [`Self::recent_requests`]).
    fn record_plan(&self, r: &Reservation, plan: &serde_json::Value) -> Result<(), LedgerError>;
    /// The tenant's latest requests, newest first, at most `limit`.
    fn recent_requests(&self, t: &Tenant, limit: usize) -> Result<Vec<RequestRecord>, LedgerError>;
    /// Charged FLOPs per `bucket_s` seconds (by settlement time): `buckets` consecutive
    /// buckets, the last one holding `now`, empty buckets included.
    fn usage_series(
        &self,
        t: &Tenant,
        now: i64,
        bucket_s: i64,
        buckets: usize,
    ) -> Result<Vec<UsagePoint>, LedgerError>;
}

/// Tenant names appear in URLs, logs and metrics labels: 1-64 characters of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit (no `/`, `..`, spaces or control characters).
pub fn check_tenant_name(name: &str) -> Result<(), LedgerError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(LedgerError::Invalid(format!(
            "tenant name {name:?} is invalid: use 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )))
    }
}

pub fn hash_key(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_key() -> Result<String, LedgerError> {
    let mut b = [0u8; 24];
    getrandom::getrandom(&mut b)
        .map_err(|e| LedgerError::Storage(format!("no randomness: {e}")))?;
    Ok(format!(
        "vvlm_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    ))
}

/// The embedded SQLite ledger (WAL mode).
pub struct SqliteLedger {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tenants (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    default_budget REAL NOT NULL,
    per_request_max REAL NOT NULL,
    quota REAL,
    period TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    request_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    reserved REAL NOT NULL,
    charged REAL,
    state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released')),
    created_at INTEGER NOT NULL,
    closed_at INTEGER
);
CREATE INDEX IF NOT EXISTS reservations_by_period ON reservations (tenant_id, period_start, state);
CREATE TABLE IF NOT EXISTS request_plans (
    reservation_id INTEGER PRIMARY KEY REFERENCES reservations(id) ON DELETE CASCADE,
    plan TEXT NOT NULL
);
";

impl SqliteLedger {
    pub fn open(path: &Path, now: i64) -> Result<Self, LedgerError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let _ = now;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// Releases every open reservation: called by a server at start-up, when no request of
    /// its own can be in flight, so open rows belong to a process that died. One server owns a
    /// SQLite ledger; the `vvlm tenant` commands never call this (a live server's requests would
    /// lose their reservations).
    pub fn recover_orphans(&self, now: i64) -> Result<u64, LedgerError> {
        Ok(self.lock().execute(
            "UPDATE reservations SET state = 'released', closed_at = ?1 WHERE state = 'open'",
            params![now],
        )? as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
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
        })
    }

    fn usage_in(conn: &Connection, t: &Tenant, now: i64) -> Result<Usage, LedgerError> {
        let (start, reset) = t.period.bounds(now);
        let (charged, reserved, n): (f64, f64, i64) = conn.query_row(
            "SELECT COALESCE(SUM(CASE WHEN state = 'settled' THEN charged ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN state = 'open' THEN reserved ELSE 0 END), 0),
                    COUNT(CASE WHEN state = 'settled' THEN 1 END)
             FROM reservations WHERE tenant_id = ?1 AND period_start = ?2",
            params![t.id, start],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        Ok(Usage {
            tenant: t.name.clone(),
            period: t.period,
            period_start: start,
            reset_at: reset,
            charged_flops: charged,
            reserved_flops: reserved,
            quota: t.quota,
            remaining: t.quota.map(|q| (q - charged - reserved).max(0.0)),
            requests: n as u64,
        })
    }
}

fn check_settings(s: &TenantSettings) -> Result<(), LedgerError> {
    for (name, v) in [
        ("default_budget", s.default_budget),
        ("per_request_max", s.per_request_max),
    ] {
        if let Some(v) = v {
            if !(v.is_finite() && v > 0.0) {
                return Err(LedgerError::Invalid(format!(
                    "{name} must be a positive number of FLOPs, got {v}"
                )));
            }
        }
    }
    if let Some(Some(q)) = s.quota {
        if !(q.is_finite() && q >= 0.0) {
            return Err(LedgerError::Invalid(format!(
                "quota must be >= 0 FLOPs, got {q}"
            )));
        }
    }
    Ok(())
}

const TENANT_COLS: &str = "id, name, default_budget, per_request_max, quota, period";
/// Removed tenants are tombstones (see `remove_tenant`).
const LIVE: &str = "key_hash NOT LIKE 'removed:%'";

impl Ledger for SqliteLedger {
    fn create_tenant(
        &self,
        name: &str,
        s: &TenantSettings,
    ) -> Result<(Tenant, String), LedgerError> {
        check_settings(s)?;
        check_tenant_name(name)?;
        let key = new_key()?;
        let per_request_max = s.per_request_max.unwrap_or(1e15);
        let default_budget = s.default_budget.unwrap_or(per_request_max.min(5e12));
        if default_budget > per_request_max {
            return Err(LedgerError::Invalid(
                "default_budget exceeds per_request_max".into(),
            ));
        }
        let conn = self.lock();
        let r = conn.execute(
            "INSERT INTO tenants (name, key_hash, default_budget, per_request_max, quota, period, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, strftime('%s','now'))",
            params![
                name,
                hash_key(&key),
                default_budget,
                per_request_max,
                s.quota.flatten(),
                s.period.unwrap_or(Period::Day).as_str()
            ],
        );
        match r {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(LedgerError::Invalid(format!(
                    "tenant `{name}` already exists"
                )));
            }
            other => {
                other?;
            }
        }
        drop(conn);
        Ok((self.tenant_by_name(name)?, key))
    }

    fn update_tenant(&self, name: &str, s: &TenantSettings) -> Result<Tenant, LedgerError> {
        check_settings(s)?;
        let mut t = self.tenant_by_name(name)?;
        if let Some(v) = s.default_budget {
            t.default_budget = v;
        }
        if let Some(v) = s.per_request_max {
            t.per_request_max = v;
        }
        if let Some(q) = s.quota {
            t.quota = q;
        }
        if let Some(p) = s.period {
            t.period = p;
        }
        if t.default_budget > t.per_request_max {
            return Err(LedgerError::Invalid(
                "default_budget exceeds per_request_max".into(),
            ));
        }
        self.lock().execute(
            "UPDATE tenants SET default_budget = ?1, per_request_max = ?2, quota = ?3, period = ?4 WHERE id = ?5",
            params![t.default_budget, t.per_request_max, t.quota, t.period.as_str(), t.id],
        )?;
        Ok(t)
    }

    fn remove_tenant(&self, name: &str) -> Result<(), LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let id: i64 = tx
            .query_row(
                &format!("SELECT id FROM tenants WHERE name = ?1 AND {LIVE}"),
                params![name],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| LedgerError::NotFound(format!("no tenant `{name}`")))?;
        let open: i64 = tx.query_row(
            "SELECT COUNT(*) FROM reservations WHERE tenant_id = ?1 AND state = 'open'",
            params![id],
            |r| r.get(0),
        )?;
        if open > 0 {
            return Err(LedgerError::Conflict(format!(
                "tenant `{name}` has {open} request(s) in flight; remove it when they finish"
            )));
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
            .ok_or_else(|| LedgerError::NotFound(format!("no tenant `{name}`")))
    }

    fn tenant_by_key(&self, key: &str) -> Result<Option<Tenant>, LedgerError> {
        Ok(self
            .lock()
            .query_row(
                &format!("SELECT {TENANT_COLS} FROM tenants WHERE key_hash = ?1"),
                params![hash_key(key)],
                Self::row_tenant,
            )
            .optional()?)
    }

    fn usage(&self, tenant: &Tenant, now: i64) -> Result<Usage, LedgerError> {
        Self::usage_in(&self.lock(), tenant, now)
    }

    fn reserve(
        &self,
        t: &Tenant,
        flops: f64,
        request_id: &str,
        now: i64,
    ) -> Result<Reservation, LedgerError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let u = Self::usage_in(&tx, t, now)?;
        if let Some(q) = t.quota {
            if u.charged_flops + u.reserved_flops + flops > q {
                return Err(LedgerError::QuotaExhausted {
                    message: format!(
                        "tenant `{}` has {:.4e} of its {:.4e} FLOPs per {} left; this request needs {:.4e}; the quota resets at {}",
                        t.name,
                        (q - u.charged_flops - u.reserved_flops).max(0.0),
                        q,
                        t.period.as_str(),
                        flops,
                        u.reset_at
                    ),
                    reset_at: Some(u.reset_at),
                });
            }
        }
        tx.execute(
            "INSERT INTO reservations (tenant_id, request_id, period_start, reserved, state, created_at)
             VALUES (?1, ?2, ?3, ?4, 'open', ?5)",
            params![t.id, request_id, u.period_start, flops, now],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Reservation {
            id,
            tenant_id: t.id,
            flops,
        })
    }

    fn settle(&self, r: &Reservation, measured: f64, now: i64) -> Result<bool, LedgerError> {
        let n = self.lock().execute(
            "UPDATE reservations SET state = 'settled', charged = MIN(?1, reserved), closed_at = ?2 WHERE id = ?3 AND state = 'open'",
            params![measured, now, r.id],
        )?;
        Ok(n == 1)
    }

    fn release(&self, r: &Reservation, now: i64) -> Result<bool, LedgerError> {
        let n = self.lock().execute(
            "UPDATE reservations SET state = 'released', closed_at = ?1 WHERE id = ?2 AND state = 'open'",
            params![now, r.id],
        )?;
        Ok(n == 1)
    }

    fn rotate_key(&self, name: &str) -> Result<(Tenant, String), LedgerError> {
        let key = new_key()?;
        let n = self.lock().execute(
            &format!("UPDATE tenants SET key_hash = ?1 WHERE name = ?2 AND {LIVE}"),
            params![hash_key(&key), name],
        )?;
        if n == 0 {
            return Err(LedgerError::NotFound(format!("no tenant `{name}`")));
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
        let mut st = conn.prepare(
            "SELECT r.request_id, r.state, r.reserved, r.charged, r.created_at, r.closed_at, p.plan
             FROM reservations r LEFT JOIN request_plans p ON p.reservation_id = r.id
             WHERE r.tenant_id = ?1 ORDER BY r.id DESC LIMIT ?2",
        )?;
        let rows = st.query_map(params![t.id, limit as i64], |r| {
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
        if bucket_s <= 0 || buckets == 0 {
            return Err(LedgerError::Invalid(
                "bucket_s and buckets must be positive".into(),
            ));
        }
        let last = now.div_euclid(bucket_s) * bucket_s;
        let first = last - (buckets as i64 - 1) * bucket_s;
        let mut points: Vec<UsagePoint> = (0..buckets as i64)
            .map(|i| UsagePoint {
                start: first + i * bucket_s,
                charged_flops: 0.0,
                requests: 0,
            })
            .collect();
        let conn = self.lock();
        let mut st = conn.prepare(
            "SELECT (closed_at - ?2) / ?3, SUM(charged), COUNT(*) FROM reservations
             WHERE tenant_id = ?1 AND state = 'settled' AND closed_at >= ?2 AND closed_at < ?4
             GROUP BY 1",
        )?;
        let rows = st.query_map(params![t.id, first, bucket_s, last + bucket_s], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, f64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (i, charged, n) = row?;
            if let Some(p) = points.get_mut(i as usize) {
                p.charged_flops = charged;
                p.requests = n as u64;
            }
        }
        Ok(points)
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> (SqliteLedger, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!(
            "vvlm-ledger-{}-{}.db",
            std::process::id(),
            new_key().unwrap()
        ));
        (SqliteLedger::open(&p, 0).unwrap(), p)
    }

    #[test]
    fn periods_and_calendar() {
        assert_eq!(Period::Day.bounds(86_400 * 3 + 5), (86_400 * 3, 86_400 * 4));
        // Literal Unix times (from Python's calendar.timegm), not the code's own calendar:
        // 2026-11-22 12:00 UTC -> the month starts 2026-11-01 00:00 UTC and resets 2026-12-01.
        assert_eq!(
            Period::Month.bounds(1_795_305_600 + 43_200),
            (1_793_491_200, 1_796_083_200)
        );
        // 2026-12-31 00:00 UTC -> resets 2027-01-01 (year boundary).
        assert_eq!(Period::Month.bounds(1_798_675_200).1, 1_798_761_600);
        // The first second of a month belongs to it; the last second of the previous does not.
        assert_eq!(Period::Month.bounds(1_796_083_200).0, 1_796_083_200);
        assert_eq!(Period::Month.bounds(1_796_083_199).0, 1_793_491_200);
        assert_eq!(days_from_civil(2026, 11, 1) * 86_400, 1_793_491_200);
        assert_eq!(civil_from_days(1_798_761_600 / 86_400), (2027, 1, 1));
    }

    #[test]
    fn keys_are_hashed_and_tenants_isolated() {
        let (l, p) = ledger();
        let (a, ka) = l
            .create_tenant(
                "a",
                &TenantSettings {
                    quota: Some(Some(100.0)),
                    ..Default::default()
                },
            )
            .unwrap();
        let (b, kb) = l.create_tenant("b", &TenantSettings::default()).unwrap();
        assert_ne!(ka, kb);
        assert_eq!(l.tenant_by_key(&ka).unwrap().unwrap().name, "a");
        assert!(l.tenant_by_key("vvlm_wrong").unwrap().is_none());
        let stored: String = l
            .lock()
            .query_row("SELECT key_hash FROM tenants WHERE name='a'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stored, hash_key(&ka));
        assert!(!stored.contains(&ka[5..]));
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
        assert!(l.settle(&r, 40.0, 11).unwrap());
        assert!(
            !l.settle(&r, 40.0, 12).unwrap(),
            "settling twice charges once"
        );
        let u = l.usage(&a, 12).unwrap();
        assert_eq!(
            (u.charged_flops, u.reserved_flops, u.remaining),
            (40.0, 0.0, Some(60.0))
        );
        // A request that measures more than it reserved is charged its reservation: the
        // quota (100) is never overrun, however many such requests were admitted at once.
        let r1 = l.reserve(&a, 30.0, "r4", 13).unwrap();
        let r2 = l.reserve(&a, 30.0, "r5", 13).unwrap();
        assert!(l.settle(&r1, 45.0, 14).unwrap());
        assert!(l.settle(&r2, 1e9, 14).unwrap());
        let u = l.usage(&a, 14).unwrap();
        assert_eq!((u.charged_flops, u.remaining), (100.0, Some(0.0)));
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
        // Removing a tenant with a request in flight is refused; afterwards its key fails,
        // its name is free, and its history is still in the database.
        let (c, kc) = l.create_tenant("c", &TenantSettings::default()).unwrap();
        let open = l.reserve(&c, 5.0, "rc1", 20).unwrap();
        assert!(matches!(
            l.remove_tenant("c"),
            Err(LedgerError::Conflict(_))
        ));
        l.settle(&open, 5.0, 21).unwrap();
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
        let kept: i64 = l
            .lock()
            .query_row(
                "SELECT COUNT(*) FROM reservations WHERE tenant_id = ?1",
                params![c.id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kept, 1, "the accounting history is kept");
        let (c2, _) = l.create_tenant("c", &TenantSettings::default()).unwrap();
        assert_ne!(c2.id, c.id);
        assert_eq!(l.usage(&c2, 22).unwrap().charged_flops, 0.0);
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn open_reservations_of_a_crashed_process_are_released_on_restart() {
        let (l, p) = ledger();
        let (a, _) = l
            .create_tenant(
                "a",
                &TenantSettings {
                    quota: Some(Some(100.0)),
                    ..Default::default()
                },
            )
            .unwrap();
        let settled = l.reserve(&a, 30.0, "done", 5).unwrap();
        l.settle(&settled, 20.0, 6).unwrap();
        let _inflight = l.reserve(&a, 50.0, "inflight", 7).unwrap();
        drop(l); // the process dies with a request in flight
        let l = SqliteLedger::open(&p, 8).unwrap();
        assert_eq!(
            l.usage(&a, 8).unwrap().reserved_flops,
            50.0,
            "opening alone recovers nothing"
        );
        assert_eq!(l.recover_orphans(8).unwrap(), 1);
        let u = l.usage(&a, 9).unwrap();
        assert_eq!((u.charged_flops, u.reserved_flops), (20.0, 0.0));
        assert_eq!(u.requests, 1);
        std::fs::remove_file(&p).ok();
    }

    #[test]
    fn keys_rotate_and_requests_keep_their_plans_and_charges() {
        let (l, p) = ledger();
        let (a, old) = l.create_tenant("a", &TenantSettings::default()).unwrap();
        let (a2, new) = l.rotate_key("a").unwrap();
        assert_eq!(a2, a);
        assert_ne!(old, new);
        assert!(l.tenant_by_key(&old).unwrap().is_none());
        assert_eq!(l.tenant_by_key(&new).unwrap().unwrap().name, "a");
        assert!(matches!(
            l.rotate_key("nope"),
            Err(LedgerError::NotFound(_))
        ));
        // Two requests in one bucket, one in the next; one released (never charged).
        let t0 = 1_000_000;
        let r1 = l.reserve(&a, 100.0, "r1", t0).unwrap();
        l.record_plan(&r1, &serde_json::json!({"model": "m", "frames": 8}))
            .unwrap();
        l.settle(&r1, 80.0, t0 + 1).unwrap();
        let r2 = l.reserve(&a, 50.0, "r2", t0).unwrap();
        l.settle(&r2, 70.0, t0 + 2).unwrap();
        let r3 = l.reserve(&a, 30.0, "r3", t0).unwrap();
        l.settle(&r3, 30.0, t0 + 65).unwrap();
        let r4 = l.reserve(&a, 10.0, "r4", t0).unwrap();
        l.release(&r4, t0 + 66).unwrap();
        let recent = l.recent_requests(&a, 3).unwrap();
        let ids: Vec<_> = recent.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["r4", "r3", "r2"]);
        assert_eq!(recent[0].state, "released");
        assert_eq!(recent[0].charged_flops, None);
        assert_eq!(recent[2].charged_flops, Some(50.0)); // capped at the reservation
        let first = &l.recent_requests(&a, 10).unwrap()[3];
        assert_eq!(first.plan.as_ref().unwrap()["frames"], 8);
        assert_eq!(first.charged_flops, Some(80.0));
        // Buckets of 60 s ending with the one holding t0 + 70.
        let series = l.usage_series(&a, t0 + 70, 60, 3).unwrap();
        assert_eq!(series.len(), 3);
        let start = (t0 + 70) / 60 * 60;
        assert_eq!(series[2].start, start);
        let charged: Vec<f64> = series.iter().map(|p| p.charged_flops).collect();
        let in_bucket = |t: i64| ((t - series[0].start) / 60) as usize;
        let mut want = [0.0; 3];
        want[in_bucket(t0 + 1)] += 80.0;
        want[in_bucket(t0 + 2)] += 50.0;
        want[in_bucket(t0 + 65)] += 30.0;
        assert_eq!(charged, want);
        assert_eq!(series.iter().map(|p| p.requests).sum::<u64>(), 3);
        assert!(l.usage_series(&a, t0, 0, 3).is_err());
        std::fs::remove_file(p).ok();
    }

    #[test]
    fn settings_are_validated() {
        let (l, p) = ledger();
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
        assert!(l.remove_tenant("z").is_ok());
        assert!(matches!(
            l.remove_tenant("z"),
            Err(LedgerError::NotFound(_))
        ));
        std::fs::remove_file(&p).ok();
    }
}
