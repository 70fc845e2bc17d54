package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/protocol"
)

// maxSeen bounds the duplicate-request cache of one agent.
const maxSeen = 65536

// action is what the session loop must do after replying.
type action int

const (
	actNone action = iota
	actRestart
	actShutdown
	actQuiet // stop announcing for splay
)

// result is the outcome of one request.
type result struct {
	reply []byte        // nil: do not reply
	act   action        // follow-up for the session loop
	splay time.Duration // restart splay
}

// session is the state of one mode run: what the dispatcher needs to answer.
type session struct {
	a              *Agent
	mode           Mode
	cfg            *config.Config // may be nil
	facts          map[string]string
	collectives    []string
	mainCollective string
	nodeSubject    string
	agents         []string
	// arrivalID and serial are the ID and certificate serial of the
	// provisioned event of a production session.
	arrivalID string
	serial    string
	// started is when a provisioning session (one provisioning-mode life)
	// began, and life its ID; its announcements carry both, its discovery
	// replies and inventory the ID.
	started time.Time
	life    string
}

// outcome of an action handler: the reply code, message and body.
type answer struct {
	code  protocol.Code
	msg   string
	body  any
	act   action
	splay time.Duration
}

func ok(body any) answer { return answer{code: protocol.CodeOK, body: body} }

func fail(code protocol.Code, format string, args ...any) answer {
	return answer{code: code, msg: fmt.Sprintf(format, args...)}
}

// handle answers one message received on subject. It never panics on any
// input; it returns no reply for invalid broadcasts.
func (s *session) handle(subject string, data []byte, now time.Time) result {
	directed := subject == s.nodeSubject
	log := s.a.log
	if len(data) > protocol.MaxMessageSize {
		return s.refuse(directed, nil, protocol.CodeTooLarge, fmt.Sprintf("request of %d bytes exceeds %d", len(data), protocol.MaxMessageSize))
	}
	req, err := protocol.DecodeRequest(data)
	if err != nil {
		log.WithError(err).Debug("invalid request")
		code := protocol.CodeBadRequest
		if errors.Is(err, protocol.ErrTooLarge) {
			code = protocol.CodeTooLarge
		}
		return s.refuse(directed, nil, code, err.Error())
	}
	log = log.WithFields(logrus.Fields{"request_id": req.ID, "agent": req.Agent, "action": req.Action, "sender": req.Sender})
	if err := req.CheckFresh(now, RequestSkew); err != nil {
		s.a.refused.stale.Add(1)
		log.WithError(err).Warn("refused stale request")
		return s.refuse(directed, req, protocol.CodeExpired, err.Error())
	}
	if directed && req.Target != s.a.id {
		return s.refuse(directed, req, protocol.CodeBadRequest, fmt.Sprintf("target %q is not this node", req.Target))
	}
	if !directed && req.Target != "" && req.Target != s.a.id {
		return result{}
	}
	// A broadcast subject serves only the agent it is named after, and
	// never choria_provision: one request signed for every node must not
	// configure, restart or shut them all down.
	if !directed && (req.Agent == protocol.AgentProvision || subject != protocol.BroadcastSubject(s.mainCollective, req.Agent)) {
		return result{}
	}
	if !s.serves(req.Agent, req.Action) {
		return s.refuse(directed, req, protocol.CodeUnknownAction, fmt.Sprintf("%s %s is not served in %s mode", req.Agent, req.Action, s.mode))
	}
	if s.needsSignature(req.Agent) {
		if err := s.a.checkSignature(req); err != nil {
			s.a.refused.count(err)
			log.WithError(err).Warn("refused request without a trusted signature")
			return s.refuse(directed, req, protocol.CodeUnauthorized, err.Error())
		}
	}
	if !s.a.remember(req, now) {
		s.a.refused.replayed.Add(1)
		log.Warn("refused duplicate request")
		return s.refuse(directed, req, protocol.CodeBadRequest, "request id already processed")
	}
	ans := s.dispatch(req, now, log)
	if ans.code != protocol.CodeOK && !directed {
		return result{}
	}
	return result{reply: s.encode(req, ans, log), act: ans.act, splay: ans.splay}
}

// refuse builds an error reply, or none for a broadcast.
func (s *session) refuse(directed bool, req *protocol.Request, code protocol.Code, msg string) result {
	if !directed {
		return result{}
	}
	return result{reply: s.encode(req, answer{code: code, msg: msg}, s.a.log)}
}

func (s *session) encode(req *protocol.Request, ans answer, log *logrus.Entry) []byte {
	rep, err := protocol.NewReply(req, s.a.id, ans.code, ans.msg, ans.body)
	var data []byte
	if err == nil {
		data, err = protocol.Marshal(rep)
	}
	if err != nil {
		log.WithError(err).Error("encode reply")
		rep, _ = protocol.NewReply(req, s.a.id, protocol.CodeInternal, "could not encode the reply", nil)
		data, _ = json.Marshal(rep)
	}
	return data
}

