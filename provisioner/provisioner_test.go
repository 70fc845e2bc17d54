package provisioner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nuid"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// TestFleetProvisionedOnce provisions 50 simulated nodes discovered through
// metadata, startup events and broadcast discovery, each exactly once.
func TestFleetProvisionedOnce(t *testing.T) {
	url := startServer(t)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	const n = 50
	var ids []string
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("node%02d.example.net", i)
		ids = append(ids, id)
		node := fleet.add(id, nil)
		// Nodes that announce themselves stay out of the initial
		// broadcast, so each discovery source is exercised for sure.
		node.mu.Lock()
		node.silent = i%3 != 2
		node.mu.Unlock()
	}
	h := newTestHelper(c, nil)
	obs := newObserved()
	cfg := testConfig()
	cfg.Workers = 8
	cfg.Interval = Duration(time.Hour) // broadcast discovery only at start
	// Every simulated node answers: a timeout long enough for a loaded
	// machine keeps the RPC retry (which sends configure again, by design)
	// out of the once-per-node counts below.
	cfg.RPCTimeout = Duration(5 * time.Second)
	r := startProvisioner(t, url, cfg, h, obs, nil)

	// Announce two thirds; the rest are found by the initial broadcast.
	for i, id := range ids {
		switch i % 3 {
		case 0:
			fleet.publishMetadata(id)
		case 1:
			fleet.publishStartup(id)
		}
	}
	waitFor(t, 60*time.Second, "every node provisioned", func() bool {
		for _, id := range ids {
			if _, restarted, _ := fleet.nodes[id].stats(); restarted == 0 {
				return false
			}
		}
		return true
	})
	waitFor(t, 10*time.Second, "every node recorded as provisioned", func() bool {
		return testutil.ToFloat64(r.p.m.provisioned) == n
	})

	// Announce everything again and run discovery again: grace keeps every
	// node from being taken a second time.
	for _, id := range ids {
		fleet.publishMetadata(id)
		node := fleet.nodes[id]
		node.mu.Lock()
		node.silent = false
		node.mu.Unlock()
	}
	if got, err := r.p.Discover(context.Background()); err != nil || got != n {
		t.Fatalf("Discover = %d, %v; want %d", got, err, n)
	}
	r.stop(t)

	for _, id := range ids {
		node := fleet.nodes[id]
		configured, restarted, _ := node.stats()
		if configured != 1 || restarted != 1 || node.count(protocol.ActionConfigure) != 1 {
			t.Errorf("%s: configured %d, restarted %d, configure requests %d; want 1 each", id, configured, restarted, node.count(protocol.ActionConfigure))
		}
		if !obs.has(id, "provisioned/restart") {
			t.Errorf("%s: observer events %v", id, obs.of(id))
		}
		st, ok := nodeState(r.p, id)
		if !ok || st.State != StateProvisioned || st.Attempts != 1 || st.ProvisionedAt.IsZero() {
			t.Errorf("%s: status %+v", id, st)
		}
	}
	if len(h.bad) > 0 {
		t.Errorf("helper saw bad requests: %v", h.bad)
	}
	for _, src := range []string{sourceMetadata, sourceStartup, sourceDiscovery} {
		if v := testutil.ToFloat64(r.p.m.discovered.WithLabelValues(src)); v == 0 {
			t.Errorf("discovered_total{source=%q} = 0", src)
		}
	}
	if v := testutil.ToFloat64(r.p.m.provisioned); v != n {
		t.Errorf("provisioned_total = %v, want %d", v, n)
	}
	if v := testutil.ToFloat64(r.p.m.busy); v != 0 {
		t.Errorf("busy_workers = %v after stop", v)
	}
}

