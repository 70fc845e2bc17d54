package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/internal/syncbuf"
	"github.com/muster-io/muster/internal/token"
)

// secretToken is a real provisioning token compiled into the test binary
// (it carries the trusted provisioner key); its signature is the secret
// part that must never be printed.
var secretToken, secretSig = makeToken()

func makeToken() (string, string) {
	seed, _, err := token.GenerateIssuerSeed()
	if err != nil {
		panic(err)
	}
	iss, err := token.NewIssuer(seed)
	if err != nil {
		panic(err)
	}
	kp, err := nkeys.CreateUser()
	if err != nil {
		panic(err)
	}
	pub, _ := kp.PublicKey()
	tok, _, err := iss.Create(token.Scope{ProvisionerKeys: []string{pub}}, time.Now(), time.Hour)
	if err != nil {
		panic(err)
	}
	return tok, tok[strings.LastIndexByte(tok, '.')+1:]
}

func buildAgent(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "muster-agent")
	ld := "-X main.provisionToken=" + secretToken + " -X main.provisionBrokers=tls://127.0.0.1:1,127.0.0.1:2 -X main.provisionDefault=true -X main.provisionCAPin=sha256:" + strings.Repeat("ab", 32) + " -X main.version=9.9.9 -X main.aliveInterval=7s -X main.provisionShuffle=false"
	cmd := exec.Command("go", "build", "-ldflags", ld, "-o", bin, ".")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

func exitCode(t *testing.T, err error) int {
	t.Helper()
	if err == nil {
		return 0
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatal(err)
	}
	return ee.ExitCode()
}

func TestBinary(t *testing.T) {
	bin := buildAgent(t)

	t.Run("buildinfo", func(t *testing.T) {
		out, err := exec.Command(bin, "buildinfo").CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if bytes.Contains(out, []byte(secretSig)) {
			t.Fatalf("token shown:\n%s", out)
		}
		for _, want := range []string{"9.9.9", "tls://127.0.0.1:1, 127.0.0.1:2", "Provisioning token: set"} {
			if !bytes.Contains(out, []byte(want)) {
				t.Errorf("output lacks %q:\n%s", want, out)
			}
		}
		out, err = exec.Command(bin, "buildinfo", "--json").Output()
		if err != nil {
			t.Fatal(err)
		}
		var bi buildInfo
		if err := json.Unmarshal(out, &bi); err != nil {
			t.Fatal(err)
		}
		if bi.ProvisionToken != "set" || !bi.ProvisionByDefault || len(bi.ProvisionBrokers) != 2 || strings.Contains(string(out), secretSig) {
			t.Fatalf("json buildinfo %s", out)
		}
		if bi.AliveInterval != "7s" || bi.ProvisionShuffle || bi.ReconnectWait != "2s" || bi.ReconnectMaxWait != "30s" {
			t.Fatalf("compiled-in failover settings in buildinfo %s", out)
		}
	})

	t.Run("help", func(t *testing.T) {
		for _, args := range [][]string{{"--help"}, {"run", "--help"}, {"buildinfo", "--help"}, {"--no-such-flag"}} {
			out, _ := exec.Command(bin, args...).CombinedOutput()
			if !bytes.Contains(out, []byte("--token")) && args[0] != "buildinfo" && args[0] != "--no-such-flag" {
				t.Fatalf("%v: no usage shown:\n%s", args, out)
			}
			if bytes.Contains(out, []byte(secretSig)) {
				t.Fatalf("%v: the compiled-in token is shown:\n%s", args, out)
			}
		}
	})

	cases := []struct {
		name  string
		args  []string
		setup func(dir string)
		want  int
	}{
		{"bad log level", []string{"--loglevel", "loud"}, nil, exitError},
		{"bad identity", []string{"--identity", "a b"}, nil, exitError},
		{"stays down", []string{"run"}, func(dir string) {
			os.WriteFile(filepath.Join(dir, "shutdown"), []byte("x"), 0o600)
		}, exitStayDown},
		{"no mode", []string{"--provision=false"}, nil, exitError},
		{"alive interval too short", []string{"--alive-interval", "1ms"}, nil, exitError},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if tc.setup != nil {
				tc.setup(dir)
			}
			args := append([]string{"--identity", "n1", "--state-dir", dir}, tc.args...)
			cmd := exec.Command(bin, args...)
			out, err := cmd.CombinedOutput()
			if got := exitCode(t, err); got != tc.want {
				t.Fatalf("exit %d, want %d\n%s", got, tc.want, out)
			}
			if bytes.Contains(out, []byte(secretSig)) {
				t.Fatalf("token in output:\n%s", out)
			}
		})
	}

	t.Run("SIGTERM exits cleanly", func(t *testing.T) {
		dir := t.TempDir()
		stderr := &syncbuf.Buffer{}
		cmd := exec.Command(bin, "run", "--identity", "n1", "--state-dir", dir, "--loglevel", "debug")
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for !strings.Contains(stderr.String(), "starting in provisioning mode") {
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				t.Fatalf("agent did not start:\n%s", stderr.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if got := exitCode(t, cmd.Wait()); got != exitOK {
			t.Fatalf("exit %d\n%s", got, stderr.String())
		}
		if strings.Contains(stderr.String(), secretSig) {
			t.Fatal("token in the log")
		}
	})
}

func TestServeMetrics(t *testing.T) {
	kp, err := nkeys.CreateAccount()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	a, err := agent.New(agent.Options{Identity: "n1.example.net", StateDir: t.TempDir(), Provisioning: agent.ProvisioningSettings{
		Enabled: true, Brokers: []string{"nats://127.0.0.1:1"}, InsecureSkipVerify: true, TrustedKeys: []string{pub}}})
	if err != nil {
		t.Fatal(err)
	}
	addr, stop, err := serveMetrics("127.0.0.1:0", a)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	res, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != agent.MetricsContentType {
		t.Fatalf("status %d, content type %q", res.StatusCode, res.Header.Get("Content-Type"))
	}
	for _, want := range []string{`muster_agent_refused_requests_total{reason="replayed"} 0`, "muster_agent_mode 0"} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("no %q in\n%s", want, body)
		}
	}
	res, err = http.Post("http://"+addr.String()+"/metrics", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST: status %d", res.StatusCode)
	}
}

// TestAgentLinksNoPrometheusClient keeps the agent binary free of the
// Prometheus client library, whose package initialisation every agent
// start (and every restart, a re-exec) would pay (agent.WriteMetrics).
func TestAgentLinksNoPrometheusClient(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if strings.HasPrefix(pkg, "github.com/prometheus/") {
			t.Errorf("muster-agent links %s", pkg)
		}
	}
}
