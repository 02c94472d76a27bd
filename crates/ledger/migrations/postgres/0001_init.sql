-- The shared ledger of replicas. Times are unix seconds (the replicas' clocks: keep them in
-- NTP sync, well within a lease). Usage is computed from the reservations, never kept as a
-- counter.
CREATE TABLE tenants (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    key_hash TEXT NOT NULL UNIQUE,
    default_budget DOUBLE PRECISION NOT NULL,
    per_request_max DOUBLE PRECISION NOT NULL,
    quota DOUBLE PRECISION,
    period TEXT NOT NULL CHECK (period IN ('day', 'month')),
    created_at BIGINT NOT NULL
);

CREATE TABLE reservations (
    id BIGSERIAL PRIMARY KEY,
    tenant_id BIGINT NOT NULL REFERENCES tenants(id),
    request_id TEXT NOT NULL UNIQUE,
    period_start BIGINT NOT NULL,
    reserved DOUBLE PRECISION NOT NULL,
    charged DOUBLE PRECISION,
    state TEXT NOT NULL CHECK (state IN ('open', 'settled', 'released', 'expired')),
    owner TEXT NOT NULL,
    lease_until BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    closed_at BIGINT
);
CREATE INDEX reservations_by_period ON reservations (tenant_id, period_start, state);
CREATE INDEX reservations_open_leases ON reservations (lease_until) WHERE state = 'open';

-- Admission in one statement: under the tenant's row lock (so reservations of one tenant are
-- serialised across replicas, while other tenants proceed), expire the tenant's dead leases,
-- sum what is charged and held by live leases, and insert the reservation only if it fits.
-- Returns the new id (NULL when refused), the usage it was checked against and the quota.
CREATE FUNCTION vvlm_reserve(
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
    SELECT COALESCE(SUM(CASE WHEN r.state = 'settled' THEN r.charged
                             WHEN r.state = 'open' THEN r.reserved ELSE 0 END), 0)
      INTO u FROM reservations r
     WHERE r.tenant_id = p_tenant AND r.period_start = p_period_start;
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
