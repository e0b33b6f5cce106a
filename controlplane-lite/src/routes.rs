//! What gateways and sidecars consume, computed from catalog snapshots (sans-IO).
//!
//! - [`mesh_gateway_routes`]: the SNI route table of a mesh gateway in this datacenter (the
//!   same `{sni, endpoints}` shape as `gateway run --config`'s `[[route]]`).
//! - [`sidecar_config`]: listeners, upstream SNIs and endpoints of one sidecar proxy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::catalog::{join_host_port, ServiceInstance, KIND_CONNECT_PROXY, KIND_MESH_GATEWAY};
use crate::config_entries::{resolve_mesh_gateway_mode, ConfigEntry, MeshGatewayMode, ModeInputs};
use crate::error::{Error, Result};
use crate::spiffe::SpiffeId;
// The answer bodies are the Consul contract shared with `gateway mesh` and the sidecar.
pub use mesh_model::wire::{Route, RouteSnapshot, SidecarConfig, UpstreamConfig};

/// The mesh gateways of one datacenter (Consul's federation state, reduced to addresses).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct FederationState {
    /// The datacenter.
    #[serde(default)]
    pub datacenter: String,
    /// Its gateways.
    pub mesh_gateways: Vec<GatewayAddresses>,
    /// Raft index of the last change.
    #[serde(default)]
    pub modify_index: u64,
    /// Written by the datacenter itself from its catalog (federation-state anti-entropy), as
    /// opposed to an operator's override. A datacenter without registered gateways withdraws
    /// only states it published itself, so an override for it stands.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_catalog: bool,
    /// `host:port` of the datacenter's agent HTTP API, so that other datacenters can forward
    /// cross-datacenter reads to it (see `remote_dc`). Empty in an operator's override.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_address: String,
}

/// The addresses of one mesh gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct GatewayAddresses {
    /// The gateway's service name (informational).
    #[serde(default)]
    pub service: String,
    /// `host:port` other datacenters dial.
    pub wan_address: String,
    /// `host:port` inside its own datacenter (optional).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub lan_address: String,
}

impl FederationState {
    /// Validates a client-supplied state.
    pub fn validate(&self) -> Result<()> {
        if self.mesh_gateways.is_empty() {
            return Err(Error::bad_request(
                "field `MeshGateways`: at least one gateway is required",
            ));
        }
        if !self.agent_address.is_empty() {
            check_host_port(&self.agent_address, "AgentAddress")?;
        }
        for (i, gateway) in self.mesh_gateways.iter().enumerate() {
            check_host_port(
                &gateway.wan_address,
                &format!("MeshGateways[{i}].WanAddress"),
            )?;
            if !gateway.lan_address.is_empty() {
                check_host_port(
                    &gateway.lan_address,
                    &format!("MeshGateways[{i}].LanAddress"),
                )?;
            }
        }
        Ok(())
    }
}

fn check_host_port(value: &str, field: &str) -> Result<()> {
    let valid = match value.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(char::is_whitespace)
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    };
    if valid {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "invalid field `{field}` {value:?}: must be host:port"
        )))
    }
}

/// Everything a route or sidecar computation reads.
pub struct MeshView<'a> {
    /// This datacenter.
    pub datacenter: &'a str,
    /// `<cluster-id>.consul`.
    pub trust_domain: &'a str,
    /// The agent's node address (for instances without their own).
    pub node_address: &'a str,
    /// The local catalog.
    pub services: &'a [ServiceInstance],
    /// Known gateways of every datacenter.
    pub federation: &'a [FederationState],
    /// Config entries.
    pub config_entries: &'a [ConfigEntry],
    /// The generation to report.
    pub generation: u64,
}

/// `<service>.default.<dc>.internal.<trust-domain>` (spec §1.2).
pub fn service_sni(service: &str, datacenter: &str, trust_domain: &str) -> String {
    format!("{service}.default.{datacenter}.internal.{trust_domain}")
}

/// The route table of a mesh gateway in `view.datacenter`: every local service with a
/// Connect-capable instance by its exact SNI to those instances (LAN), and `*.<dc>.internal.<td>`
/// of every other datacenter with known gateways to their WAN addresses.
pub fn mesh_gateway_routes(view: &MeshView<'_>) -> RouteSnapshot {
    let mut local: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for instance in view.services {
        let target = match instance.kind.as_str() {
            KIND_CONNECT_PROXY => instance
                .proxy
                .as_ref()
                .map(|p| p.destination_service_name.as_str()),
            "" if instance.connect.native => Some(instance.service.as_str()),
            _ => None,
        };
        if let Some(service) = target {
            local
                .entry(service_sni(service, view.datacenter, view.trust_domain))
                .or_default()
                .push(instance.lan_address(view.node_address));
        }
    }
    let mut routes: Vec<Route> = local
        .into_iter()
        .map(|(sni, mut endpoints)| {
            endpoints.sort();
            endpoints.dedup();
            Route { sni, endpoints }
        })
        .collect();
    for state in view.federation {
        if state.datacenter == view.datacenter {
            continue;
        }
        let mut endpoints: Vec<String> = state
            .mesh_gateways
            .iter()
            .map(|g| g.wan_address.clone())
            .collect();
        endpoints.sort();
        endpoints.dedup();
        if !endpoints.is_empty() {
            routes.push(Route {
                sni: format!("*.{}.internal.{}", state.datacenter, view.trust_domain),
                endpoints,
            });
        }
    }
    RouteSnapshot {
        generation: view.generation,
        routes,
    }
}