// TestNodeBehaviours runs one node per case through the pipeline with a
// particular helper or node behaviour.
func TestNodeBehaviours(t *testing.T) {
	otherCSR := func(t *testing.T, id string) []byte {
		t.Helper()
		k, err := pki.GenerateKey("", 0)
		if err != nil {
			t.Fatal(err)
		}
		csr, err := pki.CreateCSR(k, id, pki.CSRSubject{})
		if err != nil {
			t.Fatal(err)
		}
		return csr
	}
	cases := []struct {
		name   string
		behave nodeBehaviour
		hook   func(t *testing.T, h **testHelper) helperHook
		check  func(t *testing.T, e caseEnv)
	}{
		{
			name: "helper defers once then succeeds",
			hook: func(*testing.T, **testHelper) helperHook {
				return func(_ *helper.Request, call int) (*helper.Reply, error, bool) {
					if call == 1 {
						return &helper.Reply{Defer: true, Msg: "not yet"}, nil, true
					}
					return nil, nil, false
				}
			},
			check: func(t *testing.T, e caseEnv) {
				waitProvisioned(t, e)
				if !e.obs.has(e.node.id, "deferred/helper") && !e.obs.has(e.node.id, "deferred/validate") {
					t.Errorf("no deferral observed: %v", e.obs.events)
				}
				if v := testutil.ToFloat64(e.p.m.deferred); v != 1 {
					t.Errorf("deferred_total = %v", v)
				}
				if c, _, _ := e.node.stats(); c != 1 {
					t.Errorf("configured %d times", c)
				}
				if st, _ := nodeState(e.p, e.node.id); st.Attempts != 2 {
					t.Errorf("attempts %d, want 2", st.Attempts)
				}
			},
		},
		{
			name: "helper error fails the node and it is retried",
			hook: func(*testing.T, **testHelper) helperHook {
				return func(_ *helper.Request, call int) (*helper.Reply, error, bool) {
					if call == 1 {
						return nil, &helper.RunError{Identity: "x", Stderr: "boom on stderr", Err: helper.ErrExit}, true
					}
					return nil, nil, false
				}
			},
			check: func(t *testing.T, e caseEnv) {
				waitProvisioned(t, e)
				if !e.obs.has(e.node.id, "failed/helper") {
					t.Errorf("no helper failure observed: %v", e.obs.events)
				}
				if v := testutil.ToFloat64(e.p.m.errors.WithLabelValues(string(StageHelper))); v != 1 {
					t.Errorf("errors_total{stage=helper} = %v", v)
				}
			},
		},
		{
			name: "certificate for another key is rejected and never sent",
			hook: func(t *testing.T, h **testHelper) helperHook {
				return func(req *helper.Request, _ int) (*helper.Reply, error, bool) {
					rep, err := (*h).sign(req, otherCSR(t, req.Identity))
					return rep, err, true
				}
			},
			check: func(t *testing.T, e caseEnv) {
				waitFor(t, 10*time.Second, "validation failure", func() bool {
					return testutil.ToFloat64(e.p.m.errors.WithLabelValues(string(StageValidate))) >= 1
				})
				st, _ := nodeState(e.p, e.node.id)
				if st.Stage != StageValidate || !strings.Contains(st.LastError, "invalid helper reply") && !strings.Contains(st.LastError, "rejected") {
					t.Errorf("status %+v", st)
				}
				if n := e.node.count(protocol.ActionConfigure); n != 0 {
					t.Errorf("%d configure requests sent", n)
				}
			},
		},
		{
			name:   "rpc timeout is retried then fails",
			behave: func(action string, _ int) (bool, protocol.Code) { return action == protocol.ActionInventory, "" },
			check: func(t *testing.T, e caseEnv) {
				waitFor(t, 10*time.Second, "inventory failure", func() bool {
					return testutil.ToFloat64(e.p.m.errors.WithLabelValues(string(StageInventory))) >= 1
				})
				if v := testutil.ToFloat64(e.p.m.retries.WithLabelValues(string(StageInventory))); v < 2 {
					t.Errorf("retries_total{stage=inventory} = %v, want >= 2", v)
				}
				if n := e.node.count(protocol.ActionInventory); n < 3 {
					t.Errorf("%d inventory requests, want >= 3", n)
				}
				st, _ := nodeState(e.p, e.node.id)
				if st.Stage != StageInventory || !strings.Contains(st.LastError, "gave up") {
					t.Errorf("status %+v", st)
				}
				if e.h.callCount(e.node.id) != 0 {
					t.Error("helper ran for a node without inventory")
				}
			},
		},
		{
			name: "non-ok reply is recorded and not retried",
			behave: func(action string, _ int) (bool, protocol.Code) {
				return false, codeIf(action == protocol.ActionGenCSR, protocol.CodeUnauthorized)
			},
			check: func(t *testing.T, e caseEnv) {
				waitFor(t, 10*time.Second, "gencsr failure", func() bool {
					return testutil.ToFloat64(e.p.m.errors.WithLabelValues(string(StageGenCSR))) >= 1
				})
				st, _ := nodeState(e.p, e.node.id)
				if st.State != StateFailed && st.State != StateQueued && st.State != StateInProgress || !strings.Contains(st.LastError, "unauthorized") {
					t.Errorf("status %+v", st)
				}
				if v := testutil.ToFloat64(e.p.m.retries.WithLabelValues(string(StageGenCSR))); v != 0 {
					t.Errorf("retries_total{stage=gencsr} = %v, want 0", v)
				}
				if e.node.count(protocol.ActionGenCSR) > st.Attempts+1 {
					t.Errorf("%d gencsr requests for %d attempts", e.node.count(protocol.ActionGenCSR), st.Attempts)
				}
			},
		},
		{
			name: "helper shutdown stops the node",
			hook: func(*testing.T, **testHelper) helperHook {
				return func(*helper.Request, int) (*helper.Reply, error, bool) {
					return &helper.Reply{Shutdown: true, Msg: "decommissioned"}, nil, true
				}
			},
			check: func(t *testing.T, e caseEnv) {
				waitFor(t, 10*time.Second, "shutdown sent", func() bool {
					_, _, s := e.node.stats()
					return s == 1 && testutil.ToFloat64(e.p.m.shutdown) == 1
				})
				st, _ := nodeState(e.p, e.node.id)
				if st.State != StateShutdown {
					t.Errorf("status %+v", st)
				}
				if n := e.node.count(protocol.ActionConfigure); n != 0 {
					t.Errorf("%d configure requests", n)
				}
			},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			url := startServer(t)
			c := newCA(t)
			fleet := newSimFleet(t, url, c.CertificatePEM())
			node := fleet.add("node1.example.net", tc.behave)
			var h *testHelper
			var hook helperHook
			if tc.hook != nil {
				hook = tc.hook(t, &h)
			}
			h = newTestHelper(c, hook)
			obs := newObserved()
			r := startProvisioner(t, url, testConfig(), h, obs, nil)
			tc.check(t, caseEnv{p: r.p, node: node, h: h, obs: obs})
			checkStateCounts(t, r.p)
			r.stop(t)
			checkNodesGauge(t, r.p)
		})
	}
}

