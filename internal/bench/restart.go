package bench

import (
	"context"
	"syscall"
	"time"

	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/internal/demo"
)

// BrokerRestart is what a broker restart under the provisioned fleet cost
// (Options.RestartBroker): how soon the nodes' production connections
// were back, and what the new broker did for them. An upgrade of the
// broker is the other storm an operator meets: every node connects again
// at once, with mutual TLS.
type BrokerRestart struct {
	Nodes int `json:"nodes"`
	// Reconnected counts the production connections open on the new
	// broker at the end of the phase.
	Reconnected int `json:"reconnected"`
	// DownSeconds runs from the old broker's shutdown to the new one
	// taking connections.
	DownSeconds float64 `json:"down_seconds"`
	// Back50, Back90, Back99 and BackAll run from the new broker's start
	// until that share of the nodes was connected again (sampled every
	// 20 ms); -1 when it never was within the timeout.
	Back50  float64 `json:"back_50_seconds"`
	Back90  float64 `json:"back_90_seconds"`
	Back99  float64 `json:"back_99_seconds"`
	BackAll float64 `json:"back_all_seconds"`
	// CPUMillisPerNode is this process's CPU (broker, provisioner and
	// in-process agents) from the restart until every node was back, per
	// node.
	CPUMillisPerNode float64 `json:"cpu_ms_per_node"`
	// Broker is the new broker's traffic until every node was back: its
	// connections per node count the agents connecting more than once.
	Broker *BrokerTraffic `json:"broker,omitempty"`
}

// restartPoll is how often the restart phase counts connections.
const restartPoll = 20 * time.Millisecond

// restartPhase restarts the broker of f, whose nodes are all in
// production, and waits up to timeout until they are all connected again;
// Reconnected says how many were.
func restartPhase(ctx context.Context, f *demo.Fleet, nodes int, timeout time.Duration) (*BrokerRestart, error) {
	r := &BrokerRestart{Nodes: nodes, Back50: -1, Back90: -1, Back99: -1, BackAll: -1}
	var ru0, ru1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	down := time.Now()
	if err := f.RestartBroker(); err != nil {
		return nil, err
	}
	start := time.Now()
	r.DownSeconds = start.Sub(down).Seconds()
	srv := f.Broker().Server()
	prod := func() int {
		acc, err := srv.LookupAccount(broker.PRODUCTION)
		if err != nil {
			return 0
		}
		return acc.NumConnections()
	}
	marks := []struct {
		share float64
		dst   *float64
	}{{0.5, &r.Back50}, {0.9, &r.Back90}, {0.99, &r.Back99}, {1, &r.BackAll}}
	waitCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(restartPoll)
	defer tick.Stop()
wait:
	for {
		n := prod()
		at := time.Since(start).Seconds()
		for _, m := range marks {
			if *m.dst < 0 && float64(n) >= m.share*float64(nodes) {
				*m.dst = at
			}
		}
		r.Reconnected = n
		if n >= nodes {
			break
		}
		select {
		case <-waitCtx.Done():
			break wait
		case <-tick.C:
		}
	}
	after := quietBroker(waitCtx, f.Broker(), nodes)
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	r.CPUMillisPerNode = 1000 * (cpuSeconds(ru1) - cpuSeconds(ru0)) / float64(max(nodes, 1))
	r.Broker = brokerTraffic(brokerCounters{ok: true}, after, nodes)
	return r, nil
}

// restartQuiet is how long the new broker's message count must stand
// still before the restart phase reads its traffic.
const restartQuiet = 250 * time.Millisecond

// quietBroker waits until b has counted the production authentications of
// nodes and its message count stood still for restartQuiet (a node that
// is back still publishes its lifecycle event), or ctx ends, and returns
// its counters then. It gives up waiting after 5 s.
func quietBroker(ctx context.Context, b *broker.Broker, nodes int) brokerCounters {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	last := readBrokerCounters(b)
	tick := time.NewTicker(restartQuiet)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return last
		case <-tick.C:
		}
		c := readBrokerCounters(b)
		quiet := c.msgsIn == last.msgsIn && c.auth["production"] >= float64(nodes)
		last = c
		if quiet {
			return c
		}
	}
}
