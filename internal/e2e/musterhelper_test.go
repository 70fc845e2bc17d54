package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/provisioner"
)

// TestMusterHelper provisions real agents through the muster-helper binary
// (the built-in helper signing with crypto/x509), exec'd once per node and
// as one persistent process. It finds the fleet's CA and production broker
// in MUSTER_CA_DIR and MUSTER_BROKER, as with muster bench and muster demo.
func TestMusterHelper(t *testing.T) {
	cases := []struct {
		name       string
		command    string
		persistent bool
		nodes      int
	}{
		{"exec", bins.musterHelper, false, 20},
		{"persistent", bins.musterHelper + " --persistent --concurrency 4", true, 30},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			provisioned := map[string]int{}
			f, err := demo.New(demo.Options{
				Nodes:            tc.nodes,
				Dir:              t.TempDir(),
				HelperCommand:    tc.command,
				HelperPersistent: tc.persistent,
				MusterBin:        bins.muster,
				HelperTimeout:    10 * time.Second,
				OnNodeDone: func(id string, out provisioner.Outcome, _ provisioner.Stage, _ error) {
					if out == provisioner.OutcomeProvisioned {
						mu.Lock()
						provisioned[id]++
						mu.Unlock()
					}
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := f.Close(); err != nil {
					t.Errorf("fleet close: %v", err)
				}
			})
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := f.Start(ctx); err != nil {
				t.Fatal(err)
			}
			if got := f.WaitProduction(ctx, tc.nodes); got != tc.nodes {
				t.Fatalf("%d of %d nodes reached production; errors: %v", got, tc.nodes, f.Errors())
			}
			answered, err := f.PingProduction(ctx, 5*time.Second)
			if err != nil || len(answered) != tc.nodes {
				t.Fatalf("%d of %d answered rpcutil ping over mTLS (%v)", len(answered), tc.nodes, err)
			}
			caCert := f.CA().Certificate()
			for _, id := range f.Identities() {
				verifyNodeCertificate(t, f, id, caCert)
			}
			mu.Lock()
			defer mu.Unlock()
			for _, id := range f.Identities() {
				if provisioned[id] != 1 {
					t.Errorf("%s provisioned %d times, want once", id, provisioned[id])
				}
			}
		})
	}
}

// verifyNodeCertificate checks what the node wrote: its key (0600), a
// certificate for that key and its identity chaining to the fleet CA with
// the node profile (leaf, server and client auth, the helper's default
// one-year lifetime), and the fleet CA as ca.pem.
func verifyNodeCertificate(t *testing.T, f *demo.Fleet, id string, caCert *x509.Certificate) {
	t.Helper()
	ssl := filepath.Join(f.AgentDir(id), "ssl")
	keyFile := filepath.Join(ssl, "private.pem")
	if st, err := os.Stat(keyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("%s: key file %v (%v)", id, st, err)
		return
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	key, err := pki.ParsePrivateKey(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err := os.ReadFile(filepath.Join(ssl, "certificate.pem"))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(ssl, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(bytes.TrimSpace(caPEM), bytes.TrimSpace(f.CA().CertificatePEM())) {
		t.Errorf("%s: ca.pem is not the fleet CA", id)
	}
	leaf, err := pki.VerifyLeaf(certPEM, caPEM, key.Public(), id, time.Now())
	if err != nil {
		t.Errorf("%s: certificate: %v", id, err)
		return
	}
	switch {
	case leaf.Subject.CommonName != id || !slices.Equal(leaf.DNSNames, []string{id}):
		t.Errorf("%s: certificate for CN %q, names %v", id, leaf.Subject.CommonName, leaf.DNSNames)
	case leaf.IsCA || !leaf.BasicConstraintsValid:
		t.Errorf("%s: certificate is not a leaf", id)
	case leaf.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment:
		t.Errorf("%s: key usage %v", id, leaf.KeyUsage)
	case !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}):
		t.Errorf("%s: extended key usage %v", id, leaf.ExtKeyUsage)
	case !bytes.Equal(leaf.AuthorityKeyId, caCert.SubjectKeyId) || len(leaf.SubjectKeyId) == 0:
		t.Errorf("%s: key ids %x / %x", id, leaf.SubjectKeyId, leaf.AuthorityKeyId)
	case leaf.NotAfter.Sub(leaf.NotBefore) != 8760*time.Hour:
		t.Errorf("%s: lifetime %s, want 8760h", id, leaf.NotAfter.Sub(leaf.NotBefore))
	case leaf.SignatureAlgorithm != x509.ECDSAWithSHA256:
		t.Errorf("%s: signature algorithm %v", id, leaf.SignatureAlgorithm)
	}
}