/// Builds the sidecar configuration of `proxy_id`.
pub fn sidecar_config(view: &MeshView<'_>, proxy_id: &str) -> Result<SidecarConfig> {
    let proxy_instance = view
        .services
        .iter()
        .find(|s| s.id == proxy_id)
        .ok_or_else(|| Error::NotFound(format!("unknown proxy {proxy_id:?}")))?;
    let proxy = match (&proxy_instance.kind[..], &proxy_instance.proxy) {
        (KIND_CONNECT_PROXY, Some(proxy)) => proxy,
        _ => {
            return Err(Error::bad_request(format!(
                "service {proxy_id:?} is not a connect-proxy"
            )))
        }
    };
    let service_defaults_mode = |name: &str| {
        view.config_entries
            .iter()
            .find_map(|e| match e {
                ConfigEntry::ServiceDefaults(d) if d.name == name => Some(d.mesh_gateway.mode),
                _ => None,
            })
            .unwrap_or_default()
    };
    let proxy_defaults_mode = view
        .config_entries
        .iter()
        .find_map(|e| match e {
            ConfigEntry::ProxyDefaults(d) => Some(d.mesh_gateway.mode),
            _ => None,
        })
        .unwrap_or_default();
    let mut upstreams = Vec::new();
    for upstream in &proxy.upstreams {
        let target_dc = if upstream.datacenter.is_empty() {
            view.datacenter
        } else {
            &upstream.datacenter
        };
        let mode = resolve_mesh_gateway_mode(
            view.datacenter,
            target_dc,
            ModeInputs {
                upstream: upstream.mesh_gateway.mode,
                proxy: proxy.mesh_gateway.mode,
                source_service_defaults: service_defaults_mode(&proxy.destination_service_name),
                proxy_defaults: proxy_defaults_mode,
                destination_service_defaults: service_defaults_mode(&upstream.destination_name),
            },
        );
        let mut endpoints: Vec<String> = if target_dc == view.datacenter {
            view.services
                .iter()
                .filter(|s| s.is_connect_endpoint_for(&upstream.destination_name))
                .map(|s| s.lan_address(view.node_address))
                .collect()
        } else {
            match mode {
                MeshGatewayMode::Local => view
                    .services
                    .iter()
                    .filter(|s| s.kind == KIND_MESH_GATEWAY)
                    .map(|s| s.lan_address(view.node_address))
                    .collect(),
                MeshGatewayMode::Remote => view
                    .federation
                    .iter()
                    .filter(|f| f.datacenter == target_dc)
                    .flat_map(|f| f.mesh_gateways.iter().map(|g| g.wan_address.clone()))
                    .collect(),
                // Dialling a remote sidecar directly needs the remote catalog, which arrives
                // with cross-datacenter replication; until then nothing is known.
                MeshGatewayMode::None | MeshGatewayMode::Default => Vec::new(),
            }
        };
        endpoints.sort();
        endpoints.dedup();
        upstreams.push(UpstreamConfig {
            destination_name: upstream.destination_name.clone(),
            datacenter: target_dc.to_owned(),
            local_bind: join_host_port(&upstream.local_bind_address, upstream.local_bind_port),
            sni: service_sni(&upstream.destination_name, target_dc, view.trust_domain),
            spiffe_id: SpiffeId::service(view.trust_domain, target_dc, &upstream.destination_name)
                .to_string(),
            mesh_gateway_mode: match mode {
                MeshGatewayMode::Default => MeshGatewayMode::None.as_str().to_owned(),
                other => other.as_str().to_owned(),
            },
            endpoints,
        });
    }
    let public_host = if proxy_instance.address.is_empty() {
        view.node_address
    } else {
        &proxy_instance.address
    };
    Ok(SidecarConfig {
        generation: view.generation,
        proxy_id: proxy_instance.id.clone(),
        service: proxy.destination_service_name.clone(),
        datacenter: view.datacenter.to_owned(),
        trust_domain: view.trust_domain.to_owned(),
        spiffe_id: SpiffeId::service(
            view.trust_domain,
            view.datacenter,
            &proxy.destination_service_name,
        )
        .to_string(),
        public_listener: join_host_port(public_host, proxy_instance.port),
        local_app: join_host_port(&proxy.local_service_address, proxy.local_service_port),
        upstreams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{parse_definitions, plan_registration};
    use serde_json::json;
    use std::collections::BTreeSet;

    fn register(body: serde_json::Value, taken: &mut BTreeSet<u16>) -> Vec<ServiceInstance> {
        let definition = parse_definitions(body).expect("parse").remove(0);
        let plan = plan_registration(definition, |p| taken.contains(&p), None).expect("plan");
        let mut out = vec![plan.service];
        if let Some(sidecar) = plan.sidecar {
            taken.insert(sidecar.port);
            out.push(sidecar);
        }
        out
    }

    #[test]
    fn gateway_routes_local_services_and_remote_datacenters() {
        let mut taken = BTreeSet::new();
        let mut services = register(
            json!({"service": {"name": "socat", "port": 8181, "connect": {"sidecar_service": {}}}}),
            &mut taken,
        );
        services.extend(register(
            json!({"Kind": "mesh-gateway", "Name": "mesh-gateway", "Port": 8443}),
            &mut taken,
        ));
        services.extend(register(json!({"Name": "plain", "Port": 80}), &mut taken));
        let federation = vec![
            FederationState {
                datacenter: "secondary".into(),
                mesh_gateways: vec![GatewayAddresses {
                    service: "gw".into(),
                    wan_address: "192.0.2.2:8444".into(),
                    lan_address: String::new(),
                }],
                modify_index: 1,
                from_catalog: false,
                agent_address: String::new(),
            },
            FederationState {
                datacenter: "primary".into(),
                mesh_gateways: vec![GatewayAddresses {
                    service: "gw".into(),
                    wan_address: "192.0.2.1:8443".into(),
                    lan_address: String::new(),
                }],
                modify_index: 1,
                from_catalog: false,
                agent_address: String::new(),
            },
        ];
        let view = MeshView {
            datacenter: "primary",
            trust_domain: "td.consul",
            node_address: "127.0.0.1",
            services: &services,
            federation: &federation,
            config_entries: &[],
            generation: 7,
        };
        let snapshot = mesh_gateway_routes(&view);
        assert_eq!(
            snapshot,
            RouteSnapshot {
                generation: 7,
                routes: vec![
                    Route {
                        sni: "socat.default.primary.internal.td.consul".into(),
                        endpoints: vec!["127.0.0.1:21000".into()]
                    },
                    Route {
                        sni: "*.secondary.internal.td.consul".into(),
                        endpoints: vec!["192.0.2.2:8444".into()]
                    },
                ]
            }
        );
    }

    #[test]
    fn sidecar_upstream_uses_local_gateway_cross_dc_and_never_same_dc() {
        let mut taken = BTreeSet::new();
        let mut services = register(
            json!({"service": {"name": "web", "port": 8080, "connect": {"sidecar_service": {"proxy": {"upstreams": [
                {"destination_name": "socat", "datacenter": "primary", "local_bind_port": 8181},
                {"destination_name": "cache", "local_bind_port": 6379}]}}}}}),
            &mut taken,
        );
        services.extend(register(json!({"Kind": "mesh-gateway", "Name": "mesh-gateway", "Address": "10.0.0.9", "Port": 8444}), &mut taken));
        services.extend(register(
            json!({"service": {"name": "cache", "port": 6000, "connect": {"sidecar_service": {}}}}),
            &mut taken,
        ));
        let entries = vec![ConfigEntry::parse(
            json!({"Kind": "proxy-defaults", "Name": "global", "MeshGateway": "local"}),
        )
        .expect("entry")];
        let view = MeshView {
            datacenter: "secondary",
            trust_domain: "td.consul",
            node_address: "127.0.0.1",
            services: &services,
            federation: &[],
            config_entries: &entries,
            generation: 3,
        };
        let config = sidecar_config(&view, "web-sidecar-proxy").expect("config");
        assert_eq!(config.public_listener, "127.0.0.1:21000");
        assert_eq!(config.local_app, "127.0.0.1:8080");
        assert_eq!(
            config.spiffe_id,
            "spiffe://td.consul/ns/default/dc/secondary/svc/web"
        );
        let socat = &config.upstreams[0];
        assert_eq!(socat.sni, "socat.default.primary.internal.td.consul");
        assert_eq!(socat.mesh_gateway_mode, "local");
        assert_eq!(socat.endpoints, vec!["10.0.0.9:8444".to_owned()]);
        let cache = &config.upstreams[1];
        assert_eq!(
            cache.mesh_gateway_mode, "none",
            "same datacenter never uses a gateway"
        );
        assert_eq!(cache.endpoints, vec!["127.0.0.1:21001".to_owned()]);
        assert!(sidecar_config(&view, "web").is_err());
        assert!(sidecar_config(&view, "nope").is_err());
    }
}
