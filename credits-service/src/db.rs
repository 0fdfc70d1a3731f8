//! The small database layer the money rules in [`crate::store`] are written
//! against, once, for SQLite and PostgreSQL.
//!
//! SQL is written in the common subset of both dialects with PostgreSQL's
//! positional parameters `$1`, `$2`, … — which SQLite accepts natively (a
//! `$N` parameter is bound to the N-th value, by name). Nothing rewrites SQL:
//! the few real dialect differences (`FOR UPDATE` row locks exist only on
//! PostgreSQL; SQLite's writer holds the database write lock from `BEGIN
//! IMMEDIATE`; key order by `rowid` or `seq`) are chosen explicitly by the
//! rules from [`Sql::dialect`].
//!
//! Values cross the boundary as [`Val`]: 64-bit integers, text, or a NULL
//! that knows its column type (PostgreSQL needs typed NULL parameters).
//!
//! Three connection types implement [`Sql`]:
//! - [`SqliteConn`]: a rusqlite connection. SQLite's single writer (the
//!   group-commit thread, [`crate::sqlite`]) and the synchronous operator
//!   API ([`crate::store::Store`]) use it: every statement runs at once on
//!   the calling thread, so its futures are always ready.
//! - [`SqlxSqliteConn`]: a pooled sqlx SQLite connection (the readers).
//! - [`PgConn`]: a pooled sqlx PostgreSQL connection.

use crate::store::{Result, StoreError};
use sqlx::{Column, Row as _, TypeInfo, ValueRef};
use std::future::Future;
use std::task::{Context, Poll, Waker};

/// A parameter or column value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    Int(i64),
    Text(String),
    /// NULL in an integer column (parameters) or any NULL (results).
    Null,
    /// NULL in a text column (parameters only).
    NullText,
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
        v.map_or(Val::NullText, Val::from)
    }
}

impl From<&Option<String>> for Val {
    fn from(v: &Option<String>) -> Val {
        v.as_deref().map_or(Val::NullText, Val::from)
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
            Val::Null | Val::NullText => Ok(None),
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
            Val::Null | Val::NullText => Ok(None),
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

/// Statements run against a connection, inside the transaction its owner
/// opened. `Send` so that the rules' futures can move between threads.
pub trait Sql: Send {
    fn dialect(&self) -> Dialect;

    /// Run a statement; returns the number of rows changed.
    fn exec(&mut self, sql: &str, params: &[Val]) -> impl Future<Output = Result<u64>> + Send;

    /// Run a query and return every row.
    fn rows(&mut self, sql: &str, params: &[Val]) -> impl Future<Output = Result<Vec<Row>>> + Send;

    /// The first row, if any.
    fn row(
        &mut self,
        sql: &str,
        params: &[Val],
    ) -> impl Future<Output = Result<Option<Row>>> + Send {
        async move { Ok(self.rows(sql, params).await?.into_iter().next()) }
    }

    /// A single integer (e.g. `COUNT(*)`); a missing row is an error.
    fn int(&mut self, sql: &str, params: &[Val]) -> impl Future<Output = Result<i64>> + Send {
        async move {
            self.row(sql, params)
                .await?
                .ok_or_else(|| StoreError::Corrupt("query returned no row".into()))?
                .i64(0)
        }
    }
}

/// Drive a future that never waits (every statement of a [`SqliteConn`]
/// completes synchronously) to its result on this thread.
pub fn run_ready<F: Future>(fut: F) -> Result<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => Ok(v),
        Poll::Pending => Err(StoreError::Corrupt(
            "a SQLite operation tried to wait inside the writer".into(),
        )),
    }
}

// ----- SQLite through rusqlite (the writer, the operator API) ---------------

/// A rusqlite connection inside a transaction its owner opened.
pub struct SqliteConn<'c> {
    conn: &'c mut rusqlite::Connection,
}

