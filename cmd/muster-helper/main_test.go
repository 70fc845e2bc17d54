package main

import (
	"bytes"
	"crypto"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
)

// TestDependencies keeps the binary small: what makes "muster helper
// cfssl" slow to start must not come back through an import.
func TestDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	banned := []string{
		"github.com/cloudflare/cfssl", "github.com/zmap/zlint", "github.com/zmap/zcrypto",
		"github.com/weppos/publicsuffix-go", "github.com/nats-io/nats-server", "github.com/nats-io/nats.go",
		"github.com/prometheus/", "github.com/spf13/cobra", "google.golang.org/protobuf",
		"github.com/muster-io/muster/internal/ca",
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, b := range banned {
			if dep == b || strings.HasPrefix(dep, b+"/") || (strings.HasSuffix(b, "/") && strings.HasPrefix(dep, b)) {
				t.Errorf("muster-helper depends on %s", dep)
			}
		}
	}
}

// fixture makes a CA in a directory and a node key with its CSR for
// node1.example.net.
func fixture(t *testing.T) (caDir string, c *ca.CA, key crypto.Signer, csr []byte) {
	t.Helper()
	caDir = filepath.Join(t.TempDir(), "ca")
	c, err := ca.Init(caDir, "Test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	key, err = pki.GenerateKey("", 0)
	if err != nil {
		t.Fatal(err)
	}
	csr, err = pki.CreateCSR(key, "node1.example.net", pki.CSRSubject{})
	if err != nil {
		t.Fatal(err)
	}
	return caDir, c, key, csr
}

func TestRun(t *testing.T) {
	dir, c, _, csr := fixture(t)
	req := &helper.Request{Identity: "node1.example.net", Inventory: `{"facts":{}}`,
		CSR: &helper.CSRInfo{CSR: string(csr), SSLDir: "/etc/muster/ssl"}}
	reqJSON, err := helper.EncodeRequest(req)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name       string
		args       []string
		stdin      string
		code       int
		wantStdout string
		wantStderr string
	}{
		{name: "help", args: []string{"--help"}, code: 0, wantStderr: "-middleware-hosts"},
		{name: "version", args: []string{"--version"}, code: 0, wantStdout: "muster-helper dev"},
		{name: "unknown flag", args: []string{"--nope"}, code: 2, wantStderr: "flag provided but not defined"},
		{name: "arguments", args: []string{"--ca-dir", dir, "request.json"}, code: 2, wantStderr: "unexpected arguments"},
		{name: "no CA", args: nil, code: 1, wantStderr: "--config or --ca-dir"},
		{name: "check config", args: []string{"--ca-dir", dir, "--check-config"}, code: 0},
		{name: "check config, CA missing", args: []string{"--ca-dir", t.TempDir(), "--check-config"}, code: 1, wantStderr: "ca.pem"},
		{name: "bad request", args: []string{"--ca-dir", dir, "--middleware-hosts", "b:4222"}, stdin: "[]", code: 1, wantStderr: "helper request"},
		{name: "one request", args: []string{"--ca-dir", dir, "--middleware-hosts", "b:4222"}, stdin: string(reqJSON), code: 0, wantStdout: `"certificate":"-----BEGIN CERTIFICATE-----`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("MUSTER_CA_DIR", "")
			t.Setenv("MUSTER_BROKER", "")
			var stdout, stderr bytes.Buffer
			code := run(tc.args, strings.NewReader(tc.stdin), &stdout, &stderr)
			if code != tc.code {
				t.Fatalf("exit %d, want %d; stderr %q", code, tc.code, stderr.String())
			}
			if !strings.Contains(stdout.String(), tc.wantStdout) || !strings.Contains(stderr.String(), tc.wantStderr) {
				t.Fatalf("stdout %q (want %q), stderr %q (want %q)", stdout.String(), tc.wantStdout, stderr.String(), tc.wantStderr)
			}
			if tc.name != "one request" {
				return
			}
			rep, err := helper.DecodeReply(stdout.Bytes())
			if err != nil {
				t.Fatal(err)
			}
			if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
				t.Fatal(err)
			}
			if rep.CA != string(c.CertificatePEM()) {
				t.Error("reply ca is not the CA certificate")
			}
		})
	}
}

// TestEnvironmentDefaults: with MUSTER_CA_DIR and MUSTER_BROKER set (what
// muster demo and muster bench give an exec'd helper) no flag is needed.
func TestEnvironmentDefaults(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if _, err := ca.Init(dir, "Test CA", 0); err != nil {
		t.Fatal(err)
	}
	t.Setenv("MUSTER_CA_DIR", dir)
	t.Setenv("MUSTER_BROKER", "env-broker:4222")
	var stdout, stderr bytes.Buffer
	in := `{"identity":"node1.example.net","csr":null,"inventory":"{}","jwt":null}`
	if code := run(nil, strings.NewReader(in), &stdout, &stderr); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	rep, err := helper.DecodeReply(stdout.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	if got := rep.Configuration["plugin.choria.middleware_hosts"]; got != "env-broker:4222" {
		t.Errorf("middleware hosts %q, want the environment's", got)
	}
}

func TestSign(t *testing.T) {
	dir, c, key, csr := fixture(t)
	t.Run("signs for the host", func(t *testing.T) {
		var out, errOut bytes.Buffer
		if code := run([]string{"sign", "--ca-dir", dir, "--host", "node1.example.net"}, bytes.NewReader(csr), &out, &errOut); code != 0 {
			t.Fatalf("exit %d: %s", code, errOut.String())
		}
		leaf, err := pki.VerifyLeaf(out.Bytes(), c.CertificatePEM(), key.Public(), "node1.example.net", time.Now())
		if err != nil {
			t.Fatalf("certificate: %v", err)
		}
		if got := leaf.DNSNames; len(got) != 1 || got[0] != "node1.example.net" {
			t.Errorf("SANs %v", got)
		}
	})
	for _, tc := range []struct {
		name  string
		args  []string
		stdin []byte
		code  int
		want  string
	}{
		{"no CA", []string{"sign"}, csr, 2, "--ca-dir"},
		{"missing CA", []string{"sign", "--ca-dir", t.TempDir()}, csr, 1, "not found"},
		{"not a CSR", []string{"sign", "--ca-dir", dir}, []byte("hello"), 1, "sign"},
		{"too large", []string{"sign", "--ca-dir", dir}, bytes.Repeat([]byte("A"), pki.MaxPEMSize+1), 1, "larger"},
		{"stray argument", []string{"sign", "--ca-dir", dir, "node1.csr"}, csr, 2, "unexpected"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("MUSTER_CA_DIR", "")
			var out, errOut bytes.Buffer
			code := run(tc.args, bytes.NewReader(tc.stdin), &out, &errOut)
			if code != tc.code || out.Len() != 0 || !strings.Contains(errOut.String(), tc.want) {
				t.Errorf("exit %d (want %d), stdout %q, stderr %q (want %q)", code, tc.code, out.String(), errOut.String(), tc.want)
			}
		})
	}
}
