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
	"strconv"
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

// FileRegistry is a Registry kept in state_dir as a snapshot,
// registry.json, and a journal, registry.journal, of the records put since
// the snapshot was written (both mode 0600). A Put appends one line to the
// journal and syncs it, so its cost does not grow with the fleet;
// concurrent Puts share one write and one sync. Once the journal is larger
// than the snapshot (and 1 MiB), the next write folds it in: registry.json
// is rewritten atomically and the journal emptied. Opening the registry and
// Compact fold it too, so after a clean stop registry.json holds everything.
//
// Every journal line carries the sequence number of its Put, and the
// snapshot the highest sequence number it holds: lines a snapshot already
// holds are skipped when the journal is read, so a crash between writing
// the snapshot and emptying the journal loses nothing and replays nothing
// old. A last line without its newline is a write a crash interrupted
// (its Put never returned) and is dropped; any other bad line makes the
// registry corrupt.
type FileRegistry struct {
	path, jpath string

	mu      sync.Mutex
	recs    map[string]Record
	enc     map[string][]byte // each record's JSON, encoded once per change
	size    int               // bytes of the records in the snapshot format
	pending []journalLine     // Puts not yet in the journal, in order
	gen     uint64            // sequence number of the last Put
	minFold int               // minFoldBytes; smaller in tests

	wmu     sync.Mutex
	written uint64   // sequence number durable in the journal or snapshot
	journal *os.File // the journal, opened for appending; nil once closed
	jsize   int64    // bytes in the journal
	// rewrite is set when a journal write or truncation failed: the journal
	// may end in a partial line, so nothing is appended until a snapshot
	// holding every record has been written and the journal emptied.
	rewrite bool
}

// Registry journal limits.
const (
	// RegistryJournal is the journal's file name in state_dir.
	RegistryJournal = "registry.journal"
	// minFoldBytes is the journal size below which it is never folded into
	// the snapshot.
	minFoldBytes = 1 << 20
	// maxJournalLine bounds one journal line.
	maxJournalLine = 4096
	// maxJournalBytes bounds the journal read at open: it is folded once it
	// outgrows the snapshot, which is at most MaxRegistryBytes.
	maxJournalBytes = 2 * MaxRegistryBytes
)

// ErrRegistryClosed is returned by Put after Close.
var ErrRegistryClosed = errors.New("identity registry closed")

// registryDoc is the snapshot's format.
type registryDoc struct {
	Version int `json:"version"`
	// Seq is the sequence number of the last Put the snapshot holds.
	Seq     uint64   `json:"seq,omitempty"`
	Records []Record `json:"records"`
}

// journalEntry is one journal line.
type journalEntry struct {
	Seq    uint64 `json:"seq"`
	Record Record `json:"record"`
}

// journalLine is a Put waiting for the journal: its sequence number and the
// record's JSON.
type journalLine struct {
	seq uint64
	rec []byte
}

