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

// TestBenchCommandHA runs two provisioners in claims mode from the command
// line: the registry defaults to the shared one and the report splits the
// nodes by provisioner.
func TestBenchCommandHA(t *testing.T) {
	cmd := newBenchCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"--nodes", "4", "--workers", "2", "--idle-agents", "-1", "--state-dir", t.TempDir(),
		"--ha", "claims", "--provisioners", "2", "--floor=false", "--json"})
	if err := cmd.Execute(); err != nil {
		t.Fatalf("bench: %v\n%s", err, out.String())
	}
	var r struct {
		Provisioned   int    `json:"provisioned"`
		HA            string `json:"ha"`
		Provisioners  int    `json:"provisioners"`
		Registry      string `json:"registry"`
		ProvisionedBy []int  `json:"provisioned_by"`
	}
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out.String())
	}
	if r.Provisioned != 4 || r.HA != "claims" || r.Provisioners != 2 || r.Registry != "kv" || len(r.ProvisionedBy) != 2 || r.ProvisionedBy[0]+r.ProvisionedBy[1] != 4 {
		t.Errorf("report %+v", r)
	}
}
