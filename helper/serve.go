package helper

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
)

// ServeOne makes an in-process Helper a helper program: it reads one
// request document from in (at most MaxRequestSize bytes), runs h and
// writes the reply document, followed by a newline, to out.
func ServeOne(ctx context.Context, h Helper, in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(io.LimitReader(in, MaxRequestSize+1))
	if err != nil {
		return fmt.Errorf("read helper request: %w", err)
	}
	req, err := DecodeRequest(data)
	if err != nil {
		return err
	}
	return serveRequest(ctx, h, req, out)
}

// serveRequest answers one decoded request; a line-oriented mode calls it
// once per line.
func serveRequest(ctx context.Context, h Helper, req *Request, out io.Writer) error {
	rep, err := h.Provision(ctx, req)
	if err != nil {
		return err
	}
	if rep.RequestID == "" {
		rep.RequestID = req.RequestID
	}
	b, err := json.Marshal(rep)
	if err != nil {
		return fmt.Errorf("encode helper reply for %s: %w", req.Identity, err)
	}
	if _, err := out.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write helper reply: %w", err)
	}
	return nil
}
