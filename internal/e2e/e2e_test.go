// Package e2e holds Muster's end-to-end tests: the real broker, provisioner
// and agents in one process, with helpers exec'd as real programs.
package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/provisioner"
)

// connectTimeout bounds the tests' own connections to the broker: a TLS
// handshake on a machine running several suites at once can take longer
// than nats.go's 2 s default.
const connectTimeout = 10 * time.Second

var bins struct {
	muster, musterHelper, testhelper string
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "muster-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins.muster = filepath.Join(dir, "muster")
	bins.musterHelper = filepath.Join(dir, "muster-helper")
	bins.testhelper = filepath.Join(dir, "testhelper")
	for out, pkg := range map[string]string{bins.muster: "../../cmd/muster", bins.musterHelper: "../../cmd/muster-helper", bins.testhelper: "./testhelper"} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		if pkg == "../../cmd/muster-helper" {
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0") // as make build does
		}
		if b, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, b)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// sniffer records every message on ">" in one account.
type sniffer struct {
	mu   sync.Mutex
	msgs int
	bad  []string
}

func (s *sniffer) handle(m *nats.Msg) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs++
	if bytes.Contains(m.Data, []byte("PRIVATE KEY")) {
		s.bad = append(s.bad, m.Subject)
	}
}

func newFleet(t *testing.T, nodes int, helperArgs string, tweak func(*demo.Options)) *demo.Fleet {
	t.Helper()
	o := demo.Options{
		Nodes:         nodes,
		Dir:           t.TempDir(),
		HelperCommand: bins.testhelper + " " + helperArgs,
		MusterBin:     bins.muster,
		HelperTimeout: 10 * time.Second,
		DeferBackoff:  time.Second,
	}
	if tweak != nil {
		tweak(&o)
	}
	f, err := demo.New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Errorf("fleet close: %v", err)
		}
	})
	return f
}

