package provisioner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/muster-io/muster/internal/claims"
	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/nodestate"
	"github.com/muster-io/muster/internal/protocol"
)

// kvView reads the shared node state and identity registry.
type kvView struct {
	t     *testing.T
	nodes *nodestate.Store
	reg   *kvRegistry
}

func openKV(t *testing.T, url string) *kvView {
	t.Helper()
	js, err := jetstream.New(connect(t, url))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	ns, err := nodestate.New(ctx, js, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := openKVRegistry(ctx, js, 0)
	if err != nil {
		t.Fatal(err)
	}
	return &kvView{t: t, nodes: ns, reg: reg}
}

func (v *kvView) record(id string) *nodestate.Record {
	v.t.Helper()
	r, err := v.nodes.Get(context.Background(), id)
	if err != nil {
		return &nodestate.Record{Identity: id}
	}
	return r
}

// publishArrival publishes a node's provisioned event from production (as
// the broker imports it into the provisioning account).
func (f *simFleet) publishArrival(id, eventID, serial string) {
	f.t.Helper()
	if err := f.arrival(id, eventID, serial); err != nil {
		f.t.Fatal(err)
	}
}

// arrival publishes a node's provisioned event from production (safe from
// any goroutine).
func (f *simFleet) arrival(id, eventID, serial string) error {
	b, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: eventID, Identity: id, Component: protocol.AgentComponent,
		Type: protocol.EventProvisioned, Time: time.Now().UTC(), Serial: serial})
	return f.nc.Publish("production."+protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, id), b)
}

// announceUntil publishes the node's metadata every 100 ms until cond
// holds (a waiting node announces itself on an interval).
func announceUntil(t *testing.T, fleet *simFleet, id string, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		fleet.publishMetadata(id)
		time.Sleep(100 * time.Millisecond)
	}
}

// lifeNode adds a key-reusing node found only through its announcements,
// in a provisioning life with an ID (first); second is an ID for its next
// life (setLife).
func lifeNode(fleet *simFleet, id string) (n *simNode, first, second string) {
	n = keyReusingNode(fleet, id, nil)
	first, second = protocol.NewLife(), protocol.NewLife()
	n.mu.Lock()
	n.silent = true
	n.life = first
	n.mu.Unlock()
	return n, first, second
}

// setLife starts a new provisioning life of the node, with the ID life.
func (n *simNode) setLife(life string) {
	n.mu.Lock()
	n.life = life
	n.mu.Unlock()
}

// keyReusingNode adds a simulated node that keeps its key across gencsr
// requests, as Muster's agent does.
func keyReusingNode(fleet *simFleet, id string, behave nodeBehaviour) *simNode {
	n := fleet.add(id, behave)
	n.mu.Lock()
	n.reuseKey = true
	n.mu.Unlock()
	return n
}

func (n *simNode) keyFingerprint(t *testing.T) string {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	fp, err := Fingerprint(n.key.Public())
	if err != nil {
		t.Fatal(err)
	}
	return fp
}

func (n *simNode) configuredSerials() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.serials...)
}

