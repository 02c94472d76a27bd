//! Tenants' files and batch jobs, stored beside the ledger (OpenAI's Files and Batch APIs): a
//! tenant uploads a JSONL file of requests, creates a batch over it, and any replica runs the
//! batch's lines under a lease ([`Batches::claim_batch`], renewed as it goes), recording each
//! line's answer as it arrives ([`Batches::record_line`]); a replica that dies leaves its batch
//! to the next one after a lease, which runs only the lines without an answer. When every line
//! is answered (or the batch is cancelled or expires) the owner writes the output and error
//! files and closes the batch in one transaction ([`Batches::finish_batch`]).
//!
//! What a line is, and how it runs, is the server's business: here a file is bytes and a
//! result is a status code and a JSON text.

use crate::LedgerError;
use serde::{Deserialize, Serialize};

/// A stored file's metadata (its content is read with [`Batches::file_content`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    pub tenant_id: i64,
    pub filename: String,
    /// `batch` (uploaded input) or `batch_output` (a batch's output or error file).
    pub purpose: String,
    pub bytes: i64,
    pub created_at: i64,
}

/// A batch's life, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    InProgress,
    Cancelling,
    Completed,
    Cancelled,
    Expired,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Completed => "completed",
            BatchStatus::Cancelled => "cancelled",
            BatchStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Result<Self, LedgerError> {
        Ok(match s {
            "in_progress" => BatchStatus::InProgress,
            "cancelling" => BatchStatus::Cancelling,
            "completed" => BatchStatus::Completed,
            "cancelled" => BatchStatus::Cancelled,
            "expired" => BatchStatus::Expired,
            other => {
                return Err(LedgerError::Storage(format!(
                    "unknown batch status `{other}`"
                )))
            }
        })
    }

    /// Still to be run (or wound down) by a replica.
    pub fn is_open(self) -> bool {
        matches!(self, BatchStatus::InProgress | BatchStatus::Cancelling)
    }
}

/// What a batch is created with.
#[derive(Debug, Clone)]
pub struct NewBatch {
    /// The route every line calls (`/v1/chat/completions`, ...).
    pub endpoint: String,
    pub input_file_id: String,
    /// The lines in the input file.
    pub total: i64,
    /// `24h` (OpenAI's only window).
    pub completion_window: String,
    /// Seconds from creation until the batch expires.
    pub window_s: i64,
    pub metadata: Option<serde_json::Value>,
    /// The most open batches (in progress or cancelling) the tenant may have, this one
    /// included: more is a `Conflict`.
    pub max_open: i64,
}

/// A batch, with its lines' counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub id: String,
    pub tenant_id: i64,
    /// The tenant's name; None once the tenant is removed.
    pub tenant: Option<String>,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub total: i64,
    /// Lines answered with a 2xx status.
    pub completed: i64,
    /// Lines answered otherwise.
    pub failed: i64,
    /// The answered lines' usage, summed.
    pub usage: LineUsage,
    pub metadata: Option<serde_json::Value>,
    pub created_at: i64,
    pub expires_at: i64,
    pub cancelling_at: Option<i64>,
    /// When the batch was closed (completed, cancelled or expired).
    pub closed_at: Option<i64>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
}

/// One line's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineResult {
    /// The line's index in the input file (0-based, blank lines not counted).
    pub line: i64,
    pub custom_id: String,
    pub status_code: i64,
    /// The server's id for the request that answered it (`x-request-id`).
    pub request_id: String,
    /// The answer's body (JSON text).
    pub body: String,
    pub finished_at: i64,
    /// From the answer's usage (zero when it has none, as a refusal).
    pub usage: LineUsage,
}

/// Tokens and FLOPs a line's answer reports (or a batch's, summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LineUsage {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub measured_flops: f64,
}

/// A file a finished batch writes.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub filename: String,
    pub content: Vec<u8>,
}

