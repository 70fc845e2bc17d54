// Package protocol defines Muster's wire protocol in one place: the NATS
// subjects, the request and reply envelopes, the actions and their bodies,
// the stable error codes and the size limits every decoder enforces.
//
// docs/protocol.md describes the same protocol for readers, with examples
// that can be replayed with the nats CLI. Keep the two in step.
package protocol

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// Version strings carried in every envelope. A receiver rejects an envelope
// whose protocol field it does not know.
const (
	RequestProtocol  = "muster:request:1"
	ReplyProtocol    = "muster:reply:1"
	EventProtocol    = "muster:lifecycle:1"
	MetadataProto    = "muster:metadata:1"
	AdvisoryProtocol = "muster:advisory:1"
)

// Size limits. Every message from a node or a helper is checked against one of
// these before it is decoded.
const (
	// MaxMessageSize bounds any request, reply, event or metadata message.
	MaxMessageSize = 256 * 1024
	// MaxIdentityLength bounds a node identity (a DNS name is at most 253).
	MaxIdentityLength = 253
	// MaxTTL is the longest TTL a request may ask for.
	MaxTTL = 10 * time.Minute
	// DefaultTTL is used when a sender does not set one.
	DefaultTTL = 60 * time.Second
)

// Collectives and components.
const (
	// ProvisioningCollective is the collective every unprovisioned node joins.
	ProvisioningCollective = "provisioning"
	// DefaultMainCollective is the production collective when a node's
	// configuration names none.
	DefaultMainCollective = "mcollective"
	// AgentComponent names the node daemon in lifecycle subjects.
	AgentComponent = "muster-agent"
	// ProvisionerComponent names the provisioner in lifecycle subjects.
	ProvisionerComponent = "muster-provisioner"
)

// Subjects that do not depend on a collective. A node publishes only on
// subjects that end in its own identity, and the broker lets it publish on
// no others, so a receiver knows who sent a message from its subject (see
// DecodeMetadataFrom and DecodeEventFrom).
const (
	// MetadataSubject prefixes the subjects of waiting nodes' metadata
	// (identity + facts): choria.provisioning_data.<identity>.
	MetadataSubject = "choria.provisioning_data"
	// LifecyclePrefix prefixes lifecycle events:
	// choria.lifecycle.event.<type>.<component>.<identity>.
	LifecyclePrefix = "choria.lifecycle.event"
	// AdvisoryDuplicateIdentity is where the broker announces that a
	// second machine (another address) tried to connect as an identity
	// that already has a live provisioning connection. Only provisioners
	// can subscribe to it.
	AdvisoryDuplicateIdentity = "muster.advisory.duplicate_identity"
)

// DuplicateIdentity is the body of an AdvisoryDuplicateIdentity message.
type DuplicateIdentity struct {
	Protocol string    `json:"protocol"`
	Identity string    `json:"identity"`
	Time     time.Time `json:"time"`
}

// DecodeDuplicateIdentity decodes and validates a duplicate identity
// advisory.
func DecodeDuplicateIdentity(data []byte) (*DuplicateIdentity, error) {
	var d DuplicateIdentity
	if err := DecodeLenient(data, MaxMessageSize, &d); err != nil {
		return nil, fmt.Errorf("decode advisory: %w", err)
	}
	if d.Protocol != AdvisoryProtocol {
		return nil, fmt.Errorf("decode advisory: protocol %q: %w", d.Protocol, ErrBadProtocol)
	}
	if err := ValidateIdentity(d.Identity); err != nil {
		return nil, fmt.Errorf("decode advisory: %w", err)
	}
	return &d, nil
}

// Agents a node serves.
const (
	AgentRPCUtil   = "rpcutil"
	AgentProvision = "choria_provision"
	AgentDiscovery = "discovery"
)

// Actions, by agent.
const (
	ActionPing        = "ping"        // discovery, rpcutil
	ActionInventory   = "inventory"   // rpcutil
	ActionGenCSR      = "gencsr"      // choria_provision
	ActionConfigure   = "configure"   // choria_provision
	ActionRestart     = "restart"     // choria_provision
	ActionReprovision = "reprovision" // choria_provision
	ActionShutdown    = "shutdown"    // choria_provision
	ActionDefer       = "defer"       // choria_provision: come back later
)

