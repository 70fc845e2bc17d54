package cfsslhelper_test

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/cfsslhelper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
)

// The helper's rules, templates and configuration are tested in
// helper/builtin; these tests cover the cfssl-backed constructors.

const id = "node1.example.net"

func newCA(t testing.TB) (*ca.CA, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	c, err := ca.Init(dir, "Test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	return c, dir
}

func csrRequest(t *testing.T) *helper.Request {
	t.Helper()
	key, err := pki.GenerateKey("", 0)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.CreateCSR(key, id, pki.CSRSubject{})
	if err != nil {
		t.Fatal(err)
	}
	inv, _ := json.Marshal(map[string]any{"facts": map[string]string{"country": "mt"}})
	return &helper.Request{Identity: id, Inventory: string(inv), CSR: &helper.CSRInfo{CSR: string(csr), SSLDir: "/var/lib/muster/ssl"}}
}

func TestNewLoadsCAFromDisk(t *testing.T) {
	c, dir := newCA(t)
	h, err := cfsslhelper.New(&cfsslhelper.Config{
		CA:              cfsslhelper.CAFiles{Cert: filepath.Join(dir, ca.CertFile), Key: filepath.Join(dir, ca.KeyFile)},
		Validity:        "24h",
		MiddlewareHosts: "b:4222",
	})
	if err != nil {
		t.Fatal(err)
	}
	req := csrRequest(t)
	rep, err := h.Provision(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
		t.Fatal(err)
	}
	leaf, err := pki.VerifyLeaf([]byte(rep.Certificate), c.CertificatePEM(), nil, id, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if life := leaf.NotAfter.Sub(leaf.NotBefore); life != 24*time.Hour {
		t.Errorf("certificate lives %s, want the configured 24h", life)
	}
	if rep.Configuration[cfsslhelper.KeyMiddlewareHosts] != "b:4222" || rep.SSLDir != "/var/lib/muster/ssl" {
		t.Errorf("reply %+v", rep)
	}
	if _, err := cfsslhelper.New(&cfsslhelper.Config{}); !errors.Is(err, cfsslhelper.ErrNoCA) {
		t.Errorf("New without a CA: %v", err)
	}
	if _, err := cfsslhelper.New(&cfsslhelper.Config{CA: cfsslhelper.CAFiles{Cert: "/nonexistent/ca.pem", Key: "/nonexistent/k.pem"}}); err == nil {
		t.Error("New with a missing CA succeeded")
	}
}

func TestNewWithCA(t *testing.T) {
	c, _ := newCA(t)
	h, err := cfsslhelper.NewWithCA(c, &cfsslhelper.Config{MiddlewareHosts: "b:4222"})
	if err != nil {
		t.Fatal(err)
	}
	req := csrRequest(t)
	rep, err := h.Provision(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
		t.Fatal(err)
	}
	if rep.CA != string(c.CertificatePEM()) {
		t.Error("reply ca is not the CA's certificate")
	}
	if _, err := cfsslhelper.NewWithCA(nil, nil); !errors.Is(err, cfsslhelper.ErrNoCA) {
		t.Errorf("NewWithCA(nil): %v", err)
	}
	if _, err := cfsslhelper.NewWithCA(c, &cfsslhelper.Config{Validity: "never"}); err == nil {
		t.Error("NewWithCA accepted a bad configuration")
	}
}

func TestExampleConfigLoads(t *testing.T) {
	cfg, err := cfsslhelper.LoadConfig(filepath.Join("..", "..", "examples", "helper-cfssl.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.CA.Cert == "" || len(cfg.Rules) == 0 {
		t.Errorf("example config: %+v", cfg)
	}
	if _, err := cfsslhelper.ParseConfig([]byte("nope: 1\n")); err == nil {
		t.Error("unknown key accepted")
	}
}
