package provisioner

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/claims"
	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/nodestate"
	"github.com/muster-io/muster/internal/protocol"
)

// haProvisioner is a provisioner in an ha mode on its own connection, so a
// test can cut the connection to simulate a crash.
type haProvisioner struct {
	*running
	nc *nats.Conn
}

func startHA(t *testing.T, url, name, mode string, h helper.Helper) *haProvisioner {
	t.Helper()
	return startHALease(t, url, name, mode, h, 2*time.Second)
}

// startHALease is startHA with the given claim lease. The tests that wait
// for leases to lapse use startHA's short one.
func startHALease(t *testing.T, url, name, mode string, h helper.Helper, lease time.Duration) *haProvisioner {
	t.Helper()
	return startHAReplicas(t, url, name, mode, h, lease, 0)
}

// startHAReplicas is startHALease with the shared state's replicas.
func startHAReplicas(t *testing.T, url, name, mode string, h helper.Helper, lease time.Duration, replicas int) *haProvisioner {
	t.Helper()
	cfg := testConfig()
	cfg.Name = name
	cfg.HA = HAConfig{Mode: mode, Lease: Duration(lease), Replicas: replicas}
	cfg.Workers = 4
	cfg.Grace = Duration(time.Minute)
	// Three provisioners under the race detector on a shared machine:
	// give replies time, so that few requests are retried.
	cfg.RPCTimeout = Duration(2 * time.Second)
	nc, err := nats.Connect(url, nats.NoReconnect())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	r := runWith(t, Options{Config: cfg, Helper: h, Conn: nc, DrainTimeout: time.Second}, nil)
	return &haProvisioner{running: r, nc: nc}
}

// exactlyOnce waits until every node restarted, then checks that each was
// configured and restarted by one provisioner only. A provisioner may send
// one of those requests twice: the RPC retry after a reply that came later
// than rpc_timeout (the node handles the repeat; a real agent restarts
// once), which is not a second provisioning. A configure from another of
// ps is allowed only when that provisioner logged losing its claim on the
// node (under load a renewal can miss a lease: its attempt stops, the
// configure it sent stands, and the next holder runs the node again, as
// designed). On a timeout it says, for each node not restarted, what the
// node was asked and what each of ps knows of it.
func exactlyOnce(t *testing.T, fleet *simFleet, ids []string, timeout time.Duration, ps ...*haProvisioner) {
	t.Helper()
	waiting := func() []string {
		var left []string
		for _, id := range ids {
			if _, restarted, _ := fleet.nodes[id].stats(); restarted == 0 {
				left = append(left, id)
			}
		}
		return left
	}
	deadline := time.Now().Add(timeout)
	for left := waiting(); len(left) > 0; left = waiting() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for every node provisioned; %d of %d not restarted:\n%s", len(left), len(ids), diagnoseNodes(fleet, left, ps))
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, id := range ids {
		n := fleet.nodes[id]
		cfg, rst := n.sendersOf(protocol.ActionConfigure), n.sendersOf(protocol.ActionRestart)
		restarters, others := 0, 0
		var lost []string
		for p := range cfg {
			switch {
			case rst[p] > 0:
				restarters++
			case lostClaim(ps, p, id):
				lost = append(lost, p)
			default:
				others++
			}
		}
		if len(rst) != 1 || restarters != 1 || others != 0 {
			t.Errorf("%s configured by %v and restarted by %v, want one provisioner\n%s", id, cfg, rst, diagnoseNodes(fleet, []string{id}, ps))
		} else if len(lost) > 0 {
			t.Logf("%s: configured by %v, restarted by %v; %v lost the claim first", id, cfg, rst, lost)
		}
	}
}

// lostClaim reports whether the provisioner of ps named name logged losing
// its claim on the node id.
func lostClaim(ps []*haProvisioner, name, id string) bool {
	for _, p := range ps {
		if p.p.cfg.Name == name && slices.ContainsFunc(logLinesAbout(p, id), func(l string) bool { return strings.Contains(l, "claim lost") }) {
			return true
		}
	}
	return false
}

