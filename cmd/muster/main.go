// Command muster is Muster's operator binary: the provisioning broker, the
// provisioner, the CA tools, the built-in helper, the demo and the operator
// commands, as subcommands.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// exitCoder lets a subcommand choose the process exit code.
type exitCoder interface{ ExitCode() int }

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "muster",
		Short:         "Fleet provisioning orchestrator on NATS",
		Long:          "Muster turns unconfigured machines into production nodes: it runs the provisioning broker,\nthe provisioner and its helper, and the CA tools.",
		Version:       version,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(
		newBrokerCmd(),
		newProvisionerCmd(),
		newNodesCmd(),
		newCACmd(),
		newHelperCmd(),
		newDemoCmd(),
		newBenchCmd(),
		newTokenCmd(),
		newRequestCmd(),
	)
	return root
}

func main() {
	err := newRootCmd().Execute()
	if err == nil {
		return
	}
	fmt.Fprintln(os.Stderr, "muster:", err)
	var ec exitCoder
	if errors.As(err, &ec) {
		os.Exit(ec.ExitCode())
	}
	os.Exit(1)
}
