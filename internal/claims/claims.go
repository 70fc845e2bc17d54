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
	"time"

	"github.com/nats-io/nats.go/jetstream"

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
	return &Store{kv: kv, owner: cfg.Owner, lease: cfg.Lease}, nil
}

// Lease is the configured lease.
func (s *Store) Lease() time.Duration { return s.lease }

// Owner is this holder's name.
func (s *Store) Owner() string { return s.owner }

// Claim is a held claim.
type Claim struct {
	s   *Store
	key string
	rev uint64
}

// Claim takes key (a node identity or LeaderKey) for this holder. It
// returns ErrClaimed when another holder has it.
func (s *Store) Claim(ctx context.Context, key string) (*Claim, error) {
	if key != LeaderKey {
		if err := protocol.ValidateIdentity(key); err != nil {
			return nil, err
		}
	}
	val, err := json.Marshal(Record{Owner: s.owner, Claimed: time.Now().UTC()})
	if err != nil {
		return nil, err
	}
	rev, err := s.kv.Create(ctx, key, val)
	if errors.Is(err, jetstream.ErrKeyExists) {
		return nil, ErrClaimed
	}
	if err != nil {
		return nil, fmt.Errorf("claim %s: %w", key, err)
	}
	return &Claim{s: s, key: key, rev: rev}, nil
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
// the holder must stop working on the key.
func (c *Claim) Renew(ctx context.Context) error {
	val, err := json.Marshal(Record{Owner: c.s.owner, Claimed: time.Now().UTC()})
	if err != nil {
		return err
	}
	rev, err := c.s.kv.Update(ctx, c.key, val, c.rev)
	if err != nil {
		if isConflict(err) {
			return ErrLost
		}
		return fmt.Errorf("renew %s: %w", c.key, err)
	}
	c.rev = rev
	return nil
}

// Release gives the claim up (only if it is still this holder's).
func (c *Claim) Release(ctx context.Context) error {
	err := c.s.kv.Delete(ctx, c.key, jetstream.LastRevision(c.rev))
	if err != nil && !isConflict(err) {
		return fmt.Errorf("release %s: %w", c.key, err)
	}
	return nil
}

// Hold keeps the claim renewed every Lease/3 until ctx ends or the claim is
// lost; it calls lost (if not nil) once when renewal reports ErrLost or keeps
// failing for a whole lease. It returns when ctx ends or the claim is lost.
func (c *Claim) Hold(ctx context.Context, lost func(error)) {
	t := time.NewTicker(c.s.lease / 3)
	defer t.Stop()
	lastOK := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, c.s.lease/3)
		err := c.Renew(rctx)
		cancel()
		switch {
		case err == nil:
			lastOK = time.Now()
		case ctx.Err() != nil:
			return
		case errors.Is(err, ErrLost) || time.Since(lastOK) >= c.s.lease:
			if lost != nil {
				if !errors.Is(err, ErrLost) {
					err = fmt.Errorf("%w: no renewal for a lease: %v", ErrLost, err)
				}
				lost(err)
			}
			return
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
