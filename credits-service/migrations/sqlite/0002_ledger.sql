-- v2 (PRAGMA user_version 2 before sqlx migrations): append-only ledger,
-- holds, rate-limit buckets; backfill the ledger from the v1 history so
-- `check` passes on an upgraded database.
ALTER TABLE accounts ADD COLUMN held INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0);

CREATE TABLE ledger (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account         TEXT NOT NULL REFERENCES accounts(id),
    kind            TEXT NOT NULL CHECK (kind IN ('topup', 'debit', 'refund', 'hold', 'capture', 'release')),
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
        (kind = 'release' AND hold_id IS NOT NULL AND delta_available = amount AND delta_held = -amount)
    )
) STRICT;
CREATE INDEX ledger_account ON ledger(account, id);
CREATE INDEX ledger_hold ON ledger(hold_id);
CREATE INDEX ledger_key ON ledger(idempotency_key);
CREATE UNIQUE INDEX ledger_debit_once ON ledger(idempotency_key) WHERE kind = 'debit';
CREATE UNIQUE INDEX ledger_refund_once ON ledger(idempotency_key, COALESCE(hold_id, '')) WHERE kind = 'refund';
CREATE UNIQUE INDEX ledger_hold_once ON ledger(hold_id, kind) WHERE kind IN ('hold', 'capture', 'release');
CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only: UPDATE refused'); END;
CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only: DELETE refused'); END;

CREATE TABLE holds (
    id              TEXT PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts(id),
    amount          INTEGER NOT NULL CHECK (amount >= 1),
    state           TEXT NOT NULL CHECK (state IN ('open', 'captured', 'released')),
    idempotency_key TEXT NOT NULL UNIQUE,
    balance_after   INTEGER NOT NULL CHECK (balance_after >= 0),
    route           TEXT,
    key_prefix      TEXT,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    settled_at      INTEGER,
    release_reason  TEXT CHECK (release_reason IN ('upstream_error', 'expired', 'requested')),
    CHECK ((state = 'open') = (settled_at IS NULL)),
    CHECK ((state = 'released') = (release_reason IS NOT NULL))
) STRICT;
CREATE INDEX holds_account_open ON holds(account, state, expires_at);
CREATE INDEX holds_expiry ON holds(state, expires_at);

CREATE TABLE rate_buckets (
    account    TEXT PRIMARY KEY,
    units      INTEGER NOT NULL CHECK (units >= 0),
    scale      INTEGER NOT NULL CHECK (scale >= 1),
    updated_ms INTEGER NOT NULL
) STRICT;

-- Backfill. Where an account's top-ups explain its balance
-- (Σ topups = balance + Σ debits) copy them one by one; otherwise write
-- one opening top-up of balance + Σ debits. Then every debit.
INSERT INTO ledger (account, kind, delta_available, delta_held, amount, idempotency_key, note, created_at)
SELECT t.account, 'topup', t.amount, 0, t.amount, t.idempotency_key, t.note, t.created_at
FROM topups t JOIN accounts a ON a.id = t.account
WHERE (SELECT COALESCE(SUM(amount), 0) FROM topups WHERE account = a.id)
    = a.balance + (SELECT COALESCE(SUM(amount), 0) FROM debits WHERE account = a.id)
ORDER BY t.created_at, t.id;

INSERT INTO ledger (account, kind, delta_available, delta_held, amount, note, created_at)
SELECT id, 'topup', opening, 0, opening, 'opening balance (ledger migration)', created_at
FROM (
    SELECT a.id, a.created_at,
           a.balance + (SELECT COALESCE(SUM(amount), 0) FROM debits WHERE account = a.id) AS opening,
           (SELECT COALESCE(SUM(amount), 0) FROM topups WHERE account = a.id) AS topped
    FROM accounts a
)
WHERE opening >= 1 AND opening <> topped
ORDER BY id;

INSERT INTO ledger (account, kind, delta_available, delta_held, amount, idempotency_key, route, key_prefix, created_at)
SELECT account, 'debit', -amount, 0, amount, idempotency_key, route, key_prefix, created_at
FROM debits ORDER BY created_at, rowid;
