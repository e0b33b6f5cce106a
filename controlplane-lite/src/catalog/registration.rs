//! From a client's service definition to the instances the catalog stores: defaults, the
//! sidecar expansion of `connect.sidecar_service`, and validation that names every bad field.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde_json::Value;

use super::{
    from_value, validate_id, validate_name, ConnectInfo, ServiceAddress, ServiceDefinition,
    ServiceInstance, Upstream, DEFAULT_BIND_ADDRESS, KIND_CONNECT_PROXY, KIND_MESH_GATEWAY,
    KIND_TYPICAL, SIDECAR_PORTS,
};
use crate::error::{Error, Result};

/// Reads service definitions from a request body or a file: the bare API form, the file form
/// `{"service": {...}}`, or `{"services": [...]}`.
pub fn parse_definitions(body: Value) -> Result<Vec<ServiceDefinition>> {
    let body = crate::casing::normalize(body);
    let Value::Object(mut object) = body else {
        return Err(Error::bad_request(
            "service definition must be a JSON object",
        ));
    };
    if object.len() == 1 {
        if let Some(service) = object.remove("Service") {
            return Ok(vec![from_value(service, "service definition")?]);
        }
        if let Some(Value::Array(services)) = object.remove("Services") {
            return services
                .into_iter()
                .map(|s| from_value(s, "service definition"))
                .collect();
        }
    }
    Ok(vec![from_value(
        Value::Object(object),
        "service definition",
    )?])
}

/// What one registration stores.
#[derive(Debug)]
pub struct RegistrationPlan {
    /// The service itself.
    pub service: ServiceInstance,
    /// Its sidecar, when `connect.sidecar_service` was given.
    pub sidecar: Option<ServiceInstance>,
}

/// Turns a definition into the instances to store.
///
/// `port_taken` says whether a port is taken by a sidecar already registered (excluding this
/// service's own sidecar); `previous_sidecar_port` keeps a re-registered sidecar on its port.
pub fn plan_registration(
    definition: ServiceDefinition,
    port_taken: impl Fn(u16) -> bool,
    previous_sidecar_port: Option<u16>,
) -> Result<RegistrationPlan> {
    let sidecar_definition = definition
        .connect
        .as_ref()
        .and_then(|c| c.sidecar_service.clone());
    let service = instance(definition, None)?;
    let sidecar = match sidecar_definition {
        None => None,
        Some(sidecar) => {
            if service.kind != KIND_TYPICAL {
                return Err(Error::bad_request(format!(
                    "field `Connect.SidecarService`: not allowed on a service of kind {:?}",
                    service.kind
                )));
            }
            if sidecar
                .connect
                .as_ref()
                .is_some_and(|c| c.sidecar_service.is_some())
            {
                return Err(Error::bad_request("field `Connect.SidecarService.Connect.SidecarService`: sidecars cannot have sidecars"));
            }
            if !matches!(sidecar.kind.as_str(), "" | KIND_CONNECT_PROXY) {
                return Err(Error::bad_request(
                    "field `Connect.SidecarService.Kind`: must be connect-proxy",
                ));
            }
            let port = match sidecar.port {
                Some(port) => port,
                None => match previous_sidecar_port {
                    Some(port) => port,
                    None => SIDECAR_PORTS
                        .clone()
                        .find(|p| !port_taken(*p))
                        .ok_or_else(|| {
                            Error::Conflict("no sidecar ports available in 21000-21255".to_owned())
                        })?,
                },
            };
            Some(instance(*sidecar, Some((&service, port)))?)
        }
    };
    Ok(RegistrationPlan { service, sidecar })
}

