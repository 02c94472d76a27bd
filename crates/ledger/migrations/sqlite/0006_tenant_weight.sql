-- A tenant's share of a server's admission places while other tenants wait too, relative to
-- theirs (NULL: 1).
ALTER TABLE tenants ADD COLUMN weight REAL;