// OpenFileRegistry opens (or creates, with mode 0700) dir and reads
// dir/registry.json and dir/registry.journal if they exist, then folds the
// journal into registry.json. A file that cannot be decoded is an error
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
	r := &FileRegistry{
		path:    filepath.Join(dir, RegistryFile),
		jpath:   filepath.Join(dir, RegistryJournal),
		recs:    map[string]Record{},
		enc:     map[string][]byte{},
		minFold: minFoldBytes,
	}
	data, err := readLimited(r.path, MaxRegistryBytes)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("identity registry: %w", err)
	}
	if err == nil {
		recs, seq, err := decodeSnapshot(data)
		if err != nil {
			return nil, fmt.Errorf("identity registry %s: %w (move it away to start with an empty registry, or restore a backup)", r.path, err)
		}
		r.recs, r.gen = recs, seq
	}
	jdata, err := readLimited(r.jpath, maxJournalBytes)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("identity registry: %w", err)
	}
	entries, _, err := decodeJournal(jdata)
	if err != nil {
		return nil, fmt.Errorf("identity registry journal %s: %w (move registry.json and the journal away to start with an empty registry, or restore a backup)", r.jpath, err)
	}
	for _, e := range entries {
		if e.Seq <= r.gen {
			continue // already in the snapshot
		}
		if _, ok := r.recs[e.Record.Identity]; !ok && len(r.recs) >= MaxRegistryRecords {
			return nil, fmt.Errorf("identity registry journal %s: %w: more than %d identities", r.jpath, ErrRegistryCorrupt, MaxRegistryRecords)
		}
		r.recs[e.Record.Identity] = e.Record
		r.gen = max(r.gen, e.Seq)
	}
	for id, rec := range r.recs {
		b, err := json.Marshal(rec)
		if err != nil {
			return nil, fmt.Errorf("identity registry: %w", err)
		}
		r.enc[id] = b
		r.size += len(b) + 2
	}
	r.written = r.gen
	r.journal, err = os.OpenFile(r.jpath, os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("identity registry: %w", err)
	}
	r.jsize = int64(len(jdata))
	if err := fsutil.SyncDir(dir); err != nil {
		r.journal.Close()
		return nil, fmt.Errorf("identity registry: %w", err)
	}
	if r.jsize > 0 {
		// Fold at once: the operator's registry.json is then complete, and
		// a partial last line is gone before anything is appended.
		r.wmu.Lock()
		err := r.fold()
		r.wmu.Unlock()
		if err != nil {
			r.journal.Close()
			return nil, err
		}
	}
	return r, nil
}

// readLimited reads path, refusing more than limit bytes.
func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("%s: %w: larger than %d bytes", path, ErrRegistryCorrupt, limit)
	}
	return data, nil
}

// DecodeRegistry strictly decodes a registry file: size-limited, no
// unknown fields, no trailing data, known version, valid and unique
// identities, well-formed fingerprints and serials.
func DecodeRegistry(data []byte) (map[string]Record, error) {
	recs, _, err := decodeSnapshot(data)
	return recs, err
}