/// Builds one instance; `parent` is set for a sidecar (with its chosen port).
fn instance(
    definition: ServiceDefinition,
    parent: Option<(&ServiceInstance, u16)>,
) -> Result<ServiceInstance> {
    let prefix = if parent.is_some() {
        "Connect.SidecarService."
    } else {
        ""
    };
    if let Some(namespace) = &definition.namespace {
        if !namespace.is_empty() && namespace != "default" {
            return Err(Error::bad_request(format!(
                "field `{prefix}Namespace`: only \"default\" exists"
            )));
        }
    }
    let name = match (&definition.name, parent) {
        (Some(name), _) => name.clone(),
        (None, Some((parent, _))) => format!("{}-sidecar-proxy", parent.service),
        (None, None) => return Err(Error::bad_request("missing field `Name`")),
    };
    validate_name(&name, &format!("{prefix}Name"))?;
    let id = match (&definition.id, parent) {
        (Some(id), _) => id.clone(),
        (None, Some((parent, _))) => format!("{}-sidecar-proxy", parent.id),
        (None, None) => name.clone(),
    };
    validate_id(&id, &format!("{prefix}ID"))?;
    let kind = match parent {
        Some(_) => KIND_CONNECT_PROXY.to_owned(),
        None => definition.kind.clone(),
    };
    if !matches!(
        kind.as_str(),
        KIND_TYPICAL | KIND_CONNECT_PROXY | KIND_MESH_GATEWAY
    ) {
        return Err(Error::bad_request(format!(
            "field `{prefix}Kind` {kind:?}: supported kinds are \"\", \"connect-proxy\" and \"mesh-gateway\""
        )));
    }
    let address = definition
        .address
        .clone()
        .unwrap_or_else(|| parent.map(|(p, _)| p.address.clone()).unwrap_or_default());
    if address.chars().any(char::is_whitespace) {
        return Err(Error::bad_request(format!(
            "invalid field `{prefix}Address` {address:?}"
        )));
    }
    let port = match parent {
        Some((_, port)) => port,
        None => definition.port.unwrap_or(0),
    };
    let mut proxy = definition.proxy.clone();
    if let Some((parent, _)) = parent {
        let mut p = proxy.unwrap_or_default();
        if p.destination_service_name.is_empty() {
            p.destination_service_name = parent.service.clone();
        }
        if p.destination_service_id.is_empty() {
            p.destination_service_id = parent.id.clone();
        }
        if p.local_service_address.is_empty() {
            p.local_service_address = DEFAULT_BIND_ADDRESS.to_owned();
        }
        if p.local_service_port == 0 {
            p.local_service_port = parent.port;
        }
        proxy = Some(p);
    }
    match kind.as_str() {
        KIND_CONNECT_PROXY => {
            let p = proxy.as_mut().ok_or_else(|| {
                Error::bad_request(format!(
                    "missing field `{prefix}Proxy` for kind connect-proxy"
                ))
            })?;
            validate_name(
                &p.destination_service_name,
                &format!("{prefix}Proxy.DestinationServiceName"),
            )?;
            if port == 0 {
                return Err(Error::bad_request(format!(
                    "missing field `{prefix}Port` for kind connect-proxy"
                )));
            }
            validate_upstreams(&mut p.upstreams, prefix)?;
        }
        KIND_MESH_GATEWAY => {
            if port == 0 {
                return Err(Error::bad_request(
                    "missing field `Port` for kind mesh-gateway",
                ));
            }
            if proxy.as_ref().is_some_and(|p| !p.upstreams.is_empty()) {
                return Err(Error::bad_request(
                    "field `Proxy.Upstreams`: not allowed for kind mesh-gateway",
                ));
            }
        }
        _ => {
            if proxy.is_some() {
                return Err(Error::bad_request(
                    "field `Proxy`: only allowed for kinds connect-proxy and mesh-gateway",
                ));
            }
        }
    }
    let mut tagged_addresses = definition.tagged_addresses.clone();
    for (tag, tagged) in &tagged_addresses {
        if !matches!(
            tag.as_str(),
            "lan" | "wan" | "lan_ipv4" | "wan_ipv4" | "lan_ipv6" | "wan_ipv6"
        ) {
            return Err(Error::bad_request(format!(
                "field `{prefix}TaggedAddresses.{tag}`: unknown tag (use lan or wan)"
            )));
        }
        if tagged.address.is_empty() || tagged.address.chars().any(char::is_whitespace) {
            return Err(Error::bad_request(format!(
                "invalid field `{prefix}TaggedAddresses.{tag}.Address`"
            )));
        }
    }
    if kind == KIND_MESH_GATEWAY && !tagged_addresses.contains_key("lan") && !address.is_empty() {
        tagged_addresses.insert(
            "lan".to_owned(),
            ServiceAddress {
                address: address.clone(),
                port,
            },
        );
    }
    let weights = definition.weights.unwrap_or_default();
    if weights.passing == 0 {
        return Err(Error::bad_request(format!(
            "invalid field `{prefix}Weights.Passing`: must be at least 1"
        )));
    }
    Ok(ServiceInstance {
        kind,
        id,
        service: name,
        tags: definition
            .tags
            .clone()
            .or_else(|| parent.map(|(p, _)| p.tags.clone()))
            .unwrap_or_default(),
        address,
        tagged_addresses,
        meta: definition
            .meta
            .clone()
            .or_else(|| parent.map(|(p, _)| p.meta.clone()))
            .unwrap_or_default(),
        port,
        weights,
        enable_tag_override: definition.enable_tag_override,
        proxy,
        connect: ConnectInfo {
            native: definition.connect.as_ref().is_some_and(|c| c.native),
        },
        create_index: 0,
        modify_index: 0,
    })
}

