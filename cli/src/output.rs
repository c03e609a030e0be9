//! Turning rows into text or JSON. Commands decide what to print; this module decides how.

use serde_json::{Map, Value};
use tokio_postgres::Row;
use tokio_postgres::types::Type;

/// A row as an ordered JSON object, converting the column types steep_repl's functions return.
pub fn row_to_json(row: &Row) -> Map<String, Value> {
    let mut map = Map::new();
    for (i, col) in row.columns().iter().enumerate() {
        let v = match *col.type_() {
            Type::BOOL => row.try_get::<_, Option<bool>>(i).ok().flatten().map(Value::from),
            Type::INT2 => row.try_get::<_, Option<i16>>(i).ok().flatten().map(Value::from),
            Type::INT4 => row.try_get::<_, Option<i32>>(i).ok().flatten().map(Value::from),
            Type::INT8 => row.try_get::<_, Option<i64>>(i).ok().flatten().map(Value::from),
            Type::FLOAT4 => row.try_get::<_, Option<f32>>(i).ok().flatten().map(Value::from),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i).ok().flatten().map(Value::from),
            _ => row.try_get::<_, Option<String>>(i).ok().flatten().map(Value::from),
        };
        map.insert(col.name().to_string(), v.unwrap_or(Value::Null));
    }
    map
}

/// `key  value` lines, keys padded to one width; NULL shown as "-".
pub fn print_fields(fields: &Map<String, Value>) {
    let width = fields.keys().map(String::len).max().unwrap_or(0);
    for (k, v) in fields {
        let shown = match v {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{k:<width$}  {shown}");
    }
}
