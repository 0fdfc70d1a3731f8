//! A tiny database layer so the money rules in [`crate::store`] are written
//! once and run on SQLite or PostgreSQL.
//!
//! SQL in the store is written in the common subset of both dialects, with
//! positional parameters spelled `?1`, `?2`, … (rewritten to `$1`, `$2`, …
//! for PostgreSQL) and row locks spelled ` FOR UPDATE` (dropped for SQLite,
//! whose `BEGIN IMMEDIATE` already holds the single database write lock).
//! Values cross the boundary as [`Val`]: integers (always 64-bit), text or
//! NULL — the only types the schema uses.

use crate::store::{Result, StoreError};

/// A parameter or column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Int(i64),
    Text(String),
    Null,
}

impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::Int(v)
    }
}

impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(v.to_string())
    }
}

impl From<&String> for Val {
    fn from(v: &String) -> Val {
        Val::Text(v.clone())
    }
}

impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Text(v)
    }
}

impl From<Option<&str>> for Val {
    fn from(v: Option<&str>) -> Val {
        v.map_or(Val::Null, Val::from)
    }
}

impl From<&Option<String>> for Val {
    fn from(v: &Option<String>) -> Val {
        v.as_deref().map_or(Val::Null, Val::from)
    }
}

impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Val {
        v.map_or(Val::Null, Val::Int)
    }
}

/// Build a `[Val; N]` from heterogeneous values.
#[macro_export]
macro_rules! vals {
    ($($v:expr),* $(,)?) => { [$($crate::db::Val::from($v)),*] };
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Val>);

impl Row {
    fn at(&self, i: usize) -> Result<&Val> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("missing column {i}")))
    }

    pub fn i64(&self, i: usize) -> Result<i64> {
        match self.at(i)? {
            Val::Int(v) => Ok(*v),
            other => Err(StoreError::Corrupt(format!(
                "column {i}: expected integer, got {other:?}"
            ))),
        }
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>> {
        match self.at(i)? {
            Val::Int(v) => Ok(Some(*v)),
            Val::Null => Ok(None),
            other => Err(StoreError::Corrupt(format!(
                "column {i}: expected integer or NULL, got {other:?}"
            ))),
        }
    }

    pub fn text(&self, i: usize) -> Result<String> {
        match self.at(i)? {
            Val::Text(v) => Ok(v.clone()),
            other => Err(StoreError::Corrupt(format!(
                "column {i}: expected text, got {other:?}"
            ))),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.at(i)? {
            Val::Text(v) => Ok(Some(v.clone())),
            Val::Null => Ok(None),
            other => Err(StoreError::Corrupt(format!(
                "column {i}: expected text or NULL, got {other:?}"
            ))),
        }
    }
}

/// Which SQL dialect a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Statements run against a connection (inside or outside a transaction).
pub trait Sql {
    fn dialect(&self) -> Dialect;
    /// Run a statement; returns the number of rows changed.
    fn exec(&self, sql: &str, params: &[Val]) -> Result<u64>;
    /// Run a query and return every row.
    fn rows(&self, sql: &str, params: &[Val]) -> Result<Vec<Row>>;

    /// The first row, if any.
    fn row(&self, sql: &str, params: &[Val]) -> Result<Option<Row>> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }

    /// A single integer (e.g. `COUNT(*)`); missing rows are an error.
    fn int(&self, sql: &str, params: &[Val]) -> Result<i64> {
        self.row(sql, params)?
            .ok_or_else(|| StoreError::Corrupt("query returned no row".into()))?
            .i64(0)
    }
}

/// `?N` → `$N` (PostgreSQL). The store's SQL never has `?` inside literals.
pub fn to_postgres(sql: &str) -> String {
    sql.replace('?', "$")
}

/// Drop ` FOR UPDATE` row-lock clauses (SQLite locks the whole database).
pub fn to_sqlite(sql: &str) -> String {
    sql.replace(" FOR UPDATE", "")
}

// ----- SQLite ---------------------------------------------------------------

fn sqlite_value(v: &Val) -> rusqlite::types::Value {
    match v {
        Val::Int(i) => rusqlite::types::Value::Integer(*i),
        Val::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Val::Null => rusqlite::types::Value::Null,
    }
}

fn sqlite_read(v: rusqlite::types::ValueRef<'_>) -> Result<Val> {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Ok(Val::Null),
        ValueRef::Integer(i) => Ok(Val::Int(i)),
        ValueRef::Text(t) => String::from_utf8(t.to_vec())
            .map(Val::Text)
            .map_err(|e| StoreError::Corrupt(format!("text column: {e}"))),
        ValueRef::Real(_) | ValueRef::Blob(_) => Err(StoreError::Corrupt(
            "unexpected REAL/BLOB column".to_string(),
        )),
    }
}

impl Sql for rusqlite::Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn exec(&self, sql: &str, params: &[Val]) -> Result<u64> {
        let sql = to_sqlite(sql);
        let mut stmt = self.prepare_cached(&sql)?;
        let n = stmt.execute(rusqlite::params_from_iter(params.iter().map(sqlite_value)))?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn rows(&self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        let sql = to_sqlite(sql);
        let mut stmt = self.prepare_cached(&sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(sqlite_value)))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut vals = Vec::with_capacity(columns);
            for i in 0..columns {
                vals.push(sqlite_read(row.get_ref(i)?)?);
            }
            out.push(Row(vals));
        }
        Ok(out)
    }
}
