package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/nats-io/nkeys"
	"github.com/spf13/cobra"

	"github.com/muster-io/muster/internal/fsutil"
)

// newProvisionerNkeyCmd makes the provisioner's broker credential: an nkey
// user seed written 0600, whose public key goes into the broker's
// "provisioners" list.
func newProvisionerNkeyCmd() *cobra.Command {
	var out string
	var force bool
	cmd := &cobra.Command{
		Use:   "nkey",
		Short: "Create the provisioner's nkey credential (seed file 0600; prints the public key)",
		Long: `Creates an nkey user seed for the provisioner and writes it to --out with mode 0600. The public
key printed on stdout goes into the broker's "provisioners" list; the seed file path goes into the
provisioner's "nkey_seed_file". The seed is never printed.`,
		Example: `  muster provisioner nkey --out /etc/muster/pki/provisioner.nk`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return writeNewSeed(cmd, out, force, nkeys.PrefixByteUser)
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "seed file to write (mode 0600)")
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing seed file")
	return cmd
}

// writeNewSeed makes an nkey of the given kind, writes its seed to out
// (0600, atomically; an existing file only with force) and prints the
// public key. The seed is never printed.
func writeNewSeed(cmd *cobra.Command, out string, force bool, kind nkeys.PrefixByte) error {
	if out == "" {
		return errors.New("--out is required")
	}
	if _, err := os.Stat(out); err == nil && !force {
		return fmt.Errorf("%s exists; use --force to replace it", out)
	}
	kp, err := nkeys.CreatePair(kind)
	if err != nil {
		return err
	}
	defer kp.Wipe()
	seed, err := kp.Seed()
	if err != nil {
		return err
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(out, seed, 0o600); err != nil {
		return err
	}
	fmt.Fprintln(cmd.OutOrStdout(), pub)
	return nil
}
