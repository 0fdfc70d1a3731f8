-- v3: credit leases (see migrations/sqlite/0004_leases.sql for the model).
-- The ledger's CHECK constraints are replaced to admit the lease kinds.
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint WHERE conrelid = 'ledger'::regclass AND contype = 'c' LOOP
        EXECUTE format('ALTER TABLE ledger DROP CONSTRAINT %I', c.conname);
    END LOOP;
END
$$;
ALTER TABLE ledger ADD CONSTRAINT ledger_amount_positive CHECK (amount >= 1);
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_known CHECK (kind IN (
    'topup', 'debit', 'refund', 'hold', 'capture', 'release', 'lease', 'lease_spend', 'lease_return'));
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_deltas CHECK (
    (kind IN ('topup', 'refund') AND delta_available = amount AND delta_held = 0) OR
    (kind = 'debit' AND delta_available = -amount AND delta_held = 0) OR
    (kind = 'hold' AND hold_id IS NOT NULL AND delta_available = -amount AND delta_held = amount) OR
    (kind = 'capture' AND hold_id IS NOT NULL AND delta_available = 0 AND delta_held = -amount) OR
    (kind = 'release' AND hold_id IS NOT NULL AND delta_available = amount AND delta_held = -amount) OR
    (kind = 'lease' AND hold_id IS NOT NULL AND delta_available = -amount AND delta_held = amount) OR
    (kind = 'lease_spend' AND hold_id IS NOT NULL AND idempotency_key IS NOT NULL
        AND delta_available = 0 AND delta_held = -amount) OR
    (kind = 'lease_return' AND hold_id IS NOT NULL AND delta_available = amount AND delta_held = -amount)
);
CREATE UNIQUE INDEX ledger_lease_once ON ledger(hold_id, kind) WHERE kind IN ('lease', 'lease_return');
CREATE UNIQUE INDEX ledger_lease_spend_once ON ledger(idempotency_key) WHERE kind = 'lease_spend';

CREATE TABLE leases (
    id              TEXT PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts(id),
    credits         BIGINT NOT NULL CHECK (credits >= 1),
    spent           BIGINT NOT NULL DEFAULT 0 CHECK (spent >= 0 AND spent <= credits),
    state           TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    recall          BIGINT NOT NULL DEFAULT 0 CHECK (recall IN (0, 1)),
    idempotency_key TEXT NOT NULL UNIQUE,
    holder          TEXT,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    closed_at       BIGINT,
    close_reason    TEXT CHECK (close_reason IN ('returned', 'expired')),
    CHECK ((state = 'open') = (closed_at IS NULL)),
    CHECK ((state = 'closed') = (close_reason IS NOT NULL))
);
CREATE INDEX leases_account_open ON leases(account, state, expires_at);
CREATE INDEX leases_expiry ON leases(state, expires_at);