// logLinesAbout returns p's log lines about the node id.
func logLinesAbout(p *haProvisioner, id string) []string {
	var lines []string
	for _, l := range strings.Split(p.logs.String(), "\n") {
		if strings.Contains(l, "identity="+id) {
			lines = append(lines, l)
		}
	}
	return lines
}

// diagnoseNodes describes nodes for a failure message: the requests each
// received, each provisioner's view of it and its last log lines about it.
func diagnoseNodes(fleet *simFleet, ids []string, ps []*haProvisioner) string {
	var b strings.Builder
	for _, id := range ids {
		n := fleet.nodes[id]
		n.mu.Lock()
		fmt.Fprintf(&b, "%s: requests %v, configure/restart senders %v\n", id, n.counts, n.senders)
		n.mu.Unlock()
		for _, p := range ps {
			st, ok := nodeState(p.p, id)
			fmt.Fprintf(&b, "  %s: known %v, %+v\n", p.p.cfg.Name, ok, st)
			lines := logLinesAbout(p, id)
			for _, l := range lines[max(0, len(lines)-8):] {
				fmt.Fprintf(&b, "    %s\n", l)
			}
		}
	}
	return b.String()
}

// simNodes adds n nodes that behave as agents do where it matters to
// several provisioners: a node keeps its key across attempts, and at its
// restart goes to production and announces its arrival there (so a
// provisioner that lost its claim or the restart's reply under load learns
// of it as in a real fleet).
func simNodes(t *testing.T, fleet *simFleet, n int) []string {
	t.Helper()
	var ids []string
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("ha%03d.example.net", i)
		ids = append(ids, id)
		node := keyReusingNode(fleet, id, nil)
		node.mu.Lock()
		node.arrive = func(serial string) {
			if err := fleet.arrival(id, nuid.Next(), serial); err != nil {
				t.Errorf("%s: announce the arrival: %v", id, err)
			}
		}
		node.mu.Unlock()
	}
	return ids
}

func TestClaimsModeProvisionsEachNodeOnce(t *testing.T) {
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	ids := simNodes(t, fleet, 60)
	// The default lease: nothing here waits for one to lapse, and under
	// several race-enabled suites at once the tests' 2 s lease was missed
	// so often that 60 nodes took minutes (attempts stop when renewals
	// miss the lease, as designed). Exactly once is what is checked, with
	// a bound for a loaded machine.
	var ps []*haProvisioner
	for i := 0; i < 3; i++ {
		ps = append(ps, startHALease(t, url, fmt.Sprintf("prov-%d", i), HAClaims, newTestHelper(c, nil), DefaultLease))
	}
	for _, id := range ids {
		fleet.publishMetadata(id)
	}
	exactlyOnce(t, fleet, ids, 2*time.Minute, ps...)

	// The shared node state says who provisioned each node.
	js, _ := jetstream.New(connect(t, url))
	ns, err := nodestate.Open(context.Background(), js, "")
	if err != nil {
		t.Fatal(err)
	}
	// Under load the last records are written some seconds after the
	// restarts; a timeout says which records were not yet as expected.
	var notYet []string
	var listErr error
	deadline := time.Now().Add(30 * time.Second)
	for {
		recs, _, err := ns.List(context.Background())
		listErr, notYet = err, nil
		for _, r := range recs {
			if r.State != string(StateProvisioned) && r.State != string(StateProduction) || r.ProvisionedBy == "" || r.Serial == "" || r.Pending != nil {
				notYet = append(notYet, fmt.Sprintf("%s: state %q by %q serial %q pending %v", r.Identity, r.State, r.ProvisionedBy, r.Serial, r.Pending != nil))
			}
		}
		if err == nil && len(recs) == len(ids) && len(notYet) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node state not recorded: %d of %d records (list error %v), not provisioned yet: %v", len(recs), len(ids), listErr, notYet)
		}
		time.Sleep(50 * time.Millisecond)
	}
	by := map[string]int{}
	recs, _, _ := ns.List(context.Background())
	for _, r := range recs {
		by[r.ProvisionedBy]++
		if r.Provisions != 1 {
			t.Errorf("%s: the shared state counts %d provisionings, want 1", r.Identity, r.Provisions)
		}
	}
	t.Logf("nodes provisioned per provisioner: %v", by)
	// Each provisioner's counts by state (elsewhere: the nodes the
	// others took) match its nodes.
	for _, hp := range ps {
		checkStateCounts(t, hp.p)
	}
}