func codeIf(cond bool, c protocol.Code) protocol.Code {
	if cond {
		return c
	}
	return protocol.CodeOK
}

// caseEnv is what a TestNodeBehaviours case checks.
type caseEnv struct {
	p    *Provisioner
	node *simNode
	h    *testHelper
	obs  *observed
}

func waitProvisioned(t *testing.T, e caseEnv) {
	t.Helper()
	waitFor(t, 15*time.Second, e.node.id+" provisioned", func() bool {
		st, ok := nodeState(e.p, e.node.id)
		_, restarted, _ := e.node.stats()
		return ok && st.State == StateProvisioned && restarted == 1
	})
}

// TestQueueShedAndPause fills a one-slot queue while paused, then resumes.
func TestQueueShedAndPause(t *testing.T) {
	url := startServer(t)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	cfg := testConfig()
	cfg.QueueSize = 2
	cfg.Interval = Duration(time.Hour)
	ids := []string{"a.example.net", "b.example.net", "c.example.net", "d.example.net", "e.example.net"}
	for _, id := range ids {
		fleet.add(id, nil)
	}
	h := newTestHelper(c, nil)
	r := startProvisioner(t, url, cfg, h, nil, func(p *Provisioner) { p.Pause() })
	p := r.p
	if !p.Paused() || testutil.ToFloat64(p.m.paused) != 1 {
		t.Fatal("not paused")
	}
	// The initial broadcast discovery already offered all five nodes.
	waitFor(t, 10*time.Second, "queue full and shedding", func() bool {
		return len(p.queue) == 2 && testutil.ToFloat64(p.m.shed) >= 3
	})
	// A shed node is forgotten: only the queued ones are counted (paused,
	// so nothing moves).
	checkNodesGauge(t, p)
	if got := nodesGauge(t, p, StateQueued); got != 2 {
		t.Errorf("muster_provisioner_nodes{state=queued} = %v, want 2", got)
	}
	for _, id := range ids {
		if n := fleet.nodes[id].count(protocol.ActionInventory); n != 0 {
			t.Fatalf("%s got inventory while paused", id)
		}
	}
	if v := testutil.ToFloat64(p.m.discovered.WithLabelValues(sourceDiscovery)); v != 5 {
		t.Errorf("discovered_total{discovery} = %v", v)
	}
	p.Resume()
	if p.Paused() || testutil.ToFloat64(p.m.paused) != 0 {
		t.Fatal("still paused")
	}
	// Shed nodes come back by re-announcing.
	waitFor(t, 30*time.Second, "every node provisioned after resume", func() bool {
		for _, id := range ids {
			fleet.publishMetadata(id)
		}
		done := 0
		for _, id := range ids {
			if _, r, _ := fleet.nodes[id].stats(); r == 1 {
				done++
			}
		}
		return done == len(ids)
	})
	r.stop(t)
	checkNodesGauge(t, p)
	if got := nodesGauge(t, p, StateProvisioned) + nodesGauge(t, p, StateProduction); got != float64(len(ids)) {
		t.Errorf("muster_provisioner_nodes{state=provisioned|production} = %v, want %d", got, len(ids))
	}
}

