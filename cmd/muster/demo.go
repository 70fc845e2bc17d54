package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/provisioner"
)

type demoFailed struct{ failed int }

func (d demoFailed) Error() string { return fmt.Sprintf("%d nodes were not provisioned", d.failed) }
func (d demoFailed) ExitCode() int { return 2 }

func newDemoCmd() *cobra.Command {
	var (
		o        demo.RunOptions
		asJSON   bool
		logLevel string
		keep     bool
	)
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Provision a simulated fleet on embedded defaults",
		Long: `Runs a whole deployment in one process: a throwaway CA (or --ca-cert/--ca-key), the broker on a
random loopback port, the provisioner with the built-in cfssl helper (or --helper CMD, exec'd per
node), and N agents, each with its own state directory and TLS connection. It shows progress while
nodes are provisioned, checks that every node answers rpcutil ping on the production side over
mutual TLS, and prints a summary.

An exec'd helper gets MUSTER_CA_DIR (ca.pem and ca-key.pem), MUSTER_BROKER (the production broker
host:port), MUSTER_BIN (this muster binary, for "muster ca sign") and MUSTER_HELPER_BIN (bin/muster-helper,
when it sits beside this binary, for the faster "muster-helper sign") in its environment; the
built-in helper programs ("muster helper cfssl", bin/muster-helper) take their CA and broker from
them, so they need no flags.`,
		Example: `  muster demo --nodes 200
  muster demo --nodes 200 --helper bin/muster-helper
  muster demo --nodes 200 --helper "bin/muster-helper --persistent" --helper-persistent
  muster demo --nodes 50 --helper "./examples/helpers/helper.sh" --json
  muster demo --nodes 20 --helper "python3 my_helper.py" --ca-cert ca.pem --ca-key ca-key.pem`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			log, closer, err := logging.New(logLevel, "")
			if err != nil {
				return err
			}
			defer closer.Close()
			if logLevel == "" {
				log.SetOutput(discard{})
			}
			o.Logger = log
			if o.HelperCommand != "" && !o.HelperPersistent {
				// As the provisioner command does.
				helper.ReserveForkP(os.Getenv)
			}
			if keep {
				dir, err := os.MkdirTemp("", "muster-demo-")
				if err != nil {
					return err
				}
				o.Dir = dir
				fmt.Fprintf(cmd.ErrOrStderr(), "demo files kept in %s\n", dir)
			}
			if !asJSON {
				o.Progress = cmd.ErrOrStderr()
				provs := ""
				if o.HA != "" && o.HA != provisioner.HASingle {
					provs = fmt.Sprintf(" (%d provisioners, ha mode %s)", o.Provisioners, o.HA)
				}
				fmt.Fprintf(cmd.ErrOrStderr(), "muster demo: %d nodes, %d workers%s, helper %s\n", o.Nodes, o.Workers, provs, helperName(o.HelperCommand))
			}
			s, err := demo.Run(ctx, o)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(s); err != nil {
					return err
				}
			} else {
				s.Print(cmd.OutOrStdout())
			}
			if s.Failed > 0 || s.ProductionMTLS < s.Nodes {
				return demoFailed{failed: max(s.Failed, s.Nodes-s.ProductionMTLS)}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVarP(&o.Nodes, "nodes", "n", 100, "number of simulated nodes")
	f.IntVar(&o.Workers, "workers", 8, "provisioner workers")
	f.StringVar(&o.HA, "ha", "single", "provisioners' ha.mode: single, claims or leader (claims and leader share state through the broker's JetStream)")
	f.IntVar(&o.Provisioners, "provisioners", 1, "provisioners to run (more than one needs --ha claims or leader), each with --workers workers")
	f.StringVar(&o.HelperCommand, "helper", "", "exec this helper per node instead of the built-in cfssl helper")
	f.BoolVar(&o.HelperPersistent, "helper-persistent", false, "run --helper as one persistent helper (request lines in, reply lines out)")
	f.DurationVar(&o.HelperTimeout, "helper-timeout", 10*time.Second, "helper timeout")
	f.StringVar(&o.CACert, "ca-cert", "", "use this CA certificate instead of a throwaway CA")
	f.StringVar(&o.CAKey, "ca-key", "", "the key of --ca-cert")
	f.StringVar(&o.KeyType, "key-type", "ecdsa-p256", "node key type: ecdsa-p256 or rsa")
	f.DurationVar(&o.Timeout, "timeout", 5*time.Minute, "give up after this long")
	f.BoolVar(&asJSON, "json", false, "print the summary as JSON (no progress bar)")
	f.StringVar(&logLevel, "loglevel", "", "show component logs at this level (default: none)")
	f.BoolVar(&keep, "keep", false, "keep the demo's files (CA, broker store, agent state) and print where")
	return cmd
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func helperName(cmd string) string {
	if cmd == "" {
		return "built-in cfssl"
	}
	return fmt.Sprintf("%q (exec)", cmd)
}
