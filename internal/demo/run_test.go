package demo

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"
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
