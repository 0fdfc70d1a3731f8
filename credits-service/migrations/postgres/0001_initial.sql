-- v1 (dialtone_schema version 1 before sqlx migrations): the whole schema,
-- the same tables and rules as SQLite's v1 + v2. Never edit a shipped
-- migration: sqlx records its checksum.
CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    balance     BIGINT NOT NULL CHECK (balance >= 0),
    held        BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    created_at  BIGINT NOT NULL
);

CREATE TABLE keys (
    seq          BIGSERIAL UNIQUE,
    key_sha256   TEXT PRIMARY KEY CHECK (length(key_sha256) = 64),
    prefix       TEXT NOT NULL,
    account      TEXT NOT NULL REFERENCES accounts(id),
    kind         TEXT NOT NULL CHECK (kind IN ('api_key', 'api_token')),
    scopes       TEXT NOT NULL DEFAULT '[]',
    name         TEXT,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    revoked_at   BIGINT,
    last_used_at BIGINT
);
CREATE INDEX keys_prefix ON keys(prefix);
CREATE INDEX keys_account ON keys(account);

CREATE TABLE debits (
    idempotency_key TEXT PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts(id),
    amount          BIGINT NOT NULL CHECK (amount >= 1),
    balance_after   BIGINT NOT NULL CHECK (balance_after >= 0),
    route           TEXT,
    key_prefix      TEXT,
    created_at      BIGINT NOT NULL
);
CREATE INDEX debits_account ON debits(account, created_at);

CREATE TABLE topups (
    id              BIGSERIAL PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts(id),
    amount          BIGINT NOT NULL CHECK (amount >= 1),
    created_at      BIGINT NOT NULL,
    note            TEXT,
    idempotency_key TEXT UNIQUE
);
CREATE INDEX topups_account ON topups(account, created_at);

CREATE TABLE ledger (
    id              BIGSERIAL PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts(id),
    kind            TEXT NOT NULL CHECK (kind IN ('topup', 'debit', 'refund', 'hold', 'capture', 'release')),
    delta_available BIGINT NOT NULL,
    delta_held      BIGINT NOT NULL,
    amount          BIGINT NOT NULL CHECK (amount >= 1),
    hold_id         TEXT,
    idempotency_key TEXT,
    route           TEXT,
    key_prefix      TEXT,
    note            TEXT,
    created_at      BIGINT NOT NULL,
    CHECK (
        (kind IN ('topup', 'refund') AND delta_available = amount AND delta_held = 0) OR
        (kind = 'debit' AND delta_available = -amount AND delta_held = 0) OR
        (kind = 'hold' AND hold_id IS NOT NULL AND delta_available = -amount AND delta_held = amount) OR
        (kind = 'capture' AND hold_id IS NOT NULL AND delta_available = 0 AND delta_held = -amount) OR
        (kind = 'release' AND hold_id IS NOT NULL AND delta_available = amount AND delta_held = -amount)
    )
);
CREATE INDEX ledger_account ON ledger(account, id);
CREATE INDEX ledger_hold ON ledger(hold_id);
CREATE INDEX ledger_key ON ledger(idempotency_key);
CREATE UNIQUE INDEX ledger_debit_once ON ledger(idempotency_key) WHERE kind = 'debit';
CREATE UNIQUE INDEX ledger_refund_once ON ledger(idempotency_key, COALESCE(hold_id, '')) WHERE kind = 'refund';
CREATE UNIQUE INDEX ledger_hold_once ON ledger(hold_id, kind) WHERE kind IN ('hold', 'capture', 'release');
CREATE FUNCTION dialtone_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'ledger is append-only: % refused', TG_OP;
END
$fn$;
CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION dialtone_ledger_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION dialtone_ledger_append_only();

CREATE TABLE holds (
    id              TEXT PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts(id),
    amount          BIGINT NOT NULL CHECK (amount >= 1),
    state           TEXT NOT NULL CHECK (state IN ('open', 'captured', 'released')),
    idempotency_key TEXT NOT NULL UNIQUE,
    balance_after   BIGINT NOT NULL CHECK (balance_after >= 0),
    route           TEXT,
    key_prefix      TEXT,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    settled_at      BIGINT,
    release_reason  TEXT CHECK (release_reason IN ('upstream_error', 'expired', 'requested')),
    CHECK ((state = 'open') = (settled_at IS NULL)),
    CHECK ((state = 'released') = (release_reason IS NOT NULL))
);
CREATE INDEX holds_account_open ON holds(account, state, expires_at);
CREATE INDEX holds_expiry ON holds(state, expires_at);

CREATE TABLE rate_buckets (
    account    TEXT PRIMARY KEY,
    units      BIGINT NOT NULL CHECK (units >= 0),
    scale      BIGINT NOT NULL CHECK (scale >= 1),
    updated_ms BIGINT NOT NULL
);
