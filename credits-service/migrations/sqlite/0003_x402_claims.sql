-- v3: x402 payment claims. One request at a time may be served on one x402
-- payment (copies sent concurrently through every Envoy and worker): the
-- filter claims a verified payment here before the upstream, and gives the
-- claim back when the upstream failed (nothing was settled). A claim lapses
-- at `expires_at` (the payment's own validity bounds it).
CREATE TABLE x402_claims (
    claim       TEXT PRIMARY KEY CHECK (length(claim) = 64),
    owner       TEXT NOT NULL,
    route       TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX x402_claims_expiry ON x402_claims(expires_at);
