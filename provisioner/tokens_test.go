package provisioner

import (
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/token"
)

// TestTokenMaxUses: a token limited to two identities provisions two
// nodes; the third is refused, also after a restart with the same
// state_dir.
func TestTokenMaxUses(t *testing.T) {
	url := startServer(t)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	shared, _, err := testIssuer.Create(token.Scope{Pattern: "mu*.example.net", MaxUses: 2}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{"mu1.example.net", "mu2.example.net", "mu3.example.net"}
	for _, id := range ids {
		n := fleet.add(id, nil)
		n.mu.Lock()
		n.token = shared
		n.silent = true
		n.mu.Unlock()
	}
	cfg := testConfig()
	cfg.StateDir = t.TempDir()
	cfg.Workers = 1 // one at a time, so the first two take the uses
	r := startProvisioner(t, url, cfg, newTestHelper(c, nil), nil, nil)
	for _, id := range ids {
		fleet.publishMetadata(id)
	}
	waitFor(t, 30*time.Second, "two provisioned, one refused", func() bool {
		done, refused := 0, 0
		for _, id := range ids {
			if _, restarted, _ := fleet.nodes[id].stats(); restarted == 1 {
				done++
			}
			if st, ok := nodeState(r.p, id); ok && strings.Contains(st.LastError, "used up") {
				refused++
			}
		}
		return done == 2 && refused == 1
	})
	r.stop(t)

	// Restart on the same state_dir: the uses are remembered.
	r2 := startProvisioner(t, url, cfg, newTestHelper(c, nil), nil, nil)
	for _, id := range ids {
		fleet.publishMetadata(id)
	}
	var refusedID string
	for _, id := range ids {
		if _, restarted, _ := fleet.nodes[id].stats(); restarted == 0 {
			refusedID = id
		}
	}
	waitFor(t, 30*time.Second, "still refused after restart", func() bool {
		st, ok := nodeState(r2.p, refusedID)
		return ok && strings.Contains(st.LastError, "used up")
	})
	if _, restarted, _ := fleet.nodes[refusedID].stats(); restarted != 0 {
		t.Fatal("the third identity was provisioned after a restart")
	}
}