// serves reports whether agent/action is served in the session's mode.
func (s *session) serves(agent, act string) bool {
	switch agent {
	case protocol.AgentDiscovery:
		return s.mode == ModeProvisioning && act == protocol.ActionPing
	case protocol.AgentRPCUtil:
		return act == protocol.ActionPing || act == protocol.ActionInventory
	case protocol.AgentProvision:
		if s.mode == ModeProduction {
			return act == protocol.ActionReprovision
		}
		switch act {
		case protocol.ActionGenCSR, protocol.ActionConfigure, protocol.ActionRestart, protocol.ActionReprovision, protocol.ActionShutdown, protocol.ActionDefer:
			return true
		}
	}
	return false
}

// needsSignature: discovery pings are open (they reveal no more than
// metadata already publishes); production rpcutil is protected by mTLS and
// the production account's permissions instead. Everything else must carry
// a trusted provisioner's signature.
func (s *session) needsSignature(agent string) bool {
	switch agent {
	case protocol.AgentDiscovery:
		return false
	case protocol.AgentRPCUtil:
		return s.mode == ModeProvisioning
	}
	return true
}

// checkSignature verifies req's signature against the trusted keys, unless
// the insecure unsigned mode is on.
func (a *Agent) checkSignature(req *protocol.Request) error {
	if a.prov.InsecureUnsignedRequests {
		return nil
	}
	return req.VerifySignature(a.trusted)
}

// refusals counts refused requests by reason.
type refusals struct {
	unsigned, badSignature, untrusted, stale, replayed atomic.Uint64
}

func (r *refusals) count(err error) {
	switch {
	case errors.Is(err, protocol.ErrUnsigned):
		r.unsigned.Add(1)
	case errors.Is(err, protocol.ErrUntrustedKey):
		r.untrusted.Add(1)
	default:
		r.badSignature.Add(1)
	}
}

// Refusals are counts of requests an agent refused, by reason.
type Refusals struct {
	Unsigned     uint64 `json:"unsigned"`
	BadSignature uint64 `json:"bad_signature"`
	UntrustedKey uint64 `json:"untrusted_key"`
	Stale        uint64 `json:"stale"`
	Replayed     uint64 `json:"replayed"`
}

// Refusals returns how many requests the agent refused since it was made,
// by reason.
func (a *Agent) Refusals() Refusals {
	return Refusals{
		Unsigned:     a.refused.unsigned.Load(),
		BadSignature: a.refused.badSignature.Load(),
		UntrustedKey: a.refused.untrusted.Load(),
		Stale:        a.refused.stale.Load(),
		Replayed:     a.refused.replayed.Load(),
	}
}

// remember records req.ID until the request expires; false when it was
// already seen (or the cache is full of live entries).
func (a *Agent) remember(req *protocol.Request, now time.Time) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if exp, dup := a.seen[req.ID]; dup && now.Before(exp) {
		return false
	}
	if len(a.seen) >= maxSeen/2 {
		for id, exp := range a.seen {
			if !now.Before(exp) {
				delete(a.seen, id)
			}
		}
		if len(a.seen) >= maxSeen {
			return false
		}
	}
	a.seen[req.ID] = req.Time.Add(time.Duration(req.TTL)*time.Second + RequestSkew)
	return true
}

// maxSeenFile bounds the SeenFile an agent reads.
const maxSeenFile = 8 << 20

// saveSeen writes the request ids still within their TTL to SeenFile for
// the process that follows a re-exec. A failure is logged: the new process
// then only has the freshness check against replays of those requests.
func (a *Agent) saveSeen(now time.Time) {
	a.mu.Lock()
	live := make(map[string]time.Time, len(a.seen))
	for id, exp := range a.seen {
		if now.Before(exp) {
			live[id] = exp
		}
	}
	a.mu.Unlock()
	path := filepath.Join(a.stateDir, SeenFile)
	if len(live) == 0 {
		return
	}
	data, err := json.Marshal(live)
	if err == nil && !a.confined(path) {
		err = errors.New("behind a symbolic link out of the state directory")
	}
	if err == nil {
		err = fsutil.WriteFileAtomic(path, data, 0o600)
	}
	if err != nil {
		a.log.WithError(err).Warn("could not keep the ids of recent requests across the restart")
	}
}

