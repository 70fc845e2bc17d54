package helper_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
)

// binBuild builds one command of the module once per test binary.
type binBuild struct {
	once sync.Once
	path string
	err  error
	out  string
}

// built holds cmd/muster (the example helpers call "muster ca sign") and
// cmd/muster-helper, each built on first use.
var built struct {
	muster, musterHelper binBuild
}

// musterBin is cmd/muster; MUSTER_TEST_BIN names a prebuilt binary instead.
func musterBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("MUSTER_TEST_BIN"); p != "" {
		return p
	}
	return buildCmd(t, &built.muster, "muster")
}

// musterHelperBin is cmd/muster-helper; MUSTER_TEST_HELPER_BIN names a
// prebuilt binary instead.
func musterHelperBin(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("MUSTER_TEST_HELPER_BIN"); p != "" {
		return p
	}
	return buildCmd(t, &built.musterHelper, "muster-helper", "CGO_ENABLED=0") // as make build does
}

// buildCmd runs `go build ./cmd/<name>` into a temporary directory once,
// with env added to the environment.
func buildCmd(t testing.TB, b *binBuild, name string, env ...string) string {
	t.Helper()
	b.once.Do(func() {
		gomod, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			b.err = err
			return
		}
		root := filepath.Dir(strings.TrimSpace(string(gomod)))
		dir, err := os.MkdirTemp("", "muster-helper-test-")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, name)
		cmd := exec.Command("go", "build", "-o", b.path, "./cmd/"+name)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		b.err, b.out = err, string(out)
	})
	if b.err != nil {
		t.Fatalf("go build ./cmd/%s: %v\n%s", name, b.err, b.out)
	}
	return b.path
}

// TestMain removes the binaries built by musterBin and musterHelperBin.
// With MUSTER_FAKE_HELPER set the test binary is instead a persistent
// helper process for persistent_test.go.
func TestMain(m *testing.M) {
	if mode := os.Getenv("MUSTER_FAKE_HELPER"); mode != "" {
		os.Exit(fakeHelper(mode))
	}
	code := m.Run()
	for _, b := range []*binBuild{&built.muster, &built.musterHelper} {
		if b.path != "" {
			os.RemoveAll(filepath.Dir(b.path))
		}
	}
	os.Exit(code)
}

