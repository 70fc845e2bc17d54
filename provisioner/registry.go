package provisioner

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/protocol"
)

// Registry limits.
const (
	// RegistryFile is the registry's file name in state_dir.
	RegistryFile = "registry.json"
	// MaxRegistryRecords bounds the identities a file registry holds.
	MaxRegistryRecords = 100_000
	// MaxRegistryBytes bounds the registry file.
	MaxRegistryBytes = 64 << 20
	// registryVersion is the file format version.
	registryVersion = 1
	maxSerialHex    = 64
)

// Registry errors.
var (
	// ErrRegistryCorrupt wraps every problem decoding a registry file.
	ErrRegistryCorrupt = errors.New("identity registry corrupt")
	// ErrRegistryFull is returned when a new identity would exceed
	// MaxRegistryRecords.
	ErrRegistryFull = errors.New("identity registry full")
	// ErrQueueFull is returned by Approve when the queue has no room.
	ErrQueueFull = errors.New("queue full")
)

// Record is what the registry keeps about one identity.
type Record struct {
	Identity string `json:"identity"`
	// KeyFingerprint is "sha256:" + hex SHA-256 of the SubjectPublicKeyInfo
	// of the key last provisioned (see Fingerprint).
	KeyFingerprint string `json:"key_fingerprint,omitempty"`
	// Serial is the hex serial number of the certificate last issued.
	Serial        string    `json:"serial,omitempty"`
	ProvisionedAt time.Time `json:"provisioned_at,omitzero"`
	// Denied is set when an operator denied the identity: it is never
	// provisioned again.
	Denied bool `json:"denied,omitempty"`
	// TokenID is the jti of the provisioning token the identity was last
	// provisioned with (max_uses is counted from these).
	TokenID   string    `json:"token_id,omitempty"`
	DeniedKey string    `json:"denied_key,omitempty"`
	DeniedAt  time.Time `json:"denied_at,omitzero"`
}

// validate checks a record read from storage.
func (r *Record) validate() error {
	if err := protocol.ValidateIdentity(r.Identity); err != nil {
		return err
	}
	for _, f := range []struct{ name, v string }{{"key_fingerprint", r.KeyFingerprint}, {"denied_key", r.DeniedKey}} {
		if f.v != "" && !validFingerprint(f.v) {
			return fmt.Errorf("%s of %s is not sha256:<64 hex digits>", f.name, r.Identity)
		}
	}
	if len(r.Serial) > maxSerialHex {
		return fmt.Errorf("serial of %s longer than %d hex digits", r.Identity, maxSerialHex)
	}
	for i := 0; i < len(r.Serial); i++ {
		c := r.Serial[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return fmt.Errorf("serial of %s is not lowercase hex", r.Identity)
		}
	}
	if len(r.TokenID) > 64 || strings.ContainsAny(r.TokenID, "\r\n\x00") {
		return fmt.Errorf("token_id of %s: at most 64 bytes, no control characters", r.Identity)
	}
	if !r.Denied && (r.DeniedKey != "" || !r.DeniedAt.IsZero()) {
		return fmt.Errorf("%s has denial fields but is not denied", r.Identity)
	}
	return nil
}

func validFingerprint(s string) bool {
	h, ok := strings.CutPrefix(s, "sha256:")
	if !ok || len(h) != 64 || strings.ToLower(h) != h {
		return false
	}
	_, err := hex.DecodeString(h)
	return err == nil
}

// Registry remembers, per identity provisioned, the key and certificate
// serial, and the identities an operator denied. The file implementation
// keeps one JSON file; a shared store (such as a JetStream KV bucket) can
// implement it for several provisioners. Implementations are safe for
// concurrent use.
type Registry interface {
	// Get returns the record of identity; ok is false when there is none.
	Get(identity string) (rec Record, ok bool, err error)
	// Put stores rec, replacing any record of its identity, and returns
	// once it is durable.
	Put(rec Record) error
	// List returns every record, sorted by identity.
	List() ([]Record, error)
}

// memRegistry is a Registry kept in memory only (state_dir empty).
type memRegistry struct {
	mu   sync.Mutex
	recs map[string]Record
}

// NewMemoryRegistry returns a Registry that forgets everything at exit.
func NewMemoryRegistry() Registry { return &memRegistry{recs: map[string]Record{}} }

func (m *memRegistry) Get(id string) (Record, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	r, ok := m.recs[id]
	return r, ok, nil
}

func (m *memRegistry) Put(rec Record) error {
	if err := rec.validate(); err != nil {
		return fmt.Errorf("registry put: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.recs[rec.Identity]; !ok && len(m.recs) >= MaxRegistryRecords {
		return fmt.Errorf("registry put %s: %w (%d identities)", rec.Identity, ErrRegistryFull, MaxRegistryRecords)
	}
	m.recs[rec.Identity] = rec
	return nil
}

func (m *memRegistry) List() ([]Record, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return sortedRecords(m.recs), nil
}

func sortedRecords(recs map[string]Record) []Record {
	out := make([]Record, 0, len(recs))
	for _, r := range recs {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Identity < out[j].Identity })
	return out
}

// FileRegistry is a Registry kept in one JSON file, rewritten atomically
// (mode 0600) on every change. Concurrent Puts share one write.
type FileRegistry struct {
	path string

	mu   sync.Mutex
	recs map[string]Record
	enc  map[string][]byte // each record's JSON, encoded once per change
	gen  uint64            // bumped by every change

	wmu     sync.Mutex
	written uint64 // generation last written
}