// loadSeen reads and removes SeenFile, keeping the ids still within their
// TTL. A file that cannot be used is logged and removed.
func (a *Agent) loadSeen(now time.Time) {
	path := filepath.Join(a.stateDir, SeenFile)
	st, err := os.Lstat(path)
	if err != nil {
		return
	}
	defer func() {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			a.log.WithError(err).Warn("could not remove the file of recent request ids")
		}
	}()
	var seen map[string]time.Time
	if !st.Mode().IsRegular() || st.Size() > maxSeenFile {
		a.log.Warn("ignoring the file of recent request ids: not a regular file of a sane size")
		return
	}
	data, err := os.ReadFile(path)
	if err == nil {
		err = protocol.DecodeStrict(data, maxSeenFile, &seen)
	}
	if err != nil {
		a.log.WithError(err).Warn("ignoring the file of recent request ids")
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for id, exp := range seen {
		if len(a.seen) >= maxSeen {
			break
		}
		if id != "" && len(id) <= 128 && now.Before(exp) && exp.Before(now.Add(protocol.MaxTTL+2*RequestSkew)) {
			a.seen[id] = exp
		}
	}
}

func (s *session) dispatch(req *protocol.Request, now time.Time, log *logrus.Entry) answer {
	switch req.Agent + "." + req.Action {
	case protocol.AgentDiscovery + "." + protocol.ActionPing, protocol.AgentRPCUtil + "." + protocol.ActionPing:
		if a := decodeBody(req, &struct{}{}); a != nil {
			return *a
		}
		return ok(protocol.PingReply{Identity: s.a.id, Mode: s.mode.String(), Time: now.UTC(), Life: s.life})
	case protocol.AgentRPCUtil + "." + protocol.ActionInventory:
		if a := decodeBody(req, &struct{}{}); a != nil {
			return *a
		}
		return ok(s.inventory())
	case protocol.AgentProvision + "." + protocol.ActionGenCSR:
		var body protocol.GenCSRRequest
		if a := decodeBody(req, &body); a != nil {
			return *a
		}
		return s.genCSR(body, log)
	case protocol.AgentProvision + "." + protocol.ActionConfigure:
		var body protocol.ConfigureRequest
		if a := decodeBody(req, &body); a != nil {
			return *a
		}
		return s.configure(body, now, log)
	case protocol.AgentProvision + "." + protocol.ActionRestart:
		var body protocol.RestartRequest
		if a := decodeBody(req, &body); a != nil {
			return *a
		}
		return s.restart(body)
	case protocol.AgentProvision + "." + protocol.ActionReprovision:
		var body protocol.RestartRequest
		if a := decodeBody(req, &body); a != nil {
			return *a
		}
		return s.reprovision(body, log)
	case protocol.AgentProvision + "." + protocol.ActionDefer:
		var body protocol.DeferRequest
		if a := decodeBody(req, &body); a != nil {
			return *a
		}
		if body.RetryAfter < 1 || body.RetryAfter > protocol.MaxRetryAfter {
			return fail(protocol.CodeBadRequest, "retry_after %d: must be 1..%d seconds", body.RetryAfter, protocol.MaxRetryAfter)
		}
		log.WithField("retry_after", body.RetryAfter).Info("provisioner deferred this node; announcing again after the delay")
		return answer{code: protocol.CodeOK, act: actQuiet, splay: time.Duration(body.RetryAfter) * time.Second}
	case protocol.AgentProvision + "." + protocol.ActionShutdown:
		var body protocol.ShutdownRequest
		if a := decodeBody(req, &body); a != nil {
			return *a
		}
		return s.shutdown(body, now, log)
	}
	return fail(protocol.CodeUnknownAction, "%s %s is not served", req.Agent, req.Action)
}

// decodeBody decodes the request body strictly into v; an empty or null body
// leaves v at its zero value.
func decodeBody(req *protocol.Request, v any) *answer {
	if len(req.Body) == 0 || string(req.Body) == "null" {
		return nil
	}
	if err := protocol.DecodeStrict(req.Body, protocol.MaxMessageSize, v); err != nil {
		a := fail(protocol.CodeBadRequest, "body of %s %s: %v", req.Agent, req.Action, err)
		return &a
	}
	return nil
}

func (s *session) inventory() protocol.Inventory {
	inv := protocol.Inventory{
		Agents:         append([]string{}, s.agents...),
		Facts:          copyMap(s.facts),
		Classes:        []string{},
		Collectives:    append([]string{}, s.collectives...),
		MainCollective: s.mainCollective,
		Version:        s.a.version,
		DataPlugins:    []string{},
		Life:           s.life,
	}
	if s.cfg != nil {
		inv.Config = s.cfg.Masked()
	}
	if s.mode == ModeProvisioning {
		// Only a trusted provisioner gets here (inventory is signed in
		// provisioning mode); it verifies the token before provisioning.
		inv.ProvisioningToken = s.a.prov.Token
	}
	return inv
}
