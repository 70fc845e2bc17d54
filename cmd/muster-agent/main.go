// Command muster-agent is the Muster node daemon: it waits on the
// provisioning brokers until a provisioner configures it, then runs in
// production mode with the certificate it generated itself.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/internal/logging"
)

// Compiled-in defaults, set with -ldflags "-X main.name=value". These build
// variables are never written at run time.
var (
	provisionBrokers = ""      // comma-separated provisioning broker URLs
	provisionToken   = ""      // provisioning token (JWT from muster token create)
	provisionerKeys  = ""      // comma-separated trusted provisioner public nkeys
	provisionCA      = ""      // path of the provisioning CA
	provisionCAPin   = ""      // sha256:<hex> pin of the provisioning CA
	factsFile        = ""      // facts file path
	provisionDefault = "false" // "true" enables provisioning without a config file
	provisionShuffle = "true"  // "false" keeps the provisioning broker order
	aliveInterval    = "10s"   // dead broker detection interval
	reconnectWait    = "2s"    // first wait between rounds of connection attempts
	reconnectMaxWait = "30s"   // cap of that wait
	version          = "dev"
)

// Exit codes.
const (
	exitOK       = 0
	exitError    = 1
	exitStayDown = 3
)

type runFlags struct {
	identity, stateDir, config string
	brokers                    []string
	token, ca, caPin, facts    string
	tokenFile                  string
	provisionerKeys            []string
	provision, insecure        bool
	insecureUnsigned           bool
	metricsListen              string
	shuffle                    bool
	alive, wait, maxWait       time.Duration
	logLevel, logFile          string
}

// compiled are the parsed compiled-in failover defaults.
type compiled struct {
	shuffle              bool
	alive, wait, maxWait time.Duration
}

// parseCompiled parses the compiled-in failover defaults; a bad -X value is
// reported instead of being silently replaced.
func parseCompiled() (compiled, error) {
	var c compiled
	var errs []error
	var err error
	if c.shuffle, err = strconv.ParseBool(provisionShuffle); err != nil {
		errs = append(errs, fmt.Errorf("compiled-in main.provisionShuffle %q: not a boolean", provisionShuffle))
	}
	for _, d := range []struct {
		name, value string
		dst         *time.Duration
	}{
		{"aliveInterval", aliveInterval, &c.alive},
		{"reconnectWait", reconnectWait, &c.wait},
		{"reconnectMaxWait", reconnectMaxWait, &c.maxWait},
	} {
		if *d.dst, err = time.ParseDuration(d.value); err != nil || *d.dst < 0 {
			errs = append(errs, fmt.Errorf("compiled-in main.%s %q: not a duration", d.name, d.value))
		}
	}
	return c, errors.Join(errs...)
}

func defaultIdentity() string {
	h, err := os.Hostname()
	if err != nil {
		return ""
	}
	return h
}

