//! Keeping the sidecar current: its leaf (CSR signing and renewal), the trust roots, its
//! configuration and the intentions, each followed with blocking queries; plus the small
//! admin endpoint. Failures keep what is in force and retry with back-off.
//!
//! Intentions are watched and evaluated locally (Consul's agent does the same with its
//! intention cache) rather than asking `/v1/agent/connect/authorize` per connection: the
//! decision costs no round trip, and a sidecar keeps admitting (and refusing) by the last
//! known intentions while the control plane is down — a per-connection call would fail every
//! new connection then. A change reaches the sidecar within one blocking-query round trip.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use rcgen::{CertificateParams, KeyPair, SanType};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::identity::{renewal_delay, renewal_fraction, DefaultDecision, Intention, SpiffeId};
use super::tls::{certificates_from_pem, root_store, Credentials, TlsState};
use super::{reconcile_upstreams, Authorization, Shared, SidecarConfig};
use mesh_client::cp_client::{backoff, Client};
use mesh_client::watch::Watch;

/// The trust roots as the control plane lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    pub active_id: String,
    pub pems: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireRoots {
    #[serde(rename = "ActiveRootID", default)]
    active_root_id: String,
    #[serde(default)]
    roots: Vec<WireRoot>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WireRoot {
    root_cert: String,
}

/// The trust roots; a usable answer advances `watch`.
pub async fn fetch_roots(client: &Client, watch: &mut Watch) -> anyhow::Result<Roots> {
    let answer = watch.query(client, "/v1/connect/ca/roots").await?;
    let wire: WireRoots = serde_json::from_slice(&answer.body).context("CA roots")?;
    let roots = Roots {
        active_id: wire.active_root_id,
        pems: wire.roots.into_iter().map(|root| root.root_cert).collect(),
    };
    watch.succeeded(answer.index);
    Ok(roots)
}

/// The sidecar configuration of `proxy_id`; a usable answer advances `watch`.
pub async fn fetch_config(
    client: &Client,
    proxy_id: &str,
    watch: &mut Watch,
) -> anyhow::Result<SidecarConfig> {
    let answer = watch
        .query(client, &mesh_model::wire::sidecar_config_path(proxy_id))
        .await?;
    let config = SidecarConfig::parse(&answer.body).map_err(|error| anyhow!(error))?;
    watch.succeeded(answer.index);
    Ok(config)
}

/// The intentions whose destination matches `service`, and the default decision. The default
/// (the control plane's ACL default policy) is not published as such; `check` with the source
/// `*` answers it whenever no wildcard-source intention applies — and when one applies, every
/// client matches an intention, so the default is never consulted.
pub async fn fetch_authorization(
    client: &Client,
    service: &str,
    watch: &mut Watch,
) -> anyhow::Result<Authorization> {
    let path = format!("/v1/connect/intentions/match?by=destination&name={service}");
    let answer = watch.query(client, &path).await?;
    let mut by_name: std::collections::HashMap<String, Vec<Intention>> =
        serde_json::from_slice(&answer.body).context("intentions")?;
    let intentions = by_name.remove(service).unwrap_or_default();
    let check = client
        .get(&format!(
            "/v1/connect/intentions/check?source=%2A&destination={service}"
        ))
        .await?;
    #[derive(Deserialize)]
    struct Check {
        #[serde(rename = "Allowed")]
        allowed: bool,
    }
    let check: Check = serde_json::from_slice(&check.body).context("intention check")?;
    let default = if check.allowed {
        DefaultDecision::Allow
    } else {
        DefaultDecision::Deny
    };
    watch.succeeded(answer.index);
    Ok(Authorization {
        intentions,
        default,
    })
}

/// A freshly signed leaf.
pub struct Leaf {
    pub credentials: Credentials,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Make a new P-256 key, send a CSR for our identity, and take the signed chain back. The
/// private key never leaves this process.
pub async fn sign_leaf(
    client: &Client,
    service: &str,
    identity: &SpiffeId,
) -> anyhow::Result<Leaf> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("key generation")?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .to_string()
            .try_into()
            .context("SPIFFE ID as a URI SAN")?,
    )];
    let csr = params
        .serialize_request(&key)
        .context("CSR")?
        .pem()
        .context("CSR PEM")?;
    let answer = client
        .post(
            "/v1/connect/ca/leaf/sign",
            &serde_json::json!({ "Service": service, "CSR": csr }),
        )
        .await?;
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Signed {
        #[serde(rename = "CertPEM")]
        cert_pem: String,
        #[serde(rename = "IntermediatePEMs", default)]
        intermediate_pems: Vec<String>,
    }
    let signed: Signed = serde_json::from_slice(&answer.body).context("signed leaf")?;
    let mut chain = certificates_from_pem(&signed.cert_pem).map_err(|error| anyhow!(error))?;
    for pem in &signed.intermediate_pems {
        chain.extend(certificates_from_pem(pem).map_err(|error| anyhow!(error))?);
    }
    let (not_before, not_after) = validity(&chain[0]).context("signed leaf validity")?;
    let presented = super::identity::leaf_identity(&chain[0]).map_err(|error| anyhow!(error))?;
    if &presented != identity {
        anyhow::bail!("the control plane signed {presented}, not {identity}");
    }
    Ok(Leaf {
        credentials: Credentials {
            chain,
            key_pkcs8: key.serialize_der(),
        },
        not_before,
        not_after,
    })
}

fn validity(certificate: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
    let at = |seconds: i64| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
    };
    let validity = parsed.validity();
    Some((
        at(validity.not_before.timestamp()),
        at(validity.not_after.timestamp()),
    ))
}

