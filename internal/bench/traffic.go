package bench

import (
	"github.com/nats-io/nats-server/v2/server"
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
}

// brokerCounters is a reading of the counters BrokerTraffic is made of.
type brokerCounters struct {
	msgsIn, msgsOut, bytesIn, bytesOut, conns, slow int64
	ok                                              bool
}

func readBrokerCounters(srv *server.Server) brokerCounters {
	if srv == nil {
		return brokerCounters{}
	}
	v, err := srv.Varz(nil)
	if err != nil || v == nil {
		return brokerCounters{}
	}
	return brokerCounters{
		msgsIn:   v.InMsgs,
		msgsOut:  v.OutMsgs,
		bytesIn:  v.InBytes,
		bytesOut: v.OutBytes,
		conns:    int64(v.TotalConnections),
		slow:     v.SlowConsumers,
		ok:       true,
	}
}

// brokerTraffic is the traffic between two readings, per node over nodes;
// nil when either reading failed.
func brokerTraffic(before, after brokerCounters, nodes int) *BrokerTraffic {
	if !before.ok || !after.ok {
		return nil
	}
	t := &BrokerTraffic{
		MsgsIn:        after.msgsIn - before.msgsIn,
		MsgsOut:       after.msgsOut - before.msgsOut,
		BytesIn:       after.bytesIn - before.bytesIn,
		BytesOut:      after.bytesOut - before.bytesOut,
		Connections:   after.conns - before.conns,
		SlowConsumers: after.slow - before.slow,
	}
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