// TestClaimsModeR3ReadsFromLeader: with the shared state replicated on a
// cluster of three servers, two provisioners provision every node once,
// and none of their reads of the claims, node state or registry buckets
// is a direct get (which a follower may answer with a stale value).
func TestClaimsModeR3ReadsFromLeader(t *testing.T) {
	urls := natstest.Cluster(t, 3)
	watch := connect(t, urls[0])
	var mu sync.Mutex
	direct, leader := map[string]int{}, map[string]int{}
	count := func(into map[string]int) nats.MsgHandler {
		return func(m *nats.Msg) {
			// $JS.API.DIRECT.GET.<stream>[.<subject>] or
			// $JS.API.STREAM.MSG.GET.<stream>
			tok := strings.Split(m.Subject, ".")
			stream := tok[4]
			if tok[2] == "STREAM" {
				stream = tok[5]
			}
			mu.Lock()
			into[stream]++
			mu.Unlock()
		}
	}
	if _, err := watch.Subscribe("$JS.API.DIRECT.GET.>", count(direct)); err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Subscribe("$JS.API.STREAM.MSG.GET.*", count(leader)); err != nil {
		t.Fatal(err)
	}
	if err := watch.Flush(); err != nil {
		t.Fatal(err)
	}

	c := newCA(t)
	fleet := newSimFleet(t, urls[0], c.CertificatePEM())
	ids := simNodes(t, fleet, 20)
	var ps []*haProvisioner
	for i := 0; i < 2; i++ {
		ps = append(ps, startHAReplicas(t, urls[1+i], fmt.Sprintf("prov-%d", i), HAClaims, newTestHelper(c, nil), DefaultLease, 3))
	}
	for _, id := range ids {
		fleet.publishMetadata(id)
	}
	exactlyOnce(t, fleet, ids, 2*time.Minute, ps...)
	for _, hp := range ps {
		hp.stop(t)
	}
	if err := watch.Flush(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	for _, stream := range []string{"KV_" + claims.DefaultBucket, "KV_" + nodestate.DefaultBucket, "KV_" + RegistryBucket} {
		if direct[stream] != 0 {
			t.Errorf("%s: %d direct gets", stream, direct[stream])
		}
	}
	if leader["KV_"+claims.DefaultBucket] == 0 || leader["KV_"+nodestate.DefaultBucket] == 0 || leader["KV_"+RegistryBucket] == 0 {
		t.Errorf("reads from the leader by stream: %v (direct: %v)", leader, direct)
	}
	t.Logf("reads from the leader by stream: %v", leader)
}

func TestClaimsModeCrashedProvisionerIsReplaced(t *testing.T) {
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	ids := simNodes(t, fleet, 12)
	// A's helper never answers: A claims nodes and sits on them.
	stuck := make(chan struct{})
	defer close(stuck)
	hung := newTestHelper(c, func(req *helper.Request, call int) (*helper.Reply, error, bool) {
		<-stuck
		return nil, context.Canceled, true
	})
	a := startHA(t, url, "prov-a", HAClaims, hung)
	for _, id := range ids {
		fleet.publishMetadata(id)
	}
	// Any node: which ones A's four workers take first depends on the
	// order announcements and discovery replies come in.
	waitFor(t, 30*time.Second, "A working", func() bool {
		return slices.ContainsFunc(ids, func(id string) bool { return hung.callCount(id) > 0 })
	})
	b := startHA(t, url, "prov-b", HAClaims, newTestHelper(c, nil))
	// Crash A: its connection goes away without releasing anything.
	crashed := time.Now()
	a.nc.Close()
	exactlyOnce(t, fleet, ids, 90*time.Second, a, b)
	t.Logf("all %d nodes provisioned by B %.1fs after A crashed (lease 2s)", len(ids), time.Since(crashed).Seconds())
}

func TestLeaderModeOneActiveAndFailover(t *testing.T) {
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	ids := simNodes(t, fleet, 10)
	// Found only through their announcements (not broadcast discovery),
	// so that the leader that crashes knows only the first five: a node
	// it was configuring when it crashed would be configured again by the
	// next leader, as designed, which is not what this test counts.
	for _, id := range ids {
		n := fleet.nodes[id]
		n.mu.Lock()
		n.silent = true
		n.mu.Unlock()
	}
	a := startHA(t, url, "prov-a", HALeader, newTestHelper(c, nil))
	waitFor(t, 20*time.Second, "A leads", func() bool { return a.p.Active() })
	b := startHA(t, url, "prov-b", HALeader, newTestHelper(c, nil))
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if b.p.Active() {
			t.Fatal("two active provisioners")
		}
	}
	for _, id := range ids[:5] {
		fleet.publishMetadata(id)
	}
	exactlyOnce(t, fleet, ids[:5], 60*time.Second, a, b)

	// Crash the leader: B takes over within about a lease.
	crashed := time.Now()
	a.nc.Close()
	waitFor(t, 30*time.Second, "B leads", func() bool { return b.p.Active() })
	t.Logf("failover to the standby took %.1fs (lease 2s)", time.Since(crashed).Seconds())
	for _, id := range ids[5:] {
		fleet.publishMetadata(id)
	}
	exactlyOnce(t, fleet, ids, 60*time.Second, a, b)
}