// Lifecycle event types.
const (
	EventStartup     = "startup"
	EventProvisioned = "provisioned"
	EventShutdown    = "shutdown"
)

// NodeSubject is the subject on which a single node receives requests in the
// given collective: <collective>.node.<identity>.
func NodeSubject(collective, identity string) string {
	return collective + ".node." + identity
}

// BroadcastSubject is the subject on which every node of a collective
// receives requests for an agent: <collective>.broadcast.agent.<agent>.
func BroadcastSubject(collective, agent string) string {
	return collective + ".broadcast.agent." + agent
}

// MetadataSubjectFor is the subject identity publishes its metadata on:
// choria.provisioning_data.<identity> (">" subscribes to every node's).
func MetadataSubjectFor(identity string) string {
	return MetadataSubject + "." + identity
}

// LifecycleSubject is the subject of identity's lifecycle events of a type
// from a component: choria.lifecycle.event.<type>.<component>.<identity>
// ("*" and ">" make subscriptions and permissions).
func LifecycleSubject(eventType, component, identity string) string {
	return LifecyclePrefix + "." + eventType + "." + component + "." + identity
}

// ErrSubjectMismatch is returned for a message whose body names another
// identity (or event) than its subject.
var ErrSubjectMismatch = errors.New("message does not match its subject")

// subjectIdentity returns the identity that ends subject after prefix.
func subjectIdentity(subject, prefix string) (string, error) {
	rest, ok := strings.CutPrefix(subject, prefix+".")
	if !ok {
		return "", fmt.Errorf("subject %.80q is not under %s: %w", subject, prefix, ErrSubjectMismatch)
	}
	if err := ValidateIdentity(rest); err != nil {
		return "", fmt.Errorf("subject %.80q: %w", subject, err)
	}
	return rest, nil
}

// Code is a stable error code carried in replies. Codes are part of the
// protocol: add new ones, never change the meaning of existing ones.
type Code string

// Reply codes.
const (
	CodeOK            Code = "ok"
	CodeBadRequest    Code = "bad_request"    // undecodable or invalid request
	CodeUnauthorized  Code = "unauthorized"   // token or signature check failed
	CodeExpired       Code = "expired"        // request older than its TTL
	CodeUnknownAction Code = "unknown_action" // agent or action not served in this mode
	CodeInvalidCert   Code = "invalid_certificate"
	CodeConflict      Code = "conflict" // e.g. configure before gencsr
	CodeTooLarge      Code = "too_large"
	CodeInternal      Code = "internal" // node-side failure; details stay on the node
)

// Sentinel errors returned by the decoders and validators in this package.
var (
	ErrTooLarge        = errors.New("message too large")
	ErrBadProtocol     = errors.New("unknown protocol version")
	ErrMissingField    = errors.New("missing required field")
	ErrInvalidIdentity = errors.New("invalid identity")
	ErrExpired         = errors.New("request expired")
	ErrBadTTL          = errors.New("invalid ttl")
	ErrBadField        = errors.New("invalid field")
)

// Request is the envelope of every request the provisioner (or an operator
// tool) sends to a node.
type Request struct {
	Protocol string `json:"protocol"`
	// ID is unique per request; a node never processes an ID twice.
	ID string `json:"id"`
	// Sender names the requester (provisioner instance name).
	Sender string `json:"sender"`
	// Target is the addressed identity, empty for broadcasts.
	Target string `json:"target,omitempty"`
	Agent  string `json:"agent"`
	Action string `json:"action"`
	// Time is when the request was made, in UTC.
	Time time.Time `json:"time"`
	// TTL in whole seconds: the request is void after Time+TTL.
	TTL int `json:"ttl"`
	// Body is the action's input; its type depends on Agent and Action.
	Body json.RawMessage `json:"body,omitempty"`
	// Signer is the public nkey of the key that signed the request.
	Signer string `json:"signer,omitempty"`
	// Signature is the raw-URL base64 ed25519 signature by Signer over
	// SigningPayload (see sign.go).
	Signature string `json:"sig,omitempty"`
}

