//! `historian serve`: opens the lake and the WAL, runs the background persister and serves
//! HTTP until SIGINT or SIGTERM, then flushes the buffer to the lake.

use std::sync::Arc;

use ingest::{IngestMetrics, Ingester};
use prometheus_client::registry::Registry;
use store::Lake;

use crate::config::Config;
use crate::http::{AppState, router};

/// Runs the server until a shutdown signal.
pub async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    config.validate()?;
    let lake_url = config.lake_url()?;
    let lake = Lake::open(&lake_url, &config.storage.s3)?;
    let keyring = crate::keys::open_for_server(&config)?;
    let mut ingest_config = config.ingest_config()?;
    ingest_config.keyring = keyring.clone();
    std::fs::create_dir_all(&ingest_config.wal_dir).map_err(|e| {
        format!(
            "cannot create WAL directory {}: {e}",
            ingest_config.wal_dir.display()
        )
    })?;
    let metrics = Arc::new(IngestMetrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    tracing::info!(lake = %lake_url, wal = %ingest_config.wal_dir.display(), "opening");
    let lake_store = lake.store.clone();
    let ingester = Ingester::open(lake, ingest_config, metrics).await?;
    let query_config = config.query_config()?;
    if let Some(dir) = &query_config.spill_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create spill directory {}: {e}", dir.display()))?;
    }
    let query_metrics = Arc::new(query::QueryMetrics::default());
    query_metrics.register(&mut registry);
    let query = Arc::new(
        query::QueryEngine::new(ingester.clone(), lake_store, query_config, query_metrics)
            .with_keyring(keyring.clone()),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(ingester.clone().run_background(stop_rx.clone()));
    if keyring.is_some() {
        tokio::spawn(run_key_expiry(
            ingester.clone(),
            config.privacy.key_expiry_interval,
            stop_rx,
        ));
    }
    let state = Arc::new(AppState {
        ingester: ingester.clone(),
        query,
        registry,
        max_body_bytes: config.write.max_body_bytes,
        retry_after_secs: config.write.retry_after_secs,
    });
    let listener = tokio::net::TcpListener::bind(&config.server.http_bind)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.http_bind))?;
    let addr = listener.local_addr()?;
    // Tests and scripts wait for this line to learn the port.
    tracing::info!(%addr, "listening for HTTP");
    println!("historian listening on http://{addr}");
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    tracing::info!("shutting down: flushing the write buffer to the lake");
    let _ = stop_tx.send(true);
    let _ = background.await;
    ingester.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

/// Finishes erasures a crash interrupted, then destroys keys past their personal TTL on
/// schedule.
async fn run_key_expiry(
    ingester: Arc<Ingester>,
    interval: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if let Err(e) = ingester.persister.purge_erased().await {
        tracing::error!(error = %e, "could not finish purging erased subjects; retrying at the next start");
    }
    let mut tick = tokio::time::interval(interval.max(std::time::Duration::from_secs(1)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        if let Err(e) = ingester.expire_personal_keys(now).await {
            tracing::error!(error = %e, "destroying expired personal keys failed; will retry");
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