// checkStateCounts checks the counts by state the provisioner keeps (for
// /status and muster_provisioner_nodes) against its nodes, at one moment:
// it may run at any time.
func checkStateCounts(t *testing.T, p *Provisioner) map[State]int {
	t.Helper()
	want := map[State]int{}
	p.mu.Lock()
	for _, n := range p.nodes {
		want[n.State]++
	}
	kept := maps.Clone(p.counts)
	p.mu.Unlock()
	maps.DeleteFunc(kept, func(_ State, c int) bool { return c == 0 })
	if !maps.Equal(kept, want) {
		t.Errorf("counts by state %v, nodes by state %v", kept, want)
	}
	return want
}

// checkNodesGauge checks muster_provisioner_nodes against the nodes, and
// their counts; the provisioner must be stopped or still (the gauge is read
// apart from the nodes).
func checkNodesGauge(t *testing.T, p *Provisioner) {
	t.Helper()
	want := checkStateCounts(t, p)
	all := nodesGauges(t, p)
	if len(all) != len(allStates) {
		t.Errorf("muster_provisioner_nodes has %d series, want one per state (%d)", len(all), len(allStates))
	}
	gauge := map[State]int{}
	for st, v := range all {
		if v != 0 {
			gauge[st] = int(v)
		}
	}
	delete(want, "")
	if !maps.Equal(gauge, want) {
		t.Errorf("muster_provisioner_nodes %v, nodes by state %v", gauge, want)
	}
}

// nodesGauges gathers muster_provisioner_nodes, by state.
func nodesGauges(t *testing.T, p *Provisioner) map[State]float64 {
	t.Helper()
	mfs, err := p.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[State]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "muster_provisioner_nodes" {
			continue
		}
		for _, m := range mf.GetMetric() {
			out[State(m.GetLabel()[0].GetValue())] = m.GetGauge().GetValue()
		}
	}
	return out
}

// nodesGauge is muster_provisioner_nodes for one state.
func nodesGauge(t *testing.T, p *Provisioner, s State) float64 {
	t.Helper()
	v, ok := nodesGauges(t, p)[s]
	if !ok {
		t.Fatalf("muster_provisioner_nodes{state=%q} missing", s)
	}
	return v
}

