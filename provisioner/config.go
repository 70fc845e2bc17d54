package provisioner

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Duration is a time.Duration written in YAML as a Go duration string
// ("30s", "2m", "1h30m").
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String formats d like time.Duration.
func (d Duration) String() string { return time.Duration(d).String() }

// UnmarshalYAML parses a duration string.
func (d *Duration) UnmarshalYAML(node *yaml.Node) error {
	var s string
	if err := node.Decode(&s); err != nil {
		return fmt.Errorf("line %d: duration: %w", node.Line, err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("line %d: duration %q: %w", node.Line, s, err)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes d as a duration string.
func (d Duration) MarshalYAML() (any, error) { return d.String(), nil }

// Features switches optional parts of the pipeline.
type Features struct {
	// PKI makes the provisioner ask each node for a CSR (gencsr) and hand it
	// to the helper. Default true.
	PKI bool `yaml:"pki"`
}

// Config is the provisioner's configuration file (YAML; unknown keys are
// rejected). DefaultConfig holds every default.
type Config struct {
	// Workers is how many nodes are provisioned at the same time.
	Workers int `yaml:"workers"`
	// Interval is the broadcast discovery period.
	Interval Duration `yaml:"interval"`
	// Helper is the helper command line; empty selects the built-in cfssl
	// helper configured by HelperConfig.
	Helper string `yaml:"helper"`
	// HelperConfig is the built-in helper's YAML file (when Helper is empty).
	HelperConfig string `yaml:"helper_config"`
	// HelperMode is "exec" (the helper runs once per node, the Choria
	// contract) or "persistent" (one long-running helper process answers
	// request lines tagged with request_id).
	HelperMode string `yaml:"helper_mode"`
	// HelperTimeout bounds one helper run.
	HelperTimeout Duration `yaml:"helper_timeout"`
	// HelperConcurrency limits concurrent helper runs separately from the
	// workers' RPCs; 0 means Workers.
	HelperConcurrency int `yaml:"helper_concurrency"`
	// TokenIssuers are the public nkeys ("A…") of the issuers whose
	// provisioning tokens are accepted (`muster token init` makes one).
	// Nodes without a valid token in scope are not provisioned.
	TokenIssuers []string `yaml:"token_issuers"`
	// InsecureTokenless provisions nodes without a provisioning token. For
	// labs only: anyone who reaches the broker gets a certificate. Logged
	// as a warning at every start.
	InsecureTokenless bool `yaml:"insecure_tokenless"`
	// Site is passed to the helper in every request.
	Site string `yaml:"site"`
	// MonitorPort is the HTTP monitor's port: 0 is off, -1 a random port.
	MonitorPort int `yaml:"monitor_port"`
	// MonitorHost is the HTTP monitor's listen address.
	MonitorHost string `yaml:"monitor_host"`
	// Brokers are the provisioning broker URLs.
	Brokers []string `yaml:"brokers"`
	// TLSCA is the CA file for the brokers' certificates.
	TLSCA string `yaml:"tls_ca"`
	// NkeySeedFile holds the provisioner's nkey seed: its credential on
	// the broker and the key that signs every request to nodes. Required.
	NkeySeedFile string `yaml:"nkey_seed_file"`
	// Features switches optional parts of the pipeline.
	Features Features `yaml:"features"`
	// KeyType is the key nodes generate in gencsr: ecdsa-p256 or rsa.
	KeyType string `yaml:"key_type"`
	// QueueSize bounds the queue of discovered nodes; a node announced while
	// the queue is full is shed and comes back when it re-announces.
	QueueSize int `yaml:"queue_size"`
	// RPCTimeout bounds one request to a node.
	RPCTimeout Duration `yaml:"rpc_timeout"`
	// RPCRetries is how often a request without answer is retried.
	RPCRetries int `yaml:"rpc_retries"`
	// DeferBackoff is how long a deferred or failed node waits before it is
	// taken again (a helper's retry_after overrides it for deferrals).
	DeferBackoff Duration `yaml:"defer_backoff"`
	// Grace is how long a configured node is not taken again.
	Grace Duration `yaml:"grace"`
	// RestartSplay is the longest random delay nodes wait before restarting.
	RestartSplay Duration `yaml:"restart_splay"`
	// LogFile is the log file; empty logs to stderr.
	LogFile string `yaml:"logfile"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"loglevel"`
	// Name is the sender name in requests; in ha modes also the owner
	// name of claims, so it must differ between provisioners.
	Name string `yaml:"name"`
	// HA configures several provisioners sharing the work (docs/ha.md).
	HA HAConfig `yaml:"ha"`
	// Policy holds the checks the provisioner applies to every CSR and
	// certificate, whatever the helper does.
	Policy Policy `yaml:"policy"`
	// StateDir is where the identity registry (registry.json) is kept;
	// empty keeps it in memory only, so it is lost at restart.
	StateDir string `yaml:"state_dir"`
}

// Policy is the provisioner-side CSR and certificate policy.
type Policy struct {
	// SANAllow lists the patterns every SAN of a node's CSR must match one
	// of: DNS globs ("*.example.net", "*" stands for one label),
	// "{identity}" (the node's own identity, also inside a pattern), IP
	// addresses and CIDR ranges ("10.0.0.0/8"), URI globs
	// ("spiffe://example.net/node/{identity}") and e-mail globs
	// ("*@example.net"). Default: just "{identity}".
	SANAllow []string `yaml:"san_allow"`
	// KeyTypes are the key types a CSR may carry: ecdsa-p256, ecdsa-p384,
	// ed25519 and rsa. Default: all four.
	KeyTypes []string `yaml:"key_types"`
	// RSAMinBits is the smallest RSA modulus accepted. Default 2048.
	RSAMinBits int `yaml:"rsa_min_bits"`
	// CAFile is a PEM bundle of the CA certificates every certificate the
	// helper returns must chain to (the trust anchor; the helper's own ca
	// field is not trusted for this). Empty: not checked. The built-in
	// cfssl helper sets it to its CA certificate when it is empty.
	CAFile string `yaml:"ca_file"`
}

// Key types a CSR may carry under Policy.KeyTypes.
const (
	PolicyKeyECDSAP256 = "ecdsa-p256"
	PolicyKeyECDSAP384 = "ecdsa-p384"
	PolicyKeyEd25519   = "ed25519"
	PolicyKeyRSA       = "rsa"
)

// IdentityPattern is the placeholder for the node's identity in
// Policy.SANAllow.
const IdentityPattern = "{identity}"

// Policy limits.
const (
	DefaultRSAMinBits = 2048
	maxSANPatterns    = 256
	maxPatternLength  = 512
)

// Defaults.
const (
	DefaultWorkers       = 8
	DefaultInterval      = time.Minute
	DefaultHelperTimeout = 10 * time.Second
	DefaultMonitorHost   = "127.0.0.1"
	DefaultQueueSize     = 10000
	DefaultRPCTimeout    = 10 * time.Second
	DefaultRPCRetries    = 3
	DefaultDeferBackoff  = 30 * time.Second
	DefaultGrace         = 2 * time.Minute
	DefaultRestartSplay  = 2 * time.Second
)

// DefaultConfig returns the configuration with every default applied.
func DefaultConfig() Config {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "localhost"
	}
	return Config{
		Workers:       DefaultWorkers,
		Interval:      Duration(DefaultInterval),
		HelperMode:    "exec",
		HelperTimeout: Duration(DefaultHelperTimeout),
		MonitorHost:   DefaultMonitorHost,
		Features:      Features{PKI: true},
		KeyType:       protocol.KeyECDSAP256,
		QueueSize:     DefaultQueueSize,
		RPCTimeout:    Duration(DefaultRPCTimeout),
		RPCRetries:    DefaultRPCRetries,
		DeferBackoff:  Duration(DefaultDeferBackoff),
		Grace:         Duration(DefaultGrace),
		RestartSplay:  Duration(DefaultRestartSplay),
		LogLevel:      "info",
		Name:          "muster-provisioner@" + host,
		Policy: Policy{
			SANAllow:   []string{IdentityPattern},
			KeyTypes:   []string{PolicyKeyECDSAP256, PolicyKeyECDSAP384, PolicyKeyEd25519, PolicyKeyRSA},
			RSAMinBits: DefaultRSAMinBits,
		},
	}
}

// ErrConfig wraps every configuration error.
var ErrConfig = errors.New("invalid provisioner configuration")

// LoadConfig reads path over DefaultConfig, rejecting unknown keys, and
// validates the result.
func LoadConfig(path string) (Config, error) {
	cfg := DefaultConfig()
	data, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("load provisioner config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return cfg, fmt.Errorf("load provisioner config %s: %w: %w", path, ErrConfig, err)
	}
	if err := cfg.Validate(); err != nil {
		return cfg, fmt.Errorf("load provisioner config %s: %w", path, err)
	}
	return cfg, nil
}

// Validate reports every problem with the configuration, naming the key and
// the bad value. Every error wraps ErrConfig.
func (c *Config) Validate() error { return c.validate(true) }

func (c *Config) validate(needBrokers bool) error {
	var errs []error
	bad := func(key string, val any, why string) {
		errs = append(errs, fmt.Errorf("%w: %s %v: %s", ErrConfig, key, val, why))
	}
	if c.Workers < 1 || c.Workers > 10000 {
		bad("workers", c.Workers, "must be 1..10000")
	}
	if c.Interval.D() < time.Second {
		bad("interval", c.Interval, "must be at least 1s")
	}
	if c.Helper != "" && c.HelperConfig != "" {
		bad("helper_config", c.HelperConfig, "only used by the built-in helper, but helper is set")
	}
	switch c.HelperMode {
	case "", "exec":
	case "persistent":
		if c.Helper == "" {
			bad("helper_mode", c.HelperMode, "needs helper (the command of the persistent helper)")
		}
	default:
		bad("helper_mode", c.HelperMode, `must be "exec" or "persistent"`)
	}
	if c.HelperTimeout.D() <= 0 {
		bad("helper_timeout", c.HelperTimeout, "must be positive")
	}
	if c.HelperConcurrency < 0 {
		bad("helper_concurrency", c.HelperConcurrency, "must be 0 (same as workers) or more")
	}
	if c.MonitorPort < -1 || c.MonitorPort > 65535 {
		bad("monitor_port", c.MonitorPort, "must be -1 (random), 0 (off) or a port")
	}
	if c.MonitorPort != 0 && c.MonitorHost == "" {
		bad("monitor_host", `""`, "must be set when monitor_port is")
	}
	if needBrokers && len(c.Brokers) == 0 {
		bad("brokers", "[]", "at least one broker URL is required")
	}
	for i, b := range c.Brokers {
		u, err := url.Parse(b)
		if err != nil || u.Host == "" {
			bad(fmt.Sprintf("brokers[%d]", i), fmt.Sprintf("%q", b), "not a URL like tls://host:4222")
			continue
		}
		switch u.Scheme {
		case "nats", "tls":
		default:
			bad(fmt.Sprintf("brokers[%d]", i), fmt.Sprintf("%q", b), "scheme must be nats or tls")
		}
		if u.User != nil {
			bad(fmt.Sprintf("brokers[%d]", i), "(redacted)", "must not carry credentials; use nkey_seed_file")
		}
	}
	if c.NkeySeedFile == "" {
		bad("nkey_seed_file", `""`, "required: the provisioner signs every request with it (muster provisioner nkey makes one)")
	}
	if len(c.TokenIssuers) == 0 && !c.InsecureTokenless {
		bad("token_issuers", "[]", "at least one token issuer is required (muster token init), or set insecure_tokenless")
	}
	if len(c.TokenIssuers) > 0 {
		if _, err := token.NewVerifier(c.TokenIssuers); err != nil {
			bad("token_issuers", c.TokenIssuers, err.Error())
		}
	}
	for _, f := range []struct{ key, path string }{{"tls_ca", c.TLSCA}, {"nkey_seed_file", c.NkeySeedFile}} {
		if f.path == "" {
			continue
		}
		if st, err := os.Stat(f.path); err != nil {
			bad(f.key, fmt.Sprintf("%q", f.path), "cannot be read: "+errText(err))
		} else if st.IsDir() {
			bad(f.key, fmt.Sprintf("%q", f.path), "is a directory")
		}
	}
	switch c.KeyType {
	case protocol.KeyECDSAP256, protocol.KeyRSA:
	default:
		bad("key_type", fmt.Sprintf("%q", c.KeyType), "must be ecdsa-p256 or rsa")
	}
	if c.QueueSize < 1 || c.QueueSize > 10_000_000 {
		bad("queue_size", c.QueueSize, "must be 1..10000000")
	}
	if c.RPCTimeout.D() < 100*time.Millisecond || c.RPCTimeout.D() > protocol.MaxTTL {
		bad("rpc_timeout", c.RPCTimeout, "must be 100ms..10m")
	}
	if c.RPCRetries < 0 || c.RPCRetries > 20 {
		bad("rpc_retries", c.RPCRetries, "must be 0..20")
	}
	if c.DeferBackoff.D() <= 0 {
		bad("defer_backoff", c.DeferBackoff, "must be positive")
	}
	if c.Grace.D() < 0 {
		bad("grace", c.Grace, "must not be negative")
	}
	if c.RestartSplay.D() < 0 || c.RestartSplay.D() > time.Hour {
		bad("restart_splay", c.RestartSplay, "must be 0..1h")
	}
	if err := logging.ValidLevel(c.LogLevel); err != nil {
		bad("loglevel", fmt.Sprintf("%q", c.LogLevel), "must be debug, info, warn or error")
	}
	c.HA.validate(bad)
	if c.Name == "" || len(c.Name) > 128 {
		bad("name", fmt.Sprintf("%q", c.Name), "must be 1..128 bytes")
	}
	errs = append(errs, c.Policy.validate(c.KeyType)...)
	if c.StateDir != "" {
		if st, err := os.Stat(c.StateDir); err == nil && !st.IsDir() {
			bad("state_dir", fmt.Sprintf("%q", c.StateDir), "is not a directory")
		} else if err != nil && !errors.Is(err, os.ErrNotExist) {
			bad("state_dir", fmt.Sprintf("%q", c.StateDir), "cannot be read: "+errText(err))
		}
	}
	return errors.Join(errs...)
}

func errText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// helperConcurrency is the effective helper concurrency.
func (c *Config) helperConcurrency() int {
	if c.HelperConcurrency > 0 {
		return c.HelperConcurrency
	}
	return c.Workers
}
