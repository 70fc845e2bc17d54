package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/cfsslhelper"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/provisioner"
)

func newProvisionerCmd() *cobra.Command {
	var (
		configFile  string
		checkConfig bool
	)
	runE := func(cmd *cobra.Command, _ []string) error {
		return runProvisioner(cmd, configFile, checkConfig)
	}
	cmd := &cobra.Command{
		Use:   "provisioner",
		Short: "Run the provisioner (discovery, queue, workers, helper, metrics)",
		Long: `Runs Muster's provisioner: it discovers waiting nodes on the provisioning broker (metadata,
startup events and a periodic broadcast discovery), queues each node once, and provisions it in a
worker pool: inventory, gencsr, helper, reply validation, then configure and restart (or defer, or
shutdown). An HTTP monitor (monitor_port) serves /metrics, /healthz, /status, /nodes and POST
/pause, /resume; the pause, resume, status and nodes subcommands call it, and "muster nodes"
approves or denies held nodes through it.

Whatever the helper does, the provisioner checks every CSR and certificate against its policy
(policy: san_allow, key_types, rsa_min_bits, ca_file; with the built-in helper ca_file defaults to
its CA), and holds an identity that comes back with a different key than the one recorded in
state_dir.

With "helper" set the command line is run per node (the Choria helper contract); without it the
built-in cfssl helper is configured from "helper_config". See docs/provisioner.md.`,
		Example: `  muster provisioner --config /etc/muster/provisioner.yaml
  muster provisioner --config provisioner.yaml --check-config
  muster provisioner status --url http://127.0.0.1:8081`,
		Args: cobra.NoArgs,
		RunE: runE,
	}
	cmd.Flags().StringVar(&configFile, "config", "", "provisioner configuration file (YAML)")
	cmd.Flags().BoolVar(&checkConfig, "check-config", false, "validate the configuration and the helper, then exit")

	run := &cobra.Command{
		Use:   "run",
		Short: "Run the provisioner (same as \"muster provisioner\")",
		Args:  cobra.NoArgs,
		RunE:  runE,
	}
	run.Flags().StringVar(&configFile, "config", "", "provisioner configuration file (YAML)")
	run.Flags().BoolVar(&checkConfig, "check-config", false, "validate the configuration and the helper, then exit")

	cmd.AddCommand(run,
		newProvisionerNkeyCmd(),
		newProvisionerCtlCmd("pause", "Stop workers from taking new nodes", http.MethodPost, "/pause", false),
		newProvisionerCtlCmd("resume", "Let workers take nodes again", http.MethodPost, "/resume", false),
		newProvisionerCtlCmd("status", "Show the provisioner's counts", http.MethodGet, "/status", true),
		newProvisionerCtlCmd("nodes", "Show every known node's state", http.MethodGet, "/nodes", true),
	)
	return cmd
}

func runProvisioner(cmd *cobra.Command, configFile string, checkConfig bool) error {
	if configFile == "" {
		return errors.New("--config is required")
	}
	cfg, err := provisioner.LoadConfig(configFile)
	if err != nil {
		return err
	}
	if err := builtinPolicyCA(&cfg); err != nil {
		return err
	}
	if checkConfig {
		h, err := buildHelper(cfg, nil)
		if err != nil {
			return err
		}
		if c, ok := h.(io.Closer); ok {
			c.Close()
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s: configuration ok\n", configFile)
		return nil
	}
	log, closer, err := logging.New(cfg.LogLevel, cfg.LogFile)
	if err != nil {
		return err
	}
	defer closer.Close()
	h, err := buildHelper(cfg, logrus.NewEntry(log))
	if err != nil {
		return err
	}
	if c, ok := h.(io.Closer); ok {
		defer c.Close() // a persistent helper's process ends with the command
	}
	p, err := provisioner.New(provisioner.Options{
		Config: cfg,
		Helper: h,
		Logger: logrus.NewEntry(log),
	})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return p.Run(ctx)
}

// builtinPolicyCA makes the built-in helper's CA certificate the trust
// anchor of policy.ca_file when that is not set: the provisioner then
// refuses any certificate that does not chain to the CA the helper signs
// with.
func builtinPolicyCA(cfg *provisioner.Config) error {
	if cfg.Helper != "" || cfg.HelperConfig == "" || cfg.Policy.CAFile != "" {
		return nil
	}
	hc, err := cfsslhelper.LoadConfig(cfg.HelperConfig)
	if err != nil {
		return fmt.Errorf("helper_config: %w", err)
	}
	if hc.CA.Cert == "" {
		return nil
	}
	cfg.Policy.CAFile = hc.CA.Cert
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("policy.ca_file from helper_config ca.cert: %w", err)
	}
	return nil
}