// decodeSnapshot is DecodeRegistry also returning the snapshot's sequence
// number.
func decodeSnapshot(data []byte) (map[string]Record, uint64, error) {
	if len(data) > MaxRegistryBytes {
		return nil, 0, fmt.Errorf("%w: larger than %d bytes", ErrRegistryCorrupt, MaxRegistryBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var doc registryDoc
	if err := dec.Decode(&doc); err != nil {
		return nil, 0, fmt.Errorf("%w: %v", ErrRegistryCorrupt, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, 0, fmt.Errorf("%w: trailing data", ErrRegistryCorrupt)
	}
	if doc.Version != registryVersion {
		return nil, 0, fmt.Errorf("%w: version %d, want %d", ErrRegistryCorrupt, doc.Version, registryVersion)
	}
	if len(doc.Records) > MaxRegistryRecords {
		return nil, 0, fmt.Errorf("%w: %d records, limit %d", ErrRegistryCorrupt, len(doc.Records), MaxRegistryRecords)
	}
	recs := make(map[string]Record, len(doc.Records))
	for i, r := range doc.Records {
		if err := r.validate(); err != nil {
			return nil, 0, fmt.Errorf("%w: record %d: %v", ErrRegistryCorrupt, i, err)
		}
		if _, dup := recs[r.Identity]; dup {
			return nil, 0, fmt.Errorf("%w: record %d: %s appears twice", ErrRegistryCorrupt, i, r.Identity)
		}
		recs[r.Identity] = r
	}
	return recs, doc.Seq, nil
}

// decodeJournal strictly decodes a registry journal: one {"seq","record"}
// object per line, each line at most 4 KiB, no unknown fields, valid
// records, sequence numbers above zero. A last line without its newline (a
// write a crash interrupted) is not returned and torn is true; any other
// bad line is an error wrapping ErrRegistryCorrupt.
func decodeJournal(data []byte) (entries []journalEntry, torn bool, err error) {
	if len(data) > maxJournalBytes {
		return nil, false, fmt.Errorf("%w: journal larger than %d bytes", ErrRegistryCorrupt, maxJournalBytes)
	}
	for n := 1; len(data) > 0; n++ {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			return entries, true, nil
		}
		line := data[:i]
		data = data[i+1:]
		if len(line) > maxJournalLine {
			return nil, false, fmt.Errorf("%w: journal line %d longer than %d bytes", ErrRegistryCorrupt, n, maxJournalLine)
		}
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.DisallowUnknownFields()
		var e journalEntry
		if err := dec.Decode(&e); err != nil {
			return nil, false, fmt.Errorf("%w: journal line %d: %v", ErrRegistryCorrupt, n, err)
		}
		if _, err := dec.Token(); err != io.EOF {
			return nil, false, fmt.Errorf("%w: journal line %d: trailing data", ErrRegistryCorrupt, n)
		}
		if e.Seq == 0 {
			return nil, false, fmt.Errorf("%w: journal line %d: no sequence number", ErrRegistryCorrupt, n)
		}
		if err := e.Record.validate(); err != nil {
			return nil, false, fmt.Errorf("%w: journal line %d: %v", ErrRegistryCorrupt, n, err)
		}
		entries = append(entries, e)
	}
	return entries, false, nil
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

// Put implements Registry: the record is in the journal (or the snapshot)
// when Put returns nil.
func (r *FileRegistry) Put(rec Record) error {
	return r.PutMany([]Record{rec})
}

// PutMany stores every record of recs (an import: one journal write and
// one sync for all of them) and returns once they are durable. A record
// that is invalid or would overfill the registry fails the whole call and
// nothing is stored.
func (r *FileRegistry) PutMany(recs []Record) error {
	encs := make([][]byte, len(recs))
	for i, rec := range recs {
		if err := rec.validate(); err != nil {
			return fmt.Errorf("registry put: %w", err)
		}
		b, err := json.Marshal(rec)
		if err != nil {
			return fmt.Errorf("registry put %s: %w", rec.Identity, err)
		}
		if len(b)+64 > maxJournalLine { // validate bounds every field far below this
			return fmt.Errorf("registry put %s: record of %d bytes", rec.Identity, len(b))
		}
		encs[i] = b
	}
	r.mu.Lock()
	n, size := len(r.recs), r.size
	added := map[string][]byte{}
	for i, rec := range recs {
		old, ok := added[rec.Identity]
		if !ok {
			old, ok = r.enc[rec.Identity]
		}
		if !ok {
			n++
		}
		if n > MaxRegistryRecords {
			r.mu.Unlock()
			return fmt.Errorf("registry put %s: %w (%d identities)", rec.Identity, ErrRegistryFull, MaxRegistryRecords)
		}
		size += len(encs[i]) + 2
		if ok {
			size -= len(old) + 2
		}
		if size+64 > MaxRegistryBytes {
			r.mu.Unlock()
			return fmt.Errorf("registry put %s: %w (%d bytes)", rec.Identity, ErrRegistryFull, MaxRegistryBytes)
		}
		added[rec.Identity] = encs[i]
	}
	for i, rec := range recs {
		r.recs[rec.Identity] = rec
		r.enc[rec.Identity] = encs[i]
		r.gen++
		r.pending = append(r.pending, journalLine{seq: r.gen, rec: encs[i]})
	}
	r.size = size
	last := r.gen
	r.mu.Unlock()
	return r.flush(last)
}

// flush makes every Put up to seq durable unless a write that started
// after it already did. Puts waiting here while another write runs are
// covered by the next single write.
func (r *FileRegistry) flush(seq uint64) error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.written >= seq {
		return nil
	}
	if r.journal == nil {
		return ErrRegistryClosed
	}
	r.mu.Lock()
	lines := r.pending
	r.pending = nil
	last := r.gen
	foldAt := int64(max(r.minFold, r.size))
	r.mu.Unlock()
	var jerr error
	if !r.rewrite && r.jsize < maxJournalBytes/2 {
		jerr = r.appendJournal(lines)
		if jerr == nil {
			r.written = last
			if r.jsize >= foldAt {
				// These Puts are durable; a fold that fails is tried again
				// at the next write, which writes a snapshot instead of
				// appending once the journal nears its limit.
				_ = r.fold()
			}
			return nil
		}
		// The journal may now end in part of a line: write everything as a
		// snapshot instead, which holds these lines' records too.
		r.rewrite = true
	}
	if err := r.fold(); err != nil {
		if jerr != nil {
			return fmt.Errorf("identity registry: %w; %w", jerr, err)
		}
		return err
	}
	r.written = last
	return nil
}

// appendJournal writes lines to the journal in one write and syncs it.
func (r *FileRegistry) appendJournal(lines []journalLine) error {
	var buf bytes.Buffer
	for _, l := range lines {
		buf.WriteString(`{"seq":`)
		buf.WriteString(strconv.FormatUint(l.seq, 10))
		buf.WriteString(`,"record":`)
		buf.Write(l.rec)
		buf.WriteString("}\n")
	}
	n, err := r.journal.Write(buf.Bytes())
	r.jsize += int64(n)
	if err != nil {
		return fmt.Errorf("append to %s: %w", r.jpath, err)
	}
	if err := fsutil.SyncData(r.journal); err != nil {
		return fmt.Errorf("append to %s: %w", r.jpath, err)
	}
	return nil
}

// fold writes every record as registry.json, then empties the journal.
// r.wmu is held.
func (r *FileRegistry) fold() error {
	// The document is {"version":1,"seq":N,"records":[ one record per line
	// ]}, sorted by identity, built from the records' cached encodings.
	r.mu.Lock()
	ids := make([]string, 0, len(r.enc))
	for id := range r.enc {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var buf bytes.Buffer
	buf.Grow(r.size + 64)
	fmt.Fprintf(&buf, "{\"version\":%d,\"seq\":%d,\"records\":[", registryVersion, r.gen)
	for i, id := range ids {
		if i > 0 {
			buf.WriteByte(',')
		}
		buf.WriteString("\n")
		buf.Write(r.enc[id])
	}
	buf.WriteString("\n]}\n")
	r.mu.Unlock()
	if err := fsutil.WriteFileAtomic(r.path, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("identity registry: %w", err)
	}
	// Every line of the journal is in the snapshot now (their sequence
	// numbers are at most its seq): emptying it can wait for a later fold
	// if it fails.
	r.rewrite = true
	if err := r.journal.Truncate(0); err != nil {
		return fmt.Errorf("identity registry: empty %s: %w", r.jpath, err)
	}
	if err := fsutil.SyncData(r.journal); err != nil {
		return fmt.Errorf("identity registry: empty %s: %w", r.jpath, err)
	}
	r.jsize = 0
	r.rewrite = false
	return nil
}

// Compact folds the journal into registry.json now (the provisioner does
// at stop), so that registry.json alone holds every record.
func (r *FileRegistry) Compact() error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.journal == nil {
		return ErrRegistryClosed
	}
	if r.jsize == 0 && !r.rewrite {
		return nil
	}
	return r.fold()
}

// Close compacts the registry and closes its journal; later Puts fail
// with ErrRegistryClosed, Get and List still answer.
func (r *FileRegistry) Close() error {
	err := r.Compact()
	if errors.Is(err, ErrRegistryClosed) {
		return nil
	}
	r.wmu.Lock()
	defer r.wmu.Unlock()
	cerr := r.journal.Close()
	r.journal = nil
	return errors.Join(err, cerr)
}