// TestInvalidMessagesCounted feeds malformed messages to every source.
func TestInvalidMessagesCounted(t *testing.T) {
	url := startServer(t)
	c := newCA(t)
	cfg := testConfig()
	cfg.Interval = Duration(time.Hour)
	r := startProvisioner(t, url, cfg, newTestHelper(c, nil), nil, nil)
	nc := connect(t, url)
	// Messages whose body names another identity than their subject (the
	// broker binds the subject to the sender) are as invalid as garbage.
	forgedMD, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: "victim.example.net", Time: time.Now().UTC()})
	forgedEv, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: "f", Identity: "victim.example.net", Component: protocol.AgentComponent, Type: protocol.EventStartup, Time: time.Now().UTC()})
	forgedProd, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: "g", Identity: "victim.example.net", Component: protocol.AgentComponent, Type: protocol.EventProvisioned, Time: time.Now().UTC()})
	// A component that swallows part of the identity: the subject of
	// x.victim.example.net read as victim.example.net's.
	split, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: "h", Identity: "victim.example.net", Component: protocol.AgentComponent + ".x", Type: protocol.EventStartup, Time: time.Now().UTC()})
	bad := []struct {
		subject string
		data    []byte
	}{
		{protocol.MetadataSubjectFor("etc"), []byte(`{"protocol":"muster:metadata:1","identity":"../etc"}`)},
		{protocol.MetadataSubjectFor("mallory.example.net"), forgedMD},
		{protocol.MetadataSubject, forgedMD},
		{protocol.LifecycleSubject(protocol.EventStartup, protocol.AgentComponent, "n1"), []byte(`not json`)},
		{protocol.LifecycleSubject(protocol.EventStartup, protocol.AgentComponent, "mallory.example.net"), forgedEv},
		{protocol.LifecycleSubject(protocol.EventStartup, protocol.AgentComponent, "x.victim.example.net"), split},
		{productionPrefix + protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, "n1"), []byte(`{"protocol":"x"}`)},
		{productionPrefix + protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, "mallory.example.net"), forgedProd},
	}
	for _, m := range bad {
		if err := nc.Publish(m.subject, m.data); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]float64{sourceMetadata: 2, sourceStartup: 3, sourceProduction: 2} // the bare metadata subject is not subscribed
	waitFor(t, 5*time.Second, "invalid messages counted", func() bool {
		for s, n := range want {
			if testutil.ToFloat64(r.p.m.invalid.WithLabelValues(s)) != n {
				return false
			}
		}
		return true
	})
	if st, ok := nodeState(r.p, "victim.example.net"); ok {
		t.Fatalf("forged messages made the provisioner track the victim: %+v", st)
	}
	// A provisioned event from production marks the node done.
	arrivedAt := time.Now().UTC()
	ev, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: "1", Identity: "p1.example.net", Component: protocol.AgentComponent, Type: protocol.EventProvisioned, Time: arrivedAt})
	if err := nc.Publish(productionPrefix+protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, "p1.example.net"), ev); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "production arrival", func() bool {
		st, ok := nodeState(r.p, "p1.example.net")
		return ok && st.State == StateProduction && testutil.ToFloat64(r.p.m.arrivals) == 1
	})
	if r.p.offer("p1.example.net", sourceMetadata, nodeLife{}) {
		t.Error("node in production was queued again")
	}
	// Start times are the node's clock, as the arrival's time is.
	if r.p.offer("p1.example.net", sourceStartup, nodeLife{started: arrivedAt.Add(-time.Millisecond)}) {
		t.Error("a startup from before the arrival queued the node again")
	}
	if r.p.offer("p1.example.net", sourceMetadata, nodeLife{started: arrivedAt.Add(-time.Second)}) {
		t.Error("a late announcement of the life before the arrival queued the node again")
	}
	// The attempt's result can come after the arrival (a restart reply
	// that came late): a new life that started in between is still a new
	// life. (Paused: no worker takes the node these offers queue.)
	r.p.Pause()
	newLife := time.Now()
	r.p.finish(&attempt{p: r.p, id: "p1.example.net", log: r.p.log, started: newLife, stage: StageRestart, outcome: OutcomeProvisioned}, nil, false)
	if st, _ := nodeState(r.p, "p1.example.net"); st.State != StateProduction || !st.Updated.After(newLife) {
		t.Fatalf("after the late result: %+v", st)
	}
	if !r.p.offer("p1.example.net", sourceStartup, nodeLife{started: newLife}) {
		t.Error("a node started again after its arrival was not queued: the late attempt result hid it")
	}
	// The same new life, known from its metadata only (its startup event
	// was missed), is a new life too.
	select {
	case <-r.p.queue:
	case <-time.After(10 * time.Second):
		t.Fatal("the queued node was not in the queue")
	}
	r.p.mu.Lock()
	r.p.nodes["p1.example.net"].State = StateProduction
	r.p.mu.Unlock()
	if !r.p.offer("p1.example.net", sourceMetadata, nodeLife{started: newLife}) {
		t.Error("metadata of a life started after the arrival did not queue the node")
	}
	r.stop(t)
}

