# gateway
service "mesh-gateway" { policy = "write" }
service_prefix "" { policy = "read" intentions = "write" }
// nodes
node_prefix "" { policy = "read" }
/* top */ acl = "read", operator = "write"
node "n\"1" { policy = "deny" }
