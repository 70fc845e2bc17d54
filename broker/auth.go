package broker

import (
	"encoding/base64"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Account names.
const (
	// PROVISIONING is the account of unprovisioned nodes and provisioners.
	PROVISIONING = "PROVISIONING"
	// PRODUCTION is the account of nodes and operators with a certificate
	// from the broker's CA.
	PRODUCTION = "PRODUCTION"
)

// Subjects of the import between the accounts.
const (
	// LifecycleExport is the stream PRODUCTION exports.
	LifecycleExport = "choria.lifecycle.event.>"
	// ProductionPrefix is where PROVISIONING sees PRODUCTION's lifecycle
	// events: production.choria.lifecycle.event.>.
	ProductionPrefix = "production"
)

// UserKind is the kind of user a connection was authenticated as.
type UserKind int

// User kinds, in the order the authenticator tries them.
const (
	// UserNode is a production node: a verified certificate, user = CN.
	UserNode UserKind = iota
	// UserAdmin is a production certificate whose CN is in admins.
	UserAdmin
	// UserProvisioner is a connection with a listed nkey.
	UserProvisioner
	// UserUnprovisioned is a connection with neither: a waiting node.
	UserUnprovisioned
)

// String returns the kind's name, used as the result label of
// muster_broker_authentications_total.
func (k UserKind) String() string {
	switch k {
	case UserNode:
		return "production"
	case UserAdmin:
		return "admin"
	case UserProvisioner:
		return "provisioner"
	case UserUnprovisioned:
		return "unprovisioned"
	}
	return "unknown"
}

// UnprovisionedUser is the user name of connections without certificate or
// nkey.
const UnprovisionedUser = "unprovisioned"

// authResults are the label values of the authentication counter.
var authResults = []string{"production", "admin", "provisioner", "unprovisioned", "rejected"}

// authenticator implements server.Authentication with Muster's rules (see
// docs/broker.md). The accounts are set by Broker.Start before the server
// accepts connections.
type authenticator struct {
	log          *logrus.Entry
	provisioners map[string]struct{}
	admins       map[string]struct{}
	production   *server.Account
	provisioning *server.Account
	// tokens verifies unprovisioned nodes' tokens; nil with
	// insecure_open_provisioning.
	tokens *token.Verifier
	// onDuplicate is told when a second live connection from another
	// address claims an identity (set before the server starts).
	onDuplicate func(identity, remote string)

	counts     [5]atomic.Uint64 // indexed like authResults
	duplicates atomic.Uint64
	tokenFails atomic.Uint64

	srvMu sync.RWMutex
	srv   *server.Server

	liveMu sync.Mutex
	live   map[string]liveConn // identity → last admitted unprovisioned connection

	// refusals limits the "connection refused" log entries.
	refusals logLimit
}

// liveConn is an admitted unprovisioned connection.
type liveConn struct {
	cid    uint64
	remote string // host part of the remote address
}

func newAuthenticator(log *logrus.Entry, cfg Config) (*authenticator, error) {
	a := &authenticator{
		log:          log,
		provisioners: make(map[string]struct{}, len(cfg.Provisioners)),
		admins:       make(map[string]struct{}, len(cfg.Admins)),
		live:         map[string]liveConn{},
	}
	for _, p := range cfg.Provisioners {
		a.provisioners[p] = struct{}{}
	}
	for _, c := range cfg.Admins {
		a.admins[c] = struct{}{}
	}
	if !cfg.InsecureOpenProvisioning || len(cfg.TokenIssuers) > 0 {
		v, err := token.NewVerifier(cfg.TokenIssuers)
		if err != nil {
			return nil, fmt.Errorf("%w: token_issuers: %w", ErrInvalidConfig, err)
		}
		a.tokens = v
	}
	return a, nil
}

// setServer gives the authenticator the running server, to tell live
// connections from closed ones.
func (a *authenticator) setServer(s *server.Server) {
	a.srvMu.Lock()
	a.srv = s
	a.srvMu.Unlock()
}

// permissions returns the permissions of a user of kind with the given
// name (its identity for nodes). Provisioners may use every subject of
// their account. Nodes get only what the protocol needs, and publish only
// on subjects that end in their own identity, so a receiver can tell who
// sent a message from its subject:
//
//   - unprovisioned nodes publish their metadata and lifecycle events and
//     reply to requests; they subscribe only to their own node subject
//     (bound to the connection name they claim) and to provisioning
//     broadcasts, so they cannot watch other nodes' requests, metadata or
//     replies, and cannot send provisioning requests;
//   - production nodes publish lifecycle events and replies, and subscribe
//     to their certificate's node subject in any collective but the
//     provisioning one, and to broadcasts;
//   - admins may use every subject of PRODUCTION except the provisioning
//     collective's: only the provisioner sends provisioning requests.
func (a *authenticator) permissions(kind UserKind, name string) *server.Permissions {
	replies := &server.ResponsePermission{MaxMsgs: 1, Expires: time.Minute}
	lifecycle := protocol.LifecycleSubject("*", protocol.AgentComponent, name)
	provisioningSubjects := []string{protocol.ProvisioningCollective + ".>"}
	switch kind {
	case UserUnprovisioned:
		sub := []string{protocol.BroadcastSubject(protocol.ProvisioningCollective, ">")}
		pub := []string{}
		if protocol.ValidateIdentity(name) == nil {
			sub = append(sub, protocol.NodeSubject(protocol.ProvisioningCollective, name))
			pub = append(pub, protocol.MetadataSubjectFor(name), lifecycle)
		}
		return &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: pub},
			Subscribe: &server.SubjectPermission{Allow: sub},
			Response:  replies,
		}
	case UserNode:
		return &server.Permissions{
			Publish: &server.SubjectPermission{Allow: []string{lifecycle}},
			Subscribe: &server.SubjectPermission{
				Allow: []string{protocol.NodeSubject("*", name), protocol.BroadcastSubject("*", ">")},
				Deny:  provisioningSubjects,
			},
			Response: replies,
		}
	case UserAdmin:
		return &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: []string{">"}, Deny: provisioningSubjects},
			Subscribe: &server.SubjectPermission{Allow: []string{">"}},
		}
	default:
		return nil
	}
}

