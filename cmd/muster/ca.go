package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
)

func newCACmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Certificate authority tools: create a CA, issue and sign certificates, print pins",
	}
	cmd.AddCommand(newCAInitCmd(), newCAIssueCmd(), newCASignCmd(), newCAPinCmd())
	return cmd
}

func newCAInitCmd() *cobra.Command {
	var dir, cn string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:     "init",
		Short:   "Create an ECDSA P-256 CA (ca.pem, ca-key.pem 0600) in --dir and print its pin",
		Example: "  muster ca init --dir ./ca --cn 'Example Fleet CA'",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return errors.New("ca init: --dir is required")
			}
			c, err := ca.Init(dir, cn, validity)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), c.Pin())
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory (created 0700)")
	cmd.Flags().StringVar(&cn, "cn", "Muster CA", "CA common name")
	cmd.Flags().DurationVar(&validity, "validity", ca.DefaultCAValidity, "CA certificate lifetime")
	return cmd
}

func newCAIssueCmd() *cobra.Command {
	var dir, cn, out, name string
	var hosts []string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "issue",
		Short: "Make a key and certificate (broker, provisioner, admin) signed by the CA",
		Long: `Writes <out>/<name>.pem (the certificate followed by the CA) and <out>/<name>-key.pem (0600).
--host names the SANs (DNS names or IP addresses); the default is the CN.`,
		Example: "  muster ca issue --dir ./ca --cn broker.example.net --host broker.example.net --host 10.0.0.5 --out pki --name broker",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var errs []error
			if dir == "" {
				errs = append(errs, errors.New("--dir is required"))
			}
			if cn == "" {
				errs = append(errs, errors.New("--cn is required"))
			}
			if out == "" {
				errs = append(errs, errors.New("--out is required"))
			}
			if err := errors.Join(errs...); err != nil {
				return fmt.Errorf("ca issue: %w", err)
			}
			if name == "" {
				name = cn
			}
			c, err := ca.LoadDir(dir, validity)
			if err != nil {
				return err
			}
			is, err := c.Issue(cn, hosts)
			if err != nil {
				return err
			}
			certFile, keyFile, err := c.WriteIssued(out, name, is)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "certificate: %s\nkey: %s\n", certFile, keyFile)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory")
	cmd.Flags().StringVar(&cn, "cn", "", "certificate common name")
	cmd.Flags().StringArrayVar(&hosts, "host", nil, "subject alternative name (repeatable; default the CN)")
	cmd.Flags().StringVar(&out, "out", "", "output directory")
	cmd.Flags().StringVar(&name, "name", "", "file stem (default the CN)")
	cmd.Flags().DurationVar(&validity, "validity", ca.DefaultLeafValidity, "certificate lifetime")
	return cmd
}

func newCASignCmd() *cobra.Command {
	var dir, csrFile string
	var hosts []string
	var validity time.Duration
	cmd := &cobra.Command{
		Use:   "sign",
		Short: "Sign a PEM CSR with the CA and print the PEM certificate (like cfssl sign)",
		Long: `Reads a PEM certificate request from --csr (a file, or - for stdin) and prints the signed
certificate. --host sets the SANs; by default the CSR's own are kept. This is what example helpers
call to sign a node's CSR.`,
		Example: `  muster ca sign --dir ./ca --csr node1.csr
  echo "$csr" | muster ca sign --dir "$MUSTER_CA_DIR" --csr -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" {
				return errors.New("ca sign: --dir is required")
			}
			var csrPEM []byte
			var err error
			if csrFile == "-" {
				csrPEM, err = io.ReadAll(io.LimitReader(cmd.InOrStdin(), pki.MaxPEMSize+1))
			} else {
				csrPEM, err = readBounded(csrFile, pki.MaxPEMSize)
			}
			if err != nil {
				return fmt.Errorf("ca sign: read csr: %w", err)
			}
			c, err := ca.LoadDir(dir, validity)
			if err != nil {
				return err
			}
			cert, err := c.SignCSR(csrPEM, hosts)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(cert)
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "CA directory")
	cmd.Flags().StringVar(&csrFile, "csr", "-", "PEM CSR file, - for stdin")
	cmd.Flags().StringArrayVar(&hosts, "host", nil, "subject alternative name (repeatable; default the CSR's)")
	cmd.Flags().DurationVar(&validity, "validity", ca.DefaultLeafValidity, "certificate lifetime")
	return cmd
}

func newCAPinCmd() *cobra.Command {
	var certFile string
	cmd := &cobra.Command{
		Use:     "pin",
		Short:   "Print the pin (sha256 of the public key) of a CA certificate, for agents' --ca-pin",
		Example: "  muster ca pin --cert ./ca/ca.pem",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if certFile == "" {
				return errors.New("ca pin: --cert is required")
			}
			data, err := readBounded(certFile, pki.MaxPEMSize)
			if err != nil {
				return fmt.Errorf("ca pin: %w", err)
			}
			certs, err := pki.ParseCertificates(data)
			if err != nil {
				return fmt.Errorf("ca pin %s: %w", certFile, err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), pki.Pin(certs[0]))
			return nil
		},
	}
	cmd.Flags().StringVar(&certFile, "cert", "", "PEM certificate file")
	return cmd
}

// readBounded reads at most limit+1 bytes of file (the PEM parsers refuse
// anything over their limit).
func readBounded(file string, limit int) ([]byte, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, int64(limit)+1))
}
