//! Tenants, API keys (stored hashed) and the FLOPs ledger, behind one trait with two backends:
//! SQLite embedded in one server ([`sqlite`]) and PostgreSQL shared by replicas ([`postgres`]).
//!
//! Accounting: a request reserves its planned FLOPs when admitted, settles to its measured FLOPs
//! when done, and is released on failure. Usage in a period is computed from the reservations
//! themselves (settled charges plus open reservations whose lease has not run out), so there is
//! no counter to drift. Each reservation keeps the plan it was admitted with, for a tenant's
//! request history and usage over time.
//!
//! Leases: a reservation belongs to the replica that made it ([`LeaseSettings::owner`], random
//! per process) and holds only until `lease_until`. The owner renews the leases of its live
//! requests ([`Leases::tick`], every third of a lease); a replica killed mid-request stops
//! renewing, so its reservations stop counting one lease later, and any replica marks them
//! expired. Settling and releasing are conditional updates keyed by the request id: a request
//! settles at most once, to its measured FLOPs capped at its reservation. A late settlement of
//! an expired lease (its owner lost the database for longer than a lease) still charges the work
//! done: nothing is free, nothing is charged twice.
//!
//! When the database cannot be reached, calls fail with [`LedgerError::Unavailable`] (the server
//! refuses new work with 503); a settlement that fails so is written to a durable local
//! [`journal`] and replayed when the database returns.
//!
//! Beside it, tenants' files and batch jobs ([`batches`]): stored in the same database, so
//! every replica serves them and a batch survives its replica.
//!
//! Owns SQL, migrations (`migrations/<backend>/NNNN_*.sql`, applied at open), leases and the
//! journal. Must not know HTTP, the planner or the engine.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;

pub mod batches;
pub use batches::{
    BatchRecord, BatchStatus, Batches, FileRecord, LineResult, LineUsage, NewBatch, NewFile,
};
pub mod journal;
mod lease;
pub use lease::{Closed, Tick};
pub mod postgres;
pub mod sqlite;
#[doc(hidden)]
pub mod suite;

pub use lease::Leases;
pub use postgres::PostgresLedger;
pub use sqlite::SqliteLedger;

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
    /// The database cannot be reached (down, refusing connections, or slower than the
    /// configured timeouts). Nothing was written.
    #[error("the ledger database is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Storage(String),
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
    /// Requests this tenant may have in flight on one server at once; None: the server's
    /// default (`[limits] tenant_max_in_flight`).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Its share of a server's places while other tenants wait too, relative to theirs; None:
    /// 1.
    #[serde(default)]
    pub weight: Option<f64>,
    /// URL prefixes (`https://host/path/`, `file:///folder/`) its media may be read from,
    /// narrowing the server's `url_allow` and `file_allow`; None: the server's lists alone.
    /// (What a prefix means is the server's business; here it is text.)
    #[serde(default)]
    pub media_allow: Option<Vec<String>>,
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
    /// `Some(None)` returns the tenant to the server's default.
    #[serde(default, with = "double_option")]
    pub max_in_flight: Option<Option<u32>>,
    /// `Some(None)` returns the tenant to weight 1.
    #[serde(default, with = "double_option")]
    pub weight: Option<Option<f64>>,
    /// `Some(None)` returns the tenant to the server's lists alone.
    #[serde(default, with = "double_option")]
    pub media_allow: Option<Option<Vec<String>>>,
}

/// Most prefixes in a tenant's `media_allow`, and the longest one.
pub const MEDIA_ALLOW_MAX: (usize, usize) = (32, 1024);

/// The range of a tenant's weight.
pub const WEIGHT_RANGE: std::ops::RangeInclusive<f64> = 0.01..=100.0;

/// Most requests one tenant may be given in flight (a limit, not a reservation).
pub const MAX_IN_FLIGHT_LIMIT: u32 = 1_000_000;

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(Some(x)) => x.serialize(s),
            _ => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Ok(Some(Option::<T>::deserialize(d)?))
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
    /// FLOPs held by requests in flight (open reservations with a live lease).
    pub reserved_flops: f64,
    pub quota: Option<f64>,
    /// Quota minus charged minus reserved (None when unlimited).
    pub remaining: Option<f64>,
    pub requests: u64,
}

impl Usage {
    fn new(t: &Tenant, now: i64, charged: f64, reserved: f64, requests: u64) -> Self {
        let (start, reset) = t.period.bounds(now);
        Usage {
            tenant: t.name.clone(),
            period: t.period,
            period_start: start,
            reset_at: reset,
            charged_flops: charged,
            reserved_flops: reserved,
            quota: t.quota,
            remaining: t.quota.map(|q| (q - charged - reserved).max(0.0)),
            requests,
        }
    }
}

/// One request of a tenant as the ledger knows it: its reservation, its charge and the plan it
/// was admitted with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: String,
    /// `open` (in flight), `settled` (charged), `released` (never ran: not charged) or
    /// `expired` (its replica stopped renewing the lease: not charged unless it settles late).
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