// Check authenticates a client connection and binds it to its account.
func (a *authenticator) Check(c server.ClientAuthentication) bool {
	if c.Kind() != server.CLIENT {
		a.reject(c, "not a client connection")
		return false
	}
	// Rule 1: a verified client certificate puts the node in PRODUCTION.
	if st := c.GetTLSConnectionState(); st != nil && len(st.VerifiedChains) > 0 && len(st.VerifiedChains[0]) > 0 {
		cn := st.VerifiedChains[0][0].Subject.CommonName
		if err := protocol.ValidateIdentity(cn); err != nil {
			a.reject(c, "certificate common name is not a valid identity")
			return false
		}
		kind := UserNode
		if _, ok := a.admins[cn]; ok {
			kind = UserAdmin
		}
		return a.register(c, kind, cn, a.production)
	}
	// Rule 2: a listed nkey with a valid signature over the nonce.
	if opts := c.GetOpts(); opts != nil && opts.Nkey != "" {
		if _, ok := a.provisioners[opts.Nkey]; !ok {
			a.reject(c, "unknown nkey")
			return false
		}
		if !verifyNonce(opts.Nkey, opts.Sig, c.GetNonce()) {
			a.reject(c, "bad nkey signature")
			return false
		}
		return a.register(c, UserProvisioner, opts.Nkey, a.provisioning)
	}
	// Rule 3: anything else is a node waiting to be provisioned.
	// Its node subject is bound to the connection name it claims (agents
	// name their connection after their identity); with token issuers
	// configured it must hold a valid token whose scope covers that name.
	name := UnprovisionedUser
	opts := c.GetOpts()
	if opts != nil && protocol.ValidateIdentity(opts.Name) == nil {
		name = opts.Name
	}
	if a.tokens != nil {
		if name == UnprovisionedUser {
			a.reject(c, "unprovisioned connection without a valid identity as its name")
			return false
		}
		if _, err := a.tokens.Verify(opts.Token, name, time.Now()); err != nil {
			a.tokenFails.Add(1)
			a.reject(c, "provisioning token: "+err.Error())
			return false
		}
	}
	if name != UnprovisionedUser && !a.claim(c, name) {
		return false
	}
	return a.registerAs(c, UserUnprovisioned, UnprovisionedUser, name, a.provisioning)
}

