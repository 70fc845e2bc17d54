package nodestate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/protocol"
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
	f.Add([]byte(`{"identity":"n1","state":"production","provisions":1,"serial":"5c","pending":{"serial":"6d","by":"p1"}}`))
	f.Add([]byte(`{"identity":"n1","life":"` + protocol.NewLife() + `","pending":{"serial":"6d","life":"` + protocol.NewLife() + `"}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := Decode(data)
		if err == nil && (r.Identity == "" || r.Attempts < 0 || r.Provisions < 0 || !protocol.ValidLife(r.Life) || r.Pending != nil && !protocol.ValidLife(r.Pending.Life)) {
			t.Fatalf("accepted %+v", r)
		}
	})
}

// TestUpdateConcurrent: writers that update one record at the same time
// never lose each other's changes.
func TestUpdateConcurrent(t *testing.T) {
	js := natstest.JetStream(t)
	ctx := context.Background()
	s, err := New(ctx, js, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	const writers = 12
	var wg sync.WaitGroup
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.Update(ctx, "n1", func(r *Record) (bool, error) {
				r.Attempts++
				return true, nil
			}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	r, err := s.Get(ctx, "n1")
	if err != nil || r.Attempts != writers {
		t.Fatalf("after %d concurrent increments: %+v %v", writers, r, err)
	}
	// change returning false writes nothing; an error is returned as is.
	before, _ := s.Get(ctx, "n1")
	if _, err := s.Update(ctx, "n1", func(r *Record) (bool, error) { r.Attempts = 99; return false, nil }); err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom")
	if _, err := s.Update(ctx, "n1", func(*Record) (bool, error) { return true, boom }); !errors.Is(err, boom) {
		t.Fatalf("Update = %v, want the change's error", err)
	}
	if after, _ := s.Get(ctx, "n1"); after.Attempts != writers || !after.Updated.Equal(before.Updated) {
		t.Fatalf("an unchanged update wrote: %+v", after)
	}
	if _, err := s.Update(ctx, "../x", func(*Record) (bool, error) { return true, nil }); err == nil {
		t.Fatal("invalid identity updated")
	}
}

// TestUpdateLostReply: an update whose write was made but whose reply was
// lost (a timeout under load) reports success, so that its caller does not
// act as if the record were unchanged; one that was not made reports the
// failure and leaves the record as it was.
func TestUpdateLostReply(t *testing.T) {
	js := natstest.JetStream(t)
	ctx := context.Background()
	st, err := New(ctx, js, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	kv := natstest.LoseReplies(st.kv)
	s := &Store{kv: kv}
	inc := func(r *Record) (bool, error) {
		r.Attempts++
		return true, nil
	}
	for _, tc := range []struct {
		name     string
		fault    func(int)
		attempts int
		fails    bool
	}{
		{"created, reply lost", kv.Lose, 1, false},
		{"updated, reply lost", kv.Lose, 2, false},
		{"update not made", kv.Drop, 2, true},
		{"updated", func(int) {}, 3, false},
	} {
		tc.fault(1)
		_, err := s.Update(ctx, "n1", inc)
		if (err != nil) != tc.fails {
			t.Fatalf("%s: Update = %v", tc.name, err)
		}
		if r, err := s.Get(ctx, "n1"); err != nil || r.Attempts != tc.attempts {
			t.Fatalf("%s: record %+v %v, want %d attempts", tc.name, r, err, tc.attempts)
		}
	}
	if kv.Left() != 0 {
		t.Fatalf("%d faulty writes never happened", kv.Left())
	}
}

// TestCompleteCountsOnce: a configured certificate is counted once whether
// its restart is confirmed, the node is seen arriving with it, or both, in
// either order, repeatedly; an unknown serial changes nothing.
func TestCompleteCountsOnce(t *testing.T) {
	at := time.Date(2026, 11, 22, 8, 0, 0, 0, time.UTC)
	oldLife, newLife := protocol.NewLife(), protocol.NewLife()
	pending := func() *Record {
		return &Record{Identity: "n1", State: "in_progress", Stage: "restart", ClaimedBy: "p1", LastError: "x", Life: oldLife,
			Pending: &Pending{Serial: "5c", KeyFingerprint: "sha256:ab", Life: newLife, By: "p1", At: at}}
	}
	type step struct {
		serial  string
		arrived bool
	}
	for _, tc := range []struct {
		name      string
		steps     []step
		state     string
		counted   int // steps that returned the pending certificate
		arrivedAt bool
	}{
		{"restart confirmed", []step{{"5c", false}}, StateProvisioned, 1, false},
		{"restart then arrival", []step{{"5c", false}, {"5c", true}, {"5c", true}}, StateProduction, 1, true},
		{"arrival then restart", []step{{"5c", true}, {"5c", false}}, StateProduction, 1, true},
		{"arrival only, repeated", []step{{"5c", true}, {"5c", true}}, StateProduction, 1, true},
		{"unknown serial", []step{{"77", true}, {"77", false}, {"", true}}, "in_progress", 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := pending()
			counted := 0
			for _, st := range tc.steps {
				var arrivedAt time.Time
				if st.arrived {
					arrivedAt = at.Add(time.Second)
				}
				if p := r.Complete(st.serial, at, arrivedAt); p != nil {
					counted++
					if p.KeyFingerprint != "sha256:ab" || p.By != "p1" {
						t.Fatalf("completed %+v", p)
					}
				}
			}
			wantProvisions := min(tc.counted, 1)
			if counted != tc.counted || r.Provisions != wantProvisions || r.State != tc.state || r.ArrivedAt.IsZero() == tc.arrivedAt {
				t.Fatalf("counted %d, record %+v", counted, r)
			}
			if tc.counted > 0 && (r.Pending != nil || r.Serial != "5c" || r.Life != newLife || r.ProvisionedBy != "p1" || r.LastError != "" || r.ClaimedBy != "") {
				t.Fatalf("completed record %+v", r)
			}
			if tc.counted == 0 && (r.Pending == nil || r.Serial != "" || r.Life != oldLife) {
				t.Fatalf("unknown serial changed the record: %+v", r)
			}
			if r.Arrived("5c") != (tc.state == StateProduction) {
				t.Fatalf("Arrived = %t for %+v", r.Arrived("5c"), r)
			}
		})
	}
}

func TestDecodeRejectsBadSerials(t *testing.T) {
	for _, data := range []string{
		`{"identity":"n1","serial":"XYZ"}`,
		`{"identity":"n1","pending":{"serial":""}}`,
		`{"identity":"n1","pending":{"serial":"5C"}}`,
		`{"identity":"n1","provisions":-1}`,
		`{"identity":"n1","life":"5C"}`,
		`{"identity":"n1","pending":{"serial":"5c","life":"../x"}}`,
		`{"identity":"n1","earlier":[{"serial":""}]}`,
		`{"identity":"n1","earlier":[{"serial":"5c"},{"serial":"5C"}]}`,
		`{"identity":"n1","earlier":[{"serial":"5c","life":"../x"}]}`,
		`{"identity":"n1","earlier":[{"serial":"1"},{"serial":"2"},{"serial":"3"},{"serial":"4"},{"serial":"5"}]}`,
	} {
		if r, err := Decode([]byte(data)); err == nil {
			t.Errorf("Decode(%s) accepted %+v", data, r)
		}
	}
}

// TestEarlierPendingCertificates: a later attempt's certificate does not
// hide the earlier ones the node may have written; the node's arrival with
// any of them completes the record once, and the others are dropped.
func TestEarlierPendingCertificates(t *testing.T) {
	at := time.Date(2026, 12, 2, 7, 0, 0, 0, time.UTC)
	r := &Record{Identity: "n1", State: "failed", Stage: "restart"}
	for i, serial := range []string{"a1", "a2", "a3", "a4", "a5", "a6"} {
		r.SetPending(Pending{Serial: serial, KeyFingerprint: "sha256:" + serial, By: fmt.Sprintf("p%d", i), At: at})
	}
	r.SetPending(Pending{Serial: "a6", By: "p5", At: at}) // the same certificate again: no copy
	var earlier []string
	for _, p := range r.Earlier {
		earlier = append(earlier, p.Serial)
	}
	if r.Pending.Serial != "a6" || fmt.Sprint(earlier) != "[a2 a3 a4 a5]" {
		t.Fatalf("pending %s, earlier %v: want a6 and the last %d before it", r.Pending.Serial, earlier, MaxEarlier)
	}
	if r.PendingFor("a1") != nil || r.PendingFor("a3") == nil || r.PendingFor("") != nil {
		t.Fatalf("PendingFor: a1 %v, a3 %v", r.PendingFor("a1"), r.PendingFor("a3"))
	}
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := Decode(b); err != nil || len(back.Earlier) != MaxEarlier {
		t.Fatalf("round trip: %+v %v", back, err)
	}
	p := r.Complete("a3", at, at.Add(time.Second))
	if p == nil || p.By != "p2" || p.KeyFingerprint != "sha256:a3" {
		t.Fatalf("completed %+v", p)
	}
	if r.State != StateProduction || r.Serial != "a3" || r.Provisions != 1 || r.Pending != nil || r.Earlier != nil || r.ProvisionedBy != "p2" {
		t.Fatalf("record after the arrival: %+v", r)
	}
	if r.Complete("a6", at, at.Add(2*time.Second)) != nil || r.Provisions != 1 || r.Serial != "a3" {
		t.Fatalf("a dropped certificate completed: %+v", r)
	}
}
