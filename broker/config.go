package broker

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
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
	// DefaultTLSTimeout is how long a client's TLS handshake may take, in
	// seconds: as long as an agent's first connection attempt at its
	// default alive interval, so a broker busy with a site's handshakes
	// does not give up on ones its clients still wait for.
	DefaultTLSTimeout = 30
	// MinTLSTimeout and MaxTLSTimeout bound tls_timeout, in seconds.
	MinTLSTimeout, MaxTLSTimeout float64 = 0.5, 120
	// MaxMaxPayload is the largest max_payload accepted (the nats-server
	// default for max_pending, which must not be smaller).
	MaxMaxPayload = 64 * 1024 * 1024
	// MaxReplicas is the largest JetStream replica count (a NATS limit).
	MaxReplicas = 5
	// MaxRoutes bounds cluster.routes.
	MaxRoutes = 64
	// maxNameLength bounds cluster.name and cluster.server_name.
	maxNameLength = 64
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
	// TLSTimeout is how long a client's TLS handshake may take, in
	// seconds (nats-server's tls timeout).
	TLSTimeout float64 `yaml:"tls_timeout"`
	// Cluster joins this broker to a NATS cluster; off unless
	// cluster.listen is set.
	Cluster ClusterConfig `yaml:"cluster"`
	// JetStream tunes the streams and buckets Muster creates.
	JetStream JetStreamConfig `yaml:"jetstream"`
}

// ClusterConfig makes the broker one server of a NATS cluster: routes to the
// other brokers, mutual TLS between them and JetStream replicated by Raft.
type ClusterConfig struct {
	// Name is the cluster's name, the same on every broker (required with
	// listen).
	Name string `yaml:"name"`
	// ServerName names this broker in the cluster and in JetStream's Raft
	// groups; unique per broker and stable across restarts (required with
	// listen).
	ServerName string `yaml:"server_name"`
	// Listen is the route listener, host:port; "" leaves clustering off.
	Listen string `yaml:"listen"`
	// Advertise is the host:port other brokers are told to route to; ""
	// advertises the listen address.
	Advertise string `yaml:"advertise"`
	// Routes are the other brokers' route URLs
	// (nats-route://host:port); listing this broker too is harmless.
	Routes []string `yaml:"routes"`
	// TLS is the route certificate, its key and the CA peer route
	// certificates must chain to. Empty: the development cluster PKI in
	// <store_dir>/pki/cluster is used.
	TLS TLSFiles `yaml:"tls"`
	// PeerNames, when set, are the only route certificate names (CN or DNS
	// SAN) accepted from peers. Required when the cluster CA is also the
	// client CA, or any production node could join as a route.
	PeerNames []string `yaml:"peer_names"`
	// NoAdvertise stops telling clients about the other brokers' client
	// URLs (they then only use the brokers they were given).
	NoAdvertise bool `yaml:"no_advertise"`
	// InsecurePlaintextRoutes turns route TLS and authentication off: anyone
	// reaching the route port joins the cluster. Logged as a warning at
	// every start.
	InsecurePlaintextRoutes bool `yaml:"insecure_plaintext_routes"`
}

// Enabled reports whether clustering is configured.
func (c ClusterConfig) Enabled() bool { return c.Listen != "" }

// JetStreamConfig tunes JetStream.
type JetStreamConfig struct {
	// Replicas is the replica count of the streams and KV buckets Muster
	// creates; 0 means min(3, cluster size).
	Replicas int `yaml:"replicas"`
}

