-- Leases: a reservation names its owner (a server process) and holds until lease_until; an
-- `expired` state for leases nobody renewed. SQLite cannot change a CHECK constraint in place,
-- so the table is rebuilt. Reservations a pre-lease server left open are released (what that
-- server did at every start: their requests never finished).
CREATE TABLE reservations_v2 (
    id INTEGER PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    request_id TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    reserved REAL NOT NULL,
    charged REAL,
    state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released', 'expired')),
    owner TEXT NOT NULL DEFAULT '',
    lease_until INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    closed_at INTEGER
);
INSERT INTO reservations_v2
    (id, tenant_id, request_id, period_start, reserved, charged, state, created_at, closed_at)
SELECT id, tenant_id, request_id, period_start, reserved, charged,
       CASE WHEN state = 'open' THEN 'released' ELSE state END,
       created_at, COALESCE(closed_at, CASE WHEN state = 'open' THEN strftime('%s', 'now') END)
FROM reservations;
DROP TABLE reservations;
ALTER TABLE reservations_v2 RENAME TO reservations;
CREATE INDEX reservations_by_period ON reservations (tenant_id, period_start, state);
CREATE INDEX reservations_open_leases ON reservations (lease_until) WHERE state = 'open';
-- Request ids are unique from leases on (older rows have no owner).
CREATE UNIQUE INDEX reservations_by_request ON reservations (request_id) WHERE owner <> '';
