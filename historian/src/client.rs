//! What every client subcommand (`query`, `import`, `subject`, `token`) needs to reach a
//! running server: its URL and a token.

use std::path::PathBuf;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Server URL.
    #[arg(
        long,
        default_value = "http://127.0.0.1:8181",
        env = "HISTORIAN_URL",
        global = true
    )]
    pub url: String,
    /// API token (or set HISTORIAN_TOKEN).
    #[arg(long, env = "HISTORIAN_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// A file holding the API token (e.g. `<data-dir>/admin-token`).
    #[arg(long, conflicts_with = "token", global = true)]
    pub token_file: Option<PathBuf>,
}

impl ServerArgs {
    /// The URL of `path` on the server.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }

    /// An HTTP client that sends the token with every request.
    pub fn client(&self) -> Result<reqwest::Client, String> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let mut headers = HeaderMap::new();
        if let Some(t) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| "the token holds characters a header cannot carry".to_string())?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }
}

/// The server's error message from an error answer's body.
pub fn error_message(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| text.to_string())
}