// TestClaimsModeProvisionerDiesBetweenConfigureAndRestart: provisioner A
// is killed the moment its restart request leaves, after the node
// acknowledged configure. The node stays in provisioning mode; B takes it
// when A's claim lapses, runs it again with the same key (not held: A had
// recorded the key the node really has), configures and restarts it. The
// shared state counts one provisioning, by B, with B's certificate.
func TestClaimsModeProvisionerDiesBetweenConfigureAndRestart(t *testing.T) {
	const id = "crash1.example.net"
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	a := startHA(t, url, "prov-a", HAClaims, newTestHelper(c, nil))
	var killed atomic.Bool
	node := keyReusingNode(fleet, id, func(action string, n int) (bool, protocol.Code) {
		if action == protocol.ActionRestart && killed.CompareAndSwap(false, true) {
			a.nc.Close() // A dies; its restart request is never answered
			return true, ""
		}
		return false, ""
	})
	announceUntil(t, fleet, id, 30*time.Second, "A configured the node and died", killed.Load)
	if configured, restarted, _ := node.stats(); configured != 1 || restarted != 0 {
		t.Fatalf("after A: configured %d, restarted %d", configured, restarted)
	}
	kv := openKV(t, url)
	if r := kv.record(id); r.Pending == nil || r.Pending.By != "prov-a" || r.Provisions != 0 {
		t.Fatalf("state after A died: %+v", r)
	}
	if rec, ok, _ := kv.reg.Get(id); !ok || rec.KeyFingerprint != node.keyFingerprint(t) {
		t.Fatalf("A did not record the configured key: %+v", rec)
	}

	b := startHA(t, url, "prov-b", HAClaims, newTestHelper(c, nil))
	announceUntil(t, fleet, id, 60*time.Second, "B restarted the node", func() bool {
		_, restarted, _ := node.stats()
		return restarted == 1
	})
	// (A request may be sent twice when its reply is late: an RPC retry
	// of one provisioner, not a second provisioning.)
	cfg, rst := node.sendersOf(protocol.ActionConfigure), node.sendersOf(protocol.ActionRestart)
	if len(cfg) != 2 || cfg["prov-a"] == 0 || cfg["prov-b"] == 0 || len(rst) != 2 || rst["prov-a"] != 1 || rst["prov-b"] == 0 {
		t.Fatalf("configure from %v, restart from %v", cfg, rst)
	}
	serials := node.configuredSerials()
	last := serials[len(serials)-1]
	waitFor(t, 10*time.Second, "B's outcome in the shared state", func() bool {
		return kv.record(id).Provisions == 1
	})
	r := kv.record(id)
	if r.State != string(StateProvisioned) || r.ProvisionedBy != "prov-b" || r.Serial != last || r.Pending != nil {
		t.Fatalf("shared state %+v, want provisioned once by prov-b with %s", r, last)
	}
	if rec, _, _ := kv.reg.Get(id); rec.KeyFingerprint != node.keyFingerprint(t) || rec.Serial != last {
		t.Fatalf("registry %+v", rec)
	}
	for _, n := range b.p.Nodes() {
		if n.Identity == id && (n.State == StateHeld || n.HoldReason != "") {
			t.Fatalf("B held the node: %+v", n)
		}
	}
}

// TestClaimsModeArrivalCompletesUnconfirmedRestart: the node acknowledges
// configure and then goes away without answering restart (killed, then
// back in production on its own). A's attempt fails at restart with the
// certificate still pending; A stops. The node's provisioned event arrives
// while no provisioner runs; B, started later, reads it from the arrivals
// stream and completes the provisioning: counted once, the key recorded. A
// repeated event and one with an unknown serial change nothing.
func TestClaimsModeArrivalCompletesUnconfirmedRestart(t *testing.T) {
	const id = "crash2.example.net"
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	var gone atomic.Bool // the node left provisioning mode
	node := keyReusingNode(fleet, id, func(action string, n int) (bool, protocol.Code) {
		return action == protocol.ActionRestart || gone.Load(), ""
	})
	node.mu.Lock()
	node.silent = true // found only through the metadata announceUntil sends
	node.mu.Unlock()
	a := startHA(t, url, "prov-a", HAClaims, newTestHelper(c, nil))
	kv := openKV(t, url)
	announceUntil(t, fleet, id, 30*time.Second, "A's attempt to fail at restart", func() bool {
		r := kv.record(id)
		return r.State == string(StateFailed) && r.Stage == string(StageRestart)
	})
	r := kv.record(id)
	serials := node.configuredSerials()
	if len(serials) != 1 || r.Pending == nil || r.Pending.Serial != serials[0] || r.Provisions != 0 {
		t.Fatalf("after the failed restart: %+v (configured %v)", r, serials)
	}
	a.stop(t)

	// Back in production on its own (it answers nothing on the
	// provisioning side any more); no provisioner is running.
	gone.Store(true)
	eventID := nuid.Next()
	fleet.publishArrival(id, eventID, serials[0])
	fleet.publishArrival(id, nuid.Next(), "abcdef0123") // forged: not its certificate
	b := startHA(t, url, "prov-b", HAClaims, newTestHelper(c, nil))
	// A's connection stays open after A stopped: JetStream may hand the
	// event to A's last pull request, and B gets it once the consumer's
	// AckWait (30 s) has passed. Either way B records it.
	waitFor(t, 50*time.Second, "the arrival recorded", func() bool { return kv.record(id).Provisions == 1 })
	r = kv.record(id)
	if r.State != string(StateProduction) || r.Serial != serials[0] || r.ProvisionedBy != "prov-a" || r.Pending != nil || r.ArrivedAt.IsZero() {
		t.Fatalf("after the arrival: %+v", r)
	}
	if rec, _, _ := kv.reg.Get(id); rec.KeyFingerprint != node.keyFingerprint(t) || rec.Serial != serials[0] {
		t.Fatalf("registry %+v", rec)
	}
	// B counts the completion just after its write, which the record
	// already shows: wait for the count (reading it once failed under
	// load, with B's count and its log line still to come).
	counted := func() bool { return testutil.ToFloat64(b.p.m.completedOnArrival) == 1 }
	for deadline := time.Now().Add(10 * time.Second); !counted() && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if !counted() || testutil.ToFloat64(a.p.m.completedOnArrival) != 0 {
		t.Fatalf("completed_on_arrival_total = %v on B, %v on A; record %+v\nA's log:\n%s\nB's log:\n%s",
			testutil.ToFloat64(b.p.m.completedOnArrival), testutil.ToFloat64(a.p.m.completedOnArrival), r, a.logs.String(), b.logs.String())
	}
	// The node announces the same arrival again after a reconnection.
	fleet.publishArrival(id, eventID, serials[0])
	waitFor(t, 20*time.Second, "the repeated arrival consumed", func() bool {
		info, err := b.p.shared.arrivals.Info(context.Background())
		return err == nil && info.AckFloor.Stream >= 3 && info.NumAckPending == 0
	})
	if r := kv.record(id); r.Provisions != 1 || r.State != string(StateProduction) || !counted() {
		t.Fatalf("after the repeated arrival: %+v, completed_on_arrival_total %v on B", r, testutil.ToFloat64(b.p.m.completedOnArrival))
	}
	if cfg := node.sendersOf(protocol.ActionConfigure); len(cfg) != 1 || cfg["prov-a"] == 0 {
		t.Fatalf("configure from %v", cfg)
	}
	if _, restarted, _ := node.stats(); restarted != 0 {
		t.Fatalf("restarted %d times", restarted)
	}
}