fn validate_upstreams(upstreams: &mut [Upstream], prefix: &str) -> Result<()> {
    let mut binds = BTreeSet::new();
    for (i, upstream) in upstreams.iter_mut().enumerate() {
        let field = format!("{prefix}Proxy.Upstreams[{i}]");
        if !matches!(upstream.destination_type.as_str(), "" | "service") {
            return Err(Error::bad_request(format!(
                "field `{field}.DestinationType` {:?}: only \"service\" is supported",
                upstream.destination_type
            )));
        }
        if upstream.destination_type.is_empty() {
            upstream.destination_type = "service".to_owned();
        }
        if !matches!(upstream.destination_namespace.as_str(), "" | "default") {
            return Err(Error::bad_request(format!(
                "field `{field}.DestinationNamespace`: only \"default\" exists"
            )));
        }
        validate_name(
            &upstream.destination_name,
            &format!("{field}.DestinationName"),
        )?;
        if !upstream.datacenter.is_empty() {
            validate_name(&upstream.datacenter, &format!("{field}.Datacenter"))?;
        }
        if upstream.local_bind_address.is_empty() {
            upstream.local_bind_address = DEFAULT_BIND_ADDRESS.to_owned();
        }
        if upstream.local_bind_address.parse::<IpAddr>().is_err() {
            return Err(Error::bad_request(format!(
                "invalid field `{field}.LocalBindAddress` {:?}: must be an IP address",
                upstream.local_bind_address
            )));
        }
        if upstream.local_bind_port == 0 {
            return Err(Error::bad_request(format!(
                "missing field `{field}.LocalBindPort`"
            )));
        }
        if !binds.insert((
            upstream.local_bind_address.clone(),
            upstream.local_bind_port,
        )) {
            return Err(Error::bad_request(format!(
                "field `{field}.LocalBindPort`: two upstreams bind the same address"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn plan(body: Value) -> Result<RegistrationPlan> {
        let mut definitions = parse_definitions(body)?;
        plan_registration(definitions.remove(0), |p| p == 21000, None)
    }

    /// The store's secondary indexes read fields of the stored JSON: they must match what
    /// `ServiceInstance` and `HealthCheck` serialise to.
    #[test]
    fn store_indexes_find_the_fields_they_index() {
        use crate::checks::{sidecar_alias, CheckDefinition, CheckTarget};
        use crate::store::Index;
        let plan = plan(
            json!({"service": {"name": "web", "id": "web-1", "port": 8080,
            "connect": {"sidecar_service": {"port": 21500}}}}),
        )
        .expect("plan");
        let service = serde_json::to_value(&plan.service).expect("json");
        let sidecar_instance = plan.sidecar.expect("sidecar");
        let sidecar = serde_json::to_value(&sidecar_instance).expect("json");
        let key = |index: Index, value: &Value| index.key_of(value);
        assert_eq!(key(Index::ServiceName, &service).as_deref(), Some("web"));
        assert_eq!(key(Index::ConnectEndpoint, &service), None, "not native");
        assert_eq!(key(Index::SidecarOf, &service), None);
        assert_eq!(
            key(Index::ServiceName, &sidecar).as_deref(),
            Some("web-sidecar-proxy")
        );
        assert_eq!(
            key(Index::ConnectEndpoint, &sidecar).as_deref(),
            Some("web")
        );
        assert_eq!(key(Index::SidecarOf, &sidecar).as_deref(), Some("web-1"));
        assert_eq!(key(Index::ProxyPort, &sidecar).as_deref(), Some("21500"));
        assert_eq!(
            key(Index::ServiceKind, &sidecar).as_deref(),
            Some("connect-proxy")
        );
        assert_eq!(key(Index::ServiceKind, &service).as_deref(), Some(""));
        let native = plan_native();
        assert_eq!(key(Index::ConnectEndpoint, &native).as_deref(), Some("db"));
        let target = || CheckTarget {
            id: &sidecar_instance.id,
            name: &sidecar_instance.service,
            tags: &sidecar_instance.tags,
        };
        let alias = serde_json::to_value(sidecar_alias("n", target(), "web-1")).expect("json");
        assert_eq!(
            key(Index::CheckService, &alias).as_deref(),
            Some("web-1-sidecar-proxy")
        );
        assert_eq!(
            key(Index::TimedCheck, &alias),
            None,
            "alias checks have no timers"
        );
        for definition in [
            json!({"TTL": "10s"}),
            json!({"TCP": "127.0.0.1:1", "Interval": "10s"}),
        ] {
            let check = CheckDefinition::parse(definition)
                .and_then(|d| d.build("n", "c", Some(target()), 0))
                .expect("check");
            let check = serde_json::to_value(check).expect("json");
            assert_eq!(
                key(Index::TimedCheck, &check).as_deref(),
                Some(""),
                "{check}"
            );
        }
    }

    fn plan_native() -> Value {
        let plan =
            plan(json!({"service": {"name": "db", "port": 5432, "connect": {"native": true}}}))
                .expect("plan");
        serde_json::to_value(&plan.service).expect("json")
    }

    #[test]
    fn guide_web_expands_to_a_sidecar() {
        let plan = plan(json!({"service": {"name": "web", "port": 8080, "token": "<token here>",
            "connect": {"sidecar_service": {"proxy": {"upstreams": [
                {"destination_name": "socat", "datacenter": "primary", "local_bind_port": 8181}]}}}}}))
        .expect("plan");
        let sidecar = plan.sidecar.expect("sidecar");
        assert_eq!(sidecar.id, "web-sidecar-proxy");
        assert_eq!(sidecar.kind, KIND_CONNECT_PROXY);
        assert_eq!(sidecar.port, 21001, "21000 is taken");
        let proxy = sidecar.proxy.expect("proxy");
        assert_eq!(proxy.destination_service_name, "web");
        assert_eq!(proxy.local_service_port, 8080);
        assert_eq!(proxy.upstreams[0].local_bind_address, "127.0.0.1");
        assert_eq!(proxy.upstreams[0].datacenter, "primary");
    }

    #[test]
    fn pascal_case_api_form_and_gateway() {
        let plan = plan(json!({"Kind": "mesh-gateway", "Name": "mesh-gateway", "Address": "10.0.0.1", "Port": 8443,
            "TaggedAddresses": {"wan": {"address": "192.0.2.1", "port": 443}}}))
        .expect("plan");
        assert!(plan.sidecar.is_none());
        assert_eq!(plan.service.wan_address("127.0.0.1"), "192.0.2.1:443");
        assert_eq!(plan.service.lan_address("127.0.0.1"), "10.0.0.1:8443");
        assert_eq!(plan.service.tagged_addresses["lan"].port, 8443);
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (json!({"Name": "web", "Prot": 1}), "Prot"),
            (json!({"Name": "web", "Port": 70000}), "Port"),
            (json!({"Name": "we b"}), "Name"),
            (json!({"Port": 1}), "Name"),
            (json!({"Name": "w", "Kind": "ingress-gateway"}), "Kind"),
            (
                json!({"Name": "w", "Kind": "connect-proxy", "Port": 1}),
                "Proxy",
            ),
            (
                json!({"service": {"name": "w", "connect": {"sidecar_service": {"proxy": {"upstreams": [{"destination_name": "x"}]}}}}}),
                "LocalBindPort",
            ),
            (
                json!({"service": {"name": "w", "connect": {"sidecar_service": {"proxy": {"upstreams": [{"destination_name": "x", "local_bind_port": 1, "local_bind_address": "nope"}]}}}}}),
                "LocalBindAddress",
            ),
            (json!({"Name": "w", "Kind": "mesh-gateway"}), "Port"),
        ];
        for (body, field) in cases {
            let err = plan(body.clone()).expect_err(&body.to_string());
            assert!(err.to_string().contains(field), "{body}: {err}");
            assert_eq!(err.status(), 400);
        }
    }
}
