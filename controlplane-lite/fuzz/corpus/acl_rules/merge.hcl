service "web" {
  policy = "write"
}
service "web" { policy = "deny" }
