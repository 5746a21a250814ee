//! docker compose, checked without a container registry: the compose file, the Dockerfile,
//! Historian's config and Grafana's provisioning agree with each other (ports, hosts,
//! credentials, data source names, roles), and every dashboard panel's SQL, expanded as
//! Grafana expands its macros, answers over the PostgreSQL protocol as its data source's
//! role from a real server loaded with the demo generator's data.

mod common;

use std::path::{Path, PathBuf};

use common::Server;
use historian_benches::mes::{MesConfig, MesGen};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The compose file, provisioning and dashboard as JSON (PyYAML reads the YAML).
fn deployment() -> Value {
    let script = r#"
import json, sys, yaml, pathlib
root = pathlib.Path(sys.argv[1])
out = {
    "compose": yaml.safe_load((root / "docker-compose.yml").read_text()),
    "datasources": yaml.safe_load((root / "deploy/grafana/provisioning/datasources/historian.yaml").read_text()),
    "providers": yaml.safe_load((root / "deploy/grafana/provisioning/dashboards/historian.yaml").read_text()),
    "dashboard": json.loads((root / "deploy/grafana/dashboards/mes-demo.json").read_text()),
}
print(json.dumps(out))
"#;
    let out = common::run_python(script, &[repo().to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

fn port_of(bind: &str) -> &str {
    bind.rsplit(':').next().unwrap()
}

#[test]
fn compose_dockerfile_config_and_provisioning_agree() {
    let d = deployment();
    let services = d["compose"]["services"].as_object().unwrap();
    for name in [
        "minio",
        "historian",
        "grafana",
        "generator",
        "historian-init",
    ] {
        assert!(services.contains_key(name), "service {name}");
    }
    let config: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo().join("deploy/historian.toml")).unwrap())
            .unwrap();
    let server = &config["server"];
    let http_port = port_of(server["http_bind"].as_str().unwrap());
    let pg_port = port_of(server["pg_bind"].as_str().unwrap());
    let published: Vec<&str> = services["historian"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(published.contains(&format!("{http_port}:{http_port}").as_str()));
    assert!(published.contains(&format!("{pg_port}:{pg_port}").as_str()));

    // The lake is the MinIO service, with the credentials MinIO is started with.
    let s3 = &config["storage"]["s3"];
    assert_eq!(
        config["storage"]["lake"].as_str().unwrap(),
        "s3://historian/lake"
    );
    assert!(
        s3["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("http://minio:")
    );
    let minio_env = &services["minio"]["environment"];
    let historian_env = &services["historian"]["environment"];
    assert_eq!(
        historian_env["AWS_ACCESS_KEY_ID"],
        minio_env["MINIO_ROOT_USER"]
    );
    assert_eq!(
        historian_env["AWS_SECRET_ACCESS_KEY"],
        minio_env["MINIO_ROOT_PASSWORD"]
    );
    let bucket = services["minio-bucket"]["command"][0].as_str().unwrap();
    assert!(bucket.contains("local/historian"), "{bucket}");

    // Dockerfile: multi-stage, an unprivileged user, the ports the config binds.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count()
            >= 2
    );
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image runs as a named user");
    assert_ne!(user.trim(), "root");
    let expose = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap();
    assert!(expose.split_whitespace().any(|p| p == http_port));
    assert!(expose.split_whitespace().any(|p| p == pg_port));
    for script in [
        "deploy/init.sh",
        "deploy/generator.sh",
        "deploy/historian.toml",
    ] {
        assert!(dockerfile.contains(script), "the image holds {script}");
    }

    // Grafana's data sources point at Historian's PostgreSQL port, each with the token
    // file historian-init writes for it, of a role the config defines.
    let init = std::fs::read_to_string(repo().join("deploy/init.sh")).unwrap();
    let grafana_volumes = services["grafana"]["volumes"].to_string();
    assert!(grafana_volumes.contains("secrets:/secrets"));
    let mut uids = Vec::new();
    for ds in d["datasources"]["datasources"].as_array().unwrap() {
        assert_eq!(ds["type"], "grafana-postgresql-datasource");
        assert_eq!(ds["url"].as_str().unwrap(), format!("historian:{pg_port}"));
        assert_eq!(ds["jsonData"]["database"], "plant");
        let password = ds["secureJsonData"]["password"].as_str().unwrap();
        let file = password
            .strip_prefix("$__file{/secrets/")
            .and_then(|p| p.strip_suffix(".token}"))
            .expect("the password is a token file");
        let line = init
            .lines()
            .find(|l| l.starts_with(&format!("token {file} ")))
            .unwrap_or_else(|| panic!("init.sh creates the token {file}"));
        let role = line.split_whitespace().nth(2).unwrap();
        assert!(
            ["admin", "dpo", "auditor", "writer"].contains(&role)
                || config["roles"].get(role).is_some(),
            "role {role}"
        );
        uids.push(ds["uid"].as_str().unwrap().to_string());
    }
    // The generator writes with a writer token init.sh makes.
    assert!(init.contains("token generator writer"));
    let generator = std::fs::read_to_string(repo().join("deploy/generator.sh")).unwrap();
    assert!(generator.contains("/secrets/generator.token"));
    assert!(generator.contains("db=plant"));

    // The dashboard uses only provisioned data sources, from the provider's path.
    let provider_path = d["providers"]["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert!(grafana_volumes.contains(&format!("./deploy/grafana/dashboards:{provider_path}")));
    for panel in d["dashboard"]["panels"].as_array().unwrap() {
        let uid = panel["datasource"]["uid"].as_str().unwrap();
        assert!(uids.iter().any(|u| u == uid), "panel uses {uid}");
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], uid);
        }
    }
}

