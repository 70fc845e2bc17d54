package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/provisioner"
)

func newNodesCmd() *cobra.Command {
	var monitorURL string
	cmd := &cobra.Command{
		Use:   "nodes",
		Short: "List, show, approve and deny nodes (via the provisioner's HTTP monitor)",
		Long: `Talks to a running provisioner's HTTP monitor. A node that was provisioned before and comes back
with a different key (or that the provisioner holds for another reason) is "held": it is not
provisioned until an operator approves it, or denies it for good. See docs/provisioner.md.`,
		Example: `  muster nodes ls --state held
  muster nodes show node1.example.net
  muster nodes approve node1.example.net
  muster nodes deny node1.example.net`,
	}
	cmd.PersistentFlags().StringVar(&monitorURL, "url", "http://127.0.0.1:8081", "the provisioner's monitor URL")
	base := func() string { return strings.TrimRight(monitorURL, "/") }
	var kv kvFlags
	kv.register(cmd)

	var state string
	var lsJSON bool
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List known nodes, optionally only those in one state",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if state != "" && !knownState(state) {
				return fmt.Errorf("--state %q: must be one of %s", state, stateList())
			}
			if kv.use {
				return kvList(cmd, &kv, state, lsJSON)
			}
			body, err := callMonitor(cmd.Context(), http.MethodGet, base()+"/nodes")
			if err != nil {
				return err
			}
			var nodes []provisioner.NodeStatus
			if err := json.Unmarshal(body, &nodes); err != nil {
				return fmt.Errorf("nodes: %w", err)
			}
			if state != "" {
				kept := nodes[:0]
				for _, n := range nodes {
					if string(n.State) == state {
						kept = append(kept, n)
					}
				}
				nodes = kept
			}
			if lsJSON {
				return writeIndented(cmd.OutOrStdout(), nodes)
			}
			return printNodeTable(cmd.OutOrStdout(), nodes)
		},
	}
	ls.Flags().StringVar(&state, "state", "", "only nodes in this state ("+stateList()+")")
	ls.Flags().BoolVar(&lsJSON, "json", false, "print JSON")

	var showJSON bool
	show := &cobra.Command{
		Use:   "show ID",
		Short: "Show one node: its state, hold reason, key fingerprint and registry record",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if kv.use {
				return kvShow(cmd, &kv, args[0])
			}
			body, err := callNode(cmd, base(), http.MethodGet, args[0], "")
			if err != nil {
				return err
			}
			if showJSON {
				_, err := cmd.OutOrStdout().Write(body)
				return err
			}
			return printNodeDetail(cmd.OutOrStdout(), body)
		},
	}
	show.Flags().BoolVar(&showJSON, "json", false, "print the JSON document")

	decide := func(verb, short string) *cobra.Command {
		return &cobra.Command{
			Use:   verb + " ID",
			Short: short,
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				body, err := callNode(cmd, base(), http.MethodPost, args[0], "/"+verb)
				if err != nil {
					return err
				}
				return printNodeDetail(cmd.OutOrStdout(), body)
			},
		}
	}
	cmd.AddCommand(ls, show,
		decide("approve", "Approve a held node: it is provisioned now and its new key recorded"),
		decide("deny", "Deny a held node: it is never provisioned (recorded in the registry)"),
	)
	return cmd
}

// callNode calls /nodes/{id}{suffix} after checking id.
func callNode(cmd *cobra.Command, base, method, id, suffix string) ([]byte, error) {
	if err := protocol.ValidateIdentity(id); err != nil {
		return nil, err
	}
	return callMonitor(cmd.Context(), method, base+"/nodes/"+url.PathEscape(id)+suffix)
}

func knownState(s string) bool {
	for _, st := range provisioner.States() {
		if string(st) == s {
			return true
		}
	}
	return false
}

func stateList() string {
	states := provisioner.States()
	names := make([]string, len(states))
	for i, st := range states {
		names[i] = string(st)
	}
	return strings.Join(names, ", ")
}

func writeIndented(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printNodeDetail(w io.Writer, body []byte) error {
	var d provisioner.NodeDetail
	if err := json.Unmarshal(body, &d); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s\t%s\n", k, v)
		}
	}
	when := func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.Local().Format(time.DateTime)
	}
	row("identity", d.Identity)
	row("state", string(d.State))
	row("hold reason", d.HoldReason)
	row("held at", when(d.HeldAt))
	row("stage", string(d.Stage))
	if d.Attempts > 0 {
		row("attempts", fmt.Sprint(d.Attempts))
	}
	row("key", d.KeyFingerprint)
	row("life", d.Life)
	row("last error", d.LastError)
	row("updated", when(d.Updated))
	row("provisioned at", when(d.ProvisionedAt))
	if r := d.Registered; r != nil {
		row("registered key", r.KeyFingerprint)
		row("registered serial", r.Serial)
		row("registered at", when(r.ProvisionedAt))
		if r.Denied {
			row("denied at", when(r.DeniedAt))
			row("denied key", r.DeniedKey)
		}
	}
	return tw.Flush()
}