// Reply is the envelope of every reply from a node.
type Reply struct {
	Protocol string          `json:"protocol"`
	ID       string          `json:"id"`     // the request's ID
	Sender   string          `json:"sender"` // the replying node's identity
	Time     time.Time       `json:"time"`
	Code     Code            `json:"code"`
	Message  string          `json:"message,omitempty"`
	Body     json.RawMessage `json:"body,omitempty"`
}

// Err returns nil for a successful reply and a *ReplyError otherwise.
func (r *Reply) Err() error {
	if r.Code == CodeOK {
		return nil
	}
	return &ReplyError{Code: r.Code, Message: r.Message, Sender: r.Sender}
}

// ReplyError is a non-ok reply received from a node.
type ReplyError struct {
	Code    Code
	Message string
	Sender  string
}

func (e *ReplyError) Error() string {
	return fmt.Sprintf("%s replied %s: %s", e.Sender, e.Code, e.Message)
}

// Metadata is what a waiting node publishes on MetadataSubject.
type Metadata struct {
	Protocol string    `json:"protocol"`
	Identity string    `json:"identity"`
	Time     time.Time `json:"time"`
	// Started is when the node entered this provisioning-mode life (its
	// clock, at or before its startup event): a provisioner that missed
	// that event tells a node reinstalled after it arrived in production
	// from the previous life's late announcement by it. Zero from agents
	// that do not send it.
	Started time.Time `json:"started,omitzero"`
	// Life is this provisioning-mode life's ID (NewLife): the same in
	// every announcement of the life, new in the next. Unlike Started it
	// needs no clock, so a node whose clock went back across a reinstall
	// is still told from its previous life. Empty from agents that do not
	// send it.
	Life    string            `json:"life,omitempty"`
	Version string            `json:"version"`
	Facts   map[string]string `json:"facts"`
}

// Event is a lifecycle event, published on LifecycleSubject(Type, Component).
type Event struct {
	Protocol string `json:"protocol"`
	// ID names the event. A provisioned event is published again with the
	// same ID after every reconnection of one production session, so
	// consumers count arrivals by ID.
	ID        string    `json:"id"`
	Identity  string    `json:"identity"`
	Component string    `json:"component"`
	Type      string    `json:"type"`
	Time      time.Time `json:"time"`
	Version   string    `json:"version,omitempty"`
	// Serial is, in a provisioned event, the serial number (lowercase hex)
	// of the certificate the node connected to production with.
	Serial string `json:"serial,omitempty"`
	// Life is, in a startup event, the ID of the provisioning-mode life
	// it starts (see Metadata.Life).
	Life string `json:"life,omitempty"`
}

// PingReply is the body of a discovery or rpcutil ping reply.
type PingReply struct {
	Identity string    `json:"identity"`
	Mode     string    `json:"mode"` // "provisioning" or "production"
	Time     time.Time `json:"time"`
	// Life is the provisioning-mode life's ID (see Metadata.Life); empty
	// in production mode.
	Life string `json:"life,omitempty"`
}

// Inventory is the body of an rpcutil inventory reply. Its first eight fields
// are the Choria inventory the helper receives (COMPAT.md); Config carries the
// node's configuration keys (secrets masked), including ones it does not use.
type Inventory struct {
	Agents         []string          `json:"agents"`
	Facts          map[string]string `json:"facts"`
	Classes        []string          `json:"classes"`
	Collectives    []string          `json:"collectives"`
	MainCollective string            `json:"main_collective"`
	Version        string            `json:"version"`
	DataPlugins    []string          `json:"data_plugins"`
	Upgradable     bool              `json:"upgradable"`
	Config         map[string]string `json:"config,omitempty"`
	// Life is the provisioning-mode life's ID (see Metadata.Life); empty
	// in production mode. The provisioner records the life it configured.
	Life string `json:"life,omitempty"`
	// ProvisioningToken is the node's provisioning token (provisioning
	// mode only). The provisioner verifies it and removes it before the
	// inventory reaches the helper. Secret.
	ProvisioningToken string `json:"provisioning_token,omitempty"`
}

// Key types a node can generate in gencsr.
const (
	KeyECDSAP256 = "ecdsa-p256"
	KeyRSA       = "rsa"
)

