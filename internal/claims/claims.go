// Package claims gives several provisioners exclusive, expiring claims on
// nodes (and on the leader role) through a JetStream key-value bucket.
//
// A claim is a key in a bucket whose TTL is the lease: the server removes a
// key that was not written for one lease, so a crashed holder's claims lapse
// without anyone's clock but the server's. Claiming is KV create (succeeds
// only when the key is absent or deleted); renewing and releasing are
// compare-and-set on the revision the holder last wrote, so a holder that
// lost its claim (it lapsed and someone else took it) learns so on its next
// renewal instead of overwriting the new holder. docs/ha.md describes the
// protocol and its failure cases.
package claims

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/muster-io/muster/internal/kvutil"
	"github.com/muster-io/muster/internal/protocol"
)

// DefaultBucket is the claims bucket's name.
const DefaultBucket = "MUSTER_CLAIMS"

// LeaderKey is the key of the leader role in leader-election mode.
const LeaderKey = "_leader"

// MinLease is the shortest lease allowed; JetStream expires keys with a
// granularity of about a second.
const MinLease = 2 * time.Second

// Sentinel errors.
var (
	// ErrClaimed: another holder has the claim.
	ErrClaimed = errors.New("claimed by another provisioner")
	// ErrLost: the claim lapsed or was taken; the holder must stop.
	ErrLost = errors.New("claim lost")
	// ErrConfig wraps configuration errors.
	ErrConfig = errors.New("invalid claims configuration")
)

// Config configures a Store.
type Config struct {
	// Bucket is the KV bucket (default DefaultBucket).
	Bucket string
	// Owner names this holder (the provisioner's name); it is stored in
	// the claim so operators see who holds what.
	Owner string
	// Lease is how long a claim lives without renewal (default 6s, at least
	// MinLease). Holders renew every Lease/3.
	Lease time.Duration
	// Replicas of the bucket (default 1; 3 on a three-broker cluster).
	Replicas int
}

// Record is what a claim key holds.
type Record struct {
	Owner   string    `json:"owner"`
	Claimed time.Time `json:"claimed"`
}

// Store makes and checks claims.
type Store struct {
	kv    jetstream.KeyValue
	owner string
	lease time.Duration
}

// New opens (or creates) the claims bucket.
func New(ctx context.Context, js jetstream.JetStream, cfg Config) (*Store, error) {
	if cfg.Bucket == "" {
		cfg.Bucket = DefaultBucket
	}
	if cfg.Lease == 0 {
		cfg.Lease = 6 * time.Second
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	switch {
	case cfg.Owner == "" || len(cfg.Owner) > 128:
		return nil, fmt.Errorf("%w: owner must be 1..128 bytes", ErrConfig)
	case cfg.Lease < MinLease:
		return nil, fmt.Errorf("%w: lease %s is shorter than %s", ErrConfig, cfg.Lease, MinLease)
	case cfg.Replicas < 1 || cfg.Replicas > 5:
		return nil, fmt.Errorf("%w: replicas %d must be 1..5", ErrConfig, cfg.Replicas)
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      cfg.Bucket,
		Description: "Muster provisioner claims: one key per claimed node, expiring after the lease",
		History:     1,
		TTL:         cfg.Lease,
		Replicas:    cfg.Replicas,
		Storage:     jetstream.FileStorage,
	})
	if err != nil {
		return nil, fmt.Errorf("claims bucket %s: %w", cfg.Bucket, err)
	}
	return &Store{kv: kvutil.LeaderReads(js, kv, cfg.Replicas), owner: cfg.Owner, lease: cfg.Lease}, nil
}

// Lease is the configured lease.
func (s *Store) Lease() time.Duration { return s.lease }

// Owner is this holder's name.
func (s *Store) Owner() string { return s.owner }

// Claim is a held claim. It is safe for concurrent use (Hold renews it
// while the holder may renew it too).
type Claim struct {
	s   *Store
	key string

	mu  sync.Mutex
	rev uint64
	// validUntil is the earliest moment the server may drop the key: one
	// lease after the last successful write was sent (the server stamps
	// the write later than that, so it cannot expire it earlier).
	validUntil time.Time
}

