package kvutil

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
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

// TestLeaderReads: on a replicated bucket Get goes to the stream leader
// (no direct get is sent, which a follower could answer with a stale
// value) and reads what the bucket's own Get reads; on one replica the
// bucket is left as it is.
func TestLeaderReads(t *testing.T) {
	urls := natstest.Cluster(t, 3)
	js := natstest.ConnectJetStream(t, urls[1])
	nc := js.Conn()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var (
		kv  jetstream.KeyValue
		err error
	)
	deadline := time.Now().Add(30 * time.Second)
	for {
		// A new cluster may not answer the first creations.
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "T3", Replicas: 3, TTL: time.Hour})
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if one := LeaderReads(js, kv, 1); one != kv {
		t.Fatal("LeaderReads wrapped a bucket of one replica")
	}
	lkv := LeaderReads(js, kv, 3)

	// Every get request on the bucket's stream, seen by a plain
	// subscriber (the servers' own subscriptions are a queue group).
	watch, err := nats.Connect(urls[2])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(watch.Close)
	var mu sync.Mutex
	seen := map[string]int{}
	for _, subj := range []string{"$JS.API.DIRECT.GET.KV_T3", "$JS.API.DIRECT.GET.KV_T3.>", "$JS.API.STREAM.MSG.GET.KV_T3"} {
		if _, err := watch.Subscribe(subj, func(m *nats.Msg) {
			mu.Lock()
			seen[strings.SplitN(m.Subject, ".", 4)[2]]++
			mu.Unlock()
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := watch.Flush(); err != nil {
		t.Fatal(err)
	}
	count := func(kind string) int {
		mu.Lock()
		defer mu.Unlock()
		return seen[kind]
	}

	rev1, err := kv.Create(ctx, "node1.example.net", []byte("one"))
	if err != nil {
		t.Fatal(err)
	}
	rev2, err := kv.Update(ctx, "node1.example.net", []byte("two"), rev1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "gone.example.net", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "gone.example.net"); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "purged.example.net", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := kv.Purge(ctx, "purged.example.net"); err != nil {
		t.Fatal(err)
	}

	e, err := lkv.Get(ctx, "node1.example.net")
	if err != nil {
		t.Fatal(err)
	}
	if string(e.Value()) != "two" || e.Revision() != rev2 || e.Key() != "node1.example.net" || e.Bucket() != "T3" || e.Created().IsZero() {
		t.Errorf("Get = %q revision %d key %q bucket %q created %v; want \"two\" at %d", e.Value(), e.Revision(), e.Key(), e.Bucket(), e.Created(), rev2)
	}
	for _, key := range []string{"gone.example.net", "purged.example.net", "never.example.net"} {
		if _, err := lkv.Get(ctx, key); !errors.Is(err, jetstream.ErrKeyNotFound) {
			t.Errorf("Get(%s) = %v, want ErrKeyNotFound", key, err)
		}
	}
	for _, key := range []string{"", "a.*", "a.>", "a b", ".a", "a."} {
		if _, err := lkv.Get(ctx, key); !errors.Is(err, jetstream.ErrInvalidKey) {
			t.Errorf("Get(%q) = %v, want ErrInvalidKey", key, err)
		}
	}
	// Create as the bucket's own: a new key, an existing one refused, a
	// deleted one written over its marker.
	if _, err := lkv.Create(ctx, "new.example.net", []byte("n")); err != nil {
		t.Errorf("Create of a new key: %v", err)
	}
	if _, err := lkv.Create(ctx, "node1.example.net", []byte("again")); !errors.Is(err, jetstream.ErrKeyExists) {
		t.Errorf("Create of an existing key = %v, want ErrKeyExists", err)
	}
	if _, err := lkv.Create(ctx, "gone.example.net", []byte("back")); err != nil {
		t.Errorf("Create over a delete marker: %v", err)
	}
	if e, err := lkv.Get(ctx, "gone.example.net"); err != nil || string(e.Value()) != "back" {
		t.Errorf("Get after Create over a delete marker = %v, %v", e, err)
	}
	// What was written with lkv reads back through Landed too.
	if rev, ok := Landed(ctx, lkv, "node1.example.net", rev1, []byte("two"), 5*time.Second); !ok || rev != rev2 {
		t.Errorf("Landed through leader reads = %d, %v", rev, ok)
	}
	if err := watch.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	const reads = 8
	deadline = time.Now().Add(10 * time.Second)
	for count("STREAM") < reads && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := count("STREAM"); got != reads {
		t.Errorf("%d message gets through the API, want %d", got, reads)
	}
	if got := count("DIRECT"); got != 0 {
		t.Errorf("%d direct gets, want 0 (a follower may answer those)", got)
	}

	// The bucket's own Get sends direct gets: what the subscription would
	// see if LeaderReads did not take them.
	if _, err := kv.Get(ctx, "node1.example.net"); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for count("DIRECT") == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if count("DIRECT") == 0 {
		t.Error("the bucket's own Get sent no direct get: the check above proves nothing")
	}
}

// TestDecodeMsgGet: the message get replies a leader read meets, and
// replies it must refuse.
func TestDecodeMsgGet(t *testing.T) {
	const subj = "$KV.B.k1"
	b64 := func(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
	msg := func(subject, hdrs, data string) string {
		return fmt.Sprintf(`{"type":"io.nats.jetstream.api.v1.stream_msg_get_response","message":{"subject":%q,"seq":7,"hdrs":%q,"data":%q,"time":"2026-12-03T09:00:00Z"}}`, subject, hdrs, data)
	}
	cases := []struct {
		name    string
		reply   string
		value   string
		deleted bool
		err     error // nil: ok
	}{
		{"value", msg(subj, "", b64("v1")), "v1", false, nil},
		{"delete marker", msg(subj, b64("NATS/1.0\r\nKV-Operation: DEL\r\n\r\n"), ""), "", true, nil},
		{"purge marker", msg(subj, b64("NATS/1.0\r\nKV-Operation: PURGE\r\n\r\n"), ""), "", true, nil},
		{"server marker", msg(subj, b64("NATS/1.0\r\nNats-Marker-Reason: MaxAge\r\n\r\n"), ""), "", true, nil},
		{"other header", msg(subj, b64("NATS/1.0\r\nX-Other: 1\r\n\r\n"), b64("v2")), "v2", false, nil},
		{"not found", `{"error":{"code":404,"err_code":10037,"description":"no message found"}}`, "", false, jetstream.ErrKeyNotFound},
		{"other error", `{"error":{"code":503,"err_code":10008,"description":"unavailable"}}`, "", false, errAny},
		{"another subject", msg("$KV.B.k2", "", b64("v")), "", false, jetstream.ErrInvalidJetStreamResponse},
		{"no message", `{"type":"x"}`, "", false, jetstream.ErrInvalidJetStreamResponse},
		{"not json", `NATS/1.0 503`, "", false, jetstream.ErrInvalidJetStreamResponse},
		{"bad headers", msg(subj, b64("HTTP/1.1\r\n"), ""), "", false, errAny},
		{"too big", `{"x":"` + strings.Repeat("a", maxLeaderReply) + `"}`, "", false, jetstream.ErrInvalidJetStreamResponse},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e, deleted, err := decodeMsgGet([]byte(tc.reply), "B", "k1", subj)
			switch {
			case tc.err == nil && err != nil:
				t.Fatalf("error %v", err)
			case tc.err == errAny && err == nil, tc.err != nil && tc.err != errAny && !errors.Is(err, tc.err):
				t.Fatalf("error %v, want %v", err, tc.err)
			case tc.err != nil:
				return
			}
			if deleted != tc.deleted || string(e.Value()) != tc.value || e.Revision() != 7 || e.Key() != "k1" || e.Bucket() != "B" {
				t.Errorf("entry %q rev %d key %q bucket %q deleted %v", e.Value(), e.Revision(), e.Key(), e.Bucket(), deleted)
			}
		})
	}
}

// errAny stands for any error in TestDecodeMsgGet.
var errAny = errors.New("any error")

// FuzzDecodeMsgGet: any reply decodes to an error or to an entry of the
// key asked for, without panicking.
func FuzzDecodeMsgGet(f *testing.F) {
	f.Add([]byte(`{"message":{"subject":"$KV.B.k1","seq":7,"hdrs":"TkFUUy8xLjANCktWLU9wZXJhdGlvbjogREVMDQoNCg==","data":"","time":"2026-12-03T09:00:00Z"}}`))
	f.Add([]byte(`{"message":{"subject":"$KV.B.k1","seq":1,"data":"djE="}}`))
	f.Add([]byte(`{"error":{"code":404,"err_code":10037}}`))
	f.Add([]byte(`{"message":null}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		e, _, err := decodeMsgGet(data, "B", "k1", "$KV.B.k1")
		if err == nil && (e == nil || e.Key() != "k1" || e.Bucket() != "B") {
			t.Fatalf("entry %+v without an error", e)
		}
		if err != nil && e != nil {
			t.Fatalf("entry %+v with error %v", e, err)
		}
	})
}