// claim records c as the live connection of identity. A second live
// connection claiming the same identity is refused: from the same address
// it is most likely the node reconnecting before the broker noticed its old
// connection died (it retries), from another address it is two machines
// claiming one identity, reported through onDuplicate so the provisioner
// holds the identity for an operator.
func (a *authenticator) claim(c server.ClientAuthentication, identity string) bool {
	remote := ""
	if addr := c.RemoteAddress(); addr != nil {
		remote = addr.String()
		if h, _, err := net.SplitHostPort(remote); err == nil {
			remote = h
		}
	}
	a.srvMu.RLock()
	srv := a.srv
	a.srvMu.RUnlock()
	a.liveMu.Lock()
	prev, seen := a.live[identity]
	dup := seen && srv != nil && prev.cid != c.GetID() && srv.GetClient(prev.cid) != nil
	if !dup {
		a.live[identity] = liveConn{cid: c.GetID(), remote: remote}
	}
	a.liveMu.Unlock()
	if !dup {
		return true
	}
	a.duplicates.Add(1)
	if prev.remote != remote && a.onDuplicate != nil {
		a.onDuplicate(identity, remote)
	}
	a.reject(c, "identity already connected")
	return false
}

// register binds the connection to acc as a user of kind.
func (a *authenticator) register(c server.ClientAuthentication, kind UserKind, name string, acc *server.Account) bool {
	return a.registerAs(c, kind, name, name, acc)
}

// registerAs is register with permissions computed for identity.
func (a *authenticator) registerAs(c server.ClientAuthentication, kind UserKind, name, identity string, acc *server.Account) bool {
	if acc == nil {
		a.reject(c, "broker not started")
		return false
	}
	c.RegisterUser(&server.User{Username: name, Account: acc, Permissions: a.permissions(kind, identity)})
	a.counts[kind].Add(1)
	if a.log.Logger.IsLevelEnabled(logrus.DebugLevel) {
		a.log.WithFields(logrus.Fields{"identity": name, "kind": kind.String(), "account": acc.Name}).Debug("connection authenticated")
	}
	return true
}

// reject counts a refused connection and logs it, at most once a second.
func (a *authenticator) reject(c server.ClientAuthentication, reason string) {
	a.counts[len(authResults)-1].Add(1)
	suppressed, ok := a.refusals.allow(time.Now())
	if !ok {
		return
	}
	remote := ""
	if addr := c.RemoteAddress(); addr != nil {
		remote = addr.String()
	}
	a.log.WithFields(logrus.Fields{"remote": remote, "reason": reason, "suppressed": suppressed}).Warn("connection refused")
}

// verifyNonce checks an nkey signature (base64, raw URL or standard) over
// the server's nonce.
func verifyNonce(pub, sig string, nonce []byte) bool {
	if len(nonce) == 0 || sig == "" {
		return false
	}
	raw, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil {
		raw, err = base64.StdEncoding.DecodeString(sig)
		if err != nil {
			return false
		}
	}
	kp, err := nkeys.FromPublicKey(pub)
	if err != nil {
		return false
	}
	return kp.Verify(nonce, raw) == nil
}