func splitComma(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the command line and returns the exit code.
func run(args []string, stdout, stderr io.Writer) int {
	code := exitOK
	provDefault, _ := strconv.ParseBool(provisionDefault)
	comp, compErr := parseCompiled()
	if compErr != nil {
		fmt.Fprintln(stderr, "muster-agent: bad build:", compErr)
		return exitError
	}
	f := &runFlags{}
	root := &cobra.Command{
		Use:           "muster-agent",
		Short:         "Muster node agent",
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
		Args:          cobra.NoArgs,
	}
	runCmd := &cobra.Command{
		Use:   "run",
		Short: "Run the agent (the default)",
		Args:  cobra.NoArgs,
	}
	runE := func(cmd *cobra.Command, _ []string) error {
		if !cmd.Flags().Changed("token") {
			// The compiled-in token is not the flag's default, so usage
			// output never shows it.
			f.token = provisionToken
			if t, ok := os.LookupEnv("MUSTER_TOKEN"); ok {
				f.token = t
			}
		}
		if f.tokenFile != "" {
			b, err := os.ReadFile(f.tokenFile)
			if err != nil {
				return fmt.Errorf("--token-file: %w", err)
			}
			f.token = strings.TrimSpace(string(b))
		}
		code = runAgent(cmd.Context(), f, stderr)
		return nil
	}
	root.RunE = runE
	runCmd.RunE = runE
	pf := root.PersistentFlags()
	pf.StringVar(&f.identity, "identity", defaultIdentity(), "node identity")
	pf.StringVar(&f.stateDir, "state-dir", "/var/lib/muster-agent", "state directory (configuration, ssl, marker)")
	pf.StringVar(&f.config, "config", "", "configuration file (default <state-dir>/agent.cfg)")
	pf.StringArrayVar(&f.brokers, "provisioning-broker", splitComma(provisionBrokers), "provisioning broker URL (repeatable)")
	pf.StringVar(&f.token, "token", "", "provisioning token (default: MUSTER_TOKEN, else the compiled-in token; or --token-file)")
	pf.StringVar(&f.tokenFile, "token-file", "", "file holding the provisioning token")
	pf.StringArrayVar(&f.provisionerKeys, "provisioner-key", splitComma(provisionerKeys), "trusted provisioner public nkey (repeatable; several for key rotation)")
	pf.BoolVar(&f.insecureUnsigned, "insecure-unsigned-requests", false, "INSECURE: obey requests without a trusted provisioner signature")
	pf.StringVar(&f.ca, "ca", provisionCA, "CA file of the provisioning broker")
	pf.StringVar(&f.caPin, "ca-pin", provisionCAPin, "sha256:<hex> pin of the provisioning CA")
	pf.StringVar(&f.facts, "facts", factsFile, "facts file (JSON object or YAML map)")
	pf.BoolVar(&f.provision, "provision", provDefault, "provision when there is no configuration file")
	pf.BoolVar(&f.insecure, "insecure-skip-tls-verify", false, "INSECURE: do not verify the provisioning broker's certificate")
	pf.StringVar(&f.metricsListen, "metrics-listen", "", "serve Prometheus /metrics on host:port (off by default)")
	pf.BoolVar(&f.shuffle, "shuffle-provisioning-brokers", comp.shuffle, "try the provisioning brokers in random order (false keeps the given order)")
	pf.DurationVar(&f.alive, "alive-interval", comp.alive, "give up a broker that has not answered for this long and fail over to the next")
	pf.DurationVar(&f.wait, "reconnect-wait", comp.wait, "first wait after every broker failed once; doubles per round, jittered")
	pf.DurationVar(&f.maxWait, "reconnect-max-wait", comp.maxWait, "cap of the wait between rounds of connection attempts")
	pf.StringVar(&f.logLevel, "loglevel", "info", "log level: debug, info, warn, error")
	pf.StringVar(&f.logFile, "logfile", "", "log file (default stderr)")

	var asJSON bool
	bi := &cobra.Command{
		Use:   "buildinfo",
		Short: "Print the compiled-in settings",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return printBuildInfo(stdout, asJSON)
		},
	}
	bi.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	root.AddCommand(runCmd, bi)
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(stderr, "muster-agent:", err)
		return exitError
	}
	return code
}

// buildInfo is what buildinfo prints. The token is never shown.
type buildInfo struct {
	Version            string   `json:"version"`
	ProvisionBrokers   []string `json:"provisioning_brokers"`
	ProvisionToken     string   `json:"provisioning_token"`
	ProvisionerKeys    []string `json:"provisioner_keys"`
	ProvisionCA        string   `json:"provisioning_ca"`
	ProvisionCAPin     string   `json:"provisioning_ca_pin"`
	FactsFile          string   `json:"facts_file"`
	ProvisionByDefault bool     `json:"provisioning_by_default"`
	ProvisionShuffle   bool     `json:"provisioning_shuffle"`
	AliveInterval      string   `json:"alive_interval"`
	ReconnectWait      string   `json:"reconnect_wait"`
	ReconnectMaxWait   string   `json:"reconnect_max_wait"`
}

