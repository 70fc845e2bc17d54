package main

import (
	"bytes"
	"encoding/json"
	"runtime"
	"strconv"
	"testing"
)

// TestBenchCommand runs the bench command end to end with a few nodes and
// checks its JSON report and that --gomaxprocs reaches the run.
func TestBenchCommand(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	want := runtime.GOMAXPROCS(0) + 1
	cmd := newBenchCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"--nodes", "3", "--workers", "2", "--idle-agents", "-1", "--state-dir", t.TempDir(),
		"--gomaxprocs", strconv.Itoa(want), "--json"})
	if err := cmd.Execute(); err != nil {
		t.Fatalf("bench: %v\n%s", err, out.String())
	}
	var r struct {
		Machine struct {
			GOMAXPROCS int `json:"gomaxprocs"`
		} `json:"machine"`
		Provisioned int `json:"provisioned"`
		Floor       *struct {
			Items []struct{ Name string } `json:"items"`
		} `json:"floor"`
	}
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out.String())
	}
	if r.Provisioned != 3 || r.Machine.GOMAXPROCS != want {
		t.Errorf("provisioned %d, gomaxprocs %d; want 3 and %d", r.Provisioned, r.Machine.GOMAXPROCS, want)
	}
	if r.Floor == nil || len(r.Floor.Items) == 0 {
		t.Errorf("no floor in the report")
	}
}
