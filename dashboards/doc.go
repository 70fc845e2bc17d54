// Package dashboards holds Muster's Grafana dashboards (JSON) and the test
// that keeps their queries in step with the metrics the code registers.
package dashboards