/// The empty buckets of [`Ledger::usage_series`]: `buckets` of `bucket_s` seconds, the last one
/// holding `now`. Errs on a non-positive size or count.
fn empty_series(now: i64, bucket_s: i64, buckets: usize) -> Result<Vec<UsagePoint>, LedgerError> {
    if bucket_s <= 0 || buckets == 0 {
        return Err(LedgerError::Invalid(
            "bucket_s and buckets must be positive".into(),
        ));
    }
    let first = now.div_euclid(bucket_s) * bucket_s - (buckets as i64 - 1) * bucket_s;
    Ok((0..buckets as i64)
        .map(|i| UsagePoint {
            start: first + i * bucket_s,
            charged_flops: 0.0,
            requests: 0,
        })
        .collect())
}

/// Puts `(bucket index, charged, requests)` rows into the buckets of [`empty_series`].
fn fill_series(points: &mut [UsagePoint], rows: impl IntoIterator<Item = (i64, f64, i64)>) {
    for (i, charged, n) in rows {
        if let Some(p) = usize::try_from(i).ok().and_then(|i| points.get_mut(i)) {
            p.charged_flops = charged;
            p.requests = n as u64;
        }
    }
}

/// A held reservation.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub id: i64,
    /// Unique across replicas (it names the owner); settling and releasing are keyed by it.
    pub request_id: String,
    pub tenant_id: i64,
    pub flops: f64,
}

/// Who holds reservations, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseSettings {
    /// This replica's id, random per process (see [`LeaseSettings::new`]).
    pub owner: String,
    /// Seconds a reservation holds without renewal (at least 2: times are whole seconds).
    pub lease_s: i64,
}

impl LeaseSettings {
    /// A fresh random owner id (`<host or "vvlm">-<12 hex>`).
    pub fn new(lease_s: i64) -> Self {
        let mut b = [0u8; 6];
        let _ = getrandom::getrandom(&mut b);
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty() && h.len() <= 40)
            .unwrap_or_else(|| "vvlm".into());
        Self {
            owner: format!("{host}-{}", hex(&b)),
            lease_s: lease_s.max(2),
        }
    }
}

/// Storage of tenants and FLOP accounting, and of tenants' files and batches ([`Batches`]).
/// Synchronous: call it off an async runtime's threads (the server runs it on blocking threads
/// and in its workers).
pub trait Ledger: Batches + Send + Sync {
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
    /// Holds `flops` against the tenant's quota (admitted only if charged + live reservations +
    /// flops <= quota, atomically with respect to every replica), leased to this ledger's owner
    /// until `now + lease_s`; or refuses with the period's reset time. `request_id` must be
    /// unique.
    fn reserve(
        &self,
        tenant: &Tenant,
        flops: f64,
        request_id: &str,
        now: i64,
    ) -> Result<Reservation, LedgerError>;
    /// Charges the measured FLOPs, capped at the reservation (admission only promised the
    /// tenant's quota that much: a request that measures more is charged what was reserved, so
    /// concurrent requests can never overrun a quota); keyed by request id, and a second call
    /// does nothing and returns false. An expired lease is still settled (the work was done).
    fn settle(&self, request_id: &str, measured: f64, now: i64) -> Result<bool, LedgerError>;
    /// Releases a reservation without charge; returns false if it was no longer open.
    fn release(&self, request_id: &str, now: i64) -> Result<bool, LedgerError>;
    /// Extends to `now + lease_s` the leases of these reservations held by this ledger's owner
    /// (reviving any marked expired meanwhile); returns how many were renewed.
    fn renew(&self, request_ids: &[String], now: i64) -> Result<u64, LedgerError>;
    /// Marks expired every open reservation, of any owner, whose lease ended before `now`;
    /// returns how many.
    fn expire(&self, now: i64) -> Result<u64, LedgerError>;
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
    /// The lease settings reservations are made with.
    fn lease(&self) -> &LeaseSettings;
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;
}

/// Opens the ledger `db` names: a `postgres://` or `postgresql://` URL, else a SQLite file path.
/// Applies pending migrations. Blocking (it connects).
pub fn open(db: &str, options: &Options) -> Result<Arc<dyn Ledger>, LedgerError> {
    if is_postgres_url(db) {
        Ok(Arc::new(PostgresLedger::connect(db, options)?))
    } else {
        Ok(Arc::new(SqliteLedger::open(
            std::path::Path::new(db),
            options.lease.clone(),
        )?))
    }
}

pub fn is_postgres_url(db: &str) -> bool {
    db.starts_with("postgres://") || db.starts_with("postgresql://")
}

/// A database address safe to log: a URL's password is replaced by `***`.
pub fn redact(db: &str) -> String {
    if !is_postgres_url(db) {
        return db.to_string();
    }
    let (scheme, rest) = db.split_once("://").unwrap_or(("", db));
    match rest.split_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => db.to_string(),
    }
}

/// Connection options (PostgreSQL; SQLite uses only `lease`).
#[derive(Debug, Clone)]
pub struct Options {
    pub lease: LeaseSettings,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Seconds to get a connection (connect included) before the call fails as unavailable.
    pub connect_timeout_s: f64,
    /// Seconds a statement may run (enforced by the server and, with a margin, the client).
    pub statement_timeout_s: f64,
}

