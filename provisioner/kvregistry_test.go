package provisioner

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/muster-io/muster/internal/natstest"
)

// TestKVRegistryList lists an empty bucket, then one whose records were
// put, replaced and deleted: the latest value of each live key, sorted.
func TestKVRegistryList(t *testing.T) {
	ctx := context.Background()
	reg, err := openKVRegistry(ctx, natstest.JetStream(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	if recs, err := reg.List(); err != nil || len(recs) != 0 {
		t.Fatalf("empty bucket: %v %v", recs, err)
	}
	fp := "sha256:" + strings.Repeat("ab", 32)
	for _, r := range []Record{
		{Identity: "c.example.net", KeyFingerprint: fp, Serial: "1"},
		{Identity: "a.example.net", KeyFingerprint: fp, Serial: "2"},
		{Identity: "b.example.net", KeyFingerprint: fp, Serial: "3"},
		{Identity: "c.example.net", KeyFingerprint: fp, Serial: "4"},
	} {
		if err := reg.Put(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := reg.kv.Delete(ctx, "b.example.net"); err != nil {
		t.Fatal(err)
	}
	recs, err := reg.List()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range recs {
		got = append(got, r.Identity+"="+r.Serial)
	}
	if strings.Join(got, " ") != "a.example.net=2 c.example.net=4" {
		t.Fatalf("List = %v", got)
	}
	// A record that does not decode fails the list, naming its key.
	if _, err := reg.kv.Put(ctx, "d.example.net", []byte(`{"identity":"d.example.net","serial":"XYZ"}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := reg.List(); err == nil || !strings.Contains(err.Error(), "d.example.net") {
		t.Fatalf("List with a bad record: %v", err)
	}
}

// TestKVRegistryImport imports more records than it keeps creates in
// flight: identities the bucket holds keep its record; an invalid record
// fails the import before any create; a failed create stops it with the
// error and the count so far, and the import made again completes it.
func TestKVRegistryImport(t *testing.T) {
	ctx := context.Background()
	reg, err := openKVRegistry(ctx, natstest.JetStream(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	fp := "sha256:" + strings.Repeat("ab", 32)
	other := "sha256:" + strings.Repeat("cd", 32)
	recs := func(from, n int) []Record {
		var out []Record
		for i := from; i < from+n; i++ {
			out = append(out, Record{Identity: fmt.Sprintf("node%04d.example.net", i), KeyFingerprint: fp, Serial: fmt.Sprintf("%x", i+1)})
		}
		return out
	}
	for _, id := range []string{"node0007.example.net", "node0250.example.net"} {
		if err := reg.Put(Record{Identity: id, KeyFingerprint: other, Serial: "ff"}); err != nil {
			t.Fatal(err)
		}
	}
	n := max(300, 3*importParallel+5)
	res, err := reg.importRecords(recs(0, n))
	if err != nil || res.imported != n-2 || res.kept != 2 {
		t.Fatalf("import = %+v %v, want %d imported, 2 kept", res, err, n-2)
	}
	all, err := reg.List()
	if err != nil || len(all) != n {
		t.Fatalf("%d records after import, want %d: %v", len(all), n, err)
	}
	for i, r := range all {
		want := fp
		if r.Identity == "node0007.example.net" || r.Identity == "node0250.example.net" {
			want = other
		} else if r.Serial != fmt.Sprintf("%x", i+1) {
			t.Errorf("%s serial %s, want %x", r.Identity, r.Serial, i+1)
		}
		if r.KeyFingerprint != want {
			t.Errorf("%s key %s, want %s", r.Identity, r.KeyFingerprint, want)
		}
	}

	bad := append(recs(1000, 10), Record{Identity: "bad.example.net", Serial: "XYZ"})
	if _, err := reg.importRecords(bad); err == nil || !strings.Contains(err.Error(), "bad.example.net") {
		t.Fatalf("import with an invalid record: %v", err)
	}
	if _, ok, err := reg.Get("node1000.example.net"); ok || err != nil {
		t.Fatalf("an import that failed its checks created records: %v %v", ok, err)
	}

	losing := natstest.LoseReplies(reg.kv)
	reg.kv = losing
	more := recs(2000, 4*importParallel)
	losing.Drop(1)
	res, err = reg.importRecords(more)
	if err == nil || !strings.Contains(err.Error(), "registry node2") {
		t.Fatalf("import with a failed create = %+v %v", res, err)
	}
	if res.imported >= len(more) {
		t.Fatalf("failed import counted %d of %d imported", res.imported, len(more))
	}
	res2, err := reg.importRecords(more)
	if err != nil || res2.imported+res2.kept != len(more) || res2.kept != res.imported {
		t.Fatalf("import again = %+v %v after %+v, want the rest imported", res2, err, res)
	}
}

// BenchmarkKVRegistryList lists a shared registry of 20 000 identities, as
// every provisioner of an ha cluster does at start.
func BenchmarkKVRegistryList(b *testing.B) {
	reg, err := openKVRegistry(context.Background(), natstest.JetStream(b), 0)
	if err != nil {
		b.Fatal(err)
	}
	fp := "sha256:" + strings.Repeat("cd", 32)
	now := time.Now().UTC()
	const n = 20_000
	for i := 0; i < n; i++ {
		if err := reg.Put(Record{Identity: fmt.Sprintf("node%06d.example.net", i), KeyFingerprint: fp, Serial: "12ab", ProvisionedAt: now}); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if recs, err := reg.List(); err != nil || len(recs) != n {
			b.Fatalf("%d records, %v", len(recs), err)
		}
	}
}

// TestHAImportsFileRegistry: a provisioner switched from single to claims
// mode with its state_dir imports the file registry into the shared one
// once: identities the bucket lacks get their file record (so their keys
// are still checked and their denials hold), identities it has keep its
// record, and after the import a removed identity is not brought back.
func TestHAImportsFileRegistry(t *testing.T) {
	url := natstest.Server(t, true)
	dir := t.TempDir()
	fp := func(b string) string { return "sha256:" + strings.Repeat(b, 32) }
	fr, err := OpenFileRegistry(dir)
	if err != nil {
		t.Fatal(err)
	}
	fileRecs := []Record{
		{Identity: "kept-key.example.net", KeyFingerprint: fp("aa"), Serial: "a1"},
		{Identity: "denied.example.net", Denied: true, DeniedKey: fp("bb"), DeniedAt: time.Now().UTC().Truncate(time.Second)},
		// Denied in the file, provisioned since in the shared registry:
		// the shared record holds, so the identity is not denied.
		{Identity: "shared.example.net", KeyFingerprint: fp("cc"), Serial: "c1", Denied: true, DeniedKey: fp("cc"), DeniedAt: time.Now().UTC().Truncate(time.Second)},
	}
	if err := fr.PutMany(fileRecs); err != nil {
		t.Fatal(err)
	}
	if err := fr.Close(); err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(connect(t, url))
	if err != nil {
		t.Fatal(err)
	}
	shared, err := openKVRegistry(context.Background(), js, 1)
	if err != nil {
		t.Fatal(err)
	}
	newer := Record{Identity: "shared.example.net", KeyFingerprint: fp("dd"), Serial: "d2"}
	if err := shared.Put(newer); err != nil {
		t.Fatal(err)
	}

	start := func() *running {
		cfg := testConfig()
		cfg.Name = "prov-a"
		cfg.StateDir = dir
		cfg.HA = HAConfig{Mode: HAClaims}
		nc, err := nats.Connect(url, nats.NoReconnect())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return runWith(t, Options{Config: cfg, Helper: newTestHelper(newCA(t), nil), Conn: nc, DrainTimeout: time.Second}, nil)
	}
	r := start()
	want := map[string]Record{"kept-key.example.net": fileRecs[0], "denied.example.net": fileRecs[1], "shared.example.net": newer}
	for id, w := range want {
		got, ok, err := shared.Get(id)
		if err != nil || !ok || got.KeyFingerprint != w.KeyFingerprint || got.Serial != w.Serial || got.Denied != w.Denied || !got.DeniedAt.Equal(w.DeniedAt) {
			t.Errorf("shared %s = %+v %v %v, want %+v", id, got, ok, err, w)
		}
	}
	if st, ok := nodeState(r.p, "denied.example.net"); !ok || st.State != StateDenied {
		t.Errorf("imported denial not in force: %+v", st)
	}
	if st, ok := nodeState(r.p, "shared.example.net"); ok && st.State == StateDenied {
		t.Errorf("denied by the file record the shared registry replaced: %+v", st)
	}
	marker := filepath.Join(dir, importedMarker)
	b, err := os.ReadFile(marker)
	if err != nil || !strings.Contains(string(b), `"imported":2`) || !strings.Contains(string(b), `"kept":1`) {
		t.Fatalf("marker %q %v", b, err)
	}
	if fi, err := os.Stat(marker); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("marker mode %v %v", fi.Mode(), err)
	}
	if !strings.Contains(r.logs.String(), "imported the state_dir identity registry") {
		t.Errorf("import not logged:\n%s", r.logs.String())
	}

	// An operator removes an identity from the bucket; the next start
	// does not import it again.
	r.cancel()
	<-r.done
	if err := shared.kv.Delete(context.Background(), "kept-key.example.net"); err != nil {
		t.Fatal(err)
	}
	start()
	if _, ok, err := shared.Get("kept-key.example.net"); err != nil || ok {
		t.Fatalf("removed identity imported again: %v %v", ok, err)
	}
}

// BenchmarkKVRegistryImport imports a file registry of 20 000 identities
// into an empty shared one, as the first ha start of a provisioner that
// ran in single mode does; ns/op is the whole import.
func BenchmarkKVRegistryImport(b *testing.B) {
	fp := "sha256:" + strings.Repeat("cd", 32)
	now := time.Now().UTC()
	const n = 20_000
	recs := make([]Record, n)
	for i := range recs {
		recs[i] = Record{Identity: fmt.Sprintf("node%06d.example.net", i), KeyFingerprint: fp, Serial: "12ab", ProvisionedAt: now}
	}
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		reg, err := openKVRegistry(context.Background(), natstest.JetStream(b), 0)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		res, err := reg.importRecords(recs)
		if err != nil || res.imported != n {
			b.Fatalf("%+v %v", res, err)
		}
	}
}
