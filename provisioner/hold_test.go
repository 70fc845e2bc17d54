package provisioner

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/cfsslhelper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// startServerObj runs an embedded nats-server on a random loopback port and
// returns it (agents connect in process).
func startServerObj(t *testing.T) *server.Server {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	t.Cleanup(s.Shutdown)
	return s
}

// pauseIdle pauses p and waits until no attempt on id is in flight:
// paused workers take nothing new, but finish what they hold.
func pauseIdle(t *testing.T, p *Provisioner, id string) {
	t.Helper()
	p.Pause()
	waitFor(t, 20*time.Second, "no attempt in flight", func() bool {
		st, _ := nodeState(p, id)
		return st.State != StateInProgress
	})
}

// modes records the modes real agents connect in.
type modes struct {
	mu   sync.Mutex
	seen map[string][]agent.Mode
}

func (m *modes) ModeChanged(id string, mode agent.Mode, _ time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.seen == nil {
		m.seen = map[string][]agent.Mode{}
	}
	m.seen[id] = append(m.seen[id], mode)
}

func (m *modes) count(id string, mode agent.Mode) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := 0
	for _, x := range m.seen[id] {
		if x == mode {
			c++
		}
	}
	return c
}

// realAgent runs a real agent for id in stateDir, connected in process to
// srv, until the returned stop function is called.
func realAgent(t *testing.T, srv *server.Server, c *ca.CA, id, stateDir string, obs agent.Observer) (stop func()) {
	t.Helper()
	a, err := agent.New(agent.Options{
		Identity: id,
		StateDir: stateDir,
		Provisioning: agent.ProvisioningSettings{
			Token: nodeToken(t, id), TrustedKeys: testTrusted.Keys(), CAPEM: c.CertificatePEM(), Enabled: true,
		},
		Version:          "test",
		InProcess:        srv,
		MetadataInterval: 200 * time.Millisecond,
		ReconnectWait:    50 * time.Millisecond,
		Observer:         obs,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Error("agent did not stop")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// snapshot maps every file under dir to the SHA-256 of its content.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		sum := sha256.Sum256(b)
		out[rel] = hex.EncodeToString(sum[:])
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// changed lists the files that differ between two snapshots.
func changed(before, after map[string]string) []string {
	var out []string
	for k, v := range after {
		if before[k] != v {
			out = append(out, k)
		}
	}
	for k := range before {
		if _, ok := after[k]; !ok {
			out = append(out, k+" (removed)")
		}
	}
	sort.Strings(out)
	return out
}

// diskKey returns the fingerprint of the private key in an agent's ssldir.
func diskKey(t *testing.T, stateDir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(stateDir, agent.SSLDirName, agent.KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	k, err := pki.ParsePrivateKey(b)
	if err != nil {
		t.Fatal(err)
	}
	fp, err := Fingerprint(k.Public())
	if err != nil {
		t.Fatal(err)
	}
	return fp
}

// TestChangedKeyHeldApprovedDenied provisions a real agent, then brings the
// identity back as a reinstalled machine (a fresh state directory, so a new
// key). It is held: no configuration or certificate is written on its disk
// and it is not retried. Approved, it is provisioned with the key that was
// held. Back once more with another key, it is denied, and stays denied
// across a provisioner restart on the same state_dir.
func TestChangedKeyHeldApprovedDenied(t *testing.T) {
	const id = "node1.example.net"
	srv := startServerObj(t)
	url := srv.ClientURL()
	c := newCA(t)
	h, err := cfsslhelper.NewWithCA(c, &cfsslhelper.Config{MiddlewareHosts: "nats://127.0.0.1:4222"})
	if err != nil {
		t.Fatal(err)
	}
	stateDir := filepath.Join(t.TempDir(), "provisioner-state")
	cfg := testConfig()
	cfg.StateDir = stateDir
	cfg.Grace = 0
	cfg.RPCTimeout = Duration(2 * time.Second)
	cfg.Policy.CAFile = filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(cfg.Policy.CAFile, c.CertificatePEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	obs := newObserved()
	r := startProvisioner(t, url, cfg, h, obs, nil)
	m := &modes{}

	// 1. First life: provisioned, key recorded.
	dir1 := filepath.Join(t.TempDir(), "life1")
	stop1 := realAgent(t, srv, c, id, dir1, m)
	// Counts only grow; an agent may report a mode again when it
	// reconnects, so each phase waits for the count to pass the previous
	// one.
	waitFor(t, 30*time.Second, "first life in production", func() bool { return m.count(id, agent.ModeProduction) >= 1 })
	// The node can reach production before the provisioner has recorded
	// the restart's reply: wait for the record too.
	waitFor(t, 30*time.Second, "first life recorded", func() bool {
		rec, ok, _ := r.p.reg.Get(id)
		return ok && rec.Serial != ""
	})
	rec, ok, err := r.p.reg.Get(id)
	if err != nil || !ok || rec.KeyFingerprint != diskKey(t, dir1) || rec.Serial == "" {
		t.Fatalf("registry after first life: %+v %v %v", rec, ok, err)
	}
	// The record is on disk (a Put appends it to the journal) and the
	// registry's files are private.
	if b, err := os.ReadFile(filepath.Join(stateDir, RegistryJournal)); err != nil || !strings.Contains(string(b), rec.KeyFingerprint) {
		t.Fatalf("registry journal: %v\n%s", err, b)
	}
	for _, f := range []string{RegistryFile, RegistryJournal} {
		if st, err := os.Stat(filepath.Join(stateDir, f)); err == nil && st.Mode().Perm() != 0o600 {
			t.Fatalf("%s mode %v", f, st.Mode().Perm())
		}
	}
	// Paused before the life ends: the test config has no grace period,
	// so an announcement the old life sent before its restart can queue
	// the node again once it is provisioned; that attempt must wait for
	// the next life, not meet it half way.
	pauseIdle(t, r.p, id)
	stop1()

	// 2. Second life with a new key: held.
	dir2 := filepath.Join(t.TempDir(), "life2")
	baseProv := m.count(id, agent.ModeProvisioning)
	stop2 := realAgent(t, srv, c, id, dir2, m)
	waitFor(t, 20*time.Second, "second life waiting", func() bool {
		st, _ := nodeState(r.p, id)
		return m.count(id, agent.ModeProvisioning) > baseProv && st.State == StateQueued
	})
	before := snapshot(t, dir2)
	r.p.Resume()
	// The observer hears of the hold after the status shows it.
	waitFor(t, 20*time.Second, "node held", func() bool {
		st, _ := nodeState(r.p, id)
		return st.State == StateHeld && obs.has(id, "held/gencsr")
	})
	st, _ := nodeState(r.p, id)
	// The held key stays in the agent's memory (gencsr writes nothing):
	// it is the one the hold reports, and not the first life's.
	heldKey := st.KeyFingerprint
	if heldKey == "" || heldKey == rec.KeyFingerprint {
		t.Fatalf("held key %q, first life's %q", heldKey, rec.KeyFingerprint)
	}
	if st.HoldReason != HoldKeyChanged || st.KeyFingerprint != heldKey || !strings.Contains(st.LastError, "key_changed") || !obs.has(id, "held/gencsr") {
		t.Fatalf("held status %+v, events %v", st, obs.of(id))
	}
	// A hold is not an error. Under load an attempt can also fail at
	// gencsr (its request timed out on every try); each of those is an
	// error and a "failed/gencsr" event.
	failed := 0
	for _, e := range obs.of(id) {
		if e == "failed/gencsr" {
			failed++
		}
	}
	if v := testutil.ToFloat64(r.p.m.errors.WithLabelValues(string(StageGenCSR))); v != float64(failed) {
		t.Errorf("errors at gencsr %v, attempts failed there %d (events %v): a hold counted as an error", v, failed, obs.of(id))
	}
	afterHold := snapshot(t, dir2)
	// Nothing changes on a held node's disk: gencsr keeps its key in
	// memory, and no configuration, certificate or CA is sent.
	for _, f := range changed(before, afterHold) {
		t.Errorf("held node's disk changed: %s", f)
	}
	for _, f := range []string{agent.CertFile, agent.CAFile} {
		if _, ok := afterHold[filepath.Join(agent.SSLDirName, f)]; ok {
			t.Errorf("held node got %s", f)
		}
	}
	// Not retried: announcements and discovery leave it alone.
	for i := 0; i < 3; i++ {
		if n, err := r.p.Discover(context.Background()); err != nil || n != 1 {
			t.Fatalf("Discover = %d, %v", n, err)
		}
	}
	if st2, _ := nodeState(r.p, id); st2.State != StateHeld || st2.Attempts != st.Attempts {
		t.Fatalf("held node taken again: %+v", st2)
	}
	if d := changed(afterHold, snapshot(t, dir2)); len(d) != 0 {
		t.Fatalf("held node's disk changed after discovery: %v", d)
	}
	if got := heldGauge(t, r.p); got != 1 {
		t.Errorf("held_nodes = %v, want 1", got)
	}
	checkStateCounts(t, r.p)
	if held := r.p.HeldNodes(); len(held) != 1 || held[0].Identity != id {
		t.Fatalf("HeldNodes = %+v", held)
	}

	// 3. Approve: provisioned with the held key, which is recorded.
	baseProd := m.count(id, agent.ModeProduction)
	if err := r.p.Approve(id); err != nil {
		t.Fatal(err)
	}
	if err := r.p.Approve(id); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("second Approve = %v, want ErrNotHeld", err)
	}
	waitFor(t, 30*time.Second, "second life in production", func() bool {
		if m.count(id, agent.ModeProduction) > baseProd {
			return true
		}
		if st, _ := nodeState(r.p, id); st.State == StateFailed {
			t.Fatalf("approved node failed: %+v", st)
		}
		return false
	})
	waitFor(t, 10*time.Second, "approved key recorded", func() bool {
		rec, _, _ := r.p.reg.Get(id)
		return rec.KeyFingerprint == heldKey
	})
	if k := diskKey(t, dir2); k != heldKey {
		t.Fatalf("node key changed after approval: %s, approved %s", k, heldKey)
	}
	if got := heldGauge(t, r.p); got != 0 {
		t.Errorf("held_nodes = %v after approval", got)
	}

	// 4. Third life with yet another key: held, then denied. The second
	// life's machine is gone first (as the first life's was): two lives at
	// once are two machines claiming one identity, a hold of its own.
	pauseIdle(t, r.p, id)
	stop2()
	dir3 := filepath.Join(t.TempDir(), "life3")
	baseProv = m.count(id, agent.ModeProvisioning)
	baseProd = m.count(id, agent.ModeProduction)
	stop3 := realAgent(t, srv, c, id, dir3, m)
	waitFor(t, 20*time.Second, "third life waiting", func() bool {
		st, _ := nodeState(r.p, id)
		return m.count(id, agent.ModeProvisioning) > baseProv && st.State == StateQueued
	})
	r.p.Resume()
	waitFor(t, 20*time.Second, "third life held", func() bool {
		st, _ := nodeState(r.p, id)
		return st.State == StateHeld
	})
	st3, _ := nodeState(r.p, id)
	deniedKey := st3.KeyFingerprint
	if deniedKey == "" || deniedKey == heldKey {
		t.Fatalf("third life's key %q", deniedKey)
	}
	if err := r.p.Deny(id); err != nil {
		t.Fatal(err)
	}
	if err := r.p.Deny(id); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("second Deny = %v, want ErrNotHeld", err)
	}
	rec, _, _ = r.p.reg.Get(id)
	if !rec.Denied || rec.DeniedKey != deniedKey || rec.KeyFingerprint != heldKey {
		t.Fatalf("registry after deny: %+v", rec)
	}
	r.stop(t)
	checkNodesGauge(t, r.p)
	snapDenied := snapshot(t, dir3)

	// 5. A new provisioner on the same state_dir: still denied, never
	// provisioned, its disk untouched.
	r2 := startProvisioner(t, url, cfg, h, obs, nil)
	if st, ok := nodeState(r2.p, id); !ok || st.State != StateDenied {
		t.Fatalf("after restart: %+v %v", st, ok)
	}
	// Loaded from the registry as denied.
	checkStateCounts(t, r2.p)
	if got := nodesGauge(t, r2.p, StateDenied); got != 1 {
		t.Errorf("muster_provisioner_nodes{state=denied} = %v after restart, want 1", got)
	}
	for i := 0; i < 3; i++ {
		if n, err := r2.p.Discover(context.Background()); err != nil || n != 1 {
			t.Fatalf("Discover = %d, %v", n, err)
		}
	}
	if err := r2.p.Approve(id); !errors.Is(err, ErrNotHeld) {
		t.Fatalf("Approve of a denied node = %v", err)
	}
	if st, _ := nodeState(r2.p, id); st.State != StateDenied || st.Attempts != 0 {
		t.Fatalf("denied node taken: %+v", st)
	}
	if d := changed(snapDenied, snapshot(t, dir3)); len(d) != 0 {
		t.Fatalf("denied node's disk changed: %v", d)
	}
	if m.count(id, agent.ModeProduction) != baseProd {
		t.Fatalf("denied node reached production")
	}
	stop3()
	r2.stop(t)
}

func heldGauge(t *testing.T, p *Provisioner) float64 {
	t.Helper()
	mfs, err := p.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "muster_provisioner_held_nodes" {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatal("muster_provisioner_held_nodes not registered")
	return 0
}

// TestRegistryCorruptFailsStart checks that New refuses a state_dir whose
// registry cannot be decoded, naming the file, and leaves the file alone.
func TestRegistryCorruptFailsStart(t *testing.T) {
	url := startServer(t)
	cases := map[string]string{
		"not JSON":        "{\"version\":1,\"records\":[",
		"unknown field":   `{"version":1,"records":[],"extra":true}`,
		"bad version":     `{"version":7,"records":[]}`,
		"bad identity":    `{"version":1,"records":[{"identity":"../etc"}]}`,
		"bad fingerprint": `{"version":1,"records":[{"identity":"a.example.net","key_fingerprint":"md5:00"}]}`,
		"duplicate":       `{"version":1,"records":[{"identity":"a.example.net"},{"identity":"a.example.net"}]}`,
		"trailing":        `{"version":1,"records":[]} {}`,
	}
	for name, content := range cases {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, RegistryFile)
			if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg := testConfig()
			cfg.StateDir = dir
			_, err := New(Options{Config: cfg, Helper: newTestHelper(newCA(t), nil), Conn: connect(t, url)})
			if !errors.Is(err, ErrRegistryCorrupt) || !strings.Contains(err.Error(), path) {
				t.Fatalf("New = %v, want ErrRegistryCorrupt naming %s", err, path)
			}
			if b, _ := os.ReadFile(path); string(b) != content {
				t.Fatal("corrupt registry was rewritten")
			}
		})
	}
}

func TestFileRegistryRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	r, err := OpenFileRegistry(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("state dir: %v %v", st, err)
	}
	fp := "sha256:" + strings.Repeat("ab", 32)
	now := time.Now().UTC().Truncate(time.Second)
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := "n" + string(rune('a'+i)) + ".example.net"
			if err := r.Put(Record{Identity: id, KeyFingerprint: fp, Serial: "1f", ProvisionedAt: now}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if err := r.Put(Record{Identity: "bad/id"}); err == nil {
		t.Error("Put accepted a bad identity")
	}
	if err := r.Put(Record{Identity: "d.example.net", Denied: true, DeniedKey: fp, DeniedAt: now}); err != nil {
		t.Fatal(err)
	}
	// A provisioner killed while writing the registry leaves a temporary;
	// the next one to open the state_dir removes it.
	if err := os.WriteFile(filepath.Join(dir, "."+RegistryFile+".tmp-4242"), []byte(`{"version":1,"rec`), 0o600); err != nil {
		t.Fatal(err)
	}
	r2, err := OpenFileRegistry(dir)
	if err != nil {
		t.Fatal(err)
	}
	list, _ := r2.List()
	if len(list) != 21 {
		t.Fatalf("%d records after reopen", len(list))
	}
	got, ok, _ := r2.Get("d.example.net")
	if !ok || !got.Denied || got.DeniedKey != fp || !got.DeniedAt.Equal(now) {
		t.Fatalf("denied record %+v", got)
	}
	if got, _, _ := r2.Get("na.example.net"); got.KeyFingerprint != fp || got.Serial != "1f" || !got.ProvisionedAt.Equal(now) {
		t.Fatalf("record %+v", got)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != RegistryJournal+" "+RegistryFile {
		t.Fatalf("state dir holds %v (temporary files left?)", names)
	}
	// Opening folded the journal: registry.json alone holds every record.
	if st, err := os.Stat(filepath.Join(dir, RegistryJournal)); err != nil || st.Size() != 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("journal after open: %v %v", st, err)
	}
	data, err := os.ReadFile(filepath.Join(dir, RegistryFile))
	if err != nil {
		t.Fatal(err)
	}
	if recs, err := DecodeRegistry(data); err != nil || len(recs) != 21 {
		t.Fatalf("registry.json after open: %d records, %v", len(recs), err)
	}
}

// TestFileRegistryJournal checks the journal: a Put appends one line and
// leaves registry.json alone; a crash's partial last line is dropped; lines
// the snapshot holds are not replayed over it; a bad line makes the
// registry corrupt and nothing is rewritten; a journal larger than the
// snapshot is folded into it.
func TestFileRegistryJournal(t *testing.T) {
	fp := "sha256:" + strings.Repeat("ab", 32)
	fp2 := "sha256:" + strings.Repeat("cd", 32)
	now := time.Now().UTC().Truncate(time.Second)
	rec := func(id, fp, serial string) Record {
		return Record{Identity: id, KeyFingerprint: fp, Serial: serial, ProvisionedAt: now}
	}
	open := func(t *testing.T, dir string) *FileRegistry {
		t.Helper()
		r, err := OpenFileRegistry(dir)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	read := func(t *testing.T, path string) string {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		return string(b)
	}

	t.Run("append", func(t *testing.T) {
		dir := t.TempDir()
		r := open(t, dir)
		for i, id := range []string{"a.example.net", "b.example.net", "a.example.net"} {
			if err := r.Put(rec(id, fp, fmt.Sprintf("%x", i+1))); err != nil {
				t.Fatal(err)
			}
		}
		if s := read(t, filepath.Join(dir, RegistryFile)); s != "" {
			t.Fatalf("a Put rewrote registry.json:\n%s", s)
		}
		lines := strings.Split(strings.TrimSuffix(read(t, filepath.Join(dir, RegistryJournal)), "\n"), "\n")
		if len(lines) != 3 || !strings.HasPrefix(lines[2], `{"seq":3,"record":{"identity":"a.example.net"`) {
			t.Fatalf("journal:\n%s", strings.Join(lines, "\n"))
		}
		// A crash in the middle of the next append leaves part of a line.
		f, err := os.OpenFile(filepath.Join(dir, RegistryJournal), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString(`{"seq":4,"record":{"identity":"c.exa`); err != nil {
			t.Fatal(err)
		}
		f.Close()
		r2 := open(t, dir)
		if got, ok, _ := r2.Get("a.example.net"); !ok || got.Serial != "3" {
			t.Fatalf("a after reopen: %+v %v", got, ok)
		}
		if _, ok, _ := r2.Get("c.example.net"); ok {
			t.Fatal("the partial line's record was read")
		}
		if s := read(t, filepath.Join(dir, RegistryJournal)); s != "" {
			t.Fatalf("journal not emptied at open: %q", s)
		}
		// Sequence numbers go on from the snapshot's.
		if err := r2.Put(rec("c.example.net", fp, "4")); err != nil {
			t.Fatal(err)
		}
		if s := read(t, filepath.Join(dir, RegistryJournal)); !strings.HasPrefix(s, `{"seq":4,`) {
			t.Fatalf("journal after reopen: %q", s)
		}
		if err := r2.Close(); err != nil {
			t.Fatal(err)
		}
		if err := r2.Put(rec("d.example.net", fp, "5")); !errors.Is(err, ErrRegistryClosed) {
			t.Fatalf("Put after Close: %v", err)
		}
		recs, err := DecodeRegistry([]byte(read(t, filepath.Join(dir, RegistryFile))))
		if err != nil || len(recs) != 3 || recs["c.example.net"].Serial != "4" {
			t.Fatalf("registry.json after Close: %v %v", recs, err)
		}
	})

	t.Run("snapshot newer than journal lines", func(t *testing.T) {
		// A crash after a fold wrote registry.json (seq 5) and before it
		// emptied the journal: seq 3 is older than the snapshot's a, seq 6
		// is newer.
		dir := t.TempDir()
		snap := `{"version":1,"seq":5,"records":[{"identity":"a.example.net","key_fingerprint":"` + fp2 + `","serial":"5"}]}`
		journal := `{"seq":3,"record":{"identity":"a.example.net","key_fingerprint":"` + fp + `","serial":"3"}}` + "\n" +
			`{"seq":6,"record":{"identity":"b.example.net","serial":"6"}}` + "\n"
		if err := os.WriteFile(filepath.Join(dir, RegistryFile), []byte(snap), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, RegistryJournal), []byte(journal), 0o600); err != nil {
			t.Fatal(err)
		}
		r := open(t, dir)
		if got, _, _ := r.Get("a.example.net"); got.Serial != "5" || got.KeyFingerprint != fp2 {
			t.Fatalf("an older journal line replaced the snapshot's record: %+v", got)
		}
		if got, ok, _ := r.Get("b.example.net"); !ok || got.Serial != "6" {
			t.Fatalf("b: %+v %v", got, ok)
		}
		if s := read(t, filepath.Join(dir, RegistryFile)); !strings.Contains(s, `"seq":6,`) {
			t.Fatalf("folded snapshot: %s", s)
		}
	})

	t.Run("corrupt line", func(t *testing.T) {
		for name, journal := range map[string]string{
			"not json":        "{\"seq\":1,\"record\":{\"identity\":\"a.example.net\"}}\nnot json\n{\"seq\":3,\"record\":{\"identity\":\"b.example.net\"}}\n",
			"bad identity":    "{\"seq\":1,\"record\":{\"identity\":\"../a\"}}\n",
			"unknown field":   "{\"seq\":1,\"record\":{\"identity\":\"a.example.net\"},\"x\":1}\n",
			"no seq":          "{\"record\":{\"identity\":\"a.example.net\"}}\n",
			"trailing data":   "{\"seq\":1,\"record\":{\"identity\":\"a.example.net\"}} {}\n",
			"line too long":   "{\"seq\":1,\"record\":{\"identity\":\"a.example.net\",\"token_id\":\"" + strings.Repeat("x", maxJournalLine) + "\"}}\n",
			"bad fingerprint": "{\"seq\":1,\"record\":{\"identity\":\"a.example.net\",\"key_fingerprint\":\"md5:00\"}}\n",
		} {
			t.Run(name, func(t *testing.T) {
				dir := t.TempDir()
				path := filepath.Join(dir, RegistryJournal)
				if err := os.WriteFile(path, []byte(journal), 0o600); err != nil {
					t.Fatal(err)
				}
				_, err := OpenFileRegistry(dir)
				if !errors.Is(err, ErrRegistryCorrupt) || !strings.Contains(err.Error(), path) {
					t.Fatalf("open: %v", err)
				}
				if read(t, path) != journal || read(t, filepath.Join(dir, RegistryFile)) != "" {
					t.Fatal("a corrupt journal was rewritten")
				}
			})
		}
	})

	t.Run("fold", func(t *testing.T) {
		dir := t.TempDir()
		r := open(t, dir)
		r.minFold = 1024 // about five lines
		folded := false
		for i := 0; i < 40; i++ {
			if err := r.Put(rec(fmt.Sprintf("n%02d.example.net", i), fp, fmt.Sprintf("%x", i+1))); err != nil {
				t.Fatal(err)
			}
			if st, err := os.Stat(filepath.Join(dir, RegistryJournal)); err != nil {
				t.Fatal(err)
			} else if st.Size() > int64(max(r.minFold, r.size))+maxJournalLine {
				t.Fatalf("journal of %d bytes after %d Puts, registry.json %d", st.Size(), i+1, r.size)
			} else if st.Size() == 0 {
				folded = true
			}
		}
		if !folded {
			t.Fatal("the journal was never folded")
		}
		recs, err := DecodeRegistry([]byte(read(t, filepath.Join(dir, RegistryFile))))
		if err != nil || len(recs) == 0 {
			t.Fatalf("registry.json: %d records, %v", len(recs), err)
		}
		r2 := open(t, dir)
		if list, _ := r2.List(); len(list) != 40 {
			t.Fatalf("%d records after reopen", len(list))
		}
	})

	t.Run("put many", func(t *testing.T) {
		dir := t.TempDir()
		r := open(t, dir)
		if err := r.PutMany([]Record{rec("a.example.net", fp, "1"), {Identity: "bad/id"}}); err == nil {
			t.Fatal("PutMany accepted a bad identity")
		}
		if list, _ := r.List(); len(list) != 0 {
			t.Fatalf("a failed PutMany stored %d records", len(list))
		}
		batch := []Record{rec("a.example.net", fp, "1"), rec("b.example.net", fp, "2"), rec("a.example.net", fp2, "3")}
		if err := r.PutMany(batch); err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(read(t, filepath.Join(dir, RegistryJournal)), "\n"); n != 3 {
			t.Fatalf("journal holds %d lines after one PutMany of 3", n)
		}
		r2 := open(t, dir)
		if got, _, _ := r2.Get("a.example.net"); got.Serial != "3" || got.KeyFingerprint != fp2 {
			t.Fatalf("a: %+v, want the batch's last record of it", got)
		}
		if list, _ := r2.List(); len(list) != 2 {
			t.Fatalf("%d records", len(list))
		}
	})

	t.Run("failed append", func(t *testing.T) {
		dir := t.TempDir()
		r := open(t, dir)
		if err := r.Put(rec("a.example.net", fp, "1")); err != nil {
			t.Fatal(err)
		}
		// A journal that cannot be written or emptied (a read-only
		// handle stands in for a full or failing disk).
		good := r.journal
		ro, err := os.Open(filepath.Join(dir, RegistryJournal))
		if err != nil {
			t.Fatal(err)
		}
		r.journal = ro
		if err := r.Put(rec("b.example.net", fp, "2")); err == nil {
			t.Fatal("Put succeeded with a journal that cannot be written")
		}
		// Nothing is appended to a journal that may end in part of a
		// line: the next write is a snapshot.
		r.journal = good
		ro.Close()
		if err := r.Put(rec("c.example.net", fp, "3")); err != nil {
			t.Fatal(err)
		}
		if s := read(t, filepath.Join(dir, RegistryJournal)); s != "" {
			t.Fatalf("journal after the recovering write: %q", s)
		}
		r2 := open(t, dir)
		if list, _ := r2.List(); len(list) != 3 {
			t.Fatalf("%d records after reopen, want 3", len(list))
		}
	})
}

func FuzzDecodeJournal(f *testing.F) {
	f.Add([]byte(`{"seq":1,"record":{"identity":"a.example.net","key_fingerprint":"sha256:` + strings.Repeat("0", 64) + `","serial":"ff","provisioned_at":"2026-01-02T03:04:05Z"}}` + "\n"))
	f.Add([]byte(`{"seq":2,"record":{"identity":"a.example.net","denied":true}}` + "\n" + `{"seq":3,"record":{"ident`))
	f.Add([]byte("\n\n"))
	f.Add([]byte(`{"seq":0,"record":{"identity":"a"}}` + "\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		entries, torn, err := decodeJournal(data)
		if err != nil {
			if !errors.Is(err, ErrRegistryCorrupt) {
				t.Fatalf("error %v does not wrap ErrRegistryCorrupt", err)
			}
			return
		}
		if torn == (len(data) == 0 || data[len(data)-1] == '\n') {
			t.Fatalf("torn = %v for data ending %q", torn, data[max(0, len(data)-1):])
		}
		for _, e := range entries {
			if e.Seq == 0 {
				t.Fatal("accepted a line without a sequence number")
			}
			if err := e.Record.validate(); err != nil {
				t.Fatalf("accepted invalid record: %v", err)
			}
		}
	})
}

func FuzzDecodeRegistry(f *testing.F) {
	f.Add([]byte(`{"version":1,"records":[{"identity":"a.example.net","key_fingerprint":"sha256:` + strings.Repeat("0", 64) + `","serial":"ff","provisioned_at":"2026-01-02T03:04:05Z"}]}`))
	f.Add([]byte(`{"version":1,"records":[{"identity":"a.example.net","denied":true,"denied_at":"2026-01-02T03:04:05Z"}]}`))
	f.Add([]byte(`{"version":1,"records":null}`))
	f.Add([]byte(`{"version":1,"records":[{"identity":"a"},{"identity":"a"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		recs, err := DecodeRegistry(data)
		if err != nil {
			if !errors.Is(err, ErrRegistryCorrupt) {
				t.Fatalf("error %v does not wrap ErrRegistryCorrupt", err)
			}
			return
		}
		for id, r := range recs {
			if id != r.Identity {
				t.Fatalf("key %q holds %q", id, r.Identity)
			}
			if err := r.validate(); err != nil {
				t.Fatalf("accepted invalid record: %v", err)
			}
			if strings.ContainsAny(r.Identity, "/\\\n") {
				t.Fatalf("accepted identity %q", r.Identity)
			}
		}
	})
}

// TestHoldAPI drives holds through the monitor: Hold for a duplicate
// connection, the held list, approve and deny with their error statuses.
func TestHoldAPI(t *testing.T) {
	const id1, id2 = "node1.example.net", "node2.example.net"
	url := startServer(t)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	n1 := fleet.add(id1, nil)
	n2 := fleet.add(id2, nil)
	r := startProvisioner(t, url, testConfig(), newTestHelper(c, nil), newObserved(), nil)
	waitProvisioned(t, caseEnv{p: r.p, node: n1})
	waitProvisioned(t, caseEnv{p: r.p, node: n2})
	srv := httptest.NewServer(r.p.Handler())
	t.Cleanup(srv.Close)

	do := func(method, path string, operator bool) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, srv.URL+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if operator {
			req.Header.Set(OperatorHeader, "test")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := do("GET", "/nodes/held", false); code != 200 || strings.TrimSpace(body) != "[]" {
		t.Fatalf("held list: %d %s", code, body)
	}
	if err := r.p.Hold(id1, "Duplicate Connection"); err == nil {
		t.Fatal("Hold accepted a free-text reason")
	}
	if err := r.p.Hold("../x", HoldDuplicateConnection); err == nil {
		t.Fatal("Hold accepted a bad identity")
	}
	if err := r.p.Hold(id1, HoldDuplicateConnection); err != nil {
		t.Fatal(err)
	}
	if err := r.p.Hold(id2, HoldDuplicateConnection); err != nil {
		t.Fatal(err)
	}
	code, body := do("GET", "/nodes/held", false)
	var held []NodeStatus
	if err := json.Unmarshal([]byte(body), &held); err != nil || code != 200 || len(held) != 2 || held[0].HoldReason != HoldDuplicateConnection {
		t.Fatalf("held list: %d %s", code, body)
	}
	if got := heldGauge(t, r.p); got != 2 {
		t.Fatalf("held_nodes = %v", got)
	}
	checkStateCounts(t, r.p)
	for _, tc := range []struct {
		method, path string
		operator     bool
		want         int
	}{
		{"POST", "/nodes/" + id1 + "/approve", false, http.StatusBadRequest},
		{"GET", "/nodes/" + id1 + "/approve", true, http.StatusMethodNotAllowed},
		{"GET", "/nodes/" + id1 + "/deny", true, http.StatusMethodNotAllowed},
		{"POST", "/nodes/unknown.example.net/approve", true, http.StatusNotFound},
		{"POST", "/nodes/unknown.example.net/deny", true, http.StatusNotFound},
		{"POST", "/nodes/bad%0Aid/approve", true, http.StatusBadRequest},
		{"GET", "/nodes/unknown.example.net", false, http.StatusNotFound},
	} {
		if code, body := do(tc.method, tc.path, tc.operator); code != tc.want {
			t.Errorf("%s %s: %d %s, want %d", tc.method, tc.path, code, body, tc.want)
		}
	}

	// Held nodes are not taken again.
	if _, err := r.p.Discover(context.Background()); err != nil {
		t.Fatal(err)
	}
	fleet.publishStartup(id1)

	// Approve node1: provisioned again, its new key recorded.
	oldRec, _, _ := r.p.reg.Get(id1)
	if code, body := do("POST", "/nodes/"+id1+"/approve", true); code != 200 || !strings.Contains(body, `"state": "queued"`) && !strings.Contains(body, `"state": "in_progress"`) && !strings.Contains(body, `"state": "provisioned"`) {
		t.Fatalf("approve: %d %s", code, body)
	}
	if code, _ := do("POST", "/nodes/"+id1+"/approve", true); code != http.StatusConflict {
		t.Fatalf("approve of a node that is not held: %d", code)
	}
	waitFor(t, 15*time.Second, "node1 provisioned again", func() bool {
		c, _, _ := n1.stats()
		st, _ := nodeState(r.p, id1)
		return c == 2 && st.State == StateProvisioned
	})
	n1.mu.Lock()
	newFP, _ := Fingerprint(n1.key.Public())
	n1.mu.Unlock()
	rec, _, _ := r.p.reg.Get(id1)
	if rec.KeyFingerprint != newFP || rec.KeyFingerprint == oldRec.KeyFingerprint {
		t.Fatalf("registry after approval %+v (old %s)", rec, oldRec.KeyFingerprint)
	}

	// Deny node2: denied, recorded, never configured again.
	if code, body := do("POST", "/nodes/"+id2+"/deny", true); code != 200 || !strings.Contains(body, `"state": "denied"`) || !strings.Contains(body, `"denied": true`) {
		t.Fatalf("deny: %d %s", code, body)
	}
	if code, _ := do("POST", "/nodes/"+id2+"/approve", true); code != http.StatusConflict {
		t.Fatalf("approve of a denied node: %d", code)
	}
	if _, err := r.p.Discover(context.Background()); err != nil {
		t.Fatal(err)
	}
	code, body = do("GET", "/nodes/"+id2, false)
	if code != 200 || !strings.Contains(body, `"registered"`) || !strings.Contains(body, `"denied": true`) {
		t.Fatalf("show: %d %s", code, body)
	}
	r.stop(t)
	if c, _, _ := n2.stats(); c != 1 {
		t.Fatalf("denied node configured %d times", c)
	}
	if got := heldGauge(t, r.p); got != 0 {
		t.Fatalf("held_nodes = %v at the end", got)
	}
	checkNodesGauge(t, r.p)
	if got := nodesGauge(t, r.p, StateDenied); got != 1 {
		t.Errorf("muster_provisioner_nodes{state=denied} = %v, want 1", got)
	}
}

// BenchmarkFileRegistryPut measures one durable Put into a registry that
// already holds a fleet of identities, one Put at a time (serial) and from
// 16 goroutines at once (parallel, as 16 workers recording configured
// nodes do; concurrent Puts share writes).
func BenchmarkFileRegistryPut(b *testing.B) {
	for _, fleet := range []int{1_000, 10_000, 100_000} {
		for _, mode := range []string{"serial", "parallel"} {
			b.Run(fmt.Sprintf("fleet=%d/%s", fleet, mode), func(b *testing.B) {
				r := benchRegistry(b, fleet)
				fp := "sha256:" + strings.Repeat("ef", 32)
				now := time.Now().UTC()
				put := func(i int) {
					if err := r.Put(Record{Identity: fmt.Sprintf("node%06d.example.net", i%fleet), KeyFingerprint: fp, Serial: "ff", ProvisionedAt: now}); err != nil {
						b.Error(err)
					}
				}
				b.ResetTimer()
				if mode == "serial" {
					for i := 0; i < b.N; i++ {
						put(i)
					}
					return
				}
				var next atomic.Int64
				b.SetParallelism(8) // 16 goroutines on 2 Ps
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						put(int(next.Add(1)))
					}
				})
			})
		}
	}
}

// benchRegistry opens a file registry holding fleet identities.
func benchRegistry(b *testing.B, fleet int) Registry {
	b.Helper()
	dir := b.TempDir()
	fp := "sha256:" + strings.Repeat("cd", 32)
	now := time.Now().UTC()
	doc := registryDoc{Version: registryVersion}
	for i := 0; i < fleet; i++ {
		doc.Records = append(doc.Records, Record{Identity: fmt.Sprintf("node%06d.example.net", i), KeyFingerprint: fp, Serial: "12ab", ProvisionedAt: now})
	}
	data, err := json.Marshal(doc)
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, RegistryFile), data, 0o600); err != nil {
		b.Fatal(err)
	}
	r, err := OpenFileRegistry(dir)
	if err != nil {
		b.Fatal(err)
	}
	return r
}

// TestHoldDuringAttempt holds a node while its helper runs (as the
// duplicate-connection check would): the attempt stops before configure
// and the node stays held.
func TestHoldDuringAttempt(t *testing.T) {
	const id = "node1.example.net"
	url := startServer(t)
	c := newCA(t)
	fleet := newSimFleet(t, url, c.CertificatePEM())
	node := fleet.add(id, nil)
	var p *Provisioner
	holdErr := make(chan error, 1)
	h := newTestHelper(c, func(req *helper.Request, call int) (*helper.Reply, error, bool) {
		if call == 1 {
			holdErr <- p.Hold(req.Identity, HoldDuplicateConnection)
		}
		return nil, nil, false
	})
	obs := newObserved()
	r := startProvisioner(t, url, testConfig(), h, obs, func(pp *Provisioner) { p = pp })
	waitFor(t, 10*time.Second, "attempt ended held", func() bool { return obs.has(id, "held/validate") })
	if err := <-holdErr; err != nil {
		t.Fatal(err)
	}
	if _, err := r.p.Discover(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.stop(t)
	st, _ := nodeState(r.p, id)
	if st.State != StateHeld || st.HoldReason != HoldDuplicateConnection || !st.RetryAt.IsZero() {
		t.Fatalf("status %+v", st)
	}
	if n := node.count(protocol.ActionConfigure); n != 0 {
		t.Fatalf("%d configure requests to a held node", n)
	}
	if h.callCount(id) != 1 {
		t.Fatalf("helper ran %d times", h.callCount(id))
	}
	if _, ok, _ := r.p.reg.Get(id); ok {
		t.Fatal("held node recorded as provisioned")
	}
}
