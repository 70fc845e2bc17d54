package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nkeys"
	"github.com/spf13/cobra"

	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/token"
)

func newTokenCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Provisioning tokens: make an issuer key, issue and inspect tokens",
		Long: `A provisioning token proves a machine may be provisioned. It is a JWT signed (EdDSA) by a token
issuer key; brokers admit and provisioners provision only holders of a valid token whose scope
covers the machine's identity. Trust the issuer by listing its public key in the broker's and the
provisioner's "token_issuers". See docs/security.md.`,
	}
	cmd.AddCommand(newTokenInitCmd(), newTokenCreateCmd(), newTokenViewCmd())
	return cmd
}

func newTokenInitCmd() *cobra.Command {
	var out string
	var force bool
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create a token issuer key (nkey account seed, 0600; prints the public key)",
		Long: `Creates a token issuer key and writes its seed to --out with mode 0600. The public key printed on
stdout goes into "token_issuers" of the broker and the provisioner. The seed is never printed; keep
it where tokens are made, not on the brokers.`,
		Example: `  muster token init --out /etc/muster/token-issuer.nk`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// A token issuer key is an nkey account key (token.NewIssuer).
			return writeNewSeed(cmd, out, force, nkeys.PrefixByteAccount)
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "seed file to write (mode 0600)")
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing seed file")
	return cmd
}

func newTokenCreateCmd() *cobra.Command {
	var (
		issuerFile, out string
		validity        time.Duration
		scope           token.Scope
	)
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Issue a provisioning token",
		Long: `Issues a provisioning token signed by the issuer seed in --issuer and prints it (or writes it to
--out, mode 0600). Scope it to one --identity or an --identity-pattern (glob), label it with a
--batch, and cap the distinct identities it may provision with --max-uses. Trust settings for the
agent can ride along: --provisioner-key (repeatable), --broker (repeatable) and --ca-pin.`,
		Example: `  muster token create --issuer token-issuer.nk --identity web-1.example.net --valid 24h
  muster token create --issuer token-issuer.nk --identity-pattern 'web-*.example.net' --batch rack12 \
      --max-uses 40 --provisioner-key UABC... --broker tls://prov.example.net:4222 --ca-pin sha256:...`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if issuerFile == "" {
				return errors.New("--issuer is required")
			}
			seed, err := os.ReadFile(issuerFile)
			if err != nil {
				return fmt.Errorf("--issuer: %w", err)
			}
			iss, err := token.NewIssuer(seed)
			if err != nil {
				return fmt.Errorf("--issuer %s: %w", issuerFile, err)
			}
			tok, _, err := iss.Create(scope, time.Now(), validity)
			if err != nil {
				return err
			}
			if out != "" {
				return fsutil.WriteFileAtomic(out, []byte(tok+"\n"), 0o600)
			}
			fmt.Fprintln(cmd.OutOrStdout(), tok)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&issuerFile, "issuer", "", "token issuer seed file (muster token init)")
	f.StringVar(&out, "out", "", "write the token to this file (mode 0600) instead of stdout")
	f.DurationVar(&validity, "valid", 24*time.Hour, "how long the token is valid")
	f.StringVar(&scope.Identity, "identity", "", "the one identity the token is for")
	f.StringVar(&scope.Pattern, "identity-pattern", "", "glob the identities must match, label by label: '*' never crosses a dot (e.g. 'web-*.example.net')")
	f.StringVar(&scope.Batch, "batch", "", "batch label handed to the helper")
	f.IntVar(&scope.MaxUses, "max-uses", 0, "how many distinct identities the token may provision (0: no limit)")
	f.StringArrayVar(&scope.ProvisionerKeys, "provisioner-key", nil, "provisioner public nkey the agent should trust (repeatable)")
	f.StringArrayVar(&scope.Brokers, "broker", nil, "provisioning broker URL for the agent (repeatable)")
	f.StringVar(&scope.CAPin, "ca-pin", "", "sha256:<hex> pin of the provisioning broker's CA (muster ca pin)")
	return cmd
}

