-- v1 (PRAGMA user_version 1 before sqlx migrations): initial schema.
-- STRICT tables make SQLite reject non-integer money. Never edit a shipped
-- migration: sqlx records its checksum.
CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    balance     INTEGER NOT NULL CHECK (balance >= 0),
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE keys (
    key_sha256   TEXT PRIMARY KEY CHECK (length(key_sha256) = 64),
    prefix       TEXT NOT NULL,
    account      TEXT NOT NULL REFERENCES accounts(id),
    kind         TEXT NOT NULL CHECK (kind IN ('api_key', 'api_token')),
    scopes       TEXT NOT NULL DEFAULT '[]',
    name         TEXT,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER,
    last_used_at INTEGER
) STRICT;
CREATE INDEX keys_prefix ON keys(prefix);
CREATE INDEX keys_account ON keys(account);

CREATE TABLE debits (
    idempotency_key TEXT PRIMARY KEY,
    account         TEXT NOT NULL REFERENCES accounts(id),
    amount          INTEGER NOT NULL CHECK (amount >= 1),
    balance_after   INTEGER NOT NULL CHECK (balance_after >= 0),
    route           TEXT,
    key_prefix      TEXT,
    created_at      INTEGER NOT NULL
) STRICT;
CREATE INDEX debits_account ON debits(account, created_at);

CREATE TABLE topups (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account         TEXT NOT NULL REFERENCES accounts(id),
    amount          INTEGER NOT NULL CHECK (amount >= 1),
    created_at      INTEGER NOT NULL,
    note            TEXT,
    idempotency_key TEXT UNIQUE
) STRICT;
CREATE INDEX topups_account ON topups(account, created_at);
