//! The ledger suite on a real PostgreSQL: `VVLM_TEST_POSTGRES_URL` names a server where the
//! tests may create databases (scripts/with-postgres starts a throwaway one; scripts/test runs
//! every test under it). Without it these tests fail: they are never skipped.

use std::sync::Arc;
use vvlm_ledger::suite::Harness;
use vvlm_ledger::{LeaseSettings, Ledger, LedgerError, Options, PostgresLedger};

fn server_url() -> String {
    std::env::var("VVLM_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "VVLM_TEST_POSTGRES_URL is not set: run the tests under scripts/with-postgres \
             (scripts/test does), e.g. `scripts/with-postgres cargo test -p vvlm-ledger`"
        )
    })
}

struct Pg {
    url: String,
    peek: PostgresLedger,
}

impl Pg {
    fn new() -> Self {
        let url = PostgresLedger::create_scratch_database(&server_url(), "vvlm_suite").unwrap();
        let peek = PostgresLedger::connect(&url, &Options::new(LeaseSettings::new(2))).unwrap();
        Self { url, peek }
    }
}

impl Harness for Pg {
    fn open(&self, lease: LeaseSettings) -> Arc<dyn Ledger> {
        Arc::new(PostgresLedger::connect(&self.url, &Options::new(lease)).unwrap())
    }
    fn count(&self, sql: &str) -> i64 {
        self.peek.query_i64(sql).unwrap()
    }
}

vvlm_ledger::ledger_suite!(Pg::new());

/// A database nobody answers at is `Unavailable` (the server's 503), within the connect
/// timeout, not an internal error and not a hang.
#[test]
fn an_unreachable_database_is_unavailable_quickly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again: nothing listens there
    let mut o = Options::new(LeaseSettings::new(30));
    o.connect_timeout_s = 1.0;
    let t = std::time::Instant::now();
    let r = PostgresLedger::connect(&format!("postgres://vvlm@127.0.0.1:{port}/vvlm"), &o);
    assert!(
        matches!(r, Err(LedgerError::Unavailable(_))),
        "{:?}",
        r.err()
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

/// Three replicas starting at once migrate once (an advisory lock serialises them).
#[test]
fn replicas_starting_together_migrate_once() {
    let url = PostgresLedger::create_scratch_database(&server_url(), "vvlm_mig").unwrap();
    let ledgers: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let url = url.clone();
                s.spawn(move || {
                    PostgresLedger::connect(&url, &Options::new(LeaseSettings::new(30 + i)))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    assert_eq!(
        ledgers[0]
            .query_i64("SELECT COUNT(*) FROM schema_migrations")
            .unwrap(),
        7,
        "0001_init to 0007_tenant_media_allow, each once"
    );
}

/// A database too slow to answer (here: the tenant's row locked by another session for 6 s) is
/// `Unavailable` after the statement timeout, not a hang and not an internal error; once the
/// lock is gone, admission works again.
#[test]
fn a_slow_database_is_unavailable_after_the_statement_timeout() {
    let url = PostgresLedger::create_scratch_database(&server_url(), "vvlm_slow").unwrap();
    let mut o = Options::new(LeaseSettings::new(30));
    o.statement_timeout_s = 1.0;
    let l = PostgresLedger::connect(&url, &o).unwrap();
    let (t, _) = l
        .create_tenant("slow", &vvlm_ledger::TenantSettings::default())
        .unwrap();
    let mut locker = std::process::Command::new("psql")
        .arg(&url)
        .args([
            "-q",
            "-c",
            "BEGIN; SELECT id FROM tenants WHERE name = 'slow' FOR UPDATE; SELECT pg_sleep(6); COMMIT;",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql (installed with postgresql by scripts/with-postgres)");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let t0 = std::time::Instant::now();
    let r = l.reserve(&t, 1.0, "slow-1", vvlm_ledger::now());
    assert!(matches!(r, Err(LedgerError::Unavailable(_))), "{r:?}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t0.elapsed()
    );
    locker.wait().unwrap();
    l.reserve(&t, 1.0, "slow-2", vvlm_ledger::now()).unwrap();
}
