package broker

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"

	"github.com/nats-io/nkeys"
	"gopkg.in/yaml.v3"

	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/internal/protocol"
)

// Defaults applied by DefaultConfig.
const (
	DefaultListen     = "127.0.0.1:4222"
	DefaultStoreDir   = "./muster-broker-data"
	DefaultLogLevel   = "info"
	DefaultMaxPayload = 1024 * 1024
	// MaxMaxPayload is the largest max_payload accepted (the nats-server
	// default for max_pending, which must not be smaller).
	MaxMaxPayload = 64 * 1024 * 1024
)

// ErrInvalidConfig is wrapped by every configuration error.
var ErrInvalidConfig = errors.New("invalid broker configuration")

// TLSFiles names the broker's TLS material. Either all three are set or
// none, in which case a development PKI is made in the store directory.
type TLSFiles struct {
	// Cert is the server certificate (PEM, may hold the chain).
	Cert string `yaml:"cert"`
	// Key is the server certificate's private key (PEM).
	Key string `yaml:"key"`
	// CA is the CA (PEM) that client certificates must chain to.
	CA string `yaml:"ca"`
}

// empty reports whether no TLS file is set.
func (t TLSFiles) empty() bool { return t.Cert == "" && t.Key == "" && t.CA == "" }

// Config is the broker's configuration, read from YAML. Unknown keys are an
// error.
type Config struct {
	// Listen is the client listener, host:port; port 0 picks a free port.
	Listen string `yaml:"listen"`
	// StoreDir holds JetStream data and the development PKI.
	StoreDir string `yaml:"store_dir"`
	// MonitorListen is the nats-server HTTP monitoring host:port; "" is off.
	MonitorListen string `yaml:"monitor_listen"`
	// MetricsListen is where `muster broker` serves /metrics and /healthz;
	// "" is off.
	MetricsListen string `yaml:"metrics_listen"`
	// TLS is the server certificate, key and client CA.
	TLS TLSFiles `yaml:"tls"`
	// Provisioners are the nkey public keys (U...) allowed to connect as a
	// provisioner.
	Provisioners []string `yaml:"provisioners"`
	// Admins are the certificate CNs given admin rights on the PRODUCTION
	// account.
	Admins []string `yaml:"admins"`
	// TokenIssuers are the public nkeys ("A…") of provisioning token
	// issuers. An unprovisioned node is admitted only with a valid token
	// from one of them whose scope covers the identity it connects as.
	// With the development PKI the development issuer is added.
	TokenIssuers []string `yaml:"token_issuers"`
	// InsecureOpenProvisioning admits unprovisioned nodes without a token.
	// For labs only; warned about at every start.
	InsecureOpenProvisioning bool `yaml:"insecure_open_provisioning"`
	// LogLevel is debug, info, warn or error (trace also shows protocol
	// traces of nats-server).
	LogLevel string `yaml:"loglevel"`
	// LogFile is where logs go; "" is stderr.
	LogFile string `yaml:"logfile"`
	// MaxPayload is the largest message a client may publish, in bytes.
	MaxPayload int `yaml:"max_payload"`
}

// DefaultConfig returns the configuration with every default applied.
func DefaultConfig() Config {
	return Config{
		Listen:     DefaultListen,
		StoreDir:   DefaultStoreDir,
		LogLevel:   DefaultLogLevel,
		MaxPayload: DefaultMaxPayload,
	}
}

// LoadConfig reads the YAML file at path over the defaults and validates
// the result. An empty path returns the defaults.
func LoadConfig(path string) (Config, error) {
	cfg := DefaultConfig()
	if path == "" {
		return cfg, cfg.Validate()
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read broker config: %w", err)
	}
	cfg, err = ParseConfig(data)
	if err != nil {
		return cfg, fmt.Errorf("broker config %s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig decodes YAML over the defaults, rejecting unknown keys, and
// validates the result.
func ParseConfig(data []byte) (Config, error) {
	cfg := DefaultConfig()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return cfg, fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	return cfg, cfg.Validate()
}

// Validate reports every problem of the configuration, each naming the key
// and the bad value, joined with errors.Join; each wraps ErrInvalidConfig.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key string, value any, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: %s %q: %s", ErrInvalidConfig, key, fmt.Sprint(value), fmt.Sprintf(format, args...)))
	}
	if err := checkHostPort(c.Listen); err != nil {
		bad("listen", c.Listen, "%v", err)
	}
	if c.StoreDir == "" {
		bad("store_dir", c.StoreDir, "must not be empty")
	}
	if c.MonitorListen != "" {
		if err := checkHostPort(c.MonitorListen); err != nil {
			bad("monitor_listen", c.MonitorListen, "%v", err)
		}
	}
	if c.MetricsListen != "" {
		if err := checkHostPort(c.MetricsListen); err != nil {
			bad("metrics_listen", c.MetricsListen, "%v", err)
		}
	}
	if !c.TLS.empty() {
		for _, f := range []struct{ key, path string }{
			{"tls.cert", c.TLS.Cert}, {"tls.key", c.TLS.Key}, {"tls.ca", c.TLS.CA},
		} {
			if f.path == "" {
				bad(f.key, f.path, "tls.cert, tls.key and tls.ca must be set together")
				continue
			}
			if _, err := os.Stat(f.path); err != nil {
				bad(f.key, f.path, "%v", errors.Unwrap(err))
			}
		}
	}
	for i, p := range c.Provisioners {
		if !nkeys.IsValidPublicUserKey(p) {
			bad(fmt.Sprintf("provisioners[%d]", i), p, "not an nkey user public key (U...)")
		}
	}
	for i, k := range c.TokenIssuers {
		if !nkeys.IsValidPublicAccountKey(k) {
			bad(fmt.Sprintf("token_issuers[%d]", i), k, "not an nkey account public key (A...); muster token init makes one")
		}
	}
	if !c.TLS.empty() && len(c.TokenIssuers) == 0 && !c.InsecureOpenProvisioning {
		bad("token_issuers", "[]", "at least one token issuer is required (muster token init), or set insecure_open_provisioning")
	}
	for i, a := range c.Admins {
		if err := protocol.ValidateIdentity(a); err != nil {
			bad(fmt.Sprintf("admins[%d]", i), a, "%v", err)
		}
	}
	if err := logging.ValidLevel(c.LogLevel); err != nil {
		bad("loglevel", c.LogLevel, "unknown level")
	}
	if c.MaxPayload <= 0 || c.MaxPayload > MaxMaxPayload {
		bad("max_payload", c.MaxPayload, "must be between 1 and %d bytes", MaxMaxPayload)
	}
	return errors.Join(errs...)
}

// checkHostPort checks a host:port with a numeric port 0-65535.
func checkHostPort(hp string) error {
	_, port, err := net.SplitHostPort(hp)
	if err != nil {
		return errors.New("not host:port")
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 {
		return errors.New("port must be a number 0-65535")
	}
	return nil
}

// splitHostPort splits a validated host:port; port 0 becomes -1, the
// nats-server value for "pick a free port".
func splitHostPort(hp string) (string, int) {
	host, port, _ := net.SplitHostPort(hp)
	n, _ := strconv.Atoi(port)
	if n == 0 {
		n = -1
	}
	return host, n
}
