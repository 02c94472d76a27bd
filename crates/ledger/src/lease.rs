//! A replica's side of leases: the request ids it holds open, their renewal, the reaping of
//! other replicas' dead leases and the replay of the journal.

use crate::journal::{Entry, Journal};
use crate::{Ledger, LedgerError, Reservation, Tenant};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// What one [`Leases::tick`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tick {
    pub renewed: u64,
    pub expired: u64,
    /// Journal entries applied.
    pub replayed: usize,
    /// Journal entries still waiting for the database.
    pub pending: usize,
    /// The database answered every call.
    pub available: bool,
}

/// How a reservation was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Settled or released in the database now.
    Done,
    /// It was no longer open (closed before: nothing changed).
    AlreadyClosed,
    /// The database was unreachable: written to the journal, applied when it returns.
    Journaled,
}

pub struct Leases {
    ledger: Arc<dyn Ledger>,
    /// Request ids this process holds open: in flight, or closed in the journal only.
    live: Mutex<BTreeSet<String>>,
    journal: Journal,
}

impl Leases {
    /// Opens the journal at `journal` (entries a previous process left are replayed by the
    /// first tick).
    pub fn new(ledger: Arc<dyn Ledger>, journal: &Path) -> Result<Self, LedgerError> {
        let journal = Journal::open(journal)?;
        let live = journal
            .pending()?
            .iter()
            .map(|e| e.request_id().to_string())
            .collect();
        Ok(Self {
            ledger,
            live: Mutex::new(live),
            journal,
        })
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn live(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Request ids held open now.
    pub fn held(&self) -> Vec<String> {
        self.live().iter().cloned().collect()
    }

    /// Reserves, and renews the lease from now on until the reservation is closed.
    pub fn hold(
        &self,
        t: &Tenant,
        flops: f64,
        request_id: &str,
        now: i64,
    ) -> Result<Reservation, LedgerError> {
        let r = self.ledger.reserve(t, flops, request_id, now)?;
        self.live().insert(r.request_id.clone());
        Ok(r)
    }

    /// Settles to `measured` (released when nothing was executed). When the database cannot
    /// take it, the settlement goes to the journal (durably) and the lease keeps being renewed
    /// until it is replayed; only if the journal cannot be written either is it an error (the
    /// lease then runs out: the request is not charged, and the error is logged loudly).
    pub fn close(&self, r: &Reservation, measured: f64, now: i64) -> Result<Closed, LedgerError> {
        let entry = if measured > 0.0 {
            Entry::Settle {
                request_id: r.request_id.clone(),
                measured,
                at: now,
            }
        } else {
            Entry::Release {
                request_id: r.request_id.clone(),
                at: now,
            }
        };
        match entry.apply(self.ledger.as_ref()) {
            Ok(done) => {
                self.live().remove(&r.request_id);
                Ok(if done {
                    Closed::Done
                } else {
                    Closed::AlreadyClosed
                })
            }
            Err(LedgerError::Unavailable(why)) => match self.journal.append(&entry) {
                Ok(()) => {
                    tracing::warn!(request_id = %r.request_id, "ledger unavailable ({why}); settlement journaled");
                    Ok(Closed::Journaled)
                }
                Err(e) => {
                    self.live().remove(&r.request_id);
                    tracing::error!(request_id = %r.request_id, "ledger unavailable ({why}) and the journal failed: {e}");
                    Err(e)
                }
            },
            Err(e) => {
                self.live().remove(&r.request_id);
                Err(e)
            }
        }
    }

    /// Renews this process's leases, replays the journal, and marks dead leases (of any
    /// replica) expired. Run it every third of a lease.
    pub fn tick(&self, now: i64) -> Tick {
        let mut t = Tick {
            available: true,
            ..Default::default()
        };
        let held = self.held();
        match self.ledger.renew(&held, now) {
            Ok(n) => t.renewed = n,
            Err(e) => {
                t.available = false;
                tracing::warn!("renewing {} lease(s): {e}", held.len());
            }
        }
        match self.journal.replay(self.ledger.as_ref()) {
            Ok((done, keep)) => {
                if !done.is_empty() {
                    tracing::info!(replayed = done.len(), "journaled settlements applied");
                }
                let mut live = self.live();
                for e in &done {
                    live.remove(e.request_id());
                }
                t.replayed = done.len();
                t.pending = keep.len();
                if !keep.is_empty() {
                    t.available = false;
                }
            }
            Err(e) => {
                t.available = false;
                tracing::error!("replaying the journal: {e}");
            }
        }
        match self.ledger.expire(now) {
            Ok(n) => {
                if n > 0 {
                    tracing::warn!(expired = n, "released reservations whose lease ran out (their replica stopped renewing; not charged)");
                }
                t.expired = n;
            }
            Err(e) => {
                t.available = false;
                tracing::debug!("expiring leases: {e}");
            }
        }
        t
    }
}
