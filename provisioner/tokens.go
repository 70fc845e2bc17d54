package provisioner

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/muster-io/muster/internal/token"
)

// ErrToken wraps every provisioning token refusal.
var ErrToken = errors.New("provisioning token refused")

// maxTrackedTokens bounds the token-use table.
const maxTrackedTokens = 100_000

// checkToken verifies a node's provisioning token for identity and returns
// its claims as the helper's jwt input ("null" when tokens are off) and its
// id. A token with max_uses is refused once that many other identities were
// provisioned with it (a node provisioned again with its own token does not
// count twice). Uses are counted from the identity registry, so they
// survive a restart with state_dir.
func (p *Provisioner) checkToken(identity, tok string) (json.RawMessage, string, error) {
	if p.tokens == nil {
		return json.RawMessage("null"), "", nil
	}
	c, err := p.tokens.Verify(tok, identity, time.Now())
	if err != nil {
		p.m.tokenRefusals.WithLabelValues(tokenReason(err)).Inc()
		return nil, "", fmt.Errorf("%w: %w", ErrToken, err)
	}
	if c.Muster.MaxUses > 0 {
		p.mu.Lock()
		used := p.tokenUses[c.ID]
		_, mine := used[identity]
		full := !mine && len(used) >= c.Muster.MaxUses
		p.mu.Unlock()
		if full {
			p.m.tokenRefusals.WithLabelValues("used_up").Inc()
			return nil, "", fmt.Errorf("%w: %w (max_uses %d)", ErrToken, token.ErrTooManyUses, c.Muster.MaxUses)
		}
	}
	b, err := json.Marshal(c)
	if err != nil {
		return nil, "", fmt.Errorf("%w: claims: %w", ErrToken, err)
	}
	return b, c.ID, nil
}

// recordTokenUse notes that identity was provisioned with token id.
func (p *Provisioner) recordTokenUse(id, identity string) {
	if id == "" {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	used := p.tokenUses[id]
	if used == nil {
		if len(p.tokenUses) >= maxTrackedTokens {
			return
		}
		used = map[string]struct{}{}
		p.tokenUses[id] = used
	}
	used[identity] = struct{}{}
}

// tokenReasons are the label values of token_refusals_total.
var tokenReasons = []string{"missing", "expired", "unknown_issuer", "out_of_scope", "invalid", "used_up"}

func tokenReason(err error) string {
	switch {
	case errors.Is(err, token.ErrMissingToken):
		return "missing"
	case errors.Is(err, token.ErrExpired):
		return "expired"
	case errors.Is(err, token.ErrUnknownIssuer):
		return "unknown_issuer"
	case errors.Is(err, token.ErrOutOfScope):
		return "out_of_scope"
	}
	return "invalid"
}
