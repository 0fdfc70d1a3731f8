-- v2: x402 payment claims (see migrations/sqlite/0003_x402_claims.sql).
CREATE TABLE x402_claims (
    claim       TEXT PRIMARY KEY CHECK (length(claim) = 64),
    owner       TEXT NOT NULL,
    route       TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX x402_claims_expiry ON x402_claims(expires_at);
