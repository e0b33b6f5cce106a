//! The bodies of controlplane-lite's `/v1/internal/*` answers that `gateway mesh` and the
//! sidecar read, and their paths. controlplane-lite serialises these types and the clients
//! deserialise the same types, so a renamed or added field changes both sides at once.
//!
//! Deserialising ignores unknown fields (a newer control plane may add some), and the fields
//! no client reads default when absent, so a client accepts every answer it accepted when it
//! kept its own copy of these structs.

use serde::{Deserialize, Serialize};

/// `GET` (blocking): the route table of a mesh gateway, a [`RouteSnapshot`].
pub const MESH_GATEWAY_ROUTES_PATH: &str = "/v1/internal/mesh-gateway/routes";

/// The route pattern of the sidecar configuration endpoint, as the control plane's router
/// declares it; see [`sidecar_config_path`] for the path a client asks.
pub const SIDECAR_CONFIG_ROUTE: &str = "/v1/internal/sidecar/{proxy_id}";

/// `GET` (blocking): the [`SidecarConfig`] of the sidecar proxy instance `proxy_id`.
pub fn sidecar_config_path(proxy_id: &str) -> String {
    format!("/v1/internal/sidecar/{proxy_id}")
}

/// One SNI route.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Route {
    /// Exact name or `*.suffix`.
    pub sni: String,
    /// `host:port` endpoints.
    pub endpoints: Vec<String>,
}

/// A gateway's whole route table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteSnapshot {
    /// Changes whenever any input changes (the store index of the inputs).
    pub generation: u64,
    /// Routes, exact names first, each list sorted.
    pub routes: Vec<Route>,
}

/// The configuration of one sidecar proxy.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SidecarConfig {
    /// See [`RouteSnapshot::generation`].
    pub generation: u64,
    /// The proxy's instance ID. Informational: the sidecar knows which one it asked for.
    #[serde(default)]
    pub proxy_id: String,
    /// The service it fronts.
    pub service: String,
    /// This datacenter. Informational: the SPIFFE ID carries it.
    #[serde(default)]
    pub datacenter: String,
    /// The trust domain. Informational: the SPIFFE ID carries it.
    #[serde(default)]
    pub trust_domain: String,
    /// The identity its leaf certificate must carry.
    pub spiffe_id: String,
    /// Where the public (mTLS) listener binds.
    pub public_listener: String,
    /// Where the application listens (plaintext).
    pub local_app: String,
    /// Upstream listeners.
    pub upstreams: Vec<UpstreamConfig>,
}

/// One upstream of a sidecar.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The destination service.
    pub destination_name: String,
    /// The destination's datacenter. Informational: the SPIFFE ID and SNI carry it.
    #[serde(default)]
    pub datacenter: String,
    /// The local listener.
    pub local_bind: String,
    /// SNI to send.
    pub sni: String,
    /// SPIFFE ID the server certificate must carry.
    pub spiffe_id: String,
    /// `none`, `local` or `remote` (after precedence).
    pub mesh_gateway_mode: String,
    /// Where to connect; empty if nothing is known yet.
    pub endpoints: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar() -> SidecarConfig {
        SidecarConfig {
            generation: 7,
            proxy_id: "web-sidecar-proxy".into(),
            service: "web".into(),
            datacenter: "primary".into(),
            trust_domain: "td.consul".into(),
            spiffe_id: "spiffe://td.consul/ns/default/dc/primary/svc/web".into(),
            public_listener: "127.0.0.1:21000".into(),
            local_app: "127.0.0.1:8080".into(),
            upstreams: vec![UpstreamConfig {
                destination_name: "socat".into(),
                datacenter: "secondary".into(),
                local_bind: "127.0.0.1:9191".into(),
                sni: "socat.default.secondary.internal.td.consul".into(),
                spiffe_id: "spiffe://td.consul/ns/default/dc/secondary/svc/socat".into(),
                mesh_gateway_mode: "local".into(),
                endpoints: vec!["127.0.0.1:8443".into()],
            }],
        }
    }

    /// What the control plane writes is what a client reads, field for field, and the JSON
    /// keys are the snake_case names both sides have always used.
    #[test]
    fn bodies_round_trip_through_json() {
        let routes = RouteSnapshot {
            generation: 3,
            routes: vec![Route {
                sni: "*.secondary.internal.td.consul".into(),
                endpoints: vec!["192.0.2.2:8443".into()],
            }],
        };
        let text = serde_json::to_string(&routes).expect("serialise");
        assert_eq!(
            text,
            r#"{"generation":3,"routes":[{"sni":"*.secondary.internal.td.consul","endpoints":["192.0.2.2:8443"]}]}"#
        );
        assert_eq!(
            serde_json::from_str::<RouteSnapshot>(&text).ok(),
            Some(routes)
        );

        let config = sidecar();
        let value = serde_json::to_value(&config).expect("serialise");
        for key in ["proxy_id", "public_listener", "local_app", "upstreams"] {
            assert!(value.get(key).is_some(), "{key} in {value}");
        }
        assert_eq!(
            serde_json::from_value::<SidecarConfig>(value).ok(),
            Some(config)
        );
    }

    /// A client reads an answer with fields it does not know, and without the informational
    /// fields, as it did with its own copy of these structs.
    #[test]
    fn clients_ignore_unknown_and_default_informational_fields() {
        let text = r#"{"generation":1,"service":"web","spiffe_id":"s","public_listener":"p",
            "local_app":"a","future":true,"upstreams":[{"destination_name":"d","local_bind":"l",
            "sni":"n","spiffe_id":"s","mesh_gateway_mode":"none","endpoints":[],"more":1}]}"#;
        let config: SidecarConfig = serde_json::from_str(text).expect("parse");
        assert_eq!(config.proxy_id, "");
        assert_eq!(config.upstreams[0].datacenter, "");
        let missing = r#"{"generation":1,"service":"web"}"#;
        assert!(serde_json::from_str::<SidecarConfig>(missing).is_err());
    }

    #[test]
    fn the_sidecar_path_fills_the_route_pattern() {
        let path = sidecar_config_path("web-sidecar-proxy");
        let prefix = SIDECAR_CONFIG_ROUTE.trim_end_matches("{proxy_id}");
        assert_eq!(path.strip_prefix(prefix), Some("web-sidecar-proxy"));
    }
}
