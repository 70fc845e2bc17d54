package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// Test provisioner keys: testKey is trusted by the agents under test,
// rogueKey is not.
var (
	testKey     = mustUserKey()
	rogueKey    = mustUserKey()
	testTrusted = []string{mustPublic(testKey)}
)

func mustUserKey() nkeys.KeyPair {
	kp, err := nkeys.CreateUser()
	if err != nil {
		panic(err)
	}
	return kp
}

func mustPublic(kp nkeys.KeyPair) string {
	pub, err := kp.PublicKey()
	if err != nil {
		panic(err)
	}
	return pub
}

// env is a CA and a TLS nats-server on a random loopback port.
type env struct {
	ca     *ca.CA
	caFile string
	srv    *server.Server
	url    string
}

func newCA(t *testing.T) (*ca.CA, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	c, err := ca.Init(dir, "Muster Test CA", 0)
	if err != nil {
		t.Fatal(err)
	}
	return c, filepath.Join(dir, ca.CertFile)
}

func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvWith(t, nil)
}

// newEnvWith is newEnv with the broker's options changed by change first.
func newEnvWith(t *testing.T, change func(*server.Options)) *env {
	t.Helper()
	c, caFile := newCA(t)
	is, err := c.Issue("broker", []string{"127.0.0.1", "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(append(append([]byte{}, is.CertPEM...), c.CertificatePEM()...), is.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(c.Certificate())
	opts := &server.Options{
		Host:       "127.0.0.1",
		Port:       -1,
		StoreDir:   t.TempDir(),
		NoLog:      true,
		NoSigs:     true,
		TLS:        true,
		TLSTimeout: 5,
		TLSConfig: &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{pair},
			ClientAuth:   tls.VerifyClientCertIfGiven,
			ClientCAs:    pool,
		},
	}
	if change != nil {
		change(opts)
	}
	srv := startServer(t, opts)
	port := srv.Addr().(*net.TCPAddr).Port
	return &env{ca: c, caFile: caFile, srv: srv, url: "tls://127.0.0.1:" + strconv.Itoa(port)}
}

func startServer(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	return srv
}

// client connects the test's requester.
func (e *env) client(t *testing.T) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(e.url, nats.RootCAs(e.caFile), nats.Name("test-client"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// recorder collects messages on a subject.
type recorder struct {
	mu   sync.Mutex
	msgs []*nats.Msg
}

func record(t *testing.T, nc *nats.Conn, subject string) *recorder {
	t.Helper()
	r := &recorder{}
	if _, err := nc.Subscribe(subject, func(m *nats.Msg) {
		r.mu.Lock()
		r.msgs = append(r.msgs, m)
		r.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *recorder) count(match func(*nats.Msg) bool) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.msgs {
		if match == nil || match(m) {
			n++
		}
	}
	return n
}

// first returns the first message match accepts (nil when none did).
func (r *recorder) first(match func(*nats.Msg) bool) *nats.Msg {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range r.msgs {
		if match(m) {
			return m
		}
	}
	return nil
}

// eventsOf matches lifecycle events of one type for one identity.
func eventsOf(typ, id string) func(*nats.Msg) bool {
	return func(m *nats.Msg) bool {
		ev, err := protocol.DecodeEvent(m.Data)
		return err == nil && ev.Type == typ && ev.Identity == id && m.Subject == protocol.LifecycleSubject(typ, protocol.AgentComponent, id)
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// running is an agent started by startAgent.
type running struct {
	a      *Agent
	cancel context.CancelFunc
	done   chan error
}

func startAgent(t *testing.T, opts Options) *running {
	t.Helper()
	a, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{a: a, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(20 * time.Second):
			t.Error("agent did not stop")
		}
	})
	return r
}

// wait returns Run's error.
func (r *running) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

type reqOpts struct {
	key    nkeys.KeyPair // nil: unsigned
	target string
	time   time.Time
	id     string
}

func newRequest(id, target, agent, action string, key nkeys.KeyPair, at time.Time, body any) []byte {
	var raw json.RawMessage
	if body != nil {
		raw, _ = json.Marshal(body)
	}
	if id == "" {
		id = nuid.Next()
	}
	req := protocol.Request{
		Protocol: protocol.RequestProtocol, ID: id, Sender: "test", Target: target,
		Agent: agent, Action: action, Time: at.UTC(), TTL: 60, Body: raw,
	}
	if key != nil {
		if err := req.Sign(key); err != nil {
			panic(err)
		}
	}
	data, _ := json.Marshal(req)
	return data
}

// call sends a directed request and decodes the reply.
func call(t *testing.T, nc *nats.Conn, collective, id, agent, action string, o reqOpts, body any) *protocol.Reply {
	t.Helper()
	target := id
	if o.target != "" {
		target = o.target
	}
	at := time.Now()
	if !o.time.IsZero() {
		at = o.time
	}
	data := newRequest(o.id, target, agent, action, o.key, at, body)
	msg, err := nc.Request(protocol.NodeSubject(collective, id), data, 20*time.Second)
	if err != nil {
		t.Fatalf("%s %s: %v", agent, action, err)
	}
	rep, err := protocol.DecodeReply(msg.Data)
	if err != nil {
		t.Fatalf("%s %s reply: %v", agent, action, err)
	}
	if rep.Sender != id {
		t.Fatalf("reply sender %q, want %q", rep.Sender, id)
	}
	return rep
}

func mustOK(t *testing.T, rep *protocol.Reply) {
	t.Helper()
	if rep.Code != protocol.CodeOK {
		t.Fatalf("reply %s: %s", rep.Code, rep.Message)
	}
}

// snapshot reads every file under dir.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if info.IsDir() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		out[p] = fmt.Sprintf("%v|%s", info.Mode().Perm(), b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// signedFor signs a CSR for key and identity with c.
func signedFor(t *testing.T, c *ca.CA, identity string) (certPEM []byte, keyPEM []byte) {
	t.Helper()
	key, err := pki.GenerateKey("", 0)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.CreateCSR(key, identity, pki.CSRSubject{})
	if err != nil {
		t.Fatal(err)
	}
	certPEM, err = c.SignCSR(csr, nil)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err = pki.MarshalPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, keyPEM
}
