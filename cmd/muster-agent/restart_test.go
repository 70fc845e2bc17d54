package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/syncbuf"
)

// TestRestartReExecs checks that a restart request makes the binary
// re-execute itself (same process ID, a second startup event).
func TestRestartReExecs(t *testing.T) {
	bin := buildAgent(t)
	caDir := filepath.Join(t.TempDir(), "ca")
	c, err := ca.Init(caDir, "Test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	is, err := c.Issue("broker", []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(is.CertPEM, is.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(c.Certificate())
	srv, err := server.NewServer(&server.Options{
		Host: "127.0.0.1", Port: -1, StoreDir: t.TempDir(), NoLog: true, NoSigs: true, TLS: true, TLSTimeout: 5,
		TLSConfig: &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{pair}, ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: pool},
	})
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	t.Cleanup(srv.Shutdown)
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("server not ready")
	}
	url := "tls://127.0.0.1:" + strconv.Itoa(srv.Addr().(*net.TCPAddr).Port)
	caFile := filepath.Join(caDir, ca.CertFile)
	nc, err := nats.Connect(url, nats.RootCAs(caFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	var mu sync.Mutex
	startups := 0
	if _, err := nc.Subscribe(protocol.LifecycleSubject(protocol.EventStartup, protocol.AgentComponent, "n1"), func(*nats.Msg) {
		mu.Lock()
		startups++
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	count := func() int { mu.Lock(); defer mu.Unlock(); return startups }
	waitFor := func(n int) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for count() < n {
			if time.Now().After(deadline) {
				t.Fatalf("waiting for %d startup events, have %d", n, count())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	cmd := exec.Command(bin, "run", "--identity", "n1", "--state-dir", t.TempDir(),
		"--provisioning-broker", url, "--ca", caFile, "--ca-pin", c.Pin(), "--provisioner-key", pub)
	stderr := &syncbuf.Buffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitFor(1)

	body, _ := json.Marshal(protocol.RestartRequest{SplayMillis: 10})
	r := protocol.Request{
		Protocol: protocol.RequestProtocol, ID: nuid.Next(), Sender: "test", Target: "n1",
		Agent: protocol.AgentProvision, Action: protocol.ActionRestart, Time: time.Now().UTC(), TTL: 60, Body: body,
	}
	if err := r.Sign(kp); err != nil {
		t.Fatal(err)
	}
	req, _ := json.Marshal(r)
	msg, err := nc.Request(protocol.NodeSubject(protocol.ProvisioningCollective, "n1"), req, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := protocol.DecodeReply(msg.Data)
	if err != nil || rep.Code != protocol.CodeOK {
		t.Fatalf("restart reply %+v %v", rep, err)
	}
	waitFor(2)
	if !strings.Contains(stderr.String(), "re-executing") {
		t.Fatalf("no re-exec in the log:\n%s", stderr.String())
	}
	if cmd.ProcessState != nil {
		t.Fatal("process exited instead of re-executing")
	}
}
