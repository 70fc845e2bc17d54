package faulttest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/muster-io/muster/internal/claims"
)

// probeWrites measures, from t0, how long until the claims bucket accepts a
// write again (through any surviving broker).
func (d *deployment) probeWrites(t0 time.Time) time.Duration {
	t := d.t
	deadline := t0.Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		kv, err := d.js.KeyValue(ctx, claims.DefaultBucket)
		if err == nil {
			_, err = kv.Put(ctx, "faulttest-probe", []byte(time.Now().String()))
		}
		cancel()
		if err == nil {
			return time.Since(t0)
		}
		if time.Now().After(deadline) {
			t.Fatalf("the claims bucket refused writes for a minute after the fault: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// streamLeader is the broker leading a KV bucket's stream.
func (d *deployment) streamLeader(bucket string) string {
	t := d.t
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := d.js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.Cluster == nil {
		t.Fatalf("stream KV_%s is not clustered", bucket)
	}
	return info.Cluster.Leader
}

// TestKillBrokerMidStorm kills (SIGKILL) the broker leading the claims
// bucket while a thousand nodes are being provisioned by three
// provisioners. Agents and provisioners on it reconnect to the two others,
// JetStream elects new leaders, claims whose renewals failed for a lease
// are given up (their attempts retried), and every node ends provisioned
// exactly once.
func TestKillBrokerMidStorm(t *testing.T) {
	d := newDeployment(t, 3)
	d.startProvisioners()
	d.startFleet(0, fleetSize)
	d.midStorm(0.3)

	leader := d.streamLeader(claims.DefaultBucket)
	var victim *brokerNode
	for _, b := range d.brokers {
		if b.name == leader {
			victim = b
		}
	}
	if victim == nil {
		t.Fatalf("no broker named %q leads the claims bucket", leader)
	}
	killed := time.Now()
	victim.proc.kill()
	writable := d.probeWrites(killed)
	d.verify()

	report(t, "claims_writable_after_kill", writable, fmt.Sprintf("killed=%s (claims leader)", victim.name))
	report(t, "longest_arrival_gap_after_kill", d.arr.longestGapAfter(killed), "")
	report(t, "storm_total", time.Since(d.started), fmt.Sprintf("nodes=%d provisioners=3", len(d.ids)))
}

// keysOf lists a KV bucket's keys (for diagnostics).
func keysOf(ctx context.Context, js jetstream.JetStream, bucket string) string {
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return err.Error()
	}
	l, err := kv.ListKeys(ctx)
	if err != nil {
		return err.Error()
	}
	var ks []string
	for k := range l.Keys() {
		ks = append(ks, k)
	}
	return strings.Join(ks, ",")
}

// waitClaimsLapsed waits until owner holds no claim any more and returns
// how long after t0 that was.
func (d *deployment) waitClaimsLapsed(owner string, t0 time.Time) time.Duration {
	waitFor(d.t, 60*time.Second, owner+"'s claims to lapse", func() bool { return len(d.claimsOf(owner)) == 0 })
	return time.Since(t0)
}

// waitArrived waits until every node of ids arrived in production and
// returns how long after t0 the last one did.
func (d *deployment) waitArrived(ids []string, t0 time.Time) time.Duration {
	if len(ids) == 0 {
		d.t.Fatal("no node was in flight at the fault: the test did not test it")
	}
	waitFor(d.t, convergeTimeout, fmt.Sprintf("the %d nodes in flight at the fault in production", len(ids)), func() bool {
		for _, id := range ids {
			if d.arr.firstAt(id).IsZero() {
				return false
			}
		}
		return true
	})
	var last time.Time
	for _, id := range ids {
		if at := d.arr.firstAt(id); at.After(last) {
			last = at
		}
	}
	return last.Sub(t0)
}

// TestKillProvisionerMidStorm kills (SIGKILL) one of three provisioners in
// the middle of a storm. The nodes it held are left claimed until their
// leases lapse, then the two others provision them; nothing it was doing
// is done twice.
func TestKillProvisionerMidStorm(t *testing.T) {
	d := newDeployment(t, 3)
	d.startProvisioners()
	d.startFleet(0, fleetSize)
	d.midStorm(0.3)

	// The provisioner with the most nodes in hand.
	var victim *provNode
	most := -1
	for _, p := range d.provs {
		if n := len(d.claimsOf(p.name)); n > most {
			victim, most = p, n
		}
	}
	killed := time.Now()
	victim.proc.kill()
	// Its claims left in the bucket are the attempts the kill cut short
	// (a dead provisioner releases nothing); they live for a lease.
	inFlight := d.claimsOf(victim.name)
	lapsed := d.waitClaimsLapsed(victim.name, killed)
	replaced := d.waitArrived(inFlight, killed)
	d.verify()

	report(t, "claims_lapsed_after_kill", lapsed, fmt.Sprintf("killed=%s lease=%s", victim.name, lease))
	report(t, "its_nodes_in_production_after_kill", replaced, fmt.Sprintf("nodes_in_flight=%d", len(inFlight)))
	report(t, "longest_arrival_gap_after_kill", d.arr.longestGapAfter(killed), "")
	report(t, "storm_total", time.Since(d.started), fmt.Sprintf("nodes=%d provisioners=3", len(d.ids)))
}

// TestRestartProvisionerSetMidStorm kills every provisioner (SIGKILL) in
// the middle of a storm and starts the set again. The new processes resume
// from the shared state: nodes finished before are not taken again, nodes
// that arrived in production while no provisioner ran are recorded from
// the arrivals stream, claims of the old set lapse, and the storm
// completes.
func TestRestartProvisionerSetMidStorm(t *testing.T) {
	d := newDeployment(t, 3)
	d.startProvisioners()
	d.startFleet(0, fleetSize)
	d.midStorm(0.3)

	killed := time.Now()
	for _, p := range d.provs {
		p.proc.kill()
	}
	// The claims left are the attempts the kills cut short.
	var inFlight []string
	for _, p := range d.provs {
		inFlight = append(inFlight, d.claimsOf(p.name)...)
	}
	d.startProvisioners()
	ready := time.Since(killed)
	replaced := d.waitArrived(inFlight, killed)
	d.verify()

	report(t, "new_set_ready_after_kill", ready, "provisioners=3")
	report(t, "nodes_in_flight_in_production_after_kill", replaced, fmt.Sprintf("nodes_in_flight=%d lease=%s", len(inFlight), lease))
	report(t, "longest_arrival_gap_after_kill", d.arr.longestGapAfter(killed), "")
	report(t, "storm_total", time.Since(d.started), fmt.Sprintf("nodes=%d provisioners=3", len(d.ids)))
}
