package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/provisioner"
)

func TestOptionsValidate(t *testing.T) {
	cases := []struct {
		name string
		o    Options
		want []string // substrings of the error; nil: valid
	}{
		{"defaults", Options{Nodes: 1}, nil},
		{"ramp", Options{Nodes: 5, Arrival: ArrivalRamp, Rate: 100}, nil},
		{"exec", Options{Nodes: 5, Helper: HelperExec, HelperCmd: "muster helper cfssl"}, nil},
		{"no nodes", Options{}, []string{"nodes 0"}},
		{"exec without command", Options{Nodes: 1, Helper: HelperExec}, []string{"helper-cmd", "--helper exec"}},
		{"persistent without command", Options{Nodes: 1, Helper: HelperPersistent}, []string{"--helper persistent"}},
		{"builtin with command", Options{Nodes: 1, HelperCmd: "x"}, []string{"helper-cmd x"}},
		{"unknown helper", Options{Nodes: 1, Helper: "fork"}, []string{"helper fork"}},
		{"ramp without rate", Options{Nodes: 1, Arrival: ArrivalRamp}, []string{"rate 0"}},
		{"storm with rate", Options{Nodes: 1, Rate: 3}, []string{"rate 3"}},
		{"unknown arrival", Options{Nodes: 1, Arrival: "trickle"}, []string{"arrival trickle"}},
		{"unknown transport", Options{Nodes: 1, Transport: "udp"}, []string{"transport udp"}},
		{"unknown key type", Options{Nodes: 1, KeyType: "dsa"}, []string{"key-type dsa"}},
		{"processes", Options{Nodes: 5, Processes: true}, nil},
		{"processes in-process", Options{Nodes: 5, Processes: true, Transport: TransportInProcess}, []string{"transport inprocess", "tcp"}},
		{"fleet process", Options{Nodes: 5, FleetProcess: true, FleetCommand: []string{"muster", "bench", "fleet-host"}}, nil},
		{"fleet process without command", Options{Nodes: 5, FleetProcess: true}, []string{"fleet-process true", "command"}},
		{"fleet process in-process", Options{Nodes: 5, FleetProcess: true, FleetCommand: []string{"x"}, Transport: TransportInProcess}, []string{"transport inprocess", "tcp"}},
		{"fleet process and processes", Options{Nodes: 5, FleetProcess: true, FleetCommand: []string{"x"}, Processes: true}, []string{"excludes --processes"}},
		{"agent-bin without processes", Options{Nodes: 5, AgentBin: "/bin/true"}, []string{"agent-bin /bin/true"}},
		{"missing state dir", Options{Nodes: 5, StateDir: "/nonexistent/muster"}, []string{"state-dir /nonexistent/muster"}},
		{"memory registry", Options{Nodes: 5, Registry: RegistryMemory}, nil},
		{"known nodes", Options{Nodes: 5, KnownNodes: 99_995}, nil},
		{"unknown registry", Options{Nodes: 5, Registry: "etcd"}, []string{"registry etcd"}},
		{"known nodes in memory", Options{Nodes: 5, Registry: RegistryMemory, KnownNodes: 10}, []string{"known-nodes 10", "--registry file"}},
		{"too many known nodes", Options{Nodes: 5, KnownNodes: 99_996}, []string{"known-nodes 99996"}},
		{"negative known nodes", Options{Nodes: 5, KnownNodes: -1}, []string{"known-nodes -1"}},
		{"claims", Options{Nodes: 5, HA: provisioner.HAClaims, Provisioners: 3}, nil},
		{"leader", Options{Nodes: 5, HA: provisioner.HALeader, Provisioners: 2, Registry: RegistryKV}, nil},
		{"unknown ha", Options{Nodes: 5, HA: "raft"}, []string{"ha raft"}},
		{"two single provisioners", Options{Nodes: 5, Provisioners: 2}, []string{"provisioners 2", "--ha claims or leader"}},
		{"too many provisioners", Options{Nodes: 5, HA: provisioner.HAClaims, Provisioners: 17}, []string{"provisioners 17"}},
		{"ha with a file registry", Options{Nodes: 5, HA: provisioner.HAClaims, Registry: RegistryFile}, []string{"registry file", "JetStream"}},
		{"kv registry without ha", Options{Nodes: 5, Registry: RegistryKV}, []string{"registry kv"}},
		{"ha with known nodes", Options{Nodes: 5, HA: provisioner.HAClaims, KnownNodes: 3}, []string{"known-nodes 3"}},
		{"restart over tcp", Options{Nodes: 5, Transport: TransportTCP, RestartBroker: true}, nil},
		{"restart in process", Options{Nodes: 5, Transport: TransportInProcess, RestartBroker: true}, []string{"restart-broker", "--transport tcp"}},
		{"every problem", Options{Nodes: -1, Workers: -2, Transport: "x"}, []string{"nodes -1", "workers -2", "transport x"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.o.Validate()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrOptions) {
				t.Fatalf("Validate = %v, want ErrOptions", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}

func TestHistogramQuantile(t *testing.T) {
	inf := math.Inf(1)
	cases := []struct {
		name string
		h    histogram
		q    float64
		want float64
	}{
		{"empty", histogram{}, 0.95, 0},
		{"first bucket", histogram{count: 10, buckets: []bucket{{0.01, 10}, {0.1, 10}, {inf, 10}}}, 0.5, 0.005},
		{"interpolated", histogram{count: 10, buckets: []bucket{{0.01, 0}, {0.1, 10}, {inf, 10}}}, 0.5, 0.055},
		{"in +Inf", histogram{count: 10, buckets: []bucket{{0.01, 1}, {0.1, 2}, {inf, 10}}}, 0.95, 0.1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.h.quantile(tc.q); math.Abs(got-tc.want) > 1e-9 {
				t.Errorf("quantile(%v) = %v, want %v", tc.q, got, tc.want)
			}
		})
	}
}

// flakyHelper fails the first request of every identity in fail.
type flakyHelper struct {
	h    helper.Helper
	fail map[string]bool

	mu     sync.Mutex
	failed map[string]bool
}

var errInjected = errors.New("injected helper failure")

func (f *flakyHelper) Provision(ctx context.Context, req *helper.Request) (*helper.Reply, error) {
	f.mu.Lock()
	first := f.fail[req.Identity] && !f.failed[req.Identity]
	if first {
		f.failed[req.Identity] = true
	}
	f.mu.Unlock()
	if first {
		return nil, fmt.Errorf("%s: %w", req.Identity, errInjected)
	}
	return f.h.Provision(ctx, req)
}

func TestRunAccounting(t *testing.T) {
	cases := []struct {
		name      string
		nodes     int
		transport string
		arrival   string
		rate      float64
		failEvery int
		ha        string
		provs     int
		restart   bool
	}{
		{"inprocess storm", 30, TransportInProcess, ArrivalStorm, 0, 5, "", 0, false},
		// This case restarts the broker under the provisioned fleet too.
		{"tcp ramp", 20, TransportTCP, ArrivalRamp, 200, 4, "", 0, true},
		// Several provisioners sharing their state through JetStream:
		// each node is provisioned once whichever provisioner took it,
		// and the figures add up over all of them.
		{"claims, three provisioners", 30, TransportInProcess, ArrivalStorm, 0, 5, provisioner.HAClaims, 3, false},
		{"leader, two provisioners", 20, TransportTCP, ArrivalStorm, 0, 4, provisioner.HALeader, 2, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fail := map[string]bool{}
			for i := 0; i < tc.nodes; i += tc.failEvery {
				fail[demo.Identity(i)] = true
			}
			o := Options{
				Nodes: tc.nodes, Workers: 4, Transport: tc.transport,
				Arrival: tc.arrival, Rate: tc.rate, IdleAgents: 10,
				Timeout: 2 * time.Minute, DeferBackoff: 50 * time.Millisecond,
				MetadataInterval: 500 * time.Millisecond, Settle: 200 * time.Millisecond,
				WrapHelper: func(h helper.Helper) helper.Helper {
					return &flakyHelper{h: h, fail: fail, failed: map[string]bool{}}
				},
				HA: tc.ha, Provisioners: tc.provs, RestartBroker: tc.restart,
			}
			if tc.ha == "" && tc.arrival == ArrivalStorm {
				// This case also waits for the heap to settle.
				o.HeapSettle = 30 * time.Second
			}
			r, err := Run(context.Background(), o)
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			checkResult(t, r, tc.nodes, len(fail))
			checkBroker(t, r, tc.nodes, len(fail))
			checkFloor(t, r, 10)
			checkProvisioners(t, r, tc.ha, max(tc.provs, 1))
			checkHeapSettle(t, r, o.HeapSettle)
			checkRestart(t, r, tc.restart)
		})
	}
}

// checkRestart checks the broker restart's figures: every node back, once,
// and nothing refused; no figures when there was no restart.
func checkRestart(t *testing.T, r *Result, restarted bool) {
	t.Helper()
	rs := r.Restart
	if !restarted {
		if rs != nil {
			t.Errorf("restart figures without a restart: %+v", rs)
		}
		return
	}
	if rs == nil {
		t.Fatal("no restart figures")
	}
	if rs.Nodes != r.Nodes || rs.Reconnected != r.Nodes || !r.OK() {
		t.Errorf("%d of %d nodes back after the restart (OK %t)", rs.Reconnected, rs.Nodes, r.OK())
	}
	if rs.DownSeconds <= 0 || rs.Back50 < 0 || rs.Back90 < rs.Back50 || rs.Back99 < rs.Back90 || rs.BackAll < rs.Back99 {
		t.Errorf("restart times: down %v, back %v / %v / %v / %v", rs.DownSeconds, rs.Back50, rs.Back90, rs.Back99, rs.BackAll)
	}
	b := rs.Broker
	if b == nil {
		t.Fatal("no traffic of the new broker")
	}
	if b.Authentications["production"] < float64(r.Nodes) || b.Authentications["unprovisioned"] != 0 || b.TokenRefusals != 0 || b.DuplicateRefusals != 0 {
		t.Errorf("new broker: authentications %v, refused %v for the token and %v as duplicates", b.Authentications, b.TokenRefusals, b.DuplicateRefusals)
	}
	if b.ConnectionsPerNode < 1 || b.Unauthenticated != 0 {
		t.Errorf("new broker: %v connections per node, %d closed before authenticating", b.ConnectionsPerNode, b.Unauthenticated)
	}
	var out strings.Builder
	r.Print(&out)
	if !strings.Contains(out.String(), "broker restart") || !strings.Contains(out.String(), fmt.Sprintf("%d of %d nodes connected again", r.Nodes, r.Nodes)) {
		t.Errorf("table lacks the restart:\n%s", out.String())
	}
}

// checkProvisioners checks the per-provisioner figures of a run with
// provs provisioners in ha mode ha ("" for single).
func checkProvisioners(t *testing.T, r *Result, ha string, provs int) {
	t.Helper()
	wantHA, wantReg := provisioner.HASingle, RegistryFile
	if ha != "" {
		wantHA, wantReg = ha, RegistryKV
	}
	if r.HA != wantHA || r.Provisioners != provs || r.Registry != wantReg {
		t.Errorf("ha %q, %d provisioners, registry %q; want %q, %d, %q", r.HA, r.Provisioners, r.Registry, wantHA, provs, wantReg)
	}
	sum := 0
	for _, n := range r.ProvisionedBy {
		sum += n
	}
	if len(r.ProvisionedBy) != provs || sum != r.Nodes {
		t.Errorf("provisioned by %v: want %d provisioners adding up to %d nodes", r.ProvisionedBy, provs, r.Nodes)
	}
	var out strings.Builder
	r.Print(&out)
	if provs > 1 && !strings.Contains(out.String(), "provisioned by") {
		t.Errorf("table lacks the provisioners' split:\n%s", out.String())
	}
	if ha != "" && (!strings.Contains(out.String(), "claims lost by stage") || !strings.Contains(out.String(), "claim conflicts")) {
		t.Errorf("table lacks the claims' figures:\n%s", out.String())
	}
	t.Logf("provisioned by %v, claim conflicts %v, claims lost %v", r.ProvisionedBy, r.ClaimConflicts, r.ClaimsLost)
}

func checkResult(t *testing.T, r *Result, nodes, failures int) {
	t.Helper()
	if r.Provisioned != nodes || r.NotProvisioned != 0 || !r.OK() {
		t.Errorf("provisioned %d, not provisioned %d, want %d and 0", r.Provisioned, r.NotProvisioned, nodes)
	}
	if r.Duplicates != 0 {
		t.Errorf("duplicates %d: %v", r.Duplicates, r.DuplicateIdentities)
	}
	if got := r.Outcomes["provisioned"]; got != nodes {
		t.Errorf("provisioned outcomes %d, want %d (every node once)", got, nodes)
	}
	// In the ha modes an attempt whose claim lapsed under load (renewals
	// missing the lease) fails too, and is counted apart from errors.
	lost := 0
	for _, n := range r.ClaimsLost {
		lost += int(n)
	}
	if got := r.Outcomes["failed"]; got != failures+lost {
		t.Errorf("failed outcomes %d, want %d injected + %d claims lost", got, failures, lost)
	}
	if got := r.FailedByStage["helper"]; got != failures+int(r.ClaimsLost["helper"]) {
		t.Errorf("failed at helper %d, want %d (+%v claims lost)", got, failures, r.ClaimsLost["helper"])
	}
	if got := r.Errors["helper"]; got != float64(failures) {
		t.Errorf("errors_total{stage=helper} %v, want %d", got, failures)
	}
	if r.QueueShed != 0 || len(r.IntakeDropped) != 0 {
		t.Errorf("announcements dropped: %v shed, %v at the intake; want none with the queue as large as the fleet", r.QueueShed, r.IntakeDropped)
	}
	if len(r.SampleErrors) == 0 || !strings.Contains(fmt.Sprint(r.SampleErrors), errInjected.Error()) {
		t.Errorf("sample errors %v do not show the injected failure", r.SampleErrors)
	}
	stages := map[string]StageLatency{}
	for _, s := range r.Stages {
		stages[s.Stage] = s
		if s.MeanMS < 0 || s.P95MS < 0 {
			t.Errorf("stage %s: negative figures %+v", s.Stage, s)
		}
	}
	for _, name := range []string{"queue_wait", "inventory", "gencsr", "helper", "configure", "restart"} {
		if _, ok := stages[name]; !ok {
			t.Errorf("stage %s missing", name)
		}
	}
	if got := stages["helper"].Count; got != uint64(nodes+failures) && (lost == 0 || got < uint64(nodes+failures)) {
		t.Errorf("helper runs %d, want %d (%d claims lost)", got, nodes+failures, lost)
	}
	if got := stages["configure"].Count; got < uint64(nodes) {
		t.Errorf("configure RPCs %d, want at least %d", got, nodes)
	}
	for name, v := range map[string]float64{
		"seconds": r.Seconds, "nodes/min": r.NodesPerMin, "cpu": r.CPUSeconds, "child cpu": r.ChildCPUSeconds,
		"cpu/node": r.CPUMillisPerNode, "peak rss": r.PeakRSSMB, "p50": r.TimeToProduction.P50,
		"p99": r.TimeToProduction.P99, "max": r.TimeToProduction.Max, "idle goroutines": r.IdleAgentGoroutines,
	} {
		if v < 0 || math.IsNaN(v) {
			t.Errorf("%s = %v, want a non-negative number", name, v)
		}
	}
	if r.NodesPerMin == 0 || r.PeakRSSMB == 0 {
		t.Errorf("nodes/min %v, peak RSS %v: want positive", r.NodesPerMin, r.PeakRSSMB)
	}
	if r.TimeToProduction.P50 > r.TimeToProduction.P99 || r.TimeToProduction.P99 > r.TimeToProduction.Max {
		t.Errorf("percentiles out of order: %+v", r.TimeToProduction)
	}
	if r.IdleAgents != 10 {
		t.Errorf("idle agents %d, want 10", r.IdleAgents)
	}
	if r.GoroutinesAtEnd < nodes || r.GoroutinesAfterCleanup > r.GoroutinesBefore+2 {
		t.Errorf("goroutines %d before, %d with %d nodes in production, %d after cleanup: want every agent's back", r.GoroutinesBefore, r.GoroutinesAtEnd, nodes, r.GoroutinesAfterCleanup)
	}
	if r.HeapLiveAtEndMB <= 0 || r.HeapLiveAfterMB <= 0 {
		t.Errorf("live heap at end %v MB, after %v MB", r.HeapLiveAtEndMB, r.HeapLiveAfterMB)
	}
	var out strings.Builder
	r.Print(&out)
	for _, want := range []string{"nodes/min", "time to production", "memory per idle agent", "errors_total by stage", "live heap / goroutines", "agent state", "announcements dropped"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}
}

// checkBroker checks the broker's traffic of a run of nodes nodes, failures
// of which failed once at the helper: it counts at least each request and
// its reply (four for a provisioned node, inventory and gencsr for a failed
// attempt) and each node's two connections.
func checkBroker(t *testing.T, r *Result, nodes, failures int) {
	t.Helper()
	b := r.Broker
	if b == nil {
		t.Fatal("no broker traffic")
	}
	rpcs := int64(4*nodes + 2*failures)
	if b.MsgsIn < 2*rpcs || b.MsgsOut < 2*rpcs {
		t.Errorf("broker messages %d in, %d out; want at least %d each (%d requests and their replies)", b.MsgsIn, b.MsgsOut, 2*rpcs, rpcs)
	}
	if b.Connections < int64(2*nodes) {
		t.Errorf("broker connections %d, want at least %d (provisioning and production per node)", b.Connections, 2*nodes)
	}
	if b.Authentications["production"] < float64(nodes) || b.Authentications["unprovisioned"] < float64(nodes) {
		t.Errorf("broker authentications %v: want at least %d production and %d unprovisioned", b.Authentications, nodes, nodes)
	}
	if b.TokenRefusals != 0 || b.DuplicateRefusals != 0 {
		t.Errorf("broker refused %v connections for their token, %v for a duplicate identity: want none", b.TokenRefusals, b.DuplicateRefusals)
	}
	if b.BytesIn < b.MsgsIn || b.BytesOut < b.MsgsOut {
		t.Errorf("broker bytes %d in, %d out for %d / %d messages", b.BytesIn, b.BytesOut, b.MsgsIn, b.MsgsOut)
	}
	if want := float64(b.MsgsIn) / float64(r.Provisioned); b.MsgsInPerNode != want {
		t.Errorf("messages in per node %v, want %v", b.MsgsInPerNode, want)
	}
	var out strings.Builder
	r.Print(&out)
	if !strings.Contains(out.String(), "broker traffic") {
		t.Errorf("table lacks the broker traffic:\n%s", out.String())
	}
}

// checkHeapSettle checks the settled heap of a run with Options.HeapSettle
// limit (zero: none).
func checkHeapSettle(t *testing.T, r *Result, limit time.Duration) {
	t.Helper()
	var out strings.Builder
	r.Print(&out)
	settled := strings.Contains(out.String(), "live heap, settled")
	switch {
	case limit <= 0 && (r.HeapSettleSeconds != 0 || settled):
		t.Errorf("heap settled after %v s without HeapSettle", r.HeapSettleSeconds)
	case limit <= 0:
	case !r.HeapSettled || !settled:
		t.Errorf("heap not settled in %v (%v MB after %v s, printed: %v)", limit, r.HeapLiveSettledMB, r.HeapSettleSeconds, settled)
	case r.HeapLiveSettledMB <= 0 || r.HeapLiveSettledMB > r.HeapLiveAfterMB:
		t.Errorf("settled heap %v MB, %v MB right after cleanup: want positive and no more", r.HeapLiveSettledMB, r.HeapLiveAfterMB)
	case r.HeapSettleSeconds < heapSettleQuiet.Seconds():
		t.Errorf("settled after %v s, before a quiet %v", r.HeapSettleSeconds, heapSettleQuiet)
	}
}

// TestSettle checks when settle stops: once nothing fell by more than 1 %
// for the quiet time, or at the limit while it still falls.
func TestSettle(t *testing.T) {
	seq := func(vs ...float64) func() float64 {
		i := 0
		return func() float64 {
			v := vs[min(i, len(vs)-1)]
			i++
			return v
		}
	}
	ctx := context.Background()
	const poll, quiet = time.Millisecond, 40 * time.Millisecond

	low, took, ok := settle(ctx, 100, time.Minute, poll, quiet, seq(80, 50, 20, 20.1, 19.9))
	if !ok || low != 19.9 || took < quiet {
		t.Errorf("falling then flat: low %v after %v, settled %v; want 19.9, settled after at least %v", low, took, ok, quiet)
	}

	// A drift under 1 % a reading is not a fall.
	v := 100.0
	low, _, ok = settle(ctx, v, time.Minute, poll, quiet, func() float64 { v *= 0.995; return v })
	if !ok || low >= 100 {
		t.Errorf("drift: low %v, settled %v; want settled below 100", low, ok)
	}

	v = 1e6
	low, took, ok = settle(ctx, v, 4*quiet, poll, 10*quiet, func() float64 { v *= 0.9; return v })
	if ok || took < 4*quiet || low >= 1e6 {
		t.Errorf("still falling: low %v after %v, settled %v; want unsettled at the limit %v", low, took, ok, 4*quiet)
	}

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if low, _, ok = settle(cctx, 7, time.Minute, poll, quiet, seq(1)); ok || low != 7 {
		t.Errorf("cancelled: low %v, settled %v; want 7 (no reading), not settled", low, ok)
	}
}

// TestRunProcesses runs a few agents as real muster-agent processes (built
// from this tree) and checks the same accounting.
func TestRunProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds muster-agent and starts processes")
	}
	const nodes = 4
	r := runFailingOne(t, Options{Nodes: nodes, Processes: true}, demo.Identity(1))
	if !r.Processes || r.Transport != TransportTCP || r.ProductionConnections != "TCP + mutual TLS" {
		t.Errorf("processes %v transport %s production %q", r.Processes, r.Transport, r.ProductionConnections)
	}
	if r.AgentProcesses != nodes || r.AgentCPUSeconds <= 0 || r.AgentProcessRSSMB <= 0 {
		t.Errorf("agent processes %d, CPU %v s, RSS %v MB", r.AgentProcesses, r.AgentCPUSeconds, r.AgentProcessRSSMB)
	}
	if r.GoroutinesAfterCleanup > r.GoroutinesBefore+2 {
		t.Errorf("goroutines %d after cleanup, %d before: leak", r.GoroutinesAfterCleanup, r.GoroutinesBefore)
	}
	checkFloor(t, r, 11) // with the agent's two process starts
}

