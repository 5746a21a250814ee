//! `historian serve`: opens the lake and the WAL, runs the background persister and serves
//! HTTP until SIGINT or SIGTERM, then flushes the buffer to the lake.

use std::sync::Arc;

use axum::serve::ListenerExt;

use ingest::{IngestMetrics, Ingester};
use prometheus_client::registry::Registry;
use store::Lake;

use object_store::path::Path as ObjectPath;

use crate::audit::AuditLog;
use crate::auth::Auth;
use crate::config::Config;
use crate::http::{AppState, router};
use crate::role::Roles;
use crate::token::TokenStore;

/// The audit log's directory (local disk, never the lake) and its prefix in the lake.
fn audit_location(
    config: &Config,
    lake: &Lake,
) -> Result<(std::path::PathBuf, ObjectPath), Box<dyn std::error::Error>> {
    Ok((
        config.data_dir()?.join("audit"),
        lake.root.clone().join("audit"),
    ))
}

/// `historian audit verify`: checks the chain and reports every problem.
pub async fn verify_audit(config: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let lake = Lake::open(&config.lake_url()?, &config.storage.s3)?;
    let (dir, prefix) = audit_location(config, &lake)?;
    let report = crate::audit::verify(&dir, &lake.store, &prefix).await?;
    if report.problems.is_empty() {
        match report.range {
            Some((a, b)) => println!("audit chain OK: {} records, {a}..={b}", report.records),
            None => println!("audit chain OK: no records"),
        }
        return Ok(());
    }
    for p in &report.problems {
        println!("FAIL {p}");
    }
    Err(format!(
        "audit chain broken: {} problem(s) in {} records",
        report.problems.len(),
        report.records
    )
    .into())
}

