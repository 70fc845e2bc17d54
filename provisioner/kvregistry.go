package provisioner

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

// RegistryBucket is the JetStream KV bucket of the shared identity
// registry (ha modes claims and leader): one key per identity, the
// Record as JSON. It is also the CA's issued index: the serial of the
// certificate last issued to each identity.
const RegistryBucket = "MUSTER_REGISTRY"

// kvOpTimeout bounds one registry operation.
const kvOpTimeout = 10 * time.Second

// kvRegistry is a Registry in a JetStream KV bucket, shared by every
// provisioner of a cluster.
type kvRegistry struct {
	kv jetstream.KeyValue
}

func openKVRegistry(ctx context.Context, js jetstream.JetStream, replicas int) (*kvRegistry, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:       RegistryBucket,
		Description:  "Muster identity registry: key fingerprint, certificate serial, denials",
		History:      1,
		Replicas:     max(1, replicas),
		Storage:      jetstream.FileStorage,
		MaxValueSize: 4096,
	})
	if err != nil {
		return nil, fmt.Errorf("registry bucket %s: %w", RegistryBucket, err)
	}
	return &kvRegistry{kv: kv}, nil
}

func decodeKVRecord(data []byte) (Record, error) {
	var r Record
	if err := protocol.DecodeStrict(data, 4096, &r); err != nil {
		return r, fmt.Errorf("registry record: %w", err)
	}
	if err := r.validate(); err != nil {
		return r, fmt.Errorf("registry record: %w", err)
	}
	return r, nil
}

func (k *kvRegistry) Get(id string) (Record, bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), kvOpTimeout)
	defer cancel()
	e, err := k.kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, fmt.Errorf("registry %s: %w", id, err)
	}
	r, err := decodeKVRecord(e.Value())
	if err != nil {
		return Record{}, false, err
	}
	return r, true, nil
}

func (k *kvRegistry) Put(rec Record) error {
	if err := rec.validate(); err != nil {
		return err
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), kvOpTimeout)
	defer cancel()
	if _, err := k.kv.Put(ctx, rec.Identity, b); err != nil {
		return fmt.Errorf("registry %s: %w", rec.Identity, err)
	}
	return nil
}

// List reads every record through one watcher of the bucket (an ordered
// consumer streams the latest value of each key) instead of a Get per key:
// a provisioner of a 100 000-node fleet lists the registry at every start.
func (k *kvRegistry) List() ([]Record, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w, err := k.kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("registry list: %w", err)
	}
	defer w.Stop()
	var out []Record
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return nil, fmt.Errorf("registry list: watcher stopped: %w", context.Cause(ctx))
			}
			if e == nil { // every current value has been delivered
				sort.Slice(out, func(i, j int) bool { return out[i].Identity < out[j].Identity })
				return out, nil
			}
			r, err := decodeKVRecord(e.Value())
			if err != nil {
				return nil, fmt.Errorf("registry %s: %w", e.Key(), err)
			}
			out = append(out, r)
		case <-ctx.Done():
			return nil, fmt.Errorf("registry list: %w", ctx.Err())
		}
	}
}
