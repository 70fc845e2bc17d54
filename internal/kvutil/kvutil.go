// Package kvutil holds what the JetStream key-value stores of the shared
// provisioning state (node claims, node records, the identity registry)
// have in common.
package kvutil

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
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

// LeaderReads returns kv, a bucket with the given replicas, with Get (and
// the read inside Create) reading from the bucket's stream leader when
// there is more than one replica; other operations are kv's.
//
// nats.go reads a key-value bucket with direct gets, and on a replicated
// bucket nats-server lets followers answer those too, once they are within
// 90 % of the leader's log: a read may miss the latest writes (after a
// leader change, or while a follower catches up). The shared provisioning
// state decides on what it reads: a claim's holder, a node's key in the
// registry, whether a node's certificate is pending, whether a write whose
// reply was lost landed. A compare-and-set write catches a stale read, but
// a decision to write nothing, or to hold a node, does not. So those reads
// go to the leader, through the JetStream API's message get (the
// bucket's own configuration is left as nats.go makes it). One replica has
// nothing stale to read and keeps the cheaper direct gets.
func LeaderReads(js jetstream.JetStream, kv jetstream.KeyValue, replicas int) jetstream.KeyValue {
	if replicas <= 1 {
		return kv
	}
	o := js.Options()
	prefix := o.APIPrefix
	switch {
	case o.Domain != "":
		prefix = "$JS." + o.Domain + ".API."
	case prefix == "":
		prefix = jetstream.DefaultAPIPrefix
	case !strings.HasSuffix(prefix, "."):
		prefix += "."
	}
	timeout := o.DefaultTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	return &leaderKV{
		KeyValue: kv,
		nc:       js.Conn(),
		subject:  prefix + "STREAM.MSG.GET.KV_" + kv.Bucket(),
		keys:     "$KV." + kv.Bucket() + ".",
		timeout:  timeout,
	}
}

// leaderKV is a bucket whose Get reads from its stream leader.
type leaderKV struct {
	jetstream.KeyValue
	nc      *nats.Conn
	subject string // the stream's message get API subject
	keys    string // the bucket's subject prefix
	timeout time.Duration
}

// maxLeaderReply bounds a message get reply: a value, its headers and the
// JSON and base64 around them. Values are bounded far below it by the
// buckets' MaxValueSize.
const maxLeaderReply = 1 << 20

// jsErrMessageNotFound is the JetStream API's error code for a get that
// found no message.
const jsErrMessageNotFound = 10037

// msgGetReply is the JetStream API's reply to a message get.
type msgGetReply struct {
	Error *struct {
		Code        int    `json:"code"`
		ErrCode     int    `json:"err_code"`
		Description string `json:"description"`
	} `json:"error"`
	Message *struct {
		Subject  string    `json:"subject"`
		Sequence uint64    `json:"seq"`
		Header   []byte    `json:"hdrs"`
		Data     []byte    `json:"data"`
		Time     time.Time `json:"time"`
	} `json:"message"`
}

// Get returns key's latest value, read from the stream leader;
// jetstream.ErrKeyNotFound when it has none or was deleted.
func (l *leaderKV) Get(ctx context.Context, key string) (jetstream.KeyValueEntry, error) {
	e, deleted, err := l.read(ctx, key)
	switch {
	case err != nil:
		return nil, err
	case deleted:
		return nil, jetstream.ErrKeyNotFound
	}
	return e, nil
}

// Create creates key, or writes it over a delete or purge marker, as the
// bucket's own Create does, but reads the marker from the stream leader:
// the bucket's own reads it with a direct get. (A stale answer there could
// only make the create fail, as the write over the marker is a
// compare-and-set; it would fail a claim that was free.) A failure
// without a verdict (a timeout) is returned as it is: the caller finds
// out with Landed.
func (l *leaderKV) Create(ctx context.Context, key string, value []byte, opts ...jetstream.KVCreateOpt) (uint64, error) {
	if len(opts) > 0 {
		return l.KeyValue.Create(ctx, key, value, opts...)
	}
	rev, err := l.KeyValue.Update(ctx, key, value, 0)
	if err == nil || !WrongLastSequence(err) {
		return rev, err
	}
	if e, deleted, rerr := l.read(ctx, key); rerr == nil && deleted {
		return l.KeyValue.Update(ctx, key, value, e.revision)
	}
	return 0, fmt.Errorf("%w: %w", err, jetstream.ErrKeyExists)
}

