//! Opening the lake: an object store from a URL (`file://` or `s3://`).

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

/// Errors opening the lake.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// The URL is not one we can open.
    #[error("invalid lake URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The object store refused the configuration.
    #[error("cannot open lake {url}: {source}")]
    Store {
        /// The URL.
        url: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// A local directory could not be created.
    #[error("cannot create lake directory {path}: {source}")]
    Io {
        /// The directory.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// S3 settings for `s3://` lakes; unset values come from the usual AWS environment variables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    /// Endpoint URL for S3-compatible servers (MinIO, moto, Ceph).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Allow plain HTTP to the endpoint (local servers only).
    #[serde(default)]
    pub allow_http: bool,
    /// Use path-style requests (`endpoint/bucket/key`), as most local servers need.
    #[serde(default = "default_true")]
    pub path_style: bool,
}

fn default_true() -> bool {
    true
}

/// An opened lake: the object store and the root prefix inside it.
#[derive(Debug, Clone)]
pub struct Lake {
    /// The object store.
    pub store: Arc<dyn ObjectStore>,
    /// The prefix under which the layout lives.
    pub root: Path,
    /// The URL it was opened from, for logs.
    pub url: String,
    /// For `file://` lakes, the directory: lets recovery remove the temporary files an
    /// interrupted local write leaves (the object store's listing hides them).
    pub local_dir: Option<std::path::PathBuf>,
    /// For `s3://` lakes, the store itself: its multipart uploads have ids that recovery
    /// can abort after a crash.
    pub s3: Option<Arc<AmazonS3>>,
}

impl Lake {
    /// Opens `file:///dir` (creating the directory) or `s3://bucket/prefix`.
    pub fn open(url: &str, s3: &S3Options) -> Result<Lake, LakeError> {
        let invalid = |reason: &str| LakeError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(invalid("file:// URLs need an absolute path"));
            }
            std::fs::create_dir_all(dir).map_err(|source| LakeError::Io {
                path: dir.to_string(),
                source,
            })?;
            let store = LocalFileSystem::new_with_prefix(dir)
                .map_err(|source| LakeError::Store {
                    url: url.to_string(),
                    source,
                })?
                .with_automatic_cleanup(true);
            return Ok(Lake {
                store: Arc::new(store),
                root: Path::default(),
                url: url.to_string(),
                local_dir: Some(std::path::PathBuf::from(dir)),
                s3: None,
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("s3:// URLs need a bucket"));
            }
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_allow_http(s3.allow_http)
                .with_virtual_hosted_style_request(!s3.path_style);
            if let Some(e) = &s3.endpoint {
                builder = builder.with_endpoint(e);
            }
            if let Some(r) = &s3.region {
                builder = builder.with_region(r);
            }
            if let Some(k) = &s3.access_key_id {
                builder = builder.with_access_key_id(k);
            }
            if let Some(k) = &s3.secret_access_key {
                builder = builder.with_secret_access_key(k);
            }
            let store = Arc::new(builder.build().map_err(|source| LakeError::Store {
                url: url.to_string(),
                source,
            })?);
            return Ok(Lake {
                store: store.clone(),
                root: Path::from(prefix.trim_matches('/')),
                url: url.to_string(),
                local_dir: None,
                s3: Some(store),
            });
        }
        Err(invalid("the scheme must be file:// or s3://"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_local_and_s3_urls_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/lake", dir.path().display());
        let lake = Lake::open(&url, &S3Options::default()).unwrap();
        assert!(dir.path().join("lake").is_dir());
        assert_eq!(lake.root, Path::default());
        let s3 = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            allow_http: true,
            path_style: true,
        };
        let lake = Lake::open("s3://bucket/some/prefix/", &s3).unwrap();
        assert_eq!(lake.root.as_ref(), "some/prefix");
        assert!(Lake::open("ftp://x", &s3).is_err());
        assert!(Lake::open("file://relative", &s3).is_err());
        assert!(Lake::open("s3:///x", &s3).is_err());
    }
}
