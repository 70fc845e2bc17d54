package helper_test

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
)

// reverser is a persistent helper in Python that holds requests until it has
// n of them, then answers them in reverse order of arrival; a request whose
// identity starts with "slow" is never answered and one starting with
// "crash" kills the helper.
const reverser = `import json, sys, os
held = []
n = int(sys.argv[1])
for line in sys.stdin:
    req = json.loads(line)
    if req["identity"].startswith("slow"):
        continue
    if req["identity"].startswith("crash"):
        sys.stderr.write("helper crashing on purpose\n"); sys.stderr.flush()
        os._exit(7)
    held.append(req)
    if len(held) >= n:
        for r in reversed(held):
            sys.stdout.write(json.dumps({"request_id": r["request_id"], "defer": True, "msg": r["identity"]}) + "\n")
        sys.stdout.flush()
        held = []
`

func newPersistentPy(t *testing.T, script string, args string, timeout time.Duration) *helper.Persistent {
	t.Helper()
	if _, err := exec.LookPath("python3"); err != nil {
		t.Skip("python3 not installed: persistent helper tests skipped")
	}
	path := writeScript(t, t.TempDir(), "helper.py", "")
	if err := writeFile(path, script); err != nil {
		t.Fatal(err)
	}
	p, err := helper.NewPersistent(helper.ExecOptions{Command: "python3 " + path + " " + args, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestPersistentOutOfOrderAndConcurrent(t *testing.T) {
	const n = 50
	p := newPersistentPy(t, reverser, fmt.Sprint(n), 20*time.Second)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("node%02d.example.net", i)
			rep, err := p.Provision(context.Background(), &helper.Request{Identity: id, Inventory: "{}"})
			if err != nil {
				errs <- fmt.Errorf("%w (stderr %q)", err, helper.Stderr(err))
				return
			}
			if !rep.Defer || rep.Msg != id {
				errs <- fmt.Errorf("%s got the reply meant for %q", id, rep.Msg)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestPersistentTimeoutDoesNotStallOthers(t *testing.T) {
	p := newPersistentPy(t, reverser, "1", 500*time.Millisecond)
	_, err := p.Provision(context.Background(), &helper.Request{Identity: "slow.example.net", Inventory: "{}"})
	if !errors.Is(err, helper.ErrTimeout) {
		t.Fatalf("slow request: %v, want helper.ErrTimeout", err)
	}
	rep, err := p.Provision(context.Background(), &helper.Request{Identity: "fast.example.net", Inventory: "{}"})
	if err != nil || rep.Msg != "fast.example.net" {
		t.Fatalf("request after a timeout: %+v %v", rep, err)
	}
}

func TestPersistentCrashRestarts(t *testing.T) {
	p := newPersistentPy(t, reverser, "1", 5*time.Second)
	_, err := p.Provision(context.Background(), &helper.Request{Identity: "crash.example.net", Inventory: "{}"})
	if !errors.Is(err, helper.ErrHelperDied) || !errors.Is(err, helper.ErrExit) {
		t.Fatalf("crash: %v, want helper.ErrHelperDied and helper.ErrExit", err)
	}
	if !strings.Contains(helper.Stderr(err), "crashing on purpose") {
		t.Fatalf("stderr %q", helper.Stderr(err))
	}
	rep, err := p.Provision(context.Background(), &helper.Request{Identity: "after.example.net", Inventory: "{}"})
	if err != nil || rep.Msg != "after.example.net" {
		t.Fatalf("request after the crash: %+v %v", rep, err)
	}
}

func TestPersistentGarbageLine(t *testing.T) {
	script := "import sys\nfor line in sys.stdin:\n    print('not json', flush=True)\n"
	p := newPersistentPy(t, script, "", 5*time.Second)
	_, err := p.Provision(context.Background(), &helper.Request{Identity: "n1.example.net", Inventory: "{}"})
	if !errors.Is(err, helper.ErrHelperDied) || !errors.Is(err, helper.ErrBadJSON) {
		t.Fatalf("garbage: %v, want helper.ErrHelperDied wrapping helper.ErrBadJSON", err)
	}
}

func TestPersistentErrorReply(t *testing.T) {
	script := "import sys, json\nfor line in sys.stdin:\n    r = json.loads(line)\n    print(json.dumps({'request_id': r['request_id'], 'error': 'no capacity'}), flush=True)\n"
	p := newPersistentPy(t, script, "", 5*time.Second)
	_, err := p.Provision(context.Background(), &helper.Request{Identity: "n1.example.net", Inventory: "{}"})
	if !errors.Is(err, helper.ErrHelperFailed) || !strings.Contains(err.Error(), "no capacity") {
		t.Fatalf("error reply: %v", err)
	}
}

func TestPersistentCloseEndsProcess(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	p := newPersistentPy(t, "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(3600)\n", pidFile, time.Second)
	_, _ = p.Provision(context.Background(), &helper.Request{Identity: "n1.example.net", Inventory: "{}"})
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	fmt.Sscan(string(b), &pid)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if !processGone(pid) {
		t.Fatalf("helper process %d still running after Close", pid)
	}
	if _, err := p.Provision(context.Background(), &helper.Request{Identity: "n1.example.net"}); err == nil {
		t.Fatal("Provision after Close succeeded")
	}
}

func TestPersistentBuiltinCfssl(t *testing.T) {
	bin := musterBin(t)
	c, caDir := newCA(t)
	p, err := helper.NewPersistent(helper.ExecOptions{Command: bin + " helper cfssl --persistent --ca-dir " + caDir + " --middleware-hosts localhost:4222", Timeout: 20 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := fmt.Sprintf("node%02d.example.net", i)
			key, csr := newCSR(t, id)
			pub, _ := marshalPub(key)
			req := &helper.Request{Identity: id, CSR: &helper.CSRInfo{CSR: csr, PublicKey: pub, SSLDir: "/etc/muster/ssl"}, Inventory: `{"facts":{}}`}
			rep, err := p.Provision(context.Background(), req)
			if err != nil {
				t.Errorf("%s: %v", id, err)
				return
			}
			if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
				t.Errorf("%s: %v", id, err)
			}
			if !strings.Contains(rep.CA, strings.TrimSpace(string(c.CertificatePEM()))[:60]) {
				t.Errorf("%s: reply CA is not the test CA", id)
			}
		}()
	}
	wg.Wait()
}

func writeFile(path, body string) error { return os.WriteFile(path, []byte(body), 0o755) }

func marshalPub(key crypto.Signer) (string, error) {
	b, err := pki.MarshalPublicKey(key.Public())
	return string(b), err
}