// TestRunFleetProcess runs the agents in a fleet host (this test binary,
// see TestMain) and checks the same accounting, the fleet's CPU apart from
// this process's, and the provisioning side's figure.
func TestRunFleetProcess(t *testing.T) {
	r := runFailingOne(t, Options{
		Nodes: 4, FleetProcess: true, FleetCommand: []string{os.Args[0]}, FleetEnv: []string{fleetHostTestEnv + "=1"},
	}, demo.Identity(2))
	if !r.FleetProcess || r.Processes || r.Transport != TransportTCP || r.IdleAgents != 0 {
		t.Errorf("fleet process %v, processes %v, transport %s, idle agents %d", r.FleetProcess, r.Processes, r.Transport, r.IdleAgents)
	}
	if r.ProductionReconnects != 0 {
		t.Errorf("%d production reconnects", r.ProductionReconnects)
	}
	if r.TimeToProduction.P50 <= 0 || r.TimeToProduction.Max < r.TimeToProduction.P50 || r.NodesPerMin <= 0 {
		t.Errorf("time to production %+v, %v nodes/min", r.TimeToProduction, r.NodesPerMin)
	}
	// The built-in helper runs in this process: no helper CPU, and none
	// of the fleet host's (it was alive before the clock started).
	if r.ChildCPUSeconds != 0 {
		t.Errorf("helper processes' CPU %v s, want 0 with the built-in helper", r.ChildCPUSeconds)
	}
	if r.AgentProcesses != 1 || r.AgentCPUSeconds <= 0 || r.FleetProcessRSSMB <= 0 {
		t.Errorf("fleet process: %d processes, CPU %v s, RSS %v MB", r.AgentProcesses, r.AgentCPUSeconds, r.FleetProcessRSSMB)
	}
	ps := r.ProvisioningSide
	if ps == nil || ps.Cores != r.Machine.CPUs || ps.MillisPerNode != r.CPUMillisPerNode+r.ChildCPUMillisPerNode || ps.NodesPerMin <= 0 {
		t.Fatalf("provisioning side %+v (CPU %v + %v ms/node)", ps, r.CPUMillisPerNode, r.ChildCPUMillisPerNode)
	}
	var out strings.Builder
	r.Print(&out)
	for _, want := range []string{"all in one other process, the fleet host", "fleet process ", "provisioning side "} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	if r.GoroutinesAfterCleanup > r.GoroutinesBefore+2 {
		t.Errorf("goroutines %d after cleanup, %d before: leak", r.GoroutinesAfterCleanup, r.GoroutinesBefore)
	}
	checkFloor(t, r, 10)
}