// TestNewLifeByNodeClock: whether a node in production started a new
// provisioning life is judged on the node's clock alone. A node whose clock
// is an hour behind the provisioner's is still taken again when
// reinstalled; one an hour ahead is not taken on its old life's late
// announcement.
func TestNewLifeByNodeClock(t *testing.T) {
	url := startServer(t)
	c := newCA(t)
	cfg := testConfig()
	cfg.Interval = Duration(time.Hour)
	r := startProvisioner(t, url, cfg, newTestHelper(c, nil), nil, nil)
	r.p.Pause() // no worker takes what the offers queue
	for _, tc := range []struct {
		id   string
		skew time.Duration
	}{
		{"behind.example.net", -time.Hour},
		{"ahead.example.net", time.Hour},
	} {
		arrived := time.Now().UTC().Add(tc.skew) // the node's clock
		ev := &protocol.Event{Protocol: protocol.EventProtocol, ID: "a", Identity: tc.id, Component: protocol.AgentComponent,
			Type: protocol.EventProvisioned, Time: arrived, Serial: "5c"}
		r.p.markProduction(ev)
		// The node publishes it again (a reconnection, or a repeat in
		// case it was lost): one arrival.
		r.p.markProduction(ev)
		if r.p.offer(tc.id, sourceMetadata, nodeLife{started: arrived.Add(-time.Second)}) {
			t.Errorf("%s: the old life's late announcement queued the node", tc.id)
		}
		if !r.p.offer(tc.id, sourceMetadata, nodeLife{started: arrived.Add(time.Second)}) {
			t.Errorf("%s: a life started after the arrival was not taken", tc.id)
		}
	}
	if n := testutil.ToFloat64(r.p.m.arrivals); n != 2 {
		t.Errorf("production_arrivals_total = %v after two nodes' events, each published twice; want 2", n)
	}
	r.stop(t)
}

// TestNewLifeByID: a node's life ID decides whether it began a new
// provisioning life, whatever its clock did. The old life's late
// announcements are not taken even with a start after the arrival (the
// node's clock moved forward, say by NTP, since it started that life); a
// reinstall is taken although its clock went back to before the arrival
// (an IoT device without a battery-backed clock). Without IDs (older
// agents) the start times decide: TestNewLifeByNodeClock.
func TestNewLifeByID(t *testing.T) {
	const id = "iot.example.net"
	url := startServer(t)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	node, first, second := lifeNode(fleet, id)
	cfg := testConfig()
	cfg.Interval = Duration(time.Hour)
	cfg.Grace = Duration(time.Hour) // production, not grace, keeps it from being taken again
	r := startProvisioner(t, url, cfg, newTestHelper(c, nil), nil, nil)
	announceUntil(t, fleet, id, 30*time.Second, "the first provisioning", func() bool {
		_, restarted, _ := node.stats()
		return restarted == 1
	})
	if st, _ := nodeState(r.p, id); st.Life != first {
		t.Fatalf("the life configured is not recorded: %+v (want life %s)", st, first)
	}
	arrived := time.Now().UTC()
	fleet.publishArrival(id, nuid.Next(), node.configuredSerials()[0])
	waitFor(t, 10*time.Second, "the node in production", func() bool {
		st, _ := nodeState(r.p, id)
		return st.State == StateProduction
	})

	// The provisioner takes its messages in order from one connection:
	// once it counted the malformed one sent after them, it has taken
	// them all.
	invalid := testutil.ToFloat64(r.p.m.invalid.WithLabelValues(sourceMetadata))
	for range 5 {
		fleet.publishLifeMetadata(id, nodeLife{id: first, started: arrived.Add(time.Hour)})
	}
	if err := fleet.nc.Publish(protocol.MetadataSubjectFor(id), []byte("{")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the announcements taken in", func() bool {
		return testutil.ToFloat64(r.p.m.invalid.WithLabelValues(sourceMetadata)) == invalid+1
	})
	if st, _ := nodeState(r.p, id); st.State != StateProduction || st.Attempts != 1 {
		t.Fatalf("the old life's announcements with a later start took the node: %+v", st)
	}

	// Reinstalled, its clock an hour before the arrival.
	node.setLife(second)
	deadline := time.Now().Add(30 * time.Second)
	for _, restarted, _ := node.stats(); restarted < 2; _, restarted, _ = node.stats() {
		if time.Now().After(deadline) {
			st, _ := nodeState(r.p, id)
			t.Fatalf("the reinstalled node was not provisioned again: %+v", st)
		}
		fleet.publishLifeMetadata(id, nodeLife{id: second, started: arrived.Add(-time.Hour)})
		time.Sleep(100 * time.Millisecond)
	}
	r.stop(t)
	if st, _ := nodeState(r.p, id); st.Attempts != 2 || st.Life != second || node.count(protocol.ActionConfigure) != 2 {
		t.Fatalf("after the reinstall: %+v, %d configures (want 2 attempts, 2 configures, life %s)", st, node.count(protocol.ActionConfigure), second)
	}
}