// GenCSRRequest is the body of choria_provision gencsr.
type GenCSRRequest struct {
	// KeyType is KeyECDSAP256 (default) or KeyRSA.
	KeyType string `json:"key_type,omitempty"`
	// RSABits is the RSA modulus size, 2048 (default), 3072 or 4096.
	RSABits int `json:"rsa_bits,omitempty"`
	// Rotate asks for a new key even when the node has a usable one (by
	// default a node keeps its key across reprovisioning).
	Rotate bool `json:"rotate,omitempty"`
	// Subject fields, all optional. The CN is always the node identity.
	Country      string `json:"C,omitempty"`
	Locality     string `json:"L,omitempty"`
	Organization string `json:"O,omitempty"`
	OrgUnit      string `json:"OU,omitempty"`
	State        string `json:"ST,omitempty"`
}

// GenCSRReply is the body of a gencsr reply. The private key stays on the node.
type GenCSRReply struct {
	CSR       string `json:"csr"`
	PublicKey string `json:"public_key"`
	SSLDir    string `json:"ssldir"`
}

// ConfigureRequest is the body of choria_provision configure.
type ConfigureRequest struct {
	Configuration  map[string]string `json:"configuration"`
	Certificate    string            `json:"certificate,omitempty"`
	CA             string            `json:"ca,omitempty"`
	SSLDir         string            `json:"ssldir,omitempty"`
	ActionPolicies map[string]string `json:"action_policies,omitempty"`
	OPAPolicies    map[string]string `json:"opa_policies,omitempty"`
}

// RestartRequest is the body of choria_provision restart and reprovision.
type RestartRequest struct {
	// SplayMillis is the longest random delay before restarting.
	SplayMillis int `json:"splay_ms,omitempty"`
}

// MaxRetryAfter bounds a defer's retry_after.
const MaxRetryAfter = 24 * 60 * 60

// DeferRequest is the body of choria_provision defer: the provisioner will
// not take the node before RetryAfter seconds, so the node stays quiet
// (no metadata announcements) until then.
type DeferRequest struct {
	RetryAfter int    `json:"retry_after"`
	Reason     string `json:"reason,omitempty"`
}

// ShutdownRequest is the body of choria_provision shutdown.
type ShutdownRequest struct {
	Reason string `json:"reason,omitempty"`
}

// ValidateIdentity checks that id can be a node identity: a DNS-like name of
// letters, digits, '-', '_' and '.', no empty labels, no leading or trailing
// dot, at most MaxIdentityLength bytes. Such an identity is a safe NATS
// subject suffix and a safe file name component.
func ValidateIdentity(id string) error {
	if id == "" {
		return fmt.Errorf("%w: empty", ErrInvalidIdentity)
	}
	if len(id) > MaxIdentityLength {
		return fmt.Errorf("%w: longer than %d bytes", ErrInvalidIdentity, MaxIdentityLength)
	}
	if id[0] == '.' || id[len(id)-1] == '.' || strings.Contains(id, "..") {
		return fmt.Errorf("%w: %q has an empty label", ErrInvalidIdentity, id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return fmt.Errorf("%w: %q has character %q", ErrInvalidIdentity, id, c)
		}
	}
	return nil
}

// Marshal encodes v as JSON, refusing results over MaxMessageSize.
func Marshal(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxMessageSize {
		return nil, fmt.Errorf("encode %T: %d bytes: %w", v, len(b), ErrTooLarge)
	}
	return b, nil
}

// DecodeStrict decodes data into v, refusing data over limit bytes, unknown
// fields and trailing data.
func DecodeStrict(data []byte, limit int, v any) error {
	if len(data) > limit {
		return fmt.Errorf("%d bytes, limit %d: %w", len(data), limit, ErrTooLarge)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after JSON value")
	}
	return nil
}

// DecodeLenient decodes data into v, refusing data over limit bytes and
// trailing data but ignoring unknown fields (for replies and events, which
// newer peers may extend).
func DecodeLenient(data []byte, limit int, v any) error {
	if len(data) > limit {
		return fmt.Errorf("%d bytes, limit %d: %w", len(data), limit, ErrTooLarge)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after JSON value")
	}
	return nil
}

// DecodeRequest decodes and validates a request envelope. The body is not
// decoded; use DecodeStrict on Body with the action's type.
func DecodeRequest(data []byte) (*Request, error) {
	var r Request
	if err := DecodeStrict(data, MaxMessageSize, &r); err != nil {
		return nil, fmt.Errorf("decode request: %w", err)
	}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return &r, nil
}

