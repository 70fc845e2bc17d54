package claims

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/muster-io/muster/internal/natstest"
)

func store(t *testing.T, js jetstream.JetStream, owner string, lease time.Duration) *Store {
	t.Helper()
	s, err := New(context.Background(), js, Config{Owner: owner, Lease: lease})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestClaimExclusiveAndRelease(t *testing.T) {
	js := natstest.JetStream(t)
	ctx := context.Background()
	a, b := store(t, js, "prov-a", 5*time.Second), store(t, js, "prov-b", 5*time.Second)
	ca, err := a.Claim(ctx, "n1.example.net")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Claim(ctx, "n1.example.net"); !errors.Is(err, ErrClaimed) {
		t.Fatalf("second claim: %v, want ErrClaimed", err)
	}
	if h, _ := b.Holder(ctx, "n1.example.net"); h != "prov-a" {
		t.Fatalf("holder %q", h)
	}
	if err := ca.Renew(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ca.Release(ctx); err != nil {
		t.Fatal(err)
	}
	cb, err := b.Claim(ctx, "n1.example.net")
	if err != nil {
		t.Fatalf("claim after release: %v", err)
	}
	// a's stale handle can neither renew nor release b's claim.
	if err := ca.Renew(ctx); !errors.Is(err, ErrLost) {
		t.Fatalf("stale renew: %v, want ErrLost", err)
	}
	if err := ca.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if h, _ := a.Holder(ctx, "n1.example.net"); h != "prov-b" {
		t.Fatalf("stale release removed b's claim: holder %q", h)
	}
	_ = cb
	if _, err := a.Claim(ctx, "../bad"); err == nil {
		t.Fatal("invalid key claimed")
	}
}

func TestLeaseLapses(t *testing.T) {
	js := natstest.JetStream(t)
	ctx := context.Background()
	a, b := store(t, js, "prov-a", MinLease), store(t, js, "prov-b", MinLease)
	ca, err := a.Claim(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	// a "crashes": no renewals. b gets the claim once the lease lapses.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := b.Claim(ctx, "n1")
		if err == nil {
			break
		}
		if !errors.Is(err, ErrClaimed) || time.Now().After(deadline) {
			t.Fatalf("claim after lapse: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := ca.Renew(ctx); !errors.Is(err, ErrLost) {
		t.Fatalf("renew after lapse: %v, want ErrLost", err)
	}
}

func TestHoldKeepsClaimAndReportsLoss(t *testing.T) {
	js := natstest.JetStream(t)
	a, b := store(t, js, "prov-a", MinLease), store(t, js, "prov-b", MinLease)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ca, err := a.Claim(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	var lostCalls atomic.Int32
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); ca.Hold(ctx, func(error) { lostCalls.Add(1) }) }()
	// Over three leases the claim stays with a.
	end := time.Now().Add(3 * MinLease)
	for time.Now().Before(end) {
		if _, err := b.Claim(ctx, "n1"); !errors.Is(err, ErrClaimed) {
			t.Fatalf("b claimed a held key: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Someone removes the claim (an operator purges the key): a's next
	// renewal reports the loss and Hold returns. (The test used to delete
	// and re-create the whole bucket. Re-creating it straight after the
	// delete, with a renewal in flight, once failed in CI with "error
	// creating store for stream": nats-server moves a deleted stream's
	// files away and removes them in the background.)
	kv, err := js.KeyValue(context.Background(), DefaultBucket)
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Purge(context.Background(), "n1"); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Hold did not return after losing the claim")
	}
	if lostCalls.Load() != 1 {
		t.Fatalf("lost called %d times", lostCalls.Load())
	}
}

func TestConfigValidation(t *testing.T) {
	js := natstest.JetStream(t)
	for _, c := range []Config{{Owner: ""}, {Owner: "a", Lease: time.Second}, {Owner: "a", Replicas: 9}} {
		if _, err := New(context.Background(), js, c); !errors.Is(err, ErrConfig) {
			t.Errorf("New(%+v) = %v", c, err)
		}
	}
}

// TestHoldStopsBeforeTheLeaseCanLapse cuts a holder off from the store:
// Hold reports the loss while the claim is still certainly its own, so the
// holder stops before the server could drop the key and another holder
// take it.
func TestHoldStopsBeforeTheLeaseCanLapse(t *testing.T) {
	url := natstest.Server(t, true)
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	const lease = 6 * time.Second
	a := store(t, js, "prov-a", lease)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := a.Claim(ctx, "n1")
	if err != nil {
		t.Fatal(err)
	}
	if v := c.ValidFor(); v <= 0 || v > lease {
		t.Fatalf("ValidFor after Claim = %s", v)
	}
	// The moment the claim can lapse moves on with a renewal (compared
	// as moments: ValidFor shrinks while Renew's round trip runs, and
	// under load that can take longer than the time since the claim).
	validUntil := func() time.Time {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.validUntil
	}
	before := validUntil()
	if err := c.Renew(ctx); err != nil {
		t.Fatal(err)
	}
	if after := validUntil(); !after.After(before) {
		t.Fatalf("Renew did not extend the claim: valid until %s, before it %s", after, before)
	}
	left := make(chan time.Duration, 1)
	var lostErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		c.Hold(ctx, func(err error) { lostErr = err; left <- c.ValidFor() })
	}()
	nc.Close() // the store is unreachable from now on
	select {
	case v := <-left:
		if v <= 0 {
			t.Fatalf("loss reported %s after the claim could have lapsed", -v)
		}
		t.Logf("loss reported with %s of the lease left", v.Round(time.Millisecond))
	case <-time.After(3 * lease):
		t.Fatal("Hold did not report the loss")
	}
	<-done
	if !errors.Is(lostErr, ErrLost) {
		t.Fatalf("lost with %v, want ErrLost", lostErr)
	}
}

// TestLostRepliesKeepTheClaim: a claim or renewal whose write was made but
// whose reply was lost (a timeout under load) is this holder's all the
// same; the next renewal must not take it for lost. A write that was not
// made stays a failure, and the claim renews after it.
func TestLostRepliesKeepTheClaim(t *testing.T) {
	js := natstest.JetStream(t)
	ctx := context.Background()
	s := store(t, js, "prov-a", 6*time.Second)
	kv := natstest.LoseReplies(s.kv)
	s.kv = kv
	b := store(t, js, "prov-b", 6*time.Second)

	kv.Lose(1)
	c, err := s.Claim(ctx, "n1.example.net")
	if err != nil {
		t.Fatalf("claim whose reply was lost: %v", err)
	}
	if _, err := b.Claim(ctx, "n1.example.net"); !errors.Is(err, ErrClaimed) {
		t.Fatalf("another holder's claim: %v, want ErrClaimed", err)
	}
	kv.Lose(1)
	if err := c.Renew(ctx); err != nil {
		t.Fatalf("renewal whose reply was lost: %v", err)
	}
	if err := c.Renew(ctx); err != nil {
		t.Fatalf("the renewal after it: %v", err)
	}
	kv.Drop(1)
	if err := c.Renew(ctx); err == nil || errors.Is(err, ErrLost) {
		t.Fatalf("renewal not made: %v, want a timeout", err)
	}
	if err := c.Renew(ctx); err != nil {
		t.Fatalf("the renewal after a failed one: %v", err)
	}
	kv.Drop(1)
	if _, err := s.Claim(ctx, "n2.example.net"); err == nil {
		t.Fatal("claim not made reported taken")
	}
	if h, _ := b.Holder(ctx, "n2.example.net"); h != "" {
		t.Fatalf("claim not made is held by %q", h)
	}
	if kv.Left() != 0 {
		t.Fatalf("%d lost writes never happened", kv.Left())
	}
}
