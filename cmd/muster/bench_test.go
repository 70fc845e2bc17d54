package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
)

// TestMain lets `muster bench --fleet-process`, run by the tests, start this
// test binary as its fleet host: with the arguments "bench fleet-host" it
// is the muster command, otherwise it runs the tests.
func TestMain(m *testing.M) {
	if len(os.Args) == 3 && os.Args[1] == "bench" && os.Args[2] == "fleet-host" {
		root := newRootCmd()
		root.SetArgs(os.Args[1:])
		if err := root.Execute(); err != nil {
			fmt.Fprintln(os.Stderr, "muster:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestBenchFleetProcess runs --fleet-process from the command line: the
// command starts its own binary as the fleet host ("bench fleet-host") and
// reports the provisioning side.
func TestBenchFleetProcess(t *testing.T) {
	cmd := newBenchCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"--nodes", "3", "--workers", "2", "--state-dir", t.TempDir(), "--fleet-process", "--floor=false", "--json"})
	if err := cmd.Execute(); err != nil {
		t.Fatalf("bench: %v\n%s", err, out.String())
	}
	var r struct {
		Provisioned      int     `json:"provisioned"`
		Transport        string  `json:"transport"`
		FleetProcess     bool    `json:"fleet_process"`
		AgentCPU         float64 `json:"agent_cpu_seconds"`
		ProvisioningSide *struct {
			MillisPerNode float64 `json:"cpu_ms_per_node"`
			NodesPerMin   float64 `json:"nodes_per_min"`
		} `json:"provisioning_side"`
	}
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out.String())
	}
	if r.Provisioned != 3 || !r.FleetProcess || r.Transport != "tcp" || r.AgentCPU <= 0 || r.ProvisioningSide == nil || r.ProvisioningSide.NodesPerMin <= 0 {
		t.Errorf("report %+v\n%s", r, out.String())
	}
}

// TestBenchFleetHostCommand: the hidden fleet-host command reads its spec
// on standard input and answers ready; an input that ends then stops it.
func TestBenchFleetHostCommand(t *testing.T) {
	cmd := newRootCmd()
	var out, errOut bytes.Buffer
	cmd.SetIn(strings.NewReader(`{"brokers":["tls://127.0.0.1:1"],"provisioner_key":"U","ca":"x","agents":[]}`))
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs([]string{"bench", "fleet-host"})
	if err := cmd.Execute(); err != nil {
		t.Fatalf("fleet-host: %v\n%s", err, errOut.String())
	}
	if got := strings.TrimSpace(out.String()); got != `{"event":"ready"}` {
		t.Errorf("fleet-host wrote %q", got)
	}
}

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
