-- The plan each reservation was admitted with (checkpoint, frames, tokens per frame, predicted
-- score, cost, budget, task), as JSON text, for a tenant's request history. Older reservations
-- have none. Indexes for the history (newest first) and usage over time (by settlement time).
CREATE TABLE request_plans (
    reservation_id INTEGER PRIMARY KEY REFERENCES reservations(id) ON DELETE CASCADE,
    plan TEXT NOT NULL
);
CREATE INDEX reservations_by_tenant ON reservations (tenant_id, id);
CREATE INDEX reservations_settled_by_time ON reservations (tenant_id, closed_at) WHERE state = 'settled';
