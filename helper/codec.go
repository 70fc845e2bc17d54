package helper

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// MaxRequestSize bounds a request document read by a helper (the built-in
// helper's command reads at most this much from stdin).
const MaxRequestSize = 1 << 20

// EncodeRequest renders the request document written to a helper's stdin:
// compact JSON followed by a newline (so a line-oriented helper can read
// it with one line read).
func EncodeRequest(req *Request) ([]byte, error) {
	if req == nil {
		return nil, errors.New("encode helper request: nil request")
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode helper request for %s: %w", req.Identity, err)
	}
	return append(b, '\n'), nil
}

// DecodeRequest decodes a request document as a helper receives it. Unknown
// keys are ignored (newer provisioners may add fields); data over
// MaxRequestSize, trailing data and wrongly typed fields are errors.
func DecodeRequest(data []byte) (*Request, error) {
	if len(data) > MaxRequestSize {
		return nil, fmt.Errorf("helper request: %d bytes, limit %d: %w", len(data), MaxRequestSize, ErrTooLarge)
	}
	var req Request
	if err := decodeOne(data, &req); err != nil {
		return nil, fmt.Errorf("helper request: %w", err)
	}
	return &req, nil
}

// DecodeReply decodes a helper's stdout into a Reply, leniently as the
// contract asks (unknown keys are ignored) but strictly typed: a
// configuration that is not an object of strings, a defer that is not a
// boolean, trailing data or anything that is not one JSON object is
// ErrBadJSON (joined with ErrInvalidReply for type mismatches). Output that
// is only whitespace is ErrEmpty. DecodeReply does not check the contract's
// rules; see ValidateReply.
func DecodeReply(data []byte) (*Reply, error) {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return nil, ErrEmpty
	}
	if trimmed[0] != '{' {
		return nil, fmt.Errorf("%w: reply is not a JSON object", ErrBadJSON)
	}
	var rep Reply
	if err := decodeOne(trimmed, &rep); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, fmt.Errorf("%w: %w: field %q: got JSON %s, want %s", ErrBadJSON, ErrInvalidReply, te.Field, te.Value, te.Type)
		}
		return nil, fmt.Errorf("%w: %v", ErrBadJSON, err)
	}
	return &rep, nil
}

// decodeOne decodes exactly one JSON value from data into v, ignoring
// unknown object keys.
func decodeOne(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("trailing data after the JSON value")
	}
	return nil
}