// runFailingOne runs o (Nodes and where the agents run set by the caller)
// with 2 workers and a helper that fails fail's first attempt, and checks
// that every node was provisioned exactly once and the failure counted at
// the helper stage.
func runFailingOne(t *testing.T, o Options, fail string) *Result {
	t.Helper()
	o.Workers, o.StateDir = 2, t.TempDir()
	o.Timeout, o.DeferBackoff, o.Settle = 2*time.Minute, 50*time.Millisecond, 200*time.Millisecond
	o.WrapHelper = func(h helper.Helper) helper.Helper {
		return &flakyHelper{h: h, fail: map[string]bool{fail: true}, failed: map[string]bool{}}
	}
	r, err := Run(context.Background(), o)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if r.Provisioned != o.Nodes || !r.OK() || r.Outcomes["provisioned"] != o.Nodes {
		t.Errorf("provisioned %d (outcomes %v), not provisioned %d, duplicates %d", r.Provisioned, r.Outcomes, r.NotProvisioned, r.Duplicates)
	}
	if r.Outcomes["failed"] != 1 || r.FailedByStage["helper"] != 1 || r.Errors["helper"] != 1 {
		t.Errorf("failures: outcomes %v, by stage %v, errors %v; want 1 at helper", r.Outcomes, r.FailedByStage, r.Errors)
	}
	return r
}

func TestAgentBinaryChecks(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := AgentBinary(context.Background(), dir, ""); err == nil {
		t.Error("a directory accepted as agent binary")
	}
	if _, _, err := AgentBinary(context.Background(), dir+"/missing", ""); err == nil {
		t.Error("a missing file accepted as agent binary")
	}
	t.Setenv("PATH", dir)
	if _, _, err := AgentBinary(context.Background(), "", dir); !errors.Is(err, ErrNoGo) {
		t.Errorf("build without go: %v, want ErrNoGo", err)
	}
}