/// Whether `bind` (host:port) names a loopback address.
fn is_loopback_bind(bind: &str) -> bool {
    use std::net::ToSocketAddrs;
    bind.to_socket_addrs()
        .map(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
        .unwrap_or(false)
}

/// Runs the server until a shutdown signal.
pub async fn serve(config: Config, without_auth: bool) -> Result<(), Box<dyn std::error::Error>> {
    config.validate()?;
    if without_auth && !is_loopback_bind(&config.server.http_bind) {
        return Err(format!(
            "--without-auth is for local experiments: refused on the non-loopback address {}",
            config.server.http_bind
        )
        .into());
    }
    // Load TLS first: a certificate that fails to load stops the server, never falls
    // back to plaintext.
    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot load the TLS certificate {} or key {}: {e}",
                            cert.display(),
                            key.display()
                        )
                    })?,
            )
        }
        _ => None,
    };
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
    let data_dir = config.data_dir()?;
    let (audit_dir, audit_prefix) = audit_location(&config, &lake)?;
    let audit = AuditLog::open(
        &audit_dir,
        lake.store.clone(),
        audit_prefix,
        config.audit.retention,
    )
    .await?;
    let roles = Roles::open(&config.roles, &data_dir.join("auth"))?;
    let tokens = if without_auth {
        tracing::warn!(
            "AUTHENTICATION IS OFF (--without-auth): every caller is an anonymous admin. Never run a plant like this."
        );
        None
    } else {
        let store = TokenStore::open(&data_dir.join("auth"))?;
        if let Some(path) = crate::token::bootstrap_admin(&store, &data_dir)? {
            tracing::info!(path = %path.display(), "first start: an admin token was written to this file (mode 0600); keep it safe and delete the file");
        }
        Some(store)
    };
    let auth = Arc::new(Auth::new(tokens, roles, audit.clone()));
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
    let background_runtime = crate::background::BackgroundRuntime::new(config.persist.nice)
        .map_err(|e| format!("cannot start the persister's threads: {e}"))?;
    let background = background_runtime.spawn(ingester.clone().run_background(stop_rx.clone()));
    if keyring.is_some() {
        tokio::spawn(run_key_expiry(
            ingester.clone(),
            config.privacy.key_expiry_interval,
            stop_rx.clone(),
        ));
    }
    let state = Arc::new(AppState {
        ingester: ingester.clone(),
        query,
        registry,
        max_body_bytes: config.write.max_body_bytes,
        retry_after_secs: config.write.retry_after_secs,
        auth,
        audit: audit.clone(),
    });
    let shipping = tokio::spawn(run_audit_shipping(
        audit.clone(),
        config.audit.ship_interval,
        stop_rx.clone(),
    ));
    let pg = match &config.server.pg_bind {
        Some(bind) => {
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .map_err(|e| format!("cannot listen for PostgreSQL on {bind}: {e}"))?;
            let addr = listener.local_addr()?;
            let acceptor = tls.as_ref().map(|tls| {
                let mut server_config = (*tls.get_inner()).clone();
                server_config.alpn_protocols = vec![b"postgresql".to_vec()];
                tokio_rustls::TlsAcceptor::from(Arc::new(server_config))
            });
            let service = crate::pg::PgService::new(
                state.query.clone(),
                audit.clone(),
                state.auth.clone(),
                crate::pg::PgSettings {
                    allow_cleartext: config.server.pg_allow_cleartext,
                    max_connections: config.server.pg_max_connections,
                },
            );
            // Tests and scripts wait for this line to learn the port.
            tracing::info!(%addr, tls = acceptor.is_some(), "listening for PostgreSQL");
            println!("historian listening for postgresql on {addr}");
            Some(tokio::spawn(service.serve(
                listener,
                acceptor,
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    let listener = std::net::TcpListener::bind(&config.server.http_bind)
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.http_bind))?;
    let addr = listener.local_addr()?;
    // Flight SQL is gRPC on the HTTP port, as in InfluxDB 3: same address, same TLS.
    let flight =
        crate::flight::FlightSql::server(state.query.clone(), audit.clone(), state.auth.clone());
    let grpc = tonic::service::Routes::new(flight)
        .prepare()
        .into_axum_router();
    let app = router(state)
        .merge(grpc)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    match tls {
        Some(tls) => {
            let handle = axum_server::Handle::new();
            // TCP_NODELAY: small responses (gRPC frames, query results) leave at once
            // instead of waiting out the peer's delayed ACK (40 ms per Flight call).
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
                .acceptor(axum_server::accept::NoDelayAcceptor::new());
            let server = axum_server::from_tcp(listener)?
                .acceptor(acceptor)
                .handle(handle.clone());
            tokio::spawn(async move {
                shutdown_signal().await;
                handle.graceful_shutdown(Some(std::time::Duration::from_secs(30)));
            });
            // Tests and scripts wait for this line to learn the port.
            tracing::info!(%addr, "listening for HTTPS");
            println!("historian listening on https://{addr}");
            server.serve(app).await?;
        }
        None => {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
                // As above: no delayed-ACK stalls on small responses.
                let _ = tcp.set_nodelay(true);
            });
            tracing::info!(%addr, "listening for HTTP");
            println!("historian listening on http://{addr}");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await?;
        }
    }
    tracing::info!("shutting down: flushing the write buffer to the lake");
    let _ = stop_tx.send(true);
    if let Some(pg) = pg {
        let _ = pg.await;
    }
    let _ = background.await;
    let _ = shipping.await;
    ingester.shutdown().await?;
    // Only now: the final flush may reuse object-store connections whose tasks live on the
    // persister's runtime.
    drop(background_runtime);
    if let Err(e) = audit.ship().await {
        tracing::error!(error = %e, "could not ship the last audit records; they stay pending locally");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Ships audit records to the lake on schedule.
async fn run_audit_shipping(
    audit: Arc<AuditLog>,
    interval: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        if let Err(e) = audit.ship().await {
            tracing::error!(error = %e, "shipping audit records to the lake failed; will retry");
        }
    }
}

/// Finishes erasures a crash interrupted, then destroys keys past their personal TTL on
/// schedule.
async fn run_key_expiry(
    ingester: Arc<Ingester>,
    interval: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if let Err(e) = ingester.persister.hide_erased().await {
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