impl<'c> SqliteConn<'c> {
    pub fn new(conn: &'c mut rusqlite::Connection) -> SqliteConn<'c> {
        SqliteConn { conn }
    }

    /// `$N` parameters: SQLite numbers named parameters in order of first
    /// appearance, which need not be N. The order is read from the SQL text
    /// (one pass) rather than asked of SQLite parameter by parameter:
    /// `sqlite3_bind_parameter_name` scans a list, so asking it for each of
    /// the thousands of parameters of a multi-row insert (a lease report of
    /// 500 spends) is quadratic and was most of the service's CPU.
    fn bind(stmt: &mut rusqlite::Statement<'_>, sql: &str, params: &[Val]) -> Result<()> {
        let count = stmt.parameter_count();
        let order = dollar_params(sql, params.len()).filter(|o| o.len() == count);
        let name_of = |stmt: &rusqlite::Statement<'_>, index: usize| -> Result<usize> {
            stmt.parameter_name(index)
                .and_then(|name| name.strip_prefix('$'))
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| StoreError::Corrupt(format!("parameter {index} is not $N")))
        };
        // The text's order must be SQLite's: checked for every parameter in
        // debug builds (the test suites), for the first and last otherwise.
        if let Some(o) = &order {
            let check: Vec<usize> = if cfg!(debug_assertions) { (1..=count).collect() } else { vec![1, count] };
            for index in check.into_iter().filter(|i| *i >= 1 && *i <= count) {
                if o.get(index - 1).copied() != Some(name_of(stmt, index)?) {
                    return Err(StoreError::Corrupt(format!("parameter {index}: SQL text and SQLite disagree on its number")));
                }
            }
        }
        for index in 1..=count {
            let n = match &order {
                Some(o) => o.get(index - 1).copied().unwrap_or(0),
                None => name_of(stmt, index)?,
            };
            let value = params
                .get(n.wrapping_sub(1))
                .ok_or_else(|| StoreError::Corrupt(format!("no value for ${n}")))?;
            match value {
                Val::Int(i) => stmt.raw_bind_parameter(index, *i)?,
                Val::Text(s) => stmt.raw_bind_parameter(index, s.as_str())?,
                Val::Null | Val::NullText => {
                    stmt.raw_bind_parameter(index, rusqlite::types::Null)?
                }
            }
        }
        Ok(())
    }

    fn exec_now(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        Self::bind(&mut stmt, sql, params)?;
        let n = stmt.raw_execute()?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn rows_now(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        Self::bind(&mut stmt, sql, params)?;
        let columns = stmt.column_count();
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut vals = Vec::with_capacity(columns);
            for i in 0..columns {
                vals.push(rusqlite_read(row.get_ref(i)?)?);
            }
            out.push(Row(vals));
        }
        Ok(out)
    }
}

/// The `$N` parameters of `sql` in order of first appearance (string
/// literals skipped), or `None` if one is not a number in `1..=max`.
fn dollar_params(sql: &str, max: usize) -> Option<Vec<usize>> {
    let b = sql.as_bytes();
    let mut seen = vec![false; max + 1];
    let mut order = Vec::new();
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'\'' => {
                // A literal ends at the next quote ('' inside is two literals
                // back to back: the same thing for this purpose).
                i += 1;
                while b.get(i).is_some_and(|c| *c != b'\'') {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                let start = i + 1;
                let mut end = start;
                while b.get(end).is_some_and(u8::is_ascii_digit) {
                    end += 1;
                }
                let n: usize = sql.get(start..end)?.parse().ok()?;
                let slot = seen.get_mut(n).filter(|_| n >= 1)?;
                if !*slot {
                    *slot = true;
                    order.push(n);
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    Some(order)
}

fn rusqlite_read(v: rusqlite::types::ValueRef<'_>) -> Result<Val> {
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

impl Sql for SqliteConn<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn exec(&mut self, sql: &str, params: &[Val]) -> impl Future<Output = Result<u64>> + Send {
        std::future::ready(self.exec_now(sql, params))
    }

    fn rows(&mut self, sql: &str, params: &[Val]) -> impl Future<Output = Result<Vec<Row>>> + Send {
        std::future::ready(self.rows_now(sql, params))
    }
}

// ----- sqlx (SQLite readers, PostgreSQL) ---------------------------------

macro_rules! bind_vals {
    ($query:expr, $params:expr) => {{
        let mut q = $query;
        for p in $params {
            q = match p {
                Val::Int(i) => q.bind(*i),
                Val::Text(s) => q.bind(s.as_str()),
                Val::Null => q.bind(None::<i64>),
                Val::NullText => q.bind(None::<&str>),
            };
        }
        q
    }};
}

/// A pooled sqlx SQLite connection (read-only use: the readers).
pub struct SqlxSqliteConn<'c> {
    conn: &'c mut sqlx::SqliteConnection,
}

impl<'c> SqlxSqliteConn<'c> {
    pub fn new(conn: &'c mut sqlx::SqliteConnection) -> SqlxSqliteConn<'c> {
        SqlxSqliteConn { conn }
    }
}

fn sqlx_sqlite_row(row: &sqlx::sqlite::SqliteRow) -> Result<Row> {
    let mut out = Vec::with_capacity(row.len());
    for i in 0..row.len() {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            out.push(Val::Null);
            continue;
        }
        let kind = raw.type_info().name().to_ascii_uppercase();
        let v = match kind.as_str() {
            "INTEGER" | "INT" | "BIGINT" | "BOOLEAN" => Val::Int(row.try_get::<i64, _>(i)?),
            "TEXT" => Val::Text(row.try_get::<String, _>(i)?),
            other => {
                return Err(StoreError::Corrupt(format!(
                    "column {i} has unsupported type {other}"
                )))
            }
        };
        out.push(v);
    }
    Ok(Row(out))
}

impl Sql for SqlxSqliteConn<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    async fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let q = bind_vals!(sqlx::query(sql), params);
        Ok(q.execute(&mut *self.conn).await?.rows_affected())
    }

    async fn rows(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        let q = bind_vals!(sqlx::query(sql), params);
        let rows = q.fetch_all(&mut *self.conn).await?;
        rows.iter().map(sqlx_sqlite_row).collect()
    }
}

