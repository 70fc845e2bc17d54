package agent

import "github.com/prometheus/client_golang/prometheus"

// NewCollector returns a Prometheus collector of the agent's counters,
// read at scrape time: muster_agent_refused_requests_total{reason} and
// muster_agent_mode (0 provisioning, 1 production).
func NewCollector(a *Agent) prometheus.Collector {
	return &collector{
		a: a,
		refused: prometheus.NewDesc("muster_agent_refused_requests_total",
			"Requests the agent refused, by reason (unsigned, bad_signature, untrusted_key, stale, replayed).", []string{"reason"}, nil),
		mode: prometheus.NewDesc("muster_agent_mode", "The agent's mode: 0 provisioning, 1 production.", nil, nil),
	}
}

type collector struct {
	a             *Agent
	refused, mode *prometheus.Desc
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.refused
	ch <- c.mode
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	r := c.a.Refusals()
	for reason, v := range map[string]uint64{
		"unsigned": r.Unsigned, "bad_signature": r.BadSignature, "untrusted_key": r.UntrustedKey,
		"stale": r.Stale, "replayed": r.Replayed,
	} {
		ch <- prometheus.MustNewConstMetric(c.refused, prometheus.CounterValue, float64(v), reason)
	}
	ch <- prometheus.MustNewConstMetric(c.mode, prometheus.GaugeValue, float64(c.a.Mode()))
}
