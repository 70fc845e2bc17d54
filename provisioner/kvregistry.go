package provisioner

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/kvutil"
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
	return &kvRegistry{kv: kvutil.LeaderReads(js, kv, replicas)}, nil
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

// importedMarker, in state_dir, records that the file registry there was
// imported into the shared one; while it exists the import is not made
// again (an identity an operator removed from the bucket stays removed).
const importedMarker = "registry.imported"

// importResult is what importRecords did.
type importResult struct {
	imported, kept int
}

// importParallel is how many creates importRecords keeps in flight: on a
// replicated bucket each create waits for its commit (one at a time,
// 5,000 into an R3 bucket took 1.0 s; 32 in flight, 0.2 s).
const importParallel = 32

// importRecords creates, for every record of recs whose identity the
// bucket does not hold, that record; identities the bucket holds keep its
// record (the shared registry is the truth once several provisioners run).
// Creates that race with another provisioner's write keep the other one.
// Every record is checked before the first create; on an error the
// creates in flight finish and no more start.
func (k *kvRegistry) importRecords(recs []Record) (importResult, error) {
	var res importResult
	have, err := k.List()
	if err != nil {
		return res, err
	}
	known := make(map[string]bool, len(have))
	for _, r := range have {
		known[r.Identity] = true
	}
	type item struct {
		id   string
		data []byte
	}
	var todo []item
	for _, rec := range recs {
		if known[rec.Identity] {
			res.kept++
			continue
		}
		if err := rec.validate(); err != nil {
			return res, err
		}
		b, err := json.Marshal(rec)
		if err != nil {
			return res, err
		}
		todo = append(todo, item{rec.Identity, b})
	}
	var (
		mu       sync.Mutex
		firstErr error
		next     int
		wg       sync.WaitGroup
	)
	take := func() (item, bool) {
		mu.Lock()
		defer mu.Unlock()
		if firstErr != nil || next == len(todo) {
			return item{}, false
		}
		next++
		return todo[next-1], true
	}
	for range min(importParallel, len(todo)) {
		wg.Go(func() {
			for {
				it, ok := take()
				if !ok {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), kvOpTimeout)
				_, err := k.kv.Create(ctx, it.id, it.data)
				cancel()
				mu.Lock()
				switch {
				case errors.Is(err, jetstream.ErrKeyExists):
					res.kept++
				case err != nil:
					if firstErr == nil {
						firstErr = fmt.Errorf("registry %s: %w", it.id, err)
					}
				default:
					res.imported++
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return res, firstErr
}

// importFileRegistry copies the state_dir registry (a provisioner that ran
// in single mode before) into the shared one, once: keys, serials,
// denials and token uses recorded before the switch to an ha mode keep
// holding changed keys and denied identities.
func (p *Provisioner) importFileRegistry(reg *kvRegistry) error {
	if p.fileReg == nil {
		return nil
	}
	marker := filepath.Join(p.cfg.StateDir, importedMarker)
	if _, err := os.Stat(marker); err == nil {
		p.log.WithField("marker", marker).Debug("state_dir registry imported before; not importing it again")
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("import marker: %w", err)
	}
	recs, err := p.fileReg.List()
	if err != nil {
		return err
	}
	res, err := reg.importRecords(recs)
	if err != nil {
		return fmt.Errorf("importing %s's registry into %s (%d imported so far): %w", p.cfg.StateDir, RegistryBucket, res.imported, err)
	}
	note, err := json.Marshal(map[string]any{"bucket": RegistryBucket, "imported": res.imported, "kept": res.kept, "at": time.Now().UTC()})
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(marker, append(note, '\n'), 0o600); err != nil {
		return fmt.Errorf("import marker: %w", err)
	}
	p.log.WithFields(logrus.Fields{"imported": res.imported, "kept": res.kept, "bucket": RegistryBucket, "marker": marker}).
		Info("imported the state_dir identity registry into the shared one; identities the shared one held kept its record")
	return nil
}
