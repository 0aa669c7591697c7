"""What the daemon shows outside: Prometheus metrics (exporter, metrics_server),
Grafana annotations and dashboards (annotations, grafana, dashboards)."""