// buildHelper makes the exec'd helper when cfg.Helper is set (one
// long-running process with helper_mode persistent, logging its stderr to
// log, nil for none), else the built-in cfssl helper from cfg.HelperConfig.
func buildHelper(cfg provisioner.Config, log *logrus.Entry) (helper.Helper, error) {
	if cfg.Helper != "" && cfg.HelperMode == "persistent" {
		inFlight := cfg.HelperConcurrency
		if inFlight == 0 {
			inFlight = cfg.Workers
		}
		h, err := helper.NewPersistent(helper.PersistentOptions{
			Command:     cfg.Helper,
			Timeout:     cfg.HelperTimeout.D(),
			MaxInFlight: inFlight,
			Logger:      log,
		})
		if err != nil {
			return nil, fmt.Errorf("helper: %w", err)
		}
		return h, nil
	}
	if cfg.Helper != "" {
		h, err := helper.NewExec(helper.ExecOptions{Command: cfg.Helper, Timeout: cfg.HelperTimeout.D()})
		if err != nil {
			return nil, fmt.Errorf("helper: %w", err)
		}
		if from, to := helper.ReserveForkP(os.Getenv); to != from && log != nil {
			log.Infof("GOMAXPROCS %d -> %d: one more for the exec'd helper's forks (set GOMAXPROCS to choose)", from, to)
		}
		return h, nil
	}
	if cfg.HelperConfig == "" {
		return nil, errors.New("provisioner config: set helper (a command) or helper_config (the built-in helper's YAML)")
	}
	hc, err := cfsslhelper.LoadConfig(cfg.HelperConfig)
	if err != nil {
		return nil, fmt.Errorf("helper_config: %w", err)
	}
	h, err := cfsslhelper.New(hc)
	if err != nil {
		return nil, fmt.Errorf("helper_config: %w", err)
	}
	return h, nil
}

func newProvisionerCtlCmd(name, short, method, path string, hasJSON bool) *cobra.Command {
	var (
		url    string
		asJSON bool
	)
	c := &cobra.Command{
		Use:   name,
		Short: short + " (via the provisioner's HTTP monitor)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			body, err := callMonitor(cmd.Context(), method, strings.TrimRight(url, "/")+path)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				_, err := out.Write(body)
				return err
			}
			switch path {
			case "/nodes":
				return printNodes(out, body)
			default:
				return printStatus(out, body)
			}
		},
	}
	c.Flags().StringVar(&url, "url", "http://127.0.0.1:8081", "the provisioner's monitor URL")
	if hasJSON {
		c.Flags().BoolVar(&asJSON, "json", false, "print the JSON document")
	}
	return c
}

func callMonitor(ctx context.Context, method, url string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set(provisioner.OperatorHeader, "cli")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s %s: %s: %s", method, url, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}

func printStatus(w io.Writer, body []byte) error {
	var s provisioner.Status
	if err := json.Unmarshal(body, &s); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "connected\t%t\n", s.Connected)
	fmt.Fprintf(tw, "paused\t%t\n", s.Paused)
	fmt.Fprintf(tw, "workers\t%d busy of %d\n", s.BusyWorkers, s.Workers)
	fmt.Fprintf(tw, "queue\t%d of %d\n", s.QueueDepth, s.QueueCapacity)
	fmt.Fprintf(tw, "nodes\t%d\n", s.Nodes)
	states := make([]string, 0, len(s.States))
	for st := range s.States {
		states = append(states, string(st))
	}
	sort.Strings(states)
	for _, st := range states {
		fmt.Fprintf(tw, "  %s\t%d\n", st, s.States[provisioner.State(st)])
	}
	return tw.Flush()
}

func printNodes(w io.Writer, body []byte) error {
	var nodes []provisioner.NodeStatus
	if err := json.Unmarshal(body, &nodes); err != nil {
		return fmt.Errorf("nodes: %w", err)
	}
	return printNodeTable(w, nodes)
}

func printNodeTable(w io.Writer, nodes []provisioner.NodeStatus) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tSTATE\tSTAGE\tATTEMPTS\tUPDATED\tLAST ERROR")
	for _, n := range nodes {
		lastErr := n.LastError
		if len(lastErr) > 80 {
			lastErr = lastErr[:77] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", n.Identity, n.State, n.Stage, n.Attempts, n.Updated.Local().Format(time.DateTime), lastErr)
	}
	return tw.Flush()
}
