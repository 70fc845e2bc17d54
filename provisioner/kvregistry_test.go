package provisioner

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

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