// TestNodeClockOffset: the provisioner estimates every node's clock offset
// from its replies (a metric), and a node that refuses its requests because
// its clock is wrong fails with the offset in its last error.
func TestNodeClockOffset(t *testing.T) {
	url := startServer(t)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	good := fleet.add("good.example.net", nil)
	behind := fleet.add("behind.example.net", nil)
	behind.mu.Lock()
	behind.clock = -3 * time.Hour
	behind.mu.Unlock()
	r := startProvisioner(t, url, testConfig(), newTestHelper(c, nil), nil, nil)
	// The node behind refuses the discovery ping too (from the future by
	// its clock): it is found by its announcement.
	fleet.publishMetadata("behind.example.net")
	waitFor(t, 30*time.Second, "one node provisioned, the other failed", func() bool {
		_, restarted, _ := good.stats()
		st, _ := nodeState(r.p, "behind.example.net")
		return restarted == 1 && st.State == StateFailed
	})
	r.stop(t)
	st, _ := nodeState(r.p, "behind.example.net")
	if !strings.Contains(st.LastError, "the node's clock is 3h0m0s behind this provisioner's") || !strings.Contains(st.LastError, "in the future") {
		t.Fatalf("last error %q", st.LastError)
	}
	mfs, err := r.p.m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var count, within30, within3600 uint64
	for _, mf := range mfs {
		if mf.GetName() != "muster_provisioner_node_clock_offset_seconds" {
			continue
		}
		h := mf.GetMetric()[0].GetHistogram()
		count = h.GetSampleCount()
		for _, b := range h.GetBucket() {
			switch b.GetUpperBound() {
			case 30:
				within30 = b.GetCumulativeCount()
			case 3600:
				within3600 = b.GetCumulativeCount()
			}
		}
	}
	// The good node's four replies (inventory, gencsr, configure,
	// restart) are close to this clock; the other's one is hours off.
	if count < 5 || within30 < 4 || count-within3600 < 1 {
		t.Fatalf("clock offsets: %d observed, %d within 30 s, %d within an hour", count, within30, within3600)
	}
}

// TestShutdownJoinsGoroutines checks Run's goroutines end and that a node
// stuck in its helper is abandoned after the drain period.
func TestShutdownJoinsGoroutines(t *testing.T) {
	url := startServer(t)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	fleet.add("stuck.example.net", nil)
	provConn := connect(t, url)
	entered := make(chan struct{})
	var once sync.Once
	// The helper blocks until cancelled: the drain period ends long before
	// the helper timeout, so the node is abandoned.
	blocking := helperFunc(func(ctx context.Context, _ *helper.Request) (*helper.Reply, error) {
		once.Do(func() { close(entered) })
		<-ctx.Done()
		return nil, ctx.Err()
	})
	cfg := testConfig()
	cfg.MonitorPort = -1
	cfg.HelperTimeout = Duration(time.Minute)
	log, buf := debugLogger()
	obs := newObserved()

	baseline := runtime.NumGoroutine()

	p, err := New(Options{Config: cfg, Helper: blocking, Conn: provConn, Logger: log, Observer: obs, DrainTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("helper never ran")
	}
	addr := p.MonitorAddr()
	if addr == "" {
		t.Fatal("no monitor address")
	}
	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz = %d", resp.StatusCode)
	}
	http.DefaultClient.CloseIdleConnections()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
	}
	st, _ := nodeState(p, "stuck.example.net")
	if st.State != StateAbandoned || st.Stage != StageHelper {
		t.Errorf("status %+v, want abandoned at helper", st)
	}
	if p.MonitorAddr() != "" {
		t.Error("monitor address still set")
	}
	if err := p.Run(context.Background()); !errors.Is(err, ErrAlreadyRunning) {
		t.Errorf("second Run = %v", err)
	}
	waitFor(t, 10*time.Second, "goroutines back to baseline", func() bool {
		return runtime.NumGoroutine() <= baseline+1
	})
	if strings.Contains(buf.String(), "eyJ") {
		t.Error("token in logs")
	}
}

