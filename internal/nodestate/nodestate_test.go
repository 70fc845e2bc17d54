package nodestate

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/natstest"
)

func TestPutGetList(t *testing.T) {
	js := natstest.JetStream(t)
	ctx := context.Background()
	s, err := New(ctx, js, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "n1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get unknown: %v", err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	for _, r := range []Record{
		{Identity: "n2", State: "in_progress", Stage: "gencsr", ClaimedBy: "p1", Attempts: 1},
		{Identity: "n1", State: "provisioned", ProvisionedAt: now, ProvisionedBy: "p2", Serial: "abc", Attempts: 2},
	} {
		if err := s.Put(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	r, err := s.Get(ctx, "n1")
	if err != nil || r.State != "provisioned" || !r.ProvisionedAt.Equal(now) || r.Serial != "abc" || r.Updated.IsZero() {
		t.Fatalf("get: %+v %v", r, err)
	}
	// A reader opens the same bucket.
	ro, err := Open(ctx, js, "")
	if err != nil {
		t.Fatal(err)
	}
	recs, bad, err := ro.List(ctx)
	if err != nil || bad != 0 || len(recs) != 2 || recs[0].Identity != "n1" || recs[1].Stage != "gencsr" {
		t.Fatalf("list %+v bad %d %v", recs, bad, err)
	}
	if err := s.Put(ctx, Record{Identity: "../x"}); err == nil {
		t.Fatal("invalid identity stored")
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"identity":"n1","state":"provisioned","attempts":1}`))
	f.Add([]byte(`{"identity":"a/b"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := Decode(data)
		if err == nil && (r.Identity == "" || r.Attempts < 0) {
			t.Fatalf("accepted %+v", r)
		}
	})
}