// WrongLastSequence reports whether err is JetStream's refusal of a
// compare-and-set write: the key was not at the revision expected
// (replicated streams report it with another code).
func WrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// read reads key's last message from the stream leader: its value, or a
// delete or purge marker (deleted; the entry holds the marker's revision).
func (l *leaderKV) read(ctx context.Context, key string) (e *entry, deleted bool, err error) {
	if key == "" || strings.ContainsAny(key, " \t\r\n*>") || strings.HasPrefix(key, ".") || strings.HasSuffix(key, ".") {
		return nil, false, jetstream.ErrInvalidKey
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, l.timeout)
		defer cancel()
	}
	req, err := json.Marshal(struct {
		LastBySubject string `json:"last_by_subj"`
	}{l.keys + key})
	if err != nil {
		return nil, false, err
	}
	msg, err := l.nc.RequestWithContext(ctx, l.subject, req)
	if err != nil {
		return nil, false, fmt.Errorf("read %s from the stream leader: %w", key, err)
	}
	e, deleted, err = decodeMsgGet(msg.Data, l.Bucket(), key, l.keys+key)
	if err != nil {
		return nil, false, fmt.Errorf("read %s from the stream leader: %w", key, err)
	}
	return e, deleted, nil
}

// decodeMsgGet decodes the JetStream API's reply to a message get of
// subject, the subject of key in bucket: the entry, or a delete or purge
// marker (deleted, with the marker's revision); jetstream.ErrKeyNotFound
// when the stream has no message on it.
func decodeMsgGet(data []byte, bucket, key, subject string) (*entry, bool, error) {
	if len(data) > maxLeaderReply {
		return nil, false, fmt.Errorf("reply of %d bytes: %w", len(data), jetstream.ErrInvalidJetStreamResponse)
	}
	var r msgGetReply
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, false, fmt.Errorf("%w: %w", jetstream.ErrInvalidJetStreamResponse, err)
	}
	switch {
	case r.Error != nil && r.Error.ErrCode == jsErrMessageNotFound:
		return nil, false, jetstream.ErrKeyNotFound
	case r.Error != nil:
		return nil, false, fmt.Errorf("error %d: %q", r.Error.Code, r.Error.Description)
	case r.Message == nil || r.Message.Subject != subject:
		return nil, false, jetstream.ErrInvalidJetStreamResponse
	}
	e := &entry{bucket: bucket, key: key, value: r.Message.Data, revision: r.Message.Sequence, created: r.Message.Time}
	if len(r.Message.Header) > 0 {
		h, err := nats.DecodeHeadersMsg(r.Message.Header)
		if err != nil {
			return nil, false, fmt.Errorf("headers: %w", err)
		}
		// A delete or purge marker, or the server's marker of a value
		// that expired or was removed.
		if op := h.Get("KV-Operation"); op == "DEL" || op == "PURGE" || h.Get(jetstream.MarkerReasonHeader) != "" {
			return e, true, nil
		}
	}
	return e, false, nil
}

// entry is a value read by leaderKV.Get.
type entry struct {
	bucket, key string
	value       []byte
	revision    uint64
	created     time.Time
}

func (e *entry) Bucket() string                  { return e.bucket }
func (e *entry) Key() string                     { return e.key }
func (e *entry) Value() []byte                   { return e.value }
func (e *entry) Revision() uint64                { return e.revision }
func (e *entry) Created() time.Time              { return e.created }
func (e *entry) Delta() uint64                   { return 0 }
func (e *entry) Operation() jetstream.KeyValueOp { return jetstream.KeyValuePut }
