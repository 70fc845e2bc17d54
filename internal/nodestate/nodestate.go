// Package nodestate keeps the provisioners' shared per-node state in a
// JetStream key-value bucket: one JSON record per node identity, read by
// every provisioner (to skip nodes another one finished) and by operators
// (`muster nodes ls|show --kv`). A restarted provisioner resumes from it.
//
// Every write is a compare-and-set on the revision read (Store.Update), so
// writers never lose each other's changes: the provisioner holding the
// node's claim (internal/claims) writes its attempt, and any provisioner
// records the node's arrival in production (Record.Complete), which is how
// a provisioning whose restart was never confirmed (the provisioner or the
// node died in between) is still counted exactly once.
package nodestate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/muster-io/muster/internal/kvutil"
	"github.com/muster-io/muster/internal/protocol"
)

// DefaultBucket is the node state bucket's name.
const DefaultBucket = "MUSTER_NODES"

// MaxRecordSize bounds one record.
const MaxRecordSize = 16 * 1024

// Sentinel errors.
var (
	// ErrNotFound is returned by Get for an unknown identity.
	ErrNotFound = errors.New("no state for node")
	// ErrContended is returned by Update when other writers kept changing
	// the record.
	ErrContended = errors.New("node state changed by others on every try")
)

// States the package itself sets (the provisioner sets the others).
const (
	StateProvisioned = "provisioned"
	StateProduction  = "production"
	StateFailed      = "failed"
)

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
	// Serial is the serial of the certificate the node was provisioned
	// with (counted in Provisions).
	Serial string `json:"serial,omitempty"`
	// Provisions counts completed provisionings: a certificate configured
	// on the node and then its restart confirmed or the node seen in
	// production with it. Each certificate is counted once.
	Provisions int `json:"provisions,omitempty"`
	// Pending is a certificate a provisioner is configuring, or configured
	// without its completion being known yet.
	Pending *Pending `json:"pending,omitempty"`
	// Earlier are certificates earlier attempts configured whose
	// completion was never known, oldest first (at most MaxEarlier): a
	// later attempt's certificate replaced them as Pending, but the node
	// may still come to production with one of them. (An attempt's
	// restart reached the node and its reply did not; the next attempt
	// reached the node during its restart splay and sent another
	// certificate, which the node never wrote.)
	Earlier []Pending `json:"earlier,omitempty"`
	// ArrivedAt is the time (the node's clock) of the provisioned event in
	// which the node last came to production with a known certificate.
	ArrivedAt time.Time `json:"arrived_at,omitzero"`
	// Life is the ID of the provisioning-mode life the node was
	// provisioned in (Serial's): an announcement of another life comes
	// from the node reinstalled or fallen back since. Empty when the node
	// sent none.
	Life    string    `json:"life,omitempty"`
	Updated time.Time `json:"updated"`
}

// Pending is a certificate on its way to a node.
type Pending struct {
	// Serial of the certificate.
	Serial string `json:"serial"`
	// KeyFingerprint of the node's key the certificate is for.
	KeyFingerprint string `json:"key_fingerprint,omitempty"`
	// TokenID is the id of the node's provisioning token.
	TokenID string `json:"token_id,omitempty"`
	// Life is the ID of the node's provisioning-mode life the
	// certificate is for (its inventory's).
	Life string `json:"life,omitempty"`
	// By is the provisioner configuring it.
	By string `json:"by"`
	// At is when the provisioner sent configure.
	At time.Time `json:"at"`
}

// MaxEarlier bounds Record.Earlier.
const MaxEarlier = 4

// SetPending makes p the pending certificate. One pending with another
// serial moves to Earlier (the oldest dropped beyond MaxEarlier): the node
// may have it.
func (r *Record) SetPending(p Pending) {
	if old := r.Pending; old != nil && old.Serial != p.Serial {
		r.Earlier = append(r.Earlier, *old)
		if n := len(r.Earlier); n > MaxEarlier {
			r.Earlier = append([]Pending(nil), r.Earlier[n-MaxEarlier:]...)
		}
	}
	r.Pending = &p
}

// PendingFor returns the pending or earlier certificate with serial (a
// copy), nil when there is none.
func (r *Record) PendingFor(serial string) *Pending {
	if serial == "" {
		return nil
	}
	if r.Pending != nil && r.Pending.Serial == serial {
		p := *r.Pending
		return &p
	}
	for i := len(r.Earlier) - 1; i >= 0; i-- {
		if r.Earlier[i].Serial == serial {
			p := r.Earlier[i]
			return &p
		}
	}
	return nil
}

