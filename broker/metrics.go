package broker

import (
	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus"
)

// collector reads the broker's statistics at scrape time.
type collector struct {
	b *Broker

	up, conns, connsTotal, subs         *prometheus.Desc
	inMsgs, outMsgs, inBytes, outBytes  *prometheus.Desc
	slow, accountConns, authentications *prometheus.Desc
	jetstreamEnabled, clusterPeers      *prometheus.Desc
	tokenRefusals, duplicates           *prometheus.Desc
}

// NewCollector returns a Prometheus collector of the broker's statistics,
// read from nats-server's Varz and the authenticator at scrape time. Every
// name starts with muster_broker_; see docs/broker.md for the list.
func NewCollector(b *Broker) prometheus.Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName("muster", "broker", name), help, labels, nil)
	}
	return &collector{
		b:                b,
		up:               d("up", "1 when the embedded nats-server is running."),
		conns:            d("connections", "Client connections open now."),
		connsTotal:       d("connections_total", "Client connections accepted since start."),
		subs:             d("subscriptions", "Subscriptions active now."),
		inMsgs:           d("received_messages_total", "Messages received by the server."),
		outMsgs:          d("sent_messages_total", "Messages sent by the server."),
		inBytes:          d("received_bytes_total", "Payload bytes received by the server."),
		outBytes:         d("sent_bytes_total", "Payload bytes sent by the server."),
		slow:             d("slow_consumers_total", "Clients disconnected as slow consumers."),
		accountConns:     d("account_connections", "Client connections open now per account.", "account"),
		authentications:  d("authentications_total", "Connection authentications by result.", "result"),
		jetstreamEnabled: d("jetstream_enabled", "1 when JetStream is enabled on the PROVISIONING account."),
		tokenRefusals:    d("token_refusals_total", "Unprovisioned connections refused for a missing, invalid, expired or out-of-scope provisioning token."),
		duplicates:       d("duplicate_identity_total", "Connections refused because another live connection holds the identity."),
		clusterPeers:     d("cluster_peers", "Other brokers of the cluster this broker has routes to now (0 without clustering)."),
	}
}

// Describe sends every descriptor.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.up, c.conns, c.connsTotal, c.subs, c.inMsgs, c.outMsgs, c.inBytes, c.outBytes,
		c.slow, c.accountConns, c.authentications, c.jetstreamEnabled, c.clusterPeers, c.tokenRefusals, c.duplicates,
	} {
		ch <- d
	}
}

// Collect reads the statistics.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	for i, r := range authResults {
		ch <- prometheus.MustNewConstMetric(c.authentications, prometheus.CounterValue, float64(c.b.auth.counts[i].Load()), r)
	}
	ch <- prometheus.MustNewConstMetric(c.tokenRefusals, prometheus.CounterValue, float64(c.b.auth.tokenFails.Load()))
	ch <- prometheus.MustNewConstMetric(c.duplicates, prometheus.CounterValue, float64(c.b.auth.duplicates.Load()))
	srv := c.b.Server()
	var v *server.Varz
	if srv != nil && srv.Running() {
		v, _ = srv.Varz(nil)
	}
	if v == nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(v.Connections))
	ch <- prometheus.MustNewConstMetric(c.connsTotal, prometheus.CounterValue, float64(v.TotalConnections))
	ch <- prometheus.MustNewConstMetric(c.subs, prometheus.GaugeValue, float64(v.Subscriptions))
	ch <- prometheus.MustNewConstMetric(c.inMsgs, prometheus.CounterValue, float64(v.InMsgs))
	ch <- prometheus.MustNewConstMetric(c.outMsgs, prometheus.CounterValue, float64(v.OutMsgs))
	ch <- prometheus.MustNewConstMetric(c.inBytes, prometheus.CounterValue, float64(v.InBytes))
	ch <- prometheus.MustNewConstMetric(c.outBytes, prometheus.CounterValue, float64(v.OutBytes))
	ch <- prometheus.MustNewConstMetric(c.slow, prometheus.CounterValue, float64(v.SlowConsumers))
	for _, name := range []string{PRODUCTION, PROVISIONING} {
		if acc, err := srv.LookupAccount(name); err == nil {
			ch <- prometheus.MustNewConstMetric(c.accountConns, prometheus.GaugeValue, float64(acc.NumLocalConnections()), name)
		}
	}
	js := 0.0
	if acc, err := srv.LookupAccount(PROVISIONING); err == nil && acc.JetStreamEnabled() {
		js = 1
	}
	ch <- prometheus.MustNewConstMetric(c.jetstreamEnabled, prometheus.GaugeValue, js)
	ch <- prometheus.MustNewConstMetric(c.clusterPeers, prometheus.GaugeValue, float64(srv.NumRemotes()))
}
