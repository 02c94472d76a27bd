-- Requests a tenant may have in flight on one server at once (NULL: the server's default,
-- `[limits] tenant_max_in_flight`).
ALTER TABLE tenants ADD COLUMN max_in_flight BIGINT;
