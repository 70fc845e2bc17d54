// Package agent is the Muster node daemon as a library. An Agent decides at
// every start whether its configuration is complete (production mode) or not
// (provisioning mode), connects to the matching brokers and serves the
// provisioning protocol (discovery, rpcutil, choria_provision) until it is
// restarted, shut down or its context ends. Many agents can run in one
// process; each holds one NATS connection and one goroutine of its own.
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Repeats of a production connection's provisioned event (see
// Options.ArrivalRepeat).
const (
	// DefaultArrivalRepeat is when it is first published again.
	DefaultArrivalRepeat = time.Minute
	// arrivalRepeats is how many times it is published again.
	arrivalRepeats = 3
)

// Defaults.
const (
	DefaultMetadataInterval        = 30 * time.Second
	DefaultProductionFallbackAfter = 3
	DefaultRestartSplay            = 2 * time.Second
	// MaxRestartSplay caps the splay a restart request may ask for.
	MaxRestartSplay = 60 * time.Second
	// ConfigFileName is the configuration file inside the state directory.
	ConfigFileName = "agent.cfg"
	// ShutdownMarker is the file the shutdown action writes in the state
	// directory; while it exists the agent refuses to start.
	ShutdownMarker = "shutdown"
	// SeenFile hands the ids of the requests still within their TTL from
	// an agent that exits to restart (ExitOnRestart) to the process that
	// follows, so a request cannot be replayed across a re-exec. It is read
	// and removed at start.
	SeenFile = "seen-requests.json"
	// SSLDirName is the directory under the state directory holding the key,
	// CSR, certificate and CA.
	SSLDirName = "ssl"
	// Files inside the ssldir (part of the helper contract, COMPAT.md).
	KeyFile  = "private.pem"
	CSRFile  = "csr.pem"
	CertFile = "certificate.pem"
	CAFile   = "ca.pem"
	// RequestSkew is the clock skew tolerated on request times.
	RequestSkew = 30 * time.Second
)

// Sentinel errors returned by Run.
var (
	// ErrRestart is returned by Run when a restart was requested and
	// Options.ExitOnRestart is set; the caller re-executes the agent.
	ErrRestart = errors.New("agent restart requested")
	// ErrShutdown is returned by Run after the shutdown action; the agent
	// stays down on later starts until the marker file is removed.
	ErrShutdown = errors.New("agent shut down by request")
	// ErrStayDown is returned by Run when the shutdown marker exists.
	ErrStayDown = errors.New("agent was shut down and stays down")
	// ErrNoMode is returned when neither production nor provisioning mode
	// is possible.
	ErrNoMode = errors.New("no usable configuration and provisioning disabled")
	// ErrInvalidOptions wraps every error New returns for bad options.
	ErrInvalidOptions = errors.New("invalid agent options")
)

// Mode is the agent's operating mode.
type Mode int

// Modes.
const (
	// ModeProvisioning: waiting to be configured on the provisioning brokers.
	ModeProvisioning Mode = iota
	// ModeProduction: configured, connected to the production brokers with mTLS.
	ModeProduction
)

