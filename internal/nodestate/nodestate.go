// Package nodestate keeps the provisioners' shared per-node state in a
// JetStream key-value bucket: one JSON record per node identity, written by
// the provisioner that holds the node's claim (internal/claims), read by
// every provisioner (to skip nodes another one finished) and by operators
// (`muster nodes ls|show --kv`). A restarted provisioner resumes from it.
package nodestate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/muster-io/muster/internal/protocol"
)

// DefaultBucket is the node state bucket's name.
const DefaultBucket = "MUSTER_NODES"

// MaxRecordSize bounds one record.
const MaxRecordSize = 16 * 1024

// ErrNotFound is returned by Get for an unknown identity.
var ErrNotFound = errors.New("no state for node")

// Record is one node's shared state.
type Record struct {
	Identity      string    `json:"identity"`
	State         string    `json:"state"`
	Stage         string    `json:"stage,omitempty"`
	ClaimedBy     string    `json:"claimed_by,omitempty"`
	Attempts      int       `json:"attempts"`
	LastError     string    `json:"last_error,omitempty"`
	DiscoveredAt  time.Time `json:"discovered_at,omitzero"`
	ProvisionedAt time.Time `json:"provisioned_at,omitzero"`
	ProvisionedBy string    `json:"provisioned_by,omitempty"`
	Serial        string    `json:"serial,omitempty"`
	Updated       time.Time `json:"updated"`
}

// Store reads and writes records.
type Store struct {
	kv jetstream.KeyValue
}

// New opens (or creates) the bucket with the given replicas (0 means 1).
func New(ctx context.Context, js jetstream.JetStream, bucket string, replicas int) (*Store, error) {
	if bucket == "" {
		bucket = DefaultBucket
	}
	if replicas == 0 {
		replicas = 1
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:       bucket,
		Description:  "Muster per-node provisioning state",
		History:      1,
		Replicas:     replicas,
		Storage:      jetstream.FileStorage,
		MaxValueSize: MaxRecordSize,
	})
	if err != nil {
		return nil, fmt.Errorf("node state bucket %s: %w", bucket, err)
	}
	return &Store{kv: kv}, nil
}

// Open opens an existing bucket without changing it (for read-only tools).
func Open(ctx context.Context, js jetstream.JetStream, bucket string) (*Store, error) {
	if bucket == "" {
		bucket = DefaultBucket
	}
	kv, err := js.KeyValue(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("node state bucket %s: %w", bucket, err)
	}
	return &Store{kv: kv}, nil
}

// Put writes r (its Updated is set to now).
func (s *Store) Put(ctx context.Context, r Record) error {
	if err := protocol.ValidateIdentity(r.Identity); err != nil {
		return err
	}
	r.Updated = time.Now().UTC()
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if len(b) > MaxRecordSize {
		return fmt.Errorf("node state %s: %d bytes: %w", r.Identity, len(b), protocol.ErrTooLarge)
	}
	if _, err := s.kv.Put(ctx, r.Identity, b); err != nil {
		return fmt.Errorf("node state %s: %w", r.Identity, err)
	}
	return nil
}

// Get reads one record.
func (s *Store) Get(ctx context.Context, identity string) (*Record, error) {
	e, err := s.kv.Get(ctx, identity)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("node state %s: %w", identity, err)
	}
	return Decode(e.Value())
}

// Decode decodes and validates a record (untrusted: anyone with write
// access to the bucket could have written it).
func Decode(data []byte) (*Record, error) {
	var r Record
	if err := protocol.DecodeLenient(data, MaxRecordSize, &r); err != nil {
		return nil, fmt.Errorf("decode node state: %w", err)
	}
	if err := protocol.ValidateIdentity(r.Identity); err != nil {
		return nil, fmt.Errorf("decode node state: %w", err)
	}
	if r.Attempts < 0 {
		return nil, errors.New("decode node state: negative attempts")
	}
	return &r, nil
}

// List returns every record, sorted by identity. Undecodable records are
// skipped and counted in bad.
func (s *Store) List(ctx context.Context) (recs []Record, bad int, err error) {
	lister, err := s.kv.ListKeys(ctx)
	if err != nil {
		return nil, 0, err
	}
	for key := range lister.Keys() {
		r, err := s.Get(ctx, key)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			bad++
			continue
		}
		recs = append(recs, *r)
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].Identity < recs[j].Identity })
	return recs, bad, nil
}