// examplesDir is examples/helpers at the module root.
func examplesDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(filepath.Join("..", "examples", "helpers"))
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestExampleHelpers(t *testing.T) {
	helpers := []struct {
		name       string
		command    func(bin, dir, caDir string) string
		needs      []string
		persistent bool     // also supports --persistent
		fastSigner bool     // signs with MUSTER_HELPER_BIN ("muster-helper sign")
		env        []string // more environment
	}{
		// The shell helper runs $JQ: each jq it can pick runs every scenario.
		{"shell", func(_, dir, _ string) string { return filepath.Join(dir, "helper.sh") }, []string{"bash", "jq"}, true, false, []string{"JQ=jq"}},
		{"shell, muster-helper sign", func(_, dir, _ string) string { return filepath.Join(dir, "helper.sh") }, []string{"bash", "jq"}, true, true, []string{"JQ=jq"}},
		{"shell, gojq, muster-helper sign", func(_, dir, _ string) string { return filepath.Join(dir, "helper.sh") }, []string{"bash", "gojq"}, true, true, []string{"JQ=gojq"}},
		{"python", func(_, dir, _ string) string { return filepath.Join(dir, "helper.py") }, []string{"python3"}, true, false, nil},
		{"python, muster-helper sign", func(_, dir, _ string) string { return filepath.Join(dir, "helper.py") }, []string{"python3"}, true, true, nil},
		{"ruby", func(_, dir, _ string) string { return filepath.Join(dir, "helper.rb") }, []string{"ruby"}, true, false, nil},
		{"ruby, muster-helper sign", func(_, dir, _ string) string { return filepath.Join(dir, "helper.rb") }, []string{"ruby"}, true, true, nil},
		{"builtin cfssl", func(bin, _, caDir string) string {
			cfg := filepath.Join(caDir, "helper.yaml")
			yaml := "middleware_hosts: localhost:4333\n" +
				"rules:\n  - name: malta\n    facts: {country: mt}\n    set: {plugin.choria.middleware_hosts: \"choria1.mt.example.net:4223\"}\n" +
				"defer_unless: {country: \"*\"}\n"
			if err := os.WriteFile(cfg, []byte(yaml), 0o600); err != nil {
				panic(err)
			}
			return bin + " helper cfssl --config " + cfg + " --ca-dir " + caDir
		}, nil, true, false, nil},
	}
	const id = "node1.example.net"
	type scenario struct {
		name       string
		facts      map[string]string
		withCSR    bool
		ssldir     string // default /var/lib/muster/ssl
		inventory  string // instead of one made of facts
		wantDefer  bool
		wantBroker string
		wantErr    bool
	}
	scenarios := []scenario{
		{name: "country mt", facts: map[string]string{"country": "mt"}, withCSR: true, wantBroker: "choria1.mt.example.net:4223"},
		{name: "other country uses the default broker", facts: map[string]string{"country": "de"}, withCSR: true, wantBroker: "localhost:4333"},
		{name: "no CSR", facts: map[string]string{"country": "de"}, wantBroker: "localhost:4333"},
		{name: "defer fact", facts: map[string]string{"defer": "true"}, withCSR: true, wantDefer: true},
		// What comes from the node is data, whatever it holds: quotes,
		// backslashes, command substitutions and control characters come
		// back exactly, and run nothing.
		{name: "hostile facts and ssldir", facts: map[string]string{"country": `mt"; touch pwned; "`, "defer": "$(true)"}, withCSR: true,
			ssldir: "/var/lib/mu\"s\\ter $(touch x) `id`\t\u00e9/ssl", wantBroker: "localhost:4333"},
		{name: "inventory not an object", inventory: `["facts"]`, wantErr: true},
	}
	for _, h := range helpers {
		t.Run(h.name, func(t *testing.T) {
			for _, tool := range h.needs {
				if _, err := exec.LookPath(tool); err != nil {
					t.Skipf("%s is not installed: the %s example helper needs it (CI installs it)", tool, h.name)
				}
			}
			bin := musterBin(t)
			_, caDir := newCA(t)
			env := append([]string{"MUSTER_BIN=" + bin, "MUSTER_CA_DIR=" + caDir, "MUSTER_BROKER=localhost:4333"}, h.env...)
			if h.fastSigner {
				// The example signs with "muster-helper sign" when it has
				// one; the "muster ca sign" fallback runs in its own case.
				env = append(env, "MUSTER_HELPER_BIN="+musterHelperBin(t))
			}
			eo := helper.ExecOptions{
				Command: h.command(bin, examplesDir(t), caDir),
				Timeout: 30 * time.Second,
				Env:     env,
			}
			e, err := helper.NewExec(eo)
			if err != nil {
				t.Fatal(err)
			}
			runners := []struct {
				mode string
				h    helper.Helper
			}{{"exec", e}}
			if h.persistent {
				p, err := helper.NewPersistent(helper.PersistentOptions{
					Command: eo.Command + " --persistent",
					Timeout: eo.Timeout,
					Env:     eo.Env,
				})
				if err != nil {
					t.Fatal(err)
				}
				defer p.Close()
				runners = append(runners, struct {
					mode string
					h    helper.Helper
				}{"persistent", p})
			}
			for _, r := range runners {
				for _, s := range scenarios {
					e := r.h
					t.Run(r.mode+"/"+s.name, func(t *testing.T) {
						inv, err := json.Marshal(map[string]any{"facts": s.facts, "agents": []string{"rpcutil"}})
						if err != nil {
							t.Fatal(err)
						}
						if s.inventory != "" {
							inv = []byte(s.inventory)
						}
						ssldir := "/var/lib/muster/ssl"
						if s.ssldir != "" {
							ssldir = s.ssldir
						}
						req := &helper.Request{Identity: id, Inventory: string(inv), RequestID: "req-" + s.name}
						if s.withCSR {
							_, csr := newCSR(t, id)
							req.CSR = &helper.CSRInfo{CSR: csr, SSLDir: ssldir}
						}
						rep, err := e.Provision(context.Background(), req)
						if s.wantErr {
							// In persistent mode the error must come back
							// tagged with this request's id, or Provision
							// would wait for the timeout.
							if err == nil {
								t.Fatalf("no error for a bad request: %+v", rep)
							}
							return
						}
						if err != nil {
							t.Fatalf("%v\nstderr: %s", err, helper.Stderr(err))
						}
						if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
							t.Fatal(err)
						}
						if rep.Defer != s.wantDefer {
							t.Fatalf("defer = %t, want %t (%+v)", rep.Defer, s.wantDefer, rep)
						}
						if s.wantDefer {
							return
						}
						if got := rep.Configuration["plugin.choria.middleware_hosts"]; got != s.wantBroker {
							t.Errorf("middleware_hosts = %q, want %q", got, s.wantBroker)
						}
						if s.withCSR && (rep.Certificate == "" || rep.SSLDir != ssldir) {
							t.Errorf("certificate %d bytes, ssldir %q", len(rep.Certificate), rep.SSLDir)
						}
						wantKey := "/etc/muster/ssl/private.pem"
						if s.withCSR {
							wantKey = ssldir + "/private.pem"
						}
						if got := rep.Configuration["plugin.security.file.key"]; got != wantKey {
							t.Errorf("key path = %q, want %q", got, wantKey)
						}
					})
				}
			}
		})
	}
}