// TestClaimsModeReprovisionAfterProduction: a node in production is not
// taken again when it merely announces itself, but is when it starts up in
// provisioning mode after it arrived (reprovisioned); the second
// provisioning is counted as such.
func TestClaimsModeReprovisionAfterProduction(t *testing.T) {
	const id = "reprov.example.net"
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	node := keyReusingNode(fleet, id, nil)
	a := startHA(t, url, "prov-a", HAClaims, newTestHelper(c, nil))
	kv := openKV(t, url)
	announceUntil(t, fleet, id, 30*time.Second, "the first provisioning", func() bool { return kv.record(id).Provisions == 1 })
	fleet.publishArrival(id, nuid.Next(), node.configuredSerials()[0])
	// The shared record, and this provisioner's own view: under load the
	// first attempt can still be finishing when the record shows
	// production, and a startup event then finds the node in progress (an
	// agent's metadata would carry the new life's start; this test checks
	// the startup event alone).
	waitFor(t, 20*time.Second, "the node in production", func() bool {
		st, _ := nodeState(a.p, id)
		return kv.record(id).State == string(StateProduction) && st.State == StateProduction
	})

	fleet.publishStartup(id) // reprovisioned: it starts in provisioning mode again
	waitFor(t, 30*time.Second, "the second provisioning", func() bool { return kv.record(id).Provisions == 2 })
	serials := node.configuredSerials()
	if r := kv.record(id); r.Serial != serials[len(serials)-1] {
		t.Fatalf("state %+v, configured %v", r, serials)
	}
}

