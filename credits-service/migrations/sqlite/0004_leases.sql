-- v4: credit leases. A lease is a hold of N credits that one Envoy (one
-- wasm VM) spends locally, with no callout per paid request, and reports in
-- batches: every charged request still gets its own ledger row
-- ('lease_spend', with its idempotency key, route and key prefix). The
-- grant ('lease') moves N from available to held; each spend moves its
-- amount out of held; closing the lease ('lease_return') gives back what
-- was not spent. `check` proves held = open holds + unspent open leases.
--
-- SQLite cannot change a CHECK constraint in place, so the ledger is
-- rebuilt with the new kinds (same columns, same ids, same rows).
DROP TRIGGER ledger_no_update;
DROP TRIGGER ledger_no_delete;
CREATE TABLE ledger_v4 (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account         TEXT NOT NULL REFERENCES accounts(id),
    kind            TEXT NOT NULL CHECK (kind IN ('topup', 'debit', 'refund', 'hold', 'capture', 'release',
                                                  'lease', 'lease_spend', 'lease_return')),
    delta_available INTEGER NOT NULL,
    delta_held      INTEGER NOT NULL,
    amount          INTEGER NOT NULL CHECK (amount >= 1),
    hold_id         TEXT,
    idempotency_key TEXT,
    route           TEXT,
    key_prefix      TEXT,
    note            TEXT,
    created_at      INTEGER NOT NULL,
    CHECK (
        (kind IN ('topup', 'refund') AND delta_available = amount AND delta_held = 0) OR
        (kind = 'debit' AND delta_available = -amount AND delta_held = 0) OR
        (kind = 'hold' AND hold_id IS NOT NULL AND delta_available = -amount AND delta_held = amount) OR
        (kind = 'capture' AND hold_id IS NOT NULL AND delta_available = 0 AND delta_held = -amount) OR
        (kind = 'release' AND hold_id IS NOT NULL AND delta_available = amount AND delta_held = -amount) OR
        (kind = 'lease' AND hold_id IS NOT NULL AND delta_available = -amount AND delta_held = amount) OR
        (kind = 'lease_spend' AND hold_id IS NOT NULL AND idempotency_key IS NOT NULL
            AND delta_available = 0 AND delta_held = -amount) OR
        (kind = 'lease_return' AND hold_id IS NOT NULL AND delta_available = amount AND delta_held = -amount)
    )
) STRICT;
INSERT INTO ledger_v4 (id, account, kind, delta_available, delta_held, amount, hold_id,
                       idempotency_key, route, key_prefix, note, created_at)
SELECT id, account, kind, delta_available, delta_held, amount, hold_id,
       idempotency_key, route, key_prefix, note, created_at
FROM ledger ORDER BY id;
DROP TABLE ledger;
ALTER TABLE ledger_v4 RENAME TO ledger;
CREATE INDEX ledger_account ON ledger(account, id);
CREATE INDEX ledger_hold ON ledger(hold_id);
CREATE INDEX ledger_key ON ledger(idempotency_key);
CREATE UNIQUE INDEX ledger_debit_once ON ledger(idempotency_key) WHERE kind = 'debit';
CREATE UNIQUE INDEX ledger_refund_once ON ledger(idempotency_key, COALESCE(hold_id, '')) WHERE kind = 'refund';
CREATE UNIQUE INDEX ledger_hold_once ON ledger(hold_id, kind) WHERE kind IN ('hold', 'capture', 'release');
CREATE UNIQUE INDEX ledger_lease_once ON ledger(hold_id, kind) WHERE kind IN ('lease', 'lease_return');
CREATE UNIQUE INDEX ledger_lease_spend_once ON ledger(idempotency_key) WHERE kind = 'lease_spend';
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only: DELETE refused'); END;

CREATE TABLE leases (
    id              TEXT PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts(id),
    credits         INTEGER NOT NULL CHECK (credits >= 1),
    spent           INTEGER NOT NULL DEFAULT 0 CHECK (spent >= 0 AND spent <= credits),
    state           TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    -- 1: a per-request charge on this account was refused while this lease
    -- held credits; its holder is told to give the rest back.
    recall          INTEGER NOT NULL DEFAULT 0 CHECK (recall IN (0, 1)),
    idempotency_key TEXT NOT NULL UNIQUE,
    holder          TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    closed_at       INTEGER,
    close_reason    TEXT CHECK (close_reason IN ('returned', 'expired')),
    CHECK ((state = 'open') = (closed_at IS NULL)),
    CHECK ((state = 'closed') = (close_reason IS NOT NULL))
) STRICT;
CREATE INDEX leases_account_open ON leases(account, state, expires_at);
CREATE INDEX leases_expiry ON leases(state, expires_at);
