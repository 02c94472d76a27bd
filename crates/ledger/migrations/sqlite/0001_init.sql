-- The ledger as it was before leases (IF NOT EXISTS: databases made before versioned
-- migrations already have it).
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
