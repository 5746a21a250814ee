//! `historian query`: sends one SQL query to a running server and streams the answer to
//! standard output.

use std::io::Write;

use futures::StreamExt;

/// Options of `historian query`.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// The SQL query.
    pub sql: String,
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:8181", env = "HISTORIAN_URL")]
    pub url: String,
    /// Database.
    #[arg(long, env = "HISTORIAN_DB")]
    pub db: String,
    /// Output format: pretty, json, jsonl, csv, parquet or arrow.
    #[arg(long, default_value = "pretty")]
    pub format: String,
}

/// Runs the query; an error answer becomes an error with the server's message.
pub async fn run(args: QueryArgs) -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = format!("{}/api/v3/query_sql", args.url.trim_end_matches('/'));
    let body = serde_json::json!({"db": args.db, "q": args.sql, "format": args.format});
    let response = reqwest::Client::new()
        .post(&endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("cannot reach {endpoint}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(text);
        return Err(format!("{status}: {message}").into());
    }
    let mut stdout = std::io::stdout().lock();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| format!("the result was cut short: {e}"))?;
        stdout.write_all(&chunk)?;
    }
    stdout.flush()?;
    Ok(())
}
