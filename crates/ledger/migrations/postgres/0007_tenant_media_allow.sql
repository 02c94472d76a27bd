-- URL and folder prefixes a tenant's media may be read from, narrowing the server's url_allow and
-- file_allow (a JSON array of strings; NULL: the server's lists alone).
ALTER TABLE tenants ADD COLUMN media_allow TEXT;