// TestClaimsModeReprovisionWithoutStartupEvent: a node reinstalled after it
// arrived in production whose startup event no provisioner took (it came
// while the last attempt was finishing, the claim could not be written, the
// queue was full) is taken again from its metadata, which says when its new
// life started; the old life's late announcements, which say it started
// before the arrival, are not.
func TestClaimsModeReprovisionWithoutStartupEvent(t *testing.T) {
	const id = "reinstalled.example.net"
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	node := keyReusingNode(fleet, id, nil)
	node.mu.Lock()
	node.silent = true // found only through its announcements
	node.mu.Unlock()
	firstLife := time.Now().UTC()
	a := startHA(t, url, "prov-a", HAClaims, newTestHelper(c, nil))
	kv := openKV(t, url)
	announceUntil(t, fleet, id, 30*time.Second, "the first provisioning", func() bool { return kv.record(id).Provisions == 1 })
	fleet.publishArrival(id, nuid.Next(), node.configuredSerials()[0])
	waitFor(t, 20*time.Second, "the node in production", func() bool { return kv.record(id).State == string(StateProduction) })
	before := kv.record(id)

	// The first life's late announcements, and one that says no start,
	// do not queue the node. The provisioner takes its messages in order
	// from one connection: once it counted the malformed one sent after
	// them, it has taken them all.
	invalid := testutil.ToFloat64(a.p.m.invalid.WithLabelValues(sourceMetadata))
	for range 5 {
		fleet.publishLifeMetadata(id, nodeLife{started: firstLife})
	}
	fleet.publishMetadata(id)
	if err := fleet.nc.Publish(protocol.MetadataSubjectFor(id), []byte("{")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the announcements taken in", func() bool {
		return testutil.ToFloat64(a.p.m.invalid.WithLabelValues(sourceMetadata)) == invalid+1
	})
	if st, _ := nodeState(a.p, id); st.State != StateProduction {
		t.Fatalf("after the old life's announcements: %+v", st)
	}
	// Reinstalled: announcements of a life started after the arrival (the
	// arrival event's time, which the record keeps: a time taken before
	// publishing it was, under load, more than a millisecond earlier).
	secondLife := before.ArrivedAt.Add(time.Millisecond)
	deadline := time.Now().Add(30 * time.Second)
	for kv.record(id).Provisions < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("not provisioned again from its metadata: %+v", kv.record(id))
		}
		fleet.publishLifeMetadata(id, nodeLife{started: secondLife})
		time.Sleep(100 * time.Millisecond)
	}
	if r := kv.record(id); r.Attempts != before.Attempts+1 {
		t.Fatalf("%d attempts after the arrival, want 1 (the old life's announcements were taken): %+v", r.Attempts-before.Attempts, r)
	}
	if cfg := node.sendersOf(protocol.ActionConfigure); cfg["prov-a"] != 2 {
		t.Fatalf("configure from %v, want twice from prov-a", cfg)
	}
}

// TestClaimsModeNewLifeByID: in the claims mode the shared record keeps the
// life a node was provisioned in, so a provisioner that did not configure
// the node tells its lives apart too. B only saw the node arrive, and A,
// which configured it, is gone: the node reinstalled with its clock set
// back (before its arrival) is taken by B, whose own view knows no life to
// compare. C, started later, takes the new life's late announcements (its
// clock moved forward: a start after the arrival) to the shared record,
// finds the node in production in that life, and leaves it there without
// an attempt, knowing the life from then on.
func TestClaimsModeNewLifeByID(t *testing.T) {
	const id = "iot.example.net"
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	node, first, second := lifeNode(fleet, id)
	a := startHA(t, url, "prov-a", HAClaims, newTestHelper(c, nil))
	kv := openKV(t, url)
	announceUntil(t, fleet, id, 30*time.Second, "the first provisioning", func() bool { return kv.record(id).Provisions == 1 })
	b := startHA(t, url, "prov-b", HAClaims, newTestHelper(c, nil))
	arrived := time.Now().UTC()
	fleet.publishArrival(id, nuid.Next(), node.configuredSerials()[0])
	waitFor(t, 20*time.Second, "the node in production", func() bool {
		r := kv.record(id)
		st, _ := nodeState(b.p, id)
		return r.State == string(StateProduction) && r.Life == first && st.State == StateProduction
	})
	a.stop(t)

	// Reinstalled, its clock an hour before the arrival.
	node.setLife(second)
	before := kv.record(id)
	deadline := time.Now().Add(30 * time.Second)
	for kv.record(id).Provisions < 2 {
		if time.Now().After(deadline) {
			st, _ := nodeState(b.p, id)
			t.Fatalf("the reinstalled node was not provisioned again: %+v; B: %+v", kv.record(id), st)
		}
		fleet.publishLifeMetadata(id, nodeLife{id: second, started: arrived.Add(-time.Hour)})
		time.Sleep(100 * time.Millisecond)
	}
	if r := kv.record(id); r.Attempts != before.Attempts+1 || r.Life != second || r.ProvisionedBy != "prov-b" {
		t.Fatalf("after the reinstall: %+v (want one attempt more than %d, life %s, by prov-b)", r, before.Attempts, second)
	}

	cp := startHA(t, url, "prov-c", HAClaims, newTestHelper(c, nil))
	arrived = time.Now().UTC()
	fleet.publishArrival(id, nuid.Next(), node.configuredSerials()[1])
	waitFor(t, 20*time.Second, "the node in production again", func() bool {
		st, _ := nodeState(cp.p, id)
		return kv.record(id).State == string(StateProduction) && st.State == StateProduction
	})
	before = kv.record(id)
	waitFor(t, 30*time.Second, "C knows the node in production in its second life", func() bool {
		fleet.publishLifeMetadata(id, nodeLife{id: second, started: arrived.Add(time.Hour)})
		time.Sleep(50 * time.Millisecond)
		st, _ := nodeState(cp.p, id)
		return st.State == StateProduction && st.Life == second
	})
	if r := kv.record(id); r.Attempts != before.Attempts || r.Provisions != 2 || r.State != string(StateProduction) {
		t.Fatalf("the second life's late announcements made an attempt: %+v (before %+v)", r, before)
	}
	if n := node.count(protocol.ActionConfigure); n != 2 {
		t.Fatalf("%d configures, want 2", n)
	}
}