// Validate checks the envelope fields (not freshness; see CheckFresh).
func (r *Request) Validate() error {
	var errs []error
	if r.Protocol != RequestProtocol {
		errs = append(errs, fmt.Errorf("protocol %q: %w", r.Protocol, ErrBadProtocol))
	}
	if r.ID == "" || len(r.ID) > 128 {
		errs = append(errs, fmt.Errorf("id: %w", ErrMissingField))
	}
	if r.Agent == "" || len(r.Agent) > 64 {
		errs = append(errs, fmt.Errorf("agent: %w", ErrMissingField))
	}
	if r.Action == "" || len(r.Action) > 64 {
		errs = append(errs, fmt.Errorf("action: %w", ErrMissingField))
	}
	if r.Time.IsZero() {
		errs = append(errs, fmt.Errorf("time: %w", ErrMissingField))
	}
	if r.TTL <= 0 || time.Duration(r.TTL)*time.Second > MaxTTL {
		errs = append(errs, fmt.Errorf("ttl %d: %w", r.TTL, ErrBadTTL))
	}
	if len(r.Sender) > 128 {
		errs = append(errs, fmt.Errorf("sender: longer than 128 bytes: %w", ErrBadField))
	}
	if len(r.Signer) > 64 || len(r.Signature) > 128 {
		errs = append(errs, fmt.Errorf("signer or sig too long: %w", ErrBadField))
	}
	if r.Target != "" {
		if err := ValidateIdentity(r.Target); err != nil {
			errs = append(errs, fmt.Errorf("target: %w", err))
		}
	}
	return errors.Join(errs...)
}

// CheckFresh reports ErrExpired when now is past Time+TTL, or when Time lies
// further than skew in the future.
func (r *Request) CheckFresh(now time.Time, skew time.Duration) error {
	// The receiver's clock is in each message: an operator reading it
	// on the sender's side sees how far apart the two clocks are.
	if r.Time.After(now.Add(skew)) {
		return fmt.Errorf("request %s made %s in the future by this clock (%s; more than the %s skew allowed): %w",
			r.ID, r.Time.Sub(now).Round(time.Millisecond), now.UTC().Format(time.RFC3339), skew, ErrExpired)
	}
	if now.After(r.Time.Add(time.Duration(r.TTL)*time.Second + skew)) {
		return fmt.Errorf("request %s older than its ttl of %ds by this clock (%s; made %s): %w",
			r.ID, r.TTL, now.UTC().Format(time.RFC3339), r.Time.UTC().Format(time.RFC3339), ErrExpired)
	}
	return nil
}

// DecodeReply decodes a reply envelope (lenient about unknown fields).
func DecodeReply(data []byte) (*Reply, error) {
	var r Reply
	if err := DecodeLenient(data, MaxMessageSize, &r); err != nil {
		return nil, fmt.Errorf("decode reply: %w", err)
	}
	if r.Protocol != ReplyProtocol {
		return nil, fmt.Errorf("decode reply: protocol %q: %w", r.Protocol, ErrBadProtocol)
	}
	if r.Code == "" {
		return nil, fmt.Errorf("decode reply: code: %w", ErrMissingField)
	}
	if err := ValidateIdentity(r.Sender); err != nil {
		return nil, fmt.Errorf("decode reply sender: %w", err)
	}
	return &r, nil
}

// DecodeMetadata decodes and validates a metadata message.
func DecodeMetadata(data []byte) (*Metadata, error) {
	var m Metadata
	if err := DecodeLenient(data, MaxMessageSize, &m); err != nil {
		return nil, fmt.Errorf("decode metadata: %w", err)
	}
	if m.Protocol != MetadataProto {
		return nil, fmt.Errorf("decode metadata: protocol %q: %w", m.Protocol, ErrBadProtocol)
	}
	if err := ValidateIdentity(m.Identity); err != nil {
		return nil, fmt.Errorf("decode metadata: %w", err)
	}
	if !m.Started.IsZero() && m.Started.After(m.Time) {
		// A life cannot start after it announced itself (one clock).
		return nil, fmt.Errorf("decode metadata: started after time: %w", ErrBadField)
	}
	if !ValidLife(m.Life) {
		return nil, fmt.Errorf("decode metadata: life: %w", ErrBadField)
	}
	return &m, nil
}

