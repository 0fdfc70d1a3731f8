-- v5: two ledger indexes a paid request no longer writes.
--
-- A debit, a hold's ledger rows and a lease spend each land at a random
-- place in every index on their idempotency key or hold id (request ids and
-- hold ids are random), and every such page is a WAL frame of its commit:
-- the one cost of a paid request that grows with the number of indexes.
--
-- ledger_key (all kinds): every lookup by idempotency key names its kind,
-- and each kind that looks one up has its own partial unique index
-- (ledger_debit_once, ledger_refund_once, ledger_lease_spend_once), which
-- the planner uses instead.
DROP INDEX ledger_key;
-- ledger_hold: only rows with a hold id (holds, leases) are ever looked up
-- by it; a debit or top-up (no hold id) no longer touches it.
DROP INDEX ledger_hold;
CREATE INDEX ledger_hold ON ledger(hold_id) WHERE hold_id IS NOT NULL;