// TestClaimsModeStaleStartupKeepsProduction: a startup announcement taken
// after the node arrived in production (a stale or replayed one) gets a
// claim, but the node does not listen on the provisioning side any more:
// the attempt ends at inventory with no responders and leaves the node's
// shared record as it was (found by the fault suite: the record became
// "failed" for a node that was in production).
func TestClaimsModeStaleStartupKeepsProduction(t *testing.T) {
	const id = "stale.example.net"
	url := natstest.Server(t, true)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	node := keyReusingNode(fleet, id, nil)
	startHA(t, url, "prov-a", HAClaims, newTestHelper(c, nil))
	kv := openKV(t, url)
	announceUntil(t, fleet, id, 30*time.Second, "the first provisioning", func() bool { return kv.record(id).Provisions == 1 })
	fleet.publishArrival(id, nuid.Next(), node.configuredSerials()[0])
	waitFor(t, 20*time.Second, "the node in production", func() bool { return kv.record(id).State == string(StateProduction) })
	before := kv.record(id)

	node.leave(t)
	fleet.publishStartup(id)
	waitFor(t, 30*time.Second, "the stale attempt over", func() bool {
		r := kv.record(id)
		return r.Attempts == before.Attempts+1 && r.ClaimedBy == ""
	})
	r := kv.record(id)
	if r.State != string(StateProduction) || r.LastError != "" || r.Provisions != 1 || r.Serial != before.Serial || !r.ArrivedAt.Equal(before.ArrivedAt) {
		t.Fatalf("after a stale attempt: %+v (before %+v)", r, before)
	}
}