// Claim takes key (a node identity or LeaderKey) for this holder. It
// returns ErrClaimed when another holder has it.
func (s *Store) Claim(ctx context.Context, key string) (*Claim, error) {
	if key != LeaderKey {
		if err := protocol.ValidateIdentity(key); err != nil {
			return nil, err
		}
	}
	sent := time.Now()
	val, err := json.Marshal(Record{Owner: s.owner, Claimed: sent.UTC()})
	if err != nil {
		return nil, err
	}
	rev, err := s.kv.Create(ctx, key, val)
	if err != nil && !isConflict(err) {
		// No verdict (a reply lost or late): the key may be this
		// holder's, which would otherwise keep the node from everyone
		// for a lease.
		if r, ok := kvutil.Landed(ctx, s.kv, key, 0, val, s.lease/3); ok {
			rev, err = r, nil
		}
	}
	if isConflict(err) {
		// The key exists (the server may also say so as a failed
		// compare-and-set when claims race).
		return nil, ErrClaimed
	}
	if err != nil {
		return nil, fmt.Errorf("claim %s: %w", key, err)
	}
	return &Claim{s: s, key: key, rev: rev, validUntil: sent.Add(s.lease)}, nil
}

// Holder returns who holds key, or "" when nobody does.
func (s *Store) Holder(ctx context.Context, key string) (string, error) {
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	var r Record
	if err := protocol.DecodeLenient(e.Value(), 4096, &r); err != nil {
		return "", fmt.Errorf("claim %s: %w", key, err)
	}
	return r.Owner, nil
}

// Key is the claimed key.
func (c *Claim) Key() string { return c.key }

// Renew extends the claim by a lease. ErrLost means it lapsed or was taken:
// the holder must stop working on the key. A holder about to do something
// that must not happen twice (configure a node) renews first: when Renew
// returns nil the claim is its own for a lease minus the time Renew took.
func (c *Claim) Renew(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	sent := time.Now()
	val, err := json.Marshal(Record{Owner: c.s.owner, Claimed: sent.UTC()})
	if err != nil {
		return err
	}
	rev, err := c.s.kv.Update(ctx, c.key, val, c.rev)
	if err != nil && !isConflict(err) {
		// No verdict (a reply lost or late): when the write was made,
		// the claim moved to a revision this holder does not know, and
		// its next renewal would take the claim for lost. Read it back,
		// within the claim's certain validity.
		if r, ok := kvutil.Landed(ctx, c.s.kv, c.key, c.rev, val, time.Until(c.validUntil)-c.s.lease/6); ok {
			rev, err = r, nil
		}
	}
	if err != nil {
		if isConflict(err) {
			return ErrLost
		}
		return fmt.Errorf("renew %s: %w", c.key, err)
	}
	c.rev = rev
	c.validUntil = sent.Add(c.s.lease)
	return nil
}

// ValidFor is how long the claim is certainly still this holder's: until
// one lease after the last successful write was sent (zero or negative once
// that has passed).
func (c *Claim) ValidFor() time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Until(c.validUntil)
}

// Release gives the claim up (only if it is still this holder's).
func (c *Claim) Release(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	err := c.s.kv.Delete(ctx, c.key, jetstream.LastRevision(c.rev))
	if err != nil && !isConflict(err) {
		return fmt.Errorf("release %s: %w", c.key, err)
	}
	return nil
}

// Hold keeps the claim renewed every Lease/3 until ctx ends or the claim is
// lost; it calls lost (if not nil) once when renewal reports ErrLost, or
// when renewals kept failing (retried every Lease/12) until only a sixth of
// a lease of certain validity is left: the holder stops before the server
// can drop the key and another holder take it, not after. It returns when
// ctx ends or the claim is lost.
func (c *Claim) Hold(ctx context.Context, lost func(error)) {
	margin := c.s.lease / 6
	every, retry := c.s.lease/3, c.s.lease/12
	next := every
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	report := func(err error) {
		if lost == nil {
			return
		}
		if !errors.Is(err, ErrLost) {
			err = fmt.Errorf("%w: not renewed within a lease: %w", ErrLost, err)
		}
		lost(err)
	}
	var lastErr error = context.DeadlineExceeded
	for {
		// Wake for the next renewal, or in time to give up before the
		// claim can lapse.
		if wait := min(next, c.ValidFor()-margin); wait > 0 {
			timer.Reset(wait)
			select {
			case <-ctx.Done():
				return
			case <-timer.C:
			}
		}
		if ctx.Err() != nil {
			return
		}
		left := c.ValidFor() - margin
		if left <= 0 {
			report(lastErr)
			return
		}
		// A renewal must not outlast the claim's certain validity.
		rctx, cancel := context.WithTimeout(ctx, min(every, left))
		err := c.Renew(rctx)
		cancel()
		switch {
		case err == nil:
			next = every
		case ctx.Err() != nil:
			return
		case errors.Is(err, ErrLost):
			report(err)
			return
		default:
			lastErr, next = err, retry
		}
	}
}

// isConflict reports a failed compare-and-set: the revision moved on or the
// key is gone.
func isConflict(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant) {
		return true
	}
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyNotFound)
}
