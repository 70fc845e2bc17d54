package kvutil

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/muster-io/muster/internal/natstest"
)

// TestLanded: a write counts as made only when the key holds exactly its
// value at a later revision than the one it expected.
func TestLanded(t *testing.T) {
	js := natstest.JetStream(t)
	ctx := context.Background()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "T"})
	if err != nil {
		t.Fatal(err)
	}
	rev1, err := kv.Create(ctx, "k", []byte("one"))
	if err != nil {
		t.Fatal(err)
	}
	rev2, err := kv.Update(ctx, "k", []byte("two"), rev1)
	if err != nil {
		t.Fatal(err)
	}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	expired, cancel2 := context.WithTimeout(ctx, -time.Second)
	defer cancel2()
	for _, tc := range []struct {
		name  string
		ctx   context.Context
		key   string
		after uint64
		val   string
		want  bool
	}{
		{"made", ctx, "k", rev1, "two", true},
		{"made, the caller's deadline past", expired, "k", rev1, "two", true},
		{"another value", ctx, "k", rev1, "one", false},
		{"not after the expected revision", ctx, "k", rev2, "two", false},
		{"no such key", ctx, "nokey", 0, "two", false},
		{"shutting down", cancelled, "k", rev1, "two", false},
	} {
		rev, ok := Landed(tc.ctx, kv, tc.key, tc.after, []byte(tc.val), 5*time.Second)
		if ok != tc.want || ok && rev != rev2 {
			t.Errorf("%s: Landed = %d, %v; want %v (revision %d)", tc.name, rev, ok, tc.want, rev2)
		}
	}
}