func printBuildInfo(w io.Writer, asJSON bool) error {
	provDefault, _ := strconv.ParseBool(provisionDefault)
	comp, err := parseCompiled()
	if err != nil {
		return err
	}
	tok := "not set"
	if provisionToken != "" {
		tok = "set"
	}
	bi := buildInfo{
		Version:            version,
		ProvisionBrokers:   splitComma(provisionBrokers),
		ProvisionToken:     tok,
		ProvisionerKeys:    splitComma(provisionerKeys),
		ProvisionCA:        provisionCA,
		ProvisionCAPin:     provisionCAPin,
		FactsFile:          factsFile,
		ProvisionByDefault: provDefault,
		ProvisionShuffle:   comp.shuffle,
		AliveInterval:      comp.alive.String(),
		ReconnectWait:      comp.wait.String(),
		ReconnectMaxWait:   comp.maxWait.String(),
	}
	if bi.ProvisionBrokers == nil {
		bi.ProvisionBrokers = []string{}
	}
	if bi.ProvisionerKeys == nil {
		bi.ProvisionerKeys = []string{}
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(bi)
	}
	orNot := func(s string) string {
		if s == "" {
			return "not set"
		}
		return s
	}
	fmt.Fprintf(w, "Muster agent build settings:\n\n")
	fmt.Fprintf(w, "               Version: %s\n", bi.Version)
	fmt.Fprintf(w, "  Provisioning brokers: %s\n", orNot(strings.Join(bi.ProvisionBrokers, ", ")))
	fmt.Fprintf(w, "    Provisioning token: %s\n", bi.ProvisionToken)
	fmt.Fprintf(w, "      Provisioner keys: %s\n", orNot(strings.Join(bi.ProvisionerKeys, ", ")))
	fmt.Fprintf(w, "       Provisioning CA: %s\n", orNot(bi.ProvisionCA))
	fmt.Fprintf(w, "   Provisioning CA pin: %s\n", orNot(bi.ProvisionCAPin))
	fmt.Fprintf(w, "            Facts file: %s\n", orNot(bi.FactsFile))
	fmt.Fprintf(w, "  Provisioning default: %t\n", bi.ProvisionByDefault)
	fmt.Fprintf(w, "  Shuffle prov brokers: %t\n", bi.ProvisionShuffle)
	fmt.Fprintf(w, "        Alive interval: %s\n", bi.AliveInterval)
	fmt.Fprintf(w, "        Reconnect wait: %s (max %s)\n", bi.ReconnectWait, bi.ReconnectMaxWait)
	return nil
}

func runAgent(ctx context.Context, f *runFlags, stderr io.Writer) int {
	if err := logging.ValidLevel(f.logLevel); err != nil {
		fmt.Fprintf(stderr, "muster-agent: --loglevel %q: %v\n", f.logLevel, err)
		return exitError
	}
	logger, closer, err := logging.New(f.logLevel, f.logFile)
	if err != nil {
		fmt.Fprintln(stderr, "muster-agent:", err)
		return exitError
	}
	defer closer.Close()
	log := logger.WithFields(logrus.Fields{"component": "agent", "identity": f.identity})

	a, err := agent.New(agent.Options{
		Identity:   f.identity,
		StateDir:   f.stateDir,
		ConfigFile: f.config,
		Provisioning: agent.ProvisioningSettings{
			Brokers:                  f.brokers,
			Token:                    f.token,
			TrustedKeys:              f.provisionerKeys,
			InsecureUnsignedRequests: f.insecureUnsigned,
			CAFile:                   f.ca,
			CAPin:                    f.caPin,
			InsecureSkipVerify:       f.insecure,
			FactsFile:                f.facts,
			Enabled:                  f.provision,
			NoShuffle:                !f.shuffle,
		},
		AliveInterval:    f.alive,
		ReconnectWait:    f.wait,
		ReconnectMaxWait: f.maxWait,
		Version:          version,
		Logger:           log,
		ExitOnRestart:    true,
	})
	if err != nil {
		log.WithError(err).Error("invalid settings")
		return exitError
	}
	if f.metricsListen != "" {
		_, stop, err := serveMetrics(f.metricsListen, a)
		if err != nil {
			log.WithError(err).Error("metrics listener")
			return exitError
		}
		defer stop()
	}
	err = a.Run(ctx)
	switch {
	case err == nil:
		log.Info("stopped")
		return exitOK
	case errors.Is(err, agent.ErrRestart):
		exe, xerr := os.Executable()
		if xerr != nil {
			log.WithError(xerr).Error("restart: cannot find own executable")
			return exitError
		}
		log.Info("restarting: re-executing")
		closer.Close()
		xerr = syscall.Exec(exe, os.Args, os.Environ())
		fmt.Fprintln(stderr, "muster-agent: restart: exec:", xerr)
		return exitError
	case errors.Is(err, agent.ErrShutdown), errors.Is(err, agent.ErrStayDown):
		log.WithError(err).Warn("staying down")
		return exitStayDown
	default:
		log.WithError(err).Error("agent failed")
		return exitError
	}
}

// serveMetrics serves the agent's Prometheus metrics on addr until stop is
// called; bound is the address it listens on.
func serveMetrics(addr string, a *agent.Agent) (bound net.Addr, stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", agent.MetricsContentType)
		_ = agent.WriteMetrics(w, a)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return ln.Addr(), func() { _ = srv.Close() }, nil
}
