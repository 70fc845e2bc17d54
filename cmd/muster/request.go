package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"
	"github.com/spf13/cobra"

	"github.com/muster-io/muster/internal/protocol"
)

func newRequestCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "request",
		Short: "Build protocol requests by hand (for the nats CLI)",
	}
	cmd.AddCommand(newRequestSignCmd())
	return cmd
}

func newRequestSignCmd() *cobra.Command {
	var seedFile, target, ag, action, body, sender string
	var ttl int
	cmd := &cobra.Command{
		Use:   "sign",
		Short: "Print a request envelope signed with a provisioner nkey",
		Long: `Prints a request envelope (docs/protocol.md) signed with the provisioner nkey seed in --nkey, for
sending with the nats CLI. Nodes obey only requests signed by a key they trust.`,
		Example: `  nats request provisioning.node.node1.example.net \
    "$(muster request sign --nkey provisioner.nk --target node1.example.net --agent rpcutil --action inventory)"`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if seedFile == "" {
				return errors.New("--nkey is required")
			}
			seed, err := os.ReadFile(seedFile)
			if err != nil {
				return fmt.Errorf("--nkey: %w", err)
			}
			kp, err := nkeys.ParseDecoratedNKey(seed)
			if err != nil {
				return fmt.Errorf("--nkey %s: not an nkey seed", seedFile)
			}
			r := protocol.Request{
				Protocol: protocol.RequestProtocol, ID: nuid.Next(), Sender: sender, Target: target,
				Agent: ag, Action: action, Time: time.Now().UTC(), TTL: ttl,
			}
			if body != "" {
				if !json.Valid([]byte(body)) {
					return errors.New("--body is not JSON")
				}
				r.Body = json.RawMessage(body)
			}
			if err := r.Validate(); err != nil {
				return err
			}
			if err := r.Sign(kp); err != nil {
				return err
			}
			out, err := protocol.Marshal(r)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), string(out))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&seedFile, "nkey", "", "provisioner nkey seed file")
	f.StringVar(&target, "target", "", "addressed identity (empty for a broadcast)")
	f.StringVar(&ag, "agent", protocol.AgentRPCUtil, "agent")
	f.StringVar(&action, "action", protocol.ActionPing, "action")
	f.StringVar(&body, "body", "", "JSON body")
	f.StringVar(&sender, "sender", "muster-cli", "sender name")
	f.IntVar(&ttl, "ttl", 60, "seconds the request stays valid")
	return cmd
}
