package helper

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
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
	line, err := answer(ctx, h, req)
	if err != nil {
		return err
	}
	if _, err := out.Write(line); err != nil {
		return fmt.Errorf("write helper reply: %w", err)
	}
	return nil
}

// answer runs h for one decoded request and renders the reply as one line
// (compact JSON and a newline) carrying the request's request_id. Both
// ServeOne and ServeLines answer through it.
func answer(ctx context.Context, h Helper, req *Request) ([]byte, error) {
	rep, err := h.Provision(ctx, req)
	if err != nil {
		return nil, err
	}
	if rep.RequestID == "" {
		rep.RequestID = req.RequestID
	}
	b, err := json.Marshal(rep)
	if err != nil {
		return nil, fmt.Errorf("encode helper reply for %s: %w", req.Identity, err)
	}
	return append(b, '\n'), nil
}

// errorReply renders the persistent-mode reply for a request that failed.
func errorReply(requestID string, err error) []byte {
	b, _ := json.Marshal(&Reply{RequestID: requestID, Error: err.Error()})
	return append(b, '\n')
}

// ServeLines makes an in-process Helper a persistent helper program
// (docs/helpers.md, "Persistent mode"): it reads newline-delimited requests
// from in, answers up to concurrency of them at a time, and writes each
// reply as one line to out (one write per line, never interleaved), tagged
// with the request's request_id, so replies may be out of order. A request
// the helper fails gets a reply with "error" set; a line that is not a
// request gets an error reply when its request_id can be read, and is
// otherwise reported on errOut and skipped. It returns when in ends and
// every reply is written.
func ServeLines(ctx context.Context, h Helper, in io.Reader, out, errOut io.Writer, concurrency int) error {
	if concurrency <= 0 {
		concurrency = 1
	}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 0, 64<<10), MaxRequestSize+1)
	var wmu sync.Mutex
	var wg sync.WaitGroup
	var writeErr error
	write := func(line []byte) {
		wmu.Lock()
		defer wmu.Unlock()
		if writeErr != nil {
			return
		}
		if _, err := out.Write(line); err != nil {
			writeErr = fmt.Errorf("write helper reply: %w", err)
		}
	}
	sem := make(chan struct{}, concurrency)
	for sc.Scan() {
		if len(sc.Bytes()) == 0 {
			continue
		}
		req, err := DecodeRequest(sc.Bytes())
		if err == nil && req.RequestID == "" {
			err = fmt.Errorf("helper request for %s: no request_id", req.Identity)
		}
		if err != nil {
			var probe struct {
				RequestID string `json:"request_id"`
			}
			if json.Unmarshal(sc.Bytes(), &probe) == nil && probe.RequestID != "" {
				write(errorReply(probe.RequestID, err))
			} else {
				fmt.Fprintf(errOut, "skipping request line: %v\n", err)
			}
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			line, err := answer(ctx, h, req)
			if err != nil {
				line = errorReply(req.RequestID, err)
			}
			write(line)
		}()
	}
	wg.Wait()
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read helper requests: %w", err)
	}
	wmu.Lock()
	defer wmu.Unlock()
	return writeErr
}