// DefaultConfig returns the configuration with every default applied.
func DefaultConfig() Config {
	return Config{
		Listen:     DefaultListen,
		StoreDir:   DefaultStoreDir,
		LogLevel:   DefaultLogLevel,
		MaxPayload: DefaultMaxPayload,
		TLSTimeout: DefaultTLSTimeout,
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
	if !(c.TLSTimeout >= MinTLSTimeout && c.TLSTimeout <= MaxTLSTimeout) {
		bad("tls_timeout", c.TLSTimeout, "must be between %g and %g seconds", MinTLSTimeout, MaxTLSTimeout)
	}
	c.validateCluster(bad)
	return errors.Join(errs...)
}

// validateCluster checks the cluster and jetstream sections.
func (c *Config) validateCluster(bad func(key string, value any, format string, args ...any)) {
	cl := c.Cluster
	if c.JetStream.Replicas < 0 || c.JetStream.Replicas > MaxReplicas {
		bad("jetstream.replicas", c.JetStream.Replicas, "must be between 0 (automatic) and %d", MaxReplicas)
	} else if c.JetStream.Replicas > c.ClusterSize() {
		bad("jetstream.replicas", c.JetStream.Replicas, "more than the %d broker(s) of the cluster (cluster.routes + this one)", c.ClusterSize())
	}
	if !cl.Enabled() {
		if cl.Name != "" || cl.ServerName != "" || cl.Advertise != "" || len(cl.Routes) > 0 || !cl.TLS.empty() || len(cl.PeerNames) > 0 || cl.NoAdvertise || cl.InsecurePlaintextRoutes {
			bad("cluster.listen", cl.Listen, "required when any other cluster key is set")
		}
		return
	}
	if err := checkHostPort(cl.Listen); err != nil {
		bad("cluster.listen", cl.Listen, "%v", err)
	}
	if cl.Advertise != "" {
		if err := checkHostPort(cl.Advertise); err != nil {
			bad("cluster.advertise", cl.Advertise, "%v", err)
		}
	}
	if err := checkName(cl.Name); err != nil {
		bad("cluster.name", cl.Name, "%v", err)
	}
	if err := checkName(cl.ServerName); err != nil {
		bad("cluster.server_name", cl.ServerName, "%v", err)
	}
	if len(cl.Routes) == 0 {
		bad("cluster.routes", "", "at least one route is required (JetStream in a cluster needs routes; list every broker, this one included)")
	} else if len(cl.Routes) > MaxRoutes {
		bad("cluster.routes", len(cl.Routes), "at most %d routes", MaxRoutes)
	} else {
		for i, r := range cl.Routes {
			if _, err := parseRoute(r); err != nil {
				bad(fmt.Sprintf("cluster.routes[%d]", i), redactURL(r), "%v", err)
			}
		}
	}
	if cl.InsecurePlaintextRoutes && !cl.TLS.empty() {
		bad("cluster.insecure_plaintext_routes", true, "contradicts cluster.tls: set one or the other")
	}
	if !cl.TLS.empty() {
		for _, f := range []struct{ key, path string }{
			{"cluster.tls.cert", cl.TLS.Cert}, {"cluster.tls.key", cl.TLS.Key}, {"cluster.tls.ca", cl.TLS.CA},
		} {
			if f.path == "" {
				bad(f.key, f.path, "cluster.tls.cert, cluster.tls.key and cluster.tls.ca must be set together")
				continue
			}
			if _, err := os.Stat(f.path); err != nil {
				bad(f.key, f.path, "%v", errors.Unwrap(err))
			}
		}
	}
	for i, n := range cl.PeerNames {
		if err := protocol.ValidateIdentity(n); err != nil {
			bad(fmt.Sprintf("cluster.peer_names[%d]", i), n, "%v", err)
		}
	}
}

// ClusterSize is the number of brokers the configuration names: this one
// plus every distinct route that is not this broker's own route address
// (recognised by the listen and advertise host:port, loopback names for a
// loopback or wildcard listen host, and the host name for a wildcard one).
func (c *Config) ClusterSize() int {
	if !c.Cluster.Enabled() {
		return 1
	}
	self := map[string]bool{}
	for _, hp := range []string{c.Cluster.Listen, c.Cluster.Advertise} {
		host, port, err := net.SplitHostPort(hp)
		if err != nil {
			continue
		}
		self[net.JoinHostPort(host, port)] = true
		if ip := net.ParseIP(host); host == "" || host == "localhost" || (ip != nil && (ip.IsLoopback() || ip.IsUnspecified())) {
			for _, h := range []string{"localhost", "127.0.0.1", "::1"} {
				self[net.JoinHostPort(h, port)] = true
			}
		}
		if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
			if hn, err := os.Hostname(); err == nil && hn != "" {
				self[net.JoinHostPort(hn, port)] = true
			}
		}
	}
	seen := map[string]bool{}
	for _, r := range c.Cluster.Routes {
		u, err := parseRoute(r)
		if err != nil || self[u.Host] || seen[u.Host] {
			continue
		}
		seen[u.Host] = true
	}
	return 1 + len(seen)
}

// Replicas is the effective jetstream.replicas: the configured value, or
// min(3, ClusterSize()).
func (c *Config) Replicas() int {
	if c.JetStream.Replicas > 0 {
		return c.JetStream.Replicas
	}
	return min(3, c.ClusterSize())
}

// parseRoute parses a route URL: scheme nats-route, nats or tls (all mean
// the same: route TLS is decided by cluster.tls), host and numeric port,
// nothing else (no credentials, path or query).
func parseRoute(s string) (*url.URL, error) {
	if len(s) > 512 {
		return nil, errors.New("longer than 512 bytes")
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, errors.New("not a URL")
	}
	switch u.Scheme {
	case "nats-route", "nats", "tls":
	default:
		return nil, errors.New("scheme must be nats-route://")
	}
	if u.User != nil {
		return nil, errors.New("credentials in route URLs are not supported")
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return nil, errors.New("must be nats-route://host:port only")
	}
	if u.Hostname() == "" {
		return nil, errors.New("no host")
	}
	if err := checkHostPort(u.Host); err != nil || u.Port() == "0" {
		return nil, errors.New("port must be a number 1-65535")
	}
	return &url.URL{Scheme: "nats-route", Host: u.Host}, nil
}

// redactURL hides the password of a URL that has one, for error messages.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	return u.Redacted()
}

// checkName checks a cluster or server name: 1-64 letters, digits, '-',
// '_' or '.'.
func checkName(n string) error {
	if n == "" {
		return errors.New("required when cluster.listen is set")
	}
	if len(n) > maxNameLength {
		return fmt.Errorf("longer than %d bytes", maxNameLength)
	}
	for _, r := range n {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return errors.New("only letters, digits, '-', '_' and '.' are allowed")
		}
	}
	return nil
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
