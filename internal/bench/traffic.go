package bench

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/muster-io/muster/broker"
)

// BrokerTraffic is what the provisioning phase cost the broker, from
// nats-server's own counters (Varz) when the agents started and when the
// last node reached production: a figure to size brokers by. Messages and
// bytes count what clients published (in) and what the broker delivered
// (out), the provisioner's and every agent's connections alike, so a
// request and its reply are two messages in and two out.
type BrokerTraffic struct {
	MsgsIn      int64 `json:"msgs_in"`
	MsgsOut     int64 `json:"msgs_out"`
	BytesIn     int64 `json:"bytes_in"`
	BytesOut    int64 `json:"bytes_out"`
	Connections int64 `json:"connections"`
	// Per node, over the nodes in production at the end.
	MsgsInPerNode      float64 `json:"msgs_in_per_node"`
	MsgsOutPerNode     float64 `json:"msgs_out_per_node"`
	BytesInPerNode     float64 `json:"bytes_in_per_node"`
	BytesOutPerNode    float64 `json:"bytes_out_per_node"`
	ConnectionsPerNode float64 `json:"connections_per_node"`
	// SlowConsumers counts clients the broker cut off for not reading in
	// time during the phase.
	SlowConsumers int64 `json:"slow_consumers"`
	// Authentications counts the connections the broker authenticated, by
	// result (muster_broker_authentications_total: production,
	// unprovisioned, provisioner, admin, rejected); TokenRefusals and
	// DuplicateRefusals the rejected ones refused for their token and for
	// an identity another live connection holds. Connections beyond two a
	// node are agents connecting again.
	Authentications   map[string]float64 `json:"authentications,omitempty"`
	TokenRefusals     float64            `json:"token_refusals"`
	DuplicateRefusals float64            `json:"duplicate_refusals"`
	// Unauthenticated counts the connections accepted that had not
	// authenticated (nor been refused) by the end: closed before their
	// CONNECT, mostly TLS handshakes that failed or ran past the broker's
	// tls_timeout, or still handshaking.
	Unauthenticated int64 `json:"closed_before_authenticating"`
}

// brokerCounters is a reading of the counters BrokerTraffic is made of.
type brokerCounters struct {
	msgsIn, msgsOut, bytesIn, bytesOut, conns, slow int64
	auth                                            map[string]float64
	tokenRefusals, duplicates                       float64
	ok                                              bool
}

// readBrokerCounters reads nats-server's counters and the broker's own
// (its Prometheus collector, as a scrape would).
func readBrokerCounters(b *broker.Broker) brokerCounters {
	srv := b.Server()
	if srv == nil {
		return brokerCounters{}
	}
	v, err := srv.Varz(nil)
	if err != nil || v == nil {
		return brokerCounters{}
	}
	c := brokerCounters{
		msgsIn:   v.InMsgs,
		msgsOut:  v.OutMsgs,
		bytesIn:  v.InBytes,
		bytesOut: v.OutBytes,
		conns:    int64(v.TotalConnections),
		slow:     v.SlowConsumers,
		auth:     map[string]float64{},
		ok:       true,
	}
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(broker.NewCollector(b)); err != nil {
		return brokerCounters{}
	}
	families, err := reg.Gather()
	if err != nil {
		return brokerCounters{}
	}
	for _, mf := range families {
		for _, m := range mf.GetMetric() {
			switch mf.GetName() {
			case "muster_broker_authentications_total":
				c.auth[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
			case "muster_broker_token_refusals_total":
				c.tokenRefusals = m.GetCounter().GetValue()
			case "muster_broker_duplicate_identity_total":
				c.duplicates = m.GetCounter().GetValue()
			}
		}
	}
	return c
}

// brokerTraffic is the traffic between two readings, per node over nodes;
// nil when either reading failed.
func brokerTraffic(before, after brokerCounters, nodes int) *BrokerTraffic {
	if !before.ok || !after.ok {
		return nil
	}
	t := &BrokerTraffic{
		MsgsIn:            after.msgsIn - before.msgsIn,
		MsgsOut:           after.msgsOut - before.msgsOut,
		BytesIn:           after.bytesIn - before.bytesIn,
		BytesOut:          after.bytesOut - before.bytesOut,
		Connections:       after.conns - before.conns,
		SlowConsumers:     after.slow - before.slow,
		TokenRefusals:     after.tokenRefusals - before.tokenRefusals,
		DuplicateRefusals: after.duplicates - before.duplicates,
	}
	var authenticated float64
	for result, n := range after.auth {
		if d := n - before.auth[result]; d > 0 {
			if t.Authentications == nil {
				t.Authentications = map[string]float64{}
			}
			t.Authentications[result] = d
			authenticated += d
		}
	}
	t.Unauthenticated = max(0, t.Connections-int64(authenticated))
	if nodes > 0 {
		n := float64(nodes)
		t.MsgsInPerNode = float64(t.MsgsIn) / n
		t.MsgsOutPerNode = float64(t.MsgsOut) / n
		t.BytesInPerNode = float64(t.BytesIn) / n
		t.BytesOutPerNode = float64(t.BytesOut) / n
		t.ConnectionsPerNode = float64(t.Connections) / n
	}
	return t
}
