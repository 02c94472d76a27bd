//! The ledger suite on SQLite, plus the upgrade of a database made before leases.

use std::path::PathBuf;
use std::sync::Arc;
use vvlm_ledger::suite::Harness;
use vvlm_ledger::{LeaseSettings, Ledger, SqliteLedger};

struct Sqlite {
    dir: tempfile::TempDir,
}

impl Sqlite {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }
}

impl Harness for Sqlite {
    fn open(&self, lease: LeaseSettings) -> Arc<dyn Ledger> {
        Arc::new(SqliteLedger::open(&self.path(), lease).unwrap())
    }
    fn count(&self, sql: &str) -> i64 {
        SqliteLedger::open(&self.path(), LeaseSettings::new(2))
            .unwrap()
            .query_i64(sql)
            .unwrap()
    }
}

vvlm_ledger::ledger_suite!(Sqlite::new());

/// A database written by a server before leases (no schema_migrations, no owner/lease
/// columns, a reservation left open by a crash) is migrated at open: the open reservation is
/// released, as that server would have done at its next start, and the history is kept.
#[test]
fn a_database_from_before_leases_is_migrated() {
    let h = Sqlite::new();
    {
        let p = h.path();
        let c = rusqlite_free::open(&p);
        c(include_str!("../migrations/sqlite/0001_init.sql"));
        c("INSERT INTO tenants (id, name, key_hash, default_budget, per_request_max, quota, period, created_at)
           VALUES (1, 'old', 'h', 1, 2, 100, 'day', 0);
           INSERT INTO reservations (tenant_id, request_id, period_start, reserved, charged, state, created_at, closed_at)
           VALUES (1, 'req-1-5-0', 0, 30, 20, 'settled', 5, 6),
                  (1, 'req-1-7-1', 0, 50, NULL, 'open', 7, NULL),
                  (1, 'req-1-7-1', 0, 10, NULL, 'released', 7, 8);");
    }
    let l = h.open(LeaseSettings::new(30));
    let t = l.tenant_by_name("old").unwrap();
    let u = l.usage(&t, 10).unwrap();
    assert_eq!(
        (u.charged_flops, u.reserved_flops, u.requests),
        (20.0, 0.0, 1)
    );
    assert_eq!(h.count("SELECT COUNT(*) FROM schema_migrations"), 8);
    // Tenants from before per-tenant limits take the server's default.
    assert_eq!((t.max_in_flight, t.weight), (None, None));
    assert_eq!(
        h.count(
            "SELECT COUNT(*) FROM reservations WHERE state = 'released' AND closed_at IS NOT NULL"
        ),
        2
    );
    // New reservations are leased; duplicate request ids of old rows do not block anything.
    let r = l.reserve(&t, 10.0, "new-1", 10).unwrap();
    assert!(l.settle(&r.request_id, 10.0, 11).unwrap());
}

/// Raw SQL on a file without the ledger (the ledger's own connection type is private).
mod rusqlite_free {
    use std::path::Path;
    pub fn open(p: &Path) -> impl Fn(&str) + '_ {
        move |sql: &str| {
            let out = std::process::Command::new("python3")
                .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.executescript(sys.argv[2]); c.commit()"])
                .arg(p)
                .arg(sql)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
