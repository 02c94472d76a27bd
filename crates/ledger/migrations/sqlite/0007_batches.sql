-- Tenants' files (uploaded batch input, a batch's output and error files) and batches, with
-- each line's answer as it arrives (see src/batches.rs).
CREATE TABLE files (
    id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id),
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    content BLOB NOT NULL
);
CREATE INDEX files_by_tenant ON files (tenant_id, created_at);

CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id),
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    status TEXT NOT NULL,
    total INTEGER NOT NULL,
    metadata TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    cancelling_at INTEGER,
    closed_at INTEGER,
    output_file_id TEXT,
    error_file_id TEXT,
    -- Counts and usage, stored when the batch closes (its lines' answers are then deleted:
    -- they live on in the output and error files); NULL while open.
    completed INTEGER,
    failed INTEGER,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    measured_flops REAL,
    -- The replica running it, until lease_until (0: nobody).
    owner TEXT,
    lease_until INTEGER NOT NULL DEFAULT 0,
    -- When a replica last gave the batch up for another's turn (0: never): open batches are
    -- taken least recently run first.
    last_run_at INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX batches_by_tenant ON batches (tenant_id, created_at);
CREATE INDEX batches_open ON batches (status, last_run_at);

CREATE TABLE batch_results (
    batch_id TEXT NOT NULL REFERENCES batches(id),
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    body TEXT NOT NULL,
    finished_at INTEGER NOT NULL,
    -- From the answer's usage (0 when it has none, as a refusal).
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    measured_flops REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, line)
);