func TestFiftyNodesExecHelper(t *testing.T) {
	const n = 50
	f := newFleet(t, n, "cfssl", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// Sniff both accounts before anything runs.
	if err := f.StartBroker(); err != nil {
		t.Fatal(err)
	}
	var prov, prod sniffer
	pc, err := nats.Connect(f.Broker().ClientURL(), nats.RootCAs(filepath.Join(f.Dir(), "pki", "ca.pem")), nats.Timeout(connectTimeout), mustNkey(t, filepath.Join(f.Dir(), "pki", "provisioner.nk")))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := pc.Subscribe(">", prov.handle); err != nil {
		t.Fatal(err)
	}
	ac, err := f.AdminConn()
	if err != nil {
		t.Fatal(err)
	}
	defer ac.Close()
	if _, err := ac.Subscribe(">", prod.handle); err != nil {
		t.Fatal(err)
	}
	pc.Flush()
	ac.Flush()

	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.WaitProduction(ctx, n); got != n {
		t.Fatalf("%d of %d nodes reached production; errors: %v", got, n, f.Errors())
	}
	answered, err := f.PingProduction(ctx, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if len(answered) != n {
		t.Fatalf("%d of %d nodes answered rpcutil ping over mTLS", len(answered), n)
	}
	for _, id := range f.Identities() {
		ssl := filepath.Join(f.AgentDir(id), "ssl")
		keyPEM, err := os.ReadFile(filepath.Join(ssl, "private.pem"))
		if err != nil {
			t.Fatal(err)
		}
		if st, _ := os.Stat(filepath.Join(ssl, "private.pem")); st.Mode().Perm() != 0o600 {
			t.Errorf("%s: key mode %v", id, st.Mode().Perm())
		}
		key, err := pki.ParsePrivateKey(keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		certPEM, _ := os.ReadFile(filepath.Join(ssl, "certificate.pem"))
		caPEM, _ := os.ReadFile(filepath.Join(ssl, "ca.pem"))
		if _, err := pki.VerifyLeaf(certPEM, caPEM, key.Public(), id, time.Now()); err != nil {
			t.Errorf("%s: issued certificate: %v", id, err)
		}
		if !bytes.Equal(bytes.TrimSpace(caPEM), bytes.TrimSpace(f.CA().CertificatePEM())) {
			t.Errorf("%s: ca.pem is not the fleet CA", id)
		}
	}
	pc.Flush()
	ac.Flush()
	for name, s := range map[string]*sniffer{"provisioning": &prov, "production": &prod} {
		s.mu.Lock()
		if s.msgs == 0 {
			t.Errorf("%s sniffer saw no messages", name)
		}
		if len(s.bad) > 0 {
			t.Errorf("%s: private key seen on %v", name, s.bad)
		}
		s.mu.Unlock()
	}
	// Each node configured exactly once.
	for _, ns := range f.Provisioner().Nodes() {
		if ns.State == "provisioned" && ns.Attempts > 1 {
			t.Logf("%s took %d attempts", ns.Identity, ns.Attempts)
		}
	}
}

// TestPersistentHelper provisions a fleet through one persistent built-in
// helper process answering request lines.
func TestPersistentHelper(t *testing.T) {
	const n = 30
	o := demo.Options{
		Nodes:            n,
		Dir:              t.TempDir(),
		HelperCommand:    bins.muster + " helper cfssl --persistent",
		HelperPersistent: true,
		MusterBin:        bins.muster,
	}
	f, err := demo.New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.WaitProduction(ctx, n); got != n {
		t.Fatalf("%d of %d nodes reached production; errors: %v", got, n, f.Errors())
	}
	answered, err := f.PingProduction(ctx, 5*time.Second)
	if err != nil || len(answered) != n {
		t.Fatalf("%d of %d answered over mTLS (%v)", len(answered), n, err)
	}
}

func TestHelperDefersOnceThenSucceeds(t *testing.T) {
	const n = 5
	state := t.TempDir()
	t.Setenv("MUSTER_TEST_STATE", state)
	var mu sync.Mutex
	deferred := map[string]int{}
	f := newFleet(t, n, "defer-once", func(o *demo.Options) {
		o.OnNodeDone = func(id string, out provisioner.Outcome, _ provisioner.Stage, _ error) {
			if out == provisioner.OutcomeDeferred {
				mu.Lock()
				deferred[id]++
				mu.Unlock()
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.WaitProduction(ctx, n); got != n {
		t.Fatalf("%d of %d nodes reached production; errors: %v", got, n, f.Errors())
	}
	mu.Lock()
	defer mu.Unlock()
	for _, id := range f.Identities() {
		if deferred[id] != 1 {
			t.Errorf("%s deferred %d times, want 1", id, deferred[id])
		}
	}
}

// TestHelperFailures runs helpers that never succeed and checks every node
// ends with a clear error and nothing half-configured.
func TestHelperFailures(t *testing.T) {
	cases := []struct {
		name    string
		args    string
		want    error
		timeout time.Duration
	}{
		{"timeout", "sleep", helper.ErrTimeout, time.Second},
		{"garbage", "garbage", helper.ErrBadJSON, 0},
		{"certificate for another key", "wrong-key", helper.ErrInvalidReply, 0},
		{"non-zero exit", "exit", helper.ErrExit, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			const n = 3
			f := newFleet(t, n, c.args, func(o *demo.Options) {
				if c.timeout > 0 {
					o.HelperTimeout = c.timeout
				}
			})
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := f.Start(ctx); err != nil {
				t.Fatal(err)
			}
			var errs map[string]error
			for ctx.Err() == nil {
				errs = f.Errors()
				if len(errs) == n {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if len(errs) != n {
				t.Fatalf("errors for %d of %d nodes: %v", len(errs), n, errs)
			}
			for id, err := range errs {
				if !errors.Is(err, c.want) {
					t.Errorf("%s: error %v, want %v", id, err, c.want)
				}
				if strings.Contains(err.Error(), "PRIVATE KEY") {
					t.Errorf("%s: error mentions a private key", id)
				}
			}
			if c.args == "exit" {
				for _, ns := range f.Provisioner().Nodes() {
					if !strings.Contains(ns.HelperStderr, "out of capacity") {
						t.Errorf("%s: status has helper stderr %q", ns.Identity, ns.HelperStderr)
					}
				}
			}
			if got := f.ProductionCount(); got != 0 {
				t.Fatalf("%d nodes reached production", got)
			}
			for _, id := range f.Identities() {
				for _, name := range []string{"agent.cfg", "ssl/certificate.pem", "ssl/ca.pem"} {
					if _, err := os.Stat(filepath.Join(f.AgentDir(id), name)); !os.IsNotExist(err) {
						t.Errorf("%s: %s exists after a failed provisioning (%v)", id, name, err)
					}
				}
			}
		})
	}
}

func mustNkey(t *testing.T, seedFile string) nats.Option {
	t.Helper()
	o, err := nats.NkeyOptionFromSeed(seedFile)
	if err != nil {
		t.Fatal(err)
	}
	return o
}