// DecodeMetadataFrom decodes metadata received on subject: the identity
// in the body must be the one the subject ends in (the only one the broker
// lets the sender publish as).
func DecodeMetadataFrom(subject string, data []byte) (*Metadata, error) {
	id, err := subjectIdentity(subject, MetadataSubject)
	if err != nil {
		return nil, fmt.Errorf("decode metadata: %w", err)
	}
	m, err := DecodeMetadata(data)
	if err != nil {
		return nil, err
	}
	if m.Identity != id {
		return nil, fmt.Errorf("decode metadata: identity %q on the subject of %q: %w", m.Identity, id, ErrSubjectMismatch)
	}
	return m, nil
}

// DecodeEventFrom decodes a lifecycle event received on subject (without
// an import prefix): its type, component and identity must be the ones
// the subject names.
func DecodeEventFrom(subject string, data []byte) (*Event, error) {
	e, err := DecodeEvent(data)
	if err != nil {
		return nil, err
	}
	id, err := subjectIdentity(subject, LifecyclePrefix+"."+e.Type+"."+e.Component)
	if err != nil {
		return nil, fmt.Errorf("decode event: %w", err)
	}
	if e.Identity != id {
		return nil, fmt.Errorf("decode event: identity %q on the subject of %q: %w", e.Identity, id, ErrSubjectMismatch)
	}
	return e, nil
}

// DecodeEvent decodes and validates a lifecycle event.
func DecodeEvent(data []byte) (*Event, error) {
	var e Event
	if err := DecodeLenient(data, MaxMessageSize, &e); err != nil {
		return nil, fmt.Errorf("decode event: %w", err)
	}
	if e.Protocol != EventProtocol {
		return nil, fmt.Errorf("decode event: protocol %q: %w", e.Protocol, ErrBadProtocol)
	}
	if err := ValidateIdentity(e.Identity); err != nil {
		return nil, fmt.Errorf("decode event: %w", err)
	}
	if e.Type == "" || e.Component == "" {
		return nil, fmt.Errorf("decode event: type or component: %w", ErrMissingField)
	}
	// One subject token each, so the subject's identity part is never
	// ambiguous (see DecodeEventFrom).
	if !isToken(e.Type) || !isToken(e.Component) {
		return nil, fmt.Errorf("decode event: type or component: %w", ErrBadField)
	}
	if !ValidSerial(e.Serial) {
		return nil, fmt.Errorf("decode event: serial: %w", ErrBadField)
	}
	if !ValidLife(e.Life) {
		return nil, fmt.Errorf("decode event: life: %w", ErrBadField)
	}
	return &e, nil
}

// isToken reports whether s is a plain subject token: 1..64 of letters,
// digits, '-' and '_'.
func isToken(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// MaxSerialHex bounds a certificate serial in hex (RFC 5280: at most 20
// octets; some CAs use a little more).
const MaxSerialHex = 64

// ValidSerial reports whether s is empty or a certificate serial number in
// lowercase hex of at most MaxSerialHex digits.
func ValidSerial(s string) bool {
	return len(s) <= MaxSerialHex && lowerHex(s)
}

// LifeLen is the length of a life ID: 128 random bits in lowercase hex.
const LifeLen = 32

// NewLife returns a new provisioning-mode life ID: LifeLen lowercase hex
// digits from the system's random source.
func NewLife() string {
	var b [LifeLen / 2]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

// ValidLife reports whether s is empty (unknown) or a life ID: LifeLen
// lowercase hex digits.
func ValidLife(s string) bool {
	return s == "" || len(s) == LifeLen && lowerHex(s)
}

// lowerHex reports whether s holds only lowercase hex digits.
func lowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// NewReply builds a reply to req from sender with the given code and body.
func NewReply(req *Request, sender string, code Code, msg string, body any) (*Reply, error) {
	r := &Reply{Protocol: ReplyProtocol, Sender: sender, Time: time.Now().UTC(), Code: code, Message: msg}
	if req != nil {
		r.ID = req.ID
	}
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		r.Body = b
	}
	return r, nil
}