/// Storage of tenants' files and batches. Every call that names a file or a batch for a tenant
/// finds only that tenant's (another's is `NotFound`, as a missing one).
pub trait Batches {
    /// Stores a file. `max_tenant_bytes` caps the tenant's stored files in all (refused as
    /// `Invalid`, naming the limit).
    fn create_file(
        &self,
        tenant_id: i64,
        filename: &str,
        purpose: &str,
        content: &[u8],
        max_tenant_bytes: i64,
        now: i64,
    ) -> Result<FileRecord, LedgerError>;
    fn file(&self, tenant_id: i64, id: &str) -> Result<FileRecord, LedgerError>;
    fn file_content(&self, tenant_id: i64, id: &str) -> Result<Vec<u8>, LedgerError>;
    /// The tenant's files, newest first, after the file `after` in that order, at most `limit`.
    fn files(
        &self,
        tenant_id: i64,
        purpose: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<FileRecord>, LedgerError>;
    /// Deletes a file; `Conflict` while an open batch reads it.
    fn delete_file(&self, tenant_id: i64, id: &str) -> Result<(), LedgerError>;
    /// Creates a batch, in progress, over one of the tenant's `batch` files.
    fn create_batch(
        &self,
        tenant_id: i64,
        b: &NewBatch,
        now: i64,
    ) -> Result<BatchRecord, LedgerError>;
    fn batch(&self, tenant_id: i64, id: &str) -> Result<BatchRecord, LedgerError>;
    /// The tenant's batches, newest first, after the batch `after`, at most `limit`.
    fn batches(
        &self,
        tenant_id: i64,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Vec<BatchRecord>, LedgerError>;
    /// Asks an open batch to stop: in progress -> cancelling (its lines in flight finish, no
    /// new one starts, then its owner closes it). Cancelling again changes nothing; a closed
    /// batch is a `Conflict`.
    fn cancel_batch(&self, tenant_id: i64, id: &str, now: i64) -> Result<BatchRecord, LedgerError>;
    /// Takes an open batch for this ledger's owner, leased until `now + lease_s`, and marks it
    /// run now: one nobody holds, or whose holder's lease ran out; of those, the batch of the
    /// tenant whose batches ran least recently (tenants take turns, however many batches each
    /// has open), then the least recently run, then the oldest. None when there is none.
    fn claim_batch(&self, now: i64) -> Result<Option<BatchRecord>, LedgerError>;
    /// Gives a batch this owner holds back for another's turn, when another open batch is
    /// waiting (not held by a live lease): the batch is released and taken again after the
    /// others run ([`Self::claim_batch`] takes the least recently run first). False, and the
    /// batch kept, when none waits.
    fn yield_batch(&self, id: &str, now: i64) -> Result<bool, LedgerError>;
    /// Extends this owner's lease on a batch; its status now, or None when the batch is no
    /// longer this owner's (another replica took it after the lease ran out) or is closed.
    fn renew_batch(&self, id: &str, now: i64) -> Result<Option<BatchStatus>, LedgerError>;
    /// Records a line's answer; the first answer recorded for a line is kept (false when it
    /// had one, or the batch is closed).
    fn record_line(&self, batch_id: &str, r: &LineResult) -> Result<bool, LedgerError>;
    /// The batch's answered lines, by line (an open batch's: a closed one keeps none).
    fn line_results(&self, batch_id: &str) -> Result<Vec<LineResult>, LedgerError>;
    /// Open batches in progress and their lines without an answer, over all tenants (what
    /// the replicas have left to run).
    fn backlog(&self) -> Result<(i64, i64), LedgerError>;
    /// Deletes what is older than `before`: closed batches (closed then) and files (created
    /// then) that no open batch reads. Returns (batches, files) deleted.
    fn purge(&self, before: i64) -> Result<(u64, u64), LedgerError>;
    /// Closes a batch this owner holds: stores the output and error files (purpose
    /// `batch_output`, not counted against the tenant's storage limit), keeps its counts and
    /// usage and deletes its lines' answers (the files hold them), and sets the status
    /// (`Completed`, `Cancelled` or `Expired`), in one transaction. `Conflict` when the batch
    /// is no longer this owner's or is closed.
    fn finish_batch(
        &self,
        id: &str,
        status: BatchStatus,
        output: Option<NewFile>,
        errors: Option<NewFile>,
        now: i64,
    ) -> Result<BatchRecord, LedgerError>;
}

/// A fresh id: `prefix` and 24 random hex digits.
pub(crate) fn new_id(prefix: &str) -> Result<String, LedgerError> {
    let mut b = [0u8; 12];
    getrandom::getrandom(&mut b).map_err(|e| LedgerError::Storage(format!("random: {e}")))?;
    Ok(format!("{prefix}{}", crate::hex(&b)))
}

pub(crate) fn no_file(id: &str) -> LedgerError {
    LedgerError::NotFound(format!("no file `{id}`"))
}

pub(crate) fn no_batch(id: &str) -> LedgerError {
    LedgerError::NotFound(format!("no batch `{id}`"))
}

pub(crate) fn storage_full(limit: i64, stored: i64, adding: usize) -> LedgerError {
    LedgerError::Invalid(format!(
        "the tenant's stored files would be {} bytes, over its limit of {limit} \
         (delete files it no longer needs)",
        stored + adding as i64
    ))
}

pub(crate) fn cannot_cancel(b: &BatchRecord) -> LedgerError {
    LedgerError::Conflict(format!(
        "batch `{}` is {} and cannot be cancelled",
        b.id,
        b.status.as_str()
    ))
}

pub(crate) fn too_many_open(open: i64) -> LedgerError {
    LedgerError::Conflict(format!(
        "the tenant has {open} open batches, its most; wait for one to finish or cancel one"
    ))
}

/// Open batches, the claimable ones' order (both dialects: `b` is the batch; the tenant whose
/// batches ran least recently first).
pub(crate) const CLAIM_ORDER: &str = "ORDER BY (SELECT MAX(o.last_run_at) FROM batches o
    WHERE o.tenant_id = b.tenant_id AND o.status IN ('in_progress', 'cancelling')),
    b.last_run_at, b.created_at, b.id";

pub(crate) fn not_held(id: &str) -> LedgerError {
    LedgerError::Conflict(format!("batch `{id}` is closed or held by another replica"))
}

pub(crate) fn check_closing(status: BatchStatus) -> Result<(), LedgerError> {
    if status.is_open() {
        return Err(LedgerError::Invalid(format!(
            "a batch is closed as completed, cancelled or expired, not {}",
            status.as_str()
        )));
    }
    Ok(())
}

pub(crate) fn input_in_use(id: &str) -> LedgerError {
    LedgerError::Conflict(format!(
        "file `{id}` is the input of a batch still running; cancel it or wait for it to finish"
    ))
}

pub(crate) fn not_batch_input(id: &str, purpose: &str) -> LedgerError {
    LedgerError::Invalid(format!(
        "file `{id}` has purpose `{purpose}`; a batch reads a file uploaded with purpose `batch`"
    ))
}

/// The columns of a [`BatchRecord`], in the order the backends read them (both dialects).
pub(crate) const BATCH_SELECT: &str = "SELECT b.id, b.tenant_id, b.endpoint, b.input_file_id,
    b.completion_window, b.status, b.total,
    COALESCE(b.completed, (SELECT COUNT(*) FROM batch_results r WHERE r.batch_id = b.id AND r.status_code BETWEEN 200 AND 299)),
    COALESCE(b.failed, (SELECT COUNT(*) FROM batch_results r WHERE r.batch_id = b.id AND r.status_code NOT BETWEEN 200 AND 299)),
    COALESCE(b.prompt_tokens, (SELECT CAST(COALESCE(SUM(r.prompt_tokens), 0) AS BIGINT) FROM batch_results r WHERE r.batch_id = b.id)),
    COALESCE(b.completion_tokens, (SELECT CAST(COALESCE(SUM(r.completion_tokens), 0) AS BIGINT) FROM batch_results r WHERE r.batch_id = b.id)),
    COALESCE(b.measured_flops, (SELECT COALESCE(SUM(r.measured_flops), 0.0) FROM batch_results r WHERE r.batch_id = b.id)),
    b.metadata, b.created_at, b.expires_at, b.cancelling_at, b.closed_at, b.output_file_id,
    b.error_file_id,
    (SELECT t.name FROM tenants t WHERE t.id = b.tenant_id AND t.key_hash NOT LIKE 'removed:%')
    FROM batches b";

/// Stores a closing batch's counts and usage in its row and deletes its lines' answers
/// (both dialects; `{p}` is the parameter marker of the batch id: `?1` or `$1`).
pub(crate) fn keep_totals(p: &str) -> [String; 2] {
    let sum = |col: &str| {
        format!("(SELECT COALESCE(SUM(r.{col}), 0) FROM batch_results r WHERE r.batch_id = {p})")
    };
    [
        format!(
            "UPDATE batches SET
                 completed = (SELECT COUNT(*) FROM batch_results r WHERE r.batch_id = {p} AND r.status_code BETWEEN 200 AND 299),
                 failed = (SELECT COUNT(*) FROM batch_results r WHERE r.batch_id = {p} AND r.status_code NOT BETWEEN 200 AND 299),
                 prompt_tokens = {}, completion_tokens = {}, measured_flops = {}
             WHERE id = {p}",
            sum("prompt_tokens"),
            sum("completion_tokens"),
            sum("measured_flops")
        ),
        format!("DELETE FROM batch_results WHERE batch_id = {p}"),
    ]
}

/// The statements of [`Batches::purge`] (both dialects; `{p}` is the marker of `before`).
pub(crate) fn purge_statements(p: &str) -> [String; 3] {
    [
        format!(
            "DELETE FROM batch_results WHERE batch_id IN (SELECT id FROM batches
                 WHERE status NOT IN ('in_progress', 'cancelling') AND closed_at < {p})"
        ),
        format!(
            "DELETE FROM batches WHERE status NOT IN ('in_progress', 'cancelling') AND closed_at < {p}"
        ),
        format!(
            "DELETE FROM files WHERE created_at < {p} AND id NOT IN (SELECT input_file_id FROM
                 batches WHERE status IN ('in_progress', 'cancelling'))"
        ),
    ]
}

/// [`Batches::backlog`]'s query (both dialects).
pub(crate) const BACKLOG: &str = "SELECT COUNT(*), CAST(COALESCE(SUM(b.total -
    (SELECT COUNT(*) FROM batch_results r WHERE r.batch_id = b.id)), 0) AS BIGINT)
    FROM batches b WHERE b.status = 'in_progress'";

/// The columns of a [`FileRecord`] (both dialects).
pub(crate) const FILE_COLS: &str = "id, tenant_id, filename, purpose, bytes, created_at";

/// The columns of a [`LineResult`] (both dialects).
pub(crate) const RESULT_COLS: &str = "line, custom_id, status_code, request_id, body, finished_at,
    prompt_tokens, completion_tokens, measured_flops";
