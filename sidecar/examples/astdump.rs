//! Print PostgreSQL's parse tree for a statement as JSON, the form the policy
//! analyser walks: `cargo run -p pgwarden-sidecar --example astdump -- "SQL"`.
fn main() {
    let sql = std::env::args().nth(1).unwrap_or_else(|| "SELECT 1".into());
    match pg_query::parse(&sql, 0) {
        Ok(r) => match serde_json::to_string_pretty(&r.protobuf) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("serialize: {e}"),
        },
        Err(e) => eprintln!("parse error: {e}"),
    }
}
