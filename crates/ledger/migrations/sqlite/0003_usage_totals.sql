-- Settled charges per (tenant, period), kept in the same transaction as each settlement, so
-- admission and usage read one row plus the open reservations instead of summing the period's
-- whole history (which grows with every request). Backfilled from the settled rows.
CREATE TABLE usage_totals (
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    period_start INTEGER NOT NULL,
    charged REAL NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, period_start)
);
INSERT INTO usage_totals (tenant_id, period_start, charged, requests)
SELECT tenant_id, period_start, SUM(charged), COUNT(*)
FROM reservations WHERE state = 'settled' GROUP BY tenant_id, period_start;
CREATE INDEX reservations_open_by_tenant ON reservations (tenant_id, period_start) WHERE state = 'open';