// String returns "provisioning" or "production".
func (m Mode) String() string {
	switch m {
	case ModeProvisioning:
		return "provisioning"
	case ModeProduction:
		return "production"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// Observer is told when an agent is connected in a mode.
type Observer interface {
	ModeChanged(identity string, m Mode, at time.Time)
}

// ProvisioningSettings are the compiled-in provisioning defaults, overridable
// by flags.
type ProvisioningSettings struct {
	// Brokers are the provisioning broker URLs (tls://host:port or host:port).
	Brokers []string
	// Token is the node's provisioning token (a JWT from `muster token
	// create`), presented to the provisioning broker when connecting and
	// to the provisioner in the inventory. Its trust claims (brokers,
	// ca_pin, provisioner_keys) fill in settings left empty. Secret.
	Token string
	// TrustedKeys are the provisioner public nkeys whose signatures the
	// agent accepts on requests (several at once for key rotation).
	TrustedKeys []string
	// InsecureUnsignedRequests accepts requests without a valid provisioner
	// signature. For labs only; the agent warns at every start.
	InsecureUnsignedRequests bool
	// CAFile is the CA that signs the provisioning broker's certificate.
	CAFile string
	// CAPEM is the same CA, inline.
	CAPEM []byte
	// CAPin is "sha256:<hex>" of the CA public key, checked against the
	// chain the broker sends.
	CAPin string
	// InsecureSkipVerify disables verification of the provisioning broker.
	InsecureSkipVerify bool
	// FactsFile is a JSON object or YAML map of string facts.
	FactsFile string
	// Enabled says whether provisioning is on when the configuration does
	// not say.
	Enabled bool
	// NoShuffle keeps the order of Brokers; by default the agent shuffles
	// them (like Salt's master_shuffle) so a fleet spreads over the brokers.
	NoShuffle bool
}

// Options configure an Agent.
type Options struct {
	// Identity is the node identity (required).
	Identity string
	// StateDir holds the configuration, the ssldir and the shutdown marker
	// (required, created 0700).
	StateDir string
	// ConfigFile defaults to StateDir/agent.cfg.
	ConfigFile string
	// Provisioning are the provisioning settings.
	Provisioning ProvisioningSettings
	// Facts are merged over the facts read from Provisioning.FactsFile.
	Facts map[string]string
	// Version is reported in metadata, events and inventory.
	Version string
	// Logger defaults to a discarding logger.
	Logger *logrus.Entry
	// InProcess, when set, is used for connections instead of TCP; TLS is
	// then not used.
	InProcess nats.InProcessConnProvider
	// ExitOnRestart makes Run return ErrRestart instead of restarting in
	// process.
	ExitOnRestart bool
	// MetadataInterval is the mean interval between metadata messages
	// (jittered ±25%), default 30s.
	MetadataInterval time.Duration
	// ArrivalRepeat is how long after a production connection came up its
	// provisioned event is published again, default 1 min; two more
	// repeats follow after 5 and 25 times as long (so at about 1, 6 and 31
	// minutes), each jittered ±25%, with the event's ID unchanged. A
	// provisioner that missed the event (a broker died holding it, the
	// arrivals stream was electing a leader) records the arrival from a
	// repeat. Negative: no repeats.
	ArrivalRepeat time.Duration
	// ProductionFallbackAfter is the number of consecutive refused
	// production connects before falling back to provisioning, default 3.
	ProductionFallbackAfter int
	// ReconnectWait is the first wait after every broker of the list failed
	// once, default 2s; it doubles per round up to ReconnectMaxWait, and
	// each wait is jittered (between half and all of it).
	ReconnectWait time.Duration
	// ReconnectMaxWait caps the wait between rounds, default 30s (and
	// never below ReconnectWait).
	ReconnectMaxWait time.Duration
	// AliveInterval bounds how long a broker that stopped answering stays
	// undetected (the client pings every third of it and gives up after two
	// unanswered pings), like Salt's master_alive_interval; default 10s. The
	// production configuration's plugin.muster.alive_interval overrides it
	// in production mode.
	AliveInterval time.Duration
	// Observer is optional.
	Observer Observer
}

// Agent is one node daemon.
type Agent struct {
	id       string
	stateDir string
	// stateRoot is stateDir with its symbolic links resolved, once per Run
	// (confined).
	stateRoot   string
	sslDir      string
	configFile  string
	prov        ProvisioningSettings
	caPEM       []byte
	caPin       string
	facts       map[string]string
	version     string
	log         *logrus.Entry
	inProcess   nats.InProcessConnProvider
	exitRestart bool
	mdInterval  time.Duration
	arrRepeat   time.Duration
	fallbackN   int
	reconnWait  time.Duration
	reconnMax   time.Duration
	alive       time.Duration
	observer    Observer

	mode       atomic.Int32
	running    atomic.Bool
	tlsRefused atomic.Int64 // TLS verification failures of the provisioning broker, for tests and logs
	trusted    *protocol.KeySet
	refused    refusals

	mu   sync.Mutex
	seen map[string]time.Time // request ID → expiry

	// Owned by the Run goroutine (the session loop handles requests on it).
	// pending is the key gencsr made, held until configure writes it with
	// the certificate; verified remembers the files configure checked, so
	// the restart that follows does not verify them again.
	pending  *pendingKey
	verified *verifiedFiles
}

// New validates opts and returns an Agent. It starts nothing.
func New(opts Options) (*Agent, error) {
	var errs []error
	bad := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalidOptions}, args...)...))
	}
	if err := protocol.ValidateIdentity(opts.Identity); err != nil {
		bad("identity %q: %v", opts.Identity, err)
	}
	var stateDir string
	if opts.StateDir == "" {
		bad("state_dir: required")
	} else if d, err := filepath.Abs(opts.StateDir); err != nil {
		bad("state_dir %q: %v", opts.StateDir, err)
	} else {
		stateDir = d
	}
	cfgFile := opts.ConfigFile
	if cfgFile == "" && stateDir != "" {
		cfgFile = filepath.Join(stateDir, ConfigFileName)
	}
	if cfgFile != "" {
		if f, err := filepath.Abs(cfgFile); err == nil {
			cfgFile = f
		}
	}
	p := opts.Provisioning
	p.TrustedKeys = append([]string(nil), p.TrustedKeys...)
	if p.Token != "" {
		if c, err := token.Inspect(p.Token); err != nil {
			bad("provisioning token: %v", err)
		} else {
			// The token's trust claims fill in what is not set explicitly.
			p.TrustedKeys = append(p.TrustedKeys, c.Muster.ProvisionerKeys...)
			if len(p.Brokers) == 0 {
				p.Brokers = c.Muster.Brokers
			}
			if p.CAPin == "" && p.CAFile == "" && len(p.CAPEM) == 0 {
				p.CAPin = c.Muster.CAPin
			}
		}
	}
	trusted, err := protocol.NewKeySet(p.TrustedKeys)
	if err != nil {
		bad("provisioner keys: %v", err)
	}
	if p.Enabled && trusted.Len() == 0 && !p.InsecureUnsignedRequests {
		bad("provisioner keys: none trusted; set them, carry provisioner_keys in the provisioning token, or opt in to insecure unsigned requests")
	}
	for _, b := range p.Brokers {
		if _, err := brokerURL(b); err != nil {
			bad("provisioning broker %q: %v", b, err)
		}
	}
	if p.Enabled && len(p.Brokers) == 0 && opts.InProcess == nil {
		bad("provisioning brokers: required when provisioning is enabled")
	}
	caPEM := p.CAPEM
	if p.CAFile != "" {
		b, err := os.ReadFile(p.CAFile)
		if err != nil {
			bad("provisioning ca file %q: %v", p.CAFile, err)
		} else {
			caPEM = append(append([]byte{}, caPEM...), b...)
		}
	}
	if len(caPEM) > 0 {
		if _, err := pki.ParseCertificates(caPEM); err != nil {
			bad("provisioning ca: %v", err)
		}
	}
	var pin string
	if p.CAPin != "" {
		var err error
		if pin, err = pki.ParsePin(p.CAPin); err != nil {
			bad("provisioning ca pin: %v", err)
		}
	}
	if p.Enabled && opts.InProcess == nil && len(caPEM) == 0 && p.CAPin == "" && !p.InsecureSkipVerify {
		bad("provisioning broker verification: give the broker's CA (--ca) or a pin of its public key (--ca-pin, or ca_pin in the token), or turn verification off by name (--insecure-skip-tls-verify)")
	}
	if p.FactsFile != "" {
		if _, err := readFacts(p.FactsFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			bad("facts file %q: %v", p.FactsFile, err)
		}
	}
	for k := range opts.Facts {
		if k == "" {
			bad("facts: empty fact name")
		}
	}
	if opts.MetadataInterval < 0 {
		bad("metadata interval %s: must not be negative", opts.MetadataInterval)
	}
	if opts.ProductionFallbackAfter < 0 {
		bad("production fallback after %d: must not be negative", opts.ProductionFallbackAfter)
	}
	if opts.ReconnectWait < 0 {
		bad("reconnect wait %s: must not be negative", opts.ReconnectWait)
	}
	if opts.ReconnectMaxWait < 0 {
		bad("reconnect max wait %s: must not be negative", opts.ReconnectMaxWait)
	}
	if opts.AliveInterval < 0 || (opts.AliveInterval > 0 && opts.AliveInterval < MinAliveInterval) || opts.AliveInterval > MaxAliveInterval {
		bad("alive interval %s: must be between %s and %s (0 is the default %s)", opts.AliveInterval, MinAliveInterval, MaxAliveInterval, DefaultAliveInterval)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}

	a := &Agent{
		id:          opts.Identity,
		stateDir:    stateDir,
		sslDir:      filepath.Join(stateDir, SSLDirName),
		configFile:  cfgFile,
		prov:        p,
		caPEM:       caPEM,
		caPin:       pin,
		facts:       copyMap(opts.Facts),
		version:     opts.Version,
		log:         opts.Logger,
		inProcess:   opts.InProcess,
		exitRestart: opts.ExitOnRestart,
		mdInterval:  opts.MetadataInterval,
		arrRepeat:   opts.ArrivalRepeat,
		fallbackN:   opts.ProductionFallbackAfter,
		reconnWait:  opts.ReconnectWait,
		reconnMax:   opts.ReconnectMaxWait,
		alive:       opts.AliveInterval,
		observer:    opts.Observer,
		trusted:     trusted,
		seen:        map[string]time.Time{},
	}
	if a.log == nil {
		a.log = logrus.NewEntry(logging.Discard())
	}
	a.log = a.log.WithFields(logrus.Fields{"component": "agent", "identity": a.id})
	if a.mdInterval == 0 {
		a.mdInterval = DefaultMetadataInterval
	}
	if a.arrRepeat == 0 {
		a.arrRepeat = DefaultArrivalRepeat
	}
	if a.fallbackN == 0 {
		a.fallbackN = DefaultProductionFallbackAfter
	}
	if a.reconnWait == 0 {
		a.reconnWait = DefaultReconnectWait
	}
	if a.reconnMax == 0 {
		a.reconnMax = DefaultReconnectMaxWait
	}
	a.reconnMax = max(a.reconnMax, a.reconnWait)
	if a.alive == 0 {
		a.alive = DefaultAliveInterval
	}
	if a.version == "" {
		a.version = "development"
	}
	return a, nil
}

