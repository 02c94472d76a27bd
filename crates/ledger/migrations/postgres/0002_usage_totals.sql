-- Settled charges per (tenant, period), kept by the settling statement itself, so admission and
-- usage read one row plus the open reservations instead of summing the period's whole history
-- (which grows with every request). Backfilled from the settled rows.
CREATE TABLE usage_totals (
    tenant_id BIGINT NOT NULL REFERENCES tenants(id),
    period_start BIGINT NOT NULL,
    charged DOUBLE PRECISION NOT NULL DEFAULT 0,
    requests BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, period_start)
);
INSERT INTO usage_totals (tenant_id, period_start, charged, requests)
SELECT tenant_id, period_start, SUM(charged), COUNT(*)
FROM reservations WHERE state = 'settled' GROUP BY tenant_id, period_start;
CREATE INDEX reservations_open_by_tenant ON reservations (tenant_id, period_start) WHERE state = 'open';

CREATE OR REPLACE FUNCTION vvlm_reserve(
    p_tenant BIGINT, p_request TEXT, p_period_start BIGINT, p_flops DOUBLE PRECISION,
    p_owner TEXT, p_now BIGINT, p_lease_until BIGINT)
RETURNS TABLE (reservation_id BIGINT, used DOUBLE PRECISION, quota DOUBLE PRECISION)
LANGUAGE plpgsql AS $$
DECLARE
    q DOUBLE PRECISION;
    u DOUBLE PRECISION;
    rid BIGINT;
BEGIN
    SELECT t.quota INTO q FROM tenants t WHERE t.id = p_tenant FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no tenant %', p_tenant USING ERRCODE = 'no_data_found';
    END IF;
    UPDATE reservations r SET state = 'expired', closed_at = p_now
     WHERE r.tenant_id = p_tenant AND r.state = 'open' AND r.lease_until < p_now;
    SELECT COALESCE((SELECT ut.charged FROM usage_totals ut
                      WHERE ut.tenant_id = p_tenant AND ut.period_start = p_period_start), 0)
         + COALESCE((SELECT SUM(r.reserved) FROM reservations r
                      WHERE r.tenant_id = p_tenant AND r.period_start = p_period_start
                        AND r.state = 'open'), 0)
      INTO u;
    IF q IS NOT NULL AND u + p_flops > q THEN
        RETURN QUERY SELECT NULL::BIGINT, u, q;
        RETURN;
    END IF;
    INSERT INTO reservations
        (tenant_id, request_id, period_start, reserved, state, owner, lease_until, created_at)
    VALUES (p_tenant, p_request, p_period_start, p_flops, 'open', p_owner, p_lease_until, p_now)
    RETURNING id INTO rid;
    RETURN QUERY SELECT rid, u, q;
END $$;