/// A panel's SQL with Grafana's macros expanded as macros.go does, for a time range.
fn expand(sql: &str, from: &str, to: &str) -> String {
    let mut out = sql.to_string();
    while let Some(start) = out.find("$__timeGroupAlias(") {
        let end = start + out[start..].find(')').unwrap();
        let args: Vec<&str> = out[start + 18..end].split(',').map(str::trim).collect();
        let seconds = match args[1].trim_matches('\'') {
            "1m" => 60,
            "5m" => 300,
            other => panic!("interval {other}"),
        };
        let replacement = format!(
            "floor(extract(epoch from {col})/{seconds})*{seconds} AS \"time\"",
            col = args[0]
        );
        out.replace_range(start..=end, &replacement);
    }
    while let Some(start) = out.find("$__timeFilter(") {
        let end = start + out[start..].find(')').unwrap();
        let col = out[start + 14..end].trim().to_string();
        out.replace_range(start..=end, &format!("{col} BETWEEN '{from}' AND '{to}'"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_panel_answers_as_its_data_source_role() {
    let d = deployment();
    let dir = tempfile::tempdir().unwrap();
    // The compose config with a local lake and loopback listeners.
    let mut config: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo().join("deploy/historian.toml")).unwrap())
            .unwrap();
    let table = config.as_table_mut().unwrap();
    table.remove("storage");
    table.remove("privacy");
    let server_section = table["server"].as_table_mut().unwrap();
    server_section.insert("pg_bind".into(), "127.0.0.1:0".into());
    server_section.remove("http_bind");
    server_section.remove("data_dir");
    let config = toml::to_string(&config).unwrap();
    let data = dir.path().join("data");
    let server = Server::start_with_keyring(&data, &config);

    // An hour of the demo generator's data, as the generator service writes it.
    let start = chrono::Utc::now() - chrono::Duration::minutes(50);
    let from = (start - chrono::Duration::minutes(10))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let to = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let start_ns = start.timestamp_nanos_opt().unwrap();
    let mut generator = MesGen::new(&MesConfig {
        seed: 7,
        lines: 2,
        machines: 3,
        start_ns,
        interval_ns: 10_000_000_000,
        event_rate: 1.0,
    });
    let mut body = Vec::new();
    while generator.next_ts() < start_ns + 45 * 60_000_000_000 {
        generator.write_tick(&mut body);
    }
    let writer = server.token_for("writer", &[]);
    let r = server
        .client_as(&writer)
        .post(server.url("/api/v3/write_lp?db=plant"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());

    let tokens = [
        ("historian-plant", server.token.clone()),
        (
            "historian-line1",
            server.token_for("line_viewer", &["lines=line_1"]),
        ),
    ];
    let port = server
        .pg_addr
        .as_ref()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    for panel in d["dashboard"]["panels"].as_array().unwrap() {
        let uid = panel["datasource"]["uid"].as_str().unwrap();
        let token = &tokens.iter().find(|(u, _)| *u == uid).unwrap().1;
        let sql = expand(panel["targets"][0]["rawSql"].as_str().unwrap(), &from, &to);
        let script = r#"
import json, sys, psycopg
with psycopg.connect(host="127.0.0.1", port=sys.argv[1], dbname="plant", user="grafana", password=sys.argv[2], sslmode="disable") as conn:
    with psycopg.ClientCursor(conn) as c:
        c.execute(sys.argv[3])
        print(json.dumps({"columns": [d.name for d in c.description], "rows": c.fetchall()}, default=str))
"#;
        let out: Value =
            serde_json::from_str(common::run_python(script, &[&port, token, &sql]).trim()).unwrap();
        let rows = out["rows"].as_array().unwrap();
        let title = panel["title"].as_str().unwrap();
        assert!(!rows.is_empty(), "{title}: no rows for {sql}");
        let columns: Vec<&str> = out["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(
            columns[0], "time",
            "{title}: Grafana needs the time column first"
        );
        if uid == "historian-line1" {
            if let Some(i) = columns.iter().position(|c| *c == "line") {
                assert!(rows.iter().all(|r| r[i] == "line_1"), "{title}");
            }
            if let Some(i) = columns.iter().position(|c| *c == "operator_name") {
                assert!(
                    rows.iter()
                        .all(|r| !r[i].as_str().unwrap_or("").contains(' ')),
                    "{title}: operator names are masked for this role: {rows:?}"
                );
            }
        }
    }
}