// TestRecordSharedSkipsLostClaims: an attempt whose claim was lost writes
// nothing to the shared state (the node is someone else's now).
func TestRecordSharedSkipsLostClaims(t *testing.T) {
	url := natstest.Server(t, true)
	c := newCA(t)
	// A long lease: retry_at (a lease after the loss) must not have passed
	// when the test offers the node, however loaded the machine.
	r := startHALease(t, url, "prov-a", HAClaims, newTestHelper(c, nil), 30*time.Second)
	kv := openKV(t, url)
	ctx, cancel := context.WithCancelCause(context.Background())
	cancel(fmt.Errorf("%w: renewal conflict", claims.ErrLost))
	a := &attempt{p: r.p, id: "lost.example.net", hold: &heldClaim{ctx: ctx, cancel: cancel}, log: r.p.log}
	if err := r.p.recordShared(a, errors.New("boom"), true); err == nil {
		t.Fatal("error dropped")
	}
	if _, err := kv.nodes.Get(context.Background(), "lost.example.net"); !errors.Is(err, nodestate.ErrNotFound) {
		t.Fatalf("state written for a lost claim: %v", err)
	}
	// This provisioner's view says the node may be another's, and why; a
	// lost claim is not a shutdown.
	a.stage = StageGenCSR
	r.p.finish(a, fmt.Errorf("gencsr: %w", context.Canceled), true)
	st, _ := nodeState(r.p, "lost.example.net")
	if st.State != StateElsewhere || !strings.Contains(st.LastError, "gencsr: ") || !strings.Contains(st.LastError, "renewal conflict") || !st.RetryAt.After(time.Now()) {
		t.Fatalf("after a lost claim: %+v", st)
	}
	if lost, failed := testutil.ToFloat64(r.p.m.claimsLost.WithLabelValues(string(StageGenCSR))), testutil.ToFloat64(r.p.m.errors.WithLabelValues(string(StageGenCSR))); lost != 1 || failed != 0 {
		t.Fatalf("claims_lost_total{stage=gencsr} %v, errors_total %v; want 1 and 0", lost, failed)
	}
	// Its announcements are not taken until the claim could have lapsed.
	if r.p.offer("lost.example.net", sourceMetadata, nodeLife{}) {
		t.Fatal("an elsewhere node was queued before its retry_at")
	}
	r.p.mu.Lock()
	r.p.nodes["lost.example.net"].RetryAt = time.Now().Add(-time.Millisecond)
	r.p.mu.Unlock()
	if !r.p.offer("lost.example.net", sourceMetadata, nodeLife{}) {
		t.Fatal("an elsewhere node was not queued after its retry_at")
	}
}

// TestRecordSharedKeepsArrivalDuringStaleAttempt: an attempt claimed a
// node before its arrival in production was recorded (the arrival came
// late, as during a stream leader election after a broker died), and the
// arrival is recorded while the attempt asks for the inventory, which finds
// no responders. The record stays in production; it is not marked failed.
// A timeout, which could be a slow node in provisioning mode, still is.
func TestRecordSharedKeepsArrivalDuringStaleAttempt(t *testing.T) {
	url := natstest.Server(t, true)
	c := newCA(t)
	r := startHA(t, url, "prov-a", HAClaims, newTestHelper(c, nil))
	kv := openKV(t, url)
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		stage      Stage
		configured bool
		err        error
		state      string
	}{
		{"no responders", StageInventory, false, nats.ErrNoResponders, nodestate.StateProduction},
		{"no responders at gencsr", StageGenCSR, false, nats.ErrNoResponders, nodestate.StateProduction},
		{"timeout", StageInventory, false, nats.ErrTimeout, string(StateFailed)},
		// Configure reached the node: its certificate is another than
		// the one it arrived with, so the attempt failed.
		{"no responders at restart", StageRestart, true, nats.ErrNoResponders, string(StateFailed)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := strings.ReplaceAll(tc.name, " ", "-") + ".example.net"
			arrived := time.Now().Add(-time.Second).UTC()
			rec := nodestate.Record{Identity: id, State: nodestate.StateProduction, Serial: "01ab", Provisions: 1, ArrivedAt: arrived, ProvisionedAt: arrived, Attempts: 2, ClaimedBy: "prov-a"}
			if err := kv.nodes.Put(ctx, rec); err != nil {
				t.Fatal(err)
			}
			hctx, cancel := context.WithCancelCause(ctx)
			defer cancel(nil)
			// The claim found the first attempt's record, not production.
			a := &attempt{p: r.p, id: id, stage: tc.stage, configured: tc.configured, log: r.p.log,
				hold: &heldClaim{ctx: hctx, cancel: cancel, prior: string(StateInProgress), priorStage: string(StageRestart)}}
			if tc.configured {
				a.serial = "02cd"
			}
			err := fmt.Errorf("%s: %w", tc.stage, tc.err)
			if got := r.p.recordShared(a, err, false); !errors.Is(got, tc.err) {
				t.Fatalf("recordShared returned %v", got)
			}
			got := kv.record(id)
			if got.State != tc.state || got.Provisions != 1 || got.Serial != "01ab" || !got.ArrivedAt.Equal(arrived) || got.ClaimedBy != "" {
				t.Fatalf("record after the attempt: %+v", got)
			}
		})
	}
}

// flakyRegistry refuses the first failures writes, as a replicated
// registry does while it elects a leader.
type flakyRegistry struct {
	Registry
	failures atomic.Int32
}