// TestClaimsModeCountsConflictsAndClaimErrors: a node another provisioner
// holds is parked elsewhere until a lease has passed and counted in
// claim_conflicts_total; a claim the store cannot make is an error at
// stage claim.
func TestClaimsModeCountsConflictsAndClaimErrors(t *testing.T) {
	url := natstest.Server(t, true)
	c := newCA(t)
	// A long lease: the node must still be parked when the test looks,
	// however slowly a loaded machine runs it.
	r := startHALease(t, url, "prov-a", HAClaims, newTestHelper(c, nil), 30*time.Second)
	js, err := jetstream.New(connect(t, url))
	if err != nil {
		t.Fatal(err)
	}
	other, err := claims.New(context.Background(), js, claims.Config{Owner: "prov-b", Lease: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	const id = "busy.example.net"
	if _, err := other.Claim(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	waitState := func(id string) NodeStatus {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			if st, ok := nodeState(r.p, id); ok && st.State == StateElsewhere {
				return st
			}
			if time.Now().After(deadline) {
				st, _ := nodeState(r.p, id)
				t.Fatalf("%s not elsewhere: %+v", id, st)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if !r.p.offer(id, sourceMetadata, nodeLife{}) {
		t.Fatal("not queued")
	}
	st := waitState(id)
	if got := testutil.ToFloat64(r.p.m.claimConflicts); got != 1 {
		t.Fatalf("claim_conflicts_total %v, want 1", got)
	}
	if !st.RetryAt.After(time.Now()) || r.p.offer(id, sourceMetadata, nodeLife{}) {
		t.Fatalf("a node claimed elsewhere was taken again before its retry_at %s", st.RetryAt)
	}
	if got := testutil.ToFloat64(r.p.m.errors.WithLabelValues(string(StageClaim))); got != 0 {
		t.Fatalf("errors_total{stage=claim} %v for a conflict", got)
	}

	// Without its claims bucket the store cannot claim anything.
	if err := js.DeleteKeyValue(context.Background(), claims.DefaultBucket); err != nil {
		t.Fatal(err)
	}
	if !r.p.offer("orphan.example.net", sourceMetadata, nodeLife{}) {
		t.Fatal("not queued")
	}
	waitState("orphan.example.net")
	if got := testutil.ToFloat64(r.p.m.errors.WithLabelValues(string(StageClaim))); got != 1 {
		t.Fatalf("errors_total{stage=claim} %v, want 1", got)
	}
	if got := testutil.ToFloat64(r.p.m.claimConflicts); got != 1 {
		t.Fatalf("claim_conflicts_total %v after a claim error, want still 1", got)
	}
}
