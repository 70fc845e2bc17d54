// Command muster-helper is Muster's built-in provisioning helper as a small
// standalone program: the helper of "muster helper cfssl" (same flags,
// configuration file and replies, package helper/builtin) signing with
// crypto/x509 alone (internal/x509ca) instead of cfssl. It links neither
// cfssl nor nats-server, Prometheus or cobra, so it starts in a couple of
// milliseconds, which is what an exec'd helper pays per node.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/muster-io/muster/helper/builtin"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/x509ca"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

const usage = `Usage: muster-helper [flags] < request.json

Muster's built-in provisioning helper, a Choria-compatible helper program. It reads one helper
request (JSON, at most 1 MiB) on stdin, writes the reply JSON on stdout and exits 0; errors go to
stderr with exit status 1. With --persistent it is a persistent helper: it reads newline-delimited
requests until stdin ends, answers up to --concurrency of them at once, and writes one reply line
per request, tagged with its request_id (a failed request gets a reply with "error" set).

It is "muster helper cfssl" (same flags, configuration file and replies; see docs/helpers.md)
signing with crypto/x509 instead of cfssl: certificates of the same profile from the same CA
files, from a program that starts in a few milliseconds.

"muster-helper sign" signs one PEM CSR read on stdin and prints the certificate, like
"muster ca sign" (and "cfssl sign") but without their start-up cost: what a helper written in
another language calls to sign (examples/helpers/helper.sh does).

Examples:
  muster-helper --config /etc/muster/helper-cfssl.yaml < request.json
  muster-helper --ca-dir ./ca --middleware-hosts broker.example.net:4222 < request.json
  muster-helper --config /etc/muster/helper-cfssl.yaml --check-config
  muster-helper --config /etc/muster/helper-cfssl.yaml --persistent --concurrency 16
  muster bench --helper exec --helper-cmd bin/muster-helper        # CA and broker from MUSTER_CA_DIR, MUSTER_BROKER
  muster-helper sign --ca-dir ./ca --host node1.example.net < node1.csr > node1.pem

Flags:
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run parses the flags and runs the helper, returning the exit status.
func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "sign" {
		return runSign(args[1:], stdin, stdout, stderr)
	}
	var f builtin.Flags
	var showVersion bool
	fs := flag.NewFlagSet("muster-helper", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	f.Register(fs, os.Getenv)
	fs.BoolVar(&showVersion, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "muster-helper: unexpected arguments %q (the request is read from stdin)\n", fs.Args())
		return 2
	}
	if showVersion {
		fmt.Fprintln(stdout, "muster-helper", version)
		return 0
	}
	// No signal handling: SIGTERM and SIGINT end the process by default,
	// which is what the provisioner expects of a helper (it kills the whole
	// process group on a timeout or at shutdown, and closes a persistent
	// helper's stdin first). A handler would cost every exec a goroutine
	// and a thread (~1 ms of CPU measured here) for nothing.
	if err := builtin.Run(context.Background(), f, loadCA, stdin, stdout, stderr); err != nil {
		fmt.Fprintln(stderr, "muster-helper:", err)
		return 1
	}
	return 0
}

const signUsage = `Usage: muster-helper sign [--ca-dir DIR] [--host NAME]... < csr.pem > certificate.pem

Signs one PEM certificate request read on stdin with the CA in --ca-dir (ca.pem and ca-key.pem,
default $MUSTER_CA_DIR) and prints the PEM certificate: the profile of "muster ca sign". --host
sets the subject alternative names (repeatable); by default the CSR's own are kept. The caller
decides who may get which name; a helper passes the node's identity.

Flags:
`

// hostList collects repeated --host flags.
type hostList []string

func (h *hostList) String() string { return strings.Join(*h, ",") }
func (h *hostList) Set(v string) error {
	if v == "" {
		return errors.New("empty host")
	}
	*h = append(*h, v)
	return nil
}

// runSign is "muster-helper sign": one CSR on stdin, its certificate on
// stdout.
func runSign(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	var caDir string
	var hosts hostList
	var validity time.Duration
	fs := flag.NewFlagSet("muster-helper sign", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), signUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&caDir, "ca-dir", os.Getenv(builtin.EnvCADir), "CA directory holding ca.pem and ca-key.pem (default $"+builtin.EnvCADir+")")
	fs.Var(&hosts, "host", "subject alternative name (repeatable; default the CSR's)")
	fs.DurationVar(&validity, "validity", 0, "certificate lifetime (default 8760h)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "muster-helper sign: unexpected arguments %q (the CSR is read from stdin)\n", fs.Args())
		return 2
	}
	if caDir == "" {
		fmt.Fprintln(stderr, "muster-helper sign: --ca-dir (or $"+builtin.EnvCADir+") is required")
		return 2
	}
	if validity < 0 {
		fmt.Fprintf(stderr, "muster-helper sign: --validity %s: must be positive\n", validity)
		return 2
	}
	csrPEM, err := io.ReadAll(io.LimitReader(stdin, pki.MaxPEMSize+1))
	if err != nil {
		fmt.Fprintln(stderr, "muster-helper sign: read csr:", err)
		return 1
	}
	if len(csrPEM) > pki.MaxPEMSize {
		fmt.Fprintf(stderr, "muster-helper sign: csr larger than %d bytes\n", pki.MaxPEMSize)
		return 1
	}
	c, err := x509ca.LoadDir(caDir, validity)
	if err != nil {
		fmt.Fprintln(stderr, "muster-helper sign:", err)
		return 1
	}
	cert, err := c.SignCSR(csrPEM, hosts)
	if err != nil {
		fmt.Fprintln(stderr, "muster-helper sign:", err)
		return 1
	}
	if _, err := stdout.Write(cert); err != nil {
		fmt.Fprintln(stderr, "muster-helper sign:", err)
		return 1
	}
	return 0
}

// loadCA loads the CA files with the crypto/x509 signer.
func loadCA(certFile, keyFile string, validity time.Duration) (builtin.Signer, error) {
	return x509ca.Load(certFile, keyFile, validity)
}