/// Renew the leaf at a random point between 60 % and 90 % of its lifetime, and at once when
/// the roots change. Each new leaf gets a new key; the new TLS state is swapped in whole, so
/// established connections keep the one they started with.
pub async fn renew_leaf(
    shared: Arc<Shared>,
    mut not_before: SystemTime,
    mut not_after: SystemTime,
    root_changed: Arc<tokio::sync::Notify>,
) {
    let random = ring::rand::SystemRandom::new();
    loop {
        let mut bytes = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&random, &mut bytes);
        let delay = renewal_delay(
            not_before,
            not_after,
            renewal_fraction(u32::from_be_bytes(bytes)),
            SystemTime::now(),
        );
        tracing::info!(in_seconds = delay.as_secs(), "next leaf renewal");
        let cause = tokio::select! {
            _ = tokio::time::sleep(delay) => "scheduled",
            _ = root_changed.notified() => "trust roots changed",
        };
        let mut failures = 0;
        loop {
            match renew_once(&shared).await {
                Ok((from, until)) => {
                    (not_before, not_after) = (from, until);
                    tracing::info!(cause, "leaf renewed");
                    break;
                }
                Err(error) => {
                    tracing::warn!(cause, error = %format!("{error:#}"), "leaf renewal failed; keeping the current leaf");
                    tokio::time::sleep(backoff(failures)).await;
                    failures += 1;
                }
            }
        }
    }
}

async fn renew_once(shared: &Shared) -> anyhow::Result<(SystemTime, SystemTime)> {
    let config = shared.config.load_full();
    let roots = fetch_roots(&shared.client, &mut Watch::new()).await?;
    let leaf = sign_leaf(&shared.client, &config.service, &config.identity).await?;
    let state = TlsState::new(
        leaf.credentials,
        root_store(&roots.pems).map_err(|error| anyhow!(error))?,
    )
    .map_err(|error| anyhow!(error))?;
    shared.tls.store(Arc::new(state));
    shared.stats.leaf_renewals.fetch_add(1, Ordering::Relaxed);
    shared.stats.leaf_not_after_unix.store(
        leaf.not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs()),
        Ordering::Relaxed,
    );
    Ok((leaf.not_before, leaf.not_after))
}

/// Follow the roots; a changed root set triggers a renewal (which also installs the roots).
pub async fn follow_roots(
    shared: Arc<Shared>,
    mut known: Roots,
    mut watch: Watch,
    root_changed: Arc<tokio::sync::Notify>,
) {
    loop {
        match fetch_roots(&shared.client, &mut watch).await {
            Ok(roots) => {
                if roots != known {
                    tracing::info!(active = %roots.active_id, "trust roots changed");
                    known = roots;
                    root_changed.notify_one();
                }
            }
            Err(error) => {
                failed(&shared, "roots", &error);
                tokio::time::sleep(watch.failed()).await;
            }
        }
    }
}

pub async fn follow_config(shared: Arc<Shared>, mut watch: Watch) {
    loop {
        match fetch_config(&shared.client, &shared.proxy_id, &mut watch).await {
            Ok(config) => {
                shared.stats.control_plane.received(config.generation);
                let current = shared.config.load();
                if config.upstreams != current.upstreams
                    || config.local_app != current.local_app
                    || config.identity != current.identity
                {
                    tracing::info!(
                        generation = config.generation,
                        "sidecar configuration changed"
                    );
                    drop(current);
                    shared.config.store(Arc::new(config));
                    if let Err(error) = reconcile_upstreams(&shared).await {
                        tracing::error!(error = %format!("{error:#}"), "cannot apply the upstream listeners");
                    }
                }
            }
            Err(error) => {
                failed(&shared, "sidecar configuration", &error);
                tokio::time::sleep(watch.failed()).await;
            }
        }
    }
}

pub async fn follow_intentions(shared: Arc<Shared>, mut watch: Watch) {
    loop {
        let service = shared.config.load().service.clone();
        let index = watch.index();
        match fetch_authorization(&shared.client, &service, &mut watch).await {
            Ok(authorization) => {
                if watch.index() != index {
                    tracing::info!(
                        intentions = authorization.intentions.len(),
                        default = ?authorization.default,
                        "intentions in force"
                    );
                }
                shared.authz.store(Arc::new(authorization));
            }
            Err(error) => {
                failed(&shared, "intentions", &error);
                tokio::time::sleep(watch.failed()).await;
            }
        }
    }
}

fn failed(shared: &Shared, what: &str, error: &anyhow::Error) {
    let stats = &shared.stats.control_plane;
    stats.connected.store(false, Ordering::Relaxed);
    stats.watch_errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(what, error = %format!("{error:#}"), "control plane request failed; keeping what is in force");
}

/// Admin requests are one line and a few headers.
const ADMIN_MAX_REQUEST: usize = 8 * 1024;

/// `GET /metrics` (Prometheus text) and `GET /ready`; one request per connection.
pub async fn serve_admin(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            let read = async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = stream.read(&mut buffer).await?;
                    if n == 0 || request.len() + n > ADMIN_MAX_REQUEST {
                        return Err(std::io::Error::other("incomplete request"));
                    }
                    request.extend_from_slice(&buffer[..n]);
                }
                Ok(())
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read).await,
                Ok(Ok(()))
            ) {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let target = line.split(' ').nth(1).unwrap_or("");
            let (status, body) = match target {
                "/metrics" => {
                    let mut text = shared.stats.render();
                    shared
                        .client
                        .render_metrics(&mut prom_text::Writer::new(&mut text));
                    ("200 OK", text)
                }
                "/ready" => ("200 OK", "ready\n".to_owned()),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