func (f *flakyRegistry) Put(rec Record) error {
	if f.failures.Add(-1) >= 0 {
		return errors.New("nats: no responders available for request")
	}
	return f.Registry.Put(rec)
}

// TestConfiguredKeyRecordedDespiteRegistryOutage: the registry refuses the
// first writes after configure; the provisioner retries before restarting
// the node, so the node is never in production without its key recorded.
func TestConfiguredKeyRecordedDespiteRegistryOutage(t *testing.T) {
	const id = "flaky.example.net"
	url := natstest.Server(t, false)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	node := keyReusingNode(fleet, id, nil)
	reg := &flakyRegistry{Registry: NewMemoryRegistry()}
	reg.failures.Store(3)
	startProvisioner(t, url, testConfig(), newTestHelper(c, nil), nil, func(p *Provisioner) { p.reg = reg })
	announceUntil(t, fleet, id, 30*time.Second, "the node restarted", func() bool {
		_, restarted, _ := node.stats()
		return restarted > 0
	})
	rec, ok, err := reg.Get(id)
	if err != nil || !ok || rec.KeyFingerprint != node.keyFingerprint(t) || rec.Serial != node.configuredSerials()[0] {
		t.Fatalf("registry after the outage: %+v %t %v", rec, ok, err)
	}
	if configured, _, _ := node.stats(); configured != 1 {
		t.Fatalf("configured %d times", configured)
	}
}

// TestArrivalCompletesAnEarlierCertificate: an attempt's restart reached
// the node but its reply did not, and the next attempt reached the node
// during its restart splay and configured another certificate, which the
// node never wrote (it restarted first). The node arrives in production
// with the first attempt's certificate: the arrival completes the record
// with it (counted once, its key registered), although the later one was
// pending. Before 2 Dec the arrival was taken for an unknown certificate
// and the record stayed failed for good (seen in TestKillProvisionerMidStorm
// under three concurrent race suites).
func TestArrivalCompletesAnEarlierCertificate(t *testing.T) {
	url := natstest.Server(t, true)
	r := startHA(t, url, "prov-a", HAClaims, newTestHelper(newCA(t), nil))
	kv := openKV(t, url)
	const id = "splay.example.net"
	fpFirst, fpLater := "sha256:"+strings.Repeat("1a", 32), "sha256:"+strings.Repeat("2b", 32)
	rec := nodestate.Record{Identity: id, State: string(StateFailed), Stage: string(StageConfigure), Attempts: 2}
	rec.SetPending(nodestate.Pending{Serial: "0f01", KeyFingerprint: fpFirst, TokenID: "tok-1", By: "prov-b", At: time.Now().UTC()})
	rec.SetPending(nodestate.Pending{Serial: "0f02", KeyFingerprint: fpLater, TokenID: "tok-1", By: "prov-a", At: time.Now().UTC()})
	if err := kv.nodes.Put(context.Background(), rec); err != nil {
		t.Fatal(err)
	}
	ev := &protocol.Event{Protocol: protocol.EventProtocol, ID: "e1", Identity: id, Type: protocol.EventProvisioned,
		Component: protocol.AgentComponent, Time: time.Now().UTC(), Serial: "0f01"}
	if err := r.p.recordArrival(context.Background(), ev); err != nil {
		t.Fatal(err)
	}
	got := kv.record(id)
	if got.State != nodestate.StateProduction || got.Serial != "0f01" || got.Provisions != 1 || got.Pending != nil || got.Earlier != nil || got.ProvisionedBy != "prov-b" {
		t.Fatalf("record after the arrival: %+v", got)
	}
	if reg, ok, err := kv.reg.Get(id); err != nil || !ok || reg.KeyFingerprint != fpFirst || reg.Serial != "0f01" {
		t.Fatalf("registry %+v %v %v: want the first certificate's key", reg, ok, err)
	}
	if n := testutil.ToFloat64(r.p.m.completedOnArrival); n != 1 {
		t.Fatalf("completed_on_arrival_total %v, want 1", n)
	}
	// The same arrival again (redelivered) counts nothing more.
	if err := r.p.recordArrival(context.Background(), ev); err != nil {
		t.Fatal(err)
	}
	if got := kv.record(id); got.Provisions != 1 || testutil.ToFloat64(r.p.m.completedOnArrival) != 1 {
		t.Fatalf("counted twice: %+v", got)
	}
}
