// Package kvutil holds what the JetStream key-value stores of the shared
// provisioning state (node claims, node records) have in common.
package kvutil

import (
	"bytes"
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Landed reports whether a compare-and-set write of val to key, which
// failed without a verdict (its reply lost or too late: a timeout, a
// reconnection), was made all the same: the key now holds val at a
// revision after the one the write expected (after; 0 for a create). It
// returns that revision. The caller's value must be unique to the write
// (it carries the write's time), so that an equal value is this write's.
//
// The read-back has wait of its own, as ctx may be what ran out. A
// cancelled ctx (a shutdown) reads nothing: the outcome stays unknown.
func Landed(ctx context.Context, kv jetstream.KeyValue, key string, after uint64, val []byte, wait time.Duration) (uint64, bool) {
	if errors.Is(ctx.Err(), context.Canceled) {
		return 0, false
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), wait)
	defer cancel()
	e, err := kv.Get(rctx, key)
	if err != nil || e.Revision() <= after || !bytes.Equal(e.Value(), val) {
		return 0, false
	}
	return e.Revision(), true
}
