//! Federation states (Consul 1.8's model, simplified; spec §6.2): each datacenter publishes the
//! WAN addresses of its own mesh gateways, computed from its local catalog. The primary stores
//! its own state directly; a secondary pushes its state to the primary with the replication
//! token and gets the full table (every datacenter's gateways) back through replication.

use crate::catalog::{ServiceInstance, KIND_MESH_GATEWAY};
use crate::routes::{FederationState, GatewayAddresses};

/// This datacenter's mesh gateways as a federation state would list them, sorted.
pub fn local_gateways(services: &[ServiceInstance], node_address: &str) -> Vec<GatewayAddresses> {
    let mut gateways: Vec<GatewayAddresses> = services
        .iter()
        .filter(|s| s.kind == KIND_MESH_GATEWAY)
        .map(|s| GatewayAddresses {
            service: s.service.clone(),
            wan_address: s.wan_address(node_address),
            lan_address: s.lan_address(node_address),
        })
        .collect();
    gateways.sort_by(|a, b| {
        (&a.wan_address, &a.lan_address, &a.service).cmp(&(
            &b.wan_address,
            &b.lan_address,
            &b.service,
        ))
    });
    gateways.dedup();
    gateways
}

/// Whether the stored state must be replaced by what the catalog says. Registered gateways
/// always win; with none registered, only a state this datacenter published itself is
/// withdrawn (an operator's `PUT /v1/internal/federation-state/:dc` override stands).
/// A changed agent address (a restart on another port) is published too.
pub fn needs_publish(
    desired: &[GatewayAddresses],
    agent_address: &str,
    stored: Option<&FederationState>,
) -> bool {
    match stored {
        None => !desired.is_empty(),
        Some(state) if desired.is_empty() => state.from_catalog,
        Some(state) => {
            !state.from_catalog
                || state.mesh_gateways != desired
                || state.agent_address != agent_address
        }
    }
}

/// The state to store or push for `datacenter`, whose agent listens on `agent_address`.
pub fn state_for(
    datacenter: &str,
    gateways: Vec<GatewayAddresses>,
    agent_address: &str,
) -> FederationState {
    FederationState {
        datacenter: datacenter.to_owned(),
        mesh_gateways: gateways,
        modify_index: 0,
        from_catalog: true,
        agent_address: agent_address.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::catalog::{ConnectInfo, ServiceAddress, Weights};

    fn instance(kind: &str, service: &str, address: &str, port: u16) -> ServiceInstance {
        ServiceInstance {
            kind: kind.to_owned(),
            id: service.to_owned(),
            service: service.to_owned(),
            tags: Vec::new(),
            address: address.to_owned(),
            tagged_addresses: BTreeMap::new(),
            meta: BTreeMap::new(),
            port,
            weights: Weights::default(),
            enable_tag_override: false,
            proxy: None,
            connect: ConnectInfo::default(),
            create_index: 1,
            modify_index: 1,
        }
    }

    #[test]
    fn publishes_wan_addresses_of_mesh_gateways_only() {
        let mut gateway = instance(KIND_MESH_GATEWAY, "mesh-gateway", "10.0.0.2", 8443);
        gateway.tagged_addresses.insert(
            "wan".into(),
            ServiceAddress {
                address: "192.0.2.2".into(),
                port: 8444,
            },
        );
        // Without a `wan` tagged address the LAN address is what other datacenters dial.
        let untagged = instance(KIND_MESH_GATEWAY, "gateway-2", "", 8443);
        let web = instance("", "web", "10.0.0.3", 80);
        let gateways = local_gateways(&[web, gateway, untagged], "127.0.0.1");
        let wan: Vec<&str> = gateways.iter().map(|g| g.wan_address.as_str()).collect();
        assert_eq!(wan, ["127.0.0.1:8443", "192.0.2.2:8444"]);
        assert_eq!(gateways[1].lan_address, "10.0.0.2:8443");

        let agent = "10.0.0.2:8500";
        assert!(needs_publish(&gateways, agent, None));
        assert!(!needs_publish(&[], agent, None));
        let stored = state_for("secondary", gateways.clone(), agent);
        assert!(!needs_publish(&gateways, agent, Some(&stored)));
        assert!(needs_publish(&[], agent, Some(&stored)));
        assert!(needs_publish(&gateways[..1], agent, Some(&stored)));
        // The agent moved: other datacenters must learn its new address.
        assert!(needs_publish(&gateways, "10.0.0.2:8501", Some(&stored)));
        // An operator's override stands while the datacenter has no gateways of its own, and
        // is replaced as soon as it has.
        let overridden = FederationState {
            from_catalog: false,
            ..stored
        };
        assert!(!needs_publish(&[], agent, Some(&overridden)));
        assert!(needs_publish(&gateways, agent, Some(&overridden)));
    }
}