// TestShellHelperPicksJQ checks which jq the shell helper runs: $JQ when
// set, else gojq when it is on the PATH, else jq. Each candidate on the
// PATH is a wrapper that notes its name and runs the real one.
func TestShellHelperPicksJQ(t *testing.T) {
	real := map[string]string{}
	for _, tool := range []string{"bash", "jq", "gojq"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Skipf("%s is not installed (CI installs it)", tool)
		}
		real[tool] = p
	}
	_, caDir := newCA(t)
	signer := musterHelperBin(t)
	const id = "node1.example.net"
	cases := []struct {
		name string
		path []string // wrapped tools on the PATH
		jq   string   // JQ: a wrapper's name, or "" for unset
		want string
	}{
		{"gojq when installed", []string{"jq", "gojq"}, "", "gojq"},
		{"jq without gojq", []string{"jq"}, "", "jq"},
		{"JQ first", []string{"jq", "gojq"}, "jq", "jq"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.Symlink(real["bash"], filepath.Join(dir, "bash")); err != nil {
				t.Fatal(err)
			}
			marker := filepath.Join(dir, "ran")
			for _, tool := range tc.path {
				wrapper := fmt.Sprintf("#!/bin/sh\necho %s >> '%s'\nexec '%s' \"$@\"\n", tool, marker, real[tool])
				if err := os.WriteFile(filepath.Join(dir, tool), []byte(wrapper), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			env := []string{"PATH=" + dir, "MUSTER_CA_DIR=" + caDir, "MUSTER_HELPER_BIN=" + signer, "JQ="}
			if tc.jq != "" {
				env[len(env)-1] = "JQ=" + filepath.Join(dir, tc.jq)
			}
			e, err := helper.NewExec(helper.ExecOptions{
				Command: filepath.Join(examplesDir(t), "helper.sh"),
				Timeout: 30 * time.Second,
				Env:     env,
			})
			if err != nil {
				t.Fatal(err)
			}
			_, csr := newCSR(t, id)
			req := &helper.Request{Identity: id, Inventory: `{"facts":{}}`, CSR: &helper.CSRInfo{CSR: csr, SSLDir: "/var/lib/muster/ssl"}}
			rep, err := e.Provision(context.Background(), req)
			if err != nil {
				t.Fatalf("%v\nstderr: %s", err, helper.Stderr(err))
			}
			if err := helper.ValidateReply(req, rep, time.Now()); err != nil {
				t.Fatal(err)
			}
			ran, err := os.ReadFile(marker)
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.TrimSpace(string(ran)); got != tc.want {
				t.Errorf("ran %q, want %q once", got, tc.want)
			}
		})
	}
}
