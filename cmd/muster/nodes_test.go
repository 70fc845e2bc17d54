package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/provisioner"
)

type deferHelper struct{}

func (deferHelper) Provision(context.Context, *helper.Request) (*helper.Reply, error) {
	return &helper.Reply{Defer: true}, nil
}

// TestNodesCommands runs muster nodes against a running provisioner's
// monitor with two held nodes.
func TestNodesCommands(t *testing.T) {
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	cfg := provisioner.DefaultConfig()
	cfg.MonitorPort = -1
	cfg.StateDir = t.TempDir()
	cfg.NkeySeedFile = testSeedFile(t)
	cfg.InsecureTokenless = true
	cfg.RPCTimeout = provisioner.Duration(200 * time.Millisecond)
	cfg.RPCRetries = 0
	p, err := provisioner.New(provisioner.Options{Config: cfg, Helper: deferHelper{}, Conn: nc, Logger: logging.Discard().WithField("component", "test")})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for p.MonitorAddr() == "" {
		if time.Now().After(deadline) {
			t.Fatal("monitor not listening")
		}
		time.Sleep(10 * time.Millisecond)
	}
	url := "http://" + p.MonitorAddr()
	const a, b = "a.example.net", "b.example.net"
	for _, id := range []string{a, b} {
		if err := p.Hold(id, provisioner.HoldDuplicateConnection); err != nil {
			t.Fatal(err)
		}
	}

	out, err := runCLI(t, "nodes", "ls", "--url", url, "--state", "held")
	if err != nil || !strings.Contains(out, a) || !strings.Contains(out, b) || !strings.Contains(out, "held") {
		t.Fatalf("nodes ls --state held: %v\n%s", err, out)
	}
	if out, err := runCLI(t, "nodes", "ls", "--url", url, "--state", "provisioned"); err != nil || strings.Contains(out, a) {
		t.Fatalf("nodes ls --state provisioned: %v\n%s", err, out)
	}
	if _, err := runCLI(t, "nodes", "ls", "--url", url, "--state", "bogus"); err == nil || !strings.Contains(err.Error(), "--state") {
		t.Fatalf("bad --state: %v", err)
	}
	// Every state the provisioner has is accepted (elsewhere, an ha
	// mode's, was refused until 3 Dec).
	for _, st := range provisioner.States() {
		if out, err := runCLI(t, "nodes", "ls", "--url", url, "--state", string(st)); err != nil || strings.Contains(out, a) != (st == provisioner.StateHeld) {
			t.Errorf("nodes ls --state %s: %v\n%s", st, err, out)
		}
	}
	out, err = runCLI(t, "nodes", "show", "--url", url, a)
	if err != nil || !strings.Contains(out, "hold reason") || !strings.Contains(out, "duplicate_connection") {
		t.Fatalf("nodes show: %v\n%s", err, out)
	}
	out, err = runCLI(t, "nodes", "deny", "--url", url, b)
	if err != nil || !strings.Contains(out, "denied") {
		t.Fatalf("nodes deny: %v\n%s", err, out)
	}
	if _, err := runCLI(t, "nodes", "deny", "--url", url, b); err == nil || !strings.Contains(err.Error(), "409") {
		t.Fatalf("second deny: %v", err)
	}
	out, err = runCLI(t, "nodes", "approve", "--url", url, a)
	if err != nil || !strings.Contains(out, a) {
		t.Fatalf("nodes approve: %v\n%s", err, out)
	}
	if _, err := runCLI(t, "nodes", "approve", "--url", url, "c.example.net"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("approve unknown: %v", err)
	}
	if _, err := runCLI(t, "nodes", "approve", "--url", url, "../etc"); err == nil {
		t.Fatal("approve accepted a bad identity")
	}
	if held := p.HeldNodes(); len(held) != 0 {
		t.Fatalf("still held: %+v", held)
	}
	reg, err := provisioner.OpenFileRegistry(cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if rec, ok, _ := reg.Get(b); !ok || !rec.Denied {
		t.Fatalf("denial not recorded: %+v", rec)
	}
}

// TestBuiltinHelperSetsPolicyCA checks that the built-in helper's CA becomes
// policy.ca_file when it is not set.
func TestBuiltinHelperSetsPolicyCA(t *testing.T) {
	dir := t.TempDir()
	ca.Silence()
	c, err := ca.Init(filepath.Join(dir, "ca"), "Test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	hc := filepath.Join(dir, "helper.yaml")
	certFile := filepath.Join(dir, "ca", ca.CertFile)
	keyFile := filepath.Join(dir, "ca", ca.KeyFile)
	if err := os.WriteFile(hc, []byte("ca:\n  cert: "+certFile+"\n  key: "+keyFile+"\nmiddleware_hosts: prod.example.net:4222\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := provisioner.DefaultConfig()
	cfg.Brokers = []string{"nats://127.0.0.1:4222"}
	cfg.NkeySeedFile = testSeedFile(t)
	cfg.InsecureTokenless = true
	cfg.HelperConfig = hc
	if err := builtinPolicyCA(&cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Policy.CAFile != certFile {
		t.Fatalf("policy.ca_file = %q, want %q", cfg.Policy.CAFile, certFile)
	}
	other := filepath.Join(dir, "other.pem")
	if err := os.WriteFile(other, c.CertificatePEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Policy.CAFile = other
	if err := builtinPolicyCA(&cfg); err != nil || cfg.Policy.CAFile != other {
		t.Fatalf("an explicit policy.ca_file was replaced: %q %v", cfg.Policy.CAFile, err)
	}
}

// testSeedFile writes a provisioner nkey seed file.
func testSeedFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "p.nk")
	if out, err := runCLI(t, "provisioner", "nkey", "--out", p); err != nil {
		t.Fatalf("nkey: %v %s", err, out)
	}
	return p
}
