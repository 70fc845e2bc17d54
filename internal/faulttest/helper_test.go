package faulttest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Fault rates of the helper test, in percent of the fleet: each such node's
// first helper run misbehaves.
const (
	hangPct    = 5
	crashPct   = 5
	garbagePct = 5
)

// TestHelperFaultsMidStorm runs the storm with a helper that, for 15% of
// the nodes, hangs (the provisioner kills it after helper_timeout),
// crashes (half a reply, exit status 2) or prints garbage on its first
// run. Two provisioners exec it per node (the Choria contract), the third
// runs it as a persistent helper (one process: a crash there fails every
// request in flight, garbage makes the runner replace the process). Every
// node ends provisioned exactly once.
func TestHelperFaultsMidStorm(t *testing.T) {
	state := filepath.Join(t.TempDir(), "helper-state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	d := newDeployment(t, 3)
	// The helper's command line needs the brokers, known only now.
	cmd := fmt.Sprintf("%s --ca-dir %s --middleware-hosts %s --state %s --hang %d --crash %d --garbage %d --alive-interval %s",
		d.bin.faulthelper, d.pki.caDir, strings.Join(d.brokerURLs(), ","), state, hangPct, crashPct, garbagePct, aliveInterval)
	for i, p := range d.provs {
		o := provOpts{helper: cmd}
		if i == 2 {
			o = provOpts{helper: cmd + " --persistent", persistent: true}
		}
		d.writeProvisioner(p, o)
	}
	d.startProvisioners()
	d.startFleet(0, fleetSize)
	byProv := d.verify()
	for _, p := range d.provs {
		if byProv[p.name] == 0 {
			t.Errorf("%s provisioned no node: its helper never worked", p.name)
		}
	}

	// Each faulty node's marker was made when its first run misbehaved:
	// from then to its arrival is what the fault cost it.
	markers, err := os.ReadDir(state)
	if err != nil {
		t.Fatal(err)
	}
	var recovery []time.Duration
	for _, m := range markers {
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		if at := d.arr.firstAt(m.Name()); !at.IsZero() {
			recovery = append(recovery, at.Sub(info.ModTime()))
		}
	}
	if want := fleetSize * (hangPct + crashPct + garbagePct) / 100; len(markers) < want/2 {
		t.Fatalf("only %d nodes met a helper fault, expected about %d", len(markers), want)
	}
	report(t, "faulty_node_recovery_p50", percentile(recovery, 50), fmt.Sprintf("faulty_nodes=%d helper_timeout=%s", len(markers), helperTimeout))
	report(t, "faulty_node_recovery_max", percentile(recovery, 100), "")
	report(t, "storm_total", time.Since(d.started), fmt.Sprintf("nodes=%d provisioners=3 (2 exec, 1 persistent)", len(d.ids)))
}