// Complete records at now that the certificate serial reached the node:
// its restart into production was confirmed (arrivedAt zero) or the node
// was seen in production with it (arrivedAt: the time of its provisioned
// event). It returns the pending certificate it completed (Pending or one
// of Earlier: the others can no longer reach the node, and are dropped),
// or nil when serial was not pending: already counted (an arrival then only marks the
// node in production) or unknown (nothing changes, so a forged event cannot
// mark a node provisioned without knowing its new certificate's serial). A
// pending certificate is counted in Provisions exactly once, however many
// times and by however many provisioners its completion is recorded.
func (r *Record) Complete(serial string, now, arrivedAt time.Time) *Pending {
	if serial == "" {
		return nil
	}
	arrived := !arrivedAt.IsZero()
	p := r.PendingFor(serial)
	switch {
	case p != nil:
		r.Provisions++
		r.Serial = serial
		r.Life = p.Life
		r.ProvisionedBy = p.By
		r.ProvisionedAt = now.UTC()
		r.Pending, r.Earlier = nil, nil
		r.LastError = ""
		r.ClaimedBy = ""
	case r.Serial == serial:
		p = nil
		if !arrived {
			return nil
		}
	default:
		return nil
	}
	if arrived {
		r.State = StateProduction
		r.Stage = ""
		r.ArrivedAt = arrivedAt.UTC()
	} else if r.State != StateProduction {
		r.State = StateProvisioned
		r.Stage = ""
	}
	return p
}

// Arrived reports whether the node was seen in production with the
// certificate serial (so an attempt that configured it succeeded, whatever
// its restart did).
func (r *Record) Arrived(serial string) bool {
	return serial != "" && r.Serial == serial && r.State == StateProduction
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
	return &Store{kv: kvutil.LeaderReads(js, kv, replicas)}, nil
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

// Put writes r (its Updated is set to now), whatever the record held.
// Writers that share a record use Update.
func (s *Store) Put(ctx context.Context, r Record) error {
	b, err := encode(&r)
	if err != nil {
		return err
	}
	if _, err := s.kv.Put(ctx, r.Identity, b); err != nil {
		return fmt.Errorf("node state %s: %w", r.Identity, err)
	}
	return nil
}

// encode validates r, sets its Updated to now and marshals it.
func encode(r *Record) ([]byte, error) {
	if err := protocol.ValidateIdentity(r.Identity); err != nil {
		return nil, err
	}
	r.Updated = time.Now().UTC()
	b, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxRecordSize {
		return nil, fmt.Errorf("node state %s: %d bytes: %w", r.Identity, len(b), protocol.ErrTooLarge)
	}
	return b, nil
}

// updateTries bounds Update's compare-and-set attempts.
const updateTries = 16

// readBackWait bounds the read that tells whether a write without a
// verdict was made.
const readBackWait = 5 * time.Second

// Update reads identity's record (a fresh one, with only the identity,
// when there is none), lets change modify it and writes it back only if
// nobody wrote the record in between; otherwise it reads it again and
// retries. change returns false to write nothing, or an error to stop
// (returned as is). Update returns the record as written (or as read, when
// unchanged). A record that does not decode is replaced. A write whose
// reply is lost is read back: when it was made, Update reports success.
func (s *Store) Update(ctx context.Context, identity string, change func(r *Record) (bool, error)) (*Record, error) {
	if err := protocol.ValidateIdentity(identity); err != nil {
		return nil, err
	}
	for try := 0; try < updateTries; try++ {
		var rev uint64
		rec := &Record{Identity: identity}
		e, err := s.kv.Get(ctx, identity)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case err != nil:
			return nil, fmt.Errorf("node state %s: %w", identity, err)
		default:
			rev = e.Revision()
			if r, err := Decode(e.Value()); err == nil && r.Identity == identity {
				rec = r
			}
		}
		ok, err := change(rec)
		if err != nil {
			return nil, err
		}
		if !ok {
			return rec, nil
		}
		rec.Identity = identity
		b, err := encode(rec)
		if err != nil {
			return nil, err
		}
		if rev == 0 {
			_, err = s.kv.Create(ctx, identity, b)
		} else {
			_, err = s.kv.Update(ctx, identity, b, rev)
		}
		if err == nil {
			return rec, nil
		}
		if !conflict(err) {
			// No verdict (a timeout under load, a reconnection): the
			// write may have been made. A caller told it failed would
			// act on a record it did change: retry, and find its own
			// change made by nobody (an arrival then went uncounted).
			if _, ok := kvutil.Landed(ctx, s.kv, identity, rev, b, readBackWait); ok {
				return rec, nil
			}
			return nil, fmt.Errorf("node state %s: %w", identity, err)
		}
	}
	return nil, fmt.Errorf("node state %s: %w", identity, ErrContended)
}

// conflict reports a failed compare-and-set.
func conflict(err error) bool {
	return kvutil.WrongLastSequence(err) || errors.Is(err, jetstream.ErrKeyExists)
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
	if r.Attempts < 0 || r.Provisions < 0 {
		return nil, errors.New("decode node state: negative count")
	}
	if len(r.Earlier) > MaxEarlier {
		return nil, fmt.Errorf("decode node state: earlier: more than %d certificates: %w", MaxEarlier, protocol.ErrBadField)
	}
	pendings := r.Earlier
	if r.Pending != nil {
		pendings = append(pendings[:len(pendings):len(pendings)], *r.Pending)
	}
	if !protocol.ValidSerial(r.Serial) || !protocol.ValidLife(r.Life) {
		return nil, fmt.Errorf("decode node state: serial or life: %w", protocol.ErrBadField)
	}
	for _, p := range pendings {
		if p.Serial == "" || !protocol.ValidSerial(p.Serial) || !protocol.ValidLife(p.Life) {
			return nil, fmt.Errorf("decode node state: pending certificate: serial or life: %w", protocol.ErrBadField)
		}
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
