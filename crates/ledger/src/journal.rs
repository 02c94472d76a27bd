//! The durable local journal of settlements the database could not take.
//!
//! A request that finished while the database was unreachable must still be charged (nothing
//! silently free) exactly once (nothing charged twice). Its settlement (or release) is appended
//! here as one JSON line and fsync'd before the worker moves on; [`crate::Leases::tick`]
//! replays the file when the database answers again. Replaying is idempotent: settling is keyed
//! by request id and conditional on the reservation still being open (or expired), so an entry
//! replayed twice, or one whose first attempt reached the database after all, charges once.
//!
//! One file per process: replicas must not share one (give each pod its own path; with a
//! volume that outlives the pod, entries survive a restart and are replayed by the next
//! process).

use crate::{Ledger, LedgerError};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Entry {
    Settle {
        request_id: String,
        measured: f64,
        at: i64,
    },
    Release {
        request_id: String,
        at: i64,
    },
}

impl Entry {
    pub fn request_id(&self) -> &str {
        match self {
            Entry::Settle { request_id, .. } | Entry::Release { request_id, .. } => request_id,
        }
    }

    /// Applies the entry; Ok(true) when it closed the reservation, Ok(false) when it was
    /// already closed.
    pub fn apply(&self, l: &dyn Ledger) -> Result<bool, LedgerError> {
        match self {
            Entry::Settle {
                request_id,
                measured,
                at,
            } => l.settle(request_id, *measured, *at),
            Entry::Release { request_id, at } => l.release(request_id, *at),
        }
    }
}

pub struct Journal {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Journal {
    /// Opens (creating if needed) the journal at `path`.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(path, e))?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            lock: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and waits until it is on disk.
    pub fn append(&self, e: &Entry) -> Result<(), LedgerError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut f = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|e| io(&self.path, e))?;
        let mut line = serde_json::to_string(e).map_err(|e| LedgerError::Storage(e.to_string()))?;
        line.push('\n');
        f.write_all(line.as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| io(&self.path, e))
    }

    /// The entries waiting (a torn last line, from a crash mid-append, is skipped: its request
    /// had not been told it was settled).
    pub fn pending(&self) -> Result<Vec<Entry>, LedgerError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.read()
    }

    fn read(&self) -> Result<Vec<Entry>, LedgerError> {
        let f = File::open(&self.path).map_err(|e| io(&self.path, e))?;
        let mut out = vec![];
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|e| io(&self.path, e))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(&line) {
                Ok(e) => out.push(e),
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), "skipping a torn journal line: {e}")
                }
            }
        }
        Ok(out)
    }

    /// Applies every entry; keeps (in order) those the database could not take yet. Returns
    /// (applied, still pending). Entries refused for another reason are logged and dropped.
    pub fn replay(&self, l: &dyn Ledger) -> Result<(Vec<Entry>, Vec<Entry>), LedgerError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let entries = self.read()?;
        if entries.is_empty() {
            return Ok((vec![], vec![]));
        }
        let (mut done, mut keep) = (vec![], vec![]);
        for e in entries {
            if !keep.is_empty() {
                keep.push(e);
                continue;
            }
            match e.apply(l) {
                Ok(_) => done.push(e),
                Err(LedgerError::Unavailable(_)) => keep.push(e),
                Err(err) => {
                    tracing::error!(
                        request_id = e.request_id(),
                        "journal entry refused: {err}; dropped"
                    );
                    done.push(e);
                }
            }
        }
        self.rewrite(&keep)?;
        Ok((done, keep))
    }

    /// Replaces the file with `entries` atomically (temporary file, fsync, rename, fsync dir).
    fn rewrite(&self, entries: &[Entry]) -> Result<(), LedgerError> {
        let tmp = self.path.with_extension("journal-tmp");
        let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
        for e in entries {
            let line = serde_json::to_string(e).map_err(|e| LedgerError::Storage(e.to_string()))?;
            writeln!(f, "{line}").map_err(|e| io(&tmp, e))?;
        }
        f.sync_all().map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io(&self.path, e))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

fn io(p: &Path, e: std::io::Error) -> LedgerError {
    LedgerError::Storage(format!("journal {}: {e}", p.display()))
}