/// A pooled sqlx PostgreSQL connection inside a transaction.
pub struct PgConn<'c> {
    conn: &'c mut sqlx::PgConnection,
}

impl<'c> PgConn<'c> {
    pub fn new(conn: &'c mut sqlx::PgConnection) -> PgConn<'c> {
        PgConn { conn }
    }
}

fn pg_row(row: &sqlx::postgres::PgRow) -> Result<Row> {
    let mut out = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let ty = col.type_info().name();
        let v = match ty {
            "INT8" => row
                .try_get::<Option<i64>, _>(i)?
                .map_or(Val::Null, Val::Int),
            "INT4" => row
                .try_get::<Option<i32>, _>(i)?
                .map_or(Val::Null, |x| Val::Int(i64::from(x))),
            "INT2" => row
                .try_get::<Option<i16>, _>(i)?
                .map_or(Val::Null, |x| Val::Int(i64::from(x))),
            "BOOL" => row
                .try_get::<Option<bool>, _>(i)?
                .map_or(Val::Null, |x| Val::Int(i64::from(x))),
            "TEXT" | "VARCHAR" | "NAME" | "BPCHAR" => row
                .try_get::<Option<String>, _>(i)?
                .map_or(Val::Null, Val::Text),
            other => {
                return Err(StoreError::Corrupt(format!(
                    "column {} has unsupported type {other}",
                    col.name()
                )))
            }
        };
        out.push(v);
    }
    Ok(Row(out))
}

impl Sql for PgConn<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    async fn exec(&mut self, sql: &str, params: &[Val]) -> Result<u64> {
        let q = bind_vals!(sqlx::query(sql), params);
        Ok(q.execute(&mut *self.conn).await?.rows_affected())
    }

    async fn rows(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Row>> {
        let q = bind_vals!(sqlx::query(sql), params);
        let rows = q.fetch_all(&mut *self.conn).await?;
        rows.iter().map(pg_row).collect()
    }

}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::dollar_params;

    #[test]
    fn parameters_are_numbered_in_order_of_first_appearance() {
        assert_eq!(dollar_params("SELECT $2, $1, $2, $3", 3), Some(vec![2, 1, 3]));
        assert_eq!(dollar_params("SELECT '$9', $1 WHERE x = 'it''s $4'", 1), Some(vec![1]));
        assert_eq!(dollar_params("SELECT 1", 0), Some(vec![]));
        // Out of range, zero, or not a number: the caller asks SQLite instead.
        assert_eq!(dollar_params("SELECT $4", 3), None);
        assert_eq!(dollar_params("SELECT $0", 3), None);
        assert_eq!(dollar_params("SELECT $x", 3), None);
    }

    /// The text's numbering is SQLite's, binding thousands of parameters.
    #[test]
    fn a_wide_insert_binds_every_value_where_it_belongs() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (a INTEGER, b TEXT)").unwrap();
        let rows: u32 = 2_000;
        let mut sql = String::from("INSERT INTO t (a, b) VALUES ");
        let mut params = Vec::new();
        for n in 0..rows {
            if n > 0 {
                sql.push_str(", ");
            }
            // b before a in the text: numbering by appearance is not by N.
            sql.push_str(&format!("(${}, ${})", 2 * n + 2, 2 * n + 1));
            params.push(super::Val::Text(format!("row {n}")));
            params.push(super::Val::Int(i64::from(n)));
        }
        let mut c = super::SqliteConn::new(&mut conn);
        assert_eq!(c.exec_now(&sql, &params).unwrap(), u64::from(rows));
        let got = c.rows_now("SELECT a, b FROM t WHERE a = $1", &[super::Val::Int(1234)]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].text(1).unwrap(), "row 1234");
    }
}