type helperFunc func(ctx context.Context, req *helper.Request) (*helper.Reply, error)

func (f helperFunc) Provision(ctx context.Context, req *helper.Request) (*helper.Reply, error) {
	return f(ctx, req)
}

// TestMetricsAndHTTP checks every metric name and the monitor endpoints.
func TestMetricsAndHTTP(t *testing.T) {
	c := newCA(t)
	url := startServer(t)
	cfg := testConfig()
	cfg.Brokers = []string{url}
	p, err := New(Options{Config: cfg, Helper: newTestHelper(c, nil)})
	if err != nil {
		t.Fatal(err)
	}
	names := []string{
		"muster_provisioner_discovered_total", "muster_provisioner_provisioned_total",
		"muster_provisioner_deferred_total", "muster_provisioner_shutdown_total",
		"muster_provisioner_errors_total", "muster_provisioner_retries_total",
		"muster_provisioner_invalid_messages_total", "muster_provisioner_queue_shed_total",
		"muster_provisioner_queue_depth", "muster_provisioner_queue_capacity",
		"muster_provisioner_workers", "muster_provisioner_busy_workers", "muster_provisioner_paused",
		"muster_provisioner_production_arrivals_total", "muster_provisioner_rpc_duration_seconds",
		"muster_provisioner_helper_duration_seconds", "muster_provisioner_queue_wait_seconds",
		"muster_provisioner_node_duration_seconds", "muster_provisioner_nodes", "muster_provisioner_held_nodes",
		"muster_provisioner_intake_dropped_total",
		"go_goroutines", "process_start_time_seconds",
	}
	for _, name := range names {
		n, err := testutil.GatherAndCount(p.Registry(), name)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Errorf("metric %s missing", name)
		}
	}
	if problems, err := testutil.GatherAndLint(p.Registry()); err != nil {
		t.Fatal(err)
	} else {
		for _, pr := range problems {
			if strings.HasPrefix(pr.Metric, "muster_") {
				t.Errorf("lint %s: %s", pr.Metric, pr.Text)
			}
		}
	}

	srv := httptest.NewServer(p.Handler())
	defer srv.Close()
	get := func(method, path string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, srv.URL+path, nil)
		resp, err := srv.Client().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	cases := []struct {
		name, method, path string
		code               int
		contains           string
	}{
		{"metrics", "GET", "/metrics", 200, "muster_provisioner_queue_capacity 10000"},
		{"healthz before run", "GET", "/healthz", 503, "not connected"},
		{"status", "GET", "/status", 200, `"queue_capacity": 10000`},
		{"nodes", "GET", "/nodes", 200, "[]"},
		{"pause", "POST", "/pause", 200, `"paused": true`},
		{"resume", "POST", "/resume", 200, `"paused": false`},
		{"pause needs post", "GET", "/pause", 405, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, body := get(tc.method, tc.path)
			if code != tc.code || !strings.Contains(body, tc.contains) {
				t.Errorf("%s %s = %d %q", tc.method, tc.path, code, body)
			}
		})
	}
	if _, body := get("GET", "/metrics"); strings.Contains(body, "eyJ") {
		t.Error("token in metrics")
	}
}

func TestNewRejectsMissingHelper(t *testing.T) {
	cfg := testConfig()
	cfg.Brokers = nil
	_, err := New(Options{Config: cfg})
	if !errors.Is(err, ErrNoHelper) || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "brokers") {
		t.Fatalf("New = %v", err)
	}
}