impl Options {
    pub fn new(lease: LeaseSettings) -> Self {
        Self {
            lease,
            pool_size: 8,
            connect_timeout_s: 2.0,
            statement_timeout_s: 5.0,
        }
    }
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
    hex(&Sha256::digest(key.as_bytes()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn new_key() -> Result<String, LedgerError> {
    let mut b = [0u8; 24];
    getrandom::getrandom(&mut b)
        .map_err(|e| LedgerError::Storage(format!("no randomness: {e}")))?;
    Ok(format!("vvlm_{}", hex(&b)))
}

/// Validated settings of a new tenant: (default_budget, per_request_max).
fn new_tenant_budgets(name: &str, s: &TenantSettings) -> Result<(f64, f64), LedgerError> {
    check_settings(s)?;
    check_tenant_name(name)?;
    let per_request_max = s.per_request_max.unwrap_or(1e15);
    let default_budget = s.default_budget.unwrap_or(per_request_max.min(5e12));
    if default_budget > per_request_max {
        return Err(LedgerError::Invalid(
            "default_budget exceeds per_request_max".into(),
        ));
    }
    Ok((default_budget, per_request_max))
}

/// `t` with `s` applied, validated.
fn updated_tenant(mut t: Tenant, s: &TenantSettings) -> Result<Tenant, LedgerError> {
    check_settings(s)?;
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
    if let Some(m) = s.max_in_flight {
        t.max_in_flight = m;
    }
    if let Some(w) = s.weight {
        t.weight = w;
    }
    if let Some(m) = &s.media_allow {
        t.media_allow = m.clone();
    }
    if t.default_budget > t.per_request_max {
        return Err(LedgerError::Invalid(
            "default_budget exceeds per_request_max".into(),
        ));
    }
    Ok(t)
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
    if let Some(Some(m)) = s.max_in_flight {
        if !(1..=MAX_IN_FLIGHT_LIMIT).contains(&m) {
            return Err(LedgerError::Invalid(format!(
                "max_in_flight must be 1 to {MAX_IN_FLIGHT_LIMIT} requests (null: the server's default), got {m}"
            )));
        }
    }
    if let Some(Some(m)) = &s.media_allow {
        let (most, longest) = MEDIA_ALLOW_MAX;
        if m.len() > most {
            return Err(LedgerError::Invalid(format!(
                "media_allow holds at most {most} prefixes, got {}",
                m.len()
            )));
        }
        if let Some(p) = m
            .iter()
            .find(|p| p.is_empty() || p.len() > longest || p.chars().any(char::is_whitespace))
        {
            return Err(LedgerError::Invalid(format!(
                "media_allow: `{p}` is not a prefix of 1-{longest} characters without spaces"
            )));
        }
    }
    if let Some(Some(w)) = s.weight {
        if !WEIGHT_RANGE.contains(&w) {
            return Err(LedgerError::Invalid(format!(
                "weight must be {} to {} (null: 1), got {w}",
                WEIGHT_RANGE.start(),
                WEIGHT_RANGE.end()
            )));
        }
    }
    Ok(())
}

fn quota_exhausted(t: &Tenant, q: f64, used: f64, flops: f64, reset_at: i64) -> LedgerError {
    LedgerError::QuotaExhausted {
        message: format!(
            "tenant `{}` has {:.4e} of its {:.4e} FLOPs per {} left; this request needs {:.4e}; the quota resets at {}",
            t.name,
            (q - used).max(0.0),
            q,
            t.period.as_str(),
            flops,
            reset_at
        ),
        reset_at: Some(reset_at),
    }
}

fn in_flight(name: &str, open: i64) -> LedgerError {
    LedgerError::Conflict(format!(
        "tenant `{name}` has {open} request(s) in flight; remove it when they finish"
    ))
}

fn exists(name: &str) -> LedgerError {
    LedgerError::Invalid(format!("tenant `{name}` already exists"))
}

fn no_tenant(name: &str) -> LedgerError {
    LedgerError::NotFound(format!("no tenant `{name}`"))
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A migration: its version (the file's number) and SQL.
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// A JSON column's value as stored (text; None is SQL NULL): a tenant's `media_allow`, a
/// batch's `metadata`.
pub(crate) fn json_text<T: Serialize>(v: &Option<T>) -> Option<String> {
    v.as_ref().and_then(|v| serde_json::to_string(v).ok())
}

/// A JSON column's text read back (NULL or unreadable: None).
pub(crate) fn json_value<T: serde::de::DeserializeOwned>(text: Option<String>) -> Option<T> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn urls_are_told_apart_and_passwords_never_logged() {
        assert!(is_postgres_url("postgres://u:p@h/db"));
        assert!(is_postgres_url("postgresql://h/db"));
        assert!(!is_postgres_url("vvlm.db"));
        assert_eq!(
            redact("postgres://vvlm:s3cret@db:5432/vvlm"),
            "postgres://vvlm:***@db:5432/vvlm"
        );
        assert_eq!(redact("postgres://db/vvlm"), "postgres://db/vvlm");
        assert_eq!(redact("/var/vvlm.db"), "/var/vvlm.db");
    }
}