// Identity returns the agent's identity.
func (a *Agent) Identity() string { return a.id }

// SSLDir returns the absolute ssldir.
func (a *Agent) SSLDir() string { return a.sslDir }

// ConfigFile returns the absolute configuration file path.
func (a *Agent) ConfigFile() string { return a.configFile }

// Mode returns the mode the agent is in (or last ran in).
func (a *Agent) Mode() Mode { return Mode(a.mode.Load()) }

// outcome is how a mode session ended.
type outcome int

const (
	outDone     outcome = iota // context ended
	outRestart                 // restart requested
	outShutdown                // shutdown requested
	outFallback                // production failed; run provisioning
)

// Run decides the mode, runs it and repeats after in-process restarts,
// until ctx ends (nil), a shutdown (ErrShutdown), the marker file
// (ErrStayDown), a restart with ExitOnRestart (ErrRestart) or an error.
// An Agent runs once at a time.
func (a *Agent) Run(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("agent already running")
	}
	defer a.running.Store(false)
	if err := os.MkdirAll(a.stateDir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	root, err := filepath.EvalSymlinks(a.stateDir)
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	a.stateRoot = root
	if !a.confined(a.sslDir) {
		return fmt.Errorf("ssl directory %s is a symbolic link out of the state directory", a.sslDir)
	}
	if err := os.MkdirAll(a.sslDir, 0o700); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	a.loadSeen(time.Now())
	if err := os.Chmod(a.stateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	a.removeTemps()
	forceProvisioning := false
	for {
		if ctx.Err() != nil {
			return nil
		}
		if _, err := os.Stat(filepath.Join(a.stateDir, ShutdownMarker)); err == nil {
			return fmt.Errorf("%w: remove %s to start it again", ErrStayDown, filepath.Join(a.stateDir, ShutdownMarker))
		}
		d := decideMode(a.id, a.configFile, a.prov.Enabled, time.Now(), a.verified)
		if forceProvisioning && d.Mode != ModeProvisioning {
			d = Decision{Mode: ModeProvisioning, Reason: "production brokers refused this node or its certificate expired", Config: d.Config}
		}
		if d.Err != nil {
			return d.Err
		}
		a.mode.Store(int32(d.Mode))
		a.warnInsecure(d.Mode)
		a.log.WithField("mode", d.Mode.String()).Infof("starting in %s mode: %s", d.Mode, d.Reason)
		var out outcome
		var err error
		if d.Mode == ModeProduction {
			out, err = a.runProduction(ctx, d)
		} else {
			out, err = a.runProvisioning(ctx, d)
		}
		if err != nil {
			return err
		}
		switch out {
		case outDone:
			return nil
		case outShutdown:
			return ErrShutdown
		case outFallback:
			forceProvisioning = true
		case outRestart:
			forceProvisioning = false
			if a.exitRestart {
				a.saveSeen(time.Now())
				return ErrRestart
			}
			a.log.Info("restarting in process")
		}
	}
}

// warnInsecure warns about every insecure option that applies to mode, at
// every start of that mode (in-process restarts and fallbacks included).
func (a *Agent) warnInsecure(m Mode) {
	if a.prov.InsecureUnsignedRequests {
		a.log.Warn("INSECURE: insecure_unsigned_requests is on; this node obeys requests from anyone who can reach its broker")
	}
	if m == ModeProvisioning && a.prov.InsecureSkipVerify && a.inProcess == nil {
		a.log.Warn("INSECURE: provisioning broker certificates are NOT verified (--insecure-skip-tls-verify); anyone on the path can provision this node")
	}
}

// brokerURL normalises a broker address: a bare host:port becomes
// tls://host:port.
func brokerURL(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", errors.New("empty broker address")
	}
	if strings.ContainsAny(s, " \t\n,") {
		return "", errors.New("broker address contains white space or a comma")
	}
	if !strings.Contains(s, "://") {
		s = "tls://" + s
	}
	return s, nil
}

func copyMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// removeTemps deletes the temporary files an earlier run of the agent left
// when it was killed in the middle of an atomic write (configure,
// reprovision, shutdown): the files being replaced are intact, the
// temporaries are garbage, some holding key material. Every write happens on
// the Run goroutine, so none is in progress here. The state directory, the
// ssldir and the policies directory are the agent's own; in a configuration
// file's directory elsewhere only that file's temporaries are touched.
func (a *Agent) removeTemps() {
	dirs := []struct{ dir, target string }{
		{a.stateDir, ""},
		{a.sslDir, ""},
		{filepath.Join(a.stateDir, PoliciesDir), ""},
	}
	if d := filepath.Dir(a.configFile); d != a.stateDir {
		dirs = append(dirs, struct{ dir, target string }{d, filepath.Base(a.configFile)})
	}
	for _, d := range dirs {
		removed, err := fsutil.RemoveTemps(d.dir, d.target)
		if len(removed) > 0 {
			a.log.WithFields(logrus.Fields{"dir": d.dir, "files": removed}).Warn("removed temporary files left by an interrupted write")
		}
		if err != nil {
			a.log.WithError(err).Warn("could not remove temporary files")
		}
	}
}
