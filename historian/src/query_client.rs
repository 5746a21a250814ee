//! `historian query`: sends one SQL query to a running server and streams the answer to
//! standard output.

use std::io::Write;

use futures::StreamExt;

/// Options of `historian query`.
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// The SQL query.
    pub sql: String,
    #[command(flatten)]
    pub server: crate::client::ServerArgs,
    /// Database.
    #[arg(long, env = "HISTORIAN_DB")]
    pub db: String,
    /// Output format: pretty, json, jsonl, csv, parquet or arrow.
    #[arg(long, default_value = "pretty")]
    pub format: String,
}

/// Runs the query; an error answer becomes an error with the server's message.
pub async fn run(args: QueryArgs) -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = args.server.endpoint("/api/v3/query_sql");
    let body = serde_json::json!({"db": args.db, "q": args.sql, "format": args.format});
    let response = args
        .server
        .client()?
        .post(&endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("cannot reach {endpoint}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = crate::client::error_message(&text);
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
