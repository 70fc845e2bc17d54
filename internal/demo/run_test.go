package demo

import (
	"bytes"
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/provisioner"
)

func TestRunBuiltinHelper(t *testing.T) {
	var progress bytes.Buffer
	s, err := Run(context.Background(), RunOptions{
		Options:  Options{Nodes: 10, Dir: t.TempDir()},
		Timeout:  time.Minute,
		Progress: &progress,
	})
	if err != nil {
		t.Fatal(err)
	}
	if s.Nodes != 10 || s.Provisioned != 10 || s.Failed != 0 || s.ProductionMTLS != 10 {
		t.Fatalf("summary %+v", s)
	}
	if s.P50Seconds <= 0 || s.P50Seconds > s.P99Seconds || s.P99Seconds > s.MaxSeconds || s.NodesPerMin <= 0 {
		t.Fatalf("latency figures out of order: %+v", s)
	}
	if !strings.Contains(progress.String(), "10/10") {
		t.Fatalf("progress never showed 10/10: %q", progress.String())
	}
	var out bytes.Buffer
	s.Print(&out)
	for _, want := range []string{"provisioned      10", "production mTLS  10"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("summary text lacks %q:\n%s", want, out.String())
		}
	}
	b, err := json.Marshal(s)
	if err != nil || !strings.Contains(string(b), `"production_mtls":10`) {
		t.Fatalf("json %s %v", b, err)
	}
}

// TestRunFileRegistryKnownNodes runs a fleet whose provisioner keeps its
// registry in files that already hold other identities: the fleet's nodes
// are added to them, the known ones kept.
func TestRunFileRegistryKnownNodes(t *testing.T) {
	dir := t.TempDir()
	s, err := Run(context.Background(), RunOptions{
		Options: Options{Nodes: 5, Dir: dir, FileRegistry: true, KnownNodes: 25},
		Timeout: time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if s.Provisioned != 5 {
		t.Fatalf("summary %+v", s)
	}
	reg, err := provisioner.OpenFileRegistry(filepath.Join(dir, "provisioner"))
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	recs, err := reg.List()
	if err != nil {
		t.Fatal(err)
	}
	known, fleet := 0, 0
	for _, r := range recs {
		switch {
		case strings.HasSuffix(r.Identity, ".existing.example"):
			known++
		case r.Serial != "" && r.KeyFingerprint != "":
			fleet++
		}
	}
	if known != 25 || fleet != 5 || len(recs) != 30 {
		t.Fatalf("registry holds %d records: %d known, %d of the fleet provisioned", len(recs), known, fleet)
	}
}

func TestRunCountsNodesThatNeverArrive(t *testing.T) {
	// A helper that never answers within its timeout: nothing reaches
	// production, and the summary says so with each node's error.
	s, err := Run(context.Background(), RunOptions{
		Options: Options{
			Nodes:         2,
			Dir:           t.TempDir(),
			HelperCommand: "sleep 30",
			HelperTimeout: 200 * time.Millisecond,
		},
		Timeout: 3 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if s.Provisioned != 0 || s.Failed != 2 || s.ProductionMTLS != 0 {
		t.Fatalf("summary %+v", s)
	}
	if len(s.Errors) != 2 {
		t.Fatalf("errors %v, want one per node", s.Errors)
	}
	for id, e := range s.Errors {
		if !strings.Contains(e, "timed out") {
			t.Errorf("%s: %s", id, e)
		}
	}
}

func TestNewRejectsHalfACA(t *testing.T) {
	if _, err := New(Options{Nodes: 1, CACert: "ca.pem"}); err == nil {
		t.Fatal("a CA certificate without its key was accepted")
	}
}

// TestNewProvisionerOptions: several provisioners only in the ha modes,
// which keep the registry in JetStream.
func TestNewProvisionerOptions(t *testing.T) {
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{Provisioners: 2}, "more than one needs ha mode"},
		{Options{HA: provisioner.HASingle, Provisioners: 3}, "more than one needs ha mode"},
		{Options{HA: provisioner.HAClaims, Provisioners: MaxProvisioners + 1}, "must be 1..16"},
		{Options{HA: provisioner.HALeader, FileRegistry: true}, "registry in JetStream"},
		{Options{HA: "raft"}, `ha mode "raft"`},
	} {
		tc.o.Dir = t.TempDir()
		f, err := New(tc.o)
		if err == nil {
			f.Close()
			t.Errorf("New(%+v) accepted", tc.o)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want %q", tc.o, err, tc.want)
		}
	}
	f, err := New(Options{Dir: t.TempDir(), HA: provisioner.HAClaims, Provisioners: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Prepare(); err != nil {
		t.Fatal(err)
	}
	if ps := f.Provisioners(); len(ps) != 2 || f.Provisioner() != ps[0] {
		t.Fatalf("provisioners %v", ps)
	}
}