func newTokenViewCmd() *cobra.Command {
	var issuers []string
	var identity string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "view [TOKEN|-]",
		Short: "Show a provisioning token's claims (and verify it with --issuer-key)",
		Long: `Shows the claims of a token given as the argument, or read from stdin with "-" or no argument.
Without --issuer-key the signature is NOT checked (the output says so); with it the token is
verified like the broker does, for --identity when given.`,
		Example: `  muster token view < node.token
  muster token view --issuer-key ABC... --identity web-1.example.net "$(cat node.token)"`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var raw string
			if len(args) == 1 && args[0] != "-" {
				raw = args[0]
			} else {
				b, err := io.ReadAll(io.LimitReader(cmd.InOrStdin(), token.MaxSize+1))
				if err != nil {
					return err
				}
				raw = string(b)
			}
			raw = strings.TrimSpace(raw)
			var c *token.Claims
			verified := false
			var err error
			if len(issuers) > 0 {
				v, verr := token.NewVerifier(issuers)
				if verr != nil {
					return verr
				}
				c, err = v.Verify(raw, identity, time.Now())
				verified = err == nil
			} else {
				c, err = token.Inspect(raw)
			}
			if err != nil {
				return err
			}
			return printClaims(cmd.OutOrStdout(), c, verified, asJSON)
		},
	}
	cmd.Flags().StringArrayVar(&issuers, "issuer-key", nil, "trusted issuer public key; verifies the signature (repeatable)")
	cmd.Flags().StringVar(&identity, "identity", "", "with --issuer-key: check the scope covers this identity")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printClaims(w io.Writer, c *token.Claims, verified, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Verified bool          `json:"signature_verified"`
			Claims   *token.Claims `json:"claims"`
		}{verified, c})
	}
	when := func(t time.Time) string { return t.UTC().Format(time.RFC3339) }
	orAny := func(s string) string {
		if s == "" {
			return "any"
		}
		return s
	}
	sig := "NOT VERIFIED (give --issuer-key to verify)"
	if verified {
		sig = "verified"
	}
	fmt.Fprintf(w, "Provisioning token\n\n")
	fmt.Fprintf(w, "         Signature: %s\n", sig)
	fmt.Fprintf(w, "            Issuer: %s\n", c.Issuer)
	fmt.Fprintf(w, "                ID: %s\n", c.ID)
	if c.IssuedAt != nil {
		fmt.Fprintf(w, "            Issued: %s\n", when(c.IssuedAt.Time))
	}
	if c.ExpiresAt != nil {
		state := ""
		if time.Now().After(c.ExpiresAt.Time) {
			state = " (EXPIRED)"
		}
		fmt.Fprintf(w, "           Expires: %s%s\n", when(c.ExpiresAt.Time), state)
	}
	id := c.Muster.Identity
	if c.Muster.Pattern != "" {
		id = "pattern " + c.Muster.Pattern
	}
	fmt.Fprintf(w, "          Identity: %s\n", orAny(id))
	fmt.Fprintf(w, "             Batch: %s\n", orAny(c.Muster.Batch))
	uses := "unlimited"
	if c.Muster.MaxUses > 0 {
		uses = fmt.Sprint(c.Muster.MaxUses)
	}
	fmt.Fprintf(w, "          Max uses: %s\n", uses)
	if len(c.Muster.ProvisionerKeys) > 0 {
		fmt.Fprintf(w, "  Provisioner keys: %s\n", strings.Join(c.Muster.ProvisionerKeys, ", "))
	}
	if len(c.Muster.Brokers) > 0 {
		fmt.Fprintf(w, "           Brokers: %s\n", strings.Join(c.Muster.Brokers, ", "))
	}
	if c.Muster.CAPin != "" {
		fmt.Fprintf(w, "            CA pin: %s\n", c.Muster.CAPin)
	}
	return nil
}