// registryDoc is the file format.
type registryDoc struct {
	Version int      `json:"version"`
	Records []Record `json:"records"`
}

// OpenFileRegistry opens (or creates, with mode 0700) dir and reads
// dir/registry.json if it exists. A file that cannot be decoded is an error
// wrapping ErrRegistryCorrupt; it is never overwritten. Temporaries of
// registry.json that a provisioner killed while writing it left in dir are
// removed (one use per state_dir).
func OpenFileRegistry(dir string) (*FileRegistry, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("identity registry: %w", err)
	}
	if _, err := fsutil.RemoveTemps(dir, RegistryFile); err != nil {
		return nil, fmt.Errorf("identity registry: %w", err)
	}
	r := &FileRegistry{path: filepath.Join(dir, RegistryFile), recs: map[string]Record{}, enc: map[string][]byte{}}
	f, err := os.Open(r.path)
	if errors.Is(err, os.ErrNotExist) {
		return r, nil
	}
	if err != nil {
		return nil, fmt.Errorf("identity registry: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxRegistryBytes+1))
	if err != nil {
		return nil, fmt.Errorf("identity registry %s: %w", r.path, err)
	}
	recs, err := DecodeRegistry(data)
	if err != nil {
		return nil, fmt.Errorf("identity registry %s: %w (move it away to start with an empty registry, or restore a backup)", r.path, err)
	}
	for id, rec := range recs {
		b, err := json.Marshal(rec)
		if err != nil {
			return nil, fmt.Errorf("identity registry: %w", err)
		}
		r.enc[id] = b
	}
	r.recs = recs
	return r, nil
}

// DecodeRegistry strictly decodes a registry file: size-limited, no
// unknown fields, no trailing data, known version, valid and unique
// identities, well-formed fingerprints and serials.
func DecodeRegistry(data []byte) (map[string]Record, error) {
	if len(data) > MaxRegistryBytes {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrRegistryCorrupt, MaxRegistryBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var doc registryDoc
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrRegistryCorrupt, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: trailing data", ErrRegistryCorrupt)
	}
	if doc.Version != registryVersion {
		return nil, fmt.Errorf("%w: version %d, want %d", ErrRegistryCorrupt, doc.Version, registryVersion)
	}
	if len(doc.Records) > MaxRegistryRecords {
		return nil, fmt.Errorf("%w: %d records, limit %d", ErrRegistryCorrupt, len(doc.Records), MaxRegistryRecords)
	}
	recs := make(map[string]Record, len(doc.Records))
	for i, r := range doc.Records {
		if err := r.validate(); err != nil {
			return nil, fmt.Errorf("%w: record %d: %v", ErrRegistryCorrupt, i, err)
		}
		if _, dup := recs[r.Identity]; dup {
			return nil, fmt.Errorf("%w: record %d: %s appears twice", ErrRegistryCorrupt, i, r.Identity)
		}
		recs[r.Identity] = r
	}
	return recs, nil
}

// Path is the registry file.
func (r *FileRegistry) Path() string { return r.path }

// Get implements Registry.
func (r *FileRegistry) Get(id string) (Record, bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rec, ok := r.recs[id]
	return rec, ok, nil
}

// List implements Registry.
func (r *FileRegistry) List() ([]Record, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return sortedRecords(r.recs), nil
}

// Put implements Registry: the record is in the file when Put returns nil.
func (r *FileRegistry) Put(rec Record) error {
	if err := rec.validate(); err != nil {
		return fmt.Errorf("registry put: %w", err)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("registry put %s: %w", rec.Identity, err)
	}
	r.mu.Lock()
	if _, ok := r.recs[rec.Identity]; !ok && len(r.recs) >= MaxRegistryRecords {
		r.mu.Unlock()
		return fmt.Errorf("registry put %s: %w (%d identities)", rec.Identity, ErrRegistryFull, MaxRegistryRecords)
	}
	r.recs[rec.Identity] = rec
	r.enc[rec.Identity] = b
	r.gen++
	mine := r.gen
	r.mu.Unlock()
	return r.flush(mine)
}

// flush writes the registry unless a write that started after generation
// gen already did. Puts waiting here while another write runs are covered
// by the next single write.
func (r *FileRegistry) flush(gen uint64) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.written >= gen {
		return nil
	}
	// The document is {"version":1,"records":[ one record per line ]},
	// sorted by identity, built from the records' cached encodings.
	r.mu.Lock()
	ids := make([]string, 0, len(r.enc))
	size := 64
	for id, b := range r.enc {
		ids = append(ids, id)
		size += len(b) + 2
	}
	sort.Strings(ids)
	var buf bytes.Buffer
	buf.Grow(size)
	fmt.Fprintf(&buf, "{\"version\":%d,\"records\":[", registryVersion)
	for i, id := range ids {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.WriteString("\n")
		buf.Write(r.enc[id])
	}
	buf.WriteString("\n]}\n")
	cur := r.gen
	r.mu.Unlock()
	data := buf.Bytes()
	if len(data) > MaxRegistryBytes {
		return fmt.Errorf("identity registry: %w: %d bytes", ErrRegistryFull, len(data))
	}
	if err := fsutil.WriteFileAtomic(r.path, data, 0o600); err != nil {
		return fmt.Errorf("identity registry: %w", err)
	}
	r.written = cur
	return nil
}
