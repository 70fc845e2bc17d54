// Package helper defines the contract between the provisioner and a
// provisioning helper (the Choria helper contract, see docs/helpers.md) and
// runs helpers: as an exec'd program with JSON on stdin and stdout, or
// in-process through the Helper interface.
package helper

import (
	"context"
	"encoding/json"
)

// CSRInfo is the node's certificate request as handed to the helper.
type CSRInfo struct {
	CSR       string `json:"csr"`
	PublicKey string `json:"public_key"`
	SSLDir    string `json:"ssldir"`
}

// ED25519Info is the key-only enrolment data (unused by Muster's agent but
// part of the contract; always null today).
type ED25519Info struct {
	PublicKey string `json:"public_key"`
	Directory string `json:"directory"`
	Signature string `json:"signature"`
}

// Request is the JSON document written to the helper's stdin.
type Request struct {
	Identity      string       `json:"identity"`
	CSR           *CSRInfo     `json:"csr"`
	ED25519PubKey *ED25519Info `json:"ed25519_pubkey"`
	// Inventory is a JSON string (not an object) holding the node's inventory.
	Inventory string          `json:"inventory"`
	JWT       json.RawMessage `json:"jwt"`

	// Muster additions.

	// RequestID is unique per helper invocation; the persistent helper mode
	// tags replies with it.
	RequestID string `json:"request_id,omitempty"`
	// Site is the provisioner's configured site name.
	Site string `json:"site,omitempty"`
}

// Reply is the JSON document a helper writes to stdout. Unknown keys are
// ignored.
type Reply struct {
	Defer          bool              `json:"defer"`
	Shutdown       bool              `json:"shutdown"`
	Msg            string            `json:"msg"`
	Configuration  map[string]string `json:"configuration"`
	Certificate    string            `json:"certificate"`
	CA             string            `json:"ca"`
	SSLDir         string            `json:"ssldir"`
	Key            string            `json:"key"`
	ActionPolicies map[string]string `json:"action_policies"`
	OPAPolicies    map[string]string `json:"opa_policies"`
	ServerClaims   json.RawMessage   `json:"server_claims"`
	Upgrade        string            `json:"upgrade"`

	// Muster additions.

	// RequestID echoes Request.RequestID (persistent helper mode).
	RequestID string `json:"request_id,omitempty"`
	// RetryAfter, in seconds, is when a deferred node should come back.
	RetryAfter int `json:"retry_after,omitempty"`
	// Error, in persistent mode, reports that the helper failed this one
	// request (what a non-zero exit says in exec mode).
	Error string `json:"error,omitempty"`
}

// Helper turns a node's request into its reply. Implementations: Exec (a
// program run per node), and in-process helpers such as the cfssl helper.
type Helper interface {
	Provision(ctx context.Context, req *Request) (*Reply, error)
}
